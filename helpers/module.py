"""The LightningModule: one training step, validation through the project's `Evaluator`, the optimizer
and the LR schedule.

What lives elsewhere: data in `datamodule` (batches are `batch.Batch`), the LR of each step in the
schedule file (`schedule`, applied by `schedule.ScheduleFileLR` as a step-interval scheduler),
checkpoints in `checkpoints` (a Callback), the loop, AMP and DDP in Lightning's Trainer (`train`).
"""
from __future__ import annotations

import sys

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.rank_zero import rank_zero_only

from .batch import Batch
from .config import Config, TrainConfig
from .divergence import CHECK_EVERY, LossWatch, TrainingDiverged, explosion_message, stop_message
from .evaluate import build_evaluator
from .loss import YoloLoss
from .model import build_model
from .resume import load_skipped, migrate_checkpoint, save_skipped, skip_step
from .schedule import Schedule, ScheduleFileLR
from .targets import build_targets


def build_optimizer(params, t: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """The optimizer `t.optimizer` names, at learning rate `lr`, with `t.weight_decay`."""
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=t.weight_decay)
    raise ValueError(f"unknown optimizer {t.optimizer!r} (adam, adamw or sgd)")


class YOLOModule(pl.LightningModule):
    def __init__(self, config: dict, schedule_path: str | None = None):
        """`config`: `Config.to_dict()` (plain types, so checkpoints load with weights_only=True)."""
        super().__init__()
        self.save_hyperparameters()
        self.cfg = Config.from_dict(config)
        self.model = build_model(self.cfg.model)
        self.loss_fn = YoloLoss.from_config(self.cfg.train)
        self.evaluator = build_evaluator(self.cfg)
        self.schedule = Schedule.read(schedule_path) if schedule_path else None
        # Unreadable training samples of this epoch on this rank, counted on the device (no host
        # sync per step); then totals over the run (all ranks, kept in checkpoints) and the last
        # validation's count. Not a buffer: DDP broadcasts buffers from rank 0 at every forward.
        self.train_skipped = torch.zeros((), dtype=torch.int64)
        self.skipped_images = {"train": 0, "val": 0}
        self.last_map: dict | None = None  # the last validation's Evaluator result that scored mAP
        self.loss_watch = LossWatch()  # divergence, recorded on the device (`check_divergence` reads it)
        self._explosion_named = False

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model(images)

    # --- training ---------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        b = len(batch)
        self.train_skipped = batch.skipped + self.train_skipped  # onto the batch's device at the first step
        if b == 0:  # no image of this batch could be read (the dataset warned, naming the files)
            return skip_step(self.trainer.optimizers[0], self.model.parameters())  # still a step of the schedule
        targets = build_targets(batch.boxes, b, batch.image_hw)
        parts = self.loss_fn.parts(self.model(batch.images), targets)
        self.loss_watch.update(parts.total, self.global_step)
        self.log("train/loss", parts.total, on_step=True, on_epoch=True, batch_size=b, prog_bar=True)
        self.log_dict({"train/box": parts.box, "train/obj": parts.obj, "train/noobj": parts.noobj,
                       "train/class": parts.cls}, on_step=True, on_epoch=True, batch_size=b)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False,
                 batch_size=b, prog_bar=True)
        self.log("train/image_size", float(batch.image_hw[1]), on_step=True, on_epoch=False, batch_size=b)
        return parts.total

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.global_step % CHECK_EVERY == 0:
            self.check_divergence()

    def _lr_of(self, step: int) -> float:
        if self.schedule is not None:
            return self.schedule.lr_at(step)
        return self.trainer.optimizers[0].param_groups[0]["lr"]

    def check_divergence(self) -> None:
        """Read the loss records (one sync; a collective under DDP: every rank calls it at the same
        step): `TrainingDiverged` at a non-finite loss, one warning line at the first explosion."""
        gather = self.trainer.strategy.all_gather if self.trainer.world_size > 1 else None
        found = self.loss_watch.read(gather)
        if found.nonfinite_step is not None:
            raise TrainingDiverged(stop_message(found.nonfinite_step, found.nonfinite_loss,
                                                self._lr_of(found.nonfinite_step)))
        if found.explosion_step is not None and not self._explosion_named:
            self._explosion_named = True
            rank_zero_only(print)(explosion_message(found.explosion_step, found.explosion_loss, found.explosion_median,
                                                    self._lr_of(found.explosion_step)), file=sys.stderr)

    def on_train_epoch_end(self) -> None:
        skipped = self._train_skipped_over_ranks()
        self.log("train/skipped_samples", float(skipped), on_epoch=True, sync_dist=False)
        if skipped:
            rank_zero_only(print)(f"epoch {self.current_epoch}: {skipped} training samples could not be read and "
                                  "were skipped (the warnings above name the files)")
        self.skipped_images["train"] += skipped
        self.train_skipped = torch.zeros((), dtype=torch.int64)

    def _train_skipped_over_ranks(self) -> int:
        """This epoch's unreadable training samples, summed over ranks (a collective: every rank calls it)."""
        return int(self.trainer.strategy.reduce(self.train_skipped.to(self.device, torch.float32), reduce_op="sum"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Every rank saves together (Lightning gathers the state; rank 0 writes), so the partial
        # epoch's count can be summed over ranks here.
        save_skipped(checkpoint, self.skipped_images, self._train_skipped_over_ranks())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_images, on_this_rank = load_skipped(checkpoint, self.global_rank)
        self.train_skipped = torch.tensor(on_this_rank, dtype=torch.int64)
        migrate_checkpoint(checkpoint, self.schedule)

    # --- validation -------------------------------------------------------------------------
    def _is_last_epoch(self) -> bool:
        return self.trainer.max_epochs is not None and self.current_epoch >= self.trainer.max_epochs - 1

    def _due(self, every: int) -> bool:
        return self._is_last_epoch() or (every > 0 and (self.current_epoch + 1) % every == 0)

    def on_validation_epoch_start(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.check_divergence()  # not a validation of non-finite weights
        t = self.cfg.train
        self.evaluator.reset(accuracy=self._due(t.accuracy_every), detections=self._due(t.map_every),
                             rank=self.global_rank, world_size=self.trainer.world_size)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        outputs = targets = None
        loss = torch.zeros((), device=self.device)  # no image of this batch could be read: weight 0
        if len(batch):
            outputs = self.model(batch.images)
            targets = build_targets(batch.boxes, len(batch), batch.image_hw)
            loss = self.loss_fn(outputs, targets)
        # Logged by every rank at every batch: the epoch-end sync is a collective.
        self.log("val/loss", loss, on_epoch=True, batch_size=len(batch), sync_dist=True, prog_bar=True)
        if not self.trainer.sanity_checking:
            self.evaluator.update(outputs, batch, targets)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        result = self.evaluator.compute()  # gathered over ranks
        self.skipped_images["val"] = result["skipped"]
        if result["skipped"]:
            self.log("val/skipped_samples", float(result["skipped"]))
        if self.evaluator.scores_accuracy:
            self.log_dict({f"val/{k}": result[k] for k in ("class_acc", "noobj_acc", "obj_acc")
                           if result[k] is not None}, prog_bar=True)
            if result.get("verdict"):  # the per-epoch log: the graded accuracies against their targets
                self.print(f"epoch {self.current_epoch} (step {self.global_step}): {result['verdict']}")
        if self.evaluator.scores_detections:
            self.log_dict({f"val/{k}": result[k] for k in ("map50_voc07", "map50_all") if result[k] is not None})
            self.last_map = result

    # --- optimizer ---------------------------------------------------------------------------
    def configure_optimizers(self):
        t = self.cfg.train
        if self.schedule is None:  # no schedule file (tests, the LR finder): a constant max_lr
            return build_optimizer(self.model.parameters(), t, t.max_lr)
        optimizer = build_optimizer(self.model.parameters(), t, self.schedule.lr_at(0))
        scheduler = ScheduleFileLR(optimizer, self.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
