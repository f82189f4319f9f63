"""Training targets, built on the device from normalised boxes, for any image size.

The assignment means what the course's dataset means, so its accuracy numbers stay comparable:
per box and per scale, the best-matching (shape IoU) anchor of that scale whose cell slot is free
becomes positive; the other anchors of the box's cell on that scale with shape IoU > 0.5 are
ignored (neither positive nor negative). Two defects of the course's loop are gone:
- a box whose best slot is already taken (by a box of the same image in the same cell) goes to its
  next-best free anchor of that scale rather than vanishing;
- a centre at exactly 1.0 is clamped into the last cell rather than indexing out of range.

Everything is vectorised: three rounds per scale (one per anchor rank) resolve collisions, with the
lower-index box winning a contested slot, as in the course's sequential walk.
"""
from __future__ import annotations

import torch

from .boxes import wh_iou
from .config import ANCHORS

IGNORE_IOU = 0.5


def _as_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    return int(image_size[0]), int(image_size[1])


def build_targets(
    boxes: torch.Tensor,
    batch_size: int,
    image_size: int | tuple[int, int],
    anchors=ANCHORS,
    strides: tuple[int, ...] = (32, 16, 8),
) -> list[torch.Tensor]:
    """Targets for one batch.

    boxes: [N, 6] = image index, class, cx, cy, w, h (normalised 0..1), on any device.
    image_size: side (int) or (H, W), multiples of the strides.
    Returns a list over scales (coarse to fine) of [B, 3, S_h, S_w, 6] float tensors, last axis
    [obj (1 positive, 0 negative, -1 ignore), x in cell, y in cell, w in cells, h in cells, class].
    """
    device = boxes.device
    height, width = _as_hw(image_size)
    anchor_wh = torch.as_tensor(anchors, dtype=torch.float32, device=device)  # [scales, 3, 2]
    n_scales, n_anchors = anchor_wh.shape[:2]
    boxes = boxes.float()
    # Boxes without area cannot be learnt (and their log-width target is -37): skip them.
    boxes = boxes[(boxes[:, 4] > 0) & (boxes[:, 5] > 0)]
    n = boxes.shape[0]
    img, cls = boxes[:, 0].long(), boxes[:, 1]
    xy = boxes[:, 2:4].clamp(0.0, 1.0)
    wh = boxes[:, 4:6]

    # Shape IoU of every box with every anchor: [N, scales, 3].
    ious = wh_iou(wh, anchor_wh.reshape(-1, 2)).reshape(n, n_scales, n_anchors)
    targets = []
    for s, stride in enumerate(strides):
        sh, sw = height // stride, width // stride
        t = torch.zeros(batch_size, n_anchors, sh, sw, 6, device=device)
        # Cell of each box; a centre at exactly 1.0 belongs in the last cell.
        i = (xy[:, 1] * sh).long().clamp(max=sh - 1)
        j = (xy[:, 0] * sw).long().clamp(max=sw - 1)
        cell = i * sw + j  # [N] flat cell index within one feature map
        rank = ious[:, s].argsort(dim=1, descending=True)  # [N, 3] anchors best first
        taken = torch.zeros(batch_size * n_anchors * sh * sw, dtype=torch.bool, device=device)
        anchor_of = torch.full((n,), -1, dtype=torch.long, device=device)  # assigned anchor, -1 none
        box_idx = torch.arange(n, device=device)
        for r in range(n_anchors):
            a = rank[:, r]
            slot = (img * n_anchors + a) * sh * sw + cell  # index into t[..., 0] flattened
            want = (anchor_of < 0) & ~taken[slot]
            if not bool(want.any()):
                continue
            # Among boxes wanting the same free slot, the lowest box index wins.
            first = torch.full_like(taken, n, dtype=torch.long)
            first.scatter_reduce_(0, slot[want], box_idx[want], reduce="amin")
            win = want & (first[slot] == box_idx)
            anchor_of[win] = a[win]
            taken[slot[win]] = True
        pos = anchor_of >= 0
        b, a, ci, cj = img[pos], anchor_of[pos], i[pos], j[pos]
        t[b, a, ci, cj, 0] = 1.0
        t[b, a, ci, cj, 1] = xy[pos, 0] * sw - cj
        t[b, a, ci, cj, 2] = xy[pos, 1] * sh - ci
        t[b, a, ci, cj, 3] = wh[pos, 0] * sw
        t[b, a, ci, cj, 4] = wh[pos, 1] * sh
        t[b, a, ci, cj, 5] = cls[pos]
        # Ignore: other anchors of the box's cell that fit it well (shape IoU > 0.5), unless positive.
        ib, ia = torch.nonzero(ious[:, s] > IGNORE_IOU, as_tuple=True)
        keep = anchor_of[ib] != ia
        ib, ia = ib[keep], ia[keep]
        obj = t[img[ib], ia, i[ib], j[ib], 0]
        ib, ia = ib[obj == 0], ia[obj == 0]
        t[img[ib], ia, i[ib], j[ib], 0] = -1.0
        targets.append(t)
    return targets
