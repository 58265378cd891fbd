"""Timeout: async on FakeClock (no real sleeping), sync with short real waits, deadline propagation."""
from __future__ import annotations

import asyncio
import sys
import threading

import pytest

import buttress
from buttress import BulkheadFullError, FakeClock, ThreadPoolBulkhead, Timeout, TimeoutExceeded
from buttress.timeout import default_executor, remaining


def run(coro, limit: float = 30.0):
    """asyncio.run with a hang guard."""
    return asyncio.run(asyncio.wait_for(coro, limit))


def cancelling(task) -> int:
    """Task.cancelling() (3.11+); 0 where Python has no cancel counting."""
    return task.cancelling() if hasattr(task, "cancelling") else 0


def test_exports():
    assert buttress.Timeout is Timeout
    assert buttress.remaining is remaining
    from buttress import _context
    assert remaining is _context.remaining
    assert remaining() is None


# -- async --------------------------------------------------------------------------------------------


def test_async_fast_call_returns_and_sees_remaining():
    clock = FakeClock()

    async def work(x):
        before = remaining()
        await clock.sleep_async(0.25)
        return x, before, remaining()

    async def main():
        assert await Timeout(1.0, clock=clock).call_async(work, 7) == (7, 1.0, 0.75)
        assert remaining() is None              # the deadline ends with the call
        assert clock.monotonic() == 0.25

    run(main())


def test_async_timeout_cancels_the_work_at_the_deadline():
    clock = FakeClock()
    seen = {}

    async def slow():
        try:
            await clock.sleep_async(100.0)
        except asyncio.CancelledError:
            seen["cancelled_at"] = clock.monotonic()
            raise
        return "late"

    async def main():
        with pytest.raises(TimeoutExceeded) as ei:
            await Timeout(2.5, clock=clock).call_async(slow)
        assert isinstance(ei.value, TimeoutError)
        assert ei.value.timeout == 2.5 and "2.5s" in str(ei.value)
        assert seen == {"cancelled_at": 2.5}
        assert clock.monotonic() == 2.5
        task = asyncio.current_task()
        assert cancelling(task) == 0            # our cancellation was fully taken back
        await asyncio.sleep(0)                  # and nothing is left to cancel us later
        assert clock.pending_sleepers == 0

    run(main())


def test_async_decorator_and_methods():
    clock = FakeClock()
    t = Timeout(1.0, clock=clock)

    class Client:
        @t
        async def get(self, seconds):
            """doc"""
            await clock.sleep_async(seconds)
            return self

    async def main():
        c = Client()
        assert Client.get.__doc__ == "doc"
        assert await c.get(0.5) is c
        with pytest.raises(TimeoutExceeded):
            await c.get(1.5)
        assert clock.monotonic() == 1.5        # 0.5, then 1.0 until the timeout

    run(main())


def test_nested_inner_longer_ends_at_outer_deadline():
    clock = FakeClock()
    inner_saw = []

    async def work():
        inner_saw.append(remaining())
        await clock.sleep_async(100.0)

    async def main():
        outer, inner = Timeout(1.0, clock=clock), Timeout(10.0, clock=clock)
        with pytest.raises(TimeoutExceeded):
            await outer.call_async(inner.call_async, work)
        assert clock.monotonic() == 1.0
        assert inner_saw == [1.0]               # the inner Timeout never promised more than remained

    run(main())


def test_nested_inner_shorter_fires_first_and_outer_continues():
    clock = FakeClock()

    async def work():
        await clock.sleep_async(100.0)

    async def outer_body():
        with pytest.raises(TimeoutExceeded) as ei:
            await Timeout(0.2, clock=clock).call_async(work)
        assert ei.value.timeout == 0.2
        return "recovered", remaining()

    async def main():
        assert await Timeout(1.0, clock=clock).call_async(outer_body) == ("recovered", 0.8)
        assert clock.monotonic() == 0.2

    run(main())


