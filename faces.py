"""Face detection, alignment and crops for real photos.

MTCNN (facenet-pytorch; P/R/O-net weights ship in its wheel) is the default detector: boxes, a probability and 5
landmarks (eyes, nose, mouth corners). OpenCV's Haar cascades (weights inside opencv-python) are the fallback when
facenet-pytorch is not installed, or chosen with detector="haar". Both work on a copy whose longest side is at most
DETECT_SIDE (boxes are scaled back), and both are safe to call from several threads at once. When MTCNN finds
nothing it searches once more inside a grey border (MTCNN_RETRY_PAD): a face that fills the frame gives its
coarsest pyramid level no context, and the border gives it some (Haar pads every search).

detect_faces -> boxes (largest first), align_face -> eyes level and FER-2013 framing, crop_face -> the aligned crop
(landmarks) or a square crop with margin (Haar), faces_or_whole -> crops or a centre-crop fallback, draw_boxes /
annotate -> numbered boxes for display. Image files are opened by image_files.safe_open_image.
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, replace

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from utils import UserError

DETECTORS = ("auto", "mtcnn", "haar")
DETECT_SIDE = 1024    # longest side detectors work at (big photos are shrunk first: speed)
SMALL_SIDE = 160      # shortest side below which images are upscaled (tiny faces: FER is 48x48)
CROP_MAX_SIDE = 160   # an image whose longer side is at most this is a face crop already (FER 48, RAF-DB 100 px):
                      # read whole, not searched for a face (uploads, frames and gallery files alike)
MIN_SIDE = 16         # an image with a shorter side is refused: no face can be read in it (FER's faces are 48 px)
DISPLAY_SIDE = 1024   # longest side of the annotated image `annotate` returns
DECODE_SIDE = 1600    # safe_open_image(max_side=...) for photos to detect in: JPEGs decode at 1/2..1/8 scale
CROP_SIDE = 512       # crops wider than this (in image pixels) are reduced: models take 48-224 px
FACE_MARGIN = 0.25    # crop_face's default margin; with landmarks it gives exactly the FER framing below
MIN_PROB = 0.8        # MTCNN boxes below are dropped: the knee of recall vs false boxes on train faces (--tune)
MTCNN_MIN_FACE = 20   # px at the working scale: MTCNN's own default smallest face
MTCNN_FACTOR = 0.8    # pyramid step (facenet-pytorch: 0.709); finer finds ~5% more FER train faces, ~1.3x time
MTCNN_THRESHOLDS = (0.6, 0.6, 0.7)   # P-, R-, O-net (facenet-pytorch: 0.6, 0.7, 0.7), chosen on train faces
MTCNN_RETRY_PAD = 0.25   # nothing found: search again with a grey border of this share of the shorter side, which
                         # finds faces that fill the frame (tight crops over CROP_MAX_SIDE, close selfies); 0: off
# Haar cascades
CASCADES = ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml")
PAD_FRAC = 0.25       # replicate-pad each side by this fraction: lets faces that fill the frame be found
SCALE = 1.1           # detector pyramid step
MIN_NEIGHBORS = 3     # per-cascade hits needed (OpenCV's minNeighbors)
SOLO_VOTES = 15       # a box only one cascade finds is kept when it has this many hits (else: false alarm)
# FER-2013 framing: median MTCNN landmarks of FER-2013 *train* faces in the unit square (bench/bench_detect.py
# --template), made left/right symmetric: left eye, right eye, nose tip, left and right mouth corner (x, y).
FER_TEMPLATE = np.array([[0.315, 0.383], [0.685, 0.383], [0.5, 0.603], [0.345, 0.78], [0.655, 0.78]])

Point = tuple[float, float]


@dataclass(frozen=True)
class Box:
    """A face box in input-image pixels (x1, y1 exclusive). score: MTCNN probability (0-1) or the summed Haar
    cascade votes (higher = surer); landmarks: MTCNN's 5 points (left eye, right eye, nose, mouth left and right;
    image pixels), None for Haar boxes."""
    x0: int
    y0: int
    x1: int
    y1: int
    score: float = 0.0
    landmarks: tuple[Point, Point, Point, Point, Point] | None = None

    @property
    def w(self) -> int:
        return self.x1 - self.x0

    @property
    def h(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return max(self.w, 0) * max(self.h, 0)


def scale_box(box: Box, f: float) -> Box:
    """`box` and its landmarks with every coordinate multiplied by f."""
    x0, y0, x1, y1 = (int(round(v * f)) for v in (box.x0, box.y0, box.x1, box.y1))
    lm = None if box.landmarks is None else tuple((x * f, y * f) for x, y in box.landmarks)
    return replace(box, x0=x0, y0=y0, x1=x1, y1=y1, landmarks=lm)


# ----------------------------------------------------------------------------- detectors

_local = threading.local()          # OpenCV cascades are not reentrant: one set per thread
_mtcnn_lock = threading.Lock()
_mtcnn_cache: list = []             # the shared MTCNN (its forward is stateless; run under inference_mode)


def _cascade(name: str) -> cv2.CascadeClassifier:
    cache = _local.__dict__.setdefault("cascades", {})
    if name not in cache:
        path = os.path.join(cv2.data.haarcascades, name)
        cc = cv2.CascadeClassifier(path)
        if cc.empty():
            raise UserError(f"{path}: OpenCV Haar cascade missing or unreadable; reinstall opencv-python-headless")
        cache[name] = cc
    return cache[name]


def _mtcnn():
    """The shared MTCNN nets (built once, thread-safe); ImportError when facenet-pytorch is not importable."""
    import facenet_pytorch
    with _mtcnn_lock:
        if not _mtcnn_cache:
            _mtcnn_cache.append(facenet_pytorch.MTCNN(keep_all=True, device="cpu").eval())
    return _mtcnn_cache[0]


def pick_detector(detector: str = "auto") -> str:
    """'auto' -> 'mtcnn' when facenet-pytorch imports, else 'haar'; 'mtcnn' without it -> UserError."""
    if detector not in DETECTORS:
        raise UserError(f"detector {detector!r}: use one of {', '.join(DETECTORS)}")
    if detector == "haar":
        return "haar"
    try:
        import facenet_pytorch  # noqa: F401
    except (ImportError, OSError):
        if detector == "mtcnn":
            raise UserError("detector 'mtcnn' needs facenet-pytorch (pip install facenet-pytorch==2.5.3); "
                            "or use detector='haar'") from None
        return "haar"
    return "mtcnn"


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


def _haar(gray: np.ndarray, min_face: float) -> tuple[np.ndarray, np.ndarray, None]:
    """Haar faces in gray [H,W] uint8 -> (boxes [N,4] x0,y0,x1,y1 in its pixels, summed votes [N], no landmarks)."""
    pad = round(PAD_FRAC * min(gray.shape))
    work = cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    side = max(round(min_face), 20)
    found, votes, source = [], [], []
    for c, name in enumerate(CASCADES):
        rects, n = _cascade(name).detectMultiScale2(work, scaleFactor=SCALE, minNeighbors=MIN_NEIGHBORS,
                                                    minSize=(side, side))
        for (x, y, w, h), k in zip(rects, n):
            found += [[x - pad, y - pad, x + w - pad, y + h - pad]]
            votes.append(float(k))
            source.append(c)
    xyxy = np.array(found, dtype=np.float64).reshape(-1, 4)          # [N,4]
    H, W = gray.shape
    xyxy[:, [0, 2]], xyxy[:, [1, 3]] = xyxy[:, [0, 2]].clip(0, W), xyxy[:, [1, 3]].clip(0, H)
    ok = (xyxy[:, 2] - xyxy[:, 0] >= 1) & (xyxy[:, 3] - xyxy[:, 1] >= 1)  # drop hits wholly in the padding
    xyxy, votes, source = xyxy[ok], np.array(votes)[ok], np.array(source, dtype=int)[ok]
    keep = [(g[0], votes[g].sum()) for g in _nms(xyxy, votes)
            if len(set(source[g].tolist())) >= min(2, len(CASCADES)) or votes[g[0]] >= SOLO_VOTES]
    return xyxy[[i for i, _ in keep]].reshape(-1, 4), np.array([v for _, v in keep]), None


def _run_mtcnn(rgb: np.ndarray, min_face: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MTCNN on rgb [H,W,3] uint8 -> (boxes [N,4], probabilities [N], landmarks [N,5,2]), in its pixels."""
    import torch
    from facenet_pytorch.models.utils.detect_face import detect_face
    net = _mtcnn()
    with torch.inference_mode():
        try:
            boxes, points = detect_face(rgb, max(min_face, MTCNN_MIN_FACE), net.pnet, net.rnet, net.onet,
                                        list(MTCNN_THRESHOLDS), MTCNN_FACTOR, net.device)
        except RuntimeError as e:               # facenet-pytorch 2.5.3: every candidate box off the image
            if "non-empty" not in str(e):
                raise
            return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
    b = np.asarray(boxes[0], dtype=np.float64).reshape(-1, 5)         # [N, x0 y0 x1 y1 p]
    return b[:, :4], b[:, 4], np.asarray(points[0], dtype=np.float64).reshape(-1, 5, 2)


