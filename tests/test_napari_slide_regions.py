"""Segmenting a part of a slide from the Segment widget, through napari's own machinery: the
field of view or a drawn shape of a slide opened by the reader, streamed to a results folder and
shown as lazy multiscale Labels aligned with the slide; crops of an ordinary image in memory."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zarr
from napari.layers import Labels
from skimage.draw import polygon2mask

from napari_medseg._napari.layers import METADATA_KEY
from napari_medseg._napari.segment_widget import FIELD_OF_VIEW, FILE_MODEL, SHAPE, WHOLE_IMAGE, WHOLE_SLIDE, SegmentWidget
from napari_medseg.inference import Segmenter
from napari_medseg.io import read_image
from napari_medseg.nuclei.votes import instance_classes
from test_slides import _mosaic, _write_slide

PLUGIN = "napari-medseg"
SCALE, TRANSLATE = 0.25, (100.0, -40.0)  # µm per px (the slide's resolution tags), where it is placed


@pytest.fixture(scope="module")
def slide_file(consep, tmp_path_factory):
    """2560 x 2560 px of glass at 0.25 µm/px, real CoNSeP H&E over [256:1280, 1280:2304]."""
    image = np.full((2560, 2560, 3), 242, np.uint8)
    image[256:1280, 1280:2304] = _mosaic(consep, "image", 4)
    path = tmp_path_factory.mktemp("slide") / "synthetic.tif"
    _write_slide(path, image, SCALE)
    return path


def _slide_widget(viewer, slide_file, checkpoint, results=None):
    (layer,) = viewer.open(str(slide_file), plugin=PLUGIN)
    layer.translate = TRANSLATE
    widget = SegmentWidget(viewer)
    widget.model_source.value = FILE_MODEL
    widget.checkpoint.value = checkpoint
    widget.device.value = "cpu"
    widget.tile_size.value, widget.overlap.value = 128, 32
    if results is not None:
        widget.results_folder.value = results
    return layer, widget


def _world(pixel_yx) -> np.ndarray:
    """A level-0 (y, x) pixel of the slide in world µm."""
    return np.asarray(TRANSLATE) + SCALE * np.asarray(pixel_yx, float)


def _shown(control) -> bool:
    """Whether a control shows once its dock does (the dock itself is not shown in these tests)."""
    return not control.native.isHidden()


def test_the_field_of_view_of_a_slide_becomes_lazy_label_pyramids(make_napari_viewer, slide_file, tiny_checkpoint,
                                                                   tmp_path, monkeypatch):
    """A region too large to hold in memory (here: any) comes back as slide-sized lazy pyramids."""
    from napari_medseg._napari import segment_widget

    monkeypatch.setattr(segment_widget, "REGION_IN_MEMORY_PX", 0)
    viewer = make_napari_viewer()
    image, widget = _slide_widget(viewer, slide_file, tiny_checkpoint, tmp_path / "results")
    widget.target.value = FIELD_OF_VIEW
    # the untrained model's blobs are near the model's smallest nucleus (45 px): 2 nuclei in PyTorch,
    # none where the runtime chosen here rounds them under it; at 10 px the count does not hinge on that
    widget.min_nucleus.value = 10
    assert _shown(widget.results_folder) and not _shown(widget.shapes_layer)
    # the canvas shows 512 px of the slide's height around level-0 pixel (768.5, 1792.5)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9: the scene's
    camera.center = tuple(_world((768.5, 1792.5)))
    camera.zoom = viewer.canvas.size[0] / (512 * SCALE)
    half_width = viewer.canvas.size[1] / camera.zoom / SCALE / 2

    classes = widget.run(threaded=False)
    run_folder = tmp_path / "results" / "synthetic"  # a folder of its own in the chosen one, named after the slide
    result = widget.last_slide_result
    r = result.region
    assert abs(r.y - 513) <= 1 and abs(r.height - 512) <= 1, r
    assert abs(r.x - (1792.5 - half_width)) <= 1 and abs(r.x + r.width - (1792.5 + half_width)) <= 1, r
    nuclei = viewer.layers["synthetic nuclei"]
    for layer in (classes, nuclei):
        assert isinstance(layer, Labels) and layer.multiscale
        assert all(isinstance(level, zarr.Array) for level in layer.data)  # read lazily, from disk
        assert layer.data[0].shape == (2560, 2560)
        assert tuple(layer.scale) == tuple(image.scale) and tuple(layer.translate) == tuple(image.translate)
        assert [str(unit) for unit in layer.units] == ["micrometer", "micrometer"]  # one unit with the slide
        assert layer.metadata[METADATA_KEY]["results"] == str(run_folder)  # File > Save says where
    store = zarr.open_group(str(run_folder / "synthetic.zarr"), mode="r")
    full = np.asarray(store["classes/0"])
    inside = full[r.slices]
    assert inside.any() and full.sum() == inside.sum()  # the model ran on the view only
    counts = np.bincount(inside.ravel(), minlength=5)
    assert result.class_px == dict(zip(widget._classes[1:], counts[1:].tolist()))
    assert result.region_px == r.width * r.height
    # each nucleus outlined in its class's colour (the majority class under it), as in image runs
    cut = np.asarray(store["instances/0"])[r.slices]
    votes = instance_classes(cut, inside)
    ids = np.unique(cut)[1:]
    assert len(ids) == result.nuclei > 0
    same = [np.allclose(nuclei.get_color(i)[:3], np.asarray(widget._colors[votes[i]]) / 255, atol=1e-3) for i in ids]
    assert np.mean(same) >= 0.95, np.mean(same)  # a nucleus across blocks is voted where it is cut
    assert f"of the region x={r.x}, y={r.y}, {r.width} x {r.height} px" in widget.status.value
    share = f"{widget._classes[1]} {100 * counts[1] / inside.size:.1f}%"
    assert share in widget.status.value and f"results in {run_folder}" in widget.status.value
    assert sorted(p.name for p in run_folder.iterdir()) == [
        "synthetic.zarr", "synthetic_instances.ome.tif", "synthetic_labels.ome.tif", "synthetic_nuclei.csv",
        "synthetic_nuclei.geojson"]
    _measuring_a_pyramid_says_where_its_tables_are(viewer, classes, run_folder)


def _measuring_a_pyramid_says_where_its_tables_are(viewer, classes, folder) -> None:
    """The Objects and Metrics widgets work on one image in memory; napari's array of a pyramid is
    its coarsest level, which they would have measured as if it were the slide."""
    from napari_medseg._napari.metrics_widget import MetricsWidget
    from napari_medseg._napari.objects_widget import ObjectsWidget

    objects = ObjectsWidget(viewer)
    objects.class_layer.value, objects.instance_layer.value = classes, None
    assert objects.measure(add_instances_layer=False) is None and objects.objects is None
    truth = viewer.add_labels(np.zeros((64, 64), np.uint8), name="truth")
    metrics = MetricsWidget(viewer)
    metrics.prediction.value, metrics.ground_truth.value = classes, truth
    metrics.compute()
    for widget, use in ((objects, "measuring nuclei"), (metrics, "comparing with ground truth")):
        message = widget.summary.value
        assert "is a whole-slide pyramid" in message and use in message, message
        assert f"written by its run in {folder}" in message, message


def test_a_polygon_on_a_slide_and_results_never_overwritten(make_napari_viewer, slide_file, tiny_checkpoint,
                                                            tmp_path, monkeypatch):
    """A polygon drawn in µm over a placed slide: its bounding box is segmented, its outside is
    background; the region comes back in memory, where it lies on the slide, and saves from the
    viewer and measures in Objects (a slide-sized pyramid of it had been 'too large to save').
    Each run writes to a new folder in the results folder, the default one or one chosen."""
    monkeypatch.setenv("HOME", str(tmp_path))
    viewer = make_napari_viewer()
    image, widget = _slide_widget(viewer, slide_file, tiny_checkpoint)
    widget.nuclei.value = False
    pixels = np.array([[300.0, 1400.0], [700.0, 1450.0], [500.0, 1800.0]])  # (y, x) level-0
    shapes = viewer.add_shapes([_world(pixels)], shape_type="polygon", name="outline")
    widget.target.value = SHAPE
    widget.shapes_layer.value = shapes
    assert _shown(widget.shapes_layer)

    classes = widget.run(threaded=False)
    assert isinstance(classes, Labels), widget.status.value
    r = widget.last_slide_result.region
    assert (r.x, r.y, r.x + r.width, r.y + r.height) == (1400, 300, 1800, 700)
    assert not classes.multiscale and classes.data.shape == (400, 400)
    assert np.allclose(classes.data_to_world((0, 0)), _world((300, 1400)))
    assert classes.metadata[METADATA_KEY]["origin"] == [300, 1400]
    inside = polygon2mask(classes.data.shape, pixels - (300, 1400))
    assert classes.data[inside].any() and not classes.data[~inside].any()
    first = tmp_path / "napari-medseg" / "results" / "synthetic"
    assert (first / "synthetic.zarr").is_dir() and not (first / "synthetic_nuclei.csv").exists()
    store = zarr.open_group(str(first / "synthetic.zarr"), mode="r")
    np.testing.assert_array_equal(classes.data, np.asarray(store["classes/0"])[300:700, 1400:1800])
    viewer.layers.selection = {classes}
    saved = tmp_path / "region.tif"
    assert viewer.layers.save(str(saved), selected=True, plugin="napari-medseg") == [str(saved)]
    from napari_medseg._napari.objects_widget import ObjectsWidget

    painted = classes.data.copy()
    painted[190:210, 140:160] = 1  # a nucleus painted in (the untrained model's blobs are specks)
    classes.data = painted
    objects = ObjectsWidget(viewer)
    objects.class_layer.value, objects.instance_layer.value, objects.image_layer.value = classes, None, image
    table = objects.measure(add_instances_layer=False)
    assert table is not None and len(table["label"]) > 0, objects.summary.value
    assert (table["centroid_y"] >= 300).all() and (table["centroid_x"] >= 1400).all()  # in the slide's pixels
    painted_one = table["area"] == 400
    assert painted_one.sum() == 1 and table["centroid_y"][painted_one][0] == pytest.approx(499.5)
    slide_pixels = np.asarray(image.data[0][490:510, 1540:1560])  # its intensities: the slide's, read there
    assert table["mean_intensity_r"][painted_one][0] == pytest.approx(slide_pixels[..., 0].mean(), rel=1e-4)

    widget.run(threaded=False)  # the same again: a new folder, the first one untouched
    assert (tmp_path / "napari-medseg" / "results" / "synthetic-2" / "synthetic.zarr").is_dir()

    # a chosen folder takes a new folder per run too: a second region is never refused for the first
    mine = tmp_path / "mine"
    widget.results_folder.value = mine
    for name in ("synthetic", "synthetic-2"):
        assert widget.run(threaded=False) is not None, widget.status.value
        assert f"results in {mine / name}" in widget.status.value and (mine / name / "synthetic.zarr").is_dir()


def test_choosing_drawn_shape_offers_a_shapes_layer_on_the_slides_grid(make_napari_viewer, slide_file,
                                                                          tiny_checkpoint, tmp_path, monkeypatch):
    """napari's own new Shapes layer is in pixels: over a slide in µm it warned 'Inconsistent units
    across layers' before anything was drawn. Choosing 'drawn shape' with nothing to draw in now
    adds one on the slide's grid (scale, units, place), selected, in rectangle mode."""
    monkeypatch.setenv("HOME", str(tmp_path))
    viewer = make_napari_viewer()
    image, widget = _slide_widget(viewer, slide_file, tiny_checkpoint)
    widget.nuclei.value = False
    widget.target.value = SHAPE
    regions = viewer.layers["regions"]
    assert widget.shapes_layer.value is regions and viewer.layers.selection.active is regions
    assert regions.mode == "add_rectangle" and "Draw a rectangle in 'regions'" in widget.status.value
    assert tuple(regions.scale) == tuple(image.scale) and tuple(regions.translate) == tuple(image.translate)
    assert [str(u) for u in regions.units] == [str(u) for u in image.units]
    regions.add_rectangles(np.array([[300.0, 1400.0], [556.0, 1656.0]]))  # drawn: in the slide's pixels
    classes = widget.run(threaded=False)
    assert classes is not None, widget.status.value
    r = widget.last_slide_result.region
    assert (r.x, r.y, r.width, r.height) == (1400, 300, 256, 256)
    widget.target.value = WHOLE_IMAGE  # and back: a second layer is not made while one is there
    widget.target.value = SHAPE
    assert [layer.name for layer in viewer.layers if layer.name.startswith("regions")] == ["regions"]


