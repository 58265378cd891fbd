"""Rate limiters: GCRA token and leaky buckets, fixed and sliding windows, several limits at once,
and a keyed limiter for millions of clients in one fixed table.

The core answers (admit / refuse / "wait N ns"); this module waits (clock.sleep / sleep_async),
raises `RateLimitExceeded(retry_after=...)` and validates arguments. Every `retry_after` and
`wait_time` is rounded up to a whole ns, so acquiring at now + retry_after succeeds.
"""
from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable

from ._base import Policy, is_async_callable
from ._context import _DEADLINE, remaining_ns
from ._impl import core
from ._params import MAX_RATE, NS, check_float, check_int, check_n, seconds_to_ns
from .clock import is_system_clock, resolve_clock
from .errors import RateLimitExceeded

_StageGuard = core("guard").StageGuard

__all__ = ["TokenBucket", "LeakyBucket", "FixedWindowLimiter", "SlidingWindowLimiter", "MultiLimiter",
           "KeyedLimiter", "RateLimitMetrics", "KeyedMetrics"]

_INT64_MAX = (1 << 63) - 1
_NO_WINDOW = -(1 << 64) - 2      # below any int64 clock reading // window (negative readings included)


@dataclass(frozen=True)
class RateLimitMetrics:
    """Decisions since creation or reset(): admitted and rejected (calls, not tokens)."""

    admitted: int
    rejected: int


@dataclass(frozen=True)
class KeyedMetrics:
    """Table occupancy of a KeyedLimiter (its memory is fixed at construction)."""

    keys: int
    max_keys: int
    nbytes: int

    @property
    def bytes_per_key(self) -> float:
        return self.nbytes / self.max_keys


def _seconds_up(ns: int) -> float:
    """ns -> float seconds s with ceil(s * 1e9) == ns where a float allows it (never below ns): clocks
    turn seconds into ns that way, so sleeping or advancing by s reaches exactly that instant."""
    s = ns / NS
    while math.ceil(s * NS) < ns:
        s = math.nextafter(s, math.inf)
    while math.ceil(s * NS) > ns:
        lower = math.nextafter(s, 0.0)
        if math.ceil(lower * NS) < ns:
            break
        s = lower
    return s


def _beyond_horizon(name: str | None, wait_ns: int) -> RateLimitExceeded:
    """A wait the core refused to represent (its arrival time would pass ~146 years from its base)."""
    retry_after = _seconds_up(max(wait_ns, 1))
    what = "rate limit" if name is None else f"rate limit {name!r}"
    return RateLimitExceeded(f"{what} exceeded: waiting {retry_after:.6g}s would push the limiter past the "
                             f"time it can represent; nothing was claimed", retry_after=retry_after)


def _budget_ns(timeout: object) -> int:
    """How long an acquire may wait: `timeout` (None = no limit), never past the context deadline."""
    budget = _INT64_MAX if timeout is None else seconds_to_ns("timeout", timeout)
    rem = remaining_ns()
    if rem is not None:
        budget = min(budget, max(0, rem))
    return budget


def _check_rate(rate: object) -> float:
    r = check_float("rate", rate, minimum=0.0, min_inclusive=False, maximum=MAX_RATE)
    assert r is not None
    return r


def _default_capacity(rate: object, capacity: object) -> object:
    return max(1, math.ceil(_check_rate(rate))) if capacity is None else capacity


def _check_name(name: object) -> str | None:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {name!r} ({type(name).__name__})")
    return name


def _clock_ns(clock: Any) -> Callable[[], int] | None:
    """What a core object reads: None = its own C monotonic clock (the system clock's)."""
    return None if is_system_clock(clock) else clock.monotonic_ns


