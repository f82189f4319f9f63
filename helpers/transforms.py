"""Image transforms at a given output size S. Boxes are x1, y1, x2, y2 pixels (continuous, 0-based).

- eval (val/test): `eval_transform(S)`, albumentations' letterbox (LongestMaxSize + centred
  PadIfNeeded, fill 0), no randomness; `boxes.Letterbox.fit` says exactly where it put the image.
- train, plain sample: `random_affine` draws one matrix (letterbox scale x scale jitter, a shift
  that letterboxes or crops, a mild rotation and shear, a horizontal flip) and `warp` applies it
  with a single cv2.warpAffine from the decoded pixels straight to the S x S canvas. One resampling
  instead of albumentations' resize, pad and affine (three passes, each a blur), and cheaper.
- train, both kinds: `photometric()`, an albumentations pipeline on the finished canvas (hue,
  saturation, value, contrast and a rare grayscale, as one colour matrix).
- `box_candidates`: boxes that keep less than 10% of their area, or end thinner than 2 px, are
  slivers and dropped (YOLOv5's rule); the same rule for plain samples and mosaics.
FILL is the one fill colour of every pad and every mosaic canvas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np

FILL = 0
MIN_SIDE_PX = 2.0  # a box thinner than this after a transform is a sliver
MIN_VISIBILITY = 0.1  # a box keeping less than this fraction of its area is a sliver
SCALE_JITTER = (0.75, 1.25)  # object scale relative to the letterboxed image; mosaics share it
SHIFT = 0.1  # fraction of S the image centre may move
ROTATE_DEG, SHEAR_DEG = 5.0, 3.0  # "mild": boxes of rotated objects stay close to their objects
P_ROTATE = 0.5  # rotation/shear on half of the plain samples (none in mosaics, as in YOLOv5)


# --- eval: letterbox ------------------------------------------------------------------------------
def letterbox(size: int) -> list[A.BasicTransform]:
    """Albumentations letterbox: longest side to `size`, centred on a `size` x `size` canvas of FILL."""
    return [A.LongestMaxSize(max_size=size, interpolation=cv2.INTER_LINEAR),
            A.PadIfNeeded(min_height=size, min_width=size, position="center", border_mode=cv2.BORDER_CONSTANT,
                          fill=FILL)]


def eval_transform(size: int) -> A.Compose:
    # Boxes are clipped only: nothing is cut by a letterbox, and evaluation targets keep tiny objects.
    return A.Compose(letterbox(size), bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"],
                                                                clip=True, filter_invalid_bboxes=True))


# --- train: geometry in one warp ------------------------------------------------------------------
@dataclass(frozen=True)
class Affine:
    """c_out = matrix @ c_in + offset, in continuous pixel coordinates (pixel i spans i..i+1)."""
    matrix: np.ndarray  # [2, 2]
    offset: np.ndarray  # [2]

    def cv2_matrix(self) -> np.ndarray:
        """The same map for cv2.warpAffine, whose coordinates are pixel centres (pixel i at i)."""
        shift = self.offset + self.matrix @ np.full(2, 0.5) - 0.5
        return np.hstack([self.matrix, shift[:, None]]).astype(np.float64)


def draw_scale(rng: np.random.Generator) -> float:
    """Scale jitter relative to the letterbox: the one distribution of plain samples and mosaics."""
    return float(rng.uniform(*SCALE_JITTER))


def random_affine(height: int, width: int, size: int, rng: np.random.Generator) -> Affine:
    """Letterbox scale x jitter, shift (letterbox or crop), mild rotation and shear, horizontal flip."""
    s = size / max(height, width) * draw_scale(rng)
    theta = math.radians(rng.uniform(-ROTATE_DEG, ROTATE_DEG)) if rng.random() < P_ROTATE else 0.0
    shear = math.tan(math.radians(rng.uniform(-SHEAR_DEG, SHEAR_DEG))) if theta else 0.0
    flip = -1.0 if rng.random() < 0.5 else 1.0
    c, si = math.cos(theta), math.sin(theta)
    m = np.array([[c, -si], [si, c]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([s * flip, s])
    centre_out = size / 2 + rng.uniform(-SHIFT, SHIFT, 2) * size
    return Affine(m, centre_out - m @ np.array([width / 2, height / 2]))


def warp(image: np.ndarray, boxes: np.ndarray, affine: Affine, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(canvas [size, size, 3] uint8, boxes [m, 4] float32 on it, keep [n] bool: which input boxes survive).

    Boxes map through their 4 corners (the enclosing box after a rotation, as albumentations'
    'largest_box'), are clipped to the canvas and filtered by `box_candidates`.
    """
    canvas = cv2.warpAffine(image, affine.cv2_matrix(), (size, size), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(FILL, FILL, FILL))
    if not len(boxes):
        return canvas, np.zeros((0, 4), np.float32), np.zeros(0, bool)
    x1, y1, x2, y2 = boxes.T
    corners = np.stack([np.stack([x1, y1], 1), np.stack([x2, y1], 1), np.stack([x1, y2], 1),
                        np.stack([x2, y2], 1)], 1)  # [n, 4, 2]
    moved = corners @ affine.matrix.T + affine.offset
    before = np.concatenate([moved.min(1), moved.max(1)], 1).astype(np.float32)
    after = np.clip(before, 0, size)
    keep = box_candidates(before, after)
    return canvas, after[keep], keep


