"""One async timer on any clock, shared by the bulkhead's async waits and Timeout.

With the system clock it is a plain loop timer (cheap); with any other clock (FakeClock in tests) it is
a small task sleeping on ``clock.sleep_async``, so that advancing the clock fires it.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from .clock import is_system_clock

__all__ = ["call_later"]


def call_later(clock: Any, seconds: float, callback: Callable[[], object]) -> asyncio.TimerHandle | asyncio.Task[None]:
    """Call `callback()` on the running loop after `seconds` of `clock` time; `.cancel()` stops it."""
    loop = asyncio.get_running_loop()
    if is_system_clock(clock):
        return loop.call_later(seconds, callback)

    async def sleeper() -> None:
        await clock.sleep_async(seconds)
        callback()

    return loop.create_task(sleeper())
