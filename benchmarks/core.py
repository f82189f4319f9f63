"""Core figures on this machine: model forward, target building, loss forward+backward.

    python -m benchmarks.core

Goals (issue 3): forward at 416 no slower than the course model (~490 ms on the 2-core dev box),
targets <= 0.3 ms per sample (course loop ~1.6 ms), loss f+b <= 18 ms at batch 8.
"""
from __future__ import annotations

import platform

import torch

from benchmarks.timing import timed
from helpers.loss import YoloLoss
from helpers.model import YOLOv3, fuse_for_inference
from helpers.targets import build_targets


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
    tgt = timed(lambda: build_targets(boxes, 16, 416), repeats=50)
    print(f"build_targets, batch 16, 3.5 boxes/image:     {tgt / 16:8.3f} ms per sample ({tgt:.2f} ms per batch)")

    outs = [torch.randn(8, 3, 416 // s, 416 // s, 25, generator=g).requires_grad_() for s in (32, 16, 8)]
    targets = build_targets(random_boxes(8, 3.5, g), 8, 416)
    loss_fn = YoloLoss()

    def loss_step():
        loss_fn(outs, targets).backward()

    print(f"loss forward+backward, batch 8, 416:          {timed(loss_step, repeats=30):8.1f} ms")


if __name__ == "__main__":
    main()
