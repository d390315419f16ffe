"""Int8 post-training quantisation of a checkpoint's ONNX export, calibrated on real H&E tiles.

ONNX Runtime's static quantisation (``onnxruntime.quantization``, no dependency beyond the
``onnxruntime`` extra) records the activation ranges of the float32 export on a few calibration
tiles and writes a QDQ model: int8 weights, one scale per output channel, 7-bit range (CPUs
without VNNI saturate full-range int8 products), uint8 activations. The file lies beside the
float32 export under the same key (``<name>.<hash>.v<version>.int8q<QUANT_VERSION>[m].onnx``,
``models.export.cached_export``), so it is made once per checkpoint and replaced with it.

Where to quantise (measured on the CoNSeP-only default, shipped until the all-data model): the
whole network moved 0.77 % of its class-map pixels on its 64 held-out CoNSeP patches and its
bPQ by -0.015 — too much (a default may move 0.1 %).
Quantising one block at a time showed why: the full-resolution layers (the first encoder stages,
the last decoder blocks, the head) carry nearly all of the error and little of the gain (int8
resizes at full resolution are even slower), the deep encoder and the coarse decoder blocks
almost none. ``INT8_PLANS`` names, per architecture, the module scopes kept int8 (the rest runs
in float32): for the U-Net on MobileNetV2, encoder stages 8-18 (1/16 and 1/32 resolution) and
decoder blocks 0-1. On the 64 held-out patches, calibrated on the shipped MoNuSeg crop (not a
CoNSeP image): class maps 99.91 % alike, Dice and bPQ within 0.003; on a 4096² mosaic 99.88 %
(``README``, *Inference backends*). The all-data default under the same plan: 99.91 % on a
2048² mosaic, 99.84 % on the load-time probe tile (whole: 99.09 %). Int8 is asked for, never
picked by ``auto``; an architecture without a plan is quantised whole.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import MedsegError
from .export import INPUT_NAME, cached_export

QUANT_VERSION = 2  # bump when the quantisation recipe changes: the old int8 files are replaced
INT8_VARIANT = f"int8q{QUANT_VERSION}"
MIXED_VARIANT = f"{INT8_VARIANT}m"  # a plan's mixed int8 / float32 model
# (architecture, encoder) -> the ONNX node-name scopes quantised (the TorchScript exporter names
# nodes after the module path); measured on the defaults, see the module docstring
INT8_PLANS = {
    ("unet", "mobilenet_v2"): r"^/(encoder/features\.(8|9|1[0-8])|decoder/blocks\.[01])/",
}
# the shipped tile the plans were validated with (MoNuSeg, another lab than the default's CoNSeP)
CALIBRATION_TILE = Path(__file__).resolve().parents[1] / "sample_data" / "monuseg_TCGA-A7-A13E_crop.png"
CALIBRATION_SIDE = 256


def int8_plan(architecture: str, encoder: str) -> str | None:
    """The node-name pattern kept int8 for this network, or None (no measured plan: all of it)."""
    return INT8_PLANS.get((architecture, encoder))


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


def calibration_tiles(normalise, side: int = CALIBRATION_SIDE) -> list[np.ndarray]:
    """The calibration inputs the plans were validated with: the shipped MoNuSeg crop cut into
    ``side``-px tiles, normalised by ``normalise`` (the segmenter's), each with its mirror images."""
    from ..io.images import read_image

    image = read_image(CALIBRATION_TILE)[:, :, :3]
    tiles = [normalise(image[y:y + side, x:x + side]).transpose(2, 0, 1)
             for y in range(0, image.shape[0] - side + 1, side) for x in range(0, image.shape[1] - side + 1, side)]
    return calibration_inputs(np.stack(tiles))


def quantise_onnx(onnx_path: Path, path: Path, calibration: Sequence[np.ndarray], plan: str | None = None) -> Path:
    """Write the int8 QDQ model of the float32 export ``onnx_path`` to ``path`` (temp name, then
    rename); with ``plan``, only the nodes whose names match it are quantised."""
    try:
        import onnx
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
            excluded = _excluded_nodes(onnx.load(str(prepared)), plan)
            quantize_static(str(prepared), str(written), Tiles(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded)
        except OSError:
            raise
        except Exception as exc:
            raise QuantiseError(f"Could not quantise {onnx_path.name} to int8 ({type(exc).__name__}: {exc}).") from exc
        os.replace(written, path)  # same folder: an atomic rename, never a half-written file
    return path


def _excluded_nodes(model, plan: str | None) -> list[str]:
    """The nodes left in float32: none without a plan, else every node the plan does not name."""
    if plan is None:
        return []
    kept = re.compile(plan)
    excluded = [node.name for node in model.graph.node if not kept.match(node.name)]
    if len(excluded) == len(model.graph.node):  # an export whose names the plan does not know
        raise QuantiseError("the int8 plan names none of the exported network's nodes")
    return excluded


def cached_int8(checkpoint: str | os.PathLike, onnx_path: Path, calibration: Sequence[np.ndarray],
                plan: str | None = None) -> Path:
    """The int8 model of ``checkpoint``'s export ``onnx_path`` (mixed, with ``plan``): an earlier
    one, else a new one (calibrated on ``calibration``, one-image float32 inputs) where the exports go."""
    variant = INT8_VARIANT if plan is None else MIXED_VARIANT
    return cached_export(checkpoint, lambda path: quantise_onnx(onnx_path, path, calibration, plan), variant, "int8")
