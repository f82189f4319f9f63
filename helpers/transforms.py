"""Albumentations pipelines at a given size. Boxes are pascal_voc pixels with a `labels` field.

- eval (val/test): letterbox (LongestMaxSize + centred PadIfNeeded, fill 0), no randomness;
- train: letterbox, then a mild affine (scale jitter, shift, small rotation/shear), colour
  jitter, horizontal flip, rare grayscale; boxes clipped, slivers dropped.
- mosaic_finish: what a mosaic (already at its size) still gets: colour and flip only.
FILL is the one fill colour of every pad and every mosaic canvas.
"""
from __future__ import annotations

import albumentations as A
import cv2

FILL = 0
# Boxes that shrink below this (pixels, fraction of their area kept) are slivers: dropped.
MIN_SIDE_PX = 2.0
MIN_VISIBILITY = 0.1


def _bbox_params() -> A.BboxParams:
    return A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=MIN_VISIBILITY,
                        min_width=MIN_SIDE_PX, min_height=MIN_SIDE_PX, clip=True, filter_invalid_bboxes=True,
                        check_each_transform=False)  # filter once at the end: cheaper, same result


def letterbox(size: int) -> list[A.BasicTransform]:
    return [A.LongestMaxSize(max_size=size, interpolation=cv2.INTER_LINEAR),
            A.PadIfNeeded(min_height=size, min_width=size, position="center", border_mode=cv2.BORDER_CONSTANT,
                          fill=FILL)]


def eval_transform(size: int) -> A.Compose:
    return A.Compose(letterbox(size), bbox_params=_bbox_params())


def _photometric() -> list[A.BasicTransform]:
    # HSV + brightness/contrast are look-up tables on uint8: several times cheaper than ColorJitter.
    return [A.HueSaturationValue(hue_shift_limit=5, sat_shift_limit=40, val_shift_limit=30, p=0.8),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.HorizontalFlip(p=0.5),
            A.ToGray(p=0.02)]


def train_transform(size: int) -> A.Compose:
    return A.Compose(
        letterbox(size) + [
            A.Affine(scale=(0.75, 1.25), translate_percent=(-0.1, 0.1), rotate=(-5, 5), shear=(-3, 3),
                     border_mode=cv2.BORDER_CONSTANT, fill=FILL, p=0.8),
        ] + _photometric(),
        bbox_params=_bbox_params())


def mosaic_finish() -> A.Compose:
    return A.Compose(_photometric(), bbox_params=_bbox_params())
