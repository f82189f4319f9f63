"""Metrics: VOC AP on hand-computed cases and against a literal devkit loop; the course accuracies."""
import math

import numpy as np
import pytest
import torch

from helpers.metrics import YoloAccuracy, average_precision, coco_map, f1_by_threshold, voc_map


def gt(boxes, labels, difficult=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor(labels, dtype=torch.long)
    difficult = torch.zeros(len(labels), dtype=torch.bool) if difficult is None else torch.tensor(difficult)
    return {"boxes": boxes, "labels": labels, "difficult": difficult}


def dets(*rows):
    """rows of (x1, y1, x2, y2, score, class)."""
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)


A, B, FAR = [10, 10, 50, 50], [100, 100, 160, 150], [300, 300, 320, 320]


# --------------------------------------------------------------------------- hand-computed AP
@pytest.mark.parametrize("method", ["voc07", "all"])
def test_a_perfect_detector_scores_one(method):
    truths = [gt([A, B], [0, 1]), gt([B], [1])]
    found = [dets(A + [0.9, 0], B + [0.8, 1]), dets(B + [0.7, 1])]
    r = voc_map(found, truths, method=method, num_classes=2)
    assert r["map"] == pytest.approx(1.0)
    assert r["ap"].tolist() == pytest.approx([1.0, 1.0])


def test_a_duplicate_detection_is_a_false_positive():
    # Two objects; detections in score order: A, A again, B -> TP, FP, TP.
    # recall 0.5, 0.5, 1; precision 1, 0.5, 2/3.
    truths = [gt([A, B], [0, 0])]
    found = [dets(A + [0.9, 0], A + [0.8, 0], B + [0.7, 0])]
    r07 = voc_map(found, truths, method="voc07", num_classes=1)
    r_all = voc_map(found, truths, method="all", num_classes=1)
    assert r07["num_tp"].tolist() == [2] and r07["num_fp"].tolist() == [1]
    np.testing.assert_allclose(r07["precision"][0], [1, 0.5, 2 / 3])
    np.testing.assert_allclose(r07["recall"][0], [0.5, 0.5, 1.0])
    # 11-point: t = 0 .. 0.5 -> 1 (six points), t = 0.6 .. 1 -> 2/3 (five points).
    assert r07["map"] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)  # 28/33
    # all-point: 0.5 x 1 + 0.5 x 2/3.
    assert r_all["map"] == pytest.approx(0.5 + 0.5 * 2 / 3)  # 5/6
    # Without the duplicate it would be perfect.
    assert voc_map([dets(A + [0.9, 0], B + [0.7, 0])], truths, num_classes=1)["map"] == pytest.approx(1.0)


def test_a_detection_of_a_difficult_object_counts_as_neither():
    truths = [gt([A, B], [0, 0], difficult=[False, True])]
    # The highest-scoring detection is on the difficult object: neither TP nor FP, and the
    # difficult object is not in the recall denominator.
    found = [dets(B + [0.9, 0], B + [0.85, 0], A + [0.8, 0])]
    for method in ("voc07", "all"):
        r = voc_map(found, truths, method=method, num_classes=1)
        assert r["map"] == pytest.approx(1.0)
        assert r["num_gt"].tolist() == [1] and r["num_tp"].tolist() == [1] and r["num_fp"].tolist() == [0]
    # Missing the difficult object costs nothing either.
    assert voc_map([dets(A + [0.8, 0])], truths, num_classes=1)["map"] == pytest.approx(1.0)


def test_eleven_point_and_all_point_differ_as_they_should_on_a_known_curve():
    # 5 objects (one per image); detections in score order: TP, FP, TP, FP, FP, TP.
    # recall    .2  .2  .4   .4  .4  .6
    # precision  1  .5  2/3  .5  .4  .5
    truths = [gt([A], [0]) for _ in range(5)]
    hit, miss = A, FAR
    order = [(0, hit), (1, miss), (1, hit), (2, miss), (3, miss), (2, hit)]
    found = [dets() for _ in range(5)]
    for k, (img, box) in enumerate(order):
        found[img] = torch.cat([found[img], dets(box + [1.0 - 0.1 * k, 0])])
    r07 = voc_map(found, truths, method="voc07", num_classes=1)
    r_all = voc_map(found, truths, method="all", num_classes=1)
    np.testing.assert_allclose(r07["recall"][0], [0.2, 0.2, 0.4, 0.4, 0.4, 0.6])
    np.testing.assert_allclose(r07["precision"][0], [1, 0.5, 2 / 3, 0.5, 0.4, 0.5])
    # 11-point: t in {0, .1, .2} -> 1; {.3, .4} -> 2/3; {.5, .6} -> .5 (recall .6 counts for t = .6:
    # the tenths are exact, see helpers.metrics); {.7 .. 1} -> 0.
    assert r07["map"] == pytest.approx((3 * 1 + 2 * 2 / 3 + 2 * 0.5) / 11)  # 16/33 = 0.4848
    # all-point: envelope 1 on (0, .2], 2/3 on (.2, .4], .5 on (.4, .6], 0 after.
    assert r_all["map"] == pytest.approx(0.2 * 1 + 0.2 * 2 / 3 + 0.2 * 0.5)  # 13/30 = 0.4333


