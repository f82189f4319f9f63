"""YoloLoss: the course's four terms and weights, without its defects.

Per scale (summed over the 3 scales):
- no-object: BCE-with-logits of the objectness logit against 0, over cells whose target is 0;
- object: MSE between sigmoid(objectness) and the detached IoU of predicted and target box, over
  positive cells;
- box: MSE between [sigmoid(tx), sigmoid(ty), tw, th] and [x in cell, y in cell, log(w / anchor_w),
  log(h / anchor_h)], over positive cells;
- class: softmax cross-entropy of the class logits, over positive cells.
Weights default to the course's (class 1, no-object 10, object 1, box 10).

Variants (`TrainConfig.obj_loss`, `TrainConfig.box_loss`; the constructor's defaults are the course's):
- obj_loss "mse": the course's term above. Its gradient in the logit carries sigmoid'(logit), which
  vanishes once the 10x no-object term has pushed objectness down, so positives cannot pull it back
  up (on real photos it learns no objectness at all: benchmarks/RESULTS.md, "Learning").
- obj_loss "bce": BCE-with-logits of the objectness logit against the detached IoU (ultralytics'
  objectness loss); its gradient is sigmoid(logit) - IoU.
- obj_target_min (`TrainConfig.obj_target_min`, either objectness loss): a positive's objectness
  target is max(IoU, obj_target_min). 0 is the course's (the IoU itself); 1 is the YOLOv3 paper's and
  darknet's (every positive is an object, whatever its box); in between, the IoU clamped from below.
  A small model's early IoUs are small, so an IoU target holds positives near the course's 0.05
  accuracy threshold (benchmarks/RESULTS.md, "The graded accuracies").
- obj_balance (`TrainConfig.obj_balance`): per-scale weights of the object and no-object terms,
  coarse to fine (ultralytics' `balance`). Each term is a mean over its scale's cells, so with equal
  weights an empty cell of the finest scale (16x the cells of the coarsest) is pushed 16x more weakly,
  yet that scale holds most of the cells the no-object accuracy counts.
- box_loss "mse": the course's term above; "giou" | "diou" | "ciou": torchvision.ops' generalized /
  distance / complete IoU loss of the decoded predicted box against the target box (cell units).

Unlike the course: a term over an empty selection is 0, not NaN (mean = sum / max(count, 1));
inputs are never written to; everything is computed in fp32, even inside fp16 autocast, with the
exponent clamped so extreme fp16 logits stay finite.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from .boxes import cxcywh_to_xyxy, paired_iou
from .config import ANCHORS, BOX_LOSSES, MAX_LOG_SCALE, OBJ_LOSSES

IOU_BOX_LOSSES = {"giou": generalized_box_iou_loss, "diou": distance_box_iou_loss, "ciou": complete_box_iou_loss}


@dataclass
class LossParts:
    box: torch.Tensor
    obj: torch.Tensor
    noobj: torch.Tensor
    cls: torch.Tensor
    total: torch.Tensor


class _ObjectnessAndRows(torch.autograd.Function):
    """(pred[..., 0] for every cell, pred at the positive cells) with a single-buffer backward.

    Autograd would give each of the two reads its own full-size zero gradient and then add them;
    on a 52x52 map that is most of the loss's time on a CPU, so the backward writes both into one.
    """

    @staticmethod
    def forward(ctx, pred: torch.Tensor, rows: torch.Tensor):
        ctx.save_for_backward(rows)
        ctx.shape = pred.shape
        flat = pred.reshape(-1, pred.shape[-1])
        return flat[:, 0].reshape(pred.shape[:-1]), flat[rows]

    @staticmethod
    def backward(ctx, grad_obj: torch.Tensor, grad_rows: torch.Tensor):
        (rows,) = ctx.saved_tensors
        grad = grad_rows.new_zeros(ctx.shape).reshape(-1, ctx.shape[-1])
        grad[:, 0] = grad_obj.reshape(-1)
        grad.index_put_((rows,), grad_rows, accumulate=True)
        return grad.reshape(ctx.shape), None


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean that is 0 (with a gradient path) for an empty selection, instead of NaN."""
    return x.sum() / max(x.numel(), 1)


