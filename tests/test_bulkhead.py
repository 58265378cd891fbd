"""Bulkhead and ThreadPoolBulkhead: permits never leak, never over-admit, waiters served in order."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

import buttress
from buttress import Bulkhead, BulkheadFullError, FakeClock, ThreadPoolBulkhead, TimeoutExceeded
from buttress.bulkhead import BulkheadMetrics
from helpers import race


def run(coro, limit: float = 30.0):
    """asyncio.run with a hang guard, so that a lost wake-up fails instead of hanging the suite."""
    return asyncio.run(asyncio.wait_for(coro, limit))


def wait_until(pred, what: str, limit: float = 10.0) -> None:
    """Poll a condition another thread brings about (a hang guard, not a timing assertion)."""
    end = time.monotonic() + limit
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


class Peak:
    """Concurrency measured inside the guarded call."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def exit(self) -> None:
        with self.lock:
            self.now -= 1


# -- basics ------------------------------------------------------------------------------------------


def test_exports():
    assert buttress.Bulkhead is Bulkhead and buttress.ThreadPoolBulkhead is ThreadPoolBulkhead


def test_try_acquire_release_and_metrics():
    bh = Bulkhead(2, name="db")
    assert bh.try_acquire() and bh.try_acquire()
    assert not bh.try_acquire()
    assert bh.metrics() == BulkheadMetrics(available=0, max_concurrent=2, in_use=2, waiting=0, rejected=0)
    bh.release()
    bh.release()
    assert bh.metrics().available == 2
    with pytest.raises(ValueError):
        bh.release()            # more releases than acquires is a bug, said loudly


def test_context_manager_and_rejection():
    bh = Bulkhead(1, name="db")
    with bh as entered:
        assert entered is bh and bh.in_use == 1
        with pytest.raises(BulkheadFullError) as ei:
            with bh:
                pass
    assert ei.value.retry_after is None
    assert "'db'" in str(ei.value) and "1 concurrent" in str(ei.value)
    assert bh.in_use == 0 and bh.metrics().rejected == 1


def test_decorator_and_call_return_permit_on_error():
    bh = Bulkhead(1)

    @bh
    def boom(x):
        """doc"""
        assert bh.in_use == 1
        raise KeyError(x)

    assert boom.__name__ == "boom" and boom.__doc__ == "doc"
    for _ in range(3):
        with pytest.raises(KeyError):
            boom(1)
    assert bh.in_use == 0
    assert bh.call(lambda a, b=0: a + b, 1, b=2) == 3
    assert bh.in_use == 0


def test_method_decoration():
    bh = Bulkhead(1)

    class Svc:
        @bh
        def get(self, x):
            return (self, x)

    s = Svc()
    assert s.get(3) == (s, 3)


# -- concurrency -------------------------------------------------------------------------------------


def test_threads_never_exceed_max_concurrent(fast_switching):
    bh = Bulkhead(5, max_wait=None)
    peak = Peak()
    outcomes = {"ok": 0, "err": 0}
    olock = threading.Lock()

    def guarded(i: int, j: int) -> None:
        peak.enter()
        try:
            time.sleep(0)                    # let other threads in while we hold the permit
            if (i * 200 + j) % 10 == 0:      # exactly 10 % raise
                raise RuntimeError("boom")
        finally:
            peak.exit()

    def body(i: int) -> None:
        for j in range(200):
            try:
                with bh:
                    guarded(i, j)
                key = "ok"
            except RuntimeError:
                key = "err"
            with olock:
                outcomes[key] += 1

    race(16, body)
    assert peak.peak <= 5
    assert peak.peak >= 2            # there was real contention
    assert outcomes == {"ok": 16 * 180, "err": 16 * 20}
    m = bh.metrics()
    assert (m.in_use, m.available, m.waiting, m.rejected) == (0, 5, 0, 0)


