"""Training: a short fit learns, the LR finder leaves no trace, a SIGKILLed run resumes on its schedule
line for line without rewriting a checkpoint, and 2-process DDP on CPU agrees on image sizes."""
from __future__ import annotations

import csv
import dataclasses
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
import pytorch_lightning as pl
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
    """The LR logged at each optimizer step over every session of the run (Lightning logs step k's
    values with step = k); a step logged twice is an error."""
    from helpers.run_logs import read_run_metrics

    cols = read_run_metrics(run_dir)
    logged = [(int(step), lr) for step, lr in zip(cols["step"], cols["lr"]) if lr == lr]
    assert len({step for step, _ in logged}) == len(logged), "a step logged twice"
    return dict(logged)


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
    # the graded accuracies against the run's targets (a 0.25-width model: the reduced model's)
    for name, target in (("class_acc", 75.0), ("noobj_acc", 95.0), ("obj_acc", 70.0)):
        judged = written["accuracy_targets"][name]
        assert judged["target"] == target and judged["value"] == pytest.approx(written["metrics"][f"val/{name}"])
        assert judged["passed"] == (judged["value"] >= target)
    assert written["verdict"].startswith("passes all three" if all(
        j["passed"] for j in written["accuracy_targets"].values()) else "misses")


def test_the_lr_finder_leaves_model_and_optimizer_exactly_as_they_were(voc):
    from helpers.datamodule import YOLODataModule
    from helpers.lr_finder import find_lr
    from helpers.module import YOLOModule, build_optimizer

    cfg = tiny_config(voc, "unused")
    module = YOLOModule(cfg.to_dict())
    optimizer = build_optimizer(module.model.parameters(), cfg.train, cfg.train.max_lr)
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
    assert result.max_lr is None or (min(result.lrs) <= result.lowest <= max(result.lrs)
                                     and result.max_lr == pytest.approx(result.lowest / 10))


def test_the_range_test_prints_nothing_of_its_own(voc, capsys):
    """torch-lr-finder prints "See the graph with {finder_name}.plot()" (a literal placeholder)."""
    from helpers.datamodule import YOLODataModule
    from helpers.lr_finder import find_lr
    from helpers.module import YOLOModule, build_optimizer

    cfg = tiny_config(voc, "unused")
    module = YOLOModule(cfg.to_dict())
    dm = YOLODataModule(cfg.data, seed=0)
    dm.setup("fit")
    capsys.readouterr()
    find_lr(module.model, build_optimizer(module.model.parameters(), cfg.train, 1e-3), dm.train_dataloader(),
            num_iter=3)
    assert capsys.readouterr().out == ""


def test_the_command_without_data_says_first_that_it_trains_on_generated_shapes(monkeypatch, capsys):
    import helpers.train as train_module
    from helpers.annotations import DatasetError

    def stop(cfg, **kwargs):
        raise DatasetError("stopped here by the test")

    monkeypatch.setattr(train_module, "train", stop)
    assert train_module.main([]) == 2
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "generated shapes" in out[0] and "not PASCAL VOC" in out[0], out


@pytest.mark.slow
def test_lr_find_writes_its_plot_and_the_schedule_peaks_at_the_lr_it_chose(voc, tmp_path, monkeypatch):
    import helpers.lr_finder as lr_finder
    from helpers.schedule import Schedule
    from helpers.train import train

    chosen = []
    real = lr_finder.find_lr
    monkeypatch.setattr(lr_finder, "find_lr", lambda *a, **k: chosen.append(real(*a, **k)) or chosen[-1])
    cfg = tiny_config(voc, tmp_path / "run", epochs=1)
    cfg.model.obj_prior = None  # PyTorch's init: the no-object term's fall gives the range test a curve to read
    train(cfg, lr_find=True)
    assert (tmp_path / "run" / "lr_finder.png").stat().st_size > 0
    schedule = Schedule.read(tmp_path / "run" / "schedule.txt")
    assert chosen[0].max_lr is not None and schedule.spec.max_lr_source == "given"
    assert schedule.spec.max_lr == pytest.approx(chosen[0].max_lr)
    assert 0.5 * chosen[0].max_lr < max(schedule.lrs) <= chosen[0].max_lr * (1 + 1e-6)  # peak between two steps


@pytest.mark.slow
def test_a_range_test_with_no_suggestion_keeps_the_configured_max_lr_and_says_so(voc, tmp_path, monkeypatch, capsys):
    import helpers.lr_finder as lr_finder
    from helpers.schedule import Schedule
    from helpers.train import train

    monkeypatch.setattr(lr_finder, "CLEAR_OF_NOISE", float("inf"))  # no fall is clear of this noise
    train(tiny_config(voc, tmp_path / "run", epochs=1), lr_find=True)
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("LR finder:")]
    assert len(said) == 1 and "no suggestion" in said[0] and "keeping the configured max LR 0.002" in said[0]
    assert (tmp_path / "run" / "lr_finder.png").stat().st_size > 0
    schedule = Schedule.read(tmp_path / "run" / "schedule.txt")
    assert (schedule.spec.max_lr, schedule.spec.max_lr_source) == (2e-3, "config")


