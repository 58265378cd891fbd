"""Hedge: timing on FakeClock (async: autojump; sync: the attempts move the clock, the caller looks at it),
exact counts, no sleeps for timing logic."""
from __future__ import annotations

import asyncio
import pickle
import threading

import pytest

import buttress
from buttress import FakeClock, Pipeline, Retry, RetryBudget, ThreadPoolBulkhead
from buttress.hedge import Hedge, _Histogram

WAIT = 30.0     # real seconds a test waits for a worker thread before declaring a hang


def run(coro):
    return asyncio.run(coro)


class Boom(Exception):
    pass


class Stop(BaseException):
    pass


def script(clock, plan, log):
    """An async function whose attempt i (1, 2, ...) sleeps plan[i-1][0] clock seconds, then returns
    plan[i-1][1] or raises it when it is an exception; `log` records starts, keys and finally blocks."""
    n = [0]

    async def fn():
        n[0] += 1
        me = n[0]
        a = buttress.current_attempt()
        log.append(("start", me, a.number, a.idempotency_key, clock.monotonic()))
        try:
            delay, outcome = plan[me - 1]
            await clock.sleep_async(delay)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        finally:
            log.append(("finally", me, clock.monotonic()))
    return fn


# -- async ------------------------------------------------------------------------------------------------

def test_async_first_slow_second_fast_wins_and_the_primary_is_cancelled():
    clock, log = FakeClock(), []
    h = Hedge(0.05, clock=clock)
    fn = h(script(clock, [(1.0, "slow"), (0.01, "fast")], log))
    assert run(fn()) == "fast"
    assert clock.monotonic() == pytest.approx(0.06)        # the hedge started at 0.05 and took 0.01
    starts = [e for e in log if e[0] == "start"]
    assert [s[4] for s in starts] == [0.0, 0.05]
    assert [s[2] for s in starts] == [1, 2]                 # attempt numbers
    assert starts[0][3] == starts[1][3]                     # one idempotency key for every attempt
    # the primary (in the caller's task) was cancelled at its await; its finally ran before the call returned
    assert ("finally", 1, pytest.approx(0.06)) in log
    m = h.metrics()
    assert (m.hedges_started, m.hedges_won, m.cancelled, m.budget_denied) == (1, 1, 1, 0)


def test_async_primary_answering_before_the_delay_starts_no_hedge():
    clock, log = FakeClock(), []
    h = Hedge(0.05, clock=clock)
    fn = h(script(clock, [(0.04, "ok")], log))
    assert run(fn()) == "ok"
    assert clock.monotonic() == pytest.approx(0.04)
    assert h.metrics()[:3] == (0, 0, 0)
    assert clock.pending_sleepers == 0                      # the hedge timer was disarmed


def test_async_result_without_suspending_never_arms_a_timer():
    clock = FakeClock(autojump=False)       # a timer would hang the test: nothing advances the clock
    h = Hedge(0.05, clock=clock)

    @h
    async def fn(x):
        return x * 2

    assert run(fn(21)) == 42
    assert run(h.call_async(fn, 2)) == 4   # call_async of a decorated function: hedged twice, still fine
    assert h.metrics()[:3] == (0, 0, 0)


def test_async_all_fail_raises_the_last_to_fail():
    clock, log = FakeClock(), []
    h = Hedge(0.05, clock=clock)
    first, second = Boom("primary"), Boom("hedge")
    # primary fails at 0.1 (after the hedge started at 0.05), the hedge at 0.25: the hedge's is last
    fn = h(script(clock, [(0.1, first), (0.2, second)], log))
    with pytest.raises(Boom) as info:
        run(fn())
    assert info.value is second
    assert clock.monotonic() == pytest.approx(0.25)
    if hasattr(second, "__notes__"):
        assert "all 2 attempts failed" in second.__notes__[-1]
    # reversed: the hedge fails first, the primary last
    clock, log = FakeClock(), []
    h = Hedge(0.05, clock=clock)
    first, second = Boom("primary"), Boom("hedge")
    fn = h(script(clock, [(0.3, first), (0.01, second)], log))
    with pytest.raises(Boom) as info:
        run(fn())
    assert info.value is first
    assert clock.monotonic() == pytest.approx(0.3)
    assert h.metrics()[:3] == (1, 0, 0)


