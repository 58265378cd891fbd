"""Clocks. Every facade object takes ``clock=``; any object with these methods works:

``monotonic() -> float s``, ``monotonic_ns() -> int ns``, ``sleep(s)``, ``await sleep_async(s)``.

`SystemClock` is the real monotonic clock. `FakeClock` is for tests: time moves only when told,
so timers, windows, limiters, backoff sleeps and timeouts are tested without sleeping.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import threading
import time
from typing import Protocol, runtime_checkable

from ._params import MAX_SECONDS, NS, check_float, check_int, check_seconds, show

__all__ = ["Clock", "SystemClock", "FakeClock", "SYSTEM_CLOCK", "resolve_clock", "is_system_clock", "testing_clock"]


@runtime_checkable
class Clock(Protocol):
    def monotonic(self) -> float: ...
    def monotonic_ns(self) -> int: ...
    def sleep(self, seconds: float) -> None: ...
    async def sleep_async(self, seconds: float) -> None: ...


class SystemClock:
    """The process's monotonic clock (time.monotonic_ns); sleeps for real."""

    monotonic = staticmethod(time.monotonic)
    monotonic_ns = staticmethod(time.monotonic_ns)
    sleep = staticmethod(time.sleep)

    @staticmethod
    async def sleep_async(seconds: float) -> None:
        await asyncio.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()


# The testing switch (buttress.testing.set_testing): when set, the clock that `clock=None` means. Every
# pattern resolves its clock here (or asks is_system_clock(None)), so this one variable is the switch.
_testing: Clock | None = None
_testing_lock = threading.Lock()


def testing_clock() -> Clock | None:
    """The clock `set_testing` installed, or None when testing mode is off."""
    return _testing


def _swap_testing(clock: Clock | None) -> Clock | None:
    """Install `clock` as what `clock=None` means (None: the system clock again); -> the previous one."""
    global _testing
    with _testing_lock:
        previous, _testing = _testing, clock
    return previous


def resolve_clock(clock: object) -> Clock:
    """`clock=` argument -> a clock object (None means the system clock, or the testing clock while
    `buttress.testing.set_testing` is on)."""
    if clock is None:
        testing = _testing
        return SYSTEM_CLOCK if testing is None else testing
    missing = [m for m in ("monotonic", "monotonic_ns", "sleep", "sleep_async") if not callable(getattr(clock, m, None))]
    if missing:
        raise TypeError(f"clock must provide monotonic(), monotonic_ns(), sleep() and sleep_async(); "
                        f"{clock!r} lacks {', '.join(missing)}")
    return clock  # type: ignore[return-value]


def is_system_clock(clock: object) -> bool:
    """Whether a `clock=` argument (or a resolved clock) is the system clock: then the compiled core
    reads its own C monotonic clock. None is the system clock unless testing mode is on."""
    if clock is None:
        return _testing is None
    return isinstance(clock, SystemClock)


def _stage_clocks(obj: object) -> list[object]:
    """The clocks a pattern object decides on: its resolved clock (`_clock` or `clock`), or those of
    the stages / limiters it composes (a Pipeline, a MultiLimiter); none for a plain function."""
    inner = getattr(obj, "_stages", None) or getattr(obj, "limiters", None)
    if isinstance(inner, tuple):
        return [c for s in inner for c in _stage_clocks(s)]
    clock = getattr(obj, "_clock", None)
    if clock is None:
        clock = getattr(obj, "clock", None)
    return [] if clock is None or not callable(getattr(clock, "monotonic_ns", None)) else [clock]


def check_one_clock(what: str, parts: object, objs: tuple[object, ...]) -> None:
    """One rule for every composite (MultiLimiter, Pipeline): all parts decide on one clock, as their
    decisions are compared in time. The system clock counts as one clock however it was named (an
    explicit SystemClock() and clock=None outside testing mode); while `set_testing` is on, clock=None
    is the testing clock, so an explicit SystemClock() beside it is a second clock. ValueError naming them."""
    clocks = [c for o in objs for c in _stage_clocks(o)]
    if len({0 if is_system_clock(c) else id(c) for c in clocks}) > 1:
        raise ValueError(f"{what}: {parts} must share one clock (their decisions are compared in time), got "
                         f"{', '.join(repr(c) for c in clocks)}")


