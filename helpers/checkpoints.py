"""Checkpoints that survive disconnects and full disks: atomic, never overwritten, rotated safely,
the newest good one found again, unreadable ones named rather than taken for missing.

- `NoOverwriteCheckpointIO`: Lightning's checkpoint plumbing assembles the state; this writes it
  to a temporary file in the target folder, flushes and fsyncs it, then links it into place only
  if the name is free. A kill mid-write leaves a stray `.tmp` file (removed at the next start by
  `remove_temporaries`) and every earlier checkpoint intact; a full disk raises `StorageFull`, one
  line, with the temporary file removed. Loading always uses `torch.load(..., weights_only=True)`.
- `PeriodicCheckpoint`: a Callback saving the full training state (weights, optimizer, loops, the
  data loader's position) every N minutes (or N steps) and at every epoch end, keeping the newest
  `keep_last_k`, plus each epoch's model weights alone (fp16) in `weights/`; names carry epoch,
  global step and the schedule's LR.
- `find_latest(folder)`: the newest full state that loads; truncated ones skipped with a warning,
  a folder with none loadable or with an I/O error refused (`CheckpointError`) instead of "no
  checkpoint".
- `check_resumable(path, config)`: one line refusing a checkpoint of another model or schedule.
- `storage_plan(...)`: the bytes a run's checkpoints take, from the parameter count.
- `load_model(path)`: a YOLOv3 and its Config from a training checkpoint or an export bundle.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from .config import Config
from .model import YOLOv3, build_model

NAME = re.compile(r"epoch=(\d+)-step=(\d+)-lr=([0-9.e+-]+)(?:-v(\d+))?\.ckpt$")
TEMPORARY = ".*.tmp"  # what atomic_write_new leaves behind when killed mid-write
WEIGHTS_DIR = "weights"
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
EMPTY_TRASH = ("on Google Drive, files deleted through the mount go to the Trash and still count: empty it at "
               "drive.google.com/drive/trash")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class StorageFull(OSError):
    """A checkpoint could not be written for lack of space; earlier checkpoints are intact."""


def human(n: float) -> str:
    """Bytes for a person: 740 MB, 6.43 GB."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB" if n >= 1e3 else f"{int(n)} B"


