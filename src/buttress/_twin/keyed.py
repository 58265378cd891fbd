"""Pure-Python twin of buttress._core.keyed: the spec and the fallback.

Same table, same hash (SipHash-1-3 under the table's seed), same slot choices as the compiled core
(see its docstring); here one lock makes every decision atomic: a threading.Lock, or the store's
`locker` when the words live in a store (an fcntl byte lock plus a threading.Lock).
"""
from __future__ import annotations

import os
import threading
import time
from operator import index as _index
from typing import Any, Callable

from .._params import check_int, check_n, emission_interval_ns
from .gcra import _show, _Uninit, as_i64, rel_time, track_bound, words_view

__all__ = ["KeyedGCRA", "WINDOW", "MAX_KEYS", "MAX_TAU_NS", "MAX_NOW_NS", "HEADER_WORDS"]

HEADER_WORDS = 16   # count, hand, base, seed (2), interval, tau, admitted, rejected, idle, nslots, max_keys
_H_COUNT, _H_HAND, _H_BASE, _H_K0, _H_K1, _H_INTERVAL, _H_TAU, _H_ADMITTED, _H_REJECTED = range(9)

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


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _M64


def _siphash13(k0: int, k1: int, data: bytes) -> int:
    """SipHash-1-3 of `data` under the 128-bit key (k0, k1) (unsigned 64-bit words)."""
    v0 = 0x736f6d6570736575 ^ k0
    v1 = 0x646f72616e646f6d ^ k1
    v2 = 0x6c7967656e657261 ^ k0
    v3 = 0x7465646279746573 ^ k1

    def rnd(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
        v0 = (v0 + v1) & _M64
        v1 = _rotl(v1, 13) ^ v0
        v0 = _rotl(v0, 32)
        v2 = (v2 + v3) & _M64
        v3 = _rotl(v3, 16) ^ v2
        v0 = (v0 + v3) & _M64
        v3 = _rotl(v3, 21) ^ v0
        v2 = (v2 + v1) & _M64
        v1 = _rotl(v1, 17) ^ v2
        v2 = _rotl(v2, 32)
        return v0, v1, v2, v3

    n = len(data)
    end = n & ~7
    for i in range(0, end, 8):
        m = int.from_bytes(data[i:i + 8], "little")
        v3 ^= m
        v0, v1, v2, v3 = rnd(v0, v1, v2, v3)
        v0 ^= m
    b = ((n & 0xFF) << 56) | int.from_bytes(data[end:], "little")
    v3 ^= b
    v0, v1, v2, v3 = rnd(v0, v1, v2, v3)
    v0 ^= b
    v2 ^= 0xFF
    for _ in range(3):
        v0, v1, v2, v3 = rnd(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


_TAG_INT = 0x9e3779b97f4a7c15       # int, str and bytes keys hash under different keys
_TAG_STR = 0x5354520000000000


def _signed(h: int) -> int:
    h = h or 1
    return h - (1 << 64) if h >> 63 else h


def _hash_int(k0: int, k1: int, k: int) -> int:
    return _signed(_siphash13(k0 ^ _TAG_INT, k1, (k & _M64).to_bytes(8, "little")))


def _hash(k0: int, k1: int, key: object) -> int:
    """int (int64 range), str (UTF-8) or bytes -> nonzero signed 64-bit hash; str and bytes differ."""
    if type(key) is not int:
        if isinstance(key, str):
            return _signed(_siphash13(k0 ^ _TAG_STR, k1, key.encode("utf-8")))
        if isinstance(key, bytes):
            return _signed(_siphash13(k0, k1, key))
        try:
            key = _index(key)  # type: ignore[arg-type]  # any object: operator.index is the check
        except TypeError:
            raise TypeError(f"key must be an int, str or bytes, got {key!r} ({type(key).__name__})") from None
    if not -(1 << 63) <= key < (1 << 63):
        raise ValueError(f"key must be an int in the int64 range (or a str / bytes), got {_show(key)}")
    return _hash_int(k0, k1, key)


def _seed_words(seed: Any) -> tuple[int, int]:
    """seed (16 bytes, or None for a fresh secret) -> (k0, k1) as signed int64 words."""
    if seed is None:
        seed = os.urandom(16)
    elif not isinstance(seed, (bytes, bytearray)):
        raise TypeError(f"seed must be 16 bytes or None (a fresh secret from os.urandom), got "
                        f"{type(seed).__name__}")
    if len(seed) != 16:
        raise ValueError(f"seed must be 16 bytes, got {len(seed)} bytes")
    return int.from_bytes(seed[:8], "little", signed=True), int.from_bytes(seed[8:], "little", signed=True)


def _settings(rate: Any, capacity: Any, max_keys: Any, idle_ns: Any) -> tuple[float, int, int, int, int, int]:
    r, cap, interval = emission_interval_ns(rate, capacity)
    if interval * cap > MAX_TAU_NS:
        raise ValueError(f"capacity / rate must be at most {MAX_TAU_NS / 1e9:.0f} s for a keyed limiter, "
                         f"got capacity={capacity!r} at rate={rate!r}")
    mk = check_int("max_keys", max_keys, minimum=1, maximum=MAX_KEYS)
    idle = check_int("idle_ns", idle_ns, minimum=0, maximum=MAX_NOW_NS)
    return r, cap, interval, mk, idle, max(2 * mk, WINDOW)


def _check_header(h: Any, interval: int, tau: int, idle: int, nslots: int, mk: int) -> None:
    have = (h[5], h[6], h[9], h[10], h[11])
    want = (interval, tau, idle, nslots, mk)
    if have != want:
        raise ValueError(f"words hold a keyed table with (interval, tau, idle_ns, nslots, max_keys) = {have}, "
                         f"this one has {want} (words not written by KeyedGCRA.init_words for these settings)")


class KeyedGCRA(_Uninit):
    """One GCRA per key in one fixed open-addressing table of 2 * max_keys (hash, tat<<4|gen) slots."""

    def __init__(self, rate: float, capacity: int, max_keys: int, idle_ns: int = 0,
                 clock_ns: Callable[[], int] | None = None, seed: bytes | None = None, words: Any = None,
                 locker: Any = None) -> None:
        if "_lock" in self.__dict__:
            raise RuntimeError(f"{type(self).__name__} is already initialised; create a new one instead")
        r, cap, interval, mk, idle, nslots = _settings(rate, capacity, max_keys, idle_ns)
        if clock_ns is not None and not callable(clock_ns):
            raise TypeError(f"clock_ns must be a callable returning int ns or None, got {clock_ns!r}")
        nwords = HEADER_WORDS + 2 * nslots
        if words is None:
            k0, k1 = _seed_words(seed)
            base = 0 if clock_ns is None else as_i64(clock_ns(), "clock_ns()")
            w = memoryview(bytearray(8 * nwords)).cast("q")
            for i, v in ((2, base), (3, k0), (4, k1), (5, interval), (6, interval * cap), (9, idle), (10, nslots),
                         (11, mk)):
                w[i] = v
        else:
            if seed is not None:
                raise ValueError("seed must be None when words are given: the table's seed lives in its words")
            w = words_view(words, nwords, "this table").cast("q")
            _check_header(w, interval, interval * cap, idle, nslots, mk)
        self._h = w[:HEADER_WORDS]
        self._keys = w[HEADER_WORDS::2]
        self._words = w[HEADER_WORDS + 1::2]
        self._base = w[_H_BASE]
        self._k0, self._k1 = w[_H_K0] & _M64, w[_H_K1] & _M64
        self._nslots = nslots
        self._max_keys = mk
        self._rate = r
        self._capacity = cap
        self._interval = interval
        self._idle = idle
        self._tau = interval * cap
        self._rel_max = _K_TAT_MAX - self._tau
        self._clock_ns = clock_ns
        self._lock = threading.Lock() if locker is None else locker
        if words is not None:
            track_bound(self, locker)

    @staticmethod
    def nwords(max_keys: int) -> int:
        """int64 words of a table of max_keys keys in a store (header + 2 per slot)."""
        mk = check_int("max_keys", max_keys, minimum=1, maximum=MAX_KEYS)
        return HEADER_WORDS + 2 * max(2 * mk, WINDOW)

    @staticmethod
    def init_words(words: Any, rate: float, capacity: int, max_keys: int, idle_ns: int = 0, base_ns: int = 0,
                   seed: bytes | None = None) -> None:
        """Write the header of a new shared table (every key unknown; seed None = a fresh secret)."""
        r, cap, interval, mk, idle, nslots = _settings(rate, capacity, max_keys, idle_ns)
        b = as_i64(base_ns, "base_ns")
        k0, k1 = _seed_words(seed)
        mv = words_view(words, HEADER_WORDS, "this table").cast("q")
        for i, v in enumerate((0, 0, b, k0, k1, interval, interval * cap, 0, 0, idle, nslots, mk, 0, 0, 0, 0)):
            mv[i] = v

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
        self._live()
        return self._h[_H_COUNT]

    def _rel(self, now: Any) -> int:
        """`now` (or a clock reading) -> time relative to the base, saturated."""
        if now is None:
            clock = self._clock_ns
            now = time.monotonic_ns() if clock is None else as_i64(clock(), "clock_ns()")
        else:
            now = as_i64(now, "now")
        return rel_time(now, self._base, _K_REL_MIN, self._rel_max)

    def _home(self, h: int) -> int:
        if self._nslots <= WINDOW:
            return 0          # one window holds the whole table: placement does not depend on the hash
        return (((h & _M64) >> 32) * self._nslots) >> 32

    def _acquire(self, h: int, cost: int, now: int) -> tuple[bool, int, int]:
        """(admitted, slot charged or -1 when admitted untracked, its new word)."""
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
                    return False, -1, 0
                words[i] = nw = ((tat + cost) << 4) | (w & _GEN)
                return True, i, nw
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
        if empty >= 0 and (victim < 0 or self._h[_H_COUNT] < self._max_keys):
            slot = empty
            self._h[_H_COUNT] += 1
        elif victim >= 0:
            slot = victim
        else:
            return True, -1, 0    # every slot holds a still-limited key: admitted untracked, never locked out
        keys[slot] = h
        words[slot] = nw = ((now + cost) << 4) | ((words[slot] + 1) & _GEN)
        if self._idle > 0:
            start = self._h[_H_HAND]
            self._h[_H_HAND] = start + _SWEEP
            for j in range(_SWEEP):
                self._expire((start + j) % nslots, now - self._idle)
        return True, slot, nw

    def _expire(self, i: int, idle_before: int) -> bool:
        if self._keys[i] == 0 or (self._words[i] >> 4) > idle_before:
            return False
        self._keys[i] = 0
        self._words[i] = (self._words[i] + 1) & _GEN
        self._h[_H_COUNT] -= 1
        return True

    def _cost(self, n: Any) -> int:
        return check_n(n, self._capacity) * self._interval

    def _count(self, ok: bool) -> bool:
        self._h[_H_ADMITTED if ok else _H_REJECTED] += 1
        return ok

    def key_hash(self, key: object) -> int:
        """The table's 64-bit hash of `key` as an unsigned int: SipHash-1-3 under the table's secret seed
        (the compiled core computes the same for the same seed; tables with other seeds disagree)."""
        self._lock
        return _hash(self._k0, self._k1, key) & _M64

    def try_acquire(self, key: object, n: int = 1, now: int | None = None) -> bool:
        """Take n tokens from key's bucket if they are available now (a new key starts full)."""
        self._live()
        h = _hash(self._k0, self._k1, key)
        cost = self._cost(n)
        with self._lock:
            return self._count(self._acquire(h, cost, self._rel(now))[0])   # the clock is read inside

    def claim(self, key: object, n: int = 1, now: int | None = None) -> int:
        """try_acquire that returns a receipt for refund() (an int > 0), or 0 when refused."""
        self._live()
        h = _hash(self._k0, self._k1, key)
        k = check_n(n, self._capacity)
        with self._lock:
            ok, slot, word = self._acquire(h, k * self._interval, self._rel(now))
            if not self._count(ok):
                return 0
        return ((slot + 1) << 96 | k << 64 | (word & _M64)) if slot >= 0 else k << 64

    def refund(self, receipt: int) -> bool:
        """Give back the tokens of the claim that returned `receipt`, only if its key is still in that
        slot and no later claim has charged it (one CAS); returns whether they were given back. False once the store closed in this process (a call admitted before
        the close keeps its own result or exception: nothing is given back after the close)."""
        self._lock
        if type(receipt) is not int:
            if isinstance(receipt, bool) or not hasattr(type(receipt), "__index__"):
                raise TypeError(f"receipt must be an int, got {receipt!r} ({type(receipt).__name__})")
            receipt = _index(receipt)
        if receipt <= 0:
            raise ValueError(f"receipt must be a receipt returned by claim(), got {_show(receipt)}")
        slot1, k, word = receipt >> 96, (receipt >> 64) & 0xFFFFFFFF, receipt & _M64
        if receipt >> 128 or not (1 <= k <= self._capacity and 0 <= slot1 <= self._nslots):
            raise ValueError(f"receipt must be a receipt returned by claim(), got {_show(receipt)}")
        if slot1 == 0:
            return False          # admitted untracked: nothing was charged
        w = word - (1 << 64) if word >> 63 else word
        if w == -(1 << 63) or (w >> 4) - k * self._interval < _K_REL_MIN:
            raise ValueError(f"receipt must be a receipt returned by claim(), got {_show(receipt)}")
        if self._closed is not None:
            return False
        try:
            with self._lock:
                if self._words[slot1 - 1] != w:
                    return False
                self._words[slot1 - 1] = (((w >> 4) - k * self._interval) << 4) | (w & _GEN)
                return True
        except RuntimeError:
            if self._closed is not None:
                return False    # the store refused its lock: it closed after the check (this object first)
            raise

    def counts(self) -> tuple[int, int]:
        """(admitted, rejected) decisions since creation or reset() (try_acquire_many counts each key)."""
        self._live()
        return self._h[_H_ADMITTED], self._h[_H_REJECTED]

    def try_acquire_many(self, keys: Any, n: int = 1, now: int | None = None) -> Any:
        """Decide int64 keys in order (a duplicate consumes in turn); returns a numpy bool array."""
        self._live()
        arr = _as_keys(keys)
        import numpy

        cost = self._cost(n)
        out = numpy.empty(len(arr), dtype=numpy.bool_)
        acquire = self._acquire
        k0, k1 = self._k0, self._k1
        with self._lock:
            t = self._rel(now)
            for idx, k in enumerate(arr.tolist()):
                out[idx] = acquire(_hash_int(k0, k1, k), cost, t)[0]
            ok = int(out.sum())
            self._h[_H_ADMITTED] += ok
            self._h[_H_REJECTED] += len(out) - ok
        return out

    def wait_ns(self, key: object, n: int = 1, now: int | None = None) -> int:
        """ns until key's bucket has n tokens (0 = now; an unknown key is full); claims nothing."""
        self._live()
        h = _hash(self._k0, self._k1, key)
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
        self._live()
        t = self._rel(now)
        with self._lock:
            return sum(self._expire(i, t - self._idle) for i in range(self._nslots))

    def reset(self) -> None:
        """Forget every key; counts back to zero."""
        self._live()
        with self._lock:
            for i in range(self._nslots):
                self._expire(i, _INT64_MAX)
            self._h[_H_HAND] = 0
            self._h[_H_ADMITTED] = self._h[_H_REJECTED] = 0

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
