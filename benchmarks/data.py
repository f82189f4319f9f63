"""Data pipeline throughput: samples per second on one core (one process, no workers).

    python -m benchmarks.data [--size 416] [--n 400] [--repeats 3]

Pipelines: plain training samples (mosaic=0), training samples with mosaic at p=0.75, test
samples (letterbox), each through `dataset[(index, size)]` exactly as a DataLoader worker calls
it. Real photos from ../shared/realdet when present (REALDET_ROOT overrides), otherwise
generated 500x375 JPEGs. Goal (issue 4): >= 150 samples/s per core for mosaic p=0.75 at 416
(the course's code: ~63 on the same machine; its plain pipeline ~104, its test pipeline ~206).

Two figures per pipeline, best of `--repeats`: per wall-clock second and per CPU second of this
process (OpenCV and torch held to one thread, so CPU seconds are core seconds). On a shared
machine the CPU figure is the steadier measure of "per core"; on a quiet one they agree.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import torch

from helpers.dataset import TrainingDataset
from helpers.dataset_org import PlainDataset
from helpers.synthetic import make_voc_dataset

REALDET = Path(os.environ.get("REALDET_ROOT", Path(__file__).resolve().parents[2] / "shared" / "realdet"))


def rate(dataset, size: int, n: int, repeats: int) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second), best of `repeats` passes of n random samples."""
    rng = random.Random(0)
    order = [rng.randrange(len(dataset)) for _ in range(n)]
    for i in order[:20]:  # warm up: transforms built, mosaic partner buffer filled
        dataset[(i, size)]
    wall, cpu = 0.0, 0.0
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for i in order:
            dataset[(i, size)]
        wall = max(wall, n / (time.perf_counter() - w0))
        cpu = max(cpu, n / (time.process_time() - c0))
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=416)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    random.seed(0)
    if (REALDET / "VOCdevkit").is_dir():
        root, source = REALDET / "VOCdevkit", "real photos (shared/realdet: COCO photos ~640x480, VOC layout)"
    else:
        root = make_voc_dataset(tempfile.mkdtemp(), n_trainval=200, n_test=50, image_size=(500, 375))
        source = "generated 500x375 JPEGs"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"1 process, 1 thread; data: {source}; output {args.size}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mosaic=0 warns by design
        pipelines = {
            "train, plain (no mosaic)": TrainingDataset(root, "trainval", args.size, mosaic=0.0),
            "train, mosaic p=0.75": TrainingDataset(root, "trainval", args.size, mosaic=0.75),
            "train, mosaic p=1.0": TrainingDataset(root, "trainval", args.size, mosaic=1.0),
            "test (letterbox)": PlainDataset(root, "test", args.size),
        }
    print(f"{'pipeline':28s} {'samples/s (wall)':>17s} {'samples/CPU-s':>14s}")
    for name, ds in pipelines.items():
        wall, cpu = rate(ds, args.size, args.n, args.repeats)
        print(f"{name:28s} {wall:17.1f} {cpu:14.1f}")


if __name__ == "__main__":
    main()
