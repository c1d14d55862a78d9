"""Expression vocabularies for image -> expression ranking: plain-text lists of `name: descriptive sentence`.

File format: one expression per line, `name: sentence` (split at the first colon); blank lines and lines starting
with `#` are ignored; a line without a colon is a sentence used as its own name. Shipped lists live in vocab/.
"""
from __future__ import annotations

import os
from pathlib import Path

from utils import UserError, atomic_write_text

VOCAB_DIR = Path(__file__).resolve().parent / "vocab"
SHIPPED = ("paper", "fine_grained", "korean")


def parse_vocab(text: str, source: str = "vocabulary") -> list[tuple[str, str]]:
    """(name, sentence) pairs from vocabulary text; a bad line raises UserError naming `source` and the line."""
    items, seen = [], {}
    for n, raw in enumerate(text.lstrip("\ufeff").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, sentence = line.partition(":")
        name, sentence = name.strip(), sentence.strip()
        if not sep:
            name = sentence = line
        if not name:
            raise UserError(f"{source} line {n}: nothing before the colon; write `name: sentence`")
        if not sentence:
            raise UserError(f"{source} line {n}: no sentence after `{name}:`; write `name: sentence`")
        if name.lower() in seen:
            raise UserError(f"{source} line {n}: name `{name}` already used on line {seen[name.lower()]}; "
                            "names must be unique")
        seen[name.lower()] = n
        items.append((name, sentence))
    if not items:
        raise UserError(f"{source}: no expressions found; write one `name: sentence` per line")
    return items


def format_vocab(items: list[tuple[str, str]]) -> str:
    """Vocabulary text that parse_vocab reads back to the same items."""
    lines = []
    for i, (name, sentence) in enumerate(items, 1):
        name, sentence = str(name).strip(), str(sentence).strip()
        if not name or not sentence or ":" in name or name.startswith("#") or "\n" in name + sentence \
                or "\r" in name + sentence:
            raise UserError(f"expression {i} ({name!r}): names need text without `:`, `#` at the start or "
                            "line breaks, and sentences need text without line breaks")
        lines.append(sentence if name == sentence and ":" not in sentence else f"{name}: {sentence}")
    return "\n".join(lines) + "\n"


def vocab_path(name_or_path: str | os.PathLike) -> Path:
    """A shipped list's file ("paper", "fine_grained") or the given path."""
    key = str(name_or_path)
    return VOCAB_DIR / f"{key}.txt" if key in SHIPPED else Path(name_or_path)


def load_vocab(name_or_path: str | os.PathLike) -> list[tuple[str, str]]:
    """(name, sentence) pairs from a shipped list name or a text file."""
    path = vocab_path(name_or_path)
    if not path.is_file():
        raise UserError(f"{path}: no such vocabulary file; use one of {', '.join(SHIPPED)} or a `name: sentence` "
                        "text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save it as UTF-8 with one `name: sentence` per line") from None
    return parse_vocab(text, source=str(path))


def save_vocab(items: list[tuple[str, str]], path: str | os.PathLike) -> None:
    """Write items as vocabulary text (atomically: a crash never leaves half a file)."""
    atomic_write_text(path, format_vocab(items))
