"""Circuit breaker semantics (DESIGN §3, §3b), each scenario on FakeClock."""
import asyncio
import inspect
import logging
import threading

import pytest

import buttress
from buttress import CircuitBreaker, CircuitOpenError, FakeClock, State
from helpers import race


class Boom(Exception):
    pass


def ok():
    return "ok"


def boom():
    raise Boom("boom")


KIND = "rate"


@pytest.fixture(params=["rate", "classic"])
def kind(request):
    """Runs a test that applies to both breakers on each: make() builds the classic breaker with
    failure_threshold = the rate breaker's effective minimum and success_threshold = half_open_calls."""
    global KIND
    KIND = request.param
    yield request.param
    KIND = "rate"


def make(clock=None, **kw):
    kw.setdefault("window_size", 10)
    kw.setdefault("minimum_calls", 10)
    kw.setdefault("open_duration", 10.0)
    kw.setdefault("half_open_calls", 3)
    if KIND == "classic":
        kw["failure_threshold"] = min(kw.pop("minimum_calls"), kw.pop("window_size"))
        kw["success_threshold"] = kw["half_open_calls"]
        kw.pop("failure_rate_threshold", None)
    return CircuitBreaker(name="dep", clock=clock or FakeClock(), **kw)


def fail(cb, n=1):
    for _ in range(n):
        with pytest.raises(Boom):
            cb.call(boom)


def succeed(cb, n=1):
    for _ in range(n):
        assert cb.call(ok) == "ok"


def trip(cb):
    fail(cb, cb.conf.failure_threshold or cb.conf.minimum_calls)
    assert cb.state is State.OPEN


# -- closed state and windows ----------------------------------------------------------------------------

def test_below_minimum_nothing_trips_even_at_100_percent():
    cb = make(minimum_calls=5, window_size=10)
    fail(cb, 4)
    assert cb.state is State.CLOSED
    m = cb.metrics()
    assert (m.calls, m.failures, m.failure_rate, m.slow_call_rate) == (4, 4, -1.0, -1.0)
    fail(cb)
    assert cb.state is State.OPEN


def test_count_window_minimum_is_capped_by_window_size():
    cb = make(minimum_calls=100, window_size=4)
    fail(cb, 4)
    assert cb.state is State.OPEN


def test_threshold_is_inclusive():
    cb = make(failure_rate_threshold=0.5)
    succeed(cb, 5)
    fail(cb, 4)
    assert cb.state is State.CLOSED
    fail(cb)                        # 5 of 10 = 0.5 -> open
    assert cb.state is State.OPEN


def test_just_below_threshold_stays_closed():
    cb = make(failure_rate_threshold=0.5)
    succeed(cb, 6)
    fail(cb, 4)
    assert cb.state is State.CLOSED and cb.metrics().failure_rate == 0.4


def test_minimum_reached_by_a_success_still_decides():
    cb = make(minimum_calls=5, window_size=10, failure_rate_threshold=0.5)
    fail(cb, 4)
    succeed(cb)                     # 4 of 5 failed once the minimum is reached
    assert cb.state is State.OPEN


def test_count_window_is_the_last_n_calls():
    cb = make(window_size=4, minimum_calls=4, failure_rate_threshold=0.75)
    fail(cb, 2)
    succeed(cb, 4)                  # the failures slide out
    fail(cb, 2)
    assert cb.state is State.CLOSED and cb.metrics().failures == 2
    fail(cb)
    assert cb.state is State.OPEN


def test_time_window_counts_the_last_n_clock_seconds():
    clock = FakeClock(start=100.5)
    cb = make(clock, window="time", window_size=3, minimum_calls=4)
    fail(cb, 3)                     # bucket 100
    clock.advance(2.5)              # now 103.0: bucket 100 has left the window 101..103
    assert cb.metrics().calls == 0
    succeed(cb, 1)
    fail(cb, 2)
    assert cb.state is State.CLOSED
    clock.advance(0.99)
    fail(cb)                        # 3 of 4 in buckets 101..103
    assert cb.state is State.OPEN


def test_time_window_buckets_are_aligned_to_clock_seconds():
    clock = FakeClock(start=0.9)
    cb = make(clock, window="time", window_size=1, minimum_calls=3)
    fail(cb, 2)                     # second 0
    clock.advance(0.1)              # second 1: a new window of one bucket
    fail(cb)
    assert cb.state is State.CLOSED and cb.metrics().calls == 1


