"""Checkpoints: written atomically, never overwritten, rotated only after the new one is safe, a full
disk one clear line, the newest loadable one found and unreadable ones refused by name, loaded
weights_only."""
import errno
import os
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import FillsUp

import helpers.checkpoints as checkpoints
from helpers.checkpoints import (
    NoOverwriteCheckpointIO,
    PeriodicCheckpoint,
    check_resumable,
    checkpoint_name,
    free_name,
    remove_temporaries,
    set_aside,
    storage_plan,
)
from helpers.config import Config, ModelConfig, TrainConfig
from helpers.model import YOLOv3
from helpers.storage import StorageFull, atomic_write_new
from helpers.weights import CheckpointError, find_latest, load_model


def save(path, step, **extra):
    state = {"global_step": step, "w": torch.full((10,), float(step)), **extra}
    NoOverwriteCheckpointIO().save_checkpoint(state, path)


def test_an_existing_file_is_never_overwritten(tmp_path):
    path = tmp_path / "a.ckpt"
    save(path, 1)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        save(path, 2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]  # no temporary file left behind


def test_a_failed_write_leaves_no_file_under_the_final_name(tmp_path):
    def explode(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_new(tmp_path / "b.ckpt", explode)
    assert list(tmp_path.iterdir()) == []


def test_names_carry_epoch_step_and_lr_and_clashes_get_a_version(tmp_path):
    name = checkpoint_name(3, 1200, 4.2e-4)
    assert name == "epoch=003-step=0001200-lr=4.2000e-04.ckpt"
    (tmp_path / name).write_bytes(b"x")
    assert free_name(tmp_path, name).name == "epoch=003-step=0001200-lr=4.2000e-04-v2.ckpt"


def test_latest_is_the_highest_step_that_loads_and_truncated_ones_are_skipped(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path / checkpoint_name(0, step, 1e-3), step)
    newest = tmp_path / checkpoint_name(0, 30, 1e-3)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # killed mid-copy
    with pytest.warns(UserWarning, match=r"step=0000030.* is truncated"):
        latest = find_latest(tmp_path)
    assert latest == tmp_path / checkpoint_name(0, 20, 1e-3)


def test_a_folder_whose_checkpoints_all_fail_to_load_is_refused_by_name_not_taken_for_empty(tmp_path):
    save(tmp_path / checkpoint_name(0, 10, 1e-3), 10)
    cut = tmp_path / checkpoint_name(0, 10, 1e-3)
    cut.write_bytes(cut.read_bytes()[:100])
    (tmp_path / checkpoint_name(0, 20, 1e-3)).write_bytes(b"")  # a sync that never started
    with pytest.raises(CheckpointError) as e:
        find_latest(tmp_path)
    message = str(e.value)
    assert "\n" not in message and "--start-fresh" in message
    assert "step=0000010" in message and "step=0000020" in message and "truncated" in message


def test_an_io_error_is_refused_even_where_an_older_checkpoint_loads(tmp_path, monkeypatch):
    for step in (10, 20):
        save(tmp_path / checkpoint_name(0, step, 1e-3), step)
    real = torch.load

    def flaky(path, *a, **k):
        if "step=0000020" in str(path):
            raise OSError(errno.EIO, "Input/output error")
        return real(path, *a, **k)

    monkeypatch.setattr(checkpoints.torch, "load", flaky)
    with pytest.raises(CheckpointError, match=r"step=0000020.*unreadable \(I/O error: Input/output error\).*mounted"):
        find_latest(tmp_path)


def test_a_full_disk_is_one_clear_line_and_leaves_earlier_checkpoints_and_no_temporary_file(tmp_path, monkeypatch):
    earlier = tmp_path / checkpoint_name(0, 10, 1e-3)
    save(earlier, 10)
    before = earlier.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(checkpoints.os, "fdopen", lambda fd, mode: FillsUp(real_fdopen(fd, mode), room=4096))
    target = tmp_path / checkpoint_name(0, 20, 1e-3)
    with pytest.raises(StorageFull) as e:  # through torch.save's zip writer, which hides the OSError
        NoOverwriteCheckpointIO().save_checkpoint({"w": torch.zeros(100_000)}, target)
    message = str(e.value)
    assert "\n" not in message and e.value.__cause__ is None and e.value.__suppress_context__
    assert f"could not write {target}" in message and "free in" in message and "Trash" in message
    assert "--resume latest" in message and e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == [earlier.name] and earlier.read_bytes() == before


def test_temporary_files_of_killed_writes_are_removed_and_counted_and_nothing_else(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / ".epoch=000-step=0000010-lr=1.0000e-03.ckpt.ab12.tmp").write_bytes(b"x" * 1000)
    (tmp_path / "weights" / ".epoch=000-step=0000010-lr=1.0000e-03.ckpt.cd34.tmp").write_bytes(b"x" * 500)
    (tmp_path / ".notes.tmp").write_bytes(b"mine")  # not a checkpoint's: left alone
    save(tmp_path / checkpoint_name(0, 10, 1e-3), 10)
    assert remove_temporaries(tmp_path) == (2, 1500)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [".notes.tmp", checkpoint_name(0, 10, 1e-3)]
    assert remove_temporaries(tmp_path / "missing") == (0, 0)


def fake_trainer(tmp_path, fail: bool = False, callbacks=()):
    """What PeriodicCheckpoint uses of a Trainer, saving through NoOverwriteCheckpointIO with what the
    callbacks add to a checkpoint."""
    def save_checkpoint(path, weights_only=False):
        if trainer.fail:
            raise StorageFull(errno.ENOSPC, f"could not write {path}")
        extra = {}
        for callback in callbacks:
            callback.on_save_checkpoint(trainer, module, extra)
        save(path, trainer.global_step, **extra)

    module = SimpleNamespace(schedule=None)
    trainer = SimpleNamespace(global_step=0, current_epoch=0, is_global_zero=True, world_size=1, fail=fail,
                              optimizers=[SimpleNamespace(param_groups=[{"lr": 1e-3}])],
                              lightning_module=module, save_checkpoint=save_checkpoint)
    return trainer


def test_keeping_the_last_two_deletes_an_old_state_only_after_the_new_one_is_written(tmp_path):
    callback = PeriodicCheckpoint(tmp_path, keep_last_k=2, epoch_weights=False)
    save(tmp_path / checkpoint_name(0, 1, 1e-3), 1, run_id=callback.run_id)  # an earlier session's state counts too
    trainer = fake_trainer(tmp_path, callbacks=[callback])
    for step in (2, 3, 4):
        trainer.global_step = step
        callback.save(trainer)
    names = lambda: sorted(p.name for p in tmp_path.glob("*.ckpt"))  # noqa: E731
    assert names() == [checkpoint_name(0, 3, 1e-3), checkpoint_name(0, 4, 1e-3)]
    trainer.global_step, trainer.fail = 5, True
    with pytest.raises(StorageFull):
        callback.save(trainer)
    assert names() == [checkpoint_name(0, 3, 1e-3), checkpoint_name(0, 4, 1e-3)]  # both loadable states stay
    assert find_latest(tmp_path) == tmp_path / checkpoint_name(0, 4, 1e-3)


def test_rotation_never_deletes_the_states_of_another_run_in_the_folder(tmp_path):
    """A new run in a folder that holds an earlier run's states (and, older still, states saved before
    runs had ids) keeps its own newest two and deletes nothing of theirs, whatever their steps."""
    theirs = [checkpoint_name(0, step, 1e-3) for step in (1, 5, 9)]
    for name, step in zip(theirs, (1, 5, 9)):
        save(tmp_path / name, step, run_id="an-earlier-run")
    save(tmp_path / checkpoint_name(0, 7, 1e-3), 7)  # no id: saved before runs had one
    callback = PeriodicCheckpoint(tmp_path, keep_last_k=2, epoch_weights=False)
    trainer = fake_trainer(tmp_path, callbacks=[callback])
    for step in (2, 3, 4):
        trainer.global_step = step
        callback.save(trainer)
    names = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    ours = [checkpoint_name(0, 3, 1e-3), checkpoint_name(0, 4, 1e-3)]
    assert names == sorted(theirs + ours + [checkpoint_name(0, 7, 1e-3)])
    resumed = PeriodicCheckpoint(tmp_path, keep_last_k=2, epoch_weights=False)
    resumed.on_load_checkpoint(trainer, None, torch.load(tmp_path / ours[-1], weights_only=True))
    assert resumed.run_id == callback.run_id  # a resume goes on as the same run


def test_a_deliberate_fresh_start_moves_the_checkpoints_aside_and_deletes_nothing(tmp_path):
    save(tmp_path / checkpoint_name(0, 10, 1e-3), 10)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / checkpoint_name(0, 10, 1e-3)).write_bytes(b"w")
    moved = set_aside(tmp_path)
    assert moved.parent == tmp_path and moved.name.startswith("set-aside-")
    assert find_latest(tmp_path) is None and (moved / checkpoint_name(0, 10, 1e-3)).is_file()
    assert (moved / "weights" / checkpoint_name(0, 10, 1e-3)).read_bytes() == b"w"
    assert set_aside(tmp_path) is None  # nothing left to move


