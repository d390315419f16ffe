"""Segment widget at scale, driven through make_napari_viewer: every engine option, a lazy
pyramidal TIFF opened by the reader and segmented, and Cancel within a second."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tifffile
from napari.layers import Labels

from napari_medseg._napari.segment_widget import FILE_MODEL, SegmentWidget
from napari_medseg.inference import PostprocessSettings, Segmenter, TileSettings
from napari_medseg.io import read_image


def _widget(viewer, checkpoint) -> SegmentWidget:
    widget = SegmentWidget(viewer)
    widget.model_source.value = FILE_MODEL
    widget.checkpoint.value = checkpoint
    widget.device.value = "cpu"
    return widget


def test_every_option_reaches_the_engine(make_napari_viewer, tiny_checkpoint, consep):
    viewer = make_napari_viewer()
    image = np.tile(read_image(consep / "images" / "train_2_000.png"), (2, 1, 1))
    viewer.add_image(image, name="patch")
    widget = _widget(viewer, tiny_checkpoint)
    widget.tile_size.value, widget.overlap.value, widget.batch_size.value = 128, 32, 3
    widget.blend.value = "cosine"
    widget.tta.value = True
    widget.skip_background.value = False
    widget.min_object_size.value = 40
    widget.fill_holes.value = 25
    layer = widget.run(threaded=False)
    assert isinstance(layer, Labels), widget.status.value
    settings = widget.tile_settings()
    assert (settings.tile_size, settings.overlap, settings.batch_size) == (128, 32, 3)
    assert settings.blend == "cosine" and settings.tta and not settings.skip_background
    expected = Segmenter.load(tiny_checkpoint, device="cpu").segment(
        image, TileSettings(128, 32, 3, blend="cosine", tta=True, skip_background=False),
        postprocess=PostprocessSettings(40, 25))
    np.testing.assert_array_equal(layer.data, expected)
    from napari_medseg.nuclei.watershed import INSTANCE_STEPS

    # 5 x 3 tiles, then the nuclei step, complete even where (untrained model) it finds none
    assert widget.progress.value == widget.progress.max == 15 + INSTANCE_STEPS


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "openvino"])
def test_the_runtime_choice_reaches_the_engine_and_the_status(make_napari_viewer, tiny_checkpoint, consep, runtime):
    """The Segment widget runs the network by the chosen runtime (auto, its default, picks the
    fastest that agrees with PyTorch); the status line says which ran it."""
    if runtime != "torch":
        pytest.importorskip(runtime)
    viewer = make_napari_viewer()
    image = read_image(consep / "images" / "train_2_000.png")
    viewer.add_image(image, name="patch")
    widget = _widget(viewer, tiny_checkpoint)
    assert widget.backend.value == "auto"
    widget.backend.value = runtime
    layer = widget.run(threaded=False)
    assert isinstance(layer, Labels), widget.status.value
    segmenter = widget._segmenter_cache[1]
    name = {"torch": "PyTorch", "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}[segmenter.backend.name]
    assert f"run by {name} ({segmenter.backend.precision})" in widget.status.value
    # the runtime asked for runs it, unless it disagreed with PyTorch at load (then the status says so)
    assert segmenter.backend.name == runtime or "PyTorch" in widget.status.value and segmenter.backend.notes
    expected = Segmenter.load(tiny_checkpoint, device="cpu").segment(image, widget.tile_settings())
    assert (layer.data == expected).mean() >= 0.999


def test_large_pyramidal_tiff_opens_lazily_and_segments(make_napari_viewer, tiny_checkpoint, consep, tmp_path):
    import dask.array as da

    tile = read_image(consep / "images" / "train_3_000.png")
    image = np.tile(tile, (3, 2, 1))  # 768 x 512
    path = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, subifds=1, tile=(128, 128), metadata={"axes": "YXS"})
        tw.write(image[::2, ::2], subfiletype=1, tile=(128, 128))
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin="napari-medseg")
    assert layer.multiscale and layer.rgb and layer.name == "slide"
    assert isinstance(layer.data[0], da.Array) and layer.data[0].shape == image.shape  # not read yet
    widget = _widget(viewer, tiny_checkpoint)
    widget.tile_size.value, widget.overlap.value = 128, 32
    widget.backend.value = "torch"  # compared with PyTorch's output to the pixel
    labels = widget.run(threaded=False)
    assert isinstance(labels, Labels) and labels.data.shape == image.shape[:2]
    expected = Segmenter.load(tiny_checkpoint, device="cpu").segment(image, widget.tile_settings())
    np.testing.assert_array_equal(labels.data, expected)


def test_cancel_takes_effect_within_a_second(make_napari_viewer, qtbot, tiny_checkpoint, consep):
    viewer = make_napari_viewer()
    big = np.tile(read_image(consep / "images" / "train_3_000.png"), (4, 4, 1))
    viewer.add_image(big, name="big")
    widget = _widget(viewer, tiny_checkpoint)
    widget.tile_size.value, widget.overlap.value, widget.batch_size.value = 128, 32, 2
    worker = widget.run()
    qtbot.waitUntil(lambda: widget.progress.value >= 2, timeout=30_000)
    t0 = time.perf_counter()
    with qtbot.waitSignal(worker.finished, timeout=5_000):
        widget.cancel()
    assert time.perf_counter() - t0 < 1.0
    assert [layer.name for layer in viewer.layers] == ["big"]  # nothing half-made
    assert "Cancelled" in widget.status.value and widget.run_button.enabled


def test_nucleus_threshold_is_the_models_unless_set(make_napari_viewer, consep):
    """0 uses the model's tuned threshold (the default carries one), a value overrides it for
    that run only; the layer equals the engine's output with the same threshold (and the model's
    class weights, which every run applies)."""
    from napari_medseg.inference import classify

    viewer = make_napari_viewer()
    image = read_image(consep / "images" / "train_19_005.png")
    viewer.add_image(image, name="patch")
    widget = SegmentWidget(viewer)
    widget.device.value = "cpu"
    widget.backend.value = "torch"  # compared with PyTorch's output to the pixel
    widget.nuclei.value = False
    reference = Segmenter.load("default", device="cpu")
    assert reference.foreground_threshold == pytest.approx(0.34)
    weights = reference.class_weights
    assert weights == [1.5, 4.0, 1.0, 0.5]  # medseg tune-classes' choice for the default
    probs = reference.probabilities(image, widget.tile_settings())

    # 0 reads as the model's own, never as "0.00", with the chosen model's value from the start
    assert widget.threshold.native.text() == "model's (0.34)"
    layer = widget.run(threaded=False)
    np.testing.assert_array_equal(layer.data, classify(probs, 0.34, weights))
    assert "nucleus threshold 0.34" in widget.status.value
    assert widget.threshold.native.text() == "model's (0.34)"
    widget.threshold.value = 0.8
    assert widget.threshold.native.text() == "0.80"
    layer = widget.run(threaded=False)
    np.testing.assert_array_equal(layer.data, classify(probs, 0.8, weights))
    assert (layer.data > 0).sum() < (viewer.layers["patch segmentation"].data > 0).sum()  # stricter: fewer nuclei px
    widget.threshold.value = 0.0
    layer = widget.run(threaded=False)
    np.testing.assert_array_equal(layer.data, classify(probs, 0.34, weights))


def test_cancel_while_the_runtime_is_checked_stops_the_check(make_napari_viewer, qtbot, tiny_checkpoint, consep,
                                                           tmp_path):
    """The first run of a checkpoint never checked on this machine checks its runtime in a process
    of its own (napari's keeps no torch); a cancel then ends that process at once and adds nothing,
    and the next run checks again and segments."""
    import shutil

    import psutil

    from napari_medseg.inference.backends import runtime_installed

    if not any(runtime_installed(r) for r in ("openvino", "onnxruntime")):
        pytest.skip("no ONNX runtime installed")
    viewer = make_napari_viewer()
    viewer.add_image(read_image(consep / "images" / "train_3_000.png"), name="patch")
    widget = _widget(viewer, shutil.copy(tiny_checkpoint, tmp_path / "unchecked.safetensors"))

    def command(process) -> str:  # a child ended by an earlier test (a zombie until reaped) has none
        try:
            return " ".join(process.cmdline())
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            return ""

    checks = lambda: [p for p in psutil.Process().children(recursive=True)  # noqa: E731
                      if "napari_medseg.inference.runtime_record" in command(p)]
    worker = widget.run()
    qtbot.waitUntil(lambda: len(checks()) == 1, timeout=10_000)
    (check,) = checks()
    with qtbot.waitSignal(worker.finished, timeout=5_000):
        widget.cancel()
    assert not check.is_running() or check.status() == psutil.STATUS_ZOMBIE
    assert [layer.name for layer in viewer.layers] == ["patch"] and "Cancelled" in widget.status.value
    assert not list(tmp_path.glob("unchecked.*.runtimes.json"))  # the check never finished
    widget.run()
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=120_000)  # the layers go in, one a turn, first
    assert len(viewer.layers) == 3 and list(tmp_path.glob("unchecked.*.runtimes.json")), widget.status.value


def test_a_layer_in_nanometres_is_segmented_at_its_pixel_size(make_napari_viewer, consep):
    """A layer whose scale is in nm (250 nm: 40x) is segmented as the same image in µm is; it had
    been taken as 250 µm/px. A scale no microscope gives is refused in the layer's own terms."""
    from napari_medseg._napari.layers import pixel_size_um

    image = read_image(consep / "images" / "train_19_005.png")
    viewer = make_napari_viewer()
    in_um = viewer.add_image(image, name="um", scale=(0.25, 0.25), units=("um", "um"))
    in_nm = viewer.add_image(image, name="nm", scale=(250, 250), units=("nm", "nm"))
    in_mm = viewer.add_image(image, name="mm", scale=(0.0005, 0.0005), units=("mm", "mm"))
    huge = viewer.add_image(image, name="no unit", scale=(100, 100))
    assert [pixel_size_um(layer) for layer in (in_um, in_nm, in_mm, huge)] == pytest.approx([0.25, 0.25, 0.5, 100])
    widget = SegmentWidget(viewer)
    results = []
    for layer in (in_um, in_nm):
        widget.image_layer.value = layer
        widget.run(threaded=False)
        results.append(np.asarray(widget.last_layer.data))
    np.testing.assert_array_equal(results[0], results[1])
    before = len(viewer.layers)
    widget.image_layer.value = huge
    assert widget.run(threaded=False) is None and len(viewer.layers) == before
    assert "'no unit' says its pixels are 100 µm wide (its scale 100, no unit)" in widget.status.value


def test_how_the_runtime_was_chosen_is_said_once_per_loaded_model(make_napari_viewer, tiny_checkpoint, consep):
    """'openvino bf16 kept float32: argmax agreement 99.64% < 99.9%' stood under every run's
    counts, as if each image had failed a check: it is said with the first run of a loaded model."""
    viewer = make_napari_viewer()
    viewer.add_image(read_image(consep / "images" / "train_2_000.png"), name="patch")
    widget = _widget(viewer, tiny_checkpoint)
    widget.backend.value = "torch"
    widget.run(threaded=False)
    segmenter = widget._segmenter_cache[1]
    note = "runtime X kept float32: argmax agreement 99.64% < 99.9%"
    segmenter.backend.notes.append(note)  # what a runtime's check leaves, on a model loaded anew
    widget._runtime_noted = None
    widget.run(threaded=False)
    assert f"Note: {note}" in widget.status.value
    widget.run(threaded=False)  # the same model again: its counts without the runtime's story
    assert note not in widget.status.value and "run by PyTorch" in widget.status.value
    widget.threshold.value = 0.6
    widget.rethreshold(threaded=False)
    assert note not in widget.status.value and "Done:" in widget.status.value
