"""A slide run in a process of its own, driven as a step generator from the caller's thread.

Why a process: the run's pieces that hold Python's interpreter lock for a long stretch (writing
result blocks, tracing GeoJSON outlines, the watershed's Cython, importing the runtimes) stalled
napari's GUI thread for up to a second each when they ran in a worker thread of its process.
A child process shares no lock with the GUI: the caller's thread only waits on a pipe. The
child runs at a lower priority (``NICENESS``), so on a machine whose cores it fills the viewer
still paints and answers at once.

The child is ``python -m napari_medseg.inference.slide_process``: it reads jobs from stdin, one
JSON line each (``SlideJob``), and ``cancel`` lines; it writes JSON lines (progress, the result or
the error) to its own copy of stdout, every other print going to a log file. ``SlideProcess``
keeps one child for runs one after another, so the model loads once (seconds, a run); stdin
closing (``close``, ``IDLE_SECONDS`` without a job, or the caller's process gone) ends it. A
cancelled or failed run removes its files (``slide.iter_predict_slide``); a child that does not
answer a cancel is killed and its temp files are removed by the parent
(``io.outputs.remove_stale_temps``).

With a runtime (``auto`` on the CPU, as the Segment widget asks) the child holds no torch: it
loads the model from the runtime choice recorded on this machine (``runtime_record``), made first
in a short-lived process when there is none. A whole 16384² slide from the viewer: the child
peaked at 0.52 GiB (1.67 with torch), both processes together at 0.98 GiB (2.13).
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..child_messages import log_tail, message_sender, read_messages
from ..errors import MedsegError
from ..memory import limit_allocator_arenas
from ..steps import Cancelled, run_steps
from .regions import Region
from .slide import SlideResult

POLL_SECONDS = 0.25  # how often the caller gets a step (and a chance to cancel) while the child is quiet
CANCEL_GRACE_SECONDS = 30.0  # a child that has not answered a cancel by then is killed
# an idle child still holds its model and runtime (0.3 GB by a recorded runtime, ~1 GB with
# torch): ended after this long without a job; the next run starts a new one (the model loads again)
IDLE_SECONDS = 600.0
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
    marker_threshold: float | None = None  # None: the model's own (Segmenter.instance_settings)
    min_nucleus: int | None = None
    nuclei: bool = True
    min_object_size: int = 0
    max_hole_size: int = 0
    flag: str = "--out"
    threads: int | None = None  # the child's torch or runtime threads (None: their default, one per core)
    pixel_size_um: float | None = None  # in place of the slide's own (as medseg predict --pixel-size)


@dataclass
class SlideModelInfo:
    """What the caller needs to show a slide run's results: the model's classes, colours, the
    nucleus threshold that ran and the model's own nucleus settings."""

    classes: list[str]
    colors: list[list[int]]
    foreground_threshold: float | None
    instance_settings: dict = field(default_factory=dict)  # Segmenter.instance_settings, as fields


# -- the child ---------------------------------------------------------------------
def run_job(job: SlideJob, progress=None, should_cancel=None, loaded: dict | None = None):
    """The slide run of ``job`` in this process (the child's work; also usable directly): returns
    ``(SlideResult, SlideModelInfo)``. ``loaded`` keeps the last segmenter between calls, keyed by
    what it was loaded with, so a second region does not load the model again."""
    import numpy as np

    from ..io.slides import open_slide
    from .postprocess import PostprocessSettings
    from .rethreshold import Thresholds, apply_thresholds
    from .settings import TileSettings
    from .slide import predict_slide

    loaded = {} if loaded is None else loaded
    key = _loaded_key(job)
    if key not in loaded:
        loaded.clear()  # one model at a time: the old one's memory goes first
        loaded[key] = _load_segmenter(job, should_cancel)
    segmenter = loaded[key]
    tiles, instance_settings = apply_thresholds(
        segmenter, TileSettings(**job.tiles), Thresholds(job.nucleus_threshold, job.marker_threshold, job.min_nucleus))
    polygon = None if job.polygon is None else np.asarray(job.polygon, float)
    region = None if job.region is None else Region(*job.region)
    slide = open_slide(job.slide)
    if job.pixel_size_um:
        slide = replace(slide, pixel_size_um=job.pixel_size_um)
    result = predict_slide(segmenter, slide, job.out_dir, region, progress, should_cancel,
                           settings=tiles, instance_settings=instance_settings, nuclei=job.nuclei,
                           postprocess=PostprocessSettings(job.min_object_size, job.max_hole_size), polygon=polygon,
                           flag=job.flag)
    info = SlideModelInfo(list(segmenter.classes), [list(c) for c in segmenter.meta.colors],
                          segmenter.foreground_threshold, asdict(segmenter.instance_settings))
    return result, info