def test_threads_with_short_max_wait_never_leak(fast_switching):
    # rejections and timeouts at the edge of a handover must neither over-admit nor strand a permit
    bh = Bulkhead(3, max_wait=0.0005)
    peak = Peak()
    counts = [0, 0]
    clock = threading.Lock()

    def body(i: int) -> None:
        for _ in range(300):
            try:
                with bh:
                    peak.enter()
                    time.sleep(0)
                    peak.exit()
                k = 0
            except BulkheadFullError:
                k = 1
            with clock:
                counts[k] += 1

    race(12, body)
    assert peak.peak <= 3
    assert sum(counts) == 12 * 300
    assert bh.metrics().rejected == counts[1]
    assert (bh.in_use, bh.metrics().waiting) == (0, 0)


def test_async_tasks_cancelled_mid_flight_return_permits():
    async def main():
        bh = Bulkhead(5, max_wait=None)
        peak = Peak()
        gate = asyncio.Event()
        started = []

        async def work(i):
            async with bh:
                peak.enter()
                started.append(i)
                try:
                    await gate.wait()
                    await asyncio.sleep(0)
                finally:
                    peak.exit()
            return i

        tasks = [asyncio.create_task(work(i)) for i in range(200)]
        await asyncio.sleep(0)
        for _ in range(3):
            await asyncio.sleep(0)
        assert sorted(started) == [0, 1, 2, 3, 4]
        rng = random.Random(5)
        # 30 %: three of the running tasks and 57 of the waiting ones
        doomed = {0, 2, 4} | set(rng.sample(range(5, 200), 57))
        for i in doomed:
            tasks[i].cancel()
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
        assert cancelled == 60
        assert sorted(r for r in results if isinstance(r, int)) == sorted(set(range(200)) - doomed)
        assert peak.peak == 5
        m = bh.metrics()
        assert (m.in_use, m.available, m.waiting) == (0, 5, 0)

    run(main())


def test_async_cancel_while_running_and_while_waiting():
    async def main():
        bh = Bulkhead(1, max_wait=None)
        hold = asyncio.Event()

        async def holder():
            async with bh:
                await hold.wait()

        t1 = asyncio.create_task(holder())
        await asyncio.sleep(0)
        t2 = asyncio.create_task(bh.call_async(asyncio.sleep, 0))   # waits
        await asyncio.sleep(0)
        assert bh.metrics().waiting == 1
        t2.cancel()                                     # cancelled while waiting
        with pytest.raises(asyncio.CancelledError):
            await t2
        assert bh.metrics().waiting == 0 and bh.in_use == 1
        t1.cancel()                                     # cancelled while running
        with pytest.raises(asyncio.CancelledError):
            await t1
        assert bh.in_use == 0

    run(main())


def test_async_waiter_cancelled_after_handover_gives_permit_on():
    # the permit is handed to the waiter, then the waiter is cancelled before it runs: not swallowed
    async def main():
        bh = Bulkhead(1, max_wait=None)
        bh.acquire()
        waiter = asyncio.create_task(bh.acquire_async())
        second = asyncio.create_task(bh.acquire_async())
        await asyncio.sleep(0)
        assert bh.metrics().waiting == 2
        bh.release()                # hands the permit to `waiter` (wake-up scheduled, not yet run)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.wait_for(second, 5)   # the cancelled waiter passed its permit on
        assert bh.in_use == 1
        bh.release()
        assert bh.in_use == 0

    run(main())


def test_blocking_waiters_are_served_first_come_first_served():
    bh = Bulkhead(1, max_wait=None)
    bh.acquire()
    order: list[int] = []
    threads = []
    for i in range(5):
        def run(i=i):
            with bh:
                order.append(i)
        t = threading.Thread(target=run)
        t.start()
        threads.append(t)
        wait_until(lambda: bh.metrics().waiting == i + 1, "waiter to queue")
    bh.release()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]
    assert bh.in_use == 0


def test_blocking_wait_succeeds_when_released_in_time():
    bh = Bulkhead(1, max_wait=30.0)
    bh.acquire()
    got = []
    t = threading.Thread(target=lambda: got.append(bh.call(lambda: "ran")))
    t.start()
    wait_until(lambda: bh.metrics().waiting == 1, "waiter")
    bh.release()
    t.join(10)
    assert got == ["ran"] and bh.in_use == 0


