"""Read a dataset into records: VOCdevkit XML or the course's Kaggle CSV + YOLO-txt layout.

A `Record` is one image: its path, its size, boxes in pixels (x1, y1, x2, y2, 0-based and
continuous: VOC's 1-based inclusive `xmin` becomes `xmin - 1`, `xmax` stays, so a box covering
pixel columns 1..W of the devkit spans 0..W), class indices and difficult flags.

Layouts, recognised from the folder's contents:
- VOCdevkit: `VOC2007/` and/or `VOC2012/`, each with `Annotations/*.xml`, `JPEGImages/`,
  `ImageSets/Main/<split>.txt`. `root` may be the VOCdevkit folder, one VOC20xx folder, or the
  folder holding `VOCdevkit/`. With both years, `trainval` is 07+12 trainval and `test` is
  07 test (the standard protocol); other lists come from every year that has them.
- course/Kaggle: `images/`, `labels/` (`class cx cy w h` normalised, one object a line),
  `<split>.csv` with columns `image,text` (`train`, `test`, `100examples`). Image sizes come from
  the image headers (no decode), so the records hold pixels like VOC's.

`root` may also be a folder that holds exactly one dataset a few levels down, as Kaggle attaches
the course's dataset (`/kaggle/input/pascal-voc-dataset-used-in-yolov3-video/PASCAL_VOC`):
`find_dataset` returns the dataset folder itself. A split of `None` is the layout's default
(`DEFAULT_SPLITS`): `trainval`/`test` for a VOCdevkit, `train`/`test` for the course layout.

Problems name their file. Errors (malformed or empty XML, unknown class, a bad label line, a
missing annotation or image) make `load_records` raise, listing all of them, unless
`on_error="skip"`, which leaves those records out with a warning each. Fixable box problems are
warnings: boxes outside the image are clipped, zero-area boxes dropped. The course layout rounds
to 6 digits, so edges a hair outside 0..1 are normal there and clipped silently. An empty label
file, or an XML without objects, is a valid background image. A corrupt image is found only
when it is decoded (the datasets skip it then); `python -m helpers.annotations check PATH`
decodes everything and lists every problem.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np

from .config import VOC_CLASSES
from .imageio import ImageError, decoded_size, read_image, read_size

# Normalised; the course's labels are rounded to 6 digits, so their edges may sit ~1e-6 outside 0..1.
ROUNDING_SLACK = 1e-4
ERROR, WARNING = "error", "warning"
SHOWN_ERRORS = 20  # errors listed in a DatasetError's message (the check command lists them all)


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message names the files and the problems."""


@dataclass(frozen=True, eq=False)
class Record:
    image_path: Path
    boxes: np.ndarray  # [n, 4] float32 x1, y1, x2, y2 in pixels (0-based, continuous)
    labels: np.ndarray  # [n] int64 class indices
    difficult: np.ndarray  # [n] bool
    width: int  # of the stored image (from the annotation, or the image header)
    height: int
    label_path: Path | None = field(default=None)  # the XML or txt the boxes came from

    def without_difficult(self) -> Record:
        keep = ~self.difficult
        if keep.all():
            return self
        return Record(self.image_path, self.boxes[keep], self.labels[keep], self.difficult[keep],
                      self.width, self.height, self.label_path)


@dataclass(frozen=True)
class Problem:
    level: str  # ERROR (the record is unusable) or WARNING (fixed: boxes clipped or dropped)
    path: Path  # the file concerned
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


# --- layout detection ---------------------------------------------------------------------------
# (train split, evaluation split) of each layout when none is given.
DEFAULT_SPLITS = {"voc": ("trainval", "test"), "course": ("train", "test")}
SEARCH_DEPTH = 2  # levels below `root` that find_dataset looks through (/kaggle/input: <slug>/PASCAL_VOC)


def _layout_here(folder: Path) -> str | None:
    if _voc_years(folder):
        return "voc"
    if (folder / "images").is_dir() and (folder / "labels").is_dir():
        return "course"
    return None


