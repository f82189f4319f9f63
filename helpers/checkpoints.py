"""Checkpoints that survive disconnects and full disks: Lightning's plumbing, written atomically,
never overwritten, rotated safely; a resume refused in one line when it would not be exact.

- `NoOverwriteCheckpointIO`: Lightning's checkpoint plumbing assembles the state; this writes it
  with `storage.atomic_write_new` (a temporary file in the target folder, fsynced, linked into place
  only if the name is free). A kill mid-write leaves a stray `.tmp` file (removed at the next start
  by `storage.remove_temporaries`) and every earlier checkpoint intact; a full disk raises `StorageFull`,
  one line, with the temporary file removed. Loading always uses `torch.load(..., weights_only=True)`.
- `PeriodicCheckpoint`: a Callback saving the full training state (weights, optimizer, loops, the
  data loader's position, the run's id) every N minutes (or N steps) and at every epoch end,
  keeping this run's newest `keep_last_k`, plus each epoch's model weights alone (fp16) in
  `weights/`; names carry epoch, global step and the schedule's LR. Nothing is written after a
  non-finite loss or of non-finite weights (`helpers.divergence.TrainingDiverged` instead).
- `set_aside(folder)`: an earlier run moved out of the way, nothing deleted.
- `check_resumable(path, config)`: one line refusing a checkpoint of another model or schedule.
- `storage_plan(...)`: the bytes a run's checkpoints take, from the parameter count.

Reading lives in `helpers.weights` (no Lightning there): `find_latest` (the newest full state that
loads, truncated ones skipped with a warning, a folder with none loadable or an I/O error refused),
`load_model`, `resolve_checkpoint`: import them from there.
"""
from __future__ import annotations

import os
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from .config import Config
from .divergence import TrainingDiverged, all_finite
from .schedule import first_change, one_cycle_settings
from .storage import EMPTY_TRASH, atomic_write_new, free_bytes, human, remove_temporaries  # noqa: F401 - remove_temporaries: re-exported
from .weights import NAME, SETTINGS_ADDED, CheckpointError, problem_with, saved_config, step_of

WEIGHTS_DIR = "weights"
RUN_ID = "run_id"  # the key of a full state's run id
# What a full disk while writing a checkpoint says to do.
FULL_DISK_ADVICE = (f"Earlier checkpoints are intact. Free some space ({EMPTY_TRASH}; or delete old weight files) "
                    "and rerun with --resume latest")


class NoOverwriteCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_write_new(path, lambda f: torch.save(checkpoint, f), advice=FULL_DISK_ADVICE)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def checkpoint_name(epoch: int, step: int, lr: float) -> str:
    return f"epoch={epoch:03d}-step={step:07d}-lr={lr:.4e}.ckpt"


def free_name(folder: Path, name: str) -> Path:
    """`name` in `folder`, or `name-vN` for the first N that is free."""
    path = folder / name
    version = 2
    while path.exists():
        path = folder / name.replace(".ckpt", f"-v{version}.ckpt")
        version += 1
    return path


def _is_checkpoint(path: Path) -> bool:
    return path.suffix == ".ckpt" or path.name == WEIGHTS_DIR


