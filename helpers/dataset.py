"""TrainingDataset: augmented training samples, mosaic on a fraction of them. `YOLODataset` is the
same class under the course's name (`from helpers.dataset import YOLODataset`).

A sample is a 4-image mosaic (`helpers.mosaic`) with probability `mosaic` (default 0.75, the
course's), otherwise a plain sample: one random affine warp (`transforms.random_affine`: scale
jitter, letterbox or crop, mild rotation and shear, flip). Both then get the same colour jitter.
The size comes with the index (`dataset[(i, size)]`, from the multi-scale batch sampler) so every
sample of a batch shares it; a plain int index uses `image_size`.

A mosaic's 3 partner images are drawn from a buffer of the images this process decoded last (as
Ultralytics does), themselves random draws of the dataset: each sample then decodes one JPEG
instead of four, the main cost of a mosaic on a 2-core Colab machine. The buffer holds decoded
pixels only (~64 photos, ~40-60 MB per worker), never augmented ones.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import numpy as np

from .dataset_org import BAD_SAMPLE_ERRORS, PlainDataset
from .mosaic import mosaic as build_mosaic
from .transforms import SCALE_JITTER, hflip, photometric, random_affine, warp

BUFFER = 64  # decoded images kept per process for mosaic partners


class TrainingDataset(PlainDataset):
    for_training = True

    def __init__(self, root=None, split: str | None = None, image_size: int = 416, mosaic: float = 0.75, **kwargs):
        if not 0.0 <= mosaic <= 1.0:
            raise ValueError(f"mosaic is the fraction of samples built as mosaics: expected 0..1, got {mosaic}")
        if not 0.5 <= mosaic <= 0.75:
            warnings.warn(f"mosaic={mosaic}: outside 0.5-0.75 a model sees too few "
                          f"{'plain' if mosaic > 0.75 else 'mosaic'} samples"
                          f"{' (a mosaic-only diet starves large objects)' if mosaic > 0.75 else ''}", stacklevel=2)
        if kwargs.pop("return_meta", False):
            raise ValueError("the training dataset has no meta: use helpers.dataset_org.PlainDataset")
        super().__init__(root, split, image_size, **kwargs)
        self.mosaic = mosaic
        self._recent: OrderedDict[int, tuple] = OrderedDict()  # index -> (image, boxes, labels, longest)

    def make_transform(self, size: int):
        return photometric()  # the same for every size (image only)

    def __getitem__(self, key):
        index, size = self._key(key)
        self._per_process_setup()
        try:
            if len(self) >= 4 and self.rng.random() < self.mosaic:
                try:
                    return self.mosaic_sample(index, size)
                except BAD_SAMPLE_ERRORS as e:
                    if self._recent.get(index) is None:  # the sample's own image is bad: skip it
                        raise
                    warnings.warn(f"mosaic around sample {index} failed ({e}); using the plain sample", stacklevel=2)
            return self.plain_sample(index, size)
        except BAD_SAMPLE_ERRORS as e:
            self.warn_skip(index, e)
            return None

    def sample(self, index: int, size: int):
        return self.plain_sample(index, size)

    # --- the two kinds of samples -------------------------------------------------------------
    def plain_sample(self, index: int, size: int):
        image, boxes, labels = self.decoded(index, size, fresh=True)
        canvas, b, keep = warp(image, boxes, random_affine(*image.shape[:2], size, self.rng), size)
        return self._finish(canvas, b, labels[keep], size)

    def mosaic_sample(self, index: int, size: int):
        self._recent.pop(index, None)  # a failed decode of the main image leaves no stale entry
        main = self.decoded(index, size, fresh=True)
        partners = [self.decoded(i, size) for i in self.mosaic_partners(index)]
        images, boxes, labels = zip(main, *partners)
        canvas, b, lab = build_mosaic(list(images), list(boxes), list(labels), size, self.rng)
        if self.rng.random() < 0.5:
            canvas, b = hflip(canvas, b)
        return self._finish(canvas, b, lab, size)

    def _finish(self, canvas: np.ndarray, boxes: np.ndarray, labels: np.ndarray, size: int):
        canvas = self.transform_for(size)(image=canvas)["image"]
        return self.to_tensors(canvas, boxes, labels, size)

    # --- decoded images and the partner buffer ------------------------------------------------
    def decoded(self, index: int, size: int, fresh: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(RGB uint8 image, boxes [n, 4] in its pixels, labels [n]) of `index`, remembered as a partner
        for later mosaics. `fresh` decodes even when remembered (each sample pays for its own image)."""
        longest = math.ceil(size * SCALE_JITTER[1])  # the most any sample scales it to
        entry = self._recent.get(index)
        if entry is not None and not fresh and entry[3] >= longest:
            self._recent.move_to_end(index)
            return entry[:3]
        image, record, scale = self.load(index, longest)
        boxes, labels = self.training_boxes(record, scale)
        # A full-resolution decode serves every size; a reduced one (a huge JPEG) only up to `longest`.
        self._recent[index] = (image, boxes, labels, longest if scale < 1 else math.inf)
        self._recent.move_to_end(index)
        while len(self._recent) > BUFFER:
            self._recent.popitem(last=False)
        return image, boxes, labels

    def mosaic_partners(self, index: int) -> list[int]:
        """3 distinct indices other than `index`: from the buffer when it holds enough, else the dataset."""
        pool = [i for i in self._recent if i != index]
        if len(pool) < 3:
            pool = [i for i in range(len(self)) if i != index]
        return [int(i) for i in self.rng.choice(pool, size=3, replace=False)]


YOLODataset = TrainingDataset  # the course's name
