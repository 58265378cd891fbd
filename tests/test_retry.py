"""buttress.Retry, RetryBudget, current_attempt: DESIGN §3 / §3b Retry, all timing on FakeClock."""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import buttress
from buttress import (BulkheadFullError, ButtressError, CircuitOpenError, FakeClock, Overloaded,
                      RateLimitExceeded, Rejected, Retry, RetryBudget, current_attempt)
from buttress import backoff as bo
from buttress._base import Policy
from buttress._context import pop_deadline, push_deadline, remaining
from buttress._params import NS
from buttress.retry import Attempt, RetryMetrics

from helpers import race

HAS_NOTES = sys.version_info >= (3, 11)
NO_WAIT = bo.constant(0.0)


def flaky(failures: int, exc: type[BaseException] = ConnectionError, result: object = "ok", log=None):
    """A function failing `failures` times (a new exception each time), then returning `result`."""
    calls = itertools.count(1)

    def fn(*args, **kwargs):
        n = next(calls)
        if log is not None:
            log.append((n, current_attempt()))
        if n <= failures:
            raise exc(f"failure {n}")
        return result

    fn.calls = calls
    return fn


def calls_made(fn) -> int:
    return int(repr(fn.calls)[6:-1]) - 1


def run(retry: Retry, fn, entry: str, *args, **kwargs):
    """Call fn through retry by `entry`: "call" (retry.call) or "decorator" (@retry)."""
    if entry == "call":
        return retry.call(fn, *args, **kwargs)
    return retry(fn)(*args, **kwargs)


ENTRIES = pytest.mark.parametrize("entry", ["call", "decorator"])
ASYNC_ENTRIES = pytest.mark.parametrize("entry", ["call_async", "decorator"])


async def run_async(retry: Retry, fn, entry: str, *args, **kwargs):
    """Await fn through retry by `entry`: "call_async" or "decorator" (@retry on an async function)."""
    if entry == "call_async":
        return await retry.call_async(fn, *args, **kwargs)
    return await retry(fn)(*args, **kwargs)


# -- attempts, results, errors ---------------------------------------------------------------------------

@ENTRIES
def test_success_on_the_first_attempt(entry):
    r = Retry(clock=FakeClock())
    fn = flaky(0)
    assert run(r, fn, entry) == "ok"
    assert calls_made(fn) == 1
    assert r.metrics() == RetryMetrics(1, 0, 0, 0)


@ENTRIES
def test_retries_until_success_and_sleeps_through_the_clock(entry):
    clock = FakeClock()
    r = Retry(max_attempts=5, backoff=bo.exponential(initial=1.0, jitter="none"), clock=clock)
    fn = flaky(3)
    assert run(r, fn, entry) == "ok"
    assert calls_made(fn) == 4
    assert clock.monotonic() == 1.0 + 2.0 + 4.0
    assert r.metrics() == RetryMetrics(0, 1, 0, 0)


@ENTRIES
def test_the_last_exception_is_raised_as_itself_with_a_note(entry):
    raised = []

    def fn():
        raised.append(ConnectionError(f"failure {len(raised) + 1}"))
        raise raised[-1]

    r = Retry(max_attempts=3, backoff=NO_WAIT, clock=FakeClock())
    with pytest.raises(ConnectionError) as info:
        run(r, fn, entry)
    assert info.value is raised[-1] and len(raised) == 3
    assert info.value.__context__ is None and info.value.__cause__ is None     # no chain of attempts
    if HAS_NOTES:
        assert info.value.__notes__ == ["buttress.Retry: gave up after 3 attempts (max_attempts=3 reached)"]
    assert r.metrics() == RetryMetrics(0, 0, 0, 1)


def test_max_attempts_one_never_retries():
    r = Retry(max_attempts=1, clock=FakeClock())
    fn = flaky(5)
    with pytest.raises(ConnectionError) as info:
        r.call(fn)
    assert calls_made(fn) == 1
    if HAS_NOTES:
        assert info.value.__notes__ == ["buttress.Retry: gave up after 1 attempt (max_attempts=1 reached)"]
    assert r.metrics() == RetryMetrics(0, 0, 1, 0)


@ENTRIES
def test_a_non_retryable_exception_passes_through_untouched(entry):
    clock = FakeClock()
    gave_up = []
    r = Retry(retry_on=(ConnectionError,), clock=clock, on_give_up=lambda *a: gave_up.append(a))
    fn = flaky(5, exc=KeyError)
    with pytest.raises(KeyError) as info:
        run(r, fn, entry)
    assert calls_made(fn) == 1 and clock.monotonic() == 0.0
    assert not getattr(info.value, "__notes__", None)
    assert gave_up == []        # not retryable is not "giving up"
    assert r.metrics() == RetryMetrics(0, 0, 1, 0)


def test_a_non_retryable_exception_after_retries_stops_them():
    errors = iter([ConnectionError("a"), ValueError("b")])

    def fn():
        raise next(errors)

    r = Retry(max_attempts=5, retry_on=ConnectionError, backoff=NO_WAIT, clock=FakeClock())
    with pytest.raises(ValueError) as info:
        r.call(fn)
    if HAS_NOTES:
        assert info.value.__notes__ == ["buttress.Retry: gave up after 2 attempts (not retryable)"]
    assert r.metrics() == RetryMetrics(0, 0, 0, 1)


@settings(max_examples=60, deadline=None)
@given(max_attempts=st.integers(1, 12), failures=st.integers(0, 20),
       retryable=st.booleans(), jitter=st.sampled_from(bo.JITTERS), seed=st.integers(0, 1000))
def test_property_attempt_counts(max_attempts, failures, retryable, jitter, seed):
    """Never more than max_attempts; a non-retryable exception is raised after exactly one attempt."""
    clock = FakeClock()
    exc = ConnectionError if retryable else KeyError
    r = Retry(max_attempts=max_attempts, retry_on=ConnectionError, clock=clock,
              backoff=bo.exponential(jitter=jitter, rng=random.Random(seed)))
    fn = flaky(failures, exc=exc)
    try:
        assert r.call(fn) == "ok"
        ok = True
    except exc:
        ok = False
    n = calls_made(fn)
    assert n <= max_attempts
    if not retryable and failures:
        assert n == 1 and not ok and clock.monotonic() == 0.0
    else:
        assert n == min(failures + 1, max_attempts)
        assert ok == (failures < max_attempts)


@pytest.mark.parametrize("spec", [ConnectionError, (ConnectionError,), [OSError], lambda e: "retry" in str(e)])
def test_retry_on_accepts_classes_tuples_lists_and_predicates(spec):
    r = Retry(retry_on=spec, backoff=NO_WAIT, clock=FakeClock())
    assert r.call(flaky(2, exc=lambda m: ConnectionError("retry " + m))) == "ok"
    with pytest.raises(KeyError):
        r.call(flaky(2, exc=KeyError))


