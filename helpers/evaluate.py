"""The one evaluation of this project: the course's accuracies, VOC mAP@0.5 (2007 11-point and 2010+
all-point, difficult objects ignored, in original image pixels) and COCO mAP.

- `Evaluator` scores a model's outputs batch by batch. The LightningModule's validation feeds it
  from Lightning's loop (synced across DDP ranks); `evaluate` feeds it from its own loop.
- `evaluate(model, dataloader, cfg)`: the loop, for code (notebook) and the command line:

    python -m helpers.evaluate --checkpoint latest --run-dir runs/default --data VOCdevkit --split test

writes metrics.json and pr_curves.png into a new folder (never over an earlier evaluation), then
prints the course's accuracies against their targets (the model's: `ModelConfig.accuracy_targets`),
a per-class AP table, the mAPs, and last one sentence: passes all three targets, or which miss and
by how much.

Batches are `helpers.batch.Batch`. With metas (evaluation batches) detections are mapped back to the
stored image and scored against its full ground truth; without (training batches) they are scored in
input pixels against the batch's own boxes.
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
from torch import nn
from torchmetrics.aggregation import SumMetric
from tqdm.auto import tqdm

from .annotations import DatasetError
from .batch import Batch, evaluation_loader
from .config import ANCHORS, AccuracyTargets, Config
from .metrics import (
    ACCURACY_NAMES,
    DetectionsAndTruths,
    YoloAccuracy,
    coco_map,
    judged,
    voc_map,
)
from .postprocess import detect
from .storage import StorageFull, atomic_write_text, remove_temporaries, write_figure
from .targets import build_targets


class Evaluator(nn.Module):
    """Accumulates a detector's results over a dataset, batch by batch, then scores them.

    reset(accuracy, detections, rank, world_size): start over, saying what to score (the same on every
    rank: validation scores mAP only every few epochs) and which rank this process is.
    update(outputs, batch, targets=None): outputs the model's 3 raw tensors [B, 3, S_h, S_w, 5+C] for
    `batch` (None when the batch is empty); targets `build_targets` of the batch if already built.
    compute(coco=False) -> dict of plain values (gathered over ranks; see `evaluate`), plus "curves":
    the all-point `voc_map` result with its per-class precision/recall arrays (not JSON). With
    `targets`, the accuracies are also judged: "accuracy_targets" {name: {value, target, passed}} and
    "verdict", one sentence (`metrics.judged`).

    Thresholds are the course's by default (`build_evaluator` reads them from a Config). Each image
    gets the id rank + world_size * (images this rank has seen), unique across ranks and equal to its
    index in the dataset under `datamodule.ShardSampler`.
    """

    def __init__(self, class_names: Sequence[str], conf_threshold: float = 0.05, nms_iou: float = 0.45,
                 map_iou: float = 0.5, max_detections: int = 100, nms_pre: int | None = 1000,
                 score: str = "obj*cls", anchors=ANCHORS, targets: AccuracyTargets | None = None):
        super().__init__()
        self.targets = targets  # the course's accuracy targets to judge against (None: not judged)
        self.class_names = list(class_names)
        self.conf_threshold, self.nms_iou, self.map_iou = conf_threshold, nms_iou, map_iou
        self.max_detections, self.nms_pre, self.score, self.anchors = max_detections, nms_pre, score, anchors
        self.accuracy = YoloAccuracy(threshold=conf_threshold)
        self.detections = DetectionsAndTruths()
        self.skipped = SumMetric(nan_strategy="ignore")
        self.reset()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def reset(self, accuracy: bool = True, detections: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.scores_accuracy, self.scores_detections = accuracy, detections
        self.rank, self.world_size, self.seen = rank, world_size, 0
        for metric in (self.accuracy, self.detections, self.skipped):
            metric.reset()

    def update(self, outputs: Sequence[torch.Tensor] | None, batch: Batch,
               targets: Sequence[torch.Tensor] | None = None) -> None:
        self.skipped.update(batch.skipped.float())
        if outputs is None or len(batch) == 0:  # no sample of the batch could be read
            if self.scores_detections:  # under DDP this rank's states must still be [n, 7] ones
                self.detections.update([], [], torch.zeros(0, dtype=torch.long))
            return
        if self.scores_accuracy:
            if targets is None:
                targets = build_targets(batch.boxes, len(batch), batch.image_hw, anchors=self.anchors)
            self.accuracy.update(outputs, targets)
        if self.scores_detections:
            found = detect(outputs, batch.image_hw, conf_threshold=self.conf_threshold, iou_threshold=self.nms_iou,
                           max_detections=self.max_detections, nms_pre=self.nms_pre, score=self.score,
                           letterbox=batch.letterboxes(), anchors=self.anchors)
            ids = self.rank + self.world_size * torch.arange(self.seen, self.seen + len(batch))
            self.detections.update(found, batch.truths(), ids)
        self.seen += len(batch)

    def compute(self, coco: bool = False) -> dict:
        c = self.num_classes
        acc = {k: _number(v) for k, v in self.accuracy.compute().items()} if self.scores_accuracy else {}
        result = {"skipped": int(self.skipped.compute()),
                  **{k: acc.get(k) for k in ("class_acc", "noobj_acc", "obj_acc")},
                  "map50_voc07": None, "map50_all": None, "coco": None, "per_class": None, "curves": None,
                  "settings": {"conf_threshold": self.conf_threshold, "nms_iou": self.nms_iou,
                               "map_iou": self.map_iou, "num_classes": c}}
        if self.scores_accuracy and self.targets is not None:
            result.update(judged(acc, self.targets))
        if not self.scores_detections:
            return result
        dets, truths, images = self.detections.per_image()
        both = voc_map(dets, truths, iou_threshold=self.map_iou, method=("voc07", "all"), num_classes=c)
        v07, vall = both["voc07"], both["all"]
        result.update({
            "images": images,
            "detections": int(sum(len(d) for d in dets)),
            "ground_truths": int(sum(len(g["labels"]) for g in truths)),
            "difficult": int(sum(int(g["difficult"].sum()) for g in truths)),
            "map50_voc07": _number(v07["map"]),
            "map50_all": _number(vall["map"]),
            "coco": coco_map(dets, truths, num_classes=c) if coco and dets else None,
            "per_class": [{"class": self.class_names[k], "num_gt": int(v07["num_gt"][k]),
                           "num_tp": int(vall["num_tp"][k]), "num_fp": int(vall["num_fp"][k]),
                           "ap50_voc07": _number(v07["ap"][k]), "ap50_all": _number(vall["ap"][k])}
                          for k in range(c)],
            "curves": vall,
        })
        return result


def _number(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x  # JSON has no NaN: a class without ground truth is null


def build_evaluator(cfg: Config) -> Evaluator:
    """The evaluator of a run: thresholds from `cfg.train` (conf_threshold, nms_iou, map_iou; the
    course's 0.05 / 0.45 / 0.5 by default), class names from `cfg.data.classes`, one per model class."""
    t, num_classes = cfg.train, cfg.model.num_classes
    names = list(cfg.data.classes)[:num_classes] + [str(k) for k in range(len(cfg.data.classes), num_classes)]
    return Evaluator(names, conf_threshold=t.conf_threshold, nms_iou=t.nms_iou, map_iou=t.map_iou,
                     targets=cfg.model.accuracy_targets)


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    dataloader: Iterable[Batch],
    cfg: Config | None = None,
    device: str | torch.device | None = None,
    *,
    coco: bool = True,
    progress: bool = True,
    max_batches: int | None = None,
    amp: bool | None = None,
    accuracy: bool = True,
    evaluator: Evaluator | None = None,
) -> dict:
    """Run the model over the loader and score it: `Evaluator.compute`'s dict (accuracies, VOC
    mAP@map_iou voc07 and all-point, per-class APs, COCO mAP) plus "seconds" spent in the model and
    in the metrics.

    The model runs on `device` (default: where its parameters are) in eval mode, and is put back in
    the mode it had. amp: fp16 autocast, default on CUDA only; decoding and metrics are fp32.
    accuracy: also the course's accuracies (building targets for every batch).
    evaluator: default `build_evaluator(cfg)` (cfg default `Config()`); what it gathered stays in it
    (e.g. `evaluator.detections.per_image()`).
    """
    evaluator = evaluator or build_evaluator(cfg or Config())
    device = torch.device(device) if device is not None else next(model.parameters()).device
    amp = device.type == "cuda" if amp is None else amp
    was_training = model.training
    model.to(device).eval()
    evaluator.to(device).reset(accuracy=accuracy)
    total = len(dataloader) if hasattr(dataloader, "__len__") else None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    bar = tqdm(dataloader, total=total, desc="evaluate", unit="batch", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for k, batch in enumerate(bar):
            if max_batches is not None and k >= max_batches:
                break
            if not isinstance(batch, Batch):
                raise TypeError(f"evaluate: the loader must yield helpers.batch.Batch (collate_fn="
                                f"helpers.batch.collate), got {type(batch).__name__}")
            batch = batch.to(device, non_blocking=device.type == "cuda")
            outputs = None
            if len(batch):
                with torch.autocast(device.type, dtype=torch.float16) if amp else nullcontext():
                    outputs = model(batch.images)
            evaluator.update(outputs, batch)
    finally:
        bar.close()
        model.train(was_training)
    inference_s = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluator.compute(coco=coco)
    result["seconds"] = {"inference": round(inference_s, 3), "metrics": round(time.perf_counter() - start, 3)}
    return result


def format_report(result: dict) -> str:
    """The accuracies, the per-class AP table and the mAP lines, as printed by the CLI."""
    def pct(x):
        return "   n/a" if x is None else f"{x:6.2f}"

    def ap(x):
        return "   n/a" if x is None else f"{100 * x:6.2f}"

    unread = f", {result['skipped']} unreadable (skipped; the warnings name them)" if result.get("skipped") else ""
    lines = [f"images {result['images']}{unread}, ground truths {result['ground_truths']} ({result['difficult']} "
             f"difficult, ignored), detections {result['detections']}",
             *_accuracy_lines(result), "",
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
    if result.get("verdict"):
        lines += ["", result["verdict"][0].upper() + result["verdict"][1:] + "."]
    return "\n".join(lines)


def _accuracy_lines(result: dict) -> list[str]:
    """The course's accuracies, each with its target and pass/miss where the result was judged."""
    judged = result.get("accuracy_targets")
    if not judged:
        return ["   ".join(f"{label} accuracy {'n/a' if result.get(name) is None else f'{result[name]:.2f} %'}"
                           for name, label in ACCURACY_NAMES.items())]
    lines = [f"{'accuracy':14s} {'value':>8s} {'target':>8s}"]
    for name, label in ACCURACY_NAMES.items():
        j = judged[name]
        value = "n/a" if j["value"] is None else f"{j['value']:.2f} %"
        lines.append(f"{label:14s} {value:>8s} {j['target']:6g} %  {'pass' if j['passed'] else 'MISS'}")
    return lines


def fresh_dir(path: Path) -> Path:
    """`path` if it does not exist or is empty, else the first free `path-vN`: earlier evaluations stay."""
    candidate, n = path, 2
    while candidate.exists() and any(candidate.iterdir()):
        candidate = path.with_name(f"{path.name}-v{n}")
        n += 1
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def write_outputs(result: dict, out: Path, class_names: Sequence[str]) -> dict[str, Path]:
    """metrics.json and pr_curves.png into `out`, each atomically (`storage`)."""
    from .plotting import plot_pr_curves

    paths = {"metrics": out / "metrics.json", "pr_curves": out / "pr_curves.png"}
    summary = {k: v for k, v in result.items() if k != "curves"}
    atomic_write_text(paths["metrics"], json.dumps(summary, indent=2))
    write_figure(plot_pr_curves(result["curves"], class_names), paths["pr_curves"], dpi=110)
    return paths


def run_data(cfg: Config) -> Path:
    """The data a run trained on: its dataset folder, or the generated set of its seed (made again if
    this machine has none)."""
    if cfg.data.root:
        return Path(cfg.data.root)
    from .datamodule import synthetic_root

    return synthetic_root(cfg.train.seed)


def split_loader(root: str | os.PathLike, split: str | None, image_size: int, classes: Sequence[str], *,
                 batch_size: int = 16, workers: int = 0, limit: int | None = None,
                 ) -> tuple[torch.utils.data.DataLoader, str]:
    """(the evaluation loader, `batch.evaluation_loader`, over `split` of the dataset at `root`, the
    first `limit` images only; the split's name). split None: the layout's test split. DatasetError
    (one line, naming the folder) when it is not a dataset, has no such split, or no image in it."""
    from .dataset_org import PlainDataset

    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: data folder not found")
    dataset = PlainDataset(root, split, image_size, classes=tuple(classes), return_meta=True, on_error="skip")
    if len(dataset) == 0:
        raise DatasetError(f"{root}: no images in its {dataset.split} split")
    split = dataset.split
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    return evaluation_loader(dataset, batch_size, workers=workers, pin_memory=torch.cuda.is_available()), split


class CheckpointCommandLine(argparse.ArgumentParser):
    """The command line of a tool that reads a checkpoint (evaluate, export): `--checkpoint` (as
    `weights.resolve_checkpoint` takes it), the `--run-dir` its 'latest' looks in, and `--limit N`
    images, refused below 1 in one line saying what the images are for (`purpose`)."""

    def __init__(self, prog: str, description: str, checkpoint_help: str, purpose: str, limit_help: str, **kwargs):
        super().__init__(prog=prog, description=description, **kwargs)
        self.purpose = purpose
        self.add_argument("--checkpoint", required=True, help=checkpoint_help)
        self.add_argument("--run-dir", default="runs/default", help="the run that --checkpoint latest looks in")
        self.add_argument("--limit", type=int, default=None, help=limit_help)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if parsed.limit is not None and parsed.limit < 1:
            self.error(f"--limit {parsed.limit}: the number of images to {self.purpose} must be at least 1")
        return parsed


def main(argv: Sequence[str] | None = None) -> dict:
    p = CheckpointCommandLine(
        "python -m helpers.evaluate", __doc__.split("\n\n")[0], purpose="evaluate",
        checkpoint_help="a training .ckpt, an export bundle folder, a run or checkpoint folder (its newest), "
                        "or 'latest' (the newest in --run-dir)",
        limit_help="only the first N images", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    root = Path(args.data) if args.data else run_data(cfg)
    try:
        loader, _ = split_loader(root, args.split, image_size, cfg.data.classes, batch_size=args.batch_size,
                                 workers=args.workers, limit=args.limit)
    except DatasetError as e:  # not a dataset, a missing split, no images, unusable files: said in one place
        raise SystemExit(f"evaluate: {e}") from None
    print(f"evaluating {checkpoint} on {root} ({args.split}, {len(loader.dataset)} images, {image_size} px) "
          f"on {device}")

    result = evaluate(model, loader, cfg, device, coco=not args.no_coco)
    result["checkpoint"], result["data"], result["split"] = str(checkpoint), str(root), args.split
    result["settings"]["image_size"] = image_size
    wanted = Path(args.out) if args.out else checkpoint.parent / f"eval-{args.split}"
    remove_temporaries(wanted)  # what a killed earlier evaluation left, so the folder counts as empty again
    out = fresh_dir(wanted)
    try:
        paths = write_outputs(result, out, list(cfg.data.classes))
    except StorageFull as e:
        raise SystemExit(f"evaluate: {e}") from None
    print(f"wrote {paths['metrics']} and {paths['pr_curves']}\n")
    print(format_report(result))  # its last line: the verdict on the course's targets
    return result


if __name__ == "__main__":
    main()
