"""PlainDataset: plain samples for validation and test. `YOLODataset` is the same class under the
course's name (`from helpers.dataset_org import YOLODataset`).

Never mosaics, deterministic: the image letterboxed to `image_size` (or to the size passed with
the index, `dataset[(i, size)]`), scaled to 0..1. Item: (image float32 [3, S, S], boxes float32
[n, 5] = class, cx, cy, w, h normalised to the input; difficult objects only with
`keep_difficult`). With `return_meta=True` a third element says how to map predictions back to
the stored image and holds its full ground truth, difficult objects always included (the
evaluation ignores them): {"path", "letterbox": boxes.Letterbox from the stored image to the input,
"gt": {"boxes" [G,4] x1y1x2y2 in stored pixels, "labels" [G] int64, "difficult" [G] bool}}
(`Letterbox.fit` states the precision).

A key is an index, `(index, size)` or a `SampleKey` (what the batch samplers yield: index, size
and the seed of a training sample's augmentations, which this dataset ignores).

A sample that cannot be read gives None after a warning naming the file and the problem (the
collate drops it and counts it), so one bad file never stops a run.
"""
from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .annotations import Record, default_split, load_records
from .boxes import Letterbox
from .config import VOC_CLASSES
from .imageio import decoded_size, read_image, read_size
from .transforms import eval_transform

# What a bad file can raise on its way through decode and transforms (ImageError and DatasetError
# are ValueErrors). The warning names the exception, so a bug would not hide behind a skip.
BAD_SAMPLE_ERRORS = (ValueError, OSError, cv2.error, MemoryError)


class SampleKey(NamedTuple):
    """What a dataset is indexed with: the record's index, the output size, and the seed of the
    sample's augmentations (training only): a tuple of ints, for a training batch (run seed, epoch,
    batch number, rank, position in the batch) from `datamodule.MultiScaleBatchSampler`; None
    for a sample read on its own (then it is seeded by its index and size)."""
    index: int
    size: int
    seed: tuple[int, ...] | None = None


class PlainDataset(Dataset):
    for_training = False  # which default split a `split=None` means (see annotations.DEFAULT_SPLITS)

    def __init__(self, root: str | os.PathLike | None, split: str | None = None, image_size: int = 416,
                 classes: tuple[str, ...] = VOC_CLASSES, keep_difficult: bool = False, return_meta: bool = False,
                 records: list[Record] | None = None, on_error: str = "raise"):
        if split is None and records is None:  # the layout's own (annotations.DEFAULT_SPLITS)
            split = default_split(root, "train" if self.for_training else "test")
        self.records = records if records is not None else load_records(root, split, classes, on_error=on_error)
        self.root, self.split, self.image_size, self.classes = root, split, image_size, classes
        self.keep_difficult, self.return_meta = keep_difficult, return_meta
        self._transforms: dict[int, object] = {}
        self._process: int | None = None  # pid `_per_process_setup` ran in

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key):
        index, size, _ = self._key(key)
        self._per_process_setup()
        try:
            return self.sample(index, size)
        except BAD_SAMPLE_ERRORS as e:
            self.warn_skip(index, e)
            return None

    def sample(self, index: int, size: int):
        image, record, scale = self.load(index, longest=size)
        boxes, labels = self.training_boxes(record, scale)
        out = self.transform_for(size)(image=image, bboxes=boxes, labels=labels)
        img, target = self.to_tensors(out["image"], out["bboxes"], out["labels"], size)
        if not self.return_meta:
            return img, target
        h, w = image.shape[:2]
        fitted = Letterbox.fit(h, w, size)  # on the decoded image, which `scale` shrank from the stored one
        meta = {
            "path": str(record.image_path),
            "letterbox": Letterbox(fitted.scale * scale, fitted.pad_left, fitted.pad_top, record.height, record.width),
            "gt": {"boxes": torch.from_numpy(record.boxes.astype(np.float32)).reshape(-1, 4),
                   "labels": torch.from_numpy(record.labels.astype(np.int64)),
                   "difficult": torch.from_numpy(record.difficult.astype(bool))},
        }
        return img, target, meta

    # --- pieces the training dataset shares ---------------------------------------------------
    def _key(self, key) -> SampleKey:
        """An index, (index, size), (index, size, seed) or a SampleKey, as a SampleKey."""
        if isinstance(key, tuple):
            seed = key[2] if len(key) > 2 else None
            return SampleKey(int(key[0]), int(key[1]), None if seed is None else tuple(int(s) for s in seed))
        return SampleKey(int(key), self.image_size)

    def _per_process_setup(self) -> None:
        """OpenCV kept to one thread in a DataLoader worker: the loader's processes are the parallelism.
        (No random state lives in a process: a training sample seeds its own, see helpers.dataset.)"""
        if self._process == os.getpid():
            return
        self._process = os.getpid()
        if get_worker_info() is not None:
            cv2.setNumThreads(1)

    def transform_for(self, size: int):
        """The albumentations pipeline for `size`, built once per size."""
        if size not in self._transforms:
            self._transforms[size] = self.make_transform(size)
        return self._transforms[size]

    def make_transform(self, size: int):
        return eval_transform(size)

    def load(self, index: int, longest: int) -> tuple[np.ndarray, Record, float]:
        """(RGB uint8 image, its record, decode scale = decoded / stored pixels). A JPEG at least twice
        `longest` is decoded reduced. The record's boxes stay in stored pixels."""
        record = self.records[index]
        image, scale = read_image(record.image_path, max_side=longest, with_scale=True)
        if (image.shape[1], image.shape[0]) != decoded_size(record.width, record.height, scale):
            w, h = read_size(record.image_path)
            # The boxes were drawn for the annotation's size: rescale them to the pixels we have.
            warnings.warn(f"{record.label_path or record.image_path}: says {record.width}x{record.height} but "
                          f"{record.image_path.name} is {w}x{h}; boxes rescaled to the image", stacklevel=2)
            gain = np.array([w / record.width, h / record.height] * 2, np.float32)
            record = Record(record.image_path, record.boxes * gain, record.labels, record.difficult, w, h,
                            record.label_path)
        return image, record, scale

    def training_boxes(self, record: Record, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """(boxes [n, 4] in decoded pixels, labels [n]) that become targets: difficult objects left out
        unless `keep_difficult`."""
        r = record if self.keep_difficult else record.without_difficult()
        return r.boxes * np.float32(scale), r.labels

    @staticmethod
    def to_tensors(image: np.ndarray, boxes, labels, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image float32 [3, S, S] in 0..1, boxes float32 [n, 5] class, cx, cy, w, h normalised)."""
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        out = np.empty((len(b), 5), np.float32)
        out[:, 0] = np.asarray(labels, np.float32).reshape(-1)
        out[:, 1:3] = (b[:, :2] + b[:, 2:]) / (2 * size)
        out[:, 3:5] = (b[:, 2:] - b[:, :2]) / size
        return img, torch.from_numpy(out)

    def warn_skip(self, index: int, error: BaseException) -> None:
        message = str(error)
        path = str(self.records[index].image_path)
        where = "" if path in message else f"{path}: "
        warnings.warn(f"skipping sample {index}: {where}{message} ({type(error).__name__})", stacklevel=3)


YOLODataset = PlainDataset  # the course's name
