"""One training run for the Train widget, free of Qt: ``train()`` in its own thread, its typed
updates through a queue, and the run folder it writes into.

As in careamics-napari, the trainer's updates (``BatchDone``, ``EpochDone``, ``TrainingDone``)
and this module's ``Preview`` and ``TrainingFailed`` travel through a queue; ``updates()`` is
the generator a napari thread worker runs to hand them to the GUI thread. Stop sets an event
that the trainer checks before each batch, so a run ends after the current batch and keeps the
best checkpoint written so far.
"""

from __future__ import annotations

import gc
import queue
import shutil
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import MedsegError
from ..io.dataset import open_dataset, source_group
from ..io.images import to_rgb_float
from ..training.config import TrainConfig
from ..training.events import EpochDone, TrainingDone
from ..training.items import LabelledImage
from .common import WidgetInputError
from .torch_import import import_torch_dynamo


@dataclass
class TrainingFailed:
    """Training could not start or could not go on; nothing was registered.

    ``error`` is the exception when it is a bug (not a ``MedsegError``): the widget shows its
    traceback. Its frames' locals are cleared, so it holds no model or tensors.
    """

    message: str
    error: BaseException | None = None


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
    scale: tuple
    translate: tuple
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


def keep_threshold(checkpoint: Path, threshold: float) -> None:
    """Give a fine-tuned checkpoint its start model's foreground threshold where training left
    none (``medseg tune-threshold`` re-tunes it on the validation images)."""
    from ..models.checkpoint import load_checkpoint, save_checkpoint
    from ..models.weights import read_state_dict
    import torch

    model, meta = load_checkpoint(checkpoint)
    if meta.foreground_threshold is not None:
        return
    meta.foreground_threshold = float(threshold)
    half = any(t.dtype == torch.float16 for t in read_state_dict(checkpoint).values())  # keep the stored precision
    save_checkpoint(checkpoint, model, meta, half=half)


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
        self._queue: queue.Queue = queue.Queue()
        self._preview_item: LabelledImage | None = None

    # -- control --------------------------------------------------------------------------
    def stop(self) -> None:
        """End after the current batch; the best checkpoint so far is kept."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    # -- the training thread ------------------------------------------------------------------
    def _train(self, emit: Callable[[object], None]) -> None:
        """Always ends with one ``TrainingDone`` or ``TrainingFailed``; frees GPU memory first."""
        outcome: object
        try:
            # the trainer, and torch with it, loads here in the run's thread: the widget opens without it
            import_torch_dynamo()  # before the trainer imports torchvision: see torch_import
            from ..training.trainer import train

            outcome = train(self.cfg, on_update=emit, should_stop=self._stop.is_set, items=self.items)
            if self.start_threshold is not None and getattr(outcome, "checkpoint", None) is not None:
                keep_threshold(Path(outcome.checkpoint), self.start_threshold)
        except Exception as exc:  # noqa: BLE001 - ends the run; the widget shows a message or a traceback
            outcome = failure(exc)
        finally:
            release_memory()
        if self._cleanup is not None and getattr(outcome, "checkpoint", None) is None:
            remove_run_dir(Path(self.cfg.out_dir), self._cleanup)
        emit(outcome)

    def _pick_preview_item(self, val_groups: list[str]) -> LabelledImage | None:
        """The first sample of the validation groups the trainer recorded (else the first sample)."""
        if self.items is not None:
            return next((it for it in self.items[0] if it.group in val_groups), self.items[0][0])
        for folder in (spec.path for spec in self.cfg.dataset_specs()):  # grouped as the trainer groups them
            ds = open_dataset(folder, require_labels=True)
            for stem in ds.stems:
                group = source_group(stem, ds.root.name, self.cfg.data.group_pattern)
                if group in val_groups or not val_groups:
                    sample = ds.load(stem)
                    return LabelledImage(stem, group, to_rgb_float(sample.image, self.cfg.model.in_channels),
                                         sample.labels.astype(np.uint8))
        return None

    # -- the consumer side ----------------------------------------------------------------------
    def _follow(self, update) -> list:
        """The update and whatever the widget should see after it (a fresh preview)."""
        out = [update]
        if isinstance(update, EpochDone) and update.best and self.preview:
            preview = self._make_preview(update.epoch)
            if preview is not None:
                out.append(preview)
        return out

    def _predict_preview(self):
        """(preview item, its class map, the segmenter) with the best checkpoint so far."""
        from ..inference.segmenter import Segmenter

        # on the CPU: the training device is left alone
        segmenter = Segmenter.load(Path(self.cfg.out_dir) / "best.safetensors", device="cpu")
        try:
            if self._preview_item is None:
                self._preview_item = self._pick_preview_item(list(segmenter.meta.data.get("val_groups") or []))
            item = self._preview_item
            return item, (None if item is None else segmenter.segment(item.image)), segmenter
        finally:
            segmenter.release()

    def _make_preview(self, epoch: int) -> Preview | None:
        """The best checkpoint's class map of the preview sample; ``None`` if it cannot be made.

        A preview is a view, never a reason to stop training: its errors are swallowed.
        """
        try:
            item, pred, segmenter = self._predict_preview()
        except Exception:  # noqa: BLE001
            return None
        if item is None:
            return None
        image = item.image
        if self.layer_source is not None:  # back into the painted layer's frame
            p, y0, y1, x0, x1 = self.layer_source.regions[item.name]
            full = np.zeros(self.layer_source.shape, np.uint8)
            (full if p is None else full[p])[y0:y1, x0:x1] = pred
            pred, image = full, None
        return Preview(epoch, item.name, pred, segmenter.classes, segmenter.meta.colors, image)

    def updates(self):
        """Generator for a napari thread worker: start training, yield its updates until it ends."""
        thread = threading.Thread(target=self._train, args=(self._queue.put,), name="napari-medseg-training",
                                  daemon=True)
        thread.start()
        try:
            while True:
                try:
                    update = self._queue.get(timeout=0.2)
                except queue.Empty:
                    if not thread.is_alive() and self._queue.empty():
                        yield TrainingFailed("The training thread ended without a result.")
                        return
                    continue
                yield from self._follow(update)
                if isinstance(update, (TrainingDone, TrainingFailed)):
                    return
        finally:  # also when the worker is quit (viewer closed): end training, wait for it
            self._stop.set()
            thread.join()

    def run_here(self, handle: Callable[[object], None]) -> None:
        def emit(update):
            for item in self._follow(update):
                handle(item)

        self._train(emit)
