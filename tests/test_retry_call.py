"""buttress.retry_call / retry_call_async: the textbook form of Retry (DESIGN §6). All timing on FakeClock."""
from __future__ import annotations

import asyncio
import functools
import itertools
import sys

import pytest

from buttress import FakeClock, RateLimitExceeded, Retry, RetryBudget, current_attempt
from buttress.retry import retry_call, retry_call_async

HAS_NOTES = sys.version_info >= (3, 11)


def flaky(failures: int, exc: type[BaseException] = ConnectionError, result: object = "ok", seen=None):
    calls = itertools.count(1)

    def fn(*args, **kwargs):
        n = next(calls)
        if seen is not None:
            seen.append((n, args, kwargs, current_attempt()))
        if n <= failures:
            raise exc(f"failure {n}")
        return result
    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def aflaky(failures: int, exc: type[BaseException] = ConnectionError, result: object = "ok", seen=None):
    sync = flaky(failures, exc, result, seen)

    async def fn(*args, **kwargs):
        await asyncio.sleep(0)
        return sync(*args, **kwargs)
    return fn


# -- the contract's defaults --------------------------------------------------------------------------------

def test_defaults_three_attempts_exponential_from_one_second_capped_at_32():
    clock = FakeClock()
    seen: list = []
    fn = flaky(2, seen=seen)
    assert retry_call(fn, 1, b=2, jitter="none", clock=clock) == "ok"
    assert [(n, a, k) for n, a, k, _ in seen] == [(1, (1,), {"b": 2}), (2, (1,), {"b": 2}), (3, (1,), {"b": 2})]
    assert clock.monotonic() == 1.0 + 2.0                # waits 1 s then 2 s
    with pytest.raises(ConnectionError, match="failure 3"):
        retry_call(flaky(10), jitter="none", clock=clock)
    clock2 = FakeClock()
    assert retry_call(flaky(7), max_attempts=8, jitter="none", clock=clock2) == "ok"
    assert clock2.monotonic() == 1 + 2 + 4 + 8 + 16 + 32 + 32     # the cap: max_delay=32


def test_default_jitter_is_full_uniform_up_to_the_base(monkeypatch):
    import buttress.backoff as backoff_module
    monkeypatch.setattr(backoff_module.random, "random", lambda: 0.25)
    clock = FakeClock()
    # a configuration no other test uses, so its schedule is built under the patch
    assert retry_call(flaky(2), base_delay=0.8, max_delay=10.0, clock=clock) == "ok"
    assert clock.monotonic() == pytest.approx(0.25 * 0.8 + 0.25 * 1.6)


def test_default_retry_on_is_exception_and_own_rejections_are_not_retried():
    clock = FakeClock()
    fn = flaky(2, exc=ValueError)
    assert retry_call(fn, clock=clock, jitter="none") == "ok"
    fn = flaky(5, exc=lambda msg: RateLimitExceeded(msg, retry_after=0.5))
    with pytest.raises(RateLimitExceeded):
        retry_call(fn, clock=clock)
    assert next(fn.calls) == 2                          # one attempt only


def test_retry_on_narrows_and_the_last_exception_is_itself_with_a_note():
    clock = FakeClock()
    fn = flaky(5, exc=ValueError)
    with pytest.raises(ValueError, match="failure 1") as info:
        retry_call(fn, retry_on=(ConnectionError,), clock=clock)
    assert next(fn.calls) == 2 and clock.monotonic() == 0.0
    with pytest.raises(ConnectionError, match="failure 3") as info:
        retry_call(flaky(5), retry_on=(ConnectionError,), clock=clock)
    assert type(info.value) is ConnectionError and info.value.__context__ is None
    if HAS_NOTES:
        assert info.value.__notes__ == ["buttress.Retry: gave up after 3 attempts (max_attempts=3 reached)"]


def test_base_exceptions_are_no_outcome():
    class Stop(BaseException):
        pass
    fn = flaky(5, exc=Stop)
    with pytest.raises(Stop):
        retry_call(fn, clock=FakeClock())
    assert next(fn.calls) == 2


# -- idempotency keys -----------------------------------------------------------------------------------------

def test_a_given_str_key_is_what_every_attempt_reads():
    seen: list = []
    retry_call(flaky(2, seen=seen), idempotency_key="order-17", clock=FakeClock())
    assert [a.idempotency_key for *_, a in seen] == ["order-17"] * 3
    assert [a.number for *_, a in seen] == [1, 2, 3]
    assert current_attempt() is None


def test_a_key_callable_gets_the_call_arguments_once():
    seen: list = []
    made: list = []

    def key(order_id, amount=0):
        made.append((order_id, amount))
        return f"charge-{order_id}"
    retry_call(flaky(2, seen=seen), "o-9", amount=5, idempotency_key=key, clock=FakeClock())
    assert made == [("o-9", 5)]
    assert {a.idempotency_key for *_, a in seen} == {"charge-o-9"}
    seen.clear()
    retry_call(flaky(1, seen=seen), "o-9", idempotency_key=lambda: "fixed", clock=FakeClock())  # no parameters
    assert {a.idempotency_key for *_, a in seen} == {"fixed"}


def test_without_a_key_each_call_gets_its_own_random_key_shared_by_its_attempts():
    seen: list = []
    clock = FakeClock()
    retry_call(flaky(1, seen=seen), clock=clock)
    retry_call(flaky(1, seen=seen), clock=clock)
    keys = [a.idempotency_key for *_, a in seen]
    assert keys[0] == keys[1] and keys[2] == keys[3] and keys[0] != keys[2] and len(keys[0]) == 32


