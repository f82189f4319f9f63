"""The LR range test (torch-lr-finder) on the real training loader, leaving the model as it was.

Which max LR to take from the curve. torch-lr-finder suggests the LR where the smoothed loss falls
fastest. On a short test (30-100 steps, a noisy detection loss) that point can sit right next to
the blow-up: the session-1 smoke run suggested 6e-2 for Adam, where training diverges. So the LR
used (`LRFinderResult.max_lr`) is the steepest-descent LR capped at a tenth of the LR of the lowest
smoothed loss (fastai's "minimum / 10" rule): always on the falling part of the curve, a decade
short of where the loss turns up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from matplotlib.figure import Figure
from torch_lr_finder import LRFinder, TrainDataLoaderIter

from .loss import YoloLoss
from .targets import build_targets


class _YoloBatches(TrainDataLoaderIter):
    """Batches of (images, boxes [N,6], ...) as (inputs, labels) for torch-lr-finder."""

    def inputs_labels_from_batch(self, batch):
        return batch[0], batch[1]


class _TargetsThenLoss(torch.nn.Module):
    """criterion(outputs, boxes): targets are built for the batch's own size, as in training."""

    def __init__(self, loss: YoloLoss):
        super().__init__()
        self.loss = loss

    def forward(self, outputs: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        coarse = outputs[0]
        size = (coarse.shape[2] * 32, coarse.shape[3] * 32)
        return self.loss(outputs, build_targets(boxes, coarse.shape[0], size))


def choose_max_lr(lrs, losses, steepest: float | None, skip_start: int = 0, skip_end: int = 0) -> float | None:
    """min(steepest-descent LR, LR of the lowest smoothed loss / 10) over the trimmed curve (see the
    module docstring); whichever exists if only one does; None for an empty curve."""
    n = len(lrs)
    kept = range(skip_start, n - skip_end) if n - skip_end > skip_start else range(n)
    if not kept:
        return steepest
    lowest = min(kept, key=lambda i: losses[i])
    cap = lrs[lowest] / 10
    return cap if steepest is None else min(steepest, cap)


@dataclass
class LRFinderResult:
    lrs: list[float]
    losses: list[float]  # smoothed, as torch-lr-finder records them
    suggestion: float | None  # steepest descent of the smoothed loss (torch-lr-finder's rule)
    figure: Figure
    max_lr: float | None = None  # the LR to train with: `choose_max_lr`


def find_lr(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_loader, loss: YoloLoss | None = None,
            start_lr: float = 1e-7, end_lr: float = 1.0, num_iter: int = 100,
            device: str | torch.device = "cpu", amp: bool = False) -> LRFinderResult:
    """Run the range test; the model's and optimizer's states are restored afterwards."""
    amp_kwargs = {}
    if amp and torch.device(device).type == "cuda":
        amp_kwargs = {"amp_backend": "torch", "amp_config": {"device_type": "cuda", "dtype": torch.float16}}
    finder = LRFinder(model, optimizer, _TargetsThenLoss(loss or YoloLoss()), device=device, **amp_kwargs)
    try:
        finder.range_test(_YoloBatches(train_loader), start_lr=start_lr, end_lr=end_lr, num_iter=num_iter)
        figure = Figure(figsize=(6, 4))
        ax = figure.add_subplot()
        lrs, losses = list(finder.history["lr"]), list(finder.history["loss"])
        n = len(lrs)
        skip_start, skip_end = min(10, n // 4), min(5, n // 8)  # torch-lr-finder's defaults, shrunk for short tests
        try:
            _, suggestion = finder.plot(ax=ax, skip_start=skip_start, skip_end=skip_end, suggest_lr=True)
        except (RuntimeError, ValueError, IndexError):  # too few points for a gradient
            suggestion = None
        max_lr = choose_max_lr(lrs, losses, suggestion, skip_start, skip_end)
        if max_lr is not None:
            ax.axvline(max_lr, color="green", linestyle="--", label=f"max LR used {max_lr:.2e}")
            ax.legend()
        ax.set_title("LR range test" + (f" (steepest descent {suggestion:.2e})" if suggestion else ""))
        figure.tight_layout()
        return LRFinderResult(lrs, losses, suggestion, figure, max_lr)
    finally:
        finder.reset()
