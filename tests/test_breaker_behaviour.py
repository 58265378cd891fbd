"""Issue 13 for the circuit breaker (DESIGN §3c): own rejections, BaseException, sync vs async, generators,
current state reads, the half-open minimum, manual moves, listeners and pickling. Each case failed on the
old code. Facade tests run on the active implementation (the suite runs once per implementation); core
tests run on both through the `impl` fixture. Timing runs on FakeClock."""
import asyncio
import copy
import gc
import pickle
import sys
import warnings
from fractions import Fraction

import pytest

import buttress
from buttress import (Bulkhead, BulkheadFullError, CircuitBreaker, CircuitOpenError, FakeClock, Overloaded, Pipeline,
                      RateLimitExceeded, State, TokenBucket)
from buttress._spec import UsageError

S = 1_000_000_000


class Boom(Exception):
    pass


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


KIND = "rate"


@pytest.fixture(params=["rate", "classic"])
def kind(request):
    """A test that applies to both breakers runs on each (make() builds the classic breaker with
    failure_threshold = the rate breaker's effective minimum, success_threshold = half_open_calls)."""
    global KIND
    KIND = request.param
    yield request.param
    KIND = "rate"


def make(clock=None, **kw):
    kw.setdefault("window_size", 1)
    kw.setdefault("minimum_calls", 1)
    kw.setdefault("open_duration", 1.0)
    kw.setdefault("half_open_calls", 1)
    if KIND == "classic":
        kw["failure_threshold"] = min(kw.pop("minimum_calls"), kw.pop("window_size"))
        kw["success_threshold"] = kw["half_open_calls"]
    return CircuitBreaker(name="b", clock=clock or FakeClock(), **kw)


def raiser(exc):
    def fn():
        raise exc
    return fn


def half_open(cb, clock):
    """Trip a window-1 breaker and move it to HALF_OPEN."""
    with pytest.raises(Boom):
        cb.call(raiser(Boom()))
    assert cb.state is State.OPEN
    clock.advance(cb.conf.open_ns / S)
    assert cb.state is State.HALF_OPEN


def events(cb):
    seen = []
    cb.on("*", lambda e: seen.append(e.kind))
    return seen


# -- 1. own rejections are never failures ------------------------------------------------------------------

def test_the_recommended_pipeline_does_not_open_on_its_own_rate_limit(kind):
    clock = FakeClock()
    cb = make(clock, window_size=10, minimum_calls=5)
    # every stage on the one clock: a Bulkhead() on the system clock beside FakeClock stages is a mixed
    # Pipeline (DESIGN §3c), a ValueError
    pipe = Pipeline(cb, Bulkhead(max_concurrent=1, clock=clock), TokenBucket(rate=1.0, capacity=1, clock=clock))
    outcomes = []
    for _ in range(6):
        try:
            outcomes.append(pipe.call(lambda: "ok"))
        except RateLimitExceeded:
            outcomes.append("limited")
    assert outcomes == ["ok"] + ["limited"] * 5
    assert cb.state is State.CLOSED
    assert cb.metrics().failures == 0


def test_a_breaker_on_the_default_clock_is_on_the_system_clock_in_a_pipeline():
    from buttress.clock import SystemClock
    from buttress.testing import set_testing
    Pipeline(CircuitBreaker(), Bulkhead(max_concurrent=1, clock=SystemClock()))
    Pipeline(CircuitBreaker(clock=SystemClock()), Bulkhead(max_concurrent=1))
    with pytest.raises(ValueError, match="Pipeline: strategies must share one clock"):
        Pipeline(CircuitBreaker(clock=FakeClock()), Bulkhead(max_concurrent=1))
    with set_testing():
        Pipeline(CircuitBreaker(), Bulkhead(max_concurrent=1))      # both the testing clock
        with pytest.raises(ValueError, match="Pipeline: strategies must share one clock"):
            Pipeline(CircuitBreaker(clock=SystemClock()), Bulkhead(max_concurrent=1))


REJECTIONS = [RateLimitExceeded(retry_after=1.0), BulkheadFullError(), Overloaded(),
              CircuitOpenError("inner", State.OPEN, 1.0)]


