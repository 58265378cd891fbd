"""The async guard patterns through the compiled awaitable (buttress._core.guard): cost over a bare await,
with the floors in the same run.

python -m pytest benchmarks/test_async_bench.py --benchmark-columns=median,min,rounds --benchmark-sort=name \
    --benchmark-json=/tmp/async.json && python benchmarks/report.py /tmp/async.json

Floors: bare_await (awaiting a coroutine that returns at once), async_raise_catch (awaiting one that raises,
caught), nested_await (`async def g(): return await c()`: the user code of an `async with` case) and
async_with_noop (the same with an `async with` of a do-nothing Python context manager: what `async with`
itself costs, the floor of the `async with` cases; subtract it by hand, docs/bulkhead.md does). Every case
runs 1000 awaits per round inside one loop (conftest.awaiting) and reports ns per await.
"""
import asyncio

from buttress import Bulkhead, BulkheadFullError, CircuitBreaker, CircuitOpenError, LoadShedder, Priority
from buttress._impl import core
from conftest import awaiting, bare_async


async def raiser():
    raise ValueError("floor")


class Noop:
    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None


# -- floors ----------------------------------------------------------------------------------------------

def test_floor_bare_await(benchmark):
    awaiting(benchmark, bare_async)


def test_floor_async_raise_catch(benchmark):
    awaiting(benchmark, raiser, catch=(ValueError,))


def test_floor_nested_await(benchmark):
    async def g():
        return await bare_async()

    awaiting(benchmark, g)


def test_floor_async_with_noop(benchmark):
    cm = Noop()

    async def g():
        async with cm:
            return await bare_async()

    awaiting(benchmark, g)


# -- bulkhead ----------------------------------------------------------------------------------------------

def test_bulkhead_decorated_async(benchmark):
    bh = Bulkhead(10)
    awaiting(benchmark, bh(bare_async))
    assert bh.in_use == 0


def test_bulkhead_decorated_async_failure(benchmark):
    bh = Bulkhead(10)
    awaiting(benchmark, bh(raiser), catch=(ValueError,))
    assert bh.in_use == 0


def test_bulkhead_call_async(benchmark):
    bh = Bulkhead(10)
    awaiting(benchmark, lambda: bh.call_async(bare_async))
    assert bh.in_use == 0


def test_bulkhead_async_with_in_coroutine(benchmark):
    bh = Bulkhead(10)

    async def g():
        async with bh:
            return await bare_async()

    awaiting(benchmark, g)
    assert bh.in_use == 0


def test_bulkhead_full_async_reject(benchmark):
    bh = Bulkhead(1)
    assert bh.try_acquire()
    awaiting(benchmark, bh(bare_async), catch=(BulkheadFullError,))
    bh.release()


def test_asyncio_semaphore_async_with_in_coroutine(benchmark):
    sem = asyncio.Semaphore(10)

    async def g():
        async with sem:
            return await bare_async()

    awaiting(benchmark, g)


# -- a stage guard as the limiters' decorator builds it (a compiled permit word) -----------------------------

def test_stage_guard_async(benchmark):
    p = core("permits").Permits(10)

    def refuse():
        raise BulkheadFullError("full")

    g = core("guard").StageGuard(bare_async, p.try_acquire, refuse, p.release, asynchronous=True)
    awaiting(benchmark, g)
    assert p.in_use == 0


# -- load shedder ------------------------------------------------------------------------------------------

def test_shedder_async_with_admit(benchmark):
    shed = LoadShedder(100)

    async def g(admit=shed.admit, p=Priority.HIGH):
        async with admit(p):
            return await bare_async()

    awaiting(benchmark, g)
    assert shed.in_flight == 0


# -- circuit breaker (the core's async guard: the compiled awaitable) ---------------------------------------

def test_breaker_decorated_async(benchmark):
    cb = CircuitBreaker(slow_call_duration=None)
    awaiting(benchmark, cb(bare_async))
    assert cb.metrics().failures == 0


def test_breaker_decorated_async_failure(benchmark):
    cb = CircuitBreaker(slow_call_duration=None)
    cb.metrics_only()           # records every failure, never opens
    awaiting(benchmark, cb(raiser), catch=(ValueError,))


def test_breaker_call_async(benchmark):
    cb = CircuitBreaker(slow_call_duration=None)
    awaiting(benchmark, lambda: cb.call_async(bare_async))


def test_breaker_async_with_in_coroutine(benchmark):
    cb = CircuitBreaker(slow_call_duration=None)

    async def g():
        async with cb:
            return await bare_async()

    awaiting(benchmark, g)


def test_breaker_open_async_reject(benchmark):
    cb = CircuitBreaker(slow_call_duration=None)
    cb.force_open()
    awaiting(benchmark, cb(bare_async), catch=(CircuitOpenError,))


# -- rate limiters (@limiter on an async def function: the compiled guard; call_async: Python) --------------

def test_token_bucket_decorated_async(benchmark):
    from buttress import TokenBucket
    tb = TokenBucket(rate=1e9, capacity=10**9)
    awaiting(benchmark, tb(bare_async))
    assert tb.metrics().rejected == 0


def test_token_bucket_call_async(benchmark):
    from buttress import TokenBucket
    tb = TokenBucket(rate=1e9, capacity=10**9)
    awaiting(benchmark, lambda: tb.call_async(bare_async))
    assert tb.metrics().rejected == 0


def test_token_bucket_acquire_async_no_wait(benchmark):
    from buttress import TokenBucket
    tb = TokenBucket(rate=1e9, capacity=10**9)
    awaiting(benchmark, tb.acquire_async)


def test_token_bucket_empty_async_reject(benchmark):
    from buttress import RateLimitExceeded, TokenBucket
    tb = TokenBucket(rate=1e-6, capacity=1)
    tb.try_acquire()
    awaiting(benchmark, tb(bare_async), catch=(RateLimitExceeded,))


# -- hedge (the primary answers before the delay: no timer, no task) ----------------------------------------

def test_hedge_decorated_async_answers_at_once(benchmark):
    from buttress import Hedge
    awaiting(benchmark, Hedge(0.05)(bare_async))
