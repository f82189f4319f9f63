"""Box conversions and IoUs: pure, vectorised tensor functions (torchvision.ops where it has them),
and the image geometry boxes live on (image size, grid of each stride).

Formats: `cxcywh` = centre x, centre y, width, height; `xyxy` = x1, y1, x2, y2. Any unit, as long
as both sides of an IoU share it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import box_convert, box_iou

from .config import STRIDES

__all__ = ["as_hw", "grid_shapes", "cxcywh_to_xyxy", "xyxy_to_cxcywh", "box_iou", "paired_iou", "wh_iou"]


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


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] x1, y1, x2, y2 -> [..., 4] cx, cy, w, h."""
    return box_convert(boxes.reshape(-1, 4), "xyxy", "cxcywh").reshape(boxes.shape)


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
