"""Load shedding by priority: when in-flight work nears capacity, refuse the least important first.

LOW, MEDIUM and HIGH are admitted while in-flight is below capacity x their fraction (defaults 0.5,
0.75, 0.9); CRITICAL is always admitted (and counted). The capacity is `max_in_flight`, or an
adaptive limiter's current limit (`buttress.adaptive.AIMDLimit` / `Gradient2Limit`), which the
shedder feeds with each call's latency.

Overload signals (`LoopLag`, `CpuUsage`, `QueueDepth`) shed by priority too: a sampler (a periodic timer
on the running event loop, or a thread) reads them every `sample_interval` and stores one level word --
how many priorities, from LOW up, are shed now. Admission reads that word with one compare: sampling
never runs on the per-call path. A drain (graceful shutdown) sets the level above CRITICAL.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from enum import IntEnum
from inspect import isawaitable
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Protocol, TypeVar

from ._base import Policy
from ._impl import core
from ._params import NS, check_float, check_function, check_int, check_real, count_of, exception_matcher
from ._spec import UsageError
from ._wrap import CORO, not_callable, specialize
from ._wrap import lazy_result as is_lazy
from .bulkhead import COLLECTED, settle_async, settle_sync
from ._timers import call_later
from .clock import is_system_clock, resolve_clock
from .errors import Overloaded, Rejected, lazy_rejection

__all__ = ["Priority", "LoadShedder", "ShedderMetrics", "OverloadSignal", "LoopLag", "CpuUsage", "QueueDepth"]

log = logging.getLogger("buttress.shedding")


class Priority(IntEnum):
    """CRITICAL > HIGH > MEDIUM > LOW (they compare as ints)."""

    LOW = 0
    MEDIUM = 1
    HIGH = 2
    CRITICAL = 3


_NAMES = tuple(p.name for p in Priority)    # Priority.name is a property lookup: cached for refusals
_DEFAULT_FRACTIONS = {Priority.LOW: 0.5, Priority.MEDIUM: 0.75, Priority.HIGH: 0.9}
if TYPE_CHECKING:  # the twin is the compiled core's spec: same names, signatures and results
    from ._twin.guard import ShedBase as _ShedBase
    from ._twin.permits import Permits as _Permits

    class _FlightCounter(Protocol):
        """What a LoadShedder uses of its in-flight counter: the local core's Permits or a store's shared
        one (held is read on a store's counter only)."""
        @property
        def in_use(self) -> int: ...
        @property
        def held(self) -> int: ...
        def try_acquire_within(self, limit: int, n: int = 1) -> bool: ...
        def release(self) -> None: ...
else:
    _Permits = core("permits").Permits
    _ShedBase = core("guard").ShedBase
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
_UNBOUNDED = 1 << 40
_SHARED_MAX = (1 << 22) - 1      # a shared permit counter's maximum (buttress._core.shared.MAX_PERMITS)
_DRAINING = 4                    # the level word while draining: above CRITICAL, everything is refused
_EWMA = 0.2                      # weight of the newest latency in the retry_after estimate
_SHED_FORMAT = "%s shed a %s call (%d in flight, capacity %d)"


@dataclass(frozen=True)
class ShedderMetrics:
    in_flight: int
    capacity: int
    admitted: Mapping[Priority, int]
    shed: Mapping[Priority, int]
    level: int = 0                                  # priorities shed by the signals now (4: draining)
    signals: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))  # last sampled values
    draining: bool = False


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


# -- overload signals ---------------------------------------------------------------------------------------

