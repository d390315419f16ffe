"""A slide run in its own process (what the Segment widget runs, so its GUI never waits): the
same files and figures as the run in this process, the child's errors as clear messages, a child
that dies or is cancelled leaves no file behind, and one child serves run after run."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_medseg.inference import Segmenter
from napari_medseg.inference.backends import runtime_installed
from napari_medseg.inference.regions import Region
from napari_medseg.inference.settings import TileSettings
from napari_medseg.inference.slide import predict_slide
from napari_medseg.inference.slide_process import (SlideJob, SlideProcess, SlideProcessError,
                                                    iter_predict_slide_in_process)
from napari_medseg.io.slides import open_slide
from napari_medseg.steps import run_steps
from test_slides import _mosaic, _write_slide

TILES = TileSettings(tile_size=128, overlap=32)
REGION = (1024, 0, 512, 512)  # x, y, width, height: real H&E, with glass at its right


@pytest.fixture(scope="module")
def slide_file(consep, tmp_path_factory):
    image = np.full((1024, 2048, 3), 242, np.uint8)
    image[:1024, 1024:1536] = _mosaic(consep, "image", 4)[:, :512]
    path = tmp_path_factory.mktemp("slide") / "he.tif"
    _write_slide(path, image, 0.25)
    return path


def _job(checkpoint, slide, out, **changes) -> SlideJob:
    return SlideJob(**{**dict(model=str(checkpoint), slide=str(slide), out_dir=str(out), device="cpu",
                              region=REGION, tiles=asdict(TILES), threads=1), **changes})


def test_the_child_makes_what_the_run_in_this_process_makes(slide_file, tiny_checkpoint, tmp_path):
    steps = []
    result, model = run_steps(iter_predict_slide_in_process(_job(tiny_checkpoint, slide_file, tmp_path / "child")),
                              lambda done, total: steps.append((done, total)))
    here = predict_slide(Segmenter.load(tiny_checkpoint, device="cpu"), open_slide(slide_file), tmp_path / "here",
                         Region(*REGION), settings=TILES)
    assert steps[0] == (0, 0) and steps[-1][0] == steps[-1][1] > 0  # busy at once, then the run's own steps
    assert result.region == here.region and result.nuclei == here.nuclei and result.counts == here.counts
    assert result.class_px == here.class_px and result.segmented_px == here.segmented_px > 0
    assert sorted(result.files) == sorted(here.files) and all(p.exists() for p in result.files.values())
    child, mine = (zarr.open_group(str(r.files["store"]), mode="r") for r in (result, here))
    for name in ("classes/0", "instances/0"):
        assert np.array_equal(np.asarray(child[name]), np.asarray(mine[name]))
    assert model.classes == ["background", "other", "inflammatory", "epithelial", "spindle"]
    assert len(model.colors) == 5 and model.foreground_threshold is None
    def outlines(path):  # feature ids differ by design: unique to each export
        import json

        return [{**f, "id": None} for f in json.loads(path.read_text())["features"]]

    assert outlines(result.files["geojson"]) == outlines(here.files["geojson"])


def test_a_bad_job_comes_back_as_the_childs_message(slide_file, tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(SlideProcessError, match="nowhere.safetensors"):
        run_steps(iter_predict_slide_in_process(_job(missing, slide_file, tmp_path / "out")))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_child_that_dies_is_reported_not_waited_for(slide_file, tiny_checkpoint, tmp_path):
    dies = tmp_path / "dies.py"
    dies.write_text("import sys\nsys.stderr.write('out of memory, say')\nsys.exit(9)\n")
    steps = iter_predict_slide_in_process(_job(tiny_checkpoint, slide_file, tmp_path / "out"),
                                          command=[sys.executable, str(dies)])
    with pytest.raises(SlideProcessError, match=r"stopped unexpectedly \(exit code 9\).*out of memory, say"):
        run_steps(steps)


def test_closing_the_run_cancels_the_child_and_leaves_no_file(slide_file, tiny_checkpoint, tmp_path):
    steps = iter_predict_slide_in_process(_job(tiny_checkpoint, slide_file, tmp_path / "out", region=None))
    while next(steps)[0] < 1:  # until the model runs on the first block
        pass
    steps.close()
    assert not (tmp_path / "out").exists()  # no store, no temp file: the folder the run made went too


def test_one_child_runs_region_after_region_with_the_model_loaded_once(slide_file, tiny_checkpoint, tmp_path):
    process = SlideProcess()
    try:
        first, _ = run_steps(process.run(_job(tiny_checkpoint, slide_file, tmp_path / "a")))
        pid, reused_first = process.pid, process.last_reused_model
        steps = process.run(_job(tiny_checkpoint, slide_file, tmp_path / "b", region=None))
        while next(steps)[0] < 1:  # a second run, cancelled once the model runs: the child carries on
            pass
        steps.close()
        assert not (tmp_path / "b").exists()  # the folder the cancelled run made went with its files
        second, _ = run_steps(process.run(_job(tiny_checkpoint, slide_file, tmp_path / "c")))
        assert process.pid == pid and not reused_first and process.last_reused_model
        assert second.nuclei == first.nuclei and second.class_px == first.class_px
    finally:
        process.close()


def test_a_cancel_sent_before_the_job_starts_still_cancels_it(slide_file, tiny_checkpoint, tmp_path):
    """Run, then Cancel at once: the child reads the job and the cancel before it starts the job;
    the cancel is that job's (it had been cleared as the job began, and the run wrote its files)."""
    process = SlideProcess()
    try:
        steps = process.run(_job(tiny_checkpoint, slide_file, tmp_path / "out", region=None))
        next(steps)  # the job is sent; the child is still starting
        steps.close()
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
        again, _ = run_steps(process.run(_job(tiny_checkpoint, slide_file, tmp_path / "again")))
        assert again.nuclei is not None and again.segmented_px > 0  # the next job is not cancelled
    finally:
        process.close()


