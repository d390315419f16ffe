"""The epochs: train on one epoch's crops, validate, keep the best checkpoint, write the resume
file, report; until the last epoch, an early-stopping rule, the user or the time limit ends the run."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import MedsegError
from ..nuclei.watershed import InstanceSettings
from .checkpoints import CheckpointWriter
from .config import TrainConfig
from .distributed import DistContext
from .ema import WeightAverage
from .events import BatchDone, EpochDone, StartScored, TrainingError
from .network import Precision
from .optimisation import Optimisation
from .progress import LEAST_GAIN, Progress, least_gain, needs_start_scores
from .setup import Loaders, seed_epoch
from .validation import ValidationStopped, validate_sets

USER_STOP = "stopped by user"
# the reason a run ends at its deadline (``train(deadline=...)``, ``medseg train --time-limit``): before an
# epoch that would not end in time, so every epoch it trained is whole and its resume file continues it
TIME_LIMIT = "out of time"
clock = time.time  # what a deadline is measured on (a test moves it by hand)


@dataclass
class Run:
    """Everything the epochs use, built once before the first."""

    cfg: TrainConfig
    ctx: DistContext
    device: torch.device
    model: torch.nn.Module  # the bare model: validated and saved
    net: torch.nn.Module  # what trains: the model, or its DDP wrapper
    loss_fn: Callable
    num_classes: int
    precision: Precision
    loaders: Loaders
    optim: Optimisation
    writer: CheckpointWriter
    progress: Progress
    emit: Callable[[object], None]
    should_stop: Callable[[], bool]
    ema: WeightAverage | None = None  # ema_decay: the weights' moving average, validated and saved
    deadline: float | None = None  # on ``clock``: no epoch starts that would end after it

    @property
    def kept_model(self) -> torch.nn.Module:
        """The network validation scores and the best checkpoint holds: the average, where kept."""
        return self.model if self.ema is None else self.ema.model


def score_start(run: Run) -> None:
    """Where the monitor compares each epoch with the start (``val_least_gain_over_start``):
    validate the start model once before the first epoch and say so before and after
    (``StartScored``); a resumed run keeps the scores its run was started with."""
    progress = run.progress
    if not needs_start_scores(progress.monitor) or not run.loaders.val_sets:
        return
    reference = run.cfg.compare_with
    what = "the start model" if not reference else f"the model compared with ({reference})"
    model = meta = None
    if reference and progress.start_scores is None:
        model, meta = _reference_model(run, reference)
    threshold = run.writer.foreground_threshold if not reference else \
        (meta.foreground_threshold if meta is not None else None)
    at = "" if threshold is None else f" at its foreground threshold {threshold:g}"
    if progress.start_scores is None:
        if progress.history:
            raise TrainingError("This resume file does not hold the start model's validation scores that monitor "
                                f"'{progress.monitor}' compares with; resume with the monitor it was run with.")
        run.emit(StartScored(f"Scoring {what} on the validation images{at}, to compare every epoch with..."))
        try:
            progress.start_scores = (_validate(run) if model is None else _validate_reference(run, model, meta))[1]
        except ValidationStopped:  # nothing trained yet: the run ends with no checkpoint
            progress.reason = USER_STOP
            return
    sets = progress.start_scores.get("sets") or {"": progress.start_scores}
    said = "; ".join(f"{name + ' ' if name else ''}nucleus Dice {m.get('nucleus_dice', math.nan):.4f}, "
                     f"bPQ {m.get('bpq', math.nan):.4f}" for name, m in sets.items())
    run.emit(StartScored(f"{what[0].upper()}{what[1:]} on the validation images{at} (every epoch is compared with "
                         f"these; the one that loses least on any of them is kept): {said}.", progress.start_scores))


def _reference_model(run: Run, path: str):
    """``compare_with``'s network, refused where it could not be scored on this run's validation
    images as its own checkpoint segments (other classes, another input normalisation)."""
    from ..models.checkpoint import load_checkpoint

    if not Path(path).is_file():
        raise TrainingError(f"compare_with: '{path}' does not exist.")
    try:
        model, meta = load_checkpoint(path, run.device)
    except (OSError, ValueError, MedsegError) as exc:
        raise TrainingError(f"compare_with: cannot read '{path}': {exc}") from None
    if meta.classes != run.writer.classes:
        raise TrainingError(f"compare_with: '{path}' names the classes {meta.classes}, this run's data "
                            f"{run.writer.classes}: their scores would not compare.")
    ours = run.writer.normalization
    if [list(map(float, meta.normalization.get(k, []))) for k in ("mean", "std")] != \
            [list(map(float, ours[k])) for k in ("mean", "std")]:
        raise TrainingError(f"compare_with: '{path}' takes its input normalised otherwise ({meta.normalization}) "
                            f"than this run ({ours}); score it with benchmarks/accuracy.py instead.")
    return model.eval(), meta


def _validate_reference(run: Run, model: torch.nn.Module, meta) -> tuple[float, dict]:
    """``compare_with``'s scores, as its own checkpoint segments."""
    return validate_sets(model, run.loaders.val_sets, run.loss_fn, run.num_classes, run.device, run.ctx,
                         run.precision.autocast, run.precision.channels_last,
                         InstanceSettings.recorded(meta.instance_settings), meta.foreground_threshold,
                         meta.class_choice_weights, run.should_stop)