def test_blocking_wait_times_out_with_bulkhead_full():
    bh = Bulkhead(1, max_wait=0.02)
    bh.acquire()
    with pytest.raises(BulkheadFullError):
        bh.acquire()
    with pytest.raises(BulkheadFullError):
        bh.acquire(timeout=0.0)
    m = bh.metrics()
    assert (m.rejected, m.waiting, m.in_use) == (2, 0, 1)


def test_async_max_wait_on_fake_clock():
    async def main():
        clock = FakeClock()
        bh = Bulkhead(1, max_wait=2.0, clock=clock)

        async def hold(seconds):
            async with bh:
                await clock.sleep_async(seconds)

        # the holder finishes at t=1, before the waiter's max_wait: the waiter gets in at t=1
        h = asyncio.create_task(hold(1.0))
        await asyncio.sleep(0)
        async with bh:
            assert clock.monotonic() == 1.0
        await h
        # the holder takes 5 s: the waiter gives up at t = 1 + 2
        h = asyncio.create_task(hold(5.0))
        await asyncio.sleep(0)
        with pytest.raises(BulkheadFullError):
            async with bh:
                pass
        assert clock.monotonic() == 3.0
        await h
        assert bh.in_use == 0 and bh.metrics().waiting == 0

    run(main())


def test_wait_capped_by_enclosing_deadline():
    from buttress._context import pop_deadline, push_deadline

    async def main():
        clock = FakeClock()
        bh = Bulkhead(1, max_wait=None, clock=clock)
        bh.acquire()
        token = push_deadline(clock.monotonic_ns() + 500_000_000, clock)
        try:
            with pytest.raises(BulkheadFullError):
                await bh.acquire_async()        # would wait forever; the deadline ends it at t=0.5
            assert clock.monotonic() == 0.5
            with pytest.raises(BulkheadFullError):
                bh.acquire()                    # deadline passed: a sync wait refuses at once
        finally:
            pop_deadline(token)
        assert bh.metrics().waiting == 0
        bh.release()

    run(main())


def test_resize_at_runtime():
    bh = Bulkhead(2, max_wait=None)
    assert bh.try_acquire() and bh.try_acquire()
    got = []
    t = threading.Thread(target=lambda: got.append(bh.call(lambda: 1)))
    t.start()
    wait_until(lambda: bh.metrics().waiting == 1, "waiter")
    bh.max_concurrent = 3           # growing wakes the waiter
    t.join(10)
    assert got == [1]
    assert bh.max_concurrent == 3 and bh.in_use == 2
    bh.max_concurrent = 1           # shrinking: holders finish, no new permit until below the max
    assert not bh.try_acquire()
    bh.release()
    assert not bh.try_acquire()
    bh.release()
    assert bh.try_acquire()
    bh.release()
    with pytest.raises(ValueError, match="max_concurrent"):
        bh.max_concurrent = 0


def test_interrupted_blocking_waiter_leaves_queue(monkeypatch):
    bh = Bulkhead(1, max_wait=None)
    bh.acquire()

    class Interrupt(BaseException):
        pass

    import buttress.bulkhead as mod
    real = mod._Waiter.__init__

    def init(self, loop=None):
        real(self, loop)
        if self.lock is not None:
            lock = self.lock

            class Raising:
                def acquire(self, timeout=-1):
                    raise Interrupt

                def release(self):
                    lock.release()
            self.lock = Raising()

    monkeypatch.setattr(mod._Waiter, "__init__", init)
    with pytest.raises(Interrupt):
        bh.acquire()
    assert bh.metrics().waiting == 0 and bh.in_use == 1
    bh.release()
    assert bh.in_use == 0


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"max_concurrent": 0}, ValueError, ["max_concurrent", "0", "between 1"]),
    ({"max_concurrent": 2.5}, TypeError, ["max_concurrent", "2.5", "int"]),
    ({"max_concurrent": True}, TypeError, ["max_concurrent", "True"]),
    ({"max_wait": -1}, ValueError, ["max_wait", "-1", ">= 0"]),
    ({"max_wait": "1"}, TypeError, ["max_wait", "'1'", "number"]),
    ({"max_wait": float("inf")}, ValueError, ["max_wait", "inf"]),
    ({"name": 3}, TypeError, ["name", "3", "str"]),
    ({"clock": object()}, TypeError, ["clock", "monotonic"]),
])
def test_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc) as ei:
        Bulkhead(**kwargs)
    for w in words:
        assert w in str(ei.value)


