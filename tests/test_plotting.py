"""helpers.plotting: every figure is a plain Figure that pyplot never sees (no leak, however often it
is called), one stable colour per class, boxes and labels where they belong, `annotate` never
touches its input; and helpers.analysis, which computes what the figures show: `find_mistakes` finds
the mistakes a hand-made case contains, `detect_examples` leaves the model's mode as it was."""
from __future__ import annotations

import gc
import io
import weakref

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from helpers.analysis import detect_examples, find_mistakes, mistake_cams, mistakes_on  # noqa: E402
from helpers.batch import Batch  # noqa: E402
from helpers.boxes import Letterbox  # noqa: E402
from helpers.config import VOC_CLASSES  # noqa: E402
from helpers.dataset_org import PlainDataset  # noqa: E402
from helpers.metrics import voc_map  # noqa: E402
from helpers.model import YOLOv3  # noqa: E402
from helpers.plotting import (  # noqa: E402
    annotate,
    class_colors,
    draw_boxes,
    overlay,
    plot_cam_overlays,
    plot_examples,
    plot_lr_finder,
    plot_pr_curves,
    plot_schedule,
    plot_training_curves,
    plot_worst_mistakes,
    show,
    show_saved,
    to_image,
)
from helpers.run_logs import read_metrics_csv  # noqa: E402
from helpers.schedule import OneCycleSpec, Schedule, compute_schedule  # noqa: E402

DOG, CAT, CAR = VOC_CLASSES.index("dog"), VOC_CLASSES.index("cat"), VOC_CLASSES.index("car")


@pytest.fixture(autouse=True)
def _no_pyplot_figures():
    """Each test starts with an empty pyplot registry, so `assert_figure` sees only what it made."""
    plt.close("all")
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return YOLOv3(num_classes=20, width=0.125).eval()


def assert_figure(fig) -> Figure:
    """A plain Figure, absent from pyplot's list (so nothing leaks), that renders without error."""
    assert isinstance(fig, Figure)
    assert plt.get_fignums() == []
    fig.savefig(io.BytesIO(), format="png", dpi=30)
    assert plt.get_fignums() == []
    return fig


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.axison]


def rgb(c: int) -> tuple[float, ...]:
    return tuple(float(v) for v in class_colors(20)[c])


def grey(h: int = 100, w: int = 100, value: int = 128) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


# --- colours ----------------------------------------------------------------------------------
def test_class_colors_are_rgb_in_unit_range_and_pairwise_distinct():
    c = class_colors(20)
    assert c.shape == (20, 3)
    assert (c >= 0).all() and (c <= 1).all()
    dist = np.linalg.norm(c[:, None] - c[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    assert dist.min() > 0.1  # every pair of classes tells apart


def test_class_color_depends_on_the_class_only_not_on_the_call():
    np.testing.assert_array_equal(class_colors(20), class_colors(20))
    np.testing.assert_array_equal(class_colors(5), class_colors(20)[:5])
    np.testing.assert_array_equal(class_colors(80)[:20], class_colors(20))


def test_draw_boxes_uses_the_same_colour_for_a_class_across_calls_and_differs_between_classes():
    img = grey()
    a = draw_boxes(img, [[10, 10, 40, 40, 0.9, DOG], [50, 50, 90, 90, 0.8, CAT]])
    b = draw_boxes(img, [[20, 20, 60, 60, 0.7, DOG]])
    (dog_a, cat_a), (dog_b,) = a.axes[0].patches, b.axes[0].patches
    assert dog_a.get_edgecolor()[:3] == pytest.approx(dog_b.get_edgecolor()[:3])
    assert dog_a.get_edgecolor()[:3] == pytest.approx(rgb(DOG))
    assert cat_a.get_edgecolor()[:3] == pytest.approx(rgb(CAT))
    assert not np.allclose(dog_a.get_edgecolor()[:3], cat_a.get_edgecolor()[:3])


# --- images and boxes -------------------------------------------------------------------------
def test_to_image_converts_float_arrays_and_tensors_to_uint8_hwc():
    u8 = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(to_image(u8), u8)
    f = np.array([[[0.0, 0.5, 1.0], [-1.0, 2.0, 0.25]]])  # out of range values are clipped
    np.testing.assert_array_equal(to_image(f), [[[0, 128, 255], [0, 255, 64]]])
    t = torch.zeros(3, 4, 5)
    t[0] = 1.0  # red
    out = to_image(t)
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    assert (out[..., 0] == 255).all() and (out[..., 1:] == 0).all()
    np.testing.assert_array_equal(to_image(t[None]), out)  # a batch of one
    np.testing.assert_array_equal(to_image(np.full((4, 5), 7, np.uint8)), np.full((4, 5, 3), 7, np.uint8))
    rgba = np.zeros((2, 2, 4), np.uint8)
    assert to_image(rgba).shape == (2, 2, 3)


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 8, 8), torch.zeros(5, 8, 8), np.zeros((8, 8, 2)),
                                 np.zeros((8, 8, 3), np.int32)])
