"""Device selection shared by inference and training."""

from __future__ import annotations

import torch

from .errors import MedsegError


class DeviceError(MedsegError, ValueError):
    """The requested compute device does not exist here."""


def available_devices() -> list[str]:
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device must exist."""
    if isinstance(name, torch.device):
        return name
    if name in ("auto", "", None):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"Unknown device '{name}'. Use one of: {', '.join(available_devices())}.") from exc
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise DeviceError(f"Device '{name}' requested but this machine has no such CUDA GPU.")
    if device.type == "mps" and name not in available_devices():
        raise DeviceError("Device 'mps' requested but Apple's Metal backend is not available here.")
    return device