def test_bad_acquire_timeout():
    with pytest.raises(ValueError, match="timeout"):
        Bulkhead(1).acquire(timeout=-1)


# -- ThreadPoolBulkhead ------------------------------------------------------------------------------


def test_pool_submit_call_and_metrics():
    with ThreadPoolBulkhead(max_workers=2, queue_size=1, name="svc") as tp:
        assert tp.submit(lambda a, b: a * b, 6, b=7).result(10) == 42
        assert tp.call(lambda: threading.current_thread().name).startswith("buttress-svc-")
        with pytest.raises(ZeroDivisionError):
            tp.call(lambda: 1 / 0)
        m = tp.metrics()
        assert (m.max_workers, m.queue_size, m.running, m.queued, m.rejected) == (2, 1, 0, 0, 0)


def test_pool_rejects_when_queue_full_and_frees_slots():
    tp = ThreadPoolBulkhead(max_workers=2, queue_size=3, name="svc")
    gate = threading.Event()
    futs = [tp.submit(gate.wait, 30) for _ in range(5)]     # 2 running + 3 queued
    wait_until(lambda: tp.metrics().running == 2, "workers busy")
    assert tp.metrics().queued == 3
    with pytest.raises(BulkheadFullError, match="'svc'"):
        tp.submit(gate.wait)
    assert tp.metrics().rejected == 1
    futs[4].cancel()                                         # a cancelled queued call frees its slot
    tp.submit(gate.wait, 30)
    gate.set()
    assert all(f.result(10) for f in futs[:4])
    tp.shutdown(wait=True)
    m = tp.metrics()
    assert (m.running, m.queued) == (0, 0)


def test_pool_admission_under_racing_submitters(fast_switching):
    tp = ThreadPoolBulkhead(max_workers=4, queue_size=6)
    peak = Peak()
    counts = [0, 0]
    clock = threading.Lock()
    futures = []

    def work(i):
        peak.enter()
        time.sleep(0)
        peak.exit()
        return i

    def body(t):
        for j in range(150):
            try:
                fut = tp.submit(work, t * 1000 + j)
            except BulkheadFullError:
                k = 1
            else:
                k = 0
                with clock:
                    futures.append((t * 1000 + j, fut))
            with clock:
                counts[k] += 1

    race(16, body)
    assert sum(counts) == 16 * 150
    assert all(f.result(30) == i for i, f in futures)
    assert len(futures) == counts[0] and tp.metrics().rejected == counts[1]
    assert peak.peak <= 4
    tp.shutdown()
    m = tp.metrics()
    assert (m.running, m.queued) == (0, 0)


def test_pool_slot_is_free_when_the_caller_hears_the_result():
    tp = ThreadPoolBulkhead(max_workers=1, queue_size=0)
    for i in range(200):
        assert tp.call(lambda i=i: i) == i       # never a spurious BulkheadFullError
    tp.shutdown()


def test_hung_dependency_occupies_only_its_own_pool():
    hung = threading.Event()
    slow_pool = ThreadPoolBulkhead(max_workers=2, queue_size=0, name="slow")
    fast_pool = ThreadPoolBulkhead(max_workers=2, queue_size=0, name="fast")
    for _ in range(2):
        slow_pool.submit(hung.wait)
    with pytest.raises(BulkheadFullError):
        slow_pool.submit(lambda: 1)
    with pytest.raises(TimeoutExceeded):
        # a caller waiting on the slow pool gives up; the other pool keeps serving
        ThreadPoolBulkhead(max_workers=1, queue_size=0).call(hung.wait, timeout=0.01)
    assert [fast_pool.call(lambda i=i: i * 2, timeout=10) for i in range(50)] == [i * 2 for i in range(50)]
    hung.set()
    slow_pool.shutdown()
    fast_pool.shutdown()


