"""Hostile inputs to the napari widgets and writers, through napari's own machinery: each bad input
is refused with a message that names the layer and what to do, the viewer lives on, no layer is
added and no file is written; a failing worker is one notification and never ends the process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

from napari_medseg._napari.layers import METADATA_KEY, class_labels_kwargs, instance_labels_kwargs
from napari_medseg._napari.sample_data import consep_sample, monuseg_sample
from napari_medseg.evaluation.report import evaluate_maps
from napari_medseg.io.outputs import OutputWriteError

from hostile import no_temp_files, tree

CONSEP_CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]
HUGE_ID = 200_000  # an instance map's ids (a lab's export numbers nuclei from here)


def _dock(viewer, name: str):
    return viewer.window.add_plugin_dock_widget("napari-medseg", name)[1]


def _sample(viewer, sample) -> list:
    return [getattr(viewer, f"add_{kind}")(data, **kwargs) for data, kwargs, kind in sample()]


def _monuseg_unnamed(viewer):
    """MoNuSeg as napari's own reader would give it: the image, and its nuclei numbered from
    ``HUGE_ID`` on a layer without this plugin's metadata."""
    image, instances, _ = _sample(viewer, monuseg_sample)
    ids = instances.data.astype(np.int64)
    ids[ids > 0] += HUGE_ID
    viewer.layers.remove(instances)
    return image, viewer.add_labels(ids, name="nuclei export")


def _refused(widget, status, n_layers: int, viewer, *fragments: str) -> str:
    """The widget said why (every fragment), added no layer, and it and the viewer still work."""
    text = status.value
    assert text.startswith("Error: "), text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    assert "Traceback" not in text and "unexpected" not in text, text
    assert len(viewer.layers) == n_layers
    widget.reset_choices()  # the widget answers; the viewer lives on and takes a new layer
    assert viewer.add_labels(np.zeros((4, 4), np.uint8), name="probe") in viewer.layers
    return text


# -- Metrics ----------------------------------------------------------------------------------------
def test_metrics_scores_an_unnamed_instance_map_with_huge_ids_as_nucleus_only_ground_truth(make_napari_viewer):
    viewer = make_napari_viewer()
    _, truth = _monuseg_unnamed(viewer)
    pred = viewer.add_labels(np.roll(truth.data > 0, 3, axis=0).astype(np.uint8), name="unnamed prediction")
    widget = _dock(viewer, "Metrics")
    widget.prediction.value, widget.ground_truth.value = pred, truth
    tracemalloc.start()
    report = widget.compute()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200 * 2**20, f"{peak / 2**20:.0f} MiB for a {truth.data.shape} map"  # was 298 GiB
    expected = evaluate_maps((truth.data > 0).astype(np.uint8), pred.data, ["background", "nucleus"],
                             gt_instances=truth.data)
    assert report["overall"]["nucleus_dice"] == pytest.approx(expected["overall"]["nucleus_dice"], abs=1e-12)
    assert report["overall"]["aji"] == pytest.approx(expected["overall"]["aji"], abs=1e-12)
    assert list(widget.table.value["index"][:2]) == ["background", "nucleus"]


def test_metrics_refuses_an_instance_map_as_prediction_then_takes_it_as_instances(make_napari_viewer):
    viewer = make_napari_viewer()
    _, truth_instances, truth = _sample(viewer, consep_sample)
    nuclei = truth_instances.data.astype(np.int64)
    nuclei[nuclei > 0] += HUGE_ID
    export = viewer.add_labels(nuclei, name="nuclei export")
    pred = viewer.add_labels(truth.data.copy(), **class_labels_kwargs("prediction", CONSEP_CLASSES))
    widget = _dock(viewer, "Metrics")
    widget.prediction.value, widget.ground_truth.value = export, truth
    n_layers = len(viewer.layers)
    assert widget.compute() is None
    _refused(widget, widget.summary, n_layers, viewer, f"'nuclei export' holds id {int(nuclei.max())}",
             "instance map", "'predicted instances'")
    # as the message says: the export as the predicted nuclei, a class map as the prediction
    widget.prediction.value, widget.pred_instances.value = pred, export
    widget.gt_instances.value = truth_instances
    given = widget.compute()["overall"]
    assert given["aji"] == pytest.approx(1.0) and given["miou"] == pytest.approx(1.0)


