"""Where the LR range test puts the max LR, with and without the objectness prior, read by each rule.

    python -m benchmarks.lr_rules                                   # the embedded default (generated shapes)
    python -m benchmarks.lr_rules --data ../shared/realdet/VOCdevkit --width 0.25 --size 224 --batch 8

Each case runs `helpers.train.lr_range_test` (the training path's own range test: 100 iterations,
seeded) on the training loader for `obj_prior` None and 0.01, writes the raw curve to
OUT/<case>.json and prints the max LR each rule reads off it:
- steepest: the steepest descent of the centred-smoothed loss (before its minimum), the reading
  shipped until 2026-12-08 (capped at min/10);
- min/10: a tenth of the LR of the smoothed loss's minimum (fastai's "minimum / 10");
- shipped: what `helpers.lr_finder.read_curve` returns now: min/10 where the fall stands clear of
  the noise (`CLEAR_OF_NOISE` x the raw losses' spread), else nothing (the configured LR is kept).
Which of them trains well is measured by training at the LR each gives (`python -m helpers.train
--max-lr X`), in benchmarks/RESULTS.md ("The LR range test with the objectness prior").
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

from helpers.datamodule import YOLODataModule
from helpers.lr_finder import read_curve, skips
from helpers.train import embedded_default, lr_range_test


def config(args, prior):
    cfg = embedded_default()
    cfg = replace(cfg, model=replace(cfg.model, obj_prior=prior))
    if args.data:
        cfg = replace(cfg, model=replace(cfg.model, width=args.width),
                      data=replace(cfg.data, root=args.data, image_size=args.size, train_sizes=(args.size,),
                                   batch_size=args.batch, mosaic=args.mosaic),
                      train=replace(cfg.train, lambda_class=args.lambda_class))
    return cfg


def readings(lrs, losses) -> dict:
    """What each rule reads off one raw curve, smoothed and trimmed as `helpers.lr_finder.find_lr` does,
    with the fall / noise ratio the shipped reading checks and the divergence edge (the first LR past
    the minimum where the smoothed loss doubles it)."""
    lo, skip_end = skips(len(lrs))
    smooth, _, shipped, clearance = read_curve(lrs, losses, skip_start=lo, skip_end=skip_end)
    smooth, lrs = np.asarray(smooth), np.asarray(lrs[: len(smooth)])
    lowest = lo + int(np.argmin(smooth[lo:len(smooth) - skip_end]))
    slope = np.gradient(smooth, np.log(lrs))
    doubled = np.flatnonzero(smooth[lowest:] > 2 * smooth[lowest])
    return {"steepest": float(lrs[lo + int(np.argmin(slope[lo:lowest + 1]))]), "min/10": float(lrs[lowest]) / 10,
            "shipped": shipped, "lowest_lr": float(lrs[lowest]), "start_loss": float(smooth[lo]),
            "lowest_loss": float(smooth[lowest]), "fall_over_noise": clearance,
            "edge_2x": float(lrs[lowest + doubled[0]]) if len(doubled) else None}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a VOCdevkit or Kaggle folder (default: the generated shapes)")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mosaic", type=float, default=0.75)
    p.add_argument("--lambda-class", type=float, default=1.0, help="with --data (the embedded default keeps its 10)")
    p.add_argument("--priors", default="none,0.01")
    p.add_argument("--out", type=Path, default=Path("benchmarks/lr_rules"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    case = "embedded" if not args.data else f"{Path(args.data).name}-w{args.width}-{args.size}px-b{args.batch}"
    for text in args.priors.split(","):
        prior = None if text == "none" else float(text)
        cfg = config(args, prior)
        pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
        dm = YOLODataModule(cfg.data, seed=cfg.train.seed)
        dm.prepare_data()
        dm.setup("fit")
        start = time.perf_counter()
        result = lr_range_test(cfg, dm)
        seconds = time.perf_counter() - start
        read = readings(result.lrs, result.losses)
        name = f"{case}-prior-{text}"
        (args.out / f"{name}.json").write_text(json.dumps(
            {"case": case, "obj_prior": prior, "config": cfg.to_dict(), "seconds": round(seconds, 1),
             "lrs": result.lrs, "losses": result.losses, "readings": read}, indent=1))
        print(f"{name}: " + ", ".join(f"{k} {v:.3g}" if v is not None else f"{k} none" for k, v in read.items())
              + f" ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