def test_pool_call_timeout_is_capped_by_deadline_and_copies_context():
    tp = ThreadPoolBulkhead(max_workers=2, queue_size=0)
    seen = tp.call(buttress.remaining)
    assert seen is None
    seen = buttress.Timeout(30.0, executor=tp).call(lambda: tp.call(buttress.remaining))
    assert seen is not None and 0 < seen <= 30.0
    tp.shutdown()


def test_pool_call_async():
    async def main():
        tp = ThreadPoolBulkhead(max_workers=2, queue_size=0)
        assert await tp.call_async(lambda x: x + 1, 1) == 2

        @tp
        def where(x):
            return threading.current_thread().name

        assert where(1).startswith("buttress-pool")

        async def coro():
            return 1

        with pytest.raises(TypeError, match="async"):
            await tp.call_async(coro)
        tp.shutdown()

    run(main())


def test_pool_shutdown():
    tp = ThreadPoolBulkhead(max_workers=1, queue_size=5)
    gate = threading.Event()
    first = tp.submit(gate.wait, 30)
    queued = [tp.submit(lambda: 1) for _ in range(3)]
    wait_until(lambda: tp.metrics().running == 1, "worker busy")
    tp.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    with pytest.raises(RuntimeError, match="shut down"):
        tp.submit(lambda: 1)
    gate.set()
    assert first.result(10) is True
    tp.shutdown(wait=True)
    assert tp.metrics().running == 0 and tp.metrics().queued == 0


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"max_workers": 0}, ValueError, ["max_workers", "0", "between 1"]),
    ({"max_workers": "2"}, TypeError, ["max_workers", "'2'", "int"]),
    ({"queue_size": -1}, ValueError, ["queue_size", "-1", "between 0"]),
    ({"queue_size": 1.0}, TypeError, ["queue_size", "1.0", "int"]),
    ({"name": b"x"}, TypeError, ["name", "str"]),
])
def test_pool_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc) as ei:
        ThreadPoolBulkhead(**kwargs)
    for w in words:
        assert w in str(ei.value)


