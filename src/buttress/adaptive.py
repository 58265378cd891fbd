"""Adaptive limits: a concurrency limit that follows measured latency and drops (Netflix
concurrency-limits' AIMD and Gradient2), and client-side adaptive throttling (Google SRE book).

`AIMDLimit` and `Gradient2Limit` are fed one sample per finished call,
``on_sample(latency_seconds, in_flight, dropped)``, and expose ``limit``; pass one as
``LoadShedder(limiter=...)`` and the shedder feeds it and sizes itself by it.
"""
from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from inspect import isawaitable
from typing import Any, Callable

from ._base import Policy
from ._impl import core
from ._params import NS, check_float, check_function, check_int, exception_matcher, seconds_to_ns
from ._spec import UsageError
from ._wrap import CORO, not_callable, specialize
from ._wrap import lazy_result as is_lazy
from .bulkhead import COLLECTED, settle_async, settle_sync
from .clock import is_system_clock, resolve_clock
from .errors import Overloaded

__all__ = ["AIMDLimit", "Gradient2Limit", "AdaptiveThrottle", "ThrottleMetrics"]

_MAX_LIMIT = 1 << 30


def _check_limits(initial_limit: object, min_limit: object, max_limit: object) -> tuple[int, int, int]:
    lo = check_int("min_limit", min_limit, minimum=1, maximum=_MAX_LIMIT)
    hi = check_int("max_limit", max_limit, minimum=lo, maximum=_MAX_LIMIT)
    init = check_int("initial_limit", initial_limit, minimum=lo, maximum=hi)
    return init, lo, hi


def _check_sample(latency: object, in_flight: object) -> tuple[float, int]:
    lat = check_float("latency", latency, minimum=0.0)
    assert lat is not None
    return lat, check_int("in_flight", in_flight, minimum=0)


class AIMDLimit:
    """Additive increase, multiplicative decrease: +1 when a call succeeds while the limit is in use
    (in_flight >= limit / 2), x backoff_ratio when a call is dropped or slower than `timeout`."""

    def __init__(self, initial_limit: int = 20, min_limit: int = 1, max_limit: int = 1000,
                 backoff_ratio: float = 0.9, timeout: float = 5.0) -> None:
        self._limit, self.min_limit, self.max_limit = _check_limits(initial_limit, min_limit, max_limit)
        ratio = check_float("backoff_ratio", backoff_ratio, minimum=0.5, maximum=1.0, max_inclusive=False)
        assert ratio is not None
        self.backoff_ratio = ratio
        self.timeout = seconds_to_ns("timeout", timeout, allow_zero=False) / NS
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        return self._limit

    def on_sample(self, latency: float, in_flight: int, dropped: bool = False) -> int:
        """Feed one finished call; returns the new limit."""
        latency, in_flight = _check_sample(latency, in_flight)
        with self._lock:
            limit = self._limit
            if dropped or latency > self.timeout:
                limit = int(limit * self.backoff_ratio)
            elif in_flight * 2 >= limit:
                limit += 1
            self._limit = max(self.min_limit, min(self.max_limit, limit))
            return self._limit

    def __repr__(self) -> str:
        return f"AIMDLimit(limit={self._limit})"


class _ExpAvg:
    """Mean of the first `warmup` samples, then an exponential average over ~`window` samples."""

    def __init__(self, window: int, warmup: int = 10) -> None:
        self.value = 0.0
        self._n = 0
        self._warmup = warmup
        self._factor = 2.0 / (window + 1)

    def add(self, x: float) -> float:
        if self._n < self._warmup:
            self._n += 1
            self.value += (x - self.value) / self._n
        else:
            self.value = self.value * (1 - self._factor) + x * self._factor
        return self.value


class Gradient2Limit:
    """Netflix Gradient2: compares a short-term latency (the last sample) with a long-term average
    (~`long_window` samples). While they agree the limit grows by `queue_size` per sample (smoothed);
    when latency rises above `rtt_tolerance` x the long-term average the limit shrinks in proportion
    (at most by half per step). It does not grow while the service is app-limited (in_flight <
    limit / 2), and a long average far above the current latency decays (recovery after overload).

    One addition to Netflix's version, which ignores drops: a dropped call (timeout, rejection) counts
    as the steepest gradient (0.5), so the limit also backs off when the service starts failing calls
    instead of slowing them down.

    ``queue_size`` is an int or a callable(limit) -> int (the headroom added per step).
    """

    def __init__(self, initial_limit: int = 20, min_limit: int = 20, max_limit: int = 200,
                 smoothing: float = 0.2, rtt_tolerance: float = 1.5, long_window: int = 600,
                 queue_size: int | Callable[[int], int] = 4) -> None:
        init, self.min_limit, self.max_limit = _check_limits(initial_limit, min_limit, max_limit)
        s = check_float("smoothing", smoothing, minimum=0.0, maximum=1.0, min_inclusive=False)
        tol = check_float("rtt_tolerance", rtt_tolerance, minimum=1.0)
        assert s is not None and tol is not None
        self.smoothing, self.rtt_tolerance = s, tol
        self.long_window = check_int("long_window", long_window, minimum=1, maximum=1 << 30)
        if callable(queue_size):
            self._queue: Callable[[int], int] = check_function("queue_size", queue_size, nargs=1, allow_none=False,
                                                               role="queue_size(limit) -> int")
        else:
            q = check_int("queue_size", queue_size, minimum=0, maximum=_MAX_LIMIT)
            self._queue = lambda limit: q
        self._estimate = float(init)
        self._long = _ExpAvg(self.long_window)
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        return int(self._estimate)

    @property
    def long_rtt(self) -> float:
        """The long-term latency average, seconds."""
        return self._long.value

    def on_sample(self, latency: float, in_flight: int, dropped: bool = False) -> int:
        """Feed one finished call; returns the new limit."""
        latency, in_flight = _check_sample(latency, in_flight)
        short = max(latency, 1e-9)
        with self._lock:
            estimate = self._estimate
            queue = self._queue(int(estimate))
            long = self._long.add(short)
            if long / short > 2:                      # recovering from a long overload: forget faster
                self._long.value = long = long * 0.95
            if dropped:
                gradient = 0.5
            elif in_flight < estimate / 2:            # app-limited: no evidence to grow on
                return int(estimate)
            else:
                gradient = max(0.5, min(1.0, self.rtt_tolerance * long / short))
            target = estimate * gradient + queue
            estimate = estimate * (1 - self.smoothing) + target * self.smoothing
            self._estimate = max(float(self.min_limit), min(float(self.max_limit), estimate))
            return int(self._estimate)

    def __repr__(self) -> str:
        return f"Gradient2Limit(limit={self.limit}, long_rtt={self._long.value:.6g})"