def test_metrics_ignores_thousands_of_reader_made_class_names(make_napari_viewer):
    """A label file of nuclei recorded as a class map with a name for each id (as the reader names
    one): no menu of 200 000 classes, and the layer is refused as a class map with the reason."""
    viewer = make_napari_viewer()
    _, _, truth = _sample(viewer, consep_sample)
    data = np.zeros(truth.data.shape, np.int64)
    data[10:20, 10:20] = HUGE_ID
    names = ["background"] + [f"class {i}" for i in range(1, HUGE_ID + 1)]
    # the names without their colours: napari cannot colour 200 000 labels without numba
    named = viewer.add_labels(data, name="x_labels", metadata={METADATA_KEY: {"kind": "classes", "classes": names}})
    widget = _dock(viewer, "Metrics")
    widget.prediction.value, widget.ground_truth.value = named, truth
    widget.reset_choices()
    assert len(widget.visible_classes.choices) == len(CONSEP_CLASSES) - 1
    n_layers = len(viewer.layers)
    assert widget.compute() is None
    _refused(widget, widget.summary, n_layers, viewer, f"'x_labels' holds id {HUGE_ID}", "instance map")


def _metrics_case(viewer, truth, case: str):
    """(prediction layer, ground-truth layer, expected fragments) of one bad pair."""
    shape = truth.data.shape
    if case == "negative prediction":
        data = truth.data.astype(np.int32)
        data[:3, :3] = -3
        return viewer.add_labels(data, name="neg"), truth, ("'neg' holds the negative id -3",)
    if case == "negative ground truth":
        data = truth.data.astype(np.int32)
        data[:3, :3] = -1
        gt = viewer.add_labels(data, name="neg gt")
        return viewer.add_labels(truth.data.copy(), name="pred"), gt, ("'neg gt' holds the negative id -1",)
    if case == "stack":
        stack = viewer.add_labels(np.stack([truth.data] * 2), name="stack")
        return stack, truth, (f"'stack' has shape (2, {shape[0]}, {shape[1]})",)
    if case == "shapes":
        small = viewer.add_labels(truth.data[:100, :100].copy(), name="crop")
        return small, truth, ("'crop' has shape (100, 100)", f"'{truth.name}' {shape}", "same image")
    if case == "gt class id":
        data = truth.data.copy()
        data[:5, :5] = 7
        gt = viewer.add_labels(data, **class_labels_kwargs("gt7", CONSEP_CLASSES))
        return viewer.add_labels(truth.data.copy(), name="pred"), gt, ("'gt7' holds class id 7",)
    raise AssertionError(case)


def test_metrics_bad_layers_are_named_and_keep_the_table(make_napari_viewer):
    viewer = make_napari_viewer()
    _, _, truth = _sample(viewer, consep_sample)
    widget = _dock(viewer, "Metrics")
    copy = viewer.add_labels(truth.data.copy(), **class_labels_kwargs("copy", CONSEP_CLASSES))
    widget.prediction.value, widget.ground_truth.value = copy, truth
    assert widget.compute()["overall"]["miou"] == 1.0
    before = widget.table.value
    for case in ("negative prediction", "negative ground truth", "stack", "shapes", "gt class id"):
        pred, gt, fragments = _metrics_case(viewer, truth, case)
        widget.reset_choices()
        widget.prediction.value, widget.ground_truth.value = pred, gt
        n_layers = len(viewer.layers)
        assert widget.compute() is None, case
        assert widget.show_errors() is None  # the overlay refuses the same pair, adding nothing
        _refused(widget, widget.summary, n_layers, viewer, *fragments)
        assert widget.table.value == before


def test_metrics_instance_layer_of_another_image_is_named(make_napari_viewer):
    viewer = make_napari_viewer()
    _, instances, truth = _sample(viewer, consep_sample)
    other = viewer.add_labels(instances.data[:64, :64].copy(), **instance_labels_kwargs("other nuclei"))
    widget = _dock(viewer, "Metrics")
    widget.prediction.value, widget.ground_truth.value = truth, viewer.add_labels(truth.data.copy(), name="gt")
    widget.gt_instances.value = other
    n_layers = len(viewer.layers)
    assert widget.compute() is None
    _refused(widget, widget.summary, n_layers, viewer, "'other nuclei' has shape (64, 64)", "same image")