def find_dataset(root: str | Path) -> Path:
    """The dataset folder at or below `root`: `root` itself when it is one, else the single dataset
    found within `SEARCH_DEPTH` levels (breadth first, so the shallowest wins). Raises a DatasetError
    saying what was expected, or listing the candidates when several datasets are found."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (give the dataset folder with --data)")
    level = [root]
    for _ in range(SEARCH_DEPTH + 1):
        found = [f for f in level if _layout_here(f)]
        if len(found) == 1:
            return found[0]
        if found:
            raise DatasetError(f"{root}: holds {len(found)} datasets, {', '.join(map(str, found[:6]))}; "
                               "give the one to use with --data")
        level = [c for f in level for c in sorted(f.iterdir()) if c.is_dir() and not c.name.startswith(".")]
    raise DatasetError(
        f"{root}: not a dataset folder this project reads. Expected either a VOCdevkit (VOC2007/ and/or "
        "VOC2012/, each with Annotations/, JPEGImages/ and ImageSets/Main/<split>.txt) or the course/Kaggle "
        "layout (images/, labels/ and train.csv / test.csv with columns image,text), at most "
        f"{SEARCH_DEPTH} folders down; found: {sorted(p.name for p in root.iterdir())[:12]}")


def detect_layout(root: str | Path) -> str:
    """'voc' or 'course' for the dataset at or below `root` (see `find_dataset`)."""
    return _layout_here(find_dataset(root))


def default_split(root: str | Path, role: str) -> str:
    """The split a dataset uses for `role` ('train' or 'test') when none is given (`DEFAULT_SPLITS`)."""
    return DEFAULT_SPLITS[detect_layout(root)][("train", "test").index(role)]


def _is_year(p: Path) -> bool:
    return (p / "Annotations").is_dir() and (p / "JPEGImages").is_dir()


def _voc_years(root: Path) -> list[Path]:
    if _is_year(root):
        return [root]
    for base in (root, root / "VOCdevkit"):
        years = [p for p in sorted(base.glob("VOC20*")) if _is_year(p)]
        if years:
            return years
    return []


# --- VOC ----------------------------------------------------------------------------------------
def parse_voc_xml(path: Path, classes: tuple[str, ...] = VOC_CLASSES):
    """(boxes [n,4] 0-based pixels, labels [n], difficult [n], width, height) of one VOC annotation.

    width/height are None when the XML does not give a positive size. Raises DatasetError.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DatasetError(f"{path}: malformed XML ({e})") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    if root.tag != "annotation":
        raise DatasetError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    width, height = _positive_int(root.findtext("size/width")), _positive_int(root.findtext("size/height"))
    index = {c: i for i, c in enumerate(classes)}
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            raise DatasetError(f"{path}: object {k} has unknown class {name!r} (known: {', '.join(classes)})")
        try:
            coords = [float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            raise DatasetError(f"{path}: object {k} ({name}) has a missing or non-numeric bndbox") from None
        if not all(map(math.isfinite, coords)):
            raise DatasetError(f"{path}: object {k} ({name}) has a non-finite bndbox {coords}")
        xmin, ymin, xmax, ymax = coords
        boxes.append([xmin - 1, ymin - 1, xmax, ymax])
        labels.append(index[name])
        difficult.append((obj.findtext("difficult") or "0").strip() in ("1", "true", "True"))
    return (np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64), np.array(difficult, bool),
            width, height)


