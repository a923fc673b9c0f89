"""What every command-line script shares: arguments -> the stage's dataclass, errors -> exit 2.

Each script parses its flags with argparse and turns them into its stage's configuration
dataclass with :func:`parse_config` (argparse ``dest`` names are the dataclass field names;
flags that only the script reads, such as ``--quiet``, come back separately), calls the
library and lets :func:`run_cli` map a
:class:`utils.errors.ShapeGuidedError` to a one-line message and exit status 2 (naming the
rank under torchrun).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from typing import Callable, Iterable, TypeVar

from utils.errors import ShapeGuidedError
from utils.launch import distributed_run, leave_if_distributed, rank_prefix, record_error

T = TypeVar("T")

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_BUG = 1                # an unexpected exception (its traceback is printed)


def make_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of a script's docstring, defaults in ``--help``."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def config_from_args(cls: type[T], args: argparse.Namespace, cli_only: Iterable[str] = (), **overrides) -> T:
    """``cls(**vars(args))`` restricted to ``cls``'s fields, plus ``overrides``.

    Every argument must be a field of ``cls`` or be named in ``cli_only`` (flags that
    only the script itself reads, e.g. ``--quiet``), so a flag can never be silently dropped.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values = dict(vars(args))
    stray = sorted(set(values) - names - set(cli_only) - set(overrides))
    if stray:
        raise TypeError(f"{cls.__name__} has no field for the argument(s) {stray}")
    values = {k: v for k, v in values.items() if k in names}
    values.update(overrides)
    return cls(**values)


def parse_config(parser: argparse.ArgumentParser, cls: type[T], argv=None, cli_only: Iterable[str] = ()
                 ) -> tuple[T, argparse.Namespace]:
    """Parse ``argv`` into ``(cls instance, namespace of the cli_only flags)``; see :func:`config_from_args`."""
    args = parser.parse_args(argv)
    cli_only = tuple(cli_only)
    return config_from_args(cls, args, cli_only), argparse.Namespace(**{k: getattr(args, k) for k in cli_only})


def split_names(values: Iterable[str] | None) -> list[str] | None:
    """Accept both ``--classes a b`` and ``--classes a,b`` (and mixtures); None stays None."""
    if values is None:
        return None
    return [v for value in values for v in value.split(",") if v]


class _Names(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        names = split_names(values)
        bad = [n for n in names if self.valid is not None and n not in self.valid]
        if not names or bad:
            parser.error(f"argument {option_string}: invalid choice(s) {bad or names!r} (choose from "
                         f"{', '.join(self.valid)})" if bad else f"argument {option_string}: expected a name")
        setattr(namespace, self.dest, names)


def add_names(parser: argparse.ArgumentParser, *flags: str, choices: Iterable[str] | None = None, **kwargs) -> None:
    """A list-of-names option (classes, defect types, stages), the one convention of every script:
    ``--classes a b``, ``--classes a,b`` or both mixed; ``choices`` are checked after splitting."""
    action = type("Names", (_Names,), {"valid": None if choices is None else tuple(choices)})
    parser.add_argument(*flags, nargs="+", action=action, **kwargs)


def run_cli(body: Callable[..., int], *args) -> int:
    """``body(*args)``; a :class:`ShapeGuidedError` becomes ``error: <message>`` on stderr and exit 2.

    Under torchrun the message names the rank (``error: rank 1 of 2: ...``) and, like any
    other exception (whose traceback is printed, exit status 1), is also written to
    torchrun's error file, whose failure summary then shows it; the failing rank then ends at
    once, so that torchrun stops the other ranks (:mod:`utils.launch`).
    """
    try:
        return body(*args)
    except ShapeGuidedError as exc:
        record_error(exc, traceback_too=False)
        print(f"error: {rank_prefix()}{exc}", file=sys.stderr)
        return leave_if_distributed(EXIT_BAD_INPUT)
    except Exception as exc:
        record_error(exc)
        if not distributed_run():
            raise
        traceback.print_exc()
        return leave_if_distributed(EXIT_BUG)


def interruptible(work: Callable[[], T]) -> T | None:
    """``work()``; on Ctrl-C say that finished work is kept and the same command resumes, and
    return None (the script then exits :data:`EXIT_INTERRUPTED`). For resumable stages."""
    try:
        return work()
    except KeyboardInterrupt:
        print("interrupted: finished samples are kept; run the same command again to resume", file=sys.stderr)
        return None
