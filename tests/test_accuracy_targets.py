"""The course's graded accuracies are judged against their targets wherever a result is shown: one
place holds the targets (the config), one function the verdict, and the progress bar, the per-epoch
line, the curves, metrics.json and the evaluate report all use them."""

import numpy as np
import torch

from helpers.config import FULL_MODEL_TARGETS, REDUCED_MODEL_TARGETS, Config, ModelConfig
from helpers.evaluate import build_evaluator, format_report
from helpers.metrics import judge_accuracies, verdict_sentence
from helpers.plotting import plot_training_curves
from helpers.progress import accuracy_items
from helpers.targets import build_targets


def test_the_full_model_is_judged_by_80_98_78_and_a_narrower_one_by_75_95_70():
    assert (FULL_MODEL_TARGETS.class_acc, FULL_MODEL_TARGETS.noobj_acc, FULL_MODEL_TARGETS.obj_acc) == (80, 98, 78)
    assert (REDUCED_MODEL_TARGETS.class_acc, REDUCED_MODEL_TARGETS.noobj_acc, REDUCED_MODEL_TARGETS.obj_acc) == (75, 95, 70)
    assert ModelConfig().accuracy_targets == FULL_MODEL_TARGETS
    assert ModelConfig(width=0.5).accuracy_targets == REDUCED_MODEL_TARGETS


def test_the_verdict_passes_all_three_or_names_each_miss_and_by_how_much():
    passing = verdict_sentence(judge_accuracies({"class_acc": 81, "noobj_acc": 98.0, "obj_acc": 90}, FULL_MODEL_TARGETS))
    assert passing.startswith("passes all three") and "no-object 98.0% (target 98)" in passing
    missing = verdict_sentence(judge_accuracies({"class_acc": 92.5, "noobj_acc": 79.5, "obj_acc": 64.9},
                                                FULL_MODEL_TARGETS))
    assert missing == ("misses 2 of 3 course targets: no-object 79.5% misses 98 by 18.5 points; "
                       "object 64.9% misses 78 by 13.1 points")
    assert "\n" not in missing


def test_an_accuracy_that_was_not_scored_is_a_miss_never_a_pass():
    checks = judge_accuracies({"class_acc": 99.0, "noobj_acc": None, "obj_acc": 99.0}, FULL_MODEL_TARGETS)
    assert [c.passed for c in checks] == [True, False, True]
    assert "no-object not scored" in verdict_sentence(checks)
    assert verdict_sentence(judge_accuracies({}, FULL_MODEL_TARGETS)) == "the course accuracies were not scored"


def test_the_progress_bar_shows_each_accuracy_against_its_target():
    items = accuracy_items({"val/class_acc": 81.24, "val/noobj_acc": 97.0, "val/loss": 3.0}, FULL_MODEL_TARGETS)
    assert items == {"cls": "81.2/80✓", "noobj": "97.0/98✗"}


def test_the_evaluator_judges_a_run_by_its_models_targets():
    cfg = Config(model=ModelConfig(width=0.25))
    evaluator = build_evaluator(cfg)
    evaluator.reset(accuracy=True, detections=False)
    boxes = torch.tensor([[0, 3, 0.5, 0.5, 0.3, 0.3]])
    targets = build_targets(boxes, 1, 64)
    outputs = [torch.full((1, 3, 64 // s, 64 // s, 25), -10.0) for s in (32, 16, 8)]  # "nothing" everywhere
    evaluator.accuracy.update(outputs, targets)
    result = evaluator.compute()
    judged = result["accuracy_targets"]
    assert judged["noobj_acc"] == {"value": 100.0, "target": 95.0, "passed": True}
    assert judged["obj_acc"] == {"value": 0.0, "target": 70.0, "passed": False}
    assert result["verdict"].startswith("misses") and "object 0.0% misses 70 by 70.0 points" in result["verdict"]


def test_the_evaluate_report_shows_value_target_and_pass_and_ends_with_the_verdict():
    checks = judge_accuracies({"class_acc": 85.0, "noobj_acc": 97.5, "obj_acc": 80.0}, FULL_MODEL_TARGETS)
    result = {"images": 2, "skipped": 0, "ground_truths": 3, "difficult": 0, "detections": 5,
              "class_acc": 85.0, "noobj_acc": 97.5, "obj_acc": 80.0, "per_class": [], "settings": {"map_iou": 0.5},
              "map50_voc07": 0.5, "map50_all": 0.5, "coco": None,
              "accuracy_targets": {c.name: c.as_dict() for c in checks}, "verdict": verdict_sentence(checks)}
    lines = format_report(result).splitlines()
    assert any(line.split()[:4] == ["no-object", "97.50", "%", "98"] and line.endswith("MISS") for line in lines)
    assert any(line.startswith("class") and line.endswith("pass") for line in lines)
    assert lines[-1] == "Misses 1 of 3 course targets: no-object 97.5% misses 98 by 0.5 points."


def test_training_curves_draw_each_target_as_a_dashed_line_of_its_accuracys_colour():
    metrics = {"step": [10, 20, 30], "val/class_acc": [40.0, 60.0, 85.0], "val/noobj_acc": [90.0, 95.0, 99.0],
               "val/obj_acc": [50.0, np.nan, 70.0]}
    fig = plot_training_curves(metrics, targets=FULL_MODEL_TARGETS)
    ax = next(a for a in fig.axes if a.get_title() == "accuracy (%)")
    curves = {line.get_label(): line for line in ax.get_lines() if line.get_linestyle() == "-"}
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert sorted(float(line.get_ydata()[0]) for line in dashed) == [78.0, 80.0, 98.0]
    for line in dashed:
        name = {80.0: "val/class_acc", 98.0: "val/noobj_acc", 78.0: "val/obj_acc"}[float(line.get_ydata()[0])]
        assert line.get_color() == curves[name].get_color()
    without = plot_training_curves(metrics)  # no targets given: no dashed lines
    assert not [line for a in without.axes for line in a.get_lines() if line.get_linestyle() == "--"]