def test_cancelling_a_slide_run_within_a_second_leaves_nothing(make_napari_viewer, qtbot, slide_file,
                                                               tiny_checkpoint, tmp_path):
    viewer = make_napari_viewer()
    _, widget = _slide_widget(viewer, slide_file, tiny_checkpoint, tmp_path / "results")
    widget.target.value = WHOLE_SLIDE
    worker = widget.run()
    qtbot.waitUntil(lambda: widget.progress.value >= 1, timeout=60_000)
    t0 = time.perf_counter()
    with qtbot.waitSignal(worker.finished, timeout=5_000):
        widget.cancel()
    assert time.perf_counter() - t0 < 1.0
    assert [layer.name for layer in viewer.layers] == ["synthetic"]
    assert "Cancelled" in widget.status.value and widget.run_button.enabled
    assert not (tmp_path / "results").exists()  # no store, no temp file, and the folder the run made goes too


def test_a_shape_over_an_ordinary_image_segments_that_crop(make_napari_viewer, consep, tiny_checkpoint):
    """Not a slide: the crop is segmented in memory and placed over it (the layer's scale and
    translate); outside a polygon is background. 'whole slide' is refused with what to do."""
    viewer = make_napari_viewer()
    image = np.tile(read_image(consep / "images" / "train_2_000.png"), (2, 2, 1))  # 512 x 512
    layer = viewer.add_image(image, name="patch", scale=(0.5, 0.5), translate=(10.0, 20.0))
    widget = SegmentWidget(viewer)
    widget.model_source.value = FILE_MODEL
    widget.checkpoint.value = tiny_checkpoint
    widget.device.value = "cpu"
    widget.tile_size.value, widget.overlap.value = 128, 32
    widget.backend.value = "torch"  # compared with PyTorch's output to the pixel
    widget.nuclei.value = False
    world = lambda yx: np.asarray((10.0, 20.0)) + 0.5 * np.asarray(yx, float)  # noqa: E731
    widget.target.value = WHOLE_SLIDE
    assert widget.run(threaded=False) is None and "was not opened as a slide" in widget.status.value
    assert not _shown(widget.results_folder)

    rectangle = viewer.add_shapes([world([[99.5, 49.5], [99.5, 349.5], [299.5, 349.5], [299.5, 49.5]])],
                                  shape_type="rectangle", name="box")
    widget.target.value = SHAPE
    widget.shapes_layer.value = rectangle
    labels = widget.run(threaded=False)
    assert labels.data.shape == (200, 300) and tuple(labels.translate) == (10.0 + 50.0, 20.0 + 25.0)
    assert tuple(labels.scale) == tuple(layer.scale)
    expected = Segmenter.load(tiny_checkpoint, device="cpu").segment(image[100:300, 50:350], widget.tile_settings())
    np.testing.assert_array_equal(labels.data, expected)

    triangle = np.array([[100.0, 60.0], [300.0, 100.0], [180.0, 340.0]])
    rectangle.add_polygons([world(triangle)])
    labels = widget.run(threaded=False)
    assert tuple(labels.translate) == (10.0 + 50.0, 20.0 + 30.0) and labels.data.shape == (200, 280)
    inside = polygon2mask(labels.data.shape, triangle - (100, 60))
    assert labels.data[inside].any() and not labels.data[~inside].any()