def test_slow_is_strictly_longer_than_slow_call_duration():
    clock = FakeClock()
    cb = make(clock, slow_call_duration=1.0, slow_call_rate_threshold=0.5, minimum_calls=2, window_size=2)

    def takes(s):
        clock.advance(s)
        return s

    cb.call(takes, 1.0)
    cb.call(takes, 1.0)
    assert cb.metrics().slow_calls == 0 and cb.state is State.CLOSED
    cb.call(takes, 1.000001)
    assert cb.metrics().slow_calls == 1 and cb.metrics().slow_call_rate == 0.5
    assert cb.state is State.OPEN


def test_slow_call_timing_can_be_switched_off():
    clock = FakeClock()
    cb = make(clock, slow_call_duration=None, slow_call_rate_threshold=0.1, minimum_calls=1, window_size=1)
    cb.call(lambda: clock.advance(1e6))
    assert cb.state is State.CLOSED and cb.metrics().slow_calls == 0


# -- open and half-open -------------------------------------------------------------------------------

def test_open_refuses_until_open_duration_then_half_open(kind):
    clock = FakeClock()
    cb = make(clock, open_duration=10.0)
    trip(cb)
    clock.advance(4)
    with pytest.raises(CircuitOpenError) as info:
        cb.call(ok)
    e = info.value
    assert (e.name, e.state, e.retry_after) == ("dep", State.OPEN, 6.0)
    assert isinstance(e, buttress.ButtressError)
    clock.advance(5.999999999)
    with pytest.raises(CircuitOpenError):
        cb.call(ok)
    clock.advance(1e-9)             # exactly open_duration: admitted, HALF_OPEN
    succeed(cb)
    assert cb.state is State.HALF_OPEN
    assert cb.metrics().not_permitted == 2


def test_half_open_admits_exactly_half_open_calls(kind):
    clock = FakeClock()
    cb = make(clock, half_open_calls=3)
    trip(cb)
    clock.advance(10)
    permits = [cb.try_acquire() for _ in range(5)]
    assert [p is not None for p in permits] == [True, True, True, False, False]
    with pytest.raises(CircuitOpenError) as info:
        cb.call(ok)
    assert info.value.state is State.HALF_OPEN and info.value.retry_after is None


def test_half_open_verdict_closes_on_success_with_an_empty_window():
    clock = FakeClock()
    cb = make(clock, half_open_calls=3, failure_rate_threshold=0.5)
    trip(cb)
    clock.advance(10)
    succeed(cb, 2)
    fail(cb)                        # 1 of 3 < 0.5
    assert cb.state is State.CLOSED
    m = cb.metrics()
    assert (m.calls, m.failures) == (0, 0)


def test_half_open_verdict_reopens_with_the_next_attempt():
    clock = FakeClock()
    seen = []

    def backoff(attempt):
        seen.append(attempt)
        return 10.0 * attempt

    cb = make(clock, open_duration=backoff, half_open_calls=2)
    trip(cb)
    clock.advance(10)
    fail(cb)
    succeed(cb)                     # 1 of 2 = 0.5 >= 0.5 -> OPEN, attempt 2: 20 s
    assert cb.state is State.OPEN and cb.attempt == 2
    clock.advance(19.9)
    assert cb.try_acquire() is None
    clock.advance(0.1)
    succeed(cb, 2)
    assert cb.state is State.CLOSED and cb.attempt == 0
    trip(cb)                        # attempt starts at 1 again
    assert seen == [1, 2, 1]


def test_half_open_minimum_is_min_of_minimum_calls_and_half_open_calls():
    clock = FakeClock()
    cb = make(clock, minimum_calls=2, window_size=2, half_open_calls=5)
    trip(cb)
    clock.advance(10)
    succeed(cb, 2)
    assert cb.state is State.CLOSED


def test_results_after_the_verdict_are_stale():
    clock = FakeClock()
    cb = make(clock, half_open_calls=3, minimum_calls=2, window_size=2)
    trip(cb)
    clock.advance(10)
    late = cb.try_acquire()
    succeed(cb, 2)                  # verdict at 2 results: CLOSED
    assert cb.state is State.CLOSED
    late.failure(Boom())
    assert cb.metrics().calls == 0


