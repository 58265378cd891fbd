"""Pure-Python twin of buttress._core.keyed: the spec and the fallback.

Same table, same hash, same slot choices as the compiled core (see its docstring); here one
threading.Lock makes every decision atomic.
"""
from __future__ import annotations

import threading
import time
from array import array
from operator import index as _index
from typing import Any, Callable

from .._params import check_int, check_n, emission_interval_ns
from .gcra import _show, _Uninit, as_i64, rel_time

__all__ = ["KeyedGCRA", "WINDOW", "MAX_KEYS", "MAX_TAU_NS", "MAX_NOW_NS"]

WINDOW = 32         # slots a key may live in, from its home slot
_SWEEP = 8          # slots swept for idle keys per new key (idle_ns > 0)
MAX_KEYS = 1 << 30
MAX_TAU_NS = 1 << 58          # capacity / rate at most ~9 years
MAX_NOW_NS = 1 << 58          # the largest idle_ns (any int64 clock reading is valid)
_K_REL_MIN = -(1 << 59) + 1   # time relative to the base, saturated: see _core/keyed.pyx
_K_TAT_MAX = (1 << 59) - 1

_M64 = (1 << 64) - 1
_LOCKED = -1
_GEN = 15
_INT64_MAX = (1 << 63) - 1


def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xff51afd7ed558ccd) & _M64
    k ^= k >> 33
    k = (k * 0xc4ceb9fe1a85ec53) & _M64
    return k ^ (k >> 33)


def _fnv1a(data: bytes) -> int:
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & _M64
    return h


def _signed(h: int) -> int:
    h = h or 1
    return h - (1 << 64) if h >> 63 else h


def _hash_int(k: int) -> int:
    return _signed(_fmix64((k & _M64) ^ 0x9e3779b97f4a7c15))


def _hash(key: object) -> int:
    """int (int64 range), str (UTF-8) or bytes -> nonzero signed 64-bit hash; str and bytes differ."""
    if type(key) is not int:
        if isinstance(key, str):
            return _signed(_fmix64(_fnv1a(key.encode("utf-8")) ^ 0x5354520000000000))
        if isinstance(key, bytes):
            return _signed(_fmix64(_fnv1a(key)))
        try:
            key = _index(key)
        except TypeError:
            raise TypeError(f"key must be an int, str or bytes, got {key!r} ({type(key).__name__})") from None
    if not -(1 << 63) <= key < (1 << 63):
        raise ValueError(f"key must be an int in the int64 range (or a str / bytes), got {_show(key)}")
    return _hash_int(key)


