"""Small shared helpers: user-facing errors, device choice, seeding, atomic saves, weight loading."""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from logs import get_logger

log = get_logger(__name__)


UMASK = os.umask(0o022)          # read once, at import (the main thread): os.umask can only be read by setting it
os.umask(UMASK)

HEIF_EXTS = {".heic", ".heif"}   # phone photos: PIL reads them once the optional pillow-heif is installed (below)
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"} | HEIF_EXTS   # what every image reader lists


def regular_or_broken(root: str, name: str) -> bool:
    """A file to read, or a broken link (reported unreadable later); never a FIFO, socket or device named like an
    image (opening one blocks forever)."""
    p = os.path.join(root, name)
    return os.path.isfile(p) or not os.path.exists(p)


def shown_path(p) -> str:
    """A file name on one line of output: newlines and other control characters escaped (`a\\nb.jpg`)."""
    s = str(p)
    return s if s.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def walk_files(folder, keep=lambda root, name: True, unlisted: list | None = None):
    """os.walk that follows links to folders, each real folder once (a loop ends), folders sorted and filtered by
    `keep(root, name)`; yields (root, dirs, files) (the caller may prune dirs further). A folder that cannot be
    listed is named in one warning when the walk ends and appended to `unlisted`. The one walk under galleries and
    datasets."""
    seen = {os.path.realpath(folder)}

    def new(root: str, d: str) -> bool:
        real = os.path.realpath(os.path.join(root, d))
        if real in seen or not keep(root, d):
            return False
        seen.add(real)
        return True
    failed: list[OSError] = []
    for root, dirs, files in os.walk(folder, onerror=failed.append, followlinks=True):
        dirs[:] = [d for d in sorted(dirs) if new(root, d)]
        gone = [f for f in files if os.path.splitext(f)[1].lower() not in IMAGE_EXTS
                and os.path.islink(os.path.join(root, f)) and not os.path.exists(os.path.join(root, f))]
        failed += [OSError(2, "link target missing (an unplugged disk?)", os.path.join(root, f)) for f in gone]
        yield root, dirs, sorted(files)
    for e in failed:
        log.warning(f"skipped folder {shown_path(e.filename)}: {(e.strerror or type(e).__name__).lower()}")
    if unlisted is not None:
        unlisted += [Path(e.filename) for e in failed]


def _register_heif() -> bool:
    """Let PIL open HEIC/HEIF files when pillow-heif is installed (optional: not in requirements.txt, its binary
    wheels are GPLv2); without it such files are listed and each is refused in one line saying what to install."""
    try:
        from pillow_heif import register_heif_opener
        register_heif_opener()
        return True
    except Exception:  # noqa: BLE001 -- absent, or built for another Pillow: never break an import over it
        return False


HEIF_READABLE = _register_heif()


class UserError(Exception):
    """A problem the user can fix (bad file, bad flag, missing weights). Printed as one line, no traceback."""


