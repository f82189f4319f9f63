"""Read a dataset into records: VOCdevkit XML or the course's Kaggle CSV + YOLO-txt layout.

A `Record` is one image: its path, boxes in pixels (x1, y1, x2, y2, 0-based, continuous: VOC's
1-based inclusive `xmin` becomes `xmin - 1`, `xmax` stays), class indices and difficult flags.

Layouts, recognised from the folder's contents:
- VOCdevkit: `VOC2007/` and/or `VOC2012/`, each with `Annotations/*.xml`, `JPEGImages/`,
  `ImageSets/Main/<split>.txt`. `root` may be the VOCdevkit folder or one VOC20xx folder.
  For a devkit holding both years, `trainval` is 07+12 trainval and `test` is 07 test.
- course/Kaggle: `images/`, `labels/` (`class cx cy w h` normalised, one object a line),
  `<split>.csv` with columns `image,text` (`train`, `test`, `100examples`).

Problems are reported with the file they concern. Boxes outside the image are clipped with a
warning (the course layout's 6-digit rounding puts edges a hair outside 0..1: those are clipped
silently); zero-area boxes are dropped with a warning; an empty label file is a valid background
image. `python -m helpers.annotations check PATH` lists every problem of a dataset.
"""
from __future__ import annotations

import argparse
import csv
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np

from .config import VOC_CLASSES

ROUNDING_SLACK = 1e-4  # normalised; the course's labels are rounded to 6 digits


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Record:
    image_path: Path
    boxes: np.ndarray  # [n, 4] float32 x1, y1, x2, y2 in pixels
    labels: np.ndarray  # [n] int64
    difficult: np.ndarray  # [n] bool
    width: int | None = None  # from the annotation, when it says
    height: int | None = None
    label_path: Path | None = field(default=None, compare=False)

    def without_difficult(self) -> Record:
        keep = ~self.difficult
        return Record(self.image_path, self.boxes[keep], self.labels[keep], self.difficult[keep],
                      self.width, self.height, self.label_path)


# --- layout detection ---------------------------------------------------------------------------
def detect_layout(root: str | Path) -> str:
    """'voc' or 'course'; a clear error for anything else."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    if _voc_years(root):
        return "voc"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "course"
    raise DatasetError(
        f"{root}: not a dataset folder this project reads. Expected either a VOCdevkit (VOC2007/ and/or "
        "VOC2012/ with Annotations/, JPEGImages/, ImageSets/Main/) or the course/Kaggle layout "
        "(images/, labels/ and train.csv / test.csv with columns image,text).")


def _voc_years(root: Path) -> list[Path]:
    if (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir():
        return [root]
    return [p for p in sorted(root.glob("VOC20*")) if (p / "Annotations").is_dir() and (p / "JPEGImages").is_dir()]


# --- VOC ----------------------------------------------------------------------------------------
def parse_voc_xml(path: Path, classes=VOC_CLASSES) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None, int | None]:
    """(boxes [n,4] 0-based pixels, labels, difficult, width, height) of one VOC annotation file."""
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as e:
        raise DatasetError(f"{path}: malformed XML ({e})") from None
    root = tree.getroot()
    if root.tag != "annotation":
        raise DatasetError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    width = _int_or_none(root.findtext("size/width"))
    height = _int_or_none(root.findtext("size/height"))
    boxes, labels, difficult = [], [], []
    index = {c: i for i, c in enumerate(classes)}
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            raise DatasetError(f"{path}: object {k} has unknown class {name!r} (known: {', '.join(classes)})")
        bb = obj.find("bndbox")
        try:
            xmin, ymin, xmax, ymax = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise DatasetError(f"{path}: object {k} ({name}) has a missing or non-numeric bndbox") from None
        boxes.append([xmin - 1, ymin - 1, xmax, ymax])
        labels.append(index[name])
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    return (np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64),
            np.array(difficult, bool), width, height)


def _int_or_none(text):
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return None


def _voc_split_ids(year: Path, split: str) -> list[str]:
    path = year / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise DatasetError(f"{path}: split list not found (splits here: "
                           f"{sorted(p.stem for p in (year / 'ImageSets' / 'Main').glob('*.txt') if '_' not in p.stem)})")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def load_voc(root: Path, split: str, classes=VOC_CLASSES) -> list[Record]:
    years = _voc_years(root)
    if split == "test" and len(years) > 1:  # the standard protocol: 07 test only
        years = [y for y in years if y.name == "VOC2007"] or years
    records = []
    for year in years:
        if split != "trainval" and not (year / "ImageSets" / "Main" / f"{split}.txt").is_file() and len(years) > 1:
            continue  # e.g. VOC2012 has no public test list
        for image_id in _voc_split_ids(year, split):
            xml = year / "Annotations" / f"{image_id}.xml"
            if not xml.is_file():
                raise DatasetError(f"{xml}: annotation listed in {split}.txt is missing")
            boxes, labels, difficult, w, h = parse_voc_xml(xml, classes)
            image = year / "JPEGImages" / f"{image_id}.jpg"
            records.append(_clean(Record(image, boxes, labels, difficult, w, h, xml), xml))
    return records


# --- course / Kaggle ----------------------------------------------------------------------------
def parse_yolo_txt(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(normalised cx, cy, w, h [n,4], labels [n]); an empty file is a background image."""
    rows, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            c, cx, cy, w, h = int(float(parts[0])), *map(float, parts[1:5])
            if len(parts) != 5:
                raise ValueError
        except (ValueError, IndexError):
            raise DatasetError(f"{path}, line {n}: expected 'class cx cy w h', got {line!r}") from None
        if not 0 <= c < num_classes:
            raise DatasetError(f"{path}, line {n}: class {c} outside 0..{num_classes - 1}")
        rows.append([cx, cy, w, h])
        labels.append(c)
    return np.array(rows, np.float32).reshape(-1, 4), np.array(labels, np.int64)


