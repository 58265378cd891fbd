"""A usage sample of buttress's public API, checked with `mypy --strict` by tests/test_typing.py and run
by it too (so the sample is real code). Not collected by pytest (no test_ prefix).

`assert_type` fails the type check when an expression's static type is not the one given (an `Any`
leaking out of the API fails it as well), so these lines pin the types users see.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import buttress
from buttress import backoff

if TYPE_CHECKING:
    from typing_extensions import assert_type
else:
    def assert_type(value, typ):
        return value

clock = buttress.FakeClock()
assert_type(clock.monotonic(), float)
assert_type(clock.monotonic_ns(), int)
clock.advance(0.5)

# -- circuit breaker -------------------------------------------------------------------------------------
cb = buttress.CircuitBreaker(name="payment", failure_rate_threshold=0.5, window_size=20, minimum_calls=10,
                             open_duration=lambda attempt: 2.0 ** attempt, clock=clock)


@cb
def charge(amount: int) -> str:
    return f"charged {amount}"


assert_type(charge(3), str)
assert_type(cb.state, buttress.State)
metrics = cb.metrics()
assert_type(metrics.failure_rate, float)
assert_type(metrics.calls, int)


def on_change(event: buttress.circuit_breaker.BreakerEvent) -> None:
    assert_type(event.new, "buttress.State | None")


cb.on("state_change", on_change)
permit = cb.try_acquire()
if permit is not None:
    permit.success()
cb.force_open()
try:
    charge(1)
except buttress.CircuitOpenError as exc:
    assert_type(exc.retry_after, "float | None")
cb.reset()

# -- retry and backoff -----------------------------------------------------------------------------------
schedule = backoff.exponential(initial=0.1, multiplier=2.0, maximum=30.0, jitter="full")
assert_type(schedule, backoff.Backoff)
assert_type(schedule.delay(1), float)
retry = buttress.Retry(max_attempts=3, backoff=schedule, retry_on=(ConnectionError,), deadline=10.0,
                       budget=buttress.RetryBudget(ratio=0.2), clock=clock)
calls: list[int] = []


@retry
def flaky() -> int:
    calls.append(1)
    attempt = buttress.current_attempt()
    assert attempt is not None
    assert_type(attempt.idempotency_key, str)
    if len(calls) < 2:
        raise ConnectionError("try again")
    return attempt.number


assert_type(flaky(), int)
assert_type(buttress.current_attempt(), "buttress.Attempt | None")

# -- rate limiting ---------------------------------------------------------------------------------------
tb = buttress.TokenBucket(rate=100.0, capacity=200, clock=clock)
assert_type(tb.try_acquire(1), bool)
assert_type(tb.reserve(1), float)
tb.acquire(1, timeout=None)
kl = buttress.KeyedLimiter(rate=10.0, capacity=20, max_keys=1000, clock=clock)
assert_type(kl.try_acquire("tenant-1"), bool)
assert_type(kl.try_acquire(42), bool)
assert_type(kl.wait_time(b"key"), float)
try:
    buttress.TokenBucket(rate=1.0, capacity=1, clock=clock).acquire(1, timeout=0.0)
    buttress.TokenBucket(rate=1.0, capacity=1, clock=clock).acquire(1, timeout=0.0)
except buttress.RateLimitExceeded as exc:
    assert_type(exc.retry_after, "float | None")

# -- bulkhead, timeout, fallback, load shedding ----------------------------------------------------------
bh = buttress.Bulkhead(max_concurrent=2, max_wait=0.0)
assert_type(bh.try_acquire(), bool)
bh.release()
with bh:
    pass
timeout = buttress.Timeout(2.0, clock=clock)
fallback = buttress.Fallback("cached", on=(ConnectionError,))


@fallback
def fetch() -> str:
    raise ConnectionError


assert fetch() == "cached"
shed = buttress.LoadShedder(max_in_flight=100)
with shed.admit(buttress.Priority.LOW):
    pass
assert_type(buttress.Priority.CRITICAL > buttress.Priority.HIGH, bool)


async def main() -> int:
    @timeout
    async def slow() -> int:
        await clock.sleep_async(1.0)
        return 1

    async with bh:
        value = await slow()
    assert_type(value, int)
    assert_type(buttress.remaining(), "float | None")
    return value


assert asyncio.run(main()) == 1

# -- errors ----------------------------------------------------------------------------------------------
err: buttress.ButtressError = buttress.TimeoutExceeded(timeout=2.0)
assert isinstance(err, TimeoutError)
rejected: list[buttress.Rejected] = [buttress.BulkheadFullError(), buttress.Overloaded(retry_after=1.0)]
assert_type(buttress.__version__, str)
assert_type(buttress.IMPLEMENTATION, str)
