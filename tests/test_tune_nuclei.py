"""A model's own nucleus post-processing: ``medseg tune-nuclei`` chooses it on labelled images and
records it in a copy of the checkpoint; every entry point then cuts nuclei with it unless told
otherwise, and a fine-tune keeps it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_medseg.cli import main
from napari_medseg.evaluation.benchmark import evaluate_segmenter
from napari_medseg.evaluation.instance_tuning import tune_nuclei_checkpoint
from napari_medseg.evaluation.threshold import ThresholdTuningError, samples_of_groups
from napari_medseg.inference import Segmenter
from napari_medseg.io.dataset import DatasetError
from napari_medseg.io.images import read_image
from napari_medseg.models import CheckpointError, load_checkpoint, read_meta, resolve_model_path, save_checkpoint
from napari_medseg.models.checkpoint import RECORDED_INSTANCE_FIELDS
from napari_medseg.nuclei.watershed import TUNED_FIELDS, InstanceSettings, semantic_to_instances

FORCED = InstanceSettings(marker_threshold=0.3, min_size=100, min_marker_size=4)  # far from the defaults


@pytest.fixture(scope="module")
def forced(consep, tmp_path_factory) -> Path:
    """The default model with FORCED recorded, written as the tuning writes its choice (a tuning
    keeps the model's own settings unless it finds better ones, and these are worse)."""
    from napari_medseg.evaluation.instance_tuning import _write_instance_settings

    out = tmp_path_factory.mktemp("tuned") / "forced.safetensors"
    forced = {k: getattr(FORCED, k) for k in TUNED_FIELDS}
    _write_instance_settings(resolve_model_path("default"), out, forced, {"settings": forced, "forced by": "a test"})
    return out


def test_the_recorded_fields_are_the_tuned_ones():
    assert RECORDED_INSTANCE_FIELDS == TUNED_FIELDS  # models cannot import nuclei: the two lists must agree


def test_a_tie_keeps_the_models_own_settings():
    """No setting better than the model's own (here none finds a nucleus: all score 0): the model's
    stay; the first of the grid had won the tie and the checkpoint's settings changed for nothing."""
    from napari_medseg.evaluation.instance_tuning import chosen_over

    own = InstanceSettings(marker_threshold=0.4, min_size=45, min_marker_size=10)
    grid = [InstanceSettings(marker_threshold=t, min_size=10, min_marker_size=4) for t in (0.3, 0.4, 0.5)]
    zero = {"a": 0.0, "b": 0.0}
    assert chosen_over(own, zero, grid, [zero, zero, zero]) == (own, zero)
    better = [zero, {"a": 0.2, "b": 0.1}, zero]
    assert chosen_over(own, zero, grid, better) == (grid[1], better[1])
    assert chosen_over(own, {"a": 0.1, "b": 0.1}, grid, better)[0] == grid[1]  # weakest equal, mean higher
    assert chosen_over(own, {"a": 0.3, "b": 0.1}, grid, better)[0] == own  # weakest equal, mean lower


def test_cli_tunes_on_two_sets_and_records_what_the_product_then_scores(consep, tmp_path, capsys):
    """Two real sets (CoNSeP, and the same folder under another name standing in for a second
    set); the written checkpoint's settings, used by default by ``evaluate_segmenter`` (the
    product's path), score the bPQ the tuning recorded, and no worse than the model's own."""
    other = tmp_path / "consep_again"
    other.symlink_to(consep, target_is_directory=True)
    out = tmp_path / "tuned.safetensors"
    assert main(["tune-nuclei", "default", str(consep), str(other), "--groups", "train_12,train_3", "--out", str(out),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "chosen of 60 settings" in printed and f"wrote {out}" in printed
    meta = read_meta(out)
    record = meta.metrics["instance_tuning"]
    assert set(meta.instance_settings) == set(TUNED_FIELDS) and meta.instance_settings == record["settings"]
    assert record["images"] == {"consep_train": 32, "consep_again": 32} and record["candidates"] == 60
    assert min(record["bpq"].values()) >= min(record["before"]["bpq"].values())  # the old setting was a candidate
    assert record["before"]["settings"] == {"marker_threshold": 0.4, "min_size": 45, "min_marker_size": 10}

    tuned = Segmenter.load(out, device="cpu", backend="torch")
    assert tuned.instance_settings == InstanceSettings(**meta.instance_settings)
    classes, samples = samples_of_groups(consep, ["train_12", "train_3"])
    scores, _ = evaluate_segmenter(tuned, classes, samples)  # no settings given: the model's own
    assert scores["bpq"] == pytest.approx(record["bpq"]["consep_train"], abs=1e-9)
    assert meta.foreground_threshold == read_meta(resolve_model_path("default")).foreground_threshold  # kept


def test_predict_cuts_nuclei_with_the_models_settings_unless_given(forced, consep, tmp_path):
    assert read_meta(forced).instance_settings == {"marker_threshold": 0.3, "min_size": 100, "min_marker_size": 4}
    image_path = consep / "images" / "train_12_006.png"
    assert main(["predict", str(image_path), "--model", str(forced), "--out", str(tmp_path / "own"),
                 "--backend", "torch", "--precision", "fp32", "--device", "cpu"]) == 0
    assert main(["predict", str(image_path), "--model", str(forced), "--out", str(tmp_path / "given"),
                 "--backend", "torch", "--precision", "fp32", "--device", "cpu", "--min-size", "10",
                 "--marker-threshold", "0.5"]) == 0
    own = read_image(tmp_path / "own" / "instances" / "train_12_006.tif")
    given = read_image(tmp_path / "given" / "instances" / "train_12_006.tif")

    segmenter = Segmenter.load(forced, device="cpu", backend="torch")
    distance = np.zeros(own.shape, np.float32)
    class_map = segmenter.segment(read_image(image_path), distance_out=distance)
    expected_own = semantic_to_instances(class_map, FORCED, distance)
    expected_given = semantic_to_instances(class_map, InstanceSettings(marker_threshold=0.5, min_size=10,
                                                                       min_marker_size=4), distance)
    np.testing.assert_array_equal(own > 0, expected_own > 0)
    assert own.max() == len(np.unique(expected_own)) - 1
    np.testing.assert_array_equal(given > 0, expected_given > 0)
    assert len(np.unique(given)) > len(np.unique(own))  # 10 px and seeds at 0.5: more, smaller nuclei kept


def test_bad_settings_are_refused_before_any_file(forced, consep, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(consep / "images" / "train_12_006.png"), "--model", str(forced), "--out", str(out),
                 "--marker-threshold", "1.5"]) != 0
    assert "marker_threshold must lie strictly between 0 and 1, got 1.5" in capsys.readouterr().err
    assert not (out / "labels").exists() or not any((out / "labels").iterdir())


def test_a_checkpoint_with_impossible_settings_is_refused_naming_them(forced, tmp_path):
    model, meta = load_checkpoint(forced)
    for record, words in (({"marker_threshold": 1.5}, "instance_settings.marker_threshold must lie strictly"),
                          ({"min_size": -3}, "instance_settings.min_size must be a whole number"),
                          ({"sigma": 2.0}, "instance_settings may hold marker_threshold, min_size, min_marker_size")):
        meta.instance_settings = record
        path = save_checkpoint(tmp_path / "bad.safetensors", model, meta)
        with pytest.raises(CheckpointError, match=words):
            read_meta(path)


def test_tuning_needs_images_of_the_groups_and_never_overwrites(forced, consep, tmp_path):
    # the folder's own source images are named, as --groups takes them (it said only what was not there)
    with pytest.raises(ThresholdTuningError, match=r"belongs to the groups \['no_such_image'\]; its source images "
                                                   rf"are {consep.name}/train_\d+, .*in all\)\. Tune on all of "
                                                   r"them with --all-images, or on some with --groups"):
        tune_nuclei_checkpoint("default", [consep], tmp_path / "x.safetensors", groups=["no_such_image"], device="cpu")
    with pytest.raises(ThresholdTuningError, match="exists: choose another file or pass --overwrite"):
        tune_nuclei_checkpoint("default", [consep], forced, groups=["train_12"], device="cpu")
    with pytest.raises(DatasetError, match="is not a dataset folder"):  # named as such, not "no image of the groups"
        tune_nuclei_checkpoint("default", [tmp_path / "missing"], tmp_path / "x.safetensors", groups=["train_12"])
    assert not (tmp_path / "x.safetensors").exists()


def test_the_segment_widget_shows_and_uses_the_models_settings(make_napari_viewer, forced, consep):
    from napari_medseg._napari.segment_widget import FILE_MODEL, SegmentWidget

    viewer = make_napari_viewer()
    image = read_image(consep / "images" / "train_12_006.png")
    viewer.add_image(image, name="patch")
    widget = SegmentWidget(viewer)
    widget.device.value, widget.backend.value, widget.nuclei.value = "cpu", "torch", True
    # the boxes say the chosen model's own values as soon as it is chosen, before any run
    assert widget.marker_threshold.native.text() == "model's (0.40)"  # the default: InstanceSettings' defaults
    assert widget.min_nucleus.native.text() == "model's (45)"
    widget.model_source.value = FILE_MODEL
    assert widget.min_nucleus.native.text() == "model's"  # no checkpoint chosen yet: nothing to say
    widget.checkpoint.value = str(forced)
    assert widget.marker_threshold.native.text() == "model's (0.30)"
    assert widget.min_nucleus.native.text() == "model's (100)"
    widget.run(threaded=False)
    assert widget.marker_threshold.native.text() == "model's (0.30)"
    assert widget.min_nucleus.native.text() == "model's (100)"
    segmenter = Segmenter.load(forced, device="cpu", backend="torch")
    _, expected = segmenter.segment_nuclei(image)  # the model's own settings
    own = widget.last_instances_layer.data
    np.testing.assert_array_equal(own > 0, expected > 0)
    # a value typed in re-cuts the kept run with it; back to "model's" gives the model's again
    widget.min_nucleus.value = 10
    smaller = widget.rethreshold(threaded=False)[1]
    assert len(np.unique(smaller)) > len(np.unique(own))
    widget.min_nucleus.value = widget.min_nucleus.min
    again = widget.rethreshold(threaded=False)[1]
    np.testing.assert_array_equal(again > 0, expected > 0)


def test_the_arrows_step_from_the_chosen_models_own_value(make_napari_viewer, forced, consep):
    """At "model's (0.30)" the down arrow gives 0.25 (not the box's minimum), before any run and
    after; while no readable model is chosen the boxes step as any other."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    from napari_medseg._napari.segment_widget import FILE_MODEL, SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(read_image(consep / "images" / "train_12_006.png"), name="patch")
    widget = SegmentWidget(viewer)
    widget.device.value, widget.backend.value = "cpu", "torch"
    widget.model_source.value = FILE_MODEL
    QTest.keyClick(widget.min_nucleus.native, Qt.Key.Key_Up)
    assert widget.min_nucleus.value == 0  # no model chosen: one plain step up from "model's"
    widget.min_nucleus.value = widget.min_nucleus.min
    widget.checkpoint.value = str(forced)
    QTest.keyClick(widget.min_nucleus.native, Qt.Key.Key_Up)
    assert widget.min_nucleus.value == 101  # before any run: the header told the model's 100
    widget.min_nucleus.value = widget.min_nucleus.min
    widget.run(threaded=False)
    QTest.keyClick(widget.marker_threshold.native, Qt.Key.Key_Down)
    assert widget.marker_threshold.value == pytest.approx(0.25)
    QTest.keyClick(widget.min_nucleus.native, Qt.Key.Key_Up)
    assert widget.min_nucleus.value == 101
    QTest.keyClick(widget.threshold.native, Qt.Key.Key_Up)
    assert widget.threshold.value == pytest.approx(0.35)  # the default's tuned 0.34, kept by the tuned copy
    QTest.keyClick(widget.marker_threshold.native, Qt.Key.Key_Down)
    assert widget.marker_threshold.value == pytest.approx(0.20)  # away from "model's": plain steps


def test_a_fine_tune_keeps_its_starts_settings(tiny_checkpoint, small_consep, tmp_path):
    from napari_medseg.training import load_train_config, train

    model, meta = load_checkpoint(tiny_checkpoint)
    meta.instance_settings = {"min_size": 30}
    weights = [2.0] + [1.0] * (meta.model.num_classes - 2)  # medseg tune-classes' record, kept too
    meta.class_choice_weights = weights
    start = save_checkpoint(tmp_path / "start.safetensors", model, meta)
    config = tmp_path / "fine.yaml"
    config.write_text("\n".join([
        f"init_checkpoint: {start}", f"data: {{dataset: [{small_consep}], crop_size: 64, val_fraction: 0.34}}",
        "epochs: 1", "batch_size: 4", "num_threads: 1", f"out_dir: {tmp_path / 'run'}", "save_resume: false"]))
    result = train(load_train_config(config))
    assert read_meta(result.checkpoint).instance_settings == {"min_size": 30}
    assert read_meta(result.checkpoint).class_choice_weights == weights
    tuned = Segmenter.load(result.checkpoint, device="cpu")
    assert tuned.instance_settings.min_size == 30 and tuned.class_weights == weights


def test_cli_help_names_the_models_own_as_the_default():
    medseg = Path(sys.executable).with_name("medseg")
    text = subprocess.run([str(medseg), "predict", "--help"], capture_output=True, text=True, timeout=120).stdout
    assert "default: the model's own (medseg tune-nuclei), else 0.4" in " ".join(text.split())


def test_evaluating_a_folder_that_lacks_some_predictions_says_how_to_make_them(consep, tmp_path):
    from napari_medseg.evaluation.report import evaluate_folders
    from napari_medseg.io.images import read_label_map, write_label_map

    pred = tmp_path / "pred"
    (pred / "labels").mkdir(parents=True)
    stem = sorted(p.stem for p in (consep / "labels").glob("*.tif"))[0]
    write_label_map(pred / "labels" / f"{stem}.tif", read_label_map(consep / "labels" / f"{stem}.tif"))
    with pytest.raises(DatasetError, match=rf"lacks predictions for \d+ images: .*, \.\.\.; predict every image "
                                           rf"of the ground truth's folder: medseg predict {consep} --out {pred}"):
        evaluate_folders(pred, consep)
