"""Galleries of ordinary photos: every face found is one searchable entry; face-crop files stay one entry each.

The rule (FACES_MODES, `--faces`):
  auto    a file whose longer side is at most CROP_MAX_SIDE px (FER faces are 48, the bundled sample 64) is already a
          face crop: one entry, the whole file, encoded as before. A larger file is a photo: each face the detector
          finds is one entry, detected and aligned exactly as an uploaded photo (safe_open_image at DECODE_SIDE, then
          faces.faces_or_whole); a close-up portrait is one entry (its face); a photo without a face has none.
  crops   every file is one entry, the whole file (no detection).
  photos  every file goes through detection, however small.

Entries live in an index.GalleryIndex keyed `photo` (a whole file) or `photo#i` (face i, largest first). Beside its
chunks, photos.jsonl records each finished photo: size, mtime, mode, the decoded size and its face boxes (also for
photos without a face, so a relaunch re-detects nothing). A photo's entries are written as one chunk before its
record is appended (fsync), so a kill loses only the photo in progress; a record whose entries are missing, or
entries without a record, are redone. Face crops are kept small as JPEGs in crops/ for display.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from faces import CROP_MAX_SIDE, MIN_SIDE, is_crop_sized  # noqa: F401 -- CROP_MAX_SIDE: the rule above
from image_files import header_size
from index import BUSY, GalleryIndex, list_images
from utils import UserError, atomic_write_text, error_text, first_line, folder_lock

FACES_MODES = ("auto", "crops", "photos")
MAX_FACES = 20               # faces kept per photo, largest first
THUMB_SIDE = 160             # stored face crops (display only; the embedding is of the full aligned crop)
LOG_NAME = "photos.jsonl"


@dataclass(frozen=True)
class Entry:
    """One search result: the photo it comes from, which face (None: the whole file) and its box (decoded px)."""
    key: str
    photo: Path
    face: int | None
    box: tuple[int, int, int, int] | None
    size: tuple[int, int] | None         # the decoded photo's size the box refers to
    thumb: Path | None
    stat: tuple[int, int] | None = None  # the photo's (size, mtime_ns) when it was indexed

    def is_current(self) -> bool:
        """The photo is still the file that was indexed (not moved, deleted or replaced since)."""
        try:
            st = self.photo.stat()
        except OSError:
            return False
        return self.stat is None or (st.st_size, st.st_mtime_ns) == self.stat


def split_key(key: str) -> tuple[str, int | None]:
    """'a/b.jpg#2' -> ('a/b.jpg', 2); 'a/b.jpg' -> ('a/b.jpg', None). Photo keys end in an image extension."""
    head, _, tail = key.rpartition("#")
    return (head, int(tail)) if head and tail.isdecimal() else (key, None)


def entry_keys(rec: dict) -> list[str]:
    return [rec["k"]] if rec.get("faces") is None else [f"{rec['k']}#{i}" for i in range(len(rec["faces"]))]


def is_face_crop(path: Path, mode: str) -> bool:
    """The rule above, from the file's header only (no decode); unreadable headers -> False (the photo path says
    what is wrong)."""
    if mode != "auto":
        return mode == "crops"
    size = header_size(path)
    return size is not None and is_crop_sized(size)


def too_small(path: Path) -> str | None:
    """Why a face-crop file is refused for its size (faces.check_min_side, as an upload), or None."""
    from faces import check_min_side
    try:
        check_min_side(header_size(path) or (MIN_SIDE, MIN_SIDE), str(path))
    except UserError as e:
        return _reason(e, path)
    return None


def photo_faces(path: Path, grayscale: bool, detector: str = "auto", max_faces: int = MAX_FACES):
    """(aligned crops, boxes, size) of a photo, exactly as an uploaded photo is cropped, the boxes in the file's own
    pixels after its EXIF rotation (as predict.py's) and size that file size; UserError if bad or too small."""
    from faces import DECODE_SIDE, check_min_side, faces_or_whole
    from image_files import safe_open_image
    photo = safe_open_image(path, max_side=DECODE_SIDE)
    size = photo.info["file_size"]
    check_min_side(size, str(path))
    crops, boxes, found = faces_or_whole(photo, max_faces=max_faces, grayscale=grayscale, detector=detector)
    f = size[0] / photo.width                                            # decoded -> file pixels
    boxes = [replace(b, **{k: round(getattr(b, k) * f) for k in ("x0", "y0", "x1", "y1")}) for b in boxes]
    return (crops, boxes, size) if found else ([], [], size)


class FaceReader:
    """A preprocess (path -> tensor) over the face the `mode` rule reads in each file, for scoring labelled images
    as the demo reads them (evaluate.py --faces): a face-crop file whole; a photo's largest face, found and aligned
    as an upload's, or its centre square when none is found (as the demo scores it). Thread-safe; .counts says how
    many files went each way: crop, face, no face."""

    def __init__(self, preprocess: Callable, mode: str = "auto", grayscale: bool = False, detector: str = "auto"):
        if mode not in FACES_MODES:
            raise UserError(f"--faces {mode}: choose one of {', '.join(FACES_MODES)}")
        self.preprocess, self.mode, self.grayscale, self.detector = preprocess, mode, grayscale, detector
        self.counts = {"crop": 0, "face": 0, "no face": 0}
        self._lock = threading.Lock()

    def __call__(self, path):
        from faces import DECODE_SIDE, faces_or_whole
        from image_files import safe_open_image
        from transform import BadImage
        if is_face_crop(Path(path), self.mode):
            image, how = path, "crop"
        else:
            try:
                photo = safe_open_image(path, max_side=DECODE_SIDE)
            except UserError as e:
                raise BadImage(str(e)) from None
            crops, _, found = faces_or_whole(photo, 1, self.grayscale, detector=self.detector)
            image, how = crops[0], "face" if found else "no face"
        out = self.preprocess(image)                   # BadImage / OSError: counted as unreadable by the caller
        with self._lock:
            self.counts[how] += 1
        return out


class PhotoIndex:
    """A GalleryIndex of faces (and whole face-crop files) with a per-photo record; search/len/paths as GalleryIndex.
    Thread-safe: searches may run while `update` indexes (new entries become searchable when it finishes)."""

    def __init__(self, entries: GalleryIndex, mode: str = "auto", grayscale: bool = False, detector: str = "auto",
                 extra_dirs: tuple[Path, ...] = ()):
        if mode not in FACES_MODES:
            raise UserError(f"--faces {mode}: choose one of {', '.join(FACES_MODES)}")
        self.entries, self.mode, self.grayscale, self.detector = entries, mode, grayscale, detector
        self.extra_dirs = tuple(Path(d) for d in extra_dirs)        # e.g. photos added from the page
        self.log_path, self.crops_dir = entries.dir / LOG_NAME, entries.dir / "crops"
        self._lock, self._writing = threading.RLock(), threading.Lock()
        self.progress = dict(done=0, total=0, faces=0, running=False)
        self.records = self._valid(self._read_log())
        self.unlisted: list[Path] = []         # set by sources()

    @classmethod
    def open(cls, folder, digest: str, dim: int, index_root=None, faiss_threshold: int = 100_000, **kw):
        return cls(GalleryIndex.open(folder, digest, dim, index_root=index_root, faiss_threshold=faiss_threshold),
                   **kw)

    # ---- reading -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    @property
    def gallery(self) -> Path:
        return self.entries.gallery

    @property
    def paths(self) -> list[Path]:
        with self._lock:
            return self.entries.paths

    def search(self, query, k: int = 10, exact: bool = False):
        with self._lock:
            return self.entries.search(query, k, exact)

    def search_current(self, query, k: int, exact: bool = False) -> tuple[list[tuple[Path, float]], int]:
        """The k best entries still as indexed, best first, as (path, cosine clipped to 1: float16 storage), and how
        many stale ones (photo deleted or replaced since indexing) were left out: the search widens to fill k."""
        wide = k
        while True:
            scores, paths = self.search(query, wide, exact)
            hits = [(p, min(float(s), 1.0)) for p, s in zip(paths[0], scores[0])]
            current = [h for h in hits if self.entry(h[0]).is_current()]
            if len(current) >= k or wide >= len(self):
                return current[:k], len(hits) - len(current)
            wide = min(4 * wide, len(self))

    def vector(self, path) -> np.ndarray:
        """The stored embedding [D] of an entry (a path from search)."""
        with self._lock:
            return self.entries.vector(self._entry_key(path))

    def sources(self) -> list[Path]:
        """Every photo of the gallery (recursive) and of the extra folders; .unlisted: the folders that could not be
        listed (update keeps their photos' entries)."""
        self.unlisted: list[Path] = []
        return list_images(self.gallery, skip=self.entries.dir.parent, unlisted=self.unlisted) + [
            p for d in self.extra_dirs if d.is_dir() for p in list_images(d, unlisted=self.unlisted)]

    def n_photos(self) -> int:
        return len(self.records)

    def _entry_key(self, path) -> str:
        return self.entries._key(Path(path))

    def entry(self, path) -> Entry:
        """What a search result is: its photo, face number and box."""
        key = self._entry_key(path)
        photo_key, face = split_key(key)
        rec = self.records.get(photo_key)
        photo = Path(photo_key) if os.path.isabs(photo_key) else self.gallery / photo_key
        stat = (rec["s"], rec["m"]) if rec and "s" in rec and "m" in rec else None
        if face is None or rec is None or rec.get("faces") is None or face >= len(rec["faces"]):
            return Entry(key, photo, None, None, None, None, stat)
        box = tuple(int(v) for v in rec["faces"][face][:4])
        return Entry(key, photo, face, box, tuple(rec["wh"]), self._thumb(key), stat)

    def _thumb(self, key: str) -> Path:
        return self.crops_dir / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.jpg"

    # ---- the record log ------------------------------------------------------------------------------------
    def _read_log(self) -> dict:
        """photo key -> last record; a torn last line (a kill while appending) is ignored."""
        recs = {}
        if self.log_path.is_file():
            for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    r = json.loads(line)
                    recs[r["k"]] = r
                except (ValueError, KeyError, TypeError):
                    continue
        return recs

    def _valid(self, recs: dict) -> dict:
        live = set(self.entries._keys)
        return {k: r for k, r in recs.items() if set(entry_keys(r)) <= live}

    # ---- writing -------------------------------------------------------------------------------------------
    def update(self, photos: list[Path], encode: Callable, progress: bool = True,
               on_progress: Callable[[dict], None] | None = None, batch_size: int = 64) -> dict:
        """Index new/changed photos, drop removed ones -> photo counts added/changed/removed/unchanged/failed,
        faces (entries written), failed_paths and reasons {path: one line}. encode: index.make_encoder's."""
        with self._writing, folder_lock(self.entries.dir, BUSY):
            stats = dict(added=0, changed=0, removed=0, unchanged=0, failed=0, faces=0, failed_paths=[], reasons={})
            known = self._read_log()
            valid = self._valid(known)
            todo, keep = self._plan(photos, known, valid, stats)
            self._drop_all_but(keep)
            try:
                self._index(todo, encode, stats, progress, on_progress, batch_size)
            finally:
                with self._lock:
                    self.entries._merge_sparse()
                    self.entries._load()
                    self.records = self._valid(self._read_log())
                    self.progress["running"] = False
            if len(self.entries) >= self.entries.faiss_threshold:
                with self._lock:
                    self.entries._faiss()
            stats["photos_total"], stats["faces_total"] = len(self.records), len(self.entries)
            return stats

    def _plan(self, photos, known: dict, valid: dict, stats: dict) -> tuple[list, dict]:
        """(todo [(key, path, stat, 'added'|'changed')], records kept as they are)."""
        current = {self._entry_key(p): Path(p) for p in photos}
        todo, keep = [], {}
        for key, p in current.items():
            try:
                st = p.stat()
            except OSError as e:
                self._fail(stats, p, f"cannot read ({e.strerror})")
                continue
            r = valid.get(key)
            if r and (r["s"], r["m"], r.get("mode")) == (st.st_size, st.st_mtime_ns, self.mode) and (
                    not r.get("faces") or r.get("px") == "file"):      # older records: boxes in decoded px
                keep[key] = r
                stats["unchanged"] += 1
            else:
                todo.append((key, p, st, "changed" if key in known else "added"))
        hidden = {k: valid[k] for k in set(valid) - set(current) if self._unlisted(k)}
        keep.update(hidden)                                   # in a folder that could not be listed: not removed
        stats["removed"] = len(set(known) - set(current) - set(hidden))
        return todo, keep

    def _unlisted(self, key: str) -> bool:
        photo = os.path.abspath(key if os.path.isabs(key) else self.gallery / key)
        return any(photo.startswith(os.path.join(os.path.abspath(d), "")) for d in self.unlisted)

    def _drop_all_but(self, keep: dict) -> None:
        """Remove every entry that is not of a kept photo (removed, changed, half-written) and rewrite the log."""
        gi, wanted = self.entries, {e for r in keep.values() for e in entry_keys(r)}
        with self._lock:
            gi._start()
            gi._mmaps.clear()
            gi._faiss_cache = (None, None)
            gone = set(gi._raw["path"]) - wanted
            gi._drop_rows((gi._raw["path"].isin(gone) | gi._raw.duplicated("path", keep="last")).to_numpy())
            gi._load()
            self.records = dict(keep)
            atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in keep.values()))
        for key in gone:
            self._thumb(key).unlink(missing_ok=True)

    def _index(self, todo: list, encode, stats: dict, progress: bool, on_progress, batch_size: int) -> None:
        """Each photo: detect, encode, write its chunk, then append its record (a kill loses that photo at most);
        face-crop files go batch_size at a time (a kill loses that batch at most)."""
        from tqdm import tqdm
        self.progress.update(done=0, total=len(todo), faces=0, running=bool(todo), started=time.time())
        bar = tqdm(total=len(todo), unit="photo", disable=not progress or not todo, desc="indexing photos")
        self.crops_dir.mkdir(parents=True, exist_ok=True)
        crops: list = []

        def done(items: list, n_entries: list) -> None:
            for (_, _, _, kind), n in zip(items, n_entries):
                if n is not None:
                    stats[kind] += 1
                    stats["faces"] += n
            self.progress.update(done=self.progress["done"] + len(items), faces=stats["faces"])
            bar.set_postfix(faces=stats["faces"], failed=stats["failed"], refresh=False)
            bar.update(len(items))
            if on_progress:
                on_progress(dict(self.progress))
        with open(self.log_path, "a", encoding="utf-8") as log:
            try:
                for item in todo:
                    if not is_face_crop(item[1], self.mode):
                        done([item], [self._photo(*item[:3], encode, stats, log)])
                    elif small := too_small(item[1]):                          # refused as an upload is
                        done([item], [self._fail(stats, item[1], small)])
                    else:
                        crops.append(item)
                        if len(crops) >= batch_size:
                            done(crops, self._crop_files(crops, encode, stats, log))
                            crops = []
                if crops:
                    done(crops, self._crop_files(crops, encode, stats, log))
            finally:
                bar.close()

    def _photo(self, key: str, p: Path, st, encode, stats: dict, log) -> int | None:
        """Index one photo -> number of faces written, None if it is unreadable (counted in stats)."""
        try:
            crops, boxes, wh = photo_faces(p, self.grayscale, self.detector)
        except UserError as e:
            return self._fail(stats, p, _reason(e, p))
        emb, ok = encode(crops) if crops else (np.zeros((0, self.entries.dim), np.float32), [])
        keys = [f"{key}#{i}" for i in range(len(crops))]
        for k, crop in zip(keys, crops):
            th = crop.copy()
            th.thumbnail((THUMB_SIDE, THUMB_SIDE))
            th.save(self._thumb(k), quality=90)
        if keys:
            self._write(np.asarray(emb, np.float32)[np.asarray(ok, bool)],
                        [k for k, o in zip(keys, ok) if o], [st] * sum(map(bool, ok)))
        faces = [[b.x0, b.y0, b.x1, b.y1, round(b.score, 4)] for b, o in zip(boxes, ok) if o]
        self._append(log, [dict(k=key, s=st.st_size, m=st.st_mtime_ns, mode=self.mode, wh=list(wh), faces=faces,
                                px="file")])
        return len(faces)

    def _crop_files(self, items: list, encode, stats: dict, log) -> list:
        """Face-crop files, one entry each (the whole file through the model's preprocessing, as before)."""
        emb, ok = encode([t[1] for t in items])
        good = [t for t, o in zip(items, ok) if o]
        for t, o in zip(items, ok):
            if not o:
                self._fail(stats, t[1], "not an image file the model can read (damaged or not an image)")
        if good:
            self._write(np.asarray(emb, np.float32)[np.asarray(ok, bool)], [t[0] for t in good], [t[2] for t in good])
            self._append(log, [dict(k=t[0], s=t[2].st_size, m=t[2].st_mtime_ns, mode=self.mode, wh=None, faces=None)
                               for t in good])
        return [1 if o else None for o in ok]

    def _write(self, emb: np.ndarray, keys: list[str], stats_: list) -> None:
        rows = pd.DataFrame({"path": keys, "size": [s.st_size for s in stats_],
                             "mtime_ns": [s.st_mtime_ns for s in stats_]})
        self.entries._write_chunk(emb, rows)

    @staticmethod
    def _append(log, recs: list[dict]) -> None:
        log.write("".join(json.dumps(r) + "\n" for r in recs))
        log.flush()
        os.fsync(log.fileno())

    @staticmethod
    def _fail(stats: dict, p: Path, reason: str) -> None:
        stats["failed"] += 1
        stats["failed_paths"].append(Path(p))
        stats["reasons"][str(p)] = error_text(first_line(reason, 400), 160)          # cut at a whole word
        return None


