"""YOLOv3: the course's Darknet-53 backbone and three-scale head.

Module names mirror the course's (`layers.{i}...`), so a `state_dict` saved by the course code
loads with `load_course_state_dict`, which only drops the BatchNorms the course builds in front of
its last 1x1 convs but never applies. Without them the model has 61,626,049 parameters at 20
classes (the course counts 61,626,499: the same network plus those 3 x 150 dead parameters).

Output of `forward(x [B,3,H,W])`, H and W multiples of 32: a list of 3 raw tensors, coarse to fine,
`[B, 3, H/32, W/32, 5+C]`, `[B, 3, H/16, W/16, 5+C]`, `[B, 3, H/8, W/8, 5+C]`, last axis
`[obj, x, y, w, h, class logits...]` (logits, not probabilities).
"""
from __future__ import annotations

import bisect
import copy
import math
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .config import STRIDES, check_probability

# The course's layer list. (channels, kernel, stride) is a conv block; ("B", n) a residual block of
# n repeats; "S" a scale head (3 modules: residual without skip, 1x1 conv, prediction); "U" a 2x
# upsample concatenated with the route saved after the matching 8-repeat residual block.
DARKNET53_YOLOV3 = (
    (32, 3, 1), (64, 3, 2), ("B", 1), (128, 3, 2), ("B", 2), (256, 3, 2), ("B", 8),
    (512, 3, 2), ("B", 8), (1024, 3, 2), ("B", 4),
    (512, 1, 1), (1024, 3, 1), "S",
    (256, 1, 1), "U", (256, 1, 1), (512, 3, 1), "S",
    (128, 1, 1), "U", (128, 1, 1), (256, 3, 1), "S",
)


