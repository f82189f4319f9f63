"""The app's functions (boxes, table, one CAM per detection), every bad input, no-model mode, the
Space builder, and the app served on a local port and called with gradio_client."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.version import Version
from PIL import Image, ImageOps

from app import app as webapp
from helpers.config import VOC_CLASSES, Config
from helpers.export import write_bundle
from helpers.model import ScalePrediction, YOLOv3
from helpers.space import SPACE_MODULES
from helpers.synthetic import make_voc_dataset

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "app" / "examples"
SIZE = 128  # tiny model at a small input: the whole file stays fast on 2 CPU cores
PERSON = VOC_CLASSES.index("person")


def tiny_confident_model(seed: int = 0) -> YOLOv3:
    """A random-init tiny YOLOv3 whose head biases make every cell a confident 'person'.

    An untrained model scores about sigmoid(0) x 1/20 = 0.025 everywhere, so whether anything passes a
    realistic threshold would depend on the random draw. Objectness bias +6 (sigmoid ~ 0.998) and
    person bias +5 (softmax ~ 0.89 against 19 zeros) put every candidate near 0.88: detections are
    certain, NMS decides which survive, and the features still drive the scores (so gradients exist).
    """
    torch.manual_seed(seed)
    model = YOLOv3(num_classes=20, width=0.125).eval()
    with torch.no_grad():
        for head in (m for m in model.layers if isinstance(m, ScalePrediction)):
            bias = head.pred[1].conv.bias.view(3, 25)
            bias[:, 0] = 6.0
            bias[:, 5 + PERSON] = 5.0
    return model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    cfg = Config()
    cfg.model.width = 0.125
    cfg.data.image_size = SIZE
    return write_bundle(tiny_confident_model(), cfg, tmp_path_factory.mktemp("b") / "bundle",
                        metrics={"val/map50_voc07": 0.123}, hub_repo="someone/yolov3-voc")


@pytest.fixture(scope="module")
def loaded(bundle):
    model, status = webapp.load_source(bundle)
    assert model is not None, status
    return model


@pytest.fixture(scope="module")
def sample() -> Path:
    return sorted(SAMPLES.glob("0*.jpg"))[0]  # a photo (the generated samples are named shapes_*)


def run(loaded, image, **kw):
    settings = dict(conf=0.5, iou=0.45, size=SIZE, cam_method="Grad-CAM", top_k=3) | kw
    return webapp.predict(loaded, image, **settings)


# --- the functions ----------------------------------------------------------------------------
def test_predict_gives_boxes_table_and_one_cam_per_detection(loaded, sample):
    r = run(loaded, str(sample), top_k=4)
    w, h = Image.open(sample).size
    assert r.annotated is not None and r.annotated.size == (w, h)
    assert len(r.rows) == len(r.detections) >= 4
    assert len(r.cams) == 4
    for k, (image, caption) in enumerate(r.cams):
        assert image.size == (w, h)
        assert caption.startswith(f"{k + 1}. person {r.rows[k][2]:.2f}") and "Grad-CAM" in caption
    assert not np.array_equal(np.asarray(r.cams[0][0]), np.asarray(r.annotated))  # a heat map is on it


def test_table_rows_are_sorted_scored_classed_and_inside_the_image(loaded, sample):
    r = run(loaded, str(sample))
    w, h = Image.open(sample).size
    rows = np.array([row[2:] for row in r.rows], dtype=float)
    assert [row[0] for row in r.rows] == list(range(1, len(r.rows) + 1))
    assert all(row[1] in VOC_CLASSES for row in r.rows)
    assert (np.diff(rows[:, 0]) <= 0).all() and (rows[:, 0] > 0.5).all()
    assert (rows[:, 1] >= 0).all() and (rows[:, 3] <= w).all() and (rows[:, 4] <= h).all()
    assert (rows[:, 3] > rows[:, 1]).all() and (rows[:, 4] > rows[:, 2]).all()


def test_top_k_zero_gives_boxes_without_cams_and_threshold_one_gives_none(loaded, sample):
    assert run(loaded, str(sample), top_k=0).cams == []
    r = run(loaded, str(sample), conf=1.0)
    assert r.rows == [] and r.cams == [] and "0 detections" in r.message and "lower" in r.message


def test_gradcam_equals_pytorch_grad_cam_on_the_whole_network(loaded, sample):
    """The app's Grad-CAM (BatchNorm folded, one cached forward pass, only each scale's head run again)
    is the library's plain Grad-CAM of the unfused model run end to end on the letterboxed image, with
    the same target layer (the last feature map of the detection's scale) and the same target (the
    detection's own row of the flattened output, its log score)."""
    from pytorch_grad_cam import GradCAM

    from helpers.cam import DetectionTarget, FlatOutputs, prediction_features, unravel_index

    upload = webapp.read_upload(sample)
    result, job = webapp.predict_boxes(loaded, upload, 0.5, 0.45, SIZE, "Grad-CAM", 3)
    top = result.detections[:3]
    ours, _ = webapp.cam_maps(loaded, job, top)  # [K, S, S] over the input
    rows = job.rows[:3]
    plain = tiny_confident_model().eval()  # the same weights, BatchNorm not folded
    layers = prediction_features(plain)
    for k, (row, scale) in enumerate(zip(rows.tolist(), unravel_index(rows, job.capture.outputs)[:, 0])):
        with GradCAM(model=FlatOutputs(plain), target_layers=[layers[int(scale)]]) as cam:
            lib = cam(input_tensor=job.capture.image.contiguous(), targets=[DetectionTarget(row, int(top[k, 5]))])[0]
        np.testing.assert_allclose(ours[k], lib, atol=1e-4)


def test_eigencam_gives_one_map_per_detection(loaded, sample):
    r = run(loaded, str(sample), cam_method="EigenCAM", top_k=2)
    assert len(r.cams) == 2 and all("EigenCAM" in caption for _, caption in r.cams)


def test_predict_steps_show_the_boxes_first_then_end_on_predicts_result(loaded, sample):
    first, last = webapp.predict_steps(loaded, str(sample), conf=0.5, size=SIZE, top_k=2)
    assert first.rows and first.cams == [] and first.message.endswith("Computing the CAMs…")
    assert last.rows == first.rows and len(last.cams) == 2 and "for the top 2" in last.message
    again = run(loaded, str(sample), top_k=2)
    assert again.rows == last.rows and [c for _, c in again.cams] == [c for _, c in last.cams]
    assert len(list(webapp.predict_steps(loaded, str(sample), conf=0.5, size=SIZE, top_k=0))) == 1  # no CAMs to wait for


def test_a_failure_inside_predict_is_one_message_in_the_page(loaded, sample, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(webapp, "detection_cams", broken)
    *_, last = webapp.predict_steps(loaded, str(sample), conf=0.5, size=SIZE, top_k=2)
    assert last.message.startswith("**Something went wrong") and "RuntimeError" in last.message
    assert run(loaded, str(sample), top_k=2).message == last.message


def test_the_page_calls_predict_steps(bundle, sample, tmp_path, monkeypatch):
    """The page's handler is `predict_steps` with each step's images written as files: the boxes first,
    then the final step, whose table, captions and message are `predict`'s."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "cache"))
    demo = webapp.build_demo(bundle, None)
    handler = next(fn.fn for fn in demo.fns.values() if fn.api_name == "predict")
    steps = list(handler(str(sample), 0.5, 0.45, SIZE, "Grad-CAM", 2))
    (boxes, rows, gallery, message), (annotated, final_rows, final_gallery, final_message) = steps
    assert gallery == [] and "Computing the CAMs" in message
    assert annotated == boxes and Path(annotated).is_relative_to(tmp_path / "cache")  # one file for both steps
    assert Image.open(annotated).size == Image.open(sample).size
    expected = webapp.predict(webapp.load_source(bundle)[0], str(sample), 0.5, 0.45, SIZE, "Grad-CAM", 2)
    assert final_rows == rows == expected.rows
    assert [caption for _, caption in final_gallery] == [caption for _, caption in expected.cams]
    assert all(Path(path).is_file() for path, _ in final_gallery)
    seconds = re.compile(r"[0-9.]+ s\b")  # timings differ
    assert seconds.sub("", final_message) == seconds.sub("", expected.message)


def test_an_output_image_is_written_whole_once_and_never_rewritten(tmp_path):
    """Gradio rewrites its cached output file in place when two requests give the same image, while the
    file may be being sent (a broken download); the app's own writer leaves an existing file alone."""
    from gradio.processing_utils import save_pil_to_cache

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
    theirs = Path(save_pil_to_cache(image, str(tmp_path / "gradio"), format="jpeg"))
    written = theirs.stat().st_mtime_ns
    time.sleep(0.05)
    assert save_pil_to_cache(image, str(tmp_path / "gradio"), format="jpeg") == str(theirs)
    assert theirs.stat().st_mtime_ns != written, "Gradio no longer rewrites: save_output may be unneeded"
    shutil.rmtree(tmp_path / "gradio")

    path = Path(webapp.save_output(image, tmp_path, "detections"))
    before = path.stat()
    assert webapp.save_output(image.copy(), tmp_path, "detections") == str(path)
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    other = webapp.save_output(Image.new("RGB", (64, 48)), tmp_path, "detections")
    assert other != str(path) and Image.open(other).size == (64, 48)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["detections.jpg", "detections.jpg"]


@pytest.mark.parametrize("h, w", [(427, 640), (640, 427), (333, 500), (100, 101), (128, 128)])
def test_letterbox_describes_where_the_image_lands(h, w):
    x, lb = webapp.to_input(np.full((h, w, 3), 255, np.uint8), SIZE)
    rows, cols = np.nonzero(x[0, 0].numpy() > 0.5)
    assert (lb.orig_h, lb.orig_w) == (h, w)
    assert (cols.min(), rows.min()) == (lb.pad_left, lb.pad_top)
    assert (rows.max() + 1 - lb.pad_top, cols.max() + 1 - lb.pad_left) == lb.content_hw


def test_each_detection_keeps_its_row_of_the_raw_outputs(loaded, sample):
    """The CAMs differentiate the row `detect` picked, also for boxes clipped at the image's edge."""
    from helpers.cam import flatten_outputs

    upload = webapp.read_upload(sample)
    result, job = webapp.predict_boxes(loaded, upload, 0.5, 0.45, SIZE, "Grad-CAM", 3)
    dets = result.detections
    assert (dets[:, 3] == Image.open(sample).size[1]).any()  # boxes clipped at the image's edge are among them
    cells = flatten_outputs(job.capture.outputs)[0, job.rows]
    score = cells[:, 0].sigmoid() * cells[:, 5:].softmax(-1).gather(1, dets[:, 5:6].long())[:, 0]
    torch.testing.assert_close(score, dets[:, 4], atol=1e-5, rtol=0)


def test_model_is_loaded_once_per_source(bundle, monkeypatch):
    calls = []
    real = webapp.load_bundle
    monkeypatch.setattr(webapp, "load_bundle", lambda *a, **k: calls.append(a) or real(*a, **k))
    copy = bundle.parent / "same-bundle"
    copy.symlink_to(bundle, target_is_directory=True)
    first, _ = webapp.load_source(copy)
    second, _ = webapp.load_source(copy)
    assert first is second and len(calls) == 1


def _slider_value(demo, elem_id: str = "conf"):
    return next(c["props"]["value"] for c in demo.config["components"] if c["props"].get("elem_id") == elem_id)


def _about_text(demo) -> str:
    return next(c["props"]["value"] for c in demo.config["components"] if c["props"].get("elem_id") == "about")


def test_the_confidence_slider_starts_at_the_bundles_threshold_and_the_page_says_where_it_came_from(tmp_path):
    cfg = Config()
    cfg.model.width = 0.125
    cfg.data.image_size = SIZE
    source = "F1-best on the test split of `VOCdevkit` (8 images, 20 objects, 128 px): F1 0.500"
    bundle = write_bundle(tiny_confident_model(), cfg, tmp_path / "bundle",
                          display={"display_conf": 0.23, "display_conf_source": source})
    demo = webapp.build_demo(bundle, SAMPLES)
    assert _slider_value(demo) == 0.23
    assert f"**Confidence threshold:** the slider starts at 0.23: {source}." in _about_text(demo)


def test_a_bundle_without_a_threshold_starts_at_the_apps_default_and_says_so(bundle):
    demo = webapp.build_demo(bundle, SAMPLES)  # the module's bundle: written without display_conf
    assert _slider_value(demo) == webapp.DEFAULT_CONF == 0.4
    assert "the slider starts at 0.4: the app's default (this bundle records no threshold" in _about_text(demo)


def test_predict_without_a_threshold_uses_the_bundles(tmp_path, sample):
    cfg = Config()
    cfg.model.width = 0.125
    cfg.data.image_size = SIZE
    bundle = write_bundle(tiny_confident_model(), cfg, tmp_path / "strict", display={"display_conf": 0.99})
    strict, _ = webapp.load_source(bundle)
    r = webapp.predict(strict, str(sample), size=SIZE, top_k=0)  # every score of the model is ~0.88
    assert "score > 0.99" in r.message and r.rows == []
    assert len(webapp.predict(strict, str(sample), conf=0.5, size=SIZE, top_k=0).rows) > 0


# --- no model -----------------------------------------------------------------------------------
def test_without_a_model_predict_says_so_and_shows_nothing(sample):
    r = webapp.predict(None, str(sample))
    assert "No trained model is loaded" in r.message and "--bundle" in r.message
    assert r.annotated is None and r.rows == [] and r.cams == []


def test_without_a_model_the_page_builds_and_states_it():
    demo = webapp.build_demo(None, SAMPLES)
    texts = json.dumps(demo.config)
    assert "No trained model is loaded" in texts and "YOLO_HUB_REPO" in texts


def test_unreachable_hub_repo_fails_gracefully(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine has no network anyway; offline makes it instant
    model, status = webapp.load_source(None, "nobody-here/no-such-yolo-repo")
    assert model is None and "Could not download" in status and "no-such-yolo-repo" in status


def test_broken_bundle_fails_gracefully(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    model, status = webapp.load_source(tmp_path / "bad")
    assert model is None and "Could not load the model bundle" in status


# --- bad input ------------------------------------------------------------------------------------
def _png_claiming(width: int, height: int, mode: str = "L") -> bytes:
    """A valid 1x1 PNG whose header claims width x height (a decompression bomb, without the memory)."""
    buf = io.BytesIO()
    Image.new(mode, (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8  # signature, then the IHDR chunk: length(4) type(4) width(4) height(4) ...
    data[ihdr + 8: ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4: ihdr + 8 + 13]))
    data[ihdr + 8 + 13: ihdr + 8 + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize("name, content", [
    ("notes.txt", b"this is not an image at all\n"),
    ("empty.jpg", b""),
    ("garbage.jpg", bytes(range(256)) * 40),
    ("truncated.jpg", None),  # the first 120 bytes of a real JPEG: header, no image data
    ("bomb.png", None),
])
def test_unusable_files_give_a_readable_message_not_an_error(loaded, sample, tmp_path, name, content):
    path = tmp_path / name
    if name == "truncated.jpg":
        content = sample.read_bytes()[:120]
    elif name == "bomb.png":
        content = _png_claiming(30000, 30000)
    path.write_bytes(content)
    r = run(loaded, str(path))
    assert r.annotated is None and r.rows == [] and r.cams == []
    assert "cannot be used as an image" in r.message and "Traceback" not in r.message
    assert str(tmp_path) not in r.message  # the server's temporary path is not shown


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "LA"])
def test_any_image_mode_gives_a_correct_result(loaded, sample, tmp_path, mode):
    rgb = Image.open(sample).convert("RGB").resize((160, 120))
    if mode == "I;16":
        image = Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16))
        assert image.mode.startswith("I;16")
    elif mode == "RGBA":
        image = rgb.convert("RGBA")
        image.putalpha(Image.linear_gradient("L").resize(rgb.size))
    else:
        image = rgb.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    r = run(loaded, str(path))
    assert r.annotated is not None and r.annotated.size == (160, 120) and r.annotated.mode == "RGB"
    assert len(r.rows) > 0 and len(r.cams) == 3
    if mode not in ("L",):
        assert "converted from" in r.message


def _write(image: Image.Image, path: Path, **kw) -> Path:
    image.save(path, **kw)
    return path


@pytest.mark.parametrize("make, note", [
    (lambda p: _write(Image.fromarray(np.arange(160 * 120, dtype=np.uint16).reshape(120, 160) * 3), p / "g.png"),
     "converted from 16-bit PNG mode I;16 to 8-bit RGB"),
    (lambda p: p / "rgb48.png" if cv2_write(p / "rgb48.png", np.full((120, 160, 3), 40000, np.uint16)) else None,
     "converted from 16-bit PNG mode RGB to 8-bit RGB"),
    (lambda p: _write(Image.new("RGB", (160, 120)), p / "a.gif", save_all=True,
                      append_images=[Image.new("RGB", (160, 120), (255, 0, 0)), Image.new("RGB", (160, 120), "blue")]),
     "only the first of its 3 frames used (animated GIF)"),
    (lambda p: _write(Image.new("RGB", (160, 120)), p / "a.webp", save_all=True,
                      append_images=[Image.new("RGB", (160, 120), (255, 0, 0))]),
     "only the first of its 2 frames used (animated WebP)"),
    (lambda p: _write(Image.new("RGB", (160, 120)), p / "pages.tif", save_all=True,
                      append_images=[Image.new("RGB", (160, 120), (255, 0, 0))]),
     "only the first of its 2 frames used (multi-page TIFF)"),
])
def test_the_page_says_when_an_image_was_converted_or_only_its_first_frame_used(loaded, tmp_path, make, note):
    r = run(loaded, str(make(tmp_path)), top_k=0)
    assert r.annotated is not None and r.annotated.size == (160, 120)
    assert note in r.message


def cv2_write(path: Path, array: np.ndarray) -> bool:
    import cv2

    return cv2.imwrite(str(path), array)


def test_oversize_files_are_refused_before_decoding_with_one_line_and_no_warning(loaded, tmp_path, monkeypatch):
    # 12000 x 12000 RGB: 432 MB decoded, over the decode cap; PIL itself would only warn about it
    bomb = tmp_path / "wide.png"
    bomb.write_bytes(_png_claiming(12000, 12000, mode="RGB"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = run(loaded, str(bomb))
    assert "wide.png: 12000x12000 PNG RGB decodes to 432.0 MB, more than this project decodes" in r.message
    assert "\n" not in r.message and r.annotated is None
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8" + bytes(webapp.MAX_UPLOAD))  # never opened: refused from its size on disk
    r = run(loaded, str(big))
    assert f"big.jpg: the file is {(webapp.MAX_UPLOAD + 2) / 1e6:.1f} MB, more than this project reads" in r.message


@pytest.mark.slow
def test_a_huge_16_bit_png_costs_its_decoded_bytes_not_a_float_copy_of_them(tmp_path):
    """10,000 x 10,000 16-bit grayscale (a few hundred KB on disk, 200 MB decoded): decoded once, then
    shrunk band by band to 8 bits. The process's peak grows by about the 200 MB decode, not by the
    ~1.5 GB of converting the whole image through floats (what the app did before)."""
    row = (np.arange(10_000, dtype=np.uint32) * 6 % 65536).astype(np.uint16)
    a = np.broadcast_to(row, (10_000, 10_000)).copy()
    a[4000:6000, 3000:7000] = 60000
    path = _write(Image.fromarray(a), tmp_path / "scan.png", compress_level=1)
    del a
    code = ("import resource\nfrom app import app\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"u = app.read_upload({str(path)!r})\n"
            "grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024\n"
            "print(u.image.shape[1], u.image.shape[0], grew, int(u.image[555, 555].mean()), int(u.image[0, 0].mean()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    w, h, grew_mb, bright, dark = map(int, out.stdout.split())
    assert (w, h) == (1112, 1112)  # reduced by 9: no less than half of the app's MAX_SIDE
    assert grew_mb < 400, f"peak memory grew by {grew_mb} MB"
    assert bright > 220 and dark < 10  # the bright patch is where it was, the 16-bit range scaled to 8 bits


def test_exif_rotated_photo_is_shown_upright_with_boxes_on_the_upright_image(loaded, sample, tmp_path):
    upright = Image.open(sample).convert("RGB").resize((120, 160))  # portrait, as the viewer should see it
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # landscape pixels, as a phone stores them
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    stored.save(tmp_path / "phone.png", exif=exif.tobytes())
    upright.save(tmp_path / "plain.png")
    assert ImageOps.exif_transpose(Image.open(tmp_path / "phone.png")).size == (120, 160)

    rotated, plain = run(loaded, str(tmp_path / "phone.png")), run(loaded, str(tmp_path / "plain.png"))
    assert rotated.annotated.size == (120, 160)
    assert np.array_equal(np.asarray(webapp.read_upload(tmp_path / "phone.png").image), np.asarray(upright))
    assert rotated.rows == plain.rows and len(rotated.rows) > 0
    assert "upright" in rotated.message

    # a JPEG from a phone too (lossy, so only the geometry is compared)
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    assert run(loaded, str(tmp_path / "phone.jpg")).annotated.size == (120, 160)


def test_huge_image_is_downscaled_first_and_reported_in_original_pixels(loaded, sample, tmp_path):
    big = Image.open(sample).convert("RGB").resize((5000, 3000))
    big.save(tmp_path / "big.jpg", quality=80)
    r = run(loaded, str(tmp_path / "big.jpg"), top_k=1)
    w, h = r.annotated.size
    assert webapp.MAX_SIDE // 2 <= w <= webapp.MAX_SIDE and abs(h / w - 0.6) < 0.01
    assert f"downscaled from 5000x3000 to {w}x{h}" in r.message
    rows = np.array([row[3:] for row in r.rows], dtype=float)
    assert rows[:, 2].max() <= 5000 and rows[:, 3].max() <= 3000 and rows[:, 2].max() > w  # original pixels

    png = tmp_path / "big.png"
    big.resize((4500, 1500)).save(png)
    w, h = run(loaded, str(png), top_k=0).annotated.size
    assert webapp.MAX_SIDE // 2 <= w <= webapp.MAX_SIDE and abs(h - w / 3) <= 1


@pytest.mark.parametrize("settings, expected", [
    (dict(conf=1.5), "must lie in 0..1"),
    (dict(iou=-0.1), "must lie in 0..1"),
    (dict(size=100), "multiple of 32"),
    (dict(cam_method="LIME"), "CAM method"),
    (dict(top_k="many"), "must be numbers"),
])
def test_bad_settings_give_a_message(loaded, sample, settings, expected):
    r = run(loaded, str(sample), **settings)
    assert r.annotated is None and expected in r.message


def test_no_image_asks_for_one(loaded):
    assert "Upload an image" in run(loaded, None).message


# --- the Space ------------------------------------------------------------------------------------
def _floors(text: str) -> dict[str, Version | None]:
    """{distribution: its floor (None without one)} of a requirements file, other lines ("--extra-index-url")
    as keys of their own."""
    out = {}
    for line in text.splitlines():
        name, _, floor = line.partition(">=")
        out[name.strip().lower().replace("_", "-")] = Version(floor) if floor else None
    return out


def test_app_requirements_file_is_what_the_space_builder_derives():
    # The same distributions and index as the builder derives; the floors are the versions installed
    # where the file was written, so here they need only be met (PyPI moves on, the file stays).
    from helpers.space import app_modules, requirements

    committed = _floors((ROOT / "app" / "requirements.txt").read_text())
    derived = _floors(requirements(app_modules()[1]))
    assert committed.keys() == derived.keys()
    too_new = {d: f"{committed[d]} > {derived[d]}" for d in committed
               if committed[d] and derived[d] and committed[d] > derived[d]}
    assert not too_new, f"app/requirements.txt asks for more than is installed here: {too_new}"


def test_the_space_carries_every_helpers_module_the_app_imports_and_no_training_module():
    from helpers.space import imported_modules

    carried = set(SPACE_MODULES)
    assert imported_modules() <= carried, "app/app.py imports helpers modules missing from space.SPACE_MODULES"
    assert carried <= imported_modules(lazy=True), "space.SPACE_MODULES lists a module the app never imports"
    assert not carried & {"checkpoints", "export", "train", "module", "datamodule"}  # Lightning stays out


def test_what_a_space_carries_does_not_change_when_an_import_moves_into_a_function(tmp_path):
    from helpers.space import app_modules

    app = tmp_path / "app.py"
    app.write_text("from helpers.config import VOC_CLASSES\n")
    eager = app_modules(app)[0]
    app.write_text("def run():\n    from helpers.config import VOC_CLASSES\n")
    assert app_modules(app)[0] == eager == sorted(ROOT / "helpers" / f"{m}.py" for m in SPACE_MODULES)


def test_optional_imports_do_not_become_space_requirements(tmp_path):
    from helpers.space import read_imports

    module = tmp_path / "m.py"
    module.write_text("import numpy\ndef show():\n    try:\n        from IPython.display import display\n"
                      "    except ImportError:\n        return\n    import scipy\n"
                      "try:\n    import yaml\nexcept ImportError:\n    raise SystemExit('needs yaml')\n"
                      "try:\n    from .boxes import iou\nexcept ImportError:\n    pass\n")
    helpers, external = read_imports(module, lazy_helpers=False)
    assert external == {"numpy", "scipy", "yaml"}  # IPython is optional; yaml is required after all
    assert helpers == {"boxes"}  # project modules are always copied


def test_app_readme_has_the_spaces_front_matter():
    import gradio

    text = (ROOT / "app" / "README.md").read_text()
    front = dict(line.split(": ", 1) for line in text.split("---")[1].strip().splitlines() if ": " in line)
    assert front["sdk"] == "gradio" and front["sdk_version"] == gradio.__version__
    assert front["app_file"] == "app.py" and {"title", "emoji", "pinned", "license"} <= set(front)


def test_app_examples_are_few_real_photos_each_attributed_and_generated_shapes():
    photos = sorted(p for p in SAMPLES.glob("*.jpg") if not p.name.startswith(webapp.GENERATED_SAMPLE))
    assert 1 <= len(photos) <= 6
    attribution = (SAMPLES / "ATTRIBUTION.md").read_text()
    shapes = sorted(SAMPLES.glob(webapp.GENERATED_SAMPLE + "*"))
    assert 1 <= len(shapes) <= 4 and all(p.name in attribution for p in shapes)
    assert "helpers.synthetic" in attribution
    known = json.loads((SAMPLES / "coco_licences.json").read_text())["images"]
    for p in photos:
        assert p.name in attribution and known[p.stem]["licence"] in attribution
        assert known[p.stem]["licence"] in ("Attribution License", "Attribution-ShareAlike License",
                                            "No known copyright restrictions")


@pytest.mark.slow
def test_space_build_is_self_contained_and_runs(bundle, tmp_path):
    from helpers.space import build
    from helpers.space import main as space_main

    voc = make_voc_dataset(tmp_path / "voc", n_trainval=2, n_test=4, image_size=(96, 72), seed=3)
    out = build(tmp_path / "space", bundle, voc, count=3)
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"app.py", "requirements.txt", "README.md", "space_settings.json", "bundle/model.safetensors",
            "bundle/config.json", "examples/ATTRIBUTION.md", "helpers/__init__.py", "helpers/weights.py"} <= names
    assert len([n for n in names if n.startswith("examples/") and n.endswith(".jpg")]) == 3
    assert {f"helpers/{m}.py" for m in SPACE_MODULES} == {n for n in names if n.startswith("helpers/")}
    assert "helpers/checkpoints.py" not in names and "helpers/export.py" not in names  # training-only modules stay out
    readme = (out / "README.md").read_text()
    assert "sdk: gradio" in readme and "app_file: app.py" in readme and "someone/yolov3-voc" in readme
    assert "download.pytorch.org/whl/cpu" in (out / "requirements.txt").read_text()

    # The Space runs from its own folder only (the repository is not importable there).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "YOLO_BUNDLE", "YOLO_HUB_REPO")}
    script = ("import sys, app; m, s = app.load_source(*app.default_sources()); assert m is not None, s; "
              "import pathlib; p = sorted(pathlib.Path('examples').glob('*.jpg'))[0]; "
              "r = app.predict(m, str(p), conf=0.5, size=128, top_k=2); "
              "assert len(r.cams) == 2, r.message; "
              "assert all(mod.__file__.startswith(sys.path[0]) for n, mod in sys.modules.items() "
              "if n.startswith('helpers')); print('ok', len(r.rows))")
    done = subprocess.run([sys.executable, "-c", script], cwd=out, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]

    assert space_main(["build", str(out), "--bundle", str(bundle)]) == 2  # never overwritten


def test_space_takes_only_shareable_photos_where_known_then_class_coverage():
    from helpers.annotations import Record
    from helpers.space import choose_samples

    def rec(name, labels):
        return Record(image_path=Path(f"/d/{name}.jpg"), boxes=np.zeros((len(labels), 4), np.float32),
                      labels=np.array(labels, np.int64), difficult=np.zeros(len(labels), bool), width=96, height=72)

    records = [rec("a", [0]), rec("b", [0, 1]), rec("c", [2]), rec("d", [3, 4, 5]), rec("e", [])]
    known = {"c": {"licence": "Attribution License", "coco_split": "train2017", "coco_id": 1, "coco_url": "u",
                   "flickr_url": "f", "licence_url": "l"}}
    assert [s.record.image_path.stem for s in choose_samples(records, 3, known)] == ["c"]  # shareable only
    chosen = [s.record.image_path.stem for s in choose_samples(records, 3, {})]
    assert chosen == ["d", "b", "c"]  # no licence known: most new classes first; empty images never


# --- served on a local port -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(bundle):
    demo = webapp.build_demo(bundle, SAMPLES)
    port = free_port()
    webapp.serve(demo, "127.0.0.1", port, concurrency=1, max_file_size="1mb", block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.mark.slow
def test_served_app_answers_gradio_client_upload_with_thresholds(server, sample):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    # two requests at once: the queue runs them one after the other, both answer
    jobs = [client.submit(handle_file(str(sample)), conf, 0.45, 416, "Grad-CAM", 2, api_name="/predict")
            for conf in (0.5, 0.95)]
    results = [job.result(timeout=120) for job in jobs]
    (annotated, table, gallery, message), (_, strict_table, _, _) = results
    assert Path(annotated).is_file() and Image.open(annotated).size == Image.open(sample).size
    rows = table["data"]
    assert table["headers"] == webapp.TABLE_HEADERS and len(rows) >= 2
    assert len(gallery) == 2 and all(Path(item["image"]).is_file() for item in gallery)
    assert [item["caption"].split(" · ")[0] for item in gallery] == [f"{r[0]}. {r[1]} {r[2]:.2f}" for r in rows[:2]]
    assert "detection" in message and "Grad-CAM" in message
    assert len(strict_table["data"]) <= len(rows)  # a higher threshold keeps fewer boxes


@pytest.mark.slow
def test_served_app_answers_every_one_of_many_users_asking_for_the_same_image_at_once(server, sample):
    """Identical outputs share one cached file: it is never rewritten while another user downloads it."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    users = 16
    clients = [Client(server, verbose=False) for _ in range(users)]
    start = threading.Barrier(users)

    def ask(client):
        start.wait()
        return client.predict(handle_file(str(sample)), 0.5, 0.45, SIZE, "Grad-CAM", 5, api_name="/predict")

    with ThreadPoolExecutor(users) as pool:
        answers = list(pool.map(ask, clients))  # a broken download raises here
    sizes = {Path(annotated).stat().st_size for annotated, _, _, _ in answers}
    assert len(sizes) == 1 and all(len(gallery) == 5 for _, _, gallery, _ in answers)


@pytest.mark.slow
def test_served_app_refuses_uploads_over_the_size_limit_and_explains_bad_files(server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 800, 3), np.uint8)).save(big)
    assert big.stat().st_size > 1_000_000
    with pytest.raises(Exception, match="(?i)size|large|exceed"):
        client.predict(handle_file(str(big)), 0.5, 0.45, 416, "Grad-CAM", 1, api_name="/predict")
    bad = tmp_path / "not-a-photo.jpg"
    bad.write_bytes(b"hello")
    annotated, table, gallery, message = client.predict(handle_file(str(bad)), 0.5, 0.45, 416, "Grad-CAM", 1,
                                                         api_name="/predict")
    assert annotated is None and "cannot be used as an image" in message


def test_serve_queues_requests_one_at_a_time_by_default(bundle):
    demo = webapp.build_demo(bundle, SAMPLES)
    demo.queue(default_concurrency_limit=1)
    fns = [fn for fn in demo.fns.values() if fn.api_name == "predict"]
    assert fns and all(fn.concurrency_limit in (1, "default") for fn in fns)
    assert threading.active_count() >= 1
