"""The one writer: files appear whole or not at all, a full disk at any write is one line with nothing
half-written, and what a killed write leaves is removed at the next start. Full disks are faked at
the write (ENOSPC from the file, as the kernel returns it) or made real with a file size limit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FillsUp

from helpers import storage
from helpers.storage import (
    StorageFull,
    append_text,
    atomic_write_text,
    remove_temporaries,
    trim_partial_line,
    write_figure,
)
from helpers.synthetic import make_voc_dataset

REPO = Path(__file__).resolve().parents[1]


def disk_full_at(monkeypatch, name: str, room: int = 0, after: int = 0) -> None:
    """Writes to the file `name` (or its temporary) fail as a full disk after `room` bytes, from its
    `after`+1-th opening on; other files are written as usual."""
    real, opens = storage._open, []

    def opened(path, mode, buffering=-1):
        f = real(path, mode, buffering)
        if path.name != name and not path.name.startswith(f".{name}."):
            return f
        opens.append(path)
        return FillsUp(f, room) if len(opens) > after else f

    monkeypatch.setattr(storage, "_open", opened)


def only_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_replaced_file_is_old_or_new_and_a_full_disk_keeps_the_old_one_whole(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, json.dumps({"epoch": 1}))
    atomic_write_text(target, json.dumps({"epoch": 2}))
    assert json.loads(target.read_text()) == {"epoch": 2}
    disk_full_at(monkeypatch, "metrics.json", room=3)
    with pytest.raises(StorageFull) as e:
        atomic_write_text(target, json.dumps({"epoch": 3, "long": "x" * 100}))
    assert "\n" not in str(e.value) and f"could not write {target}" in str(e.value) and "free in" in str(e.value)
    assert json.loads(target.read_text()) == {"epoch": 2} and only_files(tmp_path) == ["metrics.json"]


def test_a_plot_is_written_whole_and_a_full_disk_at_it_leaves_nothing(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    disk_full_at(monkeypatch, "curves.png", room=1000)
    with pytest.raises(StorageFull, match="curves.png"):
        write_figure(fig, tmp_path / "curves.png", dpi=50)
    assert only_files(tmp_path) == []
    monkeypatch.undo()
    write_figure(fig, tmp_path / "curves.png", dpi=50)
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_appended_rows_go_in_all_or_none_even_at_a_real_file_size_limit(tmp_path, file_size_limit):
    log = tmp_path / "metrics.csv"
    append_text(log, "step,loss\r\n" + "".join(f"{i},0.5\r\n" for i in range(100)))
    before = log.read_bytes()
    with file_size_limit(len(before) + 20), pytest.raises(StorageFull, match="metrics.csv"):
        append_text(log, "".join(f"{i},0.25\r\n" for i in range(100, 110)))  # ~100 bytes: half would fit
    assert log.read_bytes() == before  # not one byte of the rows that did not fit


def test_a_row_cut_short_by_a_kill_is_trimmed_at_the_next_start(tmp_path):
    log = tmp_path / "metrics.csv"
    log.write_bytes(b"step,loss\r\n0,0.5\r\n1,0.4")
    assert trim_partial_line(log) == 5 and log.read_bytes() == b"step,loss\r\n0,0.5\r\n"
    assert trim_partial_line(log) == 0


def test_temporaries_of_dead_writers_are_removed_files_and_folders_and_nothing_else(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, alive_pid = int(dead.stdout), os.getppid()  # a process that ended; one that runs (pytest's parent)
    (tmp_path / "logs" / "version_0").mkdir(parents=True)
    (tmp_path / f".schedule.txt.k2j4x9az.{dead_pid}.tmp").write_bytes(b"x" * 100)
    (tmp_path / "logs" / "version_0" / f".metrics.csv.ab12cd34.{dead_pid}.tmp").write_bytes(b"x" * 10)
    bundle = tmp_path / f".bundle-epoch=3.q1w2e3r4.{dead_pid}.tmp"
    (bundle / "sub").mkdir(parents=True)
    (bundle / "model.safetensors").write_bytes(b"x" * 1000)
    (bundle / "sub" / "f").write_bytes(b"x" * 5)
    (tmp_path / ".metrics.json.zzzzzzzz.tmp").write_bytes(b"x")  # written before temporaries carried a pid
    (tmp_path / f".plot.png.abcdefgh.{alive_pid}.tmp").write_bytes(b"being written")
    (tmp_path / ".notes.tmp").write_bytes(b"mine")
    (tmp_path / "metrics.json").write_text("{}")
    assert remove_temporaries(tmp_path) == (4, 100 + 10 + 1005 + 1)
    assert only_files(tmp_path) == [".notes.tmp", f".plot.png.abcdefgh.{alive_pid}.tmp", "metrics.json"]
    assert remove_temporaries(tmp_path / "missing") == (0, 0)


# --- a run's writes, end to end --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory):
    return make_voc_dataset(tmp_path_factory.mktemp("voc"), n_trainval=8, n_test=4, image_size=(64, 48), seed=4)


def tiny_run_args(data: Path, run: Path) -> list[str]:
    settings = {"model": {"width": 0.125},
                "data": {"image_size": 32, "train_sizes": [32], "batch_size": 4, "num_workers": 0, "mosaic": 0.0,
                         "pin_memory": False},
                "train": {"epochs": 2, "accelerator": "cpu", "precision": "32-true", "map_every": 0}}
    config = run.parent / "tiny.json"
    config.write_text(json.dumps(settings))
    return ["--data", str(data), "--run-dir", str(run), "--config", str(config)]


def one_error_line(capsys, *named: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: could not write") and "no space left" in err[0], err
    for name in named:
        assert name in err[0], err
    return err[0]


def temporaries(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*.tmp")]


@pytest.mark.slow
def test_a_full_disk_at_every_write_of_a_run_is_one_line_and_a_rerun_finishes_the_run(tiny_voc, tmp_path, capsys,
                                                                                        monkeypatch):
    """The CSV log mid-run, then the curves plot, then metrics.json: each a one-line error with
    nothing half-written; each rerun with --resume latest goes on, and the last writes the results."""
    from helpers.train import main

    run = tmp_path / "run"
    args = tiny_run_args(tiny_voc, run)
    disk_full_at(monkeypatch, "metrics.csv", after=2)  # the file is made, a row appended; the next row does not fit
    assert main(args) == 2
    one_error_line(capsys, "metrics.csv", "--resume latest")
    for log in run.glob("logs/version_*/metrics.csv"):
        assert log.read_bytes().endswith(b"\n")  # whole rows only
    assert not (run / "metrics.json").exists() and temporaries(run) == []

    monkeypatch.undo()
    disk_full_at(monkeypatch, "training_curves.png", room=2000)
    assert main([*args, "--resume", "latest"]) == 2
    one_error_line(capsys, "training_curves.png", "Training is complete")
    assert not (run / "training_curves.png").exists() and not (run / "metrics.json").exists()
    assert temporaries(run) == []

    monkeypatch.undo()
    disk_full_at(monkeypatch, "metrics.json", room=100)
    assert main([*args, "--resume", "latest"]) == 2
    one_error_line(capsys, "metrics.json")
    assert not (run / "metrics.json").exists() and temporaries(run) == []

    monkeypatch.undo()
    assert main([*args, "--resume", "latest"]) == 0
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["global_step"] == 4 and (run / "training_curves.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_what_a_kill_leaves_in_the_run_is_removed_at_the_next_start(tiny_voc, tmp_path, capsys):
    """A kill during the schedule write, a plot, a log rewrite or an export into the run folder
    leaves temporaries (and perhaps a cut row): the next start removes them and says so."""
    from helpers.train import main

    run = tmp_path / "run"
    args = tiny_run_args(tiny_voc, run)
    (run / "logs" / "version_0").mkdir(parents=True)
    (run / "logs" / "version_0" / "metrics.csv").write_bytes(b"epoch,lr,step\r\n0,0.001,0\r\n0,0.0")
    left = [run / ".schedule.txt.a1b2c3d4.999999999.tmp", run / ".training_curves.png.a1b2c3d4.999999999.tmp",
            run / "logs" / "version_0" / ".hparams.yaml.a1b2c3d4.999999999.tmp"]
    for path in left:
        path.write_bytes(b"x" * 1000)
    bundle = run / ".bundle-epoch=001.a1b2c3d4.999999999.tmp"
    bundle.mkdir()
    (bundle / "model.safetensors").write_bytes(b"x" * 5000)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "removed 4 temporary" in out and "8 KB freed" in out and "cut short" in out
    assert temporaries(run) == []
    # mended first, then (a run from step 0) set aside whole with the earlier run's outputs
    (mended,) = run.glob("set-aside-*/logs/version_0/metrics.csv")
    assert mended.read_bytes() == b"epoch,lr,step\r\n0,0.001,0\r\n"