class OverloadSignal:
    """A measured overload signal with a threshold per priority: at or above `low` LOW calls are shed,
    at or above `medium` MEDIUM calls too, at or above `high` HIGH calls too (CRITICAL never). A threshold
    of None never sheds that priority (nor the ones above it). Thresholds must not decrease with priority.
    Subclasses implement `read(now_ns)`; the shedder's sampler calls it, never an admission."""

    name = "signal"
    unit = ""

    def __init__(self, low: float | None, medium: float | None = None, high: float | None = None) -> None:
        out: list[float | None] = []
        for pname, value in (("low", low), ("medium", medium), ("high", high)):
            v = check_real(pname, value, allow_none=True)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{pname} must be a finite number >= 0 or None, got {value!r}")
            if v is not None and out and out[-1] is None:
                raise ValueError(f"{pname}={value!r} but a lower priority's threshold is None: a priority "
                                 f"is never shed before the ones below it")
            if v is not None and out and v < out[-1]:  # type: ignore[operator]
                raise ValueError(f"thresholds must not decrease with priority (low <= medium <= high), got "
                                 f"{pname}={value!r} below {out[-1]!r}{self._defaults_hint(pname, value)}")
            out.append(v)
        self.thresholds: tuple[float | None, float | None, float | None] = (out[0], out[1], out[2])

    def _defaults_hint(self, pname: str, value: object) -> str:
        """When `value` is the subclass's default for `pname` (the user may not have passed it): its
        defaults, and what to pass instead."""
        import inspect
        try:
            params = inspect.signature(type(self).__init__).parameters
        except (TypeError, ValueError):
            return ""
        if pname not in params or params[pname].default != value:
            return ""
        shown = [f"{n}={params[n].default!r}" for n in ("low", "medium", "high")
                 if n in params and params[n].default is not inspect.Parameter.empty]
        if not shown:
            return ""
        return (f" ({type(self).__name__}'s defaults are {', '.join(shown)}: when raising one threshold above "
                f"them, pass the higher priorities' thresholds too, or None to never shed them)")

    def level(self, value: float) -> int:
        """How many priorities, from LOW up, `value` sheds (0..3)."""
        n = 0
        for t in self.thresholds:
            if t is None or value < t:
                break
            n += 1
        return n

    def start(self, now_ns: int) -> None:
        """Sampling starts (a baseline for signals measured as deltas)."""

    def read(self, now_ns: int) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        low, medium, high = self.thresholds
        return f"{type(self).__name__}(low={low!r}, medium={medium!r}, high={high!r})"


class LoopLag(OverloadSignal):
    """Event-loop lag in seconds: how late the sampler's own periodic timer fired on the running loop
    (the most honest overload signal of an asyncio service: every ready callback waits that long).
    Measured by the shedder's timer, so the shedder must be started inside the running loop."""

    name = "loop_lag"
    unit = "s"

    def __init__(self, low: float | None = 0.1, medium: float | None = 0.25, high: float | None = 0.5) -> None:
        super().__init__(low, medium, high)
        self.lag = 0.0

    def read(self, now_ns: int) -> float:
        return self.lag


class CpuUsage(OverloadSignal):
    """This process's CPU utilisation over the last sample interval: CPU seconds used / wall seconds /
    `cpus` (1.0 = `cpus` cores busy all the time). `sampler` returns the process's CPU seconds (default
    `time.process_time`, user + system of every thread; `lambda: sum(os.times()[:2])` is the same)."""

    name = "cpu"

    def __init__(self, low: float | None = 0.9, medium: float | None = 0.95, high: float | None = None, *,
                 cpus: float = 1.0, sampler: Callable[[], float] | None = None) -> None:
        super().__init__(low, medium, high)
        c = check_float("cpus", cpus, minimum=0.0, maximum=1e6, min_inclusive=False)
        assert c is not None
        self.cpus = c
        self._sampler = check_function("sampler", sampler, nargs=0, role="sampler() -> CPU seconds") or time.process_time
        self._last: tuple[int, float] | None = None

    def start(self, now_ns: int) -> None:
        self._last = (now_ns, float(self._sampler()))

    def read(self, now_ns: int) -> float:
        cpu = float(self._sampler())
        last, self._last = self._last, (now_ns, cpu)
        if last is None or now_ns <= last[0]:
            return 0.0
        return max(0.0, (cpu - last[1]) / ((now_ns - last[0]) / NS) / self.cpus)


