"""TrainingDataset: augmented training samples, mosaic on a fraction of them. `YOLODataset` is the
same class under the course's name (`from helpers.dataset import YOLODataset`).

A sample is a 4-image mosaic (`helpers.mosaic`) with probability `mosaic` (default 0.75, the
course's), otherwise a plain sample: one random affine warp (`transforms.random_affine`: scale
jitter, letterbox or crop, mild rotation and shear, flip). Both then get the same colour jitter.
The size comes with the key (`dataset_org.SampleKey`, from the multi-scale batch sampler) so every
sample of a batch shares it; a plain int index uses `image_size`.

A sample is a pure function of its key and of the keys of its batch: every random draw (mosaic or
not, partners, geometry, flip, colour, albumentations' included) comes from one generator seeded
with the key's seed (run seed, epoch, batch number, rank, position in the batch), index and size.
Nothing depends on what the process read before, so a run resumed mid-epoch gets exactly the
tensors of an uninterrupted run, with any number of workers.

A mosaic's 3 partner images are 3 other images of its own batch, drawn by its generator:
`__getitems__` (which torch's DataLoader calls with the whole batch) decodes each image of the batch
once, so a sample costs one JPEG decode instead of four, the main cost of a mosaic on a 2-core
Colab machine. A sample read alone (`dataset[key]`: plots, benchmarks), or one whose batch has fewer
than 3 other readable images, draws its partners from the whole dataset and decodes them.
"""
from __future__ import annotations

import math
import random
import warnings

import numpy as np

from .dataset_org import BAD_SAMPLE_ERRORS, PlainDataset, SampleKey
from .mosaic import mosaic as build_mosaic
from .transforms import SCALE_JITTER, hflip, photometric, random_affine, warp

# (RGB uint8 image [H, W, 3], boxes [n, 4] x1, y1, x2, y2 in its pixels, labels [n])
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray]


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

    def make_transform(self, size: int):
        return photometric()  # the same for every size (image only)

    def __getitem__(self, key):
        """One sample on its own: (image [3, S, S], boxes [n, 5]), or None if its image is unreadable."""
        return self.__getitems__([key])[0]

    def __getitems__(self, keys) -> list:
        """The samples of a batch of keys, in order (None for an unreadable one, after a warning naming
        its file). Each image of the batch is decoded once; mosaics take their partners among them."""
        self._per_process_setup()
        keys = [self._key(k) for k in keys]
        longest = max(self.longest_side(k.size) for k in keys)
        decoded: dict[int, Decoded | Exception] = {}
        for k in keys:
            if k.index not in decoded:
                decoded[k.index] = self._try_decode(k.index, longest)
        batch = [i for i, d in decoded.items() if not isinstance(d, Exception)]
        return [self._sample(k, decoded, batch, longest) for k in keys]

    @staticmethod
    def generator(key: SampleKey) -> np.random.Generator:
        """The generator of every random draw of the sample `key`: seeded by its seed, index and size."""
        return np.random.default_rng([*(key.seed or ()), key.index, key.size])

    def _sample(self, key: SampleKey, decoded: dict, batch: list[int], longest: int):
        own = decoded[key.index]
        if isinstance(own, Exception):
            self.warn_skip(key.index, own)
            return None
        rng = self.generator(key)
        try:
            if len(self) >= 4 and rng.random() < self.mosaic:
                try:
                    partners = [self._partner(i, decoded, longest) for i in self.mosaic_partners(key.index, batch, rng)]
                    return self.mosaic_sample([own, *partners], key.size, rng)
                except BAD_SAMPLE_ERRORS as e:
                    warnings.warn(f"mosaic around sample {key.index} failed ({e}); using the plain sample", stacklevel=2)
            return self.plain_sample(own, key.size, rng)
        except BAD_SAMPLE_ERRORS as e:
            self.warn_skip(key.index, e)
            return None

    # --- the two kinds of samples -------------------------------------------------------------
    def plain_sample(self, item: Decoded, size: int, rng: np.random.Generator):
        image, boxes, labels = item
        canvas, b, keep = warp(image, boxes, random_affine(*image.shape[:2], size, rng), size)
        return self._finish(canvas, b, labels[keep], size, rng)

    def mosaic_sample(self, items: list[Decoded], size: int, rng: np.random.Generator):
        """items: the sample's own image first, then its 3 partners."""
        images, boxes, labels = zip(*items)
        canvas, b, lab = build_mosaic(list(images), list(boxes), list(labels), size, rng)
        if rng.random() < 0.5:
            canvas, b = hflip(canvas, b)
        return self._finish(canvas, b, lab, size, rng)

    def _finish(self, canvas: np.ndarray, boxes: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator):
        transform = self.transform_for(size)
        # albumentations draws from the generators it is given: this sample's, not the process's.
        transform.set_random_state(rng, random.Random(int(rng.integers(1 << 63))))
        canvas = transform(image=canvas)["image"]
        return self.to_tensors(canvas, boxes, labels, size)

    # --- decoded images and mosaic partners ---------------------------------------------------
    @staticmethod
    def longest_side(size: int) -> int:
        """The longest side a sample of `size` may scale an image to: the decode need not be larger."""
        return math.ceil(size * SCALE_JITTER[1])

    def decode(self, index: int, longest: int) -> Decoded:
        """Image `index` decoded for samples up to `longest` (see `longest_side`), with its target boxes."""
        image, record, scale = self.load(index, longest)
        boxes, labels = self.training_boxes(record, scale)
        return image, boxes, labels

    def _try_decode(self, index: int, longest: int) -> Decoded | Exception:
        try:
            return self.decode(index, longest)
        except BAD_SAMPLE_ERRORS as e:
            return e

    def _partner(self, index: int, decoded: dict, longest: int) -> Decoded:
        """A partner's decoded image: the batch's, else decoded now (and kept for this batch)."""
        if index not in decoded:
            decoded[index] = self._try_decode(index, longest)
        if isinstance(decoded[index], Exception):
            raise decoded[index]
        return decoded[index]

    def mosaic_partners(self, index: int, batch: list[int], rng: np.random.Generator) -> list[int]:
        """3 distinct indices other than `index`, drawn by `rng`: from `batch` (the readable images of
        the sample's batch) when it has 3 others, else from the whole dataset."""
        pool = [i for i in batch if i != index]
        if len(pool) >= 3:
            return [pool[k] for k in rng.choice(len(pool), size=3, replace=False)]
        others = rng.choice(len(self) - 1, size=3, replace=False)  # every index but `index`
        return [int(i) + int(i >= index) for i in others]


YOLODataset = TrainingDataset  # the course's name