@dataclass(frozen=True)
class ThrottleMetrics:
    requests: int
    accepts: int
    probability: float


class AdaptiveThrottle(Policy):
    """Client-side adaptive throttling (Google SRE book, "Handling Overload"): over the last `window`
    seconds count `requests` (every attempt, including those refused here) and `accepts` (calls the
    backend accepted); refuse locally with probability max(0, (requests - k * accepts) / (requests + 1)),
    raising Overloaded without calling the backend.

    ``reject_on``: exceptions meaning the backend did not accept the call (default: any Exception);
    any other Exception still counts as accepted. Anything that is not an Exception (cancellation,
    KeyboardInterrupt, custom BaseException subclasses) counts as neither (DESIGN §3c), nor does a
    refused use (a sync call of an async function: TypeError pointing at call_async). A generator (or
    async generator) is judged when its iteration ends.
    ``rng``: a callable returning floats in [0, 1) (default random.random), for deterministic tests.
    """

    _NBUCKETS = 60

    def __init__(self, k: float = 2.0, window: float = 120.0, clock: Any = None, *,
                 reject_on: Any = (Exception,), rng: Callable[[], float] | None = None) -> None:
        kk = check_float("k", k, minimum=1.0)
        assert kk is not None
        self.k = kk
        window_ns = seconds_to_ns("window", window, allow_zero=False)
        self.window = window_ns / NS
        self._clock = resolve_clock(clock)
        width = max(1, -(-window_ns // self._NBUCKETS))
        self._counts = core("window").TimeWindow(self._NBUCKETS, width,
                                                 None if is_system_clock(clock) else self._clock.monotonic_ns)
        self._rejected = exception_matcher("reject_on", reject_on)
        self._rng = check_function("rng", rng, nargs=0, role="rng() -> float in [0, 1)") or random.random

    def _state(self) -> tuple[int, int, float]:
        requests, not_accepted, _, _ = self._counts.snapshot()
        accepts = requests - not_accepted
        return requests, accepts, max(0.0, (requests - self.k * accepts) / (requests + 1))

    def probability(self) -> float:
        """Chance that the next call is refused locally."""
        return self._state()[2]

    def _admit(self) -> None:
        p = self.probability()
        if p > 0.0 and self._rng() < p:
            self._counts.record(True)
            raise Overloaded(f"throttled locally: the backend accepted too few recent requests "
                             f"(refusal probability {p:.3f})")

    def _outcome(self, exc: Any) -> None:
        """None: accepted; an Exception: judged by reject_on; anything else is no outcome."""
        if exc is not None and (not isinstance(exc, Exception) or type(exc) is UsageError):
            return
        self._counts.record(exc is not None and self._rejected(exc))

    def _stream_done(self, exc: Any) -> None:
        if exc is not COLLECTED:        # a stream dropped un-finished is no outcome
            self._outcome(exc if exc is None or isinstance(exc, BaseException) else GeneratorExit())

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if not callable(fn):
            raise not_callable(self, "call", fn)
        self._admit()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._outcome(exc)
            raise
        if is_lazy(result):
            return settle_sync(self, fn, result, self._stream_done)
        self._outcome(None)
        return result

    async def call_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if not callable(fn):
            raise not_callable(self, "call_async", fn)
        self._admit()
        try:
            aw = fn(*args, **kwargs)
        except BaseException as exc:
            self._outcome(exc)
            raise
        if type(aw) is not CORO and not isawaitable(aw):
            return settle_async(self, fn, aw, self._stream_done)
        try:
            result = await aw
        except BaseException as exc:
            self._outcome(exc)
            raise
        self._outcome(None)
        return result

    def __call__(self, fn: Any) -> Any:
        """Decorate fn (sync, async, (async) generator functions, methods); pickles by reference."""
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

    def metrics(self) -> ThrottleMetrics:
        return ThrottleMetrics(*self._state())

    def reset(self) -> None:
        self._counts.reset()

    def __repr__(self) -> str:
        return f"AdaptiveThrottle(k={self.k!r}, window={self.window!r})"
