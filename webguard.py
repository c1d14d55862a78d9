"""Request guards for the demo's handlers: any error becomes a message (the server keeps serving), and messages
name files by their own name, never by the server's temporary folders.

    @with_fallback(lambda msg, *request: ([], msg))     # what the outputs are when the request fails
    def on_search(query, k): ...
"""
from __future__ import annotations

import functools
import math
import os
import re
import tempfile
import traceback

from utils import UserError

MAX_MESSAGE_CHARS = 600        # a message echoing a huge request stays readable


def _upload_dir_pattern() -> re.Pattern:
    """Gradio's upload folder and the hash folders under it (what precedes an upload's own file name)."""
    root = os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "gradio")
    return re.compile(re.escape(root.rstrip("/\\")) + r"[/\\](?:[^/\\\s'\"]+[/\\])*")


def _arg_paths(args) -> list[str]:
    """Strings among the request arguments (lists flattened) that look like file paths."""
    out: list[str] = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out += _arg_paths(a)
        elif isinstance(a, (str, os.PathLike)):
            text = os.fspath(a)
            if isinstance(text, str) and len(text) < 4096 and "\n" not in text and re.search(r"[/\\]", text):
                out.append(text)
    return out


def public_message(msg: str, args=()) -> str:
    """What the browser may see: files named by their own name (never the server's temp folders), length capped."""
    msg = str(msg)
    for path in sorted(set(_arg_paths(args)), key=len, reverse=True):
        msg = msg.replace(path, re.split(r"[/\\]", path.rstrip("/\\"))[-1])
    msg = _upload_dir_pattern().sub("", msg)
    return msg if len(msg) <= MAX_MESSAGE_CHARS else msg[:MAX_MESSAGE_CHARS - 1] + "…"


def safe(fn):
    """Handler wrapper: UserError -> its message; anything else -> a short message (server keeps serving).
    The fallback gets (message, *request arguments), so it can keep what the user had."""
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except UserError as e:
            return fn.fallback(public_message(e, args), *args)
        except Exception as e:  # noqa: BLE001 -- a demo request must never take the server down
            traceback.print_exc()
            return fn.fallback(public_message(f"could not handle this request ({type(e).__name__}: {e})", args),
                               *args)
    return wrapper


def with_fallback(make):
    """Decorator: `make(message, *request)` builds the handler's outputs when the request fails; then `safe`."""
    def deco(fn):
        fn.fallback = make
        return safe(fn)
    return deco


def number_in(value, what: str, lo: float, hi: float) -> float:
    """A request's number (a slider, or anything an API caller sends) checked to lie in [lo, hi] -> UserError."""
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        x = math.nan
    if not lo <= x <= hi:                                   # NaN fails too
        raise UserError(f"{what} must be a number from {lo:g} to {hi:g}")
    return x


def keep_text(value) -> str:
    """A textbox value to hand back unchanged on failure (anything that is not text: an empty box)."""
    return value if isinstance(value, str) else ""
