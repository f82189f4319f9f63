"""YOLODataset (the course's `dataset_org` name): plain samples for validation and test.

Never mosaics, deterministic: the image letterboxed to `image_size` (or the size passed with the
index: `dataset[(i, size)]`), scaled to 0..1. Item: (image float32 [3, S, S], boxes float32 [n, 5] =
class, cx, cy, w, h normalised to the input). With `return_meta=True` a third element says how to
map predictions back to the original image and holds its full ground truth (difficult included):
{"path", "orig_size": (h, w), "scale", "pad": (left, top), "gt": {"boxes" [G,4] x1y1x2y2 original
pixels, "labels" [G], "difficult" [G]}}; a box in input pixels maps back as (x - left) / scale.

A sample that cannot be read gives None after a warning naming the file (the collate drops it and
counts it), so one bad file never stops a run.
"""
from __future__ import annotations

import os
import warnings

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .annotations import DatasetError, Record, load_records, to_pixels
from .config import VOC_CLASSES
from .imageio import MAX_SIDE, ImageError, read_image
from .transforms import eval_transform

BAD_SAMPLE_ERRORS = (ImageError, DatasetError, cv2.error, ValueError)


class YOLODataset(Dataset):
    def __init__(self, root: str | os.PathLike | None, split: str = "test", image_size: int = 416,
                 classes: tuple[str, ...] = VOC_CLASSES, keep_difficult: bool = False, return_meta: bool = False,
                 records: list[Record] | None = None):
        self.records = records if records is not None else load_records(root, split, classes)
        self.root, self.split, self.image_size, self.classes = root, split, image_size, classes
        self.keep_difficult, self.return_meta = keep_difficult, return_meta
        self._transforms: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.records)

    # --- pieces the training dataset shares ---------------------------------------------------
    def load(self, index: int, longest: int | None = None):
        """(RGB uint8 image, record in the decoded image's pixels, decode scale), decoded no smaller than
        `longest` on its longest side (a big JPEG is decoded reduced)."""
        record = self.records[index]
        image, scale = read_image(record.image_path, max_side=longest or MAX_SIDE, with_scale=True)
        if record.width is None:  # course layout: normalised labels, size known only now
            record = to_pixels(record, round(image.shape[1] / scale), round(image.shape[0] / scale))
        elif (record.width, record.height) != (round(image.shape[1] / scale), round(image.shape[0] / scale)):
            warnings.warn(f"{record.label_path}: says {record.width}x{record.height} but {record.image_path} is "
                          f"{round(image.shape[1] / scale)}x{round(image.shape[0] / scale)}; using the image's size",
                          stacklevel=2)
        return image, record, scale

    def training_boxes(self, record: Record, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """Boxes and labels that become targets (difficult ones left out unless asked), in decoded pixels."""
        r = record if self.keep_difficult else record.without_difficult()
        return r.boxes * scale, r.labels

    def transform_for(self, size: int):
        if size not in self._transforms:
            self._transforms[size] = self.make_transform(size)
        return self._transforms[size]

    def make_transform(self, size: int):
        return eval_transform(size)

    @staticmethod
    def to_tensors(image: np.ndarray, boxes, labels, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        out = np.zeros((len(b), 5), np.float32)
        if len(b):
            out[:, 0] = np.asarray(labels)
            out[:, 1] = (b[:, 0] + b[:, 2]) / 2 / size
            out[:, 2] = (b[:, 1] + b[:, 3]) / 2 / size
            out[:, 3] = (b[:, 2] - b[:, 0]) / size
            out[:, 4] = (b[:, 3] - b[:, 1]) / size
        return img, torch.from_numpy(out)

    def _key(self, key) -> tuple[int, int]:
        return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), self.image_size)

    # --- the plain sample ---------------------------------------------------------------------
    def __getitem__(self, key):
        index, size = self._key(key)
        try:
            return self.sample(index, size)
        except BAD_SAMPLE_ERRORS as e:
            warnings.warn(f"skipping sample {index} ({self.records[index].image_path}): {e}", stacklevel=2)
            return None

    def sample(self, index: int, size: int):
        image, record, scale = self.load(index, longest=size)
        boxes, labels = self.training_boxes(record, scale)
        out = self.transform_for(size)(image=image, bboxes=boxes, labels=labels)
        img, target = self.to_tensors(out["image"], out["bboxes"], out["labels"], size)
        if not self.return_meta:
            return img, target
        h, w = image.shape[:2]
        resize = size / max(h, w)
        new_h, new_w = round(h * resize), round(w * resize)
        meta = {
            "path": str(record.image_path),
            "orig_size": (round(h / scale), round(w / scale)),
            "scale": resize * scale,
            "pad": ((size - new_w) // 2, (size - new_h) // 2),
            "gt": {"boxes": torch.from_numpy(record.boxes.astype(np.float32)).reshape(-1, 4),
                   "labels": torch.from_numpy(record.labels.astype(np.int64)),
                   "difficult": torch.from_numpy(record.difficult.astype(bool))},
        }
        return img, target, meta