def _mtcnn_kept(work: np.ndarray, min_face: float, pad: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """_run_mtcnn's boxes of probability >= MIN_PROB, searched on `work` with a grey border of `pad` x its shorter
    side; boxes and landmarks in work's own pixels (a box may reach past its edge: clipped later)."""
    p = int(round(pad * min(work.shape[:2])))
    if p:
        work = cv2.copyMakeBorder(work, p, p, p, p, cv2.BORDER_CONSTANT, value=(128, 128, 128))
    xyxy, score, points = _run_mtcnn(work, min_face)
    keep = score >= MIN_PROB
    return xyxy[keep] - p, score[keep], points[keep] - p


def _work_copy(image: Image.Image, s: float, gray: bool) -> np.ndarray:
    """`image` resized by s (downscaling reduces first: cheap on 36 MP photos) -> uint8 [h,w] or [h,w,3]."""
    W, H = image.size
    size = (max(1, round(W * s)), max(1, round(H * s)))
    im = image if image.mode in ("L", "RGB") else image.convert("RGB")
    if s < 1:
        im = im.resize(size, Image.BILINEAR, reducing_gap=2.0)
    a = np.asarray(im.convert("L" if gray else "RGB"))
    if s > 1:
        a = cv2.resize(a, size, interpolation=cv2.INTER_CUBIC)
    return a


def detect_faces(image: Image.Image, max_faces: int = 10, min_size_frac: float = 0.05,
                 detector: str = "auto") -> list[Box]:
    """Faces in `image` (any PIL mode), largest first; min_size_frac is relative to the shorter side. Detection
    runs on a copy with at most DETECT_SIDE px on its longest side; boxes and landmarks are in input pixels."""
    kind = pick_detector(detector)
    W, H = image.size
    if min(H, W) < 8:
        return []
    min_face = max(min_size_frac * min(H, W), 1.0)                    # px, input scale
    s = min(1.0, max(DETECT_SIDE / max(H, W), 24.0 / min_face))       # shrink big photos, keeping faces >= 24 px
    s = min(max(s, SMALL_SIDE / min(H, W)), 8.0)                      # tiny images (FER 48x48) go up
    work = _work_copy(image, s, gray=kind == "haar")
    if kind == "haar":
        xyxy, score, points = _haar(work, min_face * s)
    else:
        xyxy, score, points = _mtcnn_kept(work, min_face * s, 0.0)
        if not len(xyxy) and MTCNN_RETRY_PAD > 0:
            xyxy, score, points = _mtcnn_kept(work, min_face * s, MTCNN_RETRY_PAD)
    boxes = []
    for i, b in enumerate(xyxy / s):                                  # back to input pixels
        x0, y0, x1, y1 = _clipped(b, W, H)
        lm = None if points is None else tuple((float(x), float(y)) for x, y in points[i] / s)
        if x1 > x0 and y1 > y0:                                       # rounding can still empty a sliver
            boxes.append(Box(x0, y0, x1, y1, float(score[i]), lm))
    return sorted(boxes, key=lambda b: (-b.area, -b.score))[:max_faces]


def _clipped(b: np.ndarray, W: int, H: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(round(v)) for v in b)
    return max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)


