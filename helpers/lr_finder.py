"""The LR range test (torch-lr-finder) on the real training loader, leaving the model as it was.

Reading the curve. torch-lr-finder records the loss through a trailing exponential average
(`smooth_f=0.05`): its curve lags the real one by about 1/0.05 = 20 iterations, which on a
100-iteration test over 7 decades moves the whole curve ~1.4 decades to higher LRs. Here the range
test records the raw losses and `read_curve` smooths them with a centred moving average (no lag);
the max LR used is a tenth of the LR of that curve's minimum (fastai's "minimum / 10"): a decade
short of where the loss turns up.

A curve says where that minimum is only when its fall stands clear of the batch-to-batch noise
(`CLEAR_OF_NOISE` times the raw losses' spread about the smoothed curve); otherwise there is no
suggestion and the run keeps its configured max LR. Without the objectness prior
(ModelConfig.obj_prior None) the no-object term's first lesson is a fall of ~85% over two decades,
65-78x the noise; with it the loss starts where that lesson ends, falls ~20% (4-9x the noise) and
its minimum is noise: on the full model 2.5e-4, a suggestion of 2.5e-5, 40x under the course's 1e-3
(the divergence edge, the same with and without the prior, says the model is no less stable).
The steepest descent, read before, is not used either: on a shallow curve it is noise too (the
embedded default: 1.5e-4, 6.8% mAP@0.5 where its configured 2e-3 trained to 37.8%). The curves and
what each reading trained to: benchmarks/RESULTS.md ("Which max LR the range test should give",
"The range test with the objectness prior"; `python -m benchmarks.lr_rules`).
Use at least ~100 iterations: with 30 the curve has 4 points per decade and no reliable minimum.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
import torch
from torch_lr_finder import LRFinder, TrainDataLoaderIter

from .batch import Batch
from .config import STRIDES
from .loss import YoloLoss
from .targets import build_targets
from .utils import free_gpu_memory


class _YoloBatches(TrainDataLoaderIter):
    """`batch.Batch`es as (inputs, labels) = (images, boxes [N,6]) for torch-lr-finder."""

    def inputs_labels_from_batch(self, batch: Batch):
        return batch.images, batch.boxes


class _TargetsThenLoss(torch.nn.Module):
    """criterion(outputs, boxes): targets are built for the batch's own size, as in training."""

    def __init__(self, loss: YoloLoss):
        super().__init__()
        self.loss = loss

    def forward(self, outputs: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        coarse = outputs[0]
        size = (coarse.shape[2] * STRIDES[0], coarse.shape[3] * STRIDES[0])
        return self.loss(outputs, build_targets(boxes, coarse.shape[0], size))


# How many times the raw losses' spread about the smoothed curve its fall must reach to be read:
# measured falls were 65-78x without the objectness prior and 4-9x with it (module docstring).
CLEAR_OF_NOISE = 20.0


@dataclass
class LRFinderResult:
    lrs: list[float]
    losses: list[float]  # raw, one per iteration
    smoothed: list[float]  # centred moving average of losses (`read_curve`)
    lowest: float | None  # LR of the smoothed curve's minimum
    max_lr: float | None  # the LR to train with: lowest / 10
    clearance: float | None = None  # the smoothed fall to the minimum over the noise (None: too few points)


def skips(n: int) -> tuple[int, int]:
    """(skip_start, skip_end) for a range test of `n` iterations: torch-lr-finder's defaults (10, 5),
    shrunk for short tests."""
    return min(10, n // 10), min(5, n // 20)


def read_curve(lrs, losses, window: int | None = None, skip_start: int = 0, skip_end: int = 0):
    """(smoothed losses, LR of their minimum, max LR, clearance) from a range test's raw curve (see the
    module docstring); clearance: the smoothed loss's fall to its minimum over the noise.

    window: the centred moving average's width in iterations (odd; default ~len/10, at least 3);
    skip_start / skip_end: iterations left out of the search at either end (the loss is still
    settling at the start, and a last diverging point can be anything). The curve ends at its first
    non-finite loss (fp16 overflow near the top of the range). Lowest and max LR are None when
    fewer than 3 points remain, or when the smoothed loss never falls by more than 1% of where it
    starts and `CLEAR_OF_NOISE` times the raw losses' spread about it (on the way to its minimum):
    then the range test says nothing, and the caller keeps its configured LR.
    """
    lrs, raw = np.asarray(lrs, float), np.asarray(losses, float)
    window = window or max(3, len(raw) // 10)  # of the whole test: a curve cut short is smoothed alike
    bad = np.flatnonzero(~np.isfinite(raw))
    if len(bad):
        lrs, raw = lrs[: bad[0]], raw[: bad[0]]
    n = len(raw)
    if n == 0:
        return [], None, None, None
    window += 1 - window % 2  # odd, so the average is centred
    padded = np.pad(raw, window // 2, mode="edge")
    smooth = np.convolve(padded, np.ones(window) / window, mode="valid")
    lo, hi = skip_start, n - skip_end
    if hi - lo < 3:
        return smooth.tolist(), None, None, None
    lowest = lo + int(np.argmin(smooth[lo:hi]))
    fall, noise = float(smooth[lo] - smooth[lowest]), float(np.std(raw[lo:lowest + 1] - smooth[lo:lowest + 1]))
    clearance = fall / noise if noise > 0 else float("inf") if fall > 0 else 0.0
    if fall <= 0.01 * abs(smooth[lo]) or clearance <= CLEAR_OF_NOISE:
        return smooth.tolist(), None, None, clearance
    return smooth.tolist(), float(lrs[lowest]), float(lrs[lowest] / 10), clearance


def describe_choice(result: LRFinderResult) -> str:
    """How the max LR was chosen, in words (for logs)."""
    if result.max_lr is None and result.clearance is None:
        return "no suggestion: too few points to read"
    if result.max_lr is None:
        return (f"no suggestion: the loss fell {result.clearance:.1f}x its batch noise, short of the "
                f"{CLEAR_OF_NOISE:.0f}x that locates its minimum")
    return f"a tenth of {result.lowest:.3g}, the LR of the smoothed loss's minimum"


def find_lr(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_loader, loss: YoloLoss | None = None,
            start_lr: float = 1e-7, end_lr: float = 1.0, num_iter: int = 100,
            device: str | torch.device = "cpu", amp: bool = False) -> LRFinderResult:
    """Run the range test; the model's and optimizer's states are restored afterwards, and on a GPU the
    memory the test took is handed back (`free_gpu_memory`): the model returns to the device it came
    from, and a 2-GPU run started next in a child process finds cuda:0 as free as before. The curve
    is returned, not drawn: `plotting.plot_lr_finder` draws it (the caller decides where it goes)."""
    amp_kwargs = {}
    if amp and torch.device(device).type == "cuda":
        amp_kwargs = {"amp_backend": "torch", "amp_config": {"device_type": "cuda", "dtype": torch.float16}}
    finder = LRFinder(model, optimizer, _TargetsThenLoss(loss or YoloLoss()), device=device, **amp_kwargs)
    try:
        # smooth_f=0: raw losses (the trailing average lags, see the module docstring); a single raw
        # batch loss is noisier than the average, so "diverged" needs 10x the best, not 5x. Its prints
        # ("See the graph with {finder_name}.plot()", a literal placeholder) are not for our users:
        # the curve and its reading are ours (its progress bar is on stderr and stays).
        with contextlib.redirect_stdout(io.StringIO()):
            finder.range_test(_YoloBatches(train_loader), start_lr=start_lr, end_lr=end_lr, num_iter=num_iter,
                              smooth_f=0.0, diverge_th=10)
    finally:
        finder.reset()
        lrs, losses = list(finder.history["lr"]), list(finder.history["loss"])
        del finder  # its state cache, loss and AMP scaler: on the GPU until collected
        free_gpu_memory()
    skip_start, skip_end = skips(len(lrs))
    return LRFinderResult(lrs, losses, *read_curve(lrs, losses, skip_start=skip_start, skip_end=skip_end))
