"""The foreground threshold: tuned on labelled images, stored beside the weights, applied by inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_medseg.inference import Segmenter, TileSettings, classify
from napari_medseg.models import read_meta
from napari_medseg.evaluation.threshold import GRID, samples_of_groups, tune_foreground_threshold

SETTINGS = TileSettings(128, 32, 4, skip_background=False)


def test_classify_is_argmax_without_a_threshold_and_thresholds_the_foreground_with_one():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=(40, 30)).transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(classify(probs), probs.argmax(0))
    for t in (0.2, 0.5, 0.8):
        out = classify(probs, t)
        for y in range(40):  # slow and obvious
            for x in range(30):
                p = probs[:, y, x]
                want = 1 + int(np.argmax(p[1:])) if 1 - p[0] > t else 0
                assert out[y, x] == want


@pytest.fixture(scope="module")
def tuned(segmenter, consep):
    classes, samples = samples_of_groups(consep, ["train_1", "train_2"])
    samples = samples[:6]
    return samples, tune_foreground_threshold(segmenter, samples, SETTINGS)


def test_tuned_threshold_gives_the_dice_it_reports_and_the_best_on_its_grid(segmenter, tuned):
    """Segmenting with the tuned threshold gives the pooled Dice the tuning reported (the
    histogram search agrees with thresholding the images), and no grid threshold does better."""
    samples, result = tuned
    assert result["threshold"] in set(np.round(GRID, 2).tolist()) and result["images"] == 6

    def pooled_dice(threshold):
        segmenter.foreground_threshold = threshold
        try:
            inter = total = 0
            for s in samples:
                pred, gt = segmenter.segment(s.image, SETTINGS) > 0, s.labels > 0
                inter += (pred & gt).sum()
                total += pred.sum() + gt.sum()
            return 2 * inter / total
        finally:
            segmenter.foreground_threshold = None

    assert pooled_dice(result["threshold"]) == pytest.approx(result["nucleus_dice"], abs=2e-3)
    assert pooled_dice(None) == pytest.approx(result["argmax_nucleus_dice"], abs=1e-9)
    assert result["nucleus_dice"] >= max(result["curve"]["nucleus_dice"]) - 1e-12
    assert result["nucleus_dice"] >= result["argmax_nucleus_dice"] - 2e-3  # argmax is near some grid point, never far above


def test_cli_writes_a_checkpoint_that_applies_its_threshold(tiny_checkpoint, small_consep, tmp_path):
    from napari_medseg.cli import main

    out = tmp_path / "tuned.safetensors"
    before = tiny_checkpoint.read_bytes()
    assert main(["tune-threshold", str(tiny_checkpoint), str(small_consep), "--all-images", "--out", str(out),
                 "--device", "cpu"]) == 0
    assert tiny_checkpoint.read_bytes() == before  # the input is untouched
    meta = read_meta(out)
    assert 0.1 <= meta.foreground_threshold <= 0.9
    assert meta.metrics["threshold_tuning"]["images"] == 6
    seg = Segmenter.load(out, device="cpu")
    assert seg.foreground_threshold == meta.foreground_threshold
    image = samples_of_groups(small_consep, ["train_1"])[1][0].image
    probs = seg.probabilities(image, SETTINGS)
    np.testing.assert_array_equal(seg.segment(image, SETTINGS), classify(probs, meta.foreground_threshold))
    # predict applies it, and 'argmax' overrides it
    assert main(["predict", str(small_consep / "images" / "train_1_005.png"), "--model", str(out), "--out",
                 str(tmp_path / "p"), "--device", "cpu", "--no-instances", "--foreground-threshold", "argmax"]) == 0
    assert main(["predict", str(small_consep / "images" / "train_1_005.png"), "--model", str(out), "--out",
                 str(tmp_path / "p"), "--device", "cpu", "--no-instances", "--foreground-threshold", "1.5"]) == 2


def test_tuning_without_validation_images_says_what_to_pass(tiny_checkpoint, small_consep, tmp_path, capsys):
    from napari_medseg.cli import main

    assert main(["tune-threshold", str(tiny_checkpoint), str(small_consep), "--out", str(tmp_path / "t.safetensors"),
                 "--device", "cpu"]) == 2
    assert "pass --groups or --all-images" in capsys.readouterr().err
    assert not (tmp_path / "t.safetensors").exists()


def _thresholded_start(tiny_checkpoint, path, threshold=0.43):
    """The tiny model as a checkpoint with a tuned foreground threshold."""
    from napari_medseg.models import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(tiny_checkpoint)
    meta.foreground_threshold = threshold
    return save_checkpoint(path, model, meta)


def _train_config(path, start, data, out_dir, *extra: str):
    path.write_text("\n".join([
        f"init_checkpoint: {start}", f"data: {{dataset: [{data}], crop_size: 64, val_fraction: 0.34}}",
        "epochs: 1", "batch_size: 4", "num_threads: 1", f"out_dir: {out_dir}", "save_resume: false", *extra]))
    return path


def test_fine_tuning_with_medseg_train_retunes_the_threshold_on_its_validation_images(tiny_checkpoint, small_consep,
                                                                                      tmp_path):
    """`medseg train` from a checkpoint with a tuned threshold: the new checkpoint carries the
    threshold that maximises nucleus Dice on the run's own validation images."""
    import subprocess
    import sys

    start = _thresholded_start(tiny_checkpoint, tmp_path / "start.safetensors")
    config = _train_config(tmp_path / "fine.yaml", start, small_consep, tmp_path / "run")
    medseg = Path(sys.executable).with_name("medseg")
    done = subprocess.run([str(medseg), "train", str(config)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    checkpoint = tmp_path / "run" / "best.safetensors"
    meta = read_meta(checkpoint)
    tuning = meta.metrics["threshold_tuning"]
    assert meta.foreground_threshold is not None and meta.foreground_threshold == tuning["threshold"]
    assert tuning["groups"] == meta.data["val_groups"] and tuning["images"] == meta.data["val_images"] == 2
    # the same tuning, done independently on the validation images read from the folder
    segmenter = Segmenter.load(checkpoint, device="cpu")
    segmenter.foreground_threshold = None
    _, samples = samples_of_groups(small_consep, meta.data["val_groups"])
    again = tune_foreground_threshold(segmenter, samples)
    assert again["threshold"] == tuning["threshold"]
    assert again["nucleus_dice"] == pytest.approx(tuning["nucleus_dice"], abs=1e-6)


def test_fine_tuning_without_retuning_keeps_the_start_threshold(tiny_checkpoint, small_consep, tmp_path):
    from napari_medseg.training import load_train_config, train

    start = _thresholded_start(tiny_checkpoint, tmp_path / "start.safetensors", 0.37)
    config = _train_config(tmp_path / "keep.yaml", start, small_consep, tmp_path / "run", "tune_threshold: false")
    result = train(load_train_config(config))
    meta = read_meta(result.checkpoint)
    assert meta.foreground_threshold == pytest.approx(0.37) and "threshold_tuning" not in meta.metrics
    # a run from scratch stays argmax unless asked (tune_threshold: auto)
    scratch = train(load_train_config(config, ["init_checkpoint=null", f"out_dir={tmp_path / 'scratch'}",
                                               "model.architecture=unet", "model.encoder=resnet18",
                                               "model.encoder_depth=3", "tune_threshold=auto"]))
    assert read_meta(scratch.checkpoint).foreground_threshold is None