def test_async_failure_before_the_delay_is_raised_at_once_without_a_hedge():
    clock, log = FakeClock(), []
    h = Hedge(0.05, clock=clock)
    err = Boom("fast failure")
    fn = h(script(clock, [(0.01, err)], log))
    with pytest.raises(Boom) as info:
        run(fn())
    assert info.value is err and clock.monotonic() == pytest.approx(0.01)
    assert h.metrics()[:3] == (0, 0, 0)
    assert not getattr(err, "__notes__", None)              # one attempt: raised as an unhedged call would


def test_async_primary_fails_after_hedging_and_the_hedge_still_wins():
    clock, log = FakeClock(), []
    h = Hedge(0.05, clock=clock)
    fn = h(script(clock, [(0.06, Boom("primary")), (0.1, "hedge")], log))
    assert run(fn()) == "hedge"
    assert clock.monotonic() == pytest.approx(0.15)
    assert h.metrics()[:3] == (1, 1, 0)


def test_async_budget_exhausted_starts_no_hedge():
    clock, log = FakeClock(), []
    # ratio 0 and a floor of 0.1/s * 10 s = exactly one retry in the whole budget
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, ttl=10.0, clock=clock)
    h = Hedge(0.05, budget=budget, clock=clock)
    fn = h(script(clock, [(1.0, "slow1"), (0.01, "fast"), (1.0, "slow2"), (0.01, "never")], log))

    async def two():
        return await fn(), await fn()
    assert run(two()) == ("fast", "slow2")
    m = h.metrics()
    assert (m.hedges_started, m.hedges_won, m.budget_denied) == (1, 1, 1)
    assert budget.balance == 0
    assert len([e for e in log if e[0] == "start"]) == 3


def test_async_losers_cancelled_observed_through_finally():
    clock, log = FakeClock(), []
    h = Hedge(0.05, max_hedges=2, clock=clock)
    fn = h(script(clock, [(1.0, "p"), (1.0, "h1"), (0.01, "h2")], log))

    async def main():
        result = await fn()
        assert ("finally", 1, pytest.approx(0.11)) in log  # the primary: cancelled inline
        for _ in range(5):                                  # the cancelled hedge task finishes in the background
            await asyncio.sleep(0)
        return result
    assert run(main()) == "h2"
    starts = [e[4] for e in log if e[0] == "start"]
    assert starts == [0.0, pytest.approx(0.05), pytest.approx(0.1)]    # hedge k at k * delay
    assert sorted(e[1] for e in log if e[0] == "finally") == [1, 2, 3]
    assert h.metrics()[:3] == (2, 1, 2)


def test_async_primary_win_cancels_running_hedges():
    clock, log = FakeClock(), []
    h = Hedge(0.05, clock=clock)
    fn = h(script(clock, [(0.1, "primary"), (1.0, "hedge")], log))

    async def main():
        r = await fn()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return r
    assert run(main()) == "primary"
    assert ("finally", 2, pytest.approx(0.1)) in log
    assert h.metrics()[:3] == (1, 0, 1)


def test_async_base_exception_is_no_outcome_and_stops_everything():
    clock, log = FakeClock(), []
    h = Hedge(0.05, clock=clock)
    fn = h(script(clock, [(0.1, Stop()), (1.0, "hedge")], log))

    async def main():
        with pytest.raises(Stop):
            await fn()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    run(main())
    assert ("finally", 2, pytest.approx(0.1)) in log        # the running hedge was cancelled
    assert h.metrics()[:3] == (1, 0, 1)


