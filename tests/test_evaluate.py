"""evaluate / collect / the CLI: end to end on tiny models, hand-made loaders and a generated VOC set."""
import json
import math

import pytest
import torch
from torch import nn

from helpers.batch import Batch
from helpers.boxes import Letterbox
from helpers.config import ANCHORS, Config
from helpers.evaluate import Evaluator, evaluate, format_report, main
from helpers.metrics import YoloAccuracy
from helpers.model import YOLOv3
from helpers.targets import build_targets

C = 3
SIZE = 64


def tiny_cfg() -> Config:
    cfg = Config()
    cfg.model.num_classes, cfg.model.width = C, 0.125
    cfg.data.classes = ("circle", "square", "star")
    cfg.data.image_size = SIZE
    return cfg


def encode(outs, b, box_xyxy, cls, size=SIZE, obj=0.95):
    """Write raw logits decoding to `box_xyxy` (input pixels) on the finest scale's anchor 2."""
    o = outs[2]
    s = o.shape[2]
    x1, y1, x2, y2 = box_xyxy
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    j, i = int(cx / size * s), int(cy / size * s)
    aw, ah = ANCHORS[2][2]
    o[b, 2, i, j, 0] = math.log(obj / (1 - obj))
    o[b, 2, i, j, 1] = torch.logit(torch.tensor(cx / size * s - j, dtype=torch.float64)).item()
    o[b, 2, i, j, 2] = torch.logit(torch.tensor(cy / size * s - i, dtype=torch.float64)).item()
    o[b, 2, i, j, 3] = math.log(w / (aw * size))
    o[b, 2, i, j, 4] = math.log(h / (ah * size))
    o[b, 2, i, j, 5 + cls] = 12.0


class Oracle(nn.Module):
    """Returns, batch after batch, raw outputs that decode to the boxes it was given (a perfect detector)."""

    def __init__(self, batches):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # so that it has a device
        self.batches, self.calls = batches, 0

    def forward(self, images):
        outs = [o.clone() for o in self.batches[self.calls]]
        self.calls += 1
        return outs


