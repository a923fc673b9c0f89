"""Ordered process pool and thread prefetcher (utils/pool.py)."""
from __future__ import annotations

import os
import time

import pytest

from utils.pool import ordered_map, prefetch


def test_prefetch_keeps_order_and_propagates_errors():
    def slow(i):
        time.sleep(0.01 * (5 - i % 5))
        if i == 7:
            raise ValueError("bad item 7")
        return i * i

    assert list(prefetch(slow, range(6), depth=3)) == [i * i for i in range(6)]
    with pytest.raises(ValueError, match="bad item 7"):
        list(prefetch(slow, range(10)))


def _square_or_fail(i: int) -> int:
    time.sleep(0.002 * (7 - i % 7))      # later jobs finish first
    if i == 9:
        raise ValueError("bad item 9")
    return i * i


def _pid(_) -> int:
    time.sleep(0.05)
    return os.getpid()


@pytest.mark.parametrize("workers", [1, 2])
def test_ordered_map_keeps_input_order(workers):
    assert list(ordered_map(_square_or_fail, range(9), workers)) == [i * i for i in range(9)]


@pytest.mark.parametrize("workers", [1, 2])
def test_ordered_map_stops_at_the_first_failing_job(workers):
    seen = []
    with pytest.raises(ValueError, match="bad item 9"):
        for r in ordered_map(_square_or_fail, range(30), workers):
            seen.append(r)
    assert seen == [i * i for i in range(9)]          # every result before the failing job, in order


def test_ordered_map_uses_worker_processes():
    pids = set(ordered_map(_pid, range(6), 2))
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert set(ordered_map(_pid, range(2), 1)) == {os.getpid()}
