"""The precomputed OneCycle schedule: one learning rate per optimizer step, in a text file.

Why a file: the course's OneCycleLR is only valid for the batch size and steps per epoch it was
built for, and resuming a torch scheduler mid-run is fragile ("Tried to step N times"). A file
written once before training, read by step number, makes a resume continue on exactly the line it
stopped at, and refuses a run whose batch size or steps per epoch differ.

File format: `# key: value` header lines (every OneCycle parameter, batch size, dataset length),
then one learning rate per line; line k (0-based, after the header) is the LR of optimizer step k.
The values come from torch's own OneCycleLR, stepped on a dummy optimizer, so they equal it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .storage import atomic_write_new

# The TrainConfig fields a schedule is computed from (OneCycleSpec's fields of the same names).
ONE_CYCLE_FIELDS = ("epochs", "max_lr", "pct_start", "div_factor", "final_div_factor", "anneal_strategy",
                    "three_phase")
_DEFAULTS = TrainConfig()  # OneCycleSpec's defaults are the config's: one place for the course's OneCycle


class ScheduleMismatch(ValueError):
    """The schedule file was computed for another batch size or number of steps per epoch."""


@dataclass(frozen=True)
class OneCycleSpec:
    max_lr: float
    epochs: int
    steps_per_epoch: int
    batch_size: int
    dataset_length: int
    pct_start: float = _DEFAULTS.pct_start
    div_factor: float = _DEFAULTS.div_factor
    final_div_factor: float = _DEFAULTS.final_div_factor
    anneal_strategy: str = _DEFAULTS.anneal_strategy
    three_phase: bool = _DEFAULTS.three_phase
    # "config": max_lr is the run's --max-lr, checked on resume; "given": chosen at the start (the
    # LR range test) and kept by every resume
    max_lr_source: str = "config"

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def one_cycle_settings(train: TrainConfig) -> dict[str, Any]:
    """The settings of `train` a schedule is computed from (ONE_CYCLE_FIELDS), by name."""
    return {key: getattr(train, key) for key in ONE_CYCLE_FIELDS}


def first_change(saved: Mapping[str, Any], asked: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """(name, saved value, asked value) of the first setting in `asked` that differs from `saved`'s
    (floats within 1e-9 relative count as equal: a value read back from text), or None. The one
    comparison behind every schedule refusal (`Schedule.check_matches`, `checkpoints.check_resumable`)."""
    for key, value in asked.items():
        there = saved[key]
        numbers = isinstance(there, float) and isinstance(value, (int, float))
        same = abs(value - there) <= 1e-9 * abs(there) if numbers else value == there
        if not same:
            return key, there, value
    return None


def compute_schedule(spec: OneCycleSpec) -> list[float]:
    """The LR of every optimizer step, as torch.optim.lr_scheduler.OneCycleLR gives it."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=spec.max_lr)
    lrs = []
    try:
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=spec.max_lr, epochs=spec.epochs, steps_per_epoch=spec.steps_per_epoch,
            pct_start=spec.pct_start, div_factor=spec.div_factor, final_div_factor=spec.final_div_factor,
            anneal_strategy=spec.anneal_strategy, three_phase=spec.three_phase, cycle_momentum=False,
        )
        for step in range(spec.total_steps):
            lrs.append(opt.param_groups[0]["lr"])
            if step + 1 < spec.total_steps:  # OneCycleLR refuses to step past its last step
                opt.step()
                sched.step()
    except ZeroDivisionError:  # a phase of zero steps inside torch's OneCycleLR
        raise ValueError(
            f"OneCycle cannot be computed for {spec.total_steps} steps with pct_start={spec.pct_start}: "
            f"the warm-up phase has {spec.pct_start * spec.total_steps:.1f} steps; it needs more than 1 "
            "(train for more steps or raise pct_start)") from None
    return lrs


