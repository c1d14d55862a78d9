"""The demo's gallery views over photos.py (no Gradio inside): result tiles naming their photo, the chosen face's
photo with its box, faces with a similar expression from it, photos added from the page, and the page's header."""
from __future__ import annotations

import os
import threading
import time
from contextlib import suppress
from pathlib import Path

from PIL import Image

from logs import get_logger
from photos import entry_keys
from retrieval import Engine, similar_to_gallery_image
from uploads import save_uploads
from utils import UserError
from webguard import number_in, refused, served_image

log = get_logger(__name__)

OWN_PHOTOS_HINT = ("To search your own photos: `python demo.py --gallery ~/Pictures` (every face found in them "
                   "becomes searchable), or add photos below.")


def _tile(engine: Engine, path: Path, score: float):
    """(image, caption) of one result: a file of the face crop and 'score  photo.jpg · face 2', or the face-crop
    file. Crops are files (webguard.served_image), not PIL images: Gradio rewrote its cached copy of a PIL image in
    place while another client was fetching it (a truncated tile)."""
    e = engine.index.entry(path)
    if not e.is_current():                  # moved, deleted or replaced since it was indexed: its box is not here
        raise FileNotFoundError(e.photo.name)
    name = shown_name(engine, e.photo)
    if e.face is None and not _added(engine, e.photo):
        return str(e.photo), f"{score:.3f}  {name}"
    if e.face is None:                      # added from the page: inside the cache, which Gradio does not serve
        with Image.open(e.photo) as im:
            return served_image(im.convert("RGB")), f"{score:.3f}  {name}"
    try:
        with Image.open(e.thumb) as im:
            crop = im.convert("RGB")
    except (OSError, TypeError):            # thumbnail gone: cut it from the photo
        crop = face_on_photo(engine, path, draw=False)
    return served_image(crop), f"{score:.3f}  {name} · face {e.face + 1}"


def shown_name(engine: Engine, photo: Path) -> str:
    """A result's photo as the page names it: its path inside the gallery (`2019/IMG_0001.jpg`, so same-named files
    of different folders stay apart), or, for photos added from the page, inside the uploads folder (its request's
    folder and name: `20240501-101500-k3j2/IMG_0001.jpg`, apart from other uploads and the gallery's own)."""
    for root in (getattr(engine, "upload_dir", None), getattr(engine.index, "gallery", None)):
        with suppress(TypeError, ValueError):
            return photo.relative_to(root).as_posix()
    return photo.name


def _added(engine: Engine, photo: Path) -> bool:
    up = engine.upload_dir
    return up is not None and str(photo.resolve()).startswith(str(up.resolve()) + os.sep)


def result_tiles(engine: Engine, hits) -> tuple[list[tuple], list[str]]:
    """(tiles, keys): the tiles of `hits` and each one's entry key (what a click on it looks up: a photo face's tile
    is a crop, not its key); a photo moved, deleted or damaged since it was indexed is left out (one log line)."""
    tiles, keys = [], []
    for p, s in hits:
        try:
            tiles.append(_tile(engine, p, s))
        except (OSError, UserError) as e:
            log.warning(f"result left out: {Path(p).name} cannot be shown now ({type(e).__name__})")
            continue
        keys.append(str(p))
    return tiles, keys


def result_items(engine: Engine, hits) -> list[tuple]:
    """The tiles of `hits` (result_tiles)."""
    return result_tiles(engine, hits)[0]


def clicked_key(engine: Engine, keys, index) -> Path:
    """The entry of result `index` among the keys of the last search; anything else -> UserError (a message that
    never shows what was sent in place of a key)."""
    if not isinstance(keys, (list, tuple)) or not keys or index is None or engine.index is None:
        raise UserError("search first, then click one of the results")
    key = keys[int(number_in(index, "the clicked result", 0, len(keys) - 1))]
    if not isinstance(key, (str, os.PathLike)):
        raise UserError("search first, then click one of the results (only gallery results can be clicked)")
    return Path(key)                        # not in the gallery: similar_to_gallery_image says so


def face_on_photo(engine: Engine, path, draw: bool = True) -> Image.Image:
    """The photo of a result with that face's box (<= 1024 px), or (draw=False) just the face's region."""
    from faces import DECODE_SIDE, Box, annotate
    from image_files import safe_open_image
    e = engine.index.entry(path)
    if not e.is_current():
        raise UserError(f"{e.photo.name}: moved, deleted or changed since the gallery was indexed; relaunch the demo "
                        "(or add it again) to index it anew")
    photo = safe_open_image(e.photo, max_side=DECODE_SIDE if e.face is not None else None)
    if e.box is None:
        return annotate(photo, [])
    f = photo.width / e.size[0] if e.size and e.size[0] else 1.0    # the file was decoded at another scale
    box = Box(*(round(v * f) for v in e.box), score=1.0)
    return annotate(photo, [box], first=e.face + 1) if draw else photo.crop((box.x0, box.y0, box.x1, box.y1))


