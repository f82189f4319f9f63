"""The run's CSV log: Lightning's `CSVLogger`, its files written through `helpers.storage`.

Lightning appends each flush's rows to `metrics.csv` with plain writes, rewrites the whole file in
place when a new column appears, and writes `hparams.yaml` in place: a full disk there is an
`OSError` traceback that can leave half a file, and a kill during a rewrite loses the session's
rows. Here the rows of a flush are appended all or none (`storage.append_text`), a rewrite and
`hparams.yaml` replace the file atomically (`storage.atomic_write`), and a full disk is the one-line
`StorageFull`. What a kill leaves (a temporary, a cut row) is mended at the next start
(`mend_logs`).
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import yaml
from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from .storage import EMPTY_TRASH, append_text, atomic_write_text, trim_partial_line

FULL_DISK_ADVICE = (f"The run's checkpoints are intact. Free some space ({EMPTY_TRASH}) and rerun with "
                    "--resume latest")


def _csv_text(rows: list[dict], fieldnames: list[str], header: bool) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fieldnames)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


class AtomicExperimentWriter(ExperimentWriter):
    """Lightning's CSV experiment writer with every write through `helpers.storage`."""

    def save(self) -> None:
        if not self.metrics:
            return
        path = Path(self.metrics_file_path)
        new_keys = self._record_new_keys()
        if new_keys or not path.is_file():  # a new file, or a new header: the whole file, atomically
            earlier = []
            if path.is_file():
                with open(path, newline="") as f:
                    earlier = list(csv.DictReader(f))
            atomic_write_text(path, _csv_text(earlier + self.metrics, self.metrics_keys, header=True),
                              advice=FULL_DISK_ADVICE)
        else:
            append_text(path, _csv_text(self.metrics, self.metrics_keys, header=False), advice=FULL_DISK_ADVICE)
        self.metrics = []  # only once written: a failed flush keeps its rows for the next one

    def log_hparams(self, params: dict) -> None:
        self.hparams.update(params)
        atomic_write_text(Path(self.log_dir) / self.NAME_HPARAMS_FILE, yaml.dump(self.hparams, sort_keys=False),
                          advice=FULL_DISK_ADVICE)


class AtomicCSVLogger(CSVLogger):
    """`CSVLogger` writing through `AtomicExperimentWriter`."""

    @property
    @rank_zero_experiment  # as Lightning's: other ranks get a writer that writes nothing
    def experiment(self) -> AtomicExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AtomicExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def mend_logs(logs: str | os.PathLike) -> int:
    """Cut every `metrics.csv` under `logs` back to its last complete row (a kill can cut a long
    append short); returns the bytes cut. Temporaries are `storage.remove_temporaries`'s."""
    return sum(trim_partial_line(path) for path in Path(logs).glob("version_*/metrics.csv"))
