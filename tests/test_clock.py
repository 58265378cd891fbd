import asyncio
import time

import pytest

import buttress
from buttress.clock import SYSTEM_CLOCK, resolve_clock


def test_fake_clock_moves_only_when_told():
    c = buttress.FakeClock(start=2.5)
    assert c.monotonic() == 2.5 and c.monotonic_ns() == 2_500_000_000
    c.advance(1.5)
    assert c.monotonic_ns() == 4_000_000_000
    c.sleep(0.25)
    assert c.monotonic() == 4.25


def test_fake_clock_bad_args():
    assert buttress.FakeClock(-1).monotonic_ns() == -1_000_000_000     # any int64 ns reading (§3c)
    for start in (1e300, 10**400, -1e300, float("nan")):                # past int64 ns: named, no OverflowError
        with pytest.raises(ValueError, match="start must be a finite number"):
            buttress.FakeClock(start)
    with pytest.raises(TypeError, match="start must be a number"):
        buttress.FakeClock(True)
    c = buttress.FakeClock()
    for seconds in (1e300, 10**400, float("inf")):
        with pytest.raises(ValueError, match="seconds must be a finite number >= 0 and <= 1e"):
            c.advance(seconds)
    big = buttress.FakeClock(9.2e9)
    with pytest.raises(ValueError, match="seconds=1000000000.0 would move the clock past int64"):
        big.advance(1e9)
    assert big.monotonic() == 9.2e9                                     # nothing moved
    with pytest.raises(ValueError, match="seconds must be"):
        c.advance(-0.1)
    with pytest.raises(TypeError, match="seconds must be a number"):
        c.advance("1")


def test_lone_async_sleeper_returns_at_once_after_advancing():
    c = buttress.FakeClock()

    async def main():
        t0 = time.monotonic()
        await c.sleep_async(30)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 5          # did not really sleep 30 s
    assert c.monotonic() == 30


def test_earliest_sleeper_fires_first():
    c = buttress.FakeClock()
    order = []

    async def sleeper(name, s):
        await c.sleep_async(s)
        order.append((name, c.monotonic()))

    async def main():
        await asyncio.gather(sleeper("late", 5), sleeper("early", 2), sleeper("mid", 3))

    asyncio.run(main())
    assert order == [("early", 2.0), ("mid", 3.0), ("late", 5.0)]


def test_without_autojump_only_advance_wakes():
    c = buttress.FakeClock(autojump=False)

    async def main():
        task = asyncio.ensure_future(c.sleep_async(1.0))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done() and c.pending_sleepers == 1
        c.advance(0.5)
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done()
        c.advance(0.5)
        await asyncio.wait_for(task, 5)
        assert c.pending_sleepers == 0

    asyncio.run(main())


def test_cancelled_sleeper_is_dropped():
    c = buttress.FakeClock(autojump=False)

    async def main():
        task = asyncio.ensure_future(c.sleep_async(1.0))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert c.pending_sleepers == 0

    asyncio.run(main())


def test_resolve_clock():
    assert resolve_clock(None) is SYSTEM_CLOCK
    fc = buttress.FakeClock()
    assert resolve_clock(fc) is fc
    with pytest.raises(TypeError, match="clock must provide monotonic"):
        resolve_clock(object())


def test_system_clock_is_the_monotonic_clock():
    a = time.monotonic_ns()
    b = SYSTEM_CLOCK.monotonic_ns()
    assert 0 <= b - a < 10**9