def test_to_image_rejects_what_is_not_an_image(bad):
    with pytest.raises(ValueError):
        to_image(bad)


def test_draw_boxes_draws_each_box_with_its_label_and_truth_dashed_white():
    fig = assert_figure(draw_boxes(grey(), [[10, 20, 40, 60, 0.87, DOG]], truth=[[5, 5, 30, 30, CAT]],
                                   title="one dog"))
    ax = fig.axes[0]
    truth, det = ax.patches  # truth first, under the detections
    assert isinstance(det, Rectangle)
    assert det.get_xy() == (10, 20) and det.get_width() == 30 and det.get_height() == 40
    assert det.get_linestyle() == "-"
    assert truth.get_linestyle() == "--" and truth.get_edgecolor()[:3] == (1.0, 1.0, 1.0)
    assert [t.get_text() for t in ax.texts] == ["dog 0.87"]  # truth carries no label
    assert ax.get_title() == "one dog"


def test_draw_boxes_labels_by_box_kind_and_draws_into_a_given_axes():
    fig = Figure()
    ax = fig.add_subplot()
    out = draw_boxes(grey(), [[10, 10, 30, 30, CAR]], ax=ax)  # ground truth [K,5]: name, no score
    assert out is fig
    assert [t.get_text() for t in ax.texts] == ["car"]
    fig2 = assert_figure(draw_boxes(grey(), [[10, 10, 30, 30]]))  # bare [K,4]: box only
    assert len(fig2.axes[0].patches) == 1 and len(fig2.axes[0].texts) == 0
    fig3 = assert_figure(draw_boxes(grey(), [[10, 10, 30, 30, 0.5, 3]], class_names=None))
    assert [t.get_text() for t in fig3.axes[0].texts] == ["3 0.50"]
    with pytest.raises(ValueError):
        draw_boxes(grey(), [[1, 2, 3]])


def test_annotate_draws_on_a_copy_and_returns_same_size_uint8():
    img = grey()
    before = img.copy()
    out = annotate(img, [[20, 20, 80, 80, 0.9, DOG]])
    np.testing.assert_array_equal(img, before)  # the caller's array is untouched
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert not np.shares_memory(out, img)
    dog = tuple(round(v * 255) for v in rgb(DOG))
    assert tuple(out[80, 50]) == dog and tuple(out[50, 20]) == dog  # on the outline, in the class colour
    assert tuple(out[50, 50]) == (128, 128, 128)  # the inside is not filled
    assert tuple(out[95, 95]) == (128, 128, 128)  # far from the box: untouched
    assert (out[:20, 20:40] != 128).any()  # the label sits above the box


def test_annotate_accepts_tensors_and_empty_detections():
    t = torch.full((3, 64, 96), 0.5)
    out = annotate(t, torch.zeros(0, 6))
    assert out.shape == (64, 96, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, to_image(t))  # nothing to draw: the image itself


def test_annotate_highlight_draws_the_chosen_box_thicker():
    dets = [[10, 10, 40, 40, 0.9, DOG], [55, 55, 90, 90, 0.8, DOG]]
    plain = annotate(grey(), dets, class_names=None, line_width=4)
    high = annotate(grey(), dets, class_names=None, line_width=4, highlight=0)

    def changed(img, x1, x2):
        return int((img[x1:x2, x1:x2] != 128).any(-1).sum())

    assert changed(high, 5, 45) > changed(plain, 5, 45)  # the highlighted box: thicker
    assert changed(high, 52, 95) < changed(plain, 52, 95)  # the others: thinner


