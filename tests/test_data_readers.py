"""Readers: the VOC devkit and the course CSV layouts, robust decoding, and every kind of bad input
named by its file; the check command."""
from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import noise_image, voc_xml
from PIL import Image

from helpers import imageio
from helpers.annotations import ERROR, WARNING, DatasetError, check, detect_layout, load_records
from helpers.annotations import main as annotations_main
from helpers.config import VOC_CLASSES
from helpers.dataset_org import PlainDataset
from helpers.imageio import ImageError, read_image, read_size
from helpers.synthetic import make_voc_dataset

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --- layouts ------------------------------------------------------------------------------------
def test_voc_boxes_become_zero_based_continuous_pixels_with_difficult_flags(voc, write_voc):
    write_voc(voc, "a", voc_xml([("dog", 0, (1, 1, 40, 30)), ("cat", 1, (10, 20, 96, 72))]),
              Image.new("RGB", (96, 72)))
    (r,) = load_records(voc, "trainval")
    np.testing.assert_array_equal(r.boxes, [[0, 0, 40, 30], [9, 19, 96, 72]])
    assert r.boxes.dtype == np.float32 and r.labels.dtype == np.int64 and r.difficult.dtype == bool
    assert [VOC_CLASSES[c] for c in r.labels] == ["dog", "cat"]
    assert r.difficult.tolist() == [False, True] and (r.width, r.height) == (96, 72)
    assert r.label_path.name == "a.xml" and r.image_path.name == "a.jpg"


def test_a_devkit_with_both_years_trains_on_07_plus_12_and_tests_on_07(tmp_path):
    make_voc_dataset(tmp_path / "d", n_trainval=6, n_test=3, seed=0)
    v12 = make_voc_dataset(tmp_path / "t12", n_trainval=5, n_test=0, seed=1) / "VOC2007"
    shutil.copytree(v12, tmp_path / "d" / "VOCdevkit" / "VOC2012")
    (tmp_path / "d" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main" / "test.txt").unlink()
    devkit = tmp_path / "d" / "VOCdevkit"
    trainval = load_records(devkit, "trainval")
    assert len(trainval) == 11 and {r.image_path.parents[1].name for r in trainval} == {"VOC2007", "VOC2012"}
    test = load_records(devkit, "test")
    assert len(test) == 3 and all(r.image_path.parents[1].name == "VOC2007" for r in test)
    assert len(load_records(devkit, "train")) == 3 + 2  # other lists: from every year that has them
    assert len(load_records(devkit / "VOC2012", "trainval")) == 5  # one year's folder works too
    assert len(load_records(tmp_path / "d", "trainval")) == 11  # and so does the folder holding VOCdevkit


def test_course_labels_become_pixels_with_the_size_from_the_image_header(course):
    (course / "labels" / "000000.txt").write_text("14 0.25 0.5 0.5 0.5\n3 0.75 0.25 0.25 0.5\n")
    r = load_records(course, "train")[0]
    assert (r.width, r.height) == (96, 72)
    np.testing.assert_allclose(r.boxes, [[0, 18, 48, 54], [60, 0, 84, 36]], atol=1e-4)
    assert r.labels.tolist() == [14, 3] and not r.difficult.any()


def test_course_rounding_hairs_outside_0_1_clip_silently_but_real_overflow_warns(course):
    label = course / "labels" / "000000.txt"
    label.write_text("14 0.250000 0.500000 0.500000 1.000001\n")  # edges at -5e-7 and 1 + 5e-7
    with no_warnings():
        (r, *_) = load_records(course, "train")
    np.testing.assert_allclose(r.boxes, [[0, 0, 48, 72]], atol=1e-3)
    assert (r.boxes >= 0).all() and (r.boxes[:, 2:] <= [96, 72]).all()
    label.write_text("14 0.25 0.5 0.5 1.2\n")
    with pytest.warns(UserWarning, match=r"000000.txt: 1 box\(es\) outside the 96x72 image clipped"):
        load_records(course, "train")


def test_course_csv_without_a_header_and_the_100examples_split(course):
    rows = (course / "train.csv").read_text().splitlines()
    (course / "train.csv").write_text("\n".join(rows[1:]) + "\n")
    assert len(load_records(course, "train")) == 12
    assert len(load_records(course, "100examples")) == 16  # all 16 images (fewer than 100)


def test_the_layout_is_found_from_contents_and_anything_else_is_explained(tmp_path, voc, course):
    assert detect_layout(voc) == "voc" and detect_layout(course) == "course"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "photos").mkdir()
    with pytest.raises(DatasetError, match=r"junk: not a dataset folder.*Expected either a VOCdevkit.*"
                                           r"course/Kaggle layout.*found: \['photos'\]"):
        load_records(tmp_path / "junk", "train")
    with pytest.raises(DatasetError, match="no such folder"):
        detect_layout(tmp_path / "nowhere")


