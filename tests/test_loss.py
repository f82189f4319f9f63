"""YoloLoss: finite on empty targets, never writes into its inputs, fp32 under autocast, all grads flow."""
import math

import torch

from helpers.loss import YoloLoss
from helpers.model import YOLOv3
from helpers.targets import build_targets

BOXES = torch.tensor([[0, 3, 0.5, 0.4, 0.3, 0.2], [1, 7, 0.2, 0.7, 0.05, 0.08], [1, 1, 0.8, 0.2, 0.6, 0.5]])


def outputs(batch=2, size=128, nc=20, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size // s, size // s, 5 + nc, generator=g) * scale).requires_grad_()
            for s in (32, 16, 8)]


def test_loss_is_finite_when_no_image_has_an_object():
    outs = outputs()
    loss = YoloLoss()(outs, build_targets(torch.zeros(0, 6), 2, 128))
    assert torch.isfinite(loss) and loss > 0  # the no-object term still teaches "nothing here"
    loss.backward()
    assert all(torch.isfinite(o.grad).all() for o in outs)


def test_loss_is_finite_when_every_cell_is_ignored_or_positive():
    outs = outputs()
    targets = [torch.full((2, 3, 128 // s, 128 // s, 6), -1.0) for s in (32, 16, 8)]
    loss = YoloLoss()(outs, targets)
    assert torch.isfinite(loss) and loss == 0


def test_loss_never_writes_into_predictions_or_targets():
    outs = outputs()
    targets = build_targets(BOXES, 2, 128)
    before = [o.detach().clone() for o in outs], [t.clone() for t in targets]
    YoloLoss()(outs, targets).backward()
    for a, b in zip(outs, before[0]):
        assert torch.equal(a.detach(), b)
    for a, b in zip(targets, before[1]):
        assert torch.equal(a, b)


def test_parts_carry_the_course_weights_and_sum_to_the_total():
    outs, targets = outputs(), build_targets(BOXES, 2, 128)
    plain = YoloLoss(lambda_class=1, lambda_noobj=1, lambda_obj=1, lambda_box=1).parts(outs, targets)
    course = YoloLoss().parts(outs, targets)
    torch.testing.assert_close(course.box, 10 * plain.box)
    torch.testing.assert_close(course.noobj, 10 * plain.noobj)
    torch.testing.assert_close(course.obj, plain.obj)
    torch.testing.assert_close(course.cls, plain.cls)
    torch.testing.assert_close(course.total, course.box + course.obj + course.noobj + course.cls)


def test_noobj_term_is_bce_against_zero_over_negative_cells():
    outs, targets = outputs(), build_targets(BOXES, 2, 128)
    part = YoloLoss(lambda_class=0, lambda_noobj=1, lambda_obj=0, lambda_box=0)(outs, targets)
    expected = sum(
        torch.nn.functional.binary_cross_entropy_with_logits(o[..., 0][t[..., 0] == 0],
                                                             torch.zeros_like(o[..., 0][t[..., 0] == 0]))
        for o, t in zip(outs, targets))
    torch.testing.assert_close(part, expected)


def test_box_term_targets_log_of_size_over_anchor():
    # A prediction that equals the target exactly gives zero box loss.
    targets = build_targets(BOXES[:1], 1, 128)
    outs = [torch.zeros(1, 3, 128 // s, 128 // s, 25) for s in (32, 16, 8)]
    from helpers.config import ANCHORS
    for o, t, anchors, s in zip(outs, targets, ANCHORS, (4, 8, 16)):
        b, a, i, j = (t[..., 0] == 1).nonzero()[0]
        x, y = t[b, a, i, j, 1:3]
        o[b, a, i, j, 1:3] = torch.logit(torch.stack([x, y]))
        o[b, a, i, j, 3] = math.log(t[b, a, i, j, 3] / (anchors[a][0] * s))
        o[b, a, i, j, 4] = math.log(t[b, a, i, j, 4] / (anchors[a][1] * s))
    box = YoloLoss(lambda_class=0, lambda_noobj=0, lambda_obj=0, lambda_box=1)(outs, targets)
    assert box < 1e-6


def test_loss_is_fp32_and_finite_inside_fp16_autocast_even_for_extreme_logits():
    fp16_max = torch.finfo(torch.float16).max  # 65504: the largest logit an fp16 head can emit
    outs = [o.detach().clamp(-fp16_max, fp16_max).half().requires_grad_() for o in outputs(scale=6e4)]
    targets = build_targets(BOXES, 2, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = YoloLoss()(outs, targets)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    # A gradient may overflow fp16's range on its way back (GradScaler then skips the step),
    # but it must never be NaN.
    assert not any(torch.isnan(o.grad).any() for o in outs)


def test_gradients_reach_every_parameter_of_the_model():
    torch.manual_seed(0)
    model = YOLOv3(num_classes=20, width=0.125)
    loss = YoloLoss()(model(torch.rand(2, 3, 128, 128)), build_targets(BOXES, 2, 128))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
