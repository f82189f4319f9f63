"""Class activation maps for single YOLO detections, on pytorch-grad-cam.

A detection is one (scale, anchor, cell, class) of the raw output, and its score is a differentiable
scalar, so Grad-CAM applies as it does to a classifier: flatten the three outputs into one
[B, N, 5+C] tensor (N = sum of 3*S_h*S_w; row order scale, anchor, row, column, the same as
`helpers.postprocess.decode`), and let a target pick one row's score. `DetectionTarget` scores a row
as log(sigmoid(obj) * softmax(class logits)[c]), the log of the score `detect` ranks by: its
gradient is the score's divided by the score, a positive factor that Grad-CAM's normalisation
removes, so the map is the score's own Grad-CAM, without the vanishing gradients of a saturated
sigmoid.

Which layer. By default a detection's target layer is the last feature map of its scale
(`prediction_features(model)[scale]`, the output of the 3x3 conv block of that scale's prediction
head): only the 1x1 prediction conv separates it from the score, so its Grad-CAM is the score's own
map over the image, as CAM is for a classifier. `target_layers="head_inputs"` takes the feature
map entering the head instead (`YOLOv3.head_inputs`); any module of the model can be given. The
default keeps the most of a map inside its detected box (benchmarks/RESULTS.md, "Grad-CAM: which
layer"): a 3x3 conv, BatchNorm and LeakyReLU between layer and score blur what the channel weights
mean.

Speed. The network runs once without gradients, keeping the activations the rest needs (the
output of the step of `model.layers` just before the target layer's step, and the backbone
routes). pytorch-grad-cam then runs on a wrapper whose forward starts from that cached activation,
repeated once per detection (one target per batch row; one forward and one backward for all of
them), through the model's own modules, so the library's hooks, channel weights, ReLU,
normalisation and resize work as usual. For the default layer the wrapper runs only the scale's
prediction head: K detections cost about one forward pass plus K small head passes, instead of K
forward and backward passes of the whole network. The maps equal those of the plain library path
(the whole flattened model, `FlatOutputs`, on the image repeated K times; tested).

Nothing of the model changes: its parameters are frozen for the duration (the gradients flow to
the feature map only, never into `.grad`), existing `.grad` tensors are put back, and every
module's train/eval flag is restored (pytorch-grad-cam switches the model to eval).
EigenCAM is the gradient-free, class-agnostic alternative: the first principal component of the
same feature map (one map per scale, shared by that scale's detections).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
from torch import nn

from .boxes import Letterbox, as_hw, grid_shapes
from .config import ANCHORS, STRIDES
from .model import YOLOv3
from .targets import assign_anchors

SCORES = ("log", "prob", "against")


# --- flat indices -----------------------------------------------------------------------------
def flatten_outputs(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """3 x [B, 3, S_h, S_w, 5+C] -> [B, N, 5+C], rows ordered scale, anchor, row, column."""
    b = outputs[0].shape[0]
    return torch.cat([o.reshape(b, -1, o.shape[-1]) for o in outputs], dim=1)


class FlatOutputs(nn.Module):
    """The model with its three outputs flattened to one [B, N, 5+C] tensor (for pytorch-grad-cam)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flatten_outputs(self.model(x))


def _grids(shapes) -> torch.Tensor:
    """[scales, 3] (anchors, S_h, S_w) from the outputs or from (S_h, S_w) pairs (3 anchors each)."""
    rows = [(o.shape[1], o.shape[2], o.shape[3]) if isinstance(o, torch.Tensor) else (3, *o) for o in shapes]
    return torch.tensor(rows, dtype=torch.long)