@pytest.mark.parametrize("exc", REJECTIONS, ids=lambda e: type(e).__name__)
def test_an_inner_rejection_is_ignored_and_returns_the_half_open_permit(kind, exc):
    clock = FakeClock()
    cb = make(clock)
    half_open(cb, clock)
    seen = events(cb)
    with pytest.raises(type(exc)):
        cb.call(raiser(exc))
    assert cb.state is State.HALF_OPEN and cb.load()[2] == 0        # the permit came back
    assert seen == ["ignored"]
    assert cb.call(lambda: 1) == 1 and cb.state is State.CLOSED


@pytest.mark.parametrize("form", ["call", "permit", "with"])
def test_a_rejection_is_no_failure_in_every_form(kind, form):
    cb = make()
    exc = RateLimitExceeded(retry_after=0.5)
    if form == "call":
        with pytest.raises(RateLimitExceeded):
            cb.call(raiser(exc))
    elif form == "permit":
        cb.try_acquire().failure(exc)
    else:
        with pytest.raises(RateLimitExceeded):
            with cb:
                raise exc
    assert cb.state is State.CLOSED and cb.metrics().calls == 0


def test_a_rejection_counts_when_record_names_its_class(kind):
    cb = make(record=(Boom, RateLimitExceeded))
    with pytest.raises(RateLimitExceeded):
        cb.call(raiser(RateLimitExceeded()))
    assert cb.state is State.OPEN
    cb2 = make(record=(buttress.errors.Rejected,))
    with pytest.raises(BulkheadFullError):
        cb2.call(raiser(BulkheadFullError()))
    assert cb2.state is State.OPEN


def test_record_exception_or_a_predicate_does_not_name_rejections(kind):
    seen = []
    for record in ((Exception,), lambda exc: seen.append(exc) or True):
        cb = make(record=record)
        with pytest.raises(Overloaded):
            cb.call(raiser(Overloaded()))
        assert cb.state is State.CLOSED
    assert seen == []                               # a predicate never even sees one


def test_ignore_still_wins_over_a_record_that_names_a_rejection(kind):
    cb = make(record=(RateLimitExceeded,), ignore=(RateLimitExceeded,))
    with pytest.raises(RateLimitExceeded):
        cb.call(raiser(RateLimitExceeded()))
    assert cb.state is State.CLOSED and cb.metrics().calls == 0


def test_a_usage_error_is_no_outcome(kind):
    clock = FakeClock()
    cb = make(clock, record=(Boom, TypeError))
    half_open(cb, clock)
    seen = events(cb)
    with pytest.raises(UsageError):
        cb.call(raiser(UsageError("wrong use")))
    assert cb.state is State.HALF_OPEN and cb.load()[2] == 0 and seen == []


def test_core_classification(impl):
    core = impl.breaker.BreakerCore(name="c")
    b = impl.breaker
    assert core.classify(RateLimitExceeded()) == b.IGNORED
    assert core.classify(UsageError("x")) == b.CANCELLED
    assert core.classify(Halt()) == b.CANCELLED
    assert core.classify(BaseExceptionGroup("g", [Halt(), Boom()])) == b.CANCELLED
    assert core.classify(ExceptionGroup("g", [Boom()])) == b.FAILURE
    assert core.classify(ExceptionGroup("g", [RateLimitExceeded()])) == b.FAILURE   # a group is not a rejection
    assert impl.breaker.BreakerCore(name="c", record=(RateLimitExceeded,)).classify(RateLimitExceeded()) == b.FAILURE


# -- 2. BaseException is no outcome ------------------------------------------------------------------------

@pytest.mark.parametrize("exc", [Halt(), BaseExceptionGroup("g", [Halt()]), BaseExceptionGroup("g", [Halt(), Boom()]),
                                 GeneratorExit(), KeyboardInterrupt()],
                         ids=["custom", "group", "mixed-group", "GeneratorExit", "KeyboardInterrupt"])
def test_a_half_open_probe_raising_a_base_exception_neither_closes_nor_opens(kind, exc):
    clock = FakeClock()
    cb = make(clock)
    half_open(cb, clock)
    with pytest.raises(type(exc)):
        cb.call(raiser(exc))
    assert cb.state is State.HALF_OPEN and cb.load()[2] == 0
    assert cb.metrics().calls == 0


