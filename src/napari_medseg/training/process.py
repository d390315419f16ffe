"""A training run in a process of its own, for a caller that must not hold torch (napari's).

Why a process: importing torch, torchvision and the trainer holds Python's interpreter lock for
up to a quarter second at a time (loading libtorch), and in napari's process the first fine-tune
of a session froze the window for 465-625 ms (``benchmarks/bench_gui.py``); the viewer also kept
torch's 0.66 GB for the rest of the session. In a child the caller only waits on a pipe.

The child is ``python -m napari_medseg.training.process``. The caller writes one JSON line (the
job: the config, where the labelled images and previews go), then ``stop`` lines; the child
writes JSON lines: ``update`` (``DataSplit`` / ``StartScored`` / ``BatchDone`` / ``EpochDone``), ``preview`` (the best checkpoint's
class map of a validation sample, as a ``.npy`` file), ``done`` (``TrainingDone``) or ``failed``
(the message, and the traceback of a bug). Arrays cross as files in a folder the caller owns;
everything else the child prints goes to its log. stdin closing (the caller gone) stops the run
after its current batch, as ``stop`` does, and the best checkpoint so far is kept.
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from ..child_messages import message_sender
from ..errors import MedsegError
from .config import TrainConfig
from .events import BatchDone, DataSplit, EpochDone, StartScored, TrainingDone
from .items import LabelledImage

UPDATES = {"BatchDone": BatchDone, "EpochDone": EpochDone, "DataSplit": DataSplit, "StartScored": StartScored}


# -- what crosses the boundary -------------------------------------------------------
def write_items(items: tuple[list[LabelledImage], list[str]], folder: Path) -> Path:
    """The labelled images (and class names) ``train(items=...)`` takes, as ``items.npz`` + JSON."""
    images, classes = items
    arrays, meta = {}, []
    for i, item in enumerate(images):
        arrays[f"image_{i}"], arrays[f"labels_{i}"] = item.image, item.labels
        if item.instances is not None:
            arrays[f"instances_{i}"] = item.instances
        meta.append({"name": item.name, "group": item.group, "dataset": item.dataset, "binary": item.binary,
                     "distance_trust": item.distance_trust, "instances": item.instances is not None})
    np.savez(folder / "items.npz", **arrays)
    (folder / "items.json").write_text(json.dumps({"items": meta, "classes": list(classes)}))
    return folder


def read_items(folder: Path) -> tuple[list[LabelledImage], list[str]]:
    described = json.loads((folder / "items.json").read_text())
    with np.load(folder / "items.npz") as arrays:
        images = [LabelledImage(m["name"], m["group"], arrays[f"image_{i}"], arrays[f"labels_{i}"],
                                arrays[f"instances_{i}"] if m["instances"] else None, m["dataset"], m["binary"],
                                m["distance_trust"]) for i, m in enumerate(described["items"])]
    return images, described["classes"]


def _plain(value):
    """JSON for an update's field: paths as text, numpy numbers as Python's."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def update_from_message(kind: str, data: dict):
    """An update the child sent, as the dataclass the trainer made."""
    if kind == "TrainingDone":
        data = {**data, "checkpoint": _path(data.get("checkpoint")), "resume": _path(data.get("resume"))}
        return TrainingDone(**{f.name: data[f.name] for f in fields(TrainingDone) if f.name in data})
    cls = UPDATES[kind]
    return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def _path(value) -> Path | None:
    return None if value is None else Path(value)


# -- shared with the in-thread run ------------------------------------------------------
def keep_threshold(checkpoint: Path, threshold: float) -> None:
    """Give a fine-tuned checkpoint its start model's foreground threshold where training left
    none (``medseg tune-threshold`` re-tunes it on the validation images)."""
    import torch

    from ..models.checkpoint import load_checkpoint, save_checkpoint
    from ..models.weights import read_state_dict

    model, meta = load_checkpoint(checkpoint)
    if meta.foreground_threshold is not None:
        return
    meta.foreground_threshold = float(threshold)
    half = any(t.dtype == torch.float16 for t in read_state_dict(checkpoint).values())  # keep the stored precision
    save_checkpoint(checkpoint, model, meta, half=half)