def load_course(root: Path, split: str, classes=VOC_CLASSES) -> list[Record]:
    csv_path = root / f"{split}.csv"
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: split CSV not found (CSVs here: {sorted(p.stem for p in root.glob('*.csv'))})")
    records = []
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["image", "text"]:
            raise DatasetError(f"{csv_path}: expected a header 'image,text', got {header}")
        for row in reader:
            if not row:
                continue
            image, label = root / "images" / row[0].strip(), root / "labels" / row[1].strip()
            if not label.is_file():
                raise DatasetError(f"{label}: label file listed in {csv_path.name} is missing")
            norm, labels = parse_yolo_txt(label, len(classes))
            records.append(Record(image, norm, labels, np.zeros(len(labels), bool), None, None, label))
    return records


def to_pixels(record: Record, width: int, height: int) -> Record:
    """A course-layout record (normalised cx, cy, w, h) in pixels once the image size is known."""
    if record.width is not None:  # already in pixels
        return record
    cx, cy, w, h = record.boxes.T
    boxes = np.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], 1)
    slack = ROUNDING_SLACK * max(width, height)
    return _clean(Record(record.image_path, boxes.astype(np.float32), record.labels, record.difficult, width, height,
                         record.label_path), record.label_path, quiet_within=slack)


# --- validation ---------------------------------------------------------------------------------
def _clean(record: Record, source, quiet_within: float = 0.0) -> Record:
    """Clip boxes to the image (warn unless within rounding slack), drop zero-area boxes (warn)."""
    if record.width is None or record.height is None or not len(record.boxes):
        return record
    b = record.boxes
    limits = np.array([record.width, record.height, record.width, record.height], np.float32)
    clipped = np.clip(b, 0, limits)
    moved = np.abs(clipped - b).max(initial=0)
    if moved > quiet_within:
        warnings.warn(f"{source}: {int((np.abs(clipped - b) > quiet_within).any(1).sum())} box(es) outside the "
                      f"{record.width}x{record.height} image clipped (by up to {moved:.1f} px)", stacklevel=3)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    if not keep.all():
        warnings.warn(f"{source}: {int((~keep).sum())} box(es) with zero area dropped", stacklevel=3)
    return Record(record.image_path, clipped[keep], record.labels[keep], record.difficult[keep], record.width,
                  record.height, record.label_path)


def load_records(root: str | Path, split: str, classes=VOC_CLASSES) -> list[Record]:
    """Every record of `split` in the dataset at `root` (layout found from its contents)."""
    root = Path(root)
    layout = detect_layout(root)
    return load_voc(root, split, classes) if layout == "voc" else load_course(root, split, classes)


# --- the check command --------------------------------------------------------------------------
def check(root: str | Path, splits: list[str] | None = None, classes=VOC_CLASSES) -> list[str]:
    """Every problem found in the dataset, one line each naming the file; decodes every image."""
    from .imageio import ImageError, read_image

    root = Path(root)
    problems: list[str] = []
    try:
        layout = detect_layout(root)
    except DatasetError as e:
        return [str(e)]
    if splits is None:
        splits = ["trainval", "test"] if layout == "voc" else [p.stem for p in sorted(root.glob("*.csv"))]
    for split in splits:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                records = load_records(root, split, classes)
            except DatasetError as e:
                problems.append(str(e))
                continue
            for r in records:
                try:
                    img = read_image(r.image_path)
                except ImageError as e:
                    problems.append(str(e))
                    continue
                if r.width is not None and (r.width, r.height) != (img.shape[1], img.shape[0]):
                    problems.append(f"{r.label_path}: says {r.width}x{r.height} but {r.image_path} is "
                                    f"{img.shape[1]}x{img.shape[0]}")
                to_pixels(r, img.shape[1], img.shape[0])
        problems += [str(w.message) for w in caught]
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m helpers.annotations",
                                description="Check a dataset (VOCdevkit or course layout) and list its problems.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="scan a dataset and list every problem with its file")
    c.add_argument("path")
    c.add_argument("--split", action="append", help="split(s) to check (default: all)")
    args = p.parse_args(argv)
    problems = check(args.path, args.split)
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s) found in {args.path}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
