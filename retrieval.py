"""Search functions behind the demo, usable without Gradio.

    engine = Engine.load("model_final.pth", "images/")
    search_text(engine, "a wide smile", k=8)            -> [(path, cosine), ...]
    rank_expressions(engine, pil_image, sentences)      -> [(sentence, probability, cosine), ...]
    similar_images(engine, pil_image, k=8)              -> [(path, cosine), ...]
    similar_to_gallery_image(engine, path, k=8)         -> [(path, cosine), ...], the query itself first
    rank_faces(engine, photo, sentences, max_faces=5)   -> FaceScores (boxes largest first, probs [F, C])
    score_frames(engine, frames, sentences)             -> probabilities [T, C]

Frames come from video.load_frames (images and evenly sampled video frames).
"""
from __future__ import annotations

import hashlib
import os
import threading
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from checkpoint import create_model_and_transforms
from config import Config
from transform import Preprocess
from embed import embed_images, embed_texts
from faces import Box, annotate, check_min_side, faces_or_whole, is_crop_sized
from image_files import safe_open_image
from index import GalleryIndex, make_encoder
from logs import get_logger
from model import ExprCLIP
from precision import autocast_for
from utils import UserError, file_digest, pick_device

log = get_logger(__name__)
MAX_QUERY_CHARS = 500
TEXT_CACHE = 4096             # sentence embeddings an Engine keeps (Engine.embed_text)


@dataclass
class Engine:
    model: ExprCLIP
    preprocess: Preprocess                              # the model's eval preprocessing (path or PIL -> tensor)
    device: torch.device
    index: "PhotoIndex | None"                          # photos.PhotoIndex: one entry per face / face-crop file
    failed: list[Path] = field(default_factory=list)     # gallery files that could not be decoded
    stats: dict = field(default_factory=dict)           # last gallery update: added/changed/unchanged/... counts
    upload_dir: Path | None = None                      # photos added from the page (inside the cache folder)
    tta: bool = True                                    # each face averaged with its mirror image (chosen on val)
    _texts: dict = field(default_factory=dict, repr=False)           # sentence -> [D] embedding (embed_text)
    _texts_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def cfg(self) -> Config:
        return self.model.cfg

    @property
    def autocast(self):
        return autocast_for(self.cfg, self.device)[0]   # the checkpoint's precision (fp32 for the CPU presets)

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, gallery: str | os.PathLike | None, device: str = "auto",
             cache_root: str | os.PathLike = ".cache/gallery", progress: bool = True, faces: str = "auto",
             tta: bool = True) -> "Engine":
        """Rebuild the model from the checkpoint alone, then embed the gallery (cached on disk, incremental)."""
        dev = pick_device(device)
        model, _, preprocess = create_model_and_transforms(checkpoint, dev)
        engine = cls(model, preprocess, dev, None, tta=tta)
        if gallery is not None:
            engine.index_gallery(gallery, file_digest(checkpoint), cache_root, progress, faces)
        return engine

    def index_gallery(self, gallery, digest: str, cache_root, progress: bool = True, faces: str = "auto") -> dict:
        """Every face of the gallery's photos (face-crop files: one entry each; photos.py), keyed by checkpoint
        digest and each file's (path, size, mtime): only new/changed photos are indexed. The cache lives under
        cache_root/<gallery path hash>/ so read-only galleries work too; photos added from the page go to its
        uploads/ folder and are indexed with the gallery."""
        from photos import PhotoIndex
        gallery = Path(gallery)
        if not gallery.is_dir():
            what = "is a file, not a folder" if gallery.exists() else "gallery folder not found"
            raise UserError(f"{gallery}: {what} (pass --gallery DIR, a folder of photos)")
        key = hashlib.sha256(str(gallery.resolve()).encode()).hexdigest()[:12]
        self.upload_dir = Path(cache_root) / key / "uploads"
        digest = digest + ("+flip" if self.tta else "")                 # flip and plain embeddings never mix
        self.index = PhotoIndex(GalleryIndex.open(gallery, digest, self.model.embed_dim,
                                                  index_root=Path(cache_root) / key / "photos"),
                                faces, grayscale=self.cfg.grayscale, extra_dirs=(self.upload_dir,))
        return self.reindex(progress)

    def reindex(self, progress: bool = True, on_progress=None) -> dict:
        """Bring the gallery index up to date with its folders (new, changed, removed photos)."""
        encode = make_encoder(self.model, self.preprocess, self.device, self.autocast, self.tta)
        stats = self.index.update(self.index.sources(), encode, progress=progress, on_progress=on_progress)
        self.failed = list(stats.get("failed_paths", []))
        self.stats = stats
        return stats

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """Sentences -> [n, D] unit vectors; each is cut to the text tower's max_length tokens (query_warnings).
        Each sentence is encoded once per engine (an expression list re-ranked for every photo or request costs
        nothing after the first); thread-safe, at most TEXT_CACHE sentences kept."""
        texts = list(texts)
        with self._texts_lock:
            new = list(dict.fromkeys(t for t in texts if t not in self._texts))
        if new:
            emb = embed_texts(self.model, new, self.autocast)                # [m, D]
            with self._texts_lock:
                if len(self._texts) + len(new) > TEXT_CACHE:
                    self._texts.clear()
                self._texts.update(zip(new, emb))
        with self._texts_lock:
            got = [self._texts.get(t) for t in texts]
        if any(g is None for g in got):                                   # cleared by another thread meanwhile
            return embed_texts(self.model, texts, self.autocast)
        return np.stack(got) if got else embed_texts(self.model, texts, self.autocast)   # [n, D]

    def query_warnings(self, query: str) -> list[str]:
        """What the text tower will not read of `query` (unknown script, truncation), as sentences for the user."""
        return query_warnings(self.model.tokenizer, query, self.cfg.max_length)

    def embed_image(self, image: Image.Image) -> np.ndarray:
        """PIL image -> [D] unit vector, with the model's own eval preprocessing (gray faces -> 3 channels)."""
        return self.embed_images([image])[0]

    def embed_images(self, images: list[Image.Image], batch_size: int = 64) -> np.ndarray:
        """PIL images (or paths, arrays, bytes: as_image) -> [N, D] unit vectors, encoded in batches
        (embed.embed_images; mirror-averaged with tta)."""
        images = [im if isinstance(im, Image.Image) else as_image(im) for im in images]
        emb, ok = embed_images(self.model, images, self.preprocess, self.device, batch_size, self.autocast, self.tta)
        if not ok.all():
            raise UserError(f"{int((~ok).sum())} image(s) could not be read")
        return emb                                                       # [N, D]