def set_aside(folder: str | os.PathLike, select: Callable[[Path], bool] = _is_checkpoint) -> Path | None:
    """Move what `select` picks in the folder (default: its checkpoints and weights folder) into a new
    `folder/set-aside-<time>/`, deleting nothing: an earlier run kept out of this one's way.
    Returns where they went, or None if there was nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    items = [p for p in folder.iterdir() if select(p)]
    if not items:
        return None
    stamp, n = time.strftime("set-aside-%Y%m%d-%H%M%S"), 1
    while True:
        target = folder / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            target.mkdir()
            break
        except FileExistsError:
            n += 1
    for item in items:
        os.rename(item, target / item.name)
    return target


def full_states(folder: str | os.PathLike) -> list[Path]:
    """The full training states named as `checkpoint_name` names them in `folder` (loadable or not)."""
    folder = Path(folder)
    return [p for p in folder.glob("*.ckpt") if NAME.search(p.name)] if folder.is_dir() else []


def step_of_state(path: Path) -> int:
    """The global step a full state was saved at (from its contents: any name)."""
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1))


def run_id_of(path: Path) -> str | None:
    """The id of the run that saved the full state `path` (None: saved before runs had ids); "?" for
    a file that does not load (never taken for a run's own)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - truncated or not ours: not this run's
        return "?"
    return ckpt.get(RUN_ID) if isinstance(ckpt, dict) else "?"


@dataclass(frozen=True)
class StoragePlan:
    """What a run's checkpoints take: one full training state, one epoch's weights, the total."""
    full_state: int  # bytes: fp32 weights and buffers + the optimizer's per-parameter moments
    weights: int  # bytes: fp16 weights and buffers
    total: int  # the most this run keeps at once, at its end
    keep_last_k: int
    epochs: int

    def describe(self, folder) -> str:
        kept = (f"the last {self.keep_last_k} full states (+1 while the next is written)" if self.keep_last_k
                else "every full state (at least one per epoch)")
        return (f"checkpoints: one full training state ~{human(self.full_state)}, one epoch's weights "
                f"~{human(self.weights)}; this run keeps {kept} and {self.epochs} weight files: "
                f"~{human(self.total)} in {folder}")


def storage_plan(model: torch.nn.Module, epochs: int, keep_last_k: int, optimizer: str = "adam") -> StoragePlan:
    """Bytes the checkpoints of a run take, from the model's parameter count: a full state holds the
    fp32 weights, Adam's two moments (SGD's one) and the buffers; a weights file fp16 weights and
    buffers. A few hundred KB of names and settings come on top of each (measured against real files
    in benchmarks/RESULTS.md, "Checkpoint storage")."""
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    moments = 1 if optimizer == "sgd" else 2
    full = params * 4 * (1 + moments) + buffers
    weights = params * 2 + buffers
    states = keep_last_k + 1 if keep_last_k else epochs
    return StoragePlan(full, weights, states * full + epochs * weights, keep_last_k, epochs)


class PeriodicCheckpoint(pl.Callback):
    """Full training states every `every_minutes` of training (or `every_n_steps`) and at every epoch
    end, the newest `keep_last_k` kept (0 = all); and each epoch's model weights alone (fp16, under
    `weights/`, all kept: the course's one file per epoch).

    A state saved at a batch end resumes at the next batch (`helpers.resume`). Each state carries
    its run's id (`RUN_ID`: new for a run from step 0, kept by every resume), and rotation deletes
    only states of this run: an earlier run's states in the folder are never touched. The oldest
    state is deleted only after the new one is written, fsynced and linked into place, so a
    loadable state always remains. Ranks agree on time-based saves (rank 0's clock decides).
    """

    def __init__(self, dirpath: str | os.PathLike, every_minutes: float = 0.0, every_n_steps: int = 0,
                 keep_last_k: int = 0, epoch_weights: bool = True, plan: StoragePlan | None = None):
        self.dirpath = Path(dirpath)
        self.every_minutes = every_minutes
        self.every_n_steps = every_n_steps
        self.keep_last_k = keep_last_k
        self.epoch_weights = epoch_weights
        self.plan = plan
        self.saved: list[Path] = []
        self.run_id: str | None = uuid.uuid4().hex  # a run from step 0; a resumed one takes its state's
        self._last_time = time.monotonic()
        self._last_step = -1

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[RUN_ID] = self.run_id

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.run_id = checkpoint.get(RUN_ID)  # None: a state from before runs had ids; its run goes on

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_time = time.monotonic()
        self._last_step = trainer.global_step  # a resumed run does not re-save its starting state

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        due_by_time = self.every_minutes > 0 and time.monotonic() - self._last_time >= 60 * self.every_minutes
        if self.every_minutes > 0 and trainer.world_size > 1:
            due_by_time = trainer.strategy.broadcast(due_by_time, src=0)
        due_by_step = self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0
        if due_by_time or due_by_step:
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.epoch_weights:
            self.save_weights(trainer)
        self.save(trainer)

    def _lr(self, trainer) -> float:
        """The schedule's LR of the last step taken (what the optimizer used), for the name."""
        schedule = getattr(trainer.lightning_module, "schedule", None)
        if schedule is not None:
            return schedule.lr_at(max(trainer.global_step - 1, 0))
        return trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else 0.0

    def _warn_if_short(self, trainer, need: int | None) -> None:
        if need and trainer.is_global_zero and free_bytes(self.dirpath) < need:
            warnings.warn(f"only {human(free_bytes(self.dirpath))} free in {self.dirpath}; the next checkpoint needs "
                          f"~{human(need)} ({EMPTY_TRASH})", stacklevel=2)

    def _refuse_diverged(self, trainer) -> None:
        """Stop (TrainingDiverged) rather than write weights after a non-finite loss, or non-finite
        weights (one sync per save; every rank calls it, as it saves)."""
        module = trainer.lightning_module
        if hasattr(module, "check_divergence"):
            module.check_divergence()
        if isinstance(module, torch.nn.Module) and not all_finite(module.state_dict().values()):
            raise TrainingDiverged(f"training stopped: the weights after step {trainer.global_step - 1} are not finite; "
                                   f"not saving them, the earlier checkpoints in {self.dirpath} stay. Rerun with "
                                   "--resume latest to go on from the newest, or lower --max-lr and train in a new "
                                   "--run-dir")

    def save(self, trainer) -> Path | None:
        step = trainer.global_step
        if step == self._last_step:
            return None
        self._refuse_diverged(trainer)
        self._warn_if_short(trainer, self.plan and self.plan.full_state)
        path = free_name(self.dirpath, checkpoint_name(trainer.current_epoch, step, self._lr(trainer)))
        # Lightning gathers the state from every rank; rank 0 writes (through NoOverwriteCheckpointIO).
        trainer.save_checkpoint(path, weights_only=False)  # full state: optimizer, loops, data position
        self._last_step, self._last_time = step, time.monotonic()
        self.saved.append(path)
        if self.keep_last_k and trainer.is_global_zero:
            self.rotate()
        return path

    def rotate(self) -> list[Path]:
        """Delete all but the newest `keep_last_k` full states of this run in the folder (earlier
        sessions of this run count too; another run's states are never deleted). Called only after a
        save succeeded."""
        states = sorted((p for p in full_states(self.dirpath) if run_id_of(p) == self.run_id), key=step_of)
        doomed = states[:-self.keep_last_k] if len(states) > self.keep_last_k else []
        for old in doomed:
            old.unlink(missing_ok=True)
        return doomed

    def save_weights(self, trainer) -> Path | None:
        """The model's weights alone (fp16) with the run's config: what `load_model` and the app read."""
        self._refuse_diverged(trainer)  # before the rank check: under DDP it is a collective
        if not trainer.is_global_zero:
            return None
        module = trainer.lightning_module
        self._warn_if_short(trainer, self.plan and self.plan.weights)
        state = {k: v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()
                 for k, v in module.state_dict().items()}
        ckpt = {"epoch": trainer.current_epoch, "global_step": trainer.global_step, "state_dict": state,
                "hyper_parameters": dict(module.hparams), "weights_only": True}
        path = free_name(self.dirpath / WEIGHTS_DIR, checkpoint_name(trainer.current_epoch, trainer.global_step,
                                                                      self._lr(trainer)))
        return atomic_write_new(path, lambda f: torch.save(ckpt, f), advice=FULL_DISK_ADVICE)


# Settings a resume must share with the checkpoint's run: the model's shape, then everything the
# schedule file was computed from (schedule.ONE_CYCLE_FIELDS, and what sets its steps) and the
# optimizer (the flag to pass back is named in the refusal).
MODEL_KEYS = ("num_classes", "width")


def _schedule_settings(config: Config) -> dict:
    return {**one_cycle_settings(config.train), "optimizer": config.train.optimizer,
            "limit_train_batches": config.train.limit_train_batches, "batch_size": config.data.batch_size}


def check_resumable(path: str | os.PathLike, config: Config) -> None:
    """Refuse (CheckpointError, one line naming the file and the mismatch) a checkpoint that is not a
    complete training state of this run's model and schedule."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such file")
    problem = problem_with(path)
    if problem is not None:
        raise CheckpointError(f"cannot resume from {path}: it is {problem}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ckpt, dict) or "loops" not in ckpt or "optimizer_states" not in ckpt:
        kind = "a weights-only file" if isinstance(ckpt, dict) and ckpt.get("weights_only") else "not a full training state"
        raise CheckpointError(f"cannot resume from {path}: it is {kind} (resume from a file in the checkpoint "
                              "folder itself, not its weights/ folder)")
    try:
        saved = saved_config(ckpt["hyper_parameters"]["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot resume from {path}: not a checkpoint of helpers.train ({e})") from None
    for key in MODEL_KEYS:
        here, there = getattr(config.model, key), getattr(saved.model, key)
        if here != there:
            raise CheckpointError(f"cannot resume from {path}: its model has {key} {there}, this run's {here} "
                                  f"(pass --{key.replace('_', '-')} {there} to resume, or --start-fresh to set that "
                                  "run aside and start over, or use another --run-dir)")
    for key in SETTINGS_ADDED["train"]:  # the loss: a checkpoint from before it was a setting used the course's
        here, there = getattr(config.train, key), getattr(saved.train, key)
        if here != there:
            raise CheckpointError(
                f"cannot resume from {path}: it was trained with {key} {there} and this run asks {here} "
                f"(rerun with --{key.replace('_', '-')} {there} to resume, or use a new --run-dir)")
    if change := first_change(_schedule_settings(saved), _schedule_settings(config)):
        key, there, here = change
        raise CheckpointError(
            f"cannot resume from {path}: it was trained with {key} {there} and this run asks {here}; its "
            f"schedule file was computed for {there}. Rerun with --{key.replace('_', '-')} {there} to "
            "resume, or use a new --run-dir to train with the new setting from the start")
