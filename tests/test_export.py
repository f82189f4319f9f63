"""Model bundle: safetensors + JSON, loaded without pickle, same outputs, never overwritten."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.config import VOC_CLASSES, Config
from helpers.export import export_checkpoint, main, write_bundle
from helpers.model import YOLOv3
from helpers.weights import CONFIG, WEIGHTS, BundleError, load_bundle, load_model, read_bundle_config

REPO = Path(__file__).resolve().parents[1]


def tiny_config() -> Config:
    cfg = Config()
    cfg.model.width = 0.125
    cfg.data.image_size = 64
    return cfg


def fake_checkpoint(path, model: YOLOv3, cfg: Config, epoch: int = 3, step: int = 42):
    """What helpers.train's Lightning checkpoint holds that export reads (weights_only-safe types)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "global_step": step, "pytorch-lightning_version": "2.6.6",
                "hyper_parameters": {"config": cfg.to_dict()},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.fixture
def model_and_config():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = YOLOv3(num_classes=20, width=cfg.model.width).eval()
    # non-trivial BatchNorm statistics, so a bundle that dropped buffers would give other outputs
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model, cfg


def test_bundle_round_trip_gives_identical_outputs(tmp_path, model_and_config):
    model, cfg = model_and_config
    out = write_bundle(model, cfg, tmp_path / "bundle")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG, WEIGHTS]
    loaded, loaded_cfg = load_bundle(out)
    assert not loaded.training
    assert loaded_cfg == cfg
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fp16_bundle_is_half_the_bytes_and_loads_as_float32_with_close_outputs(tmp_path, model_and_config):
    model, cfg = model_and_config
    full, half = write_bundle(model, cfg, tmp_path / "full"), write_bundle(model, cfg, tmp_path / "half", fp16=True)
    assert read_bundle_config(half)["weights_dtype"] == "float16"
    assert (half / WEIGHTS).stat().st_size < 0.55 * (full / WEIGHTS).stat().st_size
    loaded, _ = load_bundle(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0.05 * float(a.abs().max()))


def test_export_says_in_words_what_the_model_was_trained_and_measured_on(tmp_path, model_and_config):
    model, cfg = model_and_config
    ckpt = fake_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", model, cfg)
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"metrics": {"val/map50_voc07": 0.5}}))
    training = read_bundle_config(export_checkpoint(ckpt, tmp_path / "b"))["training"]
    assert "generated coloured shapes" in training["trained_on"] and "not PASCAL VOC" in training["trained_on"]
    assert training["evaluated_on"].startswith("the generated test split") and "64 px" in training["evaluated_on"]
    cfg.data.root, cfg.data.train_split = "/data/VOCdevkit", "trainval"  # train() records the split it used
    training = read_bundle_config(export_checkpoint(fake_checkpoint(tmp_path / "voc.ckpt", model, cfg),
                                                    tmp_path / "c"))["training"]
    assert training["trained_on"] == "`VOCdevkit` (trainval split)"


def test_bundle_config_lists_classes_anchors_size_width(tmp_path, model_and_config):
    model, cfg = model_and_config
    info = read_bundle_config(write_bundle(model, cfg, tmp_path / "b", hub_repo="me/yolo"))
    assert info["classes"] == list(VOC_CLASSES)
    assert info["num_classes"] == 20 and info["width"] == 0.125 and info["image_size"] == 64
    assert len(info["anchors"]) == 3 and all(len(s) == 3 for s in info["anchors"])
    assert info["hub_repo"] == "me/yolo"
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert len(info["weights_sha256"]) == 64


