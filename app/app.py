"""YOLOv3 on PASCAL VOC: a Gradio app (local, or as a Hugging Face Space).

Upload a photo (or pick a sample): the model's boxes, a table of detections, and the Grad-CAM of
each detection (or EigenCAM). Weights come only from a model bundle (`model.safetensors` +
`config.json`, see `helpers/export.py`): a local folder (`--bundle PATH`, env `YOLO_BUNDLE`, or
`bundle/` beside this file) or a Hugging Face model repo (`--hub-repo user/name`, env
`YOLO_HUB_REPO`). Without one the app still starts and says so; it never invents detections.

    python -m app.app [--bundle DIR | --hub-repo ID] [--port 7860] [--host 127.0.0.1]   # from the repository
    python app.py [...]                                                                    # in a built Space

It imports the project's `helpers` package from where Python finds it: the repository root (the
current folder of `python -m app.app`), or the Space's folder, which `python -m helpers.space build`
fills with this file and the helpers modules it needs.

The work is in plain functions (`load_source`, `read_upload`, `predict_steps` and `predict`, its last
step) that the tests call directly; `build_demo` only wires them to the page.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home; the app works offline

try:
    import helpers  # noqa: F401 - only to say in one line where to run from, before the imports below
except ModuleNotFoundError:
    raise SystemExit("The app needs the project's `helpers` package: run it from the repository's root "
                     "as `python -m app.app ...` (a Space built by `python -m helpers.space build` "
                     "carries helpers/ beside app.py).") from None

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pytorch_grad_cam.utils.image  # noqa: E402,F401 - its first import takes seconds: now, not in a request
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from helpers.boxes import Letterbox  # noqa: E402
from helpers.cam import Capture, cam_to_original, capture, detection_cams, unravel_index  # noqa: E402
from helpers.config import VOC_CLASSES, Config  # noqa: E402
from helpers.imageio import ImageError, read_image, read_info  # noqa: E402
from helpers.model import YOLOv3, fuse_for_inference  # noqa: E402
from helpers.plotting import annotate, overlay  # noqa: E402
from helpers.postprocess import detect  # noqa: E402
from helpers.transforms import letterbox  # noqa: E402
from helpers.weights import (  # noqa: E402
    CONFIG,
    DEFAULT_DISPLAY_CONF,
    DISPLAY_CONF_MAX,
    DISPLAY_CONF_MIN,
    DISPLAY_CONF_STEP,
    WEIGHTS,
    BundleError,
    display_conf,
    load_bundle,
    read_bundle_config,
)

HERE = Path(__file__).resolve().parent
log = logging.getLogger("yolo-app")

MAX_SIDE = 2048  # every upload is brought down to this longest side before anything else
MAX_UPLOAD = 20_000_000  # bytes: Gradio refuses larger uploads, `read_upload` larger files
SIZES = (320, 416, 512, 608)  # input sizes offered (multiples of 32)
CAM_METHODS = ("Grad-CAM", "EigenCAM")
# The confidence slider starts where the bundle says its model is best shown (`display_conf`, chosen
# at export: the F1-best threshold on its evaluation data), else at DEFAULT_CONF.
DEFAULT_CONF, DEFAULT_IOU, DEFAULT_TOP_K = DEFAULT_DISPLAY_CONF, 0.45, 5
MAX_TOP_K = 10
MAX_DETECTIONS = 100  # per image, after NMS
CAM_SIDE = 800  # longest side of each CAM panel in the gallery
TABLE_HEADERS = ["#", "class", "score", "x1", "y1", "x2", "y2"]
SETTINGS = "space_settings.json"  # written by `python -m helpers.space build`: {"bundle", "hub_repo"}

NO_MODEL = (
    "**No trained model is loaded, so this app cannot detect anything.** It shows no made-up boxes.\n\n"
    "To provide one: export a checkpoint with `python -m helpers.export --checkpoint CKPT --out bundle`, "
    "then start the app with `--bundle bundle` (or env `YOLO_BUNDLE=bundle`), or put the bundle in "
    "`bundle/` beside `app.py`, or name a Hugging Face model repo holding `model.safetensors` and "
    "`config.json` with `--hub-repo user/name` (env `YOLO_HUB_REPO`)."
)

# EXIF orientation tag -> the PIL transpose that shows the photo upright (as PIL's exif_transpose).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


# --- the model --------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: YOLOv3  # BatchNorm folded, eval mode: the one every request uses
    config: Config
    info: dict  # the bundle's config.json
    source: str  # folder or hub id, for the page
    classes: tuple[str, ...] = field(default=VOC_CLASSES)

    @property
    def display_conf(self) -> tuple[float, str]:
        """(the confidence threshold the page starts at, where it came from in words): the bundle's."""
        return display_conf(self.info)

    @property
    def hub_url(self) -> str | None:
        repo = self.info.get("hub_repo")
        return f"https://huggingface.co/{repo}" if repo else None


