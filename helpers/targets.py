"""Training targets, built on the device from normalised boxes, for any image size.

Two steps, each a function: `assign_anchors` decides which anchor of which cell each box trains
(the one home of the assignment: `helpers.cam` explains missed objects with it too), and
`build_targets` writes the assigned boxes into the three target tensors.

The assignment means what the course's dataset means, so its accuracy numbers stay comparable:
per box and per scale, the best-matching (shape IoU) anchor of that scale whose cell slot is free
becomes positive; the other anchors of the box's cell on that scale with shape IoU > 0.5 are
ignored (neither positive nor negative). Two defects of the course's loop are gone:
- a box whose best slot is already taken (by a box of the same image in the same cell) goes to its
  next-best free anchor of that scale rather than vanishing;
- a centre at exactly 1.0 is clamped into the last cell rather than indexing out of range.

Everything is vectorised and free of host syncs (no `.item()`, no boolean-mask indexing, no
data-dependent shapes), so on a GPU the training step never waits here: three rounds (one per
anchor rank, all scales at once) resolve collisions, the lower-index box winning a contested slot;
writes that must not land go to a sink row that is then dropped.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .boxes import grid_shapes, wh_iou
from .config import ANCHORS, STRIDES

IGNORE_IOU = 0.5


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of Python numbers on `device`, made once per device: a fresh `torch.tensor(...,
    device="cuda")` is a copy from pageable memory, which waits for the device. Never modified."""
    return torch.tensor(values, dtype=dtype, device=device)


