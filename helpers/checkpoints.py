"""Checkpoints that survive disconnects: atomic, never overwritten, the newest good one found again.

- `NoOverwriteCheckpointIO`: Lightning's checkpoint plumbing assembles the state; this writes it
  to a temporary file in the target folder, flushes and fsyncs it, then links it into place only
  if the name is free. A kill mid-write leaves a stray `.tmp` file and every earlier checkpoint
  intact. Loading always uses `torch.load(..., weights_only=True)`.
- `PeriodicCheckpoint`: a Callback saving at every epoch end and every N minutes (or N steps),
  named with epoch, global step and the current LR; optional keep-last-k.
- `find_latest(folder)`: the newest checkpoint that loads; truncated ones skipped with a warning.
- `load_model(path)`: a YOLOv3 and its Config from a training checkpoint or an export bundle.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from .config import Config
from .model import YOLOv3, build_model

NAME = re.compile(r"epoch=(\d+)-step=(\d+)-lr=([0-9.e+-]+)(?:-v(\d+))?\.ckpt$")


def atomic_write_new(path: str | os.PathLike, write) -> Path:
    """Create `path` atomically with `write(file)`; never replaces an existing file.

    The bytes go to a temporary file beside the target, are fsynced, then hard-linked to the final
    name (which fails if it exists). Filesystems without hard links (some FUSE mounts) fall back to
    an existence check and a rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
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


class PeriodicCheckpoint(pl.Callback):
    """Save at every epoch end and every `every_minutes` of training (or `every_n_steps`)."""

    def __init__(self, dirpath: str | os.PathLike, every_minutes: float = 0.0, every_n_steps: int = 0,
                 keep_last_k: int = 0):
        self.dirpath = Path(dirpath)
        self.every_minutes = every_minutes
        self.every_n_steps = every_n_steps
        self.keep_last_k = keep_last_k
        self.saved: list[Path] = []
        self._last_time = time.monotonic()
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_time = time.monotonic()
        self._last_step = trainer.global_step  # a resumed run does not re-save its starting state

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        due_by_time = self.every_minutes > 0 and time.monotonic() - self._last_time >= 60 * self.every_minutes
        due_by_step = self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0
        if due_by_time or due_by_step:
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def save(self, trainer) -> Path | None:
        step = trainer.global_step
        if step == self._last_step:
            return None
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else 0.0
        path = free_name(self.dirpath, checkpoint_name(trainer.current_epoch, step, lr))
        # Lightning gathers the state from every rank; rank 0 writes (through NoOverwriteCheckpointIO).
        trainer.save_checkpoint(path, weights_only=False)  # full state: optimizer, loops, callbacks
        self._last_step, self._last_time = step, time.monotonic()
        self.saved.append(path)
        if self.keep_last_k and trainer.is_global_zero:
            while len(self.saved) > self.keep_last_k:
                old = self.saved.pop(0)
                old.unlink(missing_ok=True)
        return path

    def state_dict(self) -> dict[str, Any]:
        return {"saved": [str(p) for p in self.saved]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = [Path(p) for p in state_dict.get("saved", [])]


def _step_of(path: Path) -> tuple[int, int]:
    m = NAME.search(path.name)
    return (int(m.group(2)), int(m.group(4) or 1)) if m else (-1, 0)


def loads(path: Path) -> bool:
    """Whether `path` is a complete checkpoint (cheap: zip directory + memory-mapped load)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not a usable checkpoint"
        return False


def find_latest(folder: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest global step (then newest) in `folder` that loads, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = sorted(folder.glob("*.ckpt"), key=lambda p: (_step_of(p), p.stat().st_mtime), reverse=True)
    for path in candidates:
        if loads(path):
            return path
        warnings.warn(f"skipping checkpoint {path}: it is truncated or unreadable", stacklevel=2)
    return None


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
    latest = find_latest(folder)
    if latest is None:
        raise FileNotFoundError(f"{folder}: no checkpoint that loads (train first, or give --checkpoint PATH)")
    return latest