def range_test_curve(noise: float = 0.0):
    """100 LRs over 1e-7..1: the loss falls fastest at 1e-3 (a tanh step), bottoms out at 1e-1 and
    then blows up, as a range test's does."""
    rng = np.random.default_rng(0)
    lrs = np.logspace(-7, 0, 100)
    x = np.log10(lrs)
    loss = 10 - 4 * np.tanh(2 * (x + 3)) + np.where(x > -1, 40 * (x + 1) ** 2, 0.0)
    return lrs, loss + noise * rng.standard_normal(100)


def test_the_range_test_reading_is_a_tenth_of_the_smoothed_minimum_without_the_trailing_average_lag():
    from helpers.lr_finder import read_curve

    lrs, loss = range_test_curve(noise=0.1)
    smooth, lowest, max_lr, _ = read_curve(lrs, loss, skip_start=10, skip_end=5)
    assert lowest == lrs[10 + int(np.argmin(smooth[10:95]))] and 1e-2 < lowest < 1e-1  # where it turns up
    assert max_lr == pytest.approx(lowest / 10)
    # torch-lr-finder's own trailing average (smooth_f=0.05) would put the minimum far right.
    ema = [loss[0]]
    for v in loss[1:]:
        ema.append(0.05 * v + 0.95 * ema[-1])
    lagged = read_curve(lrs, ema, window=1, skip_start=10, skip_end=5)[1]
    assert lagged > 2 * lowest


def test_a_fall_no_clearer_than_the_batch_noise_suggests_nothing():
    """The range test with the objectness prior: no steep descent, the loss drifts ~25% lower until
    it turns up near 1e-2, under batch-to-batch noise; its minimum is noise, so no suggestion (the run
    keeps its configured LR). The same fall without the noise is read."""
    from helpers.lr_finder import read_curve

    lrs = np.logspace(-7, 0, 100)
    x = np.log10(lrs)
    shallow = 70 - 3.5 * (x + 7) + np.where(x > -2, 300 * (x + 2) ** 2, 0.0)
    noisy = shallow + 5 * np.random.default_rng(0).standard_normal(100)
    _, lowest, max_lr, clearance = read_curve(lrs, noisy, skip_start=10, skip_end=5)
    assert (lowest, max_lr) == (None, None) and 1 < clearance < 20
    _, lowest, max_lr, _ = read_curve(lrs, shallow, skip_start=10, skip_end=5)
    assert 5e-3 < lowest < 2e-2 and max_lr == pytest.approx(lowest / 10)


def test_a_range_test_that_never_falls_or_turns_nan_gives_no_lr_below_or_beyond_its_evidence():
    from helpers.lr_finder import describe_choice, read_curve

    lrs, loss = range_test_curve()
    assert read_curve(lrs, np.linspace(10, 50, 100))[1:3] == (None, None)  # only rises
    assert read_curve(lrs, np.full(100, 10.0))[1:3] == (None, None)  # flat
    clean = read_curve(lrs, loss)[1:3]
    late_nan = loss.copy()
    late_nan[97:] = np.nan  # fp16 overflow past the minimum: the curve ends there, the answer stands
    assert read_curve(lrs, late_nan)[1:3] == pytest.approx(clean)
    early_nan = loss.copy()
    early_nan[20] = np.nan  # a NaN before anything fell: nothing to read
    assert read_curve(lrs, early_nan)[1:3] == (None, None)
    assert describe_choice(SimpleNamespace(max_lr=1e-3, lowest=1e-2, clearance=70.0)) == \
        "a tenth of 0.01, the LR of the smoothed loss's minimum"
    assert describe_choice(SimpleNamespace(max_lr=None, lowest=None, clearance=9.4)) == \
        "no suggestion: the loss fell 9.4x its batch noise, short of the 20x that locates its minimum"
    assert "too few points" in describe_choice(SimpleNamespace(max_lr=None, lowest=None, clearance=None))