def test_async_caller_cancelled_cancels_the_hedges():
    clock, log = FakeClock(), []
    h = Hedge(0.05, clock=clock)
    fn = h(script(clock, [(1.0, "p"), (1.0, "h")], log))

    async def main():
        task = asyncio.ensure_future(fn())
        while len([e for e in log if e[0] == "start"]) < 2:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(3):
            await asyncio.sleep(0)
    run(main())
    assert sorted(e[1] for e in log if e[0] == "finally") == [1, 2]
    assert h.metrics().cancelled == 1                       # the hedge task (the primary got the caller's cancel)


def test_async_every_attempt_sees_the_retrys_key_under_a_retry():
    clock, log = FakeClock(), []
    retry = Retry(max_attempts=2, clock=clock)
    h = Hedge(0.05, clock=clock)
    fn = script(clock, [(1.0, "slow"), (0.01, "fast")], log)
    assert run(Pipeline(retry, h).call_async(fn)) == "fast"
    starts = [e for e in log if e[0] == "start"]
    assert starts[0][3] == starts[1][3]
    assert [s[2] for s in starts] == [1, 1]                 # under a Retry: the Retry's attempt number


def test_async_budget_shared_with_a_retry_is_deposited_once_per_call():
    clock, log = FakeClock(), []
    # ratio 0.5, no floor: one deposit is half a retry (no hedge); two deposits would allow one
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, ttl=10.0, clock=clock)
    h = Hedge(0.05, budget=budget, clock=clock)
    fn = script(clock, [(1.0, "slow"), (0.01, "fast")], log)
    assert run(Pipeline(Retry(max_attempts=2, budget=budget, clock=clock), h).call_async(fn)) == "slow"
    assert (h.metrics().budget_denied, h.metrics().hedges_started) == (1, 0)
    # the same Hedge alone deposits itself: the second call (two deposits in all) may hedge
    fn = script(clock, [(1.0, "slow"), (0.01, "fast")], log)
    assert run(h.call_async(fn)) == "fast"
    assert (h.metrics().budget_denied, h.metrics().hedges_started) == (1, 1)


def test_async_own_key_from_idempotency_key_function():
    clock, log = FakeClock(), []
    h = Hedge(0.05, clock=clock, idempotency_key=lambda order: f"order-{order}")
    seen = []

    @h
    async def pay(order):
        seen.append(buttress.current_attempt().idempotency_key)
        await clock.sleep_async(1.0 if len(seen) == 1 else 0.01)
        return order
    assert run(pay(7)) == 7
    assert seen == ["order-7", "order-7"]
    assert buttress.current_attempt() is None


def test_percentile_delay_follows_successful_latencies():
    clock = FakeClock()
    h = Hedge("p95", initial_delay=0.5, min_samples=100, clock=clock)

    @h
    async def fn():
        await clock.sleep_async(0.01)
        return 1

    async def main():
        for _ in range(127):
            await fn()
    assert h.metrics().delay == 0.5
    run(main())
    # 127 samples of 10 ms (refreshed at 64): the estimate is the upper bound of 10 ms's bucket
    d = h.metrics().delay
    assert 0.01 <= d <= 0.01 * 1.25
    assert h.metrics().hedges_started == 0


def test_histogram_buckets_and_quantile():
    hist = _Histogram(50.0)
    for ns in (0, 1023, 1024, 10**6, 10**9, 10**15):
        i = 0 if ns < 1024 else None
        hist.record(ns)
        if i is None:
            b = ns.bit_length()
            i = min((b - 11) * 4 + ((ns >> (b - 3)) & 3) + 1, hist.N - 1)
        if i < hist.N - 1:
            assert ns < hist.upper_ns(i) and (i == 0 or ns >= hist.upper_ns(i - 1))
    hist = _Histogram(90.0)
    for k in range(64):
        hist.record(1000 if k < 57 else 5_000_000)        # 57/64 = 89 % fast: p90 is in the slow bucket
    assert hist.estimate_ns is not None and hist.estimate_ns >= 5_000_000


