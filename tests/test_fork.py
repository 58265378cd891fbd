"""A forked child (gunicorn's pre-fork workers, ProcessPoolExecutor on Linux) inherits pattern objects whose
threads did not survive the fork: they must work in the child as in a fresh process."""
from __future__ import annotations

import multiprocessing
import os
import sys

import pytest

import buttress

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs fork")

POOL = buttress.ThreadPoolBulkhead(max_workers=2, queue_size=4)
TIMEOUT = buttress.Timeout(10.0)


def _in_pool(x: int) -> int:
    return POOL.submit(lambda: x * 2).result(10)


@TIMEOUT
def _timed(x: int) -> int:          # a sync Timeout runs the call on its worker pool
    return x * 2


@pytest.mark.parametrize("fn", [_in_pool, _timed], ids=["ThreadPoolBulkhead", "Timeout"])
def test_pools_started_in_the_parent_work_in_a_forked_child(fn):
    assert fn(1) == 2                                   # the parent's worker threads are running now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map(fn, [1, 2, 3], chunksize=1) == [2, 4, 6]
