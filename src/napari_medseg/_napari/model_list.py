"""Trained models, shared by the Train and Segment widgets: those trained in this session, and
those saved in the models folder by earlier sessions (``MODELS_DIR``, the Train widget's default
"save in"; ``MEDSEG_MODELS_DIR`` moves it).

The Train widget adds each finished model here; every widget that offers a model choice
lists these names and resets its choices when ``trained_models.changed`` fires.
"""

from __future__ import annotations

import os
from pathlib import Path

from psygnal import Signal

TRAINED_PREFIX = "trained: "
DEFAULT_MODEL = "default (shipped)"  # the model choices every widget offers besides the trained ones
FILE_MODEL = "checkpoint file..."
MODELS_DIR = Path(os.environ.get("MEDSEG_MODELS_DIR") or Path.home() / "napari-medseg" / "models")


def saved_models(folder: Path | None = None) -> dict[str, Path]:
    """``'trained: <run>' -> <run>/best.safetensors`` for each training run in the models folder,
    newest first: the name the Train widget gave it in the session that trained it (it had been
    'saved: <run>' in later sessions, a name the Train widget's status never said)."""
    folder = Path(folder or MODELS_DIR).expanduser()
    runs = sorted(folder.glob("*/best.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True) \
        if folder.is_dir() else []
    return {f"{TRAINED_PREFIX}{p.parent.name}": p for p in runs}


class TrainedModels:
    """Name -> checkpoint path, in the order the models were trained; missing files drop out."""

    changed = Signal()

    def __init__(self):
        self._paths: dict[str, Path] = {}

    def add(self, checkpoint: str | Path, name: str) -> str:
        """Register a checkpoint under ``'trained: <name>'`` (suffixed if that name is taken)."""
        checkpoint = Path(checkpoint).resolve()
        label, n = f"{TRAINED_PREFIX}{name}", 2
        taken = {**saved_models(), **self._paths}  # a run of that name in the models folder is another model
        while Path(taken.get(label, checkpoint)).resolve() != checkpoint:
            label, n = f"{TRAINED_PREFIX}{name} ({n})", n + 1
        self._paths[label] = checkpoint
        self.changed.emit()
        return label

    def _all(self) -> dict[str, Path]:
        """This session's models, then the models folder's others (each checkpoint once)."""
        mine = set(self._paths.values())
        others = {n: p for n, p in saved_models().items() if p.resolve() not in mine and n not in self._paths}
        return {**self._paths, **others}

    def names(self) -> list[str]:
        return [name for name, path in self._all().items() if path.is_file()]

    def path(self, name: str) -> Path | None:
        path = self._all().get(name)
        return path if path is not None and path.is_file() else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.path(name) is not None


trained_models = TrainedModels()


def follow_trained_models(combo) -> None:
    """Refresh ``combo``'s choices whenever the model list changes, until its Qt widget is gone
    (closed with its viewer: the global list must not call into it)."""

    def refresh():
        try:
            # magicgui appends a new choice at the end (after 'checkpoint file...'): remade in order
            with combo.changed.blocked():
                value = combo.value
                combo.native.clear()
                combo.reset_choices()
                if value in combo.choices:
                    combo.value = value
        except RuntimeError:  # "wrapped C/C++ object ... has been deleted"
            trained_models.changed.disconnect(refresh)

    trained_models.changed.connect(refresh)
