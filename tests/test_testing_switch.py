"""buttress.set_testing: every pattern built while it is on uses the testing clock and never sleeps for real.

Each test builds its objects with the default clock (clock=None) inside the switch and shows, by behaviour
on the fake clock, that the object (and the compiled core under it) reads that clock. The system clock's
sleeps are made to fail meanwhile, so a real sleep anywhere is a test failure, not a slow test.
"""
from __future__ import annotations

import asyncio
import threading

import pytest

import buttress
from buttress import (Bulkhead, BulkheadFullError, CircuitBreaker, CircuitOpenError, FakeClock,
                      FixedWindowLimiter, KeyedLimiter, LeakyBucket, LoadShedder, MultiLimiter, RateLimitExceeded,
                      Retry, RetryBudget, SlidingWindowLimiter, SystemClock, Timeout, TimeoutExceeded, TokenBucket,
                      current_attempt)
from buttress import backoff as bo
from buttress.clock import SYSTEM_CLOCK, is_system_clock, resolve_clock
from buttress.clock import testing_clock as installed_clock
from buttress.retry import retry_call, retry_call_async
from buttress.testing import Testing as Handle, is_testing, set_testing


class RealSleep(AssertionError):
    pass


@pytest.fixture
def no_real_sleep(monkeypatch):
    """The system clock's sleeps raise: anything sleeping for real fails the test."""
    def sleep(seconds):
        raise RealSleep(f"slept {seconds} s for real")

    async def sleep_async(seconds):
        raise RealSleep(f"slept {seconds} s for real (async)")
    monkeypatch.setattr(SystemClock, "sleep", staticmethod(sleep))
    monkeypatch.setattr(SystemClock, "sleep_async", staticmethod(sleep_async))


@pytest.fixture
def clock(no_real_sleep):
    with set_testing() as c:
        yield c
    assert not is_testing()


# -- the switch itself ---------------------------------------------------------------------------------------

def test_the_switch_decides_what_clock_none_means_and_restores_it():
    assert not is_testing() and resolve_clock(None) is SYSTEM_CLOCK and is_system_clock(None)
    mine = FakeClock(start=100.0)
    with set_testing(clock=mine) as c:
        assert c is mine and is_testing() and installed_clock() is mine
        assert resolve_clock(None) is mine and not is_system_clock(None)
        explicit = FakeClock()
        assert resolve_clock(explicit) is explicit          # an explicit clock= is kept
        with set_testing() as inner:                          # nested: a new FakeClock, then back
            assert isinstance(inner, FakeClock) and inner is not mine and resolve_clock(None) is inner
        assert resolve_clock(None) is mine
        with set_testing(False) as off:                       # off inside on
            assert off is None and resolve_clock(None) is SYSTEM_CLOCK
        assert resolve_clock(None) is mine
    assert not is_testing() and resolve_clock(None) is SYSTEM_CLOCK


def test_the_switch_as_a_plain_call():
    handle = set_testing(True)
    try:
        assert isinstance(handle, Handle) and isinstance(handle.clock, FakeClock)
        assert resolve_clock(None) is handle.clock
        assert buttress.testing.is_testing()
    finally:
        set_testing(False)
    assert not is_testing()
    handle = set_testing()
    handle.restore()
    handle.restore()                  # a second restore does nothing
    assert not is_testing()


