"""Circuit breaker: a Resilience4j-grade state machine over the lock-free core.

The decision and the bookkeeping live in the core (`buttress._core.breaker`, or its twin); this module
adds what needs Python: the `clock=` object, listeners, `metrics()` snapshots, the context-manager and
async forms. A decorated sync function is the core's vectorcall guard itself, so a guarded call
crosses the C boundary once.

Two breakers share the core, its state word and every form: the rate breaker (Resilience4j: failure and
slow-call rates over a sliding window) and the classic breaker (`failure_threshold=N`: N consecutive
failures open it, `success_threshold=M` consecutive half-open successes close it).
"""
from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass
from inspect import isawaitable
from typing import Any, Callable, TypeVar

from ._base import Policy
from ._breaker_conf import DEFAULTS, State
from ._impl import core
from ._observe import check_listener
from ._params import ASYNC
from ._wrap import CORO, check_decoratable, wraps
from .clock import is_system_clock, resolve_clock

__all__ = ["CircuitBreaker", "State", "Permit", "BreakerEvent", "BreakerMetrics", "EVENTS"]

_core = core("breaker")
Permit = _core.Permit
log = logging.getLogger("buttress.circuit_breaker")
F = TypeVar("F", bound=Callable[..., Any])

EVENTS = frozenset({"state_change", "success", "error", "ignored", "not_permitted", "failure_rate_exceeded",
                    "slow_call_rate_exceeded"})

# permits held by `with breaker:` blocks, per thread / task: a tuple of (breaker, permit)
_HELD: contextvars.ContextVar[tuple] = contextvars.ContextVar("buttress_breaker_permits", default=())


@dataclass(frozen=True)
class BreakerMetrics:
    """A snapshot: the current window's counts and rates (-1.0 below the minimum), refusals since
    creation or reset(), and the state."""
    state: State
    calls: int
    failures: int
    slow_calls: int
    failure_rate: float
    slow_call_rate: float
    not_permitted: int


@dataclass(frozen=True, slots=True)
class BreakerEvent:
    """What listeners receive. `old`/`new` for state_change, `exception` for error/ignored,
    `duration` (s) for success/error, `rate` for *_rate_exceeded."""
    kind: str
    breaker: str
    old: State | None = None
    new: State | None = None
    exception: BaseException | None = None
    duration: float | None = None
    rate: float | None = None


