"""assign_anchors and build_targets: the course's assignment for hand-made boxes, minus its defects."""
import pytest
import torch

from helpers.boxes import grid_shapes
from helpers.config import ANCHORS
from helpers.targets import IGNORE_IOU, assign_anchors, build_targets


def box(img, cls, cx, cy, w, h):
    return [img, cls, cx, cy, w, h]


def positives(t):
    return (t[..., 0] == 1).nonzero().tolist()


def test_a_box_gets_one_positive_per_scale_with_cell_offsets_and_sizes_in_cell_units():
    # 0.30 x 0.24 matches anchor (0.28, 0.22) best on the coarse scale.
    t = build_targets(torch.tensor([box(0, 7, 0.55, 0.40, 0.30, 0.24)]), batch_size=1, image_size=416)
    coarse = t[0]
    assert positives(coarse) == [[0, 0, 5, 7]]  # i = int(0.40*13) = 5, j = int(0.55*13) = 7
    torch.testing.assert_close(
        coarse[0, 0, 5, 7], torch.tensor([1.0, 0.55 * 13 - 7, 0.40 * 13 - 5, 0.30 * 13, 0.24 * 13, 7.0]))
    assert [len(positives(s)) for s in t] == [1, 1, 1]  # one positive on every scale, as in the course


def test_shapes_follow_the_image_size_including_non_square():
    t = build_targets(torch.zeros(0, 6), batch_size=2, image_size=(320, 480))
    assert [tuple(x.shape) for x in t] == [(2, 3, 10, 15, 6), (2, 3, 20, 30, 6), (2, 3, 40, 60, 6)]
    assert all((x == 0).all() for x in t)


def test_other_well_fitting_anchors_of_the_cell_are_ignored_not_negative():
    # A 0.145 x 0.20 box on the middle scale fits both (0.15, 0.11) and (0.14, 0.29) with shape
    # IoU > 0.5: the better one is positive, the other ignored, (0.07, 0.15) stays negative.
    b = torch.tensor([box(0, 1, 0.5, 0.5, 0.145, 0.20)])
    t = build_targets(b, 1, 416)[1]
    i = j = 13
    obj = t[0, :, i, j, 0].tolist()
    ious = _shape_ious(0.145, 0.20, ANCHORS[1])
    best = max(range(3), key=lambda a: ious[a])
    assert obj[best] == 1
    for a in range(3):
        if a != best:
            assert obj[a] == (-1 if ious[a] > 0.5 else 0)
    assert any(v == -1 for v in obj), "the example must exercise the ignore rule"


def _shape_ious(w, h, anchors):
    out = []
    for aw, ah in anchors:
        inter = min(w, aw) * min(h, ah)
        out.append(inter / (w * h + aw * ah - inter))
    return out


def test_a_box_whose_slot_is_taken_moves_to_its_next_best_free_anchor():
    # Two near-identical boxes in the same cell: the course's loop drops the second on the
    # coarse scale's best anchor; ours gives it the next-best anchor of that cell.
    b = torch.tensor([box(0, 3, 0.50, 0.50, 0.30, 0.22), box(0, 4, 0.51, 0.51, 0.30, 0.22)])
    coarse = build_targets(b, 1, 416)[0]
    pos = positives(coarse)
    assert len(pos) == 2 and {p[1] for p in pos} == {0, 1}
    assert coarse[0, 0, 6, 6, 5] == 3  # the first box keeps its best anchor
    assert coarse[0, 1, 6, 6, 5] == 4


def test_three_colliding_boxes_fill_the_three_anchors_and_a_fourth_has_no_slot():
    b = torch.tensor([box(0, c, 0.5, 0.5, 0.3, 0.22) for c in range(4)])
    coarse = build_targets(b, 1, 416)[0]
    assert sorted(coarse[0, :, 6, 6, 5].tolist()) == [0.0, 1.0, 2.0]
    assert (coarse[..., 0] == 1).sum() == 3


def test_a_centre_at_exactly_one_is_clamped_into_the_last_cell():
    t = build_targets(torch.tensor([box(0, 2, 1.0, 1.0, 0.1, 0.1)]), 1, 416)
    for x, s in zip(t, (13, 26, 52)):
        (b, a, i, j), = positives(x)
        assert (i, j) == (s - 1, s - 1)
        assert x[b, a, i, j, 1] == pytest.approx(1.0)