def test_a_regions_exports_sit_where_the_region_is(make_napari_viewer, consep, tmp_path):
    """A rectangle's result saved through napari's File > Save (GeoJSON: the nuclei layer, and the
    class map's nuclei) and measured by the Objects widget (CSV centroids, GeoJSON) is in the
    image's pixels: each outline over its own nucleus at the rectangle's corner, not at the image's
    top-left (where QuPath would have put them all); re-thresholding keeps it so."""
    import json

    from napari_medseg._napari.objects_widget import ObjectsWidget

    viewer = make_napari_viewer()
    layer = viewer.add_image(read_image(consep / "images" / "train_1_005.png"), name="patch")  # ~30 nuclei there
    corner = (60, 40)
    rectangle = viewer.add_shapes([np.array([[60, 40], [60, 240], [220, 240], [220, 40]], float) - 0.5],
                                  shape_type="rectangle", name="box")
    widget = SegmentWidget(viewer)
    widget.device.value, widget.backend.value, widget.nuclei.value = "cpu", "torch", True
    widget.target.value, widget.shapes_layer.value = SHAPE, rectangle
    labels = widget.run(threaded=False)
    assert labels.data.shape == (160, 200) and tuple(labels.translate) == corner and layer.translate.sum() == 0
    widget.marker_threshold.value = 0.5
    widget.rethreshold(threaded=False)  # new nuclei in the same layer: still the region's
    nuclei = widget.last_instances_layer
    instances = np.asarray(nuclei.data)
    assert instances.max() > 10
    viewer.layers.selection = {nuclei}
    saved = tmp_path / "region.geojson"
    assert viewer.layers.save(str(saved), selected=True, plugin=PLUGIN) == [str(saved)]
    _outlines_at(saved, instances, corner)
    viewer.layers.selection = {labels}
    from_classes = tmp_path / "classes.geojson"
    assert viewer.layers.save(str(from_classes), selected=True, plugin=PLUGIN) == [str(from_classes)]
    objects = ObjectsWidget(viewer)
    objects.class_layer.value = labels
    objects.instance_layer.value = nuclei
    table = objects.measure(add_instances_layer=False)
    _outlines_at(objects.export_geojson(tmp_path / "objects.geojson"), instances, corner)
    centres = np.asarray(json.loads(from_classes.read_text())["features"][0]["geometry"]["coordinates"][0]).mean(0)
    assert corner[1] <= centres[0] <= corner[1] + 200 and corner[0] <= centres[1] <= corner[0] + 160
    last = int(np.flatnonzero(table["label"] == instances.max())[0])
    ys, xs = np.nonzero(instances == instances.max())
    assert table["centroid_y"][last] == pytest.approx(ys.mean() + corner[0])
    assert table["centroid_x"][last] == pytest.approx(xs.mean() + corner[1])


