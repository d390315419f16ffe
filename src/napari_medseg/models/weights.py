"""Reading tensors from disk without ever executing code: safetensors only, pickles refused."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MedsegError
from ..io.outputs import write_error
from ..wording import counted
from .config import ModelConfigError

if TYPE_CHECKING:  # torch loads with a model, not with this module (reading metadata needs none)
    import torch
    from torch import nn


class CheckpointError(MedsegError, ValueError):
    """A checkpoint file is not one we can load safely and correctly."""


def check_not_pickle(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(16)
    # Recognise safetensors first: its first byte is the low byte of the header length,
    # which is 0x80 (a pickle opcode) for about 1 valid file in 32.
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 8 + header_len <= os.path.getsize(path):
            return
        raise CheckpointError(f"{path.name}: truncated safetensors file (header runs past the end of the file).")
    if len(head) < 9:  # before the pickle check: a cut-off safetensors file may start with 0x80 too
        raise CheckpointError(f"{path.name} is too short to be a safetensors checkpoint ({len(head)} bytes).")
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        raise CheckpointError(
            f"{path.name} is a pickled PyTorch checkpoint (torch.save). napari-medseg never unpickles "
            "files, because unpickling can run arbitrary code. Save the weights with "
            "napari_medseg.models.save_checkpoint (a .safetensors file) instead."
        )
    raise CheckpointError(f"{path.name} is not a safetensors file (bad or truncated header).")


def write_safetensors(tensors: dict, tmp: Path, metadata: dict, target: Path) -> None:
    """safetensors' ``save_file`` into ``tmp`` (an ``atomic_write`` temp of ``target``); its
    errors (a full disk among them) become one naming ``target``, not the hidden temp file."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as exc:
        raise write_error(target, exc) from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, refusing pickles."""
    from safetensors.torch import load_file

    check_not_pickle(path)
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path.name}: cannot read tensors ({exc}).") from exc


def load_local_encoder_weights(model: nn.Module, path: str) -> None:
    file = Path(os.path.expanduser(path))
    if not file.is_file():
        # the shipped configs' ImageNet start is made once by a script the message had not named
        convert = (" Make it from ../shared/weights' TFLite MobileNetV2 with scripts/convert_tflite_mobilenet.py "
                   "(see configs/default.yaml's first lines)." if "imagenet" in str(path).lower() else "")
        raise ModelConfigError(
            f"encoder_weights must be a local file (no downloads); '{path}' does not exist.{convert}"
        )
    state = read_state_dict(file)
    # Match by name ourselves: smp encoders override load_state_dict (returning None, some
    # without ``strict``), and a file may hold extra tensors (classifier, deeper stages).
    own = model.encoder.state_dict()
    matched = {k: v for k, v in state.items() if k in own}
    if not matched:
        raise ModelConfigError(f"{file.name}: none of its tensors match the encoder's parameters.")
    wrong = [k for k, v in matched.items() if v.shape != own[k].shape]
    if wrong:
        raise ModelConfigError(
            f"{file.name}: {counted(len(wrong), 'tensor')} {'has' if len(wrong) == 1 else 'have'} the wrong shape for encoder '{model.encoder.__class__.__name__}' "
            f"(e.g. '{wrong[0]}': {tuple(matched[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}); weights of another encoder?"
        )
    from torch import nn

    nn.Module.load_state_dict(model.encoder, matched, strict=False)
