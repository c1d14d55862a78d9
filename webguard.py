"""Request guards for the demo's handlers: any error becomes a message (the server keeps serving) and one line in
the server log, and messages name files by their own name, never by the server's temporary folders.

    @with_fallback(lambda msg, *request: ([], msg))     # what the outputs are when the request fails
    def on_search(query, k): ...

Gradio checks some inputs before any handler runs (a slider's range, an upload button's file types) and prints a
traceback for each refusal; `lenient` hands such values to the handler instead, whose own check (`number_in`,
`open_upload`, `read_vocab_upload`) answers with a message and one log line. No Gradio import here.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import io
import math
import os
import re
import shutil
import signal
import socket
import tempfile
import traceback
from pathlib import Path

from image_files import MAX_PIXELS
from logs import get_logger
from utils import UserError, atomic_write

log = get_logger(__name__)
MAX_MESSAGE_CHARS = 600        # a message echoing a huge request stays readable
MAX_UPLOAD_PIXELS = MAX_PIXELS             # per uploaded image or video frame
MAX_VOCAB_BYTES = 256_000
MAX_EXPRESSIONS = 200          # sentences ranked per request
MAX_SENTENCE_CHARS = 500       # one expression's sentence (retrieval.MAX_QUERY_CHARS for a query)


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


def refused(request: str, msg: str) -> None:
    """The server log's one line for a request answered with a message (what was asked, what was wrong)."""
    log.info(f"refused {request} request: {' '.join(str(msg).split())}")


def named(handlers: dict) -> dict:
    """{name: guarded handler}, each told its name (the request `refused` names in the log)."""
    for name, fn in handlers.items():
        fn.request = name
    return handlers


def safe(fn):
    """Handler wrapper: UserError -> its message (and `refused`'s log line); anything else -> a short message and
    the traceback (a bug: the server keeps serving). The fallback gets (message, *request arguments), so it can
    keep what the user had."""
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except UserError as e:
            msg = public_message(e, args)
            refused(getattr(wrapper, "request", None) or getattr(fn, "__name__", "a"), msg)
            return fn.fallback(msg, *args)
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
        raise UserError(f"{what} must be a number from {lo:g} to {hi:g} (got {_shown_value(value, x)})")
    return x


def whole_number_in(value, what: str, lo: int, hi: int) -> int:
    """number_in for a count (Top K): 2.5 is refused rather than read as 2."""
    x = number_in(value, what, lo, hi)
    if x != int(x):
        raise UserError(f"{what} must be a whole number from {lo} to {hi} (got {x:g})")
    return int(x)