def test_the_course_model_checkpoints_of_40_epochs_fit_in_10_gb():
    """Full state: fp32 weights + Adam's two moments (~740 MB); weights alone in fp16 (~123 MB)."""
    model = YOLOv3(num_classes=20, width=1.0)
    plan = storage_plan(model, epochs=40, keep_last_k=2, optimizer="adam")
    assert 735e6 < plan.full_state < 745e6 and 122e6 < plan.weights < 125e6
    assert plan.total == 3 * plan.full_state + 40 * plan.weights < 10e9
    assert storage_plan(model, epochs=40, keep_last_k=0).total > 29e9  # keeping every epoch's state: ~30 GB
    assert "~740 MB" in plan.describe("/drive") or "~739 MB" in plan.describe("/drive")


def training_state(cfg: Config, model=None) -> dict:
    """The keys of a Lightning full training state that check_resumable reads."""
    model = model or YOLOv3(num_classes=cfg.model.num_classes, width=cfg.model.width)
    return {"global_step": 12, "loops": {}, "optimizer_states": [{}], "hyper_parameters": {"config": cfg.to_dict()},
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}


def test_an_incompatible_or_garbage_checkpoint_is_refused_in_one_line_naming_file_and_mismatch(tmp_path):
    cfg = Config(model=ModelConfig(num_classes=20, width=0.125), train=TrainConfig(epochs=40))
    ok = tmp_path / "ok.ckpt"
    torch.save(training_state(cfg), ok)
    check_resumable(ok, cfg)
    cases = {
        "garbage.ckpt": (b"hello, not a checkpoint", "not a checkpoint"),
        "narrow.ckpt": (Config(model=ModelConfig(num_classes=20, width=0.25)), r"width 0\.25, this run's 0\.125"),
        "classes.ckpt": (Config(model=ModelConfig(num_classes=3, width=0.125)), "num_classes 3, this run's 20"),
        "longer.ckpt": (Config(model=cfg.model, train=TrainConfig(epochs=30)),
                        "epochs 30 and this run asks 40.*--epochs 30"),
        "hotter.ckpt": (Config(model=cfg.model, train=TrainConfig(max_lr=5e-3)), "max_lr 0.005.*--max-lr 0.005"),
    }
    for name, (content, why) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(training_state(content), path)
        with pytest.raises(CheckpointError, match=why) as e:
            check_resumable(path, cfg)
        assert name in str(e.value) and "\n" not in str(e.value)
    weights_only = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": cfg.to_dict()}, "weights_only": True}, weights_only)
    with pytest.raises(CheckpointError, match="weights-only"):
        check_resumable(weights_only, cfg)
    with pytest.raises(CheckpointError, match="no such file"):
        check_resumable(tmp_path / "missing.ckpt", cfg)


