"""The small figures behind three design choices in the code, on this machine.

    python -m benchmarks.choices

- `postprocess.detect`: class-aware NMS once per image rather than one batch-wide call (classes
  offset by image), batch 16, 1,000 candidates an image, 20 classes.
- `app.py` / `imageio.read_image`: a big JPEG (4000x3000) decoded reduced in the DCT rather than in full.
- `cam.SignedEigenCAM`: the thin SVD of a 52x52 map's activations rather than pytorch-grad-cam's full one.
"""
from __future__ import annotations

import os
import platform

import cv2
import numpy as np
import torch
from torchvision.ops import batched_nms

from benchmarks.timing import timed

PHOTO = "/work/shared/realdet/VOCdevkit/VOC2007/JPEGImages/000000000110.jpg"


def nms(repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    batch, k, classes = 16, 1000, 20
    xy = torch.rand(batch * k, 2, generator=g) * 380
    boxes = torch.cat([xy, xy + torch.rand(batch * k, 2, generator=g) * 80 + 4], 1)
    scores = torch.rand(batch * k, generator=g)
    cls = torch.randint(0, classes, (batch * k,), generator=g)
    image = torch.arange(batch).repeat_interleave(k)

    def per_image():
        for b in range(batch):
            s = slice(b * k, (b + 1) * k)
            batched_nms(boxes[s], scores[s], cls[s], 0.45)

    one = timed(per_image, repeats)
    wide = timed(lambda: batched_nms(boxes, scores, image * classes + cls, 0.45), repeats)
    print(f"NMS, batch {batch} x {k} candidates: per image {one:.1f} ms, one batch-wide call {wide:.1f} ms "
          f"({wide / one:.1f}x)")


def jpeg(repeats: int) -> None:
    photo = cv2.imread(PHOTO) if os.path.isfile(PHOTO) else np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8)
    _, data = cv2.imencode(".jpg", cv2.resize(photo, (4000, 3000)), [cv2.IMWRITE_JPEG_QUALITY, 90])
    full = timed(lambda: cv2.imdecode(data, cv2.IMREAD_COLOR), repeats)
    for factor, flag in ((2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4), (8, cv2.IMREAD_REDUCED_COLOR_8)):
        reduced = timed(lambda flag=flag: cv2.imdecode(data, flag), repeats)
        print(f"JPEG 4000x3000: full decode {full:.0f} ms, reduced by {factor} {reduced:.0f} ms ({full / reduced:.1f}x)")


def svd(repeats: int) -> None:
    for channels in (128, 256):
        acts = np.random.default_rng(0).standard_normal((1, 52 * 52, channels)).astype(np.float32)
        full = timed(lambda acts=acts: np.linalg.svd(acts, full_matrices=True), repeats, warmup=0)
        thin = timed(lambda acts=acts: np.linalg.svd(acts, full_matrices=False), repeats, warmup=0)
        print(f"SVD of a 52x52 map, {channels} channels: full {full / 1000:.2f} s, thin {thin:.0f} ms")


def main() -> None:
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    nms(7)
    jpeg(7)
    svd(3)


if __name__ == "__main__":
    main()
