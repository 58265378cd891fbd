"""Pure-Python twin of buttress._core.wlimit: the spec and the fallback.

A fixed or sliding window counter whose whole state is ONE int64 word, so that rolling into a new window
and counting into it are one compare-and-swap (DESIGN §1) and the word can live in a store (a
shared-memory segment) where every process decides on it:

    word = used:1 | idx:23 | prev:20 | curr:20      (bits 63, 40-62, 20-39, 0-19)

idx is the window number (floor(now / window), windows aligned to the clock's multiples of the window,
as the process-local window limiters and `limits`) modulo 2**23; prev and curr the counts of windows
idx - 1 and idx; `used` is set by the first count (a fresh word reads as empty).

w[7], `latest`, is the latest window any decision used (a monotone maximum; int64 min before the
first): time never runs backwards inside the counter, as in the process-local limiters. A decision
reads the word, then latest, then the clock (a writer raises latest before its CAS, so the word's window
is never after latest). A reading older than latest (a stale clock reading in a slow process, or an
explicit `now`) decides at the very start of latest's window, the most conservative choice. The word's
full window number is the latest one <= latest that is idx modulo 2**23, so a reader in window cur >=
latest sees the word as current (cur == it), one window on (cur == it + 1: prev = curr, curr = 0), or
older (0, 0) -- exactly, however long the word was idle. (It used to guess from idx alone: a word up to
1024 windows "ahead" modulo 2**23 was taken for a stale reader's, so a word idle 2**23 - 1 windows
refused with its old counts for up to 1024 windows.) Only when a decision raised latest by a multiple of
2**23 windows and has not yet written the word does a reader see the old counts as current: they can
only refuse more, never admit more, and only until that decision lands.

Words of a counter (WORDS = 8): w[0] the packed word, w[1] window ns, w[2] limit, w[3] sliding,
w[4] admitted, w[5] rejected, w[6] generation (reset()), w[7] latest. The compiled core CASes w[0] (and
raises w[7] by CAS); this twin runs the same steps under a lock (a threading.Lock, or the store's locker).

Fixed window: admit n when curr + n <= limit. Sliding window (as `limits`' sliding-window counter):
admit n when prev * (window - elapsed) + (curr + n) * window <= limit * window, in exact integers.
"""
from __future__ import annotations

import numbers
import threading
import time
from operator import index as _index
from typing import Any, Callable

from .._params import check_bool, check_int, check_n, show
from .gcra import _show, _Uninit, as_i64, track_bound, words_view

__all__ = ["WindowCounter", "WORDS", "MAX_LIMIT"]

WORDS = 8
MAX_LIMIT = (1 << 20) - 1
MAX_WINDOW_NS = 1 << 62
_M20 = MAX_LIMIT
_M23 = (1 << 23) - 1
_USED = 1 << 63
_W, _WIDTH, _LIMIT, _SLIDING, _ADMITTED, _REJECTED, _GEN, _LATEST = range(8)
_NONE = -(1 << 63)    # latest before the first decision


def _unpack(word: int) -> tuple[int, int, int]:
    return (word >> 40) & _M23, (word >> 20) & _M20, word & _M20


def _pack(idx: int, prev: int, curr: int) -> int:
    return (((idx & _M23) << 40) | (prev << 20) | curr) - _USED      # bit 63 set: a negative int64


