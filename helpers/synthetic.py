"""Small synthetic detection datasets in both supported layouts, for tests and the embedded default.

Each image is a noisy background with a few coloured shapes; each VOC class has its own colour and
shape (so a small model can learn them in minutes), and every box is known exactly. Some objects
are marked difficult and a few images are empty (valid background images). Deterministic per seed.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from xml.etree import ElementTree as ET

import cv2
import numpy as np

from .config import VOC_CLASSES

SHAPES = ("rectangle", "ellipse", "triangle", "cross")


def class_style(c: int) -> tuple[tuple[int, int, int], str]:
    """A distinct colour (RGB) and shape for class c."""
    hue = int(180 * (c * 7 % 20) / 20)
    hsv = np.uint8([[[hue, 220, 230 if c % 2 else 170]]])
    rgb = tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])
    return rgb, SHAPES[c % len(SHAPES)]


def _draw(img: np.ndarray, cls: int, x1: int, y1: int, x2: int, y2: int) -> None:
    color, shape = class_style(cls)
    if shape == "rectangle":
        cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), color, -1)
    elif shape == "ellipse":
        cv2.ellipse(img, (((x1 + x2) / 2, (y1 + y2) / 2), (x2 - x1, y2 - y1), 0), color, -1)
    elif shape == "triangle":
        pts = np.array([[(x1 + x2) // 2, y1], [x1, y2 - 1], [x2 - 1, y2 - 1]], np.int32)
        cv2.fillPoly(img, [pts], color)
    else:
        tw, th = max(1, (x2 - x1) // 3), max(1, (y2 - y1) // 3)
        cv2.rectangle(img, (x1 + tw, y1), (x2 - 1 - tw, y2 - 1), color, -1)
        cv2.rectangle(img, (x1, y1 + th), (x2 - 1, y2 - 1 - th), color, -1)


def make_image(rng: np.random.Generator, width: int, height: int, classes: int, max_objects: int = 4,
               empty: bool = False):
    """(RGB uint8 [H,W,3], boxes [n,4] x1,y1,x2,y2 pixels (0-based, exclusive end), labels [n], difficult [n]).

    Objects overlap little (IoU <= 0.2 with those already drawn), so a later shape never hides most
    of an earlier one and every box shows its object.
    """
    base = rng.integers(20, 90, size=3)
    img = np.clip(rng.normal(0, 12, (height, width, 3)) + base, 0, 255).astype(np.uint8)
    boxes, labels, difficult = [], [], []
    n = 0 if empty else int(rng.integers(1, max_objects + 1))
    side = min(width, height)
    for _ in range(n):
        for _attempt in range(10):
            w = int(rng.integers(max(6, side // 8), max(7, side // 2)))
            h = int(np.clip(w * rng.uniform(0.6, 1.6), 6, height - 1))
            x1, y1 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            box = np.array([x1, y1, x1 + w, y1 + h], np.float32)
            if not boxes or _iou(box, np.array(boxes, np.float32)).max() <= 0.2:
                break
        else:
            continue  # no room left for another object
        c = int(rng.integers(0, classes))
        _draw(img, c, x1, y1, x1 + w, y1 + h)
        boxes.append(box)
        labels.append(c)
        difficult.append(bool(rng.random() < 0.05))
    return img, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64), np.array(difficult, bool)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one box [4] with others [n, 4]."""
    lt, rb = np.maximum(box[:2], others[:, :2]), np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), 1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(others) - inter)


def _voc_xml(filename: str, width: int, height: int, boxes, labels, difficult, classes) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = filename
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "synthetic shapes (helpers.synthetic)"
    size = ET.SubElement(root, "size")
    for k, v in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, k).text = str(v)
    ET.SubElement(root, "segmented").text = "0"
    for (x1, y1, x2, y2), c, d in zip(boxes, labels, difficult):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = classes[c]
        ET.SubElement(obj, "pose").text = "Unspecified"
        touches = x1 <= 0 or y1 <= 0 or x2 >= width or y2 >= height
        ET.SubElement(obj, "truncated").text = str(int(touches))
        ET.SubElement(obj, "difficult").text = str(int(d))
        bb = ET.SubElement(obj, "bndbox")
        # VOC: 1-based inclusive pixel coordinates.
        for k, v in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bb, k).text = str(int(v))
    return ET.tostring(root)


def make_voc_dataset(root: str | os.PathLike, n_trainval: int = 64, n_test: int = 16,
                     image_size: tuple[int, int] = (128, 96), seed: int = 0,
                     classes: tuple[str, ...] = VOC_CLASSES) -> Path:
    """Write `root/VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main}`; returns the VOCdevkit path."""
    rng = np.random.default_rng(seed)
    voc = Path(root) / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"{i:06d}" for i in range(n_trainval + n_test)]
    width, height = image_size
    for k, image_id in enumerate(ids):
        img, boxes, labels, difficult = make_image(rng, width, height, len(classes), empty=(k % 17 == 5))
        cv2.imwrite(str(voc / "JPEGImages" / f"{image_id}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        (voc / "Annotations" / f"{image_id}.xml").write_bytes(
            _voc_xml(f"{image_id}.jpg", width, height, boxes, labels, difficult, classes))
    trainval, test = ids[:n_trainval], ids[n_trainval:]
    half = len(trainval) // 2
    for name, split in (("trainval", trainval), ("train", trainval[:half]), ("val", trainval[half:]),
                        ("test", test)):
        (voc / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in split))
    return Path(root) / "VOCdevkit"


def make_course_dataset(root: str | os.PathLike, n_train: int = 64, n_test: int = 16,
                        image_size: tuple[int, int] = (128, 96), seed: int = 0,
                        classes: tuple[str, ...] = VOC_CLASSES) -> Path:
    """Write the course/Kaggle layout: images/, labels/ (class cx cy w h, 6 digits), train.csv, test.csv,
    100examples.csv; returns `root`."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    width, height = image_size
    rows = []
    for k in range(n_train + n_test):
        name = f"{k:06d}"
        img, boxes, labels, _ = make_image(rng, width, height, len(classes), empty=(k % 17 == 5))
        cv2.imwrite(str(root / "images" / f"{name}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        lines = []
        for (x1, y1, x2, y2), c in zip(boxes, labels):
            cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
            lines.append(f"{c} {cx:.6f} {cy:.6f} {(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}\n")
        (root / "labels" / f"{name}.txt").write_text("".join(lines))
        rows.append((f"{name}.jpg", f"{name}.txt"))
    for fname, part in (("train.csv", rows[:n_train]), ("test.csv", rows[n_train:]), ("100examples.csv", rows[:100])):
        with open(root / fname, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "text"])
            w.writerows(part)
    return root
