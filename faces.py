"""Face detection for real photos with OpenCV's Haar cascades (weights ship inside opencv-python; no downloads).

detect_faces -> boxes (largest first), crop_face -> square crop inside the image, faces_or_whole -> crops or a
centre-crop fallback, draw_boxes -> numbered boxes for display, safe_open_image -> a checked RGB PIL image.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from utils import UserError

CASCADES = ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml")
WORK_SIDE = 1024      # longest side the detector works at (big photos are shrunk first: speed)
SMALL_SIDE = 160      # shortest side below which images are upscaled (tiny faces: FER is 48x48)
PAD_FRAC = 0.25       # replicate-pad each side by this fraction: lets faces that fill the frame be found
SCALE = 1.1           # detector pyramid step
MIN_NEIGHBORS = 3     # per-cascade hits needed (OpenCV's minNeighbors)
SOLO_VOTES = 15       # a box only one cascade finds is kept when it has this many hits (else: false alarm)


@dataclass(frozen=True)
class Box:
    """A face box in input-image pixels (x1, y1 exclusive); score = summed cascade neighbour votes (higher = surer)."""
    x0: int
    y0: int
    x1: int
    y1: int
    score: float = 0.0

    @property
    def w(self) -> int:
        return self.x1 - self.x0

    @property
    def h(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return max(self.w, 0) * max(self.h, 0)


@lru_cache(maxsize=None)
def _cascade(name: str) -> cv2.CascadeClassifier:
    path = os.path.join(cv2.data.haarcascades, name)
    cc = cv2.CascadeClassifier(path)
    if cc.empty():
        raise UserError(f"{path}: OpenCV Haar cascade missing or unreadable; reinstall opencv-python-headless")
    return cc


def _overlap(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and intersection-over-smaller between box a [4] and boxes b [N,4] (x0,y0,x1,y1)."""
    iw = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = iw * ih                                                   # [N]
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])                # [N]
    return inter / (area_a + area_b - inter), inter / np.minimum(area_a, area_b)


def _nms(boxes: np.ndarray, votes: np.ndarray, iou: float = 0.3, inside: float = 0.6) -> list[np.ndarray]:
    """Greedy NMS by votes, also merging boxes mostly inside the keeper; each group's indices, keeper first."""
    order = np.argsort(-votes, kind="stable")
    groups = []
    while len(order):
        o_iou, o_in = _overlap(boxes[order[0]], boxes[order])
        merged = (o_iou > iou) | (o_in > inside)
        merged[0] = True
        groups.append(order[merged])
        order = order[~merged]
    return groups


def detect_faces(image: Image.Image, max_faces: int = 10, min_size_frac: float = 0.05) -> list[Box]:
    """Frontal faces in `image` (any PIL mode), largest first; min_size_frac is relative to the shorter side."""
    gray = np.asarray(image.convert("L"))                             # [H,W] uint8
    H, W = gray.shape
    if min(H, W) < 8:
        return []
    min_face = max(min_size_frac * min(H, W), 1.0)                    # px, input scale
    s = min(1.0, max(WORK_SIDE / max(H, W), 24.0 / min_face))         # shrink big photos, keeping faces >= 24 px
    s = min(max(s, SMALL_SIDE / min(H, W)), 8.0)                      # tiny images (FER 48x48) go up
    work = cv2.resize(gray, (round(W * s), round(H * s)), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    pad = round(PAD_FRAC * min(work.shape))
    work = cv2.copyMakeBorder(work, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    side = max(round(min_face * s), 20)
    found, votes, source = [], [], []
    for c, name in enumerate(CASCADES):
        rects, n = _cascade(name).detectMultiScale2(work, scaleFactor=SCALE, minNeighbors=MIN_NEIGHBORS,
                                                    minSize=(side, side))
        for (x, y, w, h), k in zip(rects, n):
            found.append([x, y, x + w, y + h])
            votes.append(float(k))
            source.append(c)
    if not found:
        return []
    xyxy = (np.array(found, dtype=np.float64) - pad) / s             # [N,4] back to input pixels
    xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, W)
    xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, H)
    ok = (xyxy[:, 2] - xyxy[:, 0] >= 1) & (xyxy[:, 3] - xyxy[:, 1] >= 1)  # drop hits wholly in the padding
    xyxy, votes, source = xyxy[ok], np.array(votes)[ok], np.array(source)[ok]  # [N,4], [N], [N]
    boxes = []
    for g in _nms(xyxy, votes):
        agree = len(set(source[g].tolist())) >= min(2, len(CASCADES))
        if agree or votes[g[0]] >= SOLO_VOTES:
            boxes.append(Box(*(int(round(v)) for v in xyxy[g[0]]), score=float(votes[g].sum())))
    boxes = [b for b in boxes if b.w > 0 and b.h > 0]                # rounding can still empty a sliver
    return sorted(boxes, key=lambda b: (-b.area, -b.score))[:max_faces]


