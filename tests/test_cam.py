"""helpers.cam: per-detection CAMs are valid maps, explain the right thing, equal the plain library
path, and leave the model exactly as they found it."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus

from helpers.boxes import Letterbox
from helpers.cam import (
    DetectionTarget,
    FlatOutputs,
    assigned_index,
    cam_to_original,
    capture,
    detect_and_explain,
    detection_cams,
    flatten_outputs,
    locate_detections,
    prediction_features,
    ravel_index,
    unravel_index,
)
from helpers.loss import YoloLoss
from helpers.model import YOLOv3
from helpers.postprocess import decode, detect
from helpers.targets import build_targets

SIZE = 96  # 3x3, 6x6, 12x12 grids: small enough to train in the test, large enough for three scales


def squares(n: int, seed: int, size: int = SIZE):
    """n dark noisy images, each with one bright square (class 0 red, class 1 blue), side 14-24% of
    the image. Returns (images [n,3,size,size], boxes [n,6] image, class, cx, cy, w, h normalised,
    pixel boxes [n,4] x1 y1 x2 y2 exclusive)."""
    g = torch.Generator().manual_seed(seed)
    side = torch.randint(int(0.14 * size), int(0.24 * size) + 1, (n,), generator=g)
    x1 = (torch.rand(n, generator=g) * (size - side)).long()
    y1 = (torch.rand(n, generator=g) * (size - side)).long()
    cls = torch.randint(0, 2, (n,), generator=g)
    img = torch.rand(n, 3, size, size, generator=g) * 0.15
    yy, xx = torch.arange(size).view(1, size, 1), torch.arange(size).view(1, 1, size)
    inside = ((yy >= y1.view(-1, 1, 1)) & (yy < (y1 + side).view(-1, 1, 1))
              & (xx >= x1.view(-1, 1, 1)) & (xx < (x1 + side).view(-1, 1, 1)))
    color = torch.where(cls.view(-1, 1) == 0, torch.tensor([0.95, 0.2, 0.2]), torch.tensor([0.2, 0.3, 0.95]))
    img = torch.where(inside[:, None], color.view(n, 3, 1, 1), img)
    boxes = torch.stack([torch.arange(n).float(), cls.float(), (x1 + side / 2) / size, (y1 + side / 2) / size,
                         side / size, side / size], dim=1)
    pixels = torch.stack([x1, y1, x1 + side, y1 + side], dim=1)
    return img, boxes, pixels


@pytest.fixture(scope="session")
def trained():
    """A width-0.125 model trained 150 Adam steps on `squares` (~25 s on 2 cores): it finds the squares."""
    torch.manual_seed(0)
    model = YOLOv3(num_classes=2, width=0.125)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = YoloLoss()
    for step in range(150):
        img, boxes, _ = squares(8, seed=step)
        loss = loss_fn(model(img), build_targets(boxes, 8, SIZE))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


@pytest.fixture(scope="session")
def held_out(trained):
    """8 unseen images, each with the model's top detection (checked to be on the square) and its box."""
    img, _, pixels = squares(8, seed=10_000)
    dets = [detect(trained(img[i: i + 1]), SIZE, 0.3, 0.45, max_detections=1)[0] for i in range(8)]
    assert all(len(d) == 1 for d in dets), "the trained model should find every square"
    iou = torch.stack([_iou(d[0, :4], p.float()) for d, p in zip(dets, pixels)])
    assert (iou > 0.5).all(), f"the trained model's top boxes should be on the squares (IoU {iou.tolist()})"
    return img, dets, pixels


def _iou(a, b):
    from torchvision.ops import box_iou

    return box_iou(a[None], b[None])[0, 0]


