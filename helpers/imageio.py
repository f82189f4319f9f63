"""Decode an image file to RGB uint8, whatever its mode, with clear errors naming the file.

- Any mode (grayscale, RGBA, palette, 16-bit PNG, CMYK JPEG) becomes 3-channel RGB uint8;
  transparent areas become black, the colour of the letterbox padding. A multi-frame file (animated
  GIF or WebP, multi-page TIFF) gives its first frame.
- EXIF orientation is NOT applied. VOC's annotators drew their boxes on the pixels as stored, and
  the course's labels were computed on them too, so the boxes follow the stored pixels; turning
  the image upright would put every box of a rotated photo in the wrong place. (The app, which
  shows photos to people, applies the orientation itself.)
- Memory is bounded by bytes, not pixels: a file over `MAX_FILE_BYTES` on disk, or whose header
  says it decodes to more than `MAX_DECODED_BYTES` (pixels x bands x bytes per sample), is refused
  before any decoding. A JPEG is decoded reduced in the DCT (by 2, 4 or 8) when it is at least twice
  as large as needed, so a 10000x10000 JPEG never exists in memory at full size. Other formats are
  decoded once in their own mode (PIL cannot decode them reduced) and then shrunk by an integer
  factor before any conversion: a mode PIL cannot shrink (16-bit grayscale, palette, 1-bit) is
  converted band by band of rows, so no full-size copy in a wider mode (a 16-bit image as 32-bit
  integers or floats, a palette image as RGB) ever exists. `scale` (decoded / stored, exactly 1/2,
  1/4, ... for a reduced decode) says how the returned pixels relate to the file's: a stored x maps
  to x * scale.
- A truncated JPEG is an error (OpenCV would quietly return it with a grey band at the bottom).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageMode, UnidentifiedImageError

# OpenCV's own thread pool, once started in a parent process, can deadlock DataLoader workers
# forked from it (seen in a Jupyter kernel); the workers are the parallelism here.
cv2.setNumThreads(0)

MAX_FILE_BYTES = 200_000_000  # a file larger than this on disk is refused unread
MAX_DECODED_BYTES = 360_000_000  # pixels x bands x bytes per sample, from the header: refused beyond
MAX_SIDE = 4096  # default need: larger images are decoded reduced (JPEG) or shrunk (others)
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
# Modes `Image.reduce` cannot average, and the mode each band of rows is converted to first.
_REDUCE_AS = {"I;16": "I", "I;16L": "I", "I;16B": "I", "I;16N": "I", "1": "L", "P": "RGB", "PA": "RGBA"}
_BAND_BYTES = 16 << 20  # one band of rows in its converted mode


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class ImageInfo:
    """What a file's header says, read without decoding its pixels."""

    width: int
    height: int
    format: str | None  # PIL's name: JPEG, PNG, GIF, WEBP, TIFF, ...
    mode: str  # PIL's mode as opened: RGB, L, P, I;16, ...
    bits: int  # bits per sample as stored (16 for a 16-bit PNG, also one PIL opens as 8-bit RGB)
    frames: int  # 1, or more for an animated GIF/WebP or a multi-page TIFF
    orientation: int  # EXIF orientation tag (1 = as stored)
    file_bytes: int

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the pixels decoded in PIL's mode: pixels x bands x bytes per sample."""
        return decoded_bytes(self.mode, self.width, self.height)


def decoded_bytes(mode: str, width: int, height: int) -> int:
    """Bytes of a width x height image in PIL's `mode`: pixels x bands x bytes per sample."""
    try:
        m = ImageMode.getmode(mode)
        per_pixel = len(m.bands) * int(m.typestr[-1])
    except (KeyError, ValueError):  # a mode PIL has no table entry for: assume the widest common one
        per_pixel = 4
    return width * height * per_pixel


@contextlib.contextmanager
def _opened(path: Path, problem: str):
    """PIL's lazy open of `path` (the header only, until `load`); any failure in the block, here or
    in the caller's decode, becomes an ImageError naming the file and `problem`."""
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    try:
        with warnings.catch_warnings():
            # Our own byte caps (read_image) replace PIL's decompression-bomb warning, which would
            # otherwise land in a server's log for every large upload.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                yield im
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: far too many pixels to decode ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, cv2.error) as e:
        raise ImageError(f"{path}: {problem} ({e})") from None


def _info(path: Path, im: Image.Image) -> ImageInfo:
    bits = 8 * int(ImageMode.getmode(im.mode).typestr[-1]) if im.mode != "1" else 1
    rawmode = im.tile[0].args if im.tile else None  # e.g. "RGB;16B": PIL turns 16-bit RGB into 8-bit
    rawmode = rawmode[0] if isinstance(rawmode, tuple) and rawmode else rawmode
    if isinstance(rawmode, str) and ";16" in rawmode:
        bits = 16
    try:
        orientation = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
        orientation = 1
    return ImageInfo(im.size[0], im.size[1], im.format, im.mode, bits, int(getattr(im, "n_frames", 1) or 1),
                     orientation, path.stat().st_size)


def check_file_size(path: str | Path, max_file_bytes: int | None = None) -> None:
    """Raise ImageError if the file on disk is larger than `max_file_bytes` (default MAX_FILE_BYTES)."""
    path = Path(path)
    limit = MAX_FILE_BYTES if max_file_bytes is None else max_file_bytes
    if path.is_file() and path.stat().st_size > limit:
        raise ImageError(f"{path}: the file is {_size(path.stat().st_size)}, more than this project reads "
                         f"({_size(limit)}); shrink or recompress it")