def test_load_bundle_never_unpickles(tmp_path, model_and_config, monkeypatch):
    model, cfg = model_and_config
    out = write_bundle(model, cfg, tmp_path / "b")

    def refuse(*args, **kwargs):
        raise AssertionError("a bundle must load without pickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_bundle(out)


def test_existing_bundle_is_never_overwritten(tmp_path, model_and_config):
    model, cfg = model_and_config
    out = write_bundle(model, cfg, tmp_path / "b")
    before = (out / WEIGHTS).read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_bundle(YOLOv3(num_classes=20, width=0.125), cfg, out)
    assert (out / WEIGHTS).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary folder left behind


def test_a_full_disk_while_writing_a_bundle_is_one_line_and_leaves_no_folder(tmp_path, model_and_config,
                                                                             file_size_limit):
    from helpers.storage import StorageFull

    with file_size_limit(100_000), pytest.raises(StorageFull) as e:  # the weights take ~1 MB
        write_bundle(*model_and_config, tmp_path / "b")
    assert "\n" not in str(e.value) and f"could not write {tmp_path / 'b'}" in str(e.value) and "free in" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temporary folder


def test_a_killed_exports_temporary_folder_is_removed_by_the_next_export(tmp_path, model_and_config, capsys):
    model, cfg = model_and_config
    ckpt = fake_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", model, cfg)
    code = ("import os, sys, torch\nfrom helpers import storage\nfrom helpers.export import export_checkpoint\n"
            "def fill_then_die(out, fill, **kw):\n"
            "    tmp = storage._temporary_beside(out, folder=True); fill(tmp); os._exit(9)\n"
            "import helpers.export as e; e.atomic_new_folder = fill_then_die\n"
            f"export_checkpoint({str(ckpt)!r}, {str(tmp_path / 'b1')!r}, display_conf=0.3)\n")
    killed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-2000:]
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".b1.")]
    assert len(left) == 1 and (left[0] / WEIGHTS).stat().st_size > 100_000  # what the kill leaves behind
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "b2"), "--display-conf", "0.3"]) == 0
    assert "removed 1 temporary" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b2", "run"]


def test_empty_target_folder_is_used(tmp_path, model_and_config):
    model, cfg = model_and_config
    (tmp_path / "empty").mkdir()
    assert load_bundle(write_bundle(model, cfg, tmp_path / "empty"))[1] == cfg


def test_export_from_checkpoint_includes_run_metrics_and_training_summary(tmp_path, model_and_config):
    model, cfg = model_and_config
    run = tmp_path / "run"
    ckpt = fake_checkpoint(run / "checkpoints" / "epoch=003-step=0000042-lr=1.0000e-03.ckpt", model, cfg)
    (run / "metrics.json").write_text(json.dumps({"seconds": 12.5, "metrics": {"val/map50_voc07": 0.42,
                                                                                "val/class_acc": 81.0},
                                                  "ap_per_class_voc07": {"cat": 0.5, "cow": None}}))
    out = export_checkpoint(ckpt, tmp_path / "bundle", hub_repo="me/yolo")
    info = read_bundle_config(out)
    assert info["training"]["epoch"] == 3 and info["training"]["global_step"] == 42
    assert info["training"]["checkpoint"] == ckpt.name
    assert info["metrics"]["val/map50_voc07"] == 0.42
    assert info["metrics"]["ap_per_class_voc07"]["cat"] == 0.5
    reloaded, _ = load_bundle(out)
    from_ckpt, _ = load_model(ckpt)
    for (k, a), (_, b) in zip(reloaded.state_dict().items(), from_ckpt.state_dict().items()):
        assert torch.equal(a, b), k


def test_metrics_file_is_merged(tmp_path, model_and_config):
    model, cfg = model_and_config
    ckpt = fake_checkpoint(tmp_path / "c" / "x.ckpt", model, cfg)
    (tmp_path / "eval.json").write_text(json.dumps({"map50_voc07_test": 0.61}))
    info = read_bundle_config(export_checkpoint(ckpt, tmp_path / "b", metrics_file=tmp_path / "eval.json"))
    assert info["metrics"]["map50_voc07_test"] == 0.61 and info["metrics"]["source"] == "eval.json"


def test_checkpoints_load_model_accepts_a_bundle_folder(tmp_path, model_and_config):
    model, cfg = model_and_config
    loaded, loaded_cfg = load_model(write_bundle(model, cfg, tmp_path / "b"))
    assert loaded_cfg == cfg and isinstance(loaded, YOLOv3)


@pytest.mark.parametrize("damage, message", [
    ("no_config", "config.json missing"),
    ("bad_json", "cannot read bundle config"),
    ("wrong_format", "format is"),
    ("no_weights", "model.safetensors missing"),
    ("truncated_weights", "cannot read weights"),
    ("wrong_width", "do not fit"),
    ("other_anchors", "trained with anchors"),
    ("other_strides", "trained with anchors"),
])
def test_damaged_bundle_gives_a_clear_error_naming_the_file(tmp_path, model_and_config, damage, message):
    model, cfg = model_and_config
    out = write_bundle(model, cfg, tmp_path / "b")
    info = json.loads((out / CONFIG).read_text())
    if damage == "no_config":
        (out / CONFIG).unlink()
    elif damage == "bad_json":
        (out / CONFIG).write_text("{not json")
    elif damage == "wrong_format":
        (out / CONFIG).write_text(json.dumps({**info, "format": "something-else"}))
    elif damage == "no_weights":
        (out / WEIGHTS).unlink()
    elif damage == "truncated_weights":
        data = (out / WEIGHTS).read_bytes()
        (out / WEIGHTS).write_bytes(data[: len(data) // 2])
    elif damage == "wrong_width":
        info["config"]["model"]["width"] = 0.25
        (out / CONFIG).write_text(json.dumps(info))
    elif damage in ("other_anchors", "other_strides"):  # weights for another decoding: refused, not misread
        key, value = ("anchors", [[[0.5, 0.5]] * 3] * 3) if damage == "other_anchors" else ("strides", [64, 32, 16])
        (out / CONFIG).write_text(json.dumps({**info, key: value}))
    with pytest.raises(BundleError, match=message) as e:
        load_bundle(out)
    assert str(out) in str(e.value)


def test_command_line_export_and_refusal(tmp_path, model_and_config, capsys):
    model, cfg = model_and_config
    ckpt = fake_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", model, cfg)
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "b")]) == 0
    assert "bundle written" in capsys.readouterr().out
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "b")]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "c")]) == 2
    assert "not found" in capsys.readouterr().err