def test_keyboard_interrupt_and_cancellation_are_never_retried():
    r = Retry(retry_on=lambda e: True, backoff=NO_WAIT, clock=FakeClock())
    fn = flaky(3, exc=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        r.call(fn)
    assert calls_made(fn) == 1

    async def cancelled():
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(r.call_async(cancelled))
    assert current_attempt() is None


# -- buttress's own rejections -----------------------------------------------------------------------------

REJECTIONS = [lambda: RateLimitExceeded(), lambda: BulkheadFullError(), lambda: Overloaded(),
              lambda: CircuitOpenError("db", "OPEN")]


@pytest.mark.parametrize("make", REJECTIONS)
@pytest.mark.parametrize("retry_on", [(Exception,), (ButtressError,), lambda e: True])
def test_rejections_are_not_retried_unless_named(make, retry_on):
    calls = []

    def fn():
        calls.append(1)
        raise make()

    with pytest.raises(Rejected):
        Retry(retry_on=retry_on, backoff=NO_WAIT, clock=FakeClock()).call(fn)
    assert len(calls) == 1


@pytest.mark.parametrize("make", REJECTIONS)
def test_rejections_are_retried_when_their_class_is_named(make):
    cls = type(make())
    for retry_on in (cls, (KeyError, cls), (Rejected,)):
        r = Retry(retry_on=retry_on, max_attempts=3, backoff=NO_WAIT, clock=FakeClock())
        fn = flaky(2, exc=lambda m: make())
        assert r.call(fn) == "ok" and calls_made(fn) == 3


def test_naming_one_rejection_does_not_admit_the_others():
    r = Retry(retry_on=(Exception, RateLimitExceeded), backoff=NO_WAIT, clock=FakeClock())
    assert r.call(flaky(2, exc=lambda m: RateLimitExceeded())) == "ok"
    fn = flaky(2, exc=lambda m: BulkheadFullError())
    with pytest.raises(BulkheadFullError):
        r.call(fn)
    assert calls_made(fn) == 1


# -- waits: retry_after, deadlines -----------------------------------------------------------------------

class Throttled(Exception):
    def __init__(self, retry_after):
        super().__init__("throttled")
        self.retry_after = retry_after


@pytest.mark.parametrize("retry_after, expected", [(5.0, 5.0), (0.01, 1.0), (None, 1.0), (math.nan, 1.0),
                                                   (-3.0, 1.0), ("7", 1.0), (True, 1.0), (7, 7.0)])
def test_retry_after_is_a_lower_bound_on_the_wait(retry_after, expected):
    clock = FakeClock()
    waits = []
    r = Retry(backoff=bo.constant(1.0), clock=clock, on_retry=lambda a, e, d: waits.append(d))
    assert r.call(flaky(1, exc=lambda m: Throttled(retry_after))) == "ok"
    assert waits == [expected] and clock.monotonic() == expected


def test_rejection_retry_after_is_honoured_when_retried():
    clock = FakeClock()
    r = Retry(retry_on=RateLimitExceeded, backoff=bo.constant(0.1), clock=clock)
    assert r.call(flaky(1, exc=lambda m: RateLimitExceeded(retry_after=2.5))) == "ok"
    assert clock.monotonic() == 2.5


def test_deadline_gives_up_when_the_next_wait_would_reach_it():
    clock = FakeClock()
    r = Retry(max_attempts=100, deadline=1.0, backoff=bo.constant(0.4), clock=clock)
    fn = flaky(100)
    with pytest.raises(ConnectionError) as info:
        r.call(fn)
    assert calls_made(fn) == 3 and clock.monotonic() == pytest.approx(0.8)   # attempts at 0, 0.4, 0.8
    if HAS_NOTES:
        assert "would reach the deadline" in info.value.__notes__[0]
        assert "after 3 attempts" in info.value.__notes__[0]


def test_deadline_counts_the_time_attempts_take():
    clock = FakeClock()
    starts = []

    def slow():
        starts.append(clock.monotonic())
        clock.advance(0.3)
        raise ConnectionError

    with pytest.raises(ConnectionError):
        Retry(max_attempts=100, deadline=1.0, backoff=bo.constant(0.4), clock=clock).call(slow)
    assert starts == pytest.approx([0.0, 0.7])      # 0.7 + 0.3 + 0.4 > 1.0


@ENTRIES
def test_remaining_reports_the_deadline_during_attempts(entry):
    clock = FakeClock()
    seen = []

    def fn():
        seen.append(remaining())
        if len(seen) < 3:
            raise ConnectionError
        return "ok"

    r = Retry(max_attempts=5, deadline=10.0, backoff=bo.constant(1.5), clock=clock)
    assert remaining() is None
    assert run(r, fn, entry) == "ok"
    assert seen == pytest.approx([10.0, 8.5, 7.0])
    assert remaining() is None          # popped after the call


def test_an_outer_deadline_bounds_the_retries():
    clock = FakeClock()
    token = push_deadline(2 * NS, clock)      # as an enclosing Timeout(2.0) would
    try:
        seen = []

        def fail():
            seen.append(remaining())
            raise ConnectionError

        r = Retry(max_attempts=100, deadline=30.0, backoff=bo.constant(0.5), clock=clock)
        with pytest.raises(ConnectionError):
            r.call(fail)
        assert seen == pytest.approx([2.0, 1.5, 1.0, 0.5])  # the outer deadline is the innermost one
        assert clock.monotonic() == pytest.approx(1.5)      # a wait from 1.5 would reach 2.0
        r2 = Retry(max_attempts=100, backoff=bo.constant(0.5), clock=clock)  # no deadline of its own
        fn2 = flaky(100)
        with pytest.raises(ConnectionError):
            r2.call(fn2)
        assert calls_made(fn2) == 1
    finally:
        pop_deadline(token)


def test_a_shorter_own_deadline_wins_over_an_outer_one():
    clock = FakeClock()
    token = push_deadline(100 * NS, clock)
    try:
        assert Retry(deadline=3.0, clock=clock).call(lambda: remaining()) == 3.0
    finally:
        pop_deadline(token)


@settings(max_examples=80, deadline=None)
@given(deadline=st.floats(0.01, 20.0), duration=st.floats(0.0, 3.0), max_attempts=st.integers(1, 50),
       jitter=st.sampled_from(bo.JITTERS), seed=st.integers(0, 1000),
       entry=st.sampled_from(["call", "decorator", "call_async", "async_decorator"]))
def test_property_the_deadline_is_never_exceeded(deadline, duration, max_attempts, jitter, seed, entry):
    """No wait ends at or after the deadline: every retry starts strictly before it."""
    clock = FakeClock(start=5.0)
    starts = []

    def attempt():
        starts.append(clock.monotonic_ns())
        clock.advance(duration)
        raise ConnectionError

    async def attempt_async():
        attempt()

    r = Retry(max_attempts=max_attempts, deadline=deadline, clock=clock,
              backoff=bo.exponential(initial=0.05, maximum=5.0, jitter=jitter, rng=random.Random(seed)))
    with pytest.raises(ConnectionError):
        if entry in ("call", "decorator"):
            run(r, attempt, entry)
        else:
            asyncio.run(run_async(r, attempt_async, entry.replace("async_", "")))
    end = 5 * NS + math.ceil(deadline * NS)
    assert 1 <= len(starts) <= max_attempts
    assert all(s < end for s in starts[1:])
    assert clock.monotonic_ns() <= max(end, starts[-1] + math.ceil(duration * NS))


# -- results -----------------------------------------------------------------------------------------------

@ENTRIES
def test_retry_on_result_returns_the_last_result_when_attempts_run_out(entry):
    results = iter([None, None, None, "late"])
    hooks = []
    r = Retry(max_attempts=3, retry_on_result=lambda v: v is None, backoff=bo.constant(1.0), clock=FakeClock(),
              on_retry=lambda *a: hooks.append(("retry", *a)), on_give_up=lambda *a: hooks.append(("give_up", *a)))
    assert run(r, lambda: next(results), entry) is None
    assert hooks == [("retry", 1, None, 1.0), ("retry", 2, None, 1.0), ("give_up", 3, None)]
    assert r.metrics() == RetryMetrics(0, 0, 0, 1)


def test_retry_on_result_retries_until_a_good_result():
    results = iter([None, None, 42])
    r = Retry(max_attempts=5, retry_on_result=lambda v: v is None, backoff=NO_WAIT, clock=FakeClock())
    assert r.call(lambda: next(results)) == 42
    assert r.metrics() == RetryMetrics(0, 1, 0, 0)


# -- hooks -------------------------------------------------------------------------------------------------

def test_hooks_are_called_positionally():
    events = []

    def on_retry(attempt, exception, delay, /):
        events.append(("retry", attempt, str(exception), delay))

    def on_give_up(attempt, exception, /):
        events.append(("give_up", attempt, str(exception)))

    r = Retry(max_attempts=3, backoff=bo.exponential(initial=1.0, jitter="none"), clock=FakeClock(),
              on_retry=on_retry, on_give_up=on_give_up)
    with pytest.raises(ConnectionError):
        r.call(flaky(10))
    assert events == [("retry", 1, "failure 1", 1.0), ("retry", 2, "failure 2", 2.0), ("give_up", 3, "failure 3")]


def test_a_failing_hook_propagates():
    def boom(*a):
        raise RuntimeError("hook")

    with pytest.raises(RuntimeError, match="hook"):
        Retry(backoff=NO_WAIT, on_retry=boom, clock=FakeClock()).call(flaky(1))


# -- backoff forms accepted by Retry -----------------------------------------------------------------------

def test_backoff_may_be_a_callable_or_a_number():
    clock = FakeClock()
    Retry(max_attempts=4, backoff=lambda k: k * 0.5, clock=clock).call(flaky(3))
    assert clock.monotonic() == 0.5 + 1.0 + 1.5
    clock2 = FakeClock()
    Retry(max_attempts=4, backoff=0.25, clock=clock2).call(flaky(3))
    assert clock2.monotonic() == 0.75


def test_a_callable_backoff_returning_garbage_names_it_and_keeps_the_cause():
    with pytest.raises(ValueError, match=r"backoff\(1\)") as info:
        Retry(backoff=lambda k: -1.0, clock=FakeClock()).call(flaky(1))
    assert isinstance(info.value.__cause__, ConnectionError)


def test_decorrelated_jitter_walks_from_the_previous_delay():
    waits = []
    r = Retry(max_attempts=30, clock=FakeClock(), on_retry=lambda a, e, d: waits.append(d),
              backoff=bo.exponential(initial=0.1, maximum=5.0, jitter="decorrelated", rng=random.Random(3)))
    with pytest.raises(ConnectionError):
        r.call(flaky(100))
    prev = 0.1
    for w in waits:
        assert 0.1 <= w <= min(5.0, 3 * prev) + 1e-12
        prev = w
    assert len(set(waits)) > 20 and max(waits) > 0.3     # grew past 3 * initial: previous is threaded


def test_ten_retries_run_instantly_on_a_fake_clock():
    clock = FakeClock()
    r = Retry(max_attempts=11, backoff=bo.constant(60.0), clock=clock)
    assert r.call(flaky(10)) == "ok"
    assert clock.monotonic() == 600.0


# -- idempotency keys and current_attempt ------------------------------------------------------------------

@ENTRIES
def test_one_key_for_all_attempts_of_a_call_and_a_new_one_per_call(entry):
    clock = FakeClock()
    r = Retry(max_attempts=3, backoff=bo.constant(2.0), clock=clock)
    logs = [[], []]
    for log in logs:
        run(r, flaky(2, log=log), entry)
    for log in logs:
        assert [n for n, _ in log] == [a.number for _, a in log] == [1, 2, 3]
        assert len({a.idempotency_key for _, a in log}) == 1
        assert isinstance(log[0][1].idempotency_key, str) and log[0][1].idempotency_key
    assert [a.elapsed for _, a in logs[1]] == [0.0, 2.0, 4.0]
    assert logs[0][0][1].idempotency_key != logs[1][0][1].idempotency_key


def test_current_attempt_is_none_outside_a_retried_call():
    assert current_attempt() is None
    Retry(clock=FakeClock()).call(lambda: None)
    assert current_attempt() is None
    assert buttress.current_attempt is current_attempt and buttress.Attempt is Attempt


def test_a_user_key_function_gets_the_call_arguments_and_runs_only_when_read():
    made = []

    def key(order_id, *, amount):
        made.append(order_id)
        return f"order-{order_id}-{amount}"

    r = Retry(idempotency_key=key, backoff=NO_WAIT, clock=FakeClock())

    @r
    def pay(order_id, *, amount):
        a = current_attempt()
        if a.number < 3:
            raise ConnectionError
        return a.idempotency_key

    assert pay(17, amount=5) == "order-17-5"
    assert made == [17]                         # made once, on first read
    r.call(lambda order_id, amount: None, 18, amount=1)
    assert made == [17]                         # nobody read it: never made


def test_a_key_function_without_parameters_is_called_without_the_arguments():
    keys = iter(["k1", "k2"])
    r = Retry(idempotency_key=lambda: next(keys), backoff=NO_WAIT, clock=FakeClock())
    log = []
    r.call(flaky(1, log=log), "some", arg=1)
    assert [a.idempotency_key for _, a in log] == ["k1", "k1"]
    assert r.call(lambda x: current_attempt().idempotency_key, 5) == "k2"


def test_a_user_key_function_must_return_a_str():
    r = Retry(idempotency_key=lambda: 42, clock=FakeClock())
    with pytest.raises(TypeError, match="idempotency_key must return a str, got 42"):
        r.call(current_attempt)


def test_nested_retries_see_their_own_attempt():
    outer = Retry(max_attempts=2, backoff=NO_WAIT, clock=FakeClock())
    inner = Retry(max_attempts=3, backoff=NO_WAIT, clock=FakeClock())
    seen = []

    def body():
        before = current_attempt()
        inner.call(flaky(2, log=seen))
        assert current_attempt() == dataclasses.replace(before, elapsed=current_attempt().elapsed)
        return before

    outer_attempt = outer.call(body)
    assert [a.number for _, a in seen] == [1, 2, 3]
    assert seen[0][1].idempotency_key != outer_attempt.idempotency_key


@ASYNC_ENTRIES
def test_async_calls_restore_the_attempt_of_the_caller(entry):
    outer, inner = Retry(clock=FakeClock()), Retry(clock=FakeClock())

    async def leaf():
        return current_attempt()

    async def middle():
        mine = current_attempt()
        theirs = await run_async(inner, leaf, entry)
        assert current_attempt().idempotency_key == mine.idempotency_key
        return mine, theirs

    async def main():
        mine, theirs = await run_async(outer, middle, entry)
        assert mine.idempotency_key != theirs.idempotency_key
        assert current_attempt() is None

    asyncio.run(main())


@ASYNC_ENTRIES
def test_fifty_concurrent_async_calls_keep_their_own_keys_and_counts(entry):
    clock = FakeClock()
    r = Retry(max_attempts=4, backoff=bo.exponential(initial=0.5, jitter="full", rng=random.Random(1)), clock=clock)
    logs: dict[int, list[Attempt]] = {}

    async def fn(i):
        a = current_attempt()
        logs.setdefault(i, []).append(a)
        await clock.sleep_async(0.01 * (i % 7))       # interleave the calls
        if a.number <= i % 3:
            raise ConnectionError(i)
        return i

    async def main():
        return await asyncio.gather(*(run_async(r, fn, entry, i) for i in range(50)))

    assert asyncio.run(main()) == list(range(50))
    keys = set()
    for i, attempts in logs.items():
        assert [a.number for a in attempts] == list(range(1, i % 3 + 2))
        assert len({a.idempotency_key for a in attempts}) == 1
        keys.add(attempts[0].idempotency_key)
    assert len(keys) == 50
    m = r.metrics()
    assert (m.successful_without_retry, m.successful_with_retry) == (17, 33)


def test_racing_threads_keep_per_call_state_and_exact_counters(fast_switching):
    r = Retry(max_attempts=3, backoff=NO_WAIT, clock=FakeClock(), retry_on=ConnectionError)
    per_thread = 152

    def body(t):
        keys = []
        for i in range(per_thread):
            kind = i % 4     # 0: ok at once, 1: ok after a retry, 2: fails after 3 attempts, 3: not retryable
            log = []
            fn = flaky({0: 0, 1: 1, 2: 5, 3: 1}[kind], exc=KeyError if kind == 3 else ConnectionError, log=log)
            try:
                r.call(fn)
            except (ConnectionError, KeyError):
                pass
            assert [n for n, _ in log] == [a.number for _, a in log]
            assert len({a.idempotency_key for _, a in log}) == 1
            keys.append(log[0][1].idempotency_key)
        return keys

    results = race(8, body)
    assert len({k for keys in results for k in keys}) == 8 * per_thread
    quarter = 8 * per_thread // 4
    assert r.metrics() == RetryMetrics(quarter, quarter, quarter, quarter)


# -- async ---------------------------------------------------------------------------------------------------

def test_async_retries_wait_on_the_clock():
    clock = FakeClock(autojump=False)
    r = Retry(max_attempts=3, backoff=bo.constant(5.0), clock=clock)
    fn = flaky(1)

    async def afn():
        return fn()

    async def main():
        task = asyncio.ensure_future(r.call_async(afn))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done() and calls_made(fn) == 1 and clock.pending_sleepers == 1
        clock.advance(5.0)
        return await task

    assert asyncio.run(main()) == "ok"
    assert r.metrics() == RetryMetrics(0, 1, 0, 0)


def test_async_decorator_and_methods():
    r = Retry(backoff=NO_WAIT, clock=FakeClock())

    class Client:
        def __init__(self):
            self.n = 0

        @r
        def get(self, x):
            """Docstring."""
            self.n += 1
            if self.n < 2:
                raise ConnectionError
            return x * 2

        @r
        async def aget(self, x):
            self.n += 1
            if self.n < 4:
                raise ConnectionError
            return x * 3

    c = Client()
    assert c.get(2) == 4 and Client.get.__doc__ == "Docstring." and Client.get.__name__ == "get"
    assert asyncio.run(c.aget(2)) == 6
    assert asyncio.iscoroutinefunction(Client.aget)
    assert isinstance(r, Policy)


@ASYNC_ENTRIES
def test_async_exhaustion_raises_the_last_error_with_a_note(entry):
    async def fail():
        raise ConnectionError("down")

    with pytest.raises(ConnectionError) as info:
        asyncio.run(run_async(Retry(max_attempts=2, clock=FakeClock()), fail, entry))
    if HAS_NOTES:
        assert info.value.__notes__ == ["buttress.Retry: gave up after 2 attempts (max_attempts=2 reached)"]


# -- retry budget --------------------------------------------------------------------------------------------

def test_budget_caps_retries_of_a_thousand_failing_calls():
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=10.0, ttl=10.0, clock=clock)
    r = Retry(max_attempts=3, backoff=NO_WAIT, budget=budget, clock=clock)
    attempts = 0

    def fail():
        nonlocal attempts
        attempts += 1
        raise ConnectionError

    for _ in range(1000):
        with pytest.raises(ConnectionError):
            r.call(fail)
    retries = attempts - 1000
    assert retries <= 0.2 * 1000 + 10.0 * 10.0
    assert retries == 300 and budget.balance == 0     # the bound is reached exactly, never passed


