"""Training: a short fit learns, the LR finder leaves no trace, a SIGKILLed run resumes on its schedule
line for line without rewriting a checkpoint, and 2-process DDP on CPU agrees on image sizes."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers.config import Config, DataConfig, ModelConfig, TrainConfig
from helpers.schedule import Schedule
from helpers.synthetic import make_voc_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    return make_voc_dataset(root, n_trainval=24, n_test=8, image_size=(96, 72), seed=3)


def tiny_config(data_root, run_dir, epochs=3, **train) -> Config:
    return Config(
        model=ModelConfig(num_classes=20, width=0.125),
        data=DataConfig(root=str(data_root), image_size=64, train_sizes=(64, 96), batch_size=4,
                        num_workers=0, mosaic=0.5, pin_memory=False),
        train=TrainConfig(epochs=epochs, max_lr=2e-3, pct_start=0.3, precision="32-true", accelerator="cpu",
                          run_dir=str(run_dir), **train),
    )


def read_metrics(run_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(Path(run_dir).glob("logs/version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def lr_by_step(run_dir: Path) -> dict[int, float]:
    """The LR logged at each optimizer step: Lightning logs step k's values with step = k."""
    return {int(r["step"]): float(r["lr"]) for r in read_metrics(run_dir) if r.get("lr")}


@pytest.mark.slow
def test_a_short_fit_lowers_the_loss(voc, tmp_path):
    from helpers.train import train

    cfg = tiny_config(voc, tmp_path / "run", epochs=6, map_every=0)
    cfg.data.mosaic = 0.0
    summary = train(cfg)
    losses = [float(r["train/loss_epoch"]) for r in read_metrics(tmp_path / "run") if r.get("train/loss_epoch")]
    assert len(losses) == 6
    assert losses[-1] < 0.7 * losses[0], losses
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["global_step"] == summary["global_step"] == 6 * 6
    for key in ("val/class_acc", "val/noobj_acc", "val/obj_acc", "val/map50_voc07", "val/map50_all"):
        assert key in written["metrics"], key


def test_the_lr_finder_leaves_model_and_optimizer_exactly_as_they_were(voc):
    from helpers.datamodule import YOLODataModule
    from helpers.lr_finder import find_lr
    from helpers.module import YOLOModule

    cfg = tiny_config(voc, "unused")
    module = YOLOModule(cfg.to_dict())
    optimizer = module.configure_optimizers()
    dm = YOLODataModule(cfg.data, seed=0)
    dm.setup("fit")
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    opt_before = optimizer.state_dict()
    result = find_lr(module.model, optimizer, dm.train_dataloader(), num_iter=12, end_lr=1.0)
    assert len(result.lrs) == len(result.losses) > 0 and result.lrs == sorted(result.lrs)
    for k, v in module.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert optimizer.state_dict()["state"] == opt_before["state"] == {}
    assert optimizer.param_groups[0]["lr"] == opt_before["param_groups"][0]["lr"]
    assert result.max_lr is None or min(result.lrs) <= result.max_lr <= result.steepest


@pytest.mark.slow
def test_lr_find_writes_its_plot_and_the_schedule_peaks_at_the_lr_it_chose(voc, tmp_path, monkeypatch):
    import helpers.lr_finder as lr_finder
    from helpers.schedule import Schedule
    from helpers.train import train

    chosen = []
    real = lr_finder.find_lr
    monkeypatch.setattr(lr_finder, "find_lr", lambda *a, **k: chosen.append(real(*a, **k)) or chosen[-1])
    train(tiny_config(voc, tmp_path / "run", epochs=1), lr_find=True)
    assert (tmp_path / "run" / "lr_finder.png").stat().st_size > 0
    schedule = Schedule.read(tmp_path / "run" / "schedule.txt")
    assert chosen[0].max_lr is not None
    assert schedule.spec.max_lr == pytest.approx(chosen[0].max_lr)
    assert 0.5 * chosen[0].max_lr < max(schedule.lrs) <= chosen[0].max_lr * (1 + 1e-6)  # peak between two steps


def range_test_curve(noise: float = 0.0):
    """100 LRs over 1e-7..1: the loss falls fastest at 1e-3 (a tanh step), bottoms out at 1e-1 and
    then blows up, as a range test's does."""
    rng = np.random.default_rng(0)
    lrs = np.logspace(-7, 0, 100)
    x = np.log10(lrs)
    loss = 10 - 4 * np.tanh(2 * (x + 3)) + np.where(x > -1, 40 * (x + 1) ** 2, 0.0)
    return lrs, loss + noise * rng.standard_normal(100)


def test_the_range_test_reading_takes_the_steepest_descent_without_the_trailing_average_lag():
    from helpers.lr_finder import read_curve

    lrs, loss = range_test_curve(noise=0.1)
    _, steepest, max_lr = read_curve(lrs, loss, skip_start=10, skip_end=5)
    assert 1e-3 / 1.5 < steepest < 1e-3 * 1.5
    assert max_lr == steepest  # a decade below the minimum already: not capped
    # torch-lr-finder's own trailing average (smooth_f=0.05) would put the steepest point far right.
    ema = [loss[0]]
    for v in loss[1:]:
        ema.append(0.05 * v + 0.95 * ema[-1])
    _, lagged, _ = read_curve(lrs, ema, window=1, skip_start=10, skip_end=5)
    assert lagged > 2.5e-3


