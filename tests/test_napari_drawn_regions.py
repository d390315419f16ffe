"""A region drawn on the image, as a newcomer draws it: its size in pixels, a polygon's result scored
in Metrics on what lies inside the polygon, a region at the image's corner, and a class map saved
as GeoJSON region by region (a painted block is one outline, not strips)."""

from __future__ import annotations

import json

import numpy as np
import pytest

PLUGIN = "napari-medseg"


@pytest.mark.parametrize("noise", [0.0, 1e-9, -1e-9, 3e-5, -3e-5])
@pytest.mark.parametrize("low, high", [(0.0, 256.0), (-0.5, 255.5)])
def test_a_drawn_square_of_256_pixels_holds_256_pixels_a_side(low, high, noise):
    """From 0 to 256 (or along pixel edges, -0.5 to 255.5), whatever float noise the canvas's
    world-to-pixel conversion leaves on either side: 256 x 256 px (it had been 257 x 256)."""
    from napari_medseg._napari.view_regions import pixel_box

    corners = np.array([[low, low], [low + noise, high - noise], [high + noise, high], [high, low - noise]])
    region = pixel_box(corners)
    assert (region.x, region.y, region.width, region.height) == (0, 0, 256, 256)


def _segment_shape(viewer, pixels: np.ndarray, kind: str):
    """Segment's result for a shape drawn over the CoNSeP sample at ``pixels`` ``(y, x)`` (the
    sample is placed in µm, 0.25 µm/px)."""
    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    seg.device.value = "cpu"
    shapes = viewer.add_shapes([np.asarray(pixels, float) * 0.25], shape_type=kind)
    seg.target.value, seg.shapes_layer.value = "drawn shape", shapes
    result = seg.run(threaded=False)
    assert result is not None, seg.status.value
    return result, seg.last_instances_layer


def test_a_polygons_result_is_scored_inside_the_polygon_only(make_napari_viewer):
    """Metrics on a polygon's result: the ground truth outside the polygon (inside its bounding box)
    is no nucleus the model missed: it is left out, and the summary says so. By hand: the same
    scores from the truth masked to the polygon; against the whole box they are lower."""
    from skimage.draw import polygon2mask

    from napari_medseg.evaluation.report import evaluate_maps

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "consep")
    triangle = np.array([[20.0, 30.0], [230.0, 60.0], [120.0, 240.0]])
    region, nuclei = _segment_shape(viewer, triangle, "polygon")
    y0, x0 = region.metadata["medseg"]["origin"]
    h, w = region.data.shape
    truth, truth_nuclei = viewer.layers["CoNSeP ground truth"], viewer.layers["CoNSeP instances"]
    _, metrics = viewer.window.add_plugin_dock_widget(PLUGIN, "Metrics")
    metrics.prediction.value, metrics.ground_truth.value = region, truth
    metrics.gt_instances.value, metrics.pred_instances.value = truth_nuclei, nuclei
    report = metrics.compute()
    assert report is not None, metrics.summary.value
    assert "Scored inside the polygon segmented only" in metrics.summary.value
    assert "the ground truth outside the polygon is left out" in metrics.summary.value

    inside = polygon2mask((h, w), triangle - (y0, x0))
    box = (slice(y0, y0 + h), slice(x0, x0 + w))
    classes = list(truth.metadata["medseg"]["classes"])

    def by_hand(keep):
        return evaluate_maps(np.where(keep, truth.data[box], 0), region.data, classes,
                             gt_instances=np.where(keep, truth_nuclei.data[box], 0), pred_instances=nuclei.data)

    masked, whole_box = by_hand(inside), by_hand(np.ones((h, w), bool))
    assert report["overall"]["nucleus_dice"] == pytest.approx(masked["overall"]["nucleus_dice"])
    assert report["overall"]["bpq"] == pytest.approx(masked["overall"]["bpq"])
    assert masked["overall"]["nucleus_dice"] > whole_box["overall"]["nucleus_dice"] + 0.02

    overlay = metrics.show_errors()  # the false negatives outside the polygon are gone too
    assert overlay is not None and not overlay.data[~inside].any()