def test_ignored_exception_returns_its_half_open_permit(kind):
    clock = FakeClock()
    cb = make(clock, half_open_calls=1, ignore=(KeyError,))
    trip(cb)
    clock.advance(10)
    with pytest.raises(KeyError):
        cb.call(lambda: {}["x"])
    assert cb.state is State.HALF_OPEN
    succeed(cb)                     # the permit was issued again
    assert cb.state is State.CLOSED


@pytest.mark.parametrize("exc", [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(1), GeneratorExit()])
def test_cancellation_and_exit_are_neither_success_nor_failure(kind, exc):
    clock = FakeClock()
    cb = make(clock, half_open_calls=1)

    def raiser():
        raise exc

    with pytest.raises(type(exc)):
        cb.call(raiser)
    assert cb.metrics().calls == 0
    trip(cb)
    clock.advance(10)
    with pytest.raises(type(exc)):
        cb.call(raiser)
    assert cb.load()[2] == 0        # permit returned
    succeed(cb)
    assert cb.state is State.CLOSED


def test_half_open_max_wait_reopens_on_the_next_state_read(kind):
    clock = FakeClock()
    cb = make(clock, half_open_calls=2, half_open_max_wait=5.0, open_duration=lambda a: 10.0 * a)
    trip(cb)
    clock.advance(10)
    p = cb.try_acquire()
    assert cb.state is State.HALF_OPEN
    clock.advance(4.999)
    assert cb.state is State.HALF_OPEN
    clock.advance(0.001)
    assert cb.state is State.OPEN and cb.attempt == 2
    p.success()                     # stale
    assert cb.state is State.OPEN
    with pytest.raises(CircuitOpenError) as info:
        cb.call(ok)
    assert info.value.retry_after == 20.0


def test_half_open_max_wait_is_checked_on_the_next_call(kind):
    clock = FakeClock()
    cb = make(clock, half_open_calls=1, half_open_max_wait=1.0)
    trip(cb)
    clock.advance(10)
    cb.try_acquire()
    clock.advance(1)
    with pytest.raises(CircuitOpenError) as info:
        cb.call(ok)
    assert info.value.state is State.OPEN


# -- generations and manual states -------------------------------------------------------------------

def test_results_from_an_older_generation_never_move_the_breaker(kind):
    cb = make(minimum_calls=1, window_size=1)
    old = [cb.try_acquire() for _ in range(3)]
    cb.force_open()
    cb.reset()
    for p in old:
        p.failure(Boom())
    assert cb.state is State.CLOSED and cb.metrics().calls == 0


def test_forced_open_refuses_everything(kind):
    clock = FakeClock()
    cb = make(clock)
    cb.force_open()
    clock.advance(1000)
    with pytest.raises(CircuitOpenError) as info:
        cb.call(ok)
    assert (info.value.state, info.value.retry_after) == (State.FORCED_OPEN, None)
    assert cb.state is State.FORCED_OPEN


def test_disabled_admits_everything_and_records_nothing(kind):
    cb = make()
    cb.disable()
    fail(cb, 50)
    assert cb.state is State.DISABLED and cb.metrics().calls == 0


def test_metrics_only_records_but_never_transitions():
    cb = make()
    cb.metrics_only()
    fail(cb, 50)
    m = cb.metrics()
    assert cb.state is State.METRICS_ONLY and (m.calls, m.failures, m.failure_rate) == (10, 10, 1.0)


def test_reset_restores_closed_attempt_and_counters(kind):
    clock = FakeClock()
    cb = make(clock, half_open_calls=1, open_duration=lambda a: a)
    trip(cb)
    clock.advance(1)
    fail(cb)
    assert cb.attempt == 2
    with pytest.raises(CircuitOpenError):
        cb.call(ok)
    cb.reset()
    m = cb.metrics()
    assert cb.state is State.CLOSED and cb.attempt == 0 and m.not_permitted == 0 and m.calls == 0


def test_illegal_transitions_are_refused(kind):
    cb = make()
    with pytest.raises(ValueError, match="illegal transition: CLOSED -> HALF_OPEN"):
        cb.transition_to(State.HALF_OPEN)
    with pytest.raises(ValueError, match="illegal transition: CLOSED -> CLOSED"):
        cb.transition_to(State.CLOSED)
    trip(cb)
    cb.transition_to(State.HALF_OPEN)
    assert cb.state is State.HALF_OPEN


# -- classification -----------------------------------------------------------------------------------