def test_the_max_lr_is_capped_a_decade_below_the_loss_minimum():
    from helpers.lr_finder import read_curve

    lrs, loss = range_test_curve()
    x = np.log10(lrs)
    early = np.where(x > -2.5, loss + 200 * (x + 2.5), loss)  # blows up from 3e-3, half a decade after 1e-3
    smooth, steepest, max_lr = read_curve(lrs, early)
    lowest = lrs[int(np.argmin(smooth))]
    assert 1e-3 <= lowest <= 3.2e-3  # the smoothed curve's minimum, where it turns up
    assert max_lr == pytest.approx(lowest / 10) and max_lr < steepest
    assert read_curve(lrs[:2], loss[:2])[1:] == (None, None)  # too few points: no suggestion


def test_a_range_test_that_never_falls_or_turns_nan_gives_no_lr_below_or_beyond_its_evidence():
    from helpers.lr_finder import describe_choice, read_curve

    lrs, loss = range_test_curve()
    assert read_curve(lrs, np.linspace(10, 50, 100))[1:] == (None, None)  # only rises
    assert read_curve(lrs, np.full(100, 10.0))[1:] == (None, None)  # flat
    clean = read_curve(lrs, loss)[1:]
    late_nan = loss.copy()
    late_nan[85:] = np.nan  # fp16 overflow past the minimum: the curve ends there, the answer stands
    assert read_curve(lrs, late_nan)[1:] == pytest.approx(clean)
    early_nan = loss.copy()
    early_nan[20] = np.nan  # a NaN before anything fell: nothing to read
    assert read_curve(lrs, early_nan)[1:] == (None, None)
    assert "steepest descent of the smoothed loss" in describe_choice(SimpleNamespace(max_lr=1e-3, steepest=1e-3))
    assert "capped" in describe_choice(SimpleNamespace(max_lr=1e-4, steepest=1e-3))


# A driver run in a fresh process: it trains with the tiny config and, if asked, SIGKILLs itself
# in the middle of an epoch (right after a given step), as a Colab disconnect would.
DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    import pytorch_lightning as pl
    from helpers.config import Config
    from helpers.train import train

    class KillAt(pl.Callback):
        def __init__(self, step):
            self.step = step
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == self.step:
                os.kill(os.getpid(), signal.SIGKILL)

    class RecordSizes(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            with open(os.environ["SIZES_OUT"] + f".rank{trainer.global_rank}", "a") as f:
                f.write(f"{trainer.global_step} {batch[0].shape[-1]}\\n")
        def on_validation_epoch_end(self, trainer, module):
            acc = module.val_accuracy
            if acc.update_count:
                with acc.sync_context():
                    counted = int(acc.total_pos + acc.total_neg)
                with open(os.environ["SIZES_OUT"] + f".cells{trainer.global_rank}", "a") as f:
                    f.write(f"{counted} {int(acc.total_pos + acc.total_neg)}\\n")

    cfg = Config.from_dict(json.loads(sys.argv[1]))
    kill_at = int(sys.argv[2])
    resume = sys.argv[3] if len(sys.argv) > 3 else None
    extra = [KillAt(kill_at)] if kill_at >= 0 else []
    if os.environ.get("SIZES_OUT"):
        extra.append(RecordSizes())
    train(cfg, resume=resume, checkpoint_every_steps=4, extra_callbacks=extra)
""")


def run_driver(tmp_path, cfg: Config, kill_at: int = -1, resume: str | None = None, env=None, timeout=300):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    args = [sys.executable, str(script), json.dumps(cfg.to_dict()), str(kill_at)] + ([resume] if resume else [])
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_killed_run_resumes_on_its_schedule_line_for_line_and_rewrites_no_checkpoint(voc, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(voc, run, epochs=3)
    steps_per_epoch = 6  # 24 images / batch 4
    total = 3 * steps_per_epoch

    killed = run_driver(tmp_path, cfg, kill_at=9)  # step 9 is mid-epoch 2 (steps 7..12)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = run / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpts.glob("*.ckpt")}
    assert any("step=0000008" in n for n in before), sorted(before)  # a mid-epoch checkpoint (every 4 steps)
    # A checkpoint cut short by the disconnect (say, a half-synced Drive copy) must be skipped.
    (ckpts / "epoch=001-step=0000009-lr=1.0000e-03.ckpt").write_bytes(b"PK\x03\x04 truncated")

    resumed = run_driver(tmp_path, cfg, kill_at=-1, resume="latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "truncated or unreadable" in resumed.stderr + resumed.stdout

    for name, data in before.items():  # nothing written before the kill was rewritten
        assert (ckpts / name).read_bytes() == data, name
    schedule = Schedule.read(run / "schedule.txt")
    logged = lr_by_step(run)
    assert sorted(logged) == list(range(total)), sorted(logged)  # every step logged once, 0..total-1
    for step, lr in logged.items():
        assert lr == pytest.approx(schedule.lrs[step], rel=1e-6), step
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["global_step"] == total  # where an uninterrupted run ends (epochs x steps per epoch)


@pytest.mark.slow
def test_two_process_ddp_on_cpu_uses_one_image_size_per_step_and_syncs_accuracies(voc, tmp_path):
    cfg = tiny_config(voc, tmp_path / "run", epochs=2, strategy="ddp", devices=2)
    out = tmp_path / "sizes"
    done = run_driver(tmp_path, cfg, env={"SIZES_OUT": str(out), "MASTER_PORT": "29517"}, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    sizes = [dict(line.split() for line in Path(f"{out}.rank{r}").read_text().splitlines()) for r in (0, 1)]
    assert sizes[0] == sizes[1] and len(sizes[0]) == 2 * 3  # 24 images / (2 ranks x batch 4) = 3 steps
    assert len(set(sizes[0].values())) >= 1
    cells = [Path(f"{out}.cells{r}").read_text().split() for r in (0, 1)]
    synced0, local0 = map(int, cells[0][-2:])
    synced1, local1 = map(int, cells[1][-2:])
    assert synced0 == synced1 == local0 + local1  # both ranks see the whole set's counts
    assert local0 > 0 and local1 > 0
