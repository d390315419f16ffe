"""The model call: batches of tiles through the network (flip TTA, CUDA autocast), halving the
batch when the GPU runs out of memory.

A runtime that takes numpy arrays (OpenVINO, ONNX Runtime: ``backends.Backend.numpy_run``) is
driven in numpy end to end (flips, softmax, blend weights), so a process that runs one never
needs torch; PyTorch models go through torch as before."""

from __future__ import annotations

import logging
import sys

import numpy as np

from ..errors import MedsegError
from .run_report import RunReport
from .settings import TileSettings
from .windows import blend_weights

log = logging.getLogger(__name__)
FLIPS = ((), (3,), (2,), (2, 3))  # the flips test-time augmentation averages over (NCHW axes)


def _oom_errors() -> tuple[type[BaseException], ...]:
    import torch

    return tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


class InferenceMemoryError(MedsegError, RuntimeError):
    """Even one tile does not fit in the device's memory."""


def prepare_model(model, settings: TileSettings, device):
    """A PyTorch model in eval mode (channels-last on request); any other runner (``backends``) as it is."""
    if _numpy_runner(model) is not None or "torch" not in sys.modules:
        return model
    import torch

    if not isinstance(model, torch.nn.Module):
        return model
    model.eval()
    if settings.channels_last:
        first = next((p for p in model.parameters() if p.ndim == 4), None)
        if first is not None and not first.is_contiguous(memory_format=torch.channels_last):
            model.to(memory_format=torch.channels_last)
    return model


def forward_probabilities(model, x, settings: TileSettings, device, num_classes: int | None = None,
                          channels: int | None = None):
    """Softmax of the model's class channels (mean over flips with TTA), float32, on ``device``;
    channels after the first ``num_classes`` (a distance head) go through a sigmoid instead.
    ``channels``: how many output channels to keep (None: all); a distance channel nobody reads
    is never computed (a batch-sized tensor less at the engine's peak)."""
    import torch

    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    use_amp = settings.amp and device.type == "cuda"
    dtype = torch.float16 if settings.amp_dtype == "float16" else torch.bfloat16
    flips = FLIPS if settings.tta else FLIPS[:1]
    total = None
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_amp):
        for dims in flips:
            xin = torch.flip(x, dims) if dims else x
            logits = model(xin).float()
            if num_classes is None or logits.shape[1] == num_classes:
                p = torch.softmax(logits, dim=1)
            elif channels is not None and channels <= num_classes:
                p = torch.softmax(logits[:, :num_classes], dim=1)
            else:
                p = torch.cat([torch.softmax(logits[:, :num_classes], dim=1), torch.sigmoid(logits[:, num_classes:])], 1)
            p = torch.flip(p, dims) if dims else p
            total = p if total is None else total + p
    return total / len(flips) if len(flips) > 1 else total


def numpy_probabilities(run, x: np.ndarray, tta: bool, num_classes: int | None = None,
                        channels: int | None = None) -> np.ndarray:
    """``forward_probabilities`` for a runtime that maps a float32 NCHW numpy batch to logits."""
    total = None
    for axes in (FLIPS if tta else FLIPS[:1]):
        logits = np.asarray(run(np.ascontiguousarray(np.flip(x, axes)) if axes else x), np.float32)
        classes = logits.shape[1] if num_classes is None else num_classes
        p = _softmax(logits[:, :classes])
        if (channels is None or channels > classes) and logits.shape[1] > classes:
            p = np.concatenate([p, 1.0 / (1.0 + np.exp(-logits[:, classes:]))], 1)
        p = np.flip(p, axes) if axes else p
        total = p if total is None else total + p
    return total / np.float32(len(FLIPS)) if tta else total


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _numpy_runner(model):
    """The runtime's numpy entry point, if ``model`` is a backend that has one."""
    return getattr(model, "numpy_run", None)


class Batcher:
    """Runs batches of normalised tiles, halving the batch on out-of-memory (GPU) errors."""

    def __init__(self, model, settings: TileSettings, device, report: RunReport,
                 num_classes: int | None = None, channels: int | None = None):
        self.model, self.settings, self.device, self.report = model, settings, device, report
        self.num_classes = num_classes
        self.channels = channels  # output channels kept (None: all): a distance map nobody asked for is dropped
        self.limit = settings.batch_size
        self.numpy_run = _numpy_runner(model)
        weights = blend_weights(settings.tile_size, settings.blend)
        if self.numpy_run is None:
            import torch

            weights = torch.tensor(weights, device=device)
        self.weights = weights

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """``(B, t, t, Cin)`` float32 -> weighted probabilities ``(B, C, t, t)`` float32 numpy."""
        if self.numpy_run is not None:  # a CPU runtime: no out-of-memory halving to do
            x = np.ascontiguousarray(tiles.transpose(0, 3, 1, 2), dtype=np.float32)
            p = numpy_probabilities(self.numpy_run, x, self.settings.tta, self.num_classes, self.channels)
            p = p[:, :self.channels]
            p *= self.weights
            self.report.forward_passes += 1
            self.report.batch_size = self.limit
            return p
        import torch

        outs, start = [], 0
        while start < len(tiles):
            chunk = tiles[start:start + self.limit]
            try:
                with torch.inference_mode():
                    x = torch.from_numpy(chunk).permute(0, 3, 1, 2).to(self.device)
                    p = forward_probabilities(self.model, x, self.settings, self.device, self.num_classes,
                                              self.channels)
                    p = p[:, :self.channels].mul_(self.weights)  # in place: no second batch-sized tensor
                    outs.append(p.cpu().numpy())
                self.report.forward_passes += 1
                start += len(chunk)
            except _oom_errors() as exc:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.limit == 1:
                    raise InferenceMemoryError(
                        f"Out of memory on {self.device} with a single {self.settings.tile_size}² tile; "
                        "use a smaller tile size or the CPU."
                    ) from exc
                self.limit = max(1, self.limit // 2)
                self.report.out_of_memory_retries += 1
                self.report.notes.append(f"out of memory: batch size lowered to {self.limit}")
                log.warning("Out of memory on %s: batch size lowered to %d.", self.device, self.limit)
        self.report.batch_size = self.limit
        return outs[0] if len(outs) == 1 else np.concatenate(outs)
