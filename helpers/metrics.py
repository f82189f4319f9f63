"""Evaluation metrics: the course's accuracies, PASCAL VOC AP exactly as the devkit defines it, COCO AP.

VOC AP (`voc_map`) follows the official devkit (`VOCevaldet.m`, `VOCap.m`) rule for rule:
- per class, all detections of that class over the whole set in descending score (a stable sort, so
  ties keep the order of the input: image by image, then as listed - the devkit's MATLAB `sort` is
  stable too, and its order is that of the results file);
- each detection is assigned to the ground truth of that class in its image with the highest IoU
  (ties: the first listed), whatever that ground truth's state; a ground truth that does not
  overlap at all is never a candidate (the devkit's `iw>0 & ih>0`);
- IoU >= threshold (`ovmax>=VOCopts.minoverlap` in the devkit; py-faster-rcnn's Python port uses
  `>`, which differs only on an exact tie): if that ground truth is difficult the detection counts
  as neither true nor false positive; else a true positive if the ground truth is not yet matched
  (and it becomes matched), a false positive if it is (a duplicate). IoU below the threshold, or no
  ground truth of the class in the image: a false positive;
- recall = TP / (non-difficult ground truths of the class); precision = TP / (TP + FP);
- "voc07": mean over t = 0, 0.1, ..., 1 of the highest precision at recall >= t (0 where none);
  "all" (VOC2010+): area under the precision envelope (precision made monotone from the right),
  summed where recall changes.

Two choices, stated so the numbers can be compared:
- Pixel convention. The devkit's boxes are 1-based inclusive pixel indices, so it adds 1 to every
  width and height. Our boxes are continuous 0-based coordinates with x1 = xmin - 1, x2 = xmax
  (helpers.annotations maps VOC's XML that way): a pixel run xmin..xmax then has width x2 - x1 =
  xmax - xmin + 1, and the intersection min(x2) - max(x1) equals the devkit's
  min(xmax) - max(xmin) + 1. So plain continuous IoU on our boxes *is* the devkit's IoU on the
  devkit's boxes, and we add nothing. (Adding +1 to continuous boxes would inflate small boxes.)
- The 11 recall points are the exact tenths k/10. The devkit's `0:0.1:1` and the Python ports'
  `np.arange(0, 1.1, 0.1)` carry rounding (3 * 0.1 = 0.30000000000000004), so a recall of exactly
  0.3 misses its own point there; that can only happen when the ground-truth count makes a recall
  land on a tenth exactly, and we take the definition's intent.

A detection whose ground truth is difficult is dropped from the precision/recall arrays rather than
kept as a (TP 0, FP 0) step: it repeats the previous point (or gives 0/0 before the first TP/FP),
so neither AP changes; the arrays just plot cleanly.

Speed: the devkit walks detections one by one. Here the assignment needs no walk at all: which
ground truth a detection is assigned to never depends on earlier matches, so a detection is a true
positive exactly when it is the first (in score order) above-threshold detection assigned to its
non-difficult ground truth. IoUs are computed only for (detection, ground truth) pairs of the same
image and class, all at once; the first-occurrence test is one scatter. See tests/test_metrics.py
for the check against a literal loop implementation.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics import Metric

from .config import AccuracyTargets

METHODS = ("voc07", "all")


def check_method(method: str) -> str:
    """`method` if it is a VOC AP method (METHODS), else ValueError naming the choices."""
    if method not in METHODS:
        raise ValueError(f"VOC AP method must be one of {METHODS}, got {method!r}")
    return method


# --------------------------------------------------------------------------- collecting over ranks
class DetectionsAndTruths(Metric):
    """Collects detections and ground truths over the validation set, gathered across ranks.

    Stored flat with a global image id so torchmetrics can concatenate them across processes.
    """

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("dets", default=[], dist_reduce_fx="cat")  # [K, 7] id, x1, y1, x2, y2, score, cls
        self.add_state("gts", default=[], dist_reduce_fx="cat")  # [G, 7] id, x1, y1, x2, y2, label, difficult
        self.add_state("images", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, detections: list[torch.Tensor], truths: list[dict], image_ids: torch.Tensor) -> None:
        if not len(detections):  # a batch of nothing readable: still a [0, 7] entry, so every rank
            self.dets.append(torch.zeros(0, 7, device=self.device))  # gathers 2-D states of one shape
            self.gts.append(torch.zeros(0, 7, device=self.device))
            return
        for d, t, i in zip(detections, truths, image_ids.tolist()):
            self.dets.append(torch.cat([d.new_full((len(d), 1), i), d.float()], 1))
            boxes = t["boxes"].to(self.device, torch.float32).reshape(-1, 4)
            gt = torch.cat([boxes.new_full((len(boxes), 1), i), boxes,
                            t["labels"].to(boxes).reshape(-1, 1), t["difficult"].to(boxes).reshape(-1, 1)], 1)
            self.gts.append(gt)
        self.images += len(detections)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dets [K,7], gts [G,7], images counted) over every rank (`per_image` splits them)."""
        return _cat(self.dets, 7).cpu(), _cat(self.gts, 7).cpu(), self.images

    def per_image(self) -> tuple[list[torch.Tensor], list[dict], int]:
        """Per image with a detection or a ground truth (in id order): detections [K,6] and ground-truth
        dicts, as `voc_map` takes them; then the number of images seen, those without either included.
        (Split outside `compute`: torchmetrics squeezes one-element tensors of its result.)"""
        dets, gts, images = self.compute()
        return (*split_by_image(dets, gts), int(images))


