"""LoadShedder overload signals (issue 17: event-loop lag, process CPU, a queue depth, thresholds per priority,
one level word read by admission, sampling off the per-call path) and graceful shutdown (drain) of
LoadShedder, Bulkhead and ThreadPoolBulkhead. Timing runs on FakeClock and injected samplers."""
from __future__ import annotations

import asyncio
import threading

import pytest

from buttress import (Bulkhead, BulkheadFullError, FakeClock, LoadShedder, Overloaded, Priority,
                      ThreadPoolBulkhead)
from buttress.shedding import CpuUsage, LoopLag, QueueDepth

P = Priority


def shed_at(shed):
    """The priorities refused now (each tried once)."""
    out = []
    for p in P:
        try:
            with shed.admit(p):
                pass
        except Overloaded:
            out.append(p)
    return out


# -- thresholds ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    ({"low": 0.5, "medium": 0.2}, "must not decrease"),
    ({"low": None, "medium": 0.2}, "lower priority's threshold is None"),
    ({"low": -1.0}, "low must be a finite number >= 0"),
    ({"low": float("inf")}, "low must be a finite number"),
    ({"low": "1"}, "low must be a number"),
])
def test_thresholds_are_checked_and_named(kwargs, words):
    with pytest.raises((ValueError, TypeError), match=words):
        LoopLag(**{"low": 0.1, "medium": None, "high": None, **kwargs})


def test_signals_and_callables_are_checked_at_construction():
    with pytest.raises(TypeError, match="signals must hold OverloadSignal"):
        LoadShedder(signals=[lambda: 1])
    with pytest.raises(TypeError, match="depth"):
        QueueDepth(lambda n: n, low=1)
    with pytest.raises(TypeError, match="sampler"):
        CpuUsage(sampler=3)
    with pytest.raises(ValueError, match="sample_interval"):
        LoadShedder(signals=[LoopLag()], sample_interval=0)


# -- queue depth: LOW first, CRITICAL never, the level word --------------------------------------------------

def test_a_queue_depth_sheds_low_first_then_medium_then_high_never_critical():
    depth = [0]
    shed = LoadShedder(max_in_flight=100, signals=[QueueDepth(lambda: depth[0], low=10, medium=100, high=1000)],
                       sample_interval=0.25, clock=FakeClock())
    for d, refused, level in [(0, [], 0), (10, [P.LOW], 1), (99, [P.LOW], 1), (100, [P.LOW, P.MEDIUM], 2),
                              (10**6, [P.LOW, P.MEDIUM, P.HIGH], 3), (5, [], 0)]:
        depth[0] = d
        assert shed.sample() == level
        assert shed.level == level and shed_at(shed) == refused, d
    depth[0] = 50
    shed.sample()
    with pytest.raises(Overloaded) as info:
        shed.call(lambda: 1, priority=P.LOW)
    assert info.value.retry_after == 0.25 and "queue_depth 50" in str(info.value)
    m = shed.metrics()
    assert m.level == 1 and m.signals["queue_depth"] == 50.0 and m.shed[P.LOW] >= 1


def test_a_signal_refusal_names_its_signals_as_data_and_other_refusals_name_none():
    depth, cpu = [0], [0.0]
    q = QueueDepth(lambda: depth[0], low=10, medium=100)
    shed = LoadShedder(max_in_flight=1, signals=[q], sample_interval=0.25, clock=FakeClock())
    depth[0] = 50
    shed.sample()
    with pytest.raises(Overloaded) as info:
        shed.call(lambda: 1, priority=P.LOW)
    assert info.value.signals == ("queue_depth",)
    depth[0] = 0
    shed.sample()
    with shed.admit(P.HIGH):                        # the one slot taken: refused by the in-flight count
        with pytest.raises(Overloaded) as info:
            shed.call(lambda: 1, priority=P.LOW)
    assert info.value.signals == ()
    import pickle
    e = pickle.loads(pickle.dumps(Overloaded("x", retry_after=1.0, signals=("cpu", "loop_lag"))))
    assert e.signals == ("cpu", "loop_lag") and e.retry_after == 1.0 and str(e) == "x"
    with pytest.raises(TypeError, match="signals must be a tuple of signal names"):
        Overloaded("x", signals="cpu")  # type: ignore[arg-type]


def test_is_sampling_follows_start_stop_and_a_closed_loop_and_start_rearms_on_a_new_loop():
    clock = FakeClock(autojump=False)
    depth = [0]
    shed = LoadShedder(signals=[QueueDepth(lambda: depth[0], low=10)], sample_interval=0.1, clock=clock)
    assert shed.is_sampling is False

    async def run_once(expect_level: int) -> None:
        shed.start()
        assert shed.is_sampling is True
        for _ in range(5):
            await asyncio.sleep(0)
        clock.advance(0.1)
        for _ in range(5):
            await asyncio.sleep(0)
        assert shed.level == expect_level

    depth[0] = 50
    asyncio.run(run_once(1))            # the loop closes with the sampler still started
    assert shed.is_sampling is False    # its loop is gone
    depth[0] = 0
    asyncio.run(run_once(0))            # start() on a new loop arms a new timer (the level moves again)
    shed.stop()
    shed.stop()                         # idempotent, and safe after the loop closed
    assert shed.is_sampling is False


