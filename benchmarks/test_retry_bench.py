"""Retry: cost of the success path and of one failed attempt, with their floors in the same run.

python -m pytest benchmarks/test_retry_bench.py --benchmark-columns=median,min,rounds --benchmark-sort=name \
    --benchmark-json=/tmp/retry.json && python benchmarks/report.py /tmp/retry.json

Floors: a bare call; raise+catch (a call that raises, is caught, then a call that returns: the user
work of "one failed attempt then success"); 1000 bare awaits inside one event loop run. Cases named
after a floor are compared with it by report.py. tenacity, backoff and stamina run when installed.
"""
import asyncio

import pytest

from buttress import FakeClock, Retry, RetryBudget, SystemClock
from buttress import backoff as bo

AWAITS = 1000


def f():
    return 1


def once_failing():
    """Raises on every other call: each retried call is one failure, then a success."""
    state = [False]

    def fn():
        if state[0]:
            state[0] = False
            return 1
        state[0] = True
        raise ConnectionError("down")

    return fn


# -- floors ----------------------------------------------------------------------------------------------

def test_floor_bare_call(benchmark):
    benchmark(f)


def test_floor_raise_catch(benchmark):
    fn = once_failing()

    def raise_catch():
        try:
            return fn()
        except ConnectionError:
            return fn()

    assert raise_catch() == 1
    benchmark(raise_catch)


async def _bare():
    return 1


def run_awaits(benchmark, coro_fn):
    """Time AWAITS awaits of coro_fn() inside one run_until_complete of a loop kept open."""
    async def awaits():
        for _ in range(AWAITS):
            await coro_fn()

    loop = asyncio.new_event_loop()
    try:
        benchmark(lambda: loop.run_until_complete(awaits()))
    finally:
        loop.close()


def test_floor_bare_await_x1000(benchmark):
    run_awaits(benchmark, _bare)


# -- buttress --------------------------------------------------------------------------------------------

def test_retry_success_decorated(benchmark):
    guarded = Retry(max_attempts=3)(f)
    assert benchmark(guarded) == 1


def test_retry_success_call(benchmark):
    r = Retry(max_attempts=3)
    assert benchmark(r.call, f) == 1


def test_retry_success_with_budget_and_deadline(benchmark):
    guarded = Retry(max_attempts=3, deadline=10.0, budget=RetryBudget())(f)
    assert benchmark(guarded) == 1


def test_raise_catch_retry_one_failure_fakeclock(benchmark):
    r = Retry(max_attempts=3, backoff=bo.constant(0.1), clock=FakeClock())
    guarded = r(once_failing())
    assert benchmark(guarded) == 1
    assert r.metrics().successful_with_retry > 0 and r.metrics().successful_without_retry == 0


class NoSleepClock(SystemClock):
    """The system clock whose sleep returns at once: Retry's own cost of a failure, sleep excluded."""

    @staticmethod
    def sleep(seconds):
        return None


def test_raise_catch_retry_one_failure_nosleep(benchmark):
    r = Retry(max_attempts=3, backoff=bo.constant(0.1), clock=NoSleepClock())
    assert benchmark(r(once_failing())) == 1


def test_bare_await_x1000_retry_async_success(benchmark):
    run_awaits(benchmark, Retry(max_attempts=3)(_bare))


# -- other libraries (success path; tenacity also with one failure, sleeping through a no-op) -------------

def test_tenacity_success(benchmark):
    tenacity = pytest.importorskip("tenacity")
    guarded = tenacity.retry(stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_none())(f)
    assert benchmark(guarded) == 1


def test_raise_catch_tenacity_one_failure(benchmark):
    tenacity = pytest.importorskip("tenacity")
    guarded = tenacity.retry(stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_none(),
                             sleep=lambda s: None)(once_failing())
    assert benchmark(guarded) == 1


def test_backoff_success(benchmark):
    backoff = pytest.importorskip("backoff")
    guarded = backoff.on_exception(backoff.expo, ConnectionError, max_tries=3)(f)
    assert benchmark(guarded) == 1


def test_stamina_success(benchmark):
    stamina = pytest.importorskip("stamina")
    guarded = stamina.retry(on=ConnectionError, attempts=3)(f)
    assert benchmark(guarded) == 1