@pytest.mark.parametrize("args, kwargs, exc, words", [
    (("yes",), {}, TypeError, "on must be a bool, got 'yes'"),
    ((1,), {}, TypeError, "on must be a bool, got 1"),
    ((False,), {"clock": FakeClock()}, ValueError, "clock must be None when turning testing mode off"),
    ((), {"clock": 42}, TypeError, "clock must provide monotonic()"),
])
def test_bad_arguments(args, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        set_testing(*args, **kwargs)
    assert not is_testing()


def test_threads_started_inside_see_it(clock):
    seen = []
    t = threading.Thread(target=lambda: seen.append(resolve_clock(None)))
    t.start()
    t.join()
    assert seen == [clock]


# -- every pattern ---------------------------------------------------------------------------------------------

def test_circuit_breaker_times_open_duration_on_the_testing_clock(clock):
    cb = CircuitBreaker(name="t", window_size=2, minimum_calls=2, open_duration=30.0)
    assert cb.clock is clock
    for _ in range(2):
        with pytest.raises(ValueError):
            cb.call(lambda: (_ for _ in ()).throw(ValueError()))
    assert cb.state.name == "OPEN"
    clock.advance(10.0)
    with pytest.raises(CircuitOpenError) as info:
        cb.call(lambda: 1)
    assert info.value.retry_after == pytest.approx(20.0)    # the core measures on the fake clock
    clock.advance(20.0)
    assert cb.state.name == "HALF_OPEN"


@pytest.mark.parametrize("make", [
    lambda: TokenBucket(rate=1.0, capacity=1),
    lambda: LeakyBucket(rate=1.0, queue_size=2),
    lambda: FixedWindowLimiter(limit=1, window=1.0),
    lambda: SlidingWindowLimiter(limit=1, window=1.0),
    lambda: MultiLimiter(TokenBucket(rate=1.0, capacity=1), FixedWindowLimiter(limit=5, window=1.0)),
], ids=["token", "leaky", "fixed", "sliding", "multi"])
def test_limiters_refill_and_wait_on_the_testing_clock(clock, make):
    lim = make()
    taken = 0
    while lim.try_acquire(1):
        taken += 1
        assert taken < 10
    assert taken >= 1
    clock.advance(2.0)                       # a sliding window weighs the previous window in too
    assert lim.try_acquire(1)
    start = clock.monotonic()
    lim.acquire(1, timeout=5.0)              # waits by sleeping on the fake clock
    assert 0 < clock.monotonic() - start <= 2.0

    async def waits():
        await lim.acquire_async(1, timeout=5.0)
    start = clock.monotonic()
    asyncio.run(waits())                     # the fake clock's autojump ends the wait
    assert 0 < clock.monotonic() - start <= 2.0


def test_keyed_limiter_refills_on_the_testing_clock(clock):
    kl = KeyedLimiter(rate=1.0, capacity=1)
    assert kl.try_acquire("a") and not kl.try_acquire("a")
    clock.advance(1.0)
    assert kl.try_acquire("a")


def test_a_limiter_built_outside_cannot_join_a_pipeline_with_one_built_inside(no_real_sleep):
    outside = TokenBucket(rate=1.0)
    with set_testing():
        inside = TokenBucket(rate=1.0)
        with pytest.raises(ValueError):
            MultiLimiter(outside, inside)


def test_retry_waits_and_deadline_on_the_testing_clock(clock):
    r = Retry(max_attempts=4, backoff=bo.constant(2.0), deadline=5.0)
    calls = []

    def fn():
        calls.append((clock.monotonic(), buttress.remaining()))
        raise ConnectionError()
    with pytest.raises(ConnectionError):
        r.call(fn)
    assert calls == [(0.0, 5.0), (2.0, 3.0), (4.0, 1.0)]       # the 3rd wait would reach the deadline
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, ttl=10.0)
    assert budget.balance == 1 and budget.try_withdraw() and budget.balance == 0
    clock.advance(10.0)
    assert budget.balance == 1                                   # the withdrawal expired on the fake clock


def test_retry_call_and_blocks_on_the_testing_clock(clock):
    n = iter(range(10))

    def fn():
        if next(n) < 2:
            raise ConnectionError()
        return current_attempt().number
    assert retry_call(fn, jitter="none") == 3 and clock.monotonic() == 3.0
    r = Retry(max_attempts=3, backoff=bo.constant(1.0))
    for attempt in r.attempts():
        with attempt:
            if attempt.number < 3:
                raise ConnectionError()
    assert clock.monotonic() == 5.0

    async def main():
        async def afn():
            if next(m) < 1:
                raise ConnectionError()
            return "ok"
        return await retry_call_async(afn, jitter="none", base_delay=4.0)
    m = iter(range(10))
    assert asyncio.run(main()) == "ok" and clock.monotonic() == 9.0


