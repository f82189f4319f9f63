"""Box conversions and IoUs: pure, vectorised tensor functions (torchvision.ops where it has them),
and the image geometry boxes live on (image size, grid of each stride, the letterbox between an
original image and the model's input).

Formats: `cxcywh` = centre x, centre y, width, height; `xyxy` = x1, y1, x2, y2. Any unit, as long
as both sides of an IoU share it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torchvision.ops import box_convert, box_iou

from .config import STRIDES

__all__ = ["as_hw", "grid_shapes", "cxcywh_to_xyxy", "labels_to_pixels", "box_iou", "paired_iou", "wh_iou",
           "Letterbox", "letterboxes_to_original"]


def as_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """An image size given as a side (square) or as (H, W) -> (H, W) ints."""
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def grid_shapes(image_size: int | Sequence[int], strides: Sequence[int] = STRIDES) -> list[tuple[int, int]]:
    """(S_h, S_w) of each scale's grid, coarse to fine: (H / stride, W / stride) per stride."""
    h, w = as_hw(image_size)
    return [(h // s, w // s) for s in strides]


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] cx, cy, w, h -> [..., 4] x1, y1, x2, y2."""
    return box_convert(boxes.reshape(-1, 4), "cxcywh", "xyxy").reshape(boxes.shape)


def labels_to_pixels(boxes, height: int, width: int) -> torch.Tensor:
    """Dataset boxes [n,5] (class, cx, cy, w, h normalised) -> [n,5] (x1, y1, x2, y2, class) in the
    pixels of a height x width input, float32."""
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 5)
    xyxy = cxcywh_to_xyxy(b[:, 1:] * b.new_tensor([width, height, width, height]))
    return torch.cat((xyxy, b[:, :1]), dim=1)


def paired_iou(a: torch.Tensor, b: torch.Tensor, fmt: str = "cxcywh", eps: float = 1e-7) -> torch.Tensor:
    """IoU of a[i] with b[i] (not all pairs: see `box_iou` for that).

    a, b: [..., 4] in the same format ("cxcywh" or "xyxy"). Returns [...].
    """
    if fmt == "cxcywh":
        a, b = cxcywh_to_xyxy(a), cxcywh_to_xyxy(b)
    elif fmt != "xyxy":
        raise ValueError(f"unknown box format {fmt!r}")
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter + eps)


def wh_iou(wh1: torch.Tensor, wh2: torch.Tensor) -> torch.Tensor:
    """Shape IoU with centres aligned (YOLO's anchor matching): wh1 [N, 2], wh2 [M, 2] -> [N, M]."""
    inter = torch.minimum(wh1[:, None, :], wh2[None, :, :]).prod(-1)
    return inter / (wh1.prod(-1)[:, None] + wh2.prod(-1)[None, :] - inter)


# --- letterbox ------------------------------------------------------------------------------------
class Letterbox(NamedTuple):
    """Where an original image of orig_h x orig_w pixels lies on the model's input: a point (x, y) of
    the original lands at (x * scale + pad_left, y * scale + pad_top) in input pixels.

    The one description of a letterbox: the datasets (`return_meta`), the app, `postprocess.detect`,
    the CAMs and the analysis all take it. `fit` gives the one `transforms.letterbox` makes.
    Immutable; a NamedTuple rather than a frozen dataclass because Lightning's batch transfer
    rebuilds a dataclass by setting its fields (which a frozen one refuses) and a NamedTuple whole.
    """
    scale: float
    pad_left: int
    pad_top: int
    orig_h: int
    orig_w: int

    @classmethod
    def fit(cls, height: int, width: int, size: int) -> Letterbox:
        """The letterbox of `transforms.letterbox(size)` on a height x width image: longest side to
        `size`, centred (PadIfNeeded's split). Exact on the long side; the resize rounds the short
        side's length to whole pixels, so there it holds to within half an input pixel."""
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        return cls(scale, int((size - new_w) / 2.0), int((size - new_h) / 2.0), int(height), int(width))

    @property
    def content_hw(self) -> tuple[int, int]:
        """(rows, columns) the picture covers on the input, from (pad_top, pad_left) on."""
        return max(1, round(self.orig_h * self.scale)), max(1, round(self.orig_w * self.scale))

    def to_input(self, boxes: torch.Tensor) -> torch.Tensor:
        """[..., 4] x1, y1, x2, y2 in original pixels -> [..., 4] in input pixels (float32)."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
        pad = boxes.new_tensor([self.pad_left, self.pad_top, self.pad_left, self.pad_top])
        return boxes * self.scale + pad

    def to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """[..., 4] x1, y1, x2, y2 in input pixels -> [..., 4] in original pixels (float32), clipped
        to the original image (what lies on the padding ends on its border)."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
        flat = boxes.reshape(-1, 4)
        index = torch.zeros(len(flat), dtype=torch.long, device=flat.device)
        return letterboxes_to_original([self], flat, index).reshape(boxes.shape)


def _checked(letterbox) -> Letterbox:
    if not isinstance(letterbox, Letterbox):
        raise ValueError(f"a letterbox must be a helpers.boxes.Letterbox, got {type(letterbox).__name__}")
    return letterbox


def letterboxes_to_original(letterboxes: Sequence, boxes: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Boxes of a batch back to their original images, each through its own image's letterbox.

    letterboxes: B `Letterbox`es; boxes [K, 4] x1, y1, x2, y2 in input pixels; image [K]
    long, which entry each box belongs to. Returns [K, 4] float32 in original pixels, clipped to
    each original image.
    """
    lbs = [_checked(e) for e in letterboxes]
    params = torch.tensor([[lb.scale, lb.pad_left, lb.pad_top, lb.orig_w, lb.orig_h] for lb in lbs],
                          dtype=torch.float32, device=boxes.device).reshape(-1, 5)[image]  # [K, 5]
    scale, pad, limit = params[:, :1], params[:, 1:3].repeat(1, 2), params[:, 3:5].repeat(1, 2)
    return torch.minimum(((boxes.float() - pad) / scale).clamp(min=0), limit)
