"""The notebook's data step: finds the data where it already is, downloads it (kagglehub, network
replaced here) into a folder a killed download never poisons, and otherwise says how to provide it."""
from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest

from helpers.annotations import DatasetError
from helpers.data_source import DataNotFound, get_data, locate_data


@pytest.fixture
def fake_kagglehub(monkeypatch, course):
    """kagglehub whose download copies the course fixture (nested as Kaggle's archive is) into output_dir."""
    calls = []

    def dataset_download(handle, path=None, *, force_download=False, output_dir=None):
        calls.append((handle, output_dir))
        target = Path(output_dir) / "PASCAL_VOC"
        shutil.copytree(course, target)
        return output_dir

    monkeypatch.setitem(sys.modules, "kagglehub", types.SimpleNamespace(dataset_download=dataset_download))
    return calls


def test_a_named_folder_wins_and_may_be_the_folder_above_the_dataset(course, tmp_path):
    assert locate_data(course.parent, tmp_path / "downloads", kaggle_input=tmp_path / "none") == course


def test_a_named_folder_without_a_dataset_is_an_error_not_a_fallback(tmp_path, course):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a dataset folder"):
        locate_data(tmp_path / "empty", kaggle_input=course.parent)


def test_an_attached_kaggle_dataset_is_found(course, tmp_path):
    assert locate_data(None, tmp_path / "downloads", kaggle_input=course.parent) == course


def test_nothing_found_and_no_download_says_how_to_provide_data(tmp_path):
    with pytest.raises(DataNotFound, match="YOLO_DATA=<folder>.*YOLO_SMOKE=1"):
        get_data(None, tmp_path / "downloads", download=False, kaggle_input=tmp_path / "none")


def test_download_lands_complete_and_is_reused_by_the_next_session(fake_kagglehub, tmp_path):
    downloads = tmp_path / "run" / "data"
    found = get_data(None, downloads, download=True, kaggle_input=tmp_path / "none")
    assert found == downloads / "PASCAL_VOC" and (found / "train.csv").is_file()
    assert not list(downloads.parent.glob(".*partial"))
    assert get_data(None, downloads, download=True, kaggle_input=tmp_path / "none") == found
    assert len(fake_kagglehub) == 1  # the second session found the copy


def test_a_download_killed_half_way_is_not_taken_for_a_dataset(tmp_path):
    partial = tmp_path / ".data.partial" / "PASCAL_VOC"
    (partial / "images").mkdir(parents=True)
    (partial / "labels").mkdir()
    assert locate_data(None, tmp_path / "data", kaggle_input=tmp_path / "none") is None


def test_a_failed_download_explains_the_kaggle_token(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise PermissionError("401 Unauthorized")

    monkeypatch.setitem(sys.modules, "kagglehub", types.SimpleNamespace(dataset_download=refuse))
    with pytest.raises(DataNotFound, match="401 Unauthorized.*KAGGLE_API_TOKEN"):
        get_data(None, tmp_path / "data", download=True, kaggle_input=tmp_path / "none")


def test_kaggles_input_folder_counts_only_inside_a_kaggle_notebook(course, tmp_path, monkeypatch):
    """A machine with a `/kaggle/input` (a Kaggle image, a runner set up like Kaggle) is not a Kaggle
    notebook: its datasets are not this run's, and nothing (the notebook's no-data test) finds them."""
    from helpers import data_source

    monkeypatch.setattr(data_source, "KAGGLE_INPUT", course.parent)  # holds a dataset
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    with pytest.raises(DataNotFound, match="no dataset found"):
        get_data(None, tmp_path / "downloads", download=False)
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert get_data(None, tmp_path / "downloads", download=False) == course


def test_a_download_without_network_says_it_is_the_network_not_the_token(tmp_path, monkeypatch):
    """The real kagglehub with name resolution failing, as on a machine offline (Kaggle's Internet off)."""
    import socket

    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    for name in ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataNotFound) as e:
        get_data(None, tmp_path / "data", download=True, kaggle_input=tmp_path / "none")
    message = str(e.value)
    assert "could not be reached" in message and "Internet on" in message and "\n" not in message
    assert "token" not in message.lower()