def test_a_checkpoint_rewritten_in_place_is_loaded_again(slide_file, tiny_checkpoint, tmp_path):
    """A training run rewrites best.safetensors: the child's next run uses the new checkpoint, not
    the model it kept loaded under the same path."""
    import shutil

    path = tmp_path / "best.safetensors"
    shutil.copy(tiny_checkpoint, path)
    process = SlideProcess()
    try:
        _, first = run_steps(process.run(_job(path, slide_file, tmp_path / "a")))
        _with_threshold(tiny_checkpoint, path, 0.7)  # as a later epoch's best would be written
        _, second = run_steps(process.run(_job(path, slide_file, tmp_path / "b")))
        assert not process.last_reused_model
        assert first.foreground_threshold is None and second.foreground_threshold == pytest.approx(0.7)
    finally:
        process.close()


def _with_threshold(checkpoint, out, threshold: float):
    """``checkpoint`` with another foreground threshold in its metadata, written to ``out``."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(checkpoint), "np") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    info = json.loads(meta["napari_medseg"])
    info["foreground_threshold"] = threshold
    meta["napari_medseg"] = json.dumps(info)
    save_file(tensors, str(out), metadata=meta)


def test_an_idle_child_ends_and_the_next_run_starts_another(slide_file, tiny_checkpoint, tmp_path):
    """An idle child gives its memory back (it holds the model and runtime) after ``idle_seconds``."""
    process = SlideProcess(idle_seconds=1.0)
    try:
        first, _ = run_steps(process.run(_job(tiny_checkpoint, slide_file, tmp_path / "a")))
        child, pid = process._child, process.pid
        assert child.wait(timeout=60) == 0  # ended on its own, cleanly
        second, _ = run_steps(process.run(_job(tiny_checkpoint, slide_file, tmp_path / "b")))
        assert process.pid != pid and not process.last_reused_model
        assert second.nuclei == first.nuclei and second.class_px == first.class_px
    finally:
        process.close()


needs_a_runtime = pytest.mark.skipif(not any(runtime_installed(r) for r in ("openvino", "onnxruntime")),
                                     reason="no ONNX runtime installed")


def _libraries(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as maps:
        return maps.read()


@needs_a_runtime
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the child's mapped libraries (Linux)")
def test_a_runtime_run_has_no_torch_in_the_child_and_makes_the_same_files(slide_file, tiny_checkpoint, tmp_path):
    """With ``auto`` (the widget's runtime) the child loads the model by the runtime alone: the
    choice is made and recorded first in a short-lived process, and torch never enters the child
    that segments. Its files equal a run in this process of the model loaded with torch."""
    import torch

    checkpoint = Path(shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors"))  # its own records
    job = _job(checkpoint, slide_file, tmp_path / "child", backend="auto", threads=1)
    process = SlideProcess()
    try:
        result, _ = run_steps(process.run(job))
        mapped = _libraries(process.pid)
    finally:
        process.close()
    assert "libtorch" not in mapped and ("openvino" in mapped or "onnxruntime" in mapped)
    assert list(tmp_path.glob("tiny.*.runtimes.json")), "the choice was not recorded beside the checkpoint"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the runtime then runs on one thread, as the job's
    try:
        segmenter = Segmenter.load(checkpoint, device="cpu", backend="auto")
        here = predict_slide(segmenter, open_slide(slide_file), tmp_path / "here", Region(*REGION), settings=TILES)
    finally:
        torch.set_num_threads(threads)
    assert segmenter.backend.name in ("openvino", "onnxruntime")
    assert result.nuclei == here.nuclei and result.counts == here.counts and result.class_px == here.class_px
    child, mine = (zarr.open_group(str(r.files["store"]), mode="r") for r in (result, here))
    for name in ("classes/0", "instances/0"):
        assert np.array_equal(np.asarray(child[name]), np.asarray(mine[name]))


@needs_a_runtime
def test_a_recorded_choice_serves_only_the_machine_and_runtimes_it_was_made_with(tiny_checkpoint, tmp_path,
                                                                                 consep):
    checkpoint = Path(shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors"))
    assert Segmenter.load_recorded(checkpoint, "cpu", "auto") is None  # never loaded: no record
    loaded = Segmenter.load(checkpoint, device="cpu", backend="auto")
    again = Segmenter.load_recorded(checkpoint, "cpu", "auto")
    assert again.model is None and (again.backend.name, again.backend.precision) == (
        loaded.backend.name, loaded.backend.precision)
    image = _mosaic(consep, "image", 1)[:128, :128]
    assert np.array_equal(again.segment(image, TILES), loaded.segment(image, TILES))
    # asked otherwise (another runtime, PyTorch, a GPU): no record serves it
    assert Segmenter.load_recorded(checkpoint, "cpu", "torch") is None
    assert Segmenter.load_recorded(checkpoint, "cuda", "auto") is None
    assert Segmenter.load_recorded(checkpoint, "cpu", "auto", precision="int8") is None
    # another runtime version (or CPU): checked again
    (record,) = tmp_path.glob("tiny.*.runtimes.json")
    entries = json.loads(record.read_text())
    for entry in entries.values():
        entry["fingerprint"]["runtimes"] = {name: "0.0" for name in entry["fingerprint"]["runtimes"]}
    record.write_text(json.dumps(entries))
    assert Segmenter.load_recorded(checkpoint, "cpu", "auto") is None
    record.write_text("not json")  # a damaged record is no record
    assert Segmenter.load_recorded(checkpoint, "cpu", "auto") is None
    Segmenter.load(checkpoint, device="cpu", backend="auto")  # made again
    assert Segmenter.load_recorded(checkpoint, "cpu", "auto") is not None
    # a new content of the checkpoint: the old record does not apply (its hash is in the name)
    shutil.copy(tiny_checkpoint, checkpoint)
    with open(checkpoint, "ab") as f:
        f.write(b" ")
    assert Segmenter.load_recorded(checkpoint, "cpu", "auto") is None