def test_ignore_wins_over_record_and_unmatched_counts_as_success():
    cb = make(record=(Boom, KeyError), ignore=(KeyError,), minimum_calls=1, window_size=5)
    with pytest.raises(KeyError):
        cb.call(lambda: {}["x"])
    assert cb.metrics().calls == 0
    with pytest.raises(ValueError):
        cb.call(lambda: int("x"))
    assert (cb.metrics().calls, cb.metrics().failures) == (1, 0)
    fail(cb)
    assert cb.metrics().failures == 1


def test_predicates_for_record_and_ignore():
    cb = make(record=lambda e: "fatal" in str(e), ignore=lambda e: "skip" in str(e), minimum_calls=1,
              window_size=5, failure_rate_threshold=1.0)

    def raise_(msg):
        raise RuntimeError(msg)

    for msg in ("skip fatal", "benign"):
        with pytest.raises(RuntimeError):
            cb.call(raise_, msg)
    assert cb.metrics().calls == 1 and cb.state is State.CLOSED
    with pytest.raises(RuntimeError):
        cb.call(raise_, "fatal")
    assert cb.metrics().failures == 1


def test_record_result_counts_a_return_value_as_failure(kind):
    cb = make(record_result=lambda r: r is None, minimum_calls=2, window_size=2)
    assert cb.call(lambda: None) is None
    cb.call(lambda: None)
    assert cb.state is State.OPEN


def test_broken_predicate_counts_a_failure_and_is_logged(kind, caplog):
    cb = make(record=lambda e: 1 / 0, minimum_calls=1, window_size=1)
    with caplog.at_level(logging.ERROR, logger="buttress.circuit_breaker"):
        fail(cb)
    assert cb.state is State.OPEN and "predicate failed" in caplog.text


# -- events ------------------------------------------------------------------------------------------

def test_events_and_their_fields():
    clock = FakeClock()
    cb = make(clock, minimum_calls=2, window_size=2, ignore=(KeyError,))
    events = []
    cb.on("*", events.append)
    succeed(cb)
    with pytest.raises(KeyError):
        cb.call(lambda: {}["x"])
    fail(cb)
    with pytest.raises(CircuitOpenError):
        cb.call(ok)
    kinds = [e.kind for e in events]
    assert kinds == ["success", "ignored", "error", "failure_rate_exceeded", "state_change", "not_permitted"]
    change = events[4]
    assert (change.breaker, change.old, change.new) == ("dep", State.CLOSED, State.OPEN)
    assert isinstance(events[2].exception, Boom) and events[2].duration == 0.0
    assert events[3].rate == 0.5


def test_slow_call_rate_exceeded_event():
    clock = FakeClock()
    cb = make(clock, slow_call_duration=0.5, slow_call_rate_threshold=1.0, minimum_calls=1, window_size=1)
    got = []
    cb.on("slow_call_rate_exceeded", got.append)
    cb.call(lambda: clock.advance(1))
    assert [e.rate for e in got] == [1.0] and cb.state is State.OPEN


def test_a_raising_listener_is_logged_and_never_breaks_the_call(kind, caplog):
    cb = make()

    def bad(event):
        raise RuntimeError("listener bug")

    cb.on("success", bad)
    with caplog.at_level(logging.ERROR, logger="buttress.circuit_breaker"):
        assert cb.call(ok) == "ok"
    assert "listener" in caplog.text


def test_no_event_is_built_when_nobody_listens(kind):
    cb = make()
    assert cb.hook is None
    cb.on("success", print)
    assert cb.hook is not None
    cb.off("success", print)
    assert cb.hook is None
    with pytest.raises(ValueError, match="event must be one of"):
        cb.on("nope", print)


# -- forms --------------------------------------------------------------------------------------------

def test_decorator_keeps_name_doc_signature_and_binds_to_methods():
    cb = make()

    @cb
    def charge(order_id: str, amount: int = 1) -> str:
        """Charge it."""
        return f"{order_id}:{amount}"

    assert charge("a", amount=2) == "a:2"
    assert charge.__name__ == "charge" and charge.__doc__ == "Charge it."
    assert str(inspect.signature(charge)) == "(order_id: str, amount: int = 1) -> str"

    class Service:
        def __init__(self):
            self.n = 0

        @cb
        def work(self, k):
            self.n += k
            return self.n

    s = Service()
    assert s.work(2) == 2 and s.work(k=3) == 5
    assert Service.work(s, 1) == 6
    assert cb.metrics().calls == 4


