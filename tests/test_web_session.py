"""The browser front's handlers (no browser, no Gradio): real patches through the shipped model."""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from napari_medseg.errors import MedsegError
from napari_medseg.evaluation.ground_truth import compare_to_ground_truth, ground_truth_from_label_map
from napari_medseg.evaluation.report import evaluate_maps
from napari_medseg.io.images import read_image, read_label_map
from napari_medseg.web.render import class_overlay, enlarged
from napari_medseg.web.session import (DEFAULT_MODEL, ModelStore, WebInputError, compare_upload, metrics_rows,
                                       nucleus_summary, segment_upload)

STEM = "train_19_005"


@pytest.fixture(scope="module")
def store():
    return ModelStore()


@pytest.fixture(scope="module")
def result(store, consep):
    with store.lock:
        return segment_upload(consep / "images" / f"{STEM}.png", store.get(DEFAULT_MODEL), pixel_size_um=0.25)


def test_segment_upload_gives_nuclei_counts_and_downloads(result):
    n = len(np.unique(result.instances)) - 1
    assert n > 20 and len(result.table["label"]) == n
    rows = {r[0]: r for r in nucleus_summary(result)}
    assert rows["all nuclei"][1] == n == sum(rows[c][1] for c in result.classes[1:])
    # areas in µm² at 0.25 µm/px: a sixteenth of the pixel count
    assert rows["all nuclei"][3] == pytest.approx(float(np.count_nonzero(result.instances)) / 16, rel=1e-3)
    names = sorted(p.name for p in result.downloads)
    assert names == sorted(f"{STEM}_{s}" for s in ("labels.tif", "instances.tif", "nuclei.geojson", "nuclei.csv"))
    assert all(p.parent == result.folder and str(p).startswith(tempfile.gettempdir()) for p in result.downloads)
    assert np.array_equal(read_label_map(result.folder / f"{STEM}_labels.tif"), result.class_map)
    geojson = json.loads((result.folder / f"{STEM}_nuclei.geojson").read_text())
    assert len(geojson["features"]) == n


def test_class_ground_truth_scores_as_the_core_does(result, consep):
    comparison = compare_upload(result, consep / "labels" / f"{STEM}.tif")
    expected = evaluate_maps(read_label_map(consep / "labels" / f"{STEM}.tif"), result.class_map, result.classes,
                             pred_instances=result.instances)
    assert comparison.report["overall"]["nucleus_dice"] == pytest.approx(expected["overall"]["nucleus_dice"])
    assert not comparison.report["classes_merged"]
    rows = metrics_rows(comparison.report)
    assert [r[0] for r in rows] == [*result.classes[1:], "nuclei (all classes)"]
    assert comparison.metrics_csv.is_file() and comparison.errors.shape == result.class_map.shape


def test_nucleus_only_instances_merge_the_classes(result, consep):
    """An instance map without classes: the prediction's classes are merged into 'nucleus'."""
    comparison = compare_upload(result, consep / "instances" / f"{STEM}.tif")
    report = comparison.report
    assert report["classes_merged"] and "merged" in report["note"]
    assert report["classes"] == ["background", "nucleus"]
    truth = read_label_map(consep / "labels" / f"{STEM}.tif")
    merged = evaluate_maps((truth > 0).astype(np.uint8), (result.class_map > 0).astype(np.uint8),
                           ["background", "nucleus"])
    assert report["overall"]["nucleus_dice"] == pytest.approx(merged["overall"]["nucleus_dice"])
    # the CSV, read on its own later, says what was compared and that the classes were merged
    with open(comparison.metrics_csv, newline="", encoding="utf-8") as f:
        rows = dict(csv.reader(f))
    assert rows["image"] == result.name and rows["ground truth"] == f"{STEM}.tif" and "merged" in rows["note"]
    assert float(rows["nucleus Dice"]) == pytest.approx(report["overall"]["nucleus_dice"], abs=1e-4)