def test_a_module_level_retry_built_before_the_switch_waits_on_the_testing_clock(no_real_sleep):
    r = Retry(max_attempts=3, backoff=bo.constant(7.0))         # the default clock, before the switch
    explicit = Retry(max_attempts=2, backoff=bo.constant(7.0), clock=SystemClock())
    with set_testing() as clock:
        with pytest.raises(ConnectionError):
            r.call(lambda: (_ for _ in ()).throw(ConnectionError()))
        assert clock.monotonic() == 14.0

        async def main():
            with pytest.raises(ConnectionError):
                await r.call_async(_afail)
        asyncio.run(main())
        assert clock.monotonic() == 28.0
        with pytest.raises(RealSleep):          # an explicit clock= is the user's choice: kept
            explicit.call(lambda: (_ for _ in ()).throw(ConnectionError()))


async def _afail():
    raise ConnectionError()


def test_bulkhead_async_wait_times_out_on_the_testing_clock(clock):
    bh = Bulkhead(max_concurrent=1, max_wait=3.0)

    async def main():
        holder = asyncio.Event()

        async def hold():
            async with bh:
                holder.set()
                await clock.sleep_async(100.0)
        task = asyncio.create_task(hold())
        await holder.wait()
        start = clock.monotonic()
        with pytest.raises(BulkheadFullError):
            async with bh:
                pass
        waited = clock.monotonic() - start
        task.cancel()
        return waited
    assert asyncio.run(main()) == 3.0


def test_timeout_fires_on_the_testing_clock(clock):
    t = Timeout(5.0)

    async def slow():
        await clock.sleep_async(60.0)

    async def main():
        with pytest.raises(TimeoutExceeded):
            await t.call_async(slow)
    asyncio.run(main())
    assert clock.monotonic() == 5.0
    assert Timeout(2.0).call(buttress.remaining) == 2.0       # the deadline is on the fake clock


def test_load_shedder_hedge_fallback_chaos_throttle_health_use_it(clock):
    from buttress.adaptive import AdaptiveThrottle
    from buttress.chaos import Chaos
    from buttress.fallback import StaleCacheFallback
    from buttress.health import HealthRegistry
    from buttress.hedge import Hedge
    assert LoadShedder(max_in_flight=4)._clock is clock
    assert Hedge(delay=0.05)._clock is clock
    assert HealthRegistry()._clock is clock
    chaos = Chaos(latency_rate=1.0, latency=2.5, seed=1)
    start = clock.monotonic()
    assert chaos.call(lambda: "ok") == "ok" and clock.monotonic() - start == 2.5
    cache = StaleCacheFallback(max_age=60.0)
    assert cache.call(lambda: "fresh") == "fresh"
    clock.advance(59.0)
    assert cache.call(lambda: (_ for _ in ()).throw(ConnectionError())) == "fresh"
    clock.advance(2.0)
    with pytest.raises(ConnectionError):
        cache.call(lambda: (_ for _ in ()).throw(ConnectionError()))
    throttle = AdaptiveThrottle(window=60.0)        # its compiled window counts on the fake clock
    with pytest.raises(ConnectionError):
        throttle.call(lambda: (_ for _ in ()).throw(ConnectionError()))
    assert throttle.metrics().requests == 1
    clock.advance(61.0)
    assert throttle.metrics().requests == 0


def test_objects_built_after_the_switch_is_off_use_the_system_clock_again(no_real_sleep):
    with set_testing():
        pass
    assert TokenBucket(rate=1.0)._clock is SYSTEM_CLOCK and Retry()._clock is SYSTEM_CLOCK