# --- the model on examples --------------------------------------------------------------------
def test_plot_examples_leaks_no_figure_when_called_repeatedly(model):
    shown = detect_examples(model, torch.rand(2, 3, 64, 64), n=2)
    refs = []
    for _ in range(3):
        fig = plot_examples(shown.images, shown.detections, shown.truths)
        assert plt.get_fignums() == []
        refs.append(weakref.ref(fig))
        del fig
    gc.collect()
    assert all(r() is None for r in refs)  # nothing holds on to the old figures


def test_plot_examples_draws_one_panel_per_image_and_the_truth_of_a_collated_batch(model):
    images = torch.rand(3, 3, 64, 64)
    boxes = torch.tensor([[0, DOG, 0.5, 0.5, 0.5, 0.5], [2, CAT, 0.25, 0.25, 0.25, 0.25],
                          [2, CAR, 0.75, 0.75, 0.25, 0.25]])
    ex = detect_examples(model, Batch(images, boxes), n=3, conf_threshold=1.0)
    fig = assert_figure(plot_examples(ex.images, ex.detections, ex.truths, ncols=2, conf_threshold=1.0))
    assert len(fig.axes) == 4  # 2 x 2 grid, the fourth panel blank
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 3
    # conf_threshold 1.0: no detections, so the patches are the dashed ground truth of each image
    assert [len(ax.patches) for ax in shown] == [1, 0, 2]
    assert all(p.get_linestyle() == "--" for ax in shown for p in ax.patches)
    np.testing.assert_allclose(shown[0].patches[0].get_xy(), (16, 16))
    assert shown[0].get_title() == "0 detections (score > 1)"


def test_detect_examples_restores_the_training_mode_and_takes_a_dataset(model, voc):
    model.train()
    try:
        ex = detect_examples(model, PlainDataset(voc, "trainval", 64), n=2)
        assert model.training
    finally:
        model.eval()
    fig = assert_figure(plot_examples(ex.images, ex.detections, ex.truths))
    assert len([ax for ax in fig.axes if ax.images]) == 2
    ex = detect_examples(model, torch.rand(3, 64, 64), n=4)  # one image, no truth
    assert ex.truths == [None] and model.training is False
    assert len(plot_examples(ex.images, ex.detections, ex.truths).axes) == 1


# --- CAMs -------------------------------------------------------------------------------------
def test_overlay_returns_uint8_of_the_image_shape_and_follows_the_cam():
    img = grey(32, 48)
    zero = overlay(img, np.zeros((32, 48)))
    one = overlay(img, np.ones((32, 48)))
    assert zero.dtype == np.uint8 and zero.shape == img.shape
    assert one.dtype == np.uint8 and one.shape == img.shape
    assert not np.array_equal(zero, one)
    # JET: cold (0) is blue, hot (1) is red
    assert one[..., 0].mean() > zero[..., 0].mean() and zero[..., 2].mean() > one[..., 2].mean()


def test_overlay_resizes_a_smaller_cam_to_the_image():
    img = grey(32, 48)
    cam = np.zeros((4, 6), np.float32)
    cam[:, :3] = 1.0  # hot on the left half
    out = overlay(torch.full((3, 32, 48), 0.5), cam)
    assert out.shape == img.shape
    assert out[:, :16, 0].mean() > out[:, 32:, 0].mean()


def test_plot_cam_overlays_shows_one_titled_panel_per_detection():
    dets = np.array([[4, 4, 20, 20, 0.9, DOG], [30, 10, 60, 30, 0.6, CAT], [0, 0, 10, 10, 0.5, CAR]])
    cams = np.random.default_rng(0).random((3, 8, 16)).astype(np.float32)  # any size: resized
    fig = assert_figure(plot_cam_overlays(grey(32, 64), cams, dets, ncols=2, method="gradcam"))
    assert len(fig.axes) == 4
    shown = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in shown] == ["dog 0.90 (gradcam)", "cat 0.60 (gradcam)", "car 0.50 (gradcam)"]
    assert all(ax.images[0].get_array().shape[:2] == (32, 64) for ax in shown)
    assert shown[1].patches[0].get_edgecolor()[:3] == pytest.approx(rgb(CAT))