class QueueDepth(OverloadSignal):
    """A depth you measure (a work queue's length, a connection pool's waiters, ...): `depth()` is called
    by the sampler, never by an admission."""

    name = "queue_depth"

    def __init__(self, depth: Callable[[], float], low: float | None, medium: float | None = None,
                 high: float | None = None) -> None:
        self._depth = check_function("depth", depth, nargs=0, allow_none=False, role="depth() -> number")
        super().__init__(low, medium, high)

    def read(self, now_ns: int) -> float:
        v = self._depth()
        return float(check_real("depth()", v))  # type: ignore[arg-type]


def _check_signals(signals: Any) -> tuple[OverloadSignal, ...]:
    if isinstance(signals, OverloadSignal):
        signals = (signals,)
    if not isinstance(signals, (tuple, list)):
        raise TypeError(f"signals must be a sequence of buttress.shedding.OverloadSignal (LoopLag, CpuUsage, "
                        f"QueueDepth), got {signals!r}")
    for sig in signals:
        if not isinstance(sig, OverloadSignal):
            raise TypeError(f"signals must hold OverloadSignal objects (LoopLag, CpuUsage, QueueDepth), got {sig!r}")
    if len(set(map(id, signals))) != len(signals):
        raise ValueError(f"signals must not repeat one signal object, got {list(signals)!r}")
    return tuple(signals)


