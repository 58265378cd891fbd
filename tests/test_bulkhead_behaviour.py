"""One behaviour for every call (DESIGN §3c) over Bulkhead, ThreadPoolBulkhead, LoadShedder, AdaptiveThrottle
and the compiled / twin guards: sync vs async, generators hold their permit over the iteration, pickling by
reference, BaseException is no outcome."""
from __future__ import annotations

import asyncio
import gc
import pickle
import warnings

import pytest

import buttress
from buttress import Bulkhead, LoadShedder, Priority, ThreadPoolBulkhead
from buttress.adaptive import AdaptiveThrottle, AIMDLimit


class Halt(BaseException):
    """A custom BaseException (gevent / trio style cancellation)."""


@pytest.fixture
def no_unawaited_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
    bad = [w for w in caught if "never awaited" in str(w.message)]
    assert not bad, bad


async def work():
    return "done"


def returns_coroutine():
    return work()


def sync_work():
    return "sync"


def stream(n, log):
    log.append("start")
    try:
        for i in range(n):
            yield i
    finally:
        log.append("end")


async def astream(n, log):
    log.append("start")
    try:
        for i in range(n):
            yield i
    finally:
        log.append("end")


def held(p):
    """Permits / slots the pattern holds now."""
    if isinstance(p, Bulkhead):
        return p.in_use
    if isinstance(p, LoadShedder):
        return p.in_flight
    return 0


def make(name):
    return {"Bulkhead": lambda: Bulkhead(max_concurrent=2),
            "LoadShedder": lambda: LoadShedder(max_in_flight=10),
            "AdaptiveThrottle": lambda: AdaptiveThrottle(rng=lambda: 1.0)}[name]()


NAMES = ["Bulkhead", "LoadShedder", "AdaptiveThrottle"]


# -- a sync form given an async function ------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fn", [work, returns_coroutine], ids=["async_def", "returns_coroutine"])
def test_a_sync_call_of_an_async_function_is_a_type_error_and_the_permit_comes_back(name, fn, no_unawaited_warning):
    p = make(name)
    with pytest.raises(TypeError) as info:
        p.call(fn)
    msg = str(info.value)
    assert fn.__name__ in msg and "call_async" in msg, msg
    assert held(p) == 0


@pytest.mark.parametrize("name", NAMES)
def test_a_decorated_sync_function_returning_a_coroutine_is_refused_when_called(name, no_unawaited_warning):
    p = make(name)
    decorated = p(returns_coroutine)        # Bulkhead: the compiled StageGuard (a C type test on the result)
    for _ in range(3):                      # the permit came back each time (max_concurrent=2)
        with pytest.raises(TypeError, match="returns_coroutine.*call_async"):
            decorated()
    assert held(p) == 0


@pytest.mark.parametrize("name", NAMES)
def test_call_async_of_a_sync_function_is_a_type_error(name):
    p = make(name)
    calls = []

    def fn():
        calls.append(1)
        return "sync"

    with pytest.raises(TypeError) as info:
        asyncio.run(p.call_async(fn))
    assert "sync function" in str(info.value) and ".call(" in str(info.value), info.value
    assert calls == [1] and held(p) == 0


@pytest.mark.parametrize("name", NAMES)
def test_call_async_of_a_generator_function_points_at_the_sync_form(name):
    p = make(name)
    with pytest.raises(TypeError, match="generator function.*sync form"):
        asyncio.run(p.call_async(stream, 2, []))
    assert held(p) == 0


def test_a_refused_call_in_a_usage_error_is_no_outcome_for_the_throttle(no_unawaited_warning):
    t = AdaptiveThrottle(rng=lambda: 1.0)
    with pytest.raises(TypeError):
        t.call(returns_coroutine)
    assert t.metrics().requests == 0


def test_thread_pool_bulkhead_refuses_async_and_generator_functions(no_unawaited_warning):
    with ThreadPoolBulkhead(max_workers=1, queue_size=1) as pool:
        with pytest.raises(TypeError, match="work.*async def.*call_async"):
            pool.submit(work)
        with pytest.raises(TypeError, match="work.*async def"):
            pool.call(work)
        with pytest.raises(TypeError, match="astream.*async generator"):
            pool.submit(astream, 1, [])
        with pytest.raises(TypeError, match="stream.*generator function.*Bulkhead"):
            pool.submit(stream, 1, [])
        with pytest.raises(TypeError, match="returns_coroutine.*call_async"):
            pool.call(returns_coroutine, timeout=30)        # found on the worker: the coroutine is closed
        assert pool.call(sync_work, timeout=30) == "sync"
        assert asyncio.run(pool.call_async(sync_work)) == "sync"    # its call_async runs sync functions
        assert pool.metrics().running == 0 and pool.metrics().queued == 0