# -- Objects ----------------------------------------------------------------------------------------
def test_objects_refuses_an_instance_map_as_class_map_then_measures_it_as_nuclei(make_napari_viewer):
    viewer = make_napari_viewer()
    image, export = _monuseg_unnamed(viewer)
    mask = viewer.add_labels((export.data > 0).astype(np.uint8), name="mask")
    widget = _dock(viewer, "Objects")
    widget.class_layer.value = export
    n_layers = len(viewer.layers)
    assert widget.measure() is None
    _refused(widget, widget.summary, n_layers, viewer, "'nuclei export' holds id", "instance map", "'instances'")
    widget.class_layer.value, widget.instance_layer.value, widget.image_layer.value = mask, export, image
    n_layers = len(viewer.layers)
    table = widget.measure()
    assert len(table["label"]) == len(np.unique(export.data)) - 1 and table["label"].min() > HUGE_ID
    assert len(viewer.layers) == n_layers  # given nuclei: none derived, no layer added


def test_objects_measures_and_exports_ids_too_large_for_a_table(make_napari_viewer, tmp_path):
    """Another tool's nucleus ids in the billions: measured and exported under their own ids, with
    no table as long as the largest id (which was 24 GB, or 'relabel them first')."""
    import json

    viewer = make_napari_viewer()
    image, export = _monuseg_unnamed(viewer)
    ids = export.data.astype(np.int64)
    ids[ids > 0] += 3_000_000_000
    huge = viewer.add_labels(ids, name="billions")
    mask = viewer.add_labels((ids > 0).astype(np.uint8), **class_labels_kwargs("mask", ["background", "nucleus"]))
    widget = _dock(viewer, "Objects")
    widget.class_layer.value, widget.instance_layer.value, widget.image_layer.value = mask, huge, image
    tracemalloc.start()
    table = widget.measure()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert table is not None, widget.summary.value
    assert sorted(table["label"].tolist()) == sorted(np.unique(ids[ids > 0]).tolist())
    assert set(table["class"]) == {"nucleus"} and peak < 500 * 2**20
    written = widget.export_geojson(tmp_path / "nuclei.geojson")
    features = json.loads(written.read_text())["features"]
    assert {f["properties"]["label"] for f in features} <= set(table["label"].tolist())
    assert len(features) >= 0.9 * len(table["label"])  # every nucleus but specks too small for a polygon
    assert all(f["properties"]["classification"]["name"] == "nucleus" for f in features)


def _objects_case(viewer, image, truth, instances, case: str):
    """(class layer, instance layer, image layer, expected fragments) of one bad choice."""
    if case == "negative":
        data = truth.data.astype(np.int16)
        data[5, 5] = -2
        return viewer.add_labels(data, name="neg"), None, None, ("'neg' holds the negative id -2",)
    if case == "instances of another image":
        other = viewer.add_labels(instances.data[:50].copy(), **instance_labels_kwargs("other"))
        return truth, other, None, ("'other' has shape (50,", f"'{truth.name}'")
    if case == "image of another size":
        small = viewer.add_image(image.data[:80, :90], name="small crop", rgb=True)
        return truth, None, small, ("'small crop' has shape (80, 90, 3)",)
    if case == "image stack":
        stack = viewer.add_image(np.zeros((2, *truth.data.shape), np.uint8), name="grey stack")
        return truth, None, stack, ("'grey stack' has shape (2,",)
    raise AssertionError(case)


def test_objects_bad_layers_are_named_and_add_nothing(make_napari_viewer):
    viewer = make_napari_viewer()
    image, instances, truth = _sample(viewer, consep_sample)
    widget = _dock(viewer, "Objects")
    # a stacked class map is measured at the image shown (test_napari_objects), no longer refused
    for case in ("negative", "instances of another image", "image of another size", "image stack"):
        class_layer, instance_layer, image_layer, fragments = _objects_case(viewer, image, truth, instances, case)
        widget.reset_choices()
        widget.class_layer.value = class_layer
        widget.instance_layer.value, widget.image_layer.value = instance_layer, image_layer
        n_layers = len(viewer.layers)
        assert widget.measure() is None, case
        _refused(widget, widget.summary, n_layers, viewer, *fragments)


