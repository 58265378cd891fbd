"""Pure-Python twin of buttress._core.gcra: the spec and the fallback.

The state is WORDS int64 words (see the compiled module's doc for the layout): the object's own, or a
store's (`words=`), on which this twin decides under `locker` (the store's lock: an fcntl byte lock plus a
threading.Lock, so processes of the twin share one limit exactly) or, process-local, a threading.Lock.
"""
from __future__ import annotations

import ctypes
import threading
import time
from operator import index as _index
from typing import Any, Callable

from .._params import check_n, emission_interval_ns

__all__ = ["GCRA", "WORDS"]

WORDS = 8           # int64 words of a GCRA in a store
_TAT, _INTERVAL, _TAU, _BASE, _ADMITTED, _REJECTED = range(6)

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
# time relative to the base (a clock reading taken at creation), saturated: see _core/bt_gcra.pxd
REL_MIN = -(1 << 61)
REL_MAX = (1 << 61) - 1
TAT_MAX = (1 << 61) + (1 << 62) - 1

_N_MASK = (1 << 63) - 1
_UNINIT = "{} is not initialised: its __init__ never ran (a subclass must call super().__init__())"


def _show(v: object) -> str:
    if type(v) is int and v.bit_length() > 256:
        return f"an int of {v.bit_length()} bits"
    return repr(v)


def as_i64(v: object, name: str) -> int:
    """An int in the int64 range, else TypeError / ValueError naming `name` (never OverflowError)."""
    if type(v) is not int:
        if isinstance(v, bool) or not hasattr(type(v), "__index__"):
            raise TypeError(f"{name} must be an int (ns), got {v!r} ({type(v).__name__})")
        v = _index(v)  # type: ignore[arg-type]  # its type has __index__ (checked just above)
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise ValueError(f"{name} must be an int in the int64 range [-2**63, 2**63 - 1], got {_show(v)}")
    return v


def rel_time(now: int, base: int, lo: int, hi: int) -> int:
    """now - base clamped to [lo, hi] (what the compiled core computes without overflowing)."""
    return min(hi, max(lo, now - base))


def words_view(words: Any, nwords: int, what: str = "a GCRA") -> memoryview:
    """`words` as bytes: a writable, contiguous, 8-byte aligned buffer of at least nwords int64 words."""
    try:
        mv = memoryview(words)
    except TypeError:
        raise TypeError(f"words must be a writable buffer (a store binding's words, an mmap, a bytearray), "
                        f"got {type(words).__name__}") from None
    if mv.readonly:
        raise TypeError(f"words must be a writable buffer, got a read-only {type(words).__name__}")
    if not mv.c_contiguous:
        raise ValueError("words must be a contiguous buffer")
    if mv.nbytes < 8 * nwords:
        raise ValueError(f"words holds {mv.nbytes} bytes, {what} needs {8 * nwords}")
    raw = mv.cast("B")[:8 * nwords]
    if ctypes.addressof(ctypes.c_char.from_buffer(raw)) % 8:
        raise ValueError("words must start at an 8-byte aligned address")
    return raw


def track_bound(obj: Any, locker: Any) -> None:
    """A core object bound to a store's words tells the store about itself through the store's locker
    (``locker.track(obj)``), so that closing the store can close the object (``obj._close(message)``).
    Lockers without ``track`` (a threading.Lock, a memory store's) need nothing. Compiled and twin call it
    last in __init__ when given words."""
    track = getattr(locker, "track", None)
    if track is not None:
        track(obj)


class _Uninit:
    """Attribute lookups that fail on an object whose __init__ never ran raise the compiled core's
    RuntimeError (a subclass that forgot super().__init__() gets the same answer in both).

    Also the closed state of an object bound to a store's words: after ``_close(message)`` (the store
    closed in this process, or a forked child got no lease) every decision and every read of the words
    raises RuntimeError(message); settings (rate, capacity, ...) still read."""

    _closed: str | None = None

    def _live(self) -> None:
        """Initialised and not closed: every decision and every read of the words checks it first."""
        self._lock
        if self._closed is not None:
            raise RuntimeError(self._closed)

    def _close(self, message: str) -> None:
        """See the class doc. The first message stays; the words stay referenced until the object goes."""
        if self._closed is None:
            self._closed = str(message)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "_lock" in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raise RuntimeError(_UNINIT.format(type(self).__name__))

    def __reduce__(self) -> Any:
        raise TypeError(f"cannot pickle or copy {type(self).__name__} objects (they hold live limiter state)")

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.__reduce__()


