"""The LR range test (torch-lr-finder) on the real training loader, leaving the model as it was."""
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


@dataclass
class LRFinderResult:
    lrs: list[float]
    losses: list[float]
    suggestion: float | None  # steepest descent of the smoothed loss (torch-lr-finder's rule)
    figure: Figure


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
        n = len(finder.history["lr"])
        try:  # torch-lr-finder's defaults (skip 10 first, 5 last points), shrunk for short tests
            _, suggestion = finder.plot(ax=ax, skip_start=min(10, n // 4), skip_end=min(5, n // 8), suggest_lr=True)
        except (RuntimeError, ValueError, IndexError):  # too few points for a gradient
            suggestion = None
        ax.set_title("LR range test" + (f" (suggested max LR {suggestion:.2e})" if suggestion else ""))
        figure.tight_layout()
        return LRFinderResult(list(finder.history["lr"]), list(finder.history["loss"]), suggestion, figure)
    finally:
        finder.reset()