def yes_no(value, what: str) -> bool:
    """A checkbox's value: True/False, 1/0 or "true"/"false" from an API caller; anything else -> UserError (the
    string "no" would otherwise count as ticked)."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise UserError(f"{what} must be true or false (got {_shown_value(value, math.nan)})")


def _shown_value(value, x: float) -> str:
    """What a refused number was, briefly: the number, a short plain text, else only its type (never a path)."""
    if value is None:
        return "nothing"
    if not math.isnan(x) or isinstance(value, float):
        return f"{x:g}"
    if isinstance(value, str) and len(value) <= 20 and not re.search(r"[/\\\s]", value):
        return repr(value)
    return f"a {type(value).__name__}"


def keep_text(value) -> str:
    """A textbox value to hand back unchanged on failure (anything that is not text: an empty box)."""
    return value if isinstance(value, str) else ""


def lenient(component, raw=lambda payload: payload):
    """`component` (a Gradio input) whose payloads Gradio's own preprocess refuses reach the handler as
    raw(payload) instead: a slider's out-of-range or non-number value as sent, an upload's file path. The handler
    checks it and answers with a message and one log line; Gradio would print a traceback. Set on the instance:
    Gradio writes a .pyi next to any module that subclasses a component."""
    strict = component.preprocess

    def preprocess(payload):
        try:
            return strict(payload)
        except Exception:  # noqa: BLE001 -- refused by Gradio; the handler's own check says what is wrong
            return raw(payload)
    component.preprocess = preprocess
    return component


@functools.cache
def one_or_many_files():
    """The data model for a gr.File(file_count="multiple") that also takes one file not in a list (an API
    caller's single handle_file): Gradio's own ListFiles refused it with a traceback before any handler ran."""
    from gradio.data_classes import ListFiles
    from pydantic import model_validator

    class OneOrManyFiles(ListFiles):
        @model_validator(mode="before")
        @classmethod
        def _listed(cls, value):
            return [value] if isinstance(value, dict) else value
    return OneOrManyFiles


def quiet_refusals(app):
    """The Blocks `app`, whose requests Gradio refuses before any handler or `lenient` runs (a file path outside its
    upload folder; a plain string where an upload is expected) get a short error in the caller's client and one
    `refused` log line: Gradio printed a traceback for each (it prints one for any error but a quiet gr.Error)."""
    import gradio as gr
    from gradio.exceptions import InvalidPathError
    from pydantic import ValidationError
    strict = app.preprocess_data

    async def preprocess_data(block_fn, inputs, state, explicit_call=False):
        try:
            return await strict(block_fn, inputs, state, explicit_call)
        except InvalidPathError:
            msg = "a file the server did not receive as an upload: send files with gradio_client.handle_file(path)"
        except ValidationError as e:
            msg = (f"an input is not what this endpoint takes ({e.title} expected; send files with "
                   "gradio_client.handle_file(path))")
        except Exception as e:  # noqa: BLE001 -- Gradio's download of a URL: ValueError, httpx errors, Exception
            if not (urls := _urls(inputs)):
                raise
            why = " ".join(str(e).split())[:120] or type(e).__name__
            msg = f"could not fetch the URL {urls[0][:100]} ({why}); upload the file instead"
        refused(block_fn.api_name or block_fn.name, msg)
        raise gr.Error(msg, print_exception=False)
    app.preprocess_data = preprocess_data
    return app


def _urls(payload) -> list[str]:
    """The http(s) URLs given as an upload's path in a request's raw inputs (Gradio downloads those itself)."""
    if isinstance(payload, (list, tuple)):
        return [u for p in payload for u in _urls(p)]
    if isinstance(payload, dict):
        path = payload.get("path")
        own = [path] if isinstance(path, str) and re.match(r"https?://", path, re.I) else []
        return own + [u for v in payload.values() if isinstance(v, (list, dict)) for u in _urls(v)]
    return []


def upload_path(payload):
    """The file path of an upload's payload (Gradio's FileData), for `lenient`; None when there is none."""
    return getattr(payload, "path", None)


# ----------------------------------------------------------------------------- what a request may contain

def open_upload(image, max_side: int | None = None):
    """A request's image (an upload's file path; from Python also a PIL image or a numpy array) -> RGB PIL image
    (max_side: see safe_open_image); nothing, bombs and non-images -> UserError."""
    from image_files import is_pixels, safe_open_image
    if not is_pixels(image) and (not isinstance(image, (str, os.PathLike)) or not os.fspath(image)):
        raise UserError("upload a face image first")
    try:
        return safe_open_image(image, max_pixels=MAX_UPLOAD_PIXELS, max_side=max_side)
    except UserError:
        from video import video_kind                                  # the file's first bytes, as Sequence reads them
        if isinstance(image, (str, os.PathLike)) and video_kind(image):
            raise UserError(f"{image}: a video, not a photo; score videos in the Sequence tab") from None
        raise


def upload_name(image) -> str:
    """How a message names a request's image: its file name, else "the image" (pixels sent from Python)."""
    return Path(image).name if isinstance(image, (str, os.PathLike)) and os.fspath(image) else "the image"


def port_in_use(host: str, port: int) -> str:
    return (f"--port {port} on {host}: in use (another demo running?) or not allowed (below 1024 needs root); pass "
            f"--port {port + 1} or stop the other server")


