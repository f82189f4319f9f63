"""The course notebook: the committed copy carries a real, clean execution; it runs headless in smoke mode."""
from __future__ import annotations

import os
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
    assert (tmp_path / "run" / "schedule.txt").is_file()
    bundles = list((tmp_path / "run").glob("bundle-*/model.safetensors"))
    assert len(bundles) == 1
    assert os.environ["YOLO_SMOKE"] == "1"

    # A student disconnected after training reruns the notebook top to bottom: it completes, the
    # training cell only reports the finished run, and nothing is written twice.
    for cell in nb.cells:
        cell.outputs = [] if cell.cell_type == "code" else None
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "run already complete" in text and "reusing" in text  # the schedule file too
    assert list((tmp_path / "run").glob("bundle-*/model.safetensors")) == bundles
    assert len(list((tmp_path / "run" / "logs").glob("version_*"))) == 1


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
