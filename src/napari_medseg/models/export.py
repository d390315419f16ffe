"""A checkpoint's network as an ONNX file, exported once and cached by the checkpoint's hash.

ONNX runtimes (OpenVINO, ONNX Runtime) run the same network faster than PyTorch on many CPUs;
``inference.backends`` loads the file this module makes. The file lies beside the checkpoint
(``<name>.<hash>.v<version>[.<variant>].onnx``, e.g. the int8 variant of ``models.quantise`` or
the ``lowres`` one, whose U-Net decoder upsamples after its first convolutions) or,
where that folder is not writable and for the models shipped inside the package, in the user's
cache folder. It is written to a temporary name and renamed, so a crash or a concurrent export
never leaves a half-written file under the final name. A new export removes the stale ones of
the same checkpoint name (older content or export version) from its folder; the user cache,
shared by all checkpoints, keeps the ``CACHE_KEEP`` most recently used.
"""

from __future__ import annotations

import copy
import functools
import glob
import hashlib
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import MedsegError
from ..io.images import atomic_write

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)
EXPORT_VERSION = 1  # bump when the exported graph changes (opset, axes, names): old files are ignored
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "logits"
# the graph with a U-Net decoder's upsampling convolutions at the low resolution: OpenVINO ran it
# 18-29 % faster than the plain one (a batch of 4 x 256² of the default), ONNX Runtime 17 % slower
LOW_RESOLUTION_VARIANT = "lowres"
CACHE_KEEP = 8  # exports the user cache keeps (all checkpoints together), the most recently used


class ExportError(MedsegError, RuntimeError):
    """The network could not be exported to ONNX."""


def checkpoint_hash(path: str | os.PathLike) -> str:
    """The first 16 hex digits of the checkpoint file's SHA-256 (read once per content: a load
    names its exports and its runtime record by it several times)."""
    stat = Path(path).stat()
    return _file_hash(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:  # size and time: a rewritten file is read again
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


def export_name(checkpoint: str | os.PathLike, variant: str = "") -> str:
    """``<stem>.<hash>.v<version>[.<variant>].onnx``: one name per checkpoint content and export version."""
    checkpoint = Path(checkpoint)
    return f"{checkpoint.stem}.{checkpoint_hash(checkpoint)}.v{EXPORT_VERSION}{'.' + variant if variant else ''}.onnx"


def onnx_candidates(checkpoint: str | os.PathLike, variant: str = "") -> list[Path]:
    """Where the export of ``checkpoint`` may lie, in the order looked at: beside it, then the cache."""
    checkpoint = Path(checkpoint)
    name = export_name(checkpoint, variant)
    cache = user_cache_dir() / name
    # the package's own files (the default model) are never written to, installed or not
    inside_package = Path(__file__).resolve().parents[1] in checkpoint.resolve().parents
    return [cache] if inside_package else [checkpoint.parent / name, cache]


def _family(folder: Path, stem: str) -> list[Path]:
    """The exports of checkpoints named ``stem`` in ``folder``, any content, version or variant."""
    pattern = re.compile(rf"{re.escape(stem)}\.[0-9a-f]{{16}}\.v\d+(\.[\w-]+)?\.onnx")
    return [p for p in folder.glob(f"{glob.escape(stem)}.*.onnx") if pattern.fullmatch(p.name)]


def remove_stale(written: Path, checkpoint: str | os.PathLike) -> None:
    """After ``written`` (an export of ``checkpoint``): its folder keeps no export of an older
    content or export version of a checkpoint of that name, and the user cache, shared by all
    checkpoints, keeps at most ``CACHE_KEEP`` exports, the least recently used going first."""
    checkpoint = Path(checkpoint)
    current = f"{checkpoint.stem}.{checkpoint_hash(checkpoint)}.v{EXPORT_VERSION}."
    stale = [p for p in _family(written.parent, checkpoint.stem) if not p.name.startswith(current)]
    # the runtime choices recorded for older contents (``inference.runtime_record``) go with their exports
    stale += [p for p in written.parent.glob(f"{glob.escape(checkpoint.stem)}.*.runtimes.json")
              if not p.name.startswith(current)]
    if written.parent == user_cache_dir():
        kept = sorted((p for p in written.parent.glob("*.onnx") if p not in stale and p != written),
                      key=lambda p: p.stat().st_mtime, reverse=True)
        stale += kept[CACHE_KEEP - 1:]
    for path in stale:
        try:
            path.unlink()
            log.info("Removed the stale export %s.", path)
        except OSError as exc:  # in use elsewhere (Windows) or read-only: left for a later export
            log.info("Could not remove the stale export %s (%s).", path, exc)


def mark_used(path: Path) -> None:
    """Touch an export that is read again, so the user cache's bound drops the least recently used."""
    try:
        os.utime(path)
    except OSError:  # a read-only folder: its files are not in the bounded cache anyway
        pass


def export_onnx(model: nn.Module, in_channels: int, path: Path, side: int = 64) -> Path:
    """Write ``model`` (eval mode, float32, CPU) to ``path`` with free batch, height and width."""
    import torch

    example = torch.zeros(1, in_channels, side, side)
    axes = {0: "batch", 2: "height", 3: "width"}

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(model.eval(), (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes}, opset_version=OPSET, dynamo=False)

    try:
        atomic_write(path, write)
    except OSError:
        raise
    except Exception as exc:
        raise ExportError(f"Could not export the network to ONNX ({type(exc).__name__}: {exc}).") from exc
    return path


def cached_export(checkpoint: str | os.PathLike, make: Callable[[Path], Path], variant: str = "",
                  what: str = "ONNX") -> Path:
    """The file ``variant`` of ``checkpoint``'s export: an earlier one if there is one, else
    ``make(path)`` beside the checkpoint, or in the user cache where that folder cannot be
    written; a new file replaces the stale exports of its folder (``remove_stale``)."""
    candidates = onnx_candidates(checkpoint, variant)
    for path in candidates:
        if path.is_file():
            mark_used(path)
            return path
    for path in candidates:
        try:
            log.info("Writing the %s export of %s (once per checkpoint): %s", what, Path(checkpoint).name, path)
            made = make(path)
        except OSError as exc:  # read-only folder: try the next place
            log.info("Cannot write %s (%s).", path, exc)
            continue
        remove_stale(made, checkpoint)
        return made
    raise ExportError(f"Nowhere to write the {what} export of {checkpoint}: tried {', '.join(map(str, candidates))}.")


def cached_onnx(checkpoint: str | os.PathLike, model: nn.Module, in_channels: int,
                low_resolution_upsampling: bool = False) -> Path:
    """The ONNX file of ``checkpoint``'s network (see ``cached_export``). With
    ``low_resolution_upsampling``, a U-Net decoder's upsampling convolutions are rewritten to run
    at the low resolution first (``models.upsample_conv``; the same outputs to float rounding), in
    a file of its own (variant ``LOW_RESOLUTION_VARIANT``); a network without such blocks gets the
    plain file."""
    if low_resolution_upsampling:
        import torch

        from .upsample_conv import polyphase_unet_decoder

        graph = copy.deepcopy(model).eval()
        with torch.no_grad():
            rewritten = polyphase_unet_decoder(graph)
        if rewritten:
            return cached_export(checkpoint, lambda path: export_onnx(graph, in_channels, path), LOW_RESOLUTION_VARIANT)
    return cached_export(checkpoint, lambda path: export_onnx(model, in_channels, path))
