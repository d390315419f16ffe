"""One training run for the Train widget, free of Qt: ``train()`` in a process of its own
(``training.process``), its typed updates read from a pipe, and the run folder it writes into.

As in careamics-napari, the trainer's updates (``BatchDone``, ``EpochDone``, ``TrainingDone``)
and this module's ``Preview`` and ``TrainingFailed`` reach the widget through ``updates()``, the
generator a napari thread worker runs. The process keeps torch out of napari's: importing it
there froze the window for up to 0.6 s at the first fine-tune of a session. Stop asks the
process to end after the current batch; the best checkpoint written so far is kept.
``run_here`` trains in the caller's thread instead (tests, scripts).
"""

from __future__ import annotations

import gc
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..child_messages import log_tail, read_messages
from ..errors import MedsegError
from ..training.config import BEST_NAME, TrainConfig
from ..training.events import EpochDone, TrainingDone
from ..training.items import LabelledImage
from ..training.process import PreviewMaker, train_keeping_threshold, update_from_message, write_items
from .common import WidgetInputError
from .torch_import import import_torch_dynamo


TRAINING_END_SECONDS = 60.0  # a training process that has not ended this long after its run is killed


@dataclass
class TrainingFailed:
    """Training could not start or could not go on; nothing was registered.

    ``error`` is the exception when it is a bug (not a ``MedsegError``): the widget shows its
    traceback. Its frames' locals are cleared, so it holds no model or tensors.
    """

    message: str
    error: BaseException | None = None
    # the best checkpoint of the epochs before the failure (a NaN loss at a later epoch): kept and listed
    checkpoint: Path | None = None


@dataclass
class Preview:
    """The best checkpoint's prediction on a validation sample (or a training one, without validation)."""

    epoch: int
    name: str
    labels: np.ndarray  # full shape of the labels layer (layers) or of the sample (folder)
    classes: list[str]
    colors: list
    image: np.ndarray | None = None  # the sample itself, when it is not in the viewer (folder data)


@dataclass
class LayerSource:
    """Where the tiles of painted layers came from, to place a preview back on the labels layer."""

    shape: tuple
    placement: dict  # the labels layer's scale, translate, units and affine (``layers.placement``)
    regions: dict = field(default_factory=dict)  # item name -> (plane index or None, y0, y1, x0, x1)


def release_memory() -> None:
    """Give cached GPU memory back once the trainer's model and optimizer are gone."""
    torch = sys.modules.get("torch")
    if torch is None:  # the run failed before torch loaded: nothing to give back
        return
    if torch.cuda.is_available():
        gc.collect()  # tensors caught in reference cycles (an exception's traceback) go too
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        gc.collect()
        mps.empty_cache()