def test_a_closed_breaker_counts_no_base_exception_as_success(kind):
    cb = make(window_size=2, minimum_calls=2)
    with pytest.raises(Boom):
        cb.call(raiser(Boom()))
    with pytest.raises(Halt):
        cb.call(raiser(Halt()))
    assert cb.metrics().calls == 1
    with pytest.raises(Boom):
        cb.call(raiser(Boom()))
    assert cb.state is State.OPEN


@pytest.mark.parametrize("param", ["record", "ignore"])
@pytest.mark.parametrize("spec", [Halt, (Boom, KeyboardInterrupt), [SystemExit]])
def test_naming_what_is_not_an_exception_is_a_value_error(param, spec):
    with pytest.raises(ValueError, match=f"^{param} must name Exception subclasses"):
        CircuitBreaker(name="v", **{param: spec})


async def _async_pred(x):
    return True


@pytest.mark.parametrize("kw, match", [
    (dict(record_result=lambda: True), "record_result must accept 1 positional argument"),
    (dict(record_result=lambda a, b: True), "record_result must accept 1 positional argument"),
    (dict(record_result=_async_pred), "record_result must be a plain function"),
    (dict(open_duration=lambda: 5.0), "open_duration must accept 1 positional argument"),
    (dict(open_duration=_async_pred), "open_duration must be a plain function"),
    (dict(record=lambda: True), "record must accept 1 positional argument"),
    (dict(ignore=_async_pred), "ignore must be a plain function"),
])
def test_callables_are_checked_for_kind_and_arity_at_construction(kw, match):
    with pytest.raises(TypeError, match=match):
        CircuitBreaker(name="v", **kw)


@pytest.mark.parametrize("bad", [True, float("nan"), 1e300, -1.0, "5", None])
def test_an_open_duration_callable_returning_no_seconds_uses_60s(kind, bad, caplog):
    clock = FakeClock()
    cb = make(clock, open_duration=lambda attempt: bad)
    with pytest.raises(Boom):
        cb.call(raiser(Boom()))
    assert cb.state is State.OPEN
    with pytest.raises(CircuitOpenError) as info:
        cb.call(lambda: 1)
    assert info.value.retry_after == 60.0               # True used to read as 1 s, "5" as 5 s
    assert "open_duration callable failed" in caplog.text


@pytest.mark.parametrize("value, seconds", [(Fraction(1, 2), 0.5), (2, 2.0)])
def test_an_open_duration_callable_may_return_any_real_number(value, seconds):
    clock = FakeClock()
    cb = make(clock, open_duration=lambda attempt: value)
    with pytest.raises(Boom):
        cb.call(raiser(Boom()))
    with pytest.raises(CircuitOpenError) as info:
        cb.call(lambda: 1)
    assert info.value.retry_after == seconds


# -- 3. sync vs async --------------------------------------------------------------------------------------

async def work():
    return "done"


def returns_coroutine():
    return work()


class Awaitable:
    def __await__(self):
        return iter(())


def returns_awaitable():
    return Awaitable()


@pytest.mark.parametrize("fn", [work, returns_coroutine, returns_awaitable])
@pytest.mark.parametrize("form", ["call", "guard", "decorated"])
def test_a_sync_form_refuses_an_awaitable_and_returns_the_permit(kind, fn, form, no_unawaited_warning):
    clock = FakeClock()
    cb = make(clock)
    half_open(cb, clock)
    seen = events(cb)
    run = {"call": lambda: cb.call(fn), "guard": lambda: cb.guard(fn)(),
           "decorated": lambda: cb(fn)() if fn is not work else cb.guard(fn)()}[form]
    with pytest.raises(TypeError) as info:
        run()
    msg = str(info.value)
    assert fn.__name__ in msg and "call_async" in msg, msg
    assert isinstance(info.value, UsageError)
    assert cb.state is State.HALF_OPEN and cb.load()[2] == 0 and seen == []