@settings(max_examples=60, deadline=None)
@given(ratio=st.floats(0.001, 1.0), calls=st.integers(0, 5000), floor=st.floats(0.0, 20.0))
def test_property_budget_never_allows_more_than_its_ratio_plus_floor(ratio, calls, floor):
    clock = FakeClock()
    budget = RetryBudget(ratio=ratio, min_per_second=floor, ttl=1.0, clock=clock)
    for _ in range(calls):
        budget.deposit()
    allowed = ratio * calls + floor * 1.0
    assert budget.balance <= allowed + 1e-9
    assert budget.balance >= allowed * (1 - ratio / 1000) - 2       # rounding costs at most a little
    taken = sum(budget.try_withdraw() for _ in range(int(allowed) + 5))
    assert taken <= allowed + 1e-9 and budget.balance == 0


@pytest.mark.parametrize("via", ["deadline", "budget"])
@pytest.mark.parametrize("entry", ["call", "decorator", "call_async", "async_decorator"])
def test_counters_with_a_deadline_or_budget(via, entry):
    clock = FakeClock()
    extra = dict(deadline=10.0) if via == "deadline" else dict(budget=RetryBudget(clock=clock))
    r = Retry(backoff=NO_WAIT, retry_on=ConnectionError, clock=clock, **extra)

    def go(fn):
        if entry in ("call", "decorator"):
            return run(r, fn, entry)

        async def afn():
            return fn()

        return asyncio.run(run_async(r, afn, entry.replace("async_", "")))

    go(flaky(0))
    go(flaky(1))
    with pytest.raises(KeyError):
        go(flaky(1, exc=KeyError))
    with pytest.raises(ConnectionError):
        go(flaky(5))
    assert r.metrics() == RetryMetrics(1, 1, 1, 1)


