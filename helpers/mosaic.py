"""4-image mosaic, built directly at the output size.

Unlike the course's (a 2S canvas later shrunk to S, which halves every object), each of the 4
distinct images is scaled as a plain training sample would be (longest side S, times the same
jitter range as the plain pipeline's affine), then placed with one corner on a random centre of
the S x S canvas, so objects keep the scale they have in plain samples. One fill colour everywhere.
Boxes are clipped to the visible part; those keeping less than 10% of their area, or thinner than
2 px, are dropped (YOLOv5's box-candidate rule).
"""
from __future__ import annotations

import cv2
import numpy as np

from .transforms import FILL, MIN_SIDE_PX, MIN_VISIBILITY

SCALE_JITTER = (0.75, 1.25)
CENTRE_RANGE = (0.25, 0.75)  # the centre's position, as a fraction of the side


def mosaic(images: list[np.ndarray], boxes: list[np.ndarray], labels: list[np.ndarray], size: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """images: 4 RGB uint8 [H_k, W_k, 3]; boxes: 4 x [n_k, 4] pixels x1,y1,x2,y2; labels: 4 x [n_k].

    Returns (canvas [size, size, 3] uint8, boxes [m, 4] float32 pixels, labels [m] int64).
    """
    if len(images) != 4:
        raise ValueError(f"a mosaic needs 4 images, got {len(images)}")
    canvas = np.full((size, size, 3), FILL, np.uint8)
    xc, yc = (int(rng.uniform(*CENTRE_RANGE) * size) for _ in range(2))
    out_boxes, out_labels = [], []
    for k, (img, b, lab) in enumerate(zip(images, boxes, labels)):
        h, w = img.shape[:2]
        s = size * rng.uniform(*SCALE_JITTER) / max(h, w)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        # The corner of this image that touches the centre: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right.
        x0 = xc - nw if k in (0, 2) else xc
        y0 = yc - nh if k in (0, 1) else yc
        # Visible window on the canvas and the matching window in the resized image.
        cx1, cy1, cx2, cy2 = max(x0, 0), max(y0, 0), min(x0 + nw, size), min(y0 + nh, size)
        if cx2 <= cx1 or cy2 <= cy1:
            continue
        # Resize only the part that shows (cheaper than resizing the whole image).
        src = (np.array([cx1 - x0, cy1 - y0, cx2 - x0, cy2 - y0]) / s).round().astype(int)
        src = np.clip(src, 0, [w, h, w, h])
        crop = img[src[1]:max(src[3], src[1] + 1), src[0]:max(src[2], src[0] + 1)]
        canvas[cy1:cy2, cx1:cx2] = cv2.resize(crop, (cx2 - cx1, cy2 - cy1), interpolation=cv2.INTER_LINEAR)
        if len(b):
            moved = b * s + np.array([x0, y0, x0, y0], np.float32)
            clipped = np.clip(moved, [cx1, cy1, cx1, cy1], [cx2, cy2, cx2, cy2])
            keep = box_candidates(moved, clipped)
            out_boxes.append(clipped[keep])
            out_labels.append(lab[keep])
    if out_boxes:
        return canvas, np.concatenate(out_boxes).astype(np.float32), np.concatenate(out_labels).astype(np.int64)
    return canvas, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)


def box_candidates(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Boxes worth keeping after a crop: at least 10% of their area left and both sides >= 2 px."""
    wb, hb = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    wa, ha = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    return (wa >= MIN_SIDE_PX) & (ha >= MIN_SIDE_PX) & (wa * ha >= MIN_VISIBILITY * wb * hb)