@dataclass
class Schedule:
    spec: OneCycleSpec
    lrs: list[float]

    def lr_at(self, step: int) -> float:
        """LR of optimizer step `step`; past the end it stays at the last value (never raises)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.lrs[min(step, len(self.lrs) - 1)]

    def check_matches(self, batch_size: int, steps_per_epoch: int, path: str | os.PathLike = "",
                      **settings) -> None:
        """Refuse a run whose batch size, steps per epoch or any OneCycle setting given in `settings`
        (epochs, max_lr, pct_start, div_factor, final_div_factor, anneal_strategy, three_phase) differ
        from the file's. max_lr is compared only where the file's came from the config."""
        where = f" {path}" if path else ""
        if batch_size != self.spec.batch_size:
            raise ScheduleMismatch(
                f"schedule file{where} was computed for batch size {self.spec.batch_size}, this run has batch "
                f"size {batch_size}: rerun with --batch-size {self.spec.batch_size} to resume, or use a new "
                "--run-dir (OneCycle is only valid for the batch size it was computed for)")
        if steps_per_epoch != self.spec.steps_per_epoch:
            raise ScheduleMismatch(
                f"schedule file{where} was computed for {self.spec.steps_per_epoch} steps per epoch, this run "
                f"has {steps_per_epoch} ({self.spec.dataset_length} images then; a changed dataset, "
                "--limit-train-batches or number of devices): rerun with the same data and flags to resume, "
                "or use a new --run-dir")
        if self.spec.max_lr_source != "config":
            settings.pop("max_lr", None)
        if change := first_change(asdict(self.spec), settings):
            key, saved, value = change
            raise ScheduleMismatch(
                f"schedule file{where} was computed for {key} {saved}, this run asks {value}: rerun with "
                f"--{key.replace('_', '-')} {saved} to resume, or use a new --run-dir to train with "
                f"{key} {value} from the start (a resume continues the saved schedule line by line)")

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically (`storage.atomic_write_new`); the same schedule already there is kept, a
        different one refused (FileExistsError), never overwritten."""
        path = Path(path)
        text = "".join(f"# {k}: {v}\n" for k, v in asdict(self.spec).items())
        text += "".join(f"{lr:.10e}\n" for lr in self.lrs)
        try:
            if not path.exists():
                return atomic_write_new(path, lambda f: f.write(text.encode()))
        except FileExistsError:
            pass  # written meanwhile (another rank): compare it below
        if path.read_text() == text:
            return path
        raise FileExistsError(f"{path} already holds a different schedule; not overwriting it")

    @classmethod
    def read(cls, path: str | os.PathLike) -> Schedule:
        path = Path(path)
        types = {f.name: f.type for f in fields(OneCycleSpec)}
        header, lrs = {}, []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            try:
                if line.startswith("#"):
                    key, value = (s.strip() for s in line[1:].split(":", 1))
                    if key in types:
                        header[key] = _parse(types[key], value)
                elif line.strip():
                    lrs.append(float(line))
            except ValueError as e:
                raise ValueError(f"{path}, line {n}: cannot read {line!r} ({e})") from None
        missing = set(types) - set(header) - {"max_lr_source"}  # a file from before max_lr_source: "config"
        if missing:
            raise ValueError(f"{path}: header lacks {sorted(missing)}")
        spec = OneCycleSpec(**header)
        if len(lrs) != spec.total_steps:
            raise ValueError(f"{path}: {len(lrs)} learning rates for {spec.total_steps} steps "
                             f"({spec.epochs} epochs x {spec.steps_per_epoch}); the file is truncated or edited")
        return cls(spec, lrs)

    @classmethod
    def compute(cls, spec: OneCycleSpec) -> Schedule:
        return cls(spec, compute_schedule(spec))


class ScheduleFileLR(torch.optim.lr_scheduler.LRScheduler):
    """A torch LR scheduler over the schedule file: optimizer step k runs at `schedule.lr_at(k)`, every
    parameter group. Stepped once per optimizer step (Lightning's interval "step"); its position is
    saved and restored with Lightning's checkpoints, and each value is read from the file, never
    derived from the previous one, so a resume lands on the exact line."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule, last_epoch: int = -1):
        self.schedule = schedule
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [self.schedule.lr_at(max(self.last_epoch, 0))] * len(self.optimizer.param_groups)

    def state_dict(self) -> dict:
        # The position only: the values stay in the file (and a checkpoint holds plain types).
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "schedule")}

    @staticmethod
    def position_state(schedule: Schedule, step: int, groups: int = 1) -> dict:
        """What `state_dict` holds once `step` steps were taken (the next one runs at line `step`):
        for a state saved without the scheduler (`resume.migrate_checkpoint`)."""
        return {"last_epoch": step, "_step_count": step + 1, "_last_lr": [schedule.lr_at(step)] * groups}


def limited_steps(batches: int, limit: float | int | None) -> int:
    """Optimizer steps per epoch once Lightning's `limit_train_batches` is applied (its own rule: an
    int caps the count, a float is a fraction, rounded down)."""
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return batches
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(batches, limit)
    return int(batches * limit)


def _parse(kind, value: str):
    kind = kind if isinstance(kind, str) else kind.__name__
    if kind == "bool":
        if value not in ("True", "False"):
            raise ValueError(f"expected True or False, got {value!r}")
        return value == "True"
    return {"int": int, "float": float, "str": str}[kind](value)