def check_count(n: object, limit: int) -> int:
    """n: an int in [1, limit]; the ValueError names `limit` (this counter's setting, and the window
    limiters'), so a facade can hand out the core's try_acquire as its own."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        check_n(n, limit)               # the TypeError naming n
    v: int = int(n)  # type: ignore[call-overload]  # an Integral
    if not 1 <= v <= limit:
        raise ValueError(f"n must be between 1 and limit={limit}, got {show(n)}")
    return v


def _settings(limit: Any, window_ns: Any, sliding: Any) -> tuple[int, int, bool]:
    lim = check_int("limit", limit, minimum=1, maximum=MAX_LIMIT)
    w = check_int("window_ns", window_ns, minimum=1, maximum=MAX_WINDOW_NS)
    return lim, w, check_bool("sliding", sliding)


def view(word: int, cur: int, latest: int) -> tuple[int, int, int]:
    """(idx, prev, curr) as a decision in window `cur` sees `word`, given `latest` (read after the word,
    so the word's window is <= latest <= cur)."""
    c = cur & _M23
    if word >= 0:                   # never counted into
        return c, 0, 0
    idx, prev, curr = _unpack(word)
    behind = cur - latest
    if behind >= 2:
        return c, 0, 0
    d = behind + ((latest - idx) & _M23)        # cur - the word's full window number
    if d == 0:
        return idx, prev, curr
    if d == 1:
        return c, curr, 0
    return c, 0, 0


def moment(t: int, width: int, latest: int) -> tuple[int, int]:
    """(window, ns into it) of a decision at reading t: a reading older than latest's window decides at
    the start of latest's window."""
    cur, e = divmod(t, width)
    if cur < latest:
        return latest, 0
    return cur, e


class WindowCounter(_Uninit):
    """At most `limit` per window of `window_ns` (fixed, or sliding when `sliding`), on one packed word."""

    def __init__(self, limit: int, window_ns: int, sliding: bool, clock_ns: Callable[[], int] | None = None,
                 words: Any = None, locker: Any = None) -> None:
        if "_lock" in self.__dict__:
            raise RuntimeError(f"{type(self).__name__} is already initialised; create a new one instead")
        lim, w, sl = _settings(limit, window_ns, sliding)
        if clock_ns is not None and not callable(clock_ns):
            raise TypeError(f"clock_ns must be a callable returning int ns or None, got {clock_ns!r}")
        if words is None:
            mv = memoryview(bytearray(8 * WORDS)).cast("q")
            mv[_WIDTH], mv[_LIMIT], mv[_SLIDING], mv[_LATEST] = w, lim, int(sl), _NONE
        else:
            mv = words_view(words, WORDS, "a window counter").cast("q")
            _check_words(mv, lim, w, sl)
        self._w = mv
        self._limit, self._width, self._sliding = lim, w, sl
        self._clock_ns = clock_ns
        self._lock = threading.Lock() if locker is None else locker
        if words is not None:
            track_bound(self, locker)

    @staticmethod
    def init_words(words: Any, limit: int, window_ns: int, sliding: bool) -> None:
        """Write the words of a new shared counter (every window empty)."""
        lim, w, sl = _settings(limit, window_ns, sliding)
        mv = words_view(words, WORDS, "a window counter").cast("q")
        for i, v in enumerate((0, w, lim, int(sl), 0, 0, 0, _NONE)):
            mv[i] = v

    limit = property(lambda self: self._limit)
    window_ns = property(lambda self: self._width)
    sliding = property(lambda self: self._sliding)

    def _now(self, now: Any) -> int:
        if now is None:
            clock = self._clock_ns
            return time.monotonic_ns() if clock is None else as_i64(clock(), "clock_ns()")
        return as_i64(now, "now")

    def _fits(self, prev: int, curr: int, n: int, e: int) -> bool:
        if self._sliding:
            return prev * (self._width - e) + (curr + n) * self._width <= self._limit * self._width
        return curr + n <= self._limit

    def claim(self, n: int = 1, now: int | None = None) -> int:
        """Count n in the current window if the limit allows it now: a receipt for unclaim() (an int > 0),
        or 0 when refused (nothing counted)."""
        self._live()
        k = check_count(n, self._limit)
        w = self._w
        with self._lock:
            word, latest = w[_W], w[_LATEST]
            cur, e = moment(self._now(now), self._width, latest)     # read inside the decision
            if cur > latest:
                w[_LATEST] = cur
            idx, prev, curr = view(word, cur, latest)
            if not self._fits(prev, curr, k, e):
                w[_REJECTED] += 1
                return 0
            w[_W] = _pack(idx, prev, curr + k)
            w[_ADMITTED] += 1
            return ((w[_GEN] & ((1 << 38) - 1)) << 24) | (idx << 1) | 1

    def try_acquire(self, n: int = 1, now: int | None = None) -> bool:
        """Count n in the current window if the limit allows it now."""
        return self.claim(n, now) != 0

    def unclaim(self, n: int, receipt: int) -> bool:
        """Take back the n counted by the claim that returned `receipt`, while its window is still the
        current or the previous one and no reset() came between; returns whether it was taken back. False once the store closed in this process (a call admitted before
        the close keeps its own result or exception: nothing is given back after the close)."""
        self._lock
        k = check_count(n, self._limit)
        if type(receipt) is not int:
            if isinstance(receipt, bool) or not hasattr(type(receipt), "__index__"):
                raise TypeError(f"receipt must be an int, got {receipt!r} ({type(receipt).__name__})")
            receipt = _index(receipt)
        if receipt <= 0 or not receipt & 1 or receipt >> 63:
            raise ValueError(f"receipt must be a receipt returned by claim(), got {_show(receipt)}")
        ridx, gen = (receipt >> 1) & _M23, receipt >> 24
        w = self._w
        if self._closed is not None:
            return False
        try:
            with self._lock:
                if gen != w[_GEN] & ((1 << 38) - 1):
                    return False                # counted before reset(): nothing of it is left
                word = w[_W]
                if word >= 0:
                    return False
                idx, prev, curr = _unpack(word)
                if idx == ridx and curr >= k:
                    w[_W] = _pack(idx, prev, curr - k)
                elif (idx - ridx) & _M23 == 1 and prev >= k:
                    w[_W] = _pack(idx, prev - k, curr)
                else:
                    return False
                return True
        except RuntimeError:
            if self._closed is not None:
                return False    # the store refused its lock: it closed after the check (this object first)
            raise

    def wait_ns(self, n: int = 1, now: int | None = None) -> int:
        """ns until n would be admitted (0 = now); claims nothing."""
        self._live()
        k = check_count(n, self._limit)
        word, latest = self._w[_W], self._w[_LATEST]
        cur, e = moment(self._now(now), self._width, latest)
        _, prev, curr = view(word, cur, latest)
        return window_wait(self._sliding, self._limit, self._width, prev, curr, k, e)

    def counts(self) -> tuple[int, int]:
        """(admitted, rejected) decisions since creation or reset()."""
        self._live()
        return self._w[_ADMITTED], self._w[_REJECTED]

    def reset(self) -> None:
        """Every window empty, counters back to zero; receipts of earlier claims are void."""
        self._live()
        with self._lock:
            self._w[_GEN] = (self._w[_GEN] + 1) & ((1 << 38) - 1)
            self._w[_W] = 0
            self._w[_ADMITTED] = self._w[_REJECTED] = 0

    def __repr__(self) -> str:
        if "_lock" not in self.__dict__:
            return f"<{type(self).__name__} (not initialised)>"
        return (f"WindowCounter(limit={self._limit!r}, window_ns={self._width!r}, "
                f"sliding={self._sliding!r})")


def window_wait(sliding: bool, limit: int, width: int, prev: int, curr: int, n: int, e: int) -> int:
    """ns until n fits, from counts (prev, curr) at e ns into the current window."""
    if not sliding:
        return 0 if curr + n <= limit else width - e

    def first_fit(prev: int, curr: int) -> int | None:
        room = (limit - curr - n) * width           # need prev * (width - x) <= room
        if room < 0:
            return None
        if prev == 0:
            return 0
        x = max(0, width - room // prev)
        return x if x < width else None

    first = first_fit(prev, curr)
    if first is not None:
        return max(0, first - e)
    first = first_fit(curr, 0)
    if first is not None:
        return width - e + first
    return 2 * width - e


def _check_words(mv: Any, limit: int, width: int, sliding: bool) -> None:
    have = (mv[_LIMIT], mv[_WIDTH], bool(mv[_SLIDING]))
    if have != (limit, width, sliding):
        raise ValueError(f"words hold a window counter with (limit, window_ns, sliding) = {have}, this one has "
                         f"{(limit, width, sliding)} (words not written by WindowCounter.init_words for "
                         f"these settings)")
