"""What the app shows at its old fixed confidence threshold (0.4) and at the bundle's own one.

For a bundle (default: the one the repository ships, `app/bundle`): its recorded `display_conf`, where
it came from, the F1 figures export measured, and per sample image (app/examples) the boxes the page
shows at each threshold, through the app's own `predict_boxes` at the page's default input size. For
a generated shapes sample, its objects are read from the generated set it was copied from (the
bundle's seed), and each box is marked right (+) or wrong (-) by the VOC matching at IoU 0.5.

    python -m benchmarks.display_conf [--bundle app/bundle] [--old 0.4]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[0:1] = [str(ROOT)]  # this file's folder first on the path would make `app` this script

from app import app as webapp  # noqa: E402
from helpers.annotations import load_records  # noqa: E402
from helpers.metrics import match_detections  # noqa: E402


def generated_truths(loaded, seed: int) -> dict[str, dict]:
    """The objects of the generated test images, by image id (the samples are copies of some)."""
    if loaded.info["config"]["data"].get("root") is not None:
        return {}
    from helpers.datamodule import synthetic_root

    records = load_records(synthetic_root(seed), "test", tuple(loaded.classes))
    return {r.image_path.stem: {"boxes": torch.as_tensor(r.boxes, dtype=torch.float32).reshape(-1, 4),
                                "labels": torch.as_tensor(r.labels).long(),
                                "difficult": torch.as_tensor(r.difficult).bool()} for r in records}


def shown(loaded, path: Path, conf: float, size: int, truth: dict | None) -> str:
    result, _ = webapp.predict_boxes(loaded, str(path), conf, webapp.DEFAULT_IOU, size, "Grad-CAM", 0)
    dets = result.detections
    names = [loaded.classes[int(c)] for c in dets[:, 5].tolist()] if dets is not None else []
    if truth is None or dets is None:
        return f"{len(names)}: {', '.join(names) or '-'}"
    # the upload's pixels are the stored image's (no downscale for these small files)
    order, _, _, tp, _, _ = match_detections([dets], [truth], 0.5, len(loaded.classes))
    right = dict(zip(order.tolist(), tp.tolist()))
    marked = [f"{n}{'+' if right.get(i) else '-'}" for i, n in enumerate(names)]
    return f"{len(names)} ({sum(right.values())} right): {', '.join(marked) or '-'}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=str(ROOT / "app" / "bundle"))
    p.add_argument("--samples", default=str(ROOT / "app" / "examples"))
    p.add_argument("--old", type=float, default=0.4, help="the threshold the app used to start at")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    loaded, status = webapp.load_source(args.bundle)
    if loaded is None:
        raise SystemExit(status)
    conf, source = loaded.display_conf
    size = loaded.info["image_size"]
    print(f"bundle {args.bundle}: display_conf {conf:g} ({source})")
    measured = loaded.info.get("display_conf_measured")
    if measured:
        d = measured["at_default"]
        print(f"  on {measured['split']} ({measured['images']} images, {measured['objects']} objects): "
              f"F1 {measured['f1']:.3f} P {measured['precision']:.3f} R {measured['recall']:.3f}, "
              f"{measured['boxes_per_image']:.2f} boxes/image at {conf:g}; F1 {d['f1']:.3f} P {d['precision']:.3f} "
              f"R {d['recall']:.3f}, {d['boxes_per_image']:.2f} boxes/image at {d['conf']:g}")
    truths = generated_truths(loaded, loaded.config.train.seed)
    print(f"\nboxes the page shows at input {size} (NMS IoU {webapp.DEFAULT_IOU:g}); + right, - wrong at IoU 0.5")
    print(f"| sample | objects | at {args.old:g} | at {conf:g} |\n|---|---|---|---|")
    for path in webapp.sample_images(args.samples, generated_first=True):
        path = Path(path)
        truth = truths.get(path.stem.removeprefix(webapp.GENERATED_SAMPLE))
        objects = ", ".join(loaded.classes[int(c)] for c in truth["labels"].tolist()) if truth else "(a photo)"
        print(f"| {path.name} | {objects} | {shown(loaded, path, args.old, size, truth)} "
              f"| {shown(loaded, path, conf, size, truth)} |")


if __name__ == "__main__":
    main()