def test_a_region_at_the_images_corner_is_scored_against_its_part_of_the_truth(make_napari_viewer):
    """A rectangle from the image's top-left corner: its result starts at (0, 0), which had read as
    'no region' and Metrics refused it ('compare ... the ground truth of the same image')."""
    from napari_medseg.evaluation.report import evaluate_maps

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "consep")
    region, nuclei = _segment_shape(viewer, [[0, 0], [0, 128], [96, 128], [96, 0]], "rectangle")
    assert region.data.shape == (96, 128) and region.metadata["medseg"]["origin"] == [0, 0]
    truth = viewer.layers["CoNSeP ground truth"]
    _, metrics = viewer.window.add_plugin_dock_widget(PLUGIN, "Metrics")
    metrics.prediction.value, metrics.ground_truth.value = region, truth
    metrics.gt_instances.value, metrics.pred_instances.value = viewer.layers["CoNSeP instances"], nuclei
    report = metrics.compute()
    assert report is not None, metrics.summary.value
    assert "Scored on the region segmented only (128 x 96 px from row 0, column 0" in metrics.summary.value
    expected = evaluate_maps(truth.data[:96, :128], region.data, list(truth.metadata["medseg"]["classes"]),
                             gt_instances=viewer.layers["CoNSeP instances"].data[:96, :128],
                             pred_instances=nuclei.data)
    assert report["overall"]["bpq"] == pytest.approx(expected["overall"]["bpq"])


def test_a_class_map_saves_as_geojson_one_outline_per_painted_region(make_napari_viewer, tmp_path):
    """A block painted by hand in a class map is one outline (a watershed had cut it into 6
    strips); Segment's class map saves one outline per region of one class, with that class."""
    from skimage.measure import label

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "consep")
    painted = np.zeros((256, 256), np.uint8)
    painted[100:130, 40:100] = 1
    painted[10:20, 10:20] = 2
    layer = viewer.add_labels(painted, name="painted")
    viewer.layers.selection = {layer}
    path = tmp_path / "painted.geojson"
    assert viewer.layers.save(str(path), selected=True, plugin=PLUGIN) == [str(path)]
    features = json.loads(path.read_text())["features"]
    assert len(features) == 2
    xs = [x for f in features for x, _ in f["geometry"]["coordinates"][0]]
    assert min(xs) == pytest.approx(10.0, abs=0.5) and max(xs) == pytest.approx(100.0, abs=0.5)

    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    seg.device.value = "cpu"
    classes = seg.run(threaded=False)
    viewer.layers.selection = {classes}
    path = tmp_path / "classes.geojson"
    viewer.layers.save(str(path), selected=True, plugin=PLUGIN)
    features = json.loads(path.read_text())["features"]
    regions = label(classes.data, background=0, connectivity=1)
    assert len(features) == regions.max() > 20
    names = classes.metadata["medseg"]["classes"]
    for f in features:
        region = regions == f["properties"]["label"]
        assert f["properties"]["classification"]["name"] == names[int(classes.data[region][0])]


def test_a_512_pixel_rectangle_drawn_on_a_slide_is_512_pixels(make_napari_viewer):
    """napari keeps shapes in float32: a rectangle drawn in µm on the 0.499 µm/px SVS from pixel
    (600, 500), 512 px a side, came back with corners at 599.99998777 and 1012.0000132 and was
    segmented as 513 x 513 px (medseg predict --region 600,500,512,512: 512)."""
    from napari_medseg._napari.view_regions import drawn_shape

    from conftest import DATA

    slide = DATA / "slides" / "CMU-1-Small-Region.svs"
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(slide), plugin=PLUGIN)
    um = float(layer.scale[-1])
    corners = np.array([[500, 600], [500, 1112], [1012, 1112], [1012, 600]], float) * um
    shapes = viewer.add_shapes([corners], shape_type="rectangle")
    region, polygon = drawn_shape(shapes, layer)
    assert (region.x, region.y, region.width, region.height) == (600, 500, 512, 512) and polygon is None