@functools.lru_cache(maxsize=4)
def _load_cached(bundle: str | None, hub_repo: str | None) -> tuple[LoadedModel | None, str]:
    if bundle:
        path = Path(bundle)
        source = str(path)
    elif hub_repo:
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo_id=hub_repo, allow_patterns=[WEIGHTS, CONFIG]))
        except Exception as e:  # noqa: BLE001 - offline, no such repo, no access: all end the same way
            log.warning("model download from %s failed: %s", hub_repo, e)
            return None, (f"Could not download the model from the Hugging Face repo `{hub_repo}` "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}).")
        source = f"https://huggingface.co/{hub_repo}"
    else:
        return None, ""
    try:
        model, config = load_bundle(path)
        info = read_bundle_config(path)
    except (BundleError, OSError) as e:
        log.warning("bundle %s not loaded: %s", path, e)
        return None, f"Could not load the model bundle: {e}"
    if hub_repo and not info.get("hub_repo"):
        info["hub_repo"] = hub_repo
    loaded = LoadedModel(fuse_for_inference(model), config, info, source, tuple(info["classes"]))
    return loaded, f"Model loaded from `{source}`."


_load_lock = threading.Lock()


def load_source(bundle: str | os.PathLike | None = None, hub_repo: str | None = None) -> tuple[LoadedModel | None, str]:
    """The model (loaded once per source, then cached for the process) and a status line for the page."""
    with _load_lock:  # two sessions starting together load it once
        return _load_cached(str(bundle) if bundle else None, hub_repo or None)