class _Limiter(Policy):
    """Shared facade: decorator / call / call_async reject at once with RateLimitExceeded; acquire
    waits in a loop of "try, else sleep until wait_time" (TokenBucket and LeakyBucket reserve instead)."""

    name: str | None
    _clock: Any

    def try_acquire(self, n: int = 1) -> bool:
        raise NotImplementedError

    def _wait_ns(self, n: int) -> int:
        raise NotImplementedError

    def wait_time(self, n: int = 1) -> float:
        """Seconds until n would be admitted (0.0 = now); claims nothing."""
        return _seconds_up(self._wait_ns(n))

    def _rejected(self, wait_ns: int) -> RateLimitExceeded:
        retry_after = _seconds_up(max(wait_ns, 1))
        what = "rate limit" if self.name is None else f"rate limit {self.name!r}"
        return RateLimitExceeded(f"{what} exceeded; retry after {retry_after:.6g}s", retry_after=retry_after)

    def __call__(self, fn: Any) -> Any:
        """Decorate fn: each call takes one unit now or raises RateLimitExceeded. (Policy's decorator
        with call() inlined: one Python frame less on the hot path.)"""
        if not callable(fn):
            raise TypeError(f"{type(self).__name__} decorates a callable, got {fn!r}")
        try_acquire, rejected, wait_ns = self.try_acquire, self._rejected, self._wait_ns
        if is_async_callable(fn):
            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                if not try_acquire():
                    raise rejected(wait_ns(1))
                return await fn(*args, **kwargs)

            return async_wrapper

        def refuse() -> None:
            raise rejected(wait_ns(1))

        # compiled: the admission check and the call are one vectorcall (buttress._core.guard)
        return functools.wraps(fn)(_StageGuard(fn, try_acquire, refuse))

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Call fn if one unit is available now, else raise RateLimitExceeded."""
        if not self.try_acquire(1):
            raise self._rejected(self._wait_ns(1))
        return fn(*args, **kwargs)

    async def call_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if not self.try_acquire(1):
            raise self._rejected(self._wait_ns(1))
        return await fn(*args, **kwargs)

    def acquire(self, n: int = 1, timeout: float | None = None) -> None:
        """Wait until n are admitted; RateLimitExceeded at once when the wait would exceed `timeout`
        (or the context deadline)."""
        budget = _budget_ns(timeout)
        start = self._clock.monotonic_ns()
        while not self.try_acquire(n):
            wait = self._wait_ns(n)
            spent = self._clock.monotonic_ns() - start
            if spent + wait > budget:
                raise self._rejected(wait - max(0, budget - spent))
            self._clock.sleep(_seconds_up(wait))

    async def acquire_async(self, n: int = 1, timeout: float | None = None) -> None:
        budget = _budget_ns(timeout)
        start = self._clock.monotonic_ns()
        while not self.try_acquire(n):
            wait = self._wait_ns(n)
            spent = self._clock.monotonic_ns() - start
            if spent + wait > budget:
                raise self._rejected(wait - max(0, budget - spent))
            await self._clock.sleep_async(_seconds_up(wait))

    # MultiLimiter protocol: claim now (a receipt or None), give a claim back
    def _claim(self, n: int) -> object:
        raise NotImplementedError

    def _unclaim(self, n: int, receipt: object) -> None:
        raise NotImplementedError

    _max_n: int


class TokenBucket(_Limiter):
    """GCRA token bucket: `capacity` tokens (the burst), refilled at `rate` per second.

    At one instant at most `capacity` are admitted; over any interval D at most
    capacity + floor(D * rate). `capacity` defaults to max(1, ceil(rate)).
    """

    def __init__(self, rate: float, capacity: int | None = None, clock: Any = None, name: str | None = None) -> None:
        capacity = _default_capacity(rate, capacity)
        self._clock = resolve_clock(clock)
        self._core = core("gcra").GCRA(rate, capacity, _clock_ns(clock))
        self.name = _check_name(name)
        self.rate: float = self._core.rate
        self.capacity: int = self._core.capacity
        self._max_n = self.capacity
        # the hot path is the core's own method: no Python frame between the caller and the CAS
        self.try_acquire = self._core.try_acquire  # type: ignore[method-assign]

    def try_acquire(self, n: int = 1) -> bool:  # replaced per instance by the core's bound method
        """Take n tokens if they are available now."""
        return self._core.try_acquire(n)

    def _wait_ns(self, n: int) -> int:
        return self._core.wait_ns(n)

    def _claim_for_wait(self, n: int, timeout: float | None) -> tuple[int, int]:
        """Claim n tokens for a caller that may wait: (wait ns, receipt), or raise RateLimitExceeded at
        once (nothing claimed) when the wait would exceed the budget or cannot be represented."""
        c = self._core
        budget = _INT64_MAX if timeout is None and _DEADLINE.get() is None else _budget_ns(timeout)
        wait, receipt = c.claim(n, None, budget)
        if wait < 0:
            need = c.wait_ns(n)
            if need <= budget:             # refused although within budget: past the core's time horizon
                raise _beyond_horizon(self.name, need)
            raise self._rejected(need - budget)
        return wait, receipt

    def acquire(self, n: int = 1, timeout: float | None = None) -> None:
        """Take n tokens, sleeping (clock.sleep) until they are usable; RateLimitExceeded at once,
        without sleeping, when the wait would exceed `timeout` (None = no limit) or the context deadline."""
        wait, receipt = self._claim_for_wait(n, timeout)
        if wait:
            try:
                self._clock.sleep(_seconds_up(wait))
            except BaseException:
                self._core.refund(receipt)   # interrupted: given back unless a later claim built on it
                raise

    async def acquire_async(self, n: int = 1, timeout: float | None = None) -> None:
        """Like acquire, awaiting clock.sleep_async; a cancelled wait gives its tokens back when no later
        reservation has built on them (otherwise giving them back would let two waiters through where
        one fits)."""
        wait, receipt = self._claim_for_wait(n, timeout)
        if wait:
            try:
                await self._clock.sleep_async(_seconds_up(wait))
            except BaseException:
                self._core.refund(receipt)
                raise

    def reserve(self, n: int = 1) -> float:
        """Claim n tokens now; returns the seconds to wait before using them (0.0 = now).
        RateLimitExceeded (nothing claimed) when that wait is past what the limiter can represent."""
        wait = self._core.reserve(n)
        if wait < 0:
            raise _beyond_horizon(self.name, self._core.wait_ns(n))
        return _seconds_up(wait)

    @property
    def available(self) -> int:
        """Whole tokens available now."""
        return self._core.available()

    def metrics(self) -> RateLimitMetrics:
        return RateLimitMetrics(*self._core.counts())

    def reset(self) -> None:
        """Full bucket; metrics back to zero."""
        self._core.reset()

    def _claim(self, n: int) -> object:
        wait, receipt = self._core.claim(n, None, 0)
        return receipt if wait == 0 else None

    def _unclaim(self, n: int, receipt: object) -> None:
        self._core.refund(receipt)          # only if no later claim built on it

    def __repr__(self) -> str:
        name = "" if self.name is None else f", name={self.name!r}"
        return f"TokenBucket(rate={self.rate!r}, capacity={self.capacity!r}{name})"


class LeakyBucket(_Limiter):
    """Admissions spaced evenly at `rate` per second: each caller waits for its own slot.

    A capacity-1 GCRA whose slots are claimed with reserve(): the k-th caller in line waits
    about k / rate. When `queue_size` callers are already waiting, the next is rejected at once
    with RateLimitExceeded (the wait it would get is > queue_size / rate: one CAS decides it, no
    queue object). A cancelled or interrupted waiter gives its slot back only when it is the last in
    line (no later caller has queued behind it); otherwise the slot stays unused, so two admissions are
    never closer than 1 / rate.
    """

    def __init__(self, rate: float, queue_size: int, clock: Any = None, name: str | None = None) -> None:
        self._clock = resolve_clock(clock)
        self._core = core("gcra").GCRA(rate, 1, _clock_ns(clock))
        self.queue_size = check_int("queue_size", queue_size, minimum=0, maximum=1 << 40)
        self.name = _check_name(name)
        self.rate: float = self._core.rate
        self._max_n = 1
        self._queue_ns = min(self.queue_size * self._core.interval_ns, _INT64_MAX)

    def try_acquire(self, n: int = 1) -> bool:
        """Admit now if this instant's slot is free (never waits)."""
        return self._core.try_acquire(n)

    def _wait_ns(self, n: int) -> int:
        return self._core.wait_ns(n)

    @property
    def waiting(self) -> int:
        """Callers holding a future slot now."""
        w = self._core.wait_ns(1)
        return max(0, -(-w // self._core.interval_ns) - 1)

    def _reserve(self, timeout: float | None) -> tuple[int, int]:
        budget = min(self._queue_ns, _budget_ns(timeout))
        wait, receipt = self._core.claim(1, None, budget)
        if wait < 0:
            need = self._core.wait_ns(1)
            if need <= budget:
                raise _beyond_horizon(self.name, need)
            raise self._rejected(need - budget)
        return wait, receipt

    def acquire(self, n: int = 1, timeout: float | None = None) -> None:
        """Wait for the next slot; RateLimitExceeded at once when the queue is full or the wait would
        exceed `timeout` (or the context deadline). n must be 1."""
        check_n(n, 1)
        wait, receipt = self._reserve(timeout)
        if wait:
            try:
                self._clock.sleep(_seconds_up(wait))
            except BaseException:
                self._core.refund(receipt)   # only the last slot in line is given back
                raise

    async def acquire_async(self, n: int = 1, timeout: float | None = None) -> None:
        check_n(n, 1)
        wait, receipt = self._reserve(timeout)
        if wait:
            try:
                await self._clock.sleep_async(_seconds_up(wait))
            except BaseException:
                self._core.refund(receipt)
                raise

    __call__ = Policy.__call__     # as a decorator a leaky bucket waits for the slot: through call()

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Wait for a slot (rejected when the queue is full), then call fn."""
        self.acquire()
        return fn(*args, **kwargs)

    async def call_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        await self.acquire_async()
        return await fn(*args, **kwargs)

    def metrics(self) -> RateLimitMetrics:
        return RateLimitMetrics(*self._core.counts())

    def reset(self) -> None:
        self._core.reset()

    def __repr__(self) -> str:
        name = "" if self.name is None else f", name={self.name!r}"
        return f"LeakyBucket(rate={self.rate!r}, queue_size={self.queue_size!r}{name})"


class _WindowLimiter(_Limiter):
    """At most `limit` per window of `window` seconds; windows are aligned to the clock's multiples
    of `window` (like `limits`). Exact under threads: one lock per limiter (not a hot path).

    The clock is read inside the lock, and time never runs backwards inside the limiter (the latest
    reading wins), so a thread that read the clock and was pre-empted cannot decide with a stale time
    after another thread decided with a later one."""

    def __init__(self, limit: int, window: float, clock: Any = None, name: str | None = None) -> None:
        self.limit = check_int("limit", limit, minimum=1, maximum=1 << 40)
        self._w = seconds_to_ns("window", window, allow_zero=False)
        self.window: float = self._w / NS
        self._clock = resolve_clock(clock)
        self.name = _check_name(name)
        self._max_n = self.limit
        self._lock = threading.Lock()
        self._last: int | None = None   # latest clock reading used (monotone max)
        self._gen = 0            # bumped by reset(): receipts of older claims are void
        self._idx = _NO_WINDOW   # current window number (now // window); below any real one at first
        self._prev = 0           # count in window _idx - 1
        self._curr = 0           # count in window _idx
        self._n_admitted = self._n_rejected = 0

    def _time(self) -> tuple[int, int]:
        """(window number, ns into it) for now; call with the lock held."""
        t = self._clock.monotonic_ns()
        if self._last is not None and t < self._last:
            t = self._last
        else:
            self._last = t
        return divmod(t, self._w)

    def _roll(self, idx: int) -> None:
        if idx > self._idx:
            self._prev = self._curr if idx == self._idx + 1 else 0
            self._curr = 0
            self._idx = idx

    def _fits(self, n: int, e: int) -> bool:
        raise NotImplementedError

    def _claim(self, n: int) -> object:
        if type(n) is not int or not 1 <= n <= self.limit:
            check_n(n, self.limit)
        with self._lock:
            idx, e = self._time()
            self._roll(idx)
            if not self._fits(n, e):
                self._n_rejected += 1
                return None
            self._curr += n
            self._n_admitted += 1
            return (self._gen, idx)

    def _unclaim(self, n: int, receipt: object) -> None:
        gen, idx = receipt  # type: ignore[misc]
        with self._lock:
            if gen != self._gen:
                return                   # counted before reset(): nothing of it is left to give back
            if idx == self._idx:
                self._curr -= n
            elif idx == self._idx - 1:
                self._prev -= n

    def _counts(self, n: int) -> tuple[int, int, int]:
        """(prev, curr, e) as the next decision would see them, without changing anything."""
        check_n(n, self.limit)
        with self._lock:
            idx, e = self._time()
            if idx == self._idx:
                return self._prev, self._curr, e
            return (self._curr if idx == self._idx + 1 else 0), 0, e

    def try_acquire(self, n: int = 1) -> bool:
        """Count n in this window if the limit allows it now."""
        return self._claim(n) is not None

    def metrics(self) -> RateLimitMetrics:
        with self._lock:
            return RateLimitMetrics(self._n_admitted, self._n_rejected)

    def reset(self) -> None:
        with self._lock:
            self._gen += 1
            self._prev = self._curr = self._n_admitted = self._n_rejected = 0

    def __repr__(self) -> str:
        name = "" if self.name is None else f", name={self.name!r}"
        return f"{type(self).__name__}(limit={self.limit!r}, window={self.window!r}{name})"


class FixedWindowLimiter(_WindowLimiter):
    """At most `limit` per aligned window; a new window starts from zero (bursts of up to 2 x limit
    across a window edge are possible: that is the fixed-window trade-off)."""

    def _fits(self, n: int, e: int) -> bool:
        return self._curr + n <= self.limit

    def _wait_ns(self, n: int) -> int:
        _, curr, e = self._counts(n)
        return 0 if curr + n <= self.limit else self._w - e


class SlidingWindowLimiter(_WindowLimiter):
    """Sliding-window counter (as in `limits`): the previous window's count weighted by the part of it
    still inside the sliding window, plus the current count: admit n when
    prev * (window - elapsed) / window + curr + n <= limit (decided in exact integers)."""

    def _first_fit(self, prev: int, curr: int, n: int) -> int | None:
        """Smallest elapsed ns in a window with these counts at which n fits, or None."""
        room = (self.limit - curr - n) * self._w       # need prev * (W - e) <= room
        if room < 0:
            return None
        if prev == 0:
            return 0
        e = max(0, self._w - room // prev)
        return e if e < self._w else None

    def _fits(self, n: int, e: int) -> bool:
        return self._prev * (self._w - e) + (self._curr + n) * self._w <= self.limit * self._w

    def _wait_ns(self, n: int) -> int:
        prev, curr, e = self._counts(n)
        first = self._first_fit(prev, curr, n)
        if first is not None:
            return max(0, first - e)
        first = self._first_fit(curr, 0, n)
        if first is not None:
            return self._w - e + first
        return 2 * self._w - e


class MultiLimiter(_Limiter):
    """Several limits at once (e.g. 5/s and 1000/h), all or nothing: a request is admitted only if
    every limiter admits it; when one refuses, what the others took is given back.

    Accepts TokenBucket, FixedWindowLimiter, SlidingWindowLimiter and MultiLimiter. acquire() sleeps
    on the first limiter's clock.
    """

    def __init__(self, *limiters: _Limiter, name: str | None = None) -> None:
        if not limiters:
            raise ValueError("MultiLimiter needs at least one limiter, got none")
        for lim in limiters:
            if not isinstance(lim, (TokenBucket, _WindowLimiter, MultiLimiter)):
                raise TypeError(f"limiters must be TokenBucket, FixedWindowLimiter, SlidingWindowLimiter or "
                                f"MultiLimiter objects, got {lim!r}")
        clocks = {0 if is_system_clock(lim._clock) else id(lim._clock) for lim in limiters}
        if len(clocks) > 1:
            raise ValueError(f"limiters must share one clock (their decisions are compared in time), got "
                             f"{', '.join(repr(lim._clock) for lim in limiters)}")
        self.limiters = tuple(limiters)
        self.name = _check_name(name)
        self._clock = limiters[0]._clock
        self._max_n = min(lim._max_n for lim in limiters)
        self._lock = threading.Lock()
        self._n_admitted = self._n_rejected = 0

    def _claim(self, n: int) -> object:
        check_n(n, self._max_n)
        taken: list[tuple[_Limiter, object]] = []
        for lim in self.limiters:
            receipt = lim._claim(n)
            if receipt is None:
                for done, r in reversed(taken):
                    done._unclaim(n, r)
                with self._lock:
                    self._n_rejected += 1
                return None
            taken.append((lim, receipt))
        with self._lock:
            self._n_admitted += 1
        return taken

    def _unclaim(self, n: int, receipt: object) -> None:
        for lim, r in reversed(receipt):  # type: ignore[call-overload]
            lim._unclaim(n, r)

    def try_acquire(self, n: int = 1) -> bool:
        """Take n from every limiter, or from none."""
        return self._claim(n) is not None

    def _wait_ns(self, n: int) -> int:
        check_n(n, self._max_n)
        return max(lim._wait_ns(n) for lim in self.limiters)

    def metrics(self) -> RateLimitMetrics:
        """This MultiLimiter's own decisions (each inner limiter also counts its part, rolled back or not)."""
        with self._lock:
            return RateLimitMetrics(self._n_admitted, self._n_rejected)

    def __repr__(self) -> str:
        return f"MultiLimiter({', '.join(map(repr, self.limiters))})"


class KeyedLimiter:
    """One GCRA bucket per key (client id, IP, API key: int, str or bytes) in one fixed table.

    Memory is allocated once: 2 * max_keys slots of 16 bytes (32 bytes per key). When max_keys keys
    are live, a new key evicts, from its probe window, a refilled key first (nothing is lost), then
    the least recently charged one; a key that is still limited is never evicted. With `idle_ttl`,
    refilled keys idle that long are also swept out (purge() sweeps them all).
    See docs/rate-limiting.md for what is atomic.
    """

    def __init__(self, rate: float, capacity: int | None = None, max_keys: int = 1_000_000,
                 idle_ttl: float | None = None, clock: Any = None, name: str | None = None) -> None:
        capacity = _default_capacity(rate, capacity)
        idle_ns = 0 if idle_ttl is None else seconds_to_ns("idle_ttl", idle_ttl, allow_zero=False)
        self._clock = resolve_clock(clock)
        self._core = core("keyed").KeyedGCRA(rate, capacity, max_keys, idle_ns, _clock_ns(clock))
        self.name = _check_name(name)
        self.rate: float = self._core.rate
        self.capacity: int = self._core.capacity
        self.max_keys: int = self._core.max_keys
        self.idle_ttl = None if idle_ttl is None else idle_ns / NS
        self.try_acquire = self._core.try_acquire  # type: ignore[method-assign]

    def try_acquire(self, key: int | str | bytes, n: int = 1) -> bool:  # replaced by the core's method
        """Take n tokens from key's bucket if available now (a key seen for the first time starts full)."""
        return self._core.try_acquire(key, n)

    def try_acquire_many(self, keys: Any, n: int = 1) -> Any:
        """Decide a numpy array of int ids in order in one call (a duplicate consumes in turn);
        returns a numpy bool array. Integer arrays of other dtypes are converted to int64."""
        try:
            import numpy as np
        except ImportError:
            raise ImportError('KeyedLimiter.try_acquire_many needs numpy: pip install "buttress[numpy]"') from None

        arr = np.asarray(keys)
        if arr.ndim != 1:
            raise ValueError(f"keys must be a one-dimensional array, got shape {arr.shape}")
        if arr.dtype != np.int64:
            if arr.dtype.kind == "u" and arr.size and int(arr.max()) > _INT64_MAX:
                raise ValueError(f"keys must fit in int64, got {int(arr.max())}")
            if arr.dtype.kind not in "iu" and arr.size:
                raise TypeError(f"keys must be an array of int ids (int64), got dtype {arr.dtype}")
            arr = arr.astype(np.int64)
        return self._core.try_acquire_many(np.ascontiguousarray(arr), n)

    def wait_time(self, key: int | str | bytes, n: int = 1) -> float:
        """Seconds until key's bucket has n tokens (0.0 = now); claims nothing."""
        return _seconds_up(self._core.wait_ns(key, n))

    def _rejected(self, key: object) -> RateLimitExceeded:
        retry_after = _seconds_up(max(self._core.wait_ns(key, 1), 1))
        what = "rate limit" if self.name is None else f"rate limit {self.name!r}"
        return RateLimitExceeded(f"{what} exceeded for key {key!r}; retry after {retry_after:.6g}s",
                                 retry_after=retry_after)

    def call(self, key: int | str | bytes, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Call fn if key has a token now, else raise RateLimitExceeded."""
        if not self._core.try_acquire(key):
            raise self._rejected(key)
        return fn(*args, **kwargs)

    async def call_async(self, key: int | str | bytes, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if not self._core.try_acquire(key):
            raise self._rejected(key)
        return await fn(*args, **kwargs)

    def key_hash(self, key: int | str | bytes) -> int:
        """The stable 64-bit hash the table uses for `key`."""
        return self._core.key_hash(key)

    def purge(self) -> int:
        """Remove every refilled key (idle at least idle_ttl when set); returns how many."""
        return self._core.purge()

    def reset(self) -> None:
        """Forget every key."""
        self._core.reset()

    def __len__(self) -> int:
        return len(self._core)

    @property
    def nbytes(self) -> int:
        """Bytes held by the table (fixed at construction)."""
        return self._core.nbytes

    def metrics(self) -> KeyedMetrics:
        return KeyedMetrics(keys=len(self._core), max_keys=self.max_keys, nbytes=self._core.nbytes)

    def __repr__(self) -> str:
        return (f"KeyedLimiter(rate={self.rate!r}, capacity={self.capacity!r}, max_keys={self.max_keys!r}, "
                f"idle_ttl={self.idle_ttl!r})")