def unravel_index(flat: torch.Tensor, shapes) -> torch.Tensor:
    """Flat row indices [K] -> [K, 4] long (scale, anchor, row, column).

    shapes: the raw outputs, or their (S_h, S_w) per scale.
    """
    g = _grids(shapes)
    counts = g.prod(dim=1)
    starts = torch.cumsum(counts, 0) - counts
    flat = torch.as_tensor(flat, dtype=torch.long).reshape(-1)
    if flat.numel() and (flat.min() < 0 or flat.max() >= counts.sum()):
        raise ValueError(f"cam: flat index out of range 0..{int(counts.sum()) - 1}")
    scale = torch.bucketize(flat, starts, right=True) - 1
    rem = flat - starts[scale]
    cells = g[scale, 1] * g[scale, 2]
    return torch.stack((scale, rem // cells, (rem % cells) // g[scale, 2], rem % g[scale, 2]), dim=1)


def ravel_index(where: torch.Tensor, shapes) -> torch.Tensor:
    """[K, 4] (scale, anchor, row, column) -> flat row indices [K] (inverse of `unravel_index`)."""
    g = _grids(shapes)
    counts = g.prod(dim=1)
    starts = torch.cumsum(counts, 0) - counts
    s, a, i, j = torch.as_tensor(where, dtype=torch.long).reshape(-1, 4).unbind(1)
    return starts[s] + (a * g[s, 1] + i) * g[s, 2] + j


def locate_detections(outputs: Sequence[torch.Tensor], detections: torch.Tensor, image_size, *,
                      score: str = "obj*cls", anchors=ANCHORS) -> torch.Tensor:
    """The flat row index of each detection among the raw outputs of its image, for detections that
    came without them (`detect(..., return_indices=True)` hands them out directly: prefer that).

    outputs: the raw outputs of one image (batch 1); detections: [K,6] as `detect` returned them for
    it, in input pixels (no letterbox: undoing it and clipping to the original image loses which row
    a box clipped at the image's edge came from); score: the `detect` score used. Every detection is
    one decoded anchor, clipped to the input: the row whose clipped box, score and class match it
    best (exactly, up to rounding) is its own. Returns a long tensor [K].
    """
    from .postprocess import decode

    dets = torch.as_tensor(detections).detach().float().reshape(-1, 6).cpu()
    if outputs[0].shape[0] != 1:
        raise ValueError(f"cam: locate_detections takes the outputs of one image, got batch {outputs[0].shape[0]}")
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    dec = decode([o.detach().cpu() for o in outputs], anchors, image_size=(h, w))[0]  # [A, 5+C]
    limit = torch.tensor([w, h, w, h], dtype=torch.float32)
    boxes = torch.minimum(dec[:, :4].clamp(min=0), limit)
    cls = dets[:, 5].long()
    obj = dec[:, 4][None, :]
    scores = obj * dec[:, 5:].T[cls] if score == "obj*cls" else obj.expand(len(dets), -1)  # [K, A]
    cost = (boxes[None] - dets[:, None, :4]).abs().sum(-1) / max(h, w) + (scores - dets[:, 4:5]).abs()
    return cost.argmin(dim=1)


def assigned_index(boxes: torch.Tensor, image_size, anchors=ANCHORS) -> torch.Tensor:
    """For ground-truth boxes [K,4] x1y1x2y2 in input pixels (of one image), the flat row training
    assigns each (the explanation of a missed object): `helpers.targets.assign_anchors` on these
    boxes, as `build_targets` runs it, gives each box a positive on up to one anchor per scale; of
    those, the one whose shape fits the box best. A box with no positive (all its slots taken by
    boxes listed before it, or no area) gets its best-fitting anchor of all. Returns long [K].
    """
    h, w = as_hw(image_size)
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).cpu()
    k = len(b)
    grids = grid_shapes((h, w))
    normalised = torch.stack(((b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                              (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h), dim=1)
    a = assign_anchors(torch.cat((torch.zeros(k, 2), normalised), dim=1), grids, anchors)
    n_scales, n_anchors = a.shape_iou.shape[1:]
    fit = a.shape_iou.gather(2, a.anchor.clamp(min=0)[..., None])[..., 0]  # [K, S] IoU of each positive
    fit = torch.where(a.anchor >= 0, fit, -1.0)
    scale = fit.argmax(dim=1)
    anchor = a.anchor[torch.arange(k), scale]
    best_of_all = a.shape_iou.reshape(k, n_scales * n_anchors).argmax(dim=1)
    none = anchor < 0
    scale = torch.where(none, best_of_all // n_anchors, scale)
    anchor = torch.where(none, best_of_all % n_anchors, anchor)
    where = torch.stack((scale, anchor, a.row[torch.arange(k), scale], a.col[torch.arange(k), scale]), dim=1)
    return ravel_index(where, grids)


# --- the target -------------------------------------------------------------------------------
class DetectionTarget:
    """pytorch-grad-cam target: the score of row `index`, class `cls`, of one image's flat output [N, 5+C].

    score "log": log(sigmoid(obj) * softmax(class)[cls]) (default; see the module docstring);
    "prob": sigmoid(obj) * softmax(class)[cls] itself (the same Grad-CAM map, a different Grad-CAM++);
    "against": -log score, the counterfactual map of the Grad-CAM paper (Selvaraju et al., 2017):
    where the features lowered the score. For a missed object the plain map is usually empty (the
    score has no positive evidence, and Grad-CAM's ReLU zeroes the rest); this one shows what held
    it down.
    """

    def __init__(self, index: int, cls: int, score: str = "log"):
        if score not in SCORES:
            raise ValueError(f"cam: score must be one of {SCORES}, got {score!r}")
        self.index, self.cls, self.score = int(index), int(cls), score

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        row = output[..., self.index, :]
        log_score = F.logsigmoid(row[..., 0]) + F.log_softmax(row[..., 5:], dim=-1)[..., self.cls]
        if self.score == "against":
            return -log_score
        return log_score if self.score == "log" else log_score.exp()

    def __repr__(self) -> str:
        return f"DetectionTarget(index={self.index}, cls={self.cls}, score={self.score!r})"


# --- one pass without gradients, then the tail with them --------------------------------------
def prediction_features(model: YOLOv3) -> list[nn.Module]:
    """Per scale, coarse to fine, the last feature map's module (`YOLOv3.prediction_features`): the
    default Grad-CAM layer (see `detection_cams`)."""
    return model.prediction_features


TARGET_LAYER_CHOICES = {"prediction": prediction_features, "head_inputs": lambda m: list(m.head_inputs)}


def _ancestor(model: YOLOv3, module: nn.Module) -> int:
    """Index of the step of `model.layers` that is or contains `module`."""
    for i, layer in enumerate(model.layers):
        if layer is module or any(sub is module for sub in layer.modules()):
            return i
    raise ValueError(f"cam: target layer {type(module).__name__} is not a module of this model's layers")


@dataclass
class Capture:
    """One forward pass of one image without gradients: the raw outputs and the activations a
    CAM needs (the outputs of the steps of `model.layers` just before each target layer's step, and
    every route), plus the input itself."""
    image: torch.Tensor
    outputs: list[torch.Tensor]
    states: dict[int, torch.Tensor] = field(default_factory=dict)


def _starts(model: YOLOv3, layers: Sequence[nn.Module]) -> set[int]:
    return {_ancestor(model, m) - 1 for m in layers}


def capture(model: YOLOv3, image: torch.Tensor, target_layers: Sequence[nn.Module] | None = None) -> Capture:
    """Run the model once on one image ([3,H,W] or [1,3,H,W]) without gradients, keeping what the CAMs of
    the default layers (both choices) and of `target_layers` start from. Modes untouched (eval inside)."""
    x = _one_image(image).to(_device(model))
    layers = prediction_features(model) + list(model.head_inputs) + list(target_layers or [])
    keep = set(model.plan.routes) | _starts(model, layers)
    states: dict[int, torch.Tensor] = {}
    with _untouched(model), torch.no_grad():
        model.eval()
        outputs = model.run_layers(x, keep=keep, states=states)
    return Capture(x, [outputs[s] for s in range(len(model.plan.predictions))], states)


class _Tail(nn.Module):
    """The model from step `start + 1` to step `stop`: forward(x [K, ...] = K copies of the output of
    step `start`, or of the image if start is -1) -> flat output [K, N, 5+C].

    The routes it needs come from the capture; scales it does not compute are the captured outputs
    (constants: a target only ever selects a row of a scale the tail computes, see detection_cams).
    The model's own modules run inside, so pytorch-grad-cam's hooks on them fire as usual."""

    def __init__(self, model: YOLOv3, cap: Capture, start: int, stop: int):
        super().__init__()
        self.model, self.cap, self.start, self.stop = model, cap, start, stop

    def start_input(self, copies: int) -> torch.Tensor:
        first = self.cap.image if self.start < 0 else self.cap.states[self.start]
        return first.expand(copies, *first.shape[1:]).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[0]
        routes = [self.cap.states[i].expand(k, -1, -1, -1) for i in self.model.plan.pending[self.start]] \
            if self.start >= 0 else []
        outputs = self.model.run_layers(x, self.start, self.stop, routes)
        full = [outputs.get(s, o.expand(k, *o.shape[1:])) for s, o in enumerate(self.cap.outputs)]
        return flatten_outputs(full)


class SignedEigenCAM(EigenCAM):
    """EigenCAM (pytorch-grad-cam's), with two changes to its projection (`get_2d_projection`):
    - the principal component's sign is fixed: the SVD's sign is arbitrary, and a map pointing the
      wrong way is zeroed by the ReLU; the sign chosen makes the map correlate positively with the
      mean activation (where the features fire);
    - a thin SVD (`full_matrices=False`): the library's full one builds an (h*w)^2 matrix it never
      uses, seconds for a 52x52 map on a CPU where the thin one takes tens of milliseconds
      (benchmarks/RESULTS.md). Same component.
    """

    def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):
        acts = np.nan_to_num(np.asarray(activations, np.float32))  # [B, C, h, w]
        b, c, h, w = acts.shape
        flat = acts.reshape(b, c, h * w).transpose(0, 2, 1)  # [B, hw, C]
        flat = flat - flat.mean(axis=1, keepdims=True)
        _, _, vt = np.linalg.svd(flat, full_matrices=False)
        proj = np.einsum("bnc,bc->bn", flat, vt[:, 0, :])  # [B, hw]
        energy = acts.mean(axis=1).reshape(b, h * w)
        sign = np.sign(((proj - proj.mean(1, keepdims=True)) * energy).sum(1))
        return (proj * np.where(sign == 0, 1.0, sign)[:, None]).reshape(b, h, w).astype(np.float32)


METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": SignedEigenCAM}


# --- model hygiene ----------------------------------------------------------------------------
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _one_image(image: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(image)
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError(f"cam: the image must be one [3,H,W] or [1,3,H,W] tensor, got {tuple(x.shape)}")
    if x.shape[-1] % STRIDES[0] or x.shape[-2] % STRIDES[0]:
        raise ValueError(f"cam: image height and width must be multiples of {STRIDES[0]}, got {tuple(x.shape[-2:])}")
    return x.float().clone()  # a normal tensor even if it was made under inference_mode


@contextlib.contextmanager
def _untouched(model: nn.Module):
    """Freeze the parameters and put back their flags, their .grad and every module's train/eval mode."""
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    for p, _, _ in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag, grad in params:
            p.requires_grad_(flag)
            p.grad = grad


# --- the maps ---------------------------------------------------------------------------------
def detection_cams(
    model: YOLOv3,
    image: torch.Tensor,
    detections: torch.Tensor | None = None,
    *,
    indices: torch.Tensor | None = None,
    classes: torch.Tensor | None = None,
    method: str = "gradcam",
    target_layers: str | Sequence[nn.Module] | nn.Module = "prediction",
    score: str = "log",
    cache: Capture | None = None,
) -> np.ndarray:
    """One CAM per detection of one image, over the model's input.

    model: a `YOLOv3` (also BN-folded by `fuse_for_inference`).
    image: the model input, [3,H,W] or [1,3,H,W] (H, W multiples of 32).
    detections: [K,6] x1, y1, x2, y2, score, class in input pixels, as `detect` returns them
        without letterbox; their rows in the raw output are found with `locate_detections`.
    indices, classes: [K] flat rows (see `flatten_outputs`) and classes, instead of detections or to
        skip locating them.
    method: "gradcam", "gradcam++" or "eigencam" (gradient-free, class-agnostic).
    target_layers: per detection, a layer of the scale it sits on:
        "prediction" (default) the last feature map of that scale (`prediction_features`: only the
        1x1 prediction conv lies between it and the score, so Grad-CAM there is the score's own
        map over the image, as CAM is for a classifier; see the module docstring for how much more
        of its mass lands in the box than with "head_inputs"),
        "head_inputs": the feature map entering the scale's head (`YOLOv3.head_inputs`);
        or modules of the model used for every detection (several: averaged, as pytorch-grad-cam does).
    score: what the target differentiates, see `DetectionTarget`.
    cache: a `capture` of this image (reuses its forward pass, e.g. the one that found the detections).
    Returns float32 [K, H, W] in 0..1 (each map scaled to max 1, as pytorch-grad-cam scales them; an
    all-zero map means the score does not depend on the layer).
    """
    if method not in METHODS:
        raise ValueError(f"cam: method must be one of {sorted(METHODS)}, got {method!r}")
    if isinstance(target_layers, str) and target_layers not in TARGET_LAYER_CHOICES:
        raise ValueError(f"cam: target_layers must be one of {sorted(TARGET_LAYER_CHOICES)} or modules, "
                         f"got {target_layers!r}")
    x = _one_image(image)
    height, width = x.shape[-2:]
    if isinstance(target_layers, nn.Module):
        target_layers = [target_layers]
    if indices is None and detections is None:
        raise ValueError("cam: pass detections [K,6], or indices and classes")
    if indices is not None and classes is None and detections is None:
        raise ValueError("cam: indices need their classes (or the detections)")
    if detections is not None:
        detections = torch.as_tensor(detections).detach().cpu().float().reshape(-1, 6)
    per_scale = None if not isinstance(target_layers, str) else TARGET_LAYER_CHOICES[target_layers](model)
    layers_used = per_scale if per_scale is not None else list(target_layers)
    cap = cache
    if cap is None or any(i >= 0 and i not in cap.states for i in _starts(model, layers_used)):
        cap = capture(model, x, layers_used)
    if indices is None:
        indices = locate_detections([o.cpu() for o in cap.outputs], detections, (height, width))
    indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
    classes = (detections[:, 5] if classes is None else torch.as_tensor(classes)).long().reshape(-1).cpu()
    if len(classes) != len(indices):
        raise ValueError(f"cam: {len(indices)} indices but {len(classes)} classes")
    k = len(indices)
    cams = np.zeros((k, height, width), np.float32)
    if k == 0:
        return cams
    scales = unravel_index(indices, cap.outputs)[:, 0]

    if per_scale is not None:  # one group per scale, each with that scale's layer
        groups = [(torch.nonzero(scales == s).flatten(), [per_scale[s]], model.plan.predictions[s])
                  for s in scales.unique().tolist()]
    else:
        groups = [(torch.arange(k), list(layers_used), max(model.plan.predictions[s] for s in scales.tolist()))]
    order = {id(m): n for n, m in enumerate(model.modules())}
    gradient_free = method == "eigencam"
    with _untouched(model), torch.inference_mode(False), torch.enable_grad():
        for members, layers, stop in groups:
            # pytorch-grad-cam pairs activations with layers in execution order.
            layers = sorted(layers, key=lambda m: order[id(m)])
            steps = [_ancestor(model, m) for m in layers]
            n = 1 if gradient_free else len(members)  # EigenCAM is class-agnostic: one map per group
            tail = _Tail(model, cap, min(steps) - 1, max(steps) if gradient_free else max(stop, max(steps)))
            start = tail.start_input(n).requires_grad_(not gradient_free)  # params are frozen: grads go here
            targets = [DetectionTarget(int(indices[m]), int(classes[m]), score) for m in members[:n].tolist()]
            maps = _library_cams(METHODS[method], tail, layers, start, targets, (width, height))
            cams[members.numpy()] = maps if n == len(members) else np.repeat(maps, len(members), axis=0)
    return cams


def _library_cams(cam_class, model: nn.Module, layers, input_tensor, targets, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam on (model, layers), its maps resized to `size` (W, H), the image's, rather
    than to the input tensor's (the tail's input may be a feature map)."""
    cam = cam_class(model=model, target_layers=layers)
    cam.get_target_width_height = lambda _tensor: size
    try:
        return cam(input_tensor=input_tensor, targets=targets).astype(np.float32)
    finally:
        cam.activations_and_grads.release()


def cam_to_original(cam: np.ndarray, letterbox: Letterbox) -> np.ndarray:
    """Maps over the letterboxed input ([H,W] or [K,H,W]) -> maps over the original image ([h,w] or [K,h,w]).

    letterbox: the `boxes.Letterbox` from the original image to the input (the datasets' `return_meta`
    carries it): the padding is cut off and the rest resized (bilinear) to the original size.
    """
    if not isinstance(letterbox, Letterbox):
        raise ValueError(f"cam_to_original: the letterbox must be a helpers.boxes.Letterbox, got "
                         f"{type(letterbox).__name__}")
    arr = np.asarray(cam, np.float32)
    single = arr.ndim == 2
    maps = torch.from_numpy(arr[None] if single else arr)
    if maps.dim() != 3:
        raise ValueError(f"cam_to_original: maps must be [H,W] or [K,H,W], got {arr.shape}")
    left, top, h, w = letterbox.pad_left, letterbox.pad_top, letterbox.orig_h, letterbox.orig_w
    rows, cols = letterbox.content_hw
    bottom, right = min(maps.shape[1], top + rows), min(maps.shape[2], left + cols)
    crop = maps[:, top:bottom, left:right]
    out = F.interpolate(crop[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    out = out.clamp_(0.0, 1.0).numpy()
    return out[0] if single else out


def detect_and_explain(model: YOLOv3, image: torch.Tensor, conf_threshold: float = 0.25,
                       iou_threshold: float = 0.45, top_k: int = 5, method: str = "gradcam",
                       letterbox: Letterbox | None = None, min_detections: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Detections of one image and a CAM for each of the top k, from a single forward pass.

    image: the (letterboxed) input [3,H,W]. Returns (detections [K,6] x1, y1, x2, y2, score, class,
    cams float32 [K, H, W]); with a `letterbox` both are mapped back to the original image.
    min_detections: if fewer pass the threshold, take the best ones anyway (benchmarks, demos).
    """
    from .postprocess import detect

    x = _one_image(image)
    size = tuple(x.shape[-2:])
    cap = capture(model, x)
    outputs = [o.cpu() for o in cap.outputs]
    (dets,), (rows,) = detect(outputs, size, conf_threshold, iou_threshold, max_detections=top_k,
                              return_indices=True)
    if len(dets) < min(min_detections, top_k):
        (dets,), (rows,) = detect(outputs, size, 0.0, iou_threshold, max_detections=max(top_k, min_detections),
                                  return_indices=True)
    dets, rows = dets[:top_k], rows[:top_k]
    cams = detection_cams(model, x, indices=rows, classes=dets[:, 5], method=method, cache=cap)
    if letterbox is None:
        return dets, cams
    dets = torch.cat((letterbox.to_original(dets[:, :4]), dets[:, 4:]), dim=1)
    return dets, cam_to_original(cams, letterbox)
