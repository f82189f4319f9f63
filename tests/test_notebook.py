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
    setup = nb.cells[2]
    setup.source = setup.source.replace('RUN_DIR = "runs/notebook"', f'RUN_DIR = "{tmp_path / "run"}"')
    assert str(tmp_path) in setup.source
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    assert (tmp_path / "run" / "schedule.txt").is_file()
    assert list((tmp_path / "run").glob("bundle-*/model.safetensors"))
    assert os.environ["YOLO_SMOKE"] == "1"