def test_an_empty_budget_raises_the_last_error_at_once():
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, ttl=10.0, clock=clock)   # one retry in reserve
    gave_up = []
    r = Retry(max_attempts=5, backoff=bo.constant(1.0), budget=budget, clock=clock,
              on_give_up=lambda a, e: gave_up.append(a))
    fn = flaky(100)
    with pytest.raises(ConnectionError) as info:
        r.call(fn)
    assert calls_made(fn) == 2 and clock.monotonic() == 1.0 and gave_up == [2]
    if HAS_NOTES:
        assert info.value.__notes__ == ["buttress.Retry: gave up after 2 attempts (retry budget exhausted)"]


def test_the_budget_floor_comes_back_after_ttl():
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, ttl=5.0, clock=clock)
    assert budget.balance == 5
    assert sum(budget.try_withdraw() for _ in range(10)) == 5
    assert budget.balance == 0
    clock.advance(4.0)
    assert budget.balance == 0
    clock.advance(1.0)
    assert budget.balance == 5


def test_deposits_expire_after_ttl():
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, ttl=10.0, clock=clock)
    for _ in range(10):
        budget.deposit()
    assert budget.balance == 5
    clock.advance(9.0)
    assert budget.balance == 5
    clock.advance(1.0)
    assert budget.balance == 0