class LoadShedder(_ShedBase, Policy):
    """Admission by `Priority` against a capacity of in-flight calls; `Overloaded` on entering when shed.

    - ``max_in_flight``: the capacity (default 100). With a ``limiter`` the capacity is the limiter's
      current limit (bounded by ``max_in_flight`` only when given).
    - ``fractions``: {LOW, MEDIUM, HIGH} -> fraction of capacity under which that priority is
      admitted; missing entries keep the defaults; they must not decrease with priority.
    - ``limiter``: an adaptive limit (``on_sample(latency, in_flight, dropped)`` and ``limit``).
    - ``drop_on``: exceptions that tell the limiter the call was dropped (default TimeoutError and
      buttress rejections); cancellation is reported to nobody.
    - ``default_priority``: for the decorator and call() when no ``priority=`` is passed.

    - ``signals``: overload signals (``LoopLag``, ``CpuUsage``, ``QueueDepth``) with thresholds per
      priority, sampled every ``sample_interval`` seconds once ``start()`` runs (or by ``sample()``).
    - ``store`` (with ``name``): share the in-flight count between processes (``"shm://NAME"``, Redis).

    ``Overloaded.retry_after`` is a smoothed recent call latency (when a slot is likely to free up), or
    None before any call finished; for a signal, the sample interval (the earliest the verdict can
    change); while draining, None (it refuses until ``resume()``: when it admits again is unknown).
    """

    def __init__(self, max_in_flight: int | None = None, fractions: Mapping[Priority, float] | None = None,
                 limiter: Any = None, clock: Any = None, *, drop_on: Any = (TimeoutError, asyncio.TimeoutError, Rejected),
                 default_priority: Priority = Priority.MEDIUM, name: str | None = None,
                 signals: Any = (), sample_interval: float = 0.1, store: Any = None,
                 lease: float | None = None) -> None:
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
        self._what = "load shedder" if name is None else f"load shedder {name!r}"
        self._signals = _check_signals(signals)
        interval = check_float("sample_interval", sample_interval, minimum=0.001, maximum=3600.0)
        assert interval is not None
        self.sample_interval = interval
        self._level = 0                 # the level word: priorities below it are refused (one compare)
        self._level_lock = threading.Lock()
        self._signal_level = 0
        self._values: Mapping[str, float] = MappingProxyType({})
        self._draining = False
        self._drain_deadline: float | None = None
        self._sampler: Any = None       # the loop timer or the thread's stop event
        # in-flight calls: one lock-free core word; a priority is admitted while in_flight < its bound,
        # i.e. while in_flight + 1 <= ceil(bound) (CRITICAL: always)
        if store is None:
            if lease is not None:
                raise ValueError(f"lease={lease!r} applies to a Redis store only; store is None")
            # (the local counter has no held: it is read on a store's counter only)
            self._flight: _FlightCounter = _Permits(_UNBOUNDED)  # type: ignore[assignment]
            self._cap = _UNBOUNDED
            self._shared = False
        else:
            from .bulkhead import _open_store
            self._flight, _ = _open_store("load_shedder", store, name, _SHARED_MAX, lease)
            self._cap = _SHARED_MAX
            self._shared = True
        self._latency_ns: float | None = None      # EWMA; racing updates may lose one sample, never corrupt
        self._admitted = [itertools.count() for _ in Priority]       # next() is atomic under the GIL
        self._shed = [itertools.count() for _ in Priority]
        self._limits = None if self._max is None else self._limits_for(self._max)
        # `admit(p)` is compiled (buttress._core.guard.ShedBase): the decision on the permit word in C; the
        # Python path below (_enter / _exit) serves a limiter, a store's counter and a drain.
        limiter_ = self.limiter
        dropped = self._dropped

        def sample(elapsed: int, in_flight: int, exc: Any) -> None:
            limiter_.on_sample(elapsed / NS, in_flight, exc is not None and dropped(exc))

        self._shed_setup(self._flight, self._limits if limiter is None else None,
                         None if is_system_clock(self._clock) else self._clock.monotonic_ns, Priority,
                         self.default_priority, _priority, self._enter, self._exit, self._shed_error,
                         None if limiter is None else sample)
        if limiter is None and self._max is not None:
            # the compiled path's refusal, built in C: the same Overloaded as _shed_error (its capacity is
            # _max without a limiter), no Python frame
            self._shed_reject(Overloaded, _SHED_FORMAT, self._what, _NAMES, self._max)

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
        return [self._cap if p is Priority.CRITICAL else math.ceil(capacity * self.fractions[p]) for p in Priority]

    def _enter(self, priority: Priority) -> int:
        if priority < self._level:      # shed by an overload signal, or draining: the one level word
            raise self._refused(priority)
        limits = self._limits if self.limiter is None else self._limits_for(self.capacity)
        if self._flight.try_acquire_within(limits[priority]):  # type: ignore[index]  # no limiter: _limits set
            next(self._admitted[priority])
            return self._flight.in_use
        next(self._shed[priority])
        raise self._shed_error(priority)

    def _shed_error(self, priority: Priority) -> Overloaded:
        """The Overloaded of a priority over its bound (counted by the caller), built without __init__."""
        latency = self._latency_ns
        return lazy_rejection(Overloaded, _SHED_FORMAT,
                              (self._what, _NAMES[priority], self._flight.in_use,
                               self.capacity if self._max is None or self.limiter is not None else self._max),
                              None if latency is None else max(latency, 0.0) / NS)   # a clock stepped back: >= 0

    def _refused(self, priority: Priority) -> Overloaded:
        next(self._shed[priority])
        what = "load shedder" if self.name is None else f"load shedder {self.name!r}"
        if self._draining:              # closed until resume(): when it admits again is unknown (DESIGN §3c)
            return Overloaded(f"{what} is draining (shutting down): it admits no new calls")
        shed_by = [sig for sig in self._signals if sig.level(self._values.get(sig.name, 0.0)) > priority]
        why = ", ".join(f"{sig.name} {self._values.get(sig.name, 0.0):.6g}{sig.unit}" for sig in shed_by)
        return Overloaded(f"{what} shed a {priority.name} call: overloaded ({why})", retry_after=self.sample_interval,
                          signals=tuple(dict.fromkeys(sig.name for sig in shed_by)))

    # -- sampling the overload signals (never on the per-call path) ------------------------------------

    def sample(self) -> int:
        """Read every signal now and store the level word; returns the level (0: nothing shed by the
        signals, 1: LOW, 2: LOW and MEDIUM, 3: everything but CRITICAL). A signal that fails to read is
        logged and counts as 0 (a broken probe never sheds)."""
        now = self._clock.monotonic_ns()
        values: dict[str, float] = {}
        level = 0
        for sig in self._signals:
            try:
                v = sig.read(now)
            except Exception:  # noqa: BLE001 - a user's probe
                log.exception("load shedder %r: overload signal %r failed to read", self.name, sig)
                v = 0.0
            values[sig.name] = max(values.get(sig.name, 0.0), v)
            level = max(level, sig.level(v))
        with self._level_lock:
            self._values = MappingProxyType(values)
            self._signal_level = level
            self._level = _DRAINING if self._draining else level
        return level

    def start(self) -> None:
        """Start sampling the signals every `sample_interval`: inside a running event loop, a periodic
        timer on that loop (which also measures its lag: `LoopLag` needs this); outside one, a daemon
        thread (system clock only). Idempotent; `stop()` ends it."""
        if self._sampler is not None and not self.is_sampling:
            self.stop()                 # its timer's loop was closed: a new loop gets a new timer
        if self._sampler is not None or not self._signals:
            return
        now = self._clock.monotonic_ns()
        for sig in self._signals:
            sig.start(now)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if any(isinstance(sig, LoopLag) for sig in self._signals):
                raise RuntimeError("LoopLag measures the running event loop: call shed.start() inside it "
                                   "(e.g. in the ASGI lifespan startup)") from None
            if not is_system_clock(self._clock):
                raise RuntimeError("a sampling thread sleeps in real time: with a test clock, call "
                                   "shed.sample() yourself (or start() inside an event loop)") from None
            stop = threading.Event()
            self._sampler = stop
            threading.Thread(target=self._sample_thread, args=(stop,), name="buttress-shedder-sampler",
                             daemon=True).start()
            return
        self._sampler = [None, asyncio.get_running_loop()]     # [the timer, its loop]
        self._arm(self._sampler)

    def _arm(self, box: list[Any]) -> None:
        expected = self._clock.monotonic() + self.sample_interval
        box[0] = call_later(self._clock, self.sample_interval, lambda: self._tick(box, expected))

    def _tick(self, box: list[Any], expected: float) -> None:
        if self._sampler is not box:
            return                      # stopped (or restarted) meanwhile
        lag = max(0.0, self._clock.monotonic() - expected)
        for sig in self._signals:
            if isinstance(sig, LoopLag):
                sig.lag = lag
        try:
            self.sample()
        finally:
            self._arm(box)

    def _sample_thread(self, stop: threading.Event) -> None:
        while not stop.wait(self.sample_interval):
            self.sample()

    def stop(self) -> None:
        """Stop sampling (the level word keeps its last value). Idempotent; safe after the sampler's
        event loop was closed."""
        sampler, self._sampler = self._sampler, None
        if isinstance(sampler, threading.Event):
            sampler.set()
        elif isinstance(sampler, list) and sampler[0] is not None and not sampler[1].is_closed():
            sampler[0].cancel()

    @property
    def is_sampling(self) -> bool:
        """Whether the signals are being sampled now: `start()` ran, `stop()` did not, and the sampler's
        event loop (when it runs on one) is not closed."""
        sampler = self._sampler
        if isinstance(sampler, list):
            return not sampler[1].is_closed()
        return sampler is not None

    @property
    def level(self) -> int:
        """The level word: priorities below it are refused now (4 while draining)."""
        return self._level

    # -- graceful shutdown ------------------------------------------------------------------------------

    def _begin_drain(self, timeout: object) -> None:
        t = check_float("timeout", timeout, minimum=0.0, maximum=1e9, allow_none=True)
        with self._level_lock:
            self._drain_deadline = None if t is None else self._clock.monotonic() + t
            self._draining = True
            self._level = _DRAINING

    def _running_here(self) -> int:
        return self._flight.held if self._shared else self._flight.in_use

    def drain(self, timeout: float | None = None) -> int:
        """Graceful shutdown: stop admitting (every priority, CRITICAL too, gets Overloaded with
        ``retry_after`` None: the shedder refuses until `resume()`, so when it admits again is unknown), then wait up to `timeout` seconds (None: as long
        as it takes) for this process's calls in flight to finish. Returns how many were still in flight
        at the deadline (0: all finished). The shedder keeps refusing until `resume()`."""
        self._begin_drain(timeout)
        delay = 0.001
        while True:
            n = self._running_here()
            left = None if self._drain_deadline is None else self._drain_deadline - self._clock.monotonic()
            if n == 0 or (left is not None and left <= 0):
                return n
            self._clock.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, 0.05)

    async def drain_async(self, timeout: float | None = None) -> int:
        """`drain` without blocking the event loop (waits on the shedder's clock)."""
        self._begin_drain(timeout)
        delay = 0.001
        while True:
            n = self._running_here()
            left = None if self._drain_deadline is None else self._drain_deadline - self._clock.monotonic()
            if n == 0 or (left is not None and left <= 0):
                return n
            await self._clock.sleep_async(delay if left is None else min(delay, left))
            delay = min(delay * 2, 0.05)

    def resume(self) -> None:
        """Admit again after a drain (the signals' level applies again)."""
        with self._level_lock:
            self._draining = False
            self._drain_deadline = None
            self._level = self._signal_level

    @property
    def draining(self) -> bool:
        return self._draining

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

    # admit(priority=None) comes from the compiled base (ShedBase): a context manager (`with` or `async
    # with`) that raises Overloaded on entering when shed.

    def call(self, fn: Callable[..., T], /, *args: Any, priority: Priority | None = None, **kwargs: Any) -> T:
        """Run fn(*args, **kwargs) if admitted at `priority` (not passed to fn). A generator (or async
        generator) returned holds its slot until it finishes or is closed; an awaitable is refused
        (TypeError: use call_async)."""
        if not callable(fn):
            raise not_callable(self, "call", fn)
        start, in_flight = self._begin(priority)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._exit(start, in_flight, exc)
            raise
        if is_lazy(result):
            settled: T = settle_sync(self, fn, result, functools.partial(self._stream_done, start, in_flight))
            return settled
        self._exit(start, in_flight, None)
        return result

    async def call_async(self, fn: Callable[..., Awaitable[T]], /, *args: Any, priority: Priority | None = None,
                         **kwargs: Any) -> T:
        """Await fn(*args, **kwargs) if admitted; a sync function is a TypeError (use call); an async
        generator holds its slot over its whole iteration."""
        if not callable(fn):
            raise not_callable(self, "call_async", fn)
        start, in_flight = self._begin(priority)
        try:
            aw = fn(*args, **kwargs)
        except BaseException as exc:
            self._exit(start, in_flight, exc)
            raise
        if type(aw) is not CORO and not isawaitable(aw):
            settled: T = settle_async(self, fn, aw, functools.partial(self._stream_done, start, in_flight))
            return settled
        try:
            result = await aw
        except BaseException as exc:
            self._exit(start, in_flight, exc)
            raise
        self._exit(start, in_flight, None)
        return result

    def __call__(self, fn: F) -> F:
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
        fast_admitted, fast_shed = self._shed_counts()
        admitted = MappingProxyType({p: count_of(c) + n for p, c, n in zip(Priority, self._admitted, fast_admitted)})
        shed = MappingProxyType({p: count_of(c) + n for p, c, n in zip(Priority, self._shed, fast_shed)})
        return ShedderMetrics(self._flight.in_use, self.capacity, admitted, shed, self._level, self._values,
                              self._draining)

    def __repr__(self) -> str:
        return f"LoadShedder(capacity={self.capacity}, in_flight={self._flight.in_use})"
