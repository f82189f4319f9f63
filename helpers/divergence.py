"""A run that diverges stops or is named, without a host sync per training step.

- `LossWatch.update(loss, step)`, every step, on the loss's device only: records the first step
  whose loss is not finite, and the first whose loss is more than `factor` times the median of the
  last `window` good losses (an explosion: orders of magnitude, not noise).
- `LossWatch.read()`: those records on the host (one sync); the LightningModule reads them every
  `CHECK_EVERY` steps, before validation and before every checkpoint, so a non-finite loss stops
  training within `CHECK_EVERY` steps and never reaches a checkpoint.
- `TrainingDiverged`: the one-line stop; `all_finite(tensors)`: the last guard before weights are
  written.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

CHECK_EVERY = 20  # steps between two host reads of the records (each read is one device sync)
EXPLOSION_FACTOR = 1e3  # a loss this many times its recent median has exploded
WINDOW = 50  # good losses the median is taken over


class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite; the message names the step, the LR and what to do."""


@dataclass(frozen=True)
class Records:
    """The first non-finite step (None: none) with its loss; the first explosion (None: none) with
    its loss and the median it was compared with."""
    nonfinite_step: int | None
    nonfinite_loss: float
    explosion_step: int | None
    explosion_loss: float
    explosion_median: float


class LossWatch:
    def __init__(self, window: int = WINDOW, factor: float = EXPLOSION_FACTOR):
        self.window, self.factor = window, factor
        self.recent: torch.Tensor | None = None  # [window] good losses, NaN where none yet
        self.state: torch.Tensor | None = None  # [5] the records, -1 for a step not seen

    def _start(self, device) -> None:
        self.recent = torch.full((self.window,), float("nan"), device=device)
        self.state = torch.tensor([-1.0, 0.0, -1.0, 0.0, 0.0], device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Record `loss` (0-d) of optimizer step `step`: tensor operations only, no sync."""
        if self.recent is None or self.recent.device != loss.device:
            self._start(loss.device)
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        median = torch.nanmedian(self.recent)  # NaN before the first good loss: no explosion
        exploded = finite & (loss > self.factor * median)
        first_bad = finite.logical_not() & (self.state[0] < 0)
        first_boom = exploded & (self.state[2] < 0)
        step_t = torch.full((), float(step), device=loss.device)  # a fill on the device, not a copy
        self.state = torch.where(
            torch.stack([first_bad, first_bad, first_boom, first_boom, first_boom]),
            torch.stack([step_t, loss, step_t, loss, median]), self.state)
        slot = step % self.window
        self.recent[slot] = torch.where(finite & ~exploded, loss, self.recent[slot])

    def read(self, gather=None) -> Records:
        """The records on the host (one sync). `gather`: a function stacking a tensor over DDP ranks
        (`strategy.all_gather`), so that every rank reads the earliest records of any rank."""
        if self.state is None:
            return Records(None, 0.0, None, 0.0, 0.0)
        state = self.state if gather is None else gather(self.state).reshape(-1, 5)
        rows = state.reshape(-1, 5).tolist()
        bad = [r for r in rows if r[0] >= 0]
        boom = [r for r in rows if r[2] >= 0]
        first_bad = min(bad, key=lambda r: r[0]) if bad else None
        first_boom = min(boom, key=lambda r: r[2]) if boom else None
        return Records(int(first_bad[0]) if first_bad else None, first_bad[1] if first_bad else 0.0,
                       int(first_boom[2]) if first_boom else None, first_boom[3] if first_boom else 0.0,
                       first_boom[4] if first_boom else 0.0)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating-point tensor holds only finite values (one sync)."""
    checks = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def stop_message(step: int, loss: float, lr: float) -> str:
    return (f"training stopped: the loss of step {step} is not finite ({loss}) at LR {lr:.3g}; no checkpoint "
            "of the weights after it is written and the earlier ones stay. Rerun with --resume latest to go "
            "on from the newest (a NaN from the data or from too high an LR comes back), or lower --max-lr "
            "and train in a new --run-dir")


def explosion_message(step: int, loss: float, median: float, lr: float) -> str:
    return (f"warning: the loss of step {step} ({loss:.3g}) is {loss / median:.0e} times its median over the "
            f"last steps ({median:.3g}) at LR {lr:.3g}: the run is diverging; lower --max-lr (--lr-find "
            "suggests one) and train in a new --run-dir")