def test_ground_truth_kinds_are_told_apart(consep):
    classes = ["background", "other", "inflammatory", "epithelial", "spindle"]
    labels = read_label_map(consep / "labels" / f"{STEM}.tif")
    instances = read_label_map(consep / "instances" / f"{STEM}.tif")
    assert ground_truth_from_label_map(labels, classes).classes == classes
    mask = ground_truth_from_label_map((labels > 0).astype(np.uint8) * 255, classes)
    assert mask.nucleus_only and mask.instances is None and mask.class_map.max() == 1
    by_ids = ground_truth_from_label_map(instances, classes)
    assert by_ids.nucleus_only and np.array_equal(by_ids.instances, instances)
    # other class names (another label set): nucleus vs background, both merged, said (it had been refused)
    report = compare_to_ground_truth(labels, ["background", "a", "b", "c", "d"], ground_truth_from_label_map(labels, classes))
    assert report["classes_merged"] and "are not the prediction's ['a', 'b', 'c', 'd']" in report["note"]
    assert list(report["per_class"]) == ["background", "nucleus"] and report["overall"]["nucleus_dice"] == 1.0


def test_bad_uploads_get_clear_messages(result, store, tmp_path):
    small = tmp_path / "small.png"
    import imageio.v3 as iio

    iio.imwrite(small, np.zeros((10, 12), np.uint8))
    with pytest.raises(WebInputError, match="10x12"):
        compare_upload(result, small)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with store.lock, pytest.raises(MedsegError, match="notes.png"):
        segment_upload(text, store.get(DEFAULT_MODEL))


def test_models_are_offered_by_name_never_by_path(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    default = Path(__file__).resolve().parents[1] / "src/napari_medseg/models/default/default.safetensors"
    shutil.copy(default, models / "mine.safetensors")
    (models / "junk.safetensors").write_bytes(b"junk")
    store = ModelStore(models)
    assert store.names() == [DEFAULT_MODEL, "mine.safetensors"]
    for name in ("junk.safetensors", "../models/mine.safetensors", str(models / "mine.safetensors")):
        with pytest.raises(WebInputError, match="Unknown model"):
            store.get(name)


def test_overlay_outlines_nuclei_in_their_class_colour(result):
    picture = class_overlay(result.display, result.class_map, result.instances, result.colors, opacity=0.0)
    outline = np.any(picture != result.display, axis=-1)
    assert outline.any() and not outline[result.class_map == 0].any()  # fill off: only outlines, only on nuclei
    assert enlarged(picture).shape[:2] == (512, 512)


def test_nan_pixels_are_refused_with_the_file_name(store, tmp_path):
    import tifffile

    image = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    image[5, 5, 0] = np.nan
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, image)
    with store.lock, pytest.raises(MedsegError, match="NaN"):
        segment_upload(path, store.get(DEFAULT_MODEL))


def test_two_users_at_once_share_one_model_and_both_get_their_result(consep, monkeypatch):
    """Concurrent requests queue on the store's lock; the model is loaded once."""
    import threading

    from napari_medseg.inference import Segmenter
    from napari_medseg.web.session import segment_uploads

    loads = []
    real_load = Segmenter.load.__func__
    monkeypatch.setattr(Segmenter, "load", classmethod(lambda cls, *a, **k: loads.append(a) or real_load(cls, *a, **k)))
    store, results, errors = ModelStore(), {}, []

    def user(stem):
        try:
            results[stem] = segment_uploads(store, DEFAULT_MODEL, [str(consep / "images" / f"{stem}.png")]).results
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(s,)) for s in ("train_19_005", "train_12_001")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(loads) == 1
    assert {next(iter(r)) for r in results.values()} == {"train_19_005", "train_12_001"}


def test_a_region_of_an_uploaded_slide_is_segmented_at_the_slide_pixel_size(store):
    slide = Path(__file__).resolve().parents[2] / "shared/data/slides/CMU-1-Small-Region.svs"
    with store.lock:
        result = segment_upload(slide, store.get(DEFAULT_MODEL), region="700,700,384,256")
        assert result.class_map.shape == (256, 384) and result.pixel_size_um == pytest.approx(0.499, abs=1e-3)
        assert "area_um2" in result.table and len(result.table["label"]) > 5
        assert any("resampled x2" in note for note in result.notes)  # seen by the 40x model at 0.25 µm/px
        with pytest.raises(MedsegError, match="not on the slide"):
            segment_upload(slide, store.get(DEFAULT_MODEL), region="99999,0,10,10")