def test_an_unknown_split_names_the_missing_list_and_the_ones_there(voc, course):
    with pytest.raises(DatasetError, match=r"nosuch.txt: split list not found \(splits here: "
                                           r"\['test', 'train', 'trainval', 'val'\]\)"):
        load_records(voc, "nosuch")
    with pytest.raises(DatasetError, match=r"nosuch.csv: split CSV not found"):
        load_records(course, "nosuch")


# --- bad annotations ------------------------------------------------------------------------------
@pytest.mark.parametrize("xml,message", [
    ("<annotation><object>", "malformed XML"),
    ("", "malformed XML"),
    ("<html></html>", "root element is <html>, expected <annotation>"),
    (voc_xml([("unicorn", 0, (1, 1, 5, 5))]), "unknown class 'unicorn'"),
    (voc_xml([("dog", 0, (1, 1, "x", 5))]), "non-numeric bndbox"),
    (voc_xml([("dog", 0, (1, 1, "nan", 5))]), "non-finite bndbox"),
])
def test_bad_xml_is_an_error_naming_the_file(voc, write_voc, xml, message):
    write_voc(voc, "bad", xml, Image.new("RGB", (96, 72)))
    with pytest.raises(DatasetError, match=message) as e:
        load_records(voc, "trainval")
    assert "bad.xml" in str(e.value)


def test_every_bad_file_is_listed_at_once_and_skip_keeps_the_rest(voc, write_voc):
    write_voc(voc, "good", voc_xml([("dog", 0, (1, 1, 40, 30))]), Image.new("RGB", (96, 72)))
    write_voc(voc, "bad1", "<annotation>", Image.new("RGB", (96, 72)), append=True)
    write_voc(voc, "bad2", voc_xml([("unicorn", 0, (1, 1, 5, 5))]), Image.new("RGB", (96, 72)), append=True)
    write_voc(voc, "noimage", voc_xml([("dog", 0, (1, 1, 40, 30))]), None, append=True)
    write_voc(voc, "noxml", None, Image.new("RGB", (96, 72)), append=True)
    with pytest.raises(DatasetError) as e:
        load_records(voc, "trainval")
    text = str(e.value)
    assert "4 file(s) cannot be used" in text and "on_error='skip'" in text
    for expected in ("bad1.xml: malformed XML", "bad2.xml: object 0 has unknown class",
                     "noimage.jpg: image for noimage.xml is missing", "noxml.xml: annotation listed in trainval.txt is missing"):
        assert expected in text
    with pytest.warns(UserWarning) as caught:
        records = load_records(voc, "trainval", on_error="skip")
    assert [r.image_path.stem for r in records] == ["good"]
    assert sum("(left out)" in str(w.message) for w in caught) == 4


def test_boxes_outside_the_image_are_clipped_and_zero_area_ones_dropped_with_warnings(voc, write_voc):
    write_voc(voc, "edge", voc_xml([("dog", 0, (-5, 1, 120, 30)), ("cat", 0, (10, 10, 9, 40)),
                                    ("cow", 0, (100, 1, 130, 30))]), Image.new("RGB", (96, 72)))
    with pytest.warns(UserWarning) as caught:
        (r,) = load_records(voc, "trainval")
    text = " ".join(str(w.message) for w in caught)
    assert "edge.xml: 2 box(es) outside the 96x72 image clipped (by up to 34.0 px)" in text
    assert "edge.xml: 2 box(es) with zero area dropped" in text
    np.testing.assert_array_equal(r.boxes, [[0, 0, 96, 30]])
    assert [VOC_CLASSES[c] for c in r.labels] == ["dog"]


def test_an_empty_label_file_or_an_xml_without_objects_is_a_background_image(voc, course, write_voc):
    (course / "labels" / "000001.txt").write_text("")
    with no_warnings():
        assert len(load_records(course, "train")[1].boxes) == 0
        _, boxes = PlainDataset(course, "train", image_size=64)[1]
        assert boxes.shape == (0, 5)
        write_voc(voc, "bg", voc_xml([]), Image.new("RGB", (96, 72)))
        (r,) = load_records(voc, "trainval")
    assert r.boxes.shape == (0, 4) and r.labels.shape == (0,)


