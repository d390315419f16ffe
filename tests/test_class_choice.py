"""A model's class weights (``class_choice_weights``): they change which class a nucleus pixel
gets and nothing else (the foreground, the nuclei, Dice and bPQ stay exactly as they are);
``medseg tune-classes`` chooses them on labelled images and records them in a copy of the
checkpoint, and every path that makes a class map applies them."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.cli import main
from napari_medseg.evaluation.class_choice import candidates_per_search, tune_classes_checkpoint
from napari_medseg.evaluation.threshold import ThresholdTuningError, samples_of_groups
from napari_medseg.inference import Segmenter
from napari_medseg.inference.class_decision import classify, foreground_class
from napari_medseg.inference.rethreshold import Thresholds, iter_segment_keeping
from napari_medseg.models import CheckpointError, load_checkpoint, read_meta, resolve_model_path, save_checkpoint
from napari_medseg.steps import run_steps

WEIGHTS = [1.5, 4.0, 1.0, 0.5]  # other, inflammatory, epithelial, spindle: what tune-classes chose for the default


@pytest.fixture(scope="module")
def six_patches(consep, tmp_path_factory):
    """Three real CoNSeP patches of each of two source images (links): a tuning small enough to test."""
    root = tmp_path_factory.mktemp("consep_six") / "consep_six"
    for sub in ("images", "labels", "instances"):
        (root / sub).mkdir(parents=True)
    (root / "classes.json").symlink_to(consep / "classes.json")
    for stem in [f"train_12_{i:03d}" for i in (4, 5, 6)] + [f"train_3_{i:03d}" for i in (4, 5, 6)]:
        (root / "images" / f"{stem}.png").symlink_to(consep / "images" / f"{stem}.png")
        for sub in ("labels", "instances"):
            (root / sub / f"{stem}.tif").symlink_to(consep / sub / f"{stem}.tif")
    return root


def _probabilities(seed: int = 0, shape=(5, 40, 60)) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2
    e = np.exp(logits - logits.max(0))
    return e / e.sum(0)


@pytest.mark.parametrize("threshold", [None, 0.3, 0.7])
def test_weights_move_the_class_of_foreground_pixels_only(threshold):
    probs = _probabilities()
    plain, weighted = classify(probs, threshold), classify(probs, threshold, WEIGHTS)
    np.testing.assert_array_equal(weighted > 0, plain > 0)  # the same foreground
    assert (weighted != plain).mean() > 0.05  # and other classes for some of it
    scaled = probs[1:] * np.asarray(WEIGHTS, np.float32)[:, None, None]
    np.testing.assert_array_equal(weighted[plain > 0], scaled.argmax(0)[plain > 0] + 1)
    np.testing.assert_array_equal(classify(probs, threshold, []), plain)  # none given: as before
    np.testing.assert_array_equal(classify(probs, threshold, [2.0] * 4), plain)  # all alike: as before


def test_the_likeliest_foreground_class_ignores_the_background():
    probs = np.array([[0.9, 0.1], [0.04, 0.3], [0.06, 0.6]], np.float32)[:, :, None]  # (3 classes, 2, 1)
    np.testing.assert_array_equal(foreground_class(probs)[:, 0], [2, 2])
    np.testing.assert_array_equal(foreground_class(probs, [1.8, 1.0])[:, 0], [1, 2])


def test_the_checkpoint_refuses_weights_that_cannot_work(tmp_path):
    model, meta = load_checkpoint(resolve_model_path("default"))
    meta.class_choice_weights = WEIGHTS
    save_checkpoint(tmp_path / "ok.safetensors", model, meta, half=True)
    assert read_meta(tmp_path / "ok.safetensors").class_choice_weights == WEIGHTS
    for bad in ([1.0, 2.0], [1.0, 0.0, 1.0, 1.0], [1.0, float("nan"), 1.0, 1.0]):
        meta.class_choice_weights = bad
        with pytest.raises(CheckpointError, match="class_choice_weights"):
            meta.check("test")


def test_every_class_map_path_applies_the_models_weights(consep):
    """Plain tiles, tiles at another pixel size (resampled), and a kept run re-thresholded: each
    class map equals ``classify`` of its own probabilities with the weights, and its foreground
    is the unweighted one's."""
    image = samples_of_groups(consep, ["train_12"])[1][5].image
    segmenter = Segmenter.load("default", device="cpu", backend="torch")
    threshold = segmenter.foreground_threshold
    for pixel_size in (None, 0.3):
        segmenter.class_weights = None
        plain = segmenter.segment(image, pixel_size_um=pixel_size)
        segmenter.class_weights = WEIGHTS
        probs = np.zeros((5, *image.shape[:2]), np.float32)
        weighted = segmenter.segment(image, probabilities_out=probs, pixel_size_um=pixel_size)
        np.testing.assert_array_equal(weighted > 0, plain > 0)
        assert (weighted != plain).sum() > 100
        np.testing.assert_array_equal(weighted, classify(probs, threshold, WEIGHTS))
    labels, _, kept = run_steps(iter_segment_keeping(segmenter, image))
    np.testing.assert_array_equal(kept.class_map(Thresholds(nucleus=threshold)), labels)
    lower = kept.class_map(Thresholds(nucleus=0.2))
    np.testing.assert_array_equal(lower, classify(kept.probabilities, 0.2, WEIGHTS))


