"""Figures: boxes on images, example grids, CAM overlays, LR-finder, schedule, PR and training curves,
and a gallery of the worst mistakes. Drawing only: what a figure shows is computed before (the model
on examples, the mistakes and their CAMs in `helpers.analysis`, curves in `helpers.evaluate`, a run's
logged metrics read by `helpers.run_logs`).

Every figure is a `matplotlib.figure.Figure` built directly (never through pyplot), so nothing is
registered in pyplot's figure list: calling these in a loop never grows memory (the course's
`plot_couple_of_examples` leaked one pyplot figure per call), and `plt.get_fignums()` stays empty.
Save one with `fig.savefig(path)`; a notebook shows a returned figure as the cell's value, or with
`show` (which can also save it, e.g. into `images/` for the README). No
backend is selected here, so notebooks keep theirs.

`annotate` draws boxes straight into a uint8 array with PIL (for the Gradio app: no matplotlib).

Images may be an HxWx3 uint8 or float (0..1) array, or a [3,H,W] tensor (0..1, as the datasets give).
Boxes are pixel x1, y1, x2, y2 in the image's own pixels: [K,6] detections (x1, y1, x2, y2, score,
class, as `helpers.postprocess.detect` returns), [K,5] ground truth (x1, y1, x2, y2, class) or [K,4]
bare boxes.
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image, ImageDraw, ImageFont

from .config import VOC_CLASSES, AccuracyTargets
from .storage import atomic_write, write_figure

GOLDEN = 0.618033988749895


# --- colours, images, boxes -------------------------------------------------------------------
def class_colors(num_classes: int) -> np.ndarray:
    """[num_classes, 3] float RGB in 0..1. Class c's colour depends on c only (not on num_classes):
    hues stepped by the golden ratio, so neighbouring classes differ strongly."""
    c = np.arange(num_classes)
    hsv = np.stack(((c * GOLDEN) % 1.0, np.full(num_classes, 0.85), np.where(c % 2, 0.95, 0.8)), axis=1)
    return hsv_to_rgb(hsv.reshape(-1, 1, 3)).reshape(-1, 3)


def _color(c: int) -> tuple[float, float, float]:
    return tuple(class_colors(int(c) + 1)[int(c)])


def to_image(image) -> np.ndarray:
    """HxWx3 uint8 from an HxWx3 (or HxW) uint8/float 0..1 array or a [3,H,W] / [1,3,H,W] tensor."""
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"plotting: an image tensor must be [3,H,W] (or [1,3,H,W]), got {tuple(image.shape)}")
        t = t.expand(3, -1, -1).permute(1, 2, 0)
        arr = t.numpy()
    else:
        arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"plotting: an image array must be HxWx3 (uint8 or float 0..1), got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"plotting: image dtype must be uint8 or float, got {arr.dtype}")
    return np.ascontiguousarray((np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def split_boxes(boxes) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(xyxy [K,4], scores [K] or None, classes [K] int or None) from [K,6], [K,5] or [K,4] boxes."""
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().numpy()
    b = np.asarray(boxes if boxes is not None else np.zeros((0, 4)), dtype=np.float64)
    if b.size == 0:
        b = b.reshape(0, b.shape[-1] if b.ndim == 2 and b.shape[-1] in (4, 5, 6) else 4)
    if b.ndim != 2 or b.shape[1] not in (4, 5, 6):
        raise ValueError("plotting: boxes must be [K,6] (x1,y1,x2,y2,score,class), [K,5] (x1,y1,x2,y2,class) "
                         f"or [K,4], got shape {b.shape}")
    if b.shape[1] == 6:
        return b[:, :4], b[:, 4], b[:, 5].round().astype(np.int64)
    if b.shape[1] == 5:
        return b[:, :4], None, b[:, 4].round().astype(np.int64)
    return b, None, None


def _label(classes, scores, k: int, class_names) -> str:
    if classes is None:
        return ""
    c = int(classes[k])
    name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)
    return name if scores is None else f"{name} {scores[k]:.2f}"


