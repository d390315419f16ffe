"""The training loop: headless, reporting typed updates through a callback, stoppable.

``train(cfg, on_update=..., should_stop=...)`` runs anywhere (CLI, a worker thread
behind the napari widget, tests, ``torchrun`` for several GPUs or machines). Each epoch it
validates with the core metrics, keeps the best checkpoint (written atomically in the
project format) and writes ``resume.safetensors``, from which ``resume:`` continues the run
exactly (same weights as an uninterrupted run, on the same machine and thread count).
"""

from __future__ import annotations

import copy
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from ..errors import MedsegError
from ..devices import resolve_device
from ..evaluation.instance import match_instances
from ..nuclei.watershed import semantic_to_instances
from ..evaluation.semantic import semantic_metrics
from ..models.checkpoint import CheckpointMeta, save_checkpoint
from ..models.registry import build_model
from .config import TrainConfig, TrainConfigError
from .data import (LabelledImage, PatchDataset, check_items, item_instances, load_dataset_folders,
                   normalization_stats, oversample_indices, pixel_frequencies, rare_classes, split_by_group,
                   to_binary)
from .distributed import DistContext, init_distributed, parameter_hash, shutdown_distributed
from .early_stopping import PatienceStop, QuadraticStop
from .losses import IGNORE_INDEX, WithDistanceHead, build_loss, class_weights_from_frequencies


class TrainingError(MedsegError, RuntimeError):
    """Training cannot start or cannot go on (NaN loss, unusable data, unwritable output)."""


@dataclass
class BatchDone:
    epoch: int
    step: int
    steps: int
    loss: float


@dataclass
class EpochDone:
    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    metrics: dict
    best: bool
    seconds: float
    lr: float = float("nan")
    stop_reason: str = ""  # set on the epoch after which early stopping ends the run


@dataclass
class TrainingDone:
    checkpoint: Path | None
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    reason: str = ""
    resume: Path | None = None  # resume.safetensors of the last finished epoch
    best_metrics: dict = field(default_factory=dict)  # validation record of the best epoch
    seed: int = 0


# Settings that may differ between a run and its resumption (they do not change the result).
RESUME_FREE = ("resume", "save_resume", "out_dir", "device", "num_threads", "repeats")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_output_dir(out_dir: Path, need_bytes: int = 0) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"0" * 1024)
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"Cannot write checkpoints to '{out_dir}': {exc.strerror or exc}.") from exc
    if need_bytes:
        free = shutil.disk_usage(out_dir).free
        if free < need_bytes:
            raise TrainingError(
                f"Not enough free space in '{out_dir}': checkpoints need about {need_bytes / 1e6:.0f} MB, "
                f"{free / 1e6:.0f} MB are free."
            )


def _monitor_value(monitor: str, val_loss: float, metrics: dict) -> tuple[float, bool]:
    """(value, higher_is_better)."""
    if monitor == "val_loss":
        return val_loss, False
    key = monitor.removeprefix("val_")
    if key not in metrics:
        raise TrainConfigError(f"monitor '{monitor}' is not a validation metric ({', '.join(sorted(metrics))}).")
    if key == "bpq" and not math.isfinite(metrics[key]):  # no validation image has a nucleus: never defined
        raise TrainingError(f"monitor '{monitor}' is undefined: the validation images hold no nucleus. "
                            "Choose another monitor or other validation images.")
    return float(metrics[key]), True


def _switch(value, device: torch.device) -> bool:
    value = str(value).lower()
    return device.type == "cuda" if value == "auto" else value in ("on", "true")


