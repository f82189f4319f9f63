"""The course's own Kaggle dataset, as Kaggle attaches it, trains with default settings.

Built by ../shared/tools/kaggle_replica.py from the real photos of ../shared/realdet: the same
nesting (`<slug>/PASCAL_VOC/{images,labels}`), names, CSVs (`image,text` header) and label format.
Skipped where ../shared is absent.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from helpers.annotations import DatasetError, check, default_split, find_dataset, load_records

REPLICA_TOOL = Path(__file__).resolve().parents[2] / "shared" / "tools" / "kaggle_replica.py"
SLUG = "pascal-voc-dataset-used-in-yolov3-video"


@pytest.fixture(scope="module")
def kaggle_input(tmp_path_factory) -> Path:
    """The folder Kaggle mounts as /kaggle/input, holding the replica."""
    if not REPLICA_TOOL.is_file() or not (REPLICA_TOOL.parents[1] / "realdet" / "VOCdevkit").is_dir():
        pytest.skip(f"the Kaggle replica tool or the real photos are absent ({REPLICA_TOOL})")
    spec = importlib.util.spec_from_file_location("kaggle_replica", REPLICA_TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    dest = tmp_path_factory.mktemp("kaggle-input")
    tool.main(str(dest))
    return dest


@pytest.mark.parametrize("level", ["input", "dataset", "PASCAL_VOC"])
def test_the_dataset_folder_is_found_from_any_level_kaggle_gives(kaggle_input, level):
    given = {"input": kaggle_input, "dataset": kaggle_input / SLUG,
             "PASCAL_VOC": kaggle_input / SLUG / "PASCAL_VOC"}[level]
    assert find_dataset(given) == kaggle_input / SLUG / "PASCAL_VOC"


def test_course_layout_defaults_to_train_and_test_csvs(kaggle_input):
    top = kaggle_input / SLUG
    assert (default_split(top, "train"), default_split(top, "test")) == ("train", "test")
    assert len(load_records(top, "train")) == 158 and len(load_records(top, "test")) == 39


def test_check_passes_the_top_folder_and_pascal_voc(kaggle_input, capsys):
    from helpers.annotations import main

    for folder in (kaggle_input / SLUG, kaggle_input / SLUG / "PASCAL_VOC"):
        assert [p for p in check(folder, decode=False) if p.level == "error"] == []
        assert main(["check", str(folder), "--no-decode"]) == 0


def test_two_datasets_below_a_folder_are_named_not_guessed(tmp_path, voc, course):
    with pytest.raises(DatasetError, match="holds 2 datasets"):
        find_dataset(tmp_path)  # holds voc/ and course/


def test_a_missing_data_folder_is_one_line_from_the_cli(tmp_path, capsys):
    from helpers.train import main

    assert main(["--data", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere: no such folder" in err


@pytest.mark.slow
def test_the_kaggle_dataset_trains_with_default_settings(kaggle_input, tmp_path):
    """`python -m helpers.train --data <the folder Kaggle attaches>` with no split flags: one short epoch."""
    from helpers.train import main

    run = tmp_path / "run"
    assert main(["--data", str(kaggle_input / SLUG), "--run-dir", str(run), "--epochs", "1",
                 "--limit-train-batches", "3", "--limit-val-batches", "2", "--num-workers", "0",
                 "--map-every", "1"]) == 0
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["global_step"] == 3
    assert "val/map50_voc07" in summary["metrics"]