# A driver run in a fresh process: it trains with the given config and, if asked, SIGKILLs itself
# as a Colab disconnect would: right after a given step, or in the middle of writing the checkpoint
# of a given step. It records, for every step it trains, the epoch, the image size, the LR, the
# indices of the batch's images (the training batch sampler runs in the main process, in order,
# whatever the number of workers: the batches it yields are trained first in, first out) and a
# digest of the batch's tensors as the step receives them (images and boxes, so augmentations must
# match too).
DRIVER = textwrap.dedent("""
    import collections, hashlib, json, os, signal, sys
    import pytorch_lightning as pl
    import helpers.checkpoints
    import helpers.datamodule as dm
    from helpers.config import Config
    from helpers.train import train

    yielded = collections.deque()  # the indices of the training batches the sampler gave, in order
    keys = dm.MultiScaleBatchSampler.keys
    def recording_keys(self, batch, *args):
        if isinstance(self.sampler, dm.DistributedSampler):  # training, not evaluation
            yielded.append(list(batch))
        return keys(self, batch, *args)
    dm.MultiScaleBatchSampler.keys = recording_keys

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.digest = hashlib.sha1(batch.images.numpy().tobytes() + batch.boxes.numpy().tobytes()).hexdigest()
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            row = [trainer.global_step - 1, trainer.current_epoch, batch.images.shape[-1],
                   trainer.optimizers[0].param_groups[0]["lr"], yielded.popleft(), self.digest]
            with open(os.environ["RECORD"] + f".rank{trainer.global_rank}", "a") as f:
                f.write(json.dumps(row) + "\\n")
        def on_validation_epoch_end(self, trainer, module):
            acc = module.evaluator.accuracy  # the accuracy's counts, synced across ranks and this rank's own
            if acc.update_count:
                with acc.sync_context():
                    counted = int(acc.total_pos + acc.total_neg)
                with open(os.environ["RECORD"] + f".cells{trainer.global_rank}", "a") as f:
                    f.write(f"{counted} {int(acc.total_pos + acc.total_neg)}\\n")

    class KillAt(pl.Callback):  # before step `step`, once step - 1 is done, saved if due and logged
        def __init__(self, step):
            self.step = step
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == self.step:
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = Config.from_dict(json.loads(sys.argv[1]))
    kill_at, resume = int(sys.argv[2]), (sys.argv[3] if len(sys.argv) > 3 else None)
    every = int(os.environ.get("EVERY", "4"))
    extra = [Record()] if os.environ.get("RECORD") else []
    if kill_at >= 0:
        extra.append(KillAt(kill_at))
    class KillInValidation(pl.Callback):
        def __init__(self, epoch):
            self.epoch = epoch
        def on_validation_epoch_start(self, trainer, *args):
            if trainer.current_epoch == self.epoch:
                os.kill(os.getpid(), signal.SIGKILL)

    if os.environ.get("KILL_IN_VALIDATION"):
        extra.append(KillInValidation(int(os.environ["KILL_IN_VALIDATION"])))
    kill_in_save = int(os.environ.get("KILL_IN_SAVE", "-1"))
    if kill_in_save >= 0:  # killed after the bytes, before the fsync and the link: a stray .tmp
        fsync = os.fsync
        def dying_fsync(fd):
            if f"step={kill_in_save:07d}" in os.readlink(f"/proc/self/fd/{fd}"):
                os.kill(os.getpid(), signal.SIGKILL)
            fsync(fd)
        helpers.checkpoints.os.fsync = dying_fsync
    train(cfg, resume=resume, checkpoint_every_steps=every, extra_callbacks=extra)
""")


def run_driver(tmp_path, cfg: Config, kill_at: int = -1, resume: str | None = None, env=None, timeout=300):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    args = [sys.executable, str(script), json.dumps(cfg.to_dict()), str(kill_at)] + ([resume] if resume else [])
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def records(path) -> list[list]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def small_voc(tmp_path_factory):
    """16 training images: 4 steps an epoch at batch 4."""
    root = tmp_path_factory.mktemp("small_voc")
    return make_voc_dataset(root, n_trainval=16, n_test=4, image_size=(64, 48), seed=5)


def fast_config(data_root, run_dir, epochs=3) -> Config:
    cfg = tiny_config(data_root, run_dir, epochs=epochs)
    cfg.data.train_sizes, cfg.data.image_size = (32, 64), 32
    return cfg


@pytest.fixture(scope="module")
def uninterrupted(small_voc, tmp_path_factory):
    """The run the killed ones must equal: {step: [step, epoch, image size, LR, image indices, digest of
    the batch's images and boxes]} and its folder."""
    where = tmp_path_factory.mktemp("uninterrupted")
    done = run_driver(where, fast_config(small_voc, where / "run"), env={"RECORD": str(where / "rows")})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = records(where / "rows.rank0")
    assert [row[0] for row in rows] == list(range(12))
    sizes = [tuple(row[2] for row in rows if row[1] == epoch) for epoch in range(3)]
    assert len(set(sizes)) > 1, sizes  # the image sizes change between epochs
    return {row[0]: row for row in rows}, where / "run"


def assert_same_steps(record_file, expected: dict, total: int = 12) -> None:
    rows = records(record_file)
    for row in rows:  # steps redone after a kill included
        assert row == expected[row[0]], (row, expected[row[0]])
    assert {row[0] for row in rows} == set(range(total))


