"""Model bundle for the app: `model.safetensors` (the weights) + `config.json` (everything else).

A bundle is a folder that loads without unpickling anything: safetensors holds only tensors, JSON
only plain values. `config.json` says what the app needs to run and to describe the model:

    {"format": "yolov3-voc-bundle", "format_version": 1,
     "classes": [...20 names], "num_classes": 20, "anchors": 3x3 (w, h) fractions, "strides": [32, 16, 8],
     "image_size": 416, "width": 1.0, "parameters": 61626049,
     "config": Config.to_dict(), "training": {epoch, global_step, trained_on, evaluated_on, ...},
     "metrics": {...}, "hub_repo": "user/name" or null,
     "display_conf": 0.23, "display_conf_source": "F1-best on ...", "display_conf_measured": {...} (if measured),
     "weights_dtype": "float32" | "float16", "weights_sha256": "...", "created": "...Z"}

`anchors` and `strides` are those the weights were trained with: `weights.read_bundle_config`
refuses a bundle whose differ from the code's (its boxes would be decoded wrong, silently).

`training.trained_on` and `training.evaluated_on` say in words what data the weights were trained
and measured on (the app's About section shows them with the metrics); they are written at export
time from the checkpoint's config, never typed by hand. `--fp16` stores the floating-point weights
in half precision (half the bytes; loading casts them back to float32).

`display_conf` is the confidence threshold the app's slider starts at, chosen from evidence: the one
of the slider's values (0.01 steps) with the best F1 (IoU 0.5, all classes pooled, difficult objects
ignored) on the checkpoint's evaluation split (`--data`/`--split` name another), measured with the
app's settings (the model's image size, its NMS IoU, at most 100 boxes per image) through
`helpers.evaluate.evaluate` and `helpers.metrics.f1_by_threshold`. `display_conf_source` says where
it came from in words (the app shows it), `display_conf_measured` holds the figures. `--display-conf X`
sets it by hand; without readable data it is `weights.DEFAULT_DISPLAY_CONF`, said so.

`python -m helpers.export --checkpoint CKPT --out DIR [--hub-repo ID] [--metrics FILE] [--fp16]
[--data PATH] [--split NAME] [--limit N] [--display-conf X]` writes one from a training checkpoint;
the run's `metrics.json` (written by `helpers.train` in the run folder, the parent of the checkpoint
folder) is read when present. `--checkpoint BUNDLE` re-issues a bundle (`export_bundle`): the same
weights file, its `config.json` with the display threshold measured (or set) now. An existing bundle
is never replaced: the export refuses and asks for a new folder. The folder is assembled under a temporary name and
renamed into place, so a half-written bundle never carries the final name (`storage.atomic_new_folder`).
Reading a bundle (`read_bundle_config`, `load_bundle`) is `helpers.weights`'s, the app's only import.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from .annotations import DatasetError
from .config import ANCHORS, STRIDES, Config
from .model import YOLOv3, count_parameters
from .storage import StorageFull, atomic_new_folder, refuse_existing, removed_temporaries
from .weights import (
    CONFIG,
    DEFAULT_DISPLAY_CONF,
    DISPLAY_CONF_MAX,
    DISPLAY_CONF_MIN,
    DISPLAY_CONF_STEP,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS,
    BundleError,
    load_model,
    read_bundle_config,
    read_json,
    resolve_checkpoint,
)

NEVER_OVERWRITTEN = "bundles are never overwritten"


# --- writing ------------------------------------------------------------------------------------
def bundle_config(model: YOLOv3, config: Config, *, training: dict | None = None, metrics: dict | None = None,
                  hub_repo: str | None = None, display: dict | None = None) -> dict[str, Any]:
    """The `config.json` content for `model` trained with `config` (weights hash added on write).
    display: the `display_conf` fields (`display_threshold`); none for a bundle that records none."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "classes": list(config.data.classes),
        "num_classes": config.model.num_classes,
        "anchors": [[list(a) for a in scale] for scale in ANCHORS],
        "strides": list(STRIDES),
        "image_size": config.data.image_size,
        "width": config.model.width,
        "parameters": count_parameters(model),
        "config": config.to_dict(),
        "training": training or {},
        "metrics": metrics or {},
        "hub_repo": hub_repo,
        **(display or {}),
    }


