"""Shared fixtures: small synthetic datasets in both layouts, writers for hand-made bad files, and
the real photos of ../shared/realdet (tests that need them skip where they are absent)."""
from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.synthetic import make_course_dataset, make_voc_dataset

REALDET = Path(os.environ.get("REALDET_ROOT", Path(__file__).resolve().parents[1].parent / "shared" / "realdet"))


class FillsUp:
    """A file that takes `room` bytes and then fails as a full disk does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if self.room < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def file_size_limit():
    """file_size_limit(n): a context in which this process cannot write past byte n of any file: the
    kernel fails the write (EFBIG) as a full disk does (ENOSPC), in whatever library writes, Python's
    or compiled code's. (SIGXFSZ, which would kill the process, is ignored meanwhile.)"""

    @contextlib.contextmanager
    def limit(n: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)

    return limit


@pytest.fixture
def voc(tmp_path) -> Path:
    """A fresh VOCdevkit (VOC2007, 12 trainval + 4 test images of 96x72), free to damage."""
    return make_voc_dataset(tmp_path / "voc", n_trainval=12, n_test=4, image_size=(96, 72), seed=1)


@pytest.fixture
def course(tmp_path) -> Path:
    """A fresh course/Kaggle-layout folder (12 train + 4 test images of 96x72), free to damage."""
    return make_course_dataset(tmp_path / "course", n_train=12, n_test=4, image_size=(96, 72), seed=1)


@pytest.fixture(scope="module")
def voc_shared(tmp_path_factory) -> Path:
    """A VOCdevkit shared by a module's tests (40 trainval + 8 test images of 160x120): read only."""
    return make_voc_dataset(tmp_path_factory.mktemp("voc"), n_trainval=40, n_test=8, image_size=(160, 120), seed=2)


@pytest.fixture
def realdet() -> Path:
    devkit = REALDET / "VOCdevkit"
    if not devkit.is_dir():
        pytest.skip(f"real photos not present at {devkit} (set REALDET_ROOT)")
    return devkit


def voc_xml(objects, width: int | None = 96, height: int | None = 72) -> str:
    """A VOC annotation; objects: (name, difficult, (xmin, ymin, xmax, ymax)) in VOC's 1-based pixels."""
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for n, d, (x1, y1, x2, y2) in objects)
    size = "" if width is None else f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
    return f"<annotation><folder>VOC2007</folder><filename>x.jpg</filename>{size}{objs}</annotation>"


@pytest.fixture
def write_voc():
    """write_voc(devkit, id, xml, image, split="trainval", append=False): one hand-made sample.
    image: a PIL image (saved as JPEG), raw bytes, or None (no file). The split list holds just
    this id unless `append`."""

    def write(devkit: Path, image_id: str, xml: str | None, image, split: str = "trainval", append: bool = False):
        year = devkit / "VOC2007"
        if xml is not None:
            (year / "Annotations" / f"{image_id}.xml").write_text(xml)
        if isinstance(image, Image.Image):
            image.save(year / "JPEGImages" / f"{image_id}.jpg", format="JPEG", quality=95)
        elif image is not None:
            (year / "JPEGImages" / f"{image_id}.jpg").write_bytes(image)
        listing = year / "ImageSets" / "Main" / f"{split}.txt"
        before = listing.read_text() if append and listing.is_file() else ""
        listing.write_text(before + f"{image_id}\n")
        return year / "JPEGImages" / f"{image_id}.jpg"

    return write


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8))
