"""Logging, set up in one place: importing this module installs one handler on the `exprclip` logger (level from
EXPRCLIP_LOG_LEVEL, else info; rank from torchrun's RANK), and train.py calls setup_logging again with --log-level.
Messages are plain lines (no prefixes, as the tools have always printed them):
INFO and DEBUG go to stdout, WARNING and above to stderr. Under torchrun only rank 0 logs below WARNING, so N
processes do not print N copies. Modules log through logging.getLogger(f"exprclip.{__name__}") (get_logger); the
`exprclip` logger does not propagate, so a program embedding these modules reconfigures it with setup_logging (or
its own handlers on logging.getLogger("exprclip")).
Command results (evaluate's report, index search hits, prepare's table) are printed, not logged: a quieter level
never hides a result. Progress bars stay tqdm.
"""
from __future__ import annotations

import logging
import os
import sys

LEVELS = ("debug", "info", "warning", "error")
ROOT = "exprclip"


class _StdStreams(logging.Handler):
    """INFO and below to stdout, WARNING and above to stderr, looked up when each record is written (so pytest's
    capture and redirections made after set-up are honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            if stream is None:                        # closed (`>&-`) or pythonw: nowhere to say it
                return
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 -- logging must never raise into the caller
            self.handleError(record)


def setup_logging(level: str | None = None, rank: int | None = None) -> logging.Logger:
    """Configure the `exprclip` logger (idempotent). level: debug|info|warning|error, default the
    EXPRCLIP_LOG_LEVEL environment variable, else info. rank: default torchrun's RANK (0 without torchrun)."""
    name = (level or os.environ.get("EXPRCLIP_LOG_LEVEL") or "info").lower()
    value = getattr(logging, name.upper()) if name in LEVELS else logging.INFO
    if rank is None:
        env = os.environ.get("RANK", "0")
        rank = int(env) if env.strip().isdigit() else 0           # a malformed RANK must not break every import
    root = logging.getLogger(ROOT)
    handler = _StdStreams()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(value if rank == 0 else max(value, logging.WARNING))
    root.propagate = False
    return root


def get_logger(module: str) -> logging.Logger:
    """The logger of one module: get_logger(__name__)."""
    return logging.getLogger(f"{ROOT}.{module}")


setup_logging()      # at import: every entry point and library use gets the same plain lines