def test_boxes_of_different_images_never_collide():
    b = torch.tensor([box(0, 1, 0.5, 0.5, 0.3, 0.22), box(1, 2, 0.5, 0.5, 0.3, 0.22)])
    coarse = build_targets(b, 2, 416)[0]
    assert positives(coarse) == [[0, 0, 6, 6], [1, 0, 6, 6]]


def test_zero_area_boxes_are_skipped():
    t = build_targets(torch.tensor([box(0, 1, 0.5, 0.5, 0.0, 0.2)]), 1, 416)
    assert all((x == 0).all() for x in t)


def test_targets_are_built_on_the_boxes_device_and_do_not_modify_them():
    b = torch.tensor([box(0, 1, 0.5, 0.5, 0.3, 0.2)])
    before = b.clone()
    t = build_targets(b, 1, 320)
    assert all(x.device == b.device for x in t)
    assert torch.equal(b, before)


# --- the assignment step on its own ---------------------------------------------------------------
def test_no_boxes_give_an_empty_assignment_of_the_right_shapes():
    a = assign_anchors(torch.zeros(0, 6), grid_shapes(416))
    assert a.anchor.shape == a.row.shape == a.col.shape == (0, 3)
    assert a.ignore.shape == a.shape_iou.shape == (0, 3, 3)


def test_the_assignment_names_each_boxs_anchor_and_cell_per_scale():
    b = torch.tensor([box(0, 1, 0.55, 0.40, 0.30, 0.24), box(0, 2, 0.55, 0.40, 0.0, 0.24)])
    a = assign_anchors(b, grid_shapes((320, 416)))
    assert a.row[0].tolist() == [4, 8, 16] and a.col[0].tolist() == [7, 14, 28]  # int(0.40*10), int(0.55*13)...
    assert a.anchor[0].tolist() == a.shape_iou[0].argmax(dim=1).tolist()  # no collision: best of each scale
    assert a.anchor[1].tolist() == [-1, -1, -1] and not a.ignore[1].any()  # no area: nothing to learn
    assert torch.equal(a.ignore[0], (a.shape_iou[0] > IGNORE_IOU) & (torch.arange(3) != a.anchor[0, :, None]))


def _rounds_reference(boxes, grids, anchors=ANCHORS):
    """The rule written as the plain loop it vectorises: on each scale, round r walks the boxes in
    order and gives each one still without an anchor its r-th best anchor if that slot is free."""
    anchor_wh = torch.tensor(anchors)
    out = torch.full((len(boxes), len(grids)), -1, dtype=torch.long)
    for s, (sh, sw) in enumerate(grids):
        taken = set()
        for r in range(anchor_wh.shape[1]):
            for n, (img, _, cx, cy, w, h) in enumerate(boxes.tolist()):
                if out[n, s] >= 0 or w <= 0 or h <= 0:
                    continue
                inter = torch.minimum(torch.tensor([w, h]), anchor_wh[s]).prod(1)
                ious = inter / (w * h + anchor_wh[s].prod(1) - inter)
                a = int(ious.argsort(descending=True, stable=True)[r])
                slot = (int(img), a, min(int(min(cy, 1.0) * sh), sh - 1), min(int(min(cx, 1.0) * sw), sw - 1))
                if slot not in taken:
                    taken.add(slot)
                    out[n, s] = a
    return out


def test_crowded_boxes_are_assigned_as_the_plain_loop_assigns_them():
    g = torch.Generator().manual_seed(3)
    n = 60  # 3 images, centres packed into the middle: many boxes share cells on every scale
    b = torch.cat([torch.randint(0, 3, (n, 1), generator=g).float(), torch.zeros(n, 1),
                   torch.rand(n, 2, generator=g) * 0.2 + 0.4, torch.rand(n, 2, generator=g) * 0.5], 1)
    b[::7, 4] = 0.0  # some without area
    grids = grid_shapes((320, 480))
    assert torch.equal(assign_anchors(b, grids).anchor, _rounds_reference(b, grids))


def test_build_targets_needs_no_data_dependent_shapes_or_host_syncs():
    # On the meta device tensors have no values: .item(), bool(), nonzero() and boolean-mask
    # indexing all fail there, so this passes only if nothing in it waits for the device.
    t = build_targets(torch.rand(10, 6, device="meta"), 4, 416)
    assert [tuple(x.shape) for x in t] == [(4, 3, 13, 13, 6), (4, 3, 26, 26, 6), (4, 3, 52, 52, 6)]