def test_a_gray_upload_is_segmented_with_a_warning(store, result, consep, tmp_path):
    from PIL import Image

    from napari_medseg.io.images import read_image

    gray = read_image(consep / "images" / f"{STEM}.png").mean(-1).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    with store.lock:
        gray_result = segment_upload(tmp_path / "gray.png", store.get(DEFAULT_MODEL))
    assert any("image is gray" in note for note in gray_result.notes)
    assert not result.notes  # the colour original at the model's pixel size: nothing to say
    # a PNG records no pixel size and none was given in the page: taken as the model's, said
    assert any(note.startswith("The file records no pixel size: taken as the model's 0.25 µm/px")
               and "enter it under 'pixel size' (0.5 at 20x)" in note for note in gray_result.notes)


def test_nucleus_settings_given_in_the_page_replace_the_models_own(store, result, consep):
    """The page's marker threshold / min nucleus: nuclei cut as the core cuts them with those
    values; an impossible one is refused with the setting's name."""
    from napari_medseg.nuclei.watershed import InstanceSettings

    segmenter = store.get(DEFAULT_MODEL)
    with store.lock:
        given = segment_upload(consep / "images" / f"{STEM}.png", segmenter, pixel_size_um=0.25,
                               nucleus_settings={"marker_threshold": 0.6, "min_size": 150})
        _, expected = segmenter.segment_nuclei(read_image(consep / "images" / f"{STEM}.png"), pixel_size_um=0.25,
                                               instance_settings=InstanceSettings(marker_threshold=0.6, min_size=150))
    np.testing.assert_array_equal(given.instances > 0, expected > 0)
    assert len(np.unique(given.instances)) == len(np.unique(expected))
    assert len(np.unique(given.instances)) < len(np.unique(result.instances))  # fewer: seeds higher, small ones gone
    with pytest.raises(MedsegError, match="marker_threshold must lie strictly between 0 and 1, got 1.5"):
        segment_upload(consep / "images" / f"{STEM}.png", segmenter, nucleus_settings={"marker_threshold": 1.5})


def test_ground_truth_label_maps_are_read_as_what_they_are_and_the_reading_is_said(consep):
    """The values alone can mislead: a class map with one nucleus class present is no mask, an
    instance map with few ids is no class map, and with a nucleus-only model a class map is no
    instance map. Each reading is said in the report."""
    classes = ["background", "other", "inflammatory", "epithelial", "spindle"]
    labels = read_label_map(consep / "labels" / f"{STEM}.tif")
    instances = read_label_map(consep / "instances" / f"{STEM}.tif")
    spindle_only = np.where(labels == 4, 4, 0).astype(np.uint8)  # as 108 of CoNSeP's 432 class maps
    read = ground_truth_from_label_map(spindle_only, classes)
    assert read.classes == classes and "only 'spindle' present" in read.reading
    few = np.zeros_like(instances)
    for new_id, old_id in enumerate(np.unique(instances)[1:4], start=1):  # three nuclei: ids 1-3 < 5 classes
        few[instances == old_id] = new_id
    read = ground_truth_from_label_map(few, classes)
    assert read.nucleus_only and np.array_equal(read.instances, few) and "instance map" in read.reading
    read = ground_truth_from_label_map(labels, ["background", "nucleus"])  # a class map, a nucleus-only model
    assert read.nucleus_only and read.instances is None and "does not have" in read.reading
    assert read.class_map.sum() == (labels > 0).sum()
    report = compare_to_ground_truth((labels > 0).astype(np.uint8), ["background", "nucleus"], read)
    assert report["overall"]["nucleus_dice"] == pytest.approx(1.0) and report["overall"]["bpq"] > 0.9
    assert "read as a class map of classes the model does not have" in report["note"]


def test_small_annotated_nuclei_stay_in_a_ground_truth_without_instances():
    """A prediction equal to its ground truth scores 1, however small the nuclei (under the model's
    45 px they had been dropped from the truth alone: bPQ 0.5 for a perfect prediction, whose
    nuclei are the model's own, cut at the image's pixel size)."""
    from scipy import ndimage as ndi

    from napari_medseg.evaluation.report import evaluate_maps

    truth = np.zeros((64, 64), np.uint8)
    truth[5:11, 5:11] = 2  # 36 px
    truth[20:30, 20:30] = 3  # 100 px
    truth[40:46, 40:46] = 4  # 36 px
    classes = ["background", "other", "inflammatory", "epithelial", "spindle"]
    report = evaluate_maps(truth, truth.copy(), classes, pred_instances=ndi.label(truth > 0)[0])
    assert report["overall"]["bpq"] == pytest.approx(1.0) and report["overall"]["aji"] == pytest.approx(1.0)


