"""A usage sample of buttress's public API, checked with `mypy --strict` by tests/test_typing.py and run
by it too (so the sample is real code). Not collected by pytest (no test_ prefix).

`assert_type` fails the type check when an expression's static type is not the one given (an `Any`
leaking out of the API fails it as well), so these lines pin the types users see.
"""
from __future__ import annotations

import asyncio
import importlib.util
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

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

# -- decorators keep the function's signature; .call / .call_async return fn's result type ---------------
# (each `add` below keeps (a: int, b: str = "x") -> tuple[int, str]; assigning it to an annotated variable
# fails the check if a decorator loses a parameter or the return type, and `_misuse` holds calls that
# must be type errors: if a decorator returned Any, their ignores would be unused, which --strict reports)
Add = Callable[[int, str], "tuple[int, str]"]


def add(a: int, b: str = "x") -> tuple[int, str]:
    return a, b


async def add_async(a: int, b: str = "x") -> tuple[int, str]:
    return a, b


async def count_to(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


limiters = [buttress.TokenBucket(rate=1000.0, capacity=1000, clock=clock),
            buttress.LeakyBucket(rate=1000.0, queue_size=1000, clock=clock),
            buttress.FixedWindowLimiter(limit=1000, window=1.0, clock=clock),
            buttress.SlidingWindowLimiter(limit=1000, window=1.0, clock=clock)]
limiters.append(buttress.MultiLimiter(limiters[0], limiters[2]))
hedge = buttress.Hedge(delay=10.0, clock=clock)
pipeline = buttress.Pipeline(buttress.Retry(max_attempts=2, clock=clock), limiters[0])
stale = buttress.StaleCacheFallback(max_age=60.0, clock=clock)
for limiter in limiters:
    limited: Add = limiter(add)
    assert limited(1, "y") == (1, "y")
    assert_type(limiter(add)(2), "tuple[int, str]")
    assert_type(limiter.call(add, 3, b="z"), "tuple[int, str]")
# one line per class (a loop over a tuple of them would check only what their common base declares)
decorated: list[Add] = [retry(add), timeout(add), fallback(add), hedge(add), pipeline(add), stale(add), tb(add)]
assert [f(1, "y") for f in decorated] == [(1, "y")] * len(decorated)
assert_type(retry(add)(5), "tuple[int, str]")
assert_type(buttress.Fallback((0, ""))(add)(6), "tuple[int, str]")
assert_type(retry.call(add, 4), "tuple[int, str]")
assert_type(timeout.call(add, 4), "tuple[int, str]")
assert_type(fallback.call(add, 4), "tuple[int, str]")
assert_type(hedge.call(add, 4), "tuple[int, str]")
assert_type(pipeline.call(add, 4), "tuple[int, str]")
assert_type(stale.call(add, 4), "tuple[int, str]")
assert_type(tb.call(add, 7), "tuple[int, str]")
assert_type(kl.call("tenant-2", add, 8), "tuple[int, str]")
breaker = buttress.CircuitBreaker(failure_threshold=5, clock=clock)
assert_type(breaker.call(add, 1), "tuple[int, str]")
assert_type(breaker.call(add, 1, b="z"), "tuple[int, str]")
guarded: Add = breaker(add)
assert_type(breaker(add)(2), "tuple[int, str]")
bulkheaded: Add = bh(add)
assert_type(bh(add)(2), "tuple[int, str]")
assert_type(bh.call(add, 1), "tuple[int, str]")
assert_type(bh.call(add, 1, b="z"), "tuple[int, str]")
shed_add: Add = shed(add)
assert_type(shed(add)(2), "tuple[int, str]")
assert_type(shed.call(add, 1), "tuple[int, str]")
assert_type(shed.call(add, 1, priority=buttress.Priority.HIGH), "tuple[int, str]")
with buttress.ThreadPoolBulkhead(max_workers=1, queue_size=1) as tp:
    assert_type(tp.call(add, 1), "tuple[int, str]")
    assert_type(tp.call(add, 1, timeout=5.0), "tuple[int, str]")
assert [f(1, "y") for f in (bulkheaded, shed_add)] == [(1, "y")] * 2


async def async_forms() -> None:
    AddAsync = Callable[[int, str], Awaitable["tuple[int, str]"]]
    decorated: list[AddAsync] = [retry(add_async), timeout(add_async), fallback(add_async), hedge(add_async),
                                 pipeline(add_async), stale(add_async), tb(add_async)]
    assert [await f(1, "y") for f in decorated] == [(1, "y")] * len(decorated)
    assert_type(await retry.call_async(add_async, 9), "tuple[int, str]")
    assert_type(await timeout.call_async(add_async, 9), "tuple[int, str]")
    assert_type(await fallback.call_async(add_async, 9), "tuple[int, str]")
    assert_type(await hedge.call_async(add_async, 9), "tuple[int, str]")
    assert_type(await pipeline.call_async(add_async, 9), "tuple[int, str]")
    assert_type(await stale.call_async(add_async, 9), "tuple[int, str]")
    assert_type(await tb.call_async(add_async, 9), "tuple[int, str]")
    for limiter in limiters:
        assert_type(await limiter.call_async(add_async, 9), "tuple[int, str]")
        stream = await limiter.call_async(count_to, 2)      # an async generator function: its stream
        assert_type(stream, AsyncIterator[int])
        assert [i async for i in stream] == [0, 1]
    assert_type(await kl.call_async("tenant-3", add_async, 10), "tuple[int, str]")
    assert_type(await breaker.call_async(add_async, 11), "tuple[int, str]")
    assert_type(await breaker(add_async)(12), "tuple[int, str]")
    assert_type(await bh.call_async(add_async, 13), "tuple[int, str]")
    assert_type(await bh(add_async)(14), "tuple[int, str]")
    assert_type(await shed.call_async(add_async, 15), "tuple[int, str]")
    assert_type(await shed(add_async)(16), "tuple[int, str]")
    bstream = await breaker.call_async(count_to, 2)        # an async generator function: its stream
    assert_type(bstream, AsyncIterator[int])
    assert [i async for i in bstream] == [0, 1]


asyncio.run(async_forms())


def _misuse() -> None:   # never called: each line must be a type error
    buttress.TokenBucket(rate=1.0)(add)("one")            # type: ignore[arg-type]
    buttress.Fallback(0)(add)(1, 2)                       # type: ignore[arg-type]
    retry(add)(1, "x", "extra")                           # type: ignore[call-arg]
    timeout(add)()                                        # type: ignore[call-arg]
    pipeline(add)(b=1)                                    # type: ignore[call-arg, arg-type]
    hedge(add)("1")                                       # type: ignore[arg-type]
    tb.call(add, "one")                                   # type: ignore[arg-type]
    kl.call("k", add, 1, c=2)                             # type: ignore[call-arg]
    nothing: str = retry.call(add, 1)                     # type: ignore[assignment]
    breaker.call(add, "one")                              # type: ignore[arg-type]
    breaker.call(add, 1, c=2)                             # type: ignore[call-arg]
    not_str: str = breaker.call(add, 1)                   # type: ignore[assignment]
    breaker.call_async(add_async, "one")                  # type: ignore[call-overload]
    bh(add)("one")                                        # type: ignore[arg-type]
    bh.call(add, "one")                                   # type: ignore[arg-type]
    bh.call(add, 1, c=2)                                  # type: ignore[call-arg]
    not_int: int = bh.call(add, 1)                        # type: ignore[assignment]
    shed(add)(1, 2)                                       # type: ignore[arg-type]
    not_tuple: str = shed.call(add, 1)                    # type: ignore[assignment]
    not_str2: str = buttress.ThreadPoolBulkhead().call(add, 1)  # type: ignore[assignment]


# -- ASGI: a Starlette app is an ASGI app for RateLimitMiddleware (starlette is not a dependency: where it
# is installed, the check is real; where it is not, the import's ignore lets the rest of the sample pass)
def starlette_app() -> buttress.asgi.RateLimitMiddleware:
    from starlette.applications import Starlette  # type: ignore[import-not-found, unused-ignore]

    return buttress.asgi.RateLimitMiddleware(Starlette(), limiter=buttress.TokenBucket(rate=10.0, clock=clock))


if importlib.util.find_spec("starlette") is not None:
    starlette_app()

# -- errors ----------------------------------------------------------------------------------------------
err: buttress.ButtressError = buttress.TimeoutExceeded(timeout=2.0)
assert isinstance(err, TimeoutError)
rejected: list[buttress.Rejected] = [buttress.BulkheadFullError(), buttress.Overloaded(retry_after=1.0)]
assert_type(buttress.__version__, str)
assert_type(buttress.IMPLEMENTATION, str)