# -- sync -------------------------------------------------------------------------------------------------

def sync_script(clock, plan, log, gates):
    """Sync attempt i moves the clock by plan[i-1][0] (the caller sees time pass), then waits for
    gates[i-1] when there is one, then returns / raises plan[i-1][1]."""
    n = [0]
    lock = threading.Lock()

    def fn():
        with lock:
            n[0] += 1
            me = n[0]
        a = buttress.current_attempt()
        log.append(("start", me, a.number, a.idempotency_key))
        try:
            delay, outcome = plan[me - 1]
            if delay:
                clock.advance(delay)
            gate = gates.get(me)
            if gate is not None:
                assert gate.wait(WAIT)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        finally:
            log.append(("finally", me))
            done = gates.get(("done", me))
            if done is not None:
                done.set()
    return fn


def test_sync_first_slow_second_fast_and_the_loser_is_abandoned():
    clock, log = FakeClock(), []
    release, finished = threading.Event(), threading.Event()
    pool = ThreadPoolBulkhead(max_workers=4, queue_size=4)
    h = Hedge(0.05, clock=clock, executor=pool)
    fn = h(sync_script(clock, [(1.0, "slow"), (0, "fast")], log, {1: release, ("done", 1): finished}))
    assert fn() == "fast"
    assert ("finally", 1) not in log        # abandoned: still running on its worker
    release.set()
    assert finished.wait(WAIT)
    starts = [e for e in log if e[0] == "start"]
    assert [s[2] for s in starts] == [1, 2] and starts[0][3] == starts[1][3]
    m = h.metrics()
    assert (m.hedges_started, m.hedges_won, m.cancelled) == (1, 1, 1)
    pool.shutdown()


def test_sync_fast_primary_starts_no_hedge():
    clock, log = FakeClock(), []
    pool = ThreadPoolBulkhead(max_workers=2, queue_size=2)
    h = Hedge(0.05, clock=clock, executor=pool)
    assert h.call(sync_script(clock, [(0.01, "ok")], log, {})) == "ok"
    assert h.metrics()[:3] == (0, 0, 0)
    pool.shutdown()


def test_sync_all_fail_raises_the_last_to_fail():
    clock, log = FakeClock(), []
    pool = ThreadPoolBulkhead(max_workers=4, queue_size=4)
    h = Hedge(0.05, clock=clock, executor=pool)
    gate = threading.Event()
    first, second = Boom("primary"), Boom("hedge")
    # the primary moves time past the delay and waits; the hedge fails; once its worker is free again
    # (its failure reported), the primary is let go and fails last
    fn = sync_script(clock, [(1.0, first), (0, second)], log, {1: gate})

    def release_when_the_hedge_is_done():
        for _ in range(30_000):
            if ("finally", 2) in log and pool.metrics().running == 1:
                break
            threading.Event().wait(0.001)
        gate.set()
    helper = threading.Thread(target=release_when_the_hedge_is_done)
    helper.start()
    with pytest.raises(Boom) as info:
        h.call(fn)
    helper.join(WAIT)
    assert info.value is first
    assert h.metrics()[:3] == (1, 0, 0)
    pool.shutdown()


def test_sync_budget_exhausted_and_wrong_uses():
    clock, log = FakeClock(), []
    pool = ThreadPoolBulkhead(max_workers=2, queue_size=2)
    h = Hedge(0.05, clock=clock, executor=pool,
              budget=RetryBudget(ratio=0.0, min_per_second=0.0, ttl=10.0, clock=clock))
    gate = threading.Event()

    def release_when_denied():
        for _ in range(30_000):
            if h.metrics().budget_denied:
                break
            threading.Event().wait(0.001)
        gate.set()
    helper = threading.Thread(target=release_when_denied)
    helper.start()
    assert h.call(sync_script(clock, [(1.0, "slow")], log, {1: gate})) == "slow"
    helper.join(WAIT)
    assert h.metrics().budget_denied == 1 and h.metrics().hedges_started == 0

    async def coro_fn():
        return 1
    with pytest.raises(TypeError, match="call_async"):
        h.call(coro_fn)
    pool.shutdown()


