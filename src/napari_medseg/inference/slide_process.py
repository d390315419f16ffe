"""A slide run in a process of its own, driven as a step generator from the caller's thread.

Why a process: the run's pieces that hold Python's interpreter lock for a long stretch (writing
result blocks, tracing GeoJSON outlines, the watershed's Cython, importing the runtimes) stalled
napari's GUI thread for up to a second each when they ran in a worker thread of its process.
A child process shares no lock with the GUI: the caller's thread only waits on a pipe. The
child runs at a lower priority (``NICENESS``), so on a machine whose cores it fills the viewer
still paints and answers at once.

The child is ``python -m napari_medseg.inference.slide_process``: it reads one JSON line (a
``SlideJob``) from stdin, then ``cancel`` lines; it writes JSON lines (progress, the result or
the error) to its own copy of stdout, every other print going to a log file. A parent that
goes away closes stdin, which cancels the run. A cancelled or failed run removes its files
(``slide.iter_predict_slide``); a child that does not answer a cancel is killed and its temp
files are removed by the parent (``io.outputs.remove_stale_temps``).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import MedsegError
from ..steps import Cancelled
from .regions import Region
from .slide import SlideResult

POLL_SECONDS = 0.25  # how often the caller gets a step (and a chance to cancel) while the child is quiet
CANCEL_GRACE_SECONDS = 30.0  # a child that has not answered a cancel by then is killed
LOG_TAIL_CHARS = 2000  # of the child's log, in the message of a crash
# the child yields the CPU to the viewer whenever the viewer wants it (painting, the user's
# clicks); when the viewer is idle it gets the cores all the same
NICENESS = 5


class SlideProcessError(MedsegError, RuntimeError):
    """The slide run failed in its process (its message is the child's error)."""


@dataclass
class SlideJob:
    """Everything a slide run needs, as plain values (it crosses a process boundary as JSON).

    ``model``: ``"default"`` or a checkpoint path; ``nucleus_threshold`` 0 keeps the model's own;
    ``region`` ``(x, y, width, height)`` and ``polygon`` ``[[y, x], ...]`` in level-0 pixels."""

    model: str
    slide: str
    out_dir: str
    device: str = "cpu"
    backend: str = "torch"
    region: tuple[int, int, int, int] | None = None
    polygon: list[list[float]] | None = None
    tiles: dict = field(default_factory=dict)  # TileSettings fields
    nucleus_threshold: float = 0.0
    marker_threshold: float | None = None
    min_nucleus: int | None = None
    nuclei: bool = True
    min_object_size: int = 0
    max_hole_size: int = 0
    flag: str = "--out"
    threads: int | None = None  # torch threads in the child (None: torch's default)


@dataclass
class SlideModelInfo:
    """What the caller needs to show a slide run's results: the model's classes, colours and the
    nucleus threshold that ran."""

    classes: list[str]
    colors: list[list[int]]
    foreground_threshold: float | None


# -- the child ---------------------------------------------------------------------
def run_job(job: SlideJob, progress=None, should_cancel=None) -> tuple[SlideResult, SlideModelInfo]:
    """The slide run of ``job`` in this process (the child's work; also usable directly)."""
    import numpy as np

    from ..io.slides import open_slide
    from ..nuclei.watershed import InstanceSettings
    from .postprocess import PostprocessSettings
    from .segmenter import Segmenter
    from .settings import TileSettings
    from .slide import predict_slide

    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    segmenter = Segmenter.load(job.model, device=job.device, backend=job.backend)
    segmenter.foreground_threshold = job.nucleus_threshold or segmenter.meta.foreground_threshold
    tiles = TileSettings(**job.tiles).checked(segmenter.meta.model.output_stride)
    defaults = InstanceSettings()
    instance_settings = InstanceSettings(
        marker_threshold=defaults.marker_threshold if job.marker_threshold is None else job.marker_threshold,
        min_size=defaults.min_size if job.min_nucleus is None else job.min_nucleus)
    polygon = None if job.polygon is None else np.asarray(job.polygon, float)
    region = None if job.region is None else Region(*job.region)
    result = predict_slide(segmenter, open_slide(job.slide), job.out_dir, region, progress, should_cancel,
                           settings=tiles, instance_settings=instance_settings, nuclei=job.nuclei,
                           postprocess=PostprocessSettings(job.min_object_size, job.max_hole_size), polygon=polygon,
                           flag=job.flag)
    info = SlideModelInfo(list(segmenter.classes), [list(c) for c in segmenter.meta.colors],
                          segmenter.foreground_threshold)
    return result, info


def main() -> int:
    """The child: one job from stdin, JSON messages out; 0 done, 1 failed, 2 cancelled."""
    if hasattr(os, "nice"):
        os.nice(NICENESS)
    messages = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed (by us or by a library) goes to the log, never into the messages
    sys.stdout = sys.stderr
    send = lambda **message: messages.write(json.dumps(message) + "\n")  # noqa: E731
    cancel = threading.Event()
    try:
        job = SlideJob(**json.loads(sys.stdin.readline()))
    except (TypeError, ValueError) as exc:
        send(error=f"Bad slide job ({exc}).", kind=type(exc).__name__)
        return 1

    def listen():  # a cancel line, or the parent gone (stdin closed): stop at the next step
        for line in sys.stdin:
            if line.strip() == "cancel":
                break
        cancel.set()

    threading.Thread(target=listen, daemon=True).start()
    try:
        result, info = run_job(job, lambda done, total: send(progress=[done, total]), cancel.is_set)
    except Cancelled:
        send(cancelled=True)
        return 2
    except MedsegError as exc:
        send(error=str(exc), kind=type(exc).__name__)
        return 1
    except Exception as exc:  # a bug: its traceback goes to the log, its message to the caller
        import traceback

        traceback.print_exc()
        send(error=f"{type(exc).__name__}: {exc}", kind=type(exc).__name__)
        return 1
    send(result=result_to_json(result), model=asdict(info))
    return 0


# -- the caller ----------------------------------------------------------------------
def iter_predict_slide_in_process(job: SlideJob, command: list[str] | None = None):
    """Generator: the run of ``job`` in a child process; yields ``(done, total)`` (``(0, 0)``
    while the model loads, and again every ``POLL_SECONDS`` while the child is quiet) and returns
    ``(SlideResult, SlideModelInfo)``. Closing it cancels the child and waits until its files are
    removed. A failure in the child raises ``SlideProcessError`` with the child's message.
    ``command`` runs another child (tests)."""
    log = tempfile.NamedTemporaryFile("w+", prefix="medseg-slide-", suffix=".log", delete=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(command or [sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_read_messages, args=(child.stdout, inbox), daemon=True).start()
    finished = crashed = False
    try:
        try:
            child.stdin.write(json.dumps(asdict(job)) + "\n")
            child.stdin.flush()
        except OSError:  # the child died at once: said below, when its stdout closes
            pass
        step = (0, 0)
        yield step
        while True:
            try:
                message = inbox.get(timeout=POLL_SECONDS)
            except queue.Empty:
                yield step
                continue
            if message is None:  # the child's stdout closed without a result: it crashed
                crashed = True
                child.wait()
                raise SlideProcessError(f"The slide run stopped unexpectedly (exit code {child.returncode})."
                                        + _log_tail(log.name))
            if "progress" in message:
                step = tuple(message["progress"])
                yield step
            elif "error" in message:
                raise SlideProcessError(message["error"])
            elif "result" in message:
                finished = True
                return result_from_json(message["result"]), SlideModelInfo(**message["model"])
    finally:
        if not finished:
            _stop(child, inbox, job.out_dir)
        # the child exits on its own (tearing down torch takes a moment): reaped off this thread
        threading.Thread(target=child.wait, daemon=True).start()
        log.close()
        if not crashed:  # a crash's log stays for the user to read (its path is in the message)
            Path(log.name).unlink(missing_ok=True)


def _read_messages(stream, inbox: queue.Queue) -> None:
    for line in stream:
        try:
            inbox.put(json.loads(line))
        except ValueError:
            continue
    inbox.put(None)


def _stop(child: subprocess.Popen, inbox: queue.Queue, out_dir: str) -> None:
    """Cancel the child and wait for its answer (its files removed); kill it if it does not answer."""
    if child.poll() is None:
        try:
            child.stdin.write("cancel\n")
            child.stdin.close()
        except OSError:  # it is exiting already
            pass
        if not _answered(inbox, time.monotonic() + CANCEL_GRACE_SECONDS):
            child.kill()  # stuck: its temp files are removed below
            child.wait()
    from ..io.outputs import remove_stale_temps

    remove_stale_temps(out_dir)  # a killed child's temp files (the child's own cleanup removed the rest)


def _answered(inbox: queue.Queue, deadline: float) -> bool:
    """Whether the child answers a cancel (or ends) before ``deadline``."""
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = inbox.get(timeout=left)
        except queue.Empty:
            return False
        if message is None or "cancelled" in message or "error" in message:
            return True
    return False


def _log_tail(path: str) -> str:
    text = Path(path).read_text(errors="replace").strip()
    return f" Its log ({path}) ends: ...{text[-LOG_TAIL_CHARS:]}" if text else ""


def result_to_json(result: SlideResult) -> dict:
    data = asdict(result)
    data["files"] = {kind: str(path) for kind, path in result.files.items()}
    return data


def result_from_json(data: dict) -> SlideResult:
    data = dict(data)
    data["region"] = Region(**data["region"])
    data["files"] = {kind: Path(path) for kind, path in data["files"].items()}
    return SlideResult(**data)


if __name__ == "__main__":
    sys.exit(main())
