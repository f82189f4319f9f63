"""Evaluation figures on this machine: decode + NMS per image, VOC mAP and COCO mAP at VOC2007-test size.

    python -m benchmarks.eval

Goals: decode + NMS <= 10 ms per image with all 10,647 candidates above the threshold (an
untrained model; the course's pure-Python NMS needs minutes there), VOC mAP at VOC2007-test size
(4,952 images, ~12k ground truths, 100k detections) <= 2 s (the course's: benchmarks/RESULTS.md).
"""
from __future__ import annotations

import os
import platform
import time

import torch

from benchmarks.timing import timed
from helpers.config import STRIDES
from helpers.metrics import coco_map, voc_map
from helpers.postprocess import detect

SIZE, C = 416, 20


def raw_outputs(batch: int, candidates: int | None, one_class: bool, g: torch.Generator) -> list[torch.Tensor]:
    """Full-size 416 output shapes. candidates=None: every anchor passes the threshold (high
    objectness everywhere, as an untrained model gives); else that many random anchors do."""
    outs = [torch.randn(batch, 3, SIZE // s, SIZE // s, 5 + C, generator=g) for s in STRIDES]
    for o in outs:
        o[..., 0] = 5.0 if candidates is None else -10.0
        if one_class:
            o[..., 5] = 6.0  # every candidate in one class: the worst case for class-aware NMS
    if candidates is not None:
        flat = [o.view(batch, -1, 5 + C) for o in outs]
        sizes = [f.shape[1] for f in flat]
        for b in range(batch):
            picks = torch.randperm(sum(sizes), generator=g)[:candidates]
            for p in picks.tolist():
                s = 0
                while p >= sizes[s]:
                    p -= sizes[s]
                    s += 1
                flat[s][b, p, 0] = 5.0
    return outs


def synthetic_voc_test(g: torch.Generator, n_images: int = 4952, n_gt: int = 12032, n_det: int = 100_000):
    """Detections and ground truths shaped like VOC2007 test: ~2.4 objects and ~20 detections per image,
    detections partly jittered copies of the objects (TPs, duplicates), partly noise."""
    gt_img = torch.randint(0, n_images, (n_gt,), generator=g)
    xy = torch.rand(n_gt, 2, generator=g) * 350
    wh = torch.rand(n_gt, 2, generator=g) * 150 + 10
    gt_boxes = torch.cat([xy, xy + wh], 1)
    gt_cls = torch.randint(0, C, (n_gt,), generator=g)
    gt_diff = torch.rand(n_gt, generator=g) < 0.25
    n_copy = n_det // 3
    src = torch.randint(0, n_gt, (n_copy,), generator=g)
    copy_boxes = gt_boxes[src] + torch.randn(n_copy, 4, generator=g) * 8
    n_noise = n_det - n_copy
    nxy = torch.rand(n_noise, 2, generator=g) * 350
    noise_boxes = torch.cat([nxy, nxy + torch.rand(n_noise, 2, generator=g) * 150 + 10], 1)
    det_img = torch.cat([gt_img[src], torch.randint(0, n_images, (n_noise,), generator=g)])
    det_boxes = torch.cat([copy_boxes, noise_boxes])
    det_cls = torch.cat([gt_cls[src], torch.randint(0, C, (n_noise,), generator=g)])
    det_score = torch.rand(n_det, generator=g)
    rows = torch.cat([det_boxes, det_score[:, None], det_cls[:, None].float()], 1)
    order = torch.argsort(det_img, stable=True)
    dets = list(torch.split(rows[order], torch.bincount(det_img, minlength=n_images).tolist()))
    g_order = torch.argsort(gt_img, stable=True)
    counts = torch.bincount(gt_img, minlength=n_images).tolist()
    truths = [{"boxes": b, "labels": lab, "difficult": d} for b, lab, d in zip(
        torch.split(gt_boxes[g_order], counts), torch.split(gt_cls[g_order], counts),
        torch.split(gt_diff[g_order], counts))]
    return dets, truths


def main() -> None:
    g = torch.Generator().manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} (other work on the box slows torch's threads)")

    cases = [
        ("300 candidates", 300, False, 1000),
        ("10,647 candidates, random classes", None, False, 1000),
        ("10,647 candidates, one class", None, True, 1000),
        ("10,647 candidates, random classes, no nms_pre", None, False, None),
        ("10,647 candidates, one class, no nms_pre", None, True, None),
    ]
    inputs = [raw_outputs(1, cand, one_class, g) for _, cand, one_class, _ in cases]
    batch16 = raw_outputs(16, None, False, g)
    threads = torch.get_num_threads()
    # Both thread counts: on a busy machine torch's intra-op threads wait on each other, and one
    # thread is then the faster (the DataLoader workers are the parallelism during evaluation).
    for n_threads in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n_threads)
        print(f"decode + NMS, ms per image (416, conf 0.05, NMS IoU 0.45, median), {n_threads} thread(s):")
        for (name, _, _, nms_pre), outs in zip(cases, inputs):
            ms = timed(lambda o=outs, k=nms_pre: detect(o, SIZE, nms_pre=k), repeats=20 if nms_pre else 5)
            print(f"  {name:48s} nms_pre={str(nms_pre):5s} {ms:8.2f} ms")
        ms = timed(lambda: detect(batch16, SIZE), repeats=5) / 16
        print(f"  {'10,647 candidates, random classes, batch 16':48s} nms_pre=1000  {ms:8.2f} ms per image")
    torch.set_num_threads(threads)

    dets, truths = synthetic_voc_test(g)
    n_det = sum(len(d) for d in dets)
    n_gt = sum(len(t["labels"]) for t in truths)
    print(f"VOC2007-test-sized set: {len(dets)} images, {n_gt} ground truths, {n_det} detections")
    for method in ("voc07", "all"):
        result = voc_map(dets, truths, method=method)
        ms = timed(lambda m=method: voc_map(dets, truths, method=m), repeats=5, warmup=1)
        print(f"  voc_map {method:6s} {ms / 1000:6.3f} s   (mAP {result['map']:.4f})")
    t = time.perf_counter()
    coco = coco_map(dets, truths)
    print(f"  coco_map       {time.perf_counter() - t:6.3f} s   (mAP@[.5:.95] {coco['map_50_95']:.4f}, "
          f"@.5 {coco['map_50']:.4f})")


if __name__ == "__main__":
    main()