def test_iou_exactly_at_the_threshold_is_a_match_as_in_the_devkit():
    # IoU = 100 / 200 = 0.5 exactly: the devkit's `ovmax >= minoverlap` makes it a TP.
    r = voc_map([dets([0, 0, 10, 20, 0.9, 0])], [gt([[0, 0, 10, 10]], [0])], num_classes=1)
    assert r["map"] == pytest.approx(1.0)


def test_iou_uses_continuous_pixels_which_equal_the_devkits_plus_one_on_inclusive_pixels():
    # A one-pixel object (devkit xmin = xmax = 10, ours x1 = 9, x2 = 10) and a 3x3 detection
    # (devkit 10..12, ours 9..12). Devkit IoU: 1*1 / (1 + 9 - 1) = 1/9; adding +1 to our
    # continuous boxes would give 4/16 = 0.25 and wrongly pass a 0.2 threshold.
    truths = [gt([[9, 9, 10, 10]], [0])]
    found = [dets([9, 9, 12, 12, 0.9, 0])]
    assert voc_map(found, truths, iou_threshold=0.2, num_classes=1)["map"] == 0.0
    assert voc_map(found, truths, iou_threshold=0.11, num_classes=1)["map"] == pytest.approx(1.0)


def test_each_detection_goes_to_its_highest_iou_ground_truth_even_if_already_matched():
    # Devkit rule: the second detection overlaps A best (already taken) and B less: it is a
    # duplicate (FP), not a match for B.
    a, b = [0, 0, 100, 100], [30, 0, 130, 100]
    truths = [gt([a, b], [0, 0])]
    found = [dets(a + [0.9, 0], [10, 0, 110, 100, 0.8, 0])]
    r = voc_map(found, truths, method="all", num_classes=1)
    assert r["num_tp"].tolist() == [1] and r["num_fp"].tolist() == [1]


def test_an_iou_tie_goes_to_the_first_listed_ground_truth():
    # The same box annotated twice (it happens in VOC), first as difficult: the devkit's strict
    # `ov>ovmax` keeps the first, so the detection is ignored and the normal object stays missed.
    truths = [gt([A, A], [0, 0], difficult=[True, False])]
    r = voc_map([dets(A + [0.9, 0])], truths, num_classes=1)
    assert r["num_tp"].tolist() == [0] and r["num_fp"].tolist() == [0] and r["map"] == 0.0
    swapped = voc_map([dets(A + [0.9, 0])], [gt([A, A], [0, 0], difficult=[False, True])], num_classes=1)
    assert swapped["map"] == pytest.approx(1.0)


def test_classes_without_ground_truth_get_nan_and_are_left_out_of_the_mean():
    truths = [gt([A, B], [0, 2], difficult=[False, False]), gt([FAR], [3], difficult=[True])]
    # class 0 perfect; class 1 has detections but no objects; class 2 has an object and no
    # detection (AP 0); class 3 has only a difficult object (NaN).
    found = [dets(A + [0.9, 0], B + [0.8, 1]), dets(FAR + [0.7, 3])]
    r = voc_map(found, truths, num_classes=4)
    assert r["ap"][0] == pytest.approx(1.0) and r["ap"][2] == 0.0
    assert math.isnan(r["ap"][1]) and math.isnan(r["ap"][3])
    assert r["map"] == pytest.approx(0.5)