class KeyedGCRA(_Uninit):
    """One GCRA per key in one fixed open-addressing table of 2 * max_keys (hash, tat<<4|gen) slots."""

    def __init__(self, rate: float, capacity: int, max_keys: int, idle_ns: int = 0,
                 clock_ns: Callable[[], int] | None = None) -> None:
        if "_lock" in self.__dict__:
            raise RuntimeError(f"{type(self).__name__} is already initialised; create a new one instead")
        r, cap, interval = emission_interval_ns(rate, capacity)
        if interval * cap > MAX_TAU_NS:
            raise ValueError(f"capacity / rate must be at most {MAX_TAU_NS / 1e9:.0f} s for a keyed limiter, "
                             f"got capacity={capacity!r} at rate={rate!r}")
        mk = check_int("max_keys", max_keys, minimum=1, maximum=MAX_KEYS)
        idle = check_int("idle_ns", idle_ns, minimum=0, maximum=MAX_NOW_NS)
        if clock_ns is not None and not callable(clock_ns):
            raise TypeError(f"clock_ns must be a callable returning int ns or None, got {clock_ns!r}")
        self._base = 0 if clock_ns is None else as_i64(clock_ns(), "clock_ns()")
        self._nslots = max(2 * mk, WINDOW)
        self._max_keys = mk
        self._rate = r
        self._capacity = cap
        self._interval = interval
        self._idle = idle
        self._tau = interval * cap
        self._rel_max = _K_TAT_MAX - self._tau
        self._clock_ns = clock_ns
        self._keys = array("q", bytes(8 * self._nslots))
        self._words = array("q", bytes(8 * self._nslots))
        self._count = 0
        self._hand = 0
        self._lock = threading.Lock()

    rate = property(lambda self: self._rate)
    capacity = property(lambda self: self._capacity)
    interval_ns = property(lambda self: self._interval)
    max_keys = property(lambda self: self._max_keys)
    nslots = property(lambda self: self._nslots)
    idle_ns = property(lambda self: self._idle)

    @property
    def nbytes(self) -> int:
        """Bytes of table (the compiled core's layout: 16 per slot)."""
        return 16 * self._nslots

    def __len__(self) -> int:
        return self._count

    def _rel(self, now: Any) -> int:
        """`now` (or a clock reading) -> time relative to the base, saturated."""
        if now is None:
            clock = self._clock_ns
            now = time.monotonic_ns() if clock is None else as_i64(clock(), "clock_ns()")
        else:
            now = as_i64(now, "now")
        return rel_time(now, self._base, _K_REL_MIN, self._rel_max)

    def _home(self, h: int) -> int:
        return (((h & _M64) >> 32) * self._nslots) >> 32

    def _acquire(self, h: int, cost: int, now: int) -> bool:
        keys, words, nslots = self._keys, self._words, self._nslots
        empty = victim = -1
        best_tat = _INT64_MAX
        evictable = self._tau - self._interval
        i = self._home(h)
        for _ in range(WINDOW):
            k = keys[i]
            if k == h:
                w = words[i]
                tat = max(w >> 4, now)
                if tat - now > self._tau - cost:
                    return False
                words[i] = ((tat + cost) << 4) | (w & _GEN)
                return True
            if k == 0:
                if empty < 0:
                    empty = i
            else:
                tat = words[i] >> 4
                if tat - now <= evictable and tat < best_tat:
                    best_tat, victim = tat, i
            i += 1
            if i == nslots:
                i = 0
        # not in its window: take a slot (the first request of a new key always fits)
        if empty >= 0 and (victim < 0 or self._count < self._max_keys):
            slot = empty
            self._count += 1
        elif victim >= 0:
            slot = victim
        else:
            return False          # every slot in the window holds a key that is still limited
        keys[slot] = h
        words[slot] = ((now + cost) << 4) | ((words[slot] + 1) & _GEN)
        if self._idle > 0:
            start, self._hand = self._hand, self._hand + _SWEEP
            for j in range(_SWEEP):
                self._expire((start + j) % nslots, now - self._idle)
        return True

    def _expire(self, i: int, idle_before: int) -> bool:
        if self._keys[i] == 0 or (self._words[i] >> 4) > idle_before:
            return False
        self._keys[i] = 0
        self._words[i] = (self._words[i] + 1) & _GEN
        self._count -= 1
        return True

    def _cost(self, n: Any) -> int:
        return check_n(n, self._capacity) * self._interval

    def key_hash(self, key: object) -> int:
        """The table's 64-bit hash of `key` as an unsigned int (same in the compiled core, stable across processes)."""
        self._lock
        return _hash(key) & _M64

    def try_acquire(self, key: object, n: int = 1, now: int | None = None) -> bool:
        """Take n tokens from key's bucket if they are available now (a new key starts full)."""
        self._lock
        h = _hash(key)
        cost = self._cost(n)
        with self._lock:
            return self._acquire(h, cost, self._rel(now))   # the clock is read inside the decision

    def try_acquire_many(self, keys: Any, n: int = 1, now: int | None = None) -> Any:
        """Decide int64 keys in order (a duplicate consumes in turn); returns a numpy bool array."""
        self._lock
        arr = _as_keys(keys)
        import numpy

        cost = self._cost(n)
        out = numpy.empty(len(arr), dtype=numpy.bool_)
        acquire = self._acquire
        with self._lock:
            t = self._rel(now)
            for idx, k in enumerate(arr.tolist()):
                out[idx] = acquire(_hash_int(k), cost, t)
        return out

    def wait_ns(self, key: object, n: int = 1, now: int | None = None) -> int:
        """ns until key's bucket has n tokens (0 = now; an unknown key is full); claims nothing."""
        self._lock
        h = _hash(key)
        cost = self._cost(n)
        t = self._rel(now)
        i = self._home(h)
        for _ in range(WINDOW):
            if self._keys[i] == h:
                return max(0, max(self._words[i] >> 4, t) + cost - t - self._tau)
            i = (i + 1) % self._nslots
        return 0

    def purge(self, now: int | None = None) -> int:
        """Remove every refilled key idle for at least idle_ns; returns how many were removed."""
        self._lock
        t = self._rel(now)
        with self._lock:
            return sum(self._expire(i, t - self._idle) for i in range(self._nslots))

    def reset(self) -> None:
        """Forget every key."""
        with self._lock:
            for i in range(self._nslots):
                self._expire(i, _INT64_MAX)
            self._hand = 0

    def __repr__(self) -> str:
        if "_lock" not in self.__dict__:
            return f"<{type(self).__name__} (not initialised)>"
        return (f"KeyedGCRA(rate={self._rate!r}, capacity={self._capacity!r}, max_keys={self._max_keys!r}, "
                f"idle_ns={self._idle!r})")


def _as_keys(keys: Any) -> memoryview:
    """keys -> a 1-d C-contiguous int64 buffer (the compiled core's checks and messages)."""
    if keys is None:
        raise TypeError("keys must be a contiguous int64 array, got None")
    try:
        mv = memoryview(keys)
    except TypeError:
        raise TypeError(f"keys must be a contiguous int64 array, got {type(keys).__name__}") from None
    if mv.format not in ("q", "l", "=q", "<q", "@q") or mv.itemsize != 8 or mv.ndim != 1 or not mv.c_contiguous:
        raise ValueError(f"keys must be a 1-d contiguous int64 array, got format {mv.format!r}, ndim {mv.ndim}")
    return mv.cast("B").cast("q") if mv.format != "q" else mv
