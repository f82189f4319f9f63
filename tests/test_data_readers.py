"""Readers: the VOC devkit and the course CSV layouts, and every kind of bad input, named by file."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.annotations import DatasetError, check, detect_layout, load_records, main as annotations_main
from helpers.config import VOC_CLASSES
from helpers.dataset_org import YOLODataset
from helpers.imageio import ImageError, read_image
from helpers.synthetic import make_course_dataset, make_voc_dataset

REALDET = Path(os.environ.get("REALDET_ROOT", Path(__file__).resolve().parents[2] / "shared" / "realdet"))


@pytest.fixture
def voc(tmp_path):
    return make_voc_dataset(tmp_path / "voc", n_trainval=12, n_test=4, image_size=(96, 72), seed=1)


@pytest.fixture
def course(tmp_path):
    return make_course_dataset(tmp_path / "course", n_train=12, n_test=4, image_size=(96, 72), seed=1)


def voc_xml(objects, width=96, height=72) -> str:
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for n, d, (x1, y1, x2, y2) in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>x.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{objs}</annotation>")


def write_one(voc: Path, image_id: str, xml: str | None, image: Image.Image | bytes | None, split="trainval"):
    year = voc / "VOC2007"
    if xml is not None:
        (year / "Annotations" / f"{image_id}.xml").write_text(xml)
    if isinstance(image, Image.Image):
        image.save(year / "JPEGImages" / f"{image_id}.jpg", format="JPEG")
    elif image is not None:
        (year / "JPEGImages" / f"{image_id}.jpg").write_bytes(image)
    (year / "ImageSets" / "Main" / f"{split}.txt").write_text(f"{image_id}\n")


# --- layouts ------------------------------------------------------------------------------------
def test_voc_boxes_become_zero_based_pixels_with_difficult_flags(voc):
    write_one(voc, "a", voc_xml([("dog", 0, (1, 1, 40, 30)), ("cat", 1, (10, 20, 96, 72))]),
              Image.new("RGB", (96, 72)))
    (r,) = load_records(voc, "trainval")
    np.testing.assert_array_equal(r.boxes, [[0, 0, 40, 30], [9, 19, 96, 72]])
    assert [VOC_CLASSES[c] for c in r.labels] == ["dog", "cat"]
    assert r.difficult.tolist() == [False, True] and (r.width, r.height) == (96, 72)


def test_a_devkit_with_both_years_trains_on_07_plus_12_and_tests_on_07(tmp_path):
    make_voc_dataset(tmp_path / "d", n_trainval=6, n_test=3, seed=0)
    v12 = make_voc_dataset(tmp_path / "t12", n_trainval=5, n_test=0, seed=1) / "VOC2007"
    shutil.copytree(v12, tmp_path / "d" / "VOCdevkit" / "VOC2012")
    (tmp_path / "d" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main" / "test.txt").unlink()
    devkit = tmp_path / "d" / "VOCdevkit"
    assert len(load_records(devkit, "trainval")) == 11
    test = load_records(devkit, "test")
    assert len(test) == 3 and all("VOC2007" in str(r.image_path) for r in test)
    assert len(load_records(devkit / "VOC2007", "trainval")) == 6  # a single year folder works too


def test_course_layout_labels_become_pixels_and_rounding_edges_clip_silently(course):
    label = course / "labels" / "000000.txt"
    label.write_text("14 0.250000 0.500000 0.500000 1.000001\n")  # the bottom edge at 1.0000005
    ds = YOLODataset(course, "train", image_size=96, return_meta=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a rounding hair
        _, boxes, meta = ds[0]
    np.testing.assert_allclose(meta["gt"]["boxes"].numpy(), [[0, 0, 48, 72]], atol=1e-3)
    assert boxes[0, 0] == 14


def test_the_layout_is_found_from_contents_and_anything_else_is_explained(tmp_path, voc, course):
    assert detect_layout(voc) == "voc" and detect_layout(course) == "course"
    (tmp_path / "junk").mkdir()
    with pytest.raises(DatasetError, match="Expected either a VOCdevkit .* or the course/Kaggle layout"):
        detect_layout(tmp_path / "junk")


def test_an_unknown_split_names_the_missing_list(voc):
    with pytest.raises(DatasetError, match=r"nosuch.txt: split list not found"):
        load_records(voc, "nosuch")


# --- bad annotations ------------------------------------------------------------------------------
@pytest.mark.parametrize("xml,message", [
    ("<annotation><object>", "malformed XML"),
    ("", "malformed XML"),
    (voc_xml([("unicorn", 0, (1, 1, 5, 5))]), "unknown class 'unicorn'"),
    (voc_xml([("dog", 0, (1, 1, "x", 5))]), "non-numeric bndbox"),
])
def test_bad_xml_is_an_error_naming_the_file(voc, xml, message):
    write_one(voc, "bad", xml, Image.new("RGB", (96, 72)))
    with pytest.raises(DatasetError, match=message) as e:
        load_records(voc, "trainval")
    assert "bad.xml" in str(e.value)


def test_boxes_outside_the_image_are_clipped_and_zero_area_ones_dropped_with_warnings(voc):
    write_one(voc, "edge", voc_xml([("dog", 0, (-5, 1, 120, 30)), ("cat", 0, (10, 10, 9, 40))]),
              Image.new("RGB", (96, 72)))
    with pytest.warns(UserWarning) as caught:
        (r,) = load_records(voc, "trainval")
    text = " ".join(str(w.message) for w in caught)
    assert "edge.xml" in text and "clipped" in text and "zero area dropped" in text
    np.testing.assert_array_equal(r.boxes, [[0, 0, 96, 30]])


def test_an_empty_label_file_is_a_background_image(course):
    (course / "labels" / "000001.txt").write_text("")
    _, boxes = YOLODataset(course, "train", image_size=64)[1]
    assert boxes.shape == (0, 5)


def test_a_malformed_label_line_names_file_and_line(course):
    (course / "labels" / "000002.txt").write_text("3 0.5 0.5 0.2\n")
    with pytest.raises(DatasetError, match=r"000002.txt, line 1: expected 'class cx cy w h'"):
        load_records(course, "train")


# --- bad images -----------------------------------------------------------------------------------
def test_a_corrupt_or_missing_image_is_skipped_with_a_warning_naming_it(voc):
    write_one(voc, "broken", voc_xml([("dog", 0, (1, 1, 40, 30))]), b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = YOLODataset(voc, "trainval", image_size=64)
    with pytest.warns(UserWarning, match=r"broken.jpg.*cannot decode"):
        assert ds[0] is None
    (voc / "VOC2007" / "JPEGImages" / "broken.jpg").unlink()
    with pytest.warns(UserWarning, match=r"broken.jpg.*not found"):
        assert ds[0] is None


def test_a_truncated_jpeg_is_an_error_naming_it(tmp_path):
    path = tmp_path / "t.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(ImageError, match="t.jpg: cannot decode"):
        read_image(path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "LA", "1"])
def test_every_image_mode_becomes_rgb_uint8(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8))
    if mode == "I;16":
        im = Image.fromarray((np.arange(600, dtype=np.uint16).reshape(20, 30) * 100))
    else:
        im = rgb.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    im.save(path)
    out = read_image(path)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    if mode == "I;16":  # 16-bit range scaled into 8 bits, not clipped to white
        assert 0 < out.mean() < 255 and out.max() > 200


def test_exif_rotation_is_ignored_so_boxes_follow_the_stored_pixels(tmp_path):
    # VOC annotators saw the stored pixels: a box drawn on them must land on the same pixels.
    im = Image.new("RGB", (60, 30), (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (30, 60, 3)
    assert out[:10, :20, 0].mean() > 200 and out[20:, 40:, 0].mean() < 50


@pytest.mark.slow
def test_a_huge_jpeg_is_decoded_reduced_and_boxes_follow(tmp_path):
    big = Image.new("RGB", (10000, 10000), (20, 20, 20))
    big.paste((250, 250, 250), (5000, 5000, 7000, 8000))
    path = tmp_path / "huge.jpg"
    big.save(path, quality=70)
    del big
    image, scale = read_image(path, max_side=1000, with_scale=True)
    assert 1000 <= max(image.shape) <= 2000 and scale == image.shape[1] / 10000
    y, x = (np.array(image.shape[:2]) * np.array([6500, 6000]) / 10000).astype(int)
    assert image[y, x].mean() > 200  # the bright patch is where its box says


# --- the check command ----------------------------------------------------------------------------
def test_check_lists_every_problem_with_its_file(voc, capsys):
    year = voc / "VOC2007"
    ids = (year / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    (year / "JPEGImages" / f"{ids[0]}.jpg").write_bytes(b"garbage")
    (year / "Annotations" / f"{ids[1]}.xml").write_text(voc_xml([("dog", 0, (-3, 1, 40, 30))]))
    problems = check(voc)
    assert any(f"{ids[0]}.jpg" in p and "cannot decode" in p for p in problems)
    assert any(f"{ids[1]}.xml" in p and "clipped" in p for p in problems)
    assert annotations_main(["check", str(voc)]) == 1
    assert f"{ids[0]}.jpg" in capsys.readouterr().out


def test_check_passes_a_clean_dataset(voc):
    assert check(voc) == []


# --- real photos ----------------------------------------------------------------------------------
@pytest.mark.skipif(not (REALDET / "VOCdevkit").is_dir(), reason="shared/realdet not present")
def test_the_real_photo_devkit_reads_cleanly_in_both_splits():
    devkit = REALDET / "VOCdevkit"
    trainval, test = load_records(devkit, "trainval"), load_records(devkit, "test")
    assert (len(trainval), len(test)) == (158, 39)
    assert sum(len(r.labels) for r in trainval + test) == 974
    assert sum(int(r.difficult.sum()) for r in trainval + test) == 7
    image, boxes, meta = YOLODataset(devkit, "test", image_size=416, return_meta=True)[0]
    assert image.shape == (3, 416, 416) and len(meta["gt"]["boxes"]) >= len(boxes)