# -- generators hold their permit over the whole iteration -------------------------------------------------

@pytest.mark.parametrize("name", ["Bulkhead", "LoadShedder"])
@pytest.mark.parametrize("form", ["decorator", "call"])
def test_a_guarded_generator_holds_its_permit_until_it_finishes(name, form):
    p = make(name)
    log = []
    gen = p(stream)(3, log) if form == "decorator" else p.call(stream, 3, log)
    assert held(p) == 1 and log == []       # created, not started: the permit is the stream's
    assert next(gen) == 0 and held(p) == 1
    assert list(gen) == [1, 2]
    assert log == ["start", "end"] and held(p) == 0


@pytest.mark.parametrize("name", ["Bulkhead", "LoadShedder"])
def test_a_closed_or_dropped_or_failing_stream_gives_its_permit_back_once(name):
    p = make(name)
    g = p(stream)
    a = g(5, [])
    next(a)
    a.close()
    assert held(p) == 0
    a.close()
    assert held(p) == 0
    b = g(5, [])                            # never started, dropped: collected -> permit back
    assert held(p) == 1
    del b
    gc.collect()
    assert held(p) == 0

    def boom():
        yield 1
        raise ValueError("mid-stream")

    c = p(boom)()
    assert next(c) == 1
    with pytest.raises(ValueError, match="mid-stream"):
        next(c)
    assert held(p) == 0


def test_a_bulkhead_stream_counts_against_max_concurrent():
    bh = Bulkhead(max_concurrent=1)
    gen = bh(stream)(2, [])
    with pytest.raises(buttress.BulkheadFullError):
        bh.call(sync_work)                  # the open stream holds the only permit
    list(gen)
    assert bh.call(sync_work) == "sync"


@pytest.mark.parametrize("name", ["Bulkhead", "LoadShedder"])
@pytest.mark.parametrize("form", ["decorator", "call", "call_async"])
def test_a_guarded_async_generator_holds_its_permit_until_it_finishes_or_is_closed(name, form):
    p = make(name)

    async def main():
        log = []
        if form == "decorator":
            agen = p(astream)(3, log)
        elif form == "call":
            agen = p.call(astream, 3, log)
        else:
            agen = await p.call_async(astream, 3, log)
        assert held(p) == 1
        assert [x async for x in agen] == [0, 1, 2]
        assert log == ["start", "end"] and held(p) == 0
        agen = p(astream)(3, log)
        assert await agen.__anext__() == 0
        await agen.aclose()
        assert held(p) == 0

    asyncio.run(main())


def test_a_stream_ended_with_a_failure_is_the_shedders_outcome_and_a_close_is_none():
    lim = AIMDLimit(initial_limit=10, min_limit=1, max_limit=100)
    samples = []
    lim.on_sample = lambda latency, in_flight, dropped=False: samples.append(dropped)  # type: ignore[method-assign]
    shed = LoadShedder(limiter=lim, max_in_flight=100, drop_on=(TimeoutError,))

    def fails():
        yield 1
        raise TimeoutError

    g = shed(fails)()
    next(g)
    with pytest.raises(TimeoutError):
        next(g)
    assert samples == [True]
    g = shed(stream)(3, [])
    next(g)
    g.close()                               # GeneratorExit: no outcome
    assert samples == [True] and shed.in_flight == 0
    assert list(shed(stream)(2, [])) == [0, 1]
    assert samples == [True, False]


# -- BaseException is no outcome -----------------------------------------------------------------------------

def test_a_custom_base_exception_is_no_sample_for_the_shedders_limiter():
    lim = AIMDLimit(initial_limit=10)
    samples = []
    lim.on_sample = lambda *a: samples.append(a)  # type: ignore[method-assign]
    shed = LoadShedder(limiter=lim, max_in_flight=100)

    def halt():
        raise Halt

    with pytest.raises(Halt):
        shed.call(halt)
    with pytest.raises(Halt):
        with shed.admit(Priority.HIGH):
            raise Halt
    assert samples == [] and shed.in_flight == 0
    shed.call(sync_work)
    assert len(samples) == 1


def test_a_custom_base_exception_is_no_outcome_for_the_adaptive_throttle():
    t = AdaptiveThrottle(rng=lambda: 1.0)

    def halt():
        raise Halt

    with pytest.raises(Halt):
        t.call(halt)
    with pytest.raises(Halt):
        asyncio.run(t.call_async(_ahalt))
    assert t.metrics().requests == 0
    t.call(sync_work)
    assert t.metrics().requests == 1 and t.metrics().accepts == 1


async def _ahalt():
    raise Halt


