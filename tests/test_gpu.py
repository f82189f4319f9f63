"""On a CUDA GPU only (skipped elsewhere): Lightning's 16-mixed trains with a finite loss, and its
checkpoints load back on the CPU; the LR range test hands its GPU memory back."""
from __future__ import annotations

import pytest
import torch

from helpers.config import Config, DataConfig, ModelConfig, TrainConfig
from helpers.synthetic import make_voc_dataset
from helpers.weights import find_latest, load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_16_mixed_training_has_a_finite_loss_and_checkpoints_load_on_cpu(tmp_path):
    from helpers.train import train

    root = make_voc_dataset(tmp_path / "voc", n_trainval=32, n_test=8, seed=0)
    cfg = Config(model=ModelConfig(width=0.25),
                 data=DataConfig(root=str(root), image_size=128, train_sizes=(96, 128, 160), batch_size=8,
                                 num_workers=2),
                 train=TrainConfig(epochs=3, pct_start=0.3, precision="16-mixed", accelerator="gpu",
                                   run_dir=str(tmp_path / "run")))
    summary = train(cfg)
    assert torch.isfinite(torch.tensor(summary["metrics"]["train/loss_epoch"]))
    model, loaded = load_model(find_latest(tmp_path / "run" / "checkpoints"), map_location="cpu")
    assert loaded.train.precision == "16-mixed"
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        assert all(torch.isfinite(o).all() for o in model(torch.rand(1, 3, 128, 128)))
    on_gpu, _ = load_model(find_latest(tmp_path / "run" / "checkpoints"), map_location="cuda")
    assert {p.device.type for p in on_gpu.parameters()} == {"cuda"}  # the notebook evaluates there


def test_the_loss_is_fp32_and_finite_under_cuda_fp16_autocast():
    from helpers.loss import YoloLoss
    from helpers.model import YOLOv3
    from helpers.targets import build_targets

    model = YOLOv3(num_classes=20, width=0.25).cuda()
    boxes = torch.tensor([[0, 3, 0.5, 0.5, 0.3, 0.2], [1, 7, 0.2, 0.7, 0.05, 0.08]], device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        outputs = model(torch.rand(2, 3, 128, 128, device="cuda"))
        loss = YoloLoss()(outputs, build_targets(boxes, 2, 128))
    assert outputs[0].dtype == torch.float16 and loss.dtype == torch.float32 and torch.isfinite(loss)


def test_the_lr_range_test_hands_back_the_gpu_memory_it_took(tmp_path):
    """The notebook runs the range test on cuda:0, then a 2-GPU child trains there: whatever the test
    held (the finder's caches, the AMP scaler, the allocator's cached blocks) must be free by then."""
    from helpers.datamodule import YOLODataModule
    from helpers.lr_finder import find_lr
    from helpers.module import YOLOModule, build_optimizer

    root = make_voc_dataset(tmp_path / "voc", n_trainval=16, n_test=4, seed=0)
    cfg = Config(model=ModelConfig(width=0.25), data=DataConfig(root=str(root), image_size=128, train_sizes=(128,),
                                                                batch_size=8, num_workers=0))
    dm = YOLODataModule(cfg.data, seed=0)
    dm.setup("fit")
    module = YOLOModule(cfg.to_dict())
    optimizer = build_optimizer(module.model.parameters(), cfg.train, 1e-3)
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    find_lr(module.model, optimizer, dm.train_dataloader(), num_iter=6, device="cuda", amp=True)
    torch.cuda.synchronize()
    assert {p.device.type for p in module.model.parameters()} == {"cpu"}  # back where it came from
    assert torch.cuda.memory_allocated() == 0
    assert torch.cuda.memory_reserved() <= before, (torch.cuda.memory_reserved(), before)
