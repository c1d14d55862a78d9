"""argparse types shared by the bench/ scripts: a bad value is argparse's one-line usage error, never a traceback."""
from __future__ import annotations

import argparse
import sys


def whole_number(text: str, least: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= {least}")
    return v


def positive_int(text: str) -> int:
    """--n 5 -> 5; 0, -5 or abc -> argparse's one-line error."""
    return whole_number(text, 1)


def nonneg_int(text: str) -> int:
    """--n 0 -> 0 (where 0 means "skip"); -5 or abc -> argparse's one-line error."""
    return whole_number(text, 0)


def int_list(text: str) -> list[int]:
    """--source-sides "0,48" -> [0, 48]; anything else is argparse's one-line error."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated whole numbers, e.g. 0,48") from None


def choice_list(*choices: str):
    """choice_list("grey", "texture") -> a type for "grey,texture": at least one, each one of the choices."""
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values or any(v not in choices for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated names from {', '.join(choices)}")
        return values
    return parse


def positive_int_list(text: str) -> list[int]:
    """--sizes "2000,10000" -> [2000, 10000]: at least one value, each >= 1."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated whole numbers >= 1, e.g. 16,32")
    return values


def library_only(name: str, user: str = "bench/ferplus.py") -> int:
    """What a helper module prints when run as a script: one line, rc 0 for --help, else 2."""
    asked = bool({"-h", "--help"} & set(sys.argv[1:]))
    print(f"bench/{name} is a library used by {user}; run `python {user} --help` instead",
          file=sys.stdout if asked else sys.stderr)
    return 0 if asked else 2