def test_a_budget_is_shared_between_retries():
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_second=0.3, ttl=10.0, clock=clock)   # three retries
    a = Retry(max_attempts=10, backoff=NO_WAIT, budget=budget, clock=clock)
    b = Retry(max_attempts=10, backoff=NO_WAIT, budget=budget, clock=clock)
    fa, fb = flaky(100), flaky(100)
    for r, fn in ((a, fa), (b, fb)):
        with pytest.raises(ConnectionError):
            r.call(fn)
    assert calls_made(fa) + calls_made(fb) == 2 + 3


def test_retries_waiting_in_backoff_count_against_the_budget():
    clock = FakeClock(autojump=False)
    budget = RetryBudget(ratio=0.0, min_per_second=0.5, ttl=10.0, clock=clock)   # five retries
    r = Retry(max_attempts=2, backoff=bo.constant(1.0), budget=budget, clock=clock)

    async def fail():
        raise ConnectionError

    async def main():
        tasks = [asyncio.ensure_future(r.call_async(fail)) for _ in range(10)]
        for _ in range(30):
            await asyncio.sleep(0)
        assert sum(t.done() for t in tasks) == 5          # five gave up at once
        assert clock.pending_sleepers == 5 and budget.balance == 0
        clock.advance(1.0)
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    assert r.metrics() == RetryMetrics(0, 0, 5, 5)


def test_budget_accounting_is_exact_under_racing_threads(fast_switching):
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=1.0, ttl=10.0, clock=clock)
    r = Retry(max_attempts=3, backoff=NO_WAIT, budget=budget, clock=clock)
    attempts = itertools.count()

    def fail():
        next(attempts)
        raise ConnectionError

    def body(_):
        for _ in range(400):
            with pytest.raises(ConnectionError):
                r.call(fail)

    race(8, body)
    retries = int(repr(attempts)[6:-1]) - 3200
    assert retries <= 0.2 * 3200 + 1.0 * 10.0
    assert retries + budget.balance == 650          # no withdrawal or deposit lost


# -- arguments ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(max_attempts=0), ValueError, ["max_attempts", ">= 1", "0"]),
    (dict(max_attempts="3"), TypeError, ["max_attempts", "'3'"]),
    (dict(max_attempts=True), TypeError, ["max_attempts", "True"]),
    (dict(backoff="fast"), TypeError, ["backoff", "'fast'"]),
    (dict(backoff=-1.0), ValueError, ["backoff must be", "-1.0"]),      # named as given, not "delay"
    (dict(backoff=-1), ValueError, ["backoff must be", ">= 0", "-1"]),
    (dict(backoff=10**400), ValueError, ["backoff must be", "401 digits"]),
    (dict(backoff=True), TypeError, ["backoff", "True"]),
    (dict(deadline=10**400), ValueError, ["deadline must be", "401 digits"]),
    (dict(retry_on=KeyboardInterrupt), ValueError, ["retry_on", "KeyboardInterrupt", "Exception"]),
    (dict(retry_on=5), TypeError, ["retry_on", "5"]),
    (dict(retry_on=(ValueError, 3)), TypeError, ["retry_on", "3"]),
    (dict(retry_on_result=1), TypeError, ["retry_on_result", "1"]),
    (dict(deadline=0), ValueError, ["deadline", "> 0", "0"]),
    (dict(deadline=-1.0), ValueError, ["deadline", "-1.0"]),
    (dict(deadline=math.nan), ValueError, ["deadline", "nan"]),
    (dict(deadline="1"), TypeError, ["deadline", "'1'"]),
    (dict(budget=object()), TypeError, ["budget", "RetryBudget"]),
    (dict(on_retry=3), TypeError, ["on_retry", "3"]),
    (dict(on_give_up="x"), TypeError, ["on_give_up", "'x'"]),
    (dict(idempotency_key="key"), TypeError, ["idempotency_key", "'key'"]),
    (dict(clock=object()), TypeError, ["clock", "monotonic"]),
])
def test_bad_retry_arguments(kwargs, exc, words):
    with pytest.raises(exc) as info:
        Retry(**kwargs)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(ratio=-0.1), ValueError, ["ratio", "-0.1"]),
    (dict(ratio=1.5), ValueError, ["ratio", "<= 1", "1.5"]),
    (dict(ratio="0.2"), TypeError, ["ratio", "'0.2'"]),
    (dict(min_per_second=-1), ValueError, ["min_per_second", "-1"]),
    (dict(min_per_second=math.inf), ValueError, ["min_per_second", "inf"]),
    (dict(ttl=0), ValueError, ["ttl", "0"]),
    (dict(ttl=-5), ValueError, ["ttl", "-5"]),
    (dict(ttl=None), TypeError, ["ttl", "None"]),
    (dict(clock=42), TypeError, ["clock", "42"]),
])
def test_bad_budget_arguments(kwargs, exc, words):
    with pytest.raises(exc) as info:
        RetryBudget(**kwargs)
    for w in words:
        assert w in str(info.value)


def test_decorating_a_non_callable_is_a_type_error():
    with pytest.raises(TypeError, match="decorates a callable"):
        Retry()(42)


def test_metrics_are_an_immutable_snapshot():
    r = Retry(clock=FakeClock())
    m = r.metrics()
    r.call(lambda: 1)
    assert m == RetryMetrics(0, 0, 0, 0) and r.metrics().successful_without_retry == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.failed_with_retry = 3     # type: ignore[misc]


def test_reprs():
    assert repr(Retry(clock=FakeClock())).startswith("Retry(max_attempts=3, backoff=exponential(")
    assert repr(RetryBudget(clock=FakeClock())) == "RetryBudget(ratio=0.2, min_per_second=10.0, ttl=10.0, balance=100)"


# -- the block form: for attempt in retry.attempts(): with attempt: ... (DESIGN §6) --------------------------

def run_block(retry, fn, **kw):
    """Drive fn() through retry.attempts(); -> (what the block left in `out`, the attempts seen)."""
    seen = []
    for attempt in retry.attempts(**kw):
        with attempt:
            seen.append((attempt.number, current_attempt(), remaining()))
            out = fn()
    return out, seen


