"""Data pipeline throughput: samples per second on one core (one process, no workers).

    python -m benchmarks.data [--size 416] [--n 400] [--batch 16] [--repeats 3]

Pipelines: plain training samples (mosaic=0), training samples with mosaic at p=0.75 and 1.0,
test samples (letterbox), each read exactly as a DataLoader worker reads them: batches of keys
from `MultiScaleBatchSampler` over shuffled indices, fetched by the dataset's `__getitems__`
(one call per batch) when it has one, else one `dataset[key]` per key. `--batch 1` measures
single samples (`dataset[key]`, as plots and the app read them). Real photos from ../shared/realdet when present (REALDET_ROOT overrides), otherwise
generated 500x375 JPEGs. Goal: >= 150 samples/s per core for mosaic p=0.75 at 416
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

from helpers.datamodule import MultiScaleBatchSampler
from helpers.dataset import TrainingDataset
from helpers.dataset_org import PlainDataset
from helpers.synthetic import make_voc_dataset

REALDET = Path(os.environ.get("REALDET_ROOT", Path(__file__).resolve().parents[2] / "shared" / "realdet"))


def fetcher(dataset):
    """What torch's map-style fetcher calls with a batch of keys (torch.utils.data._utils.fetch)."""
    if getattr(dataset, "__getitems__", None):
        return dataset.__getitems__
    return lambda keys: [dataset[k] for k in keys]


def rate(dataset, size: int, n: int, batch: int, repeats: int) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second), best of `repeats` passes over n samples:
    shuffled epochs of the dataset cut into batches of `batch` keys by the training batch sampler."""
    rng = random.Random(0)
    order = []
    while len(order) < n:
        order += rng.sample(range(len(dataset)), len(dataset))
    batches = list(MultiScaleBatchSampler(order[:n], batch, (size,), drop_last=True))
    fetch = fetcher(dataset)
    for keys in batches[:max(1, 20 // batch)]:  # warm up: transforms built
        fetch(keys)
    count = sum(len(keys) for keys in batches)
    wall, cpu = 0.0, 0.0
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for keys in batches:
            fetch(keys)
        wall = max(wall, count / (time.perf_counter() - w0))
        cpu = max(cpu, count / (time.process_time() - c0))
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=416)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--batch", type=int, default=16, help="keys per fetch (the course's batch size; 1: single samples)")
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
          f"1 process, 1 thread; data: {source}; output {args.size}, batches of {args.batch}")
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
        wall, cpu = rate(ds, args.size, args.n, args.batch, args.repeats)
        print(f"{name:28s} {wall:17.1f} {cpu:14.1f}")


if __name__ == "__main__":
    main()
