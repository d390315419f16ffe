"""An exponential moving average of the weights (``ema_decay``), kept beside the trained network.

After every optimiser step the average moves towards the network by ``1 - decay`` (torch's
``AveragedModel`` with its EMA rule; batch-norm statistics are averaged too, so the average is
a network that runs as it is). Validation, the best checkpoint and everything after the run use
the average: it is the trajectory's smoothed weights, steadier from epoch to epoch than the
last step's, which is what a validation that picks one epoch by a noisy figure needs. The
resume file carries it, so a resumed run goes on with the same average.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

STATE_PREFIX = "ema."  # the average's tensors in a resume file
STEPS_KEY = "ema_steps"  # how many steps it has averaged, in the resume file's JSON


class WeightAverage:
    """``update(model)`` after each optimiser step; ``model`` is the averaged network."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"decay must lie strictly between 0 and 1, got {decay!r}")
        self.decay = decay
        self._averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self._averaged.requires_grad_(False)

    @property
    def model(self) -> torch.nn.Module:
        return self._averaged.module

    @property
    def steps(self) -> int:
        return int(self._averaged.n_averaged)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards ``model`` (the first call copies it); integer buffers such as
        batch norm's step count are copied, not averaged."""
        self._averaged.update_parameters(model)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            if not (mine.is_floating_point() or mine.is_complex()):
                mine.copy_(theirs)

    def state(self) -> tuple[dict[str, torch.Tensor], int]:
        """(the average's tensors keyed for a resume file, steps averaged)."""
        tensors = {STATE_PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in self.model.state_dict().items()}
        return tensors, self.steps

    def load_state(self, tensors: dict[str, torch.Tensor], steps: int) -> None:
        state = {k[len(STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
        self.model.load_state_dict(state)
        self._averaged.n_averaged.fill_(int(steps))
