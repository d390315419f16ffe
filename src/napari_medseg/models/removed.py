"""What stands where an unused encoder module was (``registry.remove_unused_encoder_modules``)."""

from __future__ import annotations

from torch import nn


class RemovedModule(nn.Module):
    """Holds no weights; calling it is a bug (the module it replaced was measured as unused)."""

    def __init__(self, name: str):
        super().__init__()
        self.removed_name = name

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.removed_name} was removed as unused at this encoder_depth, but was called.")

    def extra_repr(self) -> str:
        return f"removed: {self.removed_name}"