def test_a_uint64_instance_map_is_scored():
    from napari_medseg.evaluation.instance import aji, match_instances

    truth = np.zeros((32, 32), np.uint64)  # as a label TIFF of more than 2**32 ids is written
    truth[2:10, 2:10], truth[15:25, 15:25] = 1, 2
    counts = match_instances(truth.astype(np.int32), truth)
    assert (counts.tp, counts.fp, counts.fn) == (2, 0, 0) and aji(truth.astype(np.int32), truth) == 1.0


def test_uploads_that_share_a_name_are_all_kept(store, consep, tmp_path):
    """patch.png and patch.tif (or two patch.png from different folders): two results, told apart
    (one had replaced the other, and the page said 1 image was segmented)."""
    import shutil

    import tifffile

    from napari_medseg.io import read_image
    from napari_medseg.web.session import segment_uploads

    image = read_image(consep / "images" / f"{STEM}.png")
    (tmp_path / "a").mkdir()
    shutil.copy(consep / "images" / f"{STEM}.png", tmp_path / "a" / "patch.png")
    tifffile.imwrite(tmp_path / "a" / "patch.tif", image[:128, :128], photometric="rgb")
    results = segment_uploads(store, DEFAULT_MODEL, [str(tmp_path / "a" / "patch.png"),
                                                     str(tmp_path / "a" / "patch.tif")]).results
    assert list(results) == ["patch", "patch (2)"]
    assert results["patch"].class_map.shape == image.shape[:2] and results["patch (2)"].class_map.shape == (128, 128)
    # each one's downloads carry its own name: the page's two results, two sets of files
    assert {p.name for p in results["patch (2)"].downloads} >= {"patch (2)_labels.tif", "patch (2)_nuclei.csv"}