@pytest.mark.parametrize("key, exc, words", [
    (17, TypeError, "idempotency_key must be a str, a callable"),
    (b"order", TypeError, "idempotency_key must be a str, a callable"),
    ("", ValueError, "idempotency_key must be a non-empty str"),
    (lambda: 17, TypeError, "idempotency_key must return a str, got 17"),
    (lambda: "", ValueError, "idempotency_key must be a non-empty str"),
])
def test_bad_keys_are_refused_before_the_first_attempt(key, exc, words):
    fn = flaky(0)
    with pytest.raises(exc, match=words):
        retry_call(fn, idempotency_key=key, clock=FakeClock())
    assert next(fn.calls) == 1          # never called


# -- async ----------------------------------------------------------------------------------------------------

def test_retry_call_refuses_async_functions_and_points_at_retry_call_async():
    async def fetch():
        return 1
    with pytest.raises(TypeError, match=r"fetch is async.*retry_call_async"):
        retry_call(fetch)
    with pytest.raises(TypeError, match=r"retry_call_async"):
        retry_call(functools.partial(fetch))


def test_retry_call_async_sleeps_on_the_clock_and_shares_the_key():
    clock = FakeClock()
    seen: list = []

    async def main():
        return await retry_call_async(aflaky(2, seen=seen), 3, jitter="none", idempotency_key="k-1",
                                      retry_on=(ConnectionError,), clock=clock)
    assert asyncio.run(main()) == "ok"
    assert clock.monotonic() == 3.0
    assert [(a.number, a.idempotency_key) for *_, a in seen] == [(1, "k-1"), (2, "k-1"), (3, "k-1")]


def test_retry_call_async_gives_up_with_the_last_exception_and_refuses_sync_functions():
    clock = FakeClock()

    async def main(fn, **kw):
        return await retry_call_async(fn, clock=clock, **kw)
    with pytest.raises(ConnectionError, match="failure 2"):
        asyncio.run(main(aflaky(5), max_attempts=2))
    with pytest.raises(TypeError, match="is a sync function"):
        asyncio.run(main(lambda: 1))
    seen: list = []
    assert asyncio.run(main(aflaky(1, seen=seen), idempotency_key=lambda: "z")) == "ok"
    assert {a.idempotency_key for *_, a in seen} == {"z"}


# -- everything else is Retry's ---------------------------------------------------------------------------------

def test_deadline_budget_and_hooks_are_passed_on():
    clock = FakeClock()
    events: list = []
    with pytest.raises(ConnectionError) as info:
        retry_call(flaky(10), max_attempts=10, jitter="none", deadline=2.5, clock=clock,
                   on_retry=lambda a, e, d: events.append(("retry", a, d)),
                   on_give_up=lambda a, e: events.append(("give_up", a)))
    assert events == [("retry", 1, 1.0), ("give_up", 2)]         # the next wait (2 s) would reach 2.5 s
    if HAS_NOTES:
        assert "would reach the deadline" in info.value.__notes__[-1]
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, ttl=10.0, clock=clock)    # one retry in all
    with pytest.raises(ConnectionError, match="failure 2"):
        retry_call(flaky(10), budget=budget, clock=clock)
    assert retry_call(flaky(0, result=None), retry_on_result=lambda r: r is None, clock=clock) is None


def test_bad_arguments_name_the_parameter():
    fn = flaky(0)
    for kwargs, exc, words in [
        ({"max_attempts": 0}, ValueError, "max_attempts must be >= 1, got 0"),
        ({"max_attempts": True}, TypeError, "max_attempts must be an int"),
        ({"base_delay": -1}, ValueError, "base_delay must be"),
        ({"max_delay": float("inf")}, ValueError, "max_delay must be"),
        ({"base_delay": 5.0, "max_delay": 2.0}, ValueError, "max_delay must be >= base_delay=5.0, got 2.0"),
        ({"jitter": "fuzzy"}, ValueError, "jitter must be one of"),
        ({"retry_on": (KeyboardInterrupt,)}, ValueError, "retry_on"),
        ({"deadline": 0}, ValueError, "deadline"),
    ]:
        with pytest.raises(exc, match=words):
            retry_call(fn, clock=FakeClock(), **kwargs)
    assert next(fn.calls) == 1


def test_equal_configurations_share_a_retry_but_types_are_kept_apart():
    clock = FakeClock()
    assert retry_call(flaky(0), max_attempts=1, clock=clock) == "ok"
    with pytest.raises(TypeError, match="max_attempts must be an int"):
        retry_call(flaky(0), max_attempts=True, clock=clock)        # True == 1, but a bool is refused
    with pytest.raises(ValueError, match="base_delay"):
        retry_call(flaky(0), base_delay=float("nan"), clock=clock)
    # unhashable arguments still work (built for the call)
    assert retry_call(flaky(1), retry_on=[ConnectionError], clock=clock) == "ok"


def test_a_non_callable_is_a_type_error_never_retried():
    clock = FakeClock()
    for call in (lambda: retry_call(None, clock=clock), lambda: Retry(clock=clock).call(42),
                 lambda: Retry(clock=clock, deadline=5.0).call("nope")):
        with pytest.raises(TypeError, match="fn must be callable"):
            call()
    with pytest.raises(TypeError, match="fn must be callable"):
        asyncio.run(Retry(clock=clock).call_async(None))
    assert clock.monotonic() == 0.0     # no backoff: nothing was retried


def test_arguments_named_like_retry_call_options_go_through_partial():
    def fn(max_attempts):
        return max_attempts
    assert retry_call(functools.partial(fn, max_attempts="mine"), max_attempts=2, clock=FakeClock()) == "mine"
