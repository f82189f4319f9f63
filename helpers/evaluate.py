"""Evaluate a model on a dataset: the course's accuracies, VOC mAP@0.5 (2007 11-point and 2010+
all-point, difficult objects ignored, in original image pixels) and COCO mAP.

From code (training, notebook):

    result = evaluate(model, dataloader, cfg)          # dict; result["curves"] feeds plot_pr_curves

From the command line:

    python -m helpers.evaluate --checkpoint runs/default/checkpoints/last.ckpt --data VOCdevkit --split test

prints the accuracies and a per-class AP table, writes metrics.json and pr_curves.png into a new
folder (never over an earlier evaluation), with a progress bar.

The dataloader yields (images [B,3,H,W], boxes [N,6] = image index, class, cx, cy, w, h normalised,
metas), each meta as `helpers.dataset_org.PlainDataset(return_meta=True)` gives it ("letterbox": a
`boxes.Letterbox`, "gt"); then detections are mapped back to the stored image and scored against
its full ground truth. A loader whose third element is not a list of metas (the training collate's skip
count) is scored in input pixels against the batch's own boxes instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .annotations import DatasetError
from .config import ANCHORS, Config
from .metrics import YoloAccuracy, coco_map, voc_map
from .postprocess import detect
from .targets import build_targets


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor, list[dict] | None]:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError("evaluate: a batch must be (images, boxes[, metas]), got "
                         f"{type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}")
    images, boxes = batch[0], batch[1]
    metas = batch[2] if len(batch) > 2 and isinstance(batch[2], (list, tuple)) else None
    return images, boxes, metas


def _input_pixel_truths(boxes: torch.Tensor, batch_size: int, height: int, width: int) -> list[dict]:
    """Ground truth per image from the batch's normalised boxes [N,6], in input pixels."""
    boxes = boxes.detach().cpu().float()
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    xyxy = torch.cat([boxes[:, 2:4] - boxes[:, 4:6] / 2, boxes[:, 2:4] + boxes[:, 4:6] / 2], 1) * scale
    img = boxes[:, 0].long()
    return [{"boxes": xyxy[img == b], "labels": boxes[img == b, 1].long(),
             "difficult": torch.zeros(int((img == b).sum()), dtype=torch.bool)} for b in range(batch_size)]


