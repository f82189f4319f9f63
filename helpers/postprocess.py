"""From the model's raw outputs to detections: vectorised decode, class-aware NMS, letterbox undo.

`decode` turns the 3 raw scale tensors into boxes and probabilities for every anchor of every cell,
for the whole batch at once; `detect` scores them, keeps those above a threshold, caps them per
image before NMS (as mmdetection's `nms_pre`, one batched top-k), runs `torchvision.ops.batched_nms`
per image (class-aware: boxes of different classes never suppress each other), caps the survivors
per image, and maps them back to original image pixels.

Nothing here writes into the model's outputs: every activation is computed on a float32 copy.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import batched_nms

from .boxes import Letterbox, as_hw, letterboxes_to_original
from .config import ANCHORS, MAX_LOG_SCALE, STRIDES

SCORES = ("obj*cls", "obj")


def _check_outputs(outputs: Sequence[torch.Tensor], anchors) -> None:
    if len(outputs) != len(anchors):
        raise ValueError(f"postprocess: expected {len(anchors)} output scales (one per anchor set), "
                         f"got {len(outputs)}")
    for s, out in enumerate(outputs):
        if out.dim() != 5 or out.shape[1] != len(anchors[s]) or out.shape[-1] < 6:
            raise ValueError(f"postprocess: output {s} must be [B, {len(anchors[s])}, S_h, S_w, 5+C], "
                             f"got {tuple(out.shape)}")
        if out.shape[0] != outputs[0].shape[0] or out.shape[-1] != outputs[0].shape[-1]:
            raise ValueError("postprocess: the output scales disagree on batch size or class count: "
                             f"{[tuple(o.shape) for o in outputs]}")


def decode(
    outputs: Sequence[torch.Tensor],
    anchors=ANCHORS,
    *,
    image_size: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Every anchor of every cell of every scale as a box with probabilities.

    outputs: list of 3 raw tensors [B, 3, S_h, S_w, 5+C], coarse to fine, last axis
        [obj, tx, ty, tw, th, class logits...] (as `YOLOv3.forward` returns them).
    anchors: 3 x 3 (w, h) as fractions of the image, coarse to fine.
    image_size: (H, W) or side of the input images in pixels; None = the coarse grid x its stride.
    Returns float32 [B, A, 5+C] with A = sum over scales of 3 * S_h * S_w (10,647 at 416), last axis
    [x1, y1, x2, y2 (input pixels, not clipped), sigmoid(obj), softmax(class logits)...].
    The class probabilities are a softmax because the loss trains the classes with cross-entropy.
    """
    _check_outputs(outputs, anchors)
    if image_size is None:
        image_size = (outputs[0].shape[2] * STRIDES[0], outputs[0].shape[3] * STRIDES[0])
    height, width = as_hw(image_size)
    batch = outputs[0].shape[0]
    decoded = []
    for out, scale_anchors in zip(outputs, anchors):
        p = out.detach().float()  # a copy whenever it matters: all activations below are out of place
        _, n_a, sh, sw, _ = p.shape
        device = p.device
        jj = torch.arange(sw, device=device, dtype=torch.float32).view(1, 1, 1, sw)
        ii = torch.arange(sh, device=device, dtype=torch.float32).view(1, 1, sh, 1)
        anchor_wh = torch.as_tensor(scale_anchors, dtype=torch.float32, device=device).view(1, n_a, 1, 1, 2)
        cx = (p[..., 1].sigmoid() + jj) * (width / sw)
        cy = (p[..., 2].sigmoid() + ii) * (height / sh)
        wh = p[..., 3:5].clamp(max=MAX_LOG_SCALE).exp() * anchor_wh  # no inf from extreme or fp16 logits
        w, h = wh[..., 0] * width, wh[..., 1] * height
        boxes = torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)
        obj = p[..., :1].sigmoid()
        cls = p[..., 5:].softmax(dim=-1)
        decoded.append(torch.cat((boxes, obj, cls), dim=-1).reshape(batch, -1, p.shape[-1]))
    return torch.cat(decoded, dim=1)