def test_admission_never_reads_a_signal():
    reads = []
    shed = LoadShedder(max_in_flight=100, signals=[QueueDepth(lambda: reads.append(1) or 0, low=10)],
                       clock=FakeClock())
    for _ in range(200):
        with shed.admit(P.LOW):
            pass
        shed.call(lambda: None, priority=P.HIGH)
    assert reads == []
    shed.sample()
    assert reads == [1]


def test_a_failing_signal_is_logged_and_sheds_nothing(caplog):
    def broken():
        raise RuntimeError("probe down")

    shed = LoadShedder(signals=[QueueDepth(broken, low=1)], clock=FakeClock())
    assert shed.sample() == 0 and shed_at(shed) == []
    assert "failed to read" in caplog.text


def test_the_worst_signal_decides():
    a, b = [0], [0]
    shed = LoadShedder(signals=[QueueDepth(lambda: a[0], low=10, medium=20, high=30),
                                CpuUsage(low=0.5, medium=0.9, sampler=lambda: b[0])], clock=FakeClock())
    a[0] = 25
    assert shed.sample() == 2


# -- CPU utilisation from process-time deltas --------------------------------------------------------------

def test_cpu_usage_is_cpu_seconds_over_wall_seconds_between_samples():
    clock = FakeClock()
    cpu = [100.0]
    sig = CpuUsage(low=0.5, medium=0.8, high=0.95, sampler=lambda: cpu[0])
    shed = LoadShedder(signals=[sig], clock=clock)
    sig.start(clock.monotonic_ns())
    for used, level in [(0.3, 0), (0.6, 1), (0.85, 2), (0.99, 3), (0.1, 0)]:
        clock.advance(2.0)
        cpu[0] += 2.0 * used
        assert shed.sample() == level
        assert shed.metrics().signals["cpu"] == pytest.approx(used)
    two = CpuUsage(low=0.5, cpus=2, sampler=lambda: cpu[0])
    two.start(clock.monotonic_ns())
    clock.advance(1.0)
    cpu[0] += 1.2                           # 1.2 cores of 2: 0.6
    assert two.read(clock.monotonic_ns()) == pytest.approx(0.6)


# -- event-loop lag from a timer on the running loop -------------------------------------------------------

def test_loop_lag_is_how_late_the_samplers_timer_fires():
    clock = FakeClock(autojump=False)
    lag = LoopLag(low=0.05, medium=0.2, high=1.0)
    shed = LoadShedder(signals=[lag], sample_interval=0.1, clock=clock)

    async def settle():
        for _ in range(5):
            await asyncio.sleep(0)

    async def main():
        shed.start()
        await settle()
        clock.advance(0.1)                  # on time
        await settle()
        assert lag.lag == pytest.approx(0.0) and shed.level == 0
        clock.advance(0.1 + 0.3)            # the loop was blocked 0.3 s past the timer's time
        await settle()
        assert lag.lag == pytest.approx(0.3) and shed.level == 2
        assert shed_at(shed) == [P.LOW, P.MEDIUM]
        clock.advance(0.1)
        await settle()
        assert shed.level == 0 and shed_at(shed) == []
        shed.stop()
        clock.advance(5.0)
        await settle()
        assert lag.lag == 0.0               # stopped: no more ticks

    asyncio.run(main())


def test_start_needs_a_loop_for_loop_lag_and_the_system_clock_for_a_thread():
    with pytest.raises(RuntimeError, match="inside"):
        LoadShedder(signals=[LoopLag()]).start()
    with pytest.raises(RuntimeError, match="sample"):
        LoadShedder(signals=[QueueDepth(lambda: 0, low=1)], clock=FakeClock()).start()


def test_a_sampling_thread_updates_the_level():
    hit = threading.Event()

    def depth():
        hit.set()
        return 50

    shed = LoadShedder(signals=[QueueDepth(depth, low=10)], sample_interval=0.001)
    shed.start()
    try:
        assert hit.wait(30)
        for _ in range(1000):
            if shed.level == 1:
                break
            threading.Event().wait(0.001)
        assert shed.level == 1
    finally:
        shed.stop()


# -- graceful shutdown -------------------------------------------------------------------------------------