def test_call_async_refuses_a_sync_function_and_records_nothing(kind):
    clock = FakeClock()
    cb = make(clock)
    half_open(cb, clock)
    seen = events(cb)
    with pytest.raises(TypeError, match=r"call_async: .*<lambda> is a sync function.*call\(fn"):
        asyncio.run(cb.call_async(lambda: 5))
    assert cb.state is State.HALF_OPEN and cb.load()[2] == 0 and seen == []


def test_call_async_refuses_a_sync_generator_function():
    def gen():
        yield 1

    cb = make()
    with pytest.raises(TypeError, match="call_async: .*gen is a generator function, not async"):
        asyncio.run(cb.call_async(gen))
    assert cb.metrics().calls == 0


def test_an_async_decorated_function_returning_no_awaitable_is_refused():
    class AsyncLooking:
        async def __call__(self):        # detected as async ...
            return 1

    obj = AsyncLooking()
    cb = make()
    decorated = cb(obj)
    obj.__class__ = type("Sync", (), {"__call__": lambda self: 7})   # ... but returns a plain value now
    with pytest.raises(TypeError, match="is a sync function"):
        asyncio.run(decorated())
    assert cb.metrics().calls == 0


def test_a_value_with_an_async_slot_that_is_not_awaitable_is_a_value():
    class AsyncIterable:
        def __aiter__(self):
            return self

    value = AsyncIterable()
    cb = make()
    assert cb.call(lambda: value) is value and cb(lambda: value)() is value
    assert cb.metrics().calls == 1


def test_async_forms_still_work_and_record():
    cb = make(window_size=2, minimum_calls=2)

    @cb
    async def ok():
        return 3

    async def main():
        assert await ok() == 3
        assert await cb.call_async(work) == "done"
    asyncio.run(main())
    assert cb.metrics().calls == 2


# -- 4. generators: the permit is held over the whole iteration ---------------------------------------------

def stream(n, fail_at=None):
    for i in range(n):
        if i == fail_at:
            raise Boom(f"item {i}")
        yield i


@pytest.mark.parametrize("form", ["decorated", "call"])
def test_a_failure_during_iteration_is_the_outcome(kind, form):
    clock = FakeClock()
    cb = make(clock)
    half_open(cb, clock)
    g = cb(stream)(3, fail_at=1) if form == "decorated" else cb.call(stream, 3, fail_at=1)
    assert cb.load()[2] == 1                            # the permit is held by the stream
    assert next(g) == 0
    assert cb.state is State.HALF_OPEN                  # not judged before the stream ends
    with pytest.raises(Boom):
        next(g)
    assert cb.state is State.OPEN


def test_a_stream_that_finishes_is_a_success(kind):
    clock = FakeClock()
    cb = make(clock)
    half_open(cb, clock)
    assert list(cb(stream)(3)) == [0, 1, 2]
    assert cb.state is State.CLOSED


def test_closing_a_stream_is_no_outcome(kind):
    clock = FakeClock()
    cb = make(clock)
    half_open(cb, clock)
    seen = events(cb)
    g = cb(stream)(3)
    assert next(g) == 0
    g.close()
    assert cb.state is State.HALF_OPEN and cb.load()[2] == 0 and seen == []


def test_a_stream_dropped_before_its_first_item_returns_the_permit(kind):
    clock = FakeClock()
    cb = make(clock)
    half_open(cb, clock)
    g = cb(stream)(3)
    assert cb.load()[2] == 1
    del g
    gc.collect()
    assert cb.load()[2] == 0 and cb.state is State.HALF_OPEN


def test_a_stream_passes_send_and_throw_and_its_return_value_through():
    def echo():
        got = yield "ready"
        while got != "stop":
            try:
                got = yield got * 2
            except KeyError:
                got = yield "caught"
        return "finished"

    cb = make(window_size=5, minimum_calls=5)
    g = cb(echo)()
    assert next(g) == "ready" and g.send(4) == 8 and g.throw(KeyError()) == "caught"
    with pytest.raises(StopIteration) as info:
        g.send("stop")
    assert info.value.value == "finished" and cb.metrics().calls == 1