@pytest.mark.parametrize("method", ["voc07", "all"])
def test_empty_detections_or_ground_truths_do_not_crash(method):
    empty_gt = gt([], [])
    r = voc_map([dets(), dets()], [empty_gt, empty_gt], method=method)
    assert math.isnan(r["map"]) and np.isnan(r["ap"]).all()
    r = voc_map([], [], method=method)
    assert math.isnan(r["map"])
    r = voc_map([dets(A + [0.9, 0])], [empty_gt], method=method)  # detections, no objects
    assert math.isnan(r["map"])
    r = voc_map([dets()], [gt([A], [0])], method=method)  # objects, no detections
    assert r["map"] == 0.0 and r["ap"][0] == 0.0


def test_bad_input_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="one entry per image"):
        voc_map([dets()], [])
    with pytest.raises(ValueError, match="class out of range"):
        voc_map([dets(A + [0.9, 25])], [gt([A], [0])])
    with pytest.raises(ValueError, match="lacks"):
        voc_map([dets()], [{"boxes": torch.zeros(0, 4)}])
    with pytest.raises(ValueError, match="method"):
        voc_map([dets()], [gt([], [])], method="coco")


def test_average_precision_of_a_hand_curve():
    rec, prec = np.array([0.25, 0.5, 0.5, 0.75]), np.array([1.0, 1.0, 2 / 3, 0.75])
    # 11-point: t 0 .. .5 -> 1 (6 points), t .6, .7 -> .75 (2 points), t .8 .. 1 -> 0.
    assert average_precision(rec, prec, "voc07") == pytest.approx((6 + 2 * 0.75) / 11)
    assert average_precision(rec, prec, "all") == pytest.approx(0.5 * 1 + 0.25 * 0.75)


# --------------------------------------------------------------------------- against a literal loop
def devkit_reference(detections, truths, iou_threshold, method, num_classes):
    """VOCevaldet.m + VOCap.m transcribed loop for loop (continuous pixels, see helpers.metrics)."""
    aps = []
    for c in range(num_classes):
        gts = []
        npos = 0
        for t in truths:
            keep = t["labels"] == c
            boxes, diff = t["boxes"][keep].tolist(), t["difficult"][keep].tolist()
            gts.append({"bb": boxes, "diff": diff, "det": [False] * len(boxes)})
            npos += sum(not d for d in diff)
        found = [(img, row[:4], row[4]) for img, d in enumerate(detections) for row in d.tolist()
                 if int(row[5]) == c]
        found = sorted(found, key=lambda x: -x[2])  # Python's sort is stable, as MATLAB's
        tp, fp = [0] * len(found), [0] * len(found)
        for k, (img, bb, _) in enumerate(found):
            ovmax, jmax = -math.inf, -1
            for j, g in enumerate(gts[img]["bb"]):
                iw = min(bb[2], g[2]) - max(bb[0], g[0])
                ih = min(bb[3], g[3]) - max(bb[1], g[1])
                if iw > 0 and ih > 0:
                    ua = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (g[2] - g[0]) * (g[3] - g[1]) - iw * ih
                    ov = iw * ih / ua
                    if ov > ovmax:
                        ovmax, jmax = ov, j
            if ovmax >= iou_threshold:
                if not gts[img]["diff"][jmax]:
                    if not gts[img]["det"][jmax]:
                        tp[k] = 1
                        gts[img]["det"][jmax] = True
                    else:
                        fp[k] = 1
            else:
                fp[k] = 1
        if npos == 0:
            aps.append(math.nan)
            continue
        ctp, cfp = np.cumsum(tp, dtype=float), np.cumsum(fp, dtype=float)
        rec = ctp / npos
        with np.errstate(invalid="ignore"):
            prec = ctp / (ctp + cfp)  # 0/0 = NaN as in MATLAB, whose max skips NaN
        if method == "voc07":
            ap = 0.0
            for t in [k / 10 for k in range(11)]:
                sel = prec[rec >= t]
                sel = sel[~np.isnan(sel)]
                ap += (sel.max() if len(sel) else 0.0) / 11
        else:
            mrec = [0.0, *rec.tolist(), 1.0]
            mpre = [0.0, *prec.tolist(), 0.0]
            for i in range(len(mpre) - 2, -1, -1):
                mpre[i] = np.nanmax([mpre[i], mpre[i + 1]])
            ap = sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])
        aps.append(ap)
    aps = np.array(aps)
    valid = ~np.isnan(aps)
    return (aps[valid].mean() if valid.any() else math.nan), aps