def clean_query(text: str | None) -> str:
    """The query as searched: control characters (NUL, ...) as spaces, stripped, at most MAX_QUERY_CHARS characters;
    empty, only invisible characters (zero-width, direction marks) or not text -> UserError."""
    text = (text if isinstance(text, str) else "").lstrip()[:2 * MAX_QUERY_CHARS]     # a megabyte costs nothing
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text).strip()
    if not "".join(c for c in text if unicodedata.category(c) != "Cf").strip():
        raise UserError("type a description of an expression first, e.g. 'a wide smile'")
    return text[:MAX_QUERY_CHARS]


def _spelled_out(pieces: list[str]) -> bool:
    """A word the vocabulary only knows letter by letter (e.g. Hangul split into jamo, Cyrillic into letters)."""
    chars = [p.lstrip("#▁Ġ") for p in pieces]
    return len(pieces) >= 3 and all(len(c) == 1 and c.isalpha() for c in chars)


def query_warnings(tokenizer, query: str, max_length: int, unreadable_share: float = 0.5) -> list[str]:
    """Warnings about a query the text tower cannot read as written (pure: tokenizer in, sentences out).

    Unreadable: the share of the query's word pieces that are the tokenizer's unknown token, or that spell a word
    letter by letter (an uncased English WordPiece turns Korean into jamo, not [UNK]), is at least
    `unreadable_share`. Truncated: the query plus special tokens is longer than `max_length` tokens, and the tower
    reads only the first `max_length`. A query over MAX_QUERY_CHARS characters is cut there first (clean_query)."""
    text = (query if isinstance(query, str) else "").strip()
    cut = text[:MAX_QUERY_CHARS]
    words = cut.split()
    if not words:
        return []
    if getattr(tokenizer, "reads_all_scripts", False):               # a multilingual sentence tower, any length
        return [f"The query is {len(text):,} characters long: only the first {MAX_QUERY_CHARS} were read. Shorten "
                "it to the expression."] if len(text) > len(cut) else []
    unk = tokenizer.unk_token_id
    per_word = tokenizer(words, add_special_tokens=False)["input_ids"]       # word pieces of each word
    total = sum(len(ids) for ids in per_word)
    unreadable = sum(len(ids) if _spelled_out(tokenizer.convert_ids_to_tokens(ids))
                     else sum(i == unk for i in ids) for ids in per_word)
    notes = []
    if total and unreadable / total >= unreadable_share:
        notes.append(f"The text model does not know most of this query ({unreadable} of {total} word pieces are "
                     "unknown or spelled letter by letter: another script or language?), so these results are "
                     "not meaningful. Describe the expression in English.")
    dropped = len(tokenizer(cut, add_special_tokens=True)["input_ids"]) - max_length    # with [CLS]/[SEP]
    if len(text) > len(cut):
        notes.append(f"The query is {len(text):,} characters long: only the first {MAX_QUERY_CHARS} were read"
                     + (f", and the text model reads {max_length} tokens of those ({dropped} more token(s) "
                        "ignored)" if dropped > 0 else "") + ". Shorten it to the expression.")
    elif dropped > 0:
        notes.append(f"The text model reads {max_length} tokens: the last {dropped} token(s) of this query were "
                     "ignored. Shorten it to the expression.")
    return notes