@torch.inference_mode()
def collect(
    model: torch.nn.Module,
    dataloader: Iterable,
    *,
    conf_threshold: float = 0.05,
    nms_iou: float = 0.45,
    max_detections: int = 100,
    nms_pre: int | None = 1000,
    score: str = "obj*cls",
    anchors=ANCHORS,
    device: str | torch.device | None = None,
    accuracy: bool = True,
    amp: bool | None = None,
    progress: bool = True,
    max_batches: int | None = None,
) -> tuple[list[torch.Tensor], list[dict], dict[str, float] | None]:
    """Run the model over the loader: (detections per image [K,6] on the CPU, ground truths per
    image, accuracies in percent or None). The model runs on `device` (default: where its
    parameters are) in eval mode, and is put back in the mode it had.

    amp: fp16 autocast; default on CUDA only. Decoding and metrics are fp32 whatever it is.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    amp = device.type == "cuda" if amp is None else amp
    was_training = model.training
    model.to(device).eval()
    acc = YoloAccuracy(threshold=conf_threshold).to(device) if accuracy else None
    detections: list[torch.Tensor] = []
    truths: list[dict] = []
    total = len(dataloader) if hasattr(dataloader, "__len__") else None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    bar = tqdm(dataloader, total=total, desc="evaluate", unit="batch", disable=not progress, dynamic_ncols=True)
    try:
        for k, batch in enumerate(bar):
            if max_batches is not None and k >= max_batches:
                break
            images, boxes, metas = _split_batch(batch)
            b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
            if b == 0:  # every sample of the batch was unreadable (the collate warned)
                continue
            images, boxes = images.to(device, non_blocking=True), boxes.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16) if amp else nullcontext():
                outputs = model(images)
            if acc is not None:
                acc.update(outputs, build_targets(boxes, b, (h, w), anchors=anchors))
            letterboxes = None if metas is None else [m["letterbox"] for m in metas]
            dets = detect(outputs, (h, w), conf_threshold=conf_threshold, iou_threshold=nms_iou,
                          max_detections=max_detections, nms_pre=nms_pre, score=score, letterbox=letterboxes,
                          anchors=anchors)
            detections.extend(d.cpu() for d in dets)
            truths.extend(_input_pixel_truths(boxes, b, h, w) if metas is None else [m["gt"] for m in metas])
    finally:
        bar.close()
        model.train(was_training)
    accuracies = None
    if acc is not None and acc.update_count:
        accuracies = {k: float(v) for k, v in acc.compute().items()}
    return detections, truths, accuracies


def evaluate(
    model: torch.nn.Module,
    dataloader: Iterable,
    cfg: Config | None = None,
    device: str | torch.device | None = None,
    *,
    coco: bool = True,
    progress: bool = True,
    max_batches: int | None = None,
    **collect_kwargs,
) -> dict:
    """Accuracies, VOC mAP@`cfg.train.map_iou` (voc07 and all-point), per-class APs and COCO mAP.

    Thresholds come from `cfg.train` (conf_threshold, nms_iou, map_iou; the course's 0.05 / 0.45 /
    0.5 by default), class names and count from `cfg.data.classes` / `cfg.model.num_classes`.
    Returns a dict of plain values (JSON-ready) plus "curves": the all-point `voc_map` result with
    its per-class precision/recall arrays (for `helpers.plotting.plot_pr_curves`; not JSON).
    """
    cfg = cfg or Config()
    t = cfg.train
    num_classes = cfg.model.num_classes
    names = list(cfg.data.classes)[:num_classes] + [str(c) for c in range(len(cfg.data.classes), num_classes)]
    start = time.perf_counter()
    dets, truths, acc = collect(model, dataloader, conf_threshold=t.conf_threshold, nms_iou=t.nms_iou,
                                device=device, progress=progress, max_batches=max_batches, **collect_kwargs)
    inference_s = time.perf_counter() - start
    start = time.perf_counter()
    both = voc_map(dets, truths, iou_threshold=t.map_iou, method=("voc07", "all"), num_classes=num_classes)
    v07, vall = both["voc07"], both["all"]
    coco_result = coco_map(dets, truths, num_classes=num_classes) if coco and len(dets) else None
    metrics_s = time.perf_counter() - start

    def num(x) -> float | None:
        x = float(x)
        return None if math.isnan(x) else x  # JSON has no NaN: a class without ground truth is null

    per_class = [{"class": names[c], "num_gt": int(v07["num_gt"][c]), "num_tp": int(vall["num_tp"][c]),
                  "num_fp": int(vall["num_fp"][c]), "ap50_voc07": num(v07["ap"][c]), "ap50_all": num(vall["ap"][c])}
                 for c in range(num_classes)]
    return {
        "images": len(dets),
        "detections": int(sum(len(d) for d in dets)),
        "ground_truths": int(sum(len(g["labels"]) for g in truths)),
        "difficult": int(sum(int(torch.as_tensor(g.get("difficult", [])).sum()) for g in truths)),
        **({k: num(v) for k, v in acc.items()} if acc else {"class_acc": None, "noobj_acc": None, "obj_acc": None}),
        "map50_voc07": num(v07["map"]),
        "map50_all": num(vall["map"]),
        "coco": coco_result,
        "per_class": per_class,
        "settings": {"conf_threshold": t.conf_threshold, "nms_iou": t.nms_iou, "map_iou": t.map_iou,
                     "num_classes": num_classes},
        "seconds": {"inference": round(inference_s, 3), "metrics": round(metrics_s, 3)},
        "curves": vall,
    }


def format_report(result: dict) -> str:
    """The accuracies, the per-class AP table and the mAP lines, as printed by the CLI."""
    def pct(x):
        return "   n/a" if x is None else f"{x:6.2f}"

    def ap(x):
        return "   n/a" if x is None else f"{100 * x:6.2f}"

    lines = [f"images {result['images']}, ground truths {result['ground_truths']} ({result['difficult']} difficult, "
             f"ignored), detections {result['detections']}",
             f"class accuracy {pct(result['class_acc'])} %   no-object accuracy {pct(result['noobj_acc'])} %   "
             f"object accuracy {pct(result['obj_acc'])} %", "",
             f"{'class':14s} {'GT':>6s} {'TP':>6s} {'FP':>7s} {'AP07':>6s} {'AP all':>6s}"]
    for row in result["per_class"]:
        lines.append(f"{row['class']:14s} {row['num_gt']:6d} {row['num_tp']:6d} {row['num_fp']:7d} "
                     f"{ap(row['ap50_voc07'])} {ap(row['ap50_all'])}")
    iou = result["settings"]["map_iou"]
    lines += ["", f"mAP@{iou:g}  VOC2007 11-point {ap(result['map50_voc07'])} %   VOC2010+ all-point "
                  f"{ap(result['map50_all'])} %"]
    if result.get("coco"):
        c = result["coco"]
        lines.append(f"COCO       mAP@[.5:.95] {ap(c['map_50_95'])} %   mAP@.5 {ap(c['map_50'])} %   "
                     f"mAP@.75 {ap(c['map_75'])} %")
    return "\n".join(lines)


def fresh_dir(path: Path) -> Path:
    """`path` if it does not exist or is empty, else the first free `path-vN`: earlier evaluations stay."""
    candidate, n = path, 2
    while candidate.exists() and any(candidate.iterdir()):
        candidate = path.with_name(f"{path.name}-v{n}")
        n += 1
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def write_outputs(result: dict, out: Path, class_names: Sequence[str]) -> dict[str, Path]:
    """metrics.json and pr_curves.png into `out` (written to a temporary name, then renamed)."""
    from .plotting import plot_pr_curves

    paths = {"metrics": out / "metrics.json", "pr_curves": out / "pr_curves.png"}
    summary = {k: v for k, v in result.items() if k != "curves"}
    tmp = paths["metrics"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, paths["metrics"])
    fig = plot_pr_curves(result["curves"], class_names)
    tmp = out / ".pr_curves.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, paths["pr_curves"])
    return paths


def _build_loader(root: Path, split: str, image_size: int, cfg: Config, batch_size: int, workers: int,
                  limit: int | None) -> torch.utils.data.DataLoader:
    from .datamodule import collate_with_meta
    from .dataset_org import PlainDataset

    dataset = PlainDataset(root, split, image_size, classes=tuple(cfg.data.classes), return_meta=True,
                          on_error="skip")
    if len(dataset) == 0:
        raise SystemExit(f"evaluate: no images in {root} for split {split!r}")
    if limit:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=collate_with_meta, pin_memory=torch.cuda.is_available())


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m helpers.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a training .ckpt, an export bundle folder, a run or checkpoint folder (its newest), "
                        "or 'latest' (the newest in --run-dir)")
    p.add_argument("--run-dir", default="runs/default", help="the run that --checkpoint latest looks in")
    p.add_argument("--data", default=None,
                   help="VOCdevkit or Kaggle/course folder (default: the checkpoint's, else the generated set)")
    p.add_argument("--split", default="test")
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's (416)")
    p.add_argument("--conf", type=float, default=None, help="confidence threshold (default: checkpoint's, 0.05)")
    p.add_argument("--nms-iou", type=float, default=None, help="NMS IoU (default: checkpoint's, 0.45)")
    p.add_argument("--map-iou", type=float, default=None, help="IoU for a match (default: checkpoint's, 0.5)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default=None, help="cuda, cpu, mps (default: the best available)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--no-coco", action="store_true", help="skip COCO mAP")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/eval-<split>); "
                   "an existing non-empty one gets a -vN sibling instead")
    args = p.parse_args(argv)

    from .utils import pick_device
    from .weights import load_model, resolve_checkpoint

    try:
        checkpoint = resolve_checkpoint(args.checkpoint, args.run_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"evaluate: {e}") from None
    device = pick_device(args.device)
    model, cfg = load_model(checkpoint, map_location="cpu")
    t = cfg.train
    t.conf_threshold = t.conf_threshold if args.conf is None else args.conf
    t.nms_iou = t.nms_iou if args.nms_iou is None else args.nms_iou
    t.map_iou = t.map_iou if args.map_iou is None else args.map_iou
    image_size = args.image_size or cfg.data.image_size
    if image_size % 32:
        raise SystemExit(f"evaluate: --image-size must be a multiple of 32, got {image_size}")
    if args.data:
        root = Path(args.data)
    elif cfg.data.root:
        root = Path(cfg.data.root)
    else:
        from .datamodule import synthetic_root

        root = synthetic_root()
    if not root.exists():
        raise SystemExit(f"evaluate: data folder {root} does not exist")
    try:
        loader = _build_loader(root, args.split, image_size, cfg, args.batch_size, args.workers, args.limit)
    except DatasetError as e:  # not a dataset, a missing split, unusable files: said in one place
        raise SystemExit(f"evaluate: {e}") from None
    print(f"evaluating {checkpoint} on {root} ({args.split}, {len(loader.dataset)} images, {image_size} px) "
          f"on {device}")

    result = evaluate(model, loader, cfg, device, coco=not args.no_coco)
    result["checkpoint"], result["data"], result["split"] = str(checkpoint), str(root), args.split
    result["settings"]["image_size"] = image_size
    print(format_report(result))
    out = fresh_dir(Path(args.out) if args.out else checkpoint.parent / f"eval-{args.split}")
    paths = write_outputs(result, out, list(cfg.data.classes))
    print(f"wrote {paths['metrics']} and {paths['pr_curves']}")
    return result


if __name__ == "__main__":
    main()