def first_line(e: BaseException | str, n: int = 120) -> str:
    """An exception's (or a message's) first line, at most n characters: for one-line errors (some are empty)."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__ if isinstance(e, BaseException) else "")[:n]


class _ReaderGone:
    """sys.stdout that drops what is written once its reader has gone (`predict.py photos | head`), so the command
    still finishes its work and its --out files instead of dying in a BrokenPipeError traceback."""

    def __init__(self, stream):
        self._stream, self.gone = stream, False

    def _call(self, fn, *args):
        if not self.gone:
            try:
                return fn(*args)
            except BrokenPipeError:
                self.gone = True
                try:                                   # the interpreter's own flush at exit must not fail either
                    os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
                except (OSError, ValueError, AttributeError):
                    pass
        return None

    def write(self, text: str) -> int:
        self._call(self._stream.write, text)
        return len(text)

    def flush(self) -> None:
        self._call(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def run_cli(main, argv=None) -> int:
    """Run `main(argv)`; turn UserError (and Ctrl-C) into one line on stderr (logs.py) and an exit code. A path the
    system refuses (a file where a folder must go or the reverse, no permission) is one line too, naming it. Under
    torchrun only each machine's first process says it: every rank checks the same input and raises the same line.
    Output piped into a reader that quits early (`| head`) is dropped from then on; the work goes on."""
    import sys
    say = log.error if os.environ.get("LOCAL_RANK", "0") == "0" else log.debug
    stdout = sys.stdout
    if stdout is not None:                          # None: stdout closed (`>&-`, pythonw): print writes nothing
        sys.stdout = _ReaderGone(stdout)
    try:
        return int(main(argv) or 0)
    except UserError as e:
        say(f"error: {e}")
        return 2
    except OSError as e:                  # a path the system refuses: a file for a folder, /proc/x, read-only, full
        if e.filename is None:
            raise
        say(f"error: {e.filename}: {e.strerror or first_line(e)} ({type(e).__name__}); pass another path (a "
            "folder flag needs a folder, a file flag a file) or fix its permissions")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        sys.stdout = stdout


def pick_device(requested: str = "auto") -> torch.device:
    """cuda, then mps, then cpu -- decided when called, never at import time. Anything else (a typo, `meta`, a
    device this machine lacks) is one line naming --device and the choices."""
    import re
    choices = "cpu, cuda, cuda:N, mps, auto"
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", requested or ""):
        raise UserError(f"--device {requested!r}: not a device; choose one of {choices}")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {requested} asked for, but no CUDA GPU is visible; use --device cpu")
    if requested.startswith("cuda:") and int(requested[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                        f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device mps asked for, but MPS (Apple GPU) is not available here; choose one of {choices}")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_output_file(path, flag: str, source=None, source_flag: str = "the input") -> None:
    """An output path checked before the work that writes it: a folder, or the command's own input `source`, is
    refused in one line (atomic_write refuses a folder too, but only once the work is done)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file path (the folder is left as it is)")
    above = next((p for p in path.absolute().parents if p.exists()), None)     # the folder it will be written in
    if above is not None and not above.is_dir():
        raise UserError(f"{flag} {path}: {above} is a file, not a folder; give a path in a folder")
    if above is not None and not os.access(above, os.W_OK):
        raise UserError(f"{flag} {path}: {above} cannot be written; give a path in a writable folder")
    if source is not None and path.exists() and path.resolve() == Path(source).resolve():
        raise UserError(f"{flag} {path} is {source_flag}: this writes a new file and keeps its input; give another "
                        f"{flag}")


class _Held:
    """A folder this process locks: one thread at a time (an RLock), and how deep the holding thread re-entered."""
    def __init__(self):
        self.lock, self.depth = threading.RLock(), 0


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


@contextmanager
def folder_lock(folder: Path, busy: str):
    """One writer at a time: across processes an exclusive, non-blocking lock on folder/.lock (released when the
    process ends, however it ends; held elsewhere: UserError(f"{folder}: {busy}")); within this process other
    threads wait their turn, and the thread holding it may take it again (PhotoIndex.update -> GalleryIndex.update).
    An unwritable folder is one line too. Where fcntl is missing (Windows) it only makes the folder."""
    with _HELD_GUARD:
        held = _HELD.setdefault(os.path.abspath(folder), _Held())
    with held.lock:
        if held.depth:                          # the thread holding it, again: no second flock (it would refuse)
            held.depth += 1
            try:
                yield
            finally:
                held.depth -= 1
            return
        with _flock(folder, busy):
            held.depth = 1
            try:
                yield
            finally:
                held.depth = 0