@torch.inference_mode()
def validate(model, loader, loss_fn, num_classes: int, device, ctx: DistContext | None = None,
             autocast=nullcontext, channels_last: bool = False,
             gt_instances: list[np.ndarray] | None = None) -> tuple[float, dict]:
    """Mean loss per image and metrics from one pooled confusion matrix (summed over ranks).

    With ``gt_instances`` (one map per validation image, in the loader's order) also ``bpq``:
    binary PQ per image of the nuclei the model's output gives (``semantic_to_instances``,
    seeded by its distance head if it has one), averaged over images with nuclei.
    """
    model.eval()
    cm = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    pq_sum = torch.zeros(2, dtype=torch.float64, device=device)
    seen = 0
    for image, labels, *extra in loader or ():
        image, labels = image.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        extra = [t.to(device, non_blocking=True) for t in extra]
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(image)
        logits = logits.float()
        loss_sum[0] += float(loss_fn(logits, labels, *extra)) * len(image)
        loss_sum[1] += len(image)
        pred = logits[:, :num_classes].argmax(1)  # a distance head's channel comes after the classes
        keep = labels != IGNORE_INDEX
        cm += torch.bincount(labels[keep] * num_classes + pred[keep], minlength=num_classes**2)
        if gt_instances is not None:
            pred_np = pred.cpu().numpy()
            dist = torch.sigmoid(logits[:, num_classes]).cpu().numpy() if logits.shape[1] > num_classes else None
            for b in range(len(image)):
                gt = gt_instances[seen + b]
                if gt.max() == 0:
                    continue
                h, w = gt.shape  # validation images are padded to the network's stride
                found = semantic_to_instances(pred_np[b, :h, :w], None, None if dist is None else dist[b, :h, :w])
                pq_sum[0] += match_instances(gt, found).pq
                pq_sum[1] += 1
        seen += len(image)
    if ctx is not None:
        ctx.all_sum(cm)
        ctx.all_sum(loss_sum)
        ctx.all_sum(pq_sum)
    metrics = semantic_metrics(cm.view(num_classes, num_classes).cpu().numpy())
    summary = {k: metrics[k] for k in ("miou", "mean_dice", "nucleus_dice", "pixel_accuracy")}
    if gt_instances is not None:
        summary["bpq"] = float(pq_sum[0] / pq_sum[1]) if pq_sum[1] > 0 else float("nan")
    summary["per_class_iou"] = [metrics["per_class"][str(c)]["iou"] for c in range(num_classes)]
    loss = float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else float("nan")
    return loss, summary


def _class_weights(cfg: TrainConfig, freq: np.ndarray, num_classes: int):
    spec = cfg.class_weights
    if spec is None and cfg.loss == "weighted_ce":
        spec = "auto"  # weighted CE without weights would be plain CE
    if spec is None:
        return None
    if cfg.loss not in ("weighted_ce", "ce_dice", "bce"):
        raise TrainConfigError(f"class_weights apply to weighted_ce, ce_dice and bce, not to '{cfg.loss}'.")
    if isinstance(spec, str):
        w = class_weights_from_frequencies(freq, spec)
    else:
        w = np.asarray(spec, float)
        if w.shape != (num_classes,):
            raise TrainConfigError(f"class_weights has {w.size} values for {num_classes} classes.")
        if (w < 0).any() or not np.isfinite(w).all():
            raise TrainConfigError(f"class_weights must be finite and non-negative, got {spec}.")
    return w


def _compare_for_resume(given: dict, stored: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(given) | set(stored)):
        if not prefix and key in RESUME_FREE:
            continue
        a, b = given.get(key), stored.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _compare_for_resume(a, b, f"{prefix}{key}.")
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            diffs.append(f"{prefix}{key}: {b!r} -> {a!r}")
    return diffs


def load_growing_head(model: torch.nn.Module, state: dict) -> None:
    """Load ``state`` into ``model``, where tensors may have fewer output rows than the model's
    (a start checkpoint without the distance head): those fill their first rows, and the rows
    beyond (the new head channel) keep their fresh initialisation. Anything else must match.
    """
    own = model.state_dict()
    grown = {}
    for key, value in state.items():
        mine = own.get(key)
        if mine is not None and mine.shape != value.shape and mine.ndim == value.ndim \
                and mine.shape[1:] == value.shape[1:] and mine.shape[0] > value.shape[0]:
            merged = mine.clone()
            merged[:value.shape[0]] = value.to(mine.dtype)
            grown[key] = merged
    model.load_state_dict({**state, **grown})


def _freeze_unused_parameters(model: torch.nn.Module, model_cfg, device) -> None:
    """smp keeps every encoder stage even with ``encoder_depth`` < 5; DDP needs each trainable
    parameter to get a gradient, so parameters that no forward pass uses are frozen (this changes
    nothing else: they never train anyway). One eval-mode pass: BatchNorm statistics are untouched."""
    side = 2 * model_cfg.output_stride
    was_training = model.training
    model.eval()
    model(torch.zeros(1, model_cfg.in_channels, side, side, device=device)).float().sum().backward()
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
        p.grad = None
    model.train(was_training)


