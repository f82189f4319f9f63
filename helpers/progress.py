"""The training progress bar: Lightning's tqdm bar, with the course's accuracies shown against their
targets ("obj 64.9/78✗") instead of bare numbers, so a student sees at every epoch where the graded
figures stand."""
from __future__ import annotations

import pytorch_lightning as pl

from .config import AccuracyTargets
from .metrics import ACCURACY_NAMES, judge_accuracies

SHORT = {"class_acc": "cls", "noobj_acc": "noobj", "obj_acc": "obj"}


def accuracy_items(metrics: dict, targets: AccuracyTargets) -> dict[str, str]:
    """{"cls": "81.2/80✓", ...} for each course accuracy in `metrics` (keys "val/class_acc", ...)."""
    checks = judge_accuracies({name: metrics.get(f"val/{name}") for name in ACCURACY_NAMES}, targets)
    return {SHORT[c.name]: f"{c.value:.1f}/{c.target:g}{'✓' if c.passed else '✗'}" for c in checks
            if c.value is not None}


class TargetsProgressBar(pl.callbacks.TQDMProgressBar):
    """`TQDMProgressBar` whose val/class_acc, val/noobj_acc, val/obj_acc read value/target and a mark.
    The module must have `cfg` (a `Config`): its model's `accuracy_targets` are the ones shown."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        shown = accuracy_items(items, pl_module.cfg.model.accuracy_targets)
        for name in ACCURACY_NAMES:
            items.pop(f"val/{name}", None)
        return {**items, **shown}
