"""Bulkhead exactness under real threads, cancellation, BaseException at every step, and
ThreadPoolBulkhead shutdown racing submits: never past the limit, every permit back, no future pending."""
from __future__ import annotations

import asyncio
import concurrent.futures
import random
import sys
import threading

import pytest

import buttress.bulkhead as mod
from buttress import Bulkhead, BulkheadFullError, FakeClock, ThreadPoolBulkhead
from helpers import race


def run(coro, limit: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, limit))


class Inside:
    """Callers inside the guarded block, and the most ever at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.peak = 0

    def __enter__(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.now -= 1


# -- threads: double exits, waiting, hand-over ---------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 3])
def test_racing_double_exits_never_run_past_the_limit(fast_switching, limit):
    bh = Bulkhead(limit, max_wait=None)
    inside = Inside()

    def body(i: int) -> int:
        done = 0
        for j in range(300):
            with bh:
                with inside:
                    pass
            bh.__exit__(None, None, None)           # a buggy caller exits twice
            done += 1
        return done

    assert sum(race(8, body)) == 8 * 300
    assert inside.peak <= limit
    m = bh.metrics()
    assert (m.in_use, m.available, m.waiting) == (0, limit, 0)


def test_waiters_are_always_woken(fast_switching):
    # release-then-look-for-waiters against queue-then-look-for-a-permit: a lost wake-up hangs a thread
    # (race() fails on a hung thread); every caller waits, so every hand-over is exercised
    bh = Bulkhead(1, max_wait=None)
    inside = Inside()

    def body(i: int) -> int:
        for _ in range(200):
            with bh:
                with inside:
                    pass
        return 200

    assert sum(race(8, body)) == 1600
    assert inside.peak == 1 and bh.in_use == 0 and bh.metrics().waiting == 0


def test_short_waits_two_step_and_decorator_mixed(fast_switching):
    bh = Bulkhead(2, max_wait=0.0002)
    inside = Inside()

    @bh
    def guarded() -> None:
        with inside:
            pass

    counts = [0, 0]
    lock = threading.Lock()

    def body(i: int) -> None:
        rng = random.Random(i)
        for _ in range(300):
            k = 0
            try:
                r = rng.random()
                if r < 0.3:
                    guarded()
                elif r < 0.6:
                    with bh:
                        with inside:
                            pass
                elif r < 0.8:
                    bh.call(guarded.__wrapped__)
                elif bh.try_acquire():
                    try:
                        with inside:
                            pass
                    finally:
                        bh.release()
            except BulkheadFullError:
                k = 1
            with lock:
                counts[k] += 1

    race(8, body)
    assert sum(counts) == 8 * 300
    assert inside.peak <= 2
    m = bh.metrics()
    assert (m.in_use, m.available, m.waiting) == (0, 2, 0)


# -- asyncio: cancellation at every point of a wait ----------------------------------------------------


@pytest.mark.parametrize("steps", range(6))
def test_cancelled_at_every_step_of_a_wait(steps):
    async def main():
        bh = Bulkhead(1, max_wait=None)
        bh.acquire()
        waiter = asyncio.create_task(bh.acquire_async())
        second = asyncio.create_task(bh.acquire_async())
        for _ in range(steps // 2):
            await asyncio.sleep(0)
        if steps % 2:
            bh.release()            # hand-over to `waiter` (or to nobody yet, if it has not queued)
        waiter.cancel()
        try:
            await waiter
            bh.release()            # it got the permit before the cancel arrived: give it back
        except asyncio.CancelledError:
            pass
        if not steps % 2:
            bh.release()
        await asyncio.wait_for(second, 10)      # the one permit reaches the second waiter
        assert bh.in_use == 1
        bh.release()
        m = bh.metrics()
        assert (m.in_use, m.waiting, m.available) == (0, 0, 1)

    run(main())


def test_many_tasks_cancelled_at_random_points(fast_switching):
    async def main():
        bh = Bulkhead(3, max_wait=None)
        inside = Inside()
        rng = random.Random(7)

        async def work():
            async with bh:
                with inside:
                    for _ in range(rng.randrange(3)):
                        await asyncio.sleep(0)

        for _ in range(20):
            tasks = [asyncio.create_task(work()) for _ in range(50)]
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)
            for t in rng.sample(tasks, 20):
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert inside.peak <= 3
            m = bh.metrics()
            assert (m.in_use, m.waiting, m.available) == (0, 0, 3) and bh._async_held == {}

    run(main())


def test_timer_firing_with_a_hand_over_keeps_one_permit():
    async def main():
        clock = FakeClock()
        bh = Bulkhead(1, max_wait=1.0, clock=clock)
        bh.acquire()
        waiter = asyncio.create_task(bh.acquire_async())
        await asyncio.sleep(0)
        bh.release()                # hand-over scheduled ...
        clock.advance(1.0)          # ... and the timer fires in the same loop turn
        await waiter                # a waiter handed a permit as it times out keeps it
        assert bh.in_use == 1
        bh.release()
        assert bh.metrics().waiting == 0 and bh.in_use == 0

    run(main())


# -- BaseException at every step of the slow paths -----------------------------------------------------


class Boom(BaseException):
    pass


def _raise_once(monkeypatch, obj, name):
    real = getattr(obj, name)
    state = {"armed": True}

    def patched(*args, **kwargs):
        if state["armed"]:
            state["armed"] = False
            raise Boom(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, patched)


@pytest.mark.parametrize("where", ["_enqueue", "_settle", "call_later"])
def test_async_wait_interrupted_at_each_step(monkeypatch, where):
    async def main():
        clock = FakeClock()
        bh = Bulkhead(1, max_wait=5.0, clock=clock)
        bh.acquire()
        if where == "call_later":
            _raise_once(monkeypatch, mod, "call_later")
        else:
            _raise_once(monkeypatch, Bulkhead, where)
        with pytest.raises(Boom):
            await bh.acquire_async()
        assert bh.metrics().waiting == 0 and bh.in_use == 1
        bh.release()
        assert bh.in_use == 0
        await bh.acquire_async()        # and the bulkhead still works
        bh.release()

    run(main())


@pytest.mark.parametrize("where", ["_enqueue", "_settle"])
def test_sync_wait_interrupted_at_each_step(monkeypatch, where):
    bh = Bulkhead(1, max_wait=None)
    bh.acquire()
    _raise_once(monkeypatch, Bulkhead, where)
    with pytest.raises(Boom):
        bh.acquire(timeout=0.01)        # _settle runs after the wait ends
    assert bh.metrics().waiting == 0 and bh.in_use == 1
    bh.release()
    assert bh.in_use == 0


def test_wake_failing_gives_the_permit_back(monkeypatch):
    bh = Bulkhead(1, max_wait=None)
    bh.acquire()
    got = []

    def waiter():
        try:
            bh.acquire(timeout=0.5)     # the failed hand-over never wakes it: it times out
            got.append("got")
        except BulkheadFullError:
            got.append("refused")

    t = threading.Thread(target=waiter)
    real = mod._Waiter.wake

    def wake(self):
        monkeypatch.setattr(mod._Waiter, "wake", real)
        raise Boom("wake")

    t.start()
    while bh.metrics().waiting != 1:
        pass
    monkeypatch.setattr(mod._Waiter, "wake", wake)
    with pytest.raises(Boom):
        bh.release()                # the hand-over fails: the permit must not stay with the waiter
    t.join(30)
    assert got == ["refused"]
    assert bh.in_use == 0 and bh.metrics().waiting == 0
    assert bh.try_acquire()


def test_aenter_interrupted_after_acquiring_gives_the_permit_back(monkeypatch):
    async def main():
        bh = Bulkhead(1)
        aw = bh.__aenter__()                # acquired and recorded; interrupted before the body runs
        assert bh.in_use == 1
        with pytest.raises(Boom):
            aw.throw(Boom("interrupted"))
        assert bh.in_use == 0 and bh._async_held == {}

    run(main())


# -- ThreadPoolBulkhead: shutdown racing submits -------------------------------------------------------


@pytest.mark.parametrize("round_", range(25))
def test_pool_shutdown_racing_submits_leaves_nothing_pending(fast_switching, round_):
    tp = ThreadPoolBulkhead(max_workers=2, queue_size=4)
    n = 6
    barrier = threading.Barrier(n + 1)
    futures: list[concurrent.futures.Future] = []
    outcomes = {"accepted": 0, "full": 0, "shut": 0}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def submitter(i: int) -> None:
        barrier.wait()
        for j in range(20):
            try:
                fut = tp.submit(lambda i=i, j=j: (i, j))
            except BulkheadFullError:
                key = "full"
            except RuntimeError as exc:
                assert "shut down" in str(exc)
                key = "shut"
            else:
                key = "accepted"
                with lock:
                    futures.append(fut)
            with lock:
                outcomes[key] += 1

    def stopper() -> None:
        barrier.wait()
        try:
            tp.shutdown(wait=True, cancel_futures=round_ % 2 == 1)
        except BaseException as exc:  # noqa: BLE001 - "cannot join thread before it is started"
            errors.append(exc)

    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(n)] + [threading.Thread(target=stopper)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert errors == []
    # every accepted call runs, or was cancelled by shutdown(cancel_futures=True): none stays pending
    # (a future cancelled by shutdown is done(); concurrent.futures.wait() itself only counts futures a
    # worker saw, so ask each one)
    for f in futures:
        if not f.cancelled():
            assert f.result(30) is not None
    assert all(f.done() for f in futures)
    if round_ % 2 == 0:
        assert not any(f.cancelled() for f in futures)
    assert sum(outcomes.values()) == n * 20
    m = tp.metrics()
    assert (m.running, m.queued) == (0, 0)


def test_pool_cancel_frees_the_slot_exactly_once():
    tp = ThreadPoolBulkhead(max_workers=1, queue_size=2)
    gate = threading.Event()
    running = tp.submit(gate.wait, 30)
    queued = [tp.submit(lambda: 1) for _ in range(2)]
    with pytest.raises(BulkheadFullError):
        tp.submit(lambda: 1)
    assert queued[0].cancel() and queued[0].cancel()        # cancelling twice frees one slot
    assert not running.cancel()                             # running: not cancelled, keeps its slot
    tp.submit(lambda: 2)
    with pytest.raises(BulkheadFullError):
        tp.submit(lambda: 1)
    gate.set()
    tp.shutdown(wait=True)
    m = tp.metrics()
    assert (m.running, m.queued) == (0, 0) and tp._accepted.in_use == 0


def test_pool_after_shutdown_refuses_and_frees_its_slot():
    tp = ThreadPoolBulkhead(max_workers=1, queue_size=0)
    tp.shutdown()
    for _ in range(3):
        with pytest.raises(RuntimeError, match="shut down"):
            tp.submit(lambda: 1)
    assert tp._accepted.in_use == 0 and tp.metrics().rejected == 0


def test_pool_shutdown_from_its_own_worker_does_not_raise():
    tp = ThreadPoolBulkhead(max_workers=1, queue_size=1)
    assert tp.submit(lambda: tp.shutdown(wait=True)).result(30) is None
    with pytest.raises(RuntimeError, match="shut down"):
        tp.submit(lambda: 1)


def test_pool_base_exception_in_a_call_frees_its_slot():
    tp = ThreadPoolBulkhead(max_workers=1, queue_size=0)

    def interrupted():
        raise Boom("in the call")

    fut = tp.submit(interrupted)
    with pytest.raises(Boom):
        fut.result(30)
    assert tp.call(lambda: 5) == 5
    tp.shutdown()
    assert tp._accepted.in_use == 0


def test_switch_interval_restored():
    assert sys.getswitchinterval() > 1e-6
