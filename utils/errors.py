"""The one error type that every script maps to exit status 2.

Anything wrong with what the user gave (a missing or malformed file, an impossible
option value, an unknown class, unavailable weights or device) raises a subclass of
:class:`ShapeGuidedError` whose message names the file or option and the fix. The
scripts catch this one type, print the message and exit 2; any other exception is a
bug and keeps its traceback.
"""
from __future__ import annotations

import re


class ShapeGuidedError(Exception):
    """Base of every user-facing error; the message names the file or option and what to do."""


class DataError(ShapeGuidedError, ValueError):
    """Bad or missing input data. The message always names the offending path."""


class ConfigError(ShapeGuidedError, ValueError):
    """An option value that cannot work (e.g. ``--workers 0``); the message names the option."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (terminal escapes removed, at most ``limit`` characters), for
    wrapping a library's multi-line error into a one-line message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().split("\n")[0].strip()
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
