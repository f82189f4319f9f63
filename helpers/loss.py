"""YoloLoss: the course's four terms and weights, without its defects.

Per scale (summed over the 3 scales):
- no-object: BCE-with-logits of the objectness logit against 0, over cells whose target is 0;
- object: MSE between sigmoid(objectness) and the detached IoU of predicted and target box, over
  positive cells;
- box: MSE between [sigmoid(tx), sigmoid(ty), tw, th] and [x in cell, y in cell, log(w / anchor_w),
  log(h / anchor_h)], over positive cells;
- class: softmax cross-entropy of the class logits, over positive cells.
Weights default to the course's (class 1, no-object 10, object 1, box 10).

Unlike the course: a term over an empty selection is 0, not NaN (mean = sum / max(count, 1));
inputs are never written to; everything is computed in fp32, even inside fp16 autocast, with the
exponent clamped so extreme fp16 logits stay finite.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .boxes import paired_iou
from .config import ANCHORS

MAX_LOG_SCALE = 10.0  # exp(10) x anchor is far beyond any image: clamp before exp, never inf


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
    ):
        super().__init__()
        self.register_buffer("anchors", torch.as_tensor(anchors, dtype=torch.float32), persistent=False)
        self.weights = (lambda_box, lambda_obj, lambda_noobj, lambda_class)

    def forward(self, outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        """outputs: 3 x [B, 3, S, S, 5+C] raw; targets: 3 x [B, 3, S, S, 6]. Returns a 0-d tensor."""
        return self.parts(outputs, targets).total

    def parts(self, outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> LossParts:
        """The weighted terms, summed over scales, and their total."""
        with torch.autocast(device_type=outputs[0].device.type, enabled=False):
            terms = torch.stack([
                self._scale_terms(p.float(), t.float(), self.anchors[s].to(p.device))
                for s, (p, t) in enumerate(zip(outputs, targets, strict=True))
            ]).sum(0)
            weighted = terms * terms.new_tensor(self.weights)
        box, obj, noobj, cls = weighted.unbind()
        return LossParts(box=box, obj=obj, noobj=noobj, cls=cls, total=weighted.sum())

    @staticmethod
    def _scale_terms(pred: torch.Tensor, target: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
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
            iou = paired_iou(torch.cat([xy, wh], 1), t[:, 1:5])
        obj_loss = _mean((torch.sigmoid(p[:, 0]) - iou) ** 2)

        target_twh = torch.log(1e-16 + t[:, 3:5] / anchor_cells)
        box_loss = _mean((torch.cat([xy, p[:, 3:5]], 1) - torch.cat([t[:, 1:3], target_twh], 1)) ** 2)

        if p.shape[0]:
            cls_loss = F.cross_entropy(p[:, 5:], t[:, 5].long())
        else:
            cls_loss = p[:, 5:].sum()  # 0, still attached to the graph
        return torch.stack([box_loss, obj_loss, noobj_loss, cls_loss])
