"""The app in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright.

Uploads a photo, waits for the annotated image, the table and the CAM gallery, and saves a
screenshot (to tmp_path; to images/app_screenshot.png as well when YOLO_APP_SCREENSHOT=1, with the
model from YOLO_BUNDLE if set, else the tiny test model). A model trained on the generated shapes gets
a generated shapes sample, any other a photo (YOLO_APP_SAMPLE names another file in app/examples;
YOLO_APP_CONF sets the confidence threshold first). Skipped where Chromium or Playwright is
missing. Never downloads a browser.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from PIL import Image

from app import app as webapp
from helpers.config import Config
from helpers.export import write_bundle

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "app" / "examples"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 90_000

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian packages chromium + chromium-driver; .ci/run installs them)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=TIMEOUT_MS)
        yield browser
        browser.close()


def _bundle(tmp_path_factory) -> Path:
    if os.environ.get("YOLO_BUNDLE"):
        return Path(os.environ["YOLO_BUNDLE"])
    from tests.test_app import SIZE, tiny_confident_model

    cfg = Config()
    cfg.model.width = 0.125
    cfg.data.image_size = SIZE
    return write_bundle(tiny_confident_model(), cfg, tmp_path_factory.mktemp("browser") / "bundle",
                        metrics={"val/map50_voc07": 0.123}, hub_repo="someone/yolov3-voc")


def _serve(bundle):
    demo = webapp.build_demo(bundle, SAMPLES)
    port = _free_port()
    webapp.serve(demo, "127.0.0.1", port, block=False)
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    bundle = _bundle(tmp_path_factory)
    demo, url = _serve(bundle)
    yield url, webapp.load_source(bundle)[0]
    demo.close()


def _sample(loaded) -> Path:
    """YOLO_APP_SAMPLE (a file in app/examples) if set; else a generated shapes image for a model trained
    on those, a photo for any other."""
    if os.environ.get("YOLO_APP_SAMPLE"):
        return SAMPLES / os.environ["YOLO_APP_SAMPLE"]
    if webapp.trained_on_generated_data(loaded):
        return sorted(SAMPLES.glob(webapp.GENERATED_SAMPLE + "*"))[0]
    return SAMPLES / "000000000542.jpg"


def _upload(page, path: Path) -> None:
    page.locator("#input-image input[type=file]").set_input_files(str(path))


def test_upload_shows_boxes_table_and_cam_gallery(browser, served, tmp_path):
    url, loaded = served
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    about = page.locator("#about")
    about.get_by_text("The 20 classes this model detects").wait_for()
    assert about.get_by_text("tvmonitor").count() >= 1
    assert about.get_by_text("Trained on:").count() == 1
    # the confidence slider starts at the bundle's threshold, and the page says where it came from
    assert about.get_by_text("Confidence threshold:").count() == 1
    assert float(page.locator("#conf input[type=number]").input_value()) == loaded.display_conf[0]
    if not os.environ.get("YOLO_BUNDLE"):  # the test bundle's metrics and model link
        assert about.get_by_text("mAP at IoU 0.5 (VOC07 11-point)").count() == 1
        assert about.locator("a[href='https://huggingface.co/someone/yolov3-voc']").count() == 1
    if os.environ.get("YOLO_APP_CONF"):  # the confidence threshold to show the model at, set before the upload
        number = page.locator("#conf input[type=number]")
        number.fill(os.environ["YOLO_APP_CONF"])
        number.press("Enter")
    _upload(page, _sample(loaded))
    page.locator("#annotated img").first.wait_for(state="visible")
    page.locator("#cams img").first.wait_for(state="visible")
    page.locator("#message").get_by_text("for the top").wait_for()
    assert page.locator("#cams img").count() >= 1
    if not os.environ.get("YOLO_BUNDLE"):  # the test model sees a person everywhere
        assert page.locator("#table").get_by_text("person").count() >= 1
    assert "detection" in page.locator("#message").inner_text()
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("YOLO_APP_SCREENSHOT") == "1":
        (ROOT / "images").mkdir(exist_ok=True)  # 256 colours: a third of the bytes, for the repository
        Image.open(shot).convert("RGB").quantize(256).save(ROOT / "images" / "app_screenshot.png", optimize=True)
    page.close()


def test_a_corrupt_upload_gets_a_message_in_the_page(browser, served, tmp_path):
    bad = tmp_path / "holiday.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a photo" * 10)
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(served[0])
    _upload(page, bad)
    page.locator("#message").get_by_text("cannot be used as an image").wait_for()
    assert "Traceback" not in page.content()
    page.close()


def test_without_a_model_the_page_says_so(browser):
    demo, url = _serve(None)
    try:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.get_by_text("No trained model is loaded").first.wait_for()
        assert page.locator("#model-status").get_by_text("--bundle").count() >= 1
        page.close()
    finally:
        demo.close()
