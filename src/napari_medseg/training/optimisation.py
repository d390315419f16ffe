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


WARM_UP_START = 25.0  # a cosine run's first step has lr / 25 (OneCycleLR's div_factor), rising to lr


def warm_up_share(total_steps: int) -> float:
    """OneCycleLR's ``pct_start`` for a run of ``total_steps`` (at least 2): a tenth of the steps
    warm up, and at least one. OneCycleLR ends the warm-up at step ``pct * total_steps - 1``:
    with 0.1 a run of fewer than 10 steps had none (its first step near the peak lr, which
    Adam's first step, of about lr on every weight, takes in full: what a warm-up spares a
    fine-tuned model), and 10 steps one of length 0, which it divides by. Below 11 steps the lr
    rises over the first step (lr / 25, then lr) and falls over the others; 2 steps: lr / 25,
    then the end of the cycle."""
    if total_steps > 10:
        return 0.1
    if total_steps >= 3:
        return 2 / total_steps
    return 0.75  # its warm-up ends at step 0.5: step 0 starts it, step 1 ends the cycle


def build_optimisation(cfg: TrainConfig, model: torch.nn.Module, steps_per_epoch: int,
                       scaler: torch.amp.GradScaler | None) -> Optimisation:
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer.lower()]
    optimizer = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    scheduler = None
    if cfg.schedule == "cosine" and total_steps == 1:
        # no cycle fits in one step (OneCycleLR gave it its end, lr / 25 / 10^4: nothing learnt):
        # the step a warm-up starts every run with
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr / WARM_UP_START
    elif cfg.schedule == "cosine":
        # One warm-up-then-cosine cycle per run, stepped per batch
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps,
                                                        pct_start=warm_up_share(total_steps),
                                                        div_factor=WARM_UP_START)
    elif cfg.schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.5, patience=max(1, cfg.patience // 3 if cfg.patience else 3))
    return Optimisation(optimizer, scheduler, cfg.schedule == "plateau", scaler)
