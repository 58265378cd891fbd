import asyncio
import inspect
import warnings

import pytest

import buttress
from buttress import (Bulkhead, CircuitBreaker, CircuitOpenError, FakeClock, Pipeline, RateLimitExceeded, Retry,
                      State, Timeout, TimeoutExceeded, TokenBucket)
from buttress._base import Policy
from buttress.pipeline import PipelineOrderWarning


class Tag(Policy):
    """A stage that records the order it is entered and left."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def call(self, fn, /, *args, **kwargs):
        self.log.append(f"{self.name}>")
        try:
            return fn(*args, **kwargs)
        finally:
            self.log.append(f"<{self.name}")

    async def call_async(self, fn, /, *args, **kwargs):
        self.log.append(f"{self.name}>")
        try:
            return await fn(*args, **kwargs)
        finally:
            self.log.append(f"<{self.name}")


def test_stages_run_outermost_first_in_every_form():
    log = []
    p = Pipeline(Tag("a", log), Tag("b", log), Tag("c", log))

    def work(x):
        log.append("work")
        return x

    async def awork(x):
        log.append("work")
        return x

    expected = ["a>", "b>", "c>", "work", "<c", "<b", "<a"]
    assert p.call(work, 1) == 1 and log == expected
    log.clear()
    assert p(work)(2) == 2 and log == expected
    log.clear()
    assert asyncio.run(p.call_async(awork, 3)) == 3 and log == expected
    log.clear()
    decorated = p(awork)
    assert inspect.iscoroutinefunction(decorated)
    assert asyncio.run(decorated(4)) == 4 and log == expected


def test_retry_around_breaker_sees_every_attempt():
    clock = FakeClock()
    cb = CircuitBreaker(name="dep", window_size=10, minimum_calls=10, clock=clock)
    retry = Retry(max_attempts=3, backoff=buttress.backoff.constant(0.5), clock=clock)
    calls = []

    @Pipeline(retry, cb)
    def flaky():
        calls.append(buttress.current_attempt().idempotency_key)
        if len(calls) < 3:
            raise ConnectionError("flaky")
        return "done"

    assert flaky() == "done"
    assert len(set(calls)) == 1 and len(calls) == 3
    m = cb.metrics()
    assert (m.calls, m.failures) == (3, 2)
    assert clock.monotonic() == 1.0


def test_fallback_sits_outside_everything():
    clock = FakeClock()
    cb = CircuitBreaker(name="dep", clock=clock)
    cb.force_open()
    seen = []

    def fb(exc, order_id):
        seen.append((type(exc), order_id))
        return "cached"

    p = Pipeline(Retry(max_attempts=5, clock=clock), cb, fallback=fb)
    assert p.call(lambda order_id: "live", "o-1") == "cached"
    assert seen == [(CircuitOpenError, "o-1")]          # not retried: a rejection
    assert Pipeline(cb, fallback="plain").call(lambda: "live") == "plain"


def test_rate_limiter_stage_rejects_and_is_not_retried():
    clock = FakeClock()
    tb = TokenBucket(rate=1.0, capacity=1, clock=clock)
    attempts = []
    p = Pipeline(Retry(max_attempts=3, clock=clock), tb)
    assert p.call(lambda: attempts.append(1) or "ok") == "ok"
    with pytest.raises(RateLimitExceeded):
        p.call(lambda: attempts.append(1) or "ok")
    assert len(attempts) == 1


def test_outer_timeout_bounds_the_retries_async():
    clock = FakeClock()
    attempts = []

    async def slow():
        attempts.append(clock.monotonic())
        await clock.sleep_async(0.4)
        raise ConnectionError()

    p = Pipeline(Timeout(1.0, clock=clock), Retry(max_attempts=10, backoff=buttress.backoff.constant(0.2),
                                                   clock=clock))
    with pytest.raises((TimeoutExceeded, ConnectionError)):
        asyncio.run(p.call_async(slow))
    assert clock.monotonic() <= 1.0 + 1e-9
    assert 1 <= len(attempts) <= 2


def test_bulkhead_stage_limits_concurrency():
    bh = Bulkhead(max_concurrent=1)
    p = Pipeline(bh)

    def reenter():
        return p.call(lambda: "inner")

    with pytest.raises(buttress.BulkheadFullError):
        p.call(reenter)
    assert bh.available == 1


def test_bad_orders_warn_and_strict_refuses():
    cb = CircuitBreaker(name="x")
    with pytest.warns(PipelineOrderWarning, match="retries the CircuitOpenError"):
        Pipeline(Retry(retry_on=(CircuitOpenError, ConnectionError)), cb)
    with pytest.warns(PipelineOrderWarning, match="Bulkhead at position 0 is outside a Retry"):
        Pipeline(Bulkhead(2), Retry())
    with pytest.warns(PipelineOrderWarning, match="can never fire"):
        Pipeline(Timeout(1.0), Timeout(5.0))
    with pytest.raises(ValueError, match="same strategy object appears twice"):
        Pipeline(cb, cb, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Pipeline(Timeout(5.0), Retry(), cb, Bulkhead(2), TokenBucket(10.0))   # the recommended order


def test_rejects_things_that_are_not_strategies():
    with pytest.raises(TypeError, match=r"strategies\[1\] must be a pattern object"):
        Pipeline(Retry(), print)
    with pytest.raises(TypeError, match="Pipeline decorates a callable"):
        Pipeline()(3)


def test_decorator_keeps_metadata_and_empty_pipeline_is_identity():
    p = Pipeline(CircuitBreaker(name="m"), Retry())

    def documented(a, b=2):
        """Docs."""
        return a + b

    d = p(documented)
    assert d(1) == 3 and d.__name__ == "documented" and d.__doc__ == "Docs."
    assert str(inspect.signature(d)) == "(a, b=2)"
    assert Pipeline().call(lambda: 7) == 7


def test_call_chains_are_cached_and_bounded():
    p = Pipeline(Retry())
    fns = [lambda i=i: i for i in range(600)]
    assert [p.call(f) for f in fns] == list(range(600))
    assert len(p._chains) <= 256


def test_breaker_opens_inside_pipeline_and_fallback_serves():
    clock = FakeClock()
    cb = CircuitBreaker(name="pay", window_size=2, minimum_calls=2, clock=clock)
    p = Pipeline(cb, fallback=lambda exc: f"fallback:{type(exc).__name__}")

    def down():
        raise ConnectionError()

    assert p.call(down) == "fallback:ConnectionError"
    assert p.call(down) == "fallback:ConnectionError"
    assert cb.state is State.OPEN
    assert p.call(down) == "fallback:CircuitOpenError"


def test_mixed_clocks_are_refused_like_multilimiter():
    """§3c: mixing clocks in one Pipeline is a ValueError (one check, shared with MultiLimiter)."""
    from buttress import MultiLimiter
    from buttress.clock import SystemClock
    from buttress.testing import set_testing
    with pytest.raises(ValueError, match="Pipeline: strategies must share one clock"):
        Pipeline(TokenBucket(rate=1, capacity=1, clock=FakeClock()), CircuitBreaker(clock=FakeClock()))
    with pytest.raises(ValueError, match="Pipeline: strategies must share one clock"):     # nested, fallback too
        Pipeline(Retry(clock=FakeClock()), Pipeline(Timeout(1, clock=FakeClock())))
    with pytest.raises(ValueError, match="Pipeline: strategies must share one clock"):
        Pipeline(MultiLimiter(TokenBucket(rate=1, capacity=1, clock=FakeClock())), Retry(clock=FakeClock()))
    clock = FakeClock()
    Pipeline(TokenBucket(rate=1, capacity=1, clock=clock), CircuitBreaker(clock=clock), Retry(clock=clock))
    Pipeline(TokenBucket(rate=1, capacity=1), CircuitBreaker(clock=SystemClock()), Tag("a", []))   # one system clock
    with set_testing():     # clock=None is now the testing clock: an explicit SystemClock beside it is a second one
        with pytest.raises(ValueError, match="Pipeline: strategies must share one clock"):
            Pipeline(TokenBucket(rate=1, capacity=1), Retry(clock=SystemClock()))
        with pytest.raises(ValueError, match="MultiLimiter: limiters must share one clock"):
            MultiLimiter(TokenBucket(rate=1, capacity=1), TokenBucket(rate=1, capacity=1, clock=SystemClock()))
        Pipeline(TokenBucket(rate=1, capacity=1), Retry(), CircuitBreaker())