def test_record_result_is_not_applied_to_a_stream(kind):
    cb = make(record_result=lambda r: r.status >= 500)      # would raise on a generator or on None
    assert list(cb(stream)(2)) == [0, 1]
    assert cb.state is State.CLOSED and cb.metrics().failures == 0


async def astream(n, fail_at=None):
    for i in range(n):
        if i == fail_at:
            raise Boom(f"item {i}")
        yield i


@pytest.mark.parametrize("form", ["decorated", "call", "call_async"])
def test_an_async_stream_failure_during_iteration_is_the_outcome(kind, form):
    clock = FakeClock()
    cb = make(clock)
    half_open(cb, clock)

    async def main():
        if form == "decorated":
            agen = cb(astream)(3, fail_at=1)
        elif form == "call":
            agen = cb.call(astream, 3, fail_at=1)
        else:
            agen = await cb.call_async(astream, 3, fail_at=1)
        assert cb.load()[2] == 1
        assert await agen.__anext__() == 0
        assert cb.state is State.HALF_OPEN
        with pytest.raises(Boom):
            await agen.__anext__()
    asyncio.run(main())
    assert cb.state is State.OPEN


def test_an_async_stream_finishing_is_a_success_and_aclose_is_no_outcome():
    clock = FakeClock()
    cb = make(clock, half_open_calls=2)
    half_open(cb, clock)

    async def main():
        agen = cb(astream)(3)
        assert await agen.__anext__() == 0
        await agen.aclose()
        assert cb.state is State.HALF_OPEN and cb.load()[2] == 0
        assert [x async for x in cb(astream)(2)] == [0, 1]
    asyncio.run(main())
    assert cb.state is State.CLOSED


def test_a_decorated_generator_function_is_still_a_generator_function_wrapper():
    cb = make()
    g = cb(stream)(2)
    assert type(g).__name__ == "generator" and list(g) == [0, 1]
    assert cb(stream).__wrapped__ is stream and cb(stream).__name__ == "stream"


# -- 5. state reads are current -----------------------------------------------------------------------------

def test_an_idle_open_breaker_reads_half_open_and_readiness_is_up(kind):
    from buttress.health import HealthRegistry
    clock = FakeClock()
    cb = make(clock, open_duration=5)
    health = HealthRegistry(clock=clock)
    health.add_breaker(cb, when_open="down")
    with pytest.raises(Boom):
        cb.call(raiser(Boom()))
    assert health.check_sync("readiness").status == "down"
    clock.advance(1000)
    assert cb.state is State.HALF_OPEN
    report = health.check_sync("readiness")
    assert report.status == "up", report


@pytest.mark.parametrize("read", ["state", "metrics"])
def test_the_read_enters_half_open_at_its_instant(kind, read):
    clock = FakeClock()
    cb = make(clock, open_duration=5.0, half_open_max_wait=10.0)
    seen = []
    cb.on("state_change", lambda e: seen.append((e.old, e.new)))
    with pytest.raises(Boom):
        cb.call(raiser(Boom()))
    clock.advance(100)
    assert (cb.state if read == "state" else cb.metrics().state) is State.HALF_OPEN
    assert seen[-1] == (State.OPEN, State.HALF_OPEN)
    clock.advance(9.9)                      # half_open_max_wait counts from the read, not from t=5
    assert cb.state is State.HALF_OPEN
    clock.advance(0.1)
    assert cb.state is State.OPEN and cb.attempt == 2


def test_core_state_now_moves_open_to_half_open(impl):
    core = impl.breaker.BreakerCore(name="c", window_size=1, minimum_calls=1, open_duration=5.0)
    token = core.acquire(0)
    core.record(token, impl.breaker.FAILURE, 0, 0)
    assert core.state_now(4 * S) == 1
    assert core.state_now(5 * S) == 2
    assert core.load()[1] == 2


# -- 6. half-open minimum, manual moves ---------------------------------------------------------------------