def _loaded_key(job: SlideJob) -> tuple:
    """What a loaded model is kept by: a checkpoint file by its size and modification time too
    (a training run's best.safetensors is rewritten in place: the old weights must not serve)."""
    return (job.model, checkpoint_stamp(job.model), job.device, job.backend, job.threads)


def checkpoint_stamp(model: str) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a checkpoint file, ``None`` for a name (``default``) or no file."""
    try:
        stat = os.stat(model)
    except (OSError, ValueError):
        return None
    return stat.st_size, stat.st_mtime_ns


def _load_segmenter(job: SlideJob, should_cancel=None):
    """The job's model, by the runtime alone where this machine has a record of its choice
    (``runtime_record``: no torch in this process, ~0.65 GB less); without one, the choice is made
    and recorded in a short-lived process first (a cancel kills it), so the record serves this and
    every later run. PyTorch models (``backend`` torch, a GPU, or a runtime that failed its check)
    load here as before."""
    from .runtime_record import iter_load_recorded
    from .segmenter import Segmenter

    segmenter = run_steps(iter_load_recorded(job.model, job.device, job.backend, job.threads),
                          should_cancel=should_cancel)
    if segmenter is not None:
        return segmenter
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    return Segmenter.load(job.model, device=job.device, backend=job.backend)


def main() -> int:
    """The child: jobs from stdin, one JSON line each, run one after another (the model stays
    loaded); JSON messages out. Ends when stdin closes (the parent is done, or gone)."""
    limit_allocator_arenas()  # before any thread allocates: flat memory over long runs (``memory``)
    if hasattr(os, "nice"):
        os.nice(NICENESS)
    send = message_sender()  # anything printed goes to the log, never into the messages
    jobs: queue.Queue = queue.Queue()
    # each job its own cancel: a cancel line is for the last job read (the caller runs one at a
    # time), even when it comes before that job starts (Run, then Cancel at once)
    cancels = [threading.Event()]

    def listen():  # a cancel line stops the job at its next step; stdin closed stops it and the child
        for line in sys.stdin:
            if line.strip() == "cancel":
                cancels[-1].set()
            elif line.strip():
                cancels.append(threading.Event())
                jobs.put((line, cancels[-1]))
        for event in cancels:
            event.set()
        jobs.put(None)

    threading.Thread(target=listen, daemon=True).start()
    loaded: dict = {}
    while (item := jobs.get()) is not None:
        line, cancel = item
        try:
            job = SlideJob(**json.loads(line))
        except (TypeError, ValueError) as exc:
            send(error=f"Bad slide job ({exc}).", kind=type(exc).__name__)
            continue
        reused = _loaded_key(job) in loaded
        try:
            result, info = run_job(job, lambda done, total: send(progress=[done, total]), cancel.is_set, loaded)
        except Cancelled:
            send(cancelled=True)
        except MedsegError as exc:
            send(error=str(exc), kind=type(exc).__name__)
        except Exception as exc:  # a bug: its traceback goes to the log, its message to the caller
            import traceback

            traceback.print_exc()
            send(error=f"{type(exc).__name__}: {exc}", kind=type(exc).__name__)
        else:
            send(result=result_to_json(result), model=asdict(info), reused_model=reused)
    return 0


# -- the caller ----------------------------------------------------------------------
class SlideProcess:
    """A child process that runs slide jobs one after another, keeping the last model loaded
    (loading it costs seconds a run). Started at the first ``run``, again after a crash or a
    kill; ``close`` ends it, as do ``idle_seconds`` without a run (its memory back; the next run
    starts another) and the caller's process ending (the child's stdin closes)."""

    def __init__(self, command: list[str] | None = None, idle_seconds: float = IDLE_SECONDS):
        self._command = command or [sys.executable, "-m", __name__]
        self._idle_seconds = idle_seconds
        self._idle_timer: threading.Timer | None = None
        self._child: subprocess.Popen | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._log: Path | None = None
        self._lock = threading.Lock()
        self.pid: int | None = None
        self.last_reused_model = False

    def _started(self) -> subprocess.Popen:
        if self._child is not None and self._child.poll() is None:
            return self._child
        fd, log = tempfile.mkstemp(prefix="medseg-slide-", suffix=".log")
        self._log, self._inbox = Path(log), queue.Queue()
        with os.fdopen(fd, "w") as log_file:
            self._child = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=log_file, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.pid = self._child.pid
        threading.Thread(target=read_messages, args=(self._child.stdout, self._inbox), daemon=True).start()
        return self._child

    def run(self, job: SlideJob):
        """Generator: the run of ``job`` in the child; yields ``(done, total)`` (``(0, 0)`` at once,
        and again every ``POLL_SECONDS`` while the child is quiet) and returns ``(SlideResult,
        SlideModelInfo)``. Closing it cancels the job and waits until its files are removed. A
        failure in the child raises ``SlideProcessError`` with the child's message."""
        with self._lock:
            self._stop_idle_timer()
            child, inbox = self._started(), self._inbox
        ended = False
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
                if message is None:  # the child's stdout closed without an answer: it crashed
                    ended = True
                    child.wait()
                    log, self._log = self._log, None  # kept for the user to read: its path is in the message
                    raise SlideProcessError(f"The slide run stopped unexpectedly (exit code {child.returncode})."
                                            + log_tail(log))
                if "progress" in message:
                    step = tuple(message["progress"])
                    yield step
                elif "error" in message:
                    ended = True
                    raise SlideProcessError(message["error"])
                elif "result" in message:
                    ended = True
                    self.last_reused_model = bool(message.get("reused_model"))
                    return result_from_json(message["result"]), SlideModelInfo(**message["model"])
        finally:
            if not ended:
                self._cancel(child, inbox, job.out_dir)
            self._start_idle_timer()

    def _cancel(self, child: subprocess.Popen, inbox: queue.Queue, out_dir: str) -> None:
        """Cancel the running job and wait for the child's answer (its files removed); kill the
        child if it does not answer. (A job that ended just before the cancel keeps its files.)"""
        try:
            child.stdin.write("cancel\n")
            child.stdin.flush()
        except OSError:  # it is exiting already
            pass
        if not _answered(inbox, time.monotonic() + CANCEL_GRACE_SECONDS):
            child.kill()  # stuck: its temp files are removed below
            child.wait()
        from ..io.outputs import remove_stale_temps

        remove_stale_temps(out_dir)  # a killed child's temp files (the child's own cleanup removed the rest)

    def _start_idle_timer(self) -> None:
        with self._lock:
            self._stop_idle_timer()
            if self._child is not None:
                timer = threading.Timer(self._idle_seconds, self._close_if_idle)
                timer.daemon = True
                self._idle_timer = timer
                timer.start()

    def _stop_idle_timer(self) -> None:  # with the lock held
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _close_if_idle(self) -> None:
        """The idle timer's end: the child goes unless a run started meanwhile (it stopped the timer)."""
        with self._lock:
            if self._idle_timer is not threading.current_thread():
                return
            self._idle_timer = None
            ended = self._detach()
        _end(*ended)

    def close(self) -> None:
        """End the child (it finishes at once when idle) and remove its log."""
        with self._lock:
            self._stop_idle_timer()
            ended = self._detach()
        _end(*ended)

    def _detach(self) -> tuple:  # with the lock held
        child, log = self._child, self._log
        self._child, self._log = None, None
        return child, log


def _end(child: subprocess.Popen | None, log: Path | None) -> None:
    """Close an idle child's stdin (it exits), reaped off the caller's thread; remove its log."""
    if child is not None:
        try:
            child.stdin.close()
        except OSError:
            pass
        threading.Thread(target=child.wait, daemon=True).start()
    if log is not None:
        log.unlink(missing_ok=True)


def iter_predict_slide_in_process(job: SlideJob, command: list[str] | None = None):
    """Generator: ``job`` in a child process of its own, ended afterwards (see ``SlideProcess.run``);
    ``command`` runs another child (tests)."""
    process = SlideProcess(command)
    try:
        return (yield from process.run(job))
    finally:
        process.close()


def _answered(inbox: queue.Queue, deadline: float) -> bool:
    """Whether the child ends the job (cancelled, failed, done or gone) before ``deadline``."""
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = inbox.get(timeout=left)
        except queue.Empty:
            return False
        if message is None or "progress" not in message:
            return True
    return False


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