def test_pool_bad_call_timeout():
    tp = ThreadPoolBulkhead(1, 0)
    with pytest.raises(ValueError, match="timeout"):
        tp.call(lambda: 1, timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        tp.call(lambda: 1, timeout=1e300)       # used to leak OverflowError from concurrent.futures.wait
    assert tp.metrics().queued == 0 and tp.metrics().running == 0
    tp.shutdown()


def test_decorating_async_functions_and_non_callables():
    bh = Bulkhead(1, max_wait=None)

    @bh
    async def work(x):
        """adoc"""
        assert bh.in_use == 1
        await asyncio.sleep(0)
        if x < 0:
            raise ValueError(x)
        return x

    async def main():
        assert work.__doc__ == "adoc"
        assert await asyncio.gather(work(1), work(2), work(3)) == [1, 2, 3]
        with pytest.raises(ValueError):
            await work(-1)
        t = asyncio.create_task(work(5))
        await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert bh.in_use == 0

    run(main())
    with pytest.raises(TypeError, match="decorates a callable"):
        bh(5)


# -- one acquisition, one release (a second exit is a no-op) -----------------------------------------


def test_second_exit_frees_no_other_callers_permit():
    bh = Bulkhead(2)
    entered, leave = threading.Event(), threading.Event()

    def holder():
        with bh:
            entered.set()
            leave.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    assert entered.wait(30)
    with bh:
        pass
    bh.__exit__(None, None, None)           # used to free the holder's permit
    assert bh.in_use == 1
    assert bh.try_acquire() and not bh.try_acquire()     # never past the limit
    bh.release()
    leave.set()
    t.join(30)
    assert bh.in_use == 0 and bh.available == 2


def test_release_with_nothing_held_is_a_value_error_and_changes_nothing():
    bh = Bulkhead(2)
    with pytest.raises(ValueError, match="released but only 0 are held"):
        bh.release()
    assert (bh.in_use, bh.available) == (0, 2)


def test_async_second_exit_frees_no_other_tasks_permit():
    async def main():
        bh = Bulkhead(2, max_wait=None)
        entered, leave = asyncio.Event(), asyncio.Event()

        async def holder():
            async with bh:
                entered.set()
                await leave.wait()

        t = asyncio.create_task(holder())
        await entered.wait()
        async with bh:
            pass
        await bh.__aexit__(None, None, None)    # used to free the holder's permit
        assert bh.in_use == 1
        assert bh.try_acquire() and not bh.try_acquire()
        bh.release()
        leave.set()
        await t
        assert bh.in_use == 0 and bh.available == 2

    run(main())


def test_async_nested_and_exit_stacks_release_each_acquisition_once():
    import contextlib

    async def main():
        bh = Bulkhead(3, max_wait=None)
        async with bh:
            async with bh:
                assert bh.in_use == 2
            assert bh.in_use == 1
        assert bh.in_use == 0
        async with contextlib.AsyncExitStack() as stack:     # enter and exit from contextlib's frames
            await stack.enter_async_context(bh)
            await stack.enter_async_context(bh)
            assert bh.in_use == 2
        assert bh.in_use == 0
        with contextlib.ExitStack() as stack:
            stack.enter_context(bh)
            assert bh.in_use == 1
        assert bh.in_use == 0

    run(main())


def test_async_generator_closed_in_another_task_returns_its_permit():
    async def main():
        bh = Bulkhead(1, max_wait=None)

        async def stream():
            async with bh:
                yield 1
                yield 2

        async def consume_one():
            agen = stream()
            assert await agen.__anext__() == 1
            return agen

        agen = await asyncio.create_task(consume_one())
        assert bh.in_use == 1
        await asyncio.create_task(agen.aclose())             # finalised by another task
        assert bh.in_use == 0 and bh._async_held == {}

    run(main())


@pytest.mark.parametrize("timeout", [None, 0.0, 5.0])
def test_a_drained_bulkhead_refuses_with_retry_after_none(timeout):
    # DESIGN §3c: retry_after is the time until the same request is admitted; a drained bulkhead stays
    # closed after the drain until resume(), so that time is unknown (it used to be the drain time left)
    clock = FakeClock()
    bh = Bulkhead(max_concurrent=2, clock=clock)
    bh._begin_drain(timeout)
    refusals = []
    for attempt in (lambda: bh.call(lambda: 1), lambda: bh(lambda: 1)(), bh.__enter__):
        with pytest.raises(BulkheadFullError, match="draining") as info:
            attempt()
        refusals.append(info.value.retry_after)

    async def in_async():
        with pytest.raises(BulkheadFullError, match="draining") as info:
            async with bh:
                pass
        refusals.append(info.value.retry_after)
        with pytest.raises(BulkheadFullError, match="draining") as info:
            await bh.call_async(asyncio.sleep, 0)
        refusals.append(info.value.retry_after)

    run(in_async())
    assert refusals == [None] * 5
    assert bh.drain(timeout=1.0) == 0
    clock.advance(10.0)                     # past the deadline: still closed, still unknown
    with pytest.raises(BulkheadFullError) as info:
        bh.call(lambda: 1)
    assert info.value.retry_after is None
    bh.resume()
    assert bh.call(lambda: 2) == 2 and bh.available == 2


def test_a_queued_waiter_refused_by_a_drain_gets_retry_after_none():
    bh = Bulkhead(max_concurrent=1, max_wait=None)
    assert bh.try_acquire()
    errors = []
    queued = threading.Event()

    def waiter():
        queued.set()
        try:
            with bh:
                pass
        except BulkheadFullError as exc:
            errors.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    assert queued.wait(30)
    for _ in range(20000):
        if bh.metrics().waiting:
            break
        threading.Event().wait(0.0005)
    bh._begin_drain(60.0)
    t.join(30)
    assert not t.is_alive() and len(errors) == 1
    assert "draining" in str(errors[0]) and errors[0].retry_after is None
    bh.release()
    bh.resume()


def test_a_drained_thread_pool_refuses_submits_with_retry_after_none():
    with ThreadPoolBulkhead(max_workers=1, queue_size=1) as pool:
        assert pool.drain(timeout=5.0) == 0
        with pytest.raises(BulkheadFullError, match="draining") as info:
            pool.submit(lambda: 1)
        assert info.value.retry_after is None
        pool.resume()
        assert pool.call(lambda: 3, timeout=30) == 3