class YoloLoss(nn.Module):
    def __init__(
        self,
        anchors=ANCHORS,
        lambda_class: float = 1.0,
        lambda_noobj: float = 10.0,
        lambda_obj: float = 1.0,
        lambda_box: float = 10.0,
        obj_loss: str = "mse",
        box_loss: str = "mse",
        obj_target_min: float = 0.0,
        obj_balance: tuple[float, ...] = (1.0, 1.0, 1.0),
    ):
        super().__init__()
        if obj_loss not in OBJ_LOSSES:
            raise ValueError(f"obj_loss {obj_loss!r} is not a known objectness loss: use one of {', '.join(OBJ_LOSSES)}")
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss {box_loss!r} is not a known box loss: use one of {', '.join(BOX_LOSSES)}")
        self.register_buffer("anchors", torch.as_tensor(anchors, dtype=torch.float32), persistent=False)
        self.weights = (lambda_box, lambda_obj, lambda_noobj, lambda_class)
        if not 0.0 <= obj_target_min <= 1.0:
            raise ValueError(f"obj_target_min {obj_target_min!r} must lie in [0, 1] (0: the IoU, 1: always 1)")
        if len(obj_balance) != len(anchors):
            raise ValueError(f"obj_balance {tuple(obj_balance)!r} needs one weight per scale ({len(anchors)})")
        self.obj_loss, self.box_loss, self.obj_target_min = obj_loss, box_loss, obj_target_min
        # [scales, 4 terms]: the obj and noobj columns weighted per scale
        scale_weights = torch.ones(len(anchors), 4)
        scale_weights[:, 1:3] = torch.as_tensor(obj_balance, dtype=torch.float32)[:, None]
        self.register_buffer("scale_weights", scale_weights, persistent=False)

    @classmethod
    def from_config(cls, t) -> YoloLoss:
        """The loss a `TrainConfig` asks for (weights and variants)."""
        return cls(lambda_class=t.lambda_class, lambda_noobj=t.lambda_noobj, lambda_obj=t.lambda_obj,
                   lambda_box=t.lambda_box, obj_loss=t.obj_loss, box_loss=t.box_loss,
                   obj_target_min=t.obj_target_min, obj_balance=t.obj_balance)

    def forward(self, outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        """outputs: 3 x [B, 3, S, S, 5+C] raw; targets: 3 x [B, 3, S, S, 6]. Returns a 0-d tensor."""
        return self.parts(outputs, targets).total

    def parts(self, outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> LossParts:
        """The weighted terms, summed over scales, and their total."""
        with torch.autocast(device_type=outputs[0].device.type, enabled=False):
            terms = torch.stack([
                self._scale_terms(p.float(), t.float(), self.anchors[s].to(p.device))
                for s, (p, t) in enumerate(zip(outputs, targets, strict=True))
            ])
            terms = (terms * self.scale_weights.to(terms.device)).sum(0)
            weighted = terms * terms.new_tensor(self.weights)
        box, obj, noobj, cls = weighted.unbind()
        return LossParts(box=box, obj=obj, noobj=noobj, cls=cls, total=weighted.sum())

    def _scale_terms(self, pred: torch.Tensor, target: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """pred [B,3,S_h,S_w,5+C], target [B,3,S_h,S_w,6], anchors [3,2] (fraction of the image).

        Returns the unweighted [box, obj, noobj, class] losses of this scale.
        """
        s_h, s_w = pred.shape[2:4]
        obj = target[..., 0] == 1
        noobj = target[..., 0] == 0

        rows = obj.reshape(-1).nonzero().squeeze(1)  # positive cells, flat
        obj_logit, p = _ObjectnessAndRows.apply(pred, rows)  # [B,3,S_h,S_w], [P, 5+C]
        t = target.reshape(-1, target.shape[-1])[rows]  # [P, 6]

        # Against a target of 0, BCE-with-logits is softplus(logit); masking beats gathering here.
        noobj_loss = (F.softplus(obj_logit) * noobj).sum() / noobj.sum().clamp(min=1)

        anchor_of_row = (rows // (s_h * s_w)) % pred.shape[1]
        anchor_cells = (anchors * anchors.new_tensor([s_w, s_h]))[anchor_of_row]  # [P, 2]
        xy = torch.sigmoid(p[:, 1:3])
        wh = torch.exp(p[:, 3:5].clamp(max=MAX_LOG_SCALE)) * anchor_cells
        with torch.no_grad():
            obj_target = paired_iou(torch.cat([xy, wh], 1), t[:, 1:5]).clamp(min=self.obj_target_min)
        if self.obj_loss == "bce":
            obj_loss = _mean(F.binary_cross_entropy_with_logits(p[:, 0], obj_target, reduction="none"))
        else:
            obj_loss = _mean((torch.sigmoid(p[:, 0]) - obj_target) ** 2)

        if self.box_loss == "mse":
            target_twh = torch.log(1e-16 + t[:, 3:5] / anchor_cells)
            box_loss = _mean((torch.cat([xy, p[:, 3:5]], 1) - torch.cat([t[:, 1:3], target_twh], 1)) ** 2)
        else:
            # Clamped below too: a zero width or height makes CIoU's aspect term atan(0/0) = NaN.
            wh_box = torch.exp(p[:, 3:5].clamp(-MAX_LOG_SCALE, MAX_LOG_SCALE)) * anchor_cells
            box_loss = _mean(IOU_BOX_LOSSES[self.box_loss](cxcywh_to_xyxy(torch.cat([xy, wh_box], 1)),
                                                           cxcywh_to_xyxy(t[:, 1:5]), reduction="none"))

        if p.shape[0]:
            cls_loss = F.cross_entropy(p[:, 5:], t[:, 5].long())
        else:
            cls_loss = p[:, 5:].sum()  # 0, still attached to the graph
        return torch.stack([box_loss, obj_loss, noobj_loss, cls_loss])
