"""The one batch type of training and evaluation, the collate that makes it, and the one loader of
evaluation batches (the DataModule's val/test loader and `helpers.evaluate.split_loader` both).

Training batches carry no metas; evaluation batches (from `PlainDataset(return_meta=True)`) carry one
per image, saying how the image was letterboxed and what its full ground truth is. Consumers read
fields by name and ask `batch.metas is None`, never the position or type of an element.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .boxes import Letterbox, cxcywh_to_xyxy


def _no_skips() -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64)


@dataclass
class Batch:
    """images: float [B,3,H,W] in 0..1 (B = 0: no sample of the batch could be read);
    boxes: float [N,6] = image index, class, cx, cy, w, h, normalised to the input;
    metas: None for training, else per image {"path", "letterbox": `boxes.Letterbox` from the stored
    image to the input, "gt": {"boxes" [G,4] x1y1x2y2 stored pixels, "labels" [G], "difficult" [G]}};
    skipped: int64 0-d tensor, the samples of this batch that could not be read (dropped here).

    Lightning moves it with `to` and the DataLoader pins it with `pin_memory` (metas stay on the CPU).
    """
    images: torch.Tensor
    boxes: torch.Tensor
    metas: list[dict] | None = None
    skipped: torch.Tensor = field(default_factory=_no_skips)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_hw(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def to(self, device, non_blocking: bool = False) -> Batch:
        return Batch(self.images.to(device, non_blocking=non_blocking), self.boxes.to(device, non_blocking=non_blocking),
                     self.metas, self.skipped.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return Batch(self.images.pin_memory(), self.boxes.pin_memory(), self.metas, self.skipped.pin_memory())

    def letterboxes(self) -> list[Letterbox] | None:
        """Per image the mapping back to the stored image, or None (a training batch: input pixels)."""
        return None if self.metas is None else [m["letterbox"] for m in self.metas]

    def truths(self) -> list[dict]:
        """Ground truth per image, {"boxes" [G,4] x1y1x2y2, "labels" [G], "difficult" [G]}: the metas'
        (stored pixels, difficult objects included) or, without metas, the batch's own boxes in input
        pixels (difficult objects were left out of those)."""
        if self.metas is not None:
            return [m["gt"] for m in self.metas]
        h, w = self.image_hw
        boxes = self.boxes.detach().float().cpu()
        xyxy = cxcywh_to_xyxy(boxes[:, 2:6] * torch.tensor([w, h, w, h], dtype=torch.float32))
        image = boxes[:, 0].long()
        return [{"boxes": xyxy[image == i], "labels": boxes[image == i, 1].long(),
                 "difficult": torch.zeros(int((image == i).sum()), dtype=torch.bool)} for i in range(len(self))]


def collate(samples: list) -> Batch:
    """A `Batch` from dataset items (image [3,S,S], boxes [n,5] class, cx, cy, w, h[, meta]) or None
    (unreadable: dropped and counted). Items with a meta give a batch with metas."""
    good = [s for s in samples if s is not None]
    skipped = torch.tensor(len(samples) - len(good), dtype=torch.int64)
    with_metas = any(len(s) > 2 for s in good)
    metas = [s[2] for s in good] if with_metas else None
    if not good:
        return Batch(torch.zeros(0, 3, 1, 1), torch.zeros(0, 6), metas, skipped)
    images = torch.stack([s[0] for s in good])
    index = torch.repeat_interleave(torch.arange(len(good), dtype=torch.float32),
                                    torch.tensor([len(s[1]) for s in good]))
    boxes = torch.cat([index[:, None], torch.cat([s[1] for s in good])], 1)
    return Batch(images, boxes, metas, skipped)


class ShardSampler(Sampler):
    """Indices rank, rank + world, ... in order: each image on exactly one rank (no padding)."""

    def __init__(self, n: int, world: int = 1, rank: int = 0):
        self.n, self.world, self.rank = n, world, rank

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def evaluation_loader(dataset: Dataset, batch_size: int, *, workers: int = 0, world: int = 1, rank: int = 0,
                      pin_memory: bool = False) -> DataLoader:
    """`Batch`es of `dataset` (a `PlainDataset(return_meta=True)`, or a Subset of one) at its own image
    size, in order, this rank's shard only (`ShardSampler`: with `world` processes each image is
    evaluated once, none twice), the last batch short rather than dropped."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), world, rank),
                      num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
                      persistent_workers=workers > 0)
