"""Checkpoints: written atomically, never overwritten, the newest loadable one found, loaded weights_only."""
import warnings

import pytest
import torch

from helpers.checkpoints import (
    NoOverwriteCheckpointIO,
    atomic_write_new,
    checkpoint_name,
    find_latest,
    free_name,
    load_model,
)
from helpers.config import Config, ModelConfig
from helpers.model import YOLOv3


def save(path, step):
    NoOverwriteCheckpointIO().save_checkpoint({"global_step": step, "w": torch.full((10,), float(step))}, path)


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
    with pytest.warns(UserWarning, match="truncated or unreadable"):
        latest = find_latest(tmp_path)
    assert latest == tmp_path / checkpoint_name(0, 20, 1e-3)


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


def test_load_model_refuses_a_pickled_object_and_names_the_file(tmp_path):
    torch.save({"hyper_parameters": {"config": object()}}, tmp_path / "evil.ckpt")  # needs full unpickling
    with pytest.raises(ValueError, match="evil.ckpt"):
        load_model(tmp_path / "evil.ckpt")
