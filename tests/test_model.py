"""The model: the course's architecture and parameter count, any multiple-of-32 input, course weights load."""
import pytest
import torch
from torch import nn

from helpers.config import ANCHORS, VOC_CLASSES
from helpers.model import YOLOv3, count_parameters, fuse_for_inference, load_course_state_dict


def test_full_model_has_the_course_parameter_count_without_its_three_dead_batchnorms():
    # The course's model counts 61,626,499: ours plus a BatchNorm it builds after each of the three
    # last 1x1 convs and never applies (3 x 150 parameters, never trained).
    assert count_parameters(YOLOv3(num_classes=20)) == 61_626_049


@pytest.mark.parametrize("hw", [(320, 320), (416, 416), (608, 608), (256, 384)])
def test_outputs_are_three_scales_coarse_to_fine_for_any_multiple_of_32(hw):
    model = YOLOv3(num_classes=5, width=0.125).eval()
    h, w = hw
    with torch.no_grad():
        outs = model(torch.rand(2, 3, h, w))
    assert [tuple(o.shape) for o in outs] == [
        (2, 3, h // s, w // s, 10) for s in (32, 16, 8)
    ]


def test_input_not_a_multiple_of_32_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="multiples of 32"):
        YOLOv3(num_classes=2, width=0.125)(torch.rand(1, 3, 100, 96))


def test_width_multiplier_makes_small_models():
    assert count_parameters(YOLOv3(num_classes=20, width=0.125)) < 1_500_000


def test_an_objectness_prior_sets_only_the_objectness_biases_to_its_logit():
    torch.manual_seed(0)
    plain = YOLOv3(num_classes=20, width=0.125)
    torch.manual_seed(0)
    primed = YOLOv3(num_classes=20, width=0.125, obj_prior=0.01)
    logit = torch.logit(torch.tensor(0.01)).item()
    differ = {k for k, v in primed.state_dict().items() if not torch.equal(v, plain.state_dict()[k])}
    assert differ and all(k.endswith("pred.1.conv.bias") for k in differ)  # the three heads' last convs
    for k in differ:
        per_anchor = primed.state_dict()[k].view(3, 25)
        assert torch.allclose(per_anchor[:, 0], torch.full((3,), logit))  # objectness: channel 0 of each anchor
        assert torch.equal(per_anchor[:, 1:], plain.state_dict()[k].view(3, 25)[:, 1:])


def test_a_new_model_with_a_prior_calls_almost_no_cell_an_object():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        plain = [torch.sigmoid(o[..., 0]).mean().item() for o in YOLOv3(20, 0.125).eval()(x)]
        primed = [torch.sigmoid(o[..., 0]).mean().item() for o in YOLOv3(20, 0.125, obj_prior=0.01).eval()(x)]
    assert all(0.3 < p < 0.7 for p in plain) and all(p < 0.05 for p in primed)  # 0.05: the course's threshold


@pytest.mark.parametrize("prior", [0.0, 1.0, -0.1, 2.0])
def test_an_objectness_prior_outside_0_1_is_refused(prior):
    with pytest.raises(ValueError, match="obj_prior .*: expected a probability strictly between 0 and 1"):
        YOLOv3(num_classes=20, width=0.125, obj_prior=prior)


def test_build_model_reads_the_prior_from_the_config():
    from helpers.config import ModelConfig
    from helpers.model import build_model

    model = build_model(ModelConfig(num_classes=3, width=0.125, obj_prior=0.2))
    bias = [m.pred[-1].conv.bias.view(3, 8)[:, 0] for m in model.modules() if hasattr(m, "pred")]
    assert len(bias) == 3 and all(torch.allclose(b, torch.logit(torch.tensor(0.2))) for b in bias)


def test_config_constants_match_the_course():
    assert len(VOC_CLASSES) == 20 and VOC_CLASSES[14] == "person"
    assert torch.tensor(ANCHORS).shape == (3, 3, 2)


# --- A course-layout model, to produce a course state_dict: its layer list (the spec below), its key
# names (`layers.{i}.conv`, `.bn`, residual `layers.{i}.layers.{r}.{0,1}`, head `layers.{i}.pred.{0,1}`),
# and the anchor-major [B, 3, 5+C, H, W] -> [B, 3, H, W, 5+C] output, as the course writes them.
class _CourseCNN(nn.Module):
    def __init__(self, cin, cout, bn_act=True, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=not bn_act, **kw)
        self.bn = nn.BatchNorm2d(cout)  # built even when unused, as the course does
        self.leaky = nn.LeakyReLU(0.1)
        self.bn_act = bn_act

    def forward(self, x):
        return self.leaky(self.bn(self.conv(x))) if self.bn_act else self.conv(x)


class _CourseResidual(nn.Module):
    def __init__(self, c, residual=True, repeats=1):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(_CourseCNN(c, c // 2, kernel_size=1), _CourseCNN(c // 2, c, kernel_size=3, padding=1))
            for _ in range(repeats))
        self.residual, self.repeats = residual, repeats

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x) if self.residual else layer(x)
        return x