def test_an_xml_without_a_size_takes_it_from_the_image(voc, write_voc):
    write_voc(voc, "nosize", voc_xml([("dog", 0, (1, 1, 40, 30))], width=None), Image.new("RGB", (50, 40)))
    (r,) = load_records(voc, "trainval")
    assert (r.width, r.height) == (50, 40)


@pytest.mark.parametrize("line,message", [
    ("3 0.5 0.5 0.2", r"line 1: expected 'class cx cy w h'"),
    ("3 0.5 0.5 0.2 0.2 0.9", r"line 1: expected 'class cx cy w h'"),
    ("dog 0.5 0.5 0.2 0.2", r"line 1: expected 'class cx cy w h'"),
    ("20 0.5 0.5 0.2 0.2", r"line 1: class 20 is not one of 0..19"),
    ("2.5 0.5 0.5 0.2 0.2", r"line 1: class 2.5 is not one of 0..19"),
    ("2 nan 0.5 0.2 0.2", r"line 1: non-finite coordinates"),
])
def test_a_bad_label_line_names_file_and_line(course, line, message):
    (course / "labels" / "000002.txt").write_text(f"1 0.5 0.5 0.1 0.1\n{line}\n".replace("line 1", "line 2"))
    with pytest.raises(DatasetError, match=r"000002.txt: " + message.replace("line 1", "line 2")):
        load_records(course, "train")


def test_course_missing_label_or_image_is_named(course):
    (course / "labels" / "000003.txt").unlink()
    (course / "images" / "000004.jpg").unlink()
    with pytest.raises(DatasetError) as e:
        load_records(course, "train")
    assert "000003.txt: label file listed in train.csv is missing" in str(e.value)
    assert "000004.jpg: image for 000004.txt: image file not found" in str(e.value)
    with pytest.warns(UserWarning):
        assert len(load_records(course, "train", on_error="skip")) == 10


def test_a_course_zero_area_box_is_dropped_with_a_warning(course):
    (course / "labels" / "000005.txt").write_text("1 0.5 0.5 0.0 0.2\n2 0.5 0.5 0.2 0.2\n")
    with pytest.warns(UserWarning, match=r"000005.txt: 1 box\(es\) with zero area dropped"):
        r = load_records(course, "train")[5]
    assert r.labels.tolist() == [2]


# --- bad images -----------------------------------------------------------------------------------
def test_an_unreadable_image_at_training_time_is_skipped_with_a_warning_naming_it(voc, write_voc):
    jpg = write_voc(voc, "broken", voc_xml([("dog", 0, (1, 1, 40, 30))]), b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = PlainDataset(voc, "trainval", image_size=64)
    with pytest.warns(UserWarning, match=r"skipping sample 0: .*broken.jpg: cannot decode image"):
        assert ds[0] is None
    jpg.unlink()  # gone after the records were read
    with pytest.warns(UserWarning, match=r"broken.jpg: image file not found"):
        assert ds[0] is None


def test_a_truncated_jpeg_is_an_error_not_a_grey_band(tmp_path):
    path = tmp_path / "t.jpg"
    noise_image(200, 200).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.7)])
    assert cv2.imread(str(path)) is not None  # OpenCV alone would hand back a grey-filled image
    with pytest.raises(ImageError, match=r"t.jpg: truncated JPEG"):
        read_image(path)
    path.write_bytes(data[:300])
    with pytest.raises(ImageError, match="t.jpg"):
        read_image(path)


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello")
    with pytest.raises(ImageError, match=r"notes.jpg: cannot decode image"):
        read_image(path)
    with pytest.raises(ImageError, match=r"notes.jpg: not a readable image"):
        read_size(path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "PT", "I;16", "CMYK", "LA", "1"])
def test_every_image_mode_becomes_rgb_uint8(tmp_path, mode):
    rgb = noise_image(30, 20)
    if mode == "I;16":  # a 16-bit PNG
        im = Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)
    elif mode == "PT":  # palette with a transparent colour
        im = rgb.convert("P")
        im.info["transparency"] = 0
    else:
        im = rgb.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    im.save(path, **({"transparency": 0} if mode == "PT" else {}))
    out = read_image(path)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    if mode == "I;16":  # the 16-bit range scaled into 8 bits, not clipped to white
        assert 0 < out.mean() < 255 and out.max() > 200 and out[0, 0].max() < 5
    if mode == "CMYK":  # colours survive the trip through CMYK
        assert np.abs(out.astype(int) - np.asarray(rgb, int)).mean() < 25


