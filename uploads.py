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

from utils import IMAGE_EXTS, UserError

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


def _from_zip(zpath: Path, dest: Path, saved: list, skipped: list) -> None:
    try:
        zf = zipfile.ZipFile(zpath)
    except (zipfile.BadZipFile, OSError) as e:
        skipped.append(f"{safe_name(zpath.name)}: not a readable zip ({e})")
        return
    total, taken = 0, 0
    with zf:
        for info in zf.infolist():
            name = info.filename
            if not info.is_dir() and name.lower().endswith(".zip"):
                skipped.append(f"{safe_name(name)} in {safe_name(zpath.name)}: a zip inside a zip is not opened; add "
                               "it on its own")
            if info.is_dir() or os.path.splitext(name)[1].lower() not in IMAGE_EXTS:
                continue
            if taken >= MAX_MEMBERS:
                skipped.append(f"{safe_name(zpath.name)}: more than {MAX_MEMBERS} images; the rest were not taken")
                break
            limit = min(MAX_MEMBER_BYTES, MAX_ZIP_BYTES - total, max(info.compress_size, 1) * MAX_RATIO)
            out = _target(dest, name)
            try:
                with zf.open(info) as src:
                    total += _copy_limited(src, out, limit)
                saved.append(out)
                taken += 1
            except UserError as e:
                skipped.append(f"{safe_name(name)} in {safe_name(zpath.name)}: refused ({e}: a zip bomb or too big)")
            except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, ValueError) as e:  # damaged, encrypted
                out.unlink(missing_ok=True)
                skipped.append(f"{safe_name(name)} in {safe_name(zpath.name)}: unreadable ({str(e)[:80]})")


def save_uploads(files, dest: Path) -> tuple[list[Path], list[str]]:
    """Uploaded paths (images or zips) -> (files written into a new folder under dest, one line per refusal). The
    folder is this request's alone (removed again when nothing was taken): concurrent requests never share one."""
    files = [files] if isinstance(files, (str, os.PathLike)) else files
    if not isinstance(files, (list, tuple)) or not files:
        raise UserError("choose photos (JPEG, PNG, ...) or a zip of photos to add")
    if len(files) > MAX_FILES:
        raise UserError(f"{len(files)} files: at most {MAX_FILES} at once (or put them in a zip)")
    Path(dest).mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=dest))   # this request's own folder
    saved, skipped = [], []
    for f in files:
        p = Path(str(f)[:4096]) if isinstance(f, (str, os.PathLike)) else None
        try:
            ok = p is not None and p.is_file()
        except (OSError, ValueError):                       # a name too long, a NUL byte
            ok = False
        if not ok:
            skipped.append(f"{safe_name(os.path.basename(str(f))[-80:])}: no such upload")
        elif p.suffix.lower() == ".zip":
            _from_zip(p, dest, saved, skipped)
        elif p.suffix.lower() in IMAGE_EXTS:
            if p.stat().st_size > MAX_MEMBER_BYTES:
                skipped.append(f"{safe_name(p.name)}: over {MAX_MEMBER_BYTES // 1_000_000} MB")
                continue
            out = _target(dest, p.name)
            shutil.copyfile(p, out)
            saved.append(out)
        else:
            skipped.append(f"{safe_name(p.name)}: not an image or a zip ({', '.join(sorted(IMAGE_EXTS))}, .zip)")
    if not saved:
        shutil.rmtree(dest, ignore_errors=True)
    return saved, skipped
