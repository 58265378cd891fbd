"""Pure-Python twin of buttress._core.breaker: the circuit-breaker state machine, the spec.

The core decides and records; it never sleeps. `acquire()` returns a token (generation << 1 |
half-open bit) or -1; `record(token, outcome, start)` applies a result. Results whose generation
has passed are dropped. Events go to `hook(kind, a, b)` only when a hook is set.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import types
from typing import Any, Callable

from .._breaker_conf import State, breaker_conf, open_duration_ns
from ..errors import CircuitOpenError

__all__ = ["BreakerCore", "Permit", "Guarded", "SUCCESS", "FAILURE", "IGNORED", "CANCELLED"]

log = logging.getLogger("buttress.circuit_breaker")

SUCCESS, FAILURE, IGNORED, CANCELLED = 0, 1, 2, 3
# neither success nor failure: the permit is returned
_PASS_THROUGH = (asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit)
_CLOSED, _OPEN, _HALF_OPEN, _FORCED_OPEN, _DISABLED, _METRICS_ONLY = range(6)


class _Window:
    """Counts of the last `size` outcomes (count window) or of `size` one-second buckets."""

    def __init__(self, size: int, time_based: bool) -> None:
        from .window import CountWindow, TimeWindow
        self.w = TimeWindow(size) if time_based else CountWindow(size)
        self.time_based = time_based

    def record(self, failed: bool, slow: bool, now: int) -> None:
        if self.time_based:
            self.w.record(failed, slow, now)
        else:
            self.w.record(failed, slow)

    def snapshot(self, now: int) -> tuple[int, int, int, int]:
        return self.w.snapshot(now) if self.time_based else self.w.snapshot()


class BreakerCore:
    def __init__(self, name: str = "default", failure_rate_threshold: float = 0.5,
                 slow_call_rate_threshold: float = 1.0, slow_call_duration: float | None = 60.0,
                 window: str = "count", window_size: int = 100, minimum_calls: int = 100,
                 open_duration: Any = 60.0, half_open_calls: int = 10, half_open_max_wait: float | None = None,
                 record: Any = (Exception,), ignore: Any = (), record_result: Any = None,
                 clock_ns: Callable[[], int] | None = None) -> None:
        c = self.conf = breaker_conf(name, failure_rate_threshold, slow_call_rate_threshold, slow_call_duration,
                                     window, window_size, minimum_calls, open_duration, half_open_calls,
                                     half_open_max_wait, record, ignore, record_result, clock_ns)
        self.name = c.name
        self._clock_ns = c.clock_ns or time.monotonic_ns
        self._lock = threading.RLock()
        self._state, self._gen = _CLOSED, 0
        self._since = self._now(-1)
        self._until = 0              # OPEN: when it may admit again
        self._flight = 0             # half-open permits out
        self._attempt = 0
        self._closed = _Window(c.window_size, c.time_window)
        self._half = _Window(c.half_open_calls, False)
        self._metrics_half = False   # metrics() reads the half-open window (after it tripped the breaker)
        self._not_permitted = 0
        self.hook: Callable[[str, Any, Any], None] | None = None

    def _now(self, now: int) -> int:
        return now if now >= 0 else self._clock_ns()

    @property
    def timing(self) -> bool:
        """True when results need a clock reading (slow-call timing or a time window)."""
        return self.conf.slow_ns >= 0 or self.conf.time_window

    # -- transitions (caller holds the lock) ------------------------------------------------------------
    def _move(self, new: int, now: int, attempt: int | None = None) -> None:
        old = self._state
        if new == _OPEN:
            assert attempt is not None
            self._until = now + open_duration_ns(self.conf, attempt, log)
        self._state, self._gen, self._since, self._flight = new, self._gen + 1, now, 0
        if attempt is not None:
            self._attempt = attempt
        if new in (_CLOSED, _METRICS_ONLY):
            self._closed = _Window(self.conf.window_size, self.conf.time_window)
            self._metrics_half = False
        elif new == _HALF_OPEN:
            self._half = _Window(self.conf.half_open_calls, False)
            self._metrics_half = True
        if self.hook is not None:
            self.hook("state_change", State(old), State(new))

    def _expire_half_open(self, now: int) -> None:
        c = self.conf
        if self._state == _HALF_OPEN and c.half_open_max_wait_ns >= 0 and now - self._since >= c.half_open_max_wait_ns:
            self._move(_OPEN, now, self._attempt + 1)

    # -- decisions ----------------------------------------------------------------------------------------
    def acquire(self, now: int = -1) -> int:
        """A token (generation << 1 | half-open bit) when the call may go ahead, else -1."""
        now = self._now(now)
        with self._lock:
            if self._state == _OPEN and now >= self._until:
                self._move(_HALF_OPEN, now)
            self._expire_half_open(now)
            s = self._state
            if s in (_CLOSED, _METRICS_ONLY, _DISABLED):
                return self._gen << 1
            if s == _HALF_OPEN and self._flight < self.conf.half_open_calls:
                self._flight += 1
                return self._gen << 1 | 1
            self._not_permitted += 1
        if self.hook is not None:
            self.hook("not_permitted", None, None)
        return -1

    def rejection(self, now: int = -1) -> CircuitOpenError:
        """The error for a refused call: retry_after is the time left in OPEN, else None."""
        now = self._now(now)
        s = self._state
        retry_after = max(0, self._until - now) / 1e9 if s == _OPEN else None
        return CircuitOpenError(self.name, State(s), retry_after)

    def classify(self, exc: BaseException) -> int:
        """SUCCESS, FAILURE, IGNORED or CANCELLED for an exception (ignore wins over record)."""
        c = self.conf
        if isinstance(exc, _PASS_THROUGH):
            return CANCELLED
        try:
            if c.ignore_t is not None and isinstance(exc, c.ignore_t) or c.ignore_fn is not None and c.ignore_fn(exc):
                return IGNORED
            if c.record_t is not None and isinstance(exc, c.record_t) or c.record_fn is not None and c.record_fn(exc):
                return FAILURE
        except Exception:  # noqa: BLE001 - a broken predicate must not break the call
            log.exception("circuit breaker %r: record/ignore predicate failed; counting a failure", self.name)
            return FAILURE
        return SUCCESS

    def classify_result(self, result: Any) -> int:
        """FAILURE when record_result matches the return value, else SUCCESS."""
        pred = self.conf.record_result
        if pred is None:
            return SUCCESS
        try:
            return FAILURE if pred(result) else SUCCESS
        except Exception:  # noqa: BLE001
            log.exception("circuit breaker %r: record_result predicate failed; counting a failure", self.name)
            return FAILURE

    def record(self, token: int, outcome: int, start: int, now: int = -1, exc: Any = None) -> None:
        """Apply the outcome of a call admitted with `token` at `start` (ns)."""
        c = self.conf
        gen, half = token >> 1, token & 1
        if outcome >= IGNORED:
            with self._lock:
                if half and self._state == _HALF_OPEN and self._gen == gen and self._flight > 0:
                    self._flight -= 1
            if outcome == IGNORED and self.hook is not None:
                self.hook("ignored", exc, (self._now(now) - start) if self.timing else None)
            return
        now = self._now(now)
        duration = now - start
        failed, slow = outcome == FAILURE, c.slow_ns >= 0 and duration > c.slow_ns
        with self._lock:
            s = self._state
            if self._gen != gen or s == _DISABLED:
                return                                      # stale generation: dropped entirely
            if self.hook is not None:
                if failed:
                    self.hook("error", exc, duration)
                else:
                    self.hook("success", None, duration)
            if s == _HALF_OPEN:
                self._half.record(failed, slow, now)
                calls, failures, slows, _ = self._half.snapshot(now)
                if calls >= c.half_open_minimum:
                    if self._exceeded(calls, failures, slows):
                        self._move(_OPEN, now, self._attempt + 1)
                    else:
                        self._move(_CLOSED, now, 0)
            elif s in (_CLOSED, _METRICS_ONLY):
                self._closed.record(failed, slow, now)
                calls, failures, slows, _ = self._closed.snapshot(now)
                # METRICS_ONLY reports rates (events) on failures and slow calls; CLOSED decides every time
                if calls >= c.minimum_calls and (s == _CLOSED or failed or slow):
                    if self._exceeded(calls, failures, slows) and s == _CLOSED:
                        self._move(_OPEN, now, 1)

    def _exceeded(self, calls: int, failures: int, slows: int) -> bool:
        c = self.conf
        fr, sr = failures / calls, slows / calls
        hit = False
        if fr >= c.failure_rate_threshold:
            hit = True
            if self.hook is not None:
                self.hook("failure_rate_exceeded", fr, None)
        if c.slow_ns >= 0 and sr >= c.slow_call_rate_threshold:
            hit = True
            if self.hook is not None:
                self.hook("slow_call_rate_exceeded", sr, None)
        return hit

    # -- state --------------------------------------------------------------------------------------------
    def state_now(self, now: int = -1) -> int:
        """The state code, after applying half_open_max_wait expiry."""
        now = self._now(now)
        with self._lock:
            self._expire_half_open(now)
            return self._state

    def load(self) -> tuple[int, int, int]:
        """(state, generation, half-open permits out)."""
        with self._lock:
            return (self._state, self._gen, self._flight)

    @property
    def attempt(self) -> int:
        return self._attempt

    def transition_to(self, state: int, now: int = -1) -> None:
        """Move to `state` from any state (a new generation). ValueError for HALF_OPEN outside OPEN and
        for a move to the current state."""
        now = self._now(now)
        state = int(State(state))
        with self._lock:
            cur = self._state
            if state == cur or (state == _HALF_OPEN and cur != _OPEN):
                raise ValueError(f"illegal transition: {State(cur).name} -> {State(state).name}")
            self._move(state, now, self._attempt + 1 if state == _OPEN else (0 if state == _CLOSED else None))

    def reset(self, now: int = -1) -> None:
        """CLOSED with an empty window, attempt 0, not_permitted 0 (a new generation)."""
        now = self._now(now)
        with self._lock:
            self._not_permitted = 0
            self._move(_CLOSED, now, 0)

    def metrics(self, now: int = -1) -> tuple:
        """(state, calls, failures, slow_calls, failure_rate, slow_call_rate, not_permitted)."""
        now = self._now(now)
        with self._lock:
            self._expire_half_open(now)
            if self._metrics_half:
                calls, failures, slows, _ = self._half.snapshot(now)
                minimum = self.conf.half_open_minimum
            else:
                calls, failures, slows, _ = self._closed.snapshot(now)
                minimum = self.conf.minimum_calls
            ok = calls >= minimum
            return (self._state, calls, failures, slows, failures / calls if ok else -1.0,
                    slows / calls if ok else -1.0, self._not_permitted)

    def __repr__(self) -> str:
        return f"BreakerCore(name={self.name!r}, state={self._state})"

    # -- calling ------------------------------------------------------------------------------------------
    def start(self) -> int:
        """ns timestamp for a call about to start (0 when nothing is timed)."""
        return self._clock_ns() if self.timing else 0

    def enter(self) -> tuple[int, int]:
        """(token, start) for a call that may go ahead; raises CircuitOpenError otherwise."""
        now = self._clock_ns()
        token = self.acquire(now)
        if token < 0:
            raise self.rejection(now)
        return token, (now if self.timing else 0)

    def exit_ok(self, token: int, start: int, result: Any) -> None:
        self.record(token, self.classify_result(result), start)

    def exit_err(self, token: int, start: int, exc: BaseException) -> None:
        self.record(token, self.classify(exc), start, exc=exc)

    def try_acquire(self) -> "Permit | None":
        """Two-step use: a Permit, or None when refused."""
        now = self._clock_ns()
        token = self.acquire(now)
        if token < 0:
            return None
        return Permit(self, token, now if self.timing else 0)

    def guard(self, fn: Callable[..., Any]) -> "Guarded":
        """A callable running fn under the breaker."""
        return Guarded(self, fn)

    def make_call(self) -> "Guarded":
        """The `call(fn, *args, **kwargs)` entry."""
        return Guarded(self, None)


class Permit:
    """One admitted call, reported once: success(result), failure(exc) or release()."""

    __slots__ = ("_core", "_token", "_start", "_done", "_lock")

    def __init__(self, core: BreakerCore, token: int, start: int) -> None:
        self._core, self._token, self._start, self._done = core, token, start, False
        self._lock = threading.Lock()

    def _once(self) -> bool:
        with self._lock:
            if self._done:
                return False
            self._done = True
            return True

    def success(self, result: Any = None) -> None:
        """Report success (record_result is applied to `result`)."""
        if self._once():
            self._core.exit_ok(self._token, self._start, result)

    def failure(self, exc: BaseException) -> None:
        """Report an exception (ignore / record / cancellation rules apply)."""
        if not isinstance(exc, BaseException):
            raise TypeError(f"exc must be an exception instance, got {exc!r}")
        if self._once():
            self._core.exit_err(self._token, self._start, exc)

    def release(self) -> None:
        """Give the permit back without an outcome."""
        if self._once():
            self._core.record(self._token, CANCELLED, self._start)

    @property
    def done(self) -> bool:
        return self._done


class Guarded:
    """fn under a breaker; with fn None it is `call(fn, *args, **kwargs)`. Binds like a function."""

    # slots: functools.wraps copies the wrapped callable's __dict__ into ours; slots always win over it
    __slots__ = ("_core", "_fn", "__dict__")

    def __init__(self, core: BreakerCore, fn: Callable[..., Any] | None) -> None:
        self._core, self._fn = core, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self._fn
        if fn is None:
            if not args:
                raise TypeError("call() needs the function to call as its first argument")
            fn, args = args[0], args[1:]
        core = self._core
        token, start = core.enter()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            core.exit_err(token, start, exc)
            raise
        core.exit_ok(token, start, result)
        return result

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else types.MethodType(self, obj)
