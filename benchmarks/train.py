"""Training throughput (images/s) of the full-size model, model-bound and with the real data pipeline.

    python -m benchmarks.train                               # CPU here: batch 2, a few steps
    python -m benchmarks.train --batch-size 16 --sizes 320,416,608 --precision 16-mixed fp32   # on a GPU

Model-bound: synthetic tensors already on the device. Data-bound: the training DataLoader alone
(mosaic 0.75, multi-resolution off so every batch is at the measured size), on the real photos in
../shared/realdet when present, otherwise on generated images. "with data" = both together, as in
training. On CUDA it also prints peak GPU memory.
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from pathlib import Path

import torch

from helpers.config import DataConfig, TrainConfig
from helpers.loss import YoloLoss
from helpers.model import YOLOv3
from helpers.targets import build_targets

REALDET = Path(os.environ.get("REALDET_ROOT", Path(__file__).resolve().parents[2] / "shared" / "realdet"))


def step_fn(model, optimizer, loss_fn, device, precision):
    use_amp = precision == "16-mixed" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    def step(images, boxes):
        images = images.to(device, non_blocking=True)
        boxes = boxes.to(device, non_blocking=True)
        targets = build_targets(boxes, images.shape[0], tuple(images.shape[-2:]))
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            loss = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, batches, device, warmup: int, steps: int) -> float:
    """images/s over `steps` steps after `warmup`."""
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it))
    sync(device)
    start, n = time.perf_counter(), 0
    for _ in range(steps):
        images, boxes = next(it)
        step(images, boxes)
        n += images.shape[0]
    sync(device)
    return n / (time.perf_counter() - start)


def synthetic_batches(batch, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g)
    n = int(batch * 3.5)
    boxes = torch.cat([torch.randint(0, batch, (n, 1), generator=g).float(),
                       torch.randint(0, 20, (n, 1), generator=g).float(),
                       torch.rand(n, 2, generator=g) * 0.8 + 0.1, torch.rand(n, 2, generator=g) * 0.4 + 0.05], 1)
    return itertools.repeat((images, boxes))


def real_loader(batch, size, workers):
    from helpers.datamodule import YOLODataModule

    root = REALDET / "VOCdevkit" if (REALDET / "VOCdevkit").is_dir() else None
    cfg = DataConfig(root=str(root) if root else None, batch_size=batch, train_sizes=(size,), image_size=size,
                     num_workers=workers, mosaic=0.75)
    dm = YOLODataModule(cfg, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()

    def forever():
        while True:
            for batch in loader:
                yield batch.images, batch.boxes

    return forever(), ("real photos (shared/realdet)" if root else "generated images")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=16 if torch.cuda.is_available() else 2)
    p.add_argument("--sizes", default="416")
    p.add_argument("--precision", nargs="+", default=["16-mixed", "32-true"] if torch.cuda.is_available()
                   else ["32-true"])
    p.add_argument("--steps", type=int, default=20 if torch.cuda.is_available() else 3)
    p.add_argument("--warmup", type=int, default=5 if torch.cuda.is_available() else 1)
    p.add_argument("--workers", default=str(os.cpu_count() or 2), help="comma-separated: one data run per count")
    p.add_argument("--width", type=float, default=1.0)
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {name}; torch {torch.__version__}; {os.cpu_count()} CPU cores; batch {args.batch_size}; "
          f"width {args.width}")
    torch.backends.cudnn.benchmark = True
    workers = [int(w) for w in args.workers.split(",")]
    for size in (int(s) for s in args.sizes.split(",")):
        loaders = {}
        for w in workers:
            loaders[w], source = real_loader(args.batch_size, size, w)
            data_rate = measure(lambda images, boxes: None, loaders[w], torch.device("cpu"), args.warmup, args.steps * 2)
            print(f"[{size}] data pipeline alone ({source}, {w} workers): {data_rate:7.1f} images/s", flush=True)
        for precision in args.precision:
            model = YOLOv3(num_classes=20, width=args.width).to(device).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            step = step_fn(model, optimizer, YoloLoss.from_config(TrainConfig()), device, precision)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            model_rate = measure(step, synthetic_batches(args.batch_size, size), device, args.warmup, args.steps)
            with_data = {w: measure(step, loaders[w], device, args.warmup, args.steps) for w in workers}
            mem = (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                   if device.type == "cuda" else "")
            shown = "; ".join(f"{rate:7.1f} images/s with {w} workers" for w, rate in with_data.items())
            print(f"[{size}] {precision:9s} model-bound (data from memory) {model_rate:7.1f} images/s; with the data "
                  f"pipeline {shown}{mem}", flush=True)


if __name__ == "__main__":
    main()
