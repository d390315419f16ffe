"""Which runtime ran a checkpoint on this machine, remembered so that a later process loads it
without torch.

Choosing a runtime (``backends.choose_backend``) needs torch: the network is built, exported and
its outputs compared with PyTorch's on a probe. A slide run's process only needs the result: the
exported graph and the precision that passed. ``Segmenter.load`` therefore writes what it chose
beside the export (``<stem>.<hash>.v<version>.runtimes.json``: the checkpoint's content is in the
name), keyed by what was asked (backend, precision, device) and valid only on the same machine
with the same runtimes (``fingerprint``); ``Segmenter.load_recorded`` builds a segmenter from it
with the runtime alone: torch, timm and smp are never imported (about 0.65 GB of a process's
memory, and seconds of start-up).

Run as ``python -m napari_medseg.inference.runtime_record MODEL DEVICE BACKEND PRECISION``, it
makes the record in a short-lived process (the check's torch goes with it), which is how the
slide process prepares a model it has no record for.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from ..devices import gpu_possible
from ..io.images import atomic_write
from ..models.export import EXPORT_VERSION, checkpoint_hash, mark_used, onnx_candidates

log = logging.getLogger(__name__)
# bump when the record's fields or its notes' wording change: older records are checked again (2: plain-words
# fallback note; 3: the full-precision note names the built-in check tile, not 'a test tile')
RECORD_VERSION = 3
RUNTIMES = ("openvino", "onnxruntime")


@dataclass
class RuntimeChoice:
    """A remembered choice: the runtime, its precision, the graph it ran and the load's notes."""

    runtime: str
    precision: str
    graph: Path
    notes: list[str]


def fingerprint() -> dict:
    """What a choice depends on besides the checkpoint: the runtimes' versions (a new one is
    checked again), the CPU (half precision is offered per CPU) and whether a GPU can be present
    (``auto`` picks it, and PyTorch, when one is: NVIDIA's, ROCm's or WSL's device node,
    ``devices.gpu_possible``)."""
    versions = {}
    for name in RUNTIMES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"record": RECORD_VERSION, "runtimes": versions, "cpu": _cpu_name(), "machine": platform.machine(),
            "gpu": gpu_possible()}


def _cpu_name() -> str:
    """The CPU's model name with the vector extensions half precision depends on (AVX-512, AMX),
    which virtual machines often hide behind one generic name."""
    name, flags = "", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx512", "amx")))
                    break
    except OSError:
        pass
    return " ".join([name or platform.machine(), *flags])  # (platform.processor() runs a command)


def _key(backend: str, precision: str, device: str) -> str:
    return f"{backend}/{precision}/{device}"


def record_path(checkpoint: str | os.PathLike, folder: Path) -> Path:
    checkpoint = Path(checkpoint)
    return folder / f"{checkpoint.stem}.{checkpoint_hash(checkpoint)}.v{EXPORT_VERSION}.runtimes.json"


def remember(checkpoint: str | os.PathLike, backend: str, precision: str, device: str, chosen) -> None:
    """Write ``chosen`` (a runtime ``backends.Backend`` with its ``graph``) as the choice for what was
    asked, beside its graph. A folder that cannot be written only costs torch next time."""
    if chosen.numpy_run is None or chosen.graph is None or device not in ("auto", "cpu"):
        return
    graph = Path(chosen.graph)
    path = record_path(checkpoint, graph.parent)
    records = _read(path)
    records[_key(backend, precision, device)] = {
        "fingerprint": fingerprint(), "runtime": chosen.name, "precision": chosen.precision,
        "graph": graph.name, "notes": list(chosen.notes)}
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1)))
    except OSError as exc:
        log.info("Could not record the runtime choice in %s (%s).", path, exc)


def recorded(checkpoint: str | os.PathLike, backend: str, precision: str, device: str) -> RuntimeChoice | None:
    """The remembered choice for what is asked, if it was made on this machine with these runtimes
    and its graph is still there; else None."""
    if backend == "torch" or device not in ("auto", "cpu") or not Path(checkpoint).is_file():
        return None  # (a missing checkpoint is ``load``'s to report)
    current = None
    for folder in dict.fromkeys(candidate.parent for candidate in onnx_candidates(checkpoint)):
        entry = _read(record_path(checkpoint, folder)).get(_key(backend, precision, device))
        if not isinstance(entry, dict):
            continue
        current = current or fingerprint()
        graph = folder / str(entry.get("graph", ""))
        if entry.get("fingerprint") != current or not graph.is_file() or entry.get("runtime") not in current["runtimes"]:
            continue
        mark_used(graph)
        return RuntimeChoice(entry["runtime"], str(entry.get("precision", "fp32")), graph, list(entry.get("notes", [])))
    return None


def _read(path: Path) -> dict:
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


POLL_SECONDS = 0.25  # how often ``iter_record_in_a_process`` yields (and a cancel gets in) while it waits


def iter_record_in_a_process(model: str, device: str, backend: str, precision: str = "auto",
                             threads: int | None = None):
    """Generator: the choice for what is asked made and recorded by ``main`` in a process of its
    own (its torch leaves with it), yielding ``(0, 0)`` while it works; returns True when a
    runtime was recorded. Closed early (a cancel), it kills that process."""
    import subprocess
    import time

    command = [sys.executable, "-m", __name__, str(model), str(device), backend, precision]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    check = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=env)  # its messages go to our stderr
    try:
        while check.poll() is None:
            yield 0, 0
            time.sleep(POLL_SECONDS)
    finally:
        if check.poll() is None:
            check.kill()
            check.wait()
    return check.returncode == 0


def iter_load_recorded(model: str, device: str, backend: str, threads: int | None = None):
    """Generator (steps while a check runs): the segmenter by this machine's recorded runtime
    (``Segmenter.load_recorded``), the choice made first in a process of its own when there is no
    record (``iter_record_in_a_process``); returns None where PyTorch is what runs (asked for, a
    GPU, or a runtime that failed its check): the caller then loads with torch."""
    from .segmenter import Segmenter

    if backend == "torch" or device not in ("auto", "cpu"):
        return None
    segmenter = Segmenter.load_recorded(model, device, backend, threads=threads)
    if segmenter is None and (yield from iter_record_in_a_process(model, device, backend, threads=threads)):
        segmenter = Segmenter.load_recorded(model, device, backend, threads=threads)
    return segmenter


def main(argv: list[str] | None = None) -> int:
    """Load MODEL as asked (export, check, choose) so that its choice is recorded; 0 when a runtime
    was chosen and recorded, 1 when PyTorch was (nothing to record), 2 on an error (printed)."""
    model, device, backend, precision = (argv if argv is not None else sys.argv[1:])[:4]
    from ..errors import MedsegError
    from .segmenter import Segmenter

    try:
        segmenter = Segmenter.load(model, device=device, backend=backend, precision=precision)
    except MedsegError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0 if segmenter.backend.numpy_run is not None else 1


if __name__ == "__main__":
    sys.exit(main())
