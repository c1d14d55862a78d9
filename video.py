"""Frames for the sequence views: stills and evenly sampled video frames (OpenCV), shrunk for memory.

    load_frames(paths, max_frames=32)       -> (frames, skipped): images and videos ordered by name, one line per
                                               file that could not be read (notes=[...]: videos cut short)
    video_frames(path, max_frames=32)       -> [VideoFrame(index, time_s, image, size), ...]
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from faces import check_min_side
from image_files import MAX_PIXELS, safe_open_image
from utils import UserError

MAX_FRAME_SIDE = 1280          # sequence frames are shrunk to this longest side (memory; detection works at 1024)
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".gif"}


def _natural_key(path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", Path(path).name)]


def _shrink(im: Image.Image, side: int = MAX_FRAME_SIDE) -> Image.Image:
    if max(im.size) > side:
        im = im.copy()
        im.thumbnail((side, side), Image.BILINEAR)
    return im


def read_video(path: str | os.PathLike, max_frames: int = 32, max_pixels: int = MAX_PIXELS) -> list[Image.Image]:
    """Up to max_frames RGB frames spaced evenly over the video (OpenCV); unreadable videos -> UserError."""
    return [f.image for f in video_frames(path, max_frames, max_pixels)]


class VideoFrame(NamedTuple):
    index: int                 # frame number in the file, from 0
    time_s: float | None       # None when the file gives no frame rate
    image: Image.Image         # RGB, shrunk to at most MAX_FRAME_SIDE px
    size: tuple[int, int]      # (W, H) as decoded, before shrinking: boxes on .image scale by size[0] / image.width


@functools.cache
def _quiet_opencv() -> None:
    """FFmpeg's and OpenCV's own stderr lines ("moov atom not found", "can't be used to capture by name") off: an
    unreadable video is our one line. Set before the first capture opens; a user's own setting is kept."""
    import cv2
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")                  # AV_LOG_QUIET
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def video_frames(path: str | os.PathLike, max_frames: int = 32, max_pixels: int = MAX_PIXELS,
                 notes: list[str] | None = None) -> list[VideoFrame]:
    """Up to max_frames frames spaced evenly over the video, in order; unreadable videos -> UserError. A video that
    ends before the frame count its header gives (cut short, damaged) is sampled again over the frames it has,
    and a line saying so is appended to `notes`."""
    import cv2
    _quiet_opencv()
    name = str(path)                                                  # load_frames shortens it to the file's name
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        if not cap.isOpened():
            raise UserError(_not_a_video(path, "not a video OpenCV can read"))
        w, h = cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)
        if w * h > max_pixels:
            raise UserError(f"{name}: {w:.0f}x{h:.0f} frames are over the {max_pixels:,}-pixel limit; resize it first")
        if w > 0 and h > 0:                                          # 0: the container does not say
            check_min_side((int(w), int(h)), f"{name}: its frames")
        fps, n = cap.get(cv2.CAP_PROP_FPS), int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if n <= 0:                                                   # unknown length: count by grabbing
            while cap.grab():
                n += 1
            cap = _reopen(cap, path)
        frames, read = _sample(cap, n, max_frames, fps)
        if 0 < read < n:                                             # ended early: sample what is there
            frames, _ = _sample(_reopen(cap, path), read, max_frames, fps)
            if notes is not None:
                notes.append(f"{name}: the video ends at frame {read} of the {n} its header gives; sampled from those")
    finally:
        cap.release()
    if not frames:
        raise UserError(_not_a_video(path, "no frames could be decoded"))
    return frames


def _reopen(cap, path):
    import cv2
    cap.release()
    return cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)


