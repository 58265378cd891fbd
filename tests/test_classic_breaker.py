"""The classic breaker (DESIGN §6, issue 17): `CircuitBreaker(failure_threshold=N, success_threshold=M,
open_duration=...)` opens after N consecutive failures, closes after M consecutive half-open successes,
re-opens on one half-open failure. The semantics it shares with the rate breaker run on both in
tests/test_circuit_breaker.py and tests/test_breaker_behaviour.py (the `kind` fixture); here is what is
its own. Timing on FakeClock; races with real threads and exact counts."""
import asyncio
import inspect
import threading

import pytest
from hypothesis import given, settings, strategies as st

from buttress import CircuitBreaker, CircuitOpenError, FakeClock, RateLimitExceeded, State
from helpers import race

S = 1_000_000_000


class Boom(Exception):
    pass


class Halt(BaseException):
    pass


def ok():
    return "ok"


def boom():
    raise Boom("boom")


def classic(clock=None, **kw):
    kw.setdefault("failure_threshold", 5)
    return CircuitBreaker(name="classic", clock=clock or FakeClock(), **kw)


def fail(cb, n=1):
    for _ in range(n):
        with pytest.raises(Boom):
            cb.call(boom)


def succeed(cb, n=1):
    for _ in range(n):
        assert cb.call(ok) == "ok"


# -- closed: N consecutive failures ------------------------------------------------------------------------

def test_opens_after_n_consecutive_failures_and_a_success_ends_the_run():
    cb = classic(failure_threshold=5)
    fail(cb, 4)
    succeed(cb)
    fail(cb, 4)
    assert cb.state is State.CLOSED
    assert (cb.metrics().calls, cb.metrics().failures) == (4, 4)
    fail(cb)
    assert cb.state is State.OPEN
    m = cb.metrics()
    assert (m.state, m.calls, m.failures, m.failure_rate, m.slow_call_rate) == (State.OPEN, 5, 5, -1.0, -1.0)


@pytest.mark.parametrize("exc", [KeyError("ignored"), RateLimitExceeded(), Halt()],
                         ids=["ignored", "rejection", "base-exception"])
def test_what_is_no_outcome_neither_ends_nor_extends_the_run(exc):
    cb = classic(failure_threshold=3, ignore=(KeyError,))

    def raiser():
        raise exc

    fail(cb, 2)
    with pytest.raises(type(exc)):
        cb.call(raiser)
    assert cb.metrics().failures == 2 and cb.state is State.CLOSED
    fail(cb)
    assert cb.state is State.OPEN


def test_record_result_failures_count_in_the_run():
    cb = classic(failure_threshold=2, record_result=lambda r: r is None)
    cb.call(lambda: None)
    fail(cb)
    assert cb.state is State.OPEN


def test_an_unmatched_exception_is_a_success_and_ends_the_run():
    cb = classic(failure_threshold=2, record=(Boom,))
    fail(cb)
    with pytest.raises(ValueError):
        cb.call(lambda: int("x"))
    fail(cb)
    assert cb.state is State.CLOSED


def test_consecutive_is_the_order_results_are_recorded_not_acquired():
    cb = classic(failure_threshold=3)
    a, b, c, d = (cb.try_acquire() for _ in range(4))
    a.failure(Boom())
    b.failure(Boom())
    d.success()                 # recorded third: ends the run although acquired last
    c.failure(Boom())
    assert cb.state is State.CLOSED and cb.metrics().failures == 1


def test_a_success_of_an_older_generation_cannot_end_the_run():
    cb = classic(failure_threshold=3)
    stale = cb.try_acquire()
    cb.reset()
    fail(cb, 2)
    stale.success()             # dropped
    fail(cb)
    assert cb.state is State.OPEN


def test_metrics_only_counts_the_run_and_never_opens():
    cb = classic(failure_threshold=2)
    cb.metrics_only()
    fail(cb, 10)
    assert cb.state is State.METRICS_ONLY and cb.metrics().failures == 10
    cb.close()
    assert cb.metrics().failures == 0
    fail(cb, 2)
    assert cb.state is State.OPEN