def test_tuning_records_weights_that_score_what_it_says_and_checks_them_image_by_image(six_patches, tmp_path):
    """Two CoNSeP source images (three patches each), a small grid: the written checkpoint holds the weights, the
    product's own path with them scores the tuned mPQ, Dice and bPQ do not move, and the
    leave-one-source-image-out figure is reported with the weights each fold chose."""
    from napari_medseg.evaluation.benchmark import evaluate_segmenter

    out = tmp_path / "classes.safetensors"
    steps = []
    result = tune_classes_checkpoint("default", six_patches, out, all_images=True, device="cpu",
                                     grid=(0.5, 1.0, 4.0), progress_for=lambda total: lambda d, t: steps.append((d, t)))
    assert result["images"] == 6 and result["source_images"] == 2
    assert steps[-1][0] == steps[-1][1] == 6 + candidates_per_search(read_meta(out).classes, (0.5, 1.0, 4.0)) * 3
    assert result["tuned"]["mpq"] >= result["before"]["mpq"]
    assert set(result["cross_validated"]["weights"]) == {"train_12", "train_3"}
    meta = read_meta(out)
    assert meta.class_choice_weights in ([], result["weights"])
    assert meta.metrics["class_choice_tuning"]["weights"] == result["weights"]
    assert meta.foreground_threshold == read_meta(resolve_model_path("default")).foreground_threshold

    classes, samples = samples_of_groups(six_patches, None)
    tuned, shipped = (Segmenter.load(m, device="cpu", backend="torch") for m in (out, "default"))
    # 'before' is the model as shipped, with its own weights, and the search starts there (they had
    # been dropped for all 1: a 'before' that was not the shipped model's, and its inflammatory 4 lost)
    assert result["own_weights"] == WEIGHTS
    tuned_scores = evaluate_segmenter(tuned, classes, samples)[0]
    shipped_scores = evaluate_segmenter(shipped, classes, samples)[0]
    assert tuned_scores["mpq"] == pytest.approx(result["tuned"]["mpq"], abs=1e-9)
    assert shipped_scores["mpq"] == pytest.approx(result["before"]["mpq"], abs=1e-9)
    assert (tuned_scores["nucleus_dice"], tuned_scores["bpq"]) == (shipped_scores["nucleus_dice"],
                                                                   shipped_scores["bpq"])