# -- Train ------------------------------------------------------------------------------------------
def _train_case(viewer, case: str):
    """(image layer, labels layer, tile size, expected fragments) of one bad painted pair."""
    rng = np.random.default_rng(0)
    sizes = {"1x1": (1, 1), "thin strip": (10, 600), "small tiles": (48, 48)}
    if case in sizes:
        h, w = sizes[case]
        image = viewer.add_image(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), name=f"img {case}", rgb=True)
        labels = viewer.add_labels(np.ones((h, w), np.uint8), name=f"painted {case}")
        if case == "small tiles":
            return image, labels, 32, ("tile size of 32 px", "as small as 24 x 24 px", "larger tile size")
        return image, labels, 256, (f"'img {case}' is {h} x {w} px", "32 x 32 px", "larger image")
    image = viewer.add_image(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), name=f"img {case}", rgb=True)
    data = np.zeros((64, 64), np.int32)
    data[20:30, 20:30] = {"instance ids": HUGE_ID, "negative": -1, "nothing painted": 0}.get(case, 1)
    if case == "other shape":
        data = data[:40]
    labels = viewer.add_labels(data, name=f"painted {case}")
    return image, labels, 256, {
        "instance ids": (f"'painted {case}' holds id {HUGE_ID}", "instance map", "one id per class"),
        "negative": (f"'painted {case}' holds the negative id -1",),
        "nothing painted": (f"'painted {case}' is empty (all background)", "paint some nuclei"),
        "other shape": (f"'painted {case}' has shape (40, 64)", f"'img {case}' are (64, 64)"),
    }[case]


def test_train_bad_painted_layers_are_named_before_anything_is_made(make_napari_viewer, tmp_path):
    from napari_medseg._napari.train_form import FROM_LAYERS

    viewer = make_napari_viewer()
    widget = _dock(viewer, "Train")
    widget.source.value = FROM_LAYERS
    widget.output_dir.value = str(tmp_path)
    for case in ("1x1", "thin strip", "small tiles", "instance ids", "negative", "other shape", "nothing painted"):
        image, labels, tile, fragments = _train_case(viewer, case)
        widget.reset_choices()
        widget.image_layer.value, widget.labels_layer.value = image, labels
        widget.tile_size.value = tile
        n_layers = len(viewer.layers)
        assert widget.run(threaded=False) is None, case
        text = _refused(widget, widget.status, n_layers, viewer, *fragments)
        assert "learning rate" not in text
        assert list(tmp_path.iterdir()) == []  # no run folder made
        assert widget.train_button.enabled


# -- Writers (napari's own save path) ---------------------------------------------------------------
def _save_case(viewer, tmp_path, case: str):
    """(layer, target, expected fragments) of one save that cannot work."""
    plane = np.zeros((32, 32), np.int32)
    plane[8:16, 8:16] = 1
    if case == "negative":
        plane[0, 0] = -1
        return viewer.add_labels(plane, name="neg"), tmp_path / "neg.tif", ("'neg'", "negative id -1")
    if case == "stack":
        layer = viewer.add_labels(np.stack([plane] * 2), name="stack")
        return layer, tmp_path / "stack.geojson", ("'stack'", "stack of 2 maps (2, 32, 32)", "one plane")
    if case == "folder is a file":
        (tmp_path / "notes").write_text("mine")
        return viewer.add_labels(plane, name="ok"), tmp_path / "notes" / "x.tif", ("is a file, not a folder",)
    if case == "class id beyond the names":
        plane[0, 0] = 9
        layer = viewer.add_labels(plane, **class_labels_kwargs("classes", ["background", "nucleus"]))
        return layer, tmp_path / "c.geojson", ("'classes' holds class id 9",)
    if case == "slide pyramid":  # as a slide run adds its labels: levels read from disk, its exports beside them
        kwargs = class_labels_kwargs("slide segmentation", ["background", "nucleus"])
        kwargs["metadata"][METADATA_KEY]["results"] = "/data/results/slide"
        layer = viewer.add_labels([plane, plane[::2, ::2]], multiscale=True, **kwargs)
        return layer, tmp_path / "s.geojson", ("'slide segmentation'", "whole-slide label pyramid (2 levels)",
                                               "written with it in /data/results/slide")
    raise AssertionError(case)


@pytest.mark.parametrize("how", ["layer.save", "layers.save", "save dialog"])
def test_saving_shows_the_plugins_reason_and_writes_nothing(make_napari_viewer, tmp_path, monkeypatch, how):
    viewer = make_napari_viewer()
    for case in ("negative", "stack", "folder is a file", "class id beyond the names", "slide pyramid"):
        layer, target, fragments = _save_case(viewer, tmp_path, case)
        _assert_save_refused(viewer, layer, target, fragments, tmp_path, monkeypatch, how)