def _validate(run: Run) -> tuple[float, dict]:
    """The kept model's validation loss and metrics, scored as the product segments with the
    checkpoint (its foreground threshold, class weights and nucleus settings)."""
    return validate_sets(run.kept_model, run.loaders.val_sets, run.loss_fn, run.num_classes, run.device,
                         run.ctx, run.precision.autocast, run.precision.channels_last,
                         InstanceSettings.recorded(run.writer.instance_settings), run.writer.foreground_threshold,
                         run.writer.class_choice_weights, run.should_stop)


def run_epochs(run: Run) -> None:
    """Train from ``run.progress.next_epoch`` on; ``run.progress.reason`` says why it ended early
    (a resumed run that an early-stopping rule had ended trains no further)."""
    if run.progress.reason:
        return
    longest = 0.0  # s: the longest epoch of this process so far, validation included
    for epoch in range(run.progress.next_epoch, run.cfg.epochs + 1):
        if run.deadline is not None and not _fits(run, longest):
            run.progress.reason = (f"{TIME_LIMIT}: epoch {epoch} (about {longest:.0f} s, as long as the longest "
                                   "so far) would have ended after the time limit" if longest else
                                   f"{TIME_LIMIT}: the time limit had passed before epoch {epoch} began")
            return
        started, began = time.time(), clock()
        trained = train_one_epoch(run, epoch)
        if trained is None:
            run.progress.reason = USER_STOP
            return
        finish_epoch(run, epoch, *trained, started)
        longest = max(longest, clock() - began)
        if run.progress.reason:
            return


def _fits(run: Run, epoch_seconds: float) -> bool:
    """Whether an epoch as long as ``epoch_seconds`` ends before the deadline, on every rank
    (they must agree, or one would wait for the others' gradients for ever)."""
    return run.ctx.all_min_flag(clock() + epoch_seconds <= run.deadline, run.device)


def train_one_epoch(run: Run, epoch: int) -> tuple[float, float] | None:
    """One pass over the epoch's crops: (mean loss, averaged over ranks; the last step's learning
    rate), or None when the user stopped it."""
    ctx, device = run.ctx, run.device
    seed_epoch(run.cfg.seed, epoch, ctx.rank)
    run.net.train()
    if hasattr(run.loaders.sampler, "set_epoch"):  # the crops and their augmentation seeds of this epoch
        run.loaders.sampler.set_epoch(epoch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    steps, steps_done, lr = len(run.loaders.train), 0, run.optim.lr
    for step, (image, labels, *extra) in enumerate(run.loaders.train, 1):
        if run.should_stop():
            return None
        loss = _batch_loss(run, image, labels, extra)
        value = float(loss.detach())
        if not ctx.all_min_flag(math.isfinite(value), device):
            raise TrainingError(
                f"The loss became {value} at epoch {epoch}, step {step}. Lower the learning rate "
                f"(now {run.cfg.lr}) or check the labels; " + run.writer.kept_best(run.progress.best_epoch))
        lr = run.optim.step(loss)
        if run.ema is not None:
            run.ema.update(run.model)
        loss_sum += value
        steps_done += 1
        run.emit(BatchDone(epoch, step, steps, value, run.cfg.epochs))
    train_loss = float(loss_sum) / steps_done if steps_done else float("nan")
    if ctx.enabled:
        t = torch.tensor([train_loss], dtype=torch.float64, device=device)
        train_loss = float(ctx.all_sum(t)) / ctx.world_size
    return train_loss, lr


def _batch_loss(run: Run, image: torch.Tensor, labels: torch.Tensor, extra: list[torch.Tensor]) -> torch.Tensor:
    device = run.device
    image, labels = image.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    extra = [t.to(device, non_blocking=True) for t in extra]  # the distance target, with a distance head
    image = run.precision.prepare(image)
    with run.precision.autocast():
        logits = run.net(image)
    return run.loss_fn(logits.float(), labels, *extra)


def finish_epoch(run: Run, epoch: int, train_loss: float, lr: float, started: float) -> None:
    """Validate, record, step a plateau schedule, write the best checkpoint and the resume file, report."""
    run.ctx.sync_buffers(run.model)
    if run.ema is not None:
        run.ctx.sync_buffers(run.ema.model)
    if run.loaders.val_sets:
        try:
            val_loss, metrics = _validate(run)
        except ValidationStopped:  # an epoch not scored is not kept: the best and resume files stay the last scored one's
            run.progress.reason = USER_STOP
            return
        if run.progress.start_scores is not None:
            metrics[LEAST_GAIN] = least_gain(metrics, run.progress.start_scores)
    else:
        val_loss, metrics = train_loss, {}
    progress = run.progress
    if not math.isfinite(val_loss):
        raise TrainingError(
            f"The validation loss became {val_loss} at epoch {epoch}. Lower the learning rate (now {run.cfg.lr}) "
            "or check the data; " + run.writer.kept_best(progress.best_epoch))
    record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr, **metrics}
    improved = progress.add_epoch(record, metrics)
    run.optim.after_validation(val_loss)
    if improved:
        run.writer.save_best(run.kept_model, epoch, record, progress.history, progress.start_scores)
    run.writer.save_resume(epoch, progress, run.model, run.optim.optimizer, run.optim.scheduler,
                           run.loaders.generator, run.optim.scaler, run.ema)
    run.emit(EpochDone(epoch, run.cfg.epochs, train_loss, val_loss, metrics, improved, time.time() - started, lr,
                       progress.reason))
