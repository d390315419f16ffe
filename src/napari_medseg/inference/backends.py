"""Who runs the network: PyTorch, or its ONNX export through OpenVINO or ONNX Runtime (CPU).

``choose_backend`` turns a name (``auto``, ``torch``, ``openvino``, ``onnxruntime``) into a
``Backend``: a callable from a float32 NCHW tensor to the network's logits, which ``forward``
uses exactly as it uses a PyTorch model (flips, softmax, blending stay where they are). A runtime
is used only once its output matches PyTorch's on a probe, as the fusion rewrite in
``models.optimise`` is checked; otherwise (not installed, no export, disagreement) PyTorch runs
and the reason is kept as a one-line note for every run's report.

``auto`` on the CPU tries OpenVINO, then ONNX Runtime, then PyTorch: the order measured fastest
by ``benchmarks/bench_inference.py`` (OpenVINO's CPU plugin ahead of ONNX Runtime ahead of the
fused PyTorch model). On CUDA, PyTorch runs (autocast, out-of-memory halving). OpenVINO gets the
export whose U-Net decoder upsampling convolutions run at the low resolution
(``models.upsample_conv``), faster there; ONNX Runtime the plain one, faster there.

Reduced precision: where OpenVINO offers half precision on this CPU (fp16 on CPUs with
AVX512-FP16, bf16 on AMX / AVX512-BF16 ones) ``auto`` tries fp16 first, then bf16, and keeps the
first whose class-map argmax agrees with float32 on >= ``MIN_AGREEMENT`` of the probe's pixels;
the report names the precision that runs. fp16 keeps 11 bits of mantissa to bf16's 8 at the same
speed: on an AMX Xeon, one batch of the (2-stage) default 0.08 s in float32, 0.03 s in either,
and 64 real CoNSeP tiles' class maps 99.95 % alike in fp16 against 99.81 % in bf16 (which the
rule refuses). Int8 (``models.quantise``), asked for with
``precision="int8"``: quantised whole, the shipped default moved 0.77 % of its held-out class-map
pixels and its bPQ by -0.015; by its architecture's measured plan (``quantise.INT8_PLANS``: int8
for the low-resolution layers, float32 elsewhere) 0.09 % of the held-out pixels and Dice / bPQ
by < 0.003, but 0.12 % of a 4096² mosaic's — at the edge of ``MIN_AGREEMENT``, so ``auto`` keeps
float32. A reduced precision asked for by name (``int8``, ``fp16``, ``bf16``) runs where it keeps
``ASKED_MIN_AGREEMENT`` of the probe; int8 on OpenVINO first (faster on the mixed model), ONNX
Runtime next.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import MedsegError
from ..models.export import INPUT_NAME, ExportError, cached_onnx
from ..models.quantise import QuantiseError, cached_int8, calibration_inputs
from .settings import BACKENDS, PRECISIONS

log = logging.getLogger(__name__)
# OpenVINO's half precisions, auto's order: (our name, its CPU capability, its inference precision)
HALF_PRECISIONS = (("fp16", "FP16", "f16"), ("bf16", "BF16", "bf16"))
RUNTIMES = ("openvino", "onnxruntime")  # auto's order on the CPU, fastest first
INT8_RUNTIMES = ("openvino", "onnxruntime")  # the faster first (each is checked against float32 at load)
MIN_AGREEMENT = 0.999  # class-map argmax agreement a reduced precision must keep with float32
ASKED_MIN_AGREEMENT = 0.98  # the floor for a precision asked for by name: a broken one still falls back
# runtimes given the export whose decoder upsampling convolutions run at the low resolution
# (models.upsample_conv); ONNX Runtime keeps the plain graph, faster there (export.LOW_RESOLUTION_VARIANT)
LOW_RESOLUTION_RUNTIMES = ("openvino",)
EXTRA = {"openvino": "openvino", "onnxruntime": "onnxruntime"}  # pip extra of each runtime


class BackendError(MedsegError, ValueError):
    """An unknown backend or precision name."""


@dataclass
class Backend:
    """A way to run the network, its name and precision: ``backend(x) -> logits`` on torch
    tensors; a runtime also has ``numpy_run`` (float32 NCHW numpy -> logits), which ``forward``
    drives without torch. ``run``: the PyTorch model (None for a runtime)."""

    name: str
    run: Callable | None
    precision: str = "fp32"
    notes: list[str] = field(default_factory=list)
    numpy_run: Callable[[np.ndarray], np.ndarray] | None = None
    graph: os.PathLike | None = None  # the ONNX file a runtime runs (``runtime_record`` remembers it)

    def __call__(self, x):
        if self.run is not None:
            return self.run(x)
        return _on_tensor(self.numpy_run, x)


def _on_tensor(fn: Callable[[np.ndarray], np.ndarray], x):
    """A numpy runner called on a torch tensor, its result a tensor (the load-time checks compare with PyTorch)."""
    import torch

    batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(fn(batch)))


def runtime_installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def runtime_threads() -> int:
    """Threads a runtime runs with: torch's count where torch is loaded (``--threads``, the
    widgets), else ``OMP_NUM_THREADS`` if set, else 0: the runtime's own default (one per
    physical core, as torch's)."""
    if "torch" in sys.modules:
        return max(1, sys.modules["torch"].get_num_threads())
    given = os.environ.get("OMP_NUM_THREADS", "")
    return int(given) if given.isdigit() else 0