def test_the_half_open_minimum_is_not_clamped_by_window_size():
    clock = FakeClock()
    cb = CircuitBreaker(name="m", window="count", window_size=1, minimum_calls=5, half_open_calls=3,
                        open_duration=1.0, clock=clock)
    with pytest.raises(Boom):
        cb.call(raiser(Boom()))
    assert cb.state is State.OPEN
    clock.advance(1)
    cb.call(lambda: 1)
    assert cb.state is State.HALF_OPEN                  # one probe is no verdict
    cb.call(lambda: 1)
    assert cb.state is State.HALF_OPEN
    cb.call(lambda: 1)
    assert cb.state is State.CLOSED


@pytest.mark.parametrize("move, state", [("force_open", State.FORCED_OPEN), ("disable", State.DISABLED),
                                         ("metrics_only", State.METRICS_ONLY), ("reset", State.CLOSED),
                                         ("close", State.CLOSED)])
def test_a_manual_move_into_the_current_state_starts_a_new_generation_without_an_event(kind, move, state):
    cb = make()
    getattr(cb, move)()
    seen = events(cb)
    gen = cb.load()[1]
    getattr(cb, move)()
    assert cb.state is state and cb.load()[1] == gen + 1
    assert "state_change" not in seen


@pytest.mark.parametrize("move", ["metrics_only", "reset"])
def test_metrics_only_and_reset_start_a_fresh_window_and_drop_older_results(kind, move):
    cb = make(window_size=10, minimum_calls=10)
    getattr(cb, move)()
    old = cb.try_acquire()
    for _ in range(3):
        with pytest.raises(Boom):
            cb.call(raiser(Boom()))
    assert cb.metrics().failures == 3
    getattr(cb, move)()
    assert cb.metrics().calls == 0
    old.failure(Boom())                                  # a permit of the older generation
    assert cb.metrics().calls == 0


def test_forced_open_and_disabled_keep_their_window_for_metrics(kind):
    cb = make(window_size=10, minimum_calls=10)
    for _ in range(2):
        with pytest.raises(Boom):
            cb.call(raiser(Boom()))
    cb.force_open()
    cb.force_open()
    assert cb.metrics().failures == 2
    cb.disable()
    cb.disable()
    assert cb.metrics().failures == 2


def test_core_restart_refuses_automatic_states(impl):
    core = impl.breaker.BreakerCore(name="c")
    for state in (1, 2):
        with pytest.raises(ValueError, match=r"^restart\(\) enters a manual state"):
            core.restart(state)


# -- 7. listeners, pickling ---------------------------------------------------------------------------------

async def async_listener(event):
    pass


@pytest.mark.parametrize("callback, match", [(async_listener, "callback must be a plain function"),
                                             (lambda: None, "callback must accept 1 positional argument"),
                                             (3, "callback must be callable")])
def test_listeners_are_checked(callback, match):
    with pytest.raises(TypeError, match=match):
        make().on("state_change", callback)


@CircuitBreaker(name="pickled-sync")
def pickled_sync(x):
    return x + 1


@CircuitBreaker(name="pickled-async")
async def pickled_async(x):
    return x + 1


@CircuitBreaker(name="pickled-gen")
def pickled_gen(n):
    yield from range(n)


@pytest.mark.parametrize("fn", [pickled_sync, pickled_async, pickled_gen], ids=lambda f: f.__name__)
def test_decorated_functions_pickle_and_copy_by_reference(fn):
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(fn, protocol)
        assert len(data) < 200 and pickle.loads(data) is fn
    assert copy.copy(fn) is fn and copy.deepcopy(fn) is fn
    assert pickled_sync(1) == 2


def test_the_breaker_and_its_permits_refuse_pickling():
    cb = make()
    for action in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="^CircuitBreaker objects cannot be pickled or copied"):
            action(cb)
    with pytest.raises(TypeError):
        pickle.dumps(cb.try_acquire())


# -- the time window: a field a record left behind is not read after the clock went back --------------------

def test_time_window_reads_a_bucket_as_one_epoch(impl):
    w = impl.window.TimeWindow(1, 1000)
    w.record(False, True, now=0)            # epoch 0: a slow call
    w.record(False, False, now=1000)        # epoch 1: the same bucket, calls word reset, slow word untouched
    assert w.snapshot(now=999) == (0, 0, 0, 0)
    assert w.snapshot(now=1000) == (1, 0, 0, 0)