def box_candidates(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """[n] bool: boxes worth keeping after a crop. before/after: [n, 4] x1, y1, x2, y2.
    At least MIN_VISIBILITY of the area left and both sides at least MIN_SIDE_PX (YOLOv5's rule)."""
    wb, hb = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    wa, ha = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    return (wa >= MIN_SIDE_PX) & (ha >= MIN_SIDE_PX) & (wa * ha >= MIN_VISIBILITY * wb * hb)


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror an image and its boxes [n, 4] left to right."""
    w = image.shape[1]
    return cv2.flip(image, 1), np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)


# --- train: colour --------------------------------------------------------------------------------
# Luminance weights of the colour matrices below (sRGB primaries, as SVG's feColorMatrix uses).
LUMA = np.array([0.2126, 0.7152, 0.0722])


def colour_matrix(hue_deg: float, saturation: float, value: float, contrast: float) -> np.ndarray:
    """[3, 4] affine map of RGB: hue rotation about the grey axis, saturation scaling towards the
    pixel's luminance, value gain, contrast about mid-grey. Greys stay grey; saturation 0 is grey."""
    c, s = math.cos(math.radians(hue_deg)), math.sin(math.radians(hue_deg))
    # Hue rotation about the grey axis (SVG's hueRotate): rows sum to 1, so greys are fixed points.
    hue = (np.tile(LUMA, (3, 1)) + c * np.array([[0.7874, -0.7152, -0.0722], [-0.2126, 0.2848, -0.0722],
                                                   [-0.2126, -0.7152, 0.9278]])
           + s * np.array([[-0.2126, -0.7152, 0.9278], [0.143, 0.140, -0.283], [-0.7874, 0.7152, 0.0722]]))
    sat = saturation * np.eye(3) + (1 - saturation) * np.tile(LUMA, (3, 1))
    m = contrast * value * (sat @ hue)
    return np.hstack([m, np.full((3, 1), (1 - contrast) * 127.5)]).astype(np.float32)


class ColourJitter(A.ImageOnlyTransform):
    """Hue, saturation, value and contrast jitter, and a rare grayscale, as ONE 3x4 colour matrix
    applied by cv2.transform, a fraction of what an HSV round trip (YOLOv5's, or A.HueSaturationValue)
    costs (benchmarks/RESULTS.md, "Data pipeline, reworked"). The ranges are
    YOLOv5's HSV ones: hue about +-5 degrees (the matrix's rotation of +-9 degrees moves HSV hue
    about 0.6 as far), saturation and value gains 1 +- 0.5 and 1 +- 0.35."""

    def __init__(self, hue: float = 9.0, saturation: float = 0.5, value: float = 0.35, contrast: float = 0.2,
                 p_gray: float = 0.02, p: float = 1.0):
        super().__init__(p=p)
        self.hue, self.saturation, self.value, self.contrast, self.p_gray = hue, saturation, value, contrast, p_gray

    def get_params(self) -> dict:
        u = self.random_generator.uniform(-1.0, 1.0, 4)
        gray = self.random_generator.random() < self.p_gray
        return {"matrix": colour_matrix(u[0] * self.hue, 0.0 if gray else 1 + u[1] * self.saturation,
                                        1 + u[2] * self.value, 1 + u[3] * self.contrast)}

    def apply(self, img: np.ndarray, matrix: np.ndarray, **params) -> np.ndarray:
        return cv2.transform(img, matrix)  # uint8 in, uint8 out (rounded, saturated)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("hue", "saturation", "value", "contrast", "p_gray")


def photometric() -> A.Compose:
    """Colour augmentation of a finished training canvas (image only; boxes do not move)."""
    return A.Compose([ColourJitter()])
