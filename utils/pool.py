"""Ordered parallel maps: one process pool for the data-set stages, one thread prefetcher.

:func:`ordered_map` is how preprocessing, patch cutting and the synthetic generator run
their per-file jobs: in-process for one worker, otherwise in a process pool; either way
the results come back in the order of the jobs, so what a caller writes or records does
not depend on the number of workers. A job that raises stops the whole map: the jobs not
yet started are cancelled and the exception propagates to the caller, whose already
finished results are kept.

:func:`prefetch` evaluates a function a few items ahead in background threads (file
reading while the main thread computes).
"""
from __future__ import annotations

import itertools
import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def start_method(prefer_fork: bool = True) -> str:
    """``fork`` where the platform has it and the caller allows it (fast, shares imported
    modules), else ``spawn`` (needed once CUDA has been initialised in the parent)."""
    return "fork" if prefer_fork and "fork" in multiprocessing.get_all_start_methods() else "spawn"


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int = 1, *, method: Optional[str] = None,
                initializer: Optional[Callable] = None, initargs: tuple = ()) -> Iterator[R]:
    """``map(fn, items)`` with ``workers`` processes, results in input order (module docstring).

    ``workers <= 1`` (or a single item) runs in this process and calls no ``initializer``.
    ``method`` is the start method (default :func:`start_method`). At most ``2 * workers``
    jobs are queued ahead of the result being waited for.
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    context = multiprocessing.get_context(method or start_method())
    with ProcessPoolExecutor(workers, mp_context=context, initializer=initializer, initargs=initargs) as pool:
        todo = iter(items)
        pending = deque(pool.submit(fn, item) for item in itertools.islice(todo, 2 * workers))
        try:
            while pending:
                result = pending.popleft().result()
                pending.extend(pool.submit(fn, item) for item in itertools.islice(todo, 1))
                yield result
        finally:
            for future in pending:
                future.cancel()


def prefetch(fn: Callable[[T], R], items: Iterable[T], depth: int = 2) -> Iterator[R]:
    """``map(fn, items)`` evaluated ``depth`` items ahead in background threads, in order."""
    items = iter(items)
    with ThreadPoolExecutor(max_workers=depth) as pool:
        pending = deque(pool.submit(fn, item) for item in itertools.islice(items, depth))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(items, 1):
                pending.append(pool.submit(fn, item))
            yield result