def _mass_inside(cam: np.ndarray, box) -> tuple[float, float]:
    """(fraction of the map's mass inside the box, fraction of the image the box covers)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return float(cam[y1:y2, x1:x2].sum() / cam.sum()), (x2 - x1) * (y2 - y1) / cam.size


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    return YOLOv3(num_classes=4, width=0.125).eval()


# --- explains the right thing ------------------------------------------------------------------
@pytest.mark.slow
def test_gradcam_of_a_detection_puts_most_of_its_mass_inside_that_detections_box(trained, held_out):
    img, dets, pixels = held_out
    for i in range(len(img)):
        cam = detection_cams(trained, img[i], dets[i])[0]
        mass, area = _mass_inside(cam, pixels[i])
        # The box covers 2-6% of the image, so a map that ignored the object would put about that
        # much inside it. "Most of the mass" (> 50%) is then > 8x chance; the bilinear upsampling of
        # a 6x6 or 12x12 map alone spills a lossless map's edge out of a 1-2 cell box, which is why
        # the threshold is not 90%. Measured: 80-98% per image, 93% on average.
        assert mass > 0.5, f"image {i}: only {mass:.0%} of the Grad-CAM inside the box ({area:.1%} of the image)"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam++", "eigencam"])
def test_gradcam_plus_plus_and_eigencam_favour_the_detected_box(trained, held_out, method):
    img, dets, pixels = held_out
    ratios = []
    for i in range(len(img)):
        cam = detection_cams(trained, img[i], dets[i], method=method)[0]
        assert cam.shape == (SIZE, SIZE) and cam.min() >= 0 and cam.max() == pytest.approx(1.0, abs=1e-5)
        mass, area = _mass_inside(cam, pixels[i])
        ratios.append(mass / area)
    # These spread wider than Grad-CAM (Grad-CAM++ weights by higher-order gradient terms, EigenCAM
    # is class-agnostic: the first principal component of the whole feature map), so the check is
    # weaker than "most of the mass": on average at least twice the mass a map blind to the object
    # would put in the box. Measured: 7.7x (Grad-CAM++) and 4.6x (EigenCAM), each image >= 3x.
    assert np.mean(ratios) > 2.0, f"{method}: mass in box / box area per image {np.round(ratios, 1)}"


# --- valid maps ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "eigencam"])
def test_one_map_per_detection_with_the_input_size_in_0_1(tiny, method):
    x = torch.rand(3, 64, 96)
    dets = detect(tiny(x[None]), (64, 96), 0.0, 0.45, max_detections=5)[0]
    cams = detection_cams(tiny, x, dets, method=method)
    assert cams.shape == (5, 64, 96) and cams.dtype == np.float32
    assert cams.min() >= 0.0 and cams.max() <= 1.0 + 1e-6
    assert np.allclose(cams.reshape(5, -1).max(1), 1.0, atol=1e-5)  # each map scaled to max 1


def test_no_detections_give_an_empty_stack(tiny):
    cams = detection_cams(tiny, torch.rand(1, 3, 64, 64), torch.zeros(0, 6))
    assert cams.shape == (0, 64, 64)


@pytest.mark.parametrize("layers", ["prediction", "head_inputs", "backbone", "nested", "first"])
@pytest.mark.parametrize("cam_class,method", [(GradCAM, "gradcam"), (GradCAMPlusPlus, "gradcam++")])
def test_cached_tail_gives_the_plain_library_maps(tiny, layers, cam_class, method):
    """The fast path (cached forward, tail from the target layer) equals pytorch-grad-cam on the whole
    flattened model with the image repeated, for layers at, inside and before the heads."""
    x = torch.rand(3, 64, 64)
    outputs = tiny(x[None])
    where = torch.tensor([[0, 1, 1, 0], [1, 0, 3, 2], [2, 2, 5, 7], [2, 0, 0, 0]])
    idx, cls = ravel_index(where, outputs), torch.tensor([1, 2, 3, 0])
    choose = {"prediction": lambda s: prediction_features(tiny)[s], "head_inputs": lambda s: tiny.head_inputs[s],
              "backbone": lambda s: tiny.layers[10], "nested": lambda s: tiny.layers[6].layers[3][1].conv,
              "first": lambda s: tiny.layers[0]}[layers]
    arg = layers if layers in ("prediction", "head_inputs") else choose(0)
    fast = detection_cams(tiny, x, indices=idx, classes=cls, method=method, target_layers=arg)
    ref = []
    for k in range(len(idx)):
        cam = cam_class(model=FlatOutputs(tiny), target_layers=[choose(int(where[k, 0]))])
        ref.append(cam(x[None].clone().requires_grad_(True), [DetectionTarget(int(idx[k]), int(cls[k]))])[0])
        cam.activations_and_grads.release()
    np.testing.assert_allclose(fast, np.stack(ref), atol=1e-4)


def test_the_against_target_is_the_negative_log_score():
    out = torch.randn(1, 50, 25)
    log = DetectionTarget(7, 3, "log")(out[0])
    assert torch.equal(DetectionTarget(7, 3, "against")(out[0]), -log)
    assert float(log) == pytest.approx(float(F.logsigmoid(out[0, 7, 0]) + F.log_softmax(out[0, 7, 5:], -1)[3]))


def test_log_and_probability_scores_give_the_same_gradcam(tiny):
    x = torch.rand(3, 64, 64)
    dets = detect(tiny(x[None]), 64, 0.0, 0.45, max_detections=3)[0]
    a = detection_cams(tiny, x, dets, score="log")
    b = detection_cams(tiny, x, dets, score="prob")
    np.testing.assert_allclose(a, b, atol=1e-3)  # the gradients differ by the positive factor 1/score


def test_capture_reproduces_the_models_outputs(tiny):
    x = torch.rand(3, 64, 96)
    cap = capture(tiny, x)
    for a, b in zip(cap.outputs, tiny(x[None])):
        torch.testing.assert_close(a, b)


# --- the model is left alone ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gradcam", "eigencam"])
def test_weights_modes_and_grads_are_untouched(method):
    torch.manual_seed(2)
    model = YOLOv3(num_classes=3, width=0.125).train()
    model.layers[3].eval()  # a mixed state must come back as it was
    model.layers[0].conv.weight.grad = torch.ones_like(model.layers[0].conv.weight)  # an existing grad
    model.layers[5].conv.weight.requires_grad_(False)  # a frozen one stays frozen, others stay trainable
    before = {k: v.clone() for k, v in model.state_dict().items()}  # BN running stats included
    modes = [m.training for m in model.modules()]
    x = torch.rand(3, 64, 64)
    detect_and_explain(model, x, conf_threshold=0.0, top_k=3, method=method)
    detection_cams(model, x, indices=torch.tensor([5, 100]), classes=torch.tensor([0, 2]), method=method,
                   target_layers=model.layers[4])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model.layers[0].conv.weight.grad, torch.ones_like(model.layers[0].conv.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "layers.0.conv.weight")
    assert not model.layers[5].conv.weight.requires_grad
    assert sum(p.requires_grad for p in model.parameters()) == sum(1 for _ in model.parameters()) - 1


def test_works_inside_inference_mode_and_no_grad(tiny):
    x = torch.rand(3, 64, 64)
    ref = detection_cams(tiny, x, indices=torch.tensor([3]), classes=torch.tensor([1]))
    with torch.inference_mode():
        a = detection_cams(tiny, x.clone(), indices=torch.tensor([3]), classes=torch.tensor([1]))
    with torch.no_grad():
        b = detection_cams(tiny, x, indices=torch.tensor([3]), classes=torch.tensor([1]))
    np.testing.assert_allclose(a, ref)
    np.testing.assert_allclose(b, ref)


# --- indices -------------------------------------------------------------------------------------
def test_flat_index_round_trip_and_row_order_match_decode(tiny):
    outputs = tiny(torch.rand(2, 3, 64, 96))
    flat = flatten_outputs(outputs)
    n = sum(o.shape[1] * o.shape[2] * o.shape[3] for o in outputs)
    assert flat.shape == (2, n, outputs[0].shape[-1])
    idx = torch.tensor([0, 17, n // 2, n - 1])
    where = unravel_index(idx, outputs)
    assert torch.equal(ravel_index(where, outputs), idx)
    for k, (s, a, i, j) in enumerate(where.tolist()):
        assert torch.equal(flat[1, idx[k]], outputs[s][1, a, i, j])
    with pytest.raises(ValueError, match="out of range"):
        unravel_index(torch.tensor([n]), outputs)


def test_locate_detections_finds_the_rows_detect_picked(tiny):
    x = torch.rand(1, 3, 64, 96)
    outputs = tiny(x)
    dets = detect(outputs, (64, 96), 0.0, 0.45, max_detections=8)[0]
    rows = decode(outputs, image_size=(64, 96))[0][locate_detections(outputs, dets, (64, 96))]
    score = rows[:, 4] * rows[:, 5:].gather(1, dets[:, 5:6].long())[:, 0]
    torch.testing.assert_close(score, dets[:, 4])
    torch.testing.assert_close(rows[:, :4].clamp(min=0).minimum(torch.tensor([96.0, 64, 96, 64])), dets[:, :4])
    _, (picked,) = detect(outputs, (64, 96), 0.0, 0.45, max_detections=8, return_indices=True)
    assert torch.equal(locate_detections(outputs, dets, (64, 96)), picked)


def test_assigned_index_is_a_positive_of_build_targets():
    boxes01 = torch.tensor([[0, 3, 0.5, 0.5, 0.3, 0.25], [0, 1, 0.2, 0.7, 0.05, 0.08], [0, 2, 0.8, 0.2, 0.14, 0.3]])
    targets = build_targets(boxes01, 1, 128)
    cx, cy, w, h = boxes01[:, 2:].unbind(1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1) * 128
    where = unravel_index(assigned_index(xyxy, 128), [t.shape[2:4] for t in targets])
    for (s, a, i, j), c in zip(where.tolist(), boxes01[:, 1].tolist()):
        assert targets[s][0, a, i, j, 0] == 1 and targets[s][0, a, i, j, 5] == c


def test_assigned_index_follows_build_targets_when_boxes_share_a_slot():
    # Two boxes of the same shape in one cell: training gives the second the next-best anchor of
    # the cell (its best one is taken). The row explained must be that box's own positive.
    boxes01 = torch.tensor([[0, 0, 0.5, 0.5, 0.30, 0.22], [0, 1, 0.51, 0.51, 0.30, 0.22]])
    targets = build_targets(boxes01, 1, 128)
    cx, cy, w, h = boxes01[:, 2:].unbind(1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1) * 128
    rows = assigned_index(xyxy, 128)
    assert rows[0] != rows[1]
    for (s, a, i, j), c in zip(unravel_index(rows, [t.shape[2:4] for t in targets]).tolist(), (0, 1)):
        assert targets[s][0, a, i, j, 0] == 1 and targets[s][0, a, i, j, 5] == c


def test_assigned_index_of_no_boxes_is_empty():
    assert assigned_index(torch.zeros(0, 4), 128).shape == (0,)


# --- letterbox ------------------------------------------------------------------------------------
def test_cam_to_original_cuts_the_padding_and_puts_a_spot_where_it_belongs():
    # original 100 (h) x 200 (w), letterboxed to 64: scale 0.32, 64 x 32 content, 16 px pad on top.
    meta = Letterbox(scale=0.32, pad_left=0, pad_top=16, orig_h=100, orig_w=200)
    cam = np.zeros((2, 64, 64), np.float32)
    cam[0, 16 + 8, 48] = 1.0  # input pixel (x 48, y 24) = original (150, 25)
    cam[1, :16] = 1.0  # only in the padding: nothing of it is left
    out = cam_to_original(cam, meta)
    assert out.shape == (2, 100, 200) and out.min() >= 0 and out.max() <= 1
    y, x = np.unravel_index(out[0].argmax(), out[0].shape)
    assert abs(x - 150) <= 3 and abs(y - 25) <= 3
    assert out[1].max() == 0.0
    assert cam_to_original(cam[0], meta).shape == (100, 200)
    with pytest.raises(ValueError, match="must be a helpers.boxes.Letterbox"):
        cam_to_original(cam, {"scale": 0.32, "pad": (0, 16), "orig_size": (100, 200)})  # the old dict


def test_detect_and_explain_maps_both_back_to_the_original(tiny):
    meta = Letterbox(scale=0.32, pad_left=0, pad_top=16, orig_h=100, orig_w=200)
    x = torch.rand(3, 64, 64)
    dets_in, cams_in = detect_and_explain(tiny, x, conf_threshold=0.0, top_k=3)
    dets, cams = detect_and_explain(tiny, x, conf_threshold=0.0, top_k=3, letterbox=meta)
    assert cams.shape == (3, 100, 200) and dets.shape == (3, 6)
    expect = (dets_in[:, :4] - torch.tensor([0, 16, 0, 16])) / 0.32
    torch.testing.assert_close(dets[:, :4], expect.clamp(min=0).minimum(torch.tensor([200.0, 100, 200, 100])))
    np.testing.assert_allclose(cams, cam_to_original(cams_in, meta))


def test_min_detections_forces_the_best_ones_when_none_pass(tiny):
    dets, cams = detect_and_explain(tiny, torch.rand(3, 64, 64), conf_threshold=1.0, top_k=5, min_detections=5)
    assert len(dets) == 5 and cams.shape == (5, 64, 64)


# --- bad input ----------------------------------------------------------------------------------
def test_bad_input_is_refused_with_a_clear_message(tiny):
    x = torch.rand(3, 64, 64)
    d = torch.tensor([[0.0, 0, 10, 10, 0.5, 1]])
    with pytest.raises(ValueError, match="method must be one of"):
        detection_cams(tiny, x, d, method="scorecam")
    with pytest.raises(ValueError, match="multiples of 32"):
        detection_cams(tiny, torch.rand(3, 60, 64), d)
    with pytest.raises(ValueError, match=r"\[3,H,W\]"):
        detection_cams(tiny, torch.rand(2, 3, 64, 64), d)
    with pytest.raises(ValueError, match="not a module of this model"):
        detection_cams(tiny, x, d, target_layers=torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="target_layers must be one of"):
        detection_cams(tiny, x, d, target_layers="neck")
    with pytest.raises(ValueError, match="need their classes"):
        detection_cams(tiny, x, indices=torch.tensor([1]))
    with pytest.raises(ValueError, match="score must be one of"):
        DetectionTarget(0, 0, score="logit")
