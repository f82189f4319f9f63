"""Where the notebook runs: the folders of Colab, Kaggle and a local run, GPUs the installed torch
cannot run refused before the first CUDA op, and a Kaggle session picking up the previous one's run."""
from __future__ import annotations

import pytest
import torch

from helpers.runtime import adopt_earlier_run, detect, runs_on
from helpers.schedule import OneCycleSpec, Schedule


def test_colab_keeps_the_run_on_drive_and_the_data_on_the_local_disk():
    rt = detect(env={}, modules={"google.colab": object()})
    assert rt.kind == "colab" and str(rt.run_dir).startswith("/content/drive/MyDrive")
    assert str(rt.download_dir).startswith("/content/") and "drive" not in str(rt.download_dir)


def test_kaggle_and_local_runs_and_who_downloads():
    kaggle = detect(env={"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, modules={})
    assert kaggle.kind == "kaggle" and str(kaggle.run_dir).startswith("/kaggle/working") and kaggle.can_download
    assert not detect(env={}, modules={}).can_download
    assert detect(env={"YOLO_DOWNLOAD": "1"}, modules={}).can_download


def test_a_p100_cannot_run_a_torch_built_from_sm_75_on():
    built = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert not runs_on((6, 0), built)  # Kaggle's P100
    assert runs_on((7, 5), built)  # T4
    assert runs_on((8, 9), built)  # L4: sm_86 binaries run on 8.9
    assert not runs_on((6, 0), ["sm_75", "compute_75"])  # PTX only helps newer GPUs
    assert runs_on((9, 0), ["sm_80", "compute_80"])


def _earlier_run(folder, step):
    spec = OneCycleSpec(max_lr=1e-3, epochs=2, steps_per_epoch=5, batch_size=4, dataset_length=20)
    Schedule.compute(spec).write(folder / "schedule.txt")
    (folder / "checkpoints").mkdir(parents=True)
    for s in (step - 5, step):
        torch.save({"state_dict": {}}, folder / "checkpoints" / f"epoch=000-step={s:07d}-lr=1.0000e-03.ckpt")
    (folder / "logs" / "version_0").mkdir(parents=True)
    (folder / "logs" / "version_0" / "metrics.csv").write_text("step,lr\n0,1e-5\n")


def test_a_new_kaggle_session_adopts_the_run_attached_as_input(tmp_path):
    earlier = tmp_path / "input" / "my-notebook" / "yolov3-voc"
    _earlier_run(earlier, step=10)
    run_dir = tmp_path / "working" / "yolov3-voc"
    assert adopt_earlier_run(run_dir, tmp_path / "input") == earlier
    assert (run_dir / "schedule.txt").read_text() == (earlier / "schedule.txt").read_text()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["epoch=000-step=0000010-lr=1.0000e-03.ckpt"]
    assert (run_dir / "logs" / "version_0" / "metrics.csv").is_file()
    assert adopt_earlier_run(run_dir, tmp_path / "input") is None  # the run folder now holds the run


def test_nothing_to_adopt_leaves_the_run_folder_alone(tmp_path):
    assert adopt_earlier_run(tmp_path / "working" / "yolov3-voc", tmp_path / "input") is None
    assert not (tmp_path / "working").exists()


def test_the_training_command_carries_the_whole_config(tmp_path):
    import json

    from helpers.config import Config
    from helpers.runtime import train_command
    from helpers.train import command_line

    cfg = Config()
    cfg.train.run_dir, cfg.train.devices, cfg.data.root = str(tmp_path / "run"), 2, "/kaggle/input/x"
    command = train_command(cfg)
    assert command[1:3] == ["-m", "helpers.train"] and command[-2:] == ["--resume", "latest"]
    again, _ = command_line(command[3:])
    assert again.to_dict() == json.loads(json.dumps(cfg.to_dict()))
    assert command_line(train_command(cfg, lr_find=True)[3:])[1].lr_find  # as train(lr_find=True)


def test_a_smoke_run_and_the_course_run_never_share_a_folder():
    from pathlib import Path

    from helpers.runtime import mode_run_dir

    for base in ("/content/drive/MyDrive/yolov3-voc", "/kaggle/working/yolov3-voc", "runs/notebook"):
        smoke, course = mode_run_dir(base, smoke=True), mode_run_dir(base, smoke=False)
        assert course == Path(base) and smoke.parent == course.parent and smoke != course
        assert not smoke.is_relative_to(course) and not course.is_relative_to(smoke)


@pytest.mark.slow
def test_two_devices_train_from_a_child_process_as_the_notebook_runs_them(voc, tmp_path, monkeypatch, capsys):
    """The notebook's two-GPU path, on 2 CPU processes (gloo): the run completes and reports."""
    from helpers.config import Config, DataConfig, ModelConfig, TrainConfig
    from helpers.runtime import train_in_subprocess

    monkeypatch.setenv("MASTER_PORT", "29533")
    cfg = Config(model=ModelConfig(width=0.125),
                 data=DataConfig(root=str(voc), image_size=64, train_sizes=(64,), batch_size=2, num_workers=0,
                                 mosaic=0.5, pin_memory=False),
                 train=TrainConfig(epochs=1, precision="32-true", accelerator="cpu", devices=2, strategy="ddp",
                                   run_dir=str(tmp_path / "run")))
    summary = train_in_subprocess(cfg)
    assert summary["global_step"] == 3  # 12 images / (2 processes x batch 2)
    assert "$ " in capsys.readouterr().out