def _grid_tensor(grids: Sequence[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """[S, 2] long (S_h, S_w) per scale, on the device."""
    return _constant(tuple(tuple(int(v) for v in g) for g in grids), torch.long, device)


@dataclass(frozen=True)
class Assignment:
    """Which anchor of which cell each of N boxes trains, on each of S scales of A anchors.

    anchor: [N, S] long, the box's positive anchor on that scale, -1 where it has none (its
        slots on that scale all taken, or a box without area);
    row, col: [N, S] long, the cell of that scale's grid holding the box centre;
    ignore: [N, S, A] bool, anchors of that cell that fit the box well (shape IoU > IGNORE_IOU)
        without being its positive: neither positive nor negative in training;
    shape_iou: [N, S, A] float, shape IoU (centres aligned) of the box with each anchor.
    """

    anchor: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    ignore: torch.Tensor
    shape_iou: torch.Tensor


def assign_anchors(
    boxes: torch.Tensor,
    grids: Sequence[tuple[int, int]],
    anchors=ANCHORS,
) -> Assignment:
    """The anchor assignment of a batch of boxes (see the module docstring for the rule).

    boxes: [N, 6] float = image index, class, cx, cy, w, h (normalised 0..1), on any device;
        boxes of different images never compete for a slot; lower rows win contested slots.
    grids: (S_h, S_w) per scale, coarse to fine (`helpers.boxes.grid_shapes`).
    anchors: [S][A] (w, h) normalised to the image, coarse to fine.
    Returns an `Assignment`, on the boxes' device.
    """
    device = boxes.device
    anchor_wh = _constant(tuple(tuple(tuple(float(v) for v in a) for a in scale) for scale in anchors),
                          torch.float32, device)  # [S, A, 2]
    n_scales, n_anchors = anchor_wh.shape[:2]
    n = boxes.shape[0]
    if n == 0:
        none = torch.zeros(0, n_scales, dtype=torch.long, device=device)
        return Assignment(none, none, none.clone(), torch.zeros(0, n_scales, n_anchors, dtype=torch.bool, device=device),
                          torch.zeros(0, n_scales, n_anchors, device=device))
    boxes = boxes.float()
    image = boxes[:, 0].long()
    wh = boxes[:, 4:6]
    row, col = _cells(boxes[:, 2:4], grids)
    shape_iou = wh_iou(wh, anchor_wh.reshape(-1, 2)).reshape(n, n_scales, n_anchors)
    # Boxes without area cannot be learnt (and their log-width target is -37): no anchor for them.
    learnable = (wh[:, 0] > 0) & (wh[:, 1] > 0)
    anchor = _resolve_slots(image, row, col, grids, shape_iou, learnable)
    others = torch.arange(n_anchors, device=device) != anchor[..., None]
    ignore = (shape_iou > IGNORE_IOU) & others & learnable[:, None, None]
    return Assignment(anchor, row, col, ignore, shape_iou)


def _cells(xy: torch.Tensor, grids: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres xy [N, 2] (normalised) -> (row, col) [N, S] long: the cell of each grid holding them.

    A centre at exactly 1.0 (or beyond) belongs in the last cell, one below 0 in the first."""
    size = _grid_tensor(grids, xy.device)  # [S, 2] (S_h, S_w)
    xy = xy.clamp(0.0, 1.0)
    row = (xy[:, 1:2] * size[:, 0]).long().minimum(size[:, 0] - 1)
    col = (xy[:, 0:1] * size[:, 1]).long().minimum(size[:, 1] - 1)
    return row, col


def _resolve_slots(image: torch.Tensor, row: torch.Tensor, col: torch.Tensor, grids: Sequence[tuple[int, int]],
                   shape_iou: torch.Tensor, learnable: torch.Tensor) -> torch.Tensor:
    """The positive anchor [N, S] (-1 none) of each box on each scale.

    A slot is (image, scale, anchor, cell). Round r offers every box still without an anchor on a
    scale its r-th best anchor of that scale; it gets it if no box holds that slot already and no
    lower-index box asks for it in the same round. Rounds are one stable sort of slot keys each,
    for all scales at once: a holder sorts before the askers of its slot, askers in box order, and
    the first of each slot's run takes it.
    image: [N]; row, col: [N, S]; shape_iou: [N, S, A]; learnable: [N] bool.
    """
    n, n_scales, n_anchors = shape_iou.shape
    device = shape_iou.device
    widths = _grid_tensor(grids, device)[:, 1]
    cells = max(h * w for h, w in grids)
    cell = row * widths + col  # [N, S]
    scale = torch.arange(n_scales, device=device)
    rank = shape_iou.argsort(dim=2, descending=True, stable=True)  # [N, S, A] anchors best first
    anchor = torch.full((n, n_scales), -1, dtype=torch.long, device=device)
    held = torch.zeros(n, n_scales, dtype=torch.long, device=device)  # slot of the anchor held
    for r in range(n_anchors):
        offer = ((image[:, None] * n_scales + scale) * n_anchors + rank[..., r]) * cells + cell  # [N, S]
        holds = anchor >= 0
        asks = ~holds & learnable[:, None]
        key = torch.where(holds, held, offer) * 2 + asks  # holders (0) before askers (1) of a slot
        key = key.masked_fill(~holds & ~asks, torch.iinfo(torch.long).max)  # out of the running
        key, order = key.flatten().sort(stable=True)
        first = torch.ones_like(key, dtype=torch.bool)
        first[1:] = (key[1:] >> 1) != (key[:-1] >> 1)
        wins = torch.empty_like(first).scatter_(0, order, first & asks.flatten()[order]).view(n, n_scales)
        anchor = torch.where(wins, rank[..., r], anchor)
        held = torch.where(wins, offer, held)
    return anchor


def build_targets(
    boxes: torch.Tensor,
    batch_size: int,
    image_size: int | tuple[int, int],
    anchors=ANCHORS,
    strides: tuple[int, ...] = STRIDES,
) -> list[torch.Tensor]:
    """Targets for one batch.

    boxes: [N, 6] = image index (0 .. batch_size-1), class, cx, cy, w, h (normalised 0..1), on any
        device (not modified).
    image_size: side (int) or (H, W), multiples of the strides.
    Returns a list over scales (coarse to fine) of [B, A, S_h, S_w, 6] float tensors on the boxes'
    device, last axis [obj (1 positive, 0 negative, -1 ignore), x in cell, y in cell, w in cells,
    h in cells, class]. (They are views of one buffer.)
    """
    device = boxes.device
    grids = grid_shapes(image_size, strides)
    n_anchors = len(anchors[0])
    boxes = boxes.float()
    a = assign_anchors(boxes, grids, anchors)

    # One buffer for all scales plus a sink row: a write that must not land goes to the sink, so
    # every index tensor keeps its shape and nothing waits for the device.
    sizes = [batch_size * n_anchors * h * w for h, w in grids]
    buffer = torch.zeros(sum(sizes) + 1, 6, device=device)
    sink = sum(sizes)
    start = _constant(tuple(sum(sizes[:s]) for s in range(len(sizes))), torch.long, device)  # [S]
    grid = _grid_tensor(grids, device)  # [S, 2] (S_h, S_w)
    heights, widths = grid[:, 0], grid[:, 1]
    image = boxes[:, 0].long()

    def slot(anchor: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """Buffer rows of (box, scale, anchor, cell); arguments [N, S] or [N, S, A], broadcast."""
        per_scale = (1, -1) + (1,) * (anchor.dim() - 2)
        b = image.view(-1, *(1,) * (anchor.dim() - 1))
        h, w = heights.view(per_scale), widths.view(per_scale)
        return start.view(per_scale) + ((b * n_anchors + anchor) * h + row) * w + col

    # Positives: [1, x - col, y - row, w, h (in cells), class] at each box's assigned slot.
    xy = boxes[:, None, 2:4].clamp(0.0, 1.0)  # [N, 1, 2]
    pos = a.anchor >= 0
    values = torch.stack((
        torch.ones_like(a.row, dtype=torch.float32),
        xy[..., 0] * grid[:, 1] - a.col,
        xy[..., 1] * grid[:, 0] - a.row,
        boxes[:, None, 4] * grid[:, 1],
        boxes[:, None, 5] * grid[:, 0],
        boxes[:, None, 1].expand_as(pos),
    ), dim=-1)  # [N, S, 6]
    rows = torch.where(pos, slot(a.anchor.clamp(min=0), a.row, a.col), sink)
    buffer.index_put_((rows.flatten(),), values.reshape(-1, 6))

    # Ignored: the box's other well-fitting anchors of its cell, unless some box's positive.
    every = torch.arange(n_anchors, device=device).view(1, 1, -1)
    rows = slot(every, a.row[..., None], a.col[..., None])  # [N, S, A]
    rows = torch.where(a.ignore & (buffer[rows, 0] == 0), rows, sink)
    buffer[rows.flatten(), 0] = -1.0

    return [part.view(batch_size, n_anchors, h, w, 6)
            for part, (h, w) in zip(buffer[:sink].split(sizes), grids)]
