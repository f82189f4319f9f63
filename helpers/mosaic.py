"""4-image mosaic, built directly at the output size S.

The course builds its mosaic on a 2S canvas and later shrinks it to S, which halves every
object, so a model fed 75% mosaics sees mostly small objects. Here each of the 4 distinct images
is scaled exactly as a plain training sample is (longest side S times the same scale jitter,
`transforms.draw_scale`) and placed with one corner on a random centre of the S x S canvas, so
objects keep the scale they have in plain samples; one fill colour everywhere. Only the part of
each image that shows is resized, and its boxes follow the resized pixels exactly (the resize's
own per-axis scale, not the nominal one). Boxes are clipped to that part; those keeping less
than 10% of their area, or thinner than 2 px, are dropped (`transforms.box_candidates`).
"""
from __future__ import annotations

import cv2
import numpy as np

from .transforms import FILL, box_candidates, draw_scale

CENTRE_RANGE = (0.25, 0.75)  # the mosaic centre, as a fraction of the side


def mosaic(images: list[np.ndarray], boxes: list[np.ndarray], labels: list[np.ndarray], size: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """images: 4 RGB uint8 [H_k, W_k, 3]; boxes: 4 x [n_k, 4] pixels x1, y1, x2, y2; labels: 4 x [n_k].

    Returns (canvas [size, size, 3] uint8, boxes [m, 4] float32 pixels, labels [m] int64). Image 0
    goes top-left of the centre, 1 top-right, 2 bottom-left, 3 bottom-right.
    """
    if len(images) != 4:
        raise ValueError(f"a mosaic needs 4 images, got {len(images)}")
    canvas = np.full((size, size, 3), FILL, np.uint8)
    xc, yc = (int(round(rng.uniform(*CENTRE_RANGE) * size)) for _ in range(2))
    out_boxes, out_labels = [], []
    for k, (img, b, lab) in enumerate(zip(images, boxes, labels)):
        h, w = img.shape[:2]
        s = size / max(h, w) * draw_scale(rng)
        left, top = k in (0, 2), k in (0, 1)
        # The canvas window this image covers (whole pixels), then the source pixels that fill it.
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        x1, x2 = (max(xc - nw, 0), xc) if left else (xc, min(xc + nw, size))
        y1, y2 = (max(yc - nh, 0), yc) if top else (yc, min(yc + nh, size))
        sx1, sx2 = (w - (x2 - x1) / s, w) if left else (0, (x2 - x1) / s)
        sy1, sy2 = (h - (y2 - y1) / s, h) if top else (0, (y2 - y1) / s)
        sx1, sy1 = max(0, int(round(sx1))), max(0, int(round(sy1)))
        sx2, sy2 = min(w, int(round(sx2))), min(h, int(round(sy2)))
        if x2 <= x1 or y2 <= y1 or sx2 <= sx1 or sy2 <= sy1:
            continue  # this image does not show (the centre sits on the canvas edge)
        canvas[y1:y2, x1:x2] = cv2.resize(img[sy1:sy2, sx1:sx2], (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
        if len(b):
            # cv2.resize maps continuous coordinates linearly: x_out = (x - sx1) * (window / crop) + x1.
            gain = np.array([(x2 - x1) / (sx2 - sx1), (y2 - y1) / (sy2 - sy1)] * 2, np.float32)
            moved = (b - np.array([sx1, sy1, sx1, sy1], np.float32)) * gain + np.array([x1, y1, x1, y1], np.float32)
            clipped = np.clip(moved, [x1, y1, x1, y1], [x2, y2, x2, y2])
            keep = box_candidates(moved, clipped)
            out_boxes.append(clipped[keep])
            out_labels.append(lab[keep])
    if out_boxes:
        return canvas, np.concatenate(out_boxes).astype(np.float32), np.concatenate(out_labels).astype(np.int64)
    return canvas, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