def test_transparent_pixels_become_black_like_the_padding(tmp_path):
    im = Image.new("RGBA", (10, 10), (255, 255, 255, 0))
    im.paste((200, 100, 50, 255), (0, 0, 5, 10))
    im.save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out[:, 5:].max() == 0 and tuple(out[0, 0]) == (200, 100, 50)


def test_exif_rotation_is_ignored_so_boxes_follow_the_stored_pixels(tmp_path):
    # VOC's annotators saw the stored pixels: a box drawn on them must land on the same pixels.
    im = Image.new("RGB", (60, 30), (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (30, 60, 3)
    assert out[:10, :20, 0].mean() > 200 and out[20:, 40:, 0].mean() < 50


def test_a_huge_jpeg_is_decoded_reduced_without_ever_holding_it_in_full(tmp_path):
    # 10000 x 10000: 300 MB as RGB. Decoded in the DCT at 1/8, the process never holds it.
    a = np.full((10000, 10000), 20, np.uint8)
    a[5000:8000, 5000:7000] = 250
    path = tmp_path / "huge.jpg"
    path.write_bytes(cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, 50])[1].tobytes())
    del a
    code = ("import resource\nfrom helpers.imageio import read_image\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"image, scale = read_image({str(path)!r}, max_side=1000, with_scale=True)\n"
            "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "y, x = int(image.shape[0] * 0.65), int(image.shape[1] * 0.6)\n"
            "print(image.shape[0], image.shape[1], scale, (after - before) // 1024, int(image[y, x].mean()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    h, w, scale, grew_mb, bright = out.stdout.split()
    assert (int(h), int(w), float(scale)) == (1250, 1250, 0.125)  # >= max_side, reduced by 8
    assert int(grew_mb) < 100  # a full decode would add ~300 MB
    assert int(bright) > 200  # the bright patch is where its box says


def test_a_large_png_is_reduced_and_one_beyond_the_cap_refused_by_name(tmp_path, monkeypatch):
    Image.new("RGB", (3000, 2000), (10, 200, 30)).save(tmp_path / "big.png")
    image, scale = read_image(tmp_path / "big.png", max_side=1000, with_scale=True)
    assert image.shape == (667, 1000, 3) and scale == pytest.approx(1 / 3, abs=1e-3)
    monkeypatch.setattr(imageio, "MAX_DECODED_BYTES", 10_000_000)  # 3000 x 2000 x 3 bands x 1 byte = 18 MB
    with pytest.raises(ImageError, match=r"big.png: 3000x2000 PNG RGB decodes to 18.0 MB, more than this project decodes \(10.0 MB\)"):
        read_image(tmp_path / "big.png")
    monkeypatch.setattr(imageio, "MAX_FILE_BYTES", 1_000)  # refused by its size on disk, before any decode
    with pytest.raises(ImageError, match=r"big.png: the file is [\d,]+ bytes, more than this project reads \(1,000 bytes\)"):
        read_image(tmp_path / "big.png")


@pytest.mark.parametrize("mode", ["I;16", "P", "PT", "1"])
def test_modes_pil_cannot_reduce_are_reduced_band_by_band_as_if_converted_whole(tmp_path, monkeypatch, mode):
    """16-bit, palette and 1-bit images are converted a band of rows at a time, each band reduced: the
    result is the whole converted image reduced, the decode scale exact, the size ceil(stored / factor)."""
    rng = np.random.default_rng(0)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, (403, 517), dtype=np.uint16))
    else:
        im = noise_image(517, 403).convert("P" if mode == "PT" else mode)
    path = tmp_path / "x.png"
    im.save(path, **({"transparency": 3} if mode == "PT" else {}))
    monkeypatch.setattr(imageio, "_BAND_BYTES", 50_000)  # many bands, the last one partial
    out, scale = read_image(path, max_side=100, with_scale=True)
    assert scale == 1 / 5 and (out.shape[1], out.shape[0]) == imageio.decoded_size(517, 403, scale)
    whole = Image.open(path)
    whole = whole.convert({"I;16": "I", "P": "RGB", "PT": "RGBA", "1": "L"}[mode]).reduce(5)
    np.testing.assert_array_equal(out, imageio._to_rgb(whole))


