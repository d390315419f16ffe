"""QuPath outlines back as ground truth (``medseg convert geojson``): what this package writes comes
back exactly, QuPath's own export shapes (a list of features, cells, holes, bare class names) are
read, and a wrong image or folder is a message with nothing written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hostile import assert_refused, medseg, tree

from napari_medseg.io import read_label_map
from napari_medseg.io.geojson import write_geojson
from napari_medseg.io.geojson_read import OUTSIDE, TOO_LARGE, read_outlines, rasterise

CONSEP_CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]


def _votes(instances, class_map):
    from napari_medseg.nuclei.votes import instance_classes

    return instance_classes(instances, class_map)


def test_outlines_written_here_come_back_as_the_maps_they_were_traced_from(consep, tmp_path):
    from skimage.segmentation import relabel_sequential

    instances = read_label_map(consep / "instances" / "train_19_005.tif")
    classes = read_label_map(consep / "labels" / "train_19_005.tif")
    votes = _votes(instances, classes)
    write_geojson(tmp_path / "n.geojson", instances, votes, CONSEP_CLASSES)
    back, class_map, left_out = rasterise(read_outlines(tmp_path / "n.geojson"), instances.shape, CONSEP_CLASSES)
    expected = relabel_sequential(instances)[0]
    assert left_out == {OUTSIDE: 0, TOO_LARGE: 0} and back.max() == expected.max() > 50
    np.testing.assert_array_equal(back, expected)  # each nucleus, pixel for pixel, ids in the file's order
    np.testing.assert_array_equal(class_map, np.where(instances > 0, votes[instances], 0))


def _ring(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_qupaths_export_shapes_are_read(tmp_path):
    features = [  # QuPath's older export: a bare list of features
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_ring(2, 2, 12, 12), _ring(5, 5, 8, 8)]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_ring(20, 0, 40, 20)]},  # the cell
         "nucleusGeometry": {"type": "Polygon", "coordinates": [_ring(24, 4, 30, 10)]},
         "properties": {"objectType": "cell", "classification": "Immune cells"}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[_ring(0, 30, 3, 33)], [_ring(6, 30, 9, 33)]]},
         "properties": {}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}, "properties": {}},
        # QuPath 0.4's derived class, and 3-D positions (GeoJSON allows a z)
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[x, y, 0.0] for x, y in _ring(30, 30, 34, 34)]]},
         "properties": {"classification": {"names": ["Tumor", "Positive"], "color": [255, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [2, 2], [1, 1]]]}},  # no area
    ]
    (tmp_path / "q.geojson").write_text(json.dumps(features))
    outlines = read_outlines(tmp_path / "q.geojson")
    assert outlines.skipped == {"Point": 1, "outline of no area": 1}
    assert outlines.class_names() == ["Tumor", "Immune cells", "nucleus", "Tumor: Positive"]
    assert outlines.colors() == {"Tumor": [200, 0, 0], "Tumor: Positive": [255, 0, 0]}
    classes = ["background", "Immune cells", "Tumor", "nucleus", "Tumor: Positive"]
    instances, class_map, left_out = rasterise(outlines, (40, 40), classes)
    assert left_out == {OUTSIDE: 0, TOO_LARGE: 0}
    assert (instances == 4).sum() == 16 and np.all(class_map[instances == 4] == 4)
    tumour = instances == 1  # x, y 2..12 with a hole 5..8: pixels 2..11 but 5..7
    assert tumour.sum() == 10 * 10 - 3 * 3 and tumour[2, 2] and not tumour[6, 6] and tumour[11, 11]
    assert (instances == 2).sum() == 36 and np.all(class_map[instances == 2] == 1)  # the nucleus, not the cell
    assert (instances == 3).sum() == 18 and np.all(class_map[instances == 3] == 3)  # two parts, one object
    assert np.all(class_map[tumour] == 2) and not class_map[~(instances > 0)].any()
    # the same outlines on a region whose corner lies at (20, 0): only the cell's nucleus is on it
    _, _, left_out = rasterise(outlines, (40, 20), classes, origin=(20.0, 0.0))
    assert left_out[OUTSIDE] == 2
    # an outline over more than a nucleus can cover (the annotation drawn around the nuclei) is left out
    instances, _, left_out = rasterise(outlines, (40, 40), classes, max_area_px=50)
    assert left_out[TOO_LARGE] == 1 and instances.max() == 3 and not (instances[2:12, 2:12] > 0).any()


def test_convert_makes_a_dataset_folder_that_evaluate_scores(consep, tmp_path):
    """The default's nuclei of a CoNSeP patch, as QuPath outlines, scored as ground truth: a
    perfect match, since they are its own; then a second image joins the same folder."""
    pred = tmp_path / "pred"
    images = [consep / "images" / f"{stem}.png" for stem in ("train_19_005", "train_12_006")]
    assert medseg("predict", *images, "--out", pred, "--device", "cpu").returncode == 0
    truth = tmp_path / "truth"
    for image in images:
        proc = medseg("convert", "geojson", pred / "nuclei" / f"{image.stem}.geojson", "--image", image, truth,
                      "--classes", "default")
        assert proc.returncode == 0, proc.stderr
        assert f"wrote '{image.stem}' into dataset folder {truth}" in proc.stdout
    assert json.loads((truth / "classes.json").read_text())["classes"] == CONSEP_CLASSES
    record = read_label_map(truth / "instances" / "train_19_005.tif")
    assert record.max() == len(json.loads((pred / "nuclei" / "train_19_005.geojson").read_text())["features"])
    proc = medseg("evaluate", pred, truth, "--json", tmp_path / "scores.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "scores.json").read_text())
    assert report["images"] == 2 and report["overall"]["bpq"] == pytest.approx(1.0)
    # outlines corrected again (one deleted): refused without --overwrite, the entry replaced with it
    edited = json.loads((pred / "nuclei" / "train_19_005.geojson").read_text())
    edited["features"] = edited["features"][1:]
    (tmp_path / "edited.geojson").write_text(json.dumps(edited))
    again = ("convert", "geojson", tmp_path / "edited.geojson", "--image", images[0], truth)
    assert_refused(medseg(*again), "already holds 'train_19_005'", "pass --overwrite")
    assert read_label_map(truth / "instances" / "train_19_005.tif").max() == record.max()
    assert medseg(*again, "--overwrite").returncode == 0
    assert read_label_map(truth / "instances" / "train_19_005.tif").max() == record.max() - 1
    assert sorted(p.name for p in (truth / "images").iterdir()) == ["train_12_006.png", "train_19_005.png"]


def test_convert_refusals_name_the_problem_and_write_nothing(consep, tmp_path):
    image = consep / "images" / "train_19_005.png"
    outlines = tmp_path / "far.geojson"
    outlines.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_ring(5000, 5000, 5010, 5010)]},
         "properties": {"classification": {"name": "Tumor"}}}]}))
    out = tmp_path / "truth"
    assert_refused(medseg("convert", "geojson", outlines, tmp_path / "truth"), "needs --image IMAGE")
    assert_refused(medseg("convert", "geojson", outlines, "--image", image, out),
                   "the one outline does not lie on 'train_19_005.png' (256 x 256 px)", "--origin X,Y")
    assert not out.exists()
    assert_refused(medseg("convert", "geojson", outlines, "--image", image, out, "--classes", "a,b"),
                   "the outlines name 'Tumor', which the classes given (a, b) do not hold")
    (tmp_path / "points.geojson").write_text(json.dumps([{"type": "Feature", "geometry": {"type": "Point",
                                                                                            "coordinates": [1, 1]}}]))
    assert_refused(medseg("convert", "geojson", tmp_path / "points.geojson", "--image", image, out),
                   "holds no outlines", "1 Point")
    assert_refused(medseg("convert", "pannuke", tmp_path, out, "--image", image), "are for `medseg convert geojson`")
    nan = tmp_path / "nan.geojson"
    nan.write_text(outlines.read_text().replace("5010", "NaN"))
    assert_refused(medseg("convert", "geojson", nan, "--image", image, out), "object 1: its coordinates hold NaN")
    words = tmp_path / "words.geojson"
    words.write_text(outlines.read_text().replace("5010", '"far"'))
    assert_refused(medseg("convert", "geojson", words, "--image", image, out), "object 1: its coordinates are not")
    assert_refused(medseg("convert", "geojson", outlines, "--image", image, out, "--origin", "nan,0"), "expected X,Y")
    near_plain = tmp_path / "near_plain.geojson"
    near_plain.write_text(outlines.read_text().replace("50", "1").replace(', "properties": {"classification": {"name": "Tumor"}}', ""))
    assert_refused(medseg("convert", "geojson", near_plain, "--image", image, out, "--classes", "default"),
                   "1 outline has no classification (read as 'nucleus')")
    assert_refused(medseg("convert", "geojson", near_plain, "--image", image, out, "--classes", "a,a"),
                   "the classes name 'a' twice")
    assert_refused(medseg("convert", "geojson", near_plain, "--image", image, image), "is a file")
    assert not out.exists()
    # a folder that holds the image already: refused, the folder as it was
    shutil.copytree(consep, out, ignore=lambda d, names: [n for n in names if n.endswith((".png", ".tif"))
                                                           and not n.startswith("train_19_005")])
    before = tree(out)
    near = tmp_path / "near.geojson"
    near.write_text(outlines.read_text().replace("50", "1").replace("Tumor", "epithelial"))
    assert_refused(medseg("convert", "geojson", near, "--image", image, out), "already holds 'train_19_005'")
    assert tree(out) == before


def test_a_field_without_nuclei_is_ground_truth_too(consep, tmp_path):
    """An empty export (a field QuPath found no nucleus in) had been refused: it scores false positives."""
    (tmp_path / "empty.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    proc = medseg("convert", "geojson", tmp_path / "empty.geojson", "--image", consep / "images" / "train_19_005.png",
                  tmp_path / "truth", "--classes", "default")
    assert proc.returncode == 0, proc.stderr
    assert "0 outlines (a field without nuclei)" in proc.stdout
    assert not read_label_map(tmp_path / "truth" / "labels" / "train_19_005.tif").any()


def test_the_region_drawn_around_the_nuclei_is_no_nucleus(consep, tmp_path):
    """QuPath exports the annotation a user drew before detecting cells with the cells: read as a
    nucleus it had covered the whole image, no background left."""
    instances = read_label_map(consep / "instances" / "train_19_005.tif")
    votes = _votes(instances, read_label_map(consep / "labels" / "train_19_005.tif"))
    write_geojson(tmp_path / "n.geojson", instances, votes, CONSEP_CLASSES)
    data = json.loads((tmp_path / "n.geojson").read_text())
    data["features"].insert(0, {"type": "Feature", "properties": {"objectType": "annotation"},
                                "geometry": {"type": "Polygon", "coordinates": [_ring(0, 0, 256, 256)]}})
    (tmp_path / "with_region.geojson").write_text(json.dumps(data))
    proc = medseg("convert", "geojson", tmp_path / "with_region.geojson", "--image",
                  consep / "images" / "train_19_005.png", tmp_path / "truth",
                  "--classes", ",".join([*CONSEP_CLASSES[1:], "nucleus"]))
    assert proc.returncode == 0, proc.stderr
    assert "1 outline larger than 1000 µm² left out: regions drawn around nuclei" in proc.stderr
    truth = read_label_map(tmp_path / "truth" / "instances" / "train_19_005.tif")
    assert truth.max() == len(np.unique(instances)) - 1 and (truth == 0).any()
