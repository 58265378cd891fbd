"""Pure-Python twin of buttress._core.window: the spec and the fallback."""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

from .._params import check_int
from .gcra import as_i64
from .state import Uninit

__all__ = ["CountWindow", "TimeWindow", "COUNT_WINDOW_MAX"]

COUNT_WINDOW_MAX = 30000
# time-window epochs (see _core/bt_window.pxd): a word is (epoch: 64 - K bits | count: K bits) with
# K = clamp(width_ns.bit_length(), 16, 28); epochs are relative to a base epoch, clamped to
# +-(2**(63 - K) - 1); the base is 0 when every int64 reading has an exact epoch (width >= EXACT_WIDTH),
# else the epoch of the first reading; counts saturate at 2**K - 1
EXACT_WIDTH = 1 << 28


def count_bits(width_ns: int) -> int:
    return max(16, min(28, width_ns.bit_length()))


class CountWindow(Uninit):
    """The last `size` recorded outcomes; snapshot -> (calls, failures, slow, failed_slow)."""

    def __init__(self, size: int) -> None:
        self._init_once()
        self.size = check_int("size", size, minimum=1, maximum=COUNT_WINDOW_MAX)
        self._ring: deque[tuple[bool, bool]] = deque(maxlen=self.size)
        self._calls = self._failures = self._slow = self._failed_slow = self._recorded = 0
        self._lock = threading.Lock()

    def record(self, failed: bool, slow: bool = False) -> None:
        """Record one outcome; the oldest drops out once N are recorded."""
        self._lock
        failed, slow = bool(failed), bool(slow)
        with self._lock:
            if len(self._ring) == self.size:
                self._apply(*self._ring[0], -1)
            self._ring.append((failed, slow))
            self._apply(failed, slow, 1)
            self._recorded += 1

    def _apply(self, failed: bool, slow: bool, d: int) -> None:
        self._calls += d
        self._failures += d * failed
        self._slow += d * slow
        self._failed_slow += d * (failed and slow)

    def snapshot(self) -> tuple[int, int, int, int]:
        """(calls, failures, slow, failed_slow) over the last min(N, recorded) outcomes."""
        with self._lock:
            return (self._calls, self._failures, self._slow, self._failed_slow)

    @property
    def recorded(self) -> int:
        """Outcomes recorded since creation or reset."""
        return self._recorded

    def reset(self) -> None:
        """Empty the window."""
        with self._lock:
            self._ring.clear()
            self._calls = self._failures = self._slow = self._failed_slow = self._recorded = 0

    def __repr__(self) -> str:
        if "_lock" not in self.__dict__:
            return f"<{type(self).__name__} (not initialised)>"
        return f"CountWindow(size={self.size})"


class TimeWindow(Uninit):
    """`nbuckets` buckets of `width_ns`, aligned to the clock: bucket = floor(now / width_ns).
    The window at now is buckets current-N+1 .. current."""

    def __init__(self, nbuckets: int, width_ns: int = 1_000_000_000,
                 clock_ns: Callable[[], int] | None = None) -> None:
        self._init_once()
        self.nbuckets = check_int("nbuckets", nbuckets, minimum=1, maximum=1 << 20)
        self.width_ns = check_int("width_ns", width_ns, minimum=1)
        if clock_ns is not None and not callable(clock_ns):
            raise TypeError(f"clock_ns must be a callable returning int ns or None, got {clock_ns!r}")
        self._base: int | None = 0 if self.width_ns >= EXACT_WIDTH else None   # None: the first reading's
        k = count_bits(self.width_ns)
        self._emax, self._cmax = (1 << (63 - k)) - 1, (1 << k) - 1
        self._clock_ns = clock_ns or time.monotonic_ns
        self._epochs = [-(1 << 62)] * self.nbuckets
        self._counts = [[0, 0, 0, 0] for _ in range(self.nbuckets)]
        self._lock = threading.Lock()

    def _epoch(self, now: int | None) -> int:
        t = as_i64(self._clock_ns(), "clock_ns()") if now is None else as_i64(now, "now")
        q = t // self.width_ns
        with self._lock:
            if self._base is None or self._base == -(1 << 63):    # (INT64_MIN is the core's "unset")
                self._base = q
            base = self._base
        return max(-self._emax, min(self._emax, q - base))

    def record(self, failed: bool, slow: bool = False, now: int | None = None) -> None:
        """Record one outcome in the bucket of now."""
        self._lock
        failed, slow = bool(failed), bool(slow)
        epoch = self._epoch(now)
        with self._lock:
            i = epoch % self.nbuckets
            # a bucket holding an older epoch is stale: reset it; a newer one (late writer) is counted into
            if self._epochs[i] < epoch:
                self._epochs[i] = epoch
                self._counts[i] = [0, 0, 0, 0]
            c = self._counts[i]
            for j, hit in enumerate((True, failed, slow, failed and slow)):
                if hit and c[j] < self._cmax:
                    c[j] += 1

    def snapshot(self, now: int | None = None) -> tuple[int, int, int, int]:
        """(calls, failures, slow, failed_slow) in the buckets of (now - N*width, now]."""
        self._lock
        epoch = self._epoch(now)
        total = [0, 0, 0, 0]
        with self._lock:
            for e, c in zip(self._epochs, self._counts):
                if epoch - self.nbuckets < e <= epoch:
                    for j in range(4):
                        total[j] += c[j]
        return (total[0], total[1], total[2], total[3])

    def reset(self) -> None:
        """Empty the window."""
        with self._lock:
            self._epochs = [-(1 << 62)] * self.nbuckets
            self._counts = [[0, 0, 0, 0] for _ in range(self.nbuckets)]

    def __repr__(self) -> str:
        if "_lock" not in self.__dict__:
            return f"<{type(self).__name__} (not initialised)>"
        return f"TimeWindow(nbuckets={self.nbuckets}, width_ns={self.width_ns})"