def detect(
    outputs: Sequence[torch.Tensor],
    image_size: int | Sequence[int],
    conf_threshold: float = 0.05,
    iou_threshold: float = 0.45,
    max_detections: int = 100,
    nms_pre: int | None = 1000,
    score: str = "obj*cls",
    letterbox: Sequence[Letterbox] | None = None,
    anchors=ANCHORS,
    return_indices: bool = False,
) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Detections per image after class-aware NMS.

    outputs: the model's raw list of 3 tensors [B, 3, S_h, S_w, 5+C] (never modified).
    image_size: side or (H, W) of the input images in pixels.
    conf_threshold: keep candidates whose score is above it.
    iou_threshold: NMS suppresses a box overlapping a higher-scoring one of its class by IoU above it.
    max_detections: at most this many per image (highest scores).
    nms_pre: at most this many candidates per image enter NMS (highest scores); None = all.
    score: "obj*cls" = sigmoid(obj) x class probability (default), "obj" = sigmoid(obj) alone,
        the course's score.
    letterbox: None (boxes in input pixels, clipped to the input) or one `boxes.Letterbox` per image
        (or the plain dataset's metas, which carry one): boxes mapped back to the original image
        (`Letterbox.to_original`) and clipped to it.
    return_indices: also return, per image, the long tensor [K] of each detection's row among the
        decoded anchors (`decode`'s axis A: scale, anchor, row, column), which says which cell, anchor
        and scale of the raw output it came from (what a per-detection Grad-CAM differentiates).
    Returns a list of B float32 tensors [K, 6]: x1, y1, x2, y2, score, class (as a float), sorted by
    descending score (and the list of row indices, with return_indices). Boxes of zero area after
    clipping are dropped.
    """
    if score not in SCORES:
        raise ValueError(f"postprocess: score must be one of {SCORES}, got {score!r}")
    height, width = as_hw(image_size)
    dec = decode(outputs, anchors, image_size=(height, width))  # [B, A, 5+C]
    batch, n_anchors, _ = dec.shape
    device = dec.device
    boxes = dec[..., :4]
    obj, cls_prob = dec[..., 4], dec[..., 5:]

    # Candidates: (image, anchor, class, score) above the threshold, at most nms_pre per image
    # (a batched top-k: no sort of the whole set).
    best_prob, best_cls = cls_prob.max(dim=-1)  # one candidate per box, with its best class
    flat = obj * best_prob if score == "obj*cls" else obj  # [B, A]
    if nms_pre is not None and nms_pre < flat.shape[1]:
        top_scores, top_idx = flat.topk(nms_pre, dim=1)
        img, pos = torch.nonzero(top_scores > conf_threshold, as_tuple=True)
        idx, scores = top_idx[img, pos], top_scores[img, pos]
    else:
        img, idx = torch.nonzero(flat > conf_threshold, as_tuple=True)
        scores = flat[img, idx]
    anchor, cls = idx, best_cls[img, idx]

    cand = boxes[img, anchor]
    cand = torch.stack((cand[:, 0].clamp(0, width), cand[:, 1].clamp(0, height),
                        cand[:, 2].clamp(0, width), cand[:, 3].clamp(0, height)), dim=1)
    # Candidates come grouped by image (nonzero's row-major order). One class-aware NMS per image:
    # faster than one batch-wide call, whose per-(image, class) loop masks the whole batch each time
    # (benchmarks/RESULTS.md, "Three design choices").
    counts = torch.bincount(img, minlength=batch).tolist()
    keep, start = [], 0
    for n in counts:
        if n:
            k = batched_nms(cand[start:start + n], scores[start:start + n], cls[start:start + n], iou_threshold)
            keep.append(k[:max_detections] + start)  # sorted by descending score
        start += n
    keep = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long, device=device)
    img, anchor, cand, scores, cls = img[keep], anchor[keep], cand[keep], scores[keep], cls[keep]

    if letterbox is not None:
        if len(letterbox) != batch:
            raise ValueError(f"postprocess: letterbox has {len(letterbox)} entries for a batch of {batch}")
        cand = letterboxes_to_original(letterbox, cand, img)
    nonempty = (cand[:, 2] > cand[:, 0]) & (cand[:, 3] > cand[:, 1])
    img, anchor, cand, scores, cls = img[nonempty], anchor[nonempty], cand[nonempty], scores[nonempty], cls[nonempty]

    dets = torch.cat((cand, scores[:, None], cls[:, None].float()), dim=1)
    counts = torch.bincount(img, minlength=batch).tolist()  # img is sorted
    per_image = list(torch.split(dets, counts))
    return (per_image, list(torch.split(anchor, counts))) if return_indices else per_image