def as_image(image) -> Image.Image:
    """What the Python API takes for an image: a PIL image, a path (str or Path, ~ expanded), a numpy array or the
    file's bytes -> PIL; a URL or anything else -> UserError saying what to pass."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, str) and "://" in image:
        raise UserError(f"{image}: URLs are not fetched; download the image and pass its path")
    if isinstance(image, (str, os.PathLike)):
        image = os.path.expanduser(image)
    return safe_open_image(image)


def as_sentences(sentences) -> list[str]:
    """The expression sentences, stripped, empty ones dropped; one string (not a list) or none left -> UserError."""
    if isinstance(sentences, str):
        raise UserError(f"sentences: a list of descriptions, not one string ({sentences[:40]!r}); e.g. "
                        "['a wide smile', 'a frown']")
    sentences = [s.strip() for s in sentences if isinstance(s, str) and s.strip()]
    if not sentences:
        raise UserError("the expression list is empty: add at least one description, one per line")
    return sentences


def search_text(engine: Engine, query: str, k: int = 8) -> list[tuple[Path, float]]:
    """Gallery images ranked by cosine similarity to a sentence, best first."""
    q = engine.embed_text([clean_query(query)])                          # [1, D]
    return _search(engine, q, k)


def similar_images(engine: Engine, image: Image.Image, k: int = 8) -> list[tuple[Path, float]]:
    """Gallery images with the most similar expression to `image` (image embedding vs gallery)."""
    return _search(engine, engine.embed_image(image)[None], k)


def similar_to_gallery_image(engine: Engine, path: str | os.PathLike, k: int = 8) -> list[tuple[Path, float]]:
    """Gallery entries (faces, face-crop files) with the expression closest to the entry `path` (a search result:
    its stored embedding is the query); that entry itself comes first."""
    path, k = Path(path), max(int(k), 1)
    try:
        q = engine.index.vector(path)
    except KeyError:
        raise UserError(f"{path.name}: not in the gallery; search first, then click one of the results") from None
    if not engine.index.entry(path).is_current():
        raise UserError(f"{path.name}: moved, deleted or replaced since the gallery was indexed; search again")
    hits = _search(engine, q[None], k + 1)
    is_query = [os.path.abspath(p) == os.path.abspath(path) for p, _ in hits]
    own = next((s for (_, s), q in zip(hits, is_query) if q), 1.0)     # float16 storage: ~1.0, not exactly
    return [(path, own)] + [h for h, q in zip(hits, is_query) if not q][:k - 1]


def _search(engine: Engine, q: np.ndarray, k: int) -> list[tuple[Path, float]]:
    """The k best gallery entries still as indexed (a photo deleted or replaced since is left out: the search widens
    to fill k); cosines clipped to 1 (float16 storage)."""
    if engine.index is None or len(engine.index) == 0:
        raise UserError("the gallery is empty: put images in the gallery folder (--gallery DIR) and restart")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UserError(f"k {k!r}: give a whole number >= 1 (how many results)")
    hits, stale = engine.index.search_current(q, k)
    if stale:
        log.info(f"left out {stale} result(s) whose photo changed since indexing")
    return hits


def rank_expressions(engine: Engine, image: Image.Image, sentences: list[str]) -> list[tuple[str, float, float]]:
    """Zero-shot: (sentence, softmax probability at the model's temperature, cosine), most likely first."""
    sentences = as_sentences(sentences)
    cos = engine.embed_text(sentences) @ engine.embed_image(image)      # [S]
    prob = softmax_at_scale(engine, cos)
    order = np.argsort(-cos, kind="stable")
    return [(sentences[i], float(prob[i]), float(cos[i])) for i in order]


def score_images(engine: Engine, images: list[Image.Image], sentences: list[str]) -> np.ndarray:
    """[N, C] softmax probabilities (model temperature) of each image over the sentences; texts encoded once."""
    sentences = as_sentences(sentences)
    return softmax_at_scale(engine, engine.embed_images(images) @ engine.embed_text(sentences).T)   # [N, C]


def softmax_at_scale(engine: Engine, cos: np.ndarray) -> np.ndarray:
    """Cosines [..., C] -> probabilities over the last axis at the model's temperature."""
    logits = engine.model.scale().item() * cos
    prob = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return prob / prob.sum(axis=-1, keepdims=True)


@dataclass
class FaceScores:
    boxes: list[Box]      # the faces scored, largest first (numbered 1, 2, ... by faces.draw_boxes); [] if detect off
    found: bool           # False: no face found (or detection off), the whole image was scored
    more: bool            # more than max_faces faces were found; the largest max_faces were kept
    probs: np.ndarray     # [F, C] probabilities over the sentences, one row per box (one row when not found)
    shown: Image.Image | None = None   # the photo reduced for display (<= faces.DISPLAY_SIDE px), boxes drawn
    crop: bool = False    # detect on, but the image is face-crop sized (faces.CROP_MAX_SIDE): read whole, no search


def rank_faces(engine: Engine, photo: Image.Image, sentences: list[str], detect: bool = True,
               max_faces: int = 5, detector: str = "auto", name: str = "the image") -> FaceScores:
    """Score each detected face (largest first, at most max_faces; aligned crops where the detector gives
    landmarks) or, when none is found, the whole image. An image of at most faces.CROP_MAX_SIDE px is a face crop
    already (FER's 48 px faces): it is read whole, as the gallery reads such files (.crop). .shown is small
    whatever the photo's size. Under faces.MIN_SIDE px a side -> UserError naming `name`."""
    photo = as_image(photo)
    crops, boxes, how = _frame_faces(photo, detect, engine.cfg.grayscale, detector, max_faces + 1, name)
    found, more = how == "face", len(crops) > max_faces
    return FaceScores(boxes[:max_faces], found, more, score_images(engine, crops[:max_faces], sentences),
                      annotate(photo, boxes[:max_faces] if found else []), crop=how == "crop")


class FrameCrops(NamedTuple):
    crops: list[Image.Image]   # what to encode, one per frame
    found: list[bool]          # a face was found in that frame (or the frame is a face crop)
    people: int                # persons seen in two frames or more (sequence.track_faces)
    followed: int              # frames holding the person followed
    away: list[bool]           # faces found, but not the followed person's: leave the frame out of their scores


def frame_crops(frames: list[Image.Image], detect: bool, grayscale: bool = False, detector: str = "auto",
                max_faces: int = 5) -> FrameCrops:
    """One person's face in each frame (detect on; aligned crops with MTCNN): the person seen in the most frames
    (sequence.track_faces numbers the faces; ties go to the one seen first). A frame with other faces only is
    marked .away (its crop: the largest face); the whole frame when none is found (the centre square) or detection
    is off. A face-crop sized frame (faces.CROP_MAX_SIDE) is its face: whole, found."""
    from sequence import track_faces
    per = [_frame_faces(f, detect, grayscale, detector, max_faces) for f in frames]     # (crops, boxes, how)
    ids = track_faces([[(b.x0, b.y0, b.x1, b.y1) for b in boxes] if how == "face" else [] for _, boxes, how in per])
    frames_of = Counter(p for got in ids for p in got)                # person -> frames it is in
    main = max(frames_of, key=lambda p: (frames_of[p], -p)) if frames_of else None
    chosen = [found[got.index(main) if main in got else 0] for (found, _, _), got in zip(per, ids)]
    return FrameCrops(chosen, [how in ("face", "crop") for _, _, how in per],
                      sum(n > 1 for n in frames_of.values()), frames_of[main] if main else 0,
                      [bool(got) and main not in got for got in ids])


def _frame_faces(image: Image.Image, detect: bool, grayscale: bool, detector: str, max_faces: int,
                 name: str = "the image") -> tuple[list[Image.Image], list[Box], str]:
    """(crops largest first, their boxes, how): as largest_face, with up to max_faces faces."""
    image = as_image(image)
    check_min_side(image.size, name)
    if not detect or is_crop_sized(image.size):
        return [image], [], "crop" if detect else "whole"
    crops, boxes, found = faces_or_whole(image, max_faces=max_faces, grayscale=grayscale, detector=detector)
    return crops, boxes, "face" if found else "no face"


def largest_face(image: Image.Image, detect: bool = True, grayscale: bool = False,
                 detector: str = "auto") -> tuple[Image.Image, str]:
    """(what to encode, how it was chosen): the largest face's aligned crop ("face"); the image itself when it is
    face-crop sized ("crop", faces.CROP_MAX_SIDE) or detection is off ("whole"); the centre square when no face is
    found ("no face")."""
    crops, _, how = _frame_faces(image, detect, grayscale, detector, max_faces=1)
    return crops[0], how


def score_frames(engine: Engine, frames: list[Image.Image], sentences: list[str]) -> np.ndarray:
    """[T, C] per-frame probabilities over the sentences (frames as given: crop faces first with frame_crops)."""
    if not frames:
        raise UserError("no frames to score: upload several images or a short video")
    return score_images(engine, frames, sentences)