def random_set(seed, n_images=40, num_classes=4):
    """Clustered boxes (many overlaps, duplicates, misses), difficult flags, tied scores."""
    g = torch.Generator().manual_seed(seed)
    dets_, truths = [], []
    for _ in range(n_images):
        n_gt = int(torch.randint(0, 5, (1,), generator=g))
        xy = torch.rand(n_gt, 2, generator=g) * 80
        wh = torch.rand(n_gt, 2, generator=g) * 40 + 5
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, num_classes, (n_gt,), generator=g)
        difficult = torch.rand(n_gt, generator=g) < 0.2
        truths.append({"boxes": boxes, "labels": labels, "difficult": difficult})
        # Detections: jittered copies of the objects (some twice, some with a wrong class) + noise.
        src = boxes.repeat(2, 1)
        src_labels = labels.repeat(2)
        jitter = torch.randn(src.shape, generator=g) * 6
        wrong = torch.rand(len(src_labels), generator=g) < 0.15
        src_labels = torch.where(wrong, torch.randint(0, num_classes, src_labels.shape, generator=g), src_labels)
        n_noise = int(torch.randint(0, 4, (1,), generator=g))
        nxy = torch.rand(n_noise, 2, generator=g) * 80
        noise = torch.cat([nxy, nxy + torch.rand(n_noise, 2, generator=g) * 40 + 5], 1)
        d_boxes = torch.cat([src + jitter, noise])
        d_boxes = torch.cat([d_boxes[:, :2], torch.maximum(d_boxes[:, 2:], d_boxes[:, :2] + 1)], 1)
        d_labels = torch.cat([src_labels, torch.randint(0, num_classes, (n_noise,), generator=g)])
        keep = torch.rand(len(d_labels), generator=g) < 0.7
        scores = torch.randint(1, 20, (len(d_labels),), generator=g).float() / 20  # many ties
        dets_.append(torch.cat([d_boxes, scores[:, None], d_labels[:, None].float()], 1)[keep])
    return dets_, truths


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("method", ["voc07", "all"])
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.75])
def test_fast_voc_map_equals_a_literal_devkit_loop_on_random_sets(seed, method, iou_threshold):
    found, truths = random_set(seed)
    r = voc_map(found, truths, iou_threshold=iou_threshold, method=method, num_classes=4)
    ref_map, ref_ap = devkit_reference(found, truths, iou_threshold, method, 4)
    np.testing.assert_allclose(r["ap"], ref_ap, rtol=0, atol=1e-12)
    assert r["map"] == pytest.approx(ref_map, abs=1e-12)


# --------------------------------------------------------------------------- F1 by threshold
def test_f1_by_threshold_on_a_hand_counted_case():
    # Two objects and a difficult one; in score order: A (TP), on the difficult one (neither), off (FP), B (TP).
    truths = [gt([A, B, FAR], [0, 0, 0], difficult=[False, False, True])]
    found = [dets(A + [0.9, 0], FAR + [0.7, 0], [0, 0, 5, 5, 0.4, 0], B + [0.3, 0])]
    r = f1_by_threshold(found, truths, [0.1, 0.2, 0.5, 0.95], num_classes=1)
    assert r["num_gt"] == 2
    assert r["tp"].tolist() == [2, 2, 1, 0] and r["fp"].tolist() == [1, 1, 0, 0]
    assert r["precision"].tolist() == pytest.approx([2 / 3, 2 / 3, 1.0, 1.0])
    assert r["recall"].tolist() == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert r["f1"].tolist() == pytest.approx([0.8, 0.8, 2 / 3, 0.0])
    assert r["best"] == 1  # 0.1 and 0.2 tie on F1: the higher threshold (fewer boxes for the same F1)


def test_f1_by_threshold_drops_a_score_equal_to_the_threshold_as_detect_does():
    r = f1_by_threshold([dets(A + [0.5, 0])], [gt([A], [0])], [0.5, 0.49], num_classes=1)
    assert r["tp"].tolist() == [0, 1]


def test_f1_by_threshold_without_detections_or_objects_is_zero_not_an_error():
    r = f1_by_threshold([dets()], [gt([A], [0])], [0.1, 0.5], num_classes=1)
    assert r["f1"].tolist() == [0.0, 0.0] and r["precision"].tolist() == [1.0, 1.0]
    r = f1_by_threshold([dets(A + [0.9, 0])], [gt([], [])], [0.1, 0.95], num_classes=1)
    assert r["f1"].tolist() == [0.0, 0.0] and r["recall"].tolist() == [0.0, 0.0] and r["num_gt"] == 0