def test_async_forms():
    clock = FakeClock()
    cb = make(clock, minimum_calls=4, window_size=4)

    @cb
    async def fetch(x):
        await clock.sleep_async(0.1)
        return x

    async def aboom():
        raise Boom()

    async def main():
        assert inspect.iscoroutinefunction(fetch)
        assert await fetch(1) == 1
        assert await cb.call_async(fetch, 2) == 2
        async with cb:
            pass
        with pytest.raises(Boom):
            await cb.call_async(aboom)
        assert cb.state is State.CLOSED
        with pytest.raises(Boom):
            await cb.call_async(aboom)
        with pytest.raises(CircuitOpenError):
            await fetch(3)

    asyncio.run(main())


def test_async_cancellation_returns_the_permit(kind):
    clock = FakeClock(autojump=False)
    cb = make(clock, half_open_calls=1)
    trip(cb)
    clock.advance(10)

    @cb
    async def hang():
        await asyncio.sleep(3600)

    async def main():
        t = asyncio.ensure_future(hang())
        await asyncio.sleep(0)
        assert cb.load()[2] == 1
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert cb.load()[2] == 0 and cb.state is State.HALF_OPEN

    asyncio.run(main())


def test_context_manager_records_the_outcome():
    cb = make(minimum_calls=2, window_size=2)
    with cb:
        pass
    with pytest.raises(Boom):
        with cb:
            raise Boom()
    assert cb.state is State.OPEN
    with pytest.raises(CircuitOpenError):
        with cb:
            pass


def test_permit_reports_once():
    cb = make(minimum_calls=1, window_size=5, failure_rate_threshold=1.0)
    p = cb.try_acquire()
    p.success("r")
    p.failure(Boom())           # no-op
    p.release()
    assert (cb.metrics().calls, cb.metrics().failures) == (1, 0) and p.done
    with pytest.raises(TypeError, match="exc must be an exception instance"):
        cb.try_acquire().failure("not an exception")


def test_call_without_function_is_a_type_error(kind):
    cb = make()
    with pytest.raises(TypeError, match="call\\(\\) needs the function"):
        cb.call()
    with pytest.raises(TypeError, match="decorates a callable"):
        cb(42)


# -- racing -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3])
def test_half_open_admits_exactly_n_under_16_racing_threads(kind, fast_switching, n):
    for _ in range(100):
        clock = FakeClock()
        cb = make(clock, half_open_calls=n)
        trip(cb)
        clock.advance(10)
        got = race(16, lambda i: cb.try_acquire())      # held: a dropped permit is returned when collected
        assert sum(p is not None for p in got) == n


@pytest.mark.parametrize("n", [1, 3])
def test_half_open_admits_exactly_n_of_200_tasks(kind, n):
    async def main():
        admitted = 0
        gate = asyncio.Event()
        clock = FakeClock(autojump=False)
        cb = make(clock, half_open_calls=n)
        trip(cb)
        clock.advance(10)

        async def probe():
            nonlocal admitted
            await gate.wait()
            try:
                async with cb:
                    admitted += 1
                    await asyncio.sleep(0)
            except CircuitOpenError:
                pass

        tasks = [asyncio.ensure_future(probe()) for _ in range(200)]
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)
        return admitted

    for _ in range(100):
        assert asyncio.run(main()) == n


def test_closed_breaker_counts_exactly_under_threads(fast_switching):
    cb = make(window_size=30000, minimum_calls=30000, failure_rate_threshold=1.0)

    def body(i):
        for k in range(2000):
            if k % 4 == 0:
                with pytest.raises(Boom):
                    cb.call(boom)
            else:
                cb.call(ok)

    race(8, body)
    m = cb.metrics()
    assert (m.calls, m.failures) == (16000, 4000)


