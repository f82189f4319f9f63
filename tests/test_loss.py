"""YoloLoss: finite on empty targets, never writes into its inputs, fp32 under autocast, all grads flow;
the course's variant is the course's loss, the BCE objectness keeps a gradient where the course's vanishes."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers.config import ANCHORS, BOX_LOSSES, OBJ_LOSSES, TrainConfig
from helpers.loss import YoloLoss
from helpers.model import YOLOv3
from helpers.targets import build_targets

BOXES = torch.tensor([[0, 3, 0.5, 0.4, 0.3, 0.2], [1, 7, 0.2, 0.7, 0.05, 0.08], [1, 1, 0.8, 0.2, 0.6, 0.5]])


def outputs(batch=2, size=128, nc=20, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size // s, size // s, 5 + nc, generator=g) * scale).requires_grad_()
            for s in (32, 16, 8)]


VARIANTS = [(o, b) for o in OBJ_LOSSES for b in BOX_LOSSES]


@pytest.mark.parametrize("obj_loss,box_loss", VARIANTS)
def test_loss_is_finite_when_no_image_has_an_object(obj_loss, box_loss):
    outs = outputs()
    loss = YoloLoss(obj_loss=obj_loss, box_loss=box_loss)(outs, build_targets(torch.zeros(0, 6), 2, 128))
    assert torch.isfinite(loss) and loss > 0  # the no-object term still teaches "nothing here"
    loss.backward()
    assert all(torch.isfinite(o.grad).all() for o in outs)


def test_loss_is_finite_when_every_cell_is_ignored_or_positive():
    outs = outputs()
    targets = [torch.full((2, 3, 128 // s, 128 // s, 6), -1.0) for s in (32, 16, 8)]
    loss = YoloLoss()(outs, targets)
    assert torch.isfinite(loss) and loss == 0


@pytest.mark.parametrize("obj_loss,box_loss", VARIANTS)
def test_loss_never_writes_into_predictions_or_targets(obj_loss, box_loss):
    outs = outputs()
    targets = build_targets(BOXES, 2, 128)
    before = [o.detach().clone() for o in outs], [t.clone() for t in targets]
    YoloLoss(obj_loss=obj_loss, box_loss=box_loss)(outs, targets).backward()
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


@pytest.mark.parametrize("obj_loss,box_loss", VARIANTS)
def test_loss_is_fp32_and_finite_inside_fp16_autocast_even_for_extreme_logits(obj_loss, box_loss):
    fp16_max = torch.finfo(torch.float16).max  # 65504: the largest logit an fp16 head can emit
    outs = [o.detach().clamp(-fp16_max, fp16_max).half().requires_grad_() for o in outputs(scale=6e4)]
    targets = build_targets(BOXES, 2, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = YoloLoss(obj_loss=obj_loss, box_loss=box_loss)(outs, targets)
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


# --- variants -------------------------------------------------------------------------------------
def course_reference(outs, targets, anchors=ANCHORS):
    """The course's loss written plainly, per scale (masks): no-object BCE of the objectness logit
    against 0, object MSE of sigmoid(objectness) against the detached IoU, box MSE of [sigmoid(tx, ty),
    tw, th] against [x, y in the cell, log(w / anchor), log(h / anchor)], class softmax cross-entropy;
    each a mean over its cells, weighted box 10, object 1, no-object 10, class 1."""
    total = 0.0
    for pred, t, anc in zip(outs, targets, anchors):
        s = pred.shape[2]
        obj, noobj = t[..., 0] == 1, t[..., 0] == 0
        noobj_loss = F.binary_cross_entropy_with_logits(pred[..., 0][noobj], torch.zeros_like(pred[..., 0][noobj]))
        a = (torch.tensor(anc) * s).reshape(1, 3, 1, 1, 2)
        box_pred = torch.cat([torch.sigmoid(pred[..., 1:3]), torch.exp(pred[..., 3:5]) * a], -1)
        from helpers.boxes import paired_iou
        iou = paired_iou(box_pred[obj], t[..., 1:5][obj]).detach()
        obj_loss = F.mse_loss(torch.sigmoid(pred[..., 0][obj]), iou)
        twh = torch.log(1e-16 + t[..., 3:5] / a)
        box_loss = F.mse_loss(torch.cat([torch.sigmoid(pred[..., 1:3]), pred[..., 3:5]], -1)[obj],
                              torch.cat([t[..., 1:3], twh], -1)[obj])
        cls_loss = F.cross_entropy(pred[..., 5:][obj], t[..., 5][obj].long())
        total = total + 10 * box_loss + obj_loss + 10 * noobj_loss + cls_loss
    return total


def test_course_variant_equals_the_courses_loss_in_value_and_gradient():
    outs, targets = outputs(), build_targets(BOXES, 2, 128)
    ours = YoloLoss(obj_loss="mse", box_loss="mse")(outs, targets)
    grads = torch.autograd.grad(ours, outs)
    ref = course_reference(outs, targets)
    ref_grads = torch.autograd.grad(ref, outs)
    torch.testing.assert_close(ours, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    # and the constructor's defaults are the course's
    torch.testing.assert_close(YoloLoss()(outs, targets), ours)


def _objectness_grad_at_a_positive_cell(obj_loss: str, logit: float) -> float:
    targets = build_targets(BOXES[:1], 1, 128)
    outs = [torch.zeros(1, 3, 128 // s, 128 // s, 25) for s in (32, 16, 8)]
    b, a, i, j = (targets[0][..., 0] == 1).nonzero()[0]
    outs[0][b, a, i, j, 0] = logit
    outs = [o.requires_grad_() for o in outs]
    loss = YoloLoss(lambda_class=0, lambda_noobj=0, lambda_obj=1, lambda_box=0, obj_loss=obj_loss)(outs, targets)
    return float(torch.autograd.grad(loss, outs[0])[0][b, a, i, j, 0])


def test_bce_objectness_keeps_pulling_up_a_positive_whose_sigmoid_is_near_zero():
    # sigmoid(-8) = 3e-4: where the no-object term leaves a positive cell. The course's MSE gradient
    # carries sigmoid'(-8) = 3e-4 and is gone; BCE's is sigmoid - IoU, the full IoU.
    mse, bce = (_objectness_grad_at_a_positive_cell(k, -8.0) for k in ("mse", "bce"))
    assert abs(mse) < 1e-3
    assert bce < -0.05  # negative: descent raises the logit
    assert abs(bce) > 100 * abs(mse)


def test_bce_objectness_is_bce_with_logits_against_the_detached_iou():
    outs, targets = outputs(), build_targets(BOXES, 2, 128)
    mse = YoloLoss(lambda_class=0, lambda_noobj=0, lambda_obj=1, lambda_box=0, obj_loss="mse")
    bce = YoloLoss(lambda_class=0, lambda_noobj=0, lambda_obj=1, lambda_box=0, obj_loss="bce")
    # At logit 0, BCE is log 2 whatever the IoU target: one per scale.
    zeroed = [o.detach().clone() for o in outs]
    for z in zeroed:
        z[..., 0] = 0
    torch.testing.assert_close(bce(zeroed, targets), torch.tensor(3 * math.log(2)))
    # Its gradient in the logit is (sigmoid - IoU) / count; MSE's is 2 (sigmoid - IoU) sigmoid' / count:
    # their ratio recovers sigmoid' exactly, so both use the same detached IoU.
    g_bce = torch.autograd.grad(bce(outs, targets), outs)
    g_mse = torch.autograd.grad(mse(outs, targets), outs)
    for gb, gm, o, t in zip(g_bce, g_mse, outs, targets):
        pos = t[..., 0] == 1
        assert (gb[..., 1:5] == 0).all()  # the IoU target is detached: no gradient into the box
        assert (gb[..., 0][~pos] == 0).all()
        sig = torch.sigmoid(o[..., 0][pos].detach())
        torch.testing.assert_close(gm[..., 0][pos], 2 * gb[..., 0][pos] * sig * (1 - sig))


@pytest.mark.parametrize("box_loss", ["giou", "diou", "ciou"])
def test_iou_box_losses_are_zero_for_a_perfect_box_and_positive_otherwise(box_loss):
    targets = build_targets(BOXES[:1], 1, 128)
    outs = [torch.zeros(1, 3, 128 // s, 128 // s, 25) for s in (32, 16, 8)]
    for o, t, anchors, s in zip(outs, targets, ANCHORS, (4, 8, 16)):
        b, a, i, j = (t[..., 0] == 1).nonzero()[0]
        o[b, a, i, j, 1:3] = torch.logit(t[b, a, i, j, 1:3])
        o[b, a, i, j, 3:5] = torch.log(t[b, a, i, j, 3:5] / (torch.tensor(anchors[a]) * s))
    loss = YoloLoss(lambda_class=0, lambda_noobj=0, lambda_obj=0, lambda_box=1, box_loss=box_loss)
    assert loss(outs, targets) < 1e-5
    shifted = [o.clone() for o in outs]
    for o in shifted:
        o[..., 3:5] += 0.5
    assert loss(shifted, targets) > 0.05


def test_the_config_chooses_the_variant():
    loss = YoloLoss.from_config(TrainConfig(obj_loss="bce", box_loss="ciou", lambda_noobj=3.0))
    assert (loss.obj_loss, loss.box_loss, loss.weights[2]) == ("bce", "ciou", 3.0)
    course = YoloLoss.from_config(TrainConfig(obj_loss="mse", box_loss="mse"))
    assert (course.obj_loss, course.box_loss) == ("mse", "mse")


@pytest.mark.parametrize("kwargs,name", [({"obj_loss": "focal"}, "obj_loss 'focal'"),
                                         ({"box_loss": "l1"}, "box_loss 'l1'")])
def test_an_unknown_variant_is_refused_in_one_line_naming_it_and_the_choices(kwargs, name):
    with pytest.raises(ValueError) as e:
        YoloLoss(**kwargs)
    message = str(e.value)
    assert "\n" not in message and name in message and "use one of" in message


def test_the_command_line_chooses_the_variant_and_defaults_to_the_presets():
    from helpers.train import command_line

    cfg, _ = command_line(["--obj-loss", "mse", "--box-loss", "giou"])
    assert (cfg.train.obj_loss, cfg.train.box_loss) == ("mse", "giou")
    for preset in ("default", "course"):
        cfg, _ = command_line(["--preset", preset])
        assert (cfg.train.obj_loss, cfg.train.box_loss) == (TrainConfig().obj_loss, TrainConfig().box_loss)


def test_course_loss_sets_every_loss_setting_to_the_courses_and_loss_flags_still_override():
    from helpers.config import COURSE_LOSS
    from helpers.train import command_line

    for preset in ("default", "course"):
        cfg, _ = command_line(["--preset", preset, "--course-loss"])
        assert {k: getattr(cfg.train, k) for k in COURSE_LOSS} == COURSE_LOSS
    cfg, _ = command_line(["--course-loss", "--lambda-noobj", "30"])
    assert (cfg.train.obj_loss, cfg.train.lambda_noobj) == ("mse", 30.0)


def test_the_command_line_refuses_an_unknown_variant_in_one_line(capsys):
    from helpers.train import command_line

    with pytest.raises(SystemExit):
        command_line(["--obj-loss", "focal"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--obj-loss" in error and "'focal'" in error and "'bce'" in error and "'mse'" in error


def _objectness_gradient_with_target_floor(floor: float) -> float:
    """d loss / d logit at a positive whose predicted box misses its target (IoU ~ 0), logit 0."""
    targets = build_targets(BOXES[:1], 1, 128)
    outs = [torch.zeros(1, 3, 128 // s, 128 // s, 25) for s in (32, 16, 8)]
    b, a, i, j = (targets[0][..., 0] == 1).nonzero()[0]
    outs[0][b, a, i, j, 3:5] = -8.0  # a box exp(-8) of its anchor: no overlap with the target
    outs = [o.requires_grad_() for o in outs]
    loss = YoloLoss(lambda_class=0, lambda_noobj=0, lambda_obj=1, lambda_box=0, obj_loss="bce",
                    obj_target_min=floor)(outs, targets)
    return float(torch.autograd.grad(loss, outs[0])[0][b, a, i, j, 0])


def test_an_objectness_target_floor_pulls_a_positive_up_whatever_its_box():
    # BCE's gradient is (sigmoid - target) / count: at logit 0 and IoU ~ 0 the IoU target pushes the
    # positive *down* (0.5 - 0), the floor of 1 pulls it up (0.5 - 1), the floor 0.5 leaves it there.
    iou, half, one = (_objectness_gradient_with_target_floor(f) for f in (0.0, 0.5, 1.0))
    assert iou > 0 and abs(half) < 1e-6 and one < 0
    torch.testing.assert_close(torch.tensor(one), torch.tensor(-iou))


def test_obj_balance_weights_each_scales_object_and_no_object_terms_only():
    outs, targets = outputs(), build_targets(BOXES, 2, 128)
    plain = YoloLoss(obj_loss="bce")
    per_scale = [YoloLoss(obj_loss="bce", obj_balance=tuple(float(k == s) for k in range(3))).parts(outs, targets)
                 for s in range(3)]
    whole = plain.parts(outs, targets)
    for term in ("obj", "noobj"):  # the three one-hot balances split the term into its scales
        torch.testing.assert_close(sum(getattr(p, term) for p in per_scale), getattr(whole, term))
    for term in ("box", "cls"):  # untouched by the balance
        for p in per_scale:
            torch.testing.assert_close(getattr(p, term), getattr(whole, term))
    doubled = YoloLoss(obj_loss="bce", obj_balance=(2.0, 2.0, 2.0)).parts(outs, targets)
    torch.testing.assert_close(doubled.noobj, 2 * whole.noobj)


@pytest.mark.parametrize("kwargs,name", [({"obj_target_min": 1.5}, "obj_target_min"),
                                         ({"obj_balance": (1.0, 1.0)}, "obj_balance")])
def test_an_objectness_setting_out_of_range_is_refused_naming_it(kwargs, name):
    with pytest.raises(ValueError, match=name):
        YoloLoss(**kwargs)


def test_the_default_loss_differs_from_the_courses_only_in_named_settings():
    from helpers.config import COURSE_LOSS

    default, course = YoloLoss.from_config(TrainConfig()), YoloLoss.from_config(TrainConfig(**COURSE_LOSS))
    outs, targets = outputs(), build_targets(BOXES, 2, 128)
    torch.testing.assert_close(course(outs, targets), YoloLoss()(outs, targets))  # the course's, exactly
    assert (default.obj_loss, default.obj_target_min) == ("bce", 1.0)
    assert default.weights[2] == 100.0
    torch.testing.assert_close(default.scale_weights[:, 2], torch.tensor([0.4, 1.0, 4.0]))
