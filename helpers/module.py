"""The LightningModule: one training step, validation accuracies and mAP, the optimizer.

What lives elsewhere: data in `datamodule`, the LR of each step in the schedule file (`schedule`,
applied here at every batch start), checkpoints in `checkpoints` (a Callback), the loop, AMP and
DDP in Lightning's Trainer (`train`).
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from .config import Config
from .loss import YoloLoss
from .metrics import DetectionsAndTruths, YoloAccuracy, voc_map
from .model import build_model
from .postprocess import detect
from .schedule import Schedule
from .targets import build_targets


class YOLOModule(pl.LightningModule):
    def __init__(self, config: dict, schedule_path: str | None = None):
        """`config`: `Config.to_dict()` (plain types, so checkpoints load with weights_only=True)."""
        super().__init__()
        self.save_hyperparameters()
        self.cfg = Config.from_dict(config)
        t = self.cfg.train
        self.model = build_model(self.cfg.model)
        self.loss_fn = YoloLoss.from_config(t)
        self.val_accuracy = YoloAccuracy(threshold=t.conf_threshold)
        self.val_map_inputs = DetectionsAndTruths()
        self.schedule = Schedule.read(schedule_path) if schedule_path else None
        self.skipped_samples = 0  # this epoch's, on this rank
        self.val_skipped = 0
        # Unreadable samples: training total over the run (all ranks, every epoch; kept in checkpoints)
        # and the last validation's count.
        self.skipped_images = {"train": 0, "val": 0}
        self.last_map: dict | None = None

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model(images)

    # --- training ---------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.schedule is not None:
            lr = self.schedule.lr_at(self.global_step)
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] = lr

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, boxes, skipped = batch
        b = images.shape[0]
        self.skipped_samples += int(skipped)
        if b == 0:  # no image of this batch could be read (the dataset warned, naming the files)
            # Still one optimizer step, so the step count stays on the schedule file and every DDP rank
            # steps together; at LR 0 and zero gradients the weights do not move.
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] = 0.0
            return sum(p.sum() for p in self.model.parameters()) * 0.0
        targets = build_targets(boxes, b, tuple(images.shape[-2:]))
        parts = self.loss_fn.parts(self.model(images), targets)
        self.log("train/loss", parts.total, on_step=True, on_epoch=True, batch_size=b, prog_bar=True)
        self.log_dict({"train/box": parts.box, "train/obj": parts.obj, "train/noobj": parts.noobj,
                       "train/class": parts.cls}, on_step=True, on_epoch=True, batch_size=b)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False,
                 batch_size=b, prog_bar=True)
        self.log("train/image_size", float(images.shape[-1]), on_step=True, on_epoch=False, batch_size=b)
        return parts.total

    def on_train_epoch_end(self) -> None:
        skipped = self.trainer.strategy.reduce(torch.tensor(float(self.skipped_samples), device=self.device),
                                               reduce_op="sum")
        self.log("train/skipped_samples", skipped, on_epoch=True, sync_dist=False)
        if int(skipped) and self.trainer.is_global_zero:
            print(f"epoch {self.current_epoch}: {int(skipped)} training samples could not be read and were "
                  "skipped (the warnings above name the files)")
        self.skipped_images["train"] += int(skipped)
        self.skipped_samples = 0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["skipped_images"] = {**self.skipped_images, "train_this_epoch": self.skipped_samples}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("skipped_images", {})
        self.skipped_images = {"train": int(saved.get("train", 0)), "val": int(saved.get("val", 0))}
        self.skipped_samples = int(saved.get("train_this_epoch", 0))

    # --- validation -------------------------------------------------------------------------
    def _is_last_epoch(self) -> bool:
        return self.trainer.max_epochs is not None and self.current_epoch >= self.trainer.max_epochs - 1

    def _accuracy_due(self) -> bool:
        every = self.cfg.train.accuracy_every
        return self._is_last_epoch() or (every > 0 and (self.current_epoch + 1) % every == 0)

    def _map_due(self) -> bool:
        every = self.cfg.train.map_every
        return self._is_last_epoch() or (every > 0 and (self.current_epoch + 1) % every == 0)

    def validation_step(self, batch, batch_idx: int) -> None:
        images, boxes, metas, skipped = batch
        b = images.shape[0]
        self.val_skipped += int(skipped)
        if b == 0:  # no image of this batch could be read
            return
        outputs = self.model(images)
        targets = build_targets(boxes, b, tuple(images.shape[-2:]))
        self.log("val/loss", self.loss_fn(outputs, targets), on_epoch=True, batch_size=b, sync_dist=True,
                 prog_bar=True)
        if self.trainer.sanity_checking:
            return
        if self._accuracy_due():
            self.val_accuracy.update(outputs, targets)
        if self._map_due():
            t = self.cfg.train
            dets = detect(outputs, tuple(images.shape[-2:]), conf_threshold=t.conf_threshold,
                          iou_threshold=t.nms_iou, letterbox=[m["letterbox"] for m in metas])
            # Ids unique across ranks: rank-strided positions in the epoch (nominal batch size, so a
            # short last batch cannot reuse an id).
            start = (batch_idx * self.trainer.world_size + self.global_rank) * self.cfg.data.batch_size
            ids = torch.arange(start, start + b)
            self.val_map_inputs.update(dets, [m["gt"] for m in metas], ids)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.val_skipped = 0
            return
        skipped = self.trainer.strategy.reduce(torch.tensor(float(self.val_skipped), device=self.device),
                                               reduce_op="sum")
        self.skipped_images["val"] = int(skipped)
        self.val_skipped = 0
        if int(skipped):
            self.log("val/skipped_samples", skipped)
        if self._accuracy_due() and self.val_accuracy.update_count:
            acc = self.val_accuracy.compute()  # synced across ranks (sum states)
            self.log_dict({f"val/{k}": v for k, v in acc.items()}, prog_bar=True)
            self.val_accuracy.reset()
        if self._map_due() and self.val_map_inputs.update_count:
            dets, gts = self.val_map_inputs.compute()
            self.val_map_inputs.reset()
            t = self.cfg.train
            results = voc_map(dets, gts, iou_threshold=t.map_iou, method=("voc07", "all"),  # one matching
                              num_classes=self.cfg.model.num_classes)
            self.log("val/map50_voc07", float(results["voc07"]["map"]))
            self.log("val/map50_all", float(results["all"]["map"]))
            self.last_map = results

    # --- optimizer ---------------------------------------------------------------------------
    def configure_optimizers(self):
        t = self.cfg.train
        lr = self.schedule.lr_at(0) if self.schedule else t.max_lr
        params = self.model.parameters()
        if t.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay)
        if t.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
        if t.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=t.weight_decay)
        raise ValueError(f"unknown optimizer {t.optimizer!r} (adam, adamw or sgd)")