def _assert_save_refused(viewer, layer, target, fragments, tmp_path, monkeypatch, how: str) -> None:
    before = tree(tmp_path)
    viewer.layers.selection.active = layer
    with pytest.raises(OSError) as caught:
        if how == "layer.save":
            layer.save(str(target), plugin="napari-medseg")
        elif how == "layers.save":
            viewer.layers.save(str(target), selected=True, plugin="napari-medseg")
        else:  # File > Save Selected Layers, the plugin's format chosen: napari's notification shows this
            from qtpy.QtWidgets import QFileDialog

            chosen = ("napari-medseg QuPath GeoJSON (outlines) (*.geojson)" if target.suffix == ".geojson"
                      else "napari-medseg label TIFF (*.tif *.tiff)")
            monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), chosen))
            viewer.window._qt_viewer._save_layers_dialog(selected=True)
    message = str(caught.value)
    assert "not a valid writer" not in message and "could not be found" not in message, message
    for fragment in (str(target), *fragments):
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if how != "save dialog":
        assert isinstance(caught.value, OutputWriteError)
    assert tree(tmp_path) == before and not no_temp_files(tmp_path)


def test_an_instance_map_saves_as_its_nuclei_unnamed_or_with_a_name_per_id(make_napari_viewer, tmp_path):
    import json

    viewer = make_napari_viewer()
    _, export = _monuseg_unnamed(viewer)
    names = ["background"] + [f"class {i}" for i in range(1, int(export.data.max()) + 1)]
    named = viewer.add_labels(export.data, name="x_labels",
                              metadata={METADATA_KEY: {"kind": "classes", "classes": names}})
    for layer, target in ((export, tmp_path / "nuclei.geojson"), (named, tmp_path / "named.geojson")):
        assert layer.save(str(target), plugin="napari-medseg") == [str(target)]
        features = json.loads(target.read_text())["features"]
        assert len(features) == len(np.unique(export.data)) - 1


# -- Workers ----------------------------------------------------------------------------------------
WORKER_CASES = {"slot raises": "division by zero", "generator raises": "on_error: a bug in the job",
                "user error": "a user's mistake", "bug": "a bug in the job"}
WORKER_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    import napari
    from qtpy.QtWidgets import QApplication
    from napari.utils.notifications import notification_manager
    from napari_medseg._napari import metrics_widget
    from napari_medseg._napari.common import start_worker
    from napari_medseg._napari.layers import class_labels_kwargs
    from napari_medseg.errors import MedsegError

    shown = []
    notification_manager.notification_ready.connect(lambda n: shown.append(str(n.message)))
    viewer = napari.Viewer(show=False)
    names = ["background", "nucleus"]
    gt = viewer.add_labels(np.ones((32, 32), np.uint8), **class_labels_kwargs("gt", names))
    pred = viewer.add_labels(np.ones((32, 32), np.uint8), **class_labels_kwargs("pred", names))
    widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Metrics")[1]
    widget.prediction.value, widget.ground_truth.value = pred, gt
    show_table, compare = widget._show, metrics_widget.compare_to_ground_truth

    for case in sys.argv[1:]:
        shown.clear()
        ended = []

        def fail(*_):
            raise MedsegError("a user's mistake") if case == "user error" else RuntimeError("a bug in the job")

        widget._show = (lambda report: 1 / 0) if case == "slot raises" else show_table  # the returned slot fails
        if case == "generator raises":
            def steps():
                yield 1
                fail()
            start_worker(steps, on_error=lambda exc: shown.append(f"on_error: {exc}"), finished=lambda: ended.append(1))
        else:
            metrics_widget.compare_to_ground_truth = fail if case in ("user error", "bug") else compare
            widget.compute(threaded=True)
        deadline = time.time() + 20
        while time.time() < deadline and not (shown and (ended or case != "generator raises")):
            QApplication.processEvents()
            time.sleep(0.02)
        for _ in range(20):  # any late duplicate would arrive now
            QApplication.processEvents()
            time.sleep(0.02)
        print("CASE", repr((case, list(shown), len(ended), widget.summary.value)), flush=True)
    viewer.close()
""")


def test_a_failing_worker_is_one_notification_and_the_process_lives(tmp_path):
    """In a fresh process without napari's exception hook (as a script or a test runner has it):
    Qt aborted it (exit 134) when a slot raised."""
    import ast

    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), *WORKER_CASES], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    lines = [ast.literal_eval(line[5:]) for line in proc.stdout.splitlines() if line.startswith("CASE ")]
    results = {r[0]: r[1:] for r in lines}
    assert set(results) == set(WORKER_CASES), proc.stdout
    for case, expected in WORKER_CASES.items():
        shown, ended, summary = results[case]
        assert shown == [expected], (case, shown)
        if case == "generator raises":
            assert ended == 1  # the worker finished: buttons waiting on it come back
        if case in ("user error", "bug"):
            assert expected in summary, (case, summary)
