"""Pipeline: transforms and mosaic keep boxes on their pixels, mosaic properties, plain samples never
mosaic, letterbox meta maps back exactly, multi-resolution batches agree across ranks, training
samples a pure function of their keys (exact mid-epoch resume, any worker count), bad samples
skipped and counted, the DataModule's loaders."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import voc_xml
from lightning_fabric.utilities.data import _set_sampler_epoch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from helpers.annotations import Record
from helpers.batch import Batch, ShardSampler, collate
from helpers.boxes import Letterbox
from helpers.config import VOC_CLASSES, DataConfig
from helpers.datamodule import (
    MultiScaleBatchSampler,
    ResumableDataLoader,
    YOLODataModule,
    steps_per_epoch,
    synthetic_root,
)
from helpers.dataset import TrainingDataset
from helpers.dataset_org import PlainDataset, SampleKey
from helpers.mosaic import mosaic
from helpers.transforms import (
    FILL,
    Affine,
    ColourJitter,
    box_candidates,
    colour_matrix,
    hflip,
    random_affine,
    warp,
)

VOC_DOG, VOC_CAT = float(VOC_CLASSES.index("dog")), float(VOC_CLASSES.index("cat"))
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]


def solid(color, h=120, w=160):
    return np.full((h, w, 3), color, np.uint8)


def mask_box(canvas: np.ndarray, colour) -> np.ndarray | None:
    """x1, y1, x2, y2 (continuous) of the pixels that are clearly `colour`, or None."""
    on = np.all((canvas > 128) == (np.array(colour) > 128), axis=2) & (canvas.max(2) > 128)
    ys, xs = np.nonzero(on)
    if not len(xs):
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def png_records(tmp_path: Path, sizes, colour=(200, 200, 200), boxes=None) -> list[Record]:
    """Records over solid-colour PNGs of the given (w, h), each with one box (default: the whole image)."""
    records = []
    for k, (w, h) in enumerate(sizes):
        path = tmp_path / f"{k}.png"
        c = colour if isinstance(colour[0], int) else colour[k]
        Image.new("RGB", (w, h), c).save(path)
        b = np.array([boxes[k] if boxes else [0, 0, w, h]], np.float32)
        records.append(Record(path, b, np.array([k % 20]), np.zeros(1, bool), w, h))
    return records


# --- geometry -------------------------------------------------------------------------------------
def test_the_warp_puts_boxes_exactly_on_their_pixels_after_scale_shift_and_flip():
    img = solid(30)
    img[40:80, 60:100] = 255
    box = np.array([[60, 40, 100, 80]], np.float32)
    for s, flip, shift in [(1.0, 1, (0, 0)), (0.8, -1, (7.3, -4.1)), (1.37, 1, (-20, 12)), (0.55, -1, (3, 3))]:
        m = np.diag([s * flip, s])
        affine = Affine(m, np.array([64.0, 64.0]) + shift - m @ np.array([80.0, 60.0]))
        canvas, b, keep = warp(img, box, affine, 128)
        assert keep.tolist() == [True]
        np.testing.assert_allclose(b[0], mask_box(canvas, (255, 255, 255)), atol=1.0)


def test_random_affine_boxes_enclose_their_rotated_objects_and_stay_on_the_canvas():
    rng = np.random.default_rng(0)
    img = solid(30)
    img[30:90, 50:110] = 255
    box = np.array([[50, 30, 110, 90]], np.float32)
    for _ in range(40):
        canvas, b, keep = warp(img, box, random_affine(120, 160, 128, rng), 128)
        seen = mask_box(canvas, (255, 255, 255))
        if keep.any():
            assert (b >= 0).all() and (b <= 128).all()
            assert (b[0, :2] <= seen[:2] + 1).all() and (b[0, 2:] >= seen[2:] - 1).all()  # encloses
            # and hugs it: a 5-degree turn of a square widens its box by at most ~10%
            assert (b[0, 2:] - b[0, :2] <= (seen[2:] - seen[:2]) * 1.12 + 2).all()


def test_box_candidates_keep_ten_percent_of_area_and_two_pixels():
    before = np.array([[0, 0, 100, 100]] * 4, np.float32)
    after = np.array([[0, 0, 100, 11], [0, 0, 100, 9], [0, 0, 1.5, 100], [0, 0, 100, 100]], np.float32)
    assert box_candidates(before, after).tolist() == [True, False, False, True]


def test_hflip_mirrors_boxes_with_their_pixels():
    img = solid(0, 20, 30)
    img[5:10, 2:8] = 255
    out, b = hflip(img, np.array([[2, 5, 8, 10]], np.float32))
    np.testing.assert_array_equal(b[0], mask_box(out, (255, 255, 255)))


def test_the_colour_matrix_keeps_greys_grey_and_is_the_identity_at_rest():
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
    assert np.array_equal(cv2.transform(img, colour_matrix(0, 1, 1, 1)), img)
    grey = solid((90, 90, 90), 4, 4)
    for args in [(9, 1.5, 1, 1), (-9, 0.5, 1.2, 1), (40, 1, 1, 0.8)]:
        out = cv2.transform(grey, colour_matrix(*args)).astype(int)
        assert np.ptp(out, axis=2).max() <= 1  # hue, saturation and contrast leave greys grey
    flat = cv2.transform(img, colour_matrix(0, 0.0, 1, 1)).astype(int)
    assert np.ptp(flat, axis=2).max() <= 1  # saturation 0 is grayscale
    bright = cv2.transform(grey, colour_matrix(0, 1, 1.3, 1))
    assert abs(int(bright[0, 0, 0]) - 117) <= 1  # value is a gain
    red = cv2.cvtColor(cv2.transform(solid((200, 30, 30), 1, 1), colour_matrix(120, 1, 1, 1)), cv2.COLOR_RGB2HSV)
    assert abs(int(red[0, 0, 0]) - 60) <= 5  # a third of a turn takes red to green (HSV hue 120 deg)


def test_colour_jitter_draws_new_colours_from_its_generator():
    t = ColourJitter()
    t.set_random_seed(0)
    img = solid((200, 60, 30), 8, 8)
    outs = [t(image=img)["image"] for _ in range(5)]
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    assert len({tuple(o[0, 0]) for o in outs}) == 5


# --- mosaic ---------------------------------------------------------------------------------------
def test_a_mosaic_shows_four_distinct_sources_on_one_fill_colour():
    rng = np.random.default_rng(0)
    empty = [np.zeros((0, 4), np.float32)] * 4
    seen_fill = False
    for _ in range(20):
        canvas, _, _ = mosaic([solid(c) for c in COLOURS], empty, [np.zeros(0, np.int64)] * 4, 128, rng)
        pixels = {tuple(p) for p in canvas.reshape(-1, 3)}
        assert {tuple(c) for c in COLOURS} <= pixels  # all four images visible
        assert pixels <= {tuple(c) for c in COLOURS} | {(FILL,) * 3}  # nothing but them and the fill
        seen_fill |= (FILL,) * 3 in pixels
    assert seen_fill


def test_mosaic_boxes_follow_the_resized_pixels_exactly():
    rng = np.random.default_rng(1)
    images, boxes = [], []
    for k, colour in enumerate(COLOURS):
        img = solid(30)
        x1, y1 = 30 + 10 * k, 20 + 5 * k
        img[y1:y1 + 60, x1:x1 + 70] = colour
        images.append(img)
        boxes.append(np.array([[x1, y1, x1 + 70, y1 + 60]], np.float32))
    checked = 0
    for _ in range(40):
        canvas, b, lab = mosaic(images, boxes, [np.array([k]) for k in range(4)], 128, rng)
        for box, k in zip(b, lab):
            assert box[2] - box[0] >= 2 and box[3] - box[1] >= 2
            np.testing.assert_allclose(box, mask_box(canvas, COLOURS[k]), atol=1.0)
            checked += 1
    assert checked > 100


def test_objects_in_mosaics_keep_the_scale_of_plain_samples():
    # The course builds mosaics at 2x the size and shrinks them, halving every object; ours places
    # each image at the scale a plain sample gets (longest side = output size, same jitter range).
    # A 40x40 object in a 160x120 image is 32 px in a plain 128 sample (median over the jitter);
    # each sits in the corner that touches the mosaic's centre, so only the scale sets its size.
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


def test_box_sizes_in_mosaic_and_plain_training_samples_match(voc_shared):
    ds = TrainingDataset(voc_shared, "trainval", 128, mosaic=0.5)
    rng = np.random.default_rng(0)
    decoded = [ds.decode(i, ds.longest_side(128)) for i in range(len(ds))]
    sides = {True: [], False: []}
    for i in range(240):
        use_mosaic = i % 2 == 0
        own = decoded[i % len(ds)]
        if use_mosaic:
            item = ds.mosaic_sample([own] + [decoded[(i + k) % len(ds)] for k in (1, 2, 3)], 128, rng)
        else:
            item = ds.plain_sample(own, 128, rng)
        w, h = item[1][:, 3] * 128, item[1][:, 4] * 128
        sides[use_mosaic] += torch.sqrt(w * h).tolist()
    ratio = np.median(sides[True]) / np.median(sides[False])
    assert 0.8 < ratio < 1.2, ratio  # the course's mosaic: ~0.5


def spy_on_mosaics(ds: TrainingDataset) -> list:
    """Records the decoded images (own first, then partners) of every mosaic `ds` builds."""
    calls = []
    build = ds.mosaic_sample

    def spy(items, size, rng):
        calls.append(items)
        return build(items, size, rng)

    ds.mosaic_sample = spy
    return calls


def test_the_training_dataset_mosaics_the_asked_fraction_of_samples(voc_shared):
    ds = TrainingDataset(voc_shared, "trainval", 96, mosaic=0.75)
    mosaics = spy_on_mosaics(ds)
    sampler = MultiScaleBatchSampler(DistributedSampler(range(len(ds)), 1, 0, seed=1), 8, (64,), seed=1)
    for epoch in range(10):  # 400 samples: 0.75 +- 0.02 (one standard deviation)
        sampler.set_epoch(epoch)
        for keys in sampler:
            ds.__getitems__(keys)
    assert 0.69 < len(mosaics) / 400 < 0.81


def test_mosaic_partners_are_three_other_images_of_the_same_batch(voc_shared):
    with pytest.warns(UserWarning, match="mosaic=1.0"):
        ds = TrainingDataset(voc_shared, "trainval", 64, mosaic=1.0)
    mosaics = spy_on_mosaics(ds)
    keys = [(i, 64, (0, 0, 0, 0, p)) for p, i in enumerate([5, 9, 17, 30, 2, 11])]
    own = {i: ds.decode(i, ds.longest_side(64))[0] for i, _, _ in keys}
    ds.__getitems__(keys)
    assert len(mosaics) == len(keys)
    for (index, _, _), items in zip(keys, mosaics):
        sources = [next(i for i, image in own.items() if image.shape == item[0].shape and np.array_equal(image, item[0]))
                   for item in items]
        assert sources[0] == index and len(set(sources)) == 4  # its own image, then 3 others of the batch
    # On its own, a sample draws its 3 partners from the whole dataset.
    partners = ds.mosaic_partners(7, [7], np.random.default_rng(0))
    assert len(set(partners)) == 3 and 7 not in partners and all(0 <= i < len(ds) for i in partners)


def test_mosaic_outside_0_1_is_an_error_and_outside_half_to_three_quarters_a_warning(voc_shared):
    with pytest.raises(ValueError, match="expected 0..1"):
        TrainingDataset(voc_shared, "trainval", 128, mosaic=1.5)
    with pytest.warns(UserWarning, match="mosaic=0.9: .*starves large objects"):
        TrainingDataset(voc_shared, "trainval", 128, mosaic=0.9)
    with pytest.warns(UserWarning, match="mosaic=0.2: "):
        TrainingDataset(voc_shared, "trainval", 128, mosaic=0.2)


# --- datasets -------------------------------------------------------------------------------------
def test_training_samples_have_the_batch_size_and_valid_boxes_in_both_layouts(voc, course):
    for root, split in ((voc, "trainval"), (course, "train")):
        ds = TrainingDataset(root, split, 128, mosaic=0.75)
        for i in range(len(ds)):
            size = (64, 96, 128)[i % 3]
            img, boxes = ds[(i, size)]
            assert img.shape == (3, size, size) and img.dtype == torch.float32
            assert 0 <= img.min() and img.max() <= 1
            assert boxes.dtype == torch.float32 and boxes.shape[1] == 5
            assert ((boxes[:, 1:] >= 0) & (boxes[:, 1:] <= 1)).all() and (boxes[:, 3:] > 0).all()
            assert ((boxes[:, 0] >= 0) & (boxes[:, 0] < 20) & (boxes[:, 0] == boxes[:, 0].round())).all()
        assert ds[0][0].shape == (3, 128, 128)  # a plain index: image_size


def test_the_plain_dataset_never_mosaics_and_is_deterministic(tmp_path):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    ds = PlainDataset(None, records=png_records(tmp_path, [(160, 120), (90, 130), (64, 64), (100, 40)],
                                                colour=colours), image_size=96)
    for i in range(4):
        a, b = ds[i], ds[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        pixels = {tuple(p) for p in (a[0] * 255).round().byte().permute(1, 2, 0).reshape(-1, 3).tolist()}
        assert pixels <= {colours[i], (FILL,) * 3}  # its own image and the padding, nothing else


def test_difficult_objects_stay_out_of_targets_but_always_in_the_evaluation_truth(voc, write_voc):
    write_voc(voc, "d", voc_xml([("dog", 0, (1, 1, 40, 30)), ("cat", 1, (50, 10, 90, 60))]),
              Image.new("RGB", (96, 72)))
    _, boxes, meta = PlainDataset(voc, "trainval", 96, return_meta=True)[0]
    assert boxes[:, 0].tolist() == [VOC_DOG] and meta["gt"]["difficult"].tolist() == [False, True]
    _, boxes, _ = PlainDataset(voc, "trainval", 96, return_meta=True, keep_difficult=True)[0]
    assert len(boxes) == 2
    train = TrainingDataset(voc, "trainval", 96, mosaic=0.5)
    own = train.decode(0, train.longest_side(96))
    assert all(VOC_CAT not in train.plain_sample(own, 96, np.random.default_rng(k))[1][:, 0].tolist() for k in range(5))


@pytest.mark.parametrize("w,h", [(160, 120), (157, 93), (93, 157), (301, 199), (50, 50), (1000, 37)])
def test_meta_maps_input_pixels_back_to_stored_pixels_exactly(tmp_path, w, h):
    size = 128
    box = [w * 0.13, h * 0.21, w * 0.77, h * 0.9]
    ds = PlainDataset(None, records=png_records(tmp_path, [(w, h)], boxes=[box]), image_size=size, return_meta=True)
    image, boxes, meta = ds[0]
    lb = meta["letterbox"]
    scale, left, top = lb.scale, lb.pad_left, lb.pad_top
    reduced = max(w, h) >= 2 * size  # decoded at 1/2, 1/4... first (cheaper, same result)
    if not reduced:
        assert lb == Letterbox.fit(h, w, size)
    assert (lb.orig_h, lb.orig_w) == (h, w)
    # The padding ends exactly where meta says the picture starts, and the picture spans w * scale.
    content = image.sum(0) > 0
    cols, rows = np.nonzero(content.any(0).numpy())[0], np.nonzero(content.any(1).numpy())[0]
    assert (cols.min(), rows.min()) == (left, top)
    # Boxes map back: exactly on the long side of a full decode, within half an input pixel on the
    # short side (the resize rounds it to whole pixels); after a reduced decode within one input
    # pixel (its last block of pixels is partial).
    px = 1.0 if reduced else 0.5
    assert abs(cols.max() + 1 - (left + w * scale)) <= px and abs(rows.max() + 1 - (top + h * scale)) <= px
    cx, cy, bw, bh = (boxes[0, 1:] * size).tolist()
    back = lb.to_original(torch.tensor([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])).numpy()
    off = px / scale + 1e-3
    tol = np.array([off] * 4) if reduced else np.array([1e-3, off] * 2 if w >= h else [off, 1e-3] * 2)
    assert (np.abs(back - np.array(box)) <= tol).all(), (back, box)
    np.testing.assert_allclose(meta["gt"]["boxes"].numpy(), [box], atol=1e-4)


# --- training samples: a pure function of their keys ----------------------------------------------
def same(a, b) -> bool:
    """Two lists of samples hold identical tensors (None where a sample was skipped)."""
    a, b = list(a), list(b)
    return len(a) == len(b) and all(
        x is None and y is None or x is not None and y is not None and all(torch.equal(u, v) for u, v in zip(x, y))
        for x, y in zip(a, b))


def batch_keys(indices, size=96, seed=0, epoch=0, number=0, rank=0) -> list[SampleKey]:
    return [SampleKey(i, size, (seed, epoch, number, rank, p)) for p, i in enumerate(indices)]


def test_the_same_key_gives_identical_tensors_twice_and_in_a_fresh_dataset(voc_shared):
    ds = TrainingDataset(voc_shared, "trainval", 96, mosaic=0.5)
    mosaics = spy_on_mosaics(ds)
    keys = batch_keys([3, 17, 8, 25, 0, 39, 12, 30])
    batch = ds.__getitems__(keys)
    assert 0 < len(mosaics) < len(keys)  # both kinds of sample are checked
    fresh = TrainingDataset(voc_shared, "trainval", 96, mosaic=0.5)
    assert same(batch, ds.__getitems__(keys)) and same(batch, fresh.__getitems__(keys))
    # Read on its own (partners from the whole dataset), a key is just as fixed; so is a plain index.
    assert same([ds[k] for k in keys], [fresh[k] for k in keys])
    assert same([ds[5], ds[(5, 64)]], [fresh[5], fresh[(5, 64)]])


def test_other_batches_epochs_ranks_and_runs_augment_the_same_images_differently(voc_shared):
    ds = TrainingDataset(voc_shared, "trainval", 96, mosaic=0.75)
    indices = list(range(8))
    reference = ds.__getitems__(batch_keys(indices))
    for other in (dict(number=1), dict(epoch=1), dict(rank=1), dict(seed=1)):
        samples = ds.__getitems__(batch_keys(indices, **other))
        assert not any(torch.equal(x[0], y[0]) for x, y in zip(reference, samples)), other


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_resumed_mid_epoch_gives_the_tensors_of_an_uninterrupted_one(voc_shared, workers):
    """Epoch 1 read whole by one process, against a fresh DataModule (a restarted run) resumed at its
    batch 4 with `workers` worker processes: the same images, boxes and sizes, tensor for tensor."""
    whole = YOLODataModule(small_config(voc_shared, mosaic=0.75), seed=4).train_dataloader()
    _set_sampler_epoch(whole, 1)
    reference = list(whole)
    restarted = YOLODataModule(small_config(voc_shared, mosaic=0.75, num_workers=workers), seed=4)
    loader = restarted.train_dataloader()
    loader.load_state_dict({"epoch": 1, "batches_done": 4})
    resumed = list(loader)
    assert len(reference) == 10 and len(resumed) == 6
    assert {b.image_hw[1] for b in reference} == {64, 96}
    assert same([(b.images, b.boxes) for b in resumed], [(b.images, b.boxes) for b in reference[4:]])


def test_a_mosaic_with_an_unreadable_partner_falls_back_to_its_plain_sample(tmp_path):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    records = png_records(tmp_path, [(64, 48)] * 4, colour=colours)
    records[3].image_path.write_bytes(b"broken")
    with pytest.warns(UserWarning, match="mosaic=1.0"):
        ds = TrainingDataset(None, records=records, image_size=64, mosaic=1.0)
    plain = []
    build = ds.plain_sample
    ds.plain_sample = lambda item, size, rng: plain.append(item) or build(item, size, rng)
    # Alone, sample 0's partners are the dataset's 3 others, the unreadable 3.png among them.
    with pytest.warns(UserWarning, match=r"mosaic around sample 0 failed \(.*3.png: cannot decode"):
        image, boxes = ds[0]
    assert len(plain) == 1 and tuple(plain[0][0][0, 0]) == colours[0]  # its own image, plain
    assert image.shape == (3, 64, 64) and boxes[:, 0].tolist() == [0.0]
    with pytest.warns(UserWarning, match=r"skipping sample 3: .*3.png"):
        assert ds[3] is None


def test_in_a_batch_mosaics_take_readable_partners_and_an_unreadable_image_is_skipped(tmp_path, recwarn):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
    records = png_records(tmp_path, [(64, 48)] * 5, colour=colours)
    records[2].image_path.write_bytes(b"broken")
    with pytest.warns(UserWarning, match="mosaic=1.0"):
        ds = TrainingDataset(None, records=records, image_size=64, mosaic=1.0)
    mosaics = spy_on_mosaics(ds)
    samples = ds.__getitems__(batch_keys(range(5), size=64))
    assert samples[2] is None and all(s is not None for i, s in enumerate(samples) if i != 2)
    assert len(mosaics) == 4  # every readable sample a mosaic of the 4 readable images
    messages = [str(w.message) for w in recwarn]
    assert any("skipping sample 2:" in m and "2.png" in m for m in messages)
    assert not any("mosaic around" in m for m in messages)


# --- batches --------------------------------------------------------------------------------------
def test_multiscale_sizes_are_from_the_set_equal_within_a_batch_and_equal_across_ranks():
    sizes = (64, 96, 128)
    a = MultiScaleBatchSampler(range(40), 4, sizes, seed=7)
    b = MultiScaleBatchSampler(range(40, 80), 4, sizes, seed=7)  # another rank's share, same seed
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        batches_a, batches_b = list(a), list(b)
        assert len(batches_a) == len(a) == 10
        for ba, bb in zip(batches_a, batches_b):
            assert len({key.size for key in ba}) == 1 and ba[0].size in sizes
            assert ba[0][1] == bb[0][1]
    a.set_epoch(0)
    first = [batch[0][1] for batch in a]
    a.set_epoch(1)
    assert first != [batch[0][1] for batch in a]  # a new draw every epoch
    assert set(first) == set(sizes)
    with pytest.raises(ValueError, match="multiples of 32"):
        MultiScaleBatchSampler(range(4), 2, (100,))


def test_a_short_last_batch_is_kept_or_dropped_as_asked():
    assert [len(b) for b in MultiScaleBatchSampler(range(10), 4, (64,), drop_last=False)] == [4, 4, 2]
    assert [len(b) for b in MultiScaleBatchSampler(range(10), 4, (64,), drop_last=True)] == [4, 4]


def test_collate_drops_unreadable_samples_and_counts_them():
    one = (torch.zeros(3, 32, 32), torch.tensor([[1, 0.5, 0.5, 0.2, 0.2]]))
    two = (torch.ones(3, 32, 32), torch.tensor([[2, 0.5, 0.5, 0.2, 0.2], [3, 0.1, 0.1, 0.1, 0.1]]))
    empty = (torch.zeros(3, 32, 32), torch.zeros(0, 5))
    batch = collate([one, None, empty, two, None])
    assert batch.images.shape == (3, 3, 32, 32) and len(batch) == 3 and batch.metas is None
    assert batch.skipped.dtype == torch.int64 and batch.skipped.ndim == 0 and int(batch.skipped) == 2
    assert batch.boxes[:, 0].tolist() == [0.0, 2.0, 2.0] and batch.boxes[:, 1].tolist() == [1.0, 2.0, 3.0]
    nothing = collate([None])
    assert len(nothing) == 0 and nothing.boxes.shape == (0, 6) and int(nothing.skipped) == 1


def test_evaluation_items_make_a_batch_with_one_meta_per_readable_image():
    one = (torch.zeros(3, 32, 32), torch.tensor([[1, 0.5, 0.5, 0.2, 0.2]]))
    batch = collate([(*one, {"path": "a"}), None])
    assert len(batch) == 1 and batch.metas == [{"path": "a"}] and int(batch.skipped) == 1


def test_a_batch_without_metas_gives_its_own_boxes_as_truth_in_input_pixels():
    batch = collate([(torch.zeros(3, 32, 64), torch.tensor([[4, 0.5, 0.5, 0.5, 0.25]])),
                     (torch.zeros(3, 32, 64), torch.zeros(0, 5))])
    first, second = batch.truths()
    assert first["boxes"].tolist() == [[16.0, 12.0, 48.0, 20.0]] and first["labels"].tolist() == [4]
    assert first["difficult"].tolist() == [False] and len(second["boxes"]) == 0
    assert batch.letterboxes() is None


def test_a_batch_moves_and_pins_as_one_object_that_lightning_can_transfer():
    from lightning_fabric.utilities.apply_func import move_data_to_device

    batch = collate([(torch.zeros(3, 32, 32), torch.tensor([[1, 0.5, 0.5, 0.2, 0.2]]), {"path": "a"})])
    moved = move_data_to_device(batch, torch.device("meta"))
    assert isinstance(moved, Batch) and moved.images.is_meta and moved.skipped.is_meta
    assert moved.metas == [{"path": "a"}]  # metas stay where they are (the CPU)


def test_the_epoch_lightning_gives_the_inner_sampler_draws_new_sizes_and_orders():
    """Lightning calls set_epoch on the batch sampler's `sampler` only (lightning_fabric's
    _set_sampler_epoch): the batch sampler takes its epoch from there."""
    data = list(range(64))
    loaders = [DataLoader(data, batch_sampler=MultiScaleBatchSampler(
        DistributedSampler(data, 2, rank, shuffle=True, seed=5), 4, (64, 96, 128, 160), seed=5)) for rank in (0, 1)]
    epochs = []
    for epoch in (0, 1, 2):
        for loader in loaders:
            _set_sampler_epoch(loader, epoch)
        draws = [list(loader.batch_sampler) for loader in loaders]
        sizes = [[b[0][1] for b in d] for d in draws]
        assert sizes[0] == sizes[1]  # the ranks agree at every step
        epochs.append((sizes[0], [key.index for b in draws[0] for key in b]))
    assert epochs[0][0] != epochs[1][0] != epochs[2][0]  # sizes differ between epochs
    assert epochs[0][1] != epochs[1][1]  # and so does the order


def test_a_batch_sampler_resumed_mid_epoch_continues_with_the_same_batches_and_sizes():
    data = list(range(40))
    inner = DistributedSampler(data, 1, 0, shuffle=True, seed=3)
    sampler = MultiScaleBatchSampler(inner, 4, (64, 96, 128), seed=3)
    sampler.set_epoch(2)
    whole = list(sampler)
    fresh = MultiScaleBatchSampler(DistributedSampler(data, 1, 0, shuffle=True, seed=3), 4, (64, 96, 128), seed=3)
    fresh.resume_at(2, 7)  # 7 batches of epoch 2 were done before the kill
    assert list(fresh) == whole[7:]
    assert list(fresh) == whole  # the skip applies to one iteration only: the next is the whole epoch
    assert len(fresh) == len(whole) == 10


def test_the_training_loader_is_stateful_for_lightning_and_restores_its_position():
    from lightning_fabric.utilities.types import _Stateful

    class Keys(Dataset):  # an item is its key: (index, size)
        def __len__(self):
            return 24

        def __getitem__(self, key):
            return key

    def make(position=None):
        return ResumableDataLoader(Keys(), batch_sampler=MultiScaleBatchSampler(
            DistributedSampler(range(24), 1, 0, seed=1), 4, (64, 96), seed=1), collate_fn=list, position=position)

    saved = make(position=lambda: (1, 4)).state_dict()
    assert isinstance(make(), _Stateful) and saved == {"epoch": 1, "batches_done": 4}
    loader = make()
    _set_sampler_epoch(loader, 1)
    reference = list(loader)
    restored = make()
    restored.load_state_dict(saved)
    assert list(restored) == reference[4:] and len(reference) == 6


def test_shards_cover_the_evaluation_set_once_in_order():
    shards = [list(ShardSampler(10, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10)) and shards[1] == [1, 4, 7]
    assert [len(ShardSampler(10, 3, r)) for r in range(3)] == [4, 3, 3]


# --- the DataModule -------------------------------------------------------------------------------
def small_config(root, **kw) -> DataConfig:
    settings = dict(batch_size=4, num_workers=0, pin_memory=False, train_sizes=(64, 96), image_size=64, mosaic=0.5)
    return DataConfig(root=str(root) if root else None, **{**settings, **kw})


def test_a_run_over_a_corrupt_file_completes_and_counts_it(tmp_path):
    from helpers.synthetic import make_voc_dataset

    root = make_voc_dataset(tmp_path / "v", n_trainval=8, n_test=2, seed=4)
    jpg = sorted((root / "VOC2007" / "JPEGImages").glob("*.jpg"))[0]
    jpg.write_bytes(b"broken")
    dm = YOLODataModule(small_config(root))
    dm.setup("fit")
    for epoch in range(2):
        loader = dm.train_dataloader()
        loader.batch_sampler.set_epoch(epoch)
        with pytest.warns(UserWarning, match=jpg.name):
            batches = list(loader)
        assert sum(int(b.skipped) for b in batches) == 1 and sum(len(b) for b in batches) == 7


def test_steps_per_epoch_are_known_before_fitting_for_any_world_size(voc_shared, monkeypatch):
    dm = YOLODataModule(small_config(voc_shared))
    assert dm.num_training_batches(1) == 10 == len(dm.train_dataloader()) == len(list(dm.train_dataloader()))
    for world in (2, 3):
        for rank in range(world):
            monkeypatch.setattr(dm, "world", lambda w=world, r=rank: (w, r))
            loader = dm.train_dataloader()
            assert len(loader) == len(list(loader.batch_sampler)) == dm.num_training_batches(world)
    assert steps_per_epoch(3, 4, 1) == 1  # fewer images than a batch: one short batch


def test_ranks_draw_the_same_sizes_and_split_the_evaluation_set(voc_shared, monkeypatch):
    dm = YOLODataModule(small_config(voc_shared, train_sizes=(64, 96, 128, 160)), seed=3)
    sizes, seen = [], []
    for rank in (0, 1):
        monkeypatch.setattr(dm, "world", lambda r=rank: (2, r))
        sizes.append([batch[0][1] for batch in dm.train_dataloader().batch_sampler])
        seen.append([m["path"] for batch in dm.val_dataloader() for m in batch.metas])
    assert sizes[0] == sizes[1] and len(set(sizes[0])) > 1
    all_paths = [str(r.image_path) for r in dm.val_dataset.records]
    assert sorted(seen[0] + seen[1]) == sorted(all_paths) and seen[0] == all_paths[0::2]


def test_validation_batches_carry_meta_at_the_fixed_size(voc_shared):
    dm = YOLODataModule(small_config(voc_shared))
    dm.setup("fit")
    for batch in dm.val_dataloader():
        assert batch.image_hw == (64, 64) and len(batch.metas) == len(batch)
        assert batch.boxes.shape[1] == 6 and {"path", "letterbox", "gt"} <= set(batch.metas[0])


def test_validation_and_helpers_evaluate_read_the_same_batches(voc_shared):
    from helpers.evaluate import split_loader

    dm = YOLODataModule(small_config(voc_shared))
    cfg = dm.cfg
    loader, split = split_loader(voc_shared, cfg.val_split, cfg.image_size, cfg.classes, batch_size=cfg.batch_size)
    during_training, afterwards = list(dm.val_dataloader()), list(loader)
    assert split == dm.val_dataset.split and len(during_training) == len(afterwards) > 1
    for a, b in zip(during_training, afterwards):
        assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes)
        assert [m["path"] for m in a.metas] == [m["path"] for m in b.metas]


def test_bad_annotations_are_left_out_with_a_warning_by_the_datamodule(voc, write_voc):
    write_voc(voc, "bad", "<annotation>", Image.new("RGB", (96, 72)), append=True)
    with pytest.warns(UserWarning, match=r"bad.xml: malformed XML.*\(left out\)"):
        YOLODataModule(small_config(voc)).setup("fit")


def test_without_a_root_it_generates_synthetic_data_once(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_DATA_CACHE", str(tmp_path / "cache"))
    root = synthetic_root(seed=0)
    assert root == tmp_path / "cache" / "synthetic-v2-seed0" / "VOCdevkit"
    stamp = (root / "VOC2007" / "ImageSets" / "Main" / "test.txt").stat().st_mtime_ns
    dm = YOLODataModule(small_config(None), seed=0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.root == root and len(dm.train_dataset) == 256 and len(dm.val_dataset) == 64
    assert (root / "VOC2007" / "ImageSets" / "Main" / "test.txt").stat().st_mtime_ns == stamp  # reused


def test_the_training_loader_runs_with_worker_processes(voc_shared):
    cfg = small_config(voc_shared)
    cfg.num_workers = 2
    dm = YOLODataModule(cfg)
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 10 and all(b.image_hw[1] in (64, 96) for b in batches)