def test_plot_cam_overlays_with_no_detections_says_so_and_rejects_a_count_mismatch():
    fig = assert_figure(plot_cam_overlays(grey(32, 32), np.zeros((0, 32, 32)), np.zeros((0, 6))))
    assert [t.get_text() for t in fig.axes[0].texts] == ["no detections"]
    with pytest.raises(ValueError, match="one"):
        plot_cam_overlays(grey(32, 32), np.zeros((2, 32, 32)), np.zeros((1, 6)))


# --- learning rate ----------------------------------------------------------------------------
def test_plot_lr_finder_plots_loss_on_a_log_axis_and_marks_the_suggestion():
    lrs = np.logspace(-6, 0, 13)
    losses = np.linspace(5, 1, 13)
    fig = assert_figure(plot_lr_finder(lrs, losses, suggestion=1e-3))
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    curve, vline, point = ax.lines
    np.testing.assert_allclose(curve.get_xdata(), lrs)
    np.testing.assert_allclose(curve.get_ydata(), losses)
    np.testing.assert_allclose(vline.get_xdata(), [1e-3, 1e-3])  # a vertical line at the suggestion
    np.testing.assert_allclose(point.get_xdata(), [1e-3])
    np.testing.assert_allclose(point.get_ydata(), [np.interp(-3, np.log10(lrs), losses)])  # on the curve
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["suggested 1.00e-03"]


def test_plot_lr_finder_trims_the_ends_and_marks_nothing_without_a_suggestion():
    lrs, losses = np.logspace(-5, -1, 10), np.arange(10.0)
    ax = assert_figure(plot_lr_finder(lrs, losses, skip_start=2, skip_end=3)).axes[0]
    assert len(ax.lines) == 1 and ax.get_legend() is None
    np.testing.assert_allclose(ax.lines[0].get_xdata(), lrs[2:7])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), losses[2:7])
    with pytest.raises(ValueError):
        plot_lr_finder(lrs, losses[:-1])


def test_plot_schedule_plots_the_given_lrs_against_the_step():
    lrs = [0.1, 0.3, 0.5, 0.2, 0.05]
    ax = assert_figure(plot_schedule(lrs)).axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), lrs)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), np.arange(5))
    assert [t.get_text() for t in ax.texts] == ["max 5.00e-01 at step 2"]
    with pytest.raises(ValueError):
        plot_schedule([])


def test_plot_schedule_of_a_schedule_marks_its_epochs():
    spec = OneCycleSpec(max_lr=1e-3, epochs=3, steps_per_epoch=10, batch_size=4, dataset_length=40)
    schedule = Schedule(spec, compute_schedule(spec))
    fig = assert_figure(plot_schedule(schedule))
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), schedule.lrs)
    assert "30 steps = 3 epochs x 10" in ax.get_title()
    assert len(ax.child_axes) == 1  # the epoch axis on top
    assert ax.child_axes[0].get_xlabel() == "epoch"


# --- evaluation -------------------------------------------------------------------------------
def test_plot_pr_curves_draws_each_class_curve_titled_with_its_ap():
    # dog: one hit and one miss at lower score (AP 1 at recall 1); cat: a false positive ranked above a hit
    dets = [torch.tensor([[0, 0, 10, 10, 0.9, DOG], [20, 20, 30, 30, 0.4, DOG],
                          [50, 50, 60, 60, 0.8, CAT], [40, 40, 50, 50, 0.7, CAT]])]
    gts = [{"boxes": torch.tensor([[0, 0, 10, 10], [40, 40, 50, 50]]), "labels": torch.tensor([DOG, CAT])}]
    result = voc_map(dets, gts, method="all")
    fig = assert_figure(plot_pr_curves(result))
    assert len(fig.axes) == 20
    dog, cat, car = fig.axes[DOG], fig.axes[CAT], fig.axes[CAR]
    assert dog.get_title() == "dog  AP 1.00" and cat.get_title() == "cat  AP 0.50"
    np.testing.assert_allclose(dog.lines[0].get_xdata(), result["recall"][DOG])
    np.testing.assert_allclose(dog.lines[0].get_ydata(), result["precision"][DOG])
    np.testing.assert_allclose(cat.lines[0].get_ydata(), [0.0, 0.5])
    assert car.get_title() == "car" and [t.get_text() for t in car.texts] == ["no ground truth"]
    assert fig.get_suptitle() == "mAP@0.5 (all) = 0.750"


