"""Does a loss variant learn real photos? Course accuracies and mAP@0.5 over steps, per variant.

    python -m benchmarks.learning --data ../shared/realdet/VOCdevkit                 # both parts, all variants
    python -m benchmarks.learning --data DIR --part memorise --variants course,bce   # a selection

Parts, on any VOCdevkit or Kaggle/course folder (its default splits, or --train-split/--test-split):
- memorise: the first 16 images of the training split, trained on and evaluated on the same 16;
- generalise: the whole training split, evaluated on the test split.
Both: 0.25-width model at 224, batch 8, no mosaic (the project's train transforms otherwise), fp32,
Adam (weight decay 1e-4) with the project's OneCycle schedule (helpers.schedule: max LR 2e-3, warm-up
20%, div 100, final div 100, linear: the embedded default's shape) over the step budget, loss weights
the course's. Every --eval-every steps: YoloAccuracy (threshold 0.05) and voc_map of detect
(conf 0.05, NMS 0.45) at IoU 0.5, VOC07 11-point and all-point, plus the mean sigmoid(objectness) at
positive and negative cells. Each (part, variant) is written to OUT/<part>-<variant>.json as it ends
and OUT/curves.png is redrawn from every JSON there, so variants can run in separate processes.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from helpers.config import COURSE_LOSS, FULL_MODEL_TARGETS, DataConfig, ModelConfig, TrainConfig
from helpers.datamodule import YOLODataModule
from helpers.evaluate import Evaluator
from helpers.loss import YoloLoss
from helpers.metrics import judge_accuracies, verdict_sentence
from helpers.model import build_model
from helpers.schedule import OneCycleSpec, Schedule, ScheduleFileLR
from helpers.targets import build_targets
from helpers.utils import seed_everything

# name: the loss settings (TrainConfig fields) that differ from the course's (COURSE_LOSS), so a
# variant stays what it was measured as when TrainConfig's defaults move; "default" is TrainConfig's.
VARIANTS: dict[str, dict] = {
    "default": {},
    "course": {},
    "bce-iou": {"obj_loss": "bce", "obj_target_min": 0.0},
    "bce-floor0.5": {"obj_loss": "bce", "obj_target_min": 0.5},
    "bce-one": {"obj_loss": "bce", "obj_target_min": 1.0},
    "bce-iou-noobj30": {"obj_loss": "bce", "obj_target_min": 0.0, "lambda_noobj": 30.0},
    "bce-one-noobj30": {"obj_loss": "bce", "obj_target_min": 1.0, "lambda_noobj": 30.0},
    "bce-one-noobj100": {"obj_loss": "bce", "obj_target_min": 1.0, "lambda_noobj": 100.0},
    "bce-one-balanced": {"obj_loss": "bce", "obj_target_min": 1.0, "obj_balance": (0.4, 1.0, 4.0)},
    "bce-one-noobj30-balanced": {"obj_loss": "bce", "obj_target_min": 1.0, "lambda_noobj": 30.0,
                                 "obj_balance": (0.4, 1.0, 4.0)},
    "bce-floor0.5-noobj30-balanced": {"obj_loss": "bce", "obj_target_min": 0.5, "lambda_noobj": 30.0,
                                      "obj_balance": (0.4, 1.0, 4.0)},
    "bce-one-noobj50-balanced": {"obj_loss": "bce", "obj_target_min": 1.0, "lambda_noobj": 50.0,
                                 "obj_balance": (0.4, 1.0, 4.0)},
    "bce-one-noobj100-balanced": {"obj_loss": "bce", "obj_target_min": 1.0, "lambda_noobj": 100.0,
                                  "obj_balance": (0.4, 1.0, 4.0)},
    "bce-one-noobj150-balanced": {"obj_loss": "bce", "obj_target_min": 1.0, "lambda_noobj": 150.0,
                                  "obj_balance": (0.4, 1.0, 4.0)},
    "bce-one-noobj100-balanced-prior": {"obj_loss": "bce", "obj_target_min": 1.0, "lambda_noobj": 100.0,
                                        "obj_balance": (0.4, 1.0, 4.0), "obj_prior": 0.01},
    "bce-one-noobj200-balanced": {"obj_loss": "bce", "obj_target_min": 1.0, "lambda_noobj": 200.0,
                                  "obj_balance": (0.4, 1.0, 4.0)},
    "bce-floor0.5-noobj100-balanced": {"obj_loss": "bce", "obj_target_min": 0.5, "lambda_noobj": 100.0,
                                       "obj_balance": (0.4, 1.0, 4.0)},
    "bce-one-noobj100-balanced-class10": {"obj_loss": "bce", "obj_target_min": 1.0, "lambda_noobj": 100.0,
                                          "obj_balance": (0.4, 1.0, 4.0), "lambda_class": 10.0},
    "bce-one-noobj100-balanced-class3": {"obj_loss": "bce", "obj_target_min": 1.0, "lambda_noobj": 100.0,
                                         "obj_balance": (0.4, 1.0, 4.0), "lambda_class": 3.0},
    "bce-one-giou": {"obj_loss": "bce", "obj_target_min": 1.0, "box_loss": "giou"},
}
MODEL_FIELDS = ("obj_prior",)  # ModelConfig settings a variant may set beside the loss's
COURSE_MODEL = {"obj_prior": None}  # the course's initialisation: PyTorch's
LOSS_FIELDS = ("obj_loss", "box_loss", "obj_target_min", "obj_balance", "lambda_class", "lambda_noobj", "lambda_obj", "lambda_box")
SIZE, BATCH, WIDTH, MAX_LR, MEMORISE_N = 224, 8, 0.25, 2e-3, 16
MIN_MAP = 0.50  # the memorise protocol's mAP@0.5 (VOC07) bar, beside the full model's accuracy targets


def datamodule(root: str, part: str, train_split: str | None, test_split: str | None) -> YOLODataModule:
    splits = {k: v for k, v in (("train_split", train_split), ("val_split", test_split)) if v}
    dm = YOLODataModule(DataConfig(root=root, image_size=SIZE, train_sizes=(SIZE,), batch_size=BATCH,
                                   num_workers=0, mosaic=0.0, **splits))
    dm.setup("fit")
    if part == "memorise":  # the first 16 training images, evaluated on themselves
        dm.train_dataset.records = dm.train_dataset.records[:MEMORISE_N]
        dm.val_dataset.records = dm.train_dataset.records
    return dm


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device) -> dict:
    """The project's `Evaluator` (course thresholds), plus the mean sigmoid(objectness) at positive and
    negative cells."""
    model.eval()
    evaluator = Evaluator(loader.dataset.classes).to(device)
    obj_sum, obj_n = {1: 0.0, 0: 0.0}, {1: 0, 0: 0}
    for batch in loader:
        batch = batch.to(device)
        outputs = targets = None
        if len(batch):
            outputs = model(batch.images)
            targets = build_targets(batch.boxes, len(batch), batch.image_hw)
            for o, t in zip(outputs, targets):
                for k in (1, 0):
                    sel = torch.sigmoid(o[..., 0][t[..., 0] == k])
                    obj_sum[k] += float(sel.sum())
                    obj_n[k] += sel.numel()
        evaluator.update(outputs, batch, targets)
    model.train()
    result = evaluator.compute()
    out = {k: round(result[k], 2) for k in ("class_acc", "noobj_acc", "obj_acc")}
    out["map50_voc07"] = round(result["map50_voc07"] or 0.0, 6)  # 6 places: early points are near 0
    out["map50_all"] = round(result["map50_all"] or 0.0, 6)
    out["obj_pos"] = round(obj_sum[1] / max(obj_n[1], 1), 4)
    out["obj_neg"] = round(obj_sum[0] / max(obj_n[0], 1), 5)
    return out


def memorise_folder(root: str, dest: Path) -> Path:
    """A VOCdevkit at `dest` whose split "memorise" is the memorise part's 16 images (links to `root`'s
    files), so that `python -m helpers.train` can run the same protocol."""
    dm = datamodule(root, "memorise", None, None)
    voc = dest / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for record in dm.train_dataset.records:
        image = Path(record.image_path)
        xml = image.parent.parent / "Annotations" / f"{image.stem}.xml"
        for src, dst in ((image, voc / "JPEGImages" / image.name), (xml, voc / "Annotations" / xml.name)):
            if not dst.exists():
                dst.symlink_to(src.resolve())
        ids.append(image.stem)
    (voc / "ImageSets" / "Main" / "memorise.txt").write_text("\n".join(ids) + "\n")
    return dest / "VOCdevkit"


def train_command(data: Path, run_dir: Path, steps: int, variant: str, seed: int) -> list[str]:
    """`python -m helpers.train` running the memorise protocol: 2 batches an epoch, steps / 2 epochs."""
    flags = {"data": data, "train-split": "memorise", "val-split": "memorise", "width": WIDTH, "image-size": SIZE,
             "train-sizes": f"[{SIZE}]", "batch-size": BATCH, "num-workers": 0, "mosaic": 0, "epochs": steps // 2,
             "max-lr": MAX_LR, "weight-decay": 1e-4, "optimizer": "adam", "pct-start": 0.2, "div-factor": 100,
             "final-div-factor": 100, "anneal-strategy": "linear", "precision": "32-true", "accuracy-every": 25,
             "map-every": 25, "checkpoint-every-minutes": 0, "keep-last-k": 1, "seed": seed, "run-dir": run_dir}
    # every loss and model setting spelled out: the preset's own never leaks in
    flags.update({k.replace("_", "-"): f"[{','.join(map(str, v))}]" if isinstance(v, tuple) else
                  "null" if v is None else v for k, v in settings_of(variant).items()})
    return [sys.executable, "-m", "helpers.train", *(x for k, v in flags.items() for x in (f"--{k}", str(v)))]


def run_cli(root: str, out: Path, variant: str, steps: int, seed: int) -> dict:
    """The memorise protocol through `python -m helpers.train`, read back from its metrics.json."""
    work = out / f"memorise-cli-{variant}"
    data = memorise_folder(root, work / "data")
    command = train_command(data, work / "run", steps, variant, seed)
    print("  " + " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    summary = json.loads((work / "run" / "metrics.json").read_text())
    m = summary["metrics"]
    last = {"step": summary["global_step"], **{k: round(m.get(f"val/{k}", float("nan")), 2)
                                              for k in ("class_acc", "noobj_acc", "obj_acc")},
            "map50_voc07": round(m.get("val/map50_voc07", 0.0), 4), "map50_all": round(m.get("val/map50_all", 0.0), 4)}
    return {"variant": variant, "settings": settings_of(variant),
            "steps": summary["global_step"], "command": " ".join(command[1:]), "verdict_of_run": summary.get("verdict"),
            "seconds": round(time.perf_counter() - started, 1), "curve": [last]}


def loss_settings(variant: str) -> TrainConfig:
    """TrainConfig's defaults for "default"; for any other variant, the course's loss (COURSE_LOSS)
    with the variant's settings on top."""
    if variant == "default":
        return TrainConfig()
    loss = {k: v for k, v in VARIANTS[variant].items() if k not in MODEL_FIELDS}
    return replace(TrainConfig(), **{**COURSE_LOSS, **loss})