def free_bytes(folder: str | os.PathLike) -> int:
    """Free bytes where `folder` is (or would be created)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


class _WriteErrors:
    """A file object that remembers the OSError its `write` raised: torch.save's zip writer turns it
    into a RuntimeError ("unexpected pos ...") that no longer says the disk is full."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_write_new(path: str | os.PathLike, write) -> Path:
    """Create `path` atomically with `write(file)`; never replaces an existing file.

    The bytes go to a temporary file beside the target, are fsynced, then hard-linked to the final
    name (which fails if it exists). Filesystems without hard links (some FUSE mounts) fall back to
    an existence check and a rename. Whatever fails, the temporary file is removed; a full disk
    (ENOSPC, EDQUOT) raises `StorageFull` saying what could not be written and how much was free.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    recorder = None
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                recorder = _WriteErrors(f)
                write(recorder)
                f.flush()
                os.fsync(f.fileno())
        except Exception as e:  # noqa: BLE001 - re-raised below, as one clear line when the disk is full
            cause = recorder.error if recorder is not None and recorder.error is not None else e
            if isinstance(cause, OSError) and cause.errno in FULL_DISK:
                os.unlink(tmp)
                raise StorageFull(
                    cause.errno,
                    f"could not write {path}: no space left ({human(free_bytes(path.parent))} free in "
                    f"{path.parent}). Earlier checkpoints are intact. Free some space ({EMPTY_TRASH}; or "
                    "delete old weight files) and rerun with --resume latest") from None
            raise
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} exists; checkpoints are never overwritten") from None
        except OSError:
            if path.exists():
                raise FileExistsError(f"{path} exists; checkpoints are never overwritten") from None
            os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def remove_temporaries(folder: str | os.PathLike) -> tuple[int, int]:
    """Delete the temporary files that writes killed mid-way left in `folder` (and its weights
    folder): (how many, bytes freed). Run it at start, before anything writes there."""
    count = freed = 0
    folder = Path(folder)
    for where in (folder, folder / WEIGHTS_DIR):
        if not where.is_dir():
            continue
        for tmp in where.glob(TEMPORARY):
            if ".ckpt." not in tmp.name:
                continue  # only ours: .<checkpoint name>.<random>.tmp
            try:
                size = tmp.stat().st_size
                tmp.unlink()
            except FileNotFoundError:
                continue
            count, freed = count + 1, freed + size
    return count, freed


class NoOverwriteCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_write_new(path, lambda f: torch.save(checkpoint, f))

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


def set_aside(folder: str | os.PathLike) -> Path | None:
    """Move the folder's checkpoints (and weights folder) into `folder/set-aside-<time>/`, deleting
    nothing: a deliberate fresh start. Returns where they went, or None if there was nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    items = [p for p in folder.iterdir() if p.suffix == ".ckpt" or p.name == WEIGHTS_DIR]
    if not items:
        return None
    target = folder / time.strftime("set-aside-%Y%m%d-%H%M%S")
    target.mkdir()
    for item in items:
        os.rename(item, target / item.name)
    return target


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
    buffers. A few hundred KB of names and settings come on top of each (measured: within 1%)."""
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

    A state saved at a batch end resumes at the next batch (Lightning's loop records the batch as
    processed, and the training DataLoader is resumable: `datamodule.ResumableDataLoader`). The
    oldest state is deleted only after the new one is written, fsynced and linked into place, so a
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
        self._last_time = time.monotonic()
        self._last_step = -1

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

    def save(self, trainer) -> Path | None:
        step = trainer.global_step
        if step == self._last_step:
            return None
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
        """Delete all but the newest `keep_last_k` full states in the folder (the folder, not this
        session's list: states of earlier sessions count too). Called only after a save succeeded."""
        states = sorted((p for p in self.dirpath.glob("*.ckpt") if NAME.search(p.name)), key=_step_of)
        doomed = states[:-self.keep_last_k] if len(states) > self.keep_last_k else []
        for old in doomed:
            old.unlink(missing_ok=True)
        return doomed

    def save_weights(self, trainer) -> Path | None:
        """The model's weights alone (fp16) with the run's config: what `load_model` and the app read."""
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
        return atomic_write_new(path, lambda f: torch.save(ckpt, f))


def _step_of(path: Path) -> tuple[int, int]:
    m = NAME.search(path.name)
    return (int(m.group(2)), int(m.group(4) or 1)) if m else (-1, 0)


def problem_with(path: Path) -> str | None:
    """None if `path` is a complete checkpoint; else what is wrong, starting with "truncated" (not a
    complete zip archive: a write cut short, or a copy not fully synced), "unreadable" (an I/O error:
    e.g. Google Drive not mounted or not synced yet) or "not a checkpoint"."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head != b"PK\x03\x04":
            return "not a checkpoint (not a PyTorch zip archive)" if head else "truncated (empty file)"
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except zipfile.BadZipFile:
            return "truncated (incomplete zip archive)"
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return None
    except OSError as e:
        return f"unreadable (I/O error: {e.strerror or e})"
    except Exception as e:  # noqa: BLE001 - torch's zip reader or the weights-only unpickler refused it
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "zip" in text.lower() or "archive" in text.lower():
            return f"truncated ({text[:120]})"
        return f"not a checkpoint of helpers.train ({text[:120]})"


def loads(path: Path) -> bool:
    """Whether `path` is a complete checkpoint (cheap: zip directory + memory-mapped load)."""
    return problem_with(path) is None


def find_latest(folder: str | os.PathLike) -> Path | None:
    """The full training state with the highest global step (then newest) in `folder` that loads;
    None if the folder has no checkpoint at all.

    Truncated newer ones are skipped with a warning naming them. Refused (`CheckpointError`): a
    folder whose checkpoints all fail to load (resuming must not silently start over), and any I/O
    error (a flaky Drive mount: resuming from an older state would silently redo work)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    try:
        candidates = sorted(folder.glob("*.ckpt"), key=lambda p: (_step_of(p), p.stat().st_mtime), reverse=True)
    except OSError as e:
        raise CheckpointError(f"cannot list {folder} (I/O error: {e.strerror or e}); is the drive mounted? "
                              "Remount it and rerun") from None
    bad = []
    for path in candidates:
        problem = problem_with(path)
        if problem is None:
            if bad:
                warnings.warn("skipping checkpoints newer than " + path.name + ": "
                              + "; ".join(f"{p} is {why}" for p, why in bad), stacklevel=2)
            return path
        bad.append((path, problem))
        if problem.startswith("unreadable"):
            raise CheckpointError(
                f"{path} is {problem}; not resuming from an older state. Check that the drive is mounted "
                "and synced, then rerun (or pass --resume PATH to pick a checkpoint yourself)")
    if bad:
        raise CheckpointError(
            f"no checkpoint in {folder} loads: " + "; ".join(f"{p.name} is {why}" for p, why in bad)
            + ". Rerun with --resume PATH to pick one, or --start-fresh to set them aside and start over")
    return None


# Settings a resume must share with the checkpoint's run: the model's shape, then everything the
# schedule file was computed from (the flag to pass back is named in the refusal).
MODEL_KEYS = ("num_classes", "width")
SCHEDULE_KEYS = (("train", "epochs"), ("train", "max_lr"), ("train", "pct_start"), ("train", "div_factor"),
                 ("train", "final_div_factor"), ("train", "anneal_strategy"), ("train", "three_phase"),
                 ("train", "optimizer"), ("train", "limit_train_batches"), ("data", "batch_size"))
# The loss terms, and what a checkpoint written before they were settings used (the course's).
LOSS_KEYS = {"obj_loss": "mse", "box_loss": "mse"}


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
        saved = Config.from_dict(ckpt["hyper_parameters"]["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot resume from {path}: not a checkpoint of helpers.train ({e})") from None
    for key in MODEL_KEYS:
        here, there = getattr(config.model, key), getattr(saved.model, key)
        if here != there:
            raise CheckpointError(f"cannot resume from {path}: its model has {key} {there}, this run's {here} "
                                  f"(pass --{key.replace('_', '-')} {there}, or use another --run-dir)")
    saved_train = ckpt["hyper_parameters"]["config"].get("train") or {}
    for key, before_it_was_a_setting in LOSS_KEYS.items():
        here, there = getattr(config.train, key), saved_train.get(key, before_it_was_a_setting)
        if here != there:
            raise CheckpointError(
                f"cannot resume from {path}: it was trained with {key} {there} and this run asks {here} "
                f"(rerun with --{key.replace('_', '-')} {there} to resume, or use a new --run-dir)")
    for section, key in SCHEDULE_KEYS:
        here, there = getattr(getattr(config, section), key), getattr(getattr(saved, section), key)
        if here != there:
            raise CheckpointError(
                f"cannot resume from {path}: it was trained with {key} {there} and this run asks {here}; its "
                f"schedule file was computed for {there}. Rerun with --{key.replace('_', '-')} {there} to "
                "resume, or use a new --run-dir to train with the new setting from the start")


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[YOLOv3, Config]:
    """A YOLOv3 (eval mode, on `map_location`) and its Config, from a Lightning checkpoint or an export
    bundle folder."""
    path = Path(path)
    if path.is_dir():
        from .export import load_bundle

        return load_bundle(path, map_location=map_location)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same clear way
        raise ValueError(f"{path}: not a readable checkpoint ({e})") from e
    try:
        config = Config.from_dict(ckpt["hyper_parameters"]["config"])
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    except KeyError as e:
        raise ValueError(f"{path}: not a checkpoint of helpers.train (missing {e})") from None
    model = build_model(config.model)
    model.load_state_dict(state)
    return model.to(map_location).eval(), config


def resolve_checkpoint(spec: str | os.PathLike, run_dir: str | os.PathLike = "runs/default") -> Path:
    """The checkpoint a user means: 'latest' (the newest that loads in `run_dir`'s checkpoints), a run
    folder or a checkpoint folder (its newest that loads), an export bundle folder, or a file.
    Raises FileNotFoundError naming what was searched."""
    path = Path(run_dir) if str(spec) == "latest" else Path(spec)
    if path.is_file() or (path / "config.json").is_file():  # a checkpoint file, or an export bundle
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not found (no such checkpoint, bundle or run folder)")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    try:
        latest = find_latest(folder)
    except CheckpointError as e:  # checkpoints there, none readable: the callers' "not found", in one line
        raise FileNotFoundError(str(e)) from None
    if latest is None:
        raise FileNotFoundError(f"{folder}: no checkpoint that loads (train first, or give --checkpoint PATH)")
    return latest
