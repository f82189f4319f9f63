"""The LightningDataModule: datasets, multi-resolution batches (`helpers.batch.Batch`).

Training batches each have one size drawn from `DataConfig.train_sizes` by a generator seeded
with (seed, epoch, batch number), so every DDP rank draws the same size for the same step, and
each sample's key carries the seed of its augmentations (seed, epoch, batch number, rank,
position), so a resumed run sees the same pixels; val/test use `DataConfig.image_size`, in a
fixed order. Under DDP the training set is split by a DistributedSampler (equal shares, so every
rank runs the same number of steps) and the evaluation set by rank-strided shards without padding
(no image is evaluated twice: `batch.evaluation_loader`, the loader `python -m helpers.evaluate` uses).

With `DataConfig.root = None` it trains on generated data (coloured shapes with VOC class names,
`helpers.synthetic`), written once to `$YOLO_DATA_CACHE/synthetic-v2-seed<seed>/VOCdevkit`, by
default `~/.cache/yolov3-lightning/synthetic-v2-seed<seed>/VOCdevkit`.

Annotation errors (a malformed XML, an unknown class, a missing image...) leave those records out
with a warning naming each file (`DataConfig.on_error`, default "skip"; "raise" refuses the
dataset instead); an image that turns out unreadable during training is skipped and counted by
`batch.collate`, and the LightningModule reports the count at the end of the epoch.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from .batch import collate, evaluation_loader
from .config import STRIDES, DataConfig
from .dataset import TrainingDataset
from .dataset_org import PlainDataset, SampleKey
from .resume import Position, ResumableDataLoader, loader_position
from .synthetic import make_voc_dataset

SYNTHETIC_VERSION = "v2"  # bump when helpers.synthetic draws differently
SYNTHETIC = {"n_trainval": 256, "n_test": 64, "image_size": (160, 120)}


# --- samplers -----------------------------------------------------------------------------------
class MultiScaleBatchSampler(Sampler):
    """Batches of `SampleKey(index, size, seed)`: one size per batch, the same on every rank for the
    same step, and for each sample the seed of its augmentations, (seed, epoch, batch number, rank,
    position in the batch), from which the training dataset draws every random choice.

    The size of batch k in epoch e is drawn from a generator seeded with (seed, e, k), so it needs
    no communication between ranks and repeats exactly on resume; so do the samples' seeds. The rank
    in the seed (the wrapped sampler's, 0 without one) keeps ranks from augmenting their images
    alike. The epoch is the wrapped sampler's (`DistributedSampler.epoch`, which Lightning sets
    every epoch: it calls `set_epoch` on the batch sampler's `sampler`, never on the batch sampler
    itself), or the one given to `set_epoch`.

    `resume_at(epoch, done)` makes the next iteration skip the first `done` batches of that epoch
    (indices only, no image is read), keeping their numbers, so the sizes, images and augmentations
    that follow are those an uninterrupted run would see. With `position` (a callable giving
    (epoch, batches done), `resume.loader_position` for training) every iteration starts there:
    the epoch and the order are fixed when the iteration starts, whatever `set_epoch` says later
    (see `helpers.resume` for why).
    """

    def __init__(self, sampler, batch_size: int, sizes, drop_last: bool = True, seed: int = 0,
                 position: Callable[[], Position] | None = None):
        self.sizes = tuple(int(s) for s in sizes)
        if not self.sizes or any(s <= 0 or s % STRIDES[0] for s in self.sizes):
            raise ValueError(f"image sizes must be positive multiples of 32 (the model's stride), got {sizes}")
        self.sampler, self.batch_size, self.drop_last, self.seed = sampler, batch_size, drop_last, seed
        self.position = position
        self._epoch, self._skip = 0, 0

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", self._epoch))

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def resume_at(self, epoch: int, done: int) -> None:
        """Start the next iteration at batch `done` of epoch `epoch`."""
        self.set_epoch(epoch)
        self._skip = done

    def size_of(self, batch_number: int, epoch: int | None = None) -> int:
        if len(self.sizes) == 1:
            return self.sizes[0]
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, batch_number])
        return self.sizes[int(rng.integers(len(self.sizes)))]

    def keys(self, batch: list[int], number: int, epoch: int | None = None) -> list[SampleKey]:
        epoch = self.epoch if epoch is None else epoch
        size, rank = self.size_of(number, epoch), int(getattr(self.sampler, "rank", 0))
        return [SampleKey(i, size, (self.seed, epoch, number, rank, position)) for position, i in enumerate(batch)]

    def __iter__(self):
        if self.position is None:
            return self._resumed_once()
        # From the position: the epoch and the inner order are fixed now, when the DataLoader
        # starts an iteration, not when its first batch is asked for (and reading the position
        # twice, as a DataLoader with workers does, gives the same iteration).
        epoch, done = self.position()
        self.set_epoch(epoch)
        return self._batches(epoch, done, iter(self.sampler))

    def _resumed_once(self):
        # A generator: `resume_at`'s skip is taken by the iteration that runs, not by one that a
        # DataLoader creates and drops (its worker iterator calls iter() twice).
        skip, self._skip = self._skip, 0
        yield from self._batches(self.epoch, skip, iter(self.sampler))

    def _batches(self, epoch: int, skip: int, indices):
        batch, number = [], 0
        for index in indices:
            batch.append(int(index))
            if len(batch) == self.batch_size:
                if number >= skip:
                    yield self.keys(batch, number, epoch)
                batch, number = [], number + 1
        if batch and not self.drop_last and number >= skip:
            yield self.keys(batch, number, epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Training batches per epoch and rank: DistributedSampler's equal share, then full batches only
    (a share smaller than one batch makes one short batch)."""
    share = math.ceil(n / world_size)
    return share // batch_size if share >= batch_size else 1


