"""A run's logged metrics: Lightning CSVLogger files read back as columns, every session of a run merged.

What the training curves (`plotting.plot_training_curves`) and a run's final summary
(`train._final_metrics`) read. Columns are float arrays, NaN where a row has no value.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np


def read_metrics_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Lightning CSVLogger's metrics.csv as column -> float array (NaN where a row has no value)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows (has training logged anything yet?)")
    cols = {}
    for key in rows[0]:
        cols[key] = np.array([float(r[key]) if r.get(key) not in ("", None) else np.nan for r in rows])
    return cols


def read_run_metrics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every session of a run as one table (column -> float array): `path` is the CSVLogger's folder
    (`<run_dir>/logs`, holding a `version_N/metrics.csv` per session), or the run folder holding it.

    A resumed session restarts at its checkpoint's step, so the rows an earlier session logged from
    that step on (steps redone after a kill) are replaced by the later session's."""
    folder = Path(path)
    if (folder / "logs").is_dir():
        folder = folder / "logs"
    files = sorted(folder.glob("version_*/metrics.csv"), key=lambda f: int(f.parent.name.split("_")[-1]))
    if not files:
        raise ValueError(f"{folder}: no version_*/metrics.csv (has training logged anything yet?)")
    rows: list[dict] = []
    for file in files:
        with open(file, newline="") as f:
            session = [r for r in csv.DictReader(f) if r.get("step") not in ("", None)]
        if not session:
            continue
        first = min(float(r["step"]) for r in session)
        rows = [r for r in rows if float(r["step"]) < first] + session
    if not rows:
        raise ValueError(f"{folder}: no rows (has training logged anything yet?)")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: np.array([float(r[k]) if r.get(k) not in ("", None) else np.nan for r in rows]) for k in keys}
