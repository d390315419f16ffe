"""Models trained in this napari session, shared by the Train and Segment widgets.

The Train widget adds each finished model here; every widget that offers a model choice
lists these names and resets its choices when ``trained_models.changed`` fires.
"""

from __future__ import annotations

from pathlib import Path

from psygnal import Signal

TRAINED_PREFIX = "trained: "
DEFAULT_MODEL = "default (shipped)"  # the model choices every widget offers besides the trained ones
FILE_MODEL = "checkpoint file..."


class TrainedModels:
    """Name -> checkpoint path, in the order the models were trained; missing files drop out."""

    changed = Signal()

    def __init__(self):
        self._paths: dict[str, Path] = {}

    def add(self, checkpoint: str | Path, name: str) -> str:
        """Register a checkpoint under ``'trained: <name>'`` (suffixed if that name is taken)."""
        checkpoint = Path(checkpoint)
        label, n = f"{TRAINED_PREFIX}{name}", 2
        while label in self._paths and self._paths[label] != checkpoint:
            label, n = f"{TRAINED_PREFIX}{name} ({n})", n + 1
        self._paths[label] = checkpoint
        self.changed.emit()
        return label

    def names(self) -> list[str]:
        return [name for name, path in self._paths.items() if path.is_file()]

    def path(self, name: str) -> Path | None:
        path = self._paths.get(name)
        return path if path is not None and path.is_file() else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.path(name) is not None


trained_models = TrainedModels()