def _outlines_at(path, instances: np.ndarray, corner: tuple[int, int]) -> None:
    """Each outline of the GeoJSON at ``path`` spans its nucleus's pixels moved to ``corner``."""
    import json

    features = json.loads(path.read_text())["features"]
    assert len(features) > 10
    for feature in features:
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        ys, xs = np.nonzero(instances == feature["properties"]["label"])
        # the ring's box is its pixels' box at the corner (pixel corners: + 1 on the far side)
        assert (ring[:, 0].min(), ring[:, 0].max()) == (xs.min() + corner[1], xs.max() + 1 + corner[1])
        assert (ring[:, 1].min(), ring[:, 1].max()) == (ys.min() + corner[0], ys.max() + 1 + corner[0])


def test_a_threshold_changed_after_a_slide_run_says_it_applies_to_the_next(make_napari_viewer, slide_file,
                                                                           tiny_checkpoint, tmp_path):
    """Nothing of a slide run is kept in memory to re-threshold: a changed threshold says that it
    applies to the next run (as for a result edited by hand), below the run's summary, instead
    of doing nothing silently."""
    viewer = make_napari_viewer()
    image, widget = _slide_widget(viewer, slide_file, tiny_checkpoint, tmp_path / "results")
    shapes = viewer.add_shapes([_world([[300, 1400], [300, 1656], [556, 1656], [556, 1400]])],
                               shape_type="rectangle")
    widget.target.value, widget.shapes_layer.value = SHAPE, shapes
    classes = widget.run(threaded=False)
    assert isinstance(classes, Labels), widget.status.value
    summary = widget.status.value
    assert summary.startswith("Done") and widget.kept is None
    widget.threshold.value = 0.7
    assert widget.status.value.startswith(summary) and "apply to the next run" in widget.status.value
    widget.marker_threshold.value = 0.5  # said once, not once per change
    assert widget.status.value.count("apply to the next run") == 1
