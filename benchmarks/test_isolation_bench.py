"""Bulkhead, Fallback, Timeout: cost of the success path, with the floors in the same run.

python -m pytest benchmarks/test_isolation_bench.py --benchmark-columns=median,min,rounds --benchmark-sort=name \
    --benchmark-json=/tmp/isolation.json && python benchmarks/report.py /tmp/isolation.json

Floors: bare_call `f()`; bare_pair (two bare calls: the floor of acquire + release); bare_await (awaiting
a coroutine that returns at once, 1000 per round inside one loop run, reported per await). report.py
compares each case with one of those. Two more floors hold the user code of the context-manager cases:
call_in_fn (`def g(): return f()`, the floor of `def g(): with bh: return f()`) and nested_await
(`async def g(): return await c()`, the floor of `async def g(): async with bh: return await c()`);
subtract those by hand (docs/bulkhead.md does). threading.BoundedSemaphore and asyncio.Semaphore run for
scale.
"""
import asyncio
import threading

import pytest

import buttress
from buttress import Bulkhead, BulkheadFullError, Fallback, LoadShedder, Overloaded, Priority, StaleCacheFallback, Timeout
from conftest import awaiting, bare_async, bare_pair, bare_raise, catching


def f():
    return 1


# -- floors ----------------------------------------------------------------------------------------------

def test_floor_bare_call(benchmark):
    benchmark(f)


def test_floor_bare_pair(benchmark):
    benchmark(bare_pair)


def test_floor_call_in_fn(benchmark):
    def g():
        return f()

    benchmark(g)


def test_floor_bare_await(benchmark):
    awaiting(benchmark, bare_async)


def test_floor_raise_catch(benchmark):
    benchmark(catching(bare_raise, ValueError))


class _Obj:
    def plain(self):
        return 1


def test_floor_method_call(benchmark):
    benchmark(_Obj().plain)


def test_floor_nested_await(benchmark):
    async def g():
        return await bare_async()

    awaiting(benchmark, g)


# -- bulkhead --------------------------------------------------------------------------------------------

def test_bulkhead_try_acquire_release_pair(benchmark):
    bh = Bulkhead(10)

    def pair(acq=bh.try_acquire, rel=bh.release):
        acq()
        rel()

    benchmark(pair)
    assert bh.in_use == 0


def test_threading_bounded_semaphore_pair(benchmark):
    sem = threading.BoundedSemaphore(10)

    def pair(acq=sem.acquire, rel=sem.release):
        acq()
        rel()

    benchmark(pair)


def test_bulkhead_with_in_fn(benchmark):
    bh = Bulkhead(10)

    def g():
        with bh:
            return f()

    assert benchmark(g) == 1
    assert bh.in_use == 0


def test_threading_bounded_semaphore_with_in_fn(benchmark):
    sem = threading.BoundedSemaphore(10)

    def g():
        with sem:
            return f()

    benchmark(g)


def test_bulkhead_decorated(benchmark):
    bh = Bulkhead(10)
    assert benchmark(bh(f)) == 1


def test_bulkhead_decorated_method(benchmark):
    bh = Bulkhead(10)

    class C:
        @bh
        def m(self):
            return 1

    c = C()
    assert benchmark(lambda: c.m()) == 1


def test_bulkhead_full_reject(benchmark):
    """A refusal (the hot path under overload) over raise+catch."""
    bh = Bulkhead(1)
    assert bh.try_acquire()
    benchmark(catching(bh(f), BulkheadFullError))
    bh.release()


def test_bulkhead_with_full_reject(benchmark):
    bh = Bulkhead(1)
    assert bh.try_acquire()

    def g():
        try:
            with bh:
                return f()
        except BulkheadFullError:
            pass

    benchmark(g)
    bh.release()


def test_bulkhead_call_form(benchmark):
    bh = Bulkhead(10)
    assert benchmark(bh.call, f) == 1


def test_bulkhead_async_with_in_coroutine(benchmark):
    bh = Bulkhead(10)

    async def g():
        async with bh:
            return await bare_async()

    awaiting(benchmark, g)
    assert bh.in_use == 0


def test_asyncio_semaphore_async_with_in_coroutine(benchmark):
    sem = asyncio.Semaphore(10)         # binds to a loop only when someone has to wait

    async def g():
        async with sem:
            return await bare_async()

    awaiting(benchmark, g)


def test_bulkhead_decorated_async(benchmark):
    bh = Bulkhead(10)
    awaiting(benchmark, bh(bare_async))


# -- fallback --------------------------------------------------------------------------------------------

def test_fallback_decorated(benchmark):
    assert benchmark(Fallback(0)(f)) == 1


def test_fallback_call_form(benchmark):
    assert benchmark(Fallback(0).call, f) == 1


def test_fallback_decorated_async(benchmark):
    awaiting(benchmark, Fallback(0)(bare_async))


def test_stale_cache_fallback_decorated(benchmark):
    assert benchmark(StaleCacheFallback(60.0)(f)) == 1


# -- timeout (for scale: a timer per call, a thread hop for sync calls) -------------------------------------

def test_timeout_decorated_async(benchmark):
    awaiting(benchmark, Timeout(60.0)(bare_async))


def test_timeout_sync_thread_hop(benchmark):
    t = Timeout(60.0, executor=buttress.ThreadPoolBulkhead(1, 1, name="bench"))
    assert benchmark(t.call, f) == 1
    t.executor.shutdown()


def test_asyncio_timeout_async(benchmark):
    if not hasattr(asyncio, "timeout"):         # 3.11+
        pytest.skip("asyncio.timeout needs Python 3.11")

    async def g():
        async with asyncio.timeout(60.0):
            return await bare_async()

    awaiting(benchmark, g)


def test_asyncio_wait_for_async(benchmark):
    awaiting(benchmark, lambda: asyncio.wait_for(bare_async(), 60.0))


# -- bulkhead on a host-wide store (shm://), and the load shedder, for scale --------------------------------

def test_bulkhead_with_in_fn_shm(benchmark, shm_store):
    bh = Bulkhead(10, name="bench", store=shm_store)

    def g():
        with bh:
            return f()

    assert benchmark(g) == 1
    assert bh.in_use == 0


def test_bulkhead_decorated_shm(benchmark, shm_store):
    bh = Bulkhead(10, name="bench", store=shm_store)
    assert benchmark(bh(f)) == 1


def test_shedder_admit_with_in_fn(benchmark):
    from buttress import LoadShedder, Priority
    shed = LoadShedder(100)

    def g(admit=shed.admit, p=Priority.HIGH):
        with admit(p):
            return f()

    assert benchmark(g) == 1


def test_shedder_shed_reject(benchmark):
    """A shed request (LOW over its bound) over raise+catch."""
    shed = LoadShedder(2)
    held = shed.admit(Priority.CRITICAL)
    held.__enter__()

    def g(admit=shed.admit, p=Priority.LOW):
        try:
            with admit(p):
                return f()
        except Overloaded:
            pass

    benchmark(g)
    held.__exit__(None, None, None)