def _positive_int(text) -> int | None:
    try:
        v = int(float(text))
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def _voc_split_ids(year: Path, split: str) -> list[str]:
    path = year / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise DatasetError(f"{path}: split list not found (splits here: {voc_splits(year)})")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def voc_splits(year: Path) -> list[str]:
    """The whole-dataset split lists of one VOC year (not the per-class `<class>_<split>.txt`)."""
    return sorted(p.stem for p in (year / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)


def _voc_years_for(root: Path, split: str) -> list[Path]:
    years = _voc_years(root)
    if len(years) == 1:
        return years
    if split == "test":  # the standard protocol: 07 test (VOC2012 has no public test annotations)
        return [y for y in years if y.name == "VOC2007"] or years
    having = [y for y in years if (y / "ImageSets" / "Main" / f"{split}.txt").is_file()]
    if split == "trainval" and len(having) < len(years):  # 07+12 means both: say which is missing
        missing = [y for y in years if y not in having]
        raise DatasetError(f"{missing[0] / 'ImageSets' / 'Main' / 'trainval.txt'}: split list not found "
                           f"(trainval of a devkit with {', '.join(y.name for y in years)} is their union)")
    return having or years


def _scan_voc(root: Path, split: str, classes) -> Iterable[Record | Problem]:
    for year in _voc_years_for(root, split):
        for image_id in _voc_split_ids(year, split):
            xml = year / "Annotations" / f"{image_id}.xml"
            image = year / "JPEGImages" / f"{image_id}.jpg"
            if not xml.is_file():
                yield Problem(ERROR, xml, f"annotation listed in {split}.txt is missing")
                continue
            try:
                boxes, labels, difficult, w, h = parse_voc_xml(xml, classes)
            except DatasetError as e:
                yield Problem(ERROR, xml, str(e).removeprefix(f"{xml}: "))
                continue
            if not image.is_file():
                yield Problem(ERROR, image, f"image for {xml.name} is missing")
                continue
            if w is None or h is None:  # the XML gives no usable size: the image header does
                try:
                    w, h = read_size(image)
                except ImageError as e:
                    yield Problem(ERROR, image, str(e).removeprefix(f"{image}: "))
                    continue
            yield from _finish(Record(image, boxes, labels, difficult, w, h, xml), quiet_within=0.0)


# --- course / Kaggle ----------------------------------------------------------------------------
def parse_yolo_txt(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(normalised cx, cy, w, h [n,4] float32, labels [n] int64); an empty file is a background image."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    rows, labels = [], []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 5:
                raise ValueError
            c_float, *values = map(float, parts)
        except ValueError:
            raise DatasetError(f"{path}, line {n}: expected 'class cx cy w h', got {line.strip()!r}") from None
        if c_float != int(c_float) or not 0 <= c_float < num_classes:
            raise DatasetError(f"{path}, line {n}: class {parts[0]} is not one of 0..{num_classes - 1}")
        if not all(map(math.isfinite, values)):
            raise DatasetError(f"{path}, line {n}: non-finite coordinates {values}")
        rows.append(values)
        labels.append(int(c_float))
    return np.array(rows, np.float32).reshape(-1, 4), np.array(labels, np.int64)


def _csv_rows(csv_path: Path) -> Iterable[tuple[int, list[str]]]:
    """(line number, [image, label]) of a course CSV; a header row (`image,text`) is skipped."""
    with open(csv_path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            row = [c.strip() for c in row]
            if not any(row):
                continue
            if n == 1 and not row[0].lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".webp")):
                continue  # the header (the course's is "image,text")
            yield n, row


def _scan_course(root: Path, split: str, classes) -> Iterable[Record | Problem]:
    csv_path = root / f"{split}.csv"
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: split CSV not found (CSVs here: {sorted(p.stem for p in root.glob('*.csv'))})")
    for n, row in _csv_rows(csv_path):
        if len(row) < 2 or not row[0] or not row[1]:
            yield Problem(ERROR, csv_path, f"line {n}: expected 'image,text' (two file names), got {row}")
            continue
        image, label = root / "images" / row[0], root / "labels" / row[1]
        if not label.is_file():
            yield Problem(ERROR, label, f"label file listed in {csv_path.name} is missing")
            continue
        try:
            norm, labels = parse_yolo_txt(label, len(classes))
        except DatasetError as e:
            yield Problem(ERROR, label, str(e).removeprefix(f"{label}: ").removeprefix(f"{label}, "))
            continue
        try:
            w, h = read_size(image)
        except ImageError as e:
            yield Problem(ERROR, image, f"image for {label.name}: " + str(e).removeprefix(f"{image}: "))
            continue
        cx, cy, bw, bh = norm.T
        boxes = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], 1)
        record = Record(image, boxes.astype(np.float32), labels, np.zeros(len(labels), bool), w, h, label)
        yield from _finish(record, quiet_within=ROUNDING_SLACK * max(w, h))


# --- box fixes ----------------------------------------------------------------------------------
def _finish(record: Record, quiet_within: float) -> Iterable[Record | Problem]:
    """Clip boxes to the image (a warning unless within `quiet_within` px), drop zero-area ones (warning)."""
    b = record.boxes
    if len(b):
        limits = np.array([record.width, record.height] * 2, np.float32)
        clipped = np.clip(b, 0, limits)
        moved = np.abs(clipped - b).max(1)
        source = record.label_path or record.image_path
        if (moved > quiet_within).any():
            yield Problem(WARNING, source, f"{int((moved > quiet_within).sum())} box(es) outside the "
                                           f"{record.width}x{record.height} image clipped (by up to {moved.max():.1f} px)")
        keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        if not keep.all():
            yield Problem(WARNING, source, f"{int((~keep).sum())} box(es) with zero area dropped")
        record = Record(record.image_path, clipped[keep], record.labels[keep], record.difficult[keep],
                        record.width, record.height, record.label_path)
    yield record


