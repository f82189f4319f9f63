"""Where the training data comes from: found on this machine, or downloaded from Kaggle.

The course trains on the Kaggle dataset `KAGGLE_DATASET` (the course layout: `PASCAL_VOC/` with
`images/`, `labels/`, `train.csv`, `test.csv`). `locate_data` looks, in order, at

1. the folder the user named (`YOLO_DATA` in the notebook, `--data` on the command line): if it
   holds no dataset, that is an error, never a reason to look elsewhere;
2. Kaggle's input folder (`/kaggle/input`), where a dataset attached to a Kaggle notebook sits
   (inside a Kaggle notebook only: `KAGGLE_KERNEL_RUN_TYPE` set, as `runtime.detect` tells Kaggle);
3. the download folder: a copy downloaded earlier (by `download_course_dataset`).

and returns the dataset folder itself (`annotations.find_dataset`). `download_course_dataset`
fetches the dataset with kagglehub, whose own progress bar shows the download, into a hidden
`.partial` folder renamed into place once complete, so a download killed half-way is never taken
for a dataset. kagglehub finds the Kaggle token by itself (`TOKEN_HELP`); public datasets often
download without one.
"""
from __future__ import annotations

import os
from pathlib import Path

from .annotations import DatasetError, find_dataset
from .utils import network_failure

KAGGLE_DATASET = "aladdinpersson/pascal-voc-dataset-used-in-yolov3-video"
KAGGLE_INPUT = Path("/kaggle/input")
TOKEN_HELP = (
    "A Kaggle token: on kaggle.com, Settings > API > 'Generate New Token'; then on Colab add it as the "
    "secret KAGGLE_API_TOKEN (key icon in the left bar, notebook access on), or set the environment "
    "variable KAGGLE_API_TOKEN (or KAGGLE_USERNAME and KAGGLE_KEY, or ~/.kaggle/kaggle.json).")


class DataNotFound(DatasetError):
    """No dataset here and none could be downloaded; the message says how to provide one."""


def how_to_provide(download_dir: Path | None) -> str:
    where = f" into {download_dir}" if download_dir else ""
    return ("no dataset found. Provide one of: YOLO_DATA=<folder> (a VOCdevkit or the course's Kaggle "
            f"folder), the Kaggle dataset {KAGGLE_DATASET} attached to a Kaggle notebook (Add Input), or "
            f"a download{where} (on Colab and Kaggle the notebook downloads it with kagglehub; elsewhere "
            "set YOLO_DOWNLOAD=1). For a quick look without data, set YOLO_SMOKE=1 (generated shapes, CPU).")


def kaggle_input_here() -> Path | None:
    """Kaggle's input folder inside a Kaggle notebook, else None: elsewhere a `/kaggle/input` (a
    Kaggle docker image, a machine set up like one) holds nothing attached to this run."""
    return KAGGLE_INPUT if "KAGGLE_KERNEL_RUN_TYPE" in os.environ else None


def locate_data(given: str | os.PathLike | None = None, download_dir: str | os.PathLike | None = None,
                kaggle_input: str | os.PathLike | None = None) -> Path | None:
    """The dataset folder found (see the module's docstring for the order), or None.
    kaggle_input: where attached datasets are (None: `kaggle_input_here()`).

    A `given` folder that holds no dataset raises the DatasetError that says what is there."""
    if given:
        return find_dataset(given)
    if kaggle_input is None:
        kaggle_input = kaggle_input_here()
    for place in (kaggle_input, download_dir):
        if place is None or not Path(place).is_dir():
            continue
        try:
            return find_dataset(place)
        except DatasetError:  # nothing usable there (an empty Kaggle input, a partial download)
            continue
    return None


def download_course_dataset(dest: str | os.PathLike, handle: str = KAGGLE_DATASET) -> Path:
    """Download `handle` with kagglehub into `dest` and return its dataset folder.

    Raises DataNotFound when the download fails: the network's advice when Kaggle could not be
    reached (`network_failure`), else the token's (`TOKEN_HELP`). Inside a Kaggle notebook
    kagglehub attaches the dataset instead and returns where it is mounted."""
    dest = Path(dest)
    partial = dest.with_name(f".{dest.name}.partial")  # kagglehub resumes into it after a kill
    try:
        import kagglehub

        got = Path(kagglehub.dataset_download(handle, output_dir=str(partial)))
    except Exception as e:  # noqa: BLE001 - credentials, quota, a missing dataset: the token's advice
        first = str(e).splitlines()[0] if str(e) else "no answer"
        if network_failure(e):
            raise DataNotFound(f"could not download the Kaggle dataset {handle}: Kaggle could not be reached "
                               f"({type(e).__name__}: {first}). Check the internet connection (on Kaggle: Settings > "
                               "Internet on) and rerun; a partial download resumes") from None
        raise DataNotFound(f"could not download the Kaggle dataset {handle} ({type(e).__name__}: {first}). "
                           f"{TOKEN_HELP}") from None
    if got == partial or partial in got.parents:
        os.replace(partial, dest)  # complete: now visible to locate_data
        got = dest / got.relative_to(partial)
    return find_dataset(got)


def get_data(given: str | os.PathLike | None, download_dir: str | os.PathLike | None,
             download: bool, kaggle_input: str | os.PathLike | None = None) -> Path:
    """The dataset to train on: found (`locate_data`), else downloaded when `download`, else a
    DataNotFound saying how to provide one."""
    found = locate_data(given, download_dir, kaggle_input)
    if found is not None:
        return found
    if download and download_dir is not None:
        return download_course_dataset(download_dir)
    raise DataNotFound(how_to_provide(Path(download_dir) if download_dir else None))
