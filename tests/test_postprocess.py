"""decode / detect: hand-built raw outputs decode to the boxes we put in; NMS and letterbox behave."""
import math

import pytest
import torch

from helpers.boxes import Letterbox
from helpers.config import ANCHORS
from helpers.postprocess import decode, detect

C = 20


def blank(batch=1, size=(416, 416), num_classes=C):
    """Raw outputs with every objectness logit very negative (no candidates)."""
    h, w = size
    outs = [torch.zeros(batch, 3, h // s, w // s, 5 + num_classes) for s in (32, 16, 8)]
    for o in outs:
        o[..., 0] = -20.0
    return outs


def put(outs, size, b, scale, a, box_xyxy, obj=0.9, cls=0, cls_logit=10.0):
    """Write raw logits that decode to `box_xyxy` (input pixels) at the cell holding its centre."""
    h, w = size
    o = outs[scale]
    sh, sw = o.shape[2], o.shape[3]
    x1, y1, x2, y2 = box_xyxy
    cx, cy, bw, bh = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    j, i = int(cx / w * sw), int(cy / h * sh)
    aw, ah = ANCHORS[scale][a]
    o[b, a, i, j, 0] = math.log(obj / (1 - obj))
    o[b, a, i, j, 1] = torch.logit(torch.tensor(cx / w * sw - j, dtype=torch.float64)).item()
    o[b, a, i, j, 2] = torch.logit(torch.tensor(cy / h * sh - i, dtype=torch.float64)).item()
    o[b, a, i, j, 3] = math.log(bw / (aw * w))
    o[b, a, i, j, 4] = math.log(bh / (ah * h))
    o[b, a, i, j, 5:] = 0.0
    o[b, a, i, j, 5 + cls] = cls_logit


def test_decode_of_a_hand_built_cell_gives_the_expected_box():
    outs = blank()
    # Coarse scale (13 x 13), anchor 1 (0.38, 0.48), row i=4, column j=6: tx = ty = 0 puts the centre
    # mid-cell; tw = log 2 doubles the anchor width; th = 0 keeps its height.
    outs[0][0, 1, 4, 6, :5] = torch.tensor([0.0, 0.0, 0.0, math.log(2.0), 0.0])
    outs[0][0, 1, 4, 6, 5 + 7] = 3.0
    dec = decode(outs)
    assert dec.shape == (1, 3 * (13 * 13 + 26 * 26 + 52 * 52), 5 + C) == (1, 10647, 25)
    row = dec[0, 1 * 169 + 4 * 13 + 6]
    cx, cy = (0.5 + 6) / 13 * 416, (0.5 + 4) / 13 * 416  # 208, 144
    w, h = 2 * 0.38 * 416, 0.48 * 416
    torch.testing.assert_close(row[:4], torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    assert row[4].item() == pytest.approx(0.5)  # sigmoid(0)
    probs = torch.softmax(torch.tensor([0.0] * 7 + [3.0] + [0.0] * 12), 0)
    torch.testing.assert_close(row[5:], probs)


def test_decode_uses_width_for_x_and_height_for_y_on_non_square_inputs():
    size = (320, 480)  # H, W: finest grid 40 x 60
    outs = blank(size=size)
    outs[2][0, 2, 10, 50, :5] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0])
    dec = decode(outs, image_size=size)
    n_before = 3 * (10 * 15 + 20 * 30)
    row = dec[0, n_before + 2 * 40 * 60 + 10 * 60 + 50]
    aw, ah = ANCHORS[2][2]
    cx, cy, w, h = 50.5 / 60 * 480, 10.5 / 40 * 320, aw * 480, ah * 320
    torch.testing.assert_close(row[:4], torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    # Without image_size the input is taken as 32 x the coarse grid: the same answer here.
    torch.testing.assert_close(decode(outs)[0, n_before + 2 * 40 * 60 + 10 * 60 + 50], row)


def test_detect_returns_the_box_that_was_put_in_with_score_and_class():
    size = (416, 416)
    outs = blank()
    put(outs, size, 0, 1, 2, (100.0, 120.0, 160.0, 240.0), obj=0.8, cls=14)
    (det,) = detect(outs, 416)
    assert det.shape == (1, 6)
    torch.testing.assert_close(det[0, :4], torch.tensor([100.0, 120.0, 160.0, 240.0]), atol=1e-3, rtol=0)
    p = math.exp(10) / (math.exp(10) + C - 1)
    assert det[0, 4].item() == pytest.approx(0.8 * p, rel=1e-5)
    assert det[0, 5].item() == 14.0


def test_score_obj_is_the_objectness_alone():
    outs = blank()
    put(outs, (416, 416), 0, 0, 0, (50.0, 50.0, 150.0, 130.0), obj=0.7, cls=3, cls_logit=0.5)
    (obj_only,) = detect(outs, 416, score="obj")
    (product,) = detect(outs, 416)
    assert obj_only[0, 4].item() == pytest.approx(0.7, rel=1e-5)
    assert product[0, 4].item() < 0.7 * 0.2  # the class probability of a weak logit pulls it down


def test_nms_drops_an_overlapping_box_of_the_same_class_and_keeps_the_rest():
    size = (416, 416)
    outs = blank(batch=2)
    # image 0: A and B overlap (IoU 0.68 > 0.45) in class 2 -> B dropped; C is far -> kept;
    # D is A's box in class 5 -> kept (NMS is per class).
    put(outs, size, 0, 1, 0, (100.0, 100.0, 200.0, 200.0), obj=0.9, cls=2)    # A
    put(outs, size, 0, 1, 1, (110.0, 110.0, 210.0, 210.0), obj=0.8, cls=2)    # B
    put(outs, size, 0, 2, 0, (300.0, 300.0, 340.0, 340.0), obj=0.7, cls=2)    # C
    put(outs, size, 0, 1, 2, (100.0, 100.0, 200.0, 200.0), obj=0.6, cls=5)    # D
    # image 1: the same box as A, class 2: other images never suppress it.
    put(outs, size, 1, 1, 0, (100.0, 100.0, 200.0, 200.0), obj=0.5, cls=2)
    d0, d1 = detect(outs, 416, iou_threshold=0.45)
    assert d0[:, 5].tolist() == [2.0, 2.0, 5.0]
    torch.testing.assert_close(d0[:, :4], torch.tensor([[100.0, 100, 200, 200], [300, 300, 340, 340],
                                                        [100, 100, 200, 200]]), atol=1e-3, rtol=0)
    assert (d0[:-1, 4] >= d0[1:, 4]).all()  # sorted by descending score
    assert d1.shape == (1, 6) and d1[0, 5] == 2.0
    # With a looser IoU threshold B survives (its IoU with A is 8100 / 11900 = 0.68).
    d0_loose, _ = detect(outs, 416, iou_threshold=0.7)
    assert len(d0_loose) == 4


def test_threshold_max_detections_and_nms_pre_keep_the_highest_scores():
    size = (416, 416)
    outs = blank()
    scores = [0.9, 0.8, 0.7, 0.6, 0.04]
    for k, s in enumerate(scores):  # disjoint boxes, so NMS removes none
        put(outs, size, 0, 2, 0, (20.0 + 80 * k, 20.0, 60.0 + 80 * k, 60.0), obj=s, cls=1, cls_logit=30.0)
    (all_above,) = detect(outs, 416, conf_threshold=0.05)
    assert all_above[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6], rel=1e-5)
    (capped,) = detect(outs, 416, max_detections=2)
    assert capped[:, 4].tolist() == pytest.approx([0.9, 0.8], rel=1e-5)
    (pre,) = detect(outs, 416, nms_pre=3)
    assert pre[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.7], rel=1e-5)