def test_plot_pr_curves_takes_precision_recall_pairs_and_rejects_unequal_lists():
    p = [np.array([1.0, 0.5]), np.array([1.0])]
    r = [np.array([0.5, 0.5]), np.array([1.0])]
    fig = assert_figure(plot_pr_curves((p, r), class_names=("a", "b"), ncols=5))
    assert len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["a", "b"]
    with pytest.raises(ValueError):
        plot_pr_curves((p, r[:1]))


METRICS_CSV = """epoch,lr,step,train/loss_epoch,train/loss_step,val/class_acc,val/loss,val/map50
0,0.001,0,,2.5,,,
0,0.002,1,,2.0,,,
0,,1,,,40.0,1.8,0.1
0,,1,2.2,,,,
1,0.003,2,,1.5,,,
1,,3,,,55.0,1.4,0.3
"""


def test_read_metrics_csv_gives_float_columns_with_nan_where_empty(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(METRICS_CSV)
    cols = read_metrics_csv(path)
    assert set(cols) == {"epoch", "lr", "step", "train/loss_epoch", "train/loss_step", "val/class_acc",
                         "val/loss", "val/map50"}
    np.testing.assert_array_equal(cols["step"], [0, 1, 1, 1, 2, 3])
    np.testing.assert_array_equal(cols["val/loss"], [np.nan, np.nan, 1.8, np.nan, np.nan, 1.4])
    (tmp_path / "empty.csv").write_text("epoch,step\n")
    with pytest.raises(ValueError, match="no rows"):
        read_metrics_csv(tmp_path / "empty.csv")


def test_plot_training_curves_shows_a_panel_per_logged_group(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(METRICS_CSV)
    fig = assert_figure(plot_training_curves(path))
    titles = [ax.get_title() for ax in visible_axes(fig)]
    assert titles == ["loss", "accuracy (%)", "mAP", "learning rate"]
    loss = visible_axes(fig)[0]
    assert [line.get_label() for line in loss.lines] == ["train/loss_step", "train/loss_epoch", "val/loss"]
    np.testing.assert_array_equal(loss.lines[2].get_xdata(), [1, 3])  # NaN rows dropped
    np.testing.assert_array_equal(loss.lines[2].get_ydata(), [1.8, 1.4])
    assert loss.get_yscale() == "log"  # all losses positive


def test_plot_training_curves_from_a_dict_skips_groups_never_logged():
    fig = assert_figure(plot_training_curves({"step": [0, 1, 2], "lr": [1e-3, 2e-3, np.nan]}))
    assert [ax.get_title() for ax in visible_axes(fig)] == ["learning rate"]
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_xdata(), [0, 1])
    with pytest.raises(ValueError, match="step"):
        plot_training_curves({"lr": [1.0]})
    with pytest.raises(ValueError, match="none of the known"):
        plot_training_curves({"step": [0], "other": [1.0]})


# --- mistakes ---------------------------------------------------------------------------------
def mistake_case():
    """Image 0: a dog found; a car detected with high score where there is none (false positive);
    a large cat and a small dog missed; a difficult cat missed (not a mistake); a low-score false
    positive below the threshold (not reported). Image 1: a duplicate of a found dog."""
    dets = [
        torch.tensor([[0, 0, 20, 20, 0.80, DOG], [40, 0, 60, 20, 0.95, CAR], [0, 40, 10, 50, 0.10, CAR]]),
        torch.tensor([[0, 0, 30, 30, 0.90, DOG], [1, 1, 30, 30, 0.60, DOG]]),
    ]
    gts = [
        {"boxes": torch.tensor([[0, 0, 20, 20], [20, 24, 64, 64], [50, 50, 58, 58], [30, 30, 40, 40]]),
         "labels": torch.tensor([DOG, CAT, DOG, CAT]), "difficult": torch.tensor([False, False, False, True])},
        {"boxes": torch.tensor([[0, 0, 30, 30]]), "labels": torch.tensor([DOG])},
    ]
    return dets, gts


def test_find_mistakes_reports_high_score_false_positives_then_missed_objects_largest_first():
    dets, gts = mistake_case()
    mistakes = find_mistakes(dets, gts, conf_threshold=0.3)
    summary = [(m["kind"], m["image"], m["class"], m["score"]) for m in mistakes]
    assert summary == [
        ("false positive", 0, CAR, pytest.approx(0.95)),
        ("false positive", 1, DOG, pytest.approx(0.60)),  # the duplicate
        ("missed", 0, CAT, None),  # 44x40: the larger miss first
        ("missed", 0, DOG, None),  # 8x8
    ]
    np.testing.assert_allclose(mistakes[0]["box"], [40, 0, 60, 20])
    np.testing.assert_allclose(mistakes[2]["box"], [20, 24, 64, 64])


def test_find_mistakes_keeps_k_of_each_kind_and_honours_the_threshold():
    dets, gts = mistake_case()
    top = find_mistakes(dets, gts, conf_threshold=0.3, k=1)
    assert [(m["kind"], m["class"]) for m in top] == [("false positive", CAR), ("missed", CAT)]
    low = find_mistakes(dets, gts, conf_threshold=0.05)
    assert (0, CAR, pytest.approx(0.10)) in [(m["image"], m["class"], m["score"]) for m in low]
    # at 0.85 the found dog of image 0 no longer counts: it becomes a miss too
    high = find_mistakes(dets, gts, conf_threshold=0.85)
    assert [m["class"] for m in high if m["kind"] == "missed" and m["image"] == 0] == [CAT, DOG, DOG]


def test_plot_worst_mistakes_shows_one_panel_per_mistake(model):
    dets, gts = mistake_case()
    mistakes = find_mistakes(dets, gts, conf_threshold=0.3)
    images = torch.rand(2, 3, 64, 64)
    fig = assert_figure(plot_worst_mistakes(images, mistakes, mistake_cams(model, images, mistakes), ncols=3))
    assert len(fig.axes) == 6  # 2 rows x 3 columns, 4 panels used
    shown = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in shown] == ["false positive: car 0.95", "false positive: dog 0.60",
                                                "missed: cat (evidence against)", "missed: dog (evidence against)"]
    assert all(ax.images[0].get_array().shape[:2] == (64, 64) for ax in shown)
    fp, miss = shown[0].patches[0], shown[2].patches[0]
    assert fp.get_linestyle() == "-" and fp.get_edgecolor()[:3] == (1.0, 0.0, 0.0)
    assert miss.get_linestyle() == "--" and miss.get_edgecolor()[:3] == (1.0, 1.0, 0.0)


