"""Exact resume: what a resumed step must equal, and from which saved state each part comes.

The invariant. A run killed at any moment and resumed with `--resume latest` from a full state
saved after step s-1 (its `global_step` is s) trains every step k >= s exactly as the uninterrupted
run does, whatever the number of data workers, and ends on the same step (epochs x n, n the steps
of an epoch): step k is batch b = k mod n of epoch e = k div n, and has
  - that batch's images, at that batch's image size, augmented alike to the pixel: the sampler's
    order is a function of (seed, e), the size of (seed, e, b), each sample's augmentations of
    (seed, e, b, rank, position in the batch) (`datamodule.MultiScaleBatchSampler`);
  - learning rate line k of the schedule file (`schedule.ScheduleFileLR`), also for a batch whose
    images could all not be read (`skip_step`: the step is taken at LR 0, so the count stays on the
    file and every DDP rank steps together);
  - the same counts of unreadable samples so far (`save_skipped` / `load_skipped`).

Where each part comes from, once:
  - step and epoch: Lightning's fit loop (its progress counters in `checkpoint["loops"]`), restored
    before the training DataLoader is built.
  - the loader's position (epoch, batches done in it): `training_position`, derived from those same
    counters at the moment an iteration starts, never from a count kept by the loader (wrong by
    Lightning's prefetch and the workers' read-ahead) nor from the loader's saved state: Lightning
    2.6 loads that state only when the saved epoch was unfinished (a loop whose last epoch finished
    is "not restarting"), so an end-of-epoch state would start over at epoch 0's position.
  - the sampler's epoch: set by the batch sampler itself when its iteration starts (from the
    position), not by Lightning's `set_epoch`, which comes after Lightning's first `iter()`: by then
    2 workers have read 4 batches ahead and the inner sampler has drawn the epoch's whole order.
  - the schedule line: the scheduler's `last_epoch` in `checkpoint["lr_schedulers"]`; a state saved
    before the schedule was a scheduler (`lr_schedulers` empty) is given it by `migrate_checkpoint`
    from the global step.
  - unreadable-sample counts: `checkpoint["skipped_images"]` (totals and this epoch's partial count,
    summed over ranks).

Lightning, `datamodule`, `module` and `schedule` call into this module; it imports only `schedule`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from .schedule import Schedule, ScheduleFileLR, limited_steps

Position = tuple[int, int]  # (epoch, batches of it done)


def training_position(trainer, steps_per_epoch: int) -> Position:
    """(epoch, training batches done in it) from `trainer`'s fit loop, at any moment of `fit`: at a
    fresh start, after a state of any kind was restored (before or after Lightning's own resets) and
    during training. An epoch whose `steps_per_epoch` batches are all done counts as (next epoch, 0).

    `trainer.current_epoch` is the count of completed epochs (a state saved at an epoch's end was
    saved before its completion was counted, with all its batches processed)."""
    epoch = trainer.current_epoch
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if done >= steps_per_epoch:
        epoch, done = epoch + 1, 0
    return int(epoch), int(done)


def loader_position(trainer, batch_sampler) -> Callable[[], Position]:
    """The position callable a training batch sampler reads when an iteration starts: the steps of
    an epoch are the sampler's batches with the Trainer's `limit_train_batches` applied (known
    before Lightning counts them)."""
    def position() -> Position:
        return training_position(trainer, limited_steps(len(batch_sampler), trainer.limit_train_batches))

    return position


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning checkpoints with the training loop (it has `state_dict` and
    `load_state_dict`, Lightning's `_Stateful`; without them Lightning warns that a mid-epoch resume
    is not exact). Its batch sampler must have `position` and `resume_at` (`MultiScaleBatchSampler`).

    The state is the batch sampler's position (epoch, batches done). Attached to a Trainer the
    sampler reads its position from the loop at every iteration (`loader_position`), so loading the
    state changes nothing there; a loader without a Trainer resumes at the loaded position.
    """

    def __init__(self, *args, position: Callable[[], Position] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if position is not None:
            self.batch_sampler.position = position

    def state_dict(self) -> dict[str, int]:
        sampler = self.batch_sampler
        epoch, done = sampler.position() if sampler.position else (sampler.epoch, 0)
        return {"epoch": int(epoch), "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.resume_at(int(state["epoch"]), int(state["batches_done"]))


def skip_step(optimizer: torch.optim.Optimizer, parameters) -> torch.Tensor:
    """The loss of a step whose batch has no image: zero, still connected to every parameter (DDP
    needs a gradient for each), with the optimizer at LR 0 for this step so that the weights do not
    move (Adam's moments would otherwise push them). The scheduler sets the next step's LR from the
    file again, so the run stays on its schedule line."""
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    return sum(p.sum() for p in parameters) * 0.0


def migrate_checkpoint(checkpoint: dict, schedule: Schedule | None) -> None:
    """Give a full state saved before the schedule was a scheduler (Lightning wrote
    `lr_schedulers: []`) the scheduler state of its step: its position is the global step, and the
    next step's LR is the file's (the saved optimizer holds the previous step's). In place."""
    if checkpoint.get("lr_schedulers") or schedule is None or "optimizer_states" not in checkpoint:
        return
    step = int(checkpoint["global_step"])
    checkpoint["lr_schedulers"] = [ScheduleFileLR.position_state(schedule, step)]
    for state in checkpoint["optimizer_states"]:
        for group in state["param_groups"]:
            group["lr"] = schedule.lr_at(step)


def save_skipped(checkpoint: dict, totals: dict[str, int], this_epoch: int) -> None:
    """Store the run's unreadable-sample totals and this epoch's partial count (summed over ranks)."""
    checkpoint["skipped_images"] = {**totals, "train_this_epoch": int(this_epoch)}


def load_skipped(checkpoint: dict, rank: int) -> tuple[dict[str, int], int]:
    """The totals and the partial count this rank carries on (rank 0 carries the sum; the others 0)."""
    saved = checkpoint.get("skipped_images", {})
    totals = {"train": int(saved.get("train", 0)), "val": int(saved.get("val", 0))}
    return totals, int(saved.get("train_this_epoch", 0)) if rank == 0 else 0
