"""Model bundle for the app: `model.safetensors` (the weights) + `config.json` (everything else).

A bundle is a folder that loads without unpickling anything: safetensors holds only tensors, JSON
only plain values. `config.json` says what the app needs to run and to describe the model:

    {"format": "yolov3-voc-bundle", "format_version": 1,
     "classes": [...20 names], "num_classes": 20, "anchors": 3x3 (w, h) fractions, "strides": [32, 16, 8],
     "image_size": 416, "width": 1.0, "parameters": 61626049,
     "config": Config.to_dict(), "training": {epoch, global_step, trained_on, evaluated_on, ...},
     "metrics": {...}, "hub_repo": "user/name" or null, "weights_dtype": "float32" | "float16",
     "weights_sha256": "...", "created": "...Z"}

`training.trained_on` and `training.evaluated_on` say in words what data the weights were trained
and measured on (the app's About section shows them with the metrics); they are written at export
time from the checkpoint's config, never typed by hand. `--fp16` stores the floating-point weights
in half precision (half the bytes; loading casts them back to float32).

`python -m helpers.export --checkpoint CKPT --out DIR [--hub-repo ID] [--metrics FILE] [--fp16]` writes one
from a training checkpoint; the run's `metrics.json` (written by `helpers.train` in the run folder,
the parent of the checkpoint folder) is read when present. An existing bundle is never replaced:
the export refuses and asks for a new folder. The folder is assembled under a temporary name and
renamed into place, so a half-written bundle never carries the final name (`storage.atomic_new_folder`).
Reading a bundle (`read_bundle_config`, `load_bundle`) is `helpers.weights`'s, the app's only import.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import ANCHORS, STRIDES, Config
from .model import YOLOv3, count_parameters
from .storage import StorageFull, atomic_new_folder, refuse_existing
from .weights import (
    CONFIG,
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
                  hub_repo: str | None = None) -> dict[str, Any]:
    """The `config.json` content for `model` trained with `config` (weights hash added on write)."""
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
    }


def write_bundle(model: YOLOv3, config: Config, out: str | os.PathLike, *, training: dict | None = None,
                 metrics: dict | None = None, hub_repo: str | None = None, fp16: bool = False) -> Path:
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
    info = bundle_config(model, config, training=training, metrics=metrics, hub_repo=hub_repo)
    info["weights_dtype"] = "float16" if fp16 else "float32"

    def fill(folder: Path) -> None:
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt", "bundle_format": FORMAT})
        info["weights_sha256"] = _sha256(folder / WEIGHTS)
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


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, hub_repo: str | None = None,
                      metrics_file: str | os.PathLike | None = None, fp16: bool = False) -> Path:
    """A bundle from a `helpers.train` checkpoint, with the run's training summary and metrics."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise BundleError(f"{checkpoint}: checkpoint file not found")
    refuse_existing(out, NEVER_OVERWRITTEN)  # before the (slow) load
    model, config = load_model(checkpoint)
    # Lightning's own counters; mmap so a 700 MB checkpoint is not read a second time.
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
    return write_bundle(model, config, out, training=training, metrics=metrics, hub_repo=hub_repo, fp16=fp16)


# --- command line -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m helpers.export",
                                description="Export a training checkpoint as a model bundle for the app "
                                            "(model.safetensors + config.json).")
    p.add_argument("--checkpoint", required=True,
                   help="a .ckpt written by helpers.train, a run or checkpoint folder (its newest), or 'latest' "
                        "(the newest in --run-dir)")
    p.add_argument("--run-dir", default="runs/default", help="the run that --checkpoint latest looks in")
    p.add_argument("--out", required=True, help="new folder for the bundle (never overwritten)")
    p.add_argument("--hub-repo", help="Hugging Face model repo id the bundle will be published as (user/name)")
    p.add_argument("--metrics", help="a JSON file of evaluation metrics to include (e.g. from helpers.evaluate)")
    p.add_argument("--fp16", action="store_true", help="store the weights in half precision (half the size)")
    args = p.parse_args(argv)
    try:
        checkpoint = resolve_checkpoint(args.checkpoint, args.run_dir)
        out = export_checkpoint(checkpoint, args.out, hub_repo=args.hub_repo, metrics_file=args.metrics,
                                fp16=args.fp16)
    except (BundleError, FileExistsError, FileNotFoundError, StorageFull, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = read_bundle_config(out)
    print(f"bundle written: {out}")
    print(f"  {WEIGHTS}  {(out / WEIGHTS).stat().st_size / 1e6:.1f} MB, {info['parameters']:,} parameters "
          f"({info['weights_dtype']})")
    print(f"  {CONFIG}  {info['num_classes']} classes, image size {info['image_size']}, width {info['width']}, "
          f"metrics: {', '.join(k for k in info['metrics'] if k != 'source') or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