def test_letterbox_maps_back_to_original_pixels_and_clips_to_the_original_image():
    # A 400 x 200 (w x h) photo letterboxed into 416: scale 1.04, 104 px of padding on top.
    meta = Letterbox(scale=1.04, pad_left=0, pad_top=104, orig_h=200, orig_w=400)
    size = (416, 416)
    outs = blank()
    put(outs, size, 0, 1, 0, (52.0, 156.0, 156.0, 260.0), obj=0.9, cls=0)  # inside the photo
    put(outs, size, 0, 1, 1, (300.0, 60.0, 400.0, 150.0), obj=0.8, cls=1)  # reaches into the top pad
    put(outs, size, 0, 2, 0, (20.0, 20.0, 60.0, 60.0), obj=0.7, cls=2)  # entirely in the pad: dropped
    (det,) = detect(outs, 416, letterbox=[meta])
    assert det[:, 5].tolist() == [0.0, 1.0]
    torch.testing.assert_close(det[0, :4], torch.tensor([50.0, 50.0, 150.0, 150.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(det[1, :4], torch.tensor([300 / 1.04, 0.0, 400 / 1.04, 46 / 1.04]),
                               atol=1e-3, rtol=0)


def test_boxes_are_clipped_to_the_input_without_letterbox():
    outs = blank()
    outs[0][0, 2, 6, 6, :5] = torch.tensor([5.0, 0.0, 0.0, 1.0, 1.0])  # 2.7 x the big anchor
    (det,) = detect(outs, 416, score="obj")
    torch.testing.assert_close(det[0, :4], torch.tensor([0.0, 0.0, 416.0, 416.0]))


def test_outputs_are_not_modified_and_gradients_are_not_needed():
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(2, 3, s, s, 5 + C, generator=g, requires_grad=True) for s in (4, 8, 16)]
    before = [o.detach().clone() for o in outs]
    decode(outs)
    dets = detect(outs, 128, conf_threshold=0.01)
    for o, b in zip(outs, before):
        assert torch.equal(o.detach(), b)
    assert not any(d.requires_grad for d in dets)


def test_extreme_and_half_precision_logits_give_finite_boxes():
    outs = blank(size=(128, 128))
    outs = [o.half() for o in outs]
    outs[0][0, 0, 1, 1, :5] = torch.tensor([10.0, 60000.0, -60000.0, 60000.0, 60000.0], dtype=torch.half)
    outs[1][0, 0, 1, 1, 3:5] = float("inf")
    dec = decode(outs)
    assert torch.isfinite(dec).all()
    (det,) = detect(outs, 128, score="obj")
    assert len(det) >= 1 and torch.isfinite(det).all()


def test_no_candidates_gives_empty_tensors_per_image():
    dets = detect(blank(batch=3, size=(64, 96)), (64, 96))
    assert [tuple(d.shape) for d in dets] == [(0, 6)] * 3


def test_bad_outputs_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="output scales"):
        detect(blank()[:2], 416)
    with pytest.raises(ValueError, match="score must be"):
        detect(blank(), 416, score="cls")
    with pytest.raises(ValueError, match="letterbox has 1 entries for a batch of 2"):
        detect(blank(batch=2), 416, letterbox=[Letterbox.fit(416, 416, 416)])
    with pytest.raises(ValueError, match="must be a helpers.boxes.Letterbox"):  # the old dict is gone
        detect(blank(), 416, letterbox=[{"scale": 1.0, "pad": (0, 0), "orig_size": (416, 416)}])


def test_letterbox_maps_both_ways_and_only_a_letterbox_is_taken_for_one():
    lb = Letterbox.fit(200, 400, 416)  # 400 x 200 (w x h) into 416: scale 1.04, 104 px on top
    assert lb == Letterbox(scale=1.04, pad_left=0, pad_top=104, orig_h=200, orig_w=400)
    boxes = torch.tensor([[[50.0, 50.0, 150.0, 150.0], [0.0, 10.0, 400.0, 200.0]]])  # [1, 2, 4]
    there = lb.to_input(boxes)
    torch.testing.assert_close(there[0, 0], torch.tensor([52.0, 156.0, 156.0, 260.0]))
    torch.testing.assert_close(lb.to_original(there), boxes)
    assert lb.to_original(torch.tensor([-5.0, 0.0, 500.0, 420.0])).tolist() == [0.0, 0.0, 400.0, 200.0]
    outs = blank()
    put(outs, (416, 416), 0, 1, 0, (52.0, 156.0, 156.0, 260.0), obj=0.9, cls=0)
    (found,) = detect(outs, 416, letterbox=[lb])
    torch.testing.assert_close(found[0, :4], boxes[0, 0], atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="must be a helpers.boxes.Letterbox"):
        detect(outs, 416, letterbox=[{"path": "x", "letterbox": lb}])  # a whole meta: batch.letterboxes() gives one


def test_a_letterbox_in_a_batch_survives_lightnings_transfer_to_the_device():
    from lightning_fabric.utilities.apply_func import move_data_to_device

    metas = [{"path": "x", "letterbox": Letterbox.fit(200, 400, 416)}]
    assert move_data_to_device(metas, torch.device("cpu")) == metas


def test_return_indices_names_the_cell_anchor_and_scale_each_detection_came_from():
    """Grad-CAM of a detection differentiates its own row of the raw output: detect says which row,
    even for a box clipped at the image's edge next to the letterbox padding (where matching boxes
    after the letterbox undo cannot tell anchors apart)."""
    size = (416, 416)
    outs = blank(batch=2)
    put(outs, size, 0, 1, 2, (100.0, 120.0, 160.0, 240.0), obj=0.8, cls=14)
    put(outs, size, 1, 2, 1, (300.0, 60.0, 400.0, 150.0), obj=0.9, cls=3)
    put(outs, size, 1, 0, 0, (10.0, 200.0, 300.0, 420.0), obj=0.7, cls=7)
    meta = Letterbox(scale=1.04, pad_left=0, pad_top=104, orig_h=200, orig_w=400)
    dets, rows = detect(outs, 416, return_indices=True, letterbox=[meta, meta])
    assert [len(r) for r in rows] == [len(d) for d in dets] == [1, 2]
    flat = torch.cat([o.reshape(2, -1, o.shape[-1]) for o in outs], dim=1)  # scale, anchor, row, col
    for b in range(2):
        cells = flat[b, rows[b]]
        score = cells[:, 0].sigmoid() * cells[:, 5:].softmax(-1).gather(1, dets[b][:, 5:6].long())[:, 0]
        torch.testing.assert_close(score, dets[b][:, 4])
    assert rows[1][0] >= 3 * (13 * 13 + 26 * 26)  # scale 2's box came from a scale-2 row
    plain = detect(outs, 416, letterbox=[meta, meta])  # without the flag: just the detections, the same
    assert all(torch.equal(p, d) for p, d in zip(plain, dets))


def test_dataset_boxes_map_from_normalised_centres_to_corner_pixels():
    from helpers.boxes import labels_to_pixels

    boxes = [[3, 0.5, 0.25, 0.5, 0.5], [7, 0.1, 0.9, 0.2, 0.2]]
    expected = torch.tensor([[25.0, 0, 75, 25, 3], [0, 40, 20, 50, 7]])  # width 100, height 50
    torch.testing.assert_close(labels_to_pixels(boxes, 50, 100), expected)
    torch.testing.assert_close(labels_to_pixels(torch.tensor(boxes, dtype=torch.float64), 50, 100), expected)
    assert labels_to_pixels(torch.zeros(0, 5), 50, 100).shape == (0, 5)