# -- wrong use ------------------------------------------------------------------------------------------------

def test_generator_functions_are_refused():
    h = Hedge(0.05)

    def gen():
        yield 1

    async def agen():
        yield 1
    for f in (gen, agen):
        with pytest.raises(TypeError, match="generator"):
            h(f)
    with pytest.raises(TypeError, match="generator"):
        h.call(gen)
    with pytest.raises(TypeError, match="generator"):
        run(h.call_async(agen))


def test_call_async_refuses_a_sync_function():
    h = Hedge(0.05)
    with pytest.raises(TypeError, match="sync"):
        run(h.call_async(lambda: 1))


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"delay": -1}, ValueError, "delay"),
    ({"delay": True}, TypeError, "delay"),
    ({"delay": float("nan")}, ValueError, "delay"),
    ({"delay": "p100"}, ValueError, "pNN"),
    ({"delay": "p0"}, ValueError, "pNN"),
    ({"delay": "95"}, ValueError, "pNN"),
    ({"max_hedges": 0}, ValueError, "max_hedges"),
    ({"max_hedges": 1.5}, TypeError, "max_hedges"),
    ({"budget": 3}, TypeError, "budget"),
    ({"initial_delay": -0.1}, ValueError, "initial_delay"),
    ({"min_samples": 0}, ValueError, "min_samples"),
    ({"executor": object()}, TypeError, "executor"),
    ({"idempotency_key": 5}, TypeError, "idempotency_key"),
])
def test_bad_arguments_name_the_parameter(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        Hedge(**kwargs)


def test_percentile_strings_and_pickling():
    assert Hedge("p99.9").metrics().delay == 0.05
    assert Hedge(0).metrics().delay == 0.0
    with pytest.raises(TypeError, match="Hedge objects cannot be pickled"):
        pickle.dumps(Hedge(0.1))


def test_exported_and_usable_as_a_pipeline_stage():
    clock, log = FakeClock(), []
    h = Hedge(0.05, clock=clock)
    pipe = Pipeline(buttress.Timeout(10.0, clock=clock), h)
    assert run(pipe.call_async(script(clock, [(1.0, "slow"), (0.01, "fast")], log))) == "fast"
    assert h.metrics().hedges_won == 1


def test_sync_loser_result_goes_to_on_discard():
    clock, log, discarded = FakeClock(), [], []
    release, finished = threading.Event(), threading.Event()
    pool = ThreadPoolBulkhead(max_workers=4, queue_size=4)
    h = Hedge(0.05, clock=clock, executor=pool, on_discard=discarded.append)
    fn = h(sync_script(clock, [(1.0, "slow"), (0, "fast")], log, {1: release, ("done", 1): finished}))
    assert fn() == "fast"
    assert discarded == []
    release.set()
    assert finished.wait(WAIT)
    for _ in range(30_000):     # the loser reports just after its finally block
        if discarded:
            break
        threading.Event().wait(0.001)
    assert discarded == ["slow"]
    pool.shutdown()


# -- the async registry: one timer per Hedge and loop, the primary interrupted through its Task -------------

def test_async_many_waiting_primaries_share_one_timer_and_each_hedges_at_its_own_time():
    clock, log = FakeClock(), []
    h = Hedge(0.05, clock=clock)
    n = 10
    # primary i starts at i * 0.004 (all before the first hedge) and takes 1 s; its hedge takes 0.001 s
    plan = [(1.0, f"p{i}") for i in range(n)] + [(0.001, f"h{i}") for i in range(n)]
    fn = h(script(clock, plan, log))
    seen = {}

    async def one(i):
        await clock.sleep_async(i * 0.004)
        return await fn()

    async def main():
        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        while len([e for e in log if e[0] == "start"]) < n:
            await asyncio.sleep(0)
        # n primaries wait on the clock; the hedges' timer is one more sleeper, not one per call
        seen["sleepers"] = clock.pending_sleepers
        return await asyncio.gather(*tasks)
    assert run(main()) == [f"h{i}" for i in range(n)]
    assert seen["sleepers"] == n + 1
    hedge_starts = sorted(e[4] for e in log if e[0] == "start" and e[1] > n)
    assert hedge_starts == [pytest.approx(i * 0.004 + 0.05) for i in range(n)]
    assert h.metrics()[:3] == (n, n, n)
    assert clock.pending_sleepers == 0


def test_async_primary_between_steps_is_cancelled_through_its_task_and_the_request_given_back():
    clock = FakeClock()
    h = Hedge(0.05, clock=clock)
    calls = [0]
    finished = []

    async def fn():
        calls[0] += 1
        if calls[0] == 2:                   # the hedge
            await clock.sleep_async(0.01)
            return "hedge"
        try:
            while True:                     # never waits on a future: the Task's request is the only way in
                await asyncio.sleep(0)
                clock.advance(0.001)
        finally:
            finished.append(clock.monotonic())

    async def main():
        result = await fn_h()
        task = asyncio.current_task()
        return result, task.cancelling() if hasattr(task, "cancelling") else 0
    fn_h = h(fn)
    assert run(main()) == ("hedge", 0)      # our cancellation request was withdrawn (uncancel)
    assert len(finished) == 1
    assert h.metrics()[:3] == (1, 1, 1)


def test_async_caller_cancelled_as_the_hedge_wins_still_sees_its_cancellation():
    clock = FakeClock()
    h = Hedge(0.05, clock=clock)
    calls = [0]

    @h
    async def fn():
        calls[0] += 1
        if calls[0] == 2:
            await clock.sleep_async(0.01)
            return "hedge"
        await clock.sleep_async(10.0)
        return "primary"

    async def main():
        task = asyncio.ensure_future(fn())
        while calls[0] < 2:
            await asyncio.sleep(0)
        clock.advance(0.01)                 # the hedge's sleep is due: it wins in this loop turn ...
        task.cancel()                       # ... and the caller is cancelled in the same turn
        with pytest.raises(asyncio.CancelledError):
            await task
    run(main())


def test_async_primary_answering_after_waiting_leaves_no_timer_on_a_test_clock():
    clock = FakeClock()
    h = Hedge(0.05, clock=clock)

    @h
    async def fn(x):
        await clock.sleep_async(0.01)
        return x

    async def main():
        out = [await fn(i) for i in range(3)]
        return out, clock.pending_sleepers
    assert run(main()) == ([0, 1, 2], 0)
    assert h.metrics()[:3] == (0, 0, 0)


def test_sync_hedge_under_a_retry_shares_the_retrys_key_even_when_its_attempt_is_set_lazily():
    """A Retry's first attempt may be recorded lazily (compiled core, outside an event loop): the Hedge
    still finds it, so its attempts carry the Retry's key, not one of its own."""
    clock = FakeClock()
    pool = ThreadPoolBulkhead(max_workers=2, queue_size=2)
    h = Hedge(0.05, clock=clock, executor=pool)
    seen = []

    def inner():
        seen.append(buttress.current_attempt().idempotency_key)
        return "ok"

    @Retry(max_attempts=2, clock=clock)
    def outer():
        result = h.call(inner)
        return result, buttress.current_attempt().idempotency_key   # read after the Hedge ran

    result, key = outer()
    assert result == "ok" and seen == [key]
    pool.shutdown()
