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
import time
from pathlib import Path

import torch

from helpers.config import DataConfig
from helpers.datamodule import YOLODataModule
from helpers.evaluate import Evaluator
from helpers.loss import YoloLoss
from helpers.model import YOLOv3
from helpers.schedule import OneCycleSpec, Schedule, ScheduleFileLR
from helpers.targets import build_targets
from helpers.utils import seed_everything

VARIANTS = {  # name: (obj_loss, box_loss)
    "course": ("mse", "mse"),
    "bce": ("bce", "mse"),
    "bce+giou": ("bce", "giou"),
    "bce+ciou": ("bce", "ciou"),
}
SIZE, BATCH, WIDTH, MAX_LR, MEMORISE_N = 224, 8, 0.25, 2e-3, 16


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
def evaluate(model: torch.nn.Module, loader) -> dict:
    """The project's `Evaluator` (course thresholds), plus the mean sigmoid(objectness) at positive and
    negative cells."""
    model.eval()
    evaluator = Evaluator(loader.dataset.classes)
    obj_sum, obj_n = {1: 0.0, 0: 0.0}, {1: 0, 0: 0}
    for batch in loader:
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
    out["map50_voc07"] = round(result["map50_voc07"] or 0.0, 4)
    out["map50_all"] = round(result["map50_all"] or 0.0, 4)
    out["obj_pos"] = round(obj_sum[1] / max(obj_n[1], 1), 4)
    out["obj_neg"] = round(obj_sum[0] / max(obj_n[0], 1), 5)
    return out


def run(dm: YOLODataModule, variant: str, steps: int, eval_every: int, seed: int, lambda_noobj: float) -> dict:
    seed_everything(seed)
    obj_loss, box_loss = VARIANTS[variant]
    model = YOLOv3(num_classes=len(dm.cfg.classes), width=WIDTH)
    loss_fn = YoloLoss(obj_loss=obj_loss, box_loss=box_loss, lambda_noobj=lambda_noobj)
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
                         "noobj": round(float(parts.noobj.detach()), 4), **evaluate(model, eval_loader)}
                curve.append(point)
                print(f"  {variant:9s} step {step:4d}  " + "  ".join(f"{k} {v}" for k, v in point.items()
                                                                        if k != "step"), flush=True)
            if step >= steps:
                break
        epoch += 1
    return {"variant": variant, "obj_loss": obj_loss, "box_loss": box_loss, "lambda_noobj": lambda_noobj,
            "steps": steps, "train_images": len(dm.train_dataset), "eval_images": len(dm.val_dataset),
            "seconds": round(time.perf_counter() - started, 1),
            "train_ms_per_step": round(1000 * train_seconds / steps, 1), "curve": curve}


def plot(out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    parts = sorted({r["part"] for r in runs}, reverse=True)  # memorise, generalise
    keys = [("map50_voc07", "mAP@0.5 (VOC07)"), ("class_acc", "class acc %"), ("noobj_acc", "no-object acc %"),
            ("obj_acc", "object acc %")]
    def label(r):
        return r["variant"] + ("" if r["lambda_noobj"] == 10 else f" noobj×{r['lambda_noobj']:g}")

    colours = {name: f"C{i}" for i, name in enumerate(sorted({label(r) for r in runs}))}  # same colour in every panel
    fig, axes = plt.subplots(len(parts), len(keys), figsize=(4 * len(keys), 3.2 * len(parts)), squeeze=False)
    for row, part in zip(axes, parts):
        for ax, (key, title) in zip(row, keys):
            for r in (r for r in runs if r["part"] == part):
                ax.plot([p["step"] for p in r["curve"]], [p[key] for p in r["curve"]], marker=".", label=label(r),
                        color=colours[label(r)])
            ax.set_title(f"{part}: {title}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=90)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a VOCdevkit or Kaggle/course folder")
    p.add_argument("--part", choices=("memorise", "generalise", "both"), default="both")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=300, help="memorise: optimizer steps")
    p.add_argument("--generalise-steps", type=int, default=600, help="generalise: optimizer steps")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--lambda-noobj", type=float, default=10.0, help="the no-object weight (course: 10)")
    p.add_argument("--train-split", help="default: the layout's")
    p.add_argument("--test-split", help="default: the layout's")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/learning"))
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    parts = ("memorise", "generalise") if args.part == "both" else (args.part,)
    for part in parts:
        dm = datamodule(args.data, part, args.train_split, args.test_split)
        steps = args.steps if part == "memorise" else args.generalise_steps
        print(f"{part}: train {len(dm.train_dataset)} images, evaluate {len(dm.val_dataset)}, {steps} steps")
        for variant in variants:
            result = {"part": part, **run(dm, variant, steps, args.eval_every, args.seed, args.lambda_noobj)}
            suffix = "" if args.lambda_noobj == 10 else f"-noobj{args.lambda_noobj:g}"
            (args.out / f"{part}-{variant}{suffix}.json").write_text(json.dumps(result, indent=1))
            last = result["curve"][-1]
            print(f"{part} {variant}: class {last['class_acc']}%  no-object {last['noobj_acc']}%  object "
                  f"{last['obj_acc']}%  mAP@0.5 {last['map50_voc07']} (VOC07) / {last['map50_all']} (all)  "
                  f"[{result['seconds']} s, {result['train_ms_per_step']} ms/step]", flush=True)
    print(f"plot: {plot(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
