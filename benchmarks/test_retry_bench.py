"""Retry: cost of the success path and of one failed attempt, with their floors in the same run.

python -m pytest benchmarks/test_retry_bench.py --benchmark-json=/tmp/retry.json && python benchmarks/report.py /tmp/retry.json

Floors: a bare call; raise+catch; a bare await (per await, inside one running loop). report.py
compares success cases with the bare call, "failure" cases with raise+catch, async cases with the
bare await. A "failure" case is one failed attempt then a successful one (the function raises on every
other call), so it holds one raise+catch and one bare call of user work. Peers run when installed
(pip install ".[bench]").
"""
import pytest
from conftest import awaiting, bare, bare_async, bare_raise, catching

from buttress import (Bulkhead, CircuitBreaker, FakeClock, Pipeline, Retry, RetryBudget, SystemClock, TokenBucket,
                      current_attempt)
from buttress import backoff as bo


def fails_every_other_call():
    state = [False]

    def fn():
        if state[0]:
            state[0] = False
            return 1
        state[0] = True
        raise ConnectionError("down")

    return fn


class NoSleepClock(SystemClock):
    """The system clock whose sleep returns at once: Retry's own cost of a failure, sleep excluded."""

    @staticmethod
    def sleep(seconds):
        return None


# -- floors ----------------------------------------------------------------------------------------------

def test_floor_bare_call(benchmark):
    benchmark(bare)


def test_floor_raise_catch(benchmark):
    benchmark(catching(bare_raise))


def test_floor_bare_await(benchmark):
    awaiting(benchmark, bare_async)


# -- buttress --------------------------------------------------------------------------------------------

def test_success_decorated(benchmark):
    benchmark(Retry(max_attempts=3)(bare))


def test_success_call(benchmark):
    benchmark(Retry(max_attempts=3).call, bare)


def test_success_with_budget_and_deadline(benchmark):
    benchmark(Retry(max_attempts=3, deadline=10.0, budget=RetryBudget())(bare))


def test_one_failure_then_success_fakeclock(benchmark):
    r = Retry(max_attempts=3, backoff=bo.constant(0.1), clock=FakeClock())
    assert benchmark(r(fails_every_other_call())) == 1
    assert r.metrics().successful_with_retry > 0 and r.metrics().successful_without_retry == 0


def test_one_failure_then_success_nosleep(benchmark):
    r = Retry(max_attempts=3, backoff=bo.constant(0.1), clock=NoSleepClock())
    assert benchmark(r(fails_every_other_call())) == 1


def test_async_success_decorated(benchmark):
    awaiting(benchmark, Retry(max_attempts=3)(bare_async))


# -- the first attempt's context (issue 16): set eagerly, what is left of it --------------------------------

import contextvars  # noqa: E402

_VAR = contextvars.ContextVar("bench_attempt", default=None)


def test_floor_contextvar_set_reset(benchmark):
    """What any ContextVar set + reset costs (the part of the eager first attempt that cannot go: a HAMT
    insert, a token, the HAMT back), as Python calls. Floor: test_floor_two_c_calls (the same shape of two
    C method calls), so the difference is the set/reset work itself."""
    value = [1]
    benchmark(lambda v=_VAR, x=value: v.reset(v.set(x)))


def test_floor_two_c_calls(benchmark):
    """Two nested one-argument C calls in the shape of the set/reset lambda above (what its call overhead is)."""
    value = [1]
    benchmark(lambda f=id, x=value: f(f(x)))


def _reads_attempt():
    return current_attempt()


def test_success_reading_current_attempt(benchmark):
    """The body reads current_attempt() once: the Attempt and the random key (uuid4: an os.urandom system
    call) on top of the decorated success. Floor: the bare call."""
    assert benchmark(Retry(max_attempts=3)(_reads_attempt)).number == 1


def test_success_decorated_inside_running_loop(benchmark):
    """A sync first attempt called while an asyncio loop runs in the thread (inside Context.run): the same
    eager path as outside. Floor: the bare call (the loop's own cost is outside)."""
    import asyncio

    guarded = Retry(max_attempts=3)(bare)
    loop = asyncio.new_event_loop()

    async def inside():
        benchmark(guarded)

    try:
        loop.run_until_complete(inside())
    finally:
        loop.close()


# -- the four-stage pipeline: retry + breaker + bulkhead + limiter, success -----------------------------------

def _pipeline():
    return Pipeline(Retry(), CircuitBreaker(name="bench-pipeline", slow_call_duration=None),
                    Bulkhead(max_concurrent=10), TokenBucket(rate=1e9, capacity=10**9))


def test_pipeline_four_stages_success(benchmark):
    benchmark(_pipeline()(bare))


def test_pipeline_four_stages_async_success(benchmark):
    awaiting(benchmark, _pipeline()(bare_async))


# -- peers (success path; tenacity also with one failure, sleeping through a no-op) ----------------------

def test_peer_tenacity_success(benchmark):
    tenacity = pytest.importorskip("tenacity")
    benchmark(tenacity.retry(stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_none())(bare))


def test_peer_tenacity_one_failure_then_success(benchmark):
    tenacity = pytest.importorskip("tenacity")
    guarded = tenacity.retry(stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_none(),
                             sleep=lambda s: None)(fails_every_other_call())
    assert benchmark(guarded) == 1


def test_peer_backoff_success(benchmark):
    backoff = pytest.importorskip("backoff")
    benchmark(backoff.on_exception(backoff.expo, ConnectionError, max_tries=3)(bare))


def test_peer_stamina_success(benchmark):
    stamina = pytest.importorskip("stamina")
    benchmark(stamina.retry(on=ConnectionError, attempts=3)(bare))