def split_by_image(dets: torch.Tensor, gts: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    """dets [K,7] (id, x1, y1, x2, y2, score, class), gts [G,7] (id, x1, y1, x2, y2, label, difficult)
    -> per image id, in id order: detections [k,6] and {"boxes" [g,4], "labels" [g], "difficult" [g]}."""
    ids = torch.unique(torch.cat([dets[:, 0], gts[:, 0]]))
    per_det, per_gt = [], []
    for i in ids.tolist():
        per_det.append(dets[dets[:, 0] == i, 1:])
        g = gts[gts[:, 0] == i]
        per_gt.append({"boxes": g[:, 1:5], "labels": g[:, 5].long(), "difficult": g[:, 6].bool()})
    return per_det, per_gt


def _cat(state, width: int) -> torch.Tensor:
    if isinstance(state, torch.Tensor):
        return state.reshape(-1, width)
    return torch.cat(state) if state else torch.zeros(0, width)


# --------------------------------------------------------------------------- course accuracies
class YoloAccuracy(Metric):
    """The course's class / no-object / object accuracies as ratios of sums over the whole set.

    update(outputs, targets): outputs the model's 3 raw tensors [B, 3, S_h, S_w, 5+C]; targets the 3
    tensors of `build_targets` [B, 3, S_h, S_w, 6] (obj 1 positive, 0 negative, -1 ignored).
    - class accuracy: argmax of the class logits == target class, over positive cells;
    - object accuracy: sigmoid(obj) > threshold, over positive cells;
    - no-object accuracy: sigmoid(obj) <= threshold, over negative cells (ignored cells: neither).
    compute() -> {"class_acc", "noobj_acc", "obj_acc"} in percent (NaN where no cell was counted).
    States are sums, so the result is the same however the set is batched or split across devices.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, threshold: float = 0.05, **kwargs):
        super().__init__(**kwargs)
        self.threshold = threshold
        for name in ("correct_class", "total_pos", "correct_obj", "correct_noobj", "total_neg"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> None:
        if len(outputs) != len(targets):
            raise ValueError(f"YoloAccuracy: {len(outputs)} output scales but {len(targets)} target scales")
        for out, tgt in zip(outputs, targets):
            if out.shape[:-1] != tgt.shape[:-1]:
                raise ValueError(f"YoloAccuracy: output {tuple(out.shape)} and target {tuple(tgt.shape)} "
                                 "differ in batch, anchors or grid (targets built for another size?)")
            out = out.detach()
            pos, neg = tgt[..., 0] == 1, tgt[..., 0] == 0
            # sigmoid(x) > t  <=>  x > logit(t): no activation over the whole map.
            above = out[..., 0].float() > math.log(self.threshold / (1 - self.threshold))
            self.correct_class += (out[..., 5:][pos].argmax(-1) == tgt[..., 5][pos].long()).sum()
            self.total_pos += pos.sum()
            self.correct_obj += (above & pos).sum()
            self.correct_noobj += (~above & neg).sum()
            self.total_neg += neg.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        def pct(num, den):
            return 100.0 * num.double() / den if den > 0 else torch.tensor(float("nan"), dtype=torch.float64)

        return {
            "class_acc": pct(self.correct_class, self.total_pos),
            "noobj_acc": pct(self.correct_noobj, self.total_neg),
            "obj_acc": pct(self.correct_obj, self.total_pos),
        }


# --------------------------------------------------------------------------- VOC AP
ACCURACY_NAMES = {"class_acc": "class", "noobj_acc": "no-object", "obj_acc": "object"}


@dataclass(frozen=True)
class AccuracyCheck:
    """One course accuracy against its target (percent); `value` None when it was not scored."""
    name: str  # "class_acc" | "noobj_acc" | "obj_acc"
    value: float | None
    target: float

    @property
    def passed(self) -> bool:
        return self.value is not None and self.value >= self.target

    @property
    def label(self) -> str:
        return ACCURACY_NAMES[self.name]

    def as_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "passed": self.passed}


def judge_accuracies(values: Mapping[str, float | None], targets: AccuracyTargets) -> list[AccuracyCheck]:
    """The three course accuracies of `values` ({"class_acc", "noobj_acc", "obj_acc"} in percent, as
    `YoloAccuracy.compute` or `Evaluator.compute` give them) against `targets`, in that order."""
    return [AccuracyCheck(name, None if values.get(name) is None else float(values[name]), getattr(targets, name))
            for name in ACCURACY_NAMES]


def judged(values: Mapping[str, float | None], targets: AccuracyTargets) -> dict:
    """What a result records about the course's targets: {"accuracy_targets": {name: {value, target,
    passed}}, "verdict": one sentence} (`metrics.json`, the Evaluator's result)."""
    checks = judge_accuracies(values, targets)
    return {"accuracy_targets": {c.name: c.as_dict() for c in checks}, "verdict": verdict_sentence(checks)}


def verdict_sentence(checks: Sequence[AccuracyCheck]) -> str:
    """One sentence: passes all three, or which miss and by how much (percentage points)."""
    shown = ", ".join(f"{c.label} {c.value:.1f}% (target {c.target:g})" for c in checks if c.value is not None)
    missing = [c for c in checks if not c.passed]
    if not missing:
        return f"passes all three course targets: {shown}"
    if all(c.value is None for c in checks):
        return "the course accuracies were not scored"
    misses = "; ".join(f"{c.label} not scored" if c.value is None else
                       f"{c.label} {c.value:.1f}% misses {c.target:g} by {c.target - c.value:.1f} points"
                       for c in missing)
    return f"misses {len(missing)} of 3 course targets: {misses}"


def _gather(detections: Sequence[torch.Tensor], ground_truths: Sequence[Mapping], num_classes: int):
    """Flatten per-image inputs to whole-set NumPy arrays (float64 boxes and scores).

    One concatenation per field, so the per-image cost is a few list appends (thousands of images).
    """
    if len(detections) != len(ground_truths):
        raise ValueError(f"voc_map: {len(detections)} images of detections but {len(ground_truths)} "
                         "of ground truth (one entry per image in both, in the same order)")
    dets = [torch.as_tensor(d).reshape(-1, 6) for d in detections]
    d_counts = np.array([len(d) for d in dets], dtype=np.int64)
    d = torch.cat(dets).detach().cpu().double().numpy() if dets else np.zeros((0, 6))

    boxes, labels, diffs = [], [], []
    for i, gt in enumerate(ground_truths):
        try:
            boxes.append(torch.as_tensor(gt["boxes"]).reshape(-1, 4))
            labels.append(torch.as_tensor(gt["labels"]).reshape(-1))
        except KeyError as e:
            raise ValueError(f"voc_map: ground truth {i} lacks {e}; expected keys boxes, labels, difficult") from e
        diff = gt.get("difficult")
        diffs.append(torch.zeros(len(labels[-1]), dtype=torch.bool) if diff is None
                     else torch.as_tensor(diff).reshape(-1))
    g_counts = np.array([len(x) for x in labels], dtype=np.int64)
    for i, (b, d_) in enumerate(zip(boxes, diffs)):
        if len(b) != g_counts[i] or len(d_) != g_counts[i]:
            raise ValueError(f"voc_map: ground truth {i} has {len(b)} boxes, {g_counts[i]} labels, "
                             f"{len(d_)} difficult flags")
    if boxes:
        g_box = torch.cat(boxes).detach().cpu().double().numpy()
        g_cls = torch.cat(labels).detach().cpu().long().numpy()
        g_dif = torch.cat(diffs).detach().cpu().bool().numpy()
    else:
        g_box, g_cls, g_dif = np.zeros((0, 4)), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    d_img = np.repeat(np.arange(len(d_counts)), d_counts)
    g_img = np.repeat(np.arange(len(g_counts)), g_counts)

    d_cls = np.rint(d[:, 5]).astype(np.int64)
    for name, cls in (("detection", d_cls), ("ground-truth", g_cls)):
        if cls.size and (cls.min() < 0 or cls.max() >= num_classes):
            raise ValueError(f"voc_map: {name} class out of range 0..{num_classes - 1}: {cls.min()}..{cls.max()}")
    return d_img, d[:, :4], d[:, 4], d_cls, g_img, g_box, g_cls, g_dif


def _first_of_each(values: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct value (np.unique's are the first ones)."""
    return np.unique(values, return_index=True)[1]


def match_detections(detections, ground_truths, iou_threshold: float = 0.5, num_classes: int = 20):
    """The devkit's assignment for every detection of the set (see the module docstring).

    Returns NumPy arrays (order, cls, score, tp, fp, npos): `order` [D] detection indices (into the
    concatenation of all images' detections) in descending score (stable), without the detections
    of difficult objects; `cls`, `score` [D] theirs; `tp`, `fp` [D] bool (exactly one is true);
    `npos` [num_classes] non-difficult GT counts.
    NumPy rather than torch: these are 1-D passes over ~1e5 elements, where torch's intra-op threads
    cost more than they give (measured in benchmarks/RESULTS.md).
    """
    d_img, d_box, d_score, d_cls, g_img, g_box, g_cls, g_dif = _gather(detections, ground_truths, num_classes)
    n_det = len(d_score)

    # Pairs (detection, ground truth) of the same image and class: GTs grouped by key, each
    # detection spans its group's range. GT order inside a group stays as listed (stable sort).
    g_key = g_img * num_classes + g_cls
    g_order = np.argsort(g_key, kind="stable")
    g_key_sorted = g_key[g_order]
    d_key = d_img * num_classes + d_cls
    start = np.searchsorted(g_key_sorted, d_key, side="left")
    count = np.searchsorted(g_key_sorted, d_key, side="right") - start
    pair_det = np.repeat(np.arange(n_det), count)  # sorted: pairs of one detection are contiguous
    offsets = np.cumsum(count) - count
    pair_pos = start[pair_det] + np.arange(len(pair_det)) - offsets[pair_det]  # position in g_order
    a, b = d_box[pair_det], g_box[g_order[pair_pos]]
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    overlap = (iw > 0) & (ih > 0)  # the devkit's `iw>0 & ih>0`: only overlapping GTs are candidates
    inter = np.where(overlap, iw * ih, 0.0)
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(overlap, inter / np.where(overlap, union, 1.0), -np.inf)

    # Best GT per detection: highest IoU, the first listed on a tie (the devkit's `ov>ovmax`).
    ovmax = np.full(n_det, -np.inf)
    has = count > 0
    if len(pair_det):
        ovmax[has] = np.maximum.reduceat(iou, offsets[has])
    best = np.flatnonzero((iou == ovmax[pair_det]) & overlap)
    best = best[_first_of_each(pair_det[best])]
    best_gt = np.zeros(n_det, dtype=np.int64)
    best_gt[pair_det[best]] = g_order[pair_pos[best]]
    hit = ovmax >= iou_threshold  # implies a best GT exists
    difficult = hit & g_dif[best_gt] if len(g_dif) else np.zeros(n_det, dtype=bool)

    # In descending score over the whole set (restricted to a class, this is the class's order):
    # a counted detection is a TP iff it is the first counted one assigned to its GT.
    order = np.argsort(-d_score, kind="stable")
    counted = (hit & ~difficult)[order]
    idx = np.flatnonzero(counted)
    tp = np.zeros(n_det, dtype=bool)
    tp[idx[_first_of_each(best_gt[order][idx])]] = True
    fp = ~hit[order] | (counted & ~tp)

    keep = ~difficult[order]
    npos = np.bincount(g_cls[~g_dif], minlength=num_classes)
    order = order[keep]
    return order, d_cls[order], d_score[order], tp[keep], fp[keep], npos


def average_precision(recall: np.ndarray, precision: np.ndarray, method: str = "voc07") -> float:
    """AP of one class from its cumulative recall / precision arrays (in descending-score order).

    "voc07": 11-point interpolated (VOC2007); "all": area under the monotone envelope (VOC2010+).
    """
    if check_method(method) == "voc07":
        if len(recall) == 0:
            return 0.0
        envelope = np.maximum.accumulate(precision[::-1])[::-1]  # max precision at index >= i
        idx = np.searchsorted(recall, np.arange(11) / 10, side="left")  # first index with recall >= t
        return float(np.where(idx < len(recall), envelope[np.minimum(idx, len(recall) - 1)], 0.0).sum() / 11)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(((mrec[i] - mrec[i - 1]) * mpre[i]).sum())


def voc_curves(
    detections: Sequence[torch.Tensor],
    ground_truths: Sequence[Mapping],
    iou_threshold: float = 0.5,
    num_classes: int = 20,
) -> dict:
    """One devkit matching of the whole set (`match_detections`), as per-class PR curves: what every
    VOC AP method reads (`voc_ap`), so the 11-point and the all-point AP share one matching.

    Same inputs as `voc_map`. Returns a dict:
      "precision", "recall": per class the PR curve (np arrays, descending score; empty if no GT);
      "scores": per class the detection scores along the curve (for choosing a threshold);
      "num_gt": [C] non-difficult GT counts; "num_tp", "num_fp": [C] counts over all detections;
      "iou_threshold".
    """
    _, cls, scores, tp, fp, npos = match_detections(detections, ground_truths, iou_threshold, num_classes)
    by_class = np.argsort(cls, kind="stable")  # keeps descending score inside each class
    cls, scores, tp, fp = cls[by_class], scores[by_class], tp[by_class], fp[by_class]
    bounds = np.searchsorted(cls, np.arange(num_classes + 1))

    precisions, recalls, class_scores = [], [], []
    num_tp, num_fp = np.zeros(num_classes, dtype=np.int64), np.zeros(num_classes, dtype=np.int64)
    for c in range(num_classes):
        lo, hi = bounds[c], bounds[c + 1]
        ctp, cfp = np.cumsum(tp[lo:hi]), np.cumsum(fp[lo:hi])
        num_tp[c] = ctp[-1] if hi > lo else 0
        num_fp[c] = cfp[-1] if hi > lo else 0
        class_scores.append(scores[lo:hi])
        if npos[c] == 0:
            precisions.append(np.zeros(0))
            recalls.append(np.zeros(0))
            continue
        recalls.append(ctp / npos[c])
        precisions.append(ctp / np.maximum(ctp + cfp, 1))  # every kept detection is a TP or an FP: never 0/0
    return {"precision": precisions, "recall": recalls, "scores": class_scores, "num_gt": npos,
            "num_tp": num_tp, "num_fp": num_fp, "iou_threshold": iou_threshold}


def voc_ap(curves: Mapping, method: str = "voc07") -> dict:
    """AP per class and their mean from `voc_curves`' result, by one method ("voc07" or "all").

    Returns the curves' dict plus "map" (mean AP over the classes with at least one non-difficult
    ground truth, NaN if none), "ap" (np.ndarray [C], NaN for classes without) and "method".
    """
    check_method(method)  # here too: with no ground truth, average_precision is never called
    npos = curves["num_gt"]
    ap = np.full(len(npos), np.nan)
    for c in np.flatnonzero(npos > 0):
        ap[c] = average_precision(curves["recall"][c], curves["precision"][c], method)
    valid = npos > 0
    return {"map": float(ap[valid].mean()) if valid.any() else float("nan"), "ap": ap, **curves, "method": method}


def voc_map(
    detections: Sequence[torch.Tensor],
    ground_truths: Sequence[Mapping],
    iou_threshold: float = 0.5,
    method: str | Sequence[str] = "voc07",
    num_classes: int = 20,
) -> dict:
    """PASCAL VOC mean average precision, as the devkit computes it (see the module docstring).

    detections: per image a [K, 6] tensor x1, y1, x2, y2, score, class (as `detect` returns).
    ground_truths: per image a dict {"boxes": [G, 4] x1y1x2y2, "labels": [G], "difficult": [G] bool}
        (difficult optional, default False); same pixels as the detections.
    method: "voc07" (11-point) or "all" (all-point); or several, e.g. ("voc07", "all"): one
        matching then serves them all, and the result is {method: that method's dict}.
    Returns a dict:
      "map": mean AP over the classes with at least one non-difficult ground truth (NaN if none);
      "ap": np.ndarray [C], NaN for classes without non-difficult ground truth;
      "precision", "recall": per class the PR curve (np arrays, descending score; empty if no GT);
      "scores": per class the detection scores along the curve (for choosing a threshold);
      "num_gt": [C] non-difficult GT counts; "num_tp", "num_fp": [C] counts over all detections;
      "method", "iou_threshold".
    """
    methods = [check_method(m) for m in ((method,) if isinstance(method, str) else method)]  # before matching
    curves = voc_curves(detections, ground_truths, iou_threshold, num_classes)
    results = {m: voc_ap(curves, m) for m in methods}
    return results[method] if isinstance(method, str) else results


def f1_by_threshold(
    detections: Sequence[torch.Tensor],
    ground_truths: Sequence[Mapping],
    thresholds: Sequence[float] | np.ndarray,
    iou_threshold: float = 0.5,
    num_classes: int = 20,
) -> dict:
    """Precision, recall and F1 over all classes together (pooled counts) when only the detections
    with score > t are kept, for each threshold t (`detect`'s rule: it keeps scores above it).

    Same inputs as `voc_map`, and the same devkit matching (`match_detections`): detections of
    difficult objects count as neither true nor false positives, difficult objects are not to be
    found. The matching is greedy in descending score, so keeping the detections above t gives the
    prefix of the whole set's matching: one matching serves every threshold.

    thresholds: [T]. Returns a dict of NumPy arrays [T]: "thresholds", "tp", "fp" (counts kept),
    "precision" (1 where nothing is kept), "recall" (0 without ground truth), "f1" (0 where
    precision + recall is 0); "num_gt" (non-difficult objects, int) and "best": the index of the
    highest F1, the highest threshold among equals (fewest boxes for the same F1).
    """
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    _, _, score, tp, fp, npos = match_detections(detections, ground_truths, iou_threshold, num_classes)
    ctp = np.concatenate(([0], np.cumsum(tp)))
    cfp = np.concatenate(([0], np.cumsum(fp)))
    # score is descending: how many are > t, compared in float32 as `detect` compares its float32 scores
    kept = np.searchsorted(-score, -t.astype(np.float32).astype(np.float64), side="left")
    n_tp, n_fp, num_gt = ctp[kept], cfp[kept], int(npos.sum())
    precision = np.where(n_tp + n_fp > 0, n_tp / np.maximum(n_tp + n_fp, 1), 1.0)
    recall = n_tp / num_gt if num_gt else np.zeros(len(t))
    f1 = 2 * n_tp / np.maximum(2 * n_tp + n_fp + (num_gt - n_tp), 1)  # = 2PR / (P + R), 0 when nothing is right
    best = int(len(t) - 1 - np.argmax(f1[::-1])) if len(t) else -1
    return {"thresholds": t, "tp": n_tp, "fp": n_fp, "precision": precision, "recall": recall, "f1": f1,
            "num_gt": num_gt, "best": best}


# --------------------------------------------------------------------------- COCO AP
# pycocotools' `Params.setDetParams`, float64: 0.5, 0.55, ..., 0.95 and 0, 0.01, ..., 1.
COCO_IOU_THRESHOLDS: list[float] = np.linspace(0.5, 0.95, round((0.95 - 0.5) / 0.05) + 1).tolist()
COCO_RECALL_THRESHOLDS: list[float] = np.linspace(0.0, 1.0, round(1.0 / 0.01) + 1).tolist()


def coco_map(detections: Sequence[torch.Tensor], ground_truths: Sequence[Mapping], num_classes: int = 20) -> dict:
    """COCO-style AP through torchmetrics' MeanAveragePrecision on the faster-coco-eval backend.

    Same inputs as `voc_map`. Difficult objects are passed as COCO "crowd" regions, COCO's way of
    saying "neither reward nor punish detections here" (a crowd region is matched by intersection
    over the detection's area, and may absorb several detections, as a difficult object may).
    Returns floats: "map_50_95", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_100" (-1 where COCO has nothing to average, e.g. no ground truth at all).
    Equal to pycocotools' COCOeval on the same data (to float32 rounding): the IoU and recall
    thresholds are pycocotools' own float64 ones (`COCO_IOU_THRESHOLDS`, `COCO_RECALL_THRESHOLDS`);
    torchmetrics' defaults come from a float32 linspace (IoU 0.699999988, recall 0.07000000029...),
    which moves AP by up to ~1e-3 where a recall or an IoU lands on a threshold.
    """
    from torchmetrics.detection import MeanAveragePrecision

    if len(detections) != len(ground_truths):
        raise ValueError(f"coco_map: {len(detections)} images of detections but {len(ground_truths)} of ground truth")
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval",
                                  iou_thresholds=COCO_IOU_THRESHOLDS, rec_thresholds=COCO_RECALL_THRESHOLDS)
    preds, targets = [], []
    for det, gt in zip(detections, ground_truths):
        det = torch.as_tensor(det).detach().cpu().float().reshape(-1, 6)
        labels = torch.as_tensor(gt["labels"]).cpu().long().reshape(-1)
        diff = gt.get("difficult")
        diff = torch.zeros_like(labels, dtype=torch.bool) if diff is None else torch.as_tensor(diff).cpu().bool()
        preds.append({"boxes": det[:, :4], "scores": det[:, 4], "labels": det[:, 5].round().long()})
        targets.append({"boxes": torch.as_tensor(gt["boxes"]).cpu().float().reshape(-1, 4), "labels": labels,
                        "iscrowd": diff.long().reshape(-1)})
    metric.update(preds, targets)
    r = metric.compute()
    names = {"map": "map_50_95", "map_50": "map_50", "map_75": "map_75", "map_small": "map_small",
             "map_medium": "map_medium", "map_large": "map_large", "mar_100": "mar_100"}
    return {ours: float(r[theirs]) for theirs, ours in names.items()}