# ----------------------------------------------------------------------------- alignment and crops

def align_transform(landmarks, scale: float = 1.0) -> tuple[np.ndarray, float]:
    """5 landmarks [5,2] (image px) -> (A [2,3]: image px -> unit-square crop coordinates, crop side in image px).
    A rotates so the eyes are level, then scales and shifts by the least-squares fit of the points to
    FER_TEMPLATE; scale > 1 widens the window around the same centre. Degenerate points -> ValueError."""
    p = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    dx, dy = p[1] - p[0]
    c, s = math.cos(math.atan2(dy, dx)), math.sin(math.atan2(dy, dx))
    rot = np.array([[c, s], [-s, c]])                                 # rotation by minus the eye angle
    r = p @ rot.T                                                     # [5,2], eyes level
    q = FER_TEMPLATE
    k = ((r - r.mean(0)) * (q - q.mean(0))).sum() / ((q - q.mean(0)) ** 2).sum()   # image px per unit
    if not (np.isfinite(k) and k > 1e-6 and np.isfinite(p).all() and scale > 0):
        raise ValueError("degenerate landmarks")
    t = r.mean(0) - k * q.mean(0)                                     # r ~= k q + t
    A = np.hstack([rot / (k * scale), ((-t / k - 0.5) / scale + 0.5)[:, None]])
    return A, float(k * scale)


