"""The one error type that every script maps to exit status 2.

Anything wrong with what the user gave (a missing or malformed file, an impossible
option value, an unknown class, unavailable weights or device) raises a subclass of
:class:`ShapeGuidedError` whose message names the file or option and the fix. The
scripts catch this one type, print the message and exit 2; any other exception is a
bug and keeps its traceback.
"""
from __future__ import annotations


class ShapeGuidedError(Exception):
    """Base of every user-facing error; the message names the file or option and what to do."""


class DataError(ShapeGuidedError, ValueError):
    """Bad or missing input data. The message always names the offending path."""


class ConfigError(ShapeGuidedError, ValueError):
    """An option value that cannot work (e.g. ``--workers 0``); the message names the option."""