@pytest.mark.parametrize("form", ["decorator", "call", "call_async", "async_decorator", "with", "async_with", "permit",
                                  "generator"])
def test_every_form_counts_toward_the_threshold(form):
    cb = classic(failure_threshold=3)

    @cb
    def sync_boom():
        raise Boom()

    @cb
    async def async_boom():
        raise Boom()

    @cb
    def gen_boom():
        yield 1
        raise Boom()

    async def one_async():
        if form == "call_async":
            await cb.call_async(async_boom.__wrapped__)
        elif form == "async_decorator":
            await async_boom()
        else:
            async with cb:
                raise Boom()

    for _ in range(3):
        if form == "permit":
            cb.try_acquire().failure(Boom())
            continue
        with pytest.raises(Boom):
            if form == "decorator":
                sync_boom()
            elif form == "call":
                cb.call(boom)
            elif form == "with":
                with cb:
                    raise Boom()
            elif form == "generator":
                list(gen_boom())
            else:
                asyncio.run(one_async())
    assert cb.state is State.OPEN


# -- half-open: M consecutive successes close, one failure re-opens ------------------------------------------

def test_success_threshold_successes_close_and_one_failure_reopens():
    clock = FakeClock()
    seen = []
    cb = classic(clock, failure_threshold=2, success_threshold=3, open_duration=lambda a: 10.0 * a)
    cb.on("state_change", lambda e: seen.append((e.old.name, e.new.name)))
    fail(cb, 2)
    clock.advance(10)
    succeed(cb, 2)
    assert cb.state is State.HALF_OPEN
    assert (cb.metrics().calls, cb.metrics().failures) == (2, 0)
    fail(cb)                                     # one failure re-opens, attempt 2: 20 s
    assert cb.state is State.OPEN and cb.attempt == 2
    clock.advance(19.9)
    assert cb.state is State.OPEN
    clock.advance(0.1)
    succeed(cb, 3)
    assert cb.state is State.CLOSED and cb.attempt == 0
    assert seen == [("CLOSED", "OPEN"), ("OPEN", "HALF_OPEN"), ("HALF_OPEN", "OPEN"), ("OPEN", "HALF_OPEN"),
                    ("HALF_OPEN", "CLOSED")]


def test_half_open_admits_success_threshold_probes_by_default():
    clock = FakeClock()
    cb = classic(clock, failure_threshold=1, success_threshold=2, open_duration=1.0)
    fail(cb)
    clock.advance(1)
    permits = [cb.try_acquire() for _ in range(3)]
    assert [p is not None for p in permits] == [True, True, False]
    permits[0].success()
    permits[1].success()
    assert cb.state is State.CLOSED


def test_a_half_open_failure_after_the_verdict_is_stale():
    clock = FakeClock()
    cb = classic(clock, failure_threshold=1, success_threshold=1, half_open_calls=2, open_duration=1.0)
    fail(cb)
    clock.advance(1)
    late = cb.try_acquire()
    succeed(cb)
    assert cb.state is State.CLOSED
    late.failure(Boom())
    assert cb.state is State.CLOSED and cb.metrics().failures == 0


def test_defaults_and_the_timeout_alias():
    cb = CircuitBreaker(failure_threshold=5, timeout=30)
    c = cb.conf
    assert (c.failure_threshold, c.success_threshold, c.half_open_calls, c.open_ns, c.slow_ns) == (5, 1, 1, 30 * S, -1)
    assert not cb.timing                                  # nothing to time: no clock read on the fast path
    assert CircuitBreaker(failure_threshold=5).conf.open_ns == 60 * S
    assert CircuitBreaker(failure_threshold=5, success_threshold=2, half_open_calls=4).conf.half_open_calls == 4
    assert CircuitBreaker(failure_threshold=5, timeout=lambda a: 2.0 * a).conf.open_fn(3) == 6.0