class ConvBlock(nn.Module):
    """conv (k, stride s, 'same' padding for k=3) + BatchNorm + LeakyReLU(0.1)."""

    def __init__(self, c_in: int, c_out: int, k: int, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class PlainConv(nn.Module):
    """The head's last 1x1 conv: bias, no norm, no activation (named `.conv` like the course's)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ResidualBlock(nn.Module):
    """n repeats of [1x1 to c/2, 3x3 back to c], each with a skip unless `skip=False`."""

    def __init__(self, c: int, repeats: int, skip: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(ConvBlock(c, c // 2, 1), ConvBlock(c // 2, c, 3)) for _ in range(repeats)
        )
        self.skip = skip
        self.repeats = repeats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x) if self.skip else layer(x)
        return x


class ScalePrediction(nn.Module):
    """3x3 conv to 2c, then 1x1 conv to 3*(5+C); reshaped to [B, 3, H, W, 5+C] (anchor-major).

    obj_prior: start every cell's sigmoid(objectness) near this probability (its bias set to the
    logit; RetinaNet's prior initialisation), so that training does not begin with every empty cell
    called an object; None leaves PyTorch's initialisation (the course's)."""

    def __init__(self, c: int, num_classes: int, obj_prior: float | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.pred = nn.Sequential(ConvBlock(c, 2 * c, 3), PlainConv(2 * c, 3 * (num_classes + 5)))
        if check_probability("obj_prior", obj_prior) is not None:
            with torch.no_grad():  # channel k of anchor a is a * (5 + C) + k; objectness is k = 0
                self.pred[-1].conv.bias.view(3, num_classes + 5)[:, 0] = math.log(obj_prior / (1 - obj_prior))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return self.pred(x).view(b, 3, self.num_classes + 5, h, w).permute(0, 1, 3, 4, 2)


class Upsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


def is_route(layer: nn.Module) -> bool:
    """A backbone stage whose output the head concatenates back after an upsample (the 8-block
    residual stages at strides 8 and 16)."""
    return isinstance(layer, ResidualBlock) and layer.repeats == 8


@dataclass(frozen=True)
class RoutePlan:
    """The wiring of `YOLOv3.layers`, as step indices: what `run_layers` follows, and what a caller
    that runs part of the network (Grad-CAM, `helpers.cam`) needs to know.

    predictions: the `ScalePrediction` steps, coarse to fine (their outputs are the model's outputs);
    routes: the steps whose output is saved for a later join (see `is_route`);
    joins: the `Upsample` steps, each concatenating the last saved route not yet joined;
    pending: per step, the routes saved and not yet joined once that step has run.
    """

    predictions: tuple[int, ...]
    routes: tuple[int, ...]
    joins: tuple[int, ...]
    pending: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, layers: Sequence[nn.Module]) -> RoutePlan:
        predictions, routes, joins, pending, stack = [], [], [], [], []
        for i, layer in enumerate(layers):
            if isinstance(layer, ScalePrediction):
                predictions.append(i)
            elif is_route(layer):
                routes.append(i)
                stack.append(i)
            elif isinstance(layer, Upsample):
                joins.append(i)
                stack.pop()
            pending.append(tuple(stack))
        return cls(tuple(predictions), tuple(routes), tuple(joins), tuple(pending))

    def scales_before(self, step: int) -> int:
        """How many scales steps 0 .. step predict (the scale index of the next prediction)."""
        return bisect.bisect_right(self.predictions, step)


def _scaled(c: int, width: float) -> int:
    """Channels at a width multiplier: a multiple of 8, at least 8 (1.0 leaves them as they are)."""
    return c if width == 1.0 else max(8, int(round(c * width / 8)) * 8)


class YOLOv3(nn.Module):
    def __init__(self, num_classes: int = 20, width: float = 1.0, in_channels: int = 3,
                 obj_prior: float | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.width = width
        self.layers = nn.ModuleList()
        c = in_channels
        for spec in DARKNET53_YOLOV3:
            if isinstance(spec, tuple) and spec[0] == "B":
                self.layers.append(ResidualBlock(c, spec[1]))
            elif isinstance(spec, tuple):
                out, k, s = spec
                out = _scaled(out, width)
                self.layers.append(ConvBlock(c, out, k, s))
                c = out
            elif spec == "S":
                self.layers.append(ResidualBlock(c, 1, skip=False))
                self.layers.append(ConvBlock(c, c // 2, 1))
                self.layers.append(ScalePrediction(c // 2, num_classes, obj_prior))
                c = c // 2
            elif spec == "U":
                self.layers.append(Upsample())
                c = c * 3  # upsampled c, concatenated with the 2c route of the backbone
        self.plan = RoutePlan.of(self.layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[-1] % STRIDES[0] or x.shape[-2] % STRIDES[0]:
            raise ValueError(f"input height and width must be multiples of {STRIDES[0]}, got {tuple(x.shape[-2:])}")
        outputs = self.run_layers(x)
        return [outputs[s] for s in range(len(outputs))]

    def run_layers(self, x: torch.Tensor, start: int = -1, stop: int | None = None,
                   routes: list[torch.Tensor] | None = None, keep: Container[int] = (),
                   states: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """Steps start+1 .. stop of `self.layers` (all of them by default) on x, the output of step
        `start` (the image for -1), as `forward` runs them; a part of the network for Grad-CAM.

        routes: the outputs of the steps `self.plan.pending[start]`, in that order (consumed).
        The outputs of the steps in `keep` are stored in `states`.
        Returns the predictions made, {scale index (0 = coarse): [B, 3, S_h, S_w, 5+C]}.
        """
        plan = self.plan
        stop = len(self.layers) - 1 if stop is None else stop
        routes = [] if routes is None else routes
        scale = plan.scales_before(start)
        outputs = {}
        for i in range(start + 1, stop + 1):
            layer = self.layers[i]
            if i in plan.predictions:
                outputs[scale] = layer(x)
                scale += 1
                continue
            x = layer(x)
            if i in plan.routes:
                routes.append(x)
            elif i in plan.joins:
                x = torch.cat([x, routes.pop()], dim=1)
            if i in keep:
                states[i] = x
        return outputs

    @property
    def head_inputs(self) -> list[nn.Module]:
        """The module whose output feeds each scale's prediction, coarse to fine (Grad-CAM's layers)."""
        return [self.layers[i - 1] for i in self.plan.predictions]

    @property
    def prediction_features(self) -> list[nn.Module]:
        """Per scale, coarse to fine, the module whose output is the last feature map of that scale:
        the 3x3 conv block inside its prediction head, which only the 1x1 prediction conv separates
        from the raw output (Grad-CAM's default layers)."""
        return [self.layers[i].pred[0] for i in self.plan.predictions]


# The course builds a BatchNorm in front of each head's last conv and never applies it.
_COURSE_DEAD_BN = ".pred.1.bn."


def load_course_state_dict(model: YOLOv3, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load weights saved by the course code (its `model.state_dict()`): strict, except the dead BNs."""
    kept = {k: v for k, v in state_dict.items() if _COURSE_DEAD_BN not in k}
    model.load_state_dict(kept, strict=True)


def fuse_for_inference(model: YOLOv3) -> YOLOv3:
    """An eval-only copy with each BatchNorm folded into its conv, in channels-last memory layout.

    Same outputs (to float rounding), less CPU time per forward (benchmarks/RESULTS.md, "Core").
    Not for training: the folded copy has no BatchNorm statistics left to update.
    """
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, ConvBlock) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = nn.Identity()
    return fused.to(memory_format=torch.channels_last)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(cfg) -> YOLOv3:
    """From a `helpers.config.ModelConfig`."""
    return YOLOv3(num_classes=cfg.num_classes, width=cfg.width, obj_prior=cfg.obj_prior)
