"""YOLODataset for training (the course's `dataset` name): mosaic on a fraction of samples.

A sample is a 4-image mosaic with probability `mosaic` (default 0.75, the course's), otherwise a
plain sample through the training augmentations. The size comes with the index
(`dataset[(i, size)]`, from the multi-scale batch sampler) so every sample of a batch shares it.

A mosaic's 3 partner images are drawn from a buffer of the last images this worker decoded (as
Ultralytics does), which are themselves random draws of the dataset: each sample then decodes one
image instead of four, the main cost of a mosaic on a 2-core Colab machine.
"""
from __future__ import annotations

import random
import warnings
from collections import OrderedDict

import numpy as np

from .dataset_org import BAD_SAMPLE_ERRORS
from .dataset_org import YOLODataset as PlainDataset
from .mosaic import SCALE_JITTER
from .mosaic import mosaic as build_mosaic
from .transforms import mosaic_finish, train_transform


class YOLODataset(PlainDataset):
    def __init__(self, root=None, split: str = "trainval", image_size: int = 416, mosaic: float = 0.75, **kwargs):
        if not 0.0 <= mosaic <= 1.0:
            raise ValueError(f"mosaic is a probability: expected 0..1, got {mosaic}")
        if not 0.5 <= mosaic <= 0.75:
            warnings.warn(f"mosaic={mosaic}: outside 0.5-0.75 a model sees too few "
                          f"{'plain' if mosaic > 0.75 else 'mosaic'} samples (a mosaic-only diet starves large "
                          "objects)", stacklevel=2)
        kwargs.pop("return_meta", None)
        super().__init__(root, split, image_size, **kwargs)
        self.mosaic = mosaic
        self._finish = mosaic_finish()
        self._recent: OrderedDict[int, tuple] = OrderedDict()  # index -> (image, boxes, labels), per worker

    BUFFER = 64  # decoded images kept per worker for mosaic partners (~40 MB of 640x480 photos)

    def _decoded(self, index: int, size: int, fresh: bool = False) -> tuple:
        """(image, boxes, labels) of `index` in decoded pixels, remembered for later mosaics."""
        if index in self._recent and not fresh:
            return self._recent[index]
        image, record, scale = self.load(index, longest=round(size * SCALE_JITTER[1]))
        entry = (image, *self.training_boxes(record, scale))
        self._recent[index] = entry
        if len(self._recent) > self.BUFFER:
            self._recent.popitem(last=False)
        return entry

    def make_transform(self, size: int):
        return train_transform(size)

    def __getitem__(self, key):
        index, size = self._key(key)
        # Python's `random` is seeded per worker by Lightning (seed_everything(workers=True)).
        rng = np.random.default_rng(random.getrandbits(64))
        try:
            if len(self) >= 4 and rng.random() < self.mosaic:
                try:
                    return self.mosaic_sample(index, size, rng)
                except BAD_SAMPLE_ERRORS as e:
                    warnings.warn(f"mosaic around sample {index} failed ({e}); using the plain sample", stacklevel=2)
            return self.sample(index, size)
        except BAD_SAMPLE_ERRORS as e:
            warnings.warn(f"skipping sample {index} ({self.records[index].image_path}): {e}", stacklevel=2)
            return None

    def mosaic_partners(self, index: int, rng: np.random.Generator) -> list[int]:
        """3 distinct indices other than `index`: from the decoded buffer when it holds enough."""
        pool = [i for i in self._recent if i != index]
        if len(pool) < 3:
            pool = [i for i in range(len(self)) if i != index]
        return [int(i) for i in rng.choice(pool, size=3, replace=False)]

    def mosaic_sample(self, index: int, size: int, rng: np.random.Generator):
        indices = [index] + self.mosaic_partners(index, rng)  # 4 distinct images
        # The main image is always decoded (its cost is the honest per-sample cost); partners come
        # from the buffer.
        images, boxes, labels = zip(*(self._decoded(i, size, fresh=(k == 0)) for k, i in enumerate(indices)))
        canvas, b, lab = build_mosaic(list(images), list(boxes), list(labels), size, rng)
        out = self._finish(image=canvas, bboxes=b, labels=lab)
        return self.to_tensors(out["image"], out["bboxes"], out["labels"], size)