@pytest.mark.parametrize("spec", [Halt, (KeyboardInterrupt,), SystemExit])
def test_naming_a_base_exception_in_drop_on_or_reject_on_is_a_value_error(spec):
    with pytest.raises(ValueError, match="drop_on"):
        LoadShedder(drop_on=spec)
    with pytest.raises(ValueError, match="reject_on"):
        AdaptiveThrottle(reject_on=spec)


# -- pickling by reference -----------------------------------------------------------------------------------

shed_module = LoadShedder(max_in_flight=10)
throttle_module = AdaptiveThrottle()


@shed_module
def shed_decorated(x):
    return x * 2


@throttle_module
def throttled(x):
    return x * 2


@Bulkhead(max_concurrent=2)
async def bulkheaded_async(x):
    return x * 2


@pytest.mark.parametrize("fn", [shed_decorated, throttled, bulkheaded_async], ids=lambda f: f.__name__)
def test_decorated_module_level_functions_pickle_by_reference(fn):
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(fn, protocol)
        assert len(data) < 200 and pickle.loads(data) is fn


# -- the guards themselves (compiled and twin) -------------------------------------------------------------

def test_a_stage_guard_without_settle_refuses_an_awaitable_after_returning_the_permit(impl, no_unawaited_warning):
    p = impl.permits.Permits(1)
    refused = []
    g = impl.guard.StageGuard(returns_coroutine, p.try_acquire, lambda: refused.append(1), p.release)
    for _ in range(2):
        with pytest.raises(TypeError, match="returns_coroutine.*call_async"):
            g()
    assert p.in_use == 0 and refused == []
    gen = impl.guard.StageGuard(stream, p.try_acquire, lambda: refused.append(1), p.release)(2, [])
    assert p.in_use == 0 and list(gen) == [0, 1]        # without settle a generator is a plain value


def test_a_stage_guard_hands_a_lazy_result_to_settle_with_the_permit_held(impl):
    p = impl.permits.Permits(1)
    seen = []

    def settle(fn, result):
        seen.append((fn, type(result).__name__, p.in_use))
        p.release()
        return "settled"

    g = impl.guard.StageGuard(stream, p.try_acquire, lambda: None, p.release, settle=settle)
    assert g(1, []) == "settled"
    assert seen == [(stream, "generator", 1)] and p.in_use == 0
    assert impl.guard.StageGuard(sync_work, p.try_acquire, lambda: None, p.release, settle=settle)() == "sync"
    assert len(seen) == 1 and p.in_use == 0
    with pytest.raises(TypeError, match="settle must be callable"):
        impl.guard.StageGuard(sync_work, p.try_acquire, lambda: None, p.release, settle=3)


def test_an_attempt_guard_refuses_an_awaitable_first_result_without_retrying(impl, no_unawaited_warning):
    import contextvars
    import itertools
    retry = buttress.Retry(max_attempts=3, backoff=0.0)
    failures = []
    counter = itertools.count()
    g = impl.guard.AttemptGuard(returns_coroutine, retry, contextvars.ContextVar("t"), counter,
                                lambda *a: failures.append(a), lambda: 0)
    with pytest.raises(TypeError, match="Retry.*returns_coroutine.*call_async"):
        g()
    assert failures == [] and next(counter) == 0        # not retried, not counted as a success
    gen = impl.guard.AttemptGuard(lambda: stream(1, []), retry, contextvars.ContextVar("t"), counter,
                                  lambda *a: None, lambda: 0)()
    assert list(gen) == [0]                             # a plain function returning a generator: a value


def test_a_hand_off_on_the_waiters_own_loop_does_not_go_through_the_self_pipe():
    """A release on the waiter's loop sets its future directly; call_soon_threadsafe (a self-pipe write per
    hand-off, the cost of 10 000 queued tasks) is only for a release from another thread or loop. Every
    waiter still gets its permit, in order, none lost."""
    bh = Bulkhead(2, max_wait=None)
    order: list[int] = []

    async def job(i: int) -> None:
        async with bh:
            order.append(i)
            await asyncio.sleep(0)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        calls = 0
        real = loop.call_soon_threadsafe

        def counting(*args, **kwargs):
            nonlocal calls
            calls += 1
            return real(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        await asyncio.gather(*(job(i) for i in range(50)))
        return calls

    assert asyncio.run(main()) == 0
    assert order == list(range(50))
    assert bh.metrics().in_use == 0 and bh.metrics().waiting == 0


def test_a_release_from_another_thread_still_wakes_an_async_waiter():
    import threading

    bh = Bulkhead(1, max_wait=None)
    assert bh.try_acquire()

    async def main() -> None:
        t = threading.Timer(0.05, bh.release)
        t.start()
        async with bh:
            pass
        t.join()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert bh.metrics().in_use == 0