def test_the_signature_shows_the_documented_defaults():
    params = inspect.signature(CircuitBreaker).parameters
    shown = {n: repr(params[n].default) for n in ("failure_rate_threshold", "window", "window_size",
                                                   "minimum_calls", "open_duration", "half_open_calls")}
    assert shown == {"failure_rate_threshold": "0.5", "window": "'count'", "window_size": "100",
                     "minimum_calls": "100", "open_duration": "60.0", "half_open_calls": "10"}
    rate = CircuitBreaker(window_size=params["window_size"].default)     # the default passed back is the default
    assert rate.conf.window_size == 100 and rate.conf.failure_threshold == 0


# -- bad arguments ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, value", [("failure_rate_threshold", 0.5), ("slow_call_rate_threshold", 1.0),
                                            ("slow_call_duration", 60.0), ("slow_call_duration", None),
                                            ("window", "count"), ("window_size", 100), ("minimum_calls", 3)])
def test_mixing_with_a_rate_setting_names_both(setting, value):
    with pytest.raises(ValueError, match=f"failure_threshold .*cannot be mixed with {setting}"):
        CircuitBreaker(failure_threshold=5, **{setting: value})


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(success_threshold=2), ValueError, "success_threshold=2 belongs to the classic breaker: give failure_threshold"),
    (dict(timeout=30), ValueError, "timeout=30 is the classic breaker's alias of open_duration: give failure_threshold"),
    (dict(failure_threshold=5, timeout=30, open_duration=30), ValueError, "timeout and open_duration are the same"),
    (dict(failure_threshold=5, success_threshold=3, half_open_calls=2), ValueError,
     "half_open_calls=2 is below success_threshold=3"),
    (dict(failure_threshold=0), ValueError, "failure_threshold must be >= 1, got 0"),
    (dict(failure_threshold=2.0), TypeError, r"failure_threshold must be an int, got 2.0 \(float\)"),
    (dict(failure_threshold=True), TypeError, "failure_threshold must be an int, got True"),
    (dict(failure_threshold=2**63), ValueError, "failure_threshold must be >= 1 and <= 9223372036854775807"),
    (dict(failure_threshold=5, success_threshold=0), ValueError, "success_threshold must be between 1 and 30000"),
    (dict(failure_threshold=5, success_threshold=30001), ValueError, "success_threshold must be between 1 and 30000"),
    # errors name the parameter the caller passed: timeout (the classic alias), not open_duration
    (dict(failure_threshold=5, timeout=-1), ValueError, "^timeout must be a finite number >= 0"),
    (dict(failure_threshold=5, timeout=float("nan")), ValueError, "^timeout must be a finite number.*got nan"),
    (dict(failure_threshold=5, timeout=True), TypeError, "^timeout must be a number"),
    (dict(failure_threshold=5, timeout=lambda: 1), TypeError, r"^timeout must accept 1 positional argument"),
    (dict(failure_threshold=5, open_duration=float("nan")), ValueError, "^open_duration must be a finite number"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CircuitBreaker(name="bad", **kwargs)


@pytest.mark.parametrize("kwargs", [dict(failure_threshold=0), dict(failure_threshold=5, window_size=3),
                                    dict(success_threshold=1), dict(failure_threshold=3, success_threshold=2.5),
                                    dict(timeout=1.0), dict(failure_threshold=1, success_threshold=4, half_open_calls=3)])
def test_compiled_and_twin_refuse_alike(both, kwargs):
    out = []
    for impl in both:
        try:
            impl.breaker.BreakerCore(name="x", **kwargs)
        except (ValueError, TypeError) as exc:
            out.append((type(exc).__name__, str(exc)))
    assert len(out) == 2 and out[0] == out[1]


# -- concurrency --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("threshold, opens", [(16, True), (17, False)])
def test_racing_failures_open_exactly_at_the_threshold(fast_switching, threshold, opens):
    for _ in range(30):
        cb = classic(failure_threshold=threshold)
        changes = []
        cb.on("state_change", changes.append)

        def body(i):
            with pytest.raises(Boom):
                cb.call(boom)

        race(16, body)
        assert (cb.state is State.OPEN) == opens and len(changes) == int(opens)
        assert cb.metrics().failures == 16


def test_a_racing_success_is_never_lost(fast_switching):
    # each thread alternates failure, success: after a thread's failure its next record is a success, so
    # a stretch of records with no success holds at most one failure per thread: 8 threads can make a run
    # of 8, never 9. A success lost to a racing failure (a read-modify-write of the counter) would.
    for _ in range(10):
        cb = classic(failure_threshold=9)
        longest = []

        def body(i):
            for _ in range(300):
                with pytest.raises(Boom):
                    cb.call(boom)
                longest.append(cb.metrics().failures)
                cb.call(ok)

        race(8, body)
        assert cb.state is State.CLOSED and max(longest) <= 8


def test_half_open_admits_exactly_success_threshold_racing_probes(fast_switching):
    for _ in range(30):
        clock = FakeClock()
        cb = classic(clock, failure_threshold=1, success_threshold=3, open_duration=1.0)
        fail(cb)
        clock.advance(1)
        admitted = []
        lock = threading.Lock()

        def body(i):
            try:
                cb.call(ok)
                with lock:
                    admitted.append(i)
            except CircuitOpenError:
                pass

        race(16, body)
        assert cb.state is State.CLOSED
        assert 3 <= len(admitted)      # the 3 probes, then calls admitted by the CLOSED breaker


# -- compiled and twin agree step by step -------------------------------------------------------------------

ops = st.lists(st.tuples(st.sampled_from(["ok", "fail", "ignore", "cancel", "hold", "finish", "advance", "state",
                                          "metrics", "reset", "metrics_only", "force_open"]),
                         st.integers(0, 4)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(threshold=st.integers(1, 4), successes=st.integers(1, 3), ops=ops)
def test_compiled_and_twin_agree(both, threshold, successes, ops):
    cores = [i.breaker.BreakerCore(name="d", failure_threshold=threshold, success_threshold=successes,
                                   open_duration=2.0, ignore=(KeyError,)) for i in both]
    b = both[0].breaker
    outcome = {"ok": b.SUCCESS, "fail": b.FAILURE, "ignore": b.IGNORED, "cancel": b.CANCELLED}
    held: list[list[int]] = [[], []]
    now = 0
    for op, n in ops:
        results = []
        for k, core in enumerate(cores):
            if op in outcome:
                token = core.acquire(now)
                if token >= 0:
                    core.record(token, outcome[op], now, now)
                results.append(token)
            elif op == "hold":
                token = core.acquire(now)
                if token >= 0:
                    held[k].append(token)
                results.append(token)
            elif op == "finish":
                if held[k]:
                    core.record(held[k].pop(n % len(held[k])), outcome["fail" if n % 2 else "ok"], now, now)
                results.append(None)
            elif op == "advance":
                results.append(None)
            elif op == "state":
                results.append(core.state_now(now))
            elif op == "metrics":
                results.append(core.metrics(now))
            elif op == "reset":
                results.append(core.reset(now))
            else:
                results.append(core.restart(3 if op == "force_open" else 5, now))
            results.append((core.load(), core.attempt))
        if op == "advance":
            now += n * S // 2
        assert results[:len(results) // 2] == results[len(results) // 2:], (op, results)


def test_the_classic_breaker_on_redis_says_it_cannot_be_shared():
    # the advice must work: window='time' with failure_threshold is itself a ValueError
    pytest.importorskip("redis")          # the store's URL is parsed by the Redis store (redis-py)
    with pytest.raises(ValueError) as e:
        CircuitBreaker(name="x", failure_threshold=2, store="redis://localhost:1/0")
    msg = str(e.value)
    assert "classic breaker (failure_threshold=2) cannot be shared through store='redis://localhost:1/0'" in msg
    assert "use the rate breaker with window='time'" in msg
    with pytest.raises(ValueError, match="cannot be mixed with window"):
        CircuitBreaker(name="x", failure_threshold=2, window="time")       # what the old advice led to
    with pytest.raises(ValueError, match="window='count' has no meaning across processes; pass window='time'"):
        CircuitBreaker(name="x", store="redis://localhost:1/0")
