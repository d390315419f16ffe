"""Int8 post-training quantisation of a checkpoint's ONNX export, calibrated on real H&E tiles.

ONNX Runtime's static quantisation (``onnxruntime.quantization``, no dependency beyond the
``onnxruntime`` extra) records the activation ranges of the float32 export on a few calibration
tiles and writes a QDQ model: int8 weights, one scale per output channel, 7-bit range (CPUs
without VNNI saturate full-range int8 products), uint8 activations. The file lies beside the
float32 export under the same key (``<name>.<hash>.v<version>.int8q<QUANT_VERSION>.onnx``,
``models.export.cached_export``), so it is made once per checkpoint and replaced with it.

Measured with the shipped default on its 64 held-out CoNSeP patches: int8 (ONNX Runtime) moved
0.77 % of the class-map pixels (a default may move 0.1 %) and bPQ by -0.015 (Dice -0.001), so
it is offered on request (``precision="int8"``), never picked by ``auto`` (``inference.backends``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import MedsegError
from .export import INPUT_NAME, cached_export

QUANT_VERSION = 1  # bump when the quantisation recipe changes: the old int8 files are replaced
INT8_VARIANT = f"int8q{QUANT_VERSION}"


class QuantiseError(MedsegError, RuntimeError):
    """The int8 model could not be made (ONNX Runtime missing, or its quantiser failed)."""


def calibration_inputs(batch: np.ndarray) -> list[np.ndarray]:
    """One-image inputs for the calibration: each normalised tile of ``batch`` (``(N, C, H, W)``)
    and its mirror images, so the ranges see the tissue in more than one orientation."""
    tiles = []
    for image in np.asarray(batch, np.float32):
        for flipped in (image, image[:, :, ::-1], image[:, ::-1], image[:, ::-1, ::-1]):
            tiles.append(np.ascontiguousarray(flipped[None]))
    return tiles


def quantise_onnx(onnx_path: Path, path: Path, calibration: Sequence[np.ndarray]) -> Path:
    """Write the int8 QDQ model of the float32 export ``onnx_path`` to ``path`` (temp name, then rename)."""
    try:
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
        from onnxruntime.quantization import quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise QuantiseError("int8 needs ONNX Runtime's quantiser: pip install 'napari-medseg[onnxruntime]'.") from exc

    class Tiles(CalibrationDataReader):
        def __init__(self):
            self.left = iter(calibration)

        def get_next(self):
            x = next(self.left, None)
            return None if x is None else {INPUT_NAME: x}

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".quantise-") as work:
        prepared, written = Path(work) / "prepared.onnx", Path(work) / "int8.onnx"
        try:
            quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)  # shapes, folded constants
            quantize_static(str(prepared), str(written), Tiles(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        except OSError:
            raise
        except Exception as exc:
            raise QuantiseError(f"Could not quantise {onnx_path.name} to int8 ({type(exc).__name__}: {exc}).") from exc
        os.replace(written, path)  # same folder: an atomic rename, never a half-written file
    return path


def cached_int8(checkpoint: str | os.PathLike, onnx_path: Path, calibration: Sequence[np.ndarray]) -> Path:
    """The int8 model of ``checkpoint``'s export ``onnx_path``: an earlier one, else a new one
    (calibrated on ``calibration``, one-image float32 inputs) where the exports go."""
    return cached_export(checkpoint, lambda path: quantise_onnx(onnx_path, path, calibration), INT8_VARIANT, "int8")
