"""Validation scores a run as the product segments with its checkpoint (the start model's
foreground threshold), and ``monitor: val_least_gain_over_start`` keeps the epoch that gives up
least on any set against the model the run started from."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_medseg.inference.class_decision import classify
from napari_medseg.training import StartScored, TrainConfig, TrainConfigError, train
from napari_medseg.training.progress import least_gain
from napari_medseg.training.validation import _decide

from test_resume_exact import stop_in_epoch_2, tiny_config


@pytest.mark.parametrize("weights", [None, [4.0, 1.5, 1.0, 0.5]])
@pytest.mark.parametrize("threshold", [None, 0.2, 0.5, 0.8])
def test_validation_decides_each_pixel_as_the_product_does(threshold, weights):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 16, 16) * 3
    decided = _decide(logits, threshold, weights).numpy()
    for b in range(2):
        probs = torch.softmax(logits[b], 0).numpy()
        np.testing.assert_array_equal(decided[b], classify(probs, threshold, weights))
    if threshold is not None or weights:  # each changes the decision here (not a no-op)
        assert (decided != logits.argmax(1).numpy()).any()


def test_validation_breaks_ties_as_the_product_does():
    """Equal scores go to the first class, as numpy's argmax in ``classify`` gives them."""
    logits = torch.zeros(1, 5, 4, 4)
    logits[0, 0, :2] = -1.0  # top half: the four nucleus classes tie above the background
    for threshold in (None, 0.5):
        decided = _decide(logits, threshold).numpy()[0]
        np.testing.assert_array_equal(decided, classify(torch.softmax(logits[0], 0).numpy(), threshold))
        assert (decided[:2] == 1).all()
    assert (_decide(logits, None).numpy()[0, 2:] == 0).all()  # all five tie: the background


def test_least_gain_is_the_smallest_gain_of_any_set_in_dice_or_bpq():
    start = {"sets": {"a": {"nucleus_dice": 0.80, "bpq": 0.40}, "b": {"nucleus_dice": 0.70, "bpq": 0.50},
                      "c": {"nucleus_dice": 0.60, "bpq": math.nan}}}
    now = {"sets": {"a": {"nucleus_dice": 0.82, "bpq": 0.43}, "b": {"nucleus_dice": 0.705, "bpq": 0.49},
                    "c": {"nucleus_dice": 0.62, "bpq": 0.3}}}
    assert least_gain(now, start) == pytest.approx(-0.01)  # b's bPQ; c's undefined start bPQ not compared
    now["sets"]["b"]["bpq"] = 0.52
    assert least_gain(now, start) == pytest.approx(0.005)  # then b's Dice
    # a run with one validation set: its own figures
    assert least_gain({"nucleus_dice": 0.9, "bpq": 0.3}, {"nucleus_dice": 0.8, "bpq": 0.35}) == pytest.approx(-0.05)
    assert math.isnan(least_gain({"nucleus_dice": math.nan}, {"nucleus_dice": 0.8}))


def test_the_monitor_needs_a_start_model():
    with pytest.raises(TrainConfigError, match="init_checkpoint"):
        TrainConfig.from_dict({"monitor": "val_least_gain_over_start", "data": {"dataset": ["x"]}})


def _thresholded_copy(tiny_checkpoint, out):
    from napari_medseg.models import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(tiny_checkpoint)
    meta.foreground_threshold = 0.3
    return save_checkpoint(out, model, meta)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_run_keeps_the_epoch_of_least_loss_against_its_start_and_a_resume_compares_with_the_same_start(
        small_consep, tiny_checkpoint, tmp_path):
    from napari_medseg.models import read_meta

    start = _thresholded_copy(tiny_checkpoint, tmp_path / "start.safetensors")
    extra = ("epochs=3", "data.val_fraction=0.34", "data.crops_per_image=2", f"init_checkpoint={start}",
             "monitor=val_least_gain_over_start")  # tune_threshold: auto
    said = []
    whole = train(tiny_config(small_consep, tmp_path / "whole", *extra), on_update=said.append)
    # said before the first batch: that the start is being scored, then its figures
    scored = [i for i, u in enumerate(said) if isinstance(u, StartScored)]
    first_batch = next(i for i, u in enumerate(said) if type(u).__name__ == "BatchDone")
    assert len(scored) == 2 and scored[1] < first_batch and said[scored[0]].scores is None
    assert said[scored[0]].note.startswith("Scoring the start model on the validation images at its foreground "
                                           "threshold 0.3")
    note = said[scored[1]].note
    assert "The start model on the validation images at its foreground threshold 0.3" in note
    meta = read_meta(whole.checkpoint)
    start_scores = meta.training["start_scores"]
    assert said[scored[1]].scores == start_scores
    assert f"nucleus Dice {start_scores['nucleus_dice']:.4f}" in note
    # every epoch's figure is its least gain over the start, and the best epoch has the largest
    gains = [r["least_gain_over_start"] for r in whole.history]
    for record, gain in zip(whole.history, gains):
        assert gain == pytest.approx(min(record["nucleus_dice"] - start_scores["nucleus_dice"],
                                         record["bpq"] - start_scores["bpq"]))
    assert whole.best_epoch == 1 + int(np.argmax(gains))
    # auto keeps the threshold the epochs were compared at (a fine-tune's threshold is otherwise re-tuned)
    assert meta.foreground_threshold == 0.3 and "threshold_tuning" not in meta.metrics

    # stopped in epoch 2 and resumed: the start's scores come from the resume file, not from the
    # weights the resumed run starts with, so every epoch's figure is the uninterrupted run's
    part = train(tiny_config(small_consep, tmp_path / "part", *extra), should_stop=stop_in_epoch_2())
    assert len(part.history) == 1
    again = []
    resumed = train(tiny_config(small_consep, tmp_path / "part", *extra, f"resume={part.resume}"),
                    on_update=again.append)
    # not scored again (the weights are no longer the start's): the recorded figures are said
    assert [u.scores for u in again if isinstance(u, StartScored)] == [start_scores]
    assert [r["least_gain_over_start"] for r in resumed.history] == gains
    assert read_meta(resumed.checkpoint).training["start_scores"] == start_scores