@pytest.mark.parametrize("seed", range(4))
def test_f1_by_threshold_equals_matching_only_the_detections_kept_at_each_threshold(seed):
    # One matching of the whole set read at each threshold == a fresh VOC matching of what is kept.
    found, truths = random_set(seed)
    thresholds = np.arange(0, 21) / 20  # every tied score value itself, and beyond both ends
    r = f1_by_threshold(found, truths, thresholds, num_classes=4)
    for i, t in enumerate(thresholds):
        kept = [d[d[:, 4] > t] for d in found]
        ref = voc_map(kept, truths, num_classes=4)
        assert (r["tp"][i], r["fp"][i]) == (ref["num_tp"].sum(), ref["num_fp"].sum()), t
    assert r["num_gt"] == sum(int((~t_["difficult"]).sum()) for t_ in truths)
    assert r["f1"][r["best"]] == r["f1"].max()


def test_both_voc_methods_come_from_one_matching_and_equal_separate_calls(monkeypatch):
    import helpers.metrics as metrics

    found, truths = random_set(0)
    separate = {m: voc_map(found, truths, method=m, num_classes=4) for m in ("voc07", "all")}
    calls = []
    real = metrics.match_detections
    monkeypatch.setattr(metrics, "match_detections", lambda *a, **k: calls.append(1) or real(*a, **k))
    both = voc_map(found, truths, method=("voc07", "all"), num_classes=4)
    assert len(calls) == 1 and set(both) == {"voc07", "all"}
    for m, r in separate.items():
        assert both[m]["method"] == m and both[m]["map"] == r["map"]
        np.testing.assert_array_equal(both[m]["ap"], r["ap"])
        for c in range(4):
            np.testing.assert_array_equal(both[m]["precision"][c], r["precision"][c])
    assert separate["voc07"]["map"] != separate["all"]["map"]  # the two methods really differ here


# --------------------------------------------------------------------------- COCO AP
def test_coco_map_is_one_for_a_perfect_detector_and_ignores_difficult_objects():
    truths = [gt([A, B], [0, 1]), gt([B, FAR], [1, 0], difficult=[False, True])]
    found = [dets(A + [0.9, 0], B + [0.8, 1]), dets(B + [0.7, 1], FAR + [0.95, 0])]
    r = coco_map(found, truths, num_classes=2)
    assert r["map_50"] == pytest.approx(1.0) and r["map_50_95"] == pytest.approx(1.0)
    worse = coco_map([dets(A + [0.9, 0], B + [0.8, 1]), dets([30, 30, 60, 60, 0.99, 1])], truths, num_classes=2)
    assert worse["map_50"] < 1.0