def default_sources(bundle: str | None = None, hub_repo: str | None = None) -> tuple[str | None, str | None]:
    """Command line, then environment, then the Space's settings file, then `bundle/` beside this file."""
    settings = {}
    if (HERE / SETTINGS).is_file():
        try:
            settings = json.loads((HERE / SETTINGS).read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("%s ignored: %s", HERE / SETTINGS, e)
    bundle = bundle or os.environ.get("YOLO_BUNDLE") or (
        str(HERE / settings["bundle"]) if settings.get("bundle") else None)
    hub_repo = hub_repo or os.environ.get("YOLO_HUB_REPO") or settings.get("hub_repo")
    if not bundle and not hub_repo and (HERE / "bundle" / WEIGHTS).is_file():
        bundle = str(HERE / "bundle")
    return bundle, hub_repo


# --- reading an upload ------------------------------------------------------------------------
@dataclass
class Upload:
    image: np.ndarray  # RGB uint8 [h, w, 3], upright, longest side <= MAX_SIDE
    scale: float  # shown pixels / upright original pixels
    original_size: tuple[int, int]  # (w, h) of the upright original
    notes: list[str]


def read_upload(path: str | os.PathLike, max_side: int = MAX_SIDE) -> Upload:
    """Decode an uploaded file to upright RGB, downscaled to `max_side`: any mode, EXIF rotation applied.

    Memory is bounded by what is shown, not by the file: oversize files are refused from their size
    on disk and their header, and a large image is shrunk right after its decode, before any
    conversion (see `helpers.imageio`). Raises ImageError (a message fit for the page) for anything
    that is not a usable image.
    """
    path = Path(path)
    try:
        info = read_info(path, max_file_bytes=MAX_UPLOAD)
        # a big JPEG is decoded reduced in the DCT (faster than in full), others shrunk by an
        # integer factor, to no less than half of max_side; the cap below then applies
        image = read_image(path, max_side=max_side // 2, max_file_bytes=MAX_UPLOAD)
    except ImageError as e:
        raise ImageError(str(e).replace(str(path), path.name)) from None
    notes = []
    if info.mode not in ("RGB", "L") or info.bits != 8:
        depth = f"{info.bits}-bit " if info.bits != 8 else ""
        notes.append(f"converted from {depth}{info.format or 'image'} mode {info.mode} to 8-bit RGB")
    if info.frames > 1:
        kind = {"GIF": "animated GIF", "WEBP": "animated WebP", "PNG": "animated PNG", "TIFF": "multi-page TIFF"}
        notes.append(f"only the first of its {info.frames} frames used ({kind.get(info.format, info.format)})")
    stored_w, stored_h = info.width, info.height
    if max(image.shape[:2]) > max_side:
        pil = Image.fromarray(image)
        pil.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
        image = np.asarray(pil)
    scale = image.shape[1] / stored_w
    if max(stored_w, stored_h) > max_side:
        notes.append(f"downscaled from {stored_w}x{stored_h} to {image.shape[1]}x{image.shape[0]}")
    original = (stored_w, stored_h)
    if info.orientation in _UPRIGHT:
        image = np.asarray(Image.fromarray(image).transpose(_UPRIGHT[info.orientation]))
        if info.orientation >= 5:  # a quarter turn swaps width and height
            original = (stored_h, stored_w)
        notes.append("rotated upright as its EXIF orientation says")
    return Upload(np.ascontiguousarray(image), scale, original, notes)


# --- inference --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=len(SIZES) + 2)
def _letterbox(size: int) -> A.Compose:
    return A.Compose(letterbox(size))  # the evaluation's own letterbox (helpers.transforms)


def to_input(image: np.ndarray, size: int) -> tuple[torch.Tensor, Letterbox]:
    """Letterboxed [1, 3, size, size] float tensor in 0..1 and the Letterbox that maps boxes back."""
    h, w = image.shape[:2]
    boxed = _letterbox(size)(image=image)["image"]
    x = torch.from_numpy(boxed).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last), Letterbox.fit(h, w, size)


@dataclass
class Result:
    annotated: Image.Image | None = None
    rows: list[list] = field(default_factory=list)
    cams: list[tuple[Image.Image, str]] = field(default_factory=list)
    message: str = ""
    detections: torch.Tensor | None = None  # [K, 6] in shown-image pixels
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CamJob:
    """What the CAMs of one prediction need from its boxes step (`predict_boxes`) and were asked for."""
    upload: Upload  # the image as shown
    capture: Capture  # the forward pass the CAMs reuse; its input [1, 3, S, S] is `capture.image`
    letterbox: Letterbox  # the input's place in the shown image
    rows: torch.Tensor  # [K] each detection's row in the flattened raw outputs: what its Grad-CAM differentiates
    cam_method: str  # one of CAM_METHODS
    top_k: int  # CAMs for this many of the best detections
    started: float  # time.perf_counter() when the request began

    @property
    def size(self) -> int:
        return self.capture.image.shape[-1]


FAILED = ("**Something went wrong while processing this image** ({error}). "
          "Please try another image; the details are in the server log.")


def _check_settings(conf, iou, size, cam_method, top_k) -> tuple[float, float, int, str, int]:
    try:
        conf, iou, size, top_k = float(conf), float(iou), int(size), int(top_k)
    except (TypeError, ValueError):
        raise ValueError("thresholds, size and top k must be numbers") from None
    if not (0.0 <= conf <= 1.0 and 0.0 <= iou <= 1.0):
        raise ValueError(f"confidence and IoU thresholds must lie in 0..1 (got {conf}, {iou})")
    if size % 32 or not 64 <= size <= 1024:  # the page offers SIZES; API callers may ask for others
        raise ValueError(f"image size must be a multiple of 32 from 64 to 1024 (got {size})")
    if cam_method not in CAM_METHODS:
        raise ValueError(f"CAM method must be one of {', '.join(CAM_METHODS)} (got {cam_method!r})")
    return conf, iou, size, cam_method, max(0, min(MAX_TOP_K, top_k))


def detect_boxes(loaded: LoadedModel, upload: Upload, conf: float, iou: float, size: int):
    """One forward pass (keeping what the CAMs need: `helpers.cam.capture`), decode, NMS, letterbox undo.

    Returns (detections [K, 6] in shown-image pixels, their rows in the flattened raw output [K] (which
    cell, anchor and scale each came from: what its Grad-CAM differentiates), its Letterbox, the capture
    (holding the letterboxed input [1, 3, S, S])).
    """
    x, meta = to_input(upload.image, size)
    cap = capture(loaded.model, x)
    (dets,), (rows,) = detect(cap.outputs, size, conf, iou, max_detections=MAX_DETECTIONS, letterbox=[meta],
                              return_indices=True)
    return dets, rows, meta, cap


def predict_boxes(loaded: LoadedModel | None, image, conf=None, iou=DEFAULT_IOU, size=416,
                  cam_method="Grad-CAM", top_k=DEFAULT_TOP_K) -> tuple[Result, CamJob | None]:
    """Boxes only: (Result, what `add_cams` needs, or None where there is nothing to explain: no model,
    no image, unusable settings or file, each told in the Result's message).
    conf None: the bundle's own threshold (`LoadedModel.display_conf`)."""
    if loaded is None:
        return Result(message=NO_MODEL), None
    conf = loaded.display_conf[0] if conf is None else conf
    if image is None:
        return Result(message="Upload an image or pick one of the samples."), None
    try:
        conf, iou, size, cam_method, top_k = _check_settings(conf, iou, size, cam_method, top_k)
    except ValueError as e:
        return Result(message=f"**Settings not usable:** {e}."), None
    started = time.perf_counter()
    try:
        upload = image if isinstance(image, Upload) else read_upload(image)
    except ImageError as e:
        return Result(message=f"**This file cannot be used as an image:** {e}. "
                              "Please upload a JPEG, PNG, WebP, BMP, GIF or TIFF photo."), None
    dets, rows_in_output, meta, cap = detect_boxes(loaded, upload, conf, iou, size)
    annotated = Image.fromarray(annotate(upload.image, dets, loaded.classes))
    to_original = 1.0 / upload.scale
    rows = [[k + 1, loaded.classes[int(c)], round(float(s), 3), *[round(float(v) * to_original) for v in box]]
            for k, (*box, s, c) in enumerate(dets.tolist())]
    t_boxes = time.perf_counter() - started
    w, h = upload.original_size
    summary = (f"**{len(dets)} detection{'s' if len(dets) != 1 else ''}** with score > {conf:g} "
               f"(NMS IoU {iou:g}, input {size}x{size}) on a {w}x{h} image; boxes in {t_boxes:.2f} s.")
    if not len(dets):
        summary += " Try a lower confidence threshold."
    elif len(dets) == MAX_DETECTIONS:
        summary += f" (Only the {MAX_DETECTIONS} best are kept: try a higher confidence threshold.)"
    if upload.notes:
        summary += " About this image: " + "; ".join(upload.notes) + "."
    result = Result(annotated, rows, [], summary, dets, {"boxes": t_boxes})
    return result, CamJob(upload, cap, meta, rows_in_output, cam_method, top_k, started)


def cam_maps(loaded: LoadedModel, job: CamJob, top: torch.Tensor) -> tuple[np.ndarray, list[int]]:
    """One map per detection over the letterboxed input (float32 [K, S, S], 0..1), from the forward
    pass already made (`helpers.cam.detection_cams`: only each scale's head runs again), and the
    stride of each detection's scale."""
    cap = job.capture
    rows = job.rows[: len(top)]
    method = "gradcam" if job.cam_method == "Grad-CAM" else "eigencam"
    maps = detection_cams(loaded.model, cap.image, indices=rows, classes=top[:, 5], method=method, cache=cap)
    scales = unravel_index(rows, cap.outputs)[:, 0]
    return maps, [job.size // cap.outputs[s].shape[2] for s in scales.tolist()]


def add_cams(loaded: LoadedModel, result: Result, job: CamJob) -> Result:
    """`result` with the CAM of each of the top-k detections, overlaid on the shown image and titled."""
    dets, k = result.detections, min(job.top_k, len(result.detections))
    if k == 0:
        return result
    upload = job.upload
    top = dets[:k]
    maps, strides = cam_maps(loaded, job, top)
    title = "Grad-CAM" if job.cam_method == "Grad-CAM" else "EigenCAM (class-agnostic)"
    # The gallery shows thumbnails: its panels need not be larger than CAM_SIDE (5 overlays at 2048 px
    # would cost more than the model). The letterbox is restated for the panel's pixels.
    h, w = upload.image.shape[:2]
    shrink = min(1.0, CAM_SIDE / max(h, w))
    base = upload.image if shrink == 1.0 else cv2.resize(upload.image, (round(w * shrink), round(h * shrink)),
                                                         interpolation=cv2.INTER_AREA)
    panel = job.letterbox._replace(scale=job.letterbox.scale / shrink, orig_h=base.shape[0], orig_w=base.shape[1])
    heat = cam_to_original(maps, panel)  # [K, h', w']
    boxes = top.clone()
    boxes[:, :4] *= shrink
    cams = []
    for i in range(k):
        cls, score = loaded.classes[int(top[i, 5])], float(top[i, 4])
        image = annotate(overlay(base, heat[i], image_weight=0.55), boxes[i: i + 1], loaded.classes)
        cams.append((Image.fromarray(image), f"{i + 1}. {cls} {score:.2f} · {title} at stride {strides[i]}"))
    t_all = time.perf_counter() - job.started
    return replace(result, cams=cams, timings={**result.timings, "boxes+cams": t_all},
                   message=result.message + f" {title} for the top {k} in {t_all:.2f} s in all.")


def predict_steps(loaded: LoadedModel | None, image, conf=None, iou=DEFAULT_IOU, size=416,
                  cam_method="Grad-CAM", top_k=DEFAULT_TOP_K) -> Iterator[Result]:
    """What the page shows for one image (a path, or an `Upload`), step by step: where CAMs follow,
    first the boxes and table with a note that the CAMs are being computed; then the final Result
    (boxes, table, CAMs). Never raises: a failure is a message (the log gets the traceback).
    conf None: the bundle's own threshold, where the page's slider starts."""
    try:
        result, job = predict_boxes(loaded, image, conf, iou, size, cam_method, top_k)
        if job is not None and job.top_k > 0 and len(result.detections):
            yield replace(result, message=result.message + " Computing the CAMs…")
            result = add_cams(loaded, result, job)
    except Exception as e:  # noqa: BLE001 - the page gets a sentence, the log gets the traceback
        log.exception("prediction failed")
        result = Result(message=FAILED.format(error=type(e).__name__))
    yield result


def predict(loaded: LoadedModel | None, image, conf=None, iou=DEFAULT_IOU, size=416,
            cam_method="Grad-CAM", top_k=DEFAULT_TOP_K) -> Result:
    """Boxes, table and CAMs for one image: the last step of `predict_steps` (what the page ends on)."""
    *_, result = predict_steps(loaded, image, conf, iou, size, cam_method, top_k)
    return result


def save_output(image: Image.Image, folder: str | os.PathLike, name: str) -> str:
    """`image` as a JPEG file under `folder` (Gradio's cache), named by its content and written whole.

    Why not hand Gradio the PIL image: Gradio 6 (`processing_utils.save_pil_to_cache`) names the file
    by the hash of its bytes and rewrites it in place at every request. Two requests with the same
    output (two visitors clicking the same sample; or the boxes step and the final step of one
    request, both showing the same annotated image) then rewrite a file while it is being sent to
    a browser: its declared length no longer matches (`h11 LocalProtocolError: Too much/little data
    for declared Content-Length`) and the download breaks off. Here a file is renamed into place
    complete (`os.replace`), and an existing one is left as it is: same name, same bytes.
    """
    with io.BytesIO() as buffer:
        image.save(buffer, format="JPEG")  # Pillow's default quality, as Gradio's own JPEG outputs
        data = buffer.getvalue()
    path = Path(folder) / hashlib.sha256(data).hexdigest() / f"{name}.jpg"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(staging, path)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
    return str(path)


def page_outputs(result: Result, folder: str | os.PathLike) -> tuple:
    """The page's outputs for `result`: (annotated image file, table rows, [(CAM file, caption)], message)."""
    annotated = save_output(result.annotated, folder, "detections") if result.annotated is not None else None
    gallery = [(save_output(image, folder, f"cam{i + 1}"), caption) for i, (image, caption) in enumerate(result.cams)]
    return annotated, result.rows, gallery, result.message


# --- the page ---------------------------------------------------------------------------------
def _about(loaded: LoadedModel | None, hub_repo: str | None) -> str:
    classes = loaded.classes if loaded else VOC_CLASSES
    lines = [f"### The {len(classes)} classes this model detects", ", ".join(f"`{c}`" for c in classes), ""]
    if loaded is None:
        lines += ["### Model", "No trained model is loaded."]
        if hub_repo:
            lines.append(f"Configured model repo: [{hub_repo}](https://huggingface.co/{hub_repo})")
        return "\n".join(lines)
    info = loaded.info
    lines += ["### Model",
              f"YOLOv3 (Darknet-53, width {info['width']}, {info.get('parameters', 0):,} parameters, "
              f"{info.get('weights_dtype', 'float32')} weights), trained at {info['image_size']}x{info['image_size']}; "
              f"loaded from `{loaded.source}`."]
    conf, source = loaded.display_conf
    lines += ["", f"**Confidence threshold:** the slider starts at {conf:g}: {source}."]
    url = loaded.hub_url or (f"https://huggingface.co/{hub_repo}" if hub_repo else None)
    lines += ["", f"Model page: [{url}]({url})" if url else "Model page: not published (no Hugging Face repo set)."]
    training = info.get("training") or {}
    trained_on = training.get("trained_on") or (f"`{training['dataset']}`" if training.get("dataset") else None)
    lines += ["", f"**Trained on:** {trained_on}." if trained_on else "**Trained on:** not recorded in the bundle."]
    if training.get("epoch") is not None:
        lines[-1] += (f" {training['epoch'] + 1} of {training.get('epochs_planned', '?')} epochs, "
                      f"{training.get('global_step', '?')} optimizer steps.")
    metrics = info.get("metrics") or {}
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric:
        where = f" on {training['evaluated_on']}" if training.get("evaluated_on") else ""
        lines += ["", f"Measured{where} (from the training run's `{metrics.get('source', 'metrics')}`):", "",
                  "| metric | value |", "|---|---|"] + [f"| {_METRIC_NAMES.get(k, k)} | {v:.4g} |"
                                                         for k, v in numeric.items()]
    else:
        lines.append("The bundle records no evaluation metrics.")
    ap = metrics.get("ap_per_class_voc07")
    if isinstance(ap, dict) and ap:
        lines += ["", "AP per class (VOC07 11-point): " + ", ".join(
            f"{c} {v:.3f}" if isinstance(v, (int, float)) else f"{c} n/a" for c, v in ap.items())]
    return "\n".join(lines)


_METRIC_NAMES = {"val/map50_voc07": "mAP at IoU 0.5 (VOC07 11-point)", "val/map50_all": "mAP at IoU 0.5 (all-point)",
                 "val/class_acc": "class accuracy (%)", "val/noobj_acc": "no-object accuracy (%)",
                 "val/obj_acc": "object accuracy (%)", "val/loss": "validation loss"}


def trained_on_generated_data(loaded: LoadedModel | None) -> bool:
    """True for a model trained on the project's generated shapes (no dataset folder in its config)."""
    return loaded is not None and ((loaded.info.get("config") or {}).get("data") or {}).get("root", "") is None


GENERATED_SAMPLE = "shapes_"  # sample files named so are generated images (helpers.synthetic), not photos


def sample_images(samples_dir: str | os.PathLike | None, generated_first: bool = False) -> list[str]:
    """The sample files (at most 12); the generated shape images first for a model trained on them."""
    if not samples_dir or not Path(samples_dir).is_dir():
        return []
    files = [p for p in Path(samples_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")]
    files.sort(key=lambda p: (generated_first != p.name.startswith(GENERATED_SAMPLE), p.name))
    return [str(p) for p in files][:12]


def image_input(**kwargs) -> gr.Image:
    """A gr.Image that hands the uploaded file's path to the app untouched: the app decodes it itself,
    so a corrupt or odd file becomes a readable message in the page instead of a server error.

    (Overriding `preprocess` on the instance, not in a subclass: Gradio writes a `.pyi` stub beside
    any module that subclasses a component.)
    """
    component = gr.Image(type="filepath", image_mode=None, **kwargs)
    gradio_preprocess = component.preprocess

    def preprocess(payload):
        if payload is None:
            return None
        if getattr(payload, "path", None):
            return payload.path
        try:
            return gradio_preprocess(payload)  # a data: URL, decoded by Gradio
        except Exception as e:  # noqa: BLE001
            raise gr.Error(f"This upload cannot be read as an image ({type(e).__name__}).") from None

    component.preprocess = preprocess
    return component


def build_demo(bundle: str | os.PathLike | None, samples_dir: str | os.PathLike | None,
               hub_repo: str | None = None) -> gr.Blocks:
    """The page. Loads the model once (cached for the process); works without one."""
    loaded, status = load_source(bundle, hub_repo)
    trained_size = loaded.info["image_size"] if loaded else 416
    # the model's own size is offered (and chosen) too: a model trained small sees little at 416
    sizes = sorted(set(SIZES) | ({trained_size} if trained_size % 32 == 0 and 64 <= trained_size <= 1024 else set()))
    default_size = trained_size if trained_size in sizes else 416
    start_conf = loaded.display_conf[0] if loaded else DEFAULT_CONF
    samples = sample_images(samples_dir, generated_first=trained_on_generated_data(loaded))

    def run(image, conf, iou, size, cam_method, top_k):
        for result in predict_steps(loaded, image, conf, iou, size, cam_method, top_k):
            yield page_outputs(result, demo.GRADIO_CACHE)

    with gr.Blocks(title="YOLOv3 on PASCAL VOC") as demo:
        gr.Markdown("# YOLOv3 on PASCAL VOC: detections and the Grad-CAM of each one")
        if loaded is not None and trained_on_generated_data(loaded):
            status += (" This model was trained on the project's **generated coloured shapes**, not on PASCAL VOC "
                       "photos: it finds those shapes (try the shape samples); on real photos its boxes mean nothing.")
        gr.Markdown(("⚠️ " + NO_MODEL + ("\n\n" + status if status else "")) if loaded is None else status,
                    elem_id="model-status")
        with gr.Row():
            with gr.Column(scale=1):
                image = image_input(label="Image", sources=["upload", "clipboard"], height=360,
                                    elem_id="input-image")
                if samples:
                    gr.Examples(examples=[[p] for p in samples], inputs=[image], label="Samples",
                                examples_per_page=12)
                conf = gr.Slider(DISPLAY_CONF_MIN, DISPLAY_CONF_MAX, value=start_conf, step=DISPLAY_CONF_STEP,
                                 label="Confidence threshold", elem_id="conf")
                iou = gr.Slider(0.05, 0.95, value=DEFAULT_IOU, step=0.05, label="NMS IoU threshold")
                size = gr.Radio(sizes, value=default_size, label="Input size (pixels)")
                cam_method = gr.Radio(list(CAM_METHODS), value="Grad-CAM", label="Explanation")
                top_k = gr.Slider(0, MAX_TOP_K, value=DEFAULT_TOP_K, step=1, label="CAMs for the top k detections")
                button = gr.Button("Detect", variant="primary", interactive=loaded is not None)
            with gr.Column(scale=1):
                # outputs are JPEG files the app writes itself (`save_output`), not PIL images for Gradio to write
                annotated = gr.Image(label="Detections", type="filepath", interactive=False, elem_id="annotated")
                message = gr.Markdown(NO_MODEL if loaded is None else "Upload an image or pick a sample.",
                                      elem_id="message")
                table = gr.Dataframe(headers=TABLE_HEADERS, label="Detections (original image pixels)",
                                     interactive=False, elem_id="table")
                gallery = gr.Gallery(label="Per detection", columns=3, height="auto", elem_id="cams")
        with gr.Accordion("About the model and its classes", open=True):
            gr.Markdown(_about(loaded, hub_repo), elem_id="about")
        inputs = [image, conf, iou, size, cam_method, top_k]
        outputs = [annotated, table, gallery, message]
        button.click(run, inputs, outputs, api_name="predict")
        image.change(run, inputs, outputs, api_name=False)
    return demo


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, concurrency: int = 1,
          max_file_size: str | int = MAX_UPLOAD, block: bool = True):
    """Queue (at most `concurrency` predictions at once, the rest wait their turn) and launch."""
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    return demo.launch(server_name=host, server_port=port, max_file_size=max_file_size, show_error=True,
                       prevent_thread_lock=not block, quiet=not block)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="YOLOv3 on PASCAL VOC: Gradio app")
    p.add_argument("--bundle", help="model bundle folder (model.safetensors + config.json)")
    p.add_argument("--hub-repo", help="Hugging Face model repo holding a bundle (user/name)")
    p.add_argument("--samples", default=str(HERE / "examples"), help="folder of sample images")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    p.add_argument("--concurrency", type=int, default=int(os.environ.get("YOLO_CONCURRENCY", "1")),
                   help="requests run at once; the rest wait in the queue")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    bundle, hub_repo = default_sources(args.bundle, args.hub_repo)
    demo = build_demo(bundle, args.samples, hub_repo)
    serve(demo, args.host, args.port, args.concurrency)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