@contextmanager
def _flock(folder: Path, busy: str):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / ".lock", "a")
    except OSError as e:
        raise UserError(f"{folder}: cannot write there ({e.strerror or e}); give a writable folder for the index "
                        "(index.py --index-dir DIR, demo.py --cache-dir DIR)") from None
    with f:
        try:
            import fcntl
        except ImportError:
            yield
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{folder}: {busy}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """The project's one atomic write: write(tmp_name) in path's folder, fsync, then rename over path. A crash or
    Ctrl-C leaves either the old file or the new one, never half of one (checkpoints, index chunks, CSVs, vocab)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file path to write (the folder is left as it is)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)     # then the mode: mkstemp makes 0600, and a writer may replace the file (safetensors does)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~UMASK)   # the old one's, or open()'s
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save, atomically (atomic_write)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text, atomically (atomic_write)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")   # training scripts' {key: weights} dicts


def error_text(e: BaseException | str, n: int = 150) -> str:
    """An exception's (or a message's) text on one line: ANSI escapes and line breaks gone, at most n characters, cut at a word."""
    import re
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split()) or type(e).__name__
    return text if len(text) <= n else text[:n].rsplit(" ", 1)[0] + " ..."


def load_state_dict(path: str | os.PathLike) -> dict:
    """Tensors from a .safetensors or a .pth/.pt/.bin file; pickles are read with weights_only=True (no code runs).
    A training script's {"state_dict" | "model" | "state_dict_ema" | "model_ema": weights} is unwrapped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError: truncated, or not a safetensors file
            raise UserError(f"{path}: not a readable .safetensors file, truncated or damaged ({error_text(e)})")
    try:
        with warnings.catch_warnings():     # "Detected pickle protocol 4": the refusal below says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a pickled nn.Module, or a pickle that would run code
        raise UserError(f"{path} holds pickled objects, not a plain state dict (refused: loading it could run "
                        "code); re-save with torch.save(model.state_dict(), ...) or as .safetensors")
    except Exception as e:  # truncated file, not a torch file at all
        raise UserError(f"{path}: not a loadable weights file: empty, truncated or not written by torch.save "
                        f"({type(e).__name__}: {error_text(e, 100)})")
    if isinstance(obj, dict):
        obj = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def file_digest(path: str | os.PathLike, n: int = 16) -> str:
    """Short sha256 of a file's bytes (checkpoint identity for caches)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


def _first_non_utf8_line(path) -> int:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return n
    return 1


def _first_extra_field(path) -> tuple[int, int | None]:
    """(the header's field count, the first line holding a non-empty field past it, or None)."""
    import csv
    csv.field_size_limit(2**31 - 1)                 # pandas has no field limit; csv's default is 131,072 characters
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        rows = csv.reader(f)
        width = next((len(r) for r in rows if r), 0)
        for fields in rows:
            if any(x.strip() for x in fields[width:]):
                return width, rows.line_num
    return width, None


def _read_csv_strings(path):
    """pd.read_csv as strings. Rows longer than the header: trailing empty fields (a comma ending each row) are
    dropped, a non-empty one is a UserError (pandas would make the first column the index, shifting every value,
    or drop it silently)."""
    import warnings
    import pandas as pd
    kw = dict(dtype=str, keep_default_na=False, index_col=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            return pd.read_csv(path, **kw)
        except (pd.errors.ParserWarning, pd.errors.ParserError) as e:
            if isinstance(e, pd.errors.ParserError) and "Expected" not in str(e):
                raise
    width, line = _first_extra_field(path)
    if line is not None:
        raise UserError(f"{path}: line {line} has more fields than the header's {width}; quote a value that holds "
                        "a comma, or name the extra column in the header")
    return pd.read_csv(path, usecols=range(width), **kw)


def read_csv_checked(path, required, hint: str = ""):
    """A CSV as strings (no NaN), columns stripped; one-line UserErrors naming the file and any missing column.
    A comma ending each row (an empty last field) is dropped; any other field past the header is refused."""
    import pandas as pd
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file{'; ' + hint if hint else ''}")
    try:
        df = _read_csv_strings(path)
    except UnicodeDecodeError:
        raise UserError(f"{path}: line {_first_non_utf8_line(path)} is not UTF-8 text; save the file as UTF-8 "
                        "(a spreadsheet's 'CSV UTF-8' option) and run again") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"{path}: not a readable CSV ({type(e).__name__}: {first_line(e, 100)})")
    df.columns = [str(c).strip() for c in df.columns]
    df = df[[c for c in df.columns if not (c.startswith("Unnamed: ") and not df[c].str.strip().any())]]  # `a,b,`
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing required column(s) {', '.join(missing)} "
                        f"(found: {', '.join(df.columns) or 'none'}){'; ' + hint if hint else ''}")
    return df