def test_a_shedder_drain_refuses_every_priority_waits_and_reports_what_still_runs():
    clock = FakeClock()
    shed = LoadShedder(max_in_flight=10, clock=clock)
    held = shed.admit(P.HIGH)
    held.__enter__()
    assert shed.drain(timeout=5.0) == 1     # one call in flight at the deadline
    assert clock.monotonic() == pytest.approx(5.0)
    assert shed_at(shed) == list(P)         # CRITICAL too
    with pytest.raises(Overloaded, match="draining") as info:
        shed.call(lambda: 1, priority=P.CRITICAL)
    assert info.value.retry_after is None     # refused until resume(): unknown (DESIGN §3c)
    held.__exit__(None, None, None)
    assert shed.drain(timeout=5.0) == 0 and shed.metrics().draining
    shed.resume()
    assert shed_at(shed) == [] and not shed.draining


def test_a_drain_outlasts_a_signal_sample_and_resume_restores_the_signals_level():
    depth = [50]
    shed = LoadShedder(signals=[QueueDepth(lambda: depth[0], low=10)], clock=FakeClock())
    shed.sample()
    shed.drain(timeout=0)
    shed.sample()                           # a sample while draining keeps everything refused
    assert shed.level == 4
    shed.resume()
    assert shed.level == 1


def test_drain_async_returns_once_the_calls_finish():
    clock = FakeClock()
    shed = LoadShedder(clock=clock)
    bh = Bulkhead(max_concurrent=2, clock=clock)

    async def call(release):
        async with shed.admit(P.HIGH), bh:
            await release.wait()

    async def main():
        release = asyncio.Event()
        task = asyncio.create_task(call(release))
        await asyncio.sleep(0)
        assert shed.in_flight == 1 and bh.in_use == 1
        d1 = asyncio.create_task(shed.drain_async(timeout=60.0))
        d2 = asyncio.create_task(bh.drain_async(timeout=60.0))
        await asyncio.sleep(0)
        release.set()
        assert await d1 == 0 and await d2 == 0
        await task
        assert clock.monotonic() < 60.0

    asyncio.run(main())


def test_a_bulkhead_drain_refuses_new_calls_and_queued_waiters():
    clock = FakeClock()
    bh = Bulkhead(max_concurrent=1, max_wait=None, clock=clock)
    assert bh.try_acquire()
    errors = []
    queued = threading.Event()

    def waiter():
        queued.set()
        try:
            bh.acquire()                    # max_wait=None: waits until a permit or the drain
        except BulkheadFullError as exc:
            errors.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    assert queued.wait(30)
    for _ in range(10000):
        if bh.metrics().waiting:
            break
        threading.Event().wait(0.0005)
    assert bh.drain(timeout=2.0) == 1
    t.join(30)
    assert not t.is_alive() and len(errors) == 1 and "draining" in str(errors[0])
    with pytest.raises(BulkheadFullError) as info:
        with bh:
            pass
    assert info.value.retry_after is None     # closed until resume(): unknown
    assert not bh.try_acquire()
    with pytest.raises(BulkheadFullError):
        bh(lambda: 1)()
    bh.release()
    assert bh.drain(timeout=0) == 0
    bh.resume()
    assert bh(lambda: 2)() == 2 and bh.max_concurrent == 1 and bh.available == 1


def test_a_thread_pool_drain_refuses_submits_and_waits_for_accepted_calls():
    gate = threading.Event()
    with ThreadPoolBulkhead(max_workers=1, queue_size=2) as pool:
        running = pool.submit(gate.wait, 60)
        queued = pool.submit(lambda: "queued")
        assert pool.drain(timeout=0) == 2   # one running, one queued, at a deadline of now
        with pytest.raises(BulkheadFullError, match="draining") as info:
            pool.submit(lambda: 1)
        assert info.value.retry_after is None and pool.draining
        gate.set()
        assert pool.drain() == 0            # no deadline: until every accepted call is done
        assert running.result() is True and queued.result() == "queued"
        pool.resume()
        assert pool.call(lambda: 3, timeout=30) == 3


def test_drain_timeouts_are_checked_and_named():
    for obj in (LoadShedder(), Bulkhead(), ThreadPoolBulkhead(1, 1)):
        with pytest.raises(ValueError, match="timeout"):
            obj.drain(timeout=-1)
        with pytest.raises(TypeError, match="timeout"):
            obj.drain(timeout="5")


def test_a_defaulted_threshold_below_a_raised_one_is_explained():
    """LoopLag(low=0.5): medium's default (0.25) is below it; the message says it is the default and what
    to pass (the reviewer read "got medium=0.25" for a medium never passed)."""
    with pytest.raises(ValueError, match=r"medium=0.25 below 0.5 \(LoopLag's defaults are low=0.1, medium=0.25, "
                                         r"high=0.5: .*pass the higher priorities' thresholds too"):
        LoopLag(low=0.5)
    with pytest.raises(ValueError) as info:
        QueueDepth(lambda: 0, low=10, medium=5)     # passed explicitly: no hint about defaults
    assert "defaults" not in str(info.value)
    assert LoopLag(low=0.5, medium=0.6, high=None).thresholds == (0.5, 0.6, None)