def test_block_retries_with_backoff_on_the_clock_and_one_key():
    clock = FakeClock()
    r = Retry(max_attempts=4, backoff=bo.exponential(initial=1.0, jitter="none"), clock=clock)
    out, seen = run_block(r, flaky(2))
    assert out == "ok" and clock.monotonic() == 1.0 + 2.0
    assert [n for n, _, _ in seen] == [1, 2, 3] and [a.number for _, a, _ in seen] == [1, 2, 3]
    assert len({a.idempotency_key for _, a, _ in seen}) == 1
    assert r.metrics() == RetryMetrics(0, 1, 0, 0)
    assert current_attempt() is None
    _, seen2 = run_block(r, flaky(0))
    assert seen2[0][1].idempotency_key != seen[0][1].idempotency_key      # a new key per loop
    assert r.metrics() == RetryMetrics(1, 1, 0, 0)
    _, seen = run_block(r, flaky(1), idempotency_key="order-5")
    assert [a.idempotency_key for _, a, _ in seen] == ["order-5", "order-5"]


def test_block_gives_up_with_the_last_exception_itself_noted_and_hooks():
    clock = FakeClock()
    events = []
    r = Retry(max_attempts=3, backoff=bo.constant(0.5), retry_on=ConnectionError, clock=clock,
              on_retry=lambda a, e, d: events.append(("retry", a, str(e), d)),
              on_give_up=lambda a, e: events.append(("give_up", a, str(e))))
    with pytest.raises(ConnectionError, match="failure 3") as info:
        run_block(r, flaky(10))
    assert type(info.value) is ConnectionError and info.value.__context__ is None
    if HAS_NOTES:
        assert info.value.__notes__ == ["buttress.Retry: gave up after 3 attempts (max_attempts=3 reached)"]
    assert events == [("retry", 1, "failure 1", 0.5), ("retry", 2, "failure 2", 0.5), ("give_up", 3, "failure 3")]
    assert r.metrics() == RetryMetrics(0, 0, 0, 1) and clock.monotonic() == 1.0
    assert current_attempt() is None
    # not retryable: at once, untouched; own rejections likewise
    for exc in (ValueError, lambda m: RateLimitExceeded(m, retry_after=0.1)):
        fn = flaky(10, exc=exc)
        with pytest.raises((ValueError, RateLimitExceeded)) as info:
            run_block(r, fn)
        assert str(info.value).startswith("failure 1") and getattr(info.value, "__notes__", []) == []
    assert r.metrics() == RetryMetrics(0, 0, 2, 1) and clock.monotonic() == 1.0


def test_block_base_exceptions_are_no_outcome():
    class Stop(BaseException):
        pass
    r = Retry(clock=FakeClock())
    with pytest.raises(Stop):
        run_block(r, flaky(10, exc=Stop))
    assert r.metrics() == RetryMetrics(0, 0, 0, 0) and current_attempt() is None


def test_block_deadline_is_visible_and_stops_the_loop():
    clock = FakeClock()
    r = Retry(max_attempts=10, backoff=bo.constant(1.0), deadline=2.5, clock=clock)
    with pytest.raises(ConnectionError, match="failure 3") as info:
        run_block(r, flaky(10))
    if HAS_NOTES:
        assert "would reach the deadline" in info.value.__notes__[-1]
    assert remaining() is None


def test_block_remaining_reports_the_deadline_and_is_popped_after():
    clock = FakeClock()
    r = Retry(max_attempts=3, backoff=bo.constant(1.0), deadline=5.0, clock=clock)
    _, seen = run_block(r, flaky(2))
    assert [rem for *_, rem in seen] == [5.0, 4.0, 3.0]
    assert remaining() is None


def test_block_budget_deposits_once_and_withdraws_per_retry():
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_second=0.2, ttl=10.0, clock=clock)    # two retries in all
    r = Retry(max_attempts=10, backoff=NO_WAIT, budget=budget, clock=clock)
    with pytest.raises(ConnectionError, match="failure 3") as info:
        run_block(r, flaky(10))
    if HAS_NOTES:
        assert "retry budget exhausted" in info.value.__notes__[-1]
    assert budget.balance == 0


def test_block_result_predicate_through_set_result():
    clock = FakeClock()
    r = Retry(max_attempts=3, backoff=NO_WAIT, retry_on_result=lambda v: v is None, clock=clock)
    values = iter([None, None, 7])
    for attempt in r.attempts():
        with attempt:
            attempt.set_result(next(values))
    assert attempt.result == 7 and attempt.number == 3 and r.metrics() == RetryMetrics(0, 1, 0, 0)
    count = 0
    for attempt in r.attempts():       # keeps matching: the loop ends after max_attempts, no exception
        with attempt:
            count += 1
            attempt.set_result(None)
    assert count == 3 and attempt.result is None and r.metrics() == RetryMetrics(0, 1, 0, 1)
    for attempt in r.attempts():       # a block that sets nothing is judged by exceptions alone
        with attempt:
            pass
    assert r.metrics() == RetryMetrics(1, 1, 0, 1)


def test_block_async_for_waits_with_sleep_async():
    clock = FakeClock()
    r = Retry(max_attempts=3, backoff=bo.constant(2.0), clock=clock)

    async def main(use_async_with):
        seen = []
        fn = flaky(2)
        async for attempt in r.attempts(idempotency_key="a-1"):
            if use_async_with:
                async with attempt:
                    await asyncio.sleep(0)
                    seen.append((current_attempt().number, current_attempt().idempotency_key))
                    fn()
            else:
                with attempt:
                    await asyncio.sleep(0)
                    seen.append((current_attempt().number, current_attempt().idempotency_key))
                    fn()
        return seen
    assert asyncio.run(main(False)) == [(1, "a-1"), (2, "a-1"), (3, "a-1")] and clock.monotonic() == 4.0
    assert asyncio.run(main(True)) == [(1, "a-1"), (2, "a-1"), (3, "a-1")] and clock.monotonic() == 8.0

    async def gives_up():
        async for attempt in r.attempts():
            with attempt:
                raise ConnectionError(f"failure {attempt.number}")
    with pytest.raises(ConnectionError, match="failure 3"):
        asyncio.run(gives_up())
    assert r.metrics() == RetryMetrics(0, 2, 0, 1)


def test_block_success_by_break_or_return_leaves_no_state_behind():
    clock = FakeClock()
    r = Retry(max_attempts=3, backoff=NO_WAIT, deadline=9.0, clock=clock)

    def first_ok():
        for attempt in r.attempts():
            with attempt:
                return attempt.number
    assert first_ok() == 1
    for attempt in r.attempts():
        with attempt:
            pass
        break
    assert current_attempt() is None and remaining() is None
    assert r.metrics() == RetryMetrics(2, 0, 0, 0)


def test_block_misuse_is_a_clear_error():
    r = Retry(clock=FakeClock())
    with pytest.raises(RuntimeError, match=r"attempt 1 was not run in a `with attempt:` block"):
        for attempt in r.attempts():
            pass
    it = r.attempts()
    attempt = next(it)
    with attempt:
        with pytest.raises(RuntimeError, match="already entered"):
            attempt.__enter__()
        with pytest.raises(RuntimeError, match="still running"):
            next(it)
    with pytest.raises(StopIteration):
        next(it)
    with pytest.raises(RuntimeError, match="without a matching __enter__"):
        attempt.__exit__(None, None, None)
    with pytest.raises(TypeError, match="idempotency_key must be a str or None, got 5"):
        r.attempts(idempotency_key=5)
    with pytest.raises(ValueError, match="non-empty"):
        r.attempts(idempotency_key="")
    keyed = Retry(idempotency_key=lambda order_id: f"o-{order_id}", clock=FakeClock())
    with pytest.raises(TypeError, match=r"from the call's arguments.*attempts\(idempotency_key=\.\.\.\)"):
        keyed.attempts()
    assert next(iter(keyed.attempts(idempotency_key="given"))).idempotency_key == "given"
    no_args = Retry(idempotency_key=lambda: "fixed", clock=FakeClock())
    for attempt in no_args.attempts():
        with attempt:
            assert current_attempt().idempotency_key == "fixed"