def onnxruntime_runner(onnx_path: os.PathLike, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or runtime_threads()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {INPUT_NAME: x})[0]


def openvino_half_precisions() -> list[str]:
    """The half precisions OpenVINO's CPU plugin offers on this CPU, in ``auto``'s order."""
    import openvino as ov

    offered = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return [name for name, capability, _ in HALF_PRECISIONS if capability in offered]


def openvino_runner(onnx_path: os.PathLike, precision: str = "fp32",
                    threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov

    inference_precision = {name: hint for name, _, hint in HALF_PRECISIONS}.get(precision, "f32")
    config = {"INFERENCE_NUM_THREADS": threads or runtime_threads(), "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": inference_precision}
    compiled = ov.Core().compile_model(str(onnx_path), "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[0].copy()


def _runner(name: str, onnx_path, precision: str = "fp32") -> Callable[[np.ndarray], np.ndarray]:
    return onnxruntime_runner(onnx_path) if name == "onnxruntime" else openvino_runner(onnx_path, precision)


def recorded_backend(runtime: str, graph: os.PathLike, precision: str, notes: list[str],
                     threads: int | None = None) -> Backend:
    """A runtime backend from a choice made (and checked against PyTorch) earlier on this machine
    (``runtime_record``): no torch needed."""
    run = (onnxruntime_runner(graph, threads) if runtime == "onnxruntime"
           else openvino_runner(graph, precision, threads))
    return Backend(runtime, None, precision, list(notes), numpy_run=run, graph=graph)


def same_outputs(expected, got) -> bool:
    """Equal to float rounding: the tolerance ``models.optimise`` checks its fusion with."""
    import torch

    return got.shape == expected.shape and torch.allclose(
        got.float(), expected.float(), rtol=1e-3, atol=1e-3 * (1.0 + float(expected.abs().max())))


def argmax_agreement(expected, got, num_classes: int) -> float:
    """Share of pixels whose class-channel argmax is the same (a distance channel is not a class)."""
    return float((expected[:, :num_classes].argmax(1) == got[:, :num_classes].argmax(1)).float().mean())


def torch_backend(model, *notes: str) -> Backend:
    return Backend("torch", model, "fp32", [n for n in notes if n])


def _runtime_backend(name: str, onnx_path, expected, probe, num_classes: int,
                     precision: str) -> tuple[Backend | None, str]:
    """The runtime ``name`` if it matches PyTorch on the probe, else ``(None, why)``."""
    run = _runner(name, onnx_path)
    got = _on_tensor(run, probe)
    if not same_outputs(expected, got):
        diff = float((got.float() - expected.float()).abs().max()) if got.shape == expected.shape else float("nan")
        return None, f"{name} disagrees with PyTorch at load (max difference {diff:.3g})"
    backend = Backend(name, None, "fp32", numpy_run=run, graph=onnx_path)
    if name == "openvino" and precision in ("auto", "fp16", "bf16"):
        half = _half_precision_backend(onnx_path, got, probe, num_classes, precision, backend.notes)
        backend = half or backend
    elif precision in ("fp16", "bf16"):
        backend.notes.append(f"{precision} runs on OpenVINO only: float32 on {name}")
    return backend, ""


def _half_precision_backend(onnx_path, fp32, probe, num_classes: int, precision: str,
                            notes: list[str]) -> Backend | None:
    """OpenVINO at the first half precision (``auto``: fp16, then bf16; else the one asked for) that
    this CPU offers and whose probe class map agrees with float32's ``fp32``; None with why in ``notes``."""
    offered = openvino_half_precisions()
    wanted = [name for name, _, _ in HALF_PRECISIONS] if precision == "auto" else [precision]
    floor = MIN_AGREEMENT if precision == "auto" else ASKED_MIN_AGREEMENT
    for half in wanted:
        if half not in offered:
            if precision != "auto":
                notes.append(f"{half} is not offered by OpenVINO on this CPU: float32 kept")
            continue
        run = openvino_runner(onnx_path, half)
        agreement = argmax_agreement(fp32, _on_tensor(run, probe), num_classes)
        if agreement >= floor:
            return Backend("openvino", None, half, list(notes), numpy_run=run, graph=onnx_path)
        # said in a line: it stands in the napari status and the web page, where a newcomer reads it
        # 'a test tile' had read as if the user's image had failed a check: it is the built-in probe
        notes.append(f"runs in full precision (float32): the faster {half} (OpenVINO) changed "
                     f"{100 * (1 - agreement):.2f}% of the built-in check tile's pixels at load, over the "
                     f"{100 * (1 - floor):.1f}% allowed (your results are not affected; a little slower)")
    return None


def _int8_backend(runtimes: list[str], checkpoint, onnx_path, expected, probe,
                  num_classes: int, notes: list[str], calibration, plan: str | None) -> Backend | None:
    """The first of ``runtimes`` whose int8 model (mixed where ``plan`` names the int8 part) keeps
    ``ASKED_MIN_AGREEMENT`` of the probe's class map; else None, with why in ``notes``."""
    try:
        int8_path = cached_int8(checkpoint, onnx_path, calibration, plan)
    except (QuantiseError, ExportError) as exc:
        notes.append(f"{exc} float32 kept")
        return None
    what = "int8" if plan is None else "int8 (mixed: the low-resolution layers int8)"
    for runtime in sorted(runtimes, key=INT8_RUNTIMES.index):
        try:
            run = _runner(runtime, int8_path)
            agreement = argmax_agreement(expected, _on_tensor(run, probe), num_classes)
        except Exception as exc:  # a runtime that cannot run the int8 file: the next one, or float32
            notes.append(f"{runtime} int8 failed at load ({type(exc).__name__}: {exc})")
            continue
        if agreement >= ASKED_MIN_AGREEMENT:
            return Backend(runtime, None, "int8", [f"{what} on {runtime}: class-map argmax agreement with "
                                                   f"float32 {100 * agreement:.2f}% at load"], numpy_run=run,
                           graph=int8_path)
        notes.append(f"runs in full precision (float32): int8 ({runtime}) changed {100 * (1 - agreement):.2f}% of the "
                     f"built-in check tile's pixels at load, over the {100 * (1 - ASKED_MIN_AGREEMENT):.0f}% allowed "
                     "(your results are not affected; slower)")
    return None


def _fp32_graph(runtime: str, checkpoint, model, in_channels: int, plain: Callable[[], os.PathLike]):
    """The float32 export ``runtime`` runs fastest: for OpenVINO the one with a U-Net decoder's
    upsampling convolutions at the low resolution (``LOW_RESOLUTION_RUNTIMES``), else (or where
    that export fails, or the network has no such blocks) ``plain()``."""
    if runtime not in LOW_RESOLUTION_RUNTIMES:
        return plain()
    try:
        return cached_onnx(checkpoint, model, in_channels, low_resolution_upsampling=True)
    except ExportError as exc:
        log.info("The low-resolution upsampling export failed (%s); the plain one is used.", exc)
        return plain()


def _check_names(name: str, precision: str) -> None:
    if name not in BACKENDS:
        raise BackendError(f"Unknown backend '{name}'; choose one of: {', '.join(BACKENDS)}.")
    if precision not in PRECISIONS:
        raise BackendError(f"Unknown precision '{precision}'; choose one of: {', '.join(PRECISIONS)}.")


def choose_backend(name: str, model, fast_model, checkpoint, in_channels: int,
                   num_classes: int, device, probe, precision: str = "auto",
                   calibration: Callable[[], list[np.ndarray] | None] | None = None,
                   int8_plan: str | None = None) -> Backend:
    """The backend to run: ``name`` if it is installed, exports and agrees with PyTorch, else PyTorch
    (``fast_model``) with a note saying why. ``model`` is the plain network (exported, the reference);
    ``probe`` a CPU float32 batch of real tiles for the checks (unused, may be None, for ``torch``);
    ``calibration()`` one-image inputs for int8, made only when needed (None, or returning None:
    the probe's tiles and their mirror images).
    ``precision``: ``auto`` (OpenVINO's fp16 or bf16 where the CPU has it and it agrees), ``fp32``,
    or asked for: ``fp16`` / ``bf16`` (OpenVINO only), ``int8`` (mixed by the network's ``int8_plan``
    where it has one, else whole)."""
    _check_names(name, precision)
    if name == "torch":
        return torch_backend(fast_model, "" if precision in ("auto", "fp32") else
                             f"{precision} needs an ONNX runtime: float32 PyTorch")
    if device.type != "cpu":
        return torch_backend(fast_model, "" if name == "auto" else f"{name} runs on the CPU only: PyTorch on {device}")
    wanted = RUNTIMES if name == "auto" else (name,)
    installed = [r for r in wanted if runtime_installed(r)]
    if not installed:
        return torch_backend(fast_model, f"{' and '.join(wanted)} not installed (pip install "
                                         f"'napari-medseg[{EXTRA[wanted[0]]}]'): PyTorch used")
    # exported on first need: OpenVINO takes its own graph, so the plain one may never be made
    import torch

    plain = functools.cache(lambda: cached_onnx(checkpoint, model, in_channels))
    with torch.inference_mode():
        expected = model(probe).float()
    notes: list[str] = []
    try:
        if precision == "int8":
            tiles = calibration() if calibration is not None else None
            tiles = tiles if tiles is not None else calibration_inputs(probe.numpy())
            backend = _int8_backend(installed, checkpoint, plain(), expected, probe, num_classes, notes, tiles,
                                    int8_plan)
            if backend is not None:
                return backend
        reasons = []
        for runtime in installed:
            path = _fp32_graph(runtime, checkpoint, model, in_channels, plain)
            try:
                backend, why = _runtime_backend(runtime, path, expected, probe, num_classes, precision)
            except Exception as exc:  # a runtime that cannot load the file is a reason to fall back, not to fail
                backend, why = None, f"{runtime} failed at load ({type(exc).__name__}: {exc})"
            if backend is not None:
                backend.notes[:0] = notes
                return backend
            reasons.append(why)
    except ExportError as exc:
        return torch_backend(fast_model, *notes, f"{exc} PyTorch used")
    return torch_backend(fast_model, *notes, "; ".join(reasons) + ": PyTorch used")