def sure_person_model() -> YOLOv3:
    """A tiny random model whose head biases make every cell a confident 'person' (objectness
    sigmoid(6) ~ 0.998, class softmax ~ 0.89): detections are certain whatever the image."""
    from helpers.model import ScalePrediction

    torch.manual_seed(0)
    person = VOC_CLASSES.index("person")
    model = YOLOv3(num_classes=20, width=0.125).eval()
    with torch.no_grad():
        for head in (m for m in model.layers if isinstance(m, ScalePrediction)):
            bias = head.pred[1].conv.bias.view(3, 25)
            bias[:, 0], bias[:, 5 + person] = 6.0, 5.0
    return model


def test_mistakes_on_finds_confident_wrong_detections_and_the_objects_they_missed():
    """A model made to see a confident 'person' everywhere, on images holding only dogs: every
    detection is a false positive and every dog is missed, larger first."""
    sure, person = sure_person_model(), VOC_CLASSES.index("person")
    images = torch.rand(2, 3, 64, 64)
    boxes = torch.tensor([[0, DOG, 0.5, 0.5, 0.5, 0.5], [1, DOG, 0.25, 0.25, 0.25, 0.25]])
    shown, mistakes = mistakes_on(sure, Batch(images, boxes), n=2, conf_threshold=0.5, k=3)
    assert torch.equal(shown, images)
    kinds = [(m["kind"], m["class"]) for m in mistakes]
    assert kinds == [("false positive", person)] * 3 + [("missed", DOG)] * 2
    assert all(m["score"] > 0.8 for m in mistakes[:3])
    np.testing.assert_allclose(mistakes[3]["box"], [16, 16, 48, 48])  # the 32x32 dog before the 16x16 one
    assert (mistakes[4]["image"], mistakes[3]["image"]) == (1, 0)