def train_keeping_threshold(cfg: TrainConfig, on_update, should_stop, items,
                            start_threshold: float | None) -> TrainingDone:
    """``train()``; a fine-tune then keeps its start model's threshold (``keep_threshold``)."""
    from .trainer import train

    outcome = train(cfg, on_update=on_update, should_stop=should_stop, items=items)
    if start_threshold is not None and outcome.checkpoint is not None:
        keep_threshold(Path(outcome.checkpoint), start_threshold)
    return outcome


def pick_preview_item(cfg: TrainConfig, items, val_groups: list[str]) -> LabelledImage | None:
    """The first sample of the validation groups the trainer recorded (else the first sample)."""
    from ..io.dataset import open_dataset
    from ..io.images import to_rgb_float

    if items is not None:
        return next((it for it in items[0] if it.group in val_groups), items[0][0])
    for folder in (spec.path for spec in cfg.dataset_specs()):  # grouped as the trainer groups them
        ds = open_dataset(folder, require_labels=True)
        for stem in ds.stems:
            group = ds.group(stem, cfg.data.group_pattern)
            if group in val_groups or not val_groups:
                sample = ds.load(stem)
                return LabelledImage(stem, group, to_rgb_float(sample.image, cfg.model.in_channels),
                                     sample.labels.astype(np.uint8))
    return None


class PreviewMaker:
    """The best checkpoint's class map of one validation sample (picked once), made on the CPU
    (the training device is left alone)."""

    def __init__(self, cfg: TrainConfig, items):
        self.cfg, self.items, self.item = cfg, items, None

    def __call__(self):
        """``(item, class map, segmenter)``; the item is None when there is no sample."""
        from ..inference.segmenter import Segmenter

        segmenter = Segmenter.load(Path(self.cfg.out_dir) / "best.safetensors", device="cpu")
        try:
            if self.item is None:
                self.item = pick_preview_item(self.cfg, self.items, list(segmenter.meta.data.get("val_groups") or []))
            return self.item, (None if self.item is None else segmenter.segment(self.item.image)), segmenter
        finally:
            segmenter.release()


# -- the child --------------------------------------------------------------------------
def main() -> int:
    send = message_sender()  # anything printed goes to the log, never into the messages
    job = json.loads(sys.stdin.readline() or "null")
    if not isinstance(job, dict):
        send(failed="No training job was given.", traceback=None)
        return 2
    stop = threading.Event()

    def listen():  # a stop line, or stdin closed (the caller gone), ends the run after its batch
        for line in sys.stdin:
            if line.strip() == "stop":
                stop.set()
        stop.set()

    threading.Thread(target=listen, daemon=True).start()
    work = Path(job["work"])
    try:
        cfg = TrainConfig.from_dict(job["cfg"])
        items = read_items(work) if job.get("items") else None
        preview = PreviewMaker(cfg, items) if job.get("preview") else None

        def emit(update) -> None:
            send(update=type(update).__name__, fields=_plain(asdict(update)))
            if preview is not None and isinstance(update, EpochDone) and update.best:
                _send_preview(send, preview, update.epoch, work)

        outcome = train_keeping_threshold(cfg, emit, stop.is_set, items, job.get("start_threshold"))
    except MedsegError as exc:
        send(failed=str(exc), traceback=None)
        return 1
    except Exception as exc:  # a bug: its traceback goes to the caller, which shows it
        traceback.print_exc()
        send(failed=str(exc) or type(exc).__name__, traceback="".join(traceback.format_exception(exc)))
        return 1
    send(done=_plain(asdict(outcome)))
    return 0


def _send_preview(send, preview: PreviewMaker, epoch: int, work: Path) -> None:
    """A preview is a view, never a reason to stop training: its errors are swallowed."""
    try:
        item, labels, segmenter = preview()
    except Exception:  # noqa: BLE001
        return
    if item is None:
        return
    path = work / f"preview_{epoch}.npy"
    np.save(path, labels)
    send(preview={"epoch": epoch, "name": item.name, "labels": str(path), "classes": segmenter.classes,
                  "colors": _plain(segmenter.meta.colors), "image": _saved_image(item, work)})


def _saved_image(item: LabelledImage, work: Path) -> str:
    path = work / "preview_image.npy"
    if not path.exists():
        np.save(path, item.image)
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
