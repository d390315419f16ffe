"""The model a run trains: built from the config, started from a checkpoint's weights, partly
frozen, placed on its device in its precision and memory format, wrapped for DDP."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..models.registry import build_model
from .config import TrainConfig
from .distributed import DistContext


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


def build_training_model(cfg: TrainConfig, start_weights: dict | None) -> torch.nn.Module:
    """The model of ``cfg.model``, with the start checkpoint's weights and a frozen encoder if asked."""
    model = build_model(cfg.model)
    if start_weights is not None:
        load_growing_head(model, start_weights)
    if cfg.freeze_encoder:
        # smp models have .encoder; the custom U-Nets' encoder is their stem and down path
        parts = [model.encoder] if hasattr(model, "encoder") else [model.stem, model.down]
        for part in parts:
            part.requires_grad_(False)
    return model


def cpu_has_bf16_matrix_units() -> bool:
    """AMX (Intel Xeon since Sapphire Rapids): bf16 autocast measured 1.4x (128² crops) to 1.75x
    (256²) faster a train step of the default there; CPUs without it emulate bf16 (7x slower on
    an AVX2 EPYC). ``torch.cpu`` has no public query for it yet."""
    query = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(query and query())
    except RuntimeError:
        return False


def _switch(value, device: torch.device) -> bool:
    value = str(value).lower()
    return device.type == "cuda" if value == "auto" else value in ("on", "true")


def _amp_switch(value, device: torch.device) -> bool:
    """``auto``: fp16 autocast on CUDA, bf16 on a CPU with AMX, full precision elsewhere."""
    if str(value).lower() == "auto" and device.type == "cpu":
        return cpu_has_bf16_matrix_units()
    return _switch(value, device)


@dataclass
class Precision:
    """Mixed precision and memory format: ``amp`` and ``channels_last`` resolved for the device."""

    amp: bool
    channels_last: bool
    device_type: str

    @classmethod
    def for_device(cls, cfg: TrainConfig, device: torch.device) -> "Precision":
        return cls(_amp_switch(cfg.amp, device), _switch(cfg.channels_last, device), device.type)

    def autocast(self):
        """A fresh context for one forward pass (a no-op without mixed precision)."""
        if not self.amp:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=torch.float16 if self.device_type == "cuda" else torch.bfloat16)

    def grad_scaler(self):
        """float16 needs loss scaling; bfloat16 (CPU) and full precision do not."""
        return torch.amp.GradScaler("cuda") if self.amp and self.device_type == "cuda" else None

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        return image.contiguous(memory_format=torch.channels_last) if self.channels_last else image


def place_model(model: torch.nn.Module, cfg: TrainConfig, ctx: DistContext, device: torch.device,
                precision: Precision) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model on the device, what trains: the model or its DDP wrapper)."""
    model = model.to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not ctx.enabled:
        return model, model
    _freeze_unused_parameters(model, cfg.model, device)
    return model, torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def _freeze_unused_parameters(model: torch.nn.Module, model_cfg, device) -> None:
    """DDP needs each trainable parameter to get a gradient, so parameters that no forward pass
    uses are frozen (the encoder stages an ``encoder_depth`` < 5 leaves unused are removed when
    the model is built, ``models.registry``; a resume file written before kept them; this changes
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