def _reason(e: UserError, p: Path) -> str:
    """A UserError's message without the leading path it names (the path inside an errno text stays)."""
    msg = str(e)
    return (msg[len(str(p)):].lstrip(": ") if msg.startswith(str(p)) else msg) or "unreadable"


def describe_update(stats: dict, total: int) -> str:
    """One line from update()'s counts: '600 images: 598 reused from the cache, 2 encoded (1 new, 1 changed)'."""
    encoded = stats.get("added", 0) + stats.get("changed", 0)
    total = stats.get("photos_total", total)          # photo galleries (photos.py): counts are of photos
    line = (f"{total} images: {stats.get('unchanged', 0)} reused from the cache, {encoded} encoded "
            f"({stats.get('added', 0)} new, {stats.get('changed', 0)} changed)")
    extra = [f", {stats[k]} {word}" for k, word in (("removed", "removed"), ("failed", "unreadable")) if stats.get(k)]
    faces = f"; {stats['faces_total']} searchable entries (faces and face crops)" if "faces_total" in stats else ""
    return line + "".join(extra) + faces


def failure_lines(stats: dict) -> list[str]:
    """One line per unreadable file: 'skipped (unreadable): path: reason'."""
    reasons = stats.get("reasons", {})
    from image_files import shown_path
    lines = []
    for p in stats.get("failed_paths", []):
        why = reasons.get(str(p), "unreadable")
        lines.append(f"skipped ({'too small' if 'too small' in why else 'unreadable'}): {shown_path(p)}: {why}")
    return lines