def model_settings(variant: str) -> ModelConfig:
    """The protocol's model (WIDTH) with ModelConfig's defaults for "default", else the course's
    initialisation (COURSE_MODEL) with the variant's model settings on top."""
    model = ModelConfig(width=WIDTH)
    if variant == "default":
        return model
    return replace(model, **{**COURSE_MODEL, **{k: v for k, v in VARIANTS[variant].items() if k in MODEL_FIELDS}})


def settings_of(variant: str) -> dict:
    """Every setting a variant's run used, as recorded in its JSON."""
    loss, model = loss_settings(variant), model_settings(variant)
    return {**{k: getattr(loss, k) for k in LOSS_FIELDS}, **{k: getattr(model, k) for k in MODEL_FIELDS}}


def run(dm: YOLODataModule, variant: str, steps: int, eval_every: int, seed: int, device: torch.device,
        save=None) -> dict:
    """Train the variant for `steps`, evaluating every `eval_every`; `save(partial result)` after each
    evaluation (a run cut short still leaves its curve so far)."""
    seed_everything(seed)
    t = loss_settings(variant)
    model = build_model(replace(model_settings(variant), num_classes=len(dm.cfg.classes))).to(device)
    loss_fn = YoloLoss.from_config(t).to(device)
    schedule = Schedule.compute(OneCycleSpec(max_lr=MAX_LR, epochs=1, steps_per_epoch=steps, batch_size=BATCH,
                                             dataset_length=len(dm.train_dataset), pct_start=0.2, div_factor=100.0,
                                             final_div_factor=100.0, anneal_strategy="linear"))
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.lr_at(0), weight_decay=1e-4)
    scheduler = ScheduleFileLR(optimizer, schedule)
    train_loader, eval_loader = dm.train_dataloader(), dm.val_dataloader()
    curve, step, epoch, started = [], 0, 0, time.perf_counter()
    train_seconds = 0.0
    while step < steps:
        train_loader.batch_sampler.set_epoch(epoch)
        for batch in train_loader:
            batch = batch.to(device)
            t0 = time.perf_counter()
            parts = loss_fn.parts(model(batch.images), build_targets(batch.boxes, len(batch), batch.image_hw))
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            optimizer.step()
            scheduler.step()
            train_seconds += time.perf_counter() - t0
            step += 1
            if step % eval_every == 0 or step == steps:
                point = {"step": step, "loss": round(float(parts.total.detach()), 4), "obj": round(float(parts.obj.detach()), 4),
                         "noobj": round(float(parts.noobj.detach()), 4), **evaluate(model, eval_loader, device)}
                curve.append(point)
                if save is not None:
                    save({"variant": variant, "seed": seed, "steps_done": step, "curve": curve})
                print(f"  {variant:9s} step {step:4d}  " + "  ".join(f"{k} {v}" for k, v in point.items()
                                                                        if k != "step"), flush=True)
            if step >= steps:
                break
        epoch += 1
    return {"variant": variant, "seed": seed, "settings": settings_of(variant), "steps": steps,
            "device": device.type, "train_images": len(dm.train_dataset), "eval_images": len(dm.val_dataset),
            "seconds": round(time.perf_counter() - started, 1),
            "train_ms_per_step": round(1000 * train_seconds / steps, 1), "curve": curve}