def test_expired_outer_deadline_refuses_without_calling():
    clock = FakeClock()
    calls = []

    async def work():
        calls.append(1)

    async def outer_body():
        await clock.sleep_async(5.0)            # overruns while the outer timer is held off below
        with pytest.raises(TimeoutExceeded, match="deadline exceeded") as ei:
            await Timeout(3.0, clock=clock).call_async(work)
        assert ei.value.timeout == 0.0
        with pytest.raises(TimeoutExceeded):
            Timeout(3.0, clock=clock).call(lambda: calls.append(2))

    async def main():
        from buttress._context import pop_deadline, push_deadline
        token = push_deadline(clock.monotonic_ns() + 1_000_000_000, clock)   # a deadline with no timer
        try:
            await outer_body()
        finally:
            pop_deadline(token)
        assert calls == []

    run(main())


def test_external_cancellation_is_not_a_timeout():
    clock = FakeClock(autojump=False)

    async def work():
        await clock.sleep_async(100.0)

    async def main():
        task = asyncio.create_task(Timeout(1.0, clock=clock).call_async(work))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        clock.advance(5.0)                      # the timer was disarmed
        await asyncio.sleep(0)

    run(main())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.10's asyncio cannot tell a second cancel() "
                    "from the timer's own (Task.uncancel/cancelling are 3.11+): the race reads as a timeout there")
def test_cancel_racing_the_timer_stays_a_cancellation():
    clock = FakeClock(autojump=False)

    async def work():
        await clock.sleep_async(100.0)

    async def main():
        task = asyncio.create_task(Timeout(1.0, clock=clock).call_async(work))
        for _ in range(3):
            await asyncio.sleep(0)
        clock.advance(1.0)                      # the timer fires and cancels the task ...
        for _ in range(2):
            await asyncio.sleep(0)
        task.cancel()                           # ... and someone else cancels it too
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())


def test_work_that_swallows_cancellation_keeps_its_result():
    clock = FakeClock()

    async def stubborn():
        try:
            await clock.sleep_async(10.0)
        except asyncio.CancelledError:
            return "swallowed"

    async def main():
        assert await Timeout(1.0, clock=clock).call_async(stubborn) == "swallowed"
        assert cancelling(asyncio.current_task()) == 0

    run(main())


def test_async_timeout_with_system_clock():
    async def main():
        ev = asyncio.Event()
        with pytest.raises(TimeoutExceeded):
            await Timeout(0.01).call_async(ev.wait)
        assert await Timeout(5.0).call_async(asyncio.sleep, 0, "ok") == "ok"

    run(main())


def test_async_with_block():
    clock = FakeClock()
    t = Timeout(1.0, clock=clock)
    reached = []

    async def main():
        async with t:
            assert remaining() == 1.0
            await clock.sleep_async(0.5)
        assert remaining() is None
        with pytest.raises(TimeoutExceeded):
            async with t:
                await clock.sleep_async(5.0)
                reached.append("never")
        assert clock.monotonic() == 1.5 and reached == []
        assert cancelling(asyncio.current_task()) == 0
        assert t._scopes == {}

    run(main())


def test_async_with_one_timeout_shared_by_tasks_and_nested():
    clock = FakeClock()
    t = Timeout(2.0, clock=clock)

    async def worker(seconds):
        try:
            async with t:
                async with Timeout(10.0, clock=clock):      # inner, longer: bounded by t
                    await clock.sleep_async(seconds)
            return "ok", clock.monotonic()
        except TimeoutExceeded:
            return "timeout", clock.monotonic()

    async def reentrant():
        async with t:
            await clock.sleep_async(1.0)
            async with t:                                  # the same object, nested: 2 s from now
                assert remaining() == 1.0                  # ... but never past the outer deadline
                await clock.sleep_async(0.5)
        return "ok"

    async def main():
        results = await asyncio.gather(worker(1.0), worker(3.0), worker(1.5))
        assert results == [("ok", 1.0), ("timeout", 2.0), ("ok", 1.5)]
        assert await reentrant() == "ok"
        assert t._scopes == {}

    run(main())


def test_sync_with_is_refused():
    with pytest.raises(TypeError, match="async with"):
        with Timeout(1.0):
            pass