def align_face(image: Image.Image, landmarks, scale: float = 1.0, grayscale: bool = False,
               max_side: int = CROP_SIDE) -> Image.Image:
    """Square RGB crop with the eyes level, framed like FER-2013 faces (eyes ~0.38 of the height, forehead to
    chin); side = the face's own size in image pixels, at most max_side. Only the face's region is read (big photos
    are reduced first); outside the image the border pixels are repeated."""
    A, side = align_transform(landmarks, scale)
    n = int(round(min(max(side, 8.0), max_side)))                     # output px
    inv = cv2.invertAffineTransform(A)                                # unit square -> image px
    corners = inv @ np.array([[0, 1, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=np.float64)   # [2,4]
    W, H = image.size
    x0, y0 = (int(min(max(math.floor(v) - 2, 0), lim - 1)) for v, lim in zip(corners.min(1), (W, H)))
    x1, y1 = (int(min(max(math.ceil(v) + 3, lo + 1), lim)) for v, lim, lo in zip(corners.max(1), (W, H), (x0, y0)))
    region = image.crop((x0, y0, x1, y1))
    f = max(int(side / n), 1)                                         # reduce the region first (box filter)
    if f > 1:
        region = region.reduce(f)
    a = np.asarray(region.convert("L" if grayscale else "RGB"))
    M = n * A                                                         # image px -> output px
    M = np.hstack([M[:, :2] * f, (M[:, 2] + M[:, :2] @ [x0 + (f - 1) / 2, y0 + (f - 1) / 2] - 0.5)[:, None]])
    out = cv2.warpAffine(a, M, (n, n), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return Image.fromarray(out).convert("RGB")


def _square_inside(cx: float, cy: float, side: float, W: int, H: int) -> tuple[int, int, int, int]:
    """The square of `side` centred at (cx, cy), shrunk to fit and shifted so it lies inside a W x H image."""
    side = int(round(min(max(side, 1), W, H)))
    x0 = int(round(min(max(cx - side / 2, 0), W - side)))
    y0 = int(round(min(max(cy - side / 2, 0), H - side)))
    return x0, y0, x0 + side, y0 + side


def crop_face(image: Image.Image, box: Box, margin: float = FACE_MARGIN, grayscale: bool = False,
              max_side: int = CROP_SIDE) -> Image.Image:
    """A box with landmarks (MTCNN): align_face, window widened by (1 + margin) / (1 + FACE_MARGIN), so the default
    margin is the FER framing. Without (Haar): square crop around the box, side = max(w, h) * (1 + margin), kept
    inside the image. Crops wider than max_side are reduced to it."""
    if box.landmarks is not None:
        try:
            return align_face(image, box.landmarks, (1 + margin) / (1 + FACE_MARGIN), grayscale, max_side)
        except ValueError:                                            # degenerate landmarks: plain square crop
            pass
    W, H = image.size
    side = max(box.w, box.h, 1) * (1 + margin)
    crop = image.crop(_square_inside((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2, side, W, H))
    if crop.width > max_side:
        crop = crop.resize((max_side, max_side), Image.BILINEAR, reducing_gap=2.0)
    return crop.convert("L").convert("RGB") if grayscale else crop.convert("RGB")


def faces_or_whole(image: Image.Image, max_faces: int = 10, grayscale: bool = False, margin: float = FACE_MARGIN,
                   min_size_frac: float = 0.05, detector: str = "auto") -> tuple[list[Image.Image], list[Box], bool]:
    """Crops of the detected faces, or ([centre square], [its box, score 0], False) when none is found."""
    boxes = detect_faces(image, max_faces=max_faces, min_size_frac=min_size_frac, detector=detector)
    if boxes:
        return [crop_face(image, b, margin, grayscale) for b in boxes], boxes, True
    W, H = image.size
    whole = Box(*_square_inside(W / 2, H / 2, min(W, H), W, H), score=0.0)
    return [crop_face(image, whole, margin=0.0, grayscale=grayscale)], [whole], False


def check_min_side(size: tuple[int, int], name: str = "the image") -> None:
    """UserError when an image is too small to hold a readable face (a side under MIN_SIDE px: a 1x1 upload, a strip)."""
    if min(size) < MIN_SIDE:
        raise UserError(f"{name}: {size[0]}x{size[1]} px is too small to read a face (at least {MIN_SIDE} px a side); "
                        "use a larger photo or face crop")


def is_crop_sized(size: tuple[int, int]) -> bool:
    """(W, H) -> True when the image is small enough to be a face crop already (longer side <= CROP_MAX_SIDE)."""
    return max(size) <= CROP_MAX_SIDE


def draw_boxes(image: Image.Image, boxes: list[Box], color: str = "#00e000", first: int = 1) -> Image.Image:
    """A copy of `image` (RGB) with each box outlined and numbered first, first + 1, ... in list order (the face
    numbers); landmarks as dots."""
    out = image.convert("RGB")                                        # convert always copies
    draw = ImageDraw.Draw(out)
    lw = max(2, round(min(out.size) / 200))
    try:
        font = ImageFont.load_default(size=max(12, round(min(out.size) / 25)))
    except (TypeError, OSError, ImportError):                         # Pillow without FreeType
        font = ImageFont.load_default()
    for i, b in enumerate(boxes, first):
        draw.rectangle((b.x0, b.y0, b.x1 - 1, b.y1 - 1), outline=color, width=lw)
        for x, y in b.landmarks or ():
            draw.ellipse((x - lw, y - lw, x + lw, y + lw), fill=color)
        tx, ty = b.x0 + lw, max(b.y0 - lw, 0)
        l, t, r, btm = draw.textbbox((tx, ty), str(i), font=font, anchor="lb" if ty > 0 else "lt")
        draw.rectangle((l - 2, t - 2, r + 2, btm + 2), fill=color)
        draw.text((tx, ty), str(i), fill="black", font=font, anchor="lb" if ty > 0 else "lt")
    return out


def annotate(image: Image.Image, boxes: list[Box], side: int = DISPLAY_SIDE, first: int = 1) -> Image.Image:
    """draw_boxes on a copy reduced to at most `side` px on its longest side (what a browser needs to show)."""
    W, H = image.size
    f = min(1.0, side / max(W, H))
    if f < 1:
        image = image.resize((max(1, round(W * f)), max(1, round(H * f))), Image.BILINEAR, reducing_gap=2.0)
        boxes = [scale_box(b, f) for b in boxes]
    return draw_boxes(image, boxes, first=first)