def verdict(point: dict) -> str:
    """The memorise protocol's bar: the full model's accuracy targets and mAP@0.5 (VOC07) >= MIN_MAP."""
    checks = judge_accuracies(point, FULL_MODEL_TARGETS)
    ok = all(c.passed for c in checks) and point["map50_voc07"] >= MIN_MAP
    return ("meets all four" if ok else "misses") + f" ({verdict_sentence(checks)}; mAP@0.5 {point['map50_voc07']:.3f} " \
           f"{'>=' if point['map50_voc07'] >= MIN_MAP else '<'} {MIN_MAP})"


def plot(out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    runs = [r for r in runs if r["part"] in ("memorise", "generalise")]  # memorise-cli: one point each
    for r in runs:
        r["variant"] += f" seed {r['seed']}" if r.get("seed") else ""
    parts = sorted({r["part"] for r in runs}, reverse=True)  # memorise, generalise
    keys = [("map50_voc07", "mAP@0.5 (VOC07)", MIN_MAP), ("class_acc", "class acc %", FULL_MODEL_TARGETS.class_acc),
            ("noobj_acc", "no-object acc %", FULL_MODEL_TARGETS.noobj_acc),
            ("obj_acc", "object acc %", FULL_MODEL_TARGETS.obj_acc)]
    names = sorted({r["variant"] for r in runs})
    colours = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(names)}  # same in every panel
    fig, axes = plt.subplots(len(parts), len(keys), figsize=(4 * len(keys), 3.2 * len(parts)), squeeze=False)
    for row, part in zip(axes, parts):
        for ax, (key, title, target) in zip(row, keys):
            for r in (r for r in runs if r["part"] == part):
                ax.plot([p["step"] for p in r["curve"]], [p[key] for p in r["curve"]], marker=".", label=r["variant"],
                        color=colours[r["variant"]])
            if key != "map50_voc07" or part == "memorise":  # MIN_MAP is the memorise protocol's bar
                ax.axhline(target, color="k", linestyle="--", linewidth=1, label="target")
            if key == "noobj_acc":  # the interesting range
                ax.set_ylim(max(0.0, ax.get_ylim()[0]), 100.5)
            if key == "map50_voc07" and part == "generalise":  # values near 0: linear below 1e-4, log above
                ax.set_yscale("symlog", linthresh=1e-4)
            ax.set_title(f"{part}: {title}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=90)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a VOCdevkit or Kaggle/course folder")
    p.add_argument("--part", choices=("memorise", "generalise", "both", "memorise-cli"), default="both",
                   help="memorise-cli: the memorise protocol through python -m helpers.train (its metrics.json)")
    p.add_argument("--variants", default="default,course", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=600, help="memorise: optimizer steps")
    p.add_argument("--generalise-steps", type=int, default=1500, help="generalise: optimizer steps")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--train-split", help="default: the layout's")
    p.add_argument("--test-split", help="default: the layout's")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/learning"))
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"{name}, torch {torch.__version__}, {args.threads} thread(s), {time.strftime('%Y-%m-%d %H:%M')}")
    if args.part == "memorise-cli":
        for variant in variants:
            result = {"part": "memorise-cli", **run_cli(args.data, args.out, variant, args.steps, args.seed)}
            (args.out / f"memorise-cli-{variant}.json").write_text(json.dumps(result, indent=1))
            print(f"memorise-cli {variant}: {verdict(result['curve'][-1])}  [{result['seconds']} s]", flush=True)
        return 0
    parts = ("memorise", "generalise") if args.part == "both" else (args.part,)
    for part in parts:
        dm = datamodule(args.data, part, args.train_split, args.test_split)
        steps = args.steps if part == "memorise" else args.generalise_steps
        print(f"{part}: train {len(dm.train_dataset)} images, evaluate {len(dm.val_dataset)}, {steps} steps")
        for variant in variants:
            path = args.out / f"{part}-{variant}{'' if args.seed == 0 else f'-seed{args.seed}'}.json"
            def save(partial, path=path, part=part):
                path.write_text(json.dumps({"part": part, **partial, "complete": False}, indent=1))
            result = {"part": part, **run(dm, variant, steps, args.eval_every, args.seed, device, save)}
            path.write_text(json.dumps(result, indent=1))
            last = result["curve"][-1]
            print(f"{part} {variant}: class {last['class_acc']}%  no-object {last['noobj_acc']}%  object "
                  f"{last['obj_acc']}%  mAP@0.5 {last['map50_voc07']} (VOC07) / {last['map50_all']} (all)  "
                  f"[{result['seconds']} s, {result['train_ms_per_step']} ms/step]", flush=True)
            if part == "memorise":
                print(f"{part} {variant}: {verdict(last)}", flush=True)
    print(f"plot: {plot(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