def test_block_loops_in_racing_threads_keep_their_own_state(fast_switching):
    r = Retry(max_attempts=3, backoff=NO_WAIT, clock=FakeClock())

    def body(i):
        _, seen = run_block(r, flaky(2))
        return {a.idempotency_key for _, a, _ in seen}, [n for n, _, _ in seen]
    results = race(8, body)
    assert all(len(keys) == 1 and numbers == [1, 2, 3] for keys, numbers in results)
    assert len({next(iter(keys)) for keys, _ in results}) == 8
    assert r.metrics() == RetryMetrics(0, 8, 0, 0)


# -- ready logging hooks ---------------------------------------------------------------------------------------

def test_log_retries_and_log_give_up_log_attempt_exception_and_delay(caplog):
    import logging
    from buttress.retry import log_give_up, log_retries
    clock = FakeClock()
    logger = logging.getLogger("test.retry.log")
    r = Retry(max_attempts=3, backoff=bo.constant(0.25), clock=clock,
              on_retry=log_retries(logger), on_give_up=log_give_up(logger))
    with caplog.at_level(logging.DEBUG, logger="test.retry.log"):
        with pytest.raises(ConnectionError):
            r.call(flaky(10))
    assert [(rec.levelno, rec.getMessage()) for rec in caplog.records] == [
        (logging.WARNING, "buttress.Retry: attempt 1 failed with ConnectionError: failure 1; retrying in 0.25s"),
        (logging.WARNING, "buttress.Retry: attempt 2 failed with ConnectionError: failure 2; retrying in 0.25s"),
        (logging.ERROR, "buttress.Retry: giving up after 3 attempts; last: ConnectionError: failure 3"),
    ]
    first, _, last = caplog.records
    assert (first.buttress_attempt, first.buttress_delay, first.buttress_exception) == (1, 0.25, "ConnectionError")
    assert first.buttress_retry is None and first.exc_info is None
    assert (last.buttress_attempt, last.buttress_exception) == (3, "ConnectionError")


def test_log_hooks_levels_names_adapters_exc_info_and_results(caplog):
    import logging
    from buttress.retry import log_give_up, log_retries
    clock = FakeClock()
    adapter = logging.LoggerAdapter(logging.getLogger("test.retry.adapter"), {})
    r = Retry(max_attempts=2, backoff=NO_WAIT, clock=clock, retry_on_result=lambda v: v is None,
              on_retry=log_retries("test.retry.byname", level="INFO", exc_info=True),
              on_give_up=log_give_up(adapter, level=logging.WARNING))
    with caplog.at_level(logging.DEBUG):
        assert r.call(lambda: None) is None
        with pytest.raises(ConnectionError):
            r.call(flaky(10))
    msgs = [(rec.name, rec.levelno, rec.getMessage(), rec.exc_info is not None) for rec in caplog.records]
    assert msgs == [
        ("test.retry.byname", logging.INFO, "buttress.Retry: attempt 1 failed with a result that retry_on_result "
         "matched; retrying in 0s", False),
        ("test.retry.adapter", logging.WARNING, "buttress.Retry: giving up after 2 attempts; last: a result that "
         "retry_on_result matched", False),
        ("test.retry.byname", logging.INFO, "buttress.Retry: attempt 1 failed with ConnectionError: failure 1; "
         "retrying in 0s", True),
        ("test.retry.adapter", logging.WARNING, "buttress.Retry: giving up after 2 attempts; last: "
         "ConnectionError: failure 2", False),
    ]
    caplog.clear()
    quiet = Retry(max_attempts=2, backoff=NO_WAIT, clock=clock, on_retry=log_retries("test.retry.quiet"))
    with caplog.at_level(logging.ERROR, logger="test.retry.quiet"):
        quiet.call(flaky(1))
    assert caplog.records == []


def test_log_hooks_work_in_blocks_and_retry_call_and_check_their_arguments(caplog):
    import logging
    from buttress.retry import log_give_up, log_retries, retry_call
    with caplog.at_level(logging.WARNING, logger="buttress.retry"):
        retry_call(flaky(1), jitter="none", base_delay=0.5, on_retry=log_retries(), clock=FakeClock())
        r = Retry(max_attempts=2, backoff=NO_WAIT, on_retry=log_retries(), clock=FakeClock())
        for attempt in r.attempts():
            with attempt:
                if attempt.number == 1:
                    raise TimeoutError()
    assert [rec.getMessage() for rec in caplog.records] == [
        "buttress.Retry: attempt 1 failed with ConnectionError: failure 1; retrying in 0.5s",
        "buttress.Retry: attempt 1 failed with TimeoutError; retrying in 0s"]
    for bad, exc, words in [(dict(logger=42), TypeError, "logger must be a logging.Logger"),
                            (dict(level="LOUD"), ValueError, "level must be a logging level"),
                            (dict(level=-1), ValueError, "level must be between 0 and 1000"),
                            (dict(level=True), TypeError, "level must be an int"),
                            (dict(exc_info=1), TypeError, "exc_info must be a bool")]:
        for make in (log_retries, log_give_up):
            with pytest.raises(exc, match=words):
                make(**bad)


# -- the first attempt's context is set eagerly (issue 16): every copy made during an attempt carries it --

def test_current_attempt_outside_any_retry_is_none_before_between_and_after_calls():
    r = Retry(max_attempts=3, backoff=NO_WAIT)                  # the system clock: the C clock read
    assert current_attempt() is None

    @r
    def quiet():
        return "no one reads"

    @r
    def reads():
        return current_attempt()

    assert quiet() == "no one reads" and current_attempt() is None
    a = reads()
    assert a.number == 1 and isinstance(a.idempotency_key, str) and a.elapsed >= 0.0
    assert current_attempt() is None
    with pytest.raises(ConnectionError):
        r(flaky(5))()
    assert current_attempt() is None


@pytest.mark.parametrize("clock", [None, FakeClock(start=5.0)], ids=["system", "fake"])
def test_a_nested_retry_inside_a_retried_call_sees_its_own_attempts(clock):
    outer = Retry(max_attempts=2, backoff=NO_WAIT, clock=clock)
    inner = Retry(max_attempts=3, backoff=NO_WAIT, clock=clock)
    seen, quiet_inner = [], inner(lambda: "quiet")               # nobody reads inside this one

    @outer
    def body():
        assert quiet_inner() == "quiet"
        before = current_attempt()                              # read after an inner call ended
        assert inner(flaky(2, log=seen))() == "ok"              # fails twice
        after = current_attempt()
        assert (after.number, after.idempotency_key) == (before.number, before.idempotency_key)

        @inner
        def leaf():
            return current_attempt()
        mine = leaf()
        assert mine.idempotency_key not in (before.idempotency_key, seen[0][1].idempotency_key)
        assert current_attempt().idempotency_key == before.idempotency_key
        return before

    first = body()
    assert first.number == 1
    assert [a.number for _, a in seen] == [1, 2, 3]
    assert len({a.idempotency_key for _, a in seen}) == 1 and seen[0][1].idempotency_key != first.idempotency_key
    if clock is not None:
        assert first.elapsed == 0.0