@pytest.mark.slow
def test_a_run_killed_at_random_moments_resumes_exactly_as_an_uninterrupted_run(small_voc, uninterrupted, tmp_path):
    """SIGKILLs at random steps (one of them in the middle of a checkpoint write), each time resumed
    with --resume latest: the run ends at the uninterrupted run's step, and every step, including
    those redone after a kill, has that run's epoch, image size, LR and batch of images, augmented
    alike to the pixel."""
    expected, reference = uninterrupted
    total = 12  # 16 images / batch 4 = 4 steps an epoch, 3 epochs
    rng = np.random.default_rng()  # random moments; printed so that a failure can be replayed
    in_save = int(rng.choice([3, 6]))  # a step with a checkpoint (every 3 steps and at epoch ends)
    kills = sorted(int(k) for k in rng.choice(np.arange(in_save + 1, total), size=2, replace=False))
    print(f"killed while writing the checkpoint of step {in_save}, then after steps {kills}")
    run = tmp_path / "run"
    cfg = fast_config(small_voc, run)
    env = {"RECORD": str(tmp_path / "killed.jsonl"), "EVERY": "3"}
    killed = run_driver(tmp_path, cfg, env={**env, "KILL_IN_SAVE": str(in_save)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = run / "checkpoints"
    assert list(ckpts.glob(f".*step={in_save:07d}*.tmp")), "the kill left its temporary file"
    for n, kill in enumerate(kills):
        killed = run_driver(tmp_path, cfg, kill_at=kill, resume="latest", env=env)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        if n == 0:
            assert "removed 1 temporary file(s) or folder(s) left by an interrupted write" in killed.stdout
    before = {p.name: p.read_bytes() for p in ckpts.glob("*.ckpt")}
    resumed = run_driver(tmp_path, cfg, resume="latest", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "dataloader is" not in output and "not resumable" not in output

    assert_same_steps(tmp_path / "killed.jsonl.rank0", expected)
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["global_step"] == total == json.loads((reference / "metrics.json").read_text())["global_step"]
    for name, data in before.items():  # nothing written before was rewritten
        assert not (ckpts / name).exists() or (ckpts / name).read_bytes() == data, name
    assert not list(ckpts.glob(".*.tmp"))
    schedule = Schedule.read(run / "schedule.txt")
    logged = lr_by_step(run)
    assert sorted(logged) == list(range(total)), sorted(logged)  # every step logged, once, over all sessions
    for step, lr in logged.items():
        assert lr == pytest.approx(schedule.lrs[step], rel=1e-6), step
    weights = sorted(p.name for p in (ckpts / "weights").glob("*.ckpt"))
    assert [n.split("-")[0] for n in weights] == ["epoch=000", "epoch=001", "epoch=002"], weights


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_from_an_epoch_end_state_then_a_mid_epoch_one_with_workers_every_step_is_the_uninterrupted_runs(
        small_voc, uninterrupted, tmp_path, workers):
    """With 2 data workers (both presets' setting) as with none: killed after the state saved at the
    end of epoch 0 (a loop Lightning does not restart, whose loader state it does not load), then
    after a mid-epoch state, each time resumed with --resume latest: every step has the uninterrupted
    run's epoch, image size, LR and batch, and the run ends on its step."""
    expected, _ = uninterrupted
    run = tmp_path / "run"
    cfg = fast_config(small_voc, run)
    cfg.data.num_workers = workers
    env = {"RECORD": str(tmp_path / "killed.jsonl"), "EVERY": "3"}  # states at steps 3, 4 (epoch end), 6, 8, ...
    for kill, latest, resume in ((5, "epoch=000-step=0000004", None), (7, "epoch=001-step=0000006", "latest")):
        killed = run_driver(tmp_path, cfg, kill_at=kill, resume=resume, env=env)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert find_latest_name(run) == latest
    resumed = run_driver(tmp_path, cfg, resume="latest", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_steps(tmp_path / "killed.jsonl.rank0", expected)
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 12


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_kill_during_validation_after_a_save_on_the_epochs_last_batch_resumes_exactly(small_voc, uninterrupted,
                                                                                         tmp_path, workers):
    """Every 2 steps, a state is saved at the end of the epoch's last batch (step 4), before its
    validation; killed there, the run resumes from it without an extra step or a repeated batch."""
    expected, _ = uninterrupted
    run = tmp_path / "run"
    cfg = fast_config(small_voc, run)
    cfg.data.num_workers = workers
    env = {"RECORD": str(tmp_path / "killed.jsonl"), "EVERY": "2"}
    killed = run_driver(tmp_path, cfg, env={**env, "KILL_IN_VALIDATION": "0"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert find_latest_name(run) == "epoch=000-step=0000004"
    resumed = run_driver(tmp_path, cfg, resume="latest", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_steps(tmp_path / "killed.jsonl.rank0", expected)
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 12


def find_latest_name(run: Path) -> str:
    from helpers.weights import find_latest

    return "-".join(find_latest(run / "checkpoints").name.split("-")[:2])


@pytest.mark.slow
def test_two_process_ddp_on_cpu_uses_one_image_size_per_step_and_syncs_accuracies(voc, tmp_path):
    cfg = tiny_config(voc, tmp_path / "run", epochs=2, strategy="ddp", devices=2)
    out = tmp_path / "record"
    done = run_driver(tmp_path, cfg, env={"RECORD": str(out), "MASTER_PORT": "29517"}, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [records(f"{out}.rank{r}") for r in (0, 1)]
    assert len(rows[0]) == len(rows[1]) == 2 * 3  # 24 images / (2 ranks x batch 4) = 3 steps an epoch
    for a, b in zip(*rows):
        assert a[:4] == b[:4]  # step, epoch, image size, LR: the same on both ranks
        assert not set(a[4]) & set(b[4])  # each rank its own images
    sizes = [[row[2] for row in rows[0] if row[1] == epoch] for epoch in (0, 1)]
    assert sizes[0] != sizes[1], sizes  # new sizes every epoch (Lightning sets the epoch on the inner sampler)
    cells = [Path(f"{out}.cells{r}").read_text().split() for r in (0, 1)]
    synced0, local0 = map(int, cells[0][-2:])
    synced1, local1 = map(int, cells[1][-2:])
    assert synced0 == synced1 == local0 + local1  # both ranks see the whole set's counts
    assert local0 > 0 and local1 > 0


@pytest.mark.slow
def test_unreadable_batches_are_skipped_and_counted_and_a_finished_run_reruns_to_its_summary(tmp_path, capsys):
    from torch.utils.data import DistributedSampler

    from helpers.datamodule import YOLODataModule
    from helpers.train import main, train
    from helpers.weights import CheckpointError

    root = make_voc_dataset(tmp_path / "voc", n_trainval=16, n_test=6, image_size=(64, 48), seed=7)
    run = tmp_path / "run"
    cfg = fast_config(root, run, epochs=2)
    cfg.data.mosaic = 0.0  # every sample reads exactly its own image: the counts below are exact
    cfg.data.train_sizes = (64,)  # a batch left with one image at 32 px would give BatchNorm a 1x1 map
    dm = YOLODataModule(cfg.data, seed=cfg.train.seed)
    dm.setup("fit")
    sampler = DistributedSampler(dm.train_dataset, 1, 0, shuffle=True, seed=cfg.train.seed)
    first_batch = [dm.train_dataset.records[i].image_path for i in list(sampler)[:4]]
    last_val_batch = [r.image_path for r in dm.val_dataset.records[4:]]  # the short last batch: 2 images
    for path in first_batch + last_val_batch:
        path.write_bytes(b"not a jpeg")

    with pytest.warns(UserWarning):
        summary = train(cfg)
    assert summary["global_step"] == 2 * 4  # the unreadable batch still took its step of the schedule
    assert summary["skipped_images"] == {"train": 2 * 4, "val": 2}
    written = json.loads((run / "metrics.json").read_text())
    assert written["skipped_images"] == summary["skipped_images"] and "val/loss" in written["metrics"]
    assert (run / "training_curves.png").stat().st_size > 0

    capsys.readouterr()
    again = train(cfg, resume="latest")  # the notebook's cell rerun on a finished run
    assert again == written and "run already complete" in capsys.readouterr().out
    assert len(list((run / "logs").glob("version_*"))) == 1  # nothing trained again

    longer = fast_config(root, run, epochs=3)
    longer.data.mosaic, longer.data.train_sizes = 0.0, (64,)
    with pytest.raises(CheckpointError, match=r"epochs 2 and this run asks 3.*--epochs 2"):
        train(longer, resume="latest")
    garbage = tmp_path / "notes.ckpt"
    garbage.write_text("my notes")
    argv = ["--data", str(root), "--run-dir", str(run), "--width", "0.125", "--resume", str(garbage)]
    assert main(argv) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "notes.ckpt" in err[0] and "not a checkpoint" in err[0], err
    for state in (run / "checkpoints").glob("*.ckpt"):  # every full state cut short (say, a bad sync)
        state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="no checkpoint in .* loads.*--start-fresh"):
        train(cfg, resume="latest")


def test_curves_merge_every_session_and_a_resumed_session_replaces_the_steps_it_redoes(tmp_path):
    from helpers.plotting import plot_training_curves
    from helpers.run_logs import read_run_metrics

    logs = tmp_path / "logs"
    sessions = {0: "step,lr,train/loss_step\n0,1,9\n1,2,8\n2,3,7\n3,4,6\n",  # killed after step 3
                1: "",  # a session killed before it logged anything
                2: "step,lr,train/loss_step,val/loss\n2,3,5\n3,4,4\n3,,,4.5\n4,5,3\n"}  # resumed at step 2
    for version, text in sessions.items():
        (logs / f"version_{version}").mkdir(parents=True)
        (logs / f"version_{version}" / "metrics.csv").write_text(text)
    cols = read_run_metrics(tmp_path)  # the run folder or its logs folder
    assert cols["step"].tolist() == [0, 1, 2, 3, 3, 4]
    assert cols["train/loss_step"][[0, 1, 2, 3, 5]].tolist() == [9, 8, 5, 4, 3]  # steps 2-3 from the resumed session
    assert np.isnan(cols["val/loss"][:4]).all() and cols["val/loss"][4] == 4.5
    assert read_run_metrics(logs)["lr"].tolist()[:4] == [1, 2, 3, 4]
    plot_training_curves(logs)
    with pytest.raises(ValueError, match="no version"):
        read_run_metrics(tmp_path / "elsewhere")


def test_the_schedule_counts_limit_train_batches_and_a_resume_keeps_the_range_tests_max_lr(tmp_path):
    from helpers.schedule import ScheduleMismatch
    from helpers.train import prepare_schedule

    cfg = tiny_config("unused", tmp_path, epochs=4, limit_train_batches=3)
    schedule = prepare_schedule(cfg, tmp_path, steps_per_epoch=6, dataset_length=24)
    assert schedule.spec.steps_per_epoch == 3 and len(schedule.lrs) == 12 and schedule.spec.max_lr_source == "config"
    cfg.train.limit_train_batches = None
    with pytest.raises(ScheduleMismatch, match="3 steps per epoch, this run has 6"):
        prepare_schedule(cfg, tmp_path, 6, 24)
    cfg.train.limit_train_batches = 3
    cfg.train.max_lr = 5e-3
    with pytest.raises(ScheduleMismatch, match="max_lr 0.002, this run asks 0.005: rerun with --max-lr 0.002"):
        prepare_schedule(cfg, tmp_path, 6, 24)

    found = tmp_path / "found"  # the notebook: the range test's LR first, the config's on a resume
    cfg = tiny_config("unused", found, epochs=4)
    prepare_schedule(cfg, found, 6, 24, max_lr=3.3e-3)
    first = Schedule.read(found / "schedule.txt")
    assert first.spec.max_lr == 3.3e-3 and first.spec.max_lr_source == "given"
    assert prepare_schedule(cfg, found, 6, 24, max_lr=cfg.train.max_lr).lrs == first.lrs
    assert prepare_schedule(cfg, found, 6, 24).lrs == first.lrs
    cfg.train.epochs = 5
    with pytest.raises(ScheduleMismatch, match="epochs 4, this run asks 5: rerun with --epochs 4"):
        prepare_schedule(cfg, found, 6, 24)


# --- command line ---------------------------------------------------------------------------------
def parse(*argv: str) -> Config:
    from helpers.train import command_line

    return command_line(argv)[0]


def refusal(capsys, *argv: str) -> str:
    """The parser's error for `argv`, which must refuse it in exactly one line."""
    with pytest.raises(SystemExit):
        parse(*argv)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_a_config_file_overrides_only_what_it_sets_and_flags_override_the_file(tmp_path):
    from helpers.train import course_preset

    settings = tmp_path / "f.json"
    settings.write_text(json.dumps({"train": {"epochs": 3}}))
    cfg = parse("--preset", "course", "--config", str(settings))
    expected = course_preset()
    expected.train.epochs = 3
    assert cfg == expected  # the course's run folder, checkpoint cadence, ... kept
    assert parse("--preset", "course", "--config", str(settings), "--epochs", "5").train.epochs == 5


def test_a_config_file_with_an_unknown_or_mistyped_section_or_field_is_one_error_naming_it(tmp_path, capsys):
    from helpers.train import main

    for content, named in (({"trian": {"epochs": 3}}, "trian"), ({"train": {"epoch": 3}}, "epoch"),
                           ({"data": {"batch_size": "4"}}, "data.batch_size: expected int, got '4'"),
                           ({"data": {"train_sizes": 160}}, "data.train_sizes: expected list of int, got 160"),
                           ({"train": {"max_lr": "0.001"}}, "train.max_lr: expected float, got '0.001'")):
        settings = tmp_path / "f.json"
        settings.write_text(json.dumps(content))
        with pytest.raises(SystemExit):
            main(["--config", str(settings)])
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"--config {settings}: " in err and named in err, err


def test_flags_override_the_config_file_wherever_they_stand(tmp_path):
    settings = tmp_path / "f.json"
    settings.write_text(json.dumps({"train": {"epochs": 3}, "data": {"root": "/data/voc"}}))
    cfg = parse("--epochs", "5", "--config", str(settings))
    assert cfg.train.epochs == 5 and cfg.data.root == "/data/voc"
    assert parse("--config", str(settings), "--data", "/elsewhere").data.root == "/elsewhere"


def test_help_shows_as_defaults_the_values_the_command_starts_from(tmp_path, capsys):
    from helpers.train import command_line

    def help_of(*argv):
        with pytest.raises(SystemExit):
            command_line(["--help", *argv])
        return " ".join(capsys.readouterr().out.split())

    assert "--epochs EPOCHS (type: int, default: 8)" in help_of()  # the embedded default
    course = help_of("--preset", "course")
    assert "--epochs EPOCHS (type: int, default: 40)" in course and "default: runs/course" in course
    settings = tmp_path / "f.json"
    settings.write_text(json.dumps({"train": {"epochs": 3}}))
    assert "--epochs EPOCHS (type: int, default: 3)" in help_of("--preset", "course", "--config", str(settings))


def test_flags_are_parsed_as_their_fields_types():
    cfg = parse("--limit-train-batches", "10", "--limit-val-batches", "0.5", "--checkpoint-dir", "null",
                "--train-sizes", "[320, 352]", "--ema", "true", "--width", "0.5", "--val-split", "val")
    assert cfg.train.limit_train_batches == 10 and isinstance(cfg.train.limit_train_batches, int)
    assert cfg.train.limit_val_batches == 0.5 and cfg.train.checkpoint_dir is None
    assert cfg.data.train_sizes == (320, 352) and cfg.train.ema is True
    assert cfg.model.width == 0.5 and cfg.data.val_split == "val"


def test_a_flag_of_the_wrong_type_is_refused_in_one_line_naming_the_flag_and_its_type(capsys):
    for argv, expected in ((["--epochs", "ten"], "--epochs: expected int, got 'ten'"),
                           (["--ema", "maybe"], "--ema: expected bool, got 'maybe'"),
                           (["--limit-train-batches", "lots"], "--limit-train-batches: expected int | float | null"),
                           (["--train-sizes", "320"], "--train-sizes: expected list of int, got '320'; write a list as"),
                           (["--preset", "cource"], "--preset: expected one of 'course', 'default', got 'cource'")):
        assert expected in refusal(capsys, *argv)


def test_a_value_its_setting_refuses_is_one_line_from_a_flag_or_a_config_file(capsys, tmp_path):
    config = tmp_path / "prior.json"
    config.write_text('{"model": {"obj_prior": 1.0}}')
    for argv, expected in ((["--obj-prior", "2"], "obj_prior 2.0: expected a probability strictly between 0 and 1"),
                           (["--config", str(config)], "obj_prior 1.0: expected a probability strictly between 0 and 1"),
                           (["--mosaic", "2"], "mosaic 2.0: expected a fraction of training samples, 0 to 1"),
                           (["--width", "-1"], "width -1.0: expected a positive channel multiplier"),
                           (["--image-size", "300"], "image_size 300: expected a positive multiple of 32"),
                           (["--train-sizes", "[320, 330]"], "train_sizes [320, 330]: expected a list of one or more sizes"),
                           (["--batch-size", "0"], "batch_size 0: expected at least 1"),
                           (["--max-lr", "0"], "max_lr 0.0: expected a positive number"),
                           (["--pct-start", "1.5"], "pct_start 1.5: expected the warm-up's fraction"),
                           (["--obj-balance", "[1, 1]"], "obj_balance [1.0, 1.0]: expected 3 weights")):
        assert expected in refusal(capsys, *argv)
    assert parse("--obj-prior", "0.01").model.obj_prior == 0.01


def test_a_setting_edited_out_of_range_on_the_config_is_one_line_before_anything_is_written(voc, tmp_path):
    """A notebook edits the Config by attribute, past the constructors' checks: train refuses it first."""
    from helpers.config import ConfigError
    from helpers.errors import one_line_errors
    from helpers.train import train

    cfg = tiny_config(voc, tmp_path / "run")
    cfg.data.mosaic = 2
    with pytest.raises(SystemExit, match=r"^mosaic 2\.0: expected a fraction of training samples, 0 to 1$"):
        with one_line_errors():
            train(cfg)
    assert not (tmp_path / "run").exists()
    assert issubclass(ConfigError, ValueError)  # the command line's parser catches it as before


def test_a_checkpoint_from_before_the_scheduler_resumes_on_its_line_of_the_schedule_file(tmp_path):
    from helpers.module import YOLOModule
    from helpers.schedule import OneCycleSpec

    spec = OneCycleSpec(max_lr=2e-3, epochs=3, steps_per_epoch=4, batch_size=4, dataset_length=16)
    Schedule.compute(spec).write(tmp_path / "schedule.txt")
    schedule = Schedule.read(tmp_path / "schedule.txt")  # the file's values, as the module reads them
    module = YOLOModule(tiny_config("unused", tmp_path).to_dict(), schedule_path=str(tmp_path / "schedule.txt"))
    # What an older version saved: no scheduler state, the optimizer at the previous step's LR.
    ckpt = {"global_step": 5, "optimizer_states": [{"state": {}, "param_groups": [{"lr": schedule.lr_at(4)}]}],
            "lr_schedulers": [],  # what Lightning wrote for a module without a scheduler
            "skipped_images": {"train": 3, "val": 1, "train_this_epoch": 2}}
    module.on_load_checkpoint(ckpt)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == schedule.lr_at(5)  # step 5 runs at line 5
    optimizers = module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    scheduler.load_state_dict(ckpt["lr_schedulers"][0])
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == schedule.lr_at(6)
    assert module.skipped_images == {"train": 3, "val": 1} and int(module.train_skipped) == 2


@pytest.mark.slow
def test_under_two_process_ddp_unreadable_images_count_on_whichever_rank_reads_them_without_a_hang(tmp_path):
    from torch.utils.data import DistributedSampler

    from helpers.datamodule import YOLODataModule

    root = make_voc_dataset(tmp_path / "voc", n_trainval=16, n_test=6, image_size=(64, 48), seed=7)
    cfg = tiny_config(root, tmp_path / "run", epochs=1, strategy="ddp", devices=2)
    cfg.data.mosaic, cfg.data.train_sizes = 0.0, (64,)  # every sample reads exactly its own image
    dm = YOLODataModule(cfg.data, seed=cfg.train.seed)
    dm.setup("fit")
    rank1 = list(DistributedSampler(dm.train_dataset, 2, 1, shuffle=True, seed=cfg.train.seed))  # epoch 0
    bad = [dm.train_dataset.records[i].image_path for i in (rank1[0], rank1[5])]  # one in each of its batches
    # Validation: rank 1 reads images 1, 3 and 5, none of them readable (it must still join every sync).
    bad += [dm.val_dataset.records[i].image_path for i in (1, 3, 5)]
    for path in bad:
        path.write_bytes(b"not a jpeg")
    done = run_driver(tmp_path, cfg, env={"MASTER_PORT": "29519"}, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["skipped_images"] == {"train": 2, "val": 3}


class Crash(Exception):
    """A session that ends mid-run (in-process stand-in for a disconnect)."""


class CrashAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise Crash(f"disconnected before step {self.step}")


def states(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*.ckpt")}


def steps_of(folder: Path) -> list[int]:
    from helpers.weights import step_of

    return sorted(step_of(p)[0] for p in folder.glob("*.ckpt"))


@pytest.mark.slow
def test_the_same_command_rerun_goes_on_and_a_fresh_start_or_an_older_resume_mixes_nothing(small_voc, tmp_path,
                                                                                           capsys):
    """A run stopped mid-way: the same command without --resume continues it, saying so in one line
    naming --resume latest and --start-fresh. --start-fresh then trains from step 0 with the earlier
    run's states and logs set aside, unchanged, and nothing of them in the new run's logs or weights.
    A resume from an older state sets the newer ones aside: --resume latest follows it."""
    from helpers.checkpoints import run_id_of
    from helpers.train import main, train
    from helpers.weights import find_latest

    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    cfg = fast_config(small_voc, run, epochs=2)
    cfg.train.keep_last_k = 2
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(Crash):
        train(cfg, checkpoint_every_steps=3, extra_callbacks=[CrashAt(6)])
    assert steps_of(ckpts) == [4, 6]  # every 3 steps and at epoch ends, the last 2 kept
    capsys.readouterr()

    assert main(["--config", str(config), "--checkpoint-every-steps", "3"]) == 0  # --resume forgotten
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume:")]
    assert len(said) == 1 and "--resume latest" in said[0] and "--start-fresh" in said[0], said
    assert "step=0000006" in said[0]
    assert lr_by_step(run).keys() == set(range(8))  # each step once: none trained again from step 0
    first = states(ckpts)
    assert steps_of(ckpts) == [6, 8] and len({run_id_of(ckpts / name) for name in first}) == 1
    first_logs = sorted(p.name for p in (run / "logs").iterdir())

    assert main(["--config", str(config), "--checkpoint-every-steps", "3", "--start-fresh"]) == 0
    out = capsys.readouterr().out
    assert "start fresh: moved the earlier checkpoints" in out and "moved the logs and results" in out
    [aside] = ckpts.glob("set-aside-*")
    assert states(aside) == first  # the earlier run's states, moved whole
    [logs_aside] = run.glob("set-aside-*")
    assert sorted(p.name for p in (logs_aside / "logs").iterdir()) == first_logs
    assert [p.name for p in (run / "logs").iterdir()] == ["version_0"]  # only the new run's rows
    assert lr_by_step(run).keys() == set(range(8))
    assert steps_of(ckpts) == [6, 8] and run_id_of(find_latest(ckpts)) != run_id_of(find_latest(aside))
    weights = sorted(p.name for p in (ckpts / "weights").glob("*.ckpt"))
    assert len(weights) == 2 and not any("-v" in name for name in weights), weights

    older = min(ckpts.glob("*.ckpt"), key=lambda p: p.name)  # step 6: resumed from, then stopped at step 7
    with pytest.raises(Crash):
        train(cfg, resume=str(older), checkpoint_every_steps=3, extra_callbacks=[CrashAt(7)])
    assert "newer checkpoint(s) of the continuation abandoned here" in capsys.readouterr().out
    assert find_latest(ckpts) == older and steps_of(ckpts) == [6]


def test_the_loss_watch_records_the_first_non_finite_loss_and_the_first_explosion_on_the_device():
    from helpers.divergence import LossWatch

    watch = LossWatch(window=4, factor=1e3)
    for step, loss in enumerate([5.0, 4.0, 4.5, 4e4, 3.9, 5e3, 2e21, float("nan"), float("inf"), 4.0]):
        watch.update(torch.tensor(loss), step)
    found = watch.read()
    # 4e4 is 1e4 x the median 4.5 but 5e3 is not (the exploded loss never entered the median)
    assert (found.explosion_step, found.explosion_loss, found.explosion_median) == (3, 4e4, 4.5)
    assert found.nonfinite_step == 7 and found.nonfinite_loss != found.nonfinite_loss  # NaN
    assert LossWatch().read().nonfinite_step is None


class Poison(pl.Callback):
    """Step `explode`'s loss times 1e6 (a divergence); a NaN in step `nan`'s batch."""

    def __init__(self, explode: int, nan: int):
        self.explode, self.nan = explode, nan

    def on_train_start(self, trainer, module):
        parts = module.loss_fn.parts

        def scaled(*args):
            out = parts(*args)
            return dataclasses.replace(out, total=out.total * 1e6) if trainer.global_step == self.explode else out
        module.loss_fn.parts = scaled

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.nan:
            batch.images[0, 0, 0, 0] = float("nan")


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_step_and_lr_no_bad_checkpoint_is_written_and_resume_works(small_voc,
                                                                                                   tmp_path, capsys):
    """An explosion at step 2 is named in one warning line with its LR and the advice; a NaN in step 5's
    batch stops the run with one line naming step 5 and its LR before the state due after it is
    written; the states before it load with finite weights, and --resume latest finishes the run."""
    from helpers.divergence import TrainingDiverged, all_finite
    from helpers.train import train

    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    cfg = fast_config(small_voc, run)
    with pytest.raises(TrainingDiverged) as stopped:
        train(cfg, checkpoint_every_steps=3, extra_callbacks=[Poison(explode=2, nan=5)])
    schedule_lr = Schedule.read(run / "schedule.txt").lr_at
    message = str(stopped.value)
    assert "\n" not in message and "step 5 " in message and f"LR {schedule_lr(5):.3g}" in message, message
    assert "--resume latest" in message
    warned = [line for line in capsys.readouterr().err.splitlines() if "diverging" in line]
    assert len(warned) == 1 and "step 2 " in warned[0] and f"LR {schedule_lr(2):.3g}" in warned[0], warned
    assert "lower --max-lr" in warned[0]
    assert steps_of(ckpts) == [3, 4] and steps_of(ckpts / "weights") == [4]  # none after the NaN
    for path in [*ckpts.glob("*.ckpt"), *(ckpts / "weights").glob("*.ckpt")]:
        assert all_finite(torch.load(path, weights_only=True)["state_dict"].values()), path

    summary = train(cfg, resume="latest", checkpoint_every_steps=3)
    assert summary["global_step"] == 12
