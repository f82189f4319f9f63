"""The LightningDataModule: datasets, multi-resolution batches, collate.

Training batches each have one size drawn from `DataConfig.train_sizes` by a generator seeded with
(seed, epoch, batch number), so every DDP rank draws the same size for the same step; val/test use
`DataConfig.image_size`. With `DataConfig.root = None` it trains on generated data (coloured
shapes with VOC class names) written once under $YOLO_DATA_CACHE or ~/.cache/yolov3-lightning.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from .config import DataConfig
from .dataset import YOLODataset as TrainDataset
from .dataset_org import YOLODataset as PlainDataset
from .synthetic import make_voc_dataset

SYNTHETIC = {"n_trainval": 256, "n_test": 64, "image_size": (160, 120)}


def collate(batch):
    """(images [B,3,S,S], boxes [N,6] = image index, class, cx, cy, w, h, skipped: 0-d int64)."""
    good = [b for b in batch if b is not None]
    skipped = torch.tensor(len(batch) - len(good), dtype=torch.int64)
    if not good:
        return torch.zeros(0, 3, 1, 1), torch.zeros(0, 6), skipped
    images = torch.stack([b[0] for b in good])
    boxes = torch.cat([torch.cat([torch.full((len(b[1]), 1), float(i)), b[1]], 1) for i, b in enumerate(good)])
    return images, boxes, skipped


def collate_with_meta(batch):
    """(images, boxes [N,6], metas: list of per-image dicts) for evaluation; unreadable samples dropped."""
    good = [b for b in batch if b is not None]
    images, boxes, _ = collate([(b[0], b[1]) for b in good] or [None])
    return images, boxes, [b[2] for b in good]


class MultiScaleBatchSampler(Sampler):
    """Batches of (index, size): one size per batch, the same on every rank for the same step."""

    def __init__(self, sampler, batch_size: int, sizes, drop_last: bool = True, seed: int = 0):
        self.sampler, self.batch_size, self.sizes = sampler, batch_size, tuple(sizes)
        self.drop_last, self.seed, self.epoch = drop_last, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def size_of(self, batch_number: int) -> int:
        rng = np.random.default_rng([self.seed, self.epoch, batch_number])
        return int(self.sizes[rng.integers(len(self.sizes))])

    def __iter__(self):
        batch, number = [], 0
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                size = self.size_of(number)
                yield [(i, size) for i in batch]
                batch, number = [], number + 1
        if batch and not self.drop_last:
            size = self.size_of(number)
            yield [(i, size) for i in batch]

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def synthetic_root(seed: int = 0) -> Path:
    """The generated dataset (made on first use); deterministic for a seed."""
    cache = Path(os.environ.get("YOLO_DATA_CACHE", Path.home() / ".cache" / "yolov3-lightning"))
    root = cache / f"synthetic-v1-seed{seed}"
    devkit = root / "VOCdevkit"
    if not (devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt").is_file():
        tmp = cache / f".synthetic-v1-seed{seed}.{os.getpid()}"
        make_voc_dataset(tmp, seed=seed, **SYNTHETIC)
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, root)  # atomic: another process may have made it meanwhile
        except OSError:
            pass
    return devkit


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class YOLODataModule(pl.LightningDataModule):
    def __init__(self, cfg: DataConfig, seed: int = 0):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.train_dataset = self.val_dataset = None

    @property
    def root(self) -> Path:
        return Path(self.cfg.root) if self.cfg.root else synthetic_root(self.seed)

    def prepare_data(self) -> None:
        self.root  # noqa: B018 - generates the synthetic set once, on one process

    def setup(self, stage: str | None = None) -> None:
        c = self.cfg
        if self.train_dataset is None:
            self.train_dataset = TrainDataset(self.root, c.train_split, c.image_size, mosaic=c.mosaic,
                                              classes=c.classes, keep_difficult=c.keep_difficult)
            self.val_dataset = PlainDataset(self.root, c.val_split, c.image_size, classes=c.classes,
                                            keep_difficult=c.keep_difficult, return_meta=True)

    def num_training_batches(self, world_size: int = 1) -> int:
        """Optimizer steps per epoch for `world_size` processes (needed before fitting, for the schedule)."""
        self.setup("fit")
        per_rank = math.ceil(len(self.train_dataset) / world_size) if world_size > 1 else len(self.train_dataset)
        return max(1, per_rank // self.cfg.batch_size) if per_rank >= self.cfg.batch_size else 1

    def _loader(self, dataset, batch_sampler, collate_fn) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=workers,
                          pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
                          persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        world, rank = _distributed()
        ds = self.train_dataset
        sampler = (DistributedSampler(ds, world, rank, shuffle=True, seed=self.seed) if world > 1
                   else RandomSampler(ds, generator=torch.Generator().manual_seed(self.seed)))
        drop_last = len(sampler) >= self.cfg.batch_size
        batches = MultiScaleBatchSampler(sampler, self.cfg.batch_size, self.cfg.train_sizes, drop_last, self.seed)
        return self._loader(ds, batches, collate)

    def _eval_loader(self, dataset) -> DataLoader:
        world, rank = _distributed()
        sampler = (DistributedSampler(dataset, world, rank, shuffle=False) if world > 1
                   else SequentialSampler(dataset))
        size = self.cfg.image_size
        batches = MultiScaleBatchSampler(sampler, self.cfg.batch_size, (size,), drop_last=False)
        return self._loader(dataset, batches, collate_with_meta)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_dataset)