def test_worst_mistakes_explain_false_positives_at_the_row_detect_gave_and_ignore_difficult_objects(monkeypatch):
    """With a plain dataset's letterbox meta, a detection of a difficult object is not a mistake; a
    false positive carries its raw-output row, so the gallery need not search for it again."""
    import helpers.analysis as analysis

    sure, person = sure_person_model(), VOC_CLASSES.index("person")
    images = torch.rand(1, 3, 64, 64)
    without = mistakes_on(sure, images, n=1, conf_threshold=0.5, k=1000)[1]
    assert without and all(m["kind"] == "false positive" and isinstance(m["row"], int) for m in without)
    # The same image, its stored version twice as large, with one difficult person where the best
    # detection is: that detection is then neither right nor wrong, so one false positive fewer.
    box = torch.as_tensor(without[0]["box"]) / 0.5
    meta = {"letterbox": Letterbox(scale=0.5, pad_left=0, pad_top=0, orig_h=128, orig_w=128),
            "gt": {"boxes": box[None], "labels": torch.tensor([person]), "difficult": torch.tensor([True])}}
    _, mistakes = mistakes_on(sure, [(images[0], torch.zeros(0, 5), meta)], n=1, conf_threshold=0.5, k=1000)
    assert len(mistakes) == len(without) - 1
    assert all(m["kind"] == "false positive" for m in mistakes)  # a difficult object is never "missed"
    monkeypatch.setattr(analysis, "locate_detections", lambda *a, **k: pytest.fail("rows were given"))
    cams = mistake_cams(sure, images, without[:2])
    assert len(cams) == 2 and all(c.shape == (64, 64) for c in cams)
    assert_figure(plot_worst_mistakes(images, without[:2], cams))


def test_show_saves_the_figure_under_its_name_and_displays_nothing_twice(tmp_path):
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    assert show(fig, "curve", tmp_path / "images") is None
    assert (tmp_path / "images" / "curve.png").stat().st_size > 0
    show(fig)  # no folder: nothing written
    assert [p.name for p in tmp_path.rglob("*.png")] == ["curve.png"]
    assert plt.get_fignums() == []


def test_show_saved_copies_a_written_png_under_its_name(tmp_path):
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "lr_finder.png")
    assert show_saved(tmp_path / "lr_finder.png", "lr", tmp_path / "images") is None
    assert (tmp_path / "images" / "lr.png").read_bytes() == (tmp_path / "lr_finder.png").read_bytes()


def test_plot_worst_mistakes_without_mistakes_says_so():
    fig = assert_figure(plot_worst_mistakes(torch.rand(1, 3, 64, 64), [], []))
    assert [t.get_text() for t in fig.axes[0].texts] == ["no mistakes above the threshold"]


def test_plotting_in_a_loop_never_registers_a_pyplot_figure():
    """The issue's contract in one place: none of the figure builders goes through pyplot."""
    for _ in range(2):
        draw_boxes(grey(), [[1, 1, 9, 9, 0.5, 0]])
        plot_lr_finder([1e-4, 1e-3, 1e-2], [3.0, 2.0, 4.0], suggestion=1e-3)
        plot_schedule([0.1, 0.2])
        plot_pr_curves(([np.ones(1)], [np.ones(1)]), class_names=("a",))
        plot_training_curves({"step": [0, 1], "lr": [0.1, 0.2]})
        plot_cam_overlays(grey(32, 32), np.zeros((1, 32, 32)), np.array([[1, 1, 9, 9, 0.5, 0]]))
        plot_examples(torch.rand(1, 3, 64, 64), [torch.tensor([[1, 1, 9, 9, 0.5, 0]])])
    assert plt.get_fignums() == []
