"""Inference backends: the ONNX export (once per checkpoint, cached by hash, atomic), the runtimes
behind ``Segmenter`` checked against PyTorch at load, and the fallbacks with their notes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from napari_medseg.errors import MedsegError
from napari_medseg.inference import Segmenter, TileSettings
from napari_medseg.inference import backends
from napari_medseg.inference.backends import BackendError, runtime_installed
from napari_medseg.models import export
from napari_medseg.steps import Cancelled

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_openvino = pytest.mark.skipif(not runtime_installed("openvino"),
                                    reason="openvino is not installed (extra: napari-medseg[openvino])")
needs_onnxruntime = pytest.mark.skipif(not runtime_installed("onnxruntime"),
                                       reason="onnxruntime is not installed (extra: napari-medseg[onnxruntime])")
MIN_AGREEMENT = 0.999


@pytest.fixture(scope="module")
def tissue(consep) -> np.ndarray:
    """A real CoNSeP H&E crop, 200 x 256, with 200 columns of glass beside it (as on a slide's edge)."""
    from napari_medseg.io import read_image

    image = read_image(consep / "images" / "train_1_005.png")[:200, :256]
    return np.ascontiguousarray(np.concatenate([image, np.full((200, 200, 3), 245, np.uint8)], 1))


@pytest.fixture(scope="module")
def fresh_checkpoint(tiny_checkpoint, tmp_path_factory):
    """A copy of the tiny checkpoint in its own folder, so its exports are this module's alone."""
    folder = tmp_path_factory.mktemp("fresh")
    return shutil.copy(tiny_checkpoint, folder / "tiny.safetensors")


@pytest.fixture(scope="module")
def torch_reference(fresh_checkpoint) -> Segmenter:
    return Segmenter.load(fresh_checkpoint, device="cpu", backend="torch")


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


@pytest.mark.parametrize("name", [pytest.param("openvino", marks=needs_openvino),
                                  pytest.param("onnxruntime", marks=needs_onnxruntime)])
def test_runtime_matches_pytorch_and_says_so(name, fresh_checkpoint, torch_reference, tissue):
    seg = Segmenter.load(fresh_checkpoint, device="cpu", backend=name, precision="fp32")
    assert seg.backend.name == name and seg.backend.notes == []
    settings = TileSettings(128, 32, 2)
    probs = seg.probabilities(tissue, settings)
    expected = torch_reference.probabilities(tissue, settings)
    assert np.abs(probs - expected).max() < 1e-3
    labels = seg.segment(tissue, settings)
    assert agreement(labels, torch_reference.segment(tissue, settings)) >= MIN_AGREEMENT
    report = seg.last_report
    assert (report.backend, report.precision) == (name, "fp32")
    assert report.skipped_background > 0  # glass skipping is the engine's, whoever runs the network


@needs_openvino
def test_auto_prefers_openvino_on_the_cpu(fresh_checkpoint):
    assert Segmenter.load(fresh_checkpoint, device="cpu", backend="auto").backend.name == "openvino"


@needs_openvino
def test_openvino_runs_the_decoder_upsampling_at_the_low_resolution(tiny_checkpoint, tmp_path):
    """Its own export (same key, variant 'lowres'), the only one made for it: the U-Net decoder's
    upsampling convolutions as 2x2 phase convolutions (models.upsample_conv);
    test_runtime_matches_pytorch_and_says_so checks its outputs."""
    import onnx

    checkpoint = shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors")
    seg = Segmenter.load(checkpoint, device="cpu", backend="openvino", precision="fp32")
    assert seg.backend.name == "openvino" and not seg.backend.notes
    graph = tmp_path / export.export_name(checkpoint, export.LOW_RESOLUTION_VARIANT)
    assert [p.name for p in tmp_path.glob("*.onnx")] == [graph.name]  # no plain export it would not use
    nodes = onnx.load(str(graph)).graph.node
    assert any("/phases/" in n.name for n in nodes) and any(n.op_type == "DepthToSpace" for n in nodes)


@needs_onnxruntime
def test_tta_progress_and_cancel_with_a_runtime(fresh_checkpoint, torch_reference, tissue):
    seg = Segmenter.load(fresh_checkpoint, device="cpu", backend="onnxruntime")
    settings = TileSettings(128, 32, 2, tta=True)
    steps = []
    labels = seg.segment(tissue, settings, progress=lambda done, total: steps.append((done, total)))
    assert steps[-1][0] == steps[-1][1] == seg.last_report.tiles
    assert agreement(labels, torch_reference.segment(tissue, settings)) >= MIN_AGREEMENT
    with pytest.raises(Cancelled):
        seg.segment(tissue, settings, should_cancel=lambda: True)


@needs_onnxruntime
def test_export_is_cached_by_hash_and_reused(fresh_checkpoint, monkeypatch):
    Segmenter.load(fresh_checkpoint, device="cpu", backend="onnxruntime")
    names = {f.name for f in fresh_checkpoint.parent.glob("*.onnx")}
    plain = f"tiny.{export.checkpoint_hash(fresh_checkpoint)}.v{export.EXPORT_VERSION}.onnx"
    # (an OpenVINO test before may have left the low-resolution variant, same key)
    assert plain in names and names <= {plain, export.export_name(fresh_checkpoint, export.LOW_RESOLUTION_VARIANT)}
    assert not list(fresh_checkpoint.parent.glob("*.part"))  # written atomically: no leftovers

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(export, "export_onnx", no_export)
    assert Segmenter.load(fresh_checkpoint, device="cpu", backend="onnxruntime").backend.name == "onnxruntime"


@needs_onnxruntime
def test_read_only_folder_exports_to_the_user_cache(tiny_checkpoint, tmp_path, monkeypatch):
    checkpoint = shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_export = export.export_onnx

    def read_only_beside(model, in_channels, path, *args):
        if path.parent == checkpoint.parent:
            raise PermissionError(13, "Permission denied", str(path))
        return real_export(model, in_channels, path, *args)

    monkeypatch.setattr(export, "export_onnx", read_only_beside)
    seg = Segmenter.load(checkpoint, device="cpu", backend="onnxruntime")
    assert seg.backend.name == "onnxruntime"
    assert not list(tmp_path.glob("*.onnx"))
    assert len(list((tmp_path / "cache" / "napari-medseg" / "onnx").glob("tiny.*.onnx"))) == 1


def test_missing_runtime_falls_back_to_pytorch_with_a_note(fresh_checkpoint, tissue, monkeypatch):
    monkeypatch.setattr(backends, "runtime_installed", lambda name: False)
    seg = Segmenter.load(fresh_checkpoint, device="cpu", backend="openvino")
    assert seg.backend.name == "torch"
    seg.segment(tissue, TileSettings(128, 32, 2))
    assert seg.last_report.backend == "torch"
    assert len(seg.last_report.notes) == 1 and "openvino not installed" in seg.last_report.notes[0]


@needs_onnxruntime
def test_a_runtime_that_disagrees_is_not_used(fresh_checkpoint, monkeypatch):
    monkeypatch.setattr(backends, "onnxruntime_runner", lambda path: (lambda x: np.zeros(1, np.float32)))
    seg = Segmenter.load(fresh_checkpoint, device="cpu", backend="onnxruntime")
    assert seg.backend.name == "torch"
    assert "onnxruntime disagrees with PyTorch" in seg.last_report.notes[0]


@needs_openvino
def test_half_precision_is_kept_only_where_the_class_maps_agree(fresh_checkpoint, monkeypatch):
    """``auto`` tries fp16, then bf16, where the CPU offers them, and keeps the first whose class map
    agrees with float32 on the probe; each refusal is a note in the run report."""
    real_runner = backends.openvino_runner
    unfaithful = set()

    def runner(path, precision="fp32"):
        run = real_runner(path, "fp32")  # float32 arithmetic under every name: exact, unless made wrong
        return (lambda x: np.flip(run(x), 1)) if precision in unfaithful else run  # classes swapped around

    monkeypatch.setattr(backends, "openvino_runner", runner)
    monkeypatch.setattr(backends, "openvino_half_precisions", lambda: ["fp16", "bf16"])

    def load(precision="auto"):
        seg = Segmenter.load(fresh_checkpoint, device="cpu", backend="openvino", precision=precision)
        return seg.backend.precision, seg.backend.notes

    assert load() == ("fp16", [])
    unfaithful.add("fp16")
    precision, notes = load()
    assert precision == "bf16" and "the faster fp16 (OpenVINO) changed" in notes[0]
    unfaithful.add("bf16")
    precision, notes = load()
    assert precision == "fp32" and len(notes) == 2 and all("runs in full precision (float32)" in n for n in notes)
    assert load("fp32") == ("fp32", [])
    unfaithful.clear()
    monkeypatch.setattr(backends, "openvino_half_precisions", lambda: ["bf16"])  # an AMX CPU without AVX512-FP16
    assert load()[0] == "bf16"
    precision, notes = load("fp16")
    assert precision == "fp32" and notes == ["fp16 is not offered by OpenVINO on this CPU: float32 kept"]
    monkeypatch.setattr(backends, "openvino_half_precisions", lambda: [])  # AVX2: float32 without a word
    assert load() == ("fp32", [])


@needs_onnxruntime
def test_half_precision_asked_of_onnxruntime_says_it_runs_float32(fresh_checkpoint):
    seg = Segmenter.load(fresh_checkpoint, device="cpu", backend="onnxruntime", precision="fp16")
    assert (seg.backend.name, seg.backend.precision) == ("onnxruntime", "fp32")
    assert seg.backend.notes == ["fp16 runs on OpenVINO only: float32 on onnxruntime"]


@needs_openvino
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_runs_for_real_where_the_cpu_offers_it(precision, fresh_checkpoint, torch_reference, tissue):
    """On a CPU with AVX512-FP16 / AMX (skipped elsewhere): the precision asked for is the one that
    runs (its output is not float32's to the bit) and keeps the class map close to float32's."""
    if precision not in backends.openvino_half_precisions():
        pytest.skip(f"OpenVINO offers no {precision} on this CPU")
    seg = Segmenter.load(fresh_checkpoint, device="cpu", backend="openvino", precision=precision)
    assert (seg.backend.name, seg.backend.precision) == ("openvino", precision)
    settings = TileSettings(128, 32, 2)
    probs, expected = seg.probabilities(tissue, settings), torch_reference.probabilities(tissue, settings)
    assert 0 < np.abs(probs - expected).max() < 0.1
    assert agreement(probs.argmax(0), expected.argmax(0)) >= backends.ASKED_MIN_AGREEMENT
    assert seg.last_report.precision == precision


def test_unknown_backend_or_precision_is_a_user_error(fresh_checkpoint):
    with pytest.raises(BackendError, match="Unknown backend 'tensorrt'"):
        Segmenter.load(fresh_checkpoint, device="cpu", backend="tensorrt")
    with pytest.raises(MedsegError, match="Unknown precision 'int4'"):
        Segmenter.load(fresh_checkpoint, device="cpu", precision="int4")


@needs_onnxruntime
def test_a_new_export_removes_the_stale_ones_of_its_checkpoint(tiny_checkpoint, tmp_path):
    checkpoint = shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors")
    current = export.checkpoint_hash(checkpoint)
    stale = [f"tiny.0123456789abcdef.v{export.EXPORT_VERSION}.onnx",  # an older content of tiny.safetensors
             f"tiny.0123456789abcdef.v{export.EXPORT_VERSION}.int8q1.onnx",
             f"tiny.{current}.v0.onnx"]  # an older export version
    others = ["other.0123456789abcdef.v1.onnx", "tiny-b.0123456789abcdef.v1.onnx", "tiny.notes.onnx"]
    for name in stale + others:
        (tmp_path / name).write_bytes(b"old")
    assert Segmenter.load(checkpoint, device="cpu", backend="onnxruntime").backend.name == "onnxruntime"
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == sorted(others + [export.export_name(checkpoint)])


def test_the_user_cache_keeps_the_most_recently_used_exports(tiny_checkpoint, tmp_path, monkeypatch):
    import os

    checkpoint = shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = export.user_cache_dir()
    cache.mkdir(parents=True)
    old = [cache / f"model{i}.{i:016x}.v1.onnx" for i in range(export.CACHE_KEEP + 2)]
    for age, path in enumerate(reversed(old)):  # model0 the most recently used
        path.write_bytes(b"x")
        os.utime(path, (1e9 + age, 1e9 + age))
    export.mark_used(old[-1])  # read again just now: the most recent of all

    def make(path):
        if path.parent != cache:
            raise PermissionError(13, "Permission denied", str(path))
        path.write_bytes(b"new")
        return path

    written = export.cached_export(checkpoint, make)
    assert written.parent == cache
    kept = set(cache.glob("*.onnx"))
    assert len(kept) == export.CACHE_KEEP
    assert kept == {written, old[-1], *old[:export.CACHE_KEEP - 2]}


@needs_onnxruntime
def test_medseg_predict_takes_the_precision(fresh_checkpoint, tissue, tmp_path):
    """``--precision`` reaches the runtime; an unknown one is refused by the parser."""
    from PIL import Image

    from hostile import assert_refused, medseg

    Image.fromarray(tissue).save(tmp_path / "tissue.png")
    proc = medseg("predict", tmp_path / "tissue.png", "--model", fresh_checkpoint, "--out", tmp_path / "out",
                  "--backend", "onnxruntime", "--precision", "fp32", "--no-instances")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "labels" / "tissue.tif").is_file()
    assert_refused(medseg("predict", tmp_path / "tissue.png", "--out", tmp_path / "o", "--precision", "fp8"),
                   "--precision")
