"""Scale: 10 000 concurrent asyncio tasks through an async breaker + bulkhead + limiter, wall time against the
same 10 000 tasks with no protection, in the same run (issue #16's scale run).

python -m pytest benchmarks/test_scale_bench.py --benchmark-columns=median,min,rounds --benchmark-sort=name

Each task suspends once inside the guarded call (`await asyncio.sleep(0)`), so all 10 000 are in flight at
the same time: the bulkhead holds up to 10 000 permits, the breaker's window sees every outcome, the limiter
grants 10 000 tokens. `extra_info["ratio_to_unprotected"]` is the wall time over the unprotected run measured
in the same test (medians of the same number of rounds); `ns_per_task_over` the difference per task.
The constrained case lets only 100 run at once (9 900 tasks wait in the bulkhead's queue and are handed
their permits one by one): that measures the waiter hand-off, not the admission fast path.
"""
import asyncio
import statistics
import time

from buttress import Bulkhead, CircuitBreaker, TokenBucket

TASKS = 10_000
ROUNDS = 7


async def work():
    await asyncio.sleep(0)
    return 1


def _gather(fn):
    async def run():
        results = await asyncio.gather(*(fn() for _ in range(TASKS)))
        assert len(results) == TASKS and sum(results) == TASKS
    return run


def _median_wall(loop, coro_fn, rounds=ROUNDS):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        loop.run_until_complete(coro_fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _scale(benchmark, guarded, check=None):
    loop = asyncio.new_event_loop()
    try:
        floor = _median_wall(loop, _gather(work))          # the same tasks, unprotected, in this run
        benchmark.pedantic(lambda: loop.run_until_complete(_gather(guarded)()), rounds=ROUNDS, warmup_rounds=1)
        floor_after = _median_wall(loop, _gather(work))    # and again after, against drift on a noisy VM
    finally:
        loop.close()
    if check is not None:
        check()
    if benchmark.stats is not None:
        base = statistics.median([floor, floor_after])
        med = benchmark.stats.stats.median
        benchmark.extra_info["unprotected_s"] = base
        benchmark.extra_info["ratio_to_unprotected"] = med / base
        benchmark.extra_info["ns_per_task_over"] = (med - base) * 1e9 / TASKS


def _all_returned(bh):
    m = bh.metrics()
    assert m.in_use == 0 and m.rejected == 0, m


def test_scale_unprotected_10k_tasks(benchmark):
    """The floor: 10 000 tasks, no protection."""
    _scale(benchmark, work)


def test_scale_breaker_bulkhead_limiter_10k_tasks(benchmark):
    cb = CircuitBreaker(failure_threshold=5)
    bh = Bulkhead(max_concurrent=TASKS)
    bucket = TokenBucket(rate=1e9, capacity=1_000_000)
    guarded = cb(bh(bucket(work)))
    _scale(benchmark, guarded, check=lambda: _all_returned(bh))


def test_scale_bulkhead_100_of_10k_tasks_wait(benchmark):
    cb = CircuitBreaker(failure_threshold=5)
    bh = Bulkhead(max_concurrent=100, max_wait=60.0)
    guarded = cb(bh(work))
    _scale(benchmark, guarded, check=lambda: _all_returned(bh))


def test_scale_asyncio_semaphore_100_of_10k_tasks_wait(benchmark):
    """The peer of the constrained case: the same hand-off with a plain asyncio.Semaphore (no breaker)."""
    sem = None

    async def guarded():
        nonlocal sem
        if sem is None:
            sem = asyncio.Semaphore(100)
        async with sem:
            return await work()

    _scale(benchmark, guarded)
