"""Data pipeline throughput: samples per second on one core (one process, no workers).

    python -m benchmarks.data [--size 416] [--n 300]

Pipelines: plain training samples, training samples with mosaic at p=0.75, test samples. Real
photos from ../shared/realdet when present (REALDET_ROOT overrides), otherwise generated 500x375
JPEGs. Goal (issue 4): >= 150 samples/s per core for mosaic p=0.75 at 416 (the course's code:
~63 on the same machine; its plain pipeline ~104, its test pipeline ~206).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from helpers.dataset import YOLODataset as TrainDataset
from helpers.dataset_org import YOLODataset as PlainDataset
from helpers.synthetic import make_voc_dataset

REALDET = Path(os.environ.get("REALDET_ROOT", Path(__file__).resolve().parents[2] / "shared" / "realdet"))


def rate(dataset, size: int, n: int) -> float:
    order = [random.randrange(len(dataset)) for _ in range(n)]
    for i in order[:10]:  # warm up caches and albumentations
        dataset[(i, size)]
    start = time.perf_counter()
    for i in order:
        dataset[(i, size)]
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=416)
    p.add_argument("--n", type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    if (REALDET / "VOCdevkit").is_dir():
        root, source = REALDET / "VOCdevkit", "real photos (shared/realdet, COCO images, ~640x480)"
    else:
        root = make_voc_dataset(tempfile.mkdtemp(), n_trainval=200, n_test=50, image_size=(500, 375))
        source = "generated 500x375 JPEGs"
    print(f"machine: {platform.machine()}, 1 process (one core); data: {source}; size {args.size}")
    plain = TrainDataset(root, "trainval", args.size, mosaic=0.0)
    mosaic = TrainDataset(root, "trainval", args.size, mosaic=0.75)
    test = PlainDataset(root, "test", args.size)
    print(f"train, plain (no mosaic):  {rate(plain, args.size, args.n):7.1f} samples/s")
    print(f"train, mosaic p=0.75:      {rate(mosaic, args.size, args.n):7.1f} samples/s")
    print(f"test (letterbox):          {rate(test, args.size, args.n):7.1f} samples/s")


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")  # mosaic=0.0 warns by design
    main()