def _draw_on_axes(ax, boxes, class_names, linestyle: str = "-", linewidth: float = 2.0, color=None) -> None:
    xyxy, scores, classes = split_boxes(boxes)
    for k, (x1, y1, x2, y2) in enumerate(xyxy):
        col = color or (_color(classes[k]) if classes is not None else (1.0, 1.0, 0.0))
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=col, linewidth=linewidth,
                               linestyle=linestyle))
        text = _label(classes, scores, k, class_names)
        if text:
            ax.text(x1, y1, text, color="white", fontsize=7, va="bottom", ha="left", clip_on=True,
                    bbox={"facecolor": col, "edgecolor": "none", "pad": 1.0, "alpha": 0.85})


def _figure(rows: int, cols: int, panel: float = 3.2, aspect: float = 1.0) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(cols * panel, rows * panel * aspect + 0.3 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    return fig, axes


def _image_axes(ax, image: np.ndarray, title: str | None = None) -> None:
    ax.imshow(image)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def draw_boxes(image, boxes, class_names: Sequence[str] | None = VOC_CLASSES, ax=None, title: str | None = None,
               truth=None) -> Figure:
    """The image with its boxes, each labelled with class name (and score), one colour per class.

    boxes: [K,6] detections, [K,5] ground truth or [K,4] (pixels of `image`); truth: optional
    ground truth [G,5]/[G,4] drawn dashed under the boxes. ax: draw into this Axes (its figure is
    returned) instead of a new figure.
    """
    img = to_image(image)
    if ax is None:
        h, w = img.shape[:2]
        fig = Figure(figsize=(5.0, 5.0 * h / w), layout="constrained")
        ax = fig.add_subplot()
    _image_axes(ax, img, title)
    if truth is not None:  # bare boxes: a label here would be white on white (and a class index, not a name)
        _draw_on_axes(ax, split_boxes(truth)[0], None, linestyle="--", linewidth=1.2, color=(1.0, 1.0, 1.0))
    _draw_on_axes(ax, boxes, class_names)
    return ax.figure


def annotate(image, detections, class_names: Sequence[str] | None = VOC_CLASSES, highlight: int | None = None,
             line_width: int | None = None) -> np.ndarray:
    """A copy of the image (HxWx3 uint8) with labelled boxes drawn in, no matplotlib (for the app).

    detections: [K,6] / [K,5] / [K,4] in the image's pixels. highlight: index of one box drawn
    thicker while the others are thin.
    """
    img = Image.fromarray(to_image(image))
    draw = ImageDraw.Draw(img)
    xyxy, scores, classes = split_boxes(detections)
    side = max(img.size)
    width = line_width or max(2, round(side / 250))
    font = ImageFont.load_default(size=max(10, round(side / 45)))
    for k, (x1, y1, x2, y2) in enumerate(xyxy):
        col = _color(classes[k]) if classes is not None else (1.0, 1.0, 0.0)
        rgb = tuple(int(round(v * 255)) for v in col)
        lw = width if highlight is None else (2 * width if k == highlight else max(1, width // 2))
        draw.rectangle((x1, y1, x2, y2), outline=rgb, width=lw)
        text = _label(classes, scores, k, class_names)
        if text:
            _, t, _, b = draw.textbbox((x1, y1), text, font=font)
            y = y1 - (b - t) - 2 if y1 - (b - t) - 2 >= 0 else y1  # above the box, or inside at the top
            left, t, right, b = draw.textbbox((x1, y), text, font=font)
            draw.rectangle((left - 1, t - 1, right + 1, b + 1), fill=rgb)
            draw.text((x1, y), text, fill=(255, 255, 255), font=font)
    return np.asarray(img)


def show(fig: Figure, name: str | None = None, folder: str | os.PathLike | None = None, dpi: int = 80) -> None:
    """Display `fig` in a notebook and, given a folder and a name, also save it as folder/name.png.

    The notebook saves its main figures into `images/` this way when it is executed for the repo
    (YOLO_FIGURES=images), so README shows what the committed run really produced. The notebook gets
    the figure at `dpi`, as a JPEG when it holds photos (a PNG of photos is several times larger; the
    committed notebook must stay small) and as a PNG otherwise (sharp lines and text). Returns None,
    so a cell ending in `show(...)` does not show the figure a second time."""
    if folder is not None and name:
        write_figure(fig, Path(folder) / f"{name}.png", dpi=dpi)  # atomically; a full disk is StorageFull
    photos = any(ax.images for ax in fig.axes)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="jpeg" if photos else "png", dpi=dpi, pil_kwargs={"quality": 85} if photos else None)
    _display(buffer.getvalue(), "jpeg" if photos else "png")


def show_saved(path: str | os.PathLike, name: str | None = None, folder: str | os.PathLike | None = None) -> None:
    """Display a PNG written earlier (e.g. the run's `lr_finder.png`, saved by `helpers.train`) in a
    notebook and, given a folder and a name, copy it there as folder/name.png, as `show` does."""
    data = Path(path).read_bytes()
    if folder is not None and name:
        os.makedirs(folder, exist_ok=True)
        atomic_write(Path(folder) / f"{name}.png", lambda f: f.write(data), replace=True)
    _display(data, "png")


def _display(data: bytes, fmt: str) -> None:
    """Show encoded image bytes as a notebook output; nothing outside a notebook."""
    try:
        from IPython import get_ipython
        from IPython.display import Image as IPythonImage
        from IPython.display import display
    except ImportError:  # no IPython: saving was the point
        return
    if get_ipython() is not None:  # None: IPython installed, but this is a script, not a notebook
        display(IPythonImage(data=data, format=fmt))


# --- detections on examples ------------------------------------------------------------------
def plot_examples(images, detections: Sequence, truths: Sequence | None = None,
                  class_names: Sequence[str] = VOC_CLASSES, ncols: int = 2,
                  conf_threshold: float | None = None) -> Figure:
    """Detections on a few examples (the course's `plot_couple_of_examples`), one panel per image.

    images: [n,3,S,S] (or a list of images); detections: per image [K,6] in its pixels; truths: per
    image [G,5]/[G,4] or None, drawn dashed white. `helpers.analysis.detect_examples` computes all
    three from a model and a dataset or batch. conf_threshold: the detections' threshold, for the
    titles.
    """
    truths = [None] * len(images) if truths is None else truths
    rows = math.ceil(len(images) / ncols)
    fig, axes = _figure(rows, min(ncols, len(images)))
    above = "" if conf_threshold is None else f" (score > {conf_threshold:g})"
    for k, ax in enumerate(axes):
        if k >= len(images):
            ax.set_axis_off()
            continue
        draw_boxes(images[k], detections[k], class_names, ax=ax, truth=truths[k],
                   title=f"{len(detections[k])} detections{above}")
    return fig


def overlay(image, cam: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """HxWx3 uint8: the CAM [h,w] in 0..1 (resized to the image if needed) as a JET heatmap over it
    (pytorch-grad-cam's `show_cam_on_image`)."""
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image

    img = to_image(image)
    cam = np.asarray(cam, np.float32)
    if cam.shape != img.shape[:2]:
        cam = cv2.resize(cam, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
    return show_cam_on_image(img.astype(np.float32) / 255.0, np.clip(cam, 0.0, 1.0), use_rgb=True,
                             image_weight=image_weight)


def plot_cam_overlays(image, cams, detections, class_names: Sequence[str] = VOC_CLASSES, ncols: int = 4,
                      method: str | None = None, image_weight: float = 0.5) -> Figure:
    """One panel per detection: its CAM over the image, its box, titled with class and score.

    cams: [K,H,W] in 0..1 (as `helpers.cam.detection_cams` gives, any size: resized to the image);
    detections: [K,6] in the image's pixels.
    """
    cams = np.asarray(cams)
    dets = np.asarray(detections.detach().cpu() if isinstance(detections, torch.Tensor) else detections)
    if cams.ndim != 3 or len(cams) != len(dets):
        raise ValueError(f"plot_cam_overlays: need one [H,W] CAM per detection, got CAMs {cams.shape} "
                         f"for {len(dets)} detections")
    k = max(1, len(dets))
    ncols = min(ncols, k)
    img = to_image(image)
    fig, axes = _figure(math.ceil(k / ncols), ncols, aspect=img.shape[0] / img.shape[1])
    for i, ax in enumerate(axes):
        if i >= len(dets):
            ax.set_axis_off()
            if not len(dets):
                ax.text(0.5, 0.5, "no detections", ha="center", va="center", transform=ax.transAxes)
            continue
        xyxy, scores, classes = split_boxes(dets[i: i + 1])
        title = _label(classes, scores, 0, class_names) + (f" ({method})" if method else "")
        _image_axes(ax, overlay(img, cams[i], image_weight), title)
        _draw_on_axes(ax, dets[i: i + 1, :4], None, color=_color(classes[0]) if classes is not None else None)
    return fig


# --- learning rate ----------------------------------------------------------------------------
def plot_lr_finder(lrs: Sequence[float], losses: Sequence[float], suggestion: float | None = None,
                   skip_start: int = 0, skip_end: int = 0, raw: Sequence[float] | None = None,
                   lowest: float | None = None) -> Figure:
    """Loss against learning rate (log axis) from an LR range test, the suggested LR marked.

    raw: the unsmoothed losses, drawn faint behind `losses`; lowest: the LR of the smoothed loss's
    minimum, marked too (the suggestion is a tenth of it, see `helpers.lr_finder`)."""
    lrs, losses = np.asarray(lrs, float), np.asarray(losses, float)
    if lrs.shape != losses.shape or lrs.ndim != 1:
        raise ValueError(f"plot_lr_finder: lrs and losses must be 1-D and equally long, got {lrs.shape}, {losses.shape}")
    end = len(lrs) - skip_end if skip_end else len(lrs)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    if raw is not None:
        raw = np.asarray(raw, float)
        if raw.shape != lrs.shape:
            raise ValueError(f"plot_lr_finder: raw must match lrs, got {raw.shape} and {lrs.shape}")
        ax.plot(lrs[skip_start:end], raw[skip_start:end], color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    lrs, losses = lrs[skip_start:end], losses[skip_start:end]
    ax.plot(lrs, losses, color="tab:blue", label="smoothed" if raw is not None else None)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    if lowest is not None and len(lrs) and lowest != suggestion:
        y = np.interp(np.log(lowest), np.log(lrs), losses)
        ax.plot([lowest], [y], "o", color="tab:orange", label=f"minimum {lowest:.2e}")
    if suggestion is not None and len(lrs):
        y = np.interp(np.log(suggestion), np.log(lrs), losses)
        ax.axvline(suggestion, color="tab:red", linestyle="--", linewidth=1)
        ax.plot([suggestion], [y], "o", color="tab:red", label=f"suggested {suggestion:.2e}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    if len(losses) > 3:  # a final blow-up would flatten the rest: keep the falling part readable
        top, bottom = losses[: len(losses) // 2].max(), losses.min()
        if np.isfinite(top) and np.isfinite(bottom) and top > bottom:
            ax.set_ylim(bottom - 0.1 * (top - bottom), top + 0.5 * (top - bottom))
    ax.set_title("LR range test")
    ax.grid(True, which="both", alpha=0.3)
    return fig


def plot_schedule(lrs, steps_per_epoch: int | None = None) -> Figure:
    """The learning rate of every optimizer step (a `helpers.schedule.Schedule` or a list), epochs marked."""
    if steps_per_epoch is None and hasattr(lrs, "spec"):
        steps_per_epoch = lrs.spec.steps_per_epoch
    values = np.asarray(getattr(lrs, "lrs", lrs), float)
    if values.ndim != 1 or not len(values):
        raise ValueError("plot_schedule: need a non-empty 1-D list of learning rates")
    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(np.arange(len(values)), values, color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    peak = int(values.argmax())
    ax.annotate(f"max {values[peak]:.2e} at step {peak}", (peak, values[peak]), textcoords="offset points",
                xytext=(8, -12), fontsize=8)
    if steps_per_epoch:
        epochs = len(values) / steps_per_epoch
        top = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch))
        top.set_xlabel("epoch")
        ax.set_title(f"OneCycle schedule: {len(values)} steps = {epochs:g} epochs x {steps_per_epoch}", fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig


# --- evaluation -------------------------------------------------------------------------------
def plot_pr_curves(result, class_names: Sequence[str] = VOC_CLASSES, ncols: int = 5) -> Figure:
    """Precision-recall curve of each class, one small panel each, titled with its AP.

    result: what `helpers.metrics.voc_map` returns (dict with "precision", "recall", "ap" per class),
    or a pair (precisions, recalls) of per-class arrays.
    """
    if isinstance(result, Mapping):
        precision, recall = result["precision"], result["recall"]
        ap = result.get("ap")
        title = (f"mAP@{result.get('iou_threshold', 0.5):g} ({result.get('method', '')}) = {result['map']:.3f}"
                 if "map" in result else None)
    else:
        precision, recall = result
        ap, title = None, None
    if len(precision) != len(recall):
        raise ValueError(f"plot_pr_curves: {len(precision)} precision curves but {len(recall)} recall curves")
    n = len(precision)
    ncols = max(1, min(ncols, n))
    rows = math.ceil(n / ncols)
    fig = Figure(figsize=(2.4 * ncols, 2.2 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, ncols, sharex=True, sharey=True, squeeze=False)).reshape(-1)
    for c, ax in enumerate(axes):
        if c >= n:
            ax.set_axis_off()
            continue
        p, r = np.asarray(precision[c], float), np.asarray(recall[c], float)
        name = class_names[c] if c < len(class_names) else str(c)
        if len(r):
            # The interpolated precision (the envelope AP integrates) under the raw curve.
            envelope = np.maximum.accumulate(p[::-1])[::-1]
            ax.plot(r, p, color=_color(c), linewidth=1)
            ax.step(r, envelope, color="black", linewidth=0.8, alpha=0.5, where="post")
        else:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        a = None if ap is None else float(np.asarray(ap)[c])
        ax.set_title(name if a is None or a != a else f"{name}  AP {a:.2f}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
    for ax in axes[(rows - 1) * ncols:]:
        ax.set_xlabel("recall", fontsize=8)
    for ax in axes[::ncols]:
        ax.set_ylabel("precision", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_training_curves(metrics, targets: AccuracyTargets | None = None) -> Figure:
    """Losses, accuracies, mAP and learning rate against the optimizer step, from a run's log folder
    (`<run_dir>/logs` or `<run_dir>`: every session merged, see `read_run_metrics`), a Lightning
    CSVLogger `metrics.csv`, or a dict of columns (name -> list/array, NaN where empty).

    Panels appear for what was logged: train loss per step (light) and per epoch, val loss; the
    course's accuracies (val/class_acc, val/noobj_acc, val/obj_acc), each with its target from
    `targets` (`ModelConfig.accuracy_targets`) as a dashed line of its colour; val mAP; the learning rate.
    """
    if isinstance(metrics, (str, os.PathLike)):
        from .run_logs import (  # here: the app's Space carries no log reader
            read_metrics_csv,
            read_run_metrics,
        )

        cols = read_run_metrics(metrics) if Path(metrics).is_dir() else read_metrics_csv(metrics)
    else:
        cols = {k: np.asarray(v, float) for k, v in metrics.items()}
    if "step" not in cols:
        raise ValueError("plot_training_curves: the metrics have no 'step' column (a Lightning CSVLogger file has)")
    step = cols["step"]

    def series(name):
        y = cols.get(name)
        if y is None:
            return None
        ok = ~np.isnan(y) & ~np.isnan(step)
        return (step[ok], y[ok]) if ok.any() else None

    panels = []
    loss = [(n, series(n), style) for n, style in (("train/loss_step", dict(alpha=0.35, linewidth=0.8)),
                                                   ("train/loss_epoch", dict(marker="o", linewidth=1.5)),
                                                   ("val/loss", dict(marker="s", linewidth=1.5)))]
    panels.append(("loss", [x for x in loss if x[1] is not None], False))
    acc = [(n, series(n), dict(marker="o")) for n in ("val/class_acc", "val/noobj_acc", "val/obj_acc")]
    panels.append(("accuracy (%)", [x for x in acc if x[1] is not None], False))
    maps = [(n, series(n), dict(marker="o")) for n in sorted(cols) if n.startswith("val/map")]
    panels.append(("mAP", [x for x in maps if x[1] is not None], False))
    panels.append(("learning rate", [x for x in [("lr", series("lr"), dict(linewidth=1))] if x[1] is not None], False))
    panels = [p for p in panels if p[1]]
    if not panels:
        raise ValueError("plot_training_curves: none of the known metrics (train/loss, val/*, lr) were logged")
    ncols = min(2, len(panels))
    rows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(6 * ncols, 3.4 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, ncols, squeeze=False)).reshape(-1)
    for ax, (name, lines, _) in zip(axes, panels):
        for label, (x, y), style in lines:
            line, = ax.plot(x, y, label=label, **style)
            key = label.removeprefix("val/")
            if targets is not None and label.startswith("val/") and hasattr(targets, key):
                ax.axhline(getattr(targets, key), color=line.get_color(), linestyle="--", linewidth=1,
                           label=f"target {getattr(targets, key):g}")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        if name == "loss" and all((y > 0).all() for _, (_, y), _ in lines):
            ax.set_yscale("log")
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    return fig


# --- mistakes ---------------------------------------------------------------------------------
def plot_worst_mistakes(images, mistakes: Sequence[Mapping], cams: Sequence[np.ndarray],
                        class_names: Sequence[str] = VOC_CLASSES, ncols: int = 4,
                        image_weight: float = 0.55) -> Figure:
    """A gallery of mistakes, each over the CAM that explains it.

    images: the model inputs the mistakes refer to ([N,3,S,S] tensor or a list of [3,S,S]);
    mistakes: as `helpers.analysis.find_mistakes` gives them (boxes in the images' pixels); cams: one
    map [S,S] in 0..1 per mistake (`helpers.analysis.mistake_cams`). A false positive is boxed solid
    red, a missed object dashed yellow (its CAM is the evidence against it).
    """
    if not mistakes:
        fig = Figure(figsize=(4, 2), layout="constrained")
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no mistakes above the threshold", ha="center", va="center")
        ax.set_axis_off()
        return fig
    if len(cams) != len(mistakes):
        raise ValueError(f"plot_worst_mistakes: need one CAM per mistake, got {len(cams)} for {len(mistakes)}")
    k = len(mistakes)
    ncols = min(ncols, k)
    first = to_image(images[0])
    fig, axes = _figure(math.ceil(k / ncols), ncols, aspect=first.shape[0] / first.shape[1])
    for j, ax in enumerate(axes):
        if j >= k:
            ax.set_axis_off()
            continue
        m = mistakes[j]
        c = int(m["class"])
        name = class_names[c] if c < len(class_names) else str(c)
        fp = m["kind"] == "false positive"
        title = f"false positive: {name} {m['score']:.2f}" if fp else f"missed: {name} (evidence against)"
        _image_axes(ax, overlay(images[m["image"]], cams[j], image_weight), title)
        x1, y1, x2, y2 = (float(v) for v in m["box"])
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linewidth=2,
                               edgecolor="red" if fp else "yellow", linestyle="-" if fp else "--"))
    return fig
