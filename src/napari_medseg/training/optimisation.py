"""Optimiser, learning-rate schedule and loss scaling, and the step that uses them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TrainConfig


@dataclass
class Optimisation:
    optimizer: torch.optim.Optimizer
    scheduler: object | None  # stepped per batch, or (plateau) per epoch on the validation loss
    plateau: bool
    scaler: torch.amp.GradScaler | None  # float16 mixed precision only

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor) -> float:
        """One optimiser step on ``loss``; returns the learning rate the step used."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        lr = self.lr
        if self.scheduler is not None and not self.plateau:
            self.scheduler.step()
        return lr

    def after_validation(self, val_loss: float) -> None:
        if self.plateau:
            self.scheduler.step(val_loss)


def build_optimisation(cfg: TrainConfig, model: torch.nn.Module, steps_per_epoch: int,
                       scaler: torch.amp.GradScaler | None) -> Optimisation:
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer.lower()]
    optimizer = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    scheduler = None
    if cfg.schedule == "cosine":
        # One warm-up-then-cosine cycle per run, stepped per batch (0.1 * 10 steps would be a
        # zero-length warm-up, which OneCycleLR divides by).
        pct = 0.1 if total_steps != 10 else 0.15
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct)
    elif cfg.schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.5, patience=max(1, cfg.patience // 3 if cfg.patience else 3))
    return Optimisation(optimizer, scheduler, cfg.schedule == "plateau", scaler)
