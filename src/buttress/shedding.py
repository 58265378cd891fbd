"""Load shedding by priority: when in-flight work nears capacity, refuse the least important first.

LOW, MEDIUM and HIGH are admitted while in-flight is below capacity x their fraction (defaults 0.5,
0.75, 0.9); CRITICAL is always admitted (and counted). The capacity is `max_in_flight`, or an
adaptive limiter's current limit (`buttress.adaptive.AIMDLimit` / `Gradient2Limit`), which the
shedder feeds with each call's latency.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import math
from dataclasses import dataclass
from enum import IntEnum
from inspect import isawaitable
from types import MappingProxyType
from typing import Any, Callable, Mapping

from ._base import Policy
from ._impl import core
from ._params import NS, check_float, check_int, count_of, exception_matcher
from ._spec import UsageError
from ._wrap import CORO, LAZY_TYPES, specialize
from .bulkhead import COLLECTED, settle_async, settle_sync
from .clock import resolve_clock
from .errors import Overloaded, Rejected

__all__ = ["Priority", "LoadShedder", "ShedderMetrics"]


class Priority(IntEnum):
    """CRITICAL > HIGH > MEDIUM > LOW (they compare as ints)."""

    LOW = 0
    MEDIUM = 1
    HIGH = 2
    CRITICAL = 3


_DEFAULT_FRACTIONS = {Priority.LOW: 0.5, Priority.MEDIUM: 0.75, Priority.HIGH: 0.9}
_Permits = core("permits").Permits
_UNBOUNDED = 1 << 40
_EWMA = 0.2                      # weight of the newest latency in the retry_after estimate


@dataclass(frozen=True)
class ShedderMetrics:
    in_flight: int
    capacity: int
    admitted: Mapping[Priority, int]
    shed: Mapping[Priority, int]


def _priority(value: object) -> Priority:
    if type(value) is Priority:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value in Priority._value2member_map_:
        return Priority(value)
    raise (TypeError if not isinstance(value, int) or isinstance(value, bool) else ValueError)(
        f"priority must be a buttress.Priority (LOW, MEDIUM, HIGH, CRITICAL), got {value!r}")


class _Admission:
    """One admitted call: `with` / `async with`; leaving frees its slot and reports its latency.

    One acquisition at a time: entering an admission that is held raises RuntimeError (take one
    `admit()` per call), and a second exit of one entry is a no-op (it never frees another call's
    slot). Entered again after its exit, it admits anew."""

    __slots__ = ("_shedder", "_priority", "_start", "_in_flight", "_held")

    def __init__(self, shedder: LoadShedder, priority: Priority) -> None:
        self._shedder = shedder
        self._priority = priority
        self._start = -1
        self._in_flight = 0
        self._held: list[bool] = []     # [True] while entered; append / pop are atomic, also without the GIL

    def __enter__(self) -> _Admission:
        held = self._held
        held.append(True)
        if len(held) != 1:              # entered already (here or in another thread)
            held.pop()
            raise RuntimeError("this admission is already entered: use one shedder.admit() per call")
        shedder = self._shedder
        try:
            in_flight = shedder._enter(self._priority)      # Overloaded when shed
        except BaseException:
            held.pop()
            raise
        try:
            self._start = shedder._clock.monotonic_ns()
        except BaseException:           # a clock that fails: the slot taken goes back
            held.pop()
            shedder._flight.release()
            raise
        self._in_flight = in_flight
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            self._held.pop()
        except IndexError:
            return                      # not entered, or exited already: nothing of ours to free
        self._shedder._exit(self._start, self._in_flight, exc)

    async def __aenter__(self) -> _Admission:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)


class LoadShedder(Policy):
    """Admission by `Priority` against a capacity of in-flight calls; `Overloaded` on entering when shed.

    - ``max_in_flight``: the capacity (default 100). With a ``limiter`` the capacity is the limiter's
      current limit (bounded by ``max_in_flight`` only when given).
    - ``fractions``: {LOW, MEDIUM, HIGH} -> fraction of capacity under which that priority is
      admitted; missing entries keep the defaults; they must not decrease with priority.
    - ``limiter``: an adaptive limit (``on_sample(latency, in_flight, dropped)`` and ``limit``).
    - ``drop_on``: exceptions that tell the limiter the call was dropped (default TimeoutError and
      buttress rejections); cancellation is reported to nobody.
    - ``default_priority``: for the decorator and call() when no ``priority=`` is passed.

    ``Overloaded.retry_after`` is a smoothed recent call latency (when a slot is likely to free up), or
    None before any call finished.
    """

    def __init__(self, max_in_flight: int | None = None, fractions: Mapping[Priority, float] | None = None,
                 limiter: Any = None, clock: Any = None, *, drop_on: Any = (TimeoutError, asyncio.TimeoutError, Rejected),
                 default_priority: Priority = Priority.MEDIUM, name: str | None = None) -> None:
        if limiter is not None and not (callable(getattr(limiter, "on_sample", None))
                                        and hasattr(limiter, "limit")):
            raise TypeError(f"limiter must provide .limit and .on_sample(latency, in_flight, dropped) "
                            f"(e.g. buttress.adaptive.AIMDLimit), got {limiter!r}")
        if max_in_flight is None:
            self._max = None if limiter is not None else 100
        else:
            self._max = check_int("max_in_flight", max_in_flight, minimum=1, maximum=1 << 40)
        self.fractions = MappingProxyType(self._check_fractions(fractions))
        self.limiter = limiter
        self._clock = resolve_clock(clock)
        self._dropped = exception_matcher("drop_on", drop_on)
        self.default_priority = _priority(default_priority)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")
        self.name = name
        # in-flight calls: one lock-free core word; a priority is admitted while in_flight < its bound,
        # i.e. while in_flight + 1 <= ceil(bound) (CRITICAL: always)
        self._flight = _Permits(_UNBOUNDED)
        self._latency_ns: float | None = None      # EWMA; racing updates may lose one sample, never corrupt
        self._admitted = [itertools.count() for _ in Priority]       # next() is atomic under the GIL
        self._shed = [itertools.count() for _ in Priority]
        self._limits = None if self._max is None else self._limits_for(self._max)

    @staticmethod
    def _check_fractions(fractions: Mapping[Priority, float] | None) -> dict[Priority, float]:
        out = dict(_DEFAULT_FRACTIONS)
        if fractions is None:
            return out
        if not isinstance(fractions, Mapping):
            raise TypeError(f"fractions must be a mapping {{Priority: fraction}}, got {fractions!r}")
        for key, value in fractions.items():
            p = _priority(key)
            if p is Priority.CRITICAL:
                raise ValueError("fractions must not name CRITICAL: CRITICAL is never shed")
            f = check_float(f"fractions[{p.name}]", value, minimum=0.0, maximum=1.0, min_inclusive=False)
            assert f is not None
            out[p] = f
        if not out[Priority.LOW] <= out[Priority.MEDIUM] <= out[Priority.HIGH]:
            raise ValueError(f"fractions must not decrease with priority (LOW <= MEDIUM <= HIGH), got "
                             f"{ {p.name: f for p, f in out.items()} }")
        return out

    @property
    def capacity(self) -> int:
        """In-flight calls the shedder is sized for now."""
        if self.limiter is None:
            return self._max  # type: ignore[return-value]
        limit = int(self.limiter.limit)
        return limit if self._max is None else min(limit, self._max)

    @property
    def in_flight(self) -> int:
        return self._flight.in_use

    def _limits_for(self, capacity: int) -> list[int]:
        """Per priority: the in-flight count (this call included) up to which it is admitted."""
        return [_UNBOUNDED if p is Priority.CRITICAL else math.ceil(capacity * self.fractions[p]) for p in Priority]

    def _enter(self, priority: Priority) -> int:
        limits = self._limits if self.limiter is None else self._limits_for(self.capacity)
        if self._flight.try_acquire_within(limits[priority]):
            next(self._admitted[priority])
            return self._flight.in_use
        next(self._shed[priority])
        latency = self._latency_ns
        retry_after = None if latency is None else latency / NS
        what = "load shedder" if self.name is None else f"load shedder {self.name!r}"
        raise Overloaded(f"{what} shed a {priority.name} call ({self._flight.in_use} in flight, "
                         f"capacity {self.capacity})", retry_after=retry_after)

    def _exit(self, start: int, in_flight: int, exc: Any) -> None:
        """A call admitted at `start` ended with `exc` (None: success). Only an Exception (not a UsageError)
        or None is an outcome (DESIGN §3c): anything else -- cancellation, KeyboardInterrupt, a custom
        BaseException, GeneratorExit (a stream closed early), a refused result -- frees the slot and
        reports nothing."""
        try:
            elapsed = self._clock.monotonic_ns() - start
        finally:
            self._flight.release()      # whatever the clock does, the slot goes back exactly once
        if exc is not None and (not isinstance(exc, Exception) or type(exc) is UsageError):
            return
        latency = self._latency_ns
        self._latency_ns = elapsed if latency is None else latency + _EWMA * (elapsed - latency)
        if self.limiter is not None:
            self.limiter.on_sample(elapsed / NS, in_flight, exc is not None and self._dropped(exc))

    def _stream_done(self, start: int, in_flight: int, exc: Any) -> None:
        if exc is COLLECTED:            # maybe inside the GC: only the lock-free slot release
            self._flight.release()
        else:
            self._exit(start, in_flight, None if exc is None else (exc if isinstance(exc, BaseException)
                                                                   else GeneratorExit()))

    def _begin(self, priority: Priority | None) -> tuple[int, int]:
        """Admit one call: (start ns, in-flight at admission); Overloaded when shed."""
        in_flight = self._enter(self.default_priority if priority is None else _priority(priority))
        try:
            return self._clock.monotonic_ns(), in_flight
        except BaseException:           # a clock that fails: the slot taken goes back
            self._flight.release()
            raise

    def admit(self, priority: Priority | None = None) -> _Admission:
        """Context manager (`with` or `async with`): raises Overloaded on entering when shed."""
        return _Admission(self, self.default_priority if priority is None else _priority(priority))

    def call(self, fn: Callable[..., Any], /, *args: Any, priority: Priority | None = None, **kwargs: Any) -> Any:
        """Run fn(*args, **kwargs) if admitted at `priority` (not passed to fn). A generator (or async
        generator) returned holds its slot until it finishes or is closed; an awaitable is refused
        (TypeError: use call_async)."""
        start, in_flight = self._begin(priority)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._exit(start, in_flight, exc)
            raise
        if type(result) in LAZY_TYPES or hasattr(type(result), "__await__"):
            return settle_sync(self, fn, result, functools.partial(self._stream_done, start, in_flight))
        self._exit(start, in_flight, None)
        return result

    async def call_async(self, fn: Callable[..., Any], /, *args: Any, priority: Priority | None = None,
                         **kwargs: Any) -> Any:
        """Await fn(*args, **kwargs) if admitted; a sync function is a TypeError (use call); an async
        generator holds its slot over its whole iteration."""
        start, in_flight = self._begin(priority)
        try:
            aw = fn(*args, **kwargs)
        except BaseException as exc:
            self._exit(start, in_flight, exc)
            raise
        if type(aw) is not CORO and not isawaitable(aw):
            return settle_async(self, fn, aw, functools.partial(self._stream_done, start, in_flight))
        try:
            result = await aw
        except BaseException as exc:
            self._exit(start, in_flight, exc)
            raise
        self._exit(start, in_flight, None)
        return result

    def __call__(self, fn: Any) -> Any:
        """Decorate fn (sync, async, (async) generator functions, methods): each call goes through
        `call` / `call_async` (a `priority=` keyword picks the priority and is not passed on)."""
        call, call_async = self.call, self.call_async

        def make_sync(fn: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                return call(fn, *args, **kwargs)
            return wrapper

        def make_async(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                return await call_async(fn, *args, **kwargs)
            return wrapper

        return specialize(self, fn, make_sync, make_async)

    def metrics(self) -> ShedderMetrics:
        admitted = MappingProxyType({p: count_of(c) for p, c in zip(Priority, self._admitted)})
        shed = MappingProxyType({p: count_of(c) for p, c in zip(Priority, self._shed)})
        return ShedderMetrics(self._flight.in_use, self.capacity, admitted, shed)

    def __repr__(self) -> str:
        return f"LoadShedder(capacity={self.capacity}, in_flight={self._flight.in_use})"