def _estimated_bytes(model: torch.nn.Module, half: bool, with_resume: bool = True) -> int:
    params = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    best = params // 2 if half else params
    resume = params * 3 if with_resume else 0  # weights + two Adam moments
    return 2 * (best + resume) + (1 << 20)  # atomic replace: old file + new file at once


def train(cfg: TrainConfig, on_update: Callable[[object], None] | None = None,
          should_stop: Callable[[], bool] | None = None,
          items: tuple[list[LabelledImage], list[str]] | None = None) -> TrainingDone:
    """Train per ``cfg``; ``items`` = (labelled images, class names) bypasses the dataset folders.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this runs DistributedDataParallel; only rank 0
    reports updates and writes files.
    """
    ctx, device_name = init_distributed(cfg.device)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    threads_before = torch.get_num_threads()
    try:
        return _train(copy.deepcopy(cfg), on_update, should_stop, items, ctx, device_name)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        torch.set_num_threads(threads_before)
        shutdown_distributed(ctx)


def _train(cfg: TrainConfig, on_update, should_stop, items, ctx: DistContext, device_name: str) -> TrainingDone:
    cfg.check()
    emit = (on_update or (lambda update: None)) if ctx.is_main else (lambda update: None)
    stop = should_stop or (lambda: False)
    given = cfg.to_dict()
    resume_tensors = resume_info = None
    if cfg.resume:
        from .resume import ResumeError, read_resume

        resume_tensors, resume_info = read_resume(cfg.resume)
        diffs = _compare_for_resume(given, resume_info["config_given"])
        if diffs:
            raise ResumeError("The config differs from the run being resumed (" + "; ".join(diffs) + "). "
                              "Resume with the same settings, or start a new run.")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(cfg.seed)
    device = resolve_device(device_name)
    out_dir = Path(cfg.out_dir)
    if ctx.is_main:
        _check_output_dir(out_dir)

    start_weights = start_meta = None
    if cfg.init_checkpoint:
        from ..models.checkpoint import load_checkpoint

        start_model, start_meta = load_checkpoint(cfg.init_checkpoint)
        # its model config wins, but a distance head may be added to a model without one
        wants_distance = cfg.model.distance_head
        cfg.model = start_meta.model
        cfg.model.distance_head = cfg.model.distance_head or wants_distance
        cfg.normalization = dict(start_meta.normalization)  # the weights were trained with these
        start_weights = start_model.state_dict()
    if items is not None:
        data, classes = list(items[0]), list(items[1])
    else:
        data, classes = load_dataset_folders(cfg.data.dataset, cfg.data.group_pattern, cfg.model.in_channels)
    check_items(data, classes)
    if cfg.data.binary:
        data, classes = to_binary(data, classes)
    if start_meta is not None and start_meta.classes != classes:
        raise TrainConfigError(
            f"init_checkpoint was trained for classes {start_meta.classes}, but the data has {classes}."
        )
    cfg.model.num_classes = len(classes)  # the data decides the class count
    split_seed = cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed
    train_items, val_items = split_by_group(data, cfg.data.val_fraction, split_seed)
    if not train_items:
        raise TrainingError("No training images are left after holding out validation data.")
    freq = pixel_frequencies(train_items, len(classes))
    w = _class_weights(cfg, freq, len(classes))
    weights = None if w is None else torch.tensor(w, dtype=torch.float32, device=device)
    rare = rare_classes(freq, cfg.oversample) if cfg.oversample.factor > 0 else []
    index = oversample_indices(train_items, rare, cfg.oversample.factor, cfg.oversample.min_share)

    model = build_model(cfg.model)
    if start_weights is not None:
        load_growing_head(model, start_weights)
    if cfg.freeze_encoder:
        # smp models have .encoder; the custom U-Nets' encoder is their stem and down path
        parts = [model.encoder] if hasattr(model, "encoder") else [model.stem, model.down]
        for part in parts:
            part.requires_grad_(False)
    if ctx.is_main:
        _check_output_dir(out_dir, _estimated_bytes(model, cfg.save_half, cfg.save_resume))
    use_amp, channels_last = _switch(cfg.amp, device), _switch(cfg.channels_last, device)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if ctx.enabled:
        _freeze_unused_parameters(model, cfg.model, device)
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    # Different augmentation draws on every rank (the model itself is broadcast from rank 0).
    torch.manual_seed(cfg.seed + 1000 * ctx.rank)

    loss_fn = build_loss(cfg.loss, weights, num_classes=len(classes))
    if cfg.model.distance_head:
        loss_fn = WithDistanceHead(loss_fn, len(classes), cfg.distance_loss_weight)
    mean, std = normalization_stats(cfg.normalization)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_ds = PatchDataset(train_items, cfg.data.crop_size, cfg.data.crops_per_image, cfg.augment,
                            index=index, mean=mean, std=std, distance_targets=cfg.model.distance_head)
    if ctx.enabled:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_ds, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.seed)
    else:
        sampler = RandomSampler(train_ds, generator=generator,
                                num_samples=min(cfg.data.samples_per_epoch, len(train_ds)) or None)
    per_rank = len(sampler) if not ctx.enabled else math.ceil(len(train_ds) / ctx.world_size)
    pin = device.type == "cuda"
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=per_rank > cfg.batch_size,
                              generator=generator, num_workers=cfg.data.num_workers, pin_memory=pin,
                              persistent_workers=cfg.data.num_workers > 0)
    val_shard = val_items[ctx.rank::ctx.world_size]
    # ground-truth nuclei of each validation image, for the validation bPQ
    val_instances = [item_instances(it) for it in val_shard]
    val_loader = DataLoader(PatchDataset(val_shard, None, multiple_of=cfg.model.output_stride, mean=mean, std=std,
                                         distance_targets=cfg.model.distance_head),
                            batch_size=cfg.batch_size, num_workers=cfg.data.num_workers, pin_memory=pin) if val_items else None

    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer.lower()]
    optimizer = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train_loader)
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    scheduler = plateau = None
    if cfg.schedule == "cosine":
        # One warm-up-then-cosine cycle per run, stepped per batch (0.1 * 10 steps would be a
        # zero-length warm-up, which OneCycleLR divides by).
        pct = 0.1 if total_steps != 10 else 0.15
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct)
    elif cfg.schedule == "plateau":
        plateau = scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.5, patience=max(1, cfg.patience // 3 if cfg.patience else 3))
    scaler = torch.amp.GradScaler("cuda") if use_amp and device.type == "cuda" else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if use_amp else nullcontext

    monitor = cfg.monitor if val_loader is not None else "val_loss"
    patience = PatienceStop(cfg.patience, cfg.min_delta, higher_is_better=monitor != "val_loss")
    qcfg = cfg.quadratic_stop
    quadratic = QuadraticStop(qcfg.window, qcfg.threshold, qcfg.patience, qcfg.start) if qcfg.enabled else None
    best_epoch, start_epoch = -1, 1
    history: list[dict] = []
    checkpoint = out_dir / "best.safetensors"
    resume_path = out_dir / "resume.safetensors"
    data_description = {
        "datasets": list(cfg.data.dataset) if items is None else ["in-memory"],
        "classes": classes,
        "binary": bool(cfg.data.binary),
        "train_images": len(train_items),
        "val_images": len(val_items),
        "val_groups": sorted({it.group for it in val_items}),
        "split_seed": split_seed,
        "train_pixel_frequencies": [float(f) for f in freq],
        "class_weights": None if w is None else [float(x) for x in w],
        "oversample": {"rare_classes": rare, "samples_per_epoch": len(index), "images": len(train_items)},
        "crops_per_epoch": len(train_ds),
    }
    if resume_info is not None:
        from .resume import ResumeError, restore

        if resume_info["data"]["val_groups"] != data_description["val_groups"] or resume_info["data"]["classes"] != classes:
            raise ResumeError("The data differ from the run being resumed (classes or validation images changed).")
        restore(resume_tensors, resume_info, model, optimizer, scheduler, generator)
        history = resume_info["history"]
        best_epoch = resume_info["best_epoch"]
        start_epoch = resume_info["epoch"] + 1
        patience = PatienceStop(**resume_info["patience"])
        if resume_info.get("quadratic") is not None and quadratic is not None:
            quadratic = QuadraticStop(**resume_info["quadratic"])

    def save_best(epoch: int, record: dict) -> None:
        hashes = ctx.gather_ints(int(parameter_hash(model)[:15], 16), device) if ctx.enabled else None
        if not ctx.is_main:
            return
        training = {"config": cfg.to_dict(), "best_epoch": epoch, "history": history}
        if ctx.enabled:
            training["distributed"] = {"world_size": ctx.world_size, "backend": ctx.backend,
                                       "parameter_hash_prefixes": [f"{h:015x}" for h in hashes]}
        meta = CheckpointMeta(
            model=cfg.model, classes=classes, normalization={"mean": mean, "std": std},
            pixel_size_um=cfg.pixel_size_um, training=training, data=data_description,
            metrics={"validation": record}, model_card=cfg.model_card,
        )
        try:
            save_checkpoint(checkpoint, model, meta, half=cfg.save_half)
        except OSError as exc:
            raise TrainingError(f"Cannot write the checkpoint {checkpoint}: {exc.strerror or exc}. "
                                "The previous best checkpoint, if any, is unchanged.") from exc

    def save_resume_state(epoch: int) -> None:
        if not ctx.is_main or not cfg.save_resume:
            return
        from .resume import save_resume

        info = {"epoch": epoch, "config_given": given, "history": history, "best_epoch": best_epoch,
                "data": {"val_groups": data_description["val_groups"], "classes": classes},
                "patience": patience.state(), "quadratic": quadratic.state() if quadratic else None}
        try:
            save_resume(resume_path, model, optimizer, scheduler, generator, info)
        except OSError as exc:
            raise TrainingError(f"Cannot write {resume_path}: {exc.strerror or exc}.") from exc

    reason = ""
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.time()
        net.train()
        if ctx.enabled:
            sampler.set_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        steps_done, lr = 0, optimizer.param_groups[0]["lr"]
        for step, (image, labels, *extra) in enumerate(train_loader, 1):
            if stop():
                reason = "stopped by user"
                break
            image, labels = image.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            extra = [t.to(device, non_blocking=True) for t in extra]  # the distance target, with a distance head
            if channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = net(image)
            loss = loss_fn(logits.float(), labels, *extra)
            value = float(loss.detach())
            if not ctx.all_min_flag(math.isfinite(value), device):
                raise TrainingError(
                    f"The loss became {value} at epoch {epoch}, step {step}. Lower the learning rate "
                    f"(now {cfg.lr}) or check the labels; the best checkpoint so far is kept"
                    + (f" ({checkpoint}, epoch {best_epoch})." if best_epoch > 0 else " (none yet).")
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used
            if scheduler is not None and plateau is None:
                scheduler.step()
            loss_sum += value
            steps_done += 1
            emit(BatchDone(epoch, step, steps_per_epoch, value))
        if reason:
            break
        train_loss = float(loss_sum) / steps_done if steps_done else float("nan")
        if ctx.enabled:
            t = torch.tensor([train_loss], dtype=torch.float64, device=device)
            train_loss = float(ctx.all_sum(t)) / ctx.world_size
        ctx.sync_buffers(model)
        if val_loader is not None:
            val_loss, metrics = validate(model, val_loader, loss_fn, len(classes), device, ctx, autocast, channels_last,
                                         val_instances)
        else:
            val_loss, metrics = train_loss, {}
        if not math.isfinite(val_loss):
            raise TrainingError(
                f"The validation loss became {val_loss} at epoch {epoch}. Lower the learning rate (now {cfg.lr}) "
                "or check the data; the best checkpoint so far is kept"
                + (f" ({checkpoint}, epoch {best_epoch})." if best_epoch > 0 else " (none yet).")
            )
        value, _ = _monitor_value(monitor, val_loss, metrics)
        if plateau is not None:
            plateau.step(val_loss)
        record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr, **metrics}
        history.append(record)
        improved, patience_stop = patience.update(value)
        if improved:
            best_epoch = epoch
            save_best(epoch, record)
        if patience_stop:
            reason = patience.reason(monitor)
        if quadratic is not None and quadratic.update(epoch, val_loss) and not reason:
            reason = quadratic.reason()
        save_resume_state(epoch)
        emit(EpochDone(epoch, cfg.epochs, train_loss, val_loss, metrics, improved, time.time() - t0, lr, reason))
        if reason:
            break
    ctx.barrier()
    best_record = next((r for r in history if r["epoch"] == best_epoch), {})
    return TrainingDone(checkpoint if best_epoch > 0 else None, best_epoch, history, bool(reason), reason,
                        resume_path if resume_path.is_file() else None, best_record, cfg.seed)