def _square_inside(cx: float, cy: float, side: float, W: int, H: int) -> tuple[int, int, int, int]:
    """The square of `side` centred at (cx, cy), shrunk to fit and shifted so it lies inside a W x H image."""
    side = int(round(min(max(side, 1), W, H)))
    x0 = int(round(min(max(cx - side / 2, 0), W - side)))
    y0 = int(round(min(max(cy - side / 2, 0), H - side)))
    return x0, y0, x0 + side, y0 + side


def crop_face(image: Image.Image, box: Box, margin: float = 0.25, grayscale: bool = False) -> Image.Image:
    """Square crop around `box`, side = max(w, h) * (1 + margin) (margin/2 added on each side), kept inside."""
    W, H = image.size
    side = max(box.w, box.h, 1) * (1 + margin)
    crop = image.crop(_square_inside((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2, side, W, H))
    return crop.convert("L").convert("RGB") if grayscale else crop.convert("RGB")


def faces_or_whole(image: Image.Image, max_faces: int = 10, grayscale: bool = False, margin: float = 0.25,
                   min_size_frac: float = 0.05) -> tuple[list[Image.Image], list[Box], bool]:
    """Crops of the detected faces, or ([centre square], [its box, score 0], False) when none is found."""
    boxes = detect_faces(image, max_faces=max_faces, min_size_frac=min_size_frac)
    if boxes:
        return [crop_face(image, b, margin, grayscale) for b in boxes], boxes, True
    W, H = image.size
    whole = Box(*_square_inside(W / 2, H / 2, min(W, H), W, H), score=0.0)
    return [crop_face(image, whole, margin=0.0, grayscale=grayscale)], [whole], False


def draw_boxes(image: Image.Image, boxes: list[Box], color: str = "#00e000") -> Image.Image:
    """A copy of `image` (RGB) with each box outlined and numbered 1, 2, ... in list order."""
    out = image.convert("RGB")                                        # convert always copies
    draw = ImageDraw.Draw(out)
    lw = max(2, round(min(out.size) / 200))
    try:
        font = ImageFont.load_default(size=max(12, round(min(out.size) / 25)))
    except (TypeError, OSError, ImportError):                         # Pillow without FreeType
        font = ImageFont.load_default()
    for i, b in enumerate(boxes, 1):
        draw.rectangle((b.x0, b.y0, b.x1 - 1, b.y1 - 1), outline=color, width=lw)
        tx, ty = b.x0 + lw, max(b.y0 - lw, 0)
        l, t, r, btm = draw.textbbox((tx, ty), str(i), font=font, anchor="lb" if ty > 0 else "lt")
        draw.rectangle((l - 2, t - 2, r + 2, btm + 2), fill=color)
        draw.text((tx, ty), str(i), fill="black", font=font, anchor="lb" if ty > 0 else "lt")
    return out


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any mode: 16-bit/float scaled to 8 bits, transparency flattened onto white, CMYK/P converted."""
    if im.mode in ("I", "F") or im.mode.startswith("I;"):
        a = np.asarray(im, dtype=np.float64)
        hi = a.max(initial=0)
        a = a if hi <= 255 else a / 257.0 if hi <= 65535 else (a - a.min()) / (hi - a.min() + 1e-12) * 255
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" or im.mode in ("LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")


def safe_open_image(src, max_pixels: int = 40_000_000) -> Image.Image:
    """A fully decoded RGB image from a path, bytes or PIL image; refuses bombs and non-images with a UserError."""
    if isinstance(src, np.ndarray):
        src = Image.fromarray(src)
    if isinstance(src, Image.Image):
        name, im = "image", src
        if im.width * im.height > max_pixels:
            raise UserError(f"{name}: {im.width}x{im.height} is over the {max_pixels:,}-pixel limit; resize it first")
        return to_rgb(ImageOps.exif_transpose(im))
    if isinstance(src, (bytes, bytearray, memoryview)):
        name, fp = "image data", io.BytesIO(bytes(src))
    elif hasattr(src, "read"):                                        # an open file / upload stream
        name, fp = str(getattr(src, "name", "image data")), src
    else:
        name, fp = str(src), src
        if not os.path.isfile(fp):
            raise UserError(f"{name}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                if im.width * im.height > max_pixels:
                    raise UserError(f"{name}: {im.width}x{im.height} is over the {max_pixels:,}-pixel limit; "
                                    "resize it first")
                im.load()
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:                                     # broken EXIF: keep the pixels as stored
                    pass
                return to_rgb(im).copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"{name}: refused as a possible decompression bomb ({e}); resize it first") from None
    except UnidentifiedImageError:
        raise UserError(f"{name}: not an image file PIL can read (use JPEG, PNG, WebP, BMP, TIFF)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UserError(f"{name}: damaged or truncated image ({str(e).splitlines()[0][:100]})") from None