def _sample(cap, n: int, max_frames: int, fps: float) -> tuple[list[VideoFrame], int]:
    """(up to max_frames of the first n frames, spaced evenly; how many frames could be grabbed, at most n). Times
    are the decoder's timestamps when they increase (variable frame rates, GIF delays), else index / fps."""
    import cv2
    wanted = set(np.linspace(0, n - 1, min(n, max_frames)).round().astype(int).tolist()) if n > 0 else set()
    got, stamps, read = [], [], 0
    for i in range(max(wanted, default=-1) + 1):                      # sequential: exact frames, any codec
        if not cap.grab():
            break
        read += 1
        if i in wanted:
            ok, bgr = cap.retrieve()
            if ok:
                stamps.append(cap.get(cv2.CAP_PROP_POS_MSEC) / 1000)
                rgb = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                got.append((i, _shrink(rgb), rgb.size))
    sane = all(np.isfinite(stamps)) and stamps[:1] >= [0] and bool(np.all(np.diff(stamps) > 0))
    rate = fps and np.isfinite(fps) and fps > 0
    frames = []
    for (i, image, size), stamp in zip(got, stamps):
        t = round(stamp, 3) if sane and len(got) > 1 else round(i / fps, 3) if rate else None
        image.info["time_s"] = t                                      # load_frames' frames carry their time
        frames.append(VideoFrame(i, t, image, size))
    return frames, read


def video_kind(path) -> tuple[str, str] | None:
    """(container, extension) that a file's first bytes name, else None (a video saved under an image's name)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    if head[4:8] == b"ftyp":
        return "MP4", "mp4"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI", "avi"
    return ("Matroska/WebM", "mkv") if head[:4] == b"\x1a\x45\xdf\xa3" else None


def _not_a_video(path, why: str) -> str:
    """Why a video could not be read; a still image under a video's name is named as one."""
    try:
        with Image.open(path) as im:
            kind = im.format
    except Exception:  # noqa: BLE001 -- not an image either: the video's own reason
        kind = None
    if kind:
        return f"{path}: a {kind} image, not a video; rename it .{kind.lower()} to read it as a photo"
    if video := video_kind(path):                                   # its header says video: damaged, not the type
        return f"{path}: {why}: the file starts as an {video[0]} but is damaged or cut short (copy it again)"
    return f"{path}: {why} (use MP4, AVI, MOV, WebM)"


def _open_still(path, max_pixels: int) -> Image.Image:
    """safe_open_image; a video saved under an image's name says so (PIL's error named it no image)."""
    try:
        return safe_open_image(path, max_pixels)
    except UserError:
        if kind := video_kind(path):
            raise UserError(f"{path}: a video ({kind[0]}), not an image; rename it .{kind[1]} to score it as a "
                            "video") from None
        raise


def load_frames(paths, max_frames: int = 32, max_pixels: int = MAX_PIXELS,
                notes: list[str] | None = None) -> tuple[list[Image.Image], list[str]]:
    """Images and videos, ordered by file name (frame2 before frame10) -> (up to max_frames frames spaced evenly,
    one message per file that could not be read). Each video decodes only its share of max_frames (memory follows
    max_frames, not the number of files); a video cut short adds a line to `notes`. No readable frame -> UserError."""
    paths = sorted((str(p) for p in paths or [] if p), key=_natural_key)
    if not paths:
        raise UserError("upload several images (frames) or a short video first")
    videos = sum(Path(p).suffix.lower() in VIDEO_EXTS for p in paths)
    share = max(1, -(-(max_frames - (len(paths) - videos)) // max(videos, 1)))     # ceil; stills take one each
    frames, skipped = [], []
    for p in paths:
        try:
            if Path(p).suffix.lower() in VIDEO_EXTS:
                said: list[str] = []
                frames += [f.image for f in video_frames(p, share, max_pixels, said)]
                if notes is not None:
                    notes += [n.replace(p, Path(p).name) for n in said]
            else:
                still = _shrink(_open_still(p, max_pixels))
                check_min_side(still.size, str(p))
                still.info.pop("time_s", None)                        # a still has no time (a PNG chunk may name one)
                frames.append(still)
        except UserError as e:
            skipped.append(str(e).replace(str(p), Path(p).name))
    if not frames:
        raise UserError("no readable frame: " + "; ".join(skipped))
    if len(frames) > max_frames:
        frames = [frames[i] for i in np.linspace(0, len(frames) - 1, max_frames).round().astype(int)]
    return frames, skipped