# --- public entry points ------------------------------------------------------------------------
def scan(root: str | Path, split: str, classes: tuple[str, ...] = VOC_CLASSES) -> tuple[list[Record], list[Problem]]:
    """(usable records, problems) of `split`; raises DatasetError only when the split itself is missing."""
    root = find_dataset(root)
    items = (_scan_voc if _layout_here(root) == "voc" else _scan_course)(root, split, classes)
    records, problems = [], []
    for item in items:
        (records if isinstance(item, Record) else problems).append(item)
    return records, problems


def load_records(root: str | Path, split: str, classes: tuple[str, ...] = VOC_CLASSES,
                 on_error: str = "raise") -> list[Record]:
    """Every record of `split` in the dataset at `root` (layout found from its contents).

    Warnings (clipped or dropped boxes) are issued as Python warnings naming the file. Errors raise
    one DatasetError listing them all (`on_error="raise"`), or leave those records out with a
    warning each (`on_error="skip"`).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    records, problems = scan(root, split, classes)
    errors = [p for p in problems if p.level == ERROR]
    if errors and on_error == "raise":
        shown = "\n  ".join(map(str, errors[:SHOWN_ERRORS]))
        more = f"\n  ... and {len(errors) - SHOWN_ERRORS} more" if len(errors) > SHOWN_ERRORS else ""
        raise DatasetError(f"{root} ({split}): {len(errors)} file(s) cannot be used:\n  {shown}{more}\n"
                           f"Fix them, or load with on_error='skip' to leave them out "
                           f"(`python -m helpers.annotations check {root}` lists every problem).")
    for p in problems:
        text = f"{p} (left out)" if p.level == ERROR else str(p)
        warnings.warn(text, stacklevel=2)
    return records


def check(root: str | Path, splits: list[str] | None = None, classes: tuple[str, ...] = VOC_CLASSES,
          decode: bool = True) -> list[Problem]:
    """Every problem of the dataset, each naming its file; with `decode`, every image is decoded too
    (reduced, so it stays quick) and its size compared with its annotation's."""

    try:
        root = find_dataset(root)
    except DatasetError as e:
        return [Problem(ERROR, Path(root), str(e).removeprefix(f"{root}: "))]
    layout = _layout_here(root)
    if splits is None:
        splits = (sorted({s for y in _voc_years(root) for s in voc_splits(y)}) if layout == "voc"
                  else [p.stem for p in sorted(root.glob("*.csv"))])
    problems: list[Problem] = []
    seen: set[Path] = set()
    for split in splits:
        try:
            records, found = scan(root, split, classes)
        except DatasetError as e:
            problems.append(Problem(ERROR, root, f"split {split!r}: {e}"))
            continue
        problems += [p for p in found if p not in problems]  # a file in two splits is reported once
        for r in records:
            if not decode or r.image_path in seen:
                continue
            seen.add(r.image_path)
            try:
                image, scale = read_image(r.image_path, max_side=64, with_scale=True)
            except ImageError as e:
                problems.append(Problem(ERROR, r.image_path, str(e).removeprefix(f"{r.image_path}: ")))
                continue
            if (image.shape[1], image.shape[0]) != decoded_size(r.width, r.height, scale):
                w, h = read_size(r.image_path)
                problems.append(Problem(ERROR, r.label_path or r.image_path,
                                        f"says {r.width}x{r.height} but {r.image_path.name} is {w}x{h}"))
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m helpers.annotations",
                                description="Check a dataset (VOCdevkit or course layout) and list its problems.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="scan a dataset, decode every image, list every problem with its file")
    c.add_argument("path")
    c.add_argument("--split", action="append", help="split(s) to check (repeatable; default: every list found)")
    c.add_argument("--no-decode", action="store_true", help="read annotations only (fast)")
    args = p.parse_args(argv)
    problems = check(args.path, args.split, decode=not args.no_decode)
    for problem in problems:
        print(f"{problem.level}: {problem}")
    errors = sum(p.level == ERROR for p in problems)
    print(f"{args.path}: {errors} error(s), {len(problems) - errors} warning(s)", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
