"""Pipeline: mosaic properties, plain samples never mosaic, letterbox meta maps back exactly,
multi-resolution batches agree across ranks, bad samples are skipped and counted."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.config import DataConfig
from helpers.datamodule import MultiScaleBatchSampler, YOLODataModule, collate
from helpers.dataset import YOLODataset as TrainDataset
from helpers.dataset_org import YOLODataset as PlainDataset
from helpers.mosaic import box_candidates, mosaic
from helpers.synthetic import make_voc_dataset
from helpers.transforms import FILL


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc_dataset(tmp_path_factory.mktemp("voc"), n_trainval=40, n_test=8, image_size=(160, 120), seed=2)


def solid(color, h=120, w=160):
    return np.full((h, w, 3), color, np.uint8)


def test_a_mosaic_shows_four_distinct_sources_on_one_fill_colour():
    rng = np.random.default_rng(0)
    colors = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]
    empty = [np.zeros((0, 4), np.float32)] * 4
    seen_fill = False
    for _ in range(20):
        canvas, _, _ = mosaic([solid(c) for c in colors], empty, [np.zeros(0, np.int64)] * 4, 128, rng)
        pixels = {tuple(p) for p in canvas.reshape(-1, 3)}
        assert {tuple(c) for c in colors} <= pixels  # all four images visible
        assert pixels <= {tuple(c) for c in colors} | {(FILL,) * 3}  # and nothing but them and the fill
        seen_fill |= (FILL,) * 3 in pixels
    assert seen_fill


def test_mosaic_boxes_stay_on_their_objects_and_slivers_are_dropped():
    rng = np.random.default_rng(1)
    images, boxes, labels = [], [], []
    for k in range(4):
        img = solid(30)
        img[40:80, 60:100] = 250
        images.append(img)
        boxes.append(np.array([[60, 40, 100, 80]], np.float32))
        labels.append(np.array([k]))
    for _ in range(30):
        canvas, b, lab = mosaic(images, boxes, labels, 128, rng)
        for x1, y1, x2, y2 in b.round().astype(int):
            assert x2 - x1 >= 2 and y2 - y1 >= 2
            inner = canvas[y1 + 1:y2 - 1, x1 + 1:x2 - 1]
            assert inner.size and inner.mean() > 200  # the box covers the bright object


def test_box_candidates_keep_ten_percent_of_area_and_two_pixels():
    before = np.array([[0, 0, 100, 100]] * 3, np.float32)
    after = np.array([[0, 0, 100, 11], [0, 0, 100, 9], [0, 0, 1.5, 100]], np.float32)
    assert box_candidates(before, after).tolist() == [True, False, False]


def test_objects_in_mosaics_keep_the_scale_of_plain_samples():
    # The course builds mosaics at 2x the size and shrinks them, halving every object; ours places
    # each image at the scale a plain sample gets (longest side = output size, same jitter range).
    # A 40x40 object in a 160x120 image is 32 px in a plain 128 sample (median over the jitter).
    # Each object sits in the corner of its image that touches the mosaic's centre, so it is never
    # cut by the canvas and its size shows the scale alone.
    corners = [[120, 80, 160, 120], [0, 80, 40, 120], [120, 0, 160, 40], [0, 0, 40, 40]]
    images = []
    for x1, y1, x2, y2 in corners:
        img = solid(30)
        img[y1:y2, x1:x2] = 250
        images.append(img)
    rng = np.random.default_rng(3)
    sides = []
    for _ in range(100):
        _, b, _ = mosaic(images, [np.array([c], np.float32) for c in corners], [np.array([0])] * 4, 128, rng)
        assert len(b) == 4
        sides += (b[:, 2] - b[:, 0]).tolist()
    assert np.median(sides) == pytest.approx(32, rel=0.05)
    assert 24 - 1 <= min(sides) and max(sides) <= 40 + 1  # the plain pipeline's 0.75-1.25 jitter


def test_mosaic_outside_0_1_is_an_error_and_outside_half_to_three_quarters_a_warning(voc):
    with pytest.raises(ValueError, match="expected 0..1"):
        TrainDataset(voc, "trainval", 128, mosaic=1.5)
    with pytest.warns(UserWarning, match="mosaic=0.9"):
        TrainDataset(voc, "trainval", 128, mosaic=0.9)


def test_the_plain_dataset_never_mosaics_and_is_deterministic(voc):
    ds = PlainDataset(voc, "trainval", 128)
    for i in range(6):
        a, b = ds[i], ds[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        # Letterboxed: the padding band is pure fill (a 160x120 image in 128: 96 rows of picture).
        assert (a[0][:, :16] == FILL / 255).all() and (a[0][:, -16:] == FILL / 255).all()


def test_meta_maps_input_boxes_back_to_original_pixels_exactly(voc):
    ds = PlainDataset(voc, "test", 224, return_meta=True, keep_difficult=True)
    for i in range(len(ds)):
        _, boxes, meta = ds[i]
        if not len(boxes):
            continue
        cx, cy, w, h = (boxes[:, 1:] * 224).T
        back = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        back = (back - torch.tensor(meta["pad"] * 2)) / meta["scale"]
        torch.testing.assert_close(back, meta["gt"]["boxes"], atol=0.6, rtol=0)
        assert meta["orig_size"] == (120, 160)


def test_multiscale_sizes_are_from_the_set_equal_within_a_batch_and_equal_across_ranks():
    sizes = (64, 96, 128)
    a = MultiScaleBatchSampler(range(40), 4, sizes, seed=7)
    b = MultiScaleBatchSampler(range(40, 80), 4, sizes, seed=7)  # another rank's share, same seed
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        batches_a, batches_b = list(a), list(b)
        for ba, bb in zip(batches_a, batches_b):
            assert len({s for _, s in ba}) == 1 and ba[0][1] in sizes
            assert ba[0][1] == bb[0][1]
    a.set_epoch(0)
    first = [batch[0][1] for batch in a]
    a.set_epoch(1)
    assert first != [batch[0][1] for batch in a]  # a new draw every epoch
    assert len(set(first)) > 1


def test_collate_drops_unreadable_samples_and_counts_them():
    good = (torch.zeros(3, 32, 32), torch.tensor([[1, 0.5, 0.5, 0.2, 0.2]]))
    images, boxes, skipped = collate([good, None, good])
    assert images.shape == (2, 3, 32, 32) and int(skipped) == 1
    assert boxes[:, 0].tolist() == [0.0, 1.0]


def test_a_run_over_a_corrupt_file_completes_and_reports_it(voc, tmp_path):
    root = make_voc_dataset(tmp_path / "v", n_trainval=8, n_test=2, seed=4)
    jpg = sorted((root / "VOC2007" / "JPEGImages").glob("*.jpg"))[0]
    jpg.write_bytes(b"broken")
    dm = YOLODataModule(DataConfig(root=str(root), batch_size=4, num_workers=0, train_sizes=(64,), mosaic=0.5,
                                   pin_memory=False))
    dm.setup("fit")
    with pytest.warns(UserWarning, match=jpg.name):
        skipped = sum(int(batch[2]) for batch in dm.train_dataloader())
    assert skipped >= 1


def test_steps_per_epoch_are_known_before_fitting(voc):
    dm = YOLODataModule(DataConfig(root=str(voc), batch_size=4, num_workers=0, pin_memory=False))
    assert dm.num_training_batches(1) == 10 == len(dm.train_dataloader())
    assert dm.num_training_batches(2) == 5
