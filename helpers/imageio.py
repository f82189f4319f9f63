"""Decode an image file to RGB uint8, whatever its mode, with clear errors naming the file.

- Any mode (grayscale, RGBA, palette, 16-bit, CMYK) becomes 3-channel RGB.
- EXIF orientation is NOT applied: VOC's annotators drew boxes on the stored pixels, so the boxes
  follow the pixels as stored (the app, which shows photos to people, applies it; see app/).
- Huge JPEGs are decoded reduced (in the DCT, 1/2 to 1/8) when larger than `max_side`, and files over
  `max_pixels` are refused before decoding, so a 10000x10000 image cannot blow memory. The
  returned `scale` says how the decoded pixels relate to the file's.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 200_000_000  # refuse anything larger outright (a decompression bomb, not a photo)
MAX_SIDE = 4096  # decode larger JPEGs reduced in the DCT (a power-of-2 reduction)


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the problem."""


def read_image(path: str | Path, max_side: int = MAX_SIDE, with_scale: bool = False):
    """RGB uint8 [H, W, 3] (and the decode scale, decoded / stored, when `with_scale`).

    A JPEG whose longest side exceeds `max_side` by 2x or more is decoded at a reduced scale (the
    DCT does the shrinking, several times faster than decoding in full and resizing); the result is
    never smaller than `max_side` on its longest side. Pass the size you will resize to.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    try:
        with warnings.catch_warnings():
            # Our own pixel cap below replaces PIL's decompression-bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"{path}: {w}x{h} pixels is more than this project decodes ({MAX_PIXELS:,})")
                if im.format == "JPEG" and im.mode in ("RGB", "L"):
                    array = _decode_jpeg(path, max(w, h), max_side)
                else:
                    im.load()
                    array = _to_rgb(im)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot decode image ({e})") from None
    scale = array.shape[1] / w
    return (array, scale) if with_scale else array


def _decode_jpeg(path: Path, longest: int, max_side: int) -> np.ndarray:
    """OpenCV's JPEG decode (faster than PIL's here), reduced in the DCT when the image is 2, 4 or 8
    times larger than needed; EXIF orientation ignored (see the module docstring)."""
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    for factor, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                            (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if longest / factor >= max_side:
            flags = reduced | cv2.IMREAD_IGNORE_ORIENTATION
            break
    bgr = cv2.imdecode(np.fromfile(path, np.uint8), flags)
    if bgr is None:
        raise ImageError(f"{path}: cannot decode image (corrupt or truncated JPEG)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits
        a = np.asarray(im, dtype=np.float64)
        top = a.max() if a.size else 1.0
        a = (a * (255.0 / (65535.0 if top > 255 else max(top, 1.0)))).clip(0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im)  # transparent areas become black, like the padding
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im).copy()
