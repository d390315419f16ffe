"""The training run: headless, reporting typed updates through a callback, stoppable.

``train(cfg, on_update=..., should_stop=...)`` runs anywhere (CLI, a worker thread
behind the napari widget, tests, ``torchrun`` for several GPUs or machines). Each epoch it
validates with the core metrics, keeps the best checkpoint (written atomically in the
project format) and writes ``resume.safetensors``, from which ``resume:`` continues the run
exactly (same weights as an uninterrupted run, on the same machine and thread count).

This module puts a run together; its parts: setup.py (runtime, start checkpoint, data,
loaders), network.py (model, DDP, precision), optimisation.py, progress.py (history and
early stopping), checkpoints.py (the files written), loop.py (the epochs), validation.py.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable

import torch

from ..devices import resolve_device
from .checkpoints import CheckpointWriter, check_output_dir, estimated_bytes, removed_if_failed_empty
from .config import AVERAGED_NAME, BEST_NAME, TrainConfig, average_partner
from .data import LabelledImage, normalization_stats
from .distributed import DistContext, init_distributed
from .ema import WeightAverage
from .events import BatchDone, EpochDone, TrainingDone, TrainingError
from .loop import USER_STOP, Run, run_epochs, score_start
from .losses import MixedLabels, WithDistanceHead, build_loss
from .network import Precision, build_training_model, load_growing_head, place_model
from .optimisation import build_optimisation
from .progress import Progress, needs_start_scores
from .resume import check_same_data, check_same_processes, read_resume_for, restore
from .setup import (TrainingData, build_loaders, configure_runtime, describe_data, describe_split,
                    load_start_checkpoint, oversized_crop_note, prepare_data, processes_note, start_held_out_note)
from .threshold import retune_classes, retune_threshold
from .validation import validate

__all__ = ["BatchDone", "EpochDone", "TrainingDone", "TrainingError", "load_growing_head", "train", "validate"]


def train(cfg: TrainConfig, on_update: Callable[[object], None] | None = None,
          should_stop: Callable[[], bool] | None = None,
          items: tuple[list[LabelledImage], list[str]] | None = None, deadline: float | None = None) -> TrainingDone:
    """Train per ``cfg``; ``items`` = (labelled images, class names) bypasses the dataset folders.
    ``deadline`` (on ``loop.clock``, seconds): start no epoch that would end after it, judged by
    the longest epoch so far (the first is not judged); the run then ends as any early stop does
    (its best checkpoint tuned, averaged as the config says) and its resume file continues it.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this runs DistributedDataParallel; only rank 0
    reports updates and writes files.
    """
    ctx, device_name = init_distributed(cfg.device)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    threads_before = torch.get_num_threads()
    # a run that fails before writing anything leaves no empty out_dir (rank 0 makes it)
    kept_tidy = removed_if_failed_empty(Path(cfg.out_dir)) if ctx.is_main else contextlib.nullcontext()
    try:
        with kept_tidy:
            return _train(copy.deepcopy(cfg), on_update, should_stop, items, ctx, device_name, deadline)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        torch.set_num_threads(threads_before)


def _train(cfg: TrainConfig, on_update, should_stop, items, ctx: DistContext, device_name: str,
           deadline: float | None = None) -> TrainingDone:
    cfg.check()
    device = resolve_device(device_name)
    cfg = cfg.for_device(device.type)  # on a GPU: its on_cuda settings
    given = cfg.to_dict()  # before the start checkpoint and the data change it
    resumed = read_resume_for(cfg.resume, given) if cfg.resume else None
    if resumed is not None:
        check_same_processes(resumed[1], ctx.world_size, cfg.resume)
        cfg.out_dir = _resumed_folder(cfg.resume, resumed[1])
    configure_runtime(cfg)
    out_dir = Path(cfg.out_dir)
    if ctx.is_main:
        check_output_dir(out_dir)
    start = load_start_checkpoint(cfg)
    data = prepare_data(cfg, items, start)
    model = build_training_model(cfg, None if start is None else start.weights)
    if cfg.average_with_start and start is not None:
        _check_averageable(model, cfg, start.weights)
    partner_copy = _partner_copy(cfg, resumed) if ctx.is_main else None
    if ctx.is_main:
        check_output_dir(out_dir, estimated_bytes(model, cfg.save_half, cfg.save_resume, bool(cfg.ema_decay)))
    precision = Precision.for_device(cfg, device)
    model, net = place_model(model, cfg, ctx, device, precision)
    ema = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    loss_fn = _loss_function(cfg, data, device)
    mean, std = normalization_stats(cfg.normalization)
    loaders = build_loaders(cfg, data, ctx, device, mean, std)
    optim = build_optimisation(cfg, model, len(loaders.train), precision.grad_scaler())
    writer = CheckpointWriter(cfg, given, ctx, device, data.classes, {"mean": mean, "std": std},
                              describe_data(cfg, items is not None, data, loaders.crops_per_epoch),
                              None if start is None else start.foreground_threshold,
                              {} if start is None else start.instance_settings,
                              start.class_choice_weights if start is not None and start.classes == data.classes else [])
    progress = Progress.start(cfg, has_validation=bool(loaders.val_sets))
    if resumed is not None:
        tensors, info = resumed
        check_same_data(info, writer.data)
        restore(tensors, info, model, optim.optimizer, optim.scheduler, loaders.generator, optim.scaler,
                cfg.model, ema)
        progress.restore(info)
    emit = (on_update or _ignore) if ctx.is_main else _ignore  # only rank 0 reports
    run = Run(cfg, ctx, device, model, net, loss_fn, len(data.classes), precision, loaders, optim, writer,
              progress, emit, should_stop or (lambda: False), ema, deadline)
    split = describe_split(data, cfg.data.group_pattern)
    # said with the split, before the first epoch
    notes = [] if start is None else [f"{note[0].upper()}{note[1:]}." for note in start.notes]
    split.note = " ".join([split.note, *notes, start_held_out_note(data, start), data.resampled,
                           oversized_crop_note(cfg.data.crop_size, data.train_items),
                           processes_note(ctx.world_size, cfg.batch_size)]).strip()
    emit(split)
    score_start(run)
    run_epochs(run)
    ctx.barrier()
    if ctx.is_main and _tunes_threshold(cfg, start) and data.val_items and progress.best_epoch > 0 \
            and progress.reason != USER_STOP:
        retune_threshold(writer.best_path, data.val_items, str(device))
    resume_path = writer.resume_path
    result = writer.best_path if progress.best_epoch > 0 else None
    if ctx.is_main and result is not None and cfg.average_with_start and progress.reason != USER_STOP:
        result = _average_with_start(cfg, result, partner_copy)
    if ctx.is_main and result is not None and cfg.tune_classes and progress.reason != USER_STOP:
        retune_classes(result, data.val_items, str(device))
    return TrainingDone(result, progress.best_epoch, progress.history,
                        bool(progress.reason), progress.reason, resume_path if resume_path.is_file() else None,
                        progress.best_record, cfg.seed)


def _resumed_folder(resume: str, info: dict) -> str:
    """The folder a resumed run goes on in: its resume file's, where its best checkpoint so far is
    (whatever ``out_dir`` says: elsewhere, a best epoch before the resume would have no file)."""
    from ..models import read_meta

    folder = Path(resume).resolve().parent
    best_epoch = info.get("best_epoch", 0)
    if best_epoch > 0:
        best = folder / BEST_NAME
        if not best.is_file():
            raise TrainingError(f"{best} is missing: the run being resumed keeps its best checkpoint (epoch "
                                f"{best_epoch}) beside its resume file; put it back there to resume.")
        try:
            recorded = read_meta(best).training.get("best_epoch")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded != best_epoch:
            raise TrainingError(f"{best} is not the best checkpoint of the run being resumed (its best epoch is "
                                f"{best_epoch}, the file's {recorded}); put that run's best.safetensors back there.")
    return str(folder)


def _check_averageable(model: torch.nn.Module, cfg: TrainConfig, start_weights: dict) -> None:
    """Refuse before training what could not be averaged after it (e.g. a distance head added)."""
    partner = average_partner(cfg)
    if partner != cfg.init_checkpoint:
        if not Path(partner).is_file():
            raise TrainingError(f"average_with: '{partner}' does not exist (if it is an earlier stage's result, "
                                "run that stage first).")
        from ..models.checkpoint import load_checkpoint

        start_weights = load_checkpoint(partner)[0].state_dict()
    own = model.state_dict()
    if own.keys() != start_weights.keys() or any(own[k].shape != start_weights[k].shape for k in own):
        what = "its start" if partner == cfg.init_checkpoint else "average_with"
        raise TrainingError(f"average_with_start: this run's network differs from {what} ({partner}), "
                            "for instance by a head it adds, so the two cannot be averaged.")


def _partner_copy(cfg: TrainConfig, resumed) -> bytes | None:
    """The file the run's best is averaged with, read now where the run replaces it: its own
    out_dir's best checkpoint (a model fine-tuned into its own folder), which the first epoch's
    best overwrites; None where it stays as it is."""
    if not cfg.average_with_start:
        return None
    partner, best = Path(average_partner(cfg)), Path(cfg.out_dir) / BEST_NAME
    if not (partner.is_file() and best.is_file() and partner.samefile(best)):
        return None
    if resumed is not None:
        raise TrainingError(f"average_with_start: {partner}, the checkpoint to average with, is this run's own best "
                            "checkpoint by now (the run was started in its folder), so the resumed run cannot average "
                            "with it. Copy the start checkpoint elsewhere and average with `medseg average`.")
    return partner.read_bytes()


def _average_with_start(cfg: TrainConfig, best: Path, partner_copy: bytes | None = None) -> Path:
    """``best`` averaged with the start checkpoint, or ``average_with`` (``average_with_start`` on
    ``best``), written beside it as ``AVERAGED_NAME``; a rerun's earlier file is replaced only once
    the new one is whole. ``partner_copy``: that checkpoint's bytes as they were before the run
    replaced its file (``_partner_copy``)."""
    from ..io.images import atomic_write
    from ..io.outputs import temp_path
    from .average import average_checkpoints

    final = best.parent / AVERAGED_NAME
    partner, names = average_partner(cfg), None
    if partner_copy is not None:
        names = (f"{partner} (as it was before this run replaced it)", str(best))
        partner = temp_path(best.parent / "start.safetensors")
        partner.write_bytes(partner_copy)
    try:
        atomic_write(final, lambda tmp: average_checkpoints(partner, best, cfg.average_with_start, tmp,
                                                            recorded_as=names))
    finally:
        if partner_copy is not None:
            Path(partner).unlink(missing_ok=True)
    return final


def _tunes_threshold(cfg: TrainConfig, start) -> bool:
    """``tune_threshold``: auto tunes a model fine-tuned from one whose threshold was tuned, except
    where the epoch was kept by its least gain over the start: that balance holds at the threshold
    it was measured at (a re-tuning for pooled Dice had cost TNBC's bPQ 0.007 on the default's run)."""
    if cfg.tune_threshold == "auto":
        return start is not None and start.foreground_threshold is not None and not needs_start_scores(cfg.monitor)
    return bool(cfg.tune_threshold)


def _ignore(update) -> None:
    pass


def _loss_function(cfg: TrainConfig, data: TrainingData, device: torch.device):
    """The loss of ``cfg`` with the data's class weights (tests replace ``build_loss`` in this module)."""
    w = data.class_weights
    weights = None if w is None else torch.tensor(w, dtype=torch.float32, device=device)
    loss_fn = build_loss(cfg.loss, weights, num_classes=len(data.classes))
    if data.has_binary_sets:  # their pixels train the summed nucleus probability only
        loss_fn = MixedLabels(loss_fn, build_loss(cfg.loss, None, num_classes=2))
    if cfg.model.distance_head:
        loss_fn = WithDistanceHead(loss_fn, len(data.classes), cfg.distance_loss_weight, cfg.distance_gradient_weight)
    return loss_fn