def write_bundle(model: YOLOv3, config: Config, out: str | os.PathLike, *, training: dict | None = None,
                 metrics: dict | None = None, hub_repo: str | None = None, fp16: bool = False,
                 display: dict | None = None) -> Path:
    """Write `out/model.safetensors` + `out/config.json`; refuses if `out` exists and is not empty.
    `fp16` stores floating-point tensors in half precision (integer buffers stay as they are)."""
    out = Path(out)
    refuse_existing(out, NEVER_OVERWRITTEN)
    if len(config.data.classes) != config.model.num_classes:
        raise BundleError(f"{out}: config has {len(config.data.classes)} class names for "
                          f"{config.model.num_classes} classes")
    # contiguous, unshared copies: safetensors refuses tensors that share storage
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    info = bundle_config(model, config, training=training, metrics=metrics, hub_repo=hub_repo, display=display)
    info["weights_dtype"] = "float16" if fp16 else "float32"

    def fill(folder: Path) -> None:
        # Serialised in memory, written by Python: safetensors' own file writer reports a full disk as a
        # SafetensorError ("os error 28"), not the OSError that storage turns into StorageFull.
        data = safetensors_bytes(state, metadata={"format": "pt", "bundle_format": FORMAT})
        (folder / WEIGHTS).write_bytes(data)
        info["weights_sha256"] = hashlib.sha256(data).hexdigest()
        info["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (folder / CONFIG).write_text(json.dumps(info, indent=2) + "\n")

    return atomic_new_folder(out, fill, what=NEVER_OVERWRITTEN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_metrics(checkpoint: Path, config: Config) -> tuple[dict, Path | None]:
    """The training run's `metrics.json` next to the checkpoint folder (or in the config's run_dir)."""
    for candidate in (checkpoint.parent.parent / "metrics.json", checkpoint.parent / "metrics.json",
                      Path(config.train.run_dir) / "metrics.json"):
        if candidate.is_file():
            return read_json(candidate, "run metrics"), candidate
    return {}, None


def summarise_run(summary: dict) -> dict:
    """The parts of `helpers.train`'s summary a model card shows: the final validation metrics and
    per-class AP (the training losses and step values stay in the run's logs)."""
    metrics = {k: float(v) for k, v in (summary.get("metrics") or {}).items()
               if k.startswith("val/") and isinstance(v, (int, float))}
    if summary.get("ap_per_class_voc07"):
        metrics["ap_per_class_voc07"] = summary["ap_per_class_voc07"]
    return metrics


def describe_data(config: Config) -> tuple[str, str]:
    """(what the model was trained on, what its metrics were measured on), in words for a model card."""
    d = config.data
    val_split = d.val_split or "test"  # None: the layout's default, test in both layouts
    if d.root is None:
        from .datamodule import SYNTHETIC

        w, h = SYNTHETIC["image_size"]
        data = (f"generated coloured shapes (helpers.synthetic: {SYNTHETIC['n_trainval']} trainval and "
                f"{SYNTHETIC['n_test']} test images of {w}x{h}, one shape and colour per VOC class name), "
                "not PASCAL VOC photos")
        return data, f"the generated {val_split} split ({SYNTHETIC['n_test']} images) at {d.image_size} px"
    return (f"`{Path(d.root).name}` ({d.train_split or 'default'} split)",
            f"the {val_split} split of `{Path(d.root).name}` at {d.image_size} px")


# --- the threshold the app shows the model at -------------------------------------------------
DISPLAY_THRESHOLDS = np.round(np.arange(DISPLAY_CONF_MIN, DISPLAY_CONF_MAX + DISPLAY_CONF_STEP / 2,
                                        DISPLAY_CONF_STEP), 2)  # the app slider's values
DISPLAY_MAX_DETECTIONS = 100  # per image, as the app keeps


def measure_display_conf(model: YOLOv3, config: Config, root: str | os.PathLike, split: str | None = None, *,
                         generated: bool = False, limit: int | None = None,
                         device: str | torch.device | None = None, progress: bool = False) -> dict[str, Any]:
    """The slider value with the best F1 on `split` of the dataset at `root` (None: the layout's
    test split), for the bundle's `display_conf` fields.

    The model runs as the app runs it: at `config.data.image_size`, NMS IoU `config.train.nms_iou`,
    at most 100 boxes per image, letterboxed, boxes scored in the stored image's pixels against its
    full ground truth (`helpers.evaluate.evaluate`); F1 pooled over all classes at IoU 0.5, difficult
    objects ignored (`helpers.metrics.f1_by_threshold`), ties to the higher threshold.
    Raises DatasetError (not a dataset, no such split, no images) and ValueError (no object to find,
    or no threshold finds any: F1 0 everywhere), each naming the data.
    """
    from .evaluate import Evaluator, evaluate, split_loader
    from .metrics import f1_by_threshold
    from .utils import pick_device

    root, size = Path(root), config.data.image_size
    loader, split = split_loader(root, split, size, config.data.classes, batch_size=8, limit=limit)
    where = f"the generated {split} split" if generated else f"the {split} split of `{root.name}`"
    evaluator = Evaluator(config.data.classes, conf_threshold=float(DISPLAY_THRESHOLDS[0]),
                          nms_iou=config.train.nms_iou, max_detections=DISPLAY_MAX_DETECTIONS)
    # fp32 even on a GPU (amp=False): the app runs the model in fp32, and the F1 recorded is the app's.
    evaluate(model, loader, device=pick_device(device), coco=False, progress=progress, accuracy=False, amp=False,
             evaluator=evaluator)
    detections, truths, images = evaluator.detections.per_image()
    curve = f1_by_threshold(detections, truths, DISPLAY_THRESHOLDS, iou_threshold=0.5,
                            num_classes=config.model.num_classes)
    if curve["num_gt"] == 0:
        raise ValueError(f"{where}: no (non-difficult) object to measure the display threshold on")
    best = curve["best"]
    if curve["f1"][best] == 0:
        raise ValueError(f"{where}: no confidence threshold finds any object (F1 0 at every one)")
    default = int(np.argmin(np.abs(DISPLAY_THRESHOLDS - DEFAULT_DISPLAY_CONF)))
    scores = torch.cat([d[:, 4] for d in detections]) if detections else torch.zeros(0)

    def boxes_per_image(k: int) -> float:
        return round(int((scores > float(DISPLAY_THRESHOLDS[k])).sum()) / max(images, 1), 3)

    conf = float(DISPLAY_THRESHOLDS[best])
    f1, precision, recall = (round(float(curve[k][best]), 4) for k in ("f1", "precision", "recall"))
    return {
        "display_conf": conf,
        "display_conf_source": (f"F1-best on {where} ({images} images, {curve['num_gt']} objects, {size} px): "
                                f"F1 {f1:.3f} (precision {precision:.3f}, recall {recall:.3f}) at IoU 0.5 over "
                                f"all classes, against F1 {float(curve['f1'][default]):.3f} at "
                                f"{DEFAULT_DISPLAY_CONF:g}"),
        "display_conf_measured": {
            "data": "generated" if generated else str(root), "split": split, "images": images,
            "objects": curve["num_gt"], "image_size": size, "nms_iou": config.train.nms_iou, "iou_threshold": 0.5,
            "f1": f1, "precision": precision, "recall": recall, "boxes_per_image": boxes_per_image(best),
            "at_default": {"conf": DEFAULT_DISPLAY_CONF, "f1": round(float(curve["f1"][default]), 4),
                           "precision": round(float(curve["precision"][default]), 4),
                           "recall": round(float(curve["recall"][default]), 4),
                           "boxes_per_image": boxes_per_image(default)},
        },
    }


def display_threshold(model: YOLOv3, config: Config, *, data: str | os.PathLike | None = None,
                      split: str | None = None, display_conf: float | None = None, limit: int | None = None,
                      progress: bool = False, warn=None) -> dict[str, Any]:
    """The bundle's `display_conf` fields: `display_conf` if given (by hand), else measured
    (`measure_display_conf`) on `data` or, without it, the data the checkpoint was trained with (the
    generated set, made again from its seed, for a model trained on it); else DEFAULT_DISPLAY_CONF
    with the reason. Data named by `data` that cannot be measured on raises BundleError; the
    checkpoint's own data missing (trained on another machine) falls back, reported through `warn`."""
    if display_conf is not None:
        if not DISPLAY_CONF_MIN <= display_conf <= DISPLAY_CONF_MAX:
            raise BundleError(f"--display-conf {display_conf:g}: must lie from {DISPLAY_CONF_MIN} to "
                              f"{DISPLAY_CONF_MAX} (the app's slider)")
        return {"display_conf": round(float(display_conf), 4), "display_conf_source": "set by hand at export"}
    from .evaluate import run_data

    generated = data is None and config.data.root is None
    try:
        root = Path(data) if data is not None else run_data(config)  # the run's: the generated set of its seed
        split = split or (config.data.val_split if data is None else None)
        return measure_display_conf(model, config, root, split, generated=generated, limit=limit,
                                    progress=progress)
    except (DatasetError, ValueError, OSError) as e:
        if data is not None:
            raise BundleError(f"cannot measure the display threshold on --data {data}: {e}") from None
        reason = str(e).splitlines()[0]
        if warn is not None:
            warn(f"display threshold not measured ({reason}); the bundle records the default "
                 f"{DEFAULT_DISPLAY_CONF:g}. Give --data PATH to measure it, or --display-conf X")
        return {"display_conf": DEFAULT_DISPLAY_CONF,
                "display_conf_source": f"the default, not measured ({reason})"}


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, hub_repo: str | None = None,
                      metrics_file: str | os.PathLike | None = None, fp16: bool = False,
                      data: str | os.PathLike | None = None, split: str | None = None,
                      display_conf: float | None = None, limit: int | None = None, progress: bool = False,
                      warn=None) -> Path:
    """A bundle from a `helpers.train` checkpoint, with the run's training summary and metrics, and
    the confidence threshold to show it at (`display_threshold`: data, split, display_conf, limit)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise BundleError(f"{checkpoint}: checkpoint file not found")
    refuse_existing(out, NEVER_OVERWRITTEN)  # before the (slow) load
    model, config = load_model(checkpoint)
    # Lightning's own counters; mmap so a full training state is not read a second time.
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    training = {"checkpoint": checkpoint.name, "epoch": raw.get("epoch"), "global_step": raw.get("global_step"),
                "lightning_version": raw.get("pytorch-lightning_version"),
                "epochs_planned": config.train.epochs, "image_size": config.data.image_size,
                "dataset": config.data.root, "train_split": config.data.train_split,
                "val_split": config.data.val_split}
    training["trained_on"], training["evaluated_on"] = describe_data(config)
    summary, source = run_metrics(checkpoint, config)
    metrics = summarise_run(summary)
    if source is not None:
        training["run_seconds"] = summary.get("seconds")
        metrics["source"] = str(source.name)
    if metrics_file is not None:
        extra = read_json(Path(metrics_file), "metrics")
        metrics.update(summarise_run(extra) if "metrics" in extra else extra)
        metrics["source"] = Path(metrics_file).name
    if fp16 and display_conf is None:  # measured on the weights the app will load: rounded to half precision
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.half())
    display = display_threshold(model, config, data=data, split=split, display_conf=display_conf, limit=limit,
                                progress=progress, warn=warn)
    return write_bundle(model, config, out, training=training, metrics=metrics, hub_repo=hub_repo, fp16=fp16,
                        display=display)


def export_bundle(bundle: str | os.PathLike, out: str | os.PathLike, *, hub_repo: str | None = None,
                  data: str | os.PathLike | None = None, split: str | None = None,
                  display_conf: float | None = None, limit: int | None = None, progress: bool = False,
                  warn=None) -> Path:
    """A new bundle from an existing one, with its display threshold (`display_threshold`, measured
    on the bundle's model): the weights file copied byte for byte (checked against the recorded
    hash), `config.json` as it was but for the `display_conf` fields (and `hub_repo` if given).

    For a bundle exported before `display_conf` existed, or one whose checkpoint is gone or was
    written by older code (exporting that checkpoint again would fill the config's newer fields with
    today's defaults, which the model was not trained with)."""
    bundle, out = Path(bundle), Path(out)
    refuse_existing(out, NEVER_OVERWRITTEN)
    info = read_bundle_config(bundle)
    weights = bundle / WEIGHTS
    recorded = info.get("weights_sha256")
    if recorded and weights.is_file() and _sha256(weights) != recorded:
        raise BundleError(f"{weights}: does not match the weights_sha256 recorded in {bundle / CONFIG}; "
                          "not re-issued (export the checkpoint again)")
    model, config = load_model(bundle)
    display = display_threshold(model, config, data=data, split=split, display_conf=display_conf, limit=limit,
                                progress=progress, warn=warn)
    info = {k: v for k, v in info.items() if not k.startswith("display_conf")} | display
    if hub_repo:
        info["hub_repo"] = hub_repo

    def fill(folder: Path) -> None:
        shutil.copyfile(weights, folder / WEIGHTS)
        (folder / CONFIG).write_text(json.dumps(info, indent=2) + "\n")

    return atomic_new_folder(out, fill, what=NEVER_OVERWRITTEN)


# --- command line -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from .evaluate import CheckpointCommandLine

    p = CheckpointCommandLine(
        "python -m helpers.export", "Export a training checkpoint as a model bundle for the app "
                                    "(model.safetensors + config.json).", purpose="measure on",
        checkpoint_help="a .ckpt written by helpers.train, a run or checkpoint folder (its newest), 'latest' "
                        "(the newest in --run-dir), or a bundle (re-issued with the same weights and a display "
                        "threshold measured now)",
        limit_help="measure on the first N images of the split only")
    p.add_argument("--out", required=True, help="new folder for the bundle (never overwritten)")
    p.add_argument("--hub-repo", help="Hugging Face model repo id the bundle will be published as (user/name)")
    p.add_argument("--metrics", help="a JSON file of evaluation metrics to include (e.g. from helpers.evaluate)")
    p.add_argument("--fp16", action="store_true", help="store the weights in half precision (half the size)")
    p.add_argument("--data", help="dataset (VOCdevkit or Kaggle/course folder) to choose the app's confidence "
                                  "threshold on (default: the checkpoint's, or the generated set it trained on)")
    p.add_argument("--split", help="its split (default: the checkpoint's evaluation split, else the layout's "
                                   "test split)")
    p.add_argument("--display-conf", type=float,
                   help="the app's starting confidence threshold, set by hand (nothing is measured)")
    args = p.parse_args(argv)
    if (removed := removed_temporaries(Path(args.out).absolute().parent, recursive=False)):
        print(removed, file=sys.stderr)  # a killed export's folder is as large as its weights
    try:
        checkpoint = resolve_checkpoint(args.checkpoint, args.run_dir)
        display = dict(data=args.data, split=args.split, display_conf=args.display_conf, limit=args.limit,
                       progress=True, warn=lambda m: print(f"note: {m}", file=sys.stderr))
        if checkpoint.is_dir():  # a bundle: re-issued with its weights as they are
            if args.fp16 or args.metrics:
                raise BundleError(f"{checkpoint} is a bundle: its weights and metrics are kept as they are "
                                  "(--fp16 and --metrics apply to training checkpoints)")
            out = export_bundle(checkpoint, args.out, hub_repo=args.hub_repo, **display)
        else:
            out = export_checkpoint(checkpoint, args.out, hub_repo=args.hub_repo, metrics_file=args.metrics,
                                    fp16=args.fp16, **display)
    except (BundleError, FileExistsError, FileNotFoundError, StorageFull, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = read_bundle_config(out)
    print(f"bundle written: {out}")
    print(f"  {WEIGHTS}  {(out / WEIGHTS).stat().st_size / 1e6:.1f} MB, {info['parameters']:,} parameters "
          f"({info['weights_dtype']})")
    print(f"  {CONFIG}  {info['num_classes']} classes, image size {info['image_size']}, width {info['width']}, "
          f"metrics: {', '.join(k for k in info['metrics'] if k != 'source') or 'none'}")
    print(f"  display_conf {info['display_conf']:g}: {info['display_conf_source']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