def test_a_slide_regions_downloads_lie_where_the_region_is(store):
    """GeoJSON outlines and CSV centroids in the slide's pixels (they had started at 0,0: in QuPath
    every nucleus sat in the slide's corner), as `medseg predict --region` writes them; the label
    TIFFs record the pixel size, classes and origin; a whole-slide ground truth is compared by its
    part under the region."""
    import csv

    from napari_medseg.io.images import read_label_record
    from napari_medseg.io.pixel_size import file_pixel_size_um

    slide = Path(__file__).resolve().parents[2] / "shared/data/slides/CMU-1-Small-Region.svs"
    with store.lock:
        result = segment_upload(slide, store.get(DEFAULT_MODEL), region="1000,1500,256,256")
    assert result.origin == (1500, 1000)
    geojson = json.loads((result.folder / "CMU-1-Small-Region_nuclei.geojson").read_text())
    xs = [x for f in geojson["features"] for ring in _rings(f["geometry"]) for x, _ in ring]
    ys = [y for f in geojson["features"] for ring in _rings(f["geometry"]) for _, y in ring]
    assert len(geojson["features"]) > 5
    assert 1000 <= min(xs) and max(xs) <= 1256 and 1500 <= min(ys) and max(ys) <= 1756
    with open(result.folder / "CMU-1-Small-Region_nuclei.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(1000 <= float(r["centroid_x"]) < 1256 and 1500 <= float(r["centroid_y"]) < 1756 for r in rows)
    labels = result.folder / "CMU-1-Small-Region_labels.tif"
    assert file_pixel_size_um(labels) == pytest.approx(0.499, abs=1e-3)
    record = read_label_record(labels)
    assert record["origin"] == [1500, 1000] and record["classes"] == result.classes


def _rings(geometry):
    polygons = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
    return [ring for polygon in polygons for ring in polygon]


def test_a_region_of_an_image_and_its_whole_ground_truth(store, consep):
    """A region of an ordinary image is segmented (it had been ignored silently: the whole image
    ran), placed at its origin, and scored against its part of the image's ground truth."""
    with store.lock:
        result = segment_upload(consep / "images" / f"{STEM}.png", store.get(DEFAULT_MODEL), region="64,32,128,160")
        with pytest.raises(MedsegError, match="not on the image"):
            segment_upload(consep / "images" / f"{STEM}.png", store.get(DEFAULT_MODEL), region="300,300,10,10")
    assert result.class_map.shape == (160, 128) and result.origin == (32, 64)
    comparison = compare_upload(result, consep / "labels" / f"{STEM}.tif")
    truth = read_label_map(consep / "labels" / f"{STEM}.tif")[32:192, 64:192]
    expected = evaluate_maps(truth, result.class_map, result.classes, pred_instances=result.instances)
    assert comparison.report["overall"]["nucleus_dice"] == pytest.approx(expected["overall"]["nucleus_dice"])


@pytest.mark.parametrize("size", [100, 0.01, -1])
def test_a_pixel_size_no_microscope_gives_is_refused(store, consep, size):
    """100 (a magnification typed as µm/px) had upscaled a patch 400-fold: hours in the one queue."""
    from napari_medseg.web.session import segment_uploads

    with pytest.raises(WebInputError, match="µm per pixel from 0.05 to 20"):
        segment_uploads(store, DEFAULT_MODEL, [str(consep / "images" / f"{STEM}.png")], pixel_size_um=size)


def test_one_bad_file_in_a_batch_keeps_the_good_results(store, consep, tmp_path):
    from napari_medseg.web.session import segment_uploads

    (tmp_path / "notes.png").write_text("not an image")
    done = segment_uploads(store, DEFAULT_MODEL, [str(consep / "images" / f"{STEM}.png"), str(tmp_path / "notes.png")])
    assert list(done.results) == [STEM] and list(done.refused) == ["notes.png"]
    assert "notes.png" in done.refused["notes.png"] and str(tmp_path) not in done.refused["notes.png"]
    with pytest.raises(MedsegError, match="notes.png"):  # nothing usable: the error itself
        segment_uploads(store, DEFAULT_MODEL, [str(tmp_path / "notes.png")])


def test_a_cancelled_run_stops_and_its_session_folders_go(store, consep):
    from napari_medseg.steps import Cancelled
    from napari_medseg.web.session import remove_results, segment_uploads

    asked = []
    with pytest.raises(Cancelled):
        segment_uploads(store, DEFAULT_MODEL, [str(consep / "images" / f"{STEM}.png")] * 3,
                        should_cancel=lambda: asked.append(1) or len(asked) > 2)
    assert len(asked) == 3  # stopped at the step it was asked, not after three images
    done = segment_uploads(store, DEFAULT_MODEL, [str(consep / "images" / f"{STEM}.png")])
    folder = done.results[STEM].folder
    assert folder.is_dir()
    remove_results(done.results)
    assert not folder.exists()


def test_a_batch_cancelled_after_its_first_image_leaves_no_download_folder(store, consep):
    """The page shows nothing of a cancelled batch, so the images it had finished must not keep
    their download folders on the server until it stops."""
    from napari_medseg.steps import Cancelled
    from napari_medseg.web import session

    session.results_folder()  # the server's results root exists
    root = session._RESULTS_ROOT
    before = set(root.iterdir())
    with pytest.raises(Cancelled):
        session.segment_uploads(store, DEFAULT_MODEL, [str(consep / "images" / f"{STEM}.png")] * 2,
                                should_cancel=lambda: bool(set(root.iterdir()) - before))
    assert set(root.iterdir()) == before


def test_a_region_reaching_outside_the_image_is_cut_to_it_and_the_page_says_so(store, consep):
    """'10,10,5000,5000' on a 256² patch segments its 246² part: said, not silent."""
    with store.lock:
        result = segment_upload(consep / "images" / f"{STEM}.png", store.get(DEFAULT_MODEL), pixel_size_um=0.25,
                                region="200,-20,100,100")
    assert result.class_map.shape == (80, 56) and result.origin == (0, 200)
    assert any("reaches outside" in note and "200,0,56,80" in note for note in result.notes), result.notes
    with store.lock:  # a region inside the image gets no such note
        inside = segment_upload(consep / "images" / f"{STEM}.png", store.get(DEFAULT_MODEL), pixel_size_um=0.25,
                                region="10,10,64,64")
    assert not any("reaches outside" in note for note in inside.notes)
