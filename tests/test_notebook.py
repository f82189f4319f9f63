"""The course notebook: the committed copy carries a real, clean execution; it runs headless in smoke mode."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "S13_YOLOv3_Lightning.ipynb"


def test_the_committed_notebook_was_executed_in_order_without_errors_and_stays_small():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert all(counts) and counts == sorted(counts) and len(set(counts)) == len(counts), counts
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert errors == []
    assert any(o.output_type == "display_data" and "image/png" in o.data for c in code for o in c.outputs)
    assert NOTEBOOK.stat().st_size < 3_000_000
    assert "executed" in nb.cells[0].source.lower()  # the first cell says which run produced the outputs


def test_the_committed_notebook_holds_the_builders_cells():
    """The notebook is written by scripts/build_notebook.py from its CELLS: the committed copy's sources
    are those (compared, not executed), so what review reads in the builder is what students run."""
    spec = importlib.util.spec_from_file_location("build_notebook", REPO / "scripts" / "build_notebook.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    url = re.search(r'REPO_URL = "([^"]*)"', nb.cells[2].source).group(1)  # the clone the notebook names
    built = builder.build(run_note="", url=url)
    redo = "rebuild it: python scripts/build_notebook.py --keep-outputs (then execute it)"
    assert [c.cell_type for c in nb.cells] == [c.cell_type for c in built.cells], redo
    for k, (committed, expected) in enumerate(zip(nb.cells, built.cells)):
        if k == 0:  # the title cell ends with the note on the run that produced the outputs
            committed, expected = committed.source.rsplit("**", 2)[0], expected.source.rsplit("**", 2)[0]
        else:
            committed, expected = committed.source, expected.source
        assert committed == expected, f"cell {k} differs from scripts/build_notebook.py's CELLS: {redo}"


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_in_smoke_mode(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        cell.outputs = [] if cell.cell_type == "code" else None
    # Run folder and generated data in tmp, so the test leaves the repository as it was.
    monkeypatch.setenv("YOLO_SMOKE", "1")
    monkeypatch.setenv("YOLO_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("YOLO_RUN_DIR", str(tmp_path / "run"))
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    run = tmp_path / "run-smoke"  # a smoke run's own folder, beside the course run's
    assert (run / "schedule.txt").is_file() and not (tmp_path / "run").exists()
    bundles = list(run.glob("bundle-*/model.safetensors"))
    assert len(bundles) == 1
    assert os.environ["YOLO_SMOKE"] == "1"
    # the range test ran as python -m helpers.train --lr-find runs it, and the notebook showed its curve
    shown = next(c for c in nb.cells if c.cell_type == "code" and "show_saved(" in c.source)
    assert (run / "lr_finder.png").is_file()
    assert sum("image/png" in o.get("data", {}) for o in shown.outputs) == 2  # the curve and the schedule
    written = {name: (run / name).stat().st_mtime_ns for name in ("schedule.txt", "lr_finder.png")}

    # A student disconnected after training reruns the notebook top to bottom: it completes, the
    # training cell only reports the finished run, and nothing is written twice.
    for cell in nb.cells:
        cell.outputs = [] if cell.cell_type == "code" else None
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "run already complete" in text and "LR finder" not in text
    assert {name: (run / name).stat().st_mtime_ns for name in written} == written  # no range test, same schedule
    assert list(run.glob("bundle-*/model.safetensors")) == bundles
    assert len(list((run / "logs").glob("version_*"))) == 1


def test_without_data_outside_smoke_mode_the_notebook_stops_with_one_clear_message(tmp_path, monkeypatch):
    """Never the course's 40 epochs on generated shapes: the data step says how to provide data."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(NOTEBOOK, as_version=4)
    data_cell = next(i for i, c in enumerate(nb.cells) if "get_data(" in c.source)
    nb.cells = nb.cells[: data_cell + 1]
    for cell in nb.cells:
        cell.outputs = [] if cell.cell_type == "code" else None
    for name in ("YOLO_DATA", "YOLO_DOWNLOAD", "KAGGLE_KERNEL_RUN_TYPE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("YOLO_SMOKE", "0")
    monkeypatch.setenv("YOLO_RUN_DIR", str(tmp_path / "run"))
    with pytest.raises(CellExecutionError) as e:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    assert "SystemExit" in str(e.value) and "no dataset found" in str(e.value) and "YOLO_DATA=" in str(e.value)
    assert not (tmp_path / "run" / "schedule.txt").exists()


@pytest.mark.slow
def test_a_run_folder_holding_another_runs_schedule_stops_the_training_cell_in_one_line(tmp_path, monkeypatch):
    """What a smoke run once did to the course run (a schedule for another batch size in the folder):
    the training cell ends with the refusal alone, as SystemExit, not a ScheduleMismatch traceback."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from helpers.schedule import OneCycleSpec, Schedule

    run = tmp_path / "run-smoke"
    run.mkdir()
    Schedule.compute(OneCycleSpec(max_lr=1e-3, epochs=40, steps_per_epoch=100, batch_size=16, dataset_length=1600,
                                  pct_start=0.3)).write(run / "schedule.txt")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    training = next(i for i, c in enumerate(nb.cells) if "lr_find=True" in c.source)
    nb.cells = [c for c in nb.cells[: training + 1] if c.cell_type == "code"]
    nb.cells = [c for c in nb.cells if "build_model(" not in c.source]  # the model cell is not needed
    for cell in nb.cells:
        cell.outputs = []
    monkeypatch.setenv("YOLO_SMOKE", "1")
    monkeypatch.setenv("YOLO_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("YOLO_RUN_DIR", str(tmp_path / "run"))
    with pytest.raises(CellExecutionError) as e:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    message = str(e.value)
    assert "SystemExit" in message and "schedule file" in message and "batch size 16" in message
    assert "ScheduleMismatch" not in message and "Traceback" not in message
