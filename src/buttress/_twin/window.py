"""Pure-Python twin of buttress._core.window: the spec and the fallback."""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

from .._params import check_int

__all__ = ["CountWindow", "TimeWindow", "COUNT_WINDOW_MAX"]

COUNT_WINDOW_MAX = 30000


class CountWindow:
    """The last `size` recorded outcomes; snapshot -> (calls, failures, slow, failed_slow)."""

    def __init__(self, size: int) -> None:
        self.size = check_int("size", size, minimum=1, maximum=COUNT_WINDOW_MAX)
        self._lock = threading.Lock()
        self.reset()

    def record(self, failed: bool, slow: bool = False) -> None:
        """Record one outcome; the oldest drops out once N are recorded."""
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
            self._ring: deque[tuple[bool, bool]] = deque(maxlen=self.size)
            self._calls = self._failures = self._slow = self._failed_slow = self._recorded = 0

    def __repr__(self) -> str:
        return f"CountWindow(size={self.size})"


class TimeWindow:
    """`nbuckets` buckets of `width_ns`, aligned to the clock: bucket = now // width_ns.
    The window at now is buckets current-N+1 .. current."""

    def __init__(self, nbuckets: int, width_ns: int = 1_000_000_000,
                 clock_ns: Callable[[], int] | None = None) -> None:
        self.nbuckets = check_int("nbuckets", nbuckets, minimum=1, maximum=1 << 20)
        self.width_ns = check_int("width_ns", width_ns, minimum=1)
        if clock_ns is not None and not callable(clock_ns):
            raise TypeError(f"clock_ns must be a callable returning int ns or None, got {clock_ns!r}")
        self._clock_ns = clock_ns or time.monotonic_ns
        self._lock = threading.Lock()
        self.reset()

    def _epoch(self, now: int) -> int:
        return (now if now >= 0 else self._clock_ns()) // self.width_ns

    def record(self, failed: bool, slow: bool = False, now: int = -1) -> None:
        """Record one outcome in the bucket of now."""
        epoch = self._epoch(now)
        with self._lock:
            i = epoch % self.nbuckets
            # a bucket holding an older epoch is stale: reset it; a newer one (late writer) is counted into
            if self._epochs[i] < epoch:
                self._epochs[i] = epoch
                self._counts[i] = [0, 0, 0, 0]
            c = self._counts[i]
            c[0] += 1
            c[1] += bool(failed)
            c[2] += bool(slow)
            c[3] += bool(failed and slow)

    def snapshot(self, now: int = -1) -> tuple[int, int, int, int]:
        """(calls, failures, slow, failed_slow) in the buckets of (now - N*width, now]."""
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
        return f"TimeWindow(nbuckets={self.nbuckets}, width_ns={self.width_ns})"