def test_an_annotation_whose_size_disagrees_with_the_image_is_warned_and_boxes_follow(voc, write_voc):
    write_voc(voc, "small", voc_xml([("dog", 0, (1, 1, 96, 72))]), Image.new("RGB", (48, 36), (200, 200, 200)))
    ds = PlainDataset(voc, "trainval", image_size=64, return_meta=True)
    with pytest.warns(UserWarning, match=r"small.xml: says 96x72 but small.jpg is 48x36; boxes rescaled"):
        _, _, meta = ds[0]
    assert (meta["letterbox"].orig_h, meta["letterbox"].orig_w) == (36, 48)
    np.testing.assert_allclose(meta["gt"]["boxes"].numpy(), [[0, 0, 48, 36]])


# --- the check command ----------------------------------------------------------------------------
def test_check_lists_every_problem_with_its_file_and_fails_on_errors(voc, capsys):
    year = voc / "VOC2007"
    ids = (year / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    (year / "JPEGImages" / f"{ids[0]}.jpg").write_bytes(b"garbage")
    (year / "Annotations" / f"{ids[1]}.xml").write_text(voc_xml([("dog", 0, (-3, 1, 40, 30))]))
    (year / "Annotations" / f"{ids[2]}.xml").write_text("<annotation>")
    (year / "Annotations" / f"{ids[3]}.xml").write_text(voc_xml([("dog", 0, (1, 1, 40, 30))], width=50, height=50))
    problems = check(voc)
    found = {(p.level, p.path.name, p.message.split(" (")[0]) for p in problems}
    assert (ERROR, f"{ids[0]}.jpg", "cannot decode image") in found
    assert (WARNING, f"{ids[1]}.xml", "1 box(es) outside the 96x72 image clipped") in found
    assert (ERROR, f"{ids[2]}.xml", "malformed XML") in found
    assert (ERROR, f"{ids[3]}.xml", f"says 50x50 but {ids[3]}.jpg is 96x72") in found
    assert len(problems) == 4  # each once, though train/val/trainval list the same files
    assert annotations_main(["check", str(voc)]) == 1
    out = capsys.readouterr()
    assert f"error: {year / 'JPEGImages' / ids[0]}.jpg: cannot decode image" in out.out
    assert "3 error(s), 1 warning(s)" in out.err


def test_check_passes_a_clean_dataset_and_warnings_alone_do_not_fail(voc, course, capsys):
    assert check(voc) == [] and check(course) == []
    assert annotations_main(["check", str(course)]) == 0
    (course / "labels" / "000000.txt").write_text("1 0.5 0.5 0.2 1.5\n")
    assert annotations_main(["check", str(course), "--split", "train"]) == 0
    assert "warning:" in capsys.readouterr().out


def test_check_runs_as_a_module_command(tmp_path):
    (tmp_path / "empty").mkdir()
    run = subprocess.run([sys.executable, "-m", "helpers.annotations", "check", str(tmp_path / "empty")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1 and "not a dataset folder" in run.stdout


# --- real photos ----------------------------------------------------------------------------------
def test_the_real_photo_devkit_reads_cleanly(realdet):
    with no_warnings():
        trainval, test = load_records(realdet, "trainval"), load_records(realdet, "test")
    assert (len(trainval), len(test)) == (158, 39)
    assert sum(len(r.labels) for r in trainval + test) == 974
    assert sum(int(r.difficult.sum()) for r in trainval + test) == 7
    image, boxes, meta = PlainDataset(realdet, "test", image_size=416, return_meta=True)[0]
    assert image.shape == (3, 416, 416) and len(meta["gt"]["boxes"]) >= len(boxes) > 0


def test_the_datamodule_skips_broken_annotations_by_default_and_raises_when_configured(voc, write_voc):
    """A training run never stops on one bad annotation file (DataConfig.on_error="skip", warned),
    unless the config asks to refuse the dataset."""
    from helpers.config import DataConfig
    from helpers.datamodule import YOLODataModule

    write_voc(voc, "good", voc_xml([("dog", 0, (1, 1, 40, 30))]), Image.new("RGB", (96, 72)))
    write_voc(voc, "bad", "<annotation>", Image.new("RGB", (96, 72)), append=True)
    cfg = DataConfig(root=str(voc), train_split="trainval", val_split="trainval", image_size=64, train_sizes=(64,))
    with pytest.warns(UserWarning, match="bad.xml"):
        dm = YOLODataModule(cfg)
        dm.setup("fit")
    assert len(dm.train_dataset) == len(dm.val_dataset) == 1
    cfg.on_error = "raise"
    with pytest.raises(DatasetError, match="bad.xml"):
        YOLODataModule(cfg).setup("fit")
