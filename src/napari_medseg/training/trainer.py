"""The training loop: headless, reporting typed updates through a callback, stoppable.

``train(cfg, on_update=..., should_stop=...)`` runs anywhere (CLI, a worker thread
behind the napari widget, tests). Each epoch it validates with the core metrics and
keeps the best checkpoint, written atomically in the project format.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..devices import resolve_device
from ..metrics import semantic_metrics
from ..models.checkpoint import CheckpointMeta, save_checkpoint
from ..models.registry import build_model
from .config import TrainConfig, TrainConfigError
from .data import LabelledImage, PatchDataset, load_dataset_folders, pixel_frequencies, split_by_group
from .losses import IGNORE_INDEX, build_loss, class_weights_from_frequencies


class TrainingError(RuntimeError):
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


@dataclass
class TrainingDone:
    checkpoint: Path | None
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    reason: str = ""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_output_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"0" * 1024)
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"Cannot write checkpoints to '{out_dir}': {exc.strerror or exc}.") from exc


def _monitor_value(monitor: str, val_loss: float, metrics: dict) -> tuple[float, bool]:
    """(value, higher_is_better)."""
    if monitor == "val_loss":
        return val_loss, False
    key = monitor.removeprefix("val_")
    if key not in metrics:
        raise TrainConfigError(f"monitor '{monitor}' is not a validation metric ({', '.join(sorted(metrics))}).")
    return float(metrics[key]), True


@torch.inference_mode()
def validate(model, loader, loss_fn, num_classes: int, device) -> tuple[float, dict]:
    model.eval()
    cm = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    losses = []
    for image, labels in loader:
        image, labels = image.to(device), labels.to(device)
        logits = model(image)
        losses.append(float(loss_fn(logits, labels)))
        pred = logits.argmax(1)
        keep = labels != IGNORE_INDEX
        cm += torch.bincount((labels[keep] * num_classes + pred[keep]).cpu(), minlength=num_classes**2)
    metrics = semantic_metrics(cm.view(num_classes, num_classes).numpy())
    summary = {k: metrics[k] for k in ("miou", "mean_dice", "binary_dice", "pixel_accuracy")}
    summary["per_class_iou"] = [metrics["per_class"][str(c)]["iou"] for c in range(num_classes)]
    return float(np.mean(losses)) if losses else float("nan"), summary


def train(cfg: TrainConfig, on_update: Callable[[object], None] | None = None,
          should_stop: Callable[[], bool] | None = None,
          items: tuple[list[LabelledImage], list[str]] | None = None) -> TrainingDone:
    """Train per ``cfg``; ``items`` = (labelled images, class names) bypasses the dataset folders."""
    emit = on_update or (lambda update: None)
    stop = should_stop or (lambda: False)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    _check_output_dir(out_dir)

    start_weights = None
    if cfg.init_checkpoint:
        from ..models.checkpoint import load_checkpoint

        start_model, start_meta = load_checkpoint(cfg.init_checkpoint)
        cfg.model = start_meta.model
        start_weights = start_model.state_dict()
    data, classes = items if items is not None else load_dataset_folders(
        cfg.data.dataset, cfg.data.group_pattern, cfg.model.in_channels
    )
    if not data:
        raise TrainingError("The training data is empty.")
    if start_weights is not None and start_meta.classes != classes:
        raise TrainConfigError(
            f"init_checkpoint was trained for classes {start_meta.classes}, but the data has {classes}."
        )
    if cfg.model.num_classes != len(classes):
        cfg.model.num_classes = len(classes)  # the data decides the class count
    train_items, val_items = split_by_group(data, cfg.data.val_fraction, cfg.seed)
    freq = pixel_frequencies(train_items, len(classes))
    weights = None
    if cfg.loss in ("weighted_ce", "ce_dice") and cfg.class_weights is not None:
        if cfg.class_weights == "auto":
            w = class_weights_from_frequencies(freq)
        else:
            w = np.asarray(cfg.class_weights, float)
            if w.shape != (len(classes),):
                raise TrainConfigError(f"class_weights has {w.size} values for {len(classes)} classes.")
        weights = torch.tensor(w, dtype=torch.float32, device=device)

    model = build_model(cfg.model)
    if start_weights is not None:
        model.load_state_dict(start_weights)
    model = model.to(device)
    loss_fn = build_loss(cfg.loss, weights)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_ds = PatchDataset(train_items, cfg.data.crop_size, cfg.data.crops_per_image, cfg.augment)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_ds) > cfg.batch_size,
                              generator=generator)
    val_loader = DataLoader(PatchDataset(val_items, None, multiple_of=cfg.model.output_stride), batch_size=cfg.batch_size) if val_items else None

    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(cfg.optimizer.lower())
    if opt_cls is None:
        raise TrainConfigError(f"Unknown optimizer '{cfg.optimizer}' (adam, adamw).")
    optimizer = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = max(1, cfg.epochs * len(train_loader))
    if cfg.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.1)
    else:
        scheduler = None

    best_value, best_epoch, stale = None, -1, 0
    history: list[dict] = []
    checkpoint = out_dir / "best.safetensors"
    data_description = {
        "datasets": list(cfg.data.dataset) or ["in-memory"],
        "classes": classes,
        "train_images": len(train_items),
        "val_images": len(val_items),
        "val_groups": sorted({it.group for it in val_items}),
        "train_pixel_frequencies": [float(f) for f in freq],
    }
    reason = ""
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.time()
        model.train()
        running = []
        for step, (image, labels) in enumerate(train_loader, 1):
            if stop():
                reason = "stopped by user"
                break
            image, labels = image.to(device), labels.to(device)
            loss = loss_fn(model(image), labels)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"The loss became {float(loss)} at epoch {epoch}, step {step}. Lower the learning rate "
                    f"(now {cfg.lr}) or check the labels; the best checkpoint so far is kept."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            running.append(loss.item())
            emit(BatchDone(epoch, step, len(train_loader), running[-1]))
        if reason:
            break
        train_loss = float(np.mean(running)) if running else float("nan")
        if val_loader is not None:
            val_loss, metrics = validate(model, val_loader, loss_fn, len(classes), device)
        else:
            val_loss, metrics = train_loss, {}
        value, higher = _monitor_value(cfg.monitor if val_loader is not None else "val_loss", val_loss, metrics)
        improved = best_value is None or (value > best_value + cfg.min_delta if higher else value < best_value - cfg.min_delta)
        record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, **{k: v for k, v in metrics.items()}}
        history.append(record)
        if improved:
            best_value, best_epoch, stale = value, epoch, 0
            meta = CheckpointMeta(
                model=cfg.model, classes=classes, pixel_size_um=cfg.pixel_size_um,
                training={"config": cfg.to_dict(), "best_epoch": epoch, "history": history},
                data=data_description, metrics={"validation": record}, model_card=cfg.model_card,
            )
            save_checkpoint(checkpoint, model, meta, half=cfg.save_half)
        else:
            stale += 1
        emit(EpochDone(epoch, cfg.epochs, train_loss, val_loss, metrics, improved, time.time() - t0))
        if cfg.patience and stale >= cfg.patience:
            reason = f"no improvement of {cfg.monitor} for {cfg.patience} epochs"
            break
    return TrainingDone(checkpoint if best_epoch > 0 else None, best_epoch, history, bool(reason), reason)
