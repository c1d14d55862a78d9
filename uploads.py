"""Photos added from the page: uploaded image files and zips, copied into one folder inside the cache, safely.

A zip's members are read by name only (folders inside it and '..' are dropped: nothing lands outside `dest`), only
image extensions are taken, and the sizes are checked while reading, not from the zip's own header: at most
MAX_MEMBERS images, MAX_MEMBER_BYTES each, MAX_ZIP_BYTES in all, and a member that expands over MAX_RATIO times
its compressed size is refused as a zip bomb. Every refusal is one line; the rest is kept.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

from utils import IMAGE_EXTS, UserError, file_digest

MAX_FILES = 200                 # files in one upload request
MAX_MEMBERS = 2000              # images taken from one zip
MAX_MEMBER_BYTES = 60_000_000   # one image (a 36 MP JPEG is ~15 MB)
MAX_ZIP_BYTES = 1_000_000_000   # all of a zip's images together
MAX_RATIO = 200                 # uncompressed / compressed size of one member (JPEG/PNG barely compress)


def safe_name(name: str) -> str:
    """The file name alone, with anything but letters, digits, '.', '-', '_' and spaces replaced."""
    base = re.sub(r"[^\w.\- ]", "_", Path(str(name).replace("\\", "/")).name).strip(" .")
    return base or "photo"


def _target(dest: Path, name: str) -> Path:
    """A new file in dest for `name` (never an existing one)."""
    stem, ext = os.path.splitext(safe_name(name))
    p, n = dest / f"{stem}{ext}", 1
    while p.exists():
        p, n = dest / f"{stem}-{n}{ext}", n + 1
    return p


def _copy_limited(src, out: Path, limit: int) -> int:
    """Copy the stream src to out, at most `limit` bytes (else the file is removed and UserError)."""
    n = 0
    with open(out, "wb") as f:
        while block := src.read(1 << 20):
            n += len(block)
            if n > limit:
                f.close()
                out.unlink()
                raise UserError(f"over {limit // 1_000_000} MB")
            f.write(block)
    return n


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def sent_names(files) -> list[str]:
    """What the user calls each file of a request: its own name, plus its position where names repeat
    ('same.jpg (2nd file)'), never the name it was saved under ('same-1.jpg')."""
    names = [safe_name(os.path.basename(str(f))[-80:]) for f in files]
    return [f"{n} ({_ordinal(i)} file)" if names.count(n) > 1 else n for i, n in enumerate(names, 1)]


_DIGESTS: dict = {}             # (path, size, mtime_ns) -> content hash: uploads/ is hashed once, not per request


def _digest(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(path, 32)
    return _DIGESTS[key]


class _Request:
    """One request's saved files, what the user called each (sent_as), refusals, and the content hashes already
    under uploads/ (known: None when duplicates are kept)."""

    def __init__(self, dest: Path, known: set | None):
        self.dest, self.known = dest, known
        self.saved, self.skipped, self.sent_as = [], [], {}

    def keep(self, out: Path, label: str) -> None:
        if self.known is not None:
            digest = _digest(out)
            if digest in self.known:
                out.unlink()
                self.skipped.append(f"{label}: already in the gallery")
                return
            self.known.add(digest)
        self.saved.append(out)
        self.sent_as[out] = label


def _from_zip(zpath: Path, label: str, req: _Request) -> None:
    skipped = req.skipped
    try:
        zf = zipfile.ZipFile(zpath)
    except (zipfile.BadZipFile, OSError) as e:
        skipped.append(f"{label}: not a readable zip ({e})")
        return
    total, taken = 0, 0
    with zf:
        for info in zf.infolist():
            name = info.filename
            if not info.is_dir() and name.lower().endswith(".zip"):
                skipped.append(f"{safe_name(name)} in {label}: a zip inside a zip is not opened; add it on its own")
            if info.is_dir() or os.path.splitext(name)[1].lower() not in IMAGE_EXTS:
                continue
            if taken >= MAX_MEMBERS:
                skipped.append(f"{label}: more than {MAX_MEMBERS} images; the rest were not taken")
                break
            limit = min(MAX_MEMBER_BYTES, MAX_ZIP_BYTES - total, max(info.compress_size, 1) * MAX_RATIO)
            out = _target(req.dest, name)
            try:
                with zf.open(info) as src:
                    total += _copy_limited(src, out, limit)
                req.keep(out, f"{safe_name(name)} in {label}")
                taken += 1
            except UserError as e:
                skipped.append(f"{safe_name(name)} in {label}: refused ({e}: a zip bomb or too big)")
            except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, ValueError) as e:  # damaged, encrypted
                out.unlink(missing_ok=True)
                skipped.append(f"{safe_name(name)} in {label}: unreadable ({str(e)[:80]})")


def save_uploads(files, dest: Path, dedupe: bool = False, sent_as: dict | None = None):
    """Uploaded paths (images or zips) -> (files written into a new folder under dest, one line per refusal). The
    folder is this request's alone (removed again when nothing was taken): concurrent requests never share one.
    dedupe: a file whose content is already under dest (or earlier in the request) is refused as already in the
    gallery. sent_as gets {saved path: what the user called it (sent_names; 'x.jpg in album.zip')}."""
    files = [files] if isinstance(files, (str, os.PathLike)) else files
    if not isinstance(files, (list, tuple)) or not files:
        raise UserError("choose photos (JPEG, PNG, ...) or a zip of photos to add")
    if len(files) > MAX_FILES:
        raise UserError(f"{len(files)} files: at most {MAX_FILES} at once (or put them in a zip)")
    Path(dest).mkdir(parents=True, exist_ok=True)
    known = {_digest(q) for q in Path(dest).rglob("*") if q.is_file()} if dedupe else None
    req = _Request(Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=dest)), known)  # its own
    for f, label in zip(files, sent_names(files)):
        p = Path(str(f)[:4096]) if isinstance(f, (str, os.PathLike)) else None
        try:
            ok = p is not None and p.is_file()
        except (OSError, ValueError):                       # a name too long, a NUL byte
            ok = False
        if not ok:
            req.skipped.append(f"{label}: no such upload")
        elif p.suffix.lower() == ".zip":
            _from_zip(p, label, req)
        elif p.suffix.lower() in IMAGE_EXTS:
            if p.stat().st_size > MAX_MEMBER_BYTES:
                req.skipped.append(f"{label}: over {MAX_MEMBER_BYTES // 1_000_000} MB")
                continue
            out = _target(req.dest, p.name)
            shutil.copyfile(p, out)
            req.keep(out, label)
        else:
            req.skipped.append(f"{label}: not an image or a zip ({', '.join(sorted(IMAGE_EXTS))}, .zip)")
    if not req.saved:
        shutil.rmtree(req.dest, ignore_errors=True)
    if sent_as is not None:
        sent_as.update(req.sent_as)
    return req.saved, req.skipped