# -- bad arguments ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(name=""), ValueError, "name must be a non-empty str, got ''"),
    (dict(name=3), TypeError, "name must be a non-empty str, got 3"),
    (dict(failure_rate_threshold=0), ValueError, "failure_rate_threshold must be a finite number > 0 and <= 1, got 0"),
    (dict(failure_rate_threshold=1.5), ValueError, "failure_rate_threshold.*got 1.5"),
    (dict(slow_call_rate_threshold=float("nan")), ValueError, "slow_call_rate_threshold.*nan"),
    (dict(slow_call_duration=-1), ValueError, "slow_call_duration must be a finite number >= 0"),
    (dict(window="sliding"), ValueError, "window must be 'count' or 'time', got 'sliding'"),
    (dict(window_size=0), ValueError, "window_size must be between 1 and 30000, got 0"),
    (dict(window_size=2.0), TypeError, "window_size must be an int"),
    (dict(minimum_calls=0), ValueError, "minimum_calls must be >= 1, got 0"),
    (dict(open_duration=-5), ValueError, "open_duration must be a finite number >= 0"),
    (dict(open_duration="10"), TypeError, "open_duration must be a number"),
    (dict(half_open_calls=0), ValueError, "half_open_calls must be between 1 and"),
    (dict(half_open_max_wait=float("inf")), ValueError, "half_open_max_wait must be a finite number"),
    (dict(record=[ValueError, 3]), TypeError, "record must be exception classes or a predicate"),
    (dict(ignore="KeyError"), TypeError, "ignore must be an exception class"),
    (dict(record_result=5), TypeError, "record_result must be callable .*got 5"),
    (dict(clock=object()), TypeError, "clock must provide monotonic"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CircuitBreaker(**kwargs)


def test_broken_open_duration_callable_falls_back_and_logs(kind, caplog):
    cb = make(open_duration=lambda a: -1, minimum_calls=1, window_size=1)
    with caplog.at_level(logging.ERROR, logger="buttress.circuit_breaker"):
        fail(cb)
    assert cb.state is State.OPEN and "open_duration callable failed" in caplog.text


# -- reviewer's findings (second exit, shutdown, int64 end of time) ------------------------------------------

def test_a_second_exit_of_one_acquisition_is_a_no_op():
    cb = CircuitBreaker(name="dep", failure_threshold=2, clock=FakeClock())
    cb.__enter__()
    cb.__exit__(ValueError, ValueError(), None)
    assert cb.__exit__(ValueError, ValueError(), None) is False     # no-op: not a second failure
    assert cb.state == State.CLOSED
    assert cb.__exit__(None, None, None) is False                   # no enter at all: a no-op, as Bulkhead
    with cb:
        pass                                                        # still usable; the run was ended
    with pytest.raises(ValueError):
        with cb:
            raise ValueError
    assert cb.state == State.CLOSED


def test_a_second_async_exit_is_a_no_op():
    cb = CircuitBreaker(name="dep", failure_threshold=2, clock=FakeClock())

    async def main():
        await cb.__aenter__()
        await cb.__aexit__(ValueError, ValueError(), None)
        assert await cb.__aexit__(ValueError, ValueError(), None) is False
        assert await cb.__aexit__(None, None, None) is False

    asyncio.run(main())
    assert cb.state == State.CLOSED


_SHUTDOWN = """
import os
from buttress import CircuitBreaker, FakeClock
clk = FakeClock()
cbs = [CircuitBreaker(failure_threshold=1, timeout=1, clock=clk) for _ in range(20)]
for cb in cbs:
    cb.try_acquire().failure(ValueError())
clk.advance(2)
os._held_permits = [cb.try_acquire() for cb in cbs]   # half-open permits, collected after module teardown
print("ok")
"""


def test_a_permit_held_at_interpreter_exit_is_dropped_quietly():
    # a module cleared late holds them: the permits die after buttress's globals became None
    import os
    import subprocess
    import sys
    from buttress._impl import IMPLEMENTATION
    env = dict(os.environ)
    if IMPLEMENTATION == "python":
        env["BUTTRESS_NO_EXTENSIONS"] = "1"
    r = subprocess.run([sys.executable, "-c", _SHUTDOWN], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
    assert r.stderr == ""


I64_MAX = (1 << 63) - 1


@pytest.mark.parametrize("start", [I64_MAX, I64_MAX - 5 * 10**9])
def test_an_open_deadline_past_int64_is_never_reached(kind, start):
    # open at the end of int64 time: the deadline saturates; saturated means "not yet", never "now"
    cb = make(_NsClock(start))
    trip(cb)
    assert cb.state == State.OPEN
    assert cb.try_acquire() is None
    cb.clock.ns = I64_MAX
    assert cb.state == State.OPEN
    assert cb.try_acquire() is None


class _NsClock:
    """A clock that reads exactly the ns given (FakeClock works in seconds)."""

    def __init__(self, ns):
        self.ns = ns

    def monotonic_ns(self):
        return self.ns

    def monotonic(self):
        return self.ns / 1e9

    def time(self):
        return self.ns / 1e9

    def sleep(self, s):
        self.ns += int(s * 1e9)

    async def sleep_async(self, s):
        self.sleep(s)
