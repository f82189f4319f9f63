"""Core figures on this machine: model forward, target building, loss forward+backward.

    python -m benchmarks.core

Goals: forward at 416 no slower than the course model (its figure in benchmarks/RESULTS.md),
loss f+b <= 18 ms at batch 8, `build_targets` >= 5x faster per sample than the course's
per-sample target loop at batch 16 (`course_targets` below, the reference it is timed against).
"""
from __future__ import annotations

import platform
import statistics
import time

import torch

from benchmarks.timing import timed
from helpers.config import ANCHORS, STRIDES
from helpers.loss import YoloLoss
from helpers.model import YOLOv3, fuse_for_inference
from helpers.targets import IGNORE_IOU, build_targets


def course_targets(boxes: list[list[float]], image_size: int = 416, anchors=ANCHORS) -> list[torch.Tensor]:
    """The course's per-sample target loop, as its `Dataset.__getitem__` runs it for one image (the
    rule is spelled out below; the code is ours): a Python loop over the boxes
    [cx, cy, w, h, class] (normalised), small torch tensors per box.

    Per box: rank all 9 anchors by shape IoU; walk them best first; on each scale the first anchor
    whose cell slot is free becomes positive [1, x - j, y - i, w*S, h*S, class]; a later anchor whose
    slot is free and whose IoU > 0.5 is ignored (-1). Its defects are kept (a taken slot drops the box
    on that scale; x = 1.0 would index out of range), as this is the baseline, not a fix.
    """
    sizes = [image_size // s for s in STRIDES]
    anchor_wh = torch.tensor(anchors).reshape(-1, 2)  # [9, 2]
    per_scale = len(anchors[0])
    targets = [torch.zeros(per_scale, s, s, 6) for s in sizes]
    for x, y, w, h, cls in boxes:
        wh = torch.tensor([w, h])
        inter = torch.minimum(wh, anchor_wh).prod(dim=1)
        ious = inter / (wh.prod() + anchor_wh.prod(dim=1) - inter)
        has_positive = [False] * len(sizes)
        for k in ious.argsort(descending=True).tolist():
            scale, a = k // per_scale, k % per_scale
            s = sizes[scale]
            i, j = int(s * y), int(s * x)
            free = targets[scale][a, i, j, 0] == 0
            if free and not has_positive[scale]:
                targets[scale][a, i, j] = torch.tensor([1.0, s * x - j, s * y - i, w * s, h * s, cls])
                has_positive[scale] = True
            elif free and ious[k] > IGNORE_IOU:
                targets[scale][a, i, j, 0] = -1.0
    return targets


def compare_targets(batch: torch.Tensor, batch_size: int, threads: int, rounds: int = 8, block: int = 5) -> None:
    """Time ours (one call per batch) against the course loop (one call per sample), per sample.

    Blocks of `block` batches of each, alternating for `rounds` rounds, so that load from other
    work on the machine falls on both alike while each runs in its own steady state (as in
    training: the course's loop in a data worker, ours once per step); medians over all batches of
    the wall time and of this process's CPU time (which a descheduled process does not accrue: the
    steadier figure on a shared machine).
    """
    per_image = [[[float(v) for v in (*b[2:6], b[1])] for b in batch[batch[:, 0] == k]] for k in range(batch_size)]
    runs = {"ours": lambda: build_targets(batch, batch_size, 416),
            "course": lambda: [course_targets(boxes) for boxes in per_image]}
    clocks = {"wall": time.perf_counter, "CPU": time.process_time}
    per_sample = {(who, name): [] for who in runs for name in clocks}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for r in range(rounds + 1):  # round 0 warms up
            for who, run in runs.items():
                for _ in range(block):
                    t0 = {name: clock() for name, clock in clocks.items()}
                    run()
                    for name in clocks if r else ():
                        per_sample[who, name].append((clocks[name]() - t0[name]) * 1000 / batch_size)
    finally:
        torch.set_num_threads(before)
    for name in clocks:
        o, c = statistics.median(per_sample["ours", name]), statistics.median(per_sample["course", name])
        print(f"  {threads} torch thread(s), {name:4s} time: ours {o:6.3f} ms per sample ({o * batch_size:5.2f} ms per "
              f"batch), course loop {c:6.3f} ms per sample: {c / o:4.1f}x")


def agreement(batch: torch.Tensor, batch_size: int) -> str:
    """How many images get the course loop's targets exactly (they differ only where ours keeps a box
    whose slot the course's loop finds taken)."""
    ours = build_targets(batch, batch_size, 416)
    same = 0
    for k in range(batch_size):
        boxes = [[float(v) for v in (*b[2:6], b[1])] for b in batch[batch[:, 0] == k]]
        ref = course_targets(boxes)
        same += all(torch.allclose(o[k], r, atol=1e-5) for o, r in zip(ours, ref))
    return f"{same} of {batch_size} images"


def random_boxes(batch: int, per_image: float, generator: torch.Generator) -> torch.Tensor:
    n = int(batch * per_image)
    return torch.cat([
        torch.randint(0, batch, (n, 1), generator=generator).float(),
        torch.randint(0, 20, (n, 1), generator=generator).float(),
        torch.rand(n, 2, generator=generator) * 0.8 + 0.1,
        torch.rand(n, 2, generator=generator) * 0.5 + 0.02,
    ], 1)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")

    model = YOLOv3(num_classes=20).eval()
    x = torch.rand(1, 3, 416, 416, generator=g)
    with torch.inference_mode():
        fwd = timed(lambda: model(x), repeats=10)
    print(f"forward, batch 1, 416, fp32, eval:           {fwd:8.1f} ms")
    fused = fuse_for_inference(model)
    with torch.inference_mode():
        fwd_fused = timed(lambda: fused(x.contiguous(memory_format=torch.channels_last)), repeats=10)
    print(f"  the same, BN folded + channels-last:        {fwd_fused:8.1f} ms (inference path of app/eval)")

    boxes = random_boxes(16, 3.5, g)
    print("build_targets vs the course's per-sample loop, batch 16, 3.5 boxes/image, 416 "
          f"(identical targets on {agreement(boxes, 16)}):")
    compare_targets(boxes, 16, threads=1)  # as in a DataLoader worker, where the course's loop runs
    compare_targets(boxes, 16, threads=torch.get_num_threads())

    outs = [torch.randn(8, 3, 416 // s, 416 // s, 25, generator=g).requires_grad_() for s in STRIDES]
    targets = build_targets(random_boxes(8, 3.5, g), 8, 416)
    loss_fn = YoloLoss()

    def loss_step():
        loss_fn(outs, targets).backward()

    print(f"loss forward+backward, batch 8, 416:          {timed(loss_step, repeats=30):8.1f} ms")


if __name__ == "__main__":
    main()
