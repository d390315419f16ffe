"""Segment's run as a user lives it, through napari's plugin menu: the image deleted while it is
segmented (the run stops, nothing is added), and an earlier error that a new model choice has
made stale (it goes from the status line)."""

from __future__ import annotations

import numpy as np

from napari_medseg._napari.segment_widget import DEFAULT_MODEL, FILE_MODEL
from napari_medseg.io import read_image

PLUGIN = "napari-medseg"


def _segment(viewer, checkpoint):
    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    seg.model_source.value = FILE_MODEL
    seg.checkpoint.value = checkpoint
    seg.device.value = "cpu"
    return seg


def test_deleting_the_image_under_way_stops_the_run_and_adds_nothing(make_napari_viewer, qtbot, tiny_checkpoint,
                                                                     consep):
    """The results had still been added, over an image that was no longer there."""
    viewer = make_napari_viewer()
    big = np.tile(read_image(consep / "images" / "train_3_000.png"), (4, 4, 1))
    viewer.add_image(big, name="big")
    viewer.add_image(big[:100, :100], name="other")
    seg = _segment(viewer, tiny_checkpoint)
    seg.image_layer.value = viewer.layers["big"]
    seg.tile_size.value, seg.overlap.value, seg.batch_size.value = 128, 32, 2
    worker = seg.run()
    qtbot.waitUntil(lambda: seg.progress.value >= 2, timeout=30_000)
    with qtbot.waitSignal(worker.finished, timeout=5_000):
        viewer.layers.remove("big")
    assert [layer.name for layer in viewer.layers] == ["other"]
    assert "'big' was removed from the viewer during the run" in seg.status.value, seg.status.value
    assert "nothing was added" in seg.status.value and seg.run_button.enabled


def test_an_image_deleted_as_its_run_ends_gets_no_result(make_napari_viewer, tiny_checkpoint, consep):
    """Past the last step Cancel can stop (the result made, its layers not yet added): the layers
    are dropped, and the status says why."""
    viewer = make_napari_viewer()
    viewer.add_image(read_image(consep / "images" / "train_3_000.png"), name="patch")
    seg = _segment(viewer, tiny_checkpoint)
    shown = seg._on_progress

    def progress(step):
        shown(step)
        done, total = step
        if done == total and "patch" in viewer.layers:
            viewer.layers.remove("patch")

    seg._on_progress = progress
    assert seg.run(threaded=False) is None
    assert len(viewer.layers) == 0
    assert seg.status.value == "Not added: 'patch' was removed from the viewer during the run."
    assert seg.run_button.enabled and not seg.cancel_button.enabled


def test_choosing_another_model_clears_the_last_runs_model_error(make_napari_viewer, tmp_path, consep):
    """A checkpoint that was no checkpoint gave an error; the default chosen next, the status still
    showed that error, as if the default were broken."""
    viewer = make_napari_viewer()
    viewer.add_image(read_image(consep / "images" / "train_3_000.png"), name="patch")
    not_a_checkpoint = tmp_path / "notes.safetensors"
    not_a_checkpoint.write_text("not weights")
    seg = _segment(viewer, not_a_checkpoint)
    assert seg.run(threaded=False) is None
    assert seg.status.value.startswith("Error:"), seg.status.value
    assert len(viewer.layers) == 1
    seg.model_source.value = DEFAULT_MODEL
    assert seg.status.value == ("Model ready (classes: other, inflammatory, epithelial, spindle); "
                                "Run segments with it.")
    # a status that is no error (a run's summary) stays as it is when the choice changes
    seg.status.value = "Done: 12 nuclei"
    seg.model_source.value = FILE_MODEL
    seg.model_source.value = DEFAULT_MODEL
    assert seg.status.value == "Done: 12 nuclei"