def picked_view(engine: Engine, keys, index, k):
    """A click on result `index` (`keys`: result_tiles' keys of the last search): (a file of its photo with the
    face's box, faces with a similar expression, message)."""
    path = clicked_key(engine, keys, index)
    hits = similar_to_gallery_image(engine, path, int(number_in(k, "Top K", 1, 100)))
    e = engine.index.entry(path)
    name = shown_name(engine, e.photo)
    what = f"face {e.face + 1} of {name}" if e.face is not None else name
    try:
        shown = served_image(face_on_photo(engine, path))
    except UserError as err:                 # the photo was moved or damaged since indexing
        shown, what = None, f"{what} (photo not readable now: {err})"
    items = result_items(engine, hits)
    return shown, items, f"{len(items)} faces closest to {what} (itself first)"


def header(engine: Engine, drawn_sample: bool) -> str:
    """The page's gallery line: what is searched, how many photos and faces, what was skipped."""
    ix = engine.index
    if ix is None:
        return "Gallery: none."
    n_faces = len(ix)
    if drawn_sample:
        line = (f"Gallery: the drawn sample ({n_faces} drawn faces in images/), not photos of people. "
                + OWN_PHOTOS_HINT)
    else:
        line = f"Gallery: {ix.n_photos()} photos, {n_faces} searchable faces (and face-crop files)."
    if engine.failed:
        line += f" {len(engine.failed)} unreadable file(s) skipped: " + ", ".join(p.name for p in engine.failed[:10])
    return line


def gallery_warnings(engine: Engine) -> list[str]:
    """The launch log's warning for a gallery with nothing to search (an empty --gallery started silently)."""
    ix = engine.index
    if ix is None or len(ix):
        return []
    what = "has no images" if not ix.n_photos() else f"has no face in its {ix.n_photos()} image(s)"
    return [f"warning: the gallery {ix.gallery} {what}, so searches find nothing: put photos (JPEG, PNG, ...) in it "
            "and relaunch, or add them on the page (Add photos to the gallery)"]


def progress_line(p: dict) -> str:
    if not p.get("total"):
        return "Nothing new to index."
    rate = p["done"] / max(time.time() - p.get("started", time.time()), 1e-6)
    return f"Indexing: {p['done']} of {p['total']} photos, {p['faces']} faces ({rate:.1f} photos/s)"


_adding = threading.Lock()


def add_photos(engine: Engine, files) -> str:
    """Copy uploads (images, zips) into the gallery's uploads folder (inside the cache) and index them. Files of
    this request that cannot be read are named (by their own name) and removed, so no later request meets them."""
    if engine.index is None or engine.upload_dir is None:
        raise UserError("this demo has no gallery to add photos to")
    sent_as: dict = {}                                    # saved path -> what the user called the file
    with _adding:
        saved, skipped = save_uploads(files, engine.upload_dir, dedupe=True, sent_as=sent_as)
        stats = engine.reindex(progress=False) if saved else {"failed_paths": [], "faces": 0, "reasons": {}}
        mine, reasons = {p.resolve(): p for p in saved}, stats.get("reasons", {})
        bad = {mine[Path(f).resolve()]: reasons.get(str(f), "unreadable") for f in stats.get("failed_paths", [])
               if Path(f).resolve() in mine}                 # this request's only: {saved path: why}
        for p in bad:
            p.unlink(missing_ok=True)
        for folder in {p.parent for p in saved}:            # this request's folder: removed when left empty
            with suppress(OSError):
                folder.rmdir()
        faces = _faces_of(engine, [p for p in saved if p not in bad])
    unreadable = [f"{sent_as[p]}: {why}" for p, why in bad.items()]
    if skipped or unreadable:                             # the server log's one line for what was refused
        log.info(f"add_photos request: skipped {'; '.join(skipped + unreadable)}")
    return "\n\n".join([f"Added {len(saved) - len(bad)} photo(s) ({faces} faces found); "
                         f"the gallery now has {engine.index.n_photos()} photos, {len(engine.index)} faces."]
                        + [f"skipped (unreadable): {u}" for u in unreadable] + [f"skipped: {s}" for s in skipped])


def _faces_of(engine: Engine, photos: list[Path]) -> int:
    """Search entries (faces) the gallery holds for these photos (not those of others re-indexed alongside)."""
    index = engine.index
    recs = [index.records.get(index.entry(p).key) for p in photos]
    return sum(len(entry_keys(r)) for r in recs if r)


def add_photos_steps(engine: Engine, files, every: float = 0.5):
    """add_photos as a generator of status lines: progress while indexing, then the summary (for the page)."""
    out: dict = {}

    def work():
        try:
            out["msg"] = add_photos(engine, files)
        except UserError as e:
            out["msg"] = str(e)
            refused("add_photos", out["msg"])
    t = threading.Thread(target=work, daemon=True)
    t.start()
    while t.is_alive():
        t.join(every)
        if t.is_alive() and engine.index is not None and engine.index.progress.get("running"):
            yield progress_line(engine.index.progress)
    yield out.get("msg", "adding photos failed")