def test_cli_tunes_on_one_source_image_and_says_there_is_none_left_to_check_on(six_patches, tmp_path, capsys):
    out = tmp_path / "tuned.safetensors"
    assert main(["tune-classes", "default", str(six_patches), "--groups", "train_12", "--out", str(out),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "class weights: other" in printed and "(unchanged: the nuclei stay as they are)" in printed
    assert "(the model's own: other 1.5, inflammatory 4, epithelial 1, spindle 0.5)" in printed
    assert "on the 3 tuning images, from the model as it is: mPQ" in printed
    assert "one source image: no image left to check the choice on" in printed and f"wrote {out}" in printed
    assert read_meta(out).metrics["class_choice_tuning"]["images"] == 3


def test_cli_refuses_data_without_the_models_classes_and_an_existing_output(monuseg, six_patches, tmp_path, capsys):
    out = tmp_path / "tuned.safetensors"
    assert main(["tune-classes", "default", str(monuseg), "--all-images", "--out", str(out), "--device", "cpu"]) != 0
    assert "differ from the model's" in capsys.readouterr().err and not out.exists()
    out.write_bytes(b"keep me")
    assert main(["tune-classes", "default", str(six_patches), "--groups", "train_12", "--out", str(out),
                 "--device", "cpu"]) != 0
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"


def test_a_model_with_one_foreground_class_has_no_class_to_choose(tmp_path, monuseg):
    from napari_medseg.models import CheckpointMeta, ModelConfig, build_model

    config = ModelConfig(architecture="unet", encoder="resnet18", encoder_weights=None, encoder_depth=3, num_classes=2)
    binary = tmp_path / "binary.safetensors"
    save_checkpoint(binary, build_model(config), CheckpointMeta(model=config, classes=["background", "nucleus"]))
    with pytest.raises(ThresholdTuningError, match="no class to choose"):
        tune_classes_checkpoint(binary, monuseg, tmp_path / "out.safetensors", all_images=True, device="cpu")


def test_a_training_runs_class_tuning_chooses_what_the_cli_does_on_the_same_images(six_patches, tmp_path):
    """``tune_classes`` in a training config tunes the run's result on its validation items of
    class sets; on the same images the CLI's function chooses the same weights and scores."""
    import shutil

    from napari_medseg.io.images import to_rgb_float
    from napari_medseg.training.data import LabelledImage
    from napari_medseg.training.threshold import retune_classes

    classes, samples = samples_of_groups(six_patches, None)
    items = [LabelledImage(s.stem, f"consep_six/{s.stem.rsplit('_', 1)[0]}", to_rgb_float(s.image), s.labels,
                           s.instances, "consep_six") for s in samples]
    binary = LabelledImage("b", "tnbc/x", items[0].image, items[0].labels, items[0].instances, "tnbc", binary=True)
    copy = tmp_path / "copy.safetensors"
    shutil.copy(resolve_model_path("default"), copy)
    in_training = retune_classes(copy, items + [binary], "cpu")  # the binary item names no class: left out
    by_cli = tune_classes_checkpoint("default", six_patches, tmp_path / "cli.safetensors", all_images=True,
                                     device="cpu")
    assert in_training["images"] == 6 and in_training["source_images"] == 2
    assert in_training["weights"] == by_cli["weights"]
    assert in_training["tuned"]["mpq"] == pytest.approx(by_cli["tuned"]["mpq"], abs=1e-9)
    assert read_meta(copy).metrics["class_choice_tuning"]["groups"] == ["consep_six/train_12", "consep_six/train_3"]
    assert retune_classes(copy, [binary], "cpu") is None  # nothing to tune on: nothing written


def test_a_run_with_tune_classes_writes_its_weights_record_into_its_result(tiny_checkpoint, small_consep, tmp_path):
    from napari_medseg.training import load_train_config, train

    config = tmp_path / "run.yaml"
    config.write_text("\n".join([
        f"init_checkpoint: {tiny_checkpoint}", f"data: {{dataset: [{small_consep}], crop_size: 64, val_fraction: 0.34}}",
        "epochs: 1", "batch_size: 4", "num_threads: 1", f"out_dir: {tmp_path / 'run'}", "save_resume: false",
        "tune_classes: true"]))
    result = train(load_train_config(config))
    meta = read_meta(result.checkpoint)
    tuning = meta.metrics["class_choice_tuning"]
    assert tuning["data"] == "the training run's validation images" and tuning["images"] >= 1
    assert meta.class_choice_weights in ([], tuning["weights"])


def test_predict_names_classes_with_the_models_weights_unless_told(consep, tmp_path, capsys):
    """``medseg predict``: the model's weights by default, ``--class-weights none`` the plain
    likeliest class, a list its own; the nucleus pixels are the same every time."""
    from napari_medseg.io.images import read_image

    image = consep / "images" / "train_19_005.png"  # epithelial and spindle nuclei
    runs = {"own": [], "none": ["--class-weights", "none"], "given": ["--class-weights", "1,1,1,8"]}
    for name, extra in runs.items():
        assert main(["predict", str(image), "--model", "default", "--out", str(tmp_path / name), "--backend", "torch",
                     "--precision", "fp32", "--device", "cpu", "--no-instances", *extra]) == 0
    own, plain, given = (read_image(tmp_path / name / "labels" / "train_19_005.tif") for name in runs)
    np.testing.assert_array_equal(own > 0, plain > 0)
    np.testing.assert_array_equal(given > 0, plain > 0)
    assert (own != plain).any() and (given == 4).sum() > (plain == 4).sum()  # spindle x8: more spindle
    segmenter = Segmenter.load("default", device="cpu", backend="torch", precision="fp32")
    probs = segmenter.probabilities(read_image(image))
    np.testing.assert_array_equal(own, classify(probs, segmenter.foreground_threshold, WEIGHTS))
    np.testing.assert_array_equal(plain, classify(probs, segmenter.foreground_threshold))
    capsys.readouterr()
    assert main(["predict", str(image), "--model", "default", "--out", str(tmp_path / "bad"), "--device", "cpu",
                 "--class-weights", "1,2"]) != 0
    assert "--class-weights: 2 numbers for 4 classes (other, inflammatory, epithelial, spindle)" in capsys.readouterr().err
    assert main(["predict", str(image), "--out", str(tmp_path / "bad2"), "--class-weights", "1,-2,1,1"]) != 0
    assert "expected numbers above 0, comma-separated (one per class), or 'none'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()  # refused before any file