def test_start_scores_reach_the_viewer_from_the_training_process():
    """The Train widget trains in a child process that sends its updates as JSON lines."""
    import json
    from dataclasses import asdict

    from napari_medseg.training.process import _plain, update_from_message

    sent = StartScored("The start model ...", {"nucleus_dice": np.float32(0.8), "bpq": math.nan,
                                               "sets": {"a": {"bpq": 0.4}}})
    line = json.dumps({"update": "StartScored", "fields": _plain(asdict(sent))})
    message = json.loads(line)
    got = update_from_message(message["update"], message["fields"])
    assert isinstance(got, StartScored) and got.note == sent.note
    assert got.scores["nucleus_dice"] == pytest.approx(0.8) and math.isnan(got.scores["bpq"])
    assert got.scores["sets"] == {"a": {"bpq": 0.4}}


@pytest.mark.usefixtures("one_torch_thread")
def test_compare_with_scores_another_model_as_its_checkpoint_segments(small_consep, tiny_checkpoint, tmp_path):
    """``compare_with``: a chain of fine-tunes judged against the model it would replace (the
    shipped one), not each stage's own start; scored at that model's own threshold."""
    import torch

    from napari_medseg.models import CheckpointMeta, ModelConfig, build_model, read_meta, save_checkpoint
    from napari_medseg.training import TrainingError

    reference = _thresholded_copy(tiny_checkpoint, tmp_path / "reference.safetensors")  # threshold 0.3
    common = ("epochs=1", "data.val_fraction=0.34", "data.crops_per_image=2", "monitor=val_least_gain_over_start")
    said = []
    run = train(tiny_config(small_consep, tmp_path / "run", *common, f"init_checkpoint={tiny_checkpoint}",
                            f"compare_with={reference}"), on_update=said.append)
    notes = [u.note for u in said if isinstance(u, StartScored)]
    assert notes[0].startswith(f"Scoring the model compared with ({reference}) on the validation images at its "
                               "foreground threshold 0.3")
    assert notes[1].startswith(f"The model compared with ({reference}) on the validation images")
    # the reference's figures are those a run starting from it gives its own start
    from_reference = train(tiny_config(small_consep, tmp_path / "from_reference", *common,
                                       f"init_checkpoint={reference}"))
    compared = read_meta(run.checkpoint).training["start_scores"]
    assert compared == read_meta(from_reference.checkpoint).training["start_scores"]
    assert run.history[0]["least_gain_over_start"] == pytest.approx(least_gain(run.history[0], compared))

    with pytest.raises(TrainConfigError, match="compare_with names the model monitor"):
        tiny_config(small_consep, tmp_path / "x", f"compare_with={reference}")
    torch.manual_seed(0)
    cfg = ModelConfig("unet", "resnet18", num_classes=3, encoder_depth=3)
    other = save_checkpoint(tmp_path / "other.safetensors", build_model(cfg).eval(),
                            CheckpointMeta(model=cfg, classes=["background", "a", "b"]))
    with pytest.raises(TrainingError, match="compare_with: .* names the classes"):
        train(tiny_config(small_consep, tmp_path / "refused", *common, f"init_checkpoint={tiny_checkpoint}",
                          f"compare_with={other}"))