def blank_outputs(b, size=SIZE):
    outs = [torch.zeros(b, 3, size // s, size // s, 5 + C) for s in (32, 16, 8)]
    for o in outs:
        o[..., 0] = -15.0
    return outs


def letterboxed_batch():
    """Two photos of 128 x 64 (w x h) letterboxed into 64: scale 0.5, 16 px of padding on top."""
    gts = [
        {"boxes": torch.tensor([[10.0, 6.0, 50.0, 40.0], [70.0, 10.0, 120.0, 60.0]]),
         "labels": torch.tensor([0, 2]), "difficult": torch.tensor([False, False])},
        {"boxes": torch.tensor([[20.0, 20.0, 60.0, 50.0], [0.0, 0.0, 8.0, 8.0]]),
         "labels": torch.tensor([1, 1]), "difficult": torch.tensor([False, True])},
    ]
    metas, rows = [], []
    outs = blank_outputs(2)
    for b, g in enumerate(gts):
        metas.append({"letterbox": Letterbox(scale=0.5, pad_left=0, pad_top=16, orig_h=64, orig_w=128), "gt": g})
        for box, label, diff in zip(g["boxes"].tolist(), g["labels"].tolist(), g["difficult"].tolist()):
            x1, y1, x2, y2 = box[0] * 0.5, box[1] * 0.5 + 16, box[2] * 0.5, box[3] * 0.5 + 16
            rows.append([b, label, (x1 + x2) / 2 / SIZE, (y1 + y2) / 2 / SIZE, (x2 - x1) / SIZE, (y2 - y1) / SIZE])
            if not diff:
                encode(outs, b, (x1, y1, x2, y2), label)
    return Batch(torch.zeros(2, 3, SIZE, SIZE), torch.tensor(rows), metas), outs


def test_a_perfect_detector_through_the_letterbox_scores_map_one():
    batch, outs = letterboxed_batch()
    result = evaluate(Oracle([outs]), [batch], tiny_cfg(), progress=False)
    assert result["images"] == 2 and result["ground_truths"] == 4 and result["detections"] == 3
    assert result["map50_voc07"] == pytest.approx(1.0) and result["map50_all"] == pytest.approx(1.0)
    assert result["coco"]["map_50"] == pytest.approx(1.0)
    assert [r["num_gt"] for r in result["per_class"]] == [1, 1, 1]  # the difficult one is not counted
    json.dumps({k: v for k, v in result.items() if k != "curves"})  # JSON-ready
    report = format_report(result)
    assert "star" in report and "VOC2007 11-point 100.00" in report


def scored(batch, outs) -> Evaluator:
    evaluator = Evaluator(tiny_cfg().data.classes)
    evaluator.update(outs, batch)
    return evaluator


def test_detections_come_back_in_original_pixels():
    batch, outs = letterboxed_batch()
    dets, truths, _ = scored(batch, outs).detections.per_image()
    first = dets[0][dets[0][:, 5] == 0][0, :4]
    torch.testing.assert_close(first, torch.tensor([10.0, 6.0, 50.0, 40.0]), atol=1e-3, rtol=0)
    assert truths[1]["difficult"].tolist() == [False, True]


def test_accuracies_equal_the_metric_on_the_same_outputs_and_targets():
    batch, outs = letterboxed_batch()
    result = scored(batch, outs).compute()
    ref = YoloAccuracy()
    ref.update(outs, build_targets(batch.boxes, 2, SIZE))
    assert {k: result[k] for k in ref.compute()} == pytest.approx({k: float(v) for k, v in ref.compute().items()})
    assert result["noobj_acc"] == pytest.approx(100.0)  # every negative cell is far below 0.05


def test_a_batch_without_metas_is_scored_in_input_pixels():
    batch, outs = letterboxed_batch()
    # A training batch has no metas; difficult boxes are not in it.
    keep = torch.tensor([True, True, True, False])
    result = evaluate(Oracle([outs]), [Batch(batch.images, batch.boxes[keep])], tiny_cfg(), coco=False,
                      progress=False)
    assert result["map50_all"] == pytest.approx(1.0) and result["coco"] is None


def test_images_get_ids_unique_across_ranks_and_only_what_was_asked_is_scored():
    batch, outs = letterboxed_batch()
    evaluator = Evaluator(tiny_cfg().data.classes)
    evaluator.reset(accuracy=False, detections=True, rank=1, world_size=2)
    evaluator.update(outs, batch)
    evaluator.update(outs, batch)
    assert evaluator.detections.gts[-1][0, 0] == 1 + 2 * 3  # rank 1's 4th image: dataset index 7
    result = evaluator.compute()
    assert result["images"] == 4 and result["class_acc"] is None and result["map50_all"] == pytest.approx(1.0)
    evaluator.reset(accuracy=True, detections=False)
    evaluator.update(outs, batch)
    result = evaluator.compute()
    assert result["map50_all"] is None and result["class_acc"] is not None


def test_a_real_tiny_model_runs_and_keeps_its_mode_and_outputs_sane():
    torch.manual_seed(0)
    model = YOLOv3(num_classes=C, width=0.125).train()
    batch, _ = letterboxed_batch()
    result = evaluate(model, [batch, batch], tiny_cfg(), progress=False)
    assert model.training  # put back as it was
    assert result["images"] == 4
    for k in ("class_acc", "noobj_acc", "obj_acc"):
        assert 0.0 <= result[k] <= 100.0
    assert 0.0 <= result["map50_voc07"] <= 1.0
    assert len(result["curves"]["precision"]) == C


def test_an_empty_batch_of_unreadable_samples_is_skipped_and_counted():
    batch, outs = letterboxed_batch()
    empty = Batch(torch.zeros(0, 3, 1, 1), torch.zeros(0, 6), [], torch.tensor(3))
    result = evaluate(Oracle([outs]), [empty, batch], tiny_cfg(), progress=False)
    assert result["images"] == 2 and result["map50_all"] == pytest.approx(1.0) and result["skipped"] == 3


def test_a_loader_of_something_else_is_refused_with_a_clear_error():
    with pytest.raises(TypeError, match="must yield helpers.batch.Batch"):
        evaluate(Oracle([]), [(torch.zeros(1, 3, SIZE, SIZE), torch.zeros(0, 6))], tiny_cfg(), progress=False)


@pytest.mark.slow
def test_cli_prints_the_table_and_writes_metrics_and_pr_curves_into_a_fresh_folder(tmp_path, capsys):
    from helpers.synthetic import make_voc_dataset

    devkit = make_voc_dataset(tmp_path / "data", n_trainval=2, n_test=5, image_size=(96, 64), seed=1)
    cfg = Config()
    cfg.model.width = 0.125
    cfg.data.image_size = SIZE
    model = YOLOv3(num_classes=20, width=0.125)
    # The layout helpers.train's checkpoints have (what helpers.weights.load_model reads).
    ckpt = tmp_path / "run" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"hyper_parameters": {"config": cfg.to_dict()},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    out = tmp_path / "eval"
    args = ["--checkpoint", str(ckpt), "--data", str(devkit), "--split", "test", "--workers", "0",
            "--batch-size", "2", "--out", str(out)]
    result = main(args)
    printed = capsys.readouterr().out
    assert "aeroplane" in printed and "VOC2007 11-point" in printed and "COCO" in printed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["images"] == 5 and len(saved["per_class"]) == 20
    assert saved["map50_voc07"] == result["map50_voc07"]
    assert (out / "pr_curves.png").stat().st_size > 0
    main(args)  # a second run never overwrites the first
    assert (tmp_path / "eval-v2" / "metrics.json").is_file()
    assert json.loads((out / "metrics.json").read_text()) == saved


def test_the_report_says_how_many_images_could_not_be_read():
    batch, outs = letterboxed_batch()
    empty = Batch(torch.zeros(0, 3, 1, 1), torch.zeros(0, 6), [], torch.tensor(2))
    result = evaluate(Oracle([outs]), [empty, batch], tiny_cfg(), progress=False)
    assert "images 2, 2 unreadable (skipped" in format_report(result)


def test_a_limit_below_one_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["--checkpoint", "x.ckpt", "--limit", "0"])
    assert "--limit 0: the number of images to evaluate must be at least 1" in capsys.readouterr().err
