"""Error overlays, per-object measurements, CSV and QuPath GeoJSON export (core, no viewer)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from napari_medseg.io import read_image, read_label_map
from napari_medseg.io.geojson import instances_to_geojson, write_geojson
from napari_medseg.nuclei.measure import counts_per_class, object_table
from napari_medseg.io.tables import write_csv
from napari_medseg.evaluation.error_maps import FN, FP, TP, WRONG_CLASS, error_counts, error_map

CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]


def _real(consep, stem="train_19_005"):
    return (read_image(consep / "images" / f"{stem}.png"), read_label_map(consep / "labels" / f"{stem}.tif"),
            read_label_map(consep / "instances" / f"{stem}.tif"))


def test_error_map_per_class_matches_definition(consep):
    _, gt, _ = _real(consep)
    pred = np.roll(gt, 3, axis=1)
    for c in range(1, 5):
        errors = error_map(gt, pred, 5, class_id=c)
        g, p = gt == c, pred == c
        assert np.array_equal(errors == TP, g & p)
        assert np.array_equal(errors == FP, p & ~g)
        assert np.array_equal(errors == FN, g & ~p)
        assert not (errors == WRONG_CLASS).any()


def test_error_map_all_classes_partitions_disagreements(consep):
    _, gt, _ = _real(consep)
    pred = np.roll(gt, 2, axis=0)
    errors = error_map(gt, pred, 5)
    counts = error_counts(errors)
    assert counts["true positive"] == int(((gt == pred) & (gt > 0)).sum())
    assert counts["false positive"] == int(((pred > 0) & (gt == 0)).sum())
    assert counts["false negative"] == int(((gt > 0) & (pred == 0)).sum())
    assert counts["wrong class"] == int(((gt > 0) & (pred > 0) & (gt != pred)).sum()) > 0
    with pytest.raises(ValueError, match="foreground class"):
        error_map(gt, pred, 5, class_id=0)
    with pytest.raises(ValueError, match="shape"):
        error_map(gt, pred[:10], 5)


def test_object_table_on_real_nuclei(consep):
    image, gt, instances = _real(consep)
    table = object_table(instances, gt, CLASSES, image)
    ids = np.unique(instances[instances > 0])
    assert list(table["label"]) == list(ids)
    for row in range(0, len(ids), 7):  # spot-check against plain numpy
        mask = instances == table["label"][row]
        assert table["area"][row] == mask.sum()
        ys, xs = np.nonzero(mask)
        assert table["centroid_y"][row] == pytest.approx(ys.mean())
        assert table["centroid_x"][row] == pytest.approx(xs.mean())
        assert table["mean_intensity_r"][row] == pytest.approx(image[..., 0][mask].mean())
        classes, counts = np.unique(gt[mask], return_counts=True)
        assert table["class"][row] == CLASSES[classes[np.argmax(counts)]]
    counts = counts_per_class(table)
    assert sum(counts.values()) == len(ids)
    assert set(counts) <= set(CLASSES[1:])


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.uint64])
def test_object_table_matches_scikit_images_regionprops(consep, dtype):
    """The fast table (bincount sums over bands of rows) against regionprops_table, the slow
    reference, on real nuclei: every row, RGB and gray intensities, ids with gaps."""
    from skimage.measure import regionprops_table

    from napari_medseg.nuclei import measure

    image, gt, instances = _real(consep)
    instances = np.where(instances % 3 == 0, 0, instances).astype(dtype)  # ids with gaps
    reference = regionprops_table(instances.astype(np.int64), intensity_image=image,
                                  properties=["label", "area", "centroid", "intensity_mean"])
    for band in (measure.BAND_PIXELS, 700):  # one band, and bands of a single row
        original, measure.BAND_PIXELS = measure.BAND_PIXELS, band
        try:
            table = object_table(instances, image=image, pixel_size_um=0.5)
        finally:
            measure.BAND_PIXELS = original
        np.testing.assert_array_equal(table["label"], reference["label"])
        np.testing.assert_array_equal(table["area"], reference["area"])
        np.testing.assert_allclose(table["area_um2"], reference["area"] * 0.25)
        np.testing.assert_allclose(table["centroid_y"], reference["centroid-0"], rtol=1e-12)
        np.testing.assert_allclose(table["centroid_x"], reference["centroid-1"], rtol=1e-12)
        for c, name in enumerate("rgb"):
            np.testing.assert_allclose(table[f"mean_intensity_{name}"], reference[f"intensity_mean-{c}"], rtol=1e-12)
    gray = object_table(instances, image=image[..., 1])
    np.testing.assert_allclose(gray["mean_intensity"], reference["intensity_mean-1"], rtol=1e-12)
    empty = object_table(np.zeros((5, 7), dtype), image=np.zeros((5, 7, 3), np.uint8))
    assert all(len(column) == 0 for column in empty.values())


def test_object_table_bad_input():
    with pytest.raises(ValueError, match="integer instance map"):
        object_table(np.zeros((4, 4), float))
    with pytest.raises(ValueError, match="differs"):
        object_table(np.zeros((4, 4), np.int32), image=np.zeros((5, 5)))
    with pytest.raises(ValueError, match="negative ids"):
        object_table(np.full((4, 4), -1, np.int32))


def test_csv_export_round_trip(tmp_path, consep):
    image, gt, instances = _real(consep)
    table = object_table(instances, gt, CLASSES, image)
    path = write_csv(tmp_path / "objects.csv", table)
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == len(table["label"])
    assert rows[0]["class"] == table["class"][0] and int(rows[0]["area"]) == table["area"][0]
    assert not list(tmp_path.glob("*.part"))


def test_geojson_polygons_cover_real_nuclei(tmp_path, consep):
    from skimage.draw import polygon as fill_polygon

    _, gt, instances = _real(consep)
    classes = np.zeros(instances.max() + 1, np.int64)
    for i in np.unique(instances[instances > 0]):
        classes[i] = np.bincount(gt[instances == i]).argmax()
    path = write_geojson(tmp_path / "nuclei.geojson", instances, classes, CLASSES, [[0, 0, 0]] * 5)
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    features = data["features"]
    assert len(features) == len(np.unique(instances[instances > 0]))
    for feature in features[::5]:
        label = feature["properties"]["label"]
        assert feature["properties"]["objectType"] == "detection"
        assert feature["properties"]["classification"]["name"] == CLASSES[classes[label]]
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert (ring[0] == ring[-1]).all()
        rr, cc = fill_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, instances.shape)  # corners -> centres
        filled = np.zeros(instances.shape, bool)
        filled[rr, cc] = True
        mask = instances == label
        iou = (filled & mask).sum() / (filled | mask).sum()
        assert iou > 0.6, (label, iou)  # the outline traces the nucleus (half-pixel contour)


def test_geojson_outlines_sit_on_pixel_corners_as_qupath_reads_them():
    """QuPath's (0, 0) is the first pixel's top-left corner: a block of rows 10-19, columns 30-39
    spans x 30..40, y 10..20 (only its corners cut), and a single pixel at (row 5, column 7) is a
    diamond around (7.5, 5.5)."""
    from napari_medseg.io.geojson import instance_polygons

    instances = np.zeros((40, 60), np.int32)
    instances[10:20, 30:40] = 1
    instances[5, 7] = 2
    block, speck = (np.array(rings[0]) for rings in (instance_polygons(instances)[i] for i in (1, 2)))
    assert (block[:, 0].min(), block[:, 0].max(), block[:, 1].min(), block[:, 1].max()) == (30, 40, 10, 20)
    np.testing.assert_allclose(speck.mean(0), [7.5, 5.5], atol=0.15)
    # its area is the pixel count less the cut corners (4 x 1/8 px): QuPath measures ~ what the CSV counts
    x, y = block[:, 0], block[:, 1]
    assert abs(0.5 * (x[:-1] @ y[1:] - x[1:] @ y[:-1])) == pytest.approx(100 - 0.5)


def _crossing_segments(ring: np.ndarray) -> int:
    """Pairs of non-neighbouring edges of a closed ring that meet (touch, cross or overlap): 0 for
    the simple polygons JTS (QuPath 0.6's geometry library) accepts."""
    a, b = ring[:-1, None, :], ring[1:, None, :]  # edge i, against every edge j
    c, d = ring[None, :-1, :], ring[None, 1:, :]

    def orient(p, q, r):  # which side of p -> q the point r lies on: -1, 0 (on the line) or 1
        (px, py), (qx, qy), (rx, ry) = (np.moveaxis(v, -1, 0) for v in (p, q, r))
        return np.sign((qx - px) * (ry - py) - (qy - py) * (rx - px))

    straddle = (orient(a, b, c) * orient(a, b, d) <= 0) & (orient(c, d, a) * orient(c, d, b) <= 0)
    boxes = ((np.minimum(a, b) <= np.maximum(c, d)) & (np.minimum(c, d) <= np.maximum(a, b))).all(-1)
    n = len(ring) - 1
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    neighbours = (abs(i - j) <= 1) | (abs(i - j) == n - 1)
    return int((straddle & boxes & ~neighbours).sum() // 2)


def test_an_id_in_several_parts_exports_every_part():
    """A nucleus id painted twice, apart: both parts go out (a multipolygon), not the larger alone."""
    from napari_medseg.io.geojson import instances_to_geojson

    instances = np.zeros((30, 40), np.int32)
    instances[2:8, 2:8] = 7
    instances[20:24, 30:36] = 7
    (feature,) = instances_to_geojson(instances)["features"]
    assert feature["properties"]["label"] == 7 and feature["geometry"]["type"] == "MultiPolygon"
    spans = sorted((np.array(p[0])[:, 0].min(), np.array(p[0])[:, 0].max()) for p in feature["geometry"]["coordinates"])
    assert spans == [(2, 8), (30, 36)]


def test_geojson_polygons_are_simple_as_qupath_06_needs(consep):
    """QuPath 0.6 reduces imported geometries to its precision grid and fails on invalid ones
    (self-intersecting rings, fewer than 4 points): every outline of a real CoNSeP instance map, and
    of shapes made to tempt a tracer (a diagonal pinch, a ring round a hole, one-pixel lines), is a
    closed, simple ring."""
    bow_tie = np.array([[0, 0], [2, 2], [2, 0], [0, 2], [0, 0]], float)
    touching = np.array([[0, 0], [4, 0], [4, 4], [2, 0], [0, 4], [0, 0]], float)  # back to (2, 0) on an edge
    assert _crossing_segments(bow_tie) == 1 and _crossing_segments(touching) > 0  # the check can fail
    assert _crossing_segments(np.array([[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]], float)) == 0
    instances = _real(consep)[2]
    rings = [np.array(f["geometry"]["coordinates"][0]) for f in instances_to_geojson(instances)["features"]]
    tricky = np.zeros((30, 30), np.int32)
    tricky[2:6, 2:6] = 1
    tricky[6:10, 6:10] = 1  # touches the first block at one corner only
    tricky[12:20, 12:20] = 2
    tricky[14:18, 14:18] = 0  # a hole
    tricky[2, 14:28] = 3  # one pixel thick
    tricky[22:29, 3] = 4
    tricky[[22, 23, 24], [10, 11, 12]] = 5  # a diagonal chain: pixels meeting at corners
    features = {f["properties"]["label"]: f["geometry"] for f in instances_to_geojson(tricky)["features"]}
    # parts that meet only at a corner are parts: a multipolygon, each ring simple
    assert features[1]["type"] == "MultiPolygon" and len(features[1]["coordinates"]) == 2
    assert features[5]["type"] == "MultiPolygon" and len(features[5]["coordinates"]) == 3
    for g in features.values():
        polygons = [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
        rings += [np.array(polygon[0]) for polygon in polygons]
    assert len(rings) > 30
    for ring in rings:
        assert len(ring) >= 4 and (ring[0] == ring[-1]).all()
        assert _crossing_segments(ring) == 0, ring.tolist()


def test_geojson_refuses_non_integer():
    with pytest.raises(ValueError, match="integer instance map"):
        instances_to_geojson(np.zeros((3, 3), float))


def test_geojson_keeps_non_sequential_ids_and_their_classes():
    """Watershed ids skip numbers; each feature keeps its own id and the class of that id."""
    from napari_medseg.io.geojson import instances_to_geojson

    instances = np.zeros((40, 40), np.int32)
    for k, (i, y, x) in enumerate([(5, 2, 2), (9, 2, 20), (12, 20, 2), (3, 20, 20)]):
        instances[y:y + 8 + k, x:x + 8] = i
    classes = np.zeros(13, np.int64)
    classes[[3, 5, 9, 12]] = [1, 2, 3, 4]
    geo = instances_to_geojson(instances, classes, CLASSES)
    got = {f["properties"]["label"]: f["properties"]["classification"]["name"] for f in geo["features"]}
    assert got == {3: CLASSES[1], 5: CLASSES[2], 9: CLASSES[3], 12: CLASSES[4]}
    for f in geo["features"]:  # the outline is that nucleus's: its box height is 8 + k
        ys = [p[1] for p in f["geometry"]["coordinates"][0]]
        assert max(ys) - min(ys) == {5: 8, 9: 9, 12: 10, 3: 11}[f["properties"]["label"]]