def test_command_line_export_of_the_latest_checkpoint_of_a_run(tmp_path, model_and_config, capsys):
    model, cfg = model_and_config
    fake_checkpoint(tmp_path / "run" / "checkpoints" / "epoch=000-step=0000004-lr=1.0000e-03.ckpt", model, cfg)
    assert main(["--checkpoint", "latest", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "b")]) == 0
    assert main(["--checkpoint", "latest", "--run-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "c")]) == 2
    assert "empty: not found" in capsys.readouterr().err


# --- the confidence threshold the app shows the model at -----------------------------------------
def fake_evaluation(monkeypatch, detections, truths):
    """helpers.evaluate.evaluate leaving these detections and truths in its evaluator (the loader is
    built, not read)."""
    from helpers import evaluate

    def fake(model, loader, *, evaluator, **kw):
        evaluator.detections.update(detections, truths, torch.arange(len(detections)))
        return {}

    monkeypatch.setattr(evaluate, "evaluate", fake)


def test_display_conf_is_the_slider_value_with_the_best_f1_measured_on_the_data(tmp_path, voc, model_and_config,
                                                                               monkeypatch):
    model, cfg = model_and_config
    a, b, c = [10.0, 10, 40, 40], [50.0, 10, 90, 60], [0.0, 0, 5, 5]
    truths = [{"boxes": torch.tensor([a, b]), "labels": torch.tensor([3, 7]),
               "difficult": torch.tensor([False, False])},
              {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
               "difficult": torch.zeros(0, dtype=torch.bool)}]
    # in score order: TP 0.9, FP 0.5, TP 0.3, FP 0.1 -> F1 0.8 for thresholds 0.10..0.29, the best
    detections = [torch.tensor([a + [0.9, 3], b + [0.3, 7], c + [0.1, 3]]), torch.tensor([c + [0.5, 7]])]
    fake_evaluation(monkeypatch, detections, truths)
    ckpt = fake_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", model, cfg)
    info = read_bundle_config(export_checkpoint(ckpt, tmp_path / "b", data=voc))
    assert info["display_conf"] == 0.29  # score > t keeps the TP at 0.3; among equal F1, the highest t
    measured = info["display_conf_measured"]
    assert (measured["f1"], measured["recall"]) == (0.8, 1.0) and measured["precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert measured["boxes_per_image"] == 1.5 and measured["images"] == 2 and measured["objects"] == 2
    assert measured["at_default"] == {"conf": 0.4, "f1": 0.5, "precision": 0.5, "recall": 0.5,
                                      "boxes_per_image": 1.0}
    assert info["display_conf_source"].startswith(
        "F1-best on the test split of `VOCdevkit` (2 images, 2 objects, 64 px): F1 0.800")


def test_display_conf_by_hand_is_recorded_as_such_and_checked(tmp_path, model_and_config, capsys):
    model, cfg = model_and_config
    ckpt = fake_checkpoint(tmp_path / "c" / "x.ckpt", model, cfg)
    info = read_bundle_config(export_checkpoint(ckpt, tmp_path / "b", display_conf=0.3))
    assert (info["display_conf"], info["display_conf_source"]) == (0.3, "set by hand at export")
    assert "display_conf_measured" not in info
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "d"), "--display-conf", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--display-conf 1.5: must lie from 0.01 to 0.99" in err
    assert not (tmp_path / "d").exists()


def test_without_its_data_the_export_records_the_default_and_says_why(tmp_path, model_and_config, capsys):
    model, cfg = model_and_config
    cfg.data.root = str(tmp_path / "gone" / "VOCdevkit")  # trained on another machine
    ckpt = fake_checkpoint(tmp_path / "c" / "x.ckpt", model, cfg)
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "b")]) == 0
    info = read_bundle_config(tmp_path / "b")
    assert info["display_conf"] == 0.4
    assert info["display_conf_source"] == f"the default, not measured ({cfg.data.root}: data folder not found)"
    err = capsys.readouterr().err
    assert "note: display threshold not measured" in err and "--data PATH" in err


