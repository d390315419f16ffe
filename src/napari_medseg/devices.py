"""Device selection shared by inference and training.

torch is imported inside the functions, not with this module: the viewer's widgets list devices
without loading torch into napari's process (``probe_devices``), which a slide run never needs
there (slides run in a child process).
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from typing import TYPE_CHECKING

from .errors import MedsegError

if TYPE_CHECKING:
    import torch

ALWAYS_THERE = ["auto", "cpu"]  # the devices every machine has: listed before anything is probed
PROBE_TIMEOUT_S = 60.0  # a child importing torch on a busy machine: seconds, not minutes


class DeviceError(MedsegError, ValueError):
    """The requested compute device does not exist here."""


def available_devices() -> list[str]:
    import torch

    names = list(ALWAYS_THERE)
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


# on Linux a GPU torch can use shows as device nodes: NVIDIA's, AMD's ROCm (kfd), WSL's (dxg)
LINUX_GPU_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")


def gpu_possible() -> bool:
    """Whether torch could find a GPU here: on Linux, only where a GPU's device node exists;
    elsewhere (macOS's Metal, Windows) it has to be asked."""
    if not sys.platform.startswith("linux"):
        return True
    return any(glob.glob(pattern) for pattern in LINUX_GPU_NODES)


def probe_devices() -> list[str]:
    """``available_devices()`` without loading torch into this process: asked of a child python
    when torch is not loaded here yet (about 3 s and 0.5 GB while torch loads; call it off the
    GUI thread), and not at all where no GPU can be (``gpu_possible``). A child that fails or
    hangs leaves ``ALWAYS_THERE`` (``auto`` still finds a GPU when the run starts)."""
    if "torch" in sys.modules:
        return available_devices()
    if not gpu_possible():
        return list(ALWAYS_THERE)
    try:
        done = subprocess.run([sys.executable, "-m", "napari_medseg.devices"], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, check=True)
        names = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return list(ALWAYS_THERE)
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return list(ALWAYS_THERE)
    return names


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device must exist."""
    import torch

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


if __name__ == "__main__":  # probe_devices' child: the device names as one JSON line
    print(json.dumps(available_devices()))