# -- sync ---------------------------------------------------------------------------------------------


def test_sync_call_returns_and_raises_through():
    t = Timeout(5.0)
    assert t.call(lambda a, b=1: a + b, 1, b=2) == 3
    with pytest.raises(KeyError):
        t.call(lambda: {}["x"])

    @t
    def where():
        return threading.current_thread().name

    assert where().startswith("buttress-timeout")


def test_sync_timeout_raises_and_the_thread_runs_on():
    release = threading.Event()
    finished = threading.Event()

    def hang():
        release.wait(30)
        finished.set()
        return "done"

    with pytest.raises(TimeoutExceeded) as ei:
        Timeout(0.02).call(hang)
    assert ei.value.timeout == 0.02
    assert not finished.is_set()                 # still running after the caller gave up
    release.set()
    assert finished.wait(10)


def test_sync_deadline_visible_in_worker_and_nested():
    outer = Timeout(1.0)
    inner = Timeout(10.0)

    def inside():
        return remaining(), inner.call(remaining)

    mine, nested = outer.call(inside)
    assert 0 < mine <= 1.0
    assert 0 < nested <= mine                    # the inner Timeout(10) got what remained of 1 s
    assert remaining() is None


def test_sync_nested_inner_longer_ends_at_outer_deadline():
    gate = threading.Event()
    done = threading.Event()
    outer = Timeout(0.05)
    inner = Timeout(10.0)
    errors = []

    def middle():
        try:
            inner.call(gate.wait, 30)
        except TimeoutExceeded as exc:
            errors.append(exc)
            raise
        finally:
            done.set()

    with pytest.raises(TimeoutExceeded):        # the outer's own, or the inner's passed through
        outer.call(middle)
    # the inner call gives up by the outer deadline on its own (it does not wait its 10 s for the gate)
    assert done.wait(5)
    gate.set()
    assert len(errors) == 1 and errors[0].timeout <= 0.05
    assert "deadline exceeded" in str(errors[0])


def test_sync_timeout_on_queued_call_cancels_it():
    pool = ThreadPoolBulkhead(max_workers=1, queue_size=1)
    gate = threading.Event()
    ran = []
    pool.submit(gate.wait, 30)
    with pytest.raises(TimeoutExceeded):
        Timeout(0.02, executor=pool).call(ran.append, 1)      # stays queued behind the busy worker
    gate.set()
    pool.shutdown(wait=True)
    assert ran == []                                        # cancelled, never run
    assert pool.metrics().queued == 0


def test_sync_timeout_with_full_pool_rejects():
    pool = ThreadPoolBulkhead(max_workers=1, queue_size=0)
    gate = threading.Event()
    pool.submit(gate.wait, 30)
    with pytest.raises(BulkheadFullError):
        Timeout(1.0, executor=pool).call(lambda: 1)
    gate.set()
    pool.shutdown()


def test_sync_call_of_async_function_is_refused():
    async def coro():
        return 1

    with pytest.raises(TypeError, match="call_async"):
        Timeout(1.0).call(coro)


def test_default_executor_is_shared():
    assert Timeout(1.0).executor is Timeout(2.0).executor is default_executor()
    pool = ThreadPoolBulkhead(1, 0)
    assert Timeout(1.0, executor=pool).executor is pool
    pool.shutdown()


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"seconds": 0}, ValueError, ["seconds", "0", "> 0"]),
    ({"seconds": -1.5}, ValueError, ["seconds", "-1.5"]),
    ({"seconds": float("nan")}, ValueError, ["seconds", "nan"]),
    ({"seconds": "1"}, TypeError, ["seconds", "'1'", "number"]),
    ({"seconds": None}, TypeError, ["seconds", "None"]),
    ({"seconds": 1, "clock": 5}, TypeError, ["clock", "5"]),
    ({"seconds": 1, "executor": object()}, TypeError, ["executor", "ThreadPoolBulkhead"]),
])
def test_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc) as ei:
        Timeout(**kwargs)
    for w in words:
        assert w in str(ei.value)