def test_the_key_read_in_a_first_attempt_is_the_key_of_the_retries():
    r = Retry(max_attempts=3, backoff=NO_WAIT)
    keys = []

    @r
    def pay():
        a = current_attempt()
        keys.append((a.number, a.idempotency_key))
        if a.number < 3:
            raise ConnectionError("again")
        return "paid"

    assert pay() == "paid"
    assert [n for n, _ in keys] == [1, 2, 3] and len({k for _, k in keys}) == 1
    assert pay() == "paid" and keys[3][1] != keys[0][1]          # a new logical call, a new key


def test_a_task_spawned_inside_an_attempt_sees_the_right_attempt():
    r = Retry(max_attempts=2, backoff=NO_WAIT)
    spawned = []

    async def child():
        return current_attempt()

    @r
    def start_child():                                          # sync, called from a coroutine
        spawned.append(asyncio.ensure_future(child()))
        return current_attempt()

    async def main():
        mine = start_child()
        theirs = await spawned[0]                               # it runs after the attempt ended
        assert current_attempt() is None
        return mine, theirs

    mine, theirs = asyncio.run(main())
    assert theirs is not None and (theirs.number, theirs.idempotency_key) == (mine.number, mine.idempotency_key)


def test_a_thread_given_a_copied_context_and_a_timeout_worker_see_the_attempt():
    import contextvars
    import threading
    r = Retry(max_attempts=3, backoff=NO_WAIT)
    seen = []

    @r
    def handoff():
        ctx = contextvars.copy_context()                        # nobody read the attempt before
        t = threading.Thread(target=lambda: seen.append(ctx.run(current_attempt)))
        t.start()
        t.join()
        return current_attempt()

    mine = handoff()
    assert seen[0].idempotency_key == mine.idempotency_key

    timed_keys = []

    def slow_part():
        timed_keys.append((current_attempt().number, current_attempt().idempotency_key))
        if len(timed_keys) < 2:
            raise ConnectionError("worker failed")
        return "done"

    pipeline = buttress.Pipeline(r, buttress.Timeout(5.0))     # the worker thread gets a copied context
    assert pipeline(slow_part)() == "done"
    assert [n for n, _ in timed_keys] == [1, 2] and len({k for _, k in timed_keys}) == 1


def test_work_handed_to_a_copied_context_sees_attempt_1_and_its_key_before_anyone_read_it():
    # issue 16: with the lazily set context, a sync function that ran asyncio.run(charge(order)), or handed
    # work to copy_context() / a thread, showed that work current_attempt() None in attempt 1 -- no
    # idempotency key -- and the key only from attempt 2 on: a possible double charge. Nobody reads the
    # attempt in the retried function itself here.
    import contextvars
    import threading
    r = Retry(max_attempts=3, backoff=NO_WAIT)
    sent = []

    async def charge(order):
        a = current_attempt()
        sent.append(("task", order, a and (a.number, a.idempotency_key)))

    def in_thread(ctx):
        box = []
        t = threading.Thread(target=lambda: box.append(ctx.run(current_attempt)))
        t.start()
        t.join()
        return box[0]

    @r
    def pay(order):
        asyncio.run(charge(order))
        a = contextvars.copy_context().run(current_attempt)
        sent.append(("copy", order, a and (a.number, a.idempotency_key)))
        a = in_thread(contextvars.copy_context())
        sent.append(("thread", order, a and (a.number, a.idempotency_key)))
        if len(sent) <= 3:
            raise ConnectionError("lost reply")
        return "paid"

    assert pay("o-17") == "paid"
    assert [(where, n) for where, _, (n, _) in sent] == [
        ("task", 1), ("copy", 1), ("thread", 1), ("task", 2), ("copy", 2), ("thread", 2)]
    keys = {key for _, _, (_, key) in sent}
    assert len(keys) == 1 and isinstance(keys.pop(), str)
    assert current_attempt() is None


def test_work_handed_to_a_copy_carries_a_derived_key_in_every_attempt():
    import contextvars
    r = Retry(max_attempts=2, backoff=NO_WAIT, idempotency_key=lambda order: f"charge-{order}")
    seen = []

    async def charge():
        return current_attempt()

    @r
    def pay(order):
        seen.append(asyncio.run(charge()))
        seen.append(contextvars.copy_context().run(current_attempt))
        if len(seen) == 2:
            raise ConnectionError("lost reply")
        return "paid"

    assert pay("o-9") == "paid"
    assert [(a.number, a.idempotency_key) for a in seen] == [(1, "charge-o-9")] * 2 + [(2, "charge-o-9")] * 2


def test_a_context_copied_before_the_attempt_does_not_see_it():
    import contextvars
    r = Retry(max_attempts=2, backoff=NO_WAIT)
    before = contextvars.copy_context()

    @r
    def body():
        return before.run(current_attempt), current_attempt()

    theirs, mine = body()
    assert theirs is None and mine.number == 1


def test_deep_nesting_keeps_every_attempt():
    r = Retry(max_attempts=2, backoff=NO_WAIT)
    keys = []

    def level(n):
        if n == 0:
            return current_attempt().idempotency_key
        key = r(level)(n - 1)
        keys.append((n, current_attempt().idempotency_key))
        return key

    deepest = r(level)(45)                                      # 46 nested first attempts
    assert len({k for _, k in keys}) == len(keys) == 45 and deepest not in {k for _, k in keys}
    assert current_attempt() is None


def test_threads_each_see_their_own_attempts(fast_switching):
    r = Retry(max_attempts=3, backoff=NO_WAIT)

    def body(i):
        out = []
        for j in range(200):
            @r
            def fn():
                a = current_attempt()
                out.append(a.idempotency_key)
                if j % 3 == 0 and a.number == 1:
                    raise ConnectionError("retry me")
                return a.idempotency_key
            key = fn()
            assert out[-1] == key and current_attempt() is None
        return len(set(out))

    assert race(8, body) == [200] * 8


def test_a_thread_pool_bulkhead_worker_sees_the_attempt_nobody_read_before():
    pool = buttress.ThreadPoolBulkhead(max_workers=2)
    r = Retry(max_attempts=3, backoff=NO_WAIT)
    seen = []

    def work():
        a = current_attempt()
        seen.append((a.number, a.idempotency_key))
        if a.number == 1:
            raise ConnectionError("worker failed")
        return a.idempotency_key

    @r
    def hand_off():
        return pool.call(work)          # the copy is the first to need the attempt

    key = hand_off()
    assert [n for n, _ in seen] == [1, 2] and {k for _, k in seen} == {key}
    pool.shutdown()
