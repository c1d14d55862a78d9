"""Decoding untrusted image files: safe_open_image -> a fully decoded RGB PIL image from a path, bytes, a stream
or a PIL image, refusing decompression bombs, non-images and truncated files with one line (UserError); to_rgb ->
RGB from any PIL mode. Used by every path that opens a user's image: uploads, galleries, prepare and evaluate.
"""
from __future__ import annotations

import io
import math
import os
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils import HEIF_EXTS, HEIF_READABLE, UserError, first_line, shown_path  # noqa: F401 (re-exported)

MAX_PIXELS = 40_000_000      # per file or video frame: a 36 MP photo passes, a decompression bomb does not


def _float_to_uint8(a) -> np.ndarray:
    """Float pixels -> uint8: 0..1 scaled by 255, 0..255 kept, any other range stretched to 0..255 (a float has no
    bit depth to divide by: 0..1000 is not a dark 16-bit image); NaN/inf 0."""
    a = np.nan_to_num(np.asarray(a, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = a.min(initial=0.0), a.max(initial=0.0)
    if lo >= 0 and hi <= 1:
        a = a * 255
    elif lo < 0 or hi > 255:
        a = (a - lo) / (hi - lo + 1e-12) * 255
    return a.round().clip(0, 255).astype(np.uint8)


def _int_to_uint8(a) -> np.ndarray:
    """Integer pixels -> uint8: 0..255 kept, 16-bit divided by 257, any other range stretched."""
    a = np.asarray(a, dtype=np.float64)
    lo, hi = a.min(initial=0), a.max(initial=0)
    a = a if lo >= 0 and hi <= 255 else a / 257.0 if lo >= 0 and hi <= 65535 else (a - lo) / (hi - lo + 1e-12) * 255
    return np.clip(a, 0, 255).astype(np.uint8)


def float_to_8bit(a: np.ndarray) -> Image.Image:
    """Float grey -> 8-bit L (_float_to_uint8's scaling)."""
    return Image.fromarray(_float_to_uint8(a), "L")


def is_pixels(src) -> bool:
    """A PIL image or a numpy array (what Python callers may pass instead of a file)."""
    return isinstance(src, (Image.Image, np.ndarray))


def array_to_image(a: np.ndarray) -> Image.Image:
    """A numpy image (H x W grey, H x W x 1/3/4; bool, integer of any depth or float) -> PIL, scaled to 8 bits as
    to_rgb scales 16-bit/float files; any other shape or type -> UserError."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or a.ndim == 3 and a.shape[2] in (3, 4)) or a.size == 0:
        raise UserError(f"an array of shape {a.shape}: give an image as H x W (grey) or H x W x 3 (RGB) pixels")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        a = _float_to_uint8(a)
    elif np.issubdtype(a.dtype, np.integer):
        a = _int_to_uint8(a) if a.dtype != np.uint8 else a
    else:
        raise UserError(f"an array of {a.dtype} values: give image pixels as integers (0-255) or floats (0-1)")
    return Image.fromarray(np.ascontiguousarray(a))


def upright(im: Image.Image) -> Image.Image:
    """The pixels as displayed: rotated/flipped by the EXIF Orientation; a broken EXIF block keeps them as stored."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 -- any error inside an untrusted EXIF block
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any mode: 16-bit/float scaled to 8 bits, transparency flattened onto white, CMYK/P converted."""
    if im.mode == "F":
        return float_to_8bit(np.asarray(im)).convert("RGB")
    if im.mode == "I" or im.mode.startswith("I;"):
        im = Image.fromarray(_int_to_uint8(np.asarray(im)), "L")
    if im.mode == "P" or im.mode in ("LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")


def _over_limit(size: str, max_pixels: int) -> str:
    return f"{size} is over the {max_pixels:,}-pixel limit; resize it first"


def header_size(path) -> tuple[int, int] | None:
    """(W, H) as stored, from the file's header (no decode; PIL's bomb warning silenced: safe_open_image's limit
    applies when it is read); None if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size
    except Exception:  # noqa: BLE001 -- corrupt/not an image: reported by safe_open_image
        return None


def safe_open_image(src, max_pixels: int = MAX_PIXELS, max_side: int | None = None) -> Image.Image:
    """A fully decoded RGB image from a path, bytes or PIL image; refuses bombs and non-images with a UserError.
    max_side: JPEGs may decode at 1/2, 1/4 or 1/8 scale while the longest side stays >= max_side (fast; for
    detection and crops); other formats and PIL images keep their size. From a file, .info["file_size"] is its
    (W, H) in the file's own pixels as displayed (after an EXIF rotation), whatever scale it decoded at."""
    if isinstance(src, np.ndarray):
        src = array_to_image(src)
    if isinstance(src, Image.Image):
        name, im = "image", src
        if im.width * im.height > max_pixels:
            raise UserError(f"{name}: {_over_limit(f'{im.width}x{im.height}', max_pixels)}")
        return to_rgb(upright(im))
    if isinstance(src, (bytes, bytearray, memoryview)):
        name, fp = "image data", io.BytesIO(bytes(src))
    elif hasattr(src, "read"):                                        # an open file / upload stream
        name, fp = str(getattr(src, "name", "image data")), src
    elif not isinstance(src, (str, os.PathLike)):
        raise UserError(f"not an image ({type(src).__name__}); upload a picture file (JPEG, PNG, WebP, ...)")
    else:
        name, fp = str(src), src
        if not os.path.isfile(fp):
            raise UserError(f"{name}: " + ("not a regular file (a pipe, device or socket); pass an image file"
                                           if os.path.exists(fp) else "no such file"))
    ours = max_pixels <= (Image.MAX_IMAGE_PIXELS or math.inf)         # the project's limit is checked below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if ours else "error", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                if im.width * im.height > max_pixels:
                    raise UserError(f"{name}: {_over_limit(f'{im.width}x{im.height}', max_pixels)}")
                stored = im.size                                          # the file's own pixels
                if max_side and im.format == "JPEG" and max(im.size) > max_side:
                    r = max_side / max(im.size)
                    im.draft(im.mode, (math.ceil(im.width * r), math.ceil(im.height * r)))
                im.load()
                decoded = im.size
                out = to_rgb(upright(im)).copy()
                out.info["file_size"] = stored if out.size == decoded else stored[::-1]    # as displayed
                return out
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        n = re.search(r"\((\d+) pixels\)", str(e))                    # PIL's error names the size, not W x H
        if ours and n:
            raise UserError(f"{name}: {_over_limit(f'{int(n[1]):,} pixels', max_pixels)}") from None
        raise UserError(f"{name}: refused as a possible decompression bomb ({e}); resize it first") from None
    except UnidentifiedImageError:
        if os.path.splitext(name)[1].lower() in HEIF_EXTS and not HEIF_READABLE:
            raise UserError(f"{name}: a HEIC/HEIF photo; reading it needs the optional package pillow-heif "
                            "(pip install pillow-heif==1.1.1, the tested one; its wheels are GPLv2), or save it as "
                            "JPEG") from None
        raise UserError(f"{name}: not an image file PIL can read (use JPEG, PNG, WebP, BMP, TIFF, HEIC with "
                        "pillow-heif)") from None
    except PermissionError:
        raise UserError(f"{name}: permission denied (check its permissions)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UserError(f"{name}: damaged or truncated image ({first_line(e, 100)})") from None
