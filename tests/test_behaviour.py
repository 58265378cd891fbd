"""One behaviour for every call (DESIGN §3c), over Retry, Fallback, StaleCacheFallback, Timeout and Pipeline:
sync vs async, generators, BaseException, pickling. Timing runs on FakeClock."""
from __future__ import annotations

import asyncio
import gc
import sys
import warnings

import pytest

import buttress
from buttress import FakeClock, Fallback, Pipeline, Retry, Timeout, TimeoutExceeded
from buttress.fallback import StaleCacheFallback

NO_WAIT = 0.0


class Halt(BaseException):
    """A custom BaseException (gevent / trio style cancellation)."""


@pytest.fixture
def no_unawaited_warning():
    """Fails the test if a coroutine was left un-awaited ("coroutine ... was never awaited")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
    bad = [w for w in caught if "never awaited" in str(w.message)]
    assert not bad, bad


def counted(fn):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)

    wrapper.calls = calls
    return wrapper


async def work():
    return "done"


def returns_coroutine():
    return work()


def sync_work():
    return "sync"


def policies():
    """(name, factory) of the patterns whose sync and async forms are checked here."""
    return [
        ("Retry", lambda: Retry(max_attempts=3, backoff=NO_WAIT, clock=FakeClock())),
        ("Fallback", lambda: Fallback("fallback value")),
        ("StaleCacheFallback", lambda: StaleCacheFallback(10.0, clock=FakeClock())),
        ("Timeout", lambda: Timeout(5.0)),
        ("Pipeline", lambda: Pipeline(Retry(max_attempts=3, backoff=NO_WAIT, clock=FakeClock()), fallback="fb")),
    ]


POLICIES = [name for name, _ in policies()]


def make(name):
    return dict(policies())[name]()


# -- a sync form given an async function ---------------------------------------------------------------------

@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("fn", [work, returns_coroutine], ids=["async_def", "returns_coroutine"])
def test_a_sync_call_of_an_async_function_is_a_type_error(name, fn, no_unawaited_warning):
    p = make(name)
    with pytest.raises(TypeError) as info:
        p.call(fn)
    msg = str(info.value)
    assert fn.__name__ in msg and "call_async" in msg, msg


@pytest.mark.parametrize("name", ["Retry", "Fallback", "StaleCacheFallback", "Pipeline"])
def test_a_decorated_sync_function_returning_a_coroutine_is_refused_when_called(name, no_unawaited_warning):
    p = make(name)
    if name == "Retry":
        p = Retry(max_attempts=3, backoff=NO_WAIT, deadline=100.0, clock=FakeClock())   # the Python wrapper
    decorated = p(returns_coroutine)
    with pytest.raises(TypeError, match="returns_coroutine.*call_async"):
        decorated()


def test_a_retry_decorated_sync_function_returning_a_coroutine_is_refused(no_unawaited_warning):
    decorated = Retry(max_attempts=3, backoff=NO_WAIT)(returns_coroutine)
    with pytest.raises(TypeError, match="call_async"):
        decorated()


@pytest.mark.parametrize("name", POLICIES)
def test_call_async_of_a_sync_function_is_a_type_error_not_retried_nor_answered(name):
    p = make(name)
    fn = counted(sync_work)
    with pytest.raises(TypeError) as info:
        asyncio.run(p.call_async(fn))
    assert "sync function" in str(info.value) and ".call(" in str(info.value), info.value
    assert len(fn.calls) == 1               # was: Retry ran it three times on its own TypeError


def test_a_usage_error_is_never_retried_or_answered_even_when_retry_on_names_type_error():
    clock = FakeClock()
    fn = counted(sync_work)
    r = Retry(max_attempts=5, backoff=NO_WAIT, retry_on=(TypeError,), clock=clock)
    with pytest.raises(TypeError, match="sync function"):
        asyncio.run(r.call_async(fn))
    assert len(fn.calls) == 1
    with pytest.raises(TypeError, match="sync function"):
        asyncio.run(Fallback("x", on=lambda e: True).call_async(sync_work))


def test_a_pipeline_refuses_a_sync_call_of_an_async_function_before_any_stage_runs(no_unawaited_warning):
    cb = buttress.CircuitBreaker(name="sync-async", window_size=1, minimum_calls=1)
    with pytest.raises(TypeError, match="work.*call_async"):
        Pipeline(cb).call(work)
    assert cb.metrics().calls == 0          # no success recorded for an un-awaited coroutine
    with pytest.raises(TypeError, match="returns_coroutine.*call_async"):
        Pipeline(cb).call(returns_coroutine)


def test_a_sync_function_of_a_pipeline_still_works_and_its_result_is_returned():
    p = Pipeline(Retry(max_attempts=2, backoff=NO_WAIT), Timeout(5.0), fallback="fb")
    assert p.call(sync_work) == "sync"
    assert asyncio.run(p.call_async(work)) == "done"


# -- generators ----------------------------------------------------------------------------------------

def stream(n=3):
    for i in range(n):
        yield i


async def astream(n=3):
    for i in range(n):
        yield i


@pytest.mark.parametrize("name", ["Retry", "Fallback", "StaleCacheFallback"])
@pytest.mark.parametrize("fn", [stream, astream], ids=["generator", "async_generator"])
def test_patterns_that_cannot_replay_a_stream_refuse_it_at_decoration(name, fn):
    with pytest.raises(TypeError, match=f"{name} cannot guard {fn.__name__}, an? (async )?generator function: "
                                        "a half-consumed stream cannot be replayed"):
        make(name)(fn)


@pytest.mark.parametrize("name", ["Retry", "Fallback", "StaleCacheFallback"])
def test_patterns_that_cannot_replay_a_stream_refuse_it_when_called(name):
    started = []

    def gen():
        started.append(1)
        yield 1

    async def agen():
        started.append(1)
        yield 1

    p = make(name)
    with pytest.raises(TypeError, match=r"cannot guard \S*\bgen, a generator function"):
        p.call(gen)
    with pytest.raises(TypeError, match=r"cannot guard \S*\bagen, an async generator function"):
        p.call(agen)
    with pytest.raises(TypeError, match=r"cannot guard \S*\bagen, an async generator function"):
        asyncio.run(p.call_async(agen))
    with pytest.raises(TypeError, match=r"cannot guard \S*\bgen, a generator function"):
        asyncio.run(p.call_async(gen))
    assert started == []                    # nothing of the stream ran


def test_a_plain_function_returning_a_generator_object_is_a_value():
    gen = stream()
    assert Retry(backoff=NO_WAIT).call(lambda: gen) is gen
    assert Fallback(0).call(lambda: gen) is gen


def _slow_stream(clock, seen, step=0.4, n=5):
    def gen():
        try:
            for i in range(n):
                seen.append(("remaining", buttress.remaining()))
                clock.advance(step)
                yield i
        finally:
            seen.append("closed")
    return gen


def test_a_timeout_covers_the_whole_iteration_of_a_sync_generator():
    clock = FakeClock()
    seen = []
    guarded = Timeout(1.0, clock=clock)(_slow_stream(clock, seen))
    got = []
    with pytest.raises(TimeoutExceeded, match="timed out after 1s"):
        for item in guarded():
            got.append(item)
    # steps end at 0.4, 0.8 and 1.2: the third finished past the deadline, so its item is not handed out
    assert got == [0, 1]
    assert seen[0] == ("remaining", 1.0) and seen[1] == ("remaining", pytest.approx(0.6))
    assert seen[-1] == "closed"


def test_consumer_time_counts_against_a_sync_generator_deadline():
    clock = FakeClock()
    seen = []
    it = Timeout(1.0, clock=clock).call(_slow_stream(clock, seen, step=0.0))
    assert next(it) == 0
    clock.advance(1.0)                      # the consumer took the rest of the budget
    with pytest.raises(TimeoutExceeded):
        next(it)
    assert seen[-1] == "closed"


def test_a_sync_generator_that_finishes_in_time_returns_its_value_and_sees_no_deadline_after():
    clock = FakeClock()

    def gen():
        yield 1
        yield 2
        return "end"

    def consume():
        result = yield from Timeout(1.0, clock=clock)(gen)()
        return result

    c = consume()
    assert [next(c), next(c)] == [1, 2]
    with pytest.raises(StopIteration) as stop:
        next(c)
    assert stop.value.value == "end"
    assert buttress.remaining() is None


def test_a_timeout_covers_the_whole_iteration_of_an_async_generator():
    clock = FakeClock()
    seen = []

    @Timeout(1.0, clock=clock)
    async def agen():
        try:
            for i in range(5):
                seen.append(buttress.remaining())
                await clock.sleep_async(0.4)
                yield i
        finally:
            seen.append("closed")

    async def main():
        got = []
        with pytest.raises(TimeoutExceeded):
            async for item in agen():
                got.append(item)
        return got

    assert asyncio.run(main()) == [0, 1]    # the third sleep (0.8 -> 1.2) is cancelled at 1.0
    assert clock.monotonic() == pytest.approx(1.0)
    assert seen[0] == 1.0 and seen[-1] == "closed"


def test_timeout_call_async_of_an_async_generator_function_returns_the_guarded_stream():
    clock = FakeClock()

    async def agen():
        for i in range(3):
            await clock.sleep_async(0.4)
            yield i

    async def main():
        got = []
        with pytest.raises(TimeoutExceeded):
            async for item in await Timeout(1.0, clock=clock).call_async(agen):
                got.append(item)
        return got

    assert asyncio.run(main()) == [0, 1]


def test_a_timeout_outside_a_retry_in_a_pipeline_still_refuses_a_generator():
    with pytest.raises(TypeError, match="Retry cannot guard stream"):
        Pipeline(Timeout(1.0), Retry(backoff=NO_WAIT))(stream)


# -- BaseException is no outcome ------------------------------------------------------------------------

def _raiser(exc):
    calls = []

    def fn():
        calls.append(1)
        raise exc

    fn.calls = calls
    return fn


BASE_EXCEPTIONS = [Halt(), KeyboardInterrupt()]
if sys.version_info >= (3, 11):
    BASE_EXCEPTIONS.append(BaseExceptionGroup("mixed", [ValueError("v"), Halt()]))  # noqa: F821


@pytest.mark.parametrize("exc", BASE_EXCEPTIONS, ids=lambda e: type(e).__name__)
def test_nothing_that_is_not_an_exception_is_retried(exc):
    seen = []
    fn = _raiser(exc)
    r = Retry(max_attempts=5, backoff=NO_WAIT, retry_on=lambda e: seen.append(e) or True, clock=FakeClock())
    with pytest.raises(type(exc)):
        r.call(fn)
    assert len(fn.calls) == 1 and seen == []

    async def afn():
        fn()

    with pytest.raises(type(exc)):
        asyncio.run(r.call_async(afn))
    assert len(fn.calls) == 2 and seen == []


@pytest.mark.parametrize("exc", BASE_EXCEPTIONS, ids=lambda e: type(e).__name__)
def test_no_fallback_runs_for_what_is_not_an_exception(exc):
    answered = []
    for p in (Fallback(lambda e: answered.append(e) or "fb", on=lambda e: True),
              StaleCacheFallback(10.0, clock=FakeClock()),
              Pipeline(Retry(backoff=NO_WAIT, clock=FakeClock()), fallback=lambda e: answered.append(e))):
        if isinstance(p, StaleCacheFallback):
            p.call(lambda: "cached")
            with pytest.raises(type(exc)):
                p.call(lambda: (_ for _ in ()).throw(exc))
            continue
        with pytest.raises(type(exc)):
            p.call(_raiser(exc))
    assert answered == []


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception groups are 3.11+")
def test_an_exception_group_of_exceptions_is_an_exception_and_is_retried():
    fn = _raiser(ExceptionGroup("all ordinary", [ValueError("v")]))  # noqa: F821
    with pytest.raises(ExceptionGroup):  # noqa: F821
        Retry(max_attempts=3, backoff=NO_WAIT, clock=FakeClock()).call(fn)
    assert len(fn.calls) == 3


def test_a_timeout_passes_a_base_exception_through_unchanged():
    async def fn():
        raise Halt()

    with pytest.raises(Halt):
        asyncio.run(Timeout(1.0).call_async(fn))


# -- pickling -----------------------------------------------------------------------------------------------

import copy  # noqa: E402
import pickle  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402


@Retry(max_attempts=2, backoff=NO_WAIT)
def retried(x):
    return x * 2


@Retry(max_attempts=2, backoff=NO_WAIT, deadline=10.0)
def retried_with_deadline(x):
    return x * 2


@Fallback(0)
def with_fallback(x):
    return x * 2


@StaleCacheFallback(10.0)
def with_stale_cache(x):
    return x * 2


@Timeout(5.0)
def timed(x):
    return x * 2


@Timeout(5.0)
def timed_stream(n):
    yield from range(n)


@Pipeline(Retry(max_attempts=2, backoff=NO_WAIT), Timeout(5.0), fallback=0)
def piped(x):
    return x * 2


@Pipeline(buttress.CircuitBreaker(name="pickled-pipe"), buttress.TokenBucket(rate=1e6, capacity=1000))
def piped_through_foreign_stages(x):
    return x * 2


@buttress.Bulkhead(max_concurrent=4)
def bulkheaded(x):
    return x * 2


@buttress.CircuitBreaker(name="pickled")
def broken(x):
    return x * 2


@buttress.TokenBucket(rate=1e6, capacity=1000)
def limited(x):
    return x * 2


@Retry(max_attempts=2, backoff=NO_WAIT)
async def retried_async(x):
    return x * 2


PICKLABLE = [retried, retried_with_deadline, with_fallback, with_stale_cache, timed, timed_stream, piped,
             piped_through_foreign_stages, bulkheaded, retried_async]


@pytest.mark.parametrize("fn", PICKLABLE, ids=lambda f: f.__name__)
def test_a_decorated_module_level_function_pickles_by_reference(fn):
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(fn, protocol)
        assert fn.__name__.encode() in data and len(data) < 200      # a reference, not the object's state
        assert pickle.loads(data) is fn
    assert copy.copy(fn) is fn and copy.deepcopy(fn) is fn


@pytest.mark.parametrize("fn", [
    broken,
    pytest.param(limited),
], ids=["CircuitBreaker", "TokenBucket"])
def test_functions_decorated_by_the_other_patterns_pickle_by_reference(fn):
    assert pickle.loads(pickle.dumps(fn)) is fn


def test_process_pool_map_runs_decorated_functions():
    with ProcessPoolExecutor(max_workers=1) as pool:
        assert list(pool.map(retried, [1, 2, 3])) == [2, 4, 6]
        assert list(pool.map(piped, [1, 2])) == [2, 4]
        assert list(pool.map(with_fallback, [5])) == [10]


def test_a_function_decorated_inside_a_function_still_fails_like_a_plain_one():
    @Retry(max_attempts=2, backoff=NO_WAIT)
    def local(x):
        return x

    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(local)


@pytest.mark.parametrize("make", [
    lambda: Retry(), lambda: Fallback(1), lambda: StaleCacheFallback(1.0), lambda: Timeout(1.0),
    lambda: Pipeline(Retry()), lambda: buttress.RetryBudget(), lambda: buttress.CircuitBreaker(name="nocopy"),
    lambda: buttress.Bulkhead(max_concurrent=1), lambda: buttress.TokenBucket(rate=1.0),
    lambda: buttress.LoadShedder(max_in_flight=2),
], ids=["Retry", "Fallback", "StaleCacheFallback", "Timeout", "Pipeline", "RetryBudget", "CircuitBreaker",
        "Bulkhead", "TokenBucket", "LoadShedder"])
def test_pattern_objects_refuse_pickling_and_copying(make):
    obj = make()
    cls = type(obj).__name__
    for action in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match=f"^{cls} objects cannot be pickled or copied: .*store="):
            action(obj)