def make_run_dir(base: Path, name: str) -> tuple[Path, Path]:
    """A new, writable folder ``base/name`` (``name-2``, ... if taken) and the topmost folder
    this created (for ``remove_run_dir``)."""
    run_dir, n = base / name, 2
    while run_dir.exists():
        run_dir, n = base / f"{name}-{n}", n + 1
    top = run_dir
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    try:
        run_dir.mkdir(parents=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as exc:
        remove_run_dir(run_dir, top)
        raise WidgetInputError(f"Cannot write the model to '{run_dir}': {exc.strerror or exc}.") from exc
    return run_dir, top


def saved_best(run_dir: Path) -> Path | None:
    """The best checkpoint a run wrote into its own (new) folder, or ``None`` if it wrote none."""
    best = run_dir / BEST_NAME
    return best if best.is_file() else None


def remove_run_dir(run_dir: Path, top: Path) -> None:
    """Delete a run's folder, then the parents this run created up to ``top`` while they are empty."""
    shutil.rmtree(run_dir, ignore_errors=True)
    folder = run_dir.parent
    while folder != top.parent and folder.is_relative_to(top):
        try:
            folder.rmdir()
        except OSError:  # not empty (another run's folder) or already gone
            break
        folder = folder.parent


class TrainingProcessError(RuntimeError):
    """A bug in the training process: its message is that process's traceback."""


def _tell(child: subprocess.Popen, line: str) -> bool:
    try:
        child.stdin.write(line + "\n")
        child.stdin.flush()
        return True
    except (OSError, ValueError):  # it has ended, or its stdin is closed
        return False


def _end_process(child: subprocess.Popen, run_dir: Path, cleanup: Path | None, work: Path, log: Path) -> None:
    """Wait for the training process to end (killed after ``TRAINING_END_SECONDS``), then remove
    the run's folder if it left no checkpoint, the exchange folder, and the log of a clean run.

    Whether a checkpoint is left is read from the folder once the process has ended: a run that
    failed, or was stopped by the viewer closing, after a best epoch keeps that epoch's file."""
    try:
        child.wait(timeout=TRAINING_END_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    if cleanup is not None and saved_best(run_dir) is None:
        remove_run_dir(run_dir, cleanup)
    shutil.rmtree(work, ignore_errors=True)
    if child.returncode == 0:
        log.unlink(missing_ok=True)


def failure(exc: Exception) -> TrainingFailed:
    """The update for a run that raised ``exc``: its message, and the exception itself if it is a bug."""
    if isinstance(exc, MedsegError):
        return TrainingFailed(str(exc))
    traceback.clear_frames(exc.__traceback__)  # keep the traceback's lines, free the tensors in its frames
    return TrainingFailed(str(exc) or type(exc).__name__, exc)


class TrainingJob:
    """One training run: ``updates()`` is the generator a napari ``thread_worker`` runs;
    ``run_here(handle)`` trains in the caller's thread and hands each update to ``handle`` at
    once (tests, scripts)."""

    def __init__(self, cfg: TrainConfig, items: tuple[list[LabelledImage], list[str]] | None = None,
                 preview: bool = True, layer_source: LayerSource | None = None,
                 cleanup: Path | None = None, start_threshold: float | None = None):
        self.cfg = cfg
        self.start_threshold = start_threshold  # fine-tuning keeps the start model's operating point
        self.items = items  # None: the trainer reads cfg.data.dataset itself
        self.preview = preview
        self.layer_source = layer_source
        self._cleanup = cleanup  # the topmost folder this run created: removed (if empty) with no checkpoint
        self._stop = threading.Event()
        self._previews = PreviewMaker(cfg, items)  # in-thread runs (``run_here``)
        self.log: Path | None = None  # the training process's log (``updates``)

    # -- control --------------------------------------------------------------------------
    def stop(self) -> None:
        """End after the current batch; the best checkpoint so far is kept."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    # -- training in the caller's thread (``run_here``) -----------------------------------------
    def _train(self, emit: Callable[[object], None]) -> None:
        """Always ends with one ``TrainingDone`` or ``TrainingFailed``; frees GPU memory first."""
        outcome: object
        try:
            # the trainer, and torch with it, loads here in the run's thread: the widget opens without it
            import_torch_dynamo()  # before the trainer imports torchvision: see torch_import
            outcome = train_keeping_threshold(self.cfg, emit, self._stop.is_set, self.items, self.start_threshold)
        except Exception as exc:  # noqa: BLE001 - ends the run; the widget shows a message or a traceback
            outcome = self._with_best(failure(exc))
        finally:
            release_memory()
        if self._cleanup is not None and getattr(outcome, "checkpoint", None) is None:
            remove_run_dir(Path(self.cfg.out_dir), self._cleanup)
        emit(outcome)

    def _with_best(self, failed: TrainingFailed) -> TrainingFailed:
        """``failed`` with the best checkpoint the run wrote before it failed, if any."""
        failed.checkpoint = saved_best(Path(self.cfg.out_dir))
        return failed

    # -- the consumer side ----------------------------------------------------------------------
    def _follow(self, update) -> list:
        """The update and whatever the widget should see after it (a fresh preview)."""
        out = [update]
        if isinstance(update, EpochDone) and update.best and self.preview:
            preview = self._make_preview(update.epoch)
            if preview is not None:
                out.append(preview)
        return out

    def _make_preview(self, epoch: int) -> Preview | None:
        """The best checkpoint's class map of the preview sample; ``None`` if it cannot be made.

        A preview is a view, never a reason to stop training: its errors are swallowed.
        """
        try:
            item, pred, segmenter = self._previews()
        except Exception:  # noqa: BLE001
            return None
        if item is None:
            return None
        return self._placed(Preview(epoch, item.name, pred, segmenter.classes, segmenter.meta.colors, item.image))

    def _placed(self, preview: Preview) -> Preview:
        """A preview of painted layers goes back into the painted layer's frame (no image of its own)."""
        if self.layer_source is None:
            return preview
        p, y0, y1, x0, x1 = self.layer_source.regions[preview.name]
        full = np.zeros(self.layer_source.shape, np.uint8)
        (full if p is None else full[p])[y0:y1, x0:x1] = preview.labels
        preview.labels, preview.image = full, None
        return preview

    def updates(self):
        """Generator for a napari thread worker: training in a process of its own
        (``training.process``: napari's process never imports torch for it), its updates yielded
        until it ends. Closed early (the viewer closed), it asks the run to end after its batch."""
        yield from self._updates_from_process(Path(tempfile.mkdtemp(prefix="medseg-training-")))

    def _updates_from_process(self, work: Path):
        if self.items is not None:
            write_items(self.items, work)
        job = {"cfg": self.cfg.to_dict(), "items": self.items is not None, "preview": self.preview,
               "start_threshold": self.start_threshold, "work": str(work)}
        fd, log = tempfile.mkstemp(prefix="medseg-training-", suffix=".log")
        self.log = Path(log)
        with os.fdopen(fd, "w") as log_file:
            child = subprocess.Popen([sys.executable, "-m", "napari_medseg.training.process"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log_file, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        inbox: queue.Queue = queue.Queue()
        threading.Thread(target=read_messages, args=(child.stdout, inbox), daemon=True).start()
        stop_sent, outcome = False, None
        try:
            child.stdin.write(json.dumps(job, default=str) + "\n")
            child.stdin.flush()
            while outcome is None:
                if self._stop.is_set() and not stop_sent:
                    stop_sent = _tell(child, "stop")
                try:
                    message = inbox.get(timeout=0.2)
                except queue.Empty:
                    if child.poll() is not None and inbox.empty():
                        outcome = self._with_best(TrainingFailed(
                            f"The training process ended without a result (exit code {child.returncode})."
                            f"{log_tail(self.log)}"))
                        yield outcome
                    continue
                for update in self._from_message(message):
                    if isinstance(update, (TrainingDone, TrainingFailed)):
                        outcome = update
                    yield update
        finally:  # also when the worker is quit (viewer closed): the run ends after its batch
            if outcome is None:
                _tell(child, "stop")
            try:
                child.stdin.close()  # a child that missed the stop line ends on this too
            except OSError:
                pass
            # the process finishes on its own (seconds: torch's teardown); the worker does not wait
            # for it, so closing the viewer right after a run never outlives the worker's signals.
            # Not a daemon: Python's exit waits for it, else the process's files (the painted tiles)
            # and an empty run folder were left behind whenever napari quit within those seconds
            threading.Thread(target=_end_process, args=(child, Path(self.cfg.out_dir), self._cleanup, work, self.log),
                             daemon=False).start()

    def _from_message(self, message) -> list:
        """The updates a message of the training process stands for (None: its output ended)."""
        if not isinstance(message, dict):
            return []
        if "update" in message:
            return [update_from_message(message["update"], message["fields"])]
        if "preview" in message:
            shown = message["preview"]
            labels = np.load(shown["labels"])
            image = np.load(shown["image"]) if shown.get("image") else None
            return [self._placed(Preview(shown["epoch"], shown["name"], labels, shown["classes"], shown["colors"],
                                         image))]
        if "done" in message:
            return [update_from_message("TrainingDone", message["done"])]
        if "failed" in message:
            error = None if message.get("traceback") is None else TrainingProcessError(message["traceback"])
            return [self._with_best(TrainingFailed(message["failed"], error))]
        return []

    def run_here(self, handle: Callable[[object], None]) -> None:
        def emit(update):
            for item in self._follow(update):
                handle(item)

        self._train(emit)