class FakeClock:
    """A clock that moves only when told. Integer nanoseconds inside.

    - ``advance(s)`` moves time forward and wakes async sleepers whose time has come.
    - ``sleep(s)`` advances at once (a retry with ten backoff sleeps runs instantly).
    - ``await sleep_async(s)`` waits for the clock to reach now + s. With ``autojump=True`` (the
      default) the clock jumps to the earliest pending sleeper once the event loop has nothing else
      to do, so a lone sleeper returns at once, and a call racing a timer behaves as in real time:
      whichever deadline comes first fires first. With ``autojump=False`` only ``advance()`` wakes it.
    """

    _IDLE_TICKS = 8   # loop iterations without a new sleeper before an autojump

    # any int64 ns reading is a valid clock (DESIGN §3c): negative, epoch-sized and near int64 max
    # starts are allowed so that users' tests can reach them; time never moves past int64 max
    _MAX_NS = 2**63 - 1
    _MAX_S = 9_223_372_036.0      # int64 max ns in whole seconds, rounded down

    def __init__(self, start: float = 0.0, *, autojump: bool = True) -> None:
        s = check_float("start", start, minimum=-self._MAX_S, maximum=self._MAX_S)
        assert s is not None
        self._ns = round(s * NS)
        self._lock = threading.Lock()
        self._sleepers: list[tuple[int, int, asyncio.Future[None], asyncio.AbstractEventLoop]] = []
        self._seq = itertools.count()
        self.autojump = bool(autojump)
        self._jump_token = 0

    def monotonic_ns(self) -> int:
        return self._ns

    def monotonic(self) -> float:
        return self._ns / NS

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds` (>= 0)."""
        s = check_seconds("seconds", seconds)
        assert s is not None
        ns = math.ceil(s * NS)
        if ns > self._MAX_NS - self._ns:
            raise ValueError(f"seconds={show(seconds)} would move the clock past int64 max ns ({self._MAX_NS}); "
                             f"it reads {self._ns} ns")
        self.advance_ns(ns)

    def advance_ns(self, ns: int) -> None:
        ns = check_int("ns", ns, minimum=0)
        with self._lock:
            if ns > self._MAX_NS - self._ns:
                raise ValueError(f"advancing by {ns!r} ns would move the clock past int64 max ns "
                                 f"({self._MAX_NS}); it reads {self._ns}")
            self._ns += ns
            now = self._ns
            due = []
            while self._sleepers and self._sleepers[0][0] <= now:
                due.append(heapq.heappop(self._sleepers))
        for _, _, fut, loop in due:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_wake, fut)

    def sleep(self, seconds: float) -> None:
        """Advance by `seconds` and return at once."""
        self.advance(seconds)

    async def sleep_async(self, seconds: float) -> None:
        """Wait until the clock reaches now + seconds (see the class docstring)."""
        s = check_float("seconds", seconds, maximum=MAX_SECONDS)    # <= 0 returns at once, like asyncio.sleep
        assert s is not None
        if s <= 0:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            deadline = self._ns + math.ceil(s * NS)
            heapq.heappush(self._sleepers, (deadline, next(self._seq), fut, loop))
            self._jump_token += 1
            token = self._jump_token
        if self.autojump:
            loop.call_soon(self._idle_tick, loop, token, self._IDLE_TICKS)
        try:
            await fut
        finally:
            if not fut.done():
                fut.cancel()

    def _idle_tick(self, loop: asyncio.AbstractEventLoop, token: int, left: int) -> None:
        if token != self._jump_token:       # a newer sleeper restarted the countdown
            return
        if left > 0:
            loop.call_soon(self._idle_tick, loop, token, left - 1)
            return
        with self._lock:
            while self._sleepers and self._sleepers[0][2].done():   # cancelled sleepers
                heapq.heappop(self._sleepers)
            if not self._sleepers:
                return
            target = self._sleepers[0][0]
            more = len(self._sleepers) > 1
            self._jump_token += 1
            token = self._jump_token
        self.advance_ns(max(0, target - self._ns))
        if more:    # the woken sleeper runs first; then the next jump
            loop.call_soon(self._idle_tick, loop, token, self._IDLE_TICKS)

    @property
    def pending_sleepers(self) -> int:
        """Async sleepers not yet woken (cancelled ones excluded)."""
        with self._lock:
            return sum(1 for s in self._sleepers if not s[2].done())

    def __repr__(self) -> str:
        return f"FakeClock(now={self.monotonic()!r})"


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
