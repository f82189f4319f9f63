"""What the plots show, computed: the model run on a few examples, its worst mistakes (the devkit's
matching), and the CAM that explains each mistake. `helpers.plotting` draws the results.

- `detect_examples(model, data, n)`: the first n examples of a dataset or batch, their ground truth
  and the model's detections (`Examples`), for `plotting.plot_examples`.
- `find_mistakes(detections, ground_truths)`: the highest-scoring false positives and the largest
  missed objects; `mistakes_on(model, data)` runs the model first.
- `mistake_cams(model, images, mistakes)`: one CAM per mistake, for `plotting.plot_worst_mistakes`.

Boxes are x1, y1, x2, y2 in input pixels unless said otherwise.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

from .batch import Batch
from .boxes import labels_to_pixels
from .cam import assigned_index, capture, detection_cams, locate_detections
from .metrics import match_detections
from .postprocess import detect

__all__ = ["Examples", "examples", "detect_examples", "find_mistakes", "mistakes_on", "mistake_cams"]


@dataclass(frozen=True)
class Examples:
    """The model on n examples. images [n,3,S,S] float 0..1; truths: per image [G,5] (x1, y1, x2, y2,
    class) or None where unknown; metas: per image the plain dataset's meta or None; detections: per
    image [K,6] as `detect` returns them, on the CPU; rows: per image [K], each detection's row in
    the raw output; num_classes: the model's."""
    images: torch.Tensor
    truths: list
    metas: list
    detections: list[torch.Tensor]
    rows: list[torch.Tensor]
    num_classes: int


def examples(data, n: int) -> tuple[torch.Tensor, list, list]:
    """(images [n,3,H,W] float, truths: per image [G,5] pixel boxes or None, metas: per image the
    plain dataset's meta or None) from a dataset (items (image, boxes[, meta])), a `batch.Batch` or
    images [B,3,S,S] / [3,S,S]."""
    if isinstance(data, torch.Tensor):
        images = data if data.dim() == 4 else data[None]
        return images[:n], [None] * min(n, len(images)), [None] * min(n, len(images))
    if isinstance(data, Batch):
        images = data.images[:n]
        h, w = data.image_hw
        truths = [labels_to_pixels(data.boxes[data.boxes[:, 0] == i][:, 1:], h, w) for i in range(len(images))]
        metas = list(data.metas[:n]) if data.metas is not None else [None] * len(images)
        return images, truths, metas
    images, truths, metas = [], [], []
    for i in range(min(n, len(data))):
        item = data[i]
        if item is None:
            continue
        img, boxes = item[0], item[1]
        images.append(img)
        truths.append(labels_to_pixels(boxes, img.shape[-2], img.shape[-1]))
        metas.append(item[2] if len(item) > 2 and isinstance(item[2], Mapping) else None)
    if not images:
        raise ValueError("examples: no readable sample among the first items of the dataset")
    if len({tuple(i.shape) for i in images}) > 1:
        raise ValueError("examples: the dataset's images differ in size; pass one size (dataset[(i, size)])")
    return torch.stack(images), truths, metas


def detect_examples(model: torch.nn.Module, data, n: int = 4, conf_threshold: float = 0.5,
                    iou_threshold: float = 0.45, device: str | torch.device | None = None) -> Examples:
    """The model's detections on the first n examples of `data` (as `examples` takes it): run in eval
    mode without gradients, its train/eval mode restored afterwards."""
    images, truths, metas = examples(data, n)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            outputs = model(images.to(device))
    finally:
        model.train(was_training)
    dets, rows = detect(outputs, tuple(images.shape[-2:]), conf_threshold, iou_threshold, return_indices=True)
    return Examples(images, truths, metas, [d.cpu() for d in dets], [r.cpu() for r in rows],
                    outputs[0].shape[-1] - 5)


# --- mistakes ---------------------------------------------------------------------------------
def find_mistakes(detections: Sequence[torch.Tensor], ground_truths: Sequence[Mapping], conf_threshold: float = 0.3,
                  iou_threshold: float = 0.5, k: int = 8, num_classes: int = 20,
                  rows: Sequence[torch.Tensor] | None = None) -> list[dict]:
    """The worst mistakes of a set: the k highest-scoring false positives and the k largest missed objects.

    detections: per image [K,6] (as `detect` returns); ground_truths: per image {"boxes" [G,4],
    "labels" [G], "difficult" [G]} in the same pixels (the `voc_map` inputs).
    - false positive: a detection with score >= conf_threshold that the VOC devkit's matching counts
      as false (`helpers.metrics.match_detections`: wrong place, wrong class or a duplicate);
    - missed: a non-difficult object that no detection of its class with score >= conf_threshold
      overlaps with IoU >= iou_threshold (largest first: a big object missed is the worst).
    rows: per image, each detection's row in the raw output (`detect(..., return_indices=True)`):
    then false positives carry it as "row" (what `mistake_cams` explains).
    Returns dicts {"kind": "false positive" | "missed", "image": i, "box": [4] array, "class": c,
    "score": float (detections) or None}, false positives first.
    """
    dets = [torch.as_tensor(d).detach().cpu().reshape(-1, 6) for d in detections]
    order, _, score, _, fp, _ = match_detections(dets, ground_truths, iou_threshold, num_classes)
    counts = torch.tensor([len(d) for d in dets])
    flat = torch.cat(dets) if dets else torch.zeros(0, 6)
    image_of = torch.repeat_interleave(torch.arange(len(dets)), counts)
    bad = order[fp & (score >= conf_threshold)][:k]
    mistakes = [{"kind": "false positive", "image": int(image_of[j]), "box": flat[j, :4].numpy(),
                 "class": int(flat[j, 5]), "score": float(flat[j, 4])} for j in bad.tolist()]
    if rows is not None:
        flat_rows = torch.cat([torch.as_tensor(r).reshape(-1).long().cpu() for r in rows])
        for m, j in zip(mistakes, bad.tolist()):
            m["row"] = int(flat_rows[j])

    missed = []
    for i, (d, gt) in enumerate(zip(dets, ground_truths)):  # per image: a few boxes each, not a hot path
        g_box = torch.as_tensor(gt["boxes"]).reshape(-1, 4).float()
        g_cls = torch.as_tensor(gt["labels"]).reshape(-1).long()
        diff = gt.get("difficult")
        g_dif = torch.zeros(len(g_cls), dtype=torch.bool) if diff is None else torch.as_tensor(diff).reshape(-1).bool()
        d = d[d[:, 4] >= conf_threshold]
        iou = box_iou(g_box, d[:, :4].float()) if len(d) and len(g_box) else torch.zeros(len(g_box), len(d))
        same = g_cls[:, None] == d[:, 5].long()[None, :]
        found = ((iou >= iou_threshold) & same).any(dim=1)
        area = (g_box[:, 2] - g_box[:, 0]) * (g_box[:, 3] - g_box[:, 1])
        for g in torch.nonzero(~found & ~g_dif).flatten().tolist():
            missed.append((float(area[g]), {"kind": "missed", "image": i, "box": g_box[g].numpy(),
                                            "class": int(g_cls[g]), "score": None}))
    missed.sort(key=lambda t: -t[0])
    return mistakes + [m for _, m in missed[:k]]