class _CourseScale(nn.Module):
    def __init__(self, c, nc):
        super().__init__()
        self.pred = nn.Sequential(_CourseCNN(c, 2 * c, kernel_size=3, padding=1),
                                  _CourseCNN(2 * c, 3 * (nc + 5), bn_act=False, kernel_size=1))
        self.nc = nc

    def forward(self, x):
        return self.pred(x).reshape(x.shape[0], 3, self.nc + 5, x.shape[2], x.shape[3]).permute(0, 1, 3, 4, 2)


class _CourseYOLO(nn.Module):
    """Course module naming and order, channels divided by 4 to keep the test fast."""

    def __init__(self, nc=3, d=4):
        super().__init__()
        spec = [(32, 3, 1), (64, 3, 2), ["B", 1], (128, 3, 2), ["B", 2], (256, 3, 2), ["B", 8], (512, 3, 2),
                ["B", 8], (1024, 3, 2), ["B", 4], (512, 1, 1), (1024, 3, 1), "S", (256, 1, 1), "U",
                (256, 1, 1), (512, 3, 1), "S", (128, 1, 1), "U", (128, 1, 1), (256, 3, 1), "S"]
        self.layers, c = nn.ModuleList(), 3
        for s in spec:
            if isinstance(s, tuple):
                out = s[0] // d
                self.layers.append(_CourseCNN(c, out, kernel_size=s[1], stride=s[2], padding=1 if s[1] == 3 else 0))
                c = out
            elif isinstance(s, list):
                self.layers.append(_CourseResidual(c, repeats=s[1]))
            elif s == "S":
                self.layers += [_CourseResidual(c, residual=False), _CourseCNN(c, c // 2, kernel_size=1),
                                _CourseScale(c // 2, nc)]
                c //= 2
            else:
                self.layers.append(nn.Upsample(scale_factor=2))
                c *= 3

    def forward(self, x):
        outs, routes = [], []
        for layer in self.layers:
            if isinstance(layer, _CourseScale):
                outs.append(layer(x))
                continue
            x = layer(x)
            if isinstance(layer, _CourseResidual) and layer.repeats == 8:
                routes.append(x)
            elif isinstance(layer, nn.Upsample):
                x = torch.cat([x, routes.pop()], 1)
        return outs


def test_a_course_state_dict_loads_and_gives_identical_outputs():
    torch.manual_seed(0)
    course = _CourseYOLO(nc=3).eval()
    for m in course.modules():  # non-trivial BN statistics, so a misplaced BN would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    sd = course.state_dict()
    assert len(sd) == 453  # the course's entry count, dead BNs included
    ours = YOLOv3(num_classes=3, width=0.25).eval()
    load_course_state_dict(ours, sd)
    x = torch.rand(1, 3, 128, 96)
    with torch.no_grad():
        for a, b in zip(course(x), ours(x), strict=True):
            torch.testing.assert_close(a, b)


def test_loading_a_state_dict_with_missing_keys_fails_loudly():
    sd = YOLOv3(num_classes=3, width=0.125).state_dict()
    sd.pop("layers.0.conv.weight")
    with pytest.raises(RuntimeError, match="layers.0.conv.weight"):
        load_course_state_dict(YOLOv3(num_classes=3, width=0.125), sd)


def test_the_fused_inference_copy_gives_the_same_outputs_and_leaves_the_original_alone():
    torch.manual_seed(0)
    model = YOLOv3(num_classes=4, width=0.125)
    model.train()
    model(torch.rand(4, 3, 64, 64))  # non-trivial running statistics
    model.eval()
    x = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        expected = model(x)
        fused = fuse_for_inference(model)
        for a, b in zip(expected, fused(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())


def test_the_model_names_its_route_plan_as_the_course_wires_it():
    # The course's layer list: heads at 15, 22, 29; upsamples at 17, 24 joining the 8-block stages at 6 and 8.
    plan = YOLOv3(num_classes=20, width=0.125).plan
    assert plan.predictions == (15, 22, 29)
    assert plan.routes == (6, 8) and plan.joins == (17, 24)
    assert plan.pending[5] == () and plan.pending[8] == (6, 8) and plan.pending[17] == (6,)
    assert plan.pending[24] == () and [plan.scales_before(i) for i in (-1, 14, 15, 22, 29)] == [0, 0, 1, 2, 3]


def test_running_the_layers_from_any_step_with_its_pending_routes_gives_the_forward_outputs():
    torch.manual_seed(0)
    model = YOLOv3(num_classes=3, width=0.125).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        full = model(x)
        states = {}
        model.run_layers(x, keep=range(len(model.layers)), states=states)
        for start in (7, 16, 20):
            routes = [states[i] for i in model.plan.pending[start]]
            part = model.run_layers(states[start], start, routes=routes)
            first = model.plan.scales_before(start)
            assert sorted(part) == list(range(first, 3))
            for s, out in part.items():
                torch.testing.assert_close(out, full[s])
