"""A checkpoint's network as an ONNX file, exported once and cached by the checkpoint's hash.

ONNX runtimes (OpenVINO, ONNX Runtime) run the same network faster than PyTorch on many CPUs;
``inference.backends`` loads the file this module makes. The file lies beside the checkpoint
(``<name>.<hash>.v<version>.onnx``) or, where that folder is not writable and for the models
shipped inside the package, in the user's cache folder. It is written to a temporary name and renamed,
so a crash or a concurrent export never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import MedsegError

log = logging.getLogger(__name__)
EXPORT_VERSION = 1  # bump when the exported graph changes (opset, axes, names): old files are ignored
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "logits"


class ExportError(MedsegError, RuntimeError):
    """The network could not be exported to ONNX."""


def checkpoint_hash(path: str | os.PathLike) -> str:
    """The first 16 hex digits of the checkpoint file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def user_cache_dir() -> Path:
    """Where exports go when the checkpoint's own folder is read-only."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "napari-medseg" / "onnx"


def onnx_candidates(checkpoint: str | os.PathLike) -> list[Path]:
    """Where the export of ``checkpoint`` may lie, in the order looked at: beside it, then the cache."""
    checkpoint = Path(checkpoint)
    name = f"{checkpoint.stem}.{checkpoint_hash(checkpoint)}.v{EXPORT_VERSION}.onnx"
    cache = user_cache_dir() / name
    # the package's own files (the default model) are never written to, installed or not
    inside_package = Path(__file__).resolve().parents[1] in checkpoint.resolve().parents
    return [cache] if inside_package else [checkpoint.parent / name, cache]


def export_onnx(model: nn.Module, in_channels: int, path: Path, side: int = 64) -> Path:
    """Write ``model`` (eval mode, float32, CPU) to ``path`` with free batch, height and width."""
    example = torch.zeros(1, in_channels, side, side)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx.part", dir=path.parent)
    os.close(fd)
    axes = {0: "batch", 2: "height", 3: "width"}
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(model.eval(), (example,), tmp, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes}, opset_version=OPSET, dynamo=False)
        os.replace(tmp, path)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise
        raise ExportError(f"Could not export the network to ONNX ({type(exc).__name__}: {exc}).") from exc
    return path


def cached_onnx(checkpoint: str | os.PathLike, model: nn.Module, in_channels: int) -> Path:
    """The ONNX file of ``checkpoint``'s network: an earlier export if there is one, else a new one
    beside the checkpoint, or in the user cache where that folder cannot be written."""
    candidates = onnx_candidates(checkpoint)
    for path in candidates:
        if path.is_file():
            return path
    for path in candidates:
        try:
            log.info("Exporting %s to ONNX (once per checkpoint): %s", Path(checkpoint).name, path)
            return export_onnx(model, in_channels, path)
        except OSError as exc:  # read-only folder: try the next place
            log.info("Cannot write %s (%s).", path, exc)
    raise ExportError(f"Nowhere to write the ONNX export of {checkpoint}: tried {', '.join(map(str, candidates))}.")
