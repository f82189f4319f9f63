"""Config.from_dict: what a config file, a checkpoint or a bundle may hold, and the one line that
refuses anything else."""
from __future__ import annotations

import json
import re

import pytest

from helpers.config import Config


def test_a_config_survives_json_with_its_types():
    cfg = Config()
    cfg.train.limit_train_batches, cfg.train.limit_val_batches = 10, 0.5
    again = Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.train.limit_train_batches, int)
    assert isinstance(again.data.train_sizes, tuple)


def test_an_int_is_taken_for_a_float_and_nothing_else_is_converted():
    cfg = Config().updated({"train": {"max_lr": 1}})
    assert cfg.train.max_lr == 1.0 and isinstance(cfg.train.max_lr, float)


@pytest.mark.parametrize("changes,named,expected", [
    ({"data": {"batch_size": "4"}}, "data.batch_size", "expected int"),
    ({"data": {"train_sizes": 160}}, "data.train_sizes", "expected list of int"),
    ({"train": {"max_lr": "0.001"}}, "train.max_lr", "expected float"),
    ({"train": {"epochs": True}}, "train.epochs", "expected int"),
    ({"train": {"epochs": 4.5}}, "train.epochs", "expected int"),
    ({"data": {"train_sizes": [320, "352"]}}, "data.train_sizes[1]", "expected int"),
    ({"train": {"limit_train_batches": "10"}}, "train.limit_train_batches", "expected int | float | null"),
    ({"train": {"obj_loss": "focal"}}, "train.obj_loss", "expected one of 'mse', 'bce'"),
])
def test_a_value_of_another_type_is_refused_in_one_line_naming_the_field_and_its_type(changes, named, expected):
    with pytest.raises(ValueError) as e:
        Config().updated(changes)
    assert str(e.value).startswith(f"{named}: {expected}, got ") and "\n" not in str(e.value)


@pytest.mark.parametrize("d,named", [
    ({"trian": {"epochs": 3}}, "unknown section 'trian'"),
    ({"train": {"epoch": 3}}, "unknown train field 'epoch' (did you mean 'epochs'?)"),
    ({"train": 3}, "section 'train' must be an object"),
    ([1, 2], "expected an object with model, data and train sections"),
])
def test_an_unknown_or_misshapen_section_or_field_is_refused_by_name(d, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        Config.from_dict(d)


@pytest.mark.parametrize("changes,expected", [
    ({"data": {"mosaic": 1.5}}, "mosaic 1.5: expected a fraction of training samples, 0 to 1"),
    ({"data": {"image_size": 0}}, "image_size 0: expected a positive multiple of 32"),
    ({"data": {"train_sizes": []}}, "train_sizes []: expected a list of one or more sizes"),
    ({"data": {"num_workers": -1}}, "num_workers -1: expected 0 (load in the main process) or more"),
    ({"data": {"on_error": "ignore"}}, "data.on_error: expected one of 'skip', 'raise'"),
    ({"model": {"num_classes": 0}}, "num_classes 0: expected at least 1"),
    ({"train": {"epochs": 0}}, "epochs 0: expected at least 1"),
    ({"train": {"lambda_noobj": -1}}, "lambda_noobj -1.0: expected 0 or more"),
    ({"train": {"obj_target_min": 2}}, "obj_target_min 2.0: expected 0 to 1"),
    ({"train": {"nms_iou": 1.5}}, "nms_iou 1.5: expected an IoU, 0 to 1"),
    ({"train": {"map_iou": 0}}, "map_iou 0.0: expected an IoU above 0, at most 1"),
])
def test_a_value_out_of_its_settings_range_is_refused_in_one_line_naming_it(changes, expected):
    with pytest.raises(ValueError) as e:
        Config().updated(changes)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)


def test_every_preset_is_within_its_settings_ranges():
    from helpers.train import PRESETS

    for preset in PRESETS.values():
        cfg = preset()
        assert Config.from_dict(cfg.to_dict()) == cfg


def test_sizes_of_any_integer_type_are_taken_and_a_lone_size_is_refused_in_one_line():
    import numpy as np

    from helpers.config import ConfigError, DataConfig

    assert DataConfig(image_size=np.int64(416), train_sizes=(np.int64(320),)).image_size == 416
    with pytest.raises(ConfigError, match="^train_sizes 416: expected a list of one or more sizes"):
        DataConfig(train_sizes=416)