def test_latest_in_an_empty_or_missing_folder_is_none(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_latest(tmp_path) is None
        assert find_latest(tmp_path / "nope") is None


def test_load_model_rebuilds_the_model_from_a_training_checkpoint(tmp_path):
    cfg = Config(model=ModelConfig(num_classes=3, width=0.125))
    model = YOLOv3(num_classes=3, width=0.125)
    ckpt = {"hyper_parameters": {"config": cfg.to_dict()},
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    torch.save(ckpt, tmp_path / "m.ckpt")
    loaded, loaded_cfg = load_model(tmp_path / "m.ckpt")
    assert loaded_cfg.model == cfg.model and not loaded.training
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_an_epochs_weights_file_is_fp16_and_loads_as_the_model(tmp_path):
    cfg = Config(model=ModelConfig(num_classes=3, width=0.125))
    model = YOLOv3(num_classes=3, width=0.125).eval()
    module = torch.nn.Module()
    module.model = model
    module.hparams = {"config": cfg.to_dict()}
    module.schedule = None
    trainer = fake_trainer(tmp_path)
    trainer.lightning_module, trainer.global_step, trainer.current_epoch = module, 30, 2
    path = PeriodicCheckpoint(tmp_path).save_weights(trainer)
    assert path == tmp_path / "weights" / "epoch=002-step=0000030-lr=1.0000e-03.ckpt"
    raw = torch.load(path, weights_only=True)
    assert {v.dtype for v in raw["state_dict"].values() if v.is_floating_point()} == {torch.float16}
    loaded, _ = load_model(path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(loaded(x), model(x)):
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_load_model_refuses_a_pickled_object_and_names_the_file(tmp_path):
    torch.save({"hyper_parameters": {"config": object()}}, tmp_path / "evil.ckpt")  # needs full unpickling
    with pytest.raises(ValueError, match="evil.ckpt"):
        load_model(tmp_path / "evil.ckpt")


def test_the_run_reports_its_storage_and_warns_when_the_folder_is_short_of_the_next_save(tmp_path):
    from helpers.train import storage_report

    plan = storage_plan(YOLOv3(num_classes=20, width=0.125), epochs=40, keep_last_k=2)
    report = storage_report(plan, tmp_path, free=10 * plan.total)
    assert "one full training state ~" in report and "keeps the last 2 full states" in report
    assert "warning" not in report and str(tmp_path) in report
    assert "short of the next save" in storage_report(plan, tmp_path, free=plan.full_state // 2)
    assert "may need up to" in storage_report(plan, tmp_path, free=plan.total - 1)


def test_a_save_warns_when_the_folder_is_short_of_it(tmp_path, monkeypatch):
    plan = storage_plan(YOLOv3(num_classes=20, width=0.125), epochs=2, keep_last_k=2)
    monkeypatch.setattr(checkpoints, "free_bytes", lambda folder: 1000)
    trainer = fake_trainer(tmp_path)
    trainer.global_step = 3
    with pytest.warns(UserWarning, match=r"only 1 KB free in .* the next checkpoint needs ~"):
        PeriodicCheckpoint(tmp_path, plan=plan).save(trainer)


def test_a_resume_keeps_the_loss_it_was_trained_with_even_from_before_the_loss_was_a_setting(tmp_path):
    cfg = Config(model=ModelConfig(num_classes=20, width=0.125))  # obj_loss bce, the default
    old = training_state(cfg)
    for key in ("obj_loss", "box_loss"):  # a checkpoint written when the course's loss was the only one
        del old["hyper_parameters"]["config"]["train"][key]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError, match="obj_loss mse and this run asks bce.*--obj-loss mse"):
        check_resumable(tmp_path / "old.ckpt", cfg)
    cfg.train.obj_loss = "mse"
    check_resumable(tmp_path / "old.ckpt", cfg)


def test_a_saved_config_reads_a_setting_it_predates_as_what_such_runs_used(tmp_path):
    from helpers.weights import load_model

    cfg = Config(model=ModelConfig(num_classes=20, width=0.125))
    old = training_state(cfg)
    del old["hyper_parameters"]["config"]["train"]["obj_loss"]  # written before the loss was a setting
    del old["hyper_parameters"]["config"]["model"]["obj_prior"]  # and before the objectness prior
    torch.save(old, tmp_path / "old.ckpt")
    _, saved = load_model(tmp_path / "old.ckpt")
    assert (saved.train.obj_loss, saved.train.box_loss) == ("mse", cfg.train.box_loss)  # the course's; kept
    assert saved.model.obj_prior is None and cfg.model.obj_prior == 0.01  # PyTorch's init, not today's default
