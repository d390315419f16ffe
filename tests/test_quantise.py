"""Int8 on request: the shipped default quantised by its measured plan (int8 for the
low-resolution layers, float32 elsewhere; calibrated on the package's MoNuSeg crop), cached
beside its float32 export under the same key, checked against float32 at load, never picked by
``auto``; a network without a plan is quantised whole."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

from napari_medseg.inference import Segmenter, TileSettings
from napari_medseg.inference import backends
from napari_medseg.inference.backends import ASKED_MIN_AGREEMENT, runtime_installed
from napari_medseg.models import export, quantise, resolve_model_path
from napari_medseg.models.quantise import QuantiseError

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not runtime_installed("onnxruntime"),
                                 reason="onnxruntime is not installed (extra: napari-medseg[onnxruntime])")]


@pytest.fixture(scope="module")
def default_copy(tmp_path_factory):
    """The shipped default in a folder of its own, so its exports lie beside it, this module's
    alone (an empty user cache: the shipped file's exports there have the same key)."""
    folder = tmp_path_factory.mktemp("default")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield shutil.copy(resolve_model_path("default"), folder / "default.safetensors")


@pytest.fixture(scope="module")
def held_out(consep) -> np.ndarray:
    """A CoNSeP patch of a source image the default never trained on, and not the calibration tile."""
    from napari_medseg.io import read_image

    return read_image(consep / "images" / "train_12_005.png")[:192, :192]


@pytest.fixture(scope="module")
def int8(default_copy) -> Segmenter:
    return Segmenter.load(default_copy, device="cpu", backend="onnxruntime", precision="int8")


def test_int8_on_request_runs_quantised_near_float32(int8, default_copy, held_out):
    assert (int8.backend.name, int8.backend.precision) == ("onnxruntime", "int8")
    settings = TileSettings(128, 32, 2)
    labels = int8.segment(held_out, settings)
    assert (int8.last_report.precision, int8.last_report.backend) == ("int8", "onnxruntime")
    assert "argmax agreement with float32" in int8.last_report.notes[0]
    reference = Segmenter.load(default_copy, device="cpu", backend="torch").segment(held_out, settings)
    agreement = float((labels == reference).mean())
    assert ASKED_MIN_AGREEMENT <= agreement < 1.0  # close to float32, and really int8 arithmetic


def test_int8_lies_beside_the_export_under_its_key_and_is_reused(int8, default_copy, monkeypatch):
    folder = default_copy.parent
    assert {p.name for p in folder.glob("*.onnx")} == {export.export_name(default_copy),
                                                       export.export_name(default_copy, quantise.MIXED_VARIANT)}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp file or work folder left

    def no_quantise(*args):
        raise AssertionError("quantised again")

    monkeypatch.setattr(quantise, "quantise_onnx", no_quantise)
    assert Segmenter.load(default_copy, device="cpu", backend="onnxruntime", precision="int8").backend.precision == "int8"


def test_the_plan_quantises_the_low_resolution_layers_only(int8, default_copy):
    import onnx

    graph = onnx.load(str(default_copy.parent / export.export_name(default_copy, quantise.MIXED_VARIANT))).graph
    dequantised = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    plan = re.compile(quantise.int8_plan("unet", "mobilenet_v2"))
    convs = [node for node in graph.node if node.op_type == "Conv"]
    int8_convs = {node.name for node in convs if node.input[1] in dequantised}  # int8 weights
    assert int8_convs == {node.name for node in convs if plan.match(node.name)}
    assert 0 < len(int8_convs) < len(convs)
    assert any("features.18" in name for name in int8_convs) and not any("features.0/" in n for n in int8_convs)


def test_auto_keeps_float_precision(int8, default_copy):
    """The plan's int8 moves 0.09 % of the held-out pixels but 0.12 % of a 4096² mosaic's: at the
    edge of the 99.9 % rule, so it is asked for, never picked."""
    assert "int8 (mixed" in int8.backend.notes[0]
    assert Segmenter.load(default_copy, device="cpu", backend="auto").backend.precision != "int8"


def test_a_plan_that_names_no_node_keeps_float32(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(quantise.INT8_PLANS, ("unet", "resnet18"), r"^/no/such/module/")
    seg = Segmenter.load(shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors"), device="cpu",
                         backend="onnxruntime", precision="int8")
    assert seg.backend.precision == "fp32"
    assert "names none of the exported network's nodes" in seg.backend.notes[0]


def test_an_int8_model_that_disagrees_falls_back_to_float32(int8, default_copy, monkeypatch):
    real_runner = backends.onnxruntime_runner

    def runner(path):
        run = real_runner(path)
        return (lambda x: np.flip(run(x), 1)) if quantise.INT8_VARIANT in str(path) else run

    monkeypatch.setattr(backends, "onnxruntime_runner", runner)
    seg = Segmenter.load(default_copy, device="cpu", backend="onnxruntime", precision="int8")
    assert (seg.backend.name, seg.backend.precision) == ("onnxruntime", "fp32")
    assert "int8 (onnxruntime) changed" in seg.backend.notes[0]


def test_no_quantiser_keeps_float32_with_a_note(tiny_checkpoint, tmp_path, monkeypatch):
    checkpoint = shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors")

    def missing(*args):
        raise QuantiseError("int8 needs ONNX Runtime's quantiser: pip install 'napari-medseg[onnxruntime]'.")

    monkeypatch.setattr(quantise, "quantise_onnx", missing)
    seg = Segmenter.load(checkpoint, device="cpu", backend="onnxruntime", precision="int8")
    assert (seg.backend.name, seg.backend.precision) == ("onnxruntime", "fp32")
    assert "int8 needs ONNX Runtime's quantiser" in seg.backend.notes[0]
    assert not list(tmp_path.glob(f"*{quantise.INT8_VARIANT}*"))


def test_calibration_sees_each_tile_in_four_orientations():
    batch = torch.rand(2, 3, 8, 8).numpy()
    inputs = quantise.calibration_inputs(batch)
    assert len(inputs) == 8 and all(x.shape == (1, 3, 8, 8) and x.flags.c_contiguous for x in inputs)
    np.testing.assert_array_equal(inputs[1][0], batch[0][:, :, ::-1])
