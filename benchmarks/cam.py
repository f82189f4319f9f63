"""CPU time of Grad-CAM for the top 5 detections of a 416 image with the full model, next to one forward pass.

    python -m benchmarks.cam [--repeats 5] [--size 416]

Goal: Grad-CAM for 5 detections <= 3x one forward pass. `helpers.cam` runs the network
once without gradients (`capture`, which is also the forward pass that finds the detections), then
pytorch-grad-cam on each scale's prediction head only, one batch row per detection. For comparison
the script also times the plain library path: the whole flattened model (`FlatOutputs`) with the
image repeated 5 times, one forward and one backward through everything.

The model is the full-size YOLOv3 (width 1.0) with random weights (the cost does not depend on
them); the image is a real photo from ../shared/realdet when present, else the app's first sample.
"""
from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import albumentations as A
import torch
from pytorch_grad_cam import GradCAM

from benchmarks.timing import timed
from helpers.cam import (
    DetectionTarget,
    FlatOutputs,
    capture,
    detection_cams,
    prediction_features,
    unravel_index,
)
from helpers.imageio import read_image
from helpers.model import YOLOv3
from helpers.postprocess import detect
from helpers.transforms import letterbox

ROOT = Path(__file__).resolve().parents[1]
REALDET = ROOT.parent / "shared" / "realdet" / "VOCdevkit"


def photo() -> Path:
    found = sorted(REALDET.rglob("JPEGImages/*.jpg"))[:1] if REALDET.is_dir() else []
    return found[0] if found else sorted((ROOT / "app" / "examples").glob("*.jpg"))[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=416)
    p.add_argument("--top", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    model = YOLOv3(num_classes=20, width=1.0).eval()
    path = photo()
    image = A.Compose(letterbox(args.size))(image=read_image(path))["image"]
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None].contiguous()

    with torch.no_grad():
        t_forward = timed(lambda: model(x), args.repeats)
    cap = capture(model, x)
    # An untrained model's scores sit near 0.025 everywhere: take the best k whatever their score.
    (dets,), (rows,) = detect(cap.outputs, args.size, 0.0, 0.45, max_detections=args.top, return_indices=True)
    k = len(dets)
    scales = unravel_index(rows, cap.outputs)[:, 0].tolist()

    def ours(method: str, cache=None):
        return detection_cams(model, x, indices=rows, classes=dets[:, 5], method=method, cache=cache)

    t_capture = timed(lambda: capture(model, x), args.repeats)
    t_cams = {m: timed(lambda m=m: ours(m, cap), args.repeats) for m in ("gradcam", "gradcam++", "eigencam")}
    t_cold = timed(lambda: ours("gradcam"), args.repeats)  # its own capture included

    layers = prediction_features(model)
    targets = [DetectionTarget(int(r), int(c)) for r, c in zip(rows, dets[:, 5])]

    def library():  # one scale's layer per call, as pytorch-grad-cam takes one target layer list
        for s in sorted(set(scales)):
            members = [i for i in range(k) if scales[i] == s]
            with GradCAM(model=FlatOutputs(model), target_layers=[layers[s]]) as cam:
                cam(input_tensor=x.expand(len(members), -1, -1, -1).contiguous(),
                    targets=[targets[i] for i in members])

    t_library = timed(library, max(1, args.repeats // 2), warmup=1)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}); full model (width 1.0, "
          f"{sum(q.numel() for q in model.parameters()):,} parameters) at {args.size}; {path.name}; "
          f"{k} detections on scales {scales}; median ms")
    rows_out = [
        ("one forward pass (batch 1, no grad)", t_forward),
        ("capture: the forward pass keeping activations", t_capture),
        (f"Grad-CAM x{k}, from the capture", t_cams["gradcam"]),
        (f"Grad-CAM++ x{k}, from the capture", t_cams["gradcam++"]),
        (f"EigenCAM x{k}, from the capture", t_cams["eigencam"]),
        (f"capture + Grad-CAM x{k} (image to maps)", t_cold),
        (f"plain pytorch-grad-cam, whole model x{k}", t_library),
    ]
    for name, t in rows_out:
        print(f"  {name:<55} {t:9.1f} ms  {t / t_forward:5.2f}x forward")
    print(f"  goal: Grad-CAM for {k} detections <= 3x one forward pass: "
          f"{'met' if t_cold <= 3 * t_forward else 'NOT met'} ({t_cold / t_forward:.2f}x, capture included)")


if __name__ == "__main__":
    main()