class CircuitBreaker(_core.BreakerCore, Policy):
    """Refuses calls while a dependency is failing; see docs/circuit-breaker.md.

    >>> cb = CircuitBreaker(name="payment", failure_rate_threshold=0.5, window_size=20, minimum_calls=10)
    >>> @cb
    ... def charge(): ...
    """

    def __init__(self, name: str = "default", failure_rate_threshold: float = DEFAULTS["failure_rate_threshold"],
                 slow_call_rate_threshold: float = DEFAULTS["slow_call_rate_threshold"],
                 slow_call_duration: float | None = DEFAULTS["slow_call_duration"], window: str = DEFAULTS["window"],
                 window_size: int = DEFAULTS["window_size"], minimum_calls: int = DEFAULTS["minimum_calls"],
                 open_duration: float | Callable[[int], float] = DEFAULTS["open_duration"],
                 half_open_calls: int = DEFAULTS["half_open_calls"], half_open_max_wait: float | None = None,
                 record: Any = (Exception,), ignore: Any = (), record_result: Callable[[Any], Any] | None = None,
                 clock: Any = None, *, failure_threshold: int | None = None, success_threshold: int | None = None,
                 timeout: float | Callable[[int], float] | None = None) -> None:
        clk = resolve_clock(clock)
        super().__init__(name, failure_rate_threshold, slow_call_rate_threshold, slow_call_duration, window,
                         window_size, minimum_calls, open_duration, half_open_calls, half_open_max_wait, record,
                         ignore, record_result, None if is_system_clock(clock) else clk.monotonic_ns,
                         failure_threshold, success_threshold, timeout)
        self.clock = clk
        self._listeners: dict[str, list[Callable[[BreakerEvent], Any]]] = {}
        # one bound method for the life of the breaker: the core's hook only ever holds this or None
        self._dispatch_hook = self._dispatch
        # an instance attribute, so `cb.call(fn, ...)` is the vectorcall guard, not a bound method
        self.call = self.make_call()

    # -- forms ------------------------------------------------------------------------------------------
    def __call__(self, fn: F) -> F:
        """Decorate a function, an async function, a method, or a generator / async generator function
        (guarded over its whole iteration). The wrapper pickles by reference."""
        if check_decoratable(self, fn, generators=True) == ASYNC:
            enter, exit_ok, exit_err, settle = self.enter, self.exit_ok, self.exit_err, self.settle

            async def guarded(*args: Any, **kwargs: Any) -> Any:
                token, start = enter()
                try:
                    aw = fn(*args, **kwargs)
                    if type(aw) is not CORO and not isawaitable(aw):
                        return settle(token, start, fn, aw, True)    # UsageError, permit returned
                    result = await aw
                except BaseException as exc:
                    exit_err(token, start, exc)
                    raise
                exit_ok(token, start, result)
                return result

            return wraps(fn)(guarded)  # type: ignore[no-any-return]
        # sync functions, and (generator / async generator) functions whose stream the guard holds the
        # permit over: the core's guard itself (the compiled one is a C vectorcall entry)
        return wraps(fn)(self.guard(fn))  # type: ignore[no-any-return]

    async def call_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Await fn(*args, **kwargs) under the breaker. For an async generator function, returns its
        generator guarded over the whole iteration. A sync function is a TypeError (use call())."""
        token, start = self.enter()
        try:
            aw = fn(*args, **kwargs)
            if type(aw) is not CORO and not isawaitable(aw):
                # an async generator: guarded over its iteration; anything else: UsageError, permit returned
                return self.settle(token, start, fn, aw, True)
            result = await aw
        except BaseException as exc:
            self.exit_err(token, start, exc)
            raise
        self.exit_ok(token, start, result)
        return result

    def __enter__(self) -> Any:
        permit = self.try_acquire()
        if permit is None:
            raise self.rejection()
        _HELD.set(_HELD.get() + ((self, permit),))
        return permit

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        held = _HELD.get()
        for i in range(len(held) - 1, -1, -1):
            if held[i][0] is self:
                permit = held[i][1]
                _HELD.set(held[:i] + held[i + 1:])
                break
        else:
            raise RuntimeError(f"circuit breaker {self.name!r}: __exit__ without a matching __enter__")
        if exc is None:
            permit.success()
        else:
            permit.failure(exc)
        return False

    async def __aenter__(self) -> Any:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        return self.__exit__(exc_type, exc, tb)

    # -- state ------------------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return State(self.state_now())

    def metrics(self) -> BreakerMetrics:  # type: ignore[override]
        s, calls, failures, slow, fr, sr, refused = super().metrics()
        return BreakerMetrics(State(s), calls, failures, slow, fr, sr, refused)

    # Each manual move starts a new generation, also from the state it enters (results of permits
    # issued before it are dropped); state_change fires only on a real change (DESIGN §3c).
    def force_open(self) -> None:
        """Refuse every call until another transition (keeps the window, for metrics())."""
        self.restart(State.FORCED_OPEN)

    def disable(self) -> None:
        """Admit every call and record nothing (keeps the window, for metrics())."""
        self.restart(State.DISABLED)

    def metrics_only(self) -> None:
        """Admit every call, record it into a fresh window, never transition."""
        self.restart(State.METRICS_ONLY)

    def close(self) -> None:
        """Move to CLOSED with an empty window, attempt 1 next time (keeps not_permitted; reset() clears
        it too)."""
        self.restart(State.CLOSED)

    # -- events -----------------------------------------------------------------------------------------
    def on(self, event: str, callback: Callable[[BreakerEvent], Any]) -> Callable[[BreakerEvent], Any]:
        """Call `callback(event)` on each `event` ("*" for all). Returns the callback, so it can decorate.
        A listener that raises is logged and never breaks the call."""
        if event != "*" and event not in EVENTS:
            raise ValueError(f"event must be one of {sorted(EVENTS)} or '*', got {event!r}")
        check_listener("callback", callback)
        self._listeners.setdefault(event, []).append(callback)
        self.hook = self._dispatch_hook
        return callback

    def off(self, event: str, callback: Callable[[BreakerEvent], Any]) -> None:
        """Remove a listener; when none is left, events cost nothing again."""
        try:
            self._listeners.get(event, []).remove(callback)
        except ValueError:
            raise ValueError(f"callback {callback!r} is not listening to {event!r}") from None
        if not any(self._listeners.values()):
            self.hook = None

    def _dispatch(self, kind: str, a: Any, b: Any) -> None:
        listeners = self._listeners.get(kind, []) + self._listeners.get("*", [])
        if not listeners:
            return
        if kind == "state_change":
            event = BreakerEvent(kind, self.name, old=a, new=b)
        elif kind in ("success", "error", "ignored"):
            event = BreakerEvent(kind, self.name, exception=a, duration=None if b is None else b / 1e9)
        elif kind.endswith("_rate_exceeded"):
            event = BreakerEvent(kind, self.name, rate=a)
        else:
            event = BreakerEvent(kind, self.name)
        for callback in listeners:
            try:
                callback(event)
            except Exception:  # noqa: BLE001 - a listener never breaks the call
                log.exception("circuit breaker %r: %s listener %r failed", self.name, kind, callback)

    def __repr__(self) -> str:
        try:
            return f"<CircuitBreaker {self.name!r} {self.state.name}>"
        except RuntimeError:           # __init__ never ran (a subclass that forgot super().__init__())
            return f"<{type(self).__name__} (not initialised)>"
