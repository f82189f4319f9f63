"""Imports among `helpers` modules go one way: read from the code (imports inside functions too), the
graph has no cycle, and reading a saved model needs no Lightning."""
from __future__ import annotations

import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

from helpers.space import read_imports

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "helpers"


def helpers_imported_by(path: Path) -> set[str]:
    """The helpers modules `path` imports anywhere in its code (module level, functions, try blocks):
    the reader that decides what a Space carries (`space.read_imports`), so both read imports alike."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return (read_imports(path, lazy_helpers=True)[0] & modules) - {path.stem}


def import_graph() -> dict[str, set[str]]:
    return {p.stem: helpers_imported_by(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def test_the_graph_reader_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from .config import Config\nimport helpers.boxes\ndef f():\n    from . import loss\n"
                      "    from helpers.model import YOLOv3\n")
    assert helpers_imported_by(module) == {"config", "boxes", "loss", "model"}


def test_helpers_modules_import_each_other_one_way_only():
    graph = import_graph()
    assert graph["export"] and graph["checkpoints"]  # the reader reads real imports
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        raise AssertionError(f"helpers modules import each other in a cycle: {' -> '.join(e.args[1])}") from None
    assert set(order) == set(graph)


def test_checkpoints_and_export_share_the_reader_and_never_import_each_other():
    graph = import_graph()
    assert "export" not in graph["checkpoints"] and "checkpoints" not in graph["export"]
    assert "weights" in graph["checkpoints"] and "weights" in graph["export"]


def test_reading_a_saved_model_needs_no_lightning():
    script = ("import sys, helpers.weights, helpers.storage; "
              "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning', "
              "'lightning_fabric')); assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_course_module_names_still_import_and_name_our_classes():
    from helpers import dataset, dataset_org, loss, model, utils
    from helpers.dataset import TrainingDataset
    from helpers.dataset_org import PlainDataset

    assert dataset.YOLODataset is TrainingDataset and dataset_org.YOLODataset is PlainDataset
    assert issubclass(TrainingDataset, PlainDataset)
    assert model.YOLOv3 and loss.YoloLoss and utils