# --- synthetic default data ---------------------------------------------------------------------
def synthetic_root(seed: int = 0) -> Path:
    """The generated dataset's VOCdevkit (made on first use, atomically); deterministic for a seed."""
    cache = Path(os.environ.get("YOLO_DATA_CACHE", Path.home() / ".cache" / "yolov3-lightning"))
    root = cache / f"synthetic-{SYNTHETIC_VERSION}-seed{seed}"
    devkit = root / "VOCdevkit"
    if not (devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt").is_file():
        tmp = cache / f".{root.name}.{os.getpid()}"
        make_voc_dataset(tmp, seed=seed, **SYNTHETIC)
        try:
            os.rename(tmp, root)  # atomic; if another process made it meanwhile, theirs stays
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return devkit


# --- the DataModule -----------------------------------------------------------------------------
class YOLODataModule(pl.LightningDataModule):
    def __init__(self, cfg: DataConfig, seed: int = 0):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.train_dataset: TrainingDataset | None = None
        self.val_dataset: PlainDataset | None = None

    @property
    def root(self) -> Path:
        return Path(self.cfg.root) if self.cfg.root else synthetic_root(self.seed)

    def prepare_data(self) -> None:
        self.root  # noqa: B018 - generates the synthetic set once, on one process

    def setup(self, stage: str | None = None) -> None:
        c = self.cfg
        on_error = c.on_error
        if self.train_dataset is None:
            self.train_dataset = TrainingDataset(self.root, c.train_split, c.image_size, mosaic=c.mosaic,
                                              classes=c.classes, keep_difficult=c.keep_difficult, on_error=on_error)
        if self.val_dataset is None:
            self.val_dataset = PlainDataset(self.root, c.val_split, c.image_size, classes=c.classes,
                                            keep_difficult=c.keep_difficult, return_meta=True, on_error=on_error)

    def world(self) -> tuple[int, int]:
        """(world size, rank): from the Trainer when attached, else torch.distributed, else (1, 0)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def num_training_batches(self, world_size: int | None = None) -> int:
        """Optimizer steps per epoch with `world_size` processes (default: the current one); known
        before fitting, so the LR schedule can be written first."""
        self.setup("fit")
        world = world_size or self.world()[0]
        return steps_per_epoch(len(self.train_dataset), self.cfg.batch_size, world)

    def _pin_memory(self) -> bool:
        return self.cfg.pin_memory and torch.cuda.is_available()

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        world, rank = self.world()
        ds = self.train_dataset
        # Also on one process: its permutation is a function of (seed, epoch), so a resumed run
        # sees the same order as an uninterrupted one.
        sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=self.seed)
        drop_last = len(sampler) >= self.cfg.batch_size
        batches = MultiScaleBatchSampler(sampler, self.cfg.batch_size, self.cfg.train_sizes, drop_last, self.seed)
        if getattr(self, "trainer", None) is not None:  # every iteration starts where the fit loop is
            batches.position = loader_position(self.trainer, batches)
        workers = self.cfg.num_workers
        return ResumableDataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                                   pin_memory=self._pin_memory(), persistent_workers=workers > 0)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        world, rank = self.world()
        return evaluation_loader(self.val_dataset, self.cfg.batch_size, workers=self.cfg.num_workers,
                                 world=world, rank=rank, pin_memory=self._pin_memory())

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
