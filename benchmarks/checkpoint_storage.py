"""What the course run's checkpoints take on disk, measured on real files.

    python -m benchmarks.checkpoint_storage            # CPU: a few steps of the full model at 64 px

Trains the course's full-size model (width 1.0, Adam) for a few steps through `helpers.train.train`
(tiny generated images, so a CPU can do it), with the course preset's checkpoint policy, then
prints the measured size of one full training state and of one epoch's weights file, the estimate
`helpers.checkpoints.storage_plan` makes from the parameter count, and what a 40-epoch run keeps.
The sizes do not depend on the image size or the device: the same tensors are saved.
"""
from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path

import torch

from helpers.checkpoints import storage_plan
from helpers.model import YOLOv3
from helpers.storage import human
from helpers.synthetic import make_voc_dataset
from helpers.train import course_preset, train
from helpers.weights import NAME


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = make_voc_dataset(Path(tmp) / "voc", n_trainval=8, n_test=2, image_size=(64, 48), seed=0)
        cfg = course_preset()
        cfg.data.root, cfg.data.image_size, cfg.data.train_sizes = str(root), 64, (64,)
        cfg.data.batch_size, cfg.data.num_workers, cfg.data.mosaic = 2, 0, 0.0
        t = cfg.train
        t.epochs, t.pct_start, t.precision, t.accelerator = 2, 0.3, "32-true", "cpu"
        t.run_dir, t.limit_val_batches = str(Path(tmp) / "run"), 1
        started = time.time()
        train(cfg)
        ckpts = Path(tmp) / "run" / "checkpoints"
        full = [p.stat().st_size for p in ckpts.glob("*.ckpt") if NAME.search(p.name)]
        weights = [p.stat().st_size for p in (ckpts / "weights").glob("*.ckpt")]
        plan = storage_plan(YOLOv3(num_classes=20, width=1.0), epochs=40, keep_last_k=t.keep_last_k,
                            optimizer=t.optimizer)
        print(f"\n{platform.node()} {platform.machine()}, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d')}, {time.time() - started:.0f} s")
        print(f"full training state: measured {human(max(full))} ({max(full):,} B), estimated "
              f"{human(plan.full_state)} ({max(full) / plan.full_state - 1:+.2%})")
        print(f"one epoch's weights (fp16): measured {human(max(weights))} ({max(weights):,} B), estimated "
              f"{human(plan.weights)} ({max(weights) / plan.weights - 1:+.2%})")
        kept = (t.keep_last_k + 1) * max(full) + 40 * max(weights)
        print(f"course preset, 40 epochs: {t.keep_last_k} full states (+1 while the next is written) + 40 weight "
              f"files = {human(kept)} at most; keeping every epoch's full state instead: {human(40 * max(full))}")


if __name__ == "__main__":
    main()