@pytest.mark.parametrize("data, message", [("missing", "data folder not found"),
                                           ("voc", "the test split of `VOCdevkit`: no confidence threshold finds"),
                                           ("course", "the test split of `course`: no confidence threshold finds")])
def test_data_named_on_the_command_line_that_cannot_be_measured_on_is_one_line(tmp_path, voc, course, model_and_config,
                                                                             capsys, data, message):
    model, cfg = model_and_config  # random weights: nothing right at any threshold (read, run, scored: both layouts)
    ckpt = fake_checkpoint(tmp_path / "c" / "x.ckpt", model, cfg)
    folder = {"voc": voc, "course": course}.get(data, tmp_path / "missing")
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "b"), "--data", str(folder)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # after the bar
    assert len(errors) == 1 and f"--data {folder}" in errors[0] and message in errors[0]
    assert not (tmp_path / "b").exists()


def test_a_bundle_is_reissued_with_the_same_weights_file_and_only_the_display_fields_new(
        tmp_path, model_and_config, capsys):
    model, cfg = model_and_config
    old = write_bundle(model, cfg, tmp_path / "old", fp16=True, metrics={"m": 0.1})  # without display_conf
    assert main(["--checkpoint", str(old), "--out", str(tmp_path / "new"), "--display-conf", "0.25"]) == 0
    new = tmp_path / "new"
    assert (new / WEIGHTS).read_bytes() == (old / WEIGHTS).read_bytes()
    before, after = read_bundle_config(old), read_bundle_config(new)
    assert {k: v for k, v in after.items() if not k.startswith("display_conf")} == before
    assert (after["display_conf"], after["display_conf_source"]) == (0.25, "set by hand at export")
    assert main(["--checkpoint", str(old), "--out", str(tmp_path / "x"), "--fp16"]) == 2
    assert "is a bundle" in capsys.readouterr().err


def test_a_bundle_whose_weights_do_not_match_their_hash_is_not_reissued(tmp_path, model_and_config):
    from helpers.export import export_bundle

    model, cfg = model_and_config
    old = write_bundle(model, cfg, tmp_path / "old")
    info = json.loads((old / CONFIG).read_text())
    (old / CONFIG).write_text(json.dumps({**info, "weights_sha256": "0" * 64}))
    with pytest.raises(BundleError, match="does not match the weights_sha256"):
        export_bundle(old, tmp_path / "new", display_conf=0.3)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("fields, expected", [
    ({"display_conf": 0.23, "display_conf_source": "F1-best on X"}, (0.23, "F1-best on X")),
    ({}, (0.4, "the app's default (this bundle records no threshold of its own)")),
    ({"display_conf": 1.5}, (0.4, "the app's default (the bundle's display_conf 1.5 is not a number from 0.01 "
                                  "to 0.99, so it is not used)")),
    ({"display_conf": "0.2"}, (0.4, "the app's default (the bundle's display_conf '0.2' is not a number from 0.01 "
                                    "to 0.99, so it is not used)")),
])
def test_a_bundles_display_conf_is_read_with_its_source_and_older_bundles_get_the_default(fields, expected):
    from helpers.weights import display_conf

    assert display_conf({"format": "yolov3-voc-bundle", **fields}) == expected


@pytest.mark.slow
def test_the_bundled_models_threshold_is_what_measuring_it_again_gives():
    """app/bundle's display_conf is the F1-best one on the generated test split it was trained beside."""
    from pathlib import Path

    from helpers.datamodule import synthetic_root
    from helpers.export import measure_display_conf

    bundle = Path(__file__).resolve().parents[1] / "app" / "bundle"
    info = read_bundle_config(bundle)
    model, cfg = load_bundle(bundle)
    measured = measure_display_conf(model, cfg, synthetic_root(cfg.train.seed), cfg.data.val_split, generated=True)
    assert measured["display_conf"] == info["display_conf"]
    assert measured["display_conf_measured"] == info["display_conf_measured"]
    assert measured["display_conf_measured"]["f1"] > measured["display_conf_measured"]["at_default"]["f1"]