def cocoeval_reference(detections, truths, num_classes):
    """COCOeval run directly (faster-coco-eval's, pycocotools' algorithm and default parameters) on
    the same set: xywh boxes, difficult objects as crowd regions. Returns its 12 stats."""
    import contextlib
    import io

    from faster_coco_eval import COCO, COCOeval_faster

    images, anns, results = [], [], []
    for i, (d, t) in enumerate(zip(detections, truths)):
        images.append({"id": i})
        for (x1, y1, x2, y2), label, diff in zip(t["boxes"].double().tolist(), t["labels"].tolist(),
                                                 t["difficult"].tolist()):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": label, "iscrowd": int(diff),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
        for x1, y1, x2, y2, score, c in d.double().tolist():
            results.append({"image_id": i, "category_id": round(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    truth = COCO()
    truth.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in range(num_classes)]}
    truth.createIndex()
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval_faster(truth, truth.loadRes(results), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", range(4))
def test_coco_map_equals_cocoeval_run_directly(seed):
    # Seed 1 lands a recall on a float32-rounded threshold: torchmetrics' default thresholds were off
    # by 5e-4 in map_50 there.
    found, truths = random_set(seed)
    r = coco_map(found, truths, num_classes=4)
    ref = cocoeval_reference(found, truths, 4)
    names = ("map_50_95", "map_50", "map_75", "map_small", "map_medium", "map_large", None, None, "mar_100")
    for name, value in zip(names, ref):
        if name:
            assert r[name] == pytest.approx(value, abs=1e-6), name


# --------------------------------------------------------------------------- course accuracies
def accuracy_case():
    """One image, 3 scales of 1x1, 2x2 and 4x4 cells (a 32-px image), 3 classes, hand-set cells."""
    C = 3
    outs = [torch.zeros(1, 3, s, s, 5 + C) for s in (1, 2, 4)]
    tgts = [torch.zeros(1, 3, s, s, 6) for s in (1, 2, 4)]
    for o in outs:
        o[..., 0] = -5.0  # sigmoid 0.0067 <= 0.05: "no object" everywhere by default
    logit_hi, logit_lo = 0.0, -4.0  # sigmoid 0.5 > 0.05; sigmoid 0.018 <= 0.05
    # positives: (scale, anchor, i, j, target class, predicted class, objectness logit)
    positives = [
        (0, 0, 0, 0, 1, 1, logit_hi),  # class right, obj right
        (1, 2, 1, 0, 2, 0, logit_hi),  # class wrong, obj right
        (2, 1, 3, 3, 0, 0, logit_lo),  # class right, obj wrong
        (2, 0, 0, 1, 2, 2, logit_hi),  # class right, obj right
    ]
    for s, a, i, j, tc, pc, obj in positives:
        tgts[s][0, a, i, j, 0] = 1
        tgts[s][0, a, i, j, 5] = tc
        outs[s][0, a, i, j, 0] = obj
        outs[s][0, a, i, j, 5 + pc] = 4.0
    # negatives predicted as objects (wrong no-object): 2 cells.
    outs[1][0, 0, 0, 0, 0] = logit_hi
    outs[2][0, 2, 2, 2, 0] = 1.0
    # ignored cells: one predicted high, one low; they count nowhere.
    tgts[1][0, 1, 1, 1, 0] = -1
    outs[1][0, 1, 1, 1, 0] = 3.0
    tgts[2][0, 1, 0, 0, 0] = -1
    return outs, tgts


def test_the_accuracies_match_hand_counted_cells():
    outs, tgts = accuracy_case()
    m = YoloAccuracy(threshold=0.05)
    m.update(outs, tgts)
    r = m.compute()
    n_cells = 3 * (1 + 4 + 16)  # 63
    n_neg = n_cells - 4 - 2  # minus positives and ignored: 57
    assert r["class_acc"].item() == pytest.approx(100 * 3 / 4)
    assert r["obj_acc"].item() == pytest.approx(100 * 3 / 4)
    assert r["noobj_acc"].item() == pytest.approx(100 * (n_neg - 2) / n_neg)


def test_accuracies_are_ratios_of_sums_not_means_of_batch_ratios():
    outs, tgts = accuracy_case()
    # Second batch: one positive, everything correct -> pooled class acc (3+1)/(4+1) = 80 %,
    # where the mean of batch ratios would be (75 + 100) / 2 = 87.5 %.
    outs2 = [torch.full_like(o, -5.0) for o in outs]
    tgts2 = [torch.zeros_like(t) for t in tgts]
    tgts2[0][0, 0, 0, 0, 0], tgts2[0][0, 0, 0, 0, 5] = 1, 2
    outs2[0][0, 0, 0, 0, 0], outs2[0][0, 0, 0, 0, 5 + 2] = 2.0, 9.0
    m = YoloAccuracy()
    m.update(outs, tgts)
    m.update(outs2, tgts2)
    r = m.compute()
    assert r["class_acc"].item() == pytest.approx(80.0)
    assert r["obj_acc"].item() == pytest.approx(80.0)


def test_accuracies_without_any_positive_cell_are_nan_not_an_error():
    outs = [torch.full((1, 3, s, s, 8), -5.0) for s in (1, 2, 4)]
    tgts = [torch.zeros(1, 3, s, s, 6) for s in (1, 2, 4)]
    m = YoloAccuracy()
    m.update(outs, tgts)
    r = m.compute()
    assert math.isnan(r["class_acc"]) and math.isnan(r["obj_acc"]) and r["noobj_acc"] == pytest.approx(100.0)


def test_accuracy_refuses_targets_of_another_size():
    outs = [torch.zeros(1, 3, s, s, 8) for s in (1, 2, 4)]
    tgts = [torch.zeros(1, 3, s, s, 6) for s in (2, 4, 8)]
    with pytest.raises(ValueError, match="targets built for another size"):
        YoloAccuracy().update(outs, tgts)
