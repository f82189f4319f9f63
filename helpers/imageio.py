"""Decode an image file to RGB uint8, whatever its mode, with clear errors naming the file.

- Any mode (grayscale, RGBA, palette, 16-bit PNG, CMYK JPEG) becomes 3-channel RGB uint8;
  transparent areas become black, the colour of the letterbox padding.
- EXIF orientation is NOT applied. VOC's annotators drew their boxes on the pixels as stored, and
  the course's labels were computed on them too, so the boxes follow the stored pixels; turning
  the image upright would put every box of a rotated photo in the wrong place. (The app, which
  shows photos to people, applies the orientation itself.)
- Huge images: a JPEG is decoded reduced in the DCT (by 2, 4 or 8) when it is at least twice as
  large as needed, so a 10000x10000 JPEG never exists in memory at full size; other formats are
  decoded in full up to `MAX_PIXELS` and refused beyond it with a clear error. `scale` (decoded /
  stored, exactly 1/2, 1/4, ... for a reduced decode) says how the returned pixels relate to the
  file's: a stored x maps to x * scale.
- A truncated JPEG is an error (OpenCV would quietly return it with a grey band at the bottom).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# OpenCV's own thread pool, once started in a parent process, can deadlock DataLoader workers
# forked from it (seen in a Jupyter kernel); the workers are the parallelism here.
cv2.setNumThreads(0)

MAX_PIXELS = 120_000_000  # non-JPEG images are decoded in full: ~360 MB at this cap, refused beyond
MAX_SIDE = 4096  # default need: larger JPEGs are decoded reduced (a power-of-2 reduction)
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the problem."""


@contextlib.contextmanager
def _opened(path: Path, problem: str):
    """PIL's lazy open of `path` (the header only, until `load`); any failure in the block, here or
    in the caller's decode, becomes an ImageError naming the file and `problem`."""
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    try:
        with warnings.catch_warnings():
            # Our own pixel cap (read_image) replaces PIL's decompression-bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                yield im
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: far too many pixels to decode ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, cv2.error) as e:
        raise ImageError(f"{path}: {problem} ({e})") from None


def read_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as stored, from the file's header only (no decode)."""
    with _opened(Path(path), "not a readable image") as im:
        return im.size


def read_image(path: str | Path, max_side: int = MAX_SIDE, with_scale: bool = False):
    """RGB uint8 [H, W, 3] (and the decode scale, decoded / stored, when `with_scale`).

    `max_side` is the longest side the caller needs: a JPEG at least twice as large is decoded
    reduced in the DCT (several times faster than decoding in full and resizing, and it never
    holds the full image), never below `max_side` on its longest side.
    """
    path = Path(path)
    with _opened(path, "cannot decode image") as im:
        w, h = im.size
        if im.format == "JPEG" and im.mode in ("RGB", "L"):
            array, factor = _decode_jpeg(path, max(w, h), max_side)
        else:
            if w * h > MAX_PIXELS:
                raise ImageError(f"{path}: {w}x{h} {im.format} is more pixels than this project decodes "
                                 f"in full ({MAX_PIXELS:,}); convert it to JPEG or shrink it")
            im.load()
            reduced, factor = _reduce(im, max_side)
            array = _to_rgb(reduced)
    # Reductions keep whole source blocks (the last one partial), so the map is exactly 1/factor and
    # the decoded size is ceil(stored / factor) on each axis: see `decoded_size`.
    scale = 1.0 / factor
    return (array, scale) if with_scale else array


def decoded_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(width, height) that `read_image` returns for a stored width x height image decoded at `scale`."""
    return math.ceil(width * scale - 1e-9), math.ceil(height * scale - 1e-9)


def _decode_jpeg(path: Path, longest: int, max_side: int) -> tuple[np.ndarray, int]:
    """OpenCV's JPEG decode (libjpeg-turbo, faster than PIL's here), reduced in the DCT when the image
    is 2, 4 or 8 times larger than needed; EXIF orientation ignored (see the module docstring)."""
    data = np.fromfile(path, np.uint8)
    # Markers cannot occur inside entropy-coded data (0xFF is stuffed), so a file without its
    # end-of-image marker near the end was cut short.
    if b"\xff\xd9" not in data[-1024:].tobytes():
        raise ImageError(f"{path}: truncated JPEG (no end-of-image marker; {len(data):,} bytes)")
    flags, factor = cv2.IMREAD_COLOR, 1
    for f, reduced in _REDUCED:
        if longest / f >= max_side:
            flags, factor = reduced, f
            break
    bgr = cv2.imdecode(data, flags | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise ImageError(f"{path}: cannot decode image (corrupt JPEG data)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), factor


def _reduce(im: Image.Image, max_side: int) -> tuple[Image.Image, int]:
    """A huge non-JPEG image shrunk by an integer factor (box filter) before any conversion copies it."""
    factor = max(im.size) // max_side
    if factor < 2 or im.mode in ("1", "P", "PA"):  # palette indices cannot be averaged
        return im, 1
    try:
        return im.reduce(factor), factor
    except ValueError:  # a mode PIL cannot reduce: convert in full
        return im, 1


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16/32-bit grayscale: scale to 8 bits
        a = np.asarray(im, dtype=np.float32)
        top = float(a.max()) if a.size else 1.0
        a = (a * (255.0 / (65535.0 if top > 255 else max(top, 1.0)))).clip(0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2))
    if im.mode == "F":  # 32-bit float grayscale (rare: TIFF): min-max to 8 bits
        a = np.asarray(im, dtype=np.float32)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
        a = ((a - lo) * (255.0 / max(hi - lo, 1e-12))).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im)  # transparent areas become black, like the padding
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.array(im)
