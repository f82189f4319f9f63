"""The errors a user can mend, and how they reach the user: one line saying what to do, never a traceback.

- `ConfigError`: a setting of another type or out of its range (config).
- `DatasetError`: the data folder is missing, empty or broken (annotations).
- `CheckpointError`: a checkpoint cannot be resumed from or loaded (weights).
- `ScheduleMismatch`: the run folder's schedule was computed for other settings (schedule).
- `StorageFull`: the disk filled while writing (storage).
- `TrainingDiverged`: the loss became non-finite (divergence): lower the max LR and resume.

`python -m helpers.train` prints them as `error: ...` and exits with status 2; a notebook cell runs
under `one_line_errors()`, which turns them into a `SystemExit` carrying the message: Jupyter shows
that as one line, where any other exception shows its traceback.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .annotations import DatasetError
from .config import ConfigError
from .divergence import TrainingDiverged
from .schedule import ScheduleMismatch
from .storage import StorageFull
from .weights import CheckpointError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DatasetError, CheckpointError, ScheduleMismatch,
                                            StorageFull, TrainingDiverged)


@contextmanager
def one_line_errors(*more: type[Exception]) -> Iterator[None]:
    """Inside, a USER_ERRORS exception (or one of the types in `more`) ends as SystemExit(its message);
    anything else propagates unchanged."""
    try:
        yield
    except (*USER_ERRORS, *more) as e:
        raise SystemExit(str(e)) from None