def check_port_free(host: str, port: int) -> None:
    """UserError when `port` cannot be listened on, before minutes of model loading and gallery indexing."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError:
        raise UserError(port_in_use(host, port)) from None


def sigterm_as_ctrl_c(signum, frame):
    """SIGTERM (systemd, `docker stop`, `kill`) closes the server as Ctrl-C does: its temporary files are removed."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def serving():
    """While a server runs: SIGTERM closes it as Ctrl-C does, and Gradio's uploads and copies of served files go to
    a folder of this run's own (GRADIO_TEMP_DIR, set here, under the one a user set, else the system temp folder),
    removed on close: Gradio left them in /tmp/gradio. Build the app inside (Gradio reads the folder then)."""
    before_env, before_sig = os.environ.get("GRADIO_TEMP_DIR"), signal.signal(signal.SIGTERM, sigterm_as_ctrl_c)
    parent = before_env or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = root = tempfile.mkdtemp(prefix="exprclip-served-", dir=parent)
    try:
        yield Path(root)
    finally:
        signal.signal(signal.SIGTERM, before_sig)
        if before_env is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = before_env
        shutil.rmtree(root, ignore_errors=True)


@functools.cache
def _server_folder(kind: str) -> Path:
    """One temporary folder per server and kind (downloads, images), removed when the server exits; under the
    system temp folder, which Gradio serves from."""
    root = Path(tempfile.mkdtemp(prefix=f"exprclip-{kind}-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def download_path(name: str) -> Path:
    """A new path named `name` for a file the page offers to download: in its own folder (so concurrent requests
    never share one) under one temporary folder per server, removed when the server exits (Gradio serves a copy)."""
    return Path(tempfile.mkdtemp(dir=_server_folder("downloads"))) / name


def served_image(im) -> str:
    """A JPEG file of the PIL image `im` for the page, named by its content under one folder per server: the same
    image is written once, atomically (a temp file renamed into place), so no client ever reads a partial file
    (Gradio's cache of a returned PIL image rewrote one file in place while another client fetched it)."""
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=92)
    data = buf.getvalue()
    path = _server_folder("images") / f"{hashlib.sha256(data).hexdigest()[:32]}.jpg"
    if not path.exists():
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return str(path)


def read_vocab_upload(path) -> str:
    """Text of an uploaded vocabulary file, checked with vocab.parse_vocab (errors name the file and line)."""
    from vocab import parse_vocab
    if not path or not isinstance(path, (str, os.PathLike)):
        raise UserError("choose a text file with one `name: sentence` per line")
    if not os.path.isfile(path):
        raise UserError(f"{Path(path).name}: no such file; choose a text file with one `name: sentence` per line")
    path = Path(path)
    if path.stat().st_size > MAX_VOCAB_BYTES:
        raise UserError(f"{path.name}: over {MAX_VOCAB_BYTES // 1000} kB; a vocabulary is one line per expression")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path.name}: not UTF-8 text; save it as UTF-8 with one `name: sentence` per line") from None
    _checked_items(text, path.name)                     # refused when loaded, not at the next ranking
    return text


def _checked_items(text: str, source: str) -> list[tuple[str, str]]:
    """parse_vocab, then the limits of one request: MAX_EXPRESSIONS lines, MAX_SENTENCE_CHARS per sentence."""
    from vocab import parse_vocab
    items = parse_vocab(text, source=source)
    if len(items) > MAX_EXPRESSIONS:
        raise UserError(f"{source} has {len(items)} expressions; at most {MAX_EXPRESSIONS} are ranked at once")
    for name, sentence in items:
        if len(sentence) > MAX_SENTENCE_CHARS:
            raise UserError(f"{source}: the sentence of `{name[:40]}` is {len(sentence):,} characters long; at most "
                            f"{MAX_SENTENCE_CHARS} (a sentence or two describing the expression)")
    return items


def vocab_items(vocab_text) -> list[tuple[str, str]]:
    """The expression list of a request -> (name, sentence) pairs; empty, huge or malformed -> UserError."""
    if not isinstance(vocab_text, str) or not vocab_text.strip():
        raise UserError("the expression list is empty: one `name: sentence` per line")
    if len(vocab_text) > MAX_VOCAB_BYTES:
        raise UserError(f"the expression list is over {MAX_VOCAB_BYTES // 1000} k characters: one short line per "
                        "expression")
    return _checked_items(vocab_text, "the expression list")