def mistakes_on(model: torch.nn.Module, data, n: int = 32, conf_threshold: float = 0.3, iou_threshold: float = 0.45,
                k: int = 4, device: str | torch.device | None = None) -> tuple[torch.Tensor, list[dict]]:
    """The model's worst mistakes on the first n examples of `data` (as `detect_examples` takes it):
    (images [n,3,S,S], `find_mistakes` of their detections against their ground truth), ready for
    `mistake_cams` and `plotting.plot_worst_mistakes`. Boxes in input pixels; iou_threshold is NMS's,
    matching uses IoU 0.5 (VOC). With the meta of a plain dataset (`return_meta=True`) the ground
    truth is the image's full one, mapped onto the input by its letterbox, difficult objects included
    and ignored as the VOC evaluation ignores them; without it, the dataset's boxes (difficult
    objects left out, so a detection of one counts as a false positive)."""
    shown = detect_examples(model, data, n, conf_threshold, iou_threshold, device)
    gts = []
    for t, meta in zip(shown.truths, shown.metas):
        if meta is not None and "gt" in meta:
            boxes = meta["letterbox"].to_input(torch.as_tensor(meta["gt"]["boxes"]).reshape(-1, 4))
            gts.append({"boxes": boxes, "labels": torch.as_tensor(meta["gt"]["labels"]).long(),
                        "difficult": torch.as_tensor(meta["gt"]["difficult"]).bool()})
            continue
        t = torch.zeros(0, 5) if t is None else t
        gts.append({"boxes": t[:, :4], "labels": t[:, 4].round().long()})
    return shown.images, find_mistakes(shown.detections, gts, conf_threshold, 0.5, k, shown.num_classes,
                                       rows=shown.rows)


def mistake_cams(model: torch.nn.Module, images, mistakes: Sequence[Mapping], method: str = "gradcam") -> list[np.ndarray]:
    """One CAM per mistake (float32 [S,S] in 0..1 over its input image), one forward pass per image.

    images: the model inputs the mistakes refer to ([N,3,S,S] tensor or a list of [3,S,S]). A false
    positive gets the Grad-CAM of that detection (what made the model fire; its row from the
    mistake's "row", else found again with `locate_detections`). A missed object gets the
    counterfactual Grad-CAM (score "against", see `helpers.cam.DetectionTarget`) of the anchor and
    cell that training assigns to it, for its class: what held that score down (its plain Grad-CAM
    is usually empty: a missed object's score has no positive evidence).
    """
    cams: list[np.ndarray | None] = [None] * len(mistakes)
    by_image: dict[int, list[int]] = {}
    for j, m in enumerate(mistakes):
        by_image.setdefault(int(m["image"]), []).append(j)
    for i, js in by_image.items():
        image = images[i]
        size = tuple(image.shape[-2:])
        cap = capture(model, image)
        fps = [j for j in js if mistakes[j]["kind"] == "false positive"]
        misses = [j for j in js if mistakes[j]["kind"] != "false positive"]
        if fps:  # their own row of the raw output
            dets = torch.tensor([[*np.asarray(mistakes[j]["box"], np.float32), float(mistakes[j]["score"]),
                                  float(mistakes[j]["class"])] for j in fps])
            rows = locate_detections(cap.outputs, dets, size) if any("row" not in mistakes[j] for j in fps) \
                else torch.tensor([mistakes[j]["row"] for j in fps])
            maps = detection_cams(model, image, indices=rows, classes=dets[:, 5], method=method, cache=cap)
            for n, j in enumerate(fps):
                cams[j] = maps[n]
        if misses:  # the anchor training assigns them, differentiated against
            boxes = torch.tensor(np.stack([np.asarray(mistakes[j]["box"], np.float32) for j in misses]))
            classes = torch.tensor([int(mistakes[j]["class"]) for j in misses])
            maps = detection_cams(model, image, indices=assigned_index(boxes, size), classes=classes,
                                  method=method, score="against", cache=cap)
            for n, j in enumerate(misses):
                cams[j] = maps[n]
    return cams