class GCRA(_Uninit):
    """GCRA: a bucket of `capacity` tokens refilled at `rate` per second, kept as one
    "theoretical arrival time" (TAT). A request for n tokens at `now` is admitted when
    max(TAT, now) + n * interval - now <= capacity * interval."""

    def __init__(self, rate: float, capacity: int, clock_ns: Callable[[], int] | None = None,
                 words: Any = None, locker: Any = None) -> None:
        if "_lock" in self.__dict__:
            raise RuntimeError(f"{type(self).__name__} is already initialised; create a new one instead")
        r, cap, interval = emission_interval_ns(rate, capacity)
        if clock_ns is not None and not callable(clock_ns):
            raise TypeError(f"clock_ns must be a callable returning int ns or None, got {clock_ns!r}")
        if words is None:
            base = 0 if clock_ns is None else as_i64(clock_ns(), "clock_ns()")   # see the compiled module doc
            w = memoryview(bytearray(8 * WORDS)).cast("q")
            for i, v in enumerate((REL_MIN, interval, interval * cap, base)):
                w[i] = v
        else:
            w = words_view(words, WORDS).cast("q")
            _check_words(w[_INTERVAL], w[_TAU], interval, interval * cap)
        self._w = w
        self._base = w[_BASE]
        self._rate = r
        self._capacity = cap
        self._interval = interval
        self._tau = interval * cap
        self._clock_ns = clock_ns
        self._lock = threading.Lock() if locker is None else locker
        if words is not None:
            track_bound(self, locker)

    @staticmethod
    def init_words(words: Any, rate: float, capacity: int, base_ns: int = 0) -> None:
        """Write the words of a new shared GCRA (a full bucket; time measured from base_ns)."""
        r, cap, interval = emission_interval_ns(rate, capacity)
        b = as_i64(base_ns, "base_ns")
        mv = words_view(words, WORDS).cast("q")
        for i, v in enumerate((REL_MIN, interval, interval * cap, b, 0, 0, 0, 0)):
            mv[i] = v

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def interval_ns(self) -> int:
        return self._interval

    def _rel(self, now: Any) -> int:
        """`now` (or a clock reading) -> time relative to the base, saturated."""
        if now is None:
            clock = self._clock_ns
            now = time.monotonic_ns() if clock is None else as_i64(clock(), "clock_ns()")
        else:
            now = as_i64(now, "now")
        return rel_time(now, self._base, REL_MIN, REL_MAX)

    @staticmethod
    def _max_wait(max_wait_ns: Any) -> int:
        if max_wait_ns is None:
            return _INT64_MAX
        m = as_i64(max_wait_ns, "max_wait_ns")
        if m < 0:
            raise ValueError(f"max_wait_ns must be >= 0 (or None for no limit), got {max_wait_ns!r}")
        return m

    def _claim(self, n: int, now: Any, max_wait: int) -> tuple[int, int]:
        cost = n * self._interval
        w = self._w
        with self._lock:
            t = self._rel(now)           # read inside the decision: never older than the state it changes
            b = max(w[_TAT], t)
            new_tat = b + cost
            wait = max(0, new_tat - t - self._tau)
            if new_tat > TAT_MAX or wait > max_wait:
                w[_REJECTED] += 1
                return -1, 0
            w[_TAT] = new_tat
            w[_ADMITTED] += 1
            return wait, new_tat

    def try_acquire(self, n: int = 1, now: int | None = None) -> bool:
        """Take n tokens if they are available now."""
        self._live()
        return self._claim(check_n(n, self._capacity), now, 0)[0] == 0

    def take(self, now: int | None = None) -> int | None:
        """try_acquire(1) that returns the claim's end (its new theoretical arrival time, an int) for
        untake(), or None when refused (nothing claimed): the cheap receipt of a facade that may have to
        give the token back (a sync form that got an async function)."""
        self._live()
        wait, end = self._claim(1, now, 0)
        return None if wait != 0 else end

    def untake(self, end: int) -> bool:
        """Give back the token of the take() that returned `end`, only if no later claim has built on it
        (one CAS, as refund); returns whether it was given back. False once the store closed in this
        process (a call admitted before the close keeps its own result or exception)."""
        self._lock
        e = as_i64(end, "end")
        if not REL_MIN + self._interval <= e <= TAT_MAX:
            raise ValueError(f"end must be a value returned by take(), got {_show(end)}")
        return self._give_back(e, self._interval)

    def _give_back(self, end: int, amount: int) -> bool:
        """The CAS of refund/untake: nothing once closed (also when the store's lock refuses: it closed
        between the check and the lock, and the object was closed first)."""
        if self._closed is not None:
            return False
        try:
            with self._lock:
                if self._w[_TAT] != end:
                    return False
                self._w[_TAT] = end - amount
                return True
        except RuntimeError:
            if self._closed is not None:
                return False
            raise

    def reserve(self, n: int = 1, now: int | None = None, max_wait_ns: int | None = None) -> int:
        """Claim n tokens now if the wait is <= max_wait_ns (None: any representable wait); return that
        wait in ns, or -1 (nothing claimed)."""
        self._live()
        k = check_n(n, self._capacity)
        return self._claim(k, now, self._max_wait(max_wait_ns))[0]

    def claim(self, n: int = 1, now: int | None = None, max_wait_ns: int | None = None) -> tuple[int, int]:
        """reserve() that also returns a receipt for refund(): (wait_ns, receipt), or (-1, 0) when
        refused (nothing claimed). The receipt is an int: the claim's end (its new theoretical arrival
        time, absolute ns) times 2**63, plus n."""
        self._live()
        k = check_n(n, self._capacity)
        wait, end = self._claim(k, now, self._max_wait(max_wait_ns))
        if wait < 0:
            return -1, 0
        return wait, ((end + self._base) << 63) + k

    def wait_ns(self, n: int = 1, now: int | None = None) -> int:
        """ns until n tokens would be available (0 = now); claims nothing."""
        self._live()
        k = check_n(n, self._capacity)
        t = self._rel(now)
        return max(0, max(0, self._w[_TAT] - t) - (self._tau - k * self._interval))

    def available(self, now: int | None = None) -> int:
        """Whole tokens available at now."""
        self._live()
        ahead = max(0, self._w[_TAT] - self._rel(now))
        return 0 if ahead >= self._tau else (self._tau - ahead) // self._interval

    def refund(self, receipt: int) -> bool:
        """Give back the tokens of the claim that returned `receipt`, only if no later claim has built on
        it (one CAS); returns whether they were given back. Never more than that claim took; use each
        receipt once. False once the store closed in this process (a call admitted before the close
        keeps its own result or exception: nothing is given back after the close)."""
        self._lock
        if type(receipt) is not int:
            if isinstance(receipt, bool) or not hasattr(type(receipt), "__index__"):
                raise TypeError(f"receipt must be an int, got {receipt!r} ({type(receipt).__name__})")
            receipt = _index(receipt)
        k = receipt & _N_MASK
        end = (receipt >> 63) - self._base
        if not (1 <= k <= self._capacity and REL_MIN + k * self._interval <= end <= TAT_MAX):
            raise ValueError(f"receipt must be a receipt returned by claim(), got {_show(receipt)}")
        return self._give_back(end, k * self._interval)

    def counts(self) -> tuple[int, int]:
        """(admitted, rejected) decisions since creation or reset()."""
        self._live()
        return self._w[_ADMITTED], self._w[_REJECTED]

    def reset(self) -> None:
        """Full bucket, counters back to zero."""
        self._live()
        with self._lock:
            self._w[_TAT] = REL_MIN
            self._w[_ADMITTED] = self._w[_REJECTED] = 0

    def __repr__(self) -> str:
        if "_lock" not in self.__dict__:
            return f"<{type(self).__name__} (not initialised)>"
        return f"GCRA(rate={self.rate!r}, capacity={self.capacity!r})"


def _check_words(have_interval: int, have_tau: int, interval: int, tau: int) -> None:
    if have_interval != interval or have_tau != tau:
        raise ValueError(f"words hold a GCRA with interval {have_interval} ns and tau {have_tau} ns, this one has "
                         f"interval {interval} ns and tau {tau} ns (words not written by GCRA.init_words for "
                         f"these settings)")