def read_info(path: str | Path, max_file_bytes: int | None = None) -> ImageInfo:
    """The header's facts (size, format, mode, bit depth, frames, EXIF orientation); no decode.
    A file over `max_file_bytes` (default MAX_FILE_BYTES) is refused unopened."""
    path = Path(path)
    check_file_size(path, max_file_bytes)
    with _opened(path, "not a readable image") as im:
        return _info(path, im)


def read_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as stored, from the file's header only (no decode)."""
    with _opened(Path(path), "not a readable image") as im:
        return im.size


def read_image(path: str | Path, max_side: int = MAX_SIDE, with_scale: bool = False, *,
               max_file_bytes: int | None = None, max_decoded_bytes: int | None = None):
    """RGB uint8 [H, W, 3] (and the decode scale, decoded / stored, when `with_scale`).

    `max_side` is the longest side the caller needs: a JPEG at least twice as large is decoded
    reduced in the DCT (several times faster than decoding in full and resizing, and it never
    holds the full image), never below `max_side` on its longest side; any other image at least
    twice as large is shrunk by an integer factor right after its decode, before any conversion.
    Files over `max_file_bytes` on disk or `max_decoded_bytes` decoded (defaults: the module's caps)
    are refused before decoding.
    """
    path = Path(path)
    max_decoded_bytes = MAX_DECODED_BYTES if max_decoded_bytes is None else max_decoded_bytes
    check_file_size(path, max_file_bytes)
    with _opened(path, "cannot decode image") as im:
        w, h = im.size
        jpeg = im.format == "JPEG" and im.mode in ("RGB", "L")
        factor = _jpeg_factor(max(w, h), max_side) if jpeg else 1
        # a JPEG decoded reduced holds 3 bytes per decoded pixel (OpenCV's BGR); others their own mode
        need = math.ceil(w / factor) * math.ceil(h / factor) * 3 if jpeg else decoded_bytes(im.mode, w, h)
        if need > max_decoded_bytes:
            raise ImageError(f"{path}: {w}x{h} {im.format} {im.mode} decodes to {_size(need)}, more than this "
                             f"project decodes ({_size(max_decoded_bytes)}); shrink it or convert it to JPEG")
        if jpeg:
            array = _decode_jpeg(path, factor)
        else:
            im.load()
            reduced, factor = _reduce(im, max_side)
            array = _to_rgb(reduced)
    # Reductions keep whole source blocks (the last one partial), so the map is exactly 1/factor and
    # the decoded size is ceil(stored / factor) on each axis: see `decoded_size`.
    scale = 1.0 / factor
    return (array, scale) if with_scale else array


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1_000_000 else f"{n:,} bytes"


def decoded_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(width, height) that `read_image` returns for a stored width x height image decoded at `scale`."""
    return math.ceil(width * scale - 1e-9), math.ceil(height * scale - 1e-9)


def _jpeg_factor(longest: int, max_side: int) -> int:
    """The DCT reduction (8, 4, 2 or 1) that keeps the longest side >= max_side."""
    return next((f for f, _ in _REDUCED if longest / f >= max_side), 1)


def _decode_jpeg(path: Path, factor: int) -> np.ndarray:
    """OpenCV's JPEG decode (libjpeg-turbo, faster than PIL's here), reduced in the DCT by `factor`
    (1, 2, 4 or 8); EXIF orientation ignored (see the module docstring)."""
    data = np.fromfile(path, np.uint8)
    # Markers cannot occur inside entropy-coded data (0xFF is stuffed), so a file without its
    # end-of-image marker near the end was cut short.
    if b"\xff\xd9" not in data[-1024:].tobytes():
        raise ImageError(f"{path}: truncated JPEG (no end-of-image marker; {len(data):,} bytes)")
    flags = dict(_REDUCED).get(factor, cv2.IMREAD_COLOR)
    bgr = cv2.imdecode(data, flags | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise ImageError(f"{path}: cannot decode image (corrupt JPEG data)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _reduce(im: Image.Image, max_side: int) -> tuple[Image.Image, int]:
    """A huge non-JPEG image shrunk by an integer factor (box filter) before any conversion copies it.

    A mode `Image.reduce` cannot average is converted band by band of rows (a few MB each) and each
    band reduced, so the result is what reducing the whole converted image would give, without
    that full-size converted copy ever existing.
    """
    factor = max(im.size) // max_side
    if factor < 2:
        return im, 1
    mode = _REDUCE_AS.get(im.mode)
    if mode == "RGB" and "transparency" in im.info:
        mode = "RGBA"
    if mode is None:
        try:
            return im.reduce(factor), factor
        except ValueError:  # a mode PIL cannot reduce: convert in full
            return im, 1
    w, h = im.size
    out = Image.new(mode, (math.ceil(w / factor), math.ceil(h / factor)))
    rows = factor * max(1, _BAND_BYTES // (4 * w * factor))  # a multiple of factor: blocks never straddle bands
    for top in range(0, h, rows):
        out.paste(im.crop((0, top, w, min(h, top + rows))).convert(mode).reduce(factor), (0, top // factor))
    return out, factor


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
