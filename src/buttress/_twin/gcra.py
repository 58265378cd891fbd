"""Pure-Python twin of buttress._core.gcra: the spec and the fallback."""
from __future__ import annotations

import threading
import time
from typing import Callable

from .._params import check_n, emission_interval_ns

__all__ = ["GCRA"]

_INT64_MAX = (1 << 63) - 1


class GCRA:
    """GCRA: a bucket of `capacity` tokens refilled at `rate` per second, kept as one
    "theoretical arrival time" (TAT). A request for n tokens at `now` is admitted when
    max(TAT, now) + n * interval - now <= capacity * interval."""

    def __init__(self, rate: float, capacity: int, clock_ns: Callable[[], int] | None = None) -> None:
        r, cap, interval = emission_interval_ns(rate, capacity)
        if clock_ns is not None and not callable(clock_ns):
            raise TypeError(f"clock_ns must be a callable returning int ns or None, got {clock_ns!r}")
        self.rate = r
        self.capacity = cap
        self.interval_ns = interval
        self._tau = interval * cap
        self._clock_ns = clock_ns or time.monotonic_ns
        self._tat = 0
        self._admitted = self._rejected = 0      # decisions, for metrics
        self._lock = threading.Lock()

    def _now(self, now: int) -> int:
        return now if now >= 0 else self._clock_ns()

    def try_acquire(self, n: int = 1, now: int = -1) -> bool:
        """Take n tokens if they are available now."""
        return self.reserve(n, now, 0) == 0

    def reserve(self, n: int = 1, now: int = -1, max_wait_ns: int = _INT64_MAX) -> int:
        """Claim n tokens now if the wait is <= max_wait_ns; return that wait in ns, or -1 (nothing claimed)."""
        check_n(n, self.capacity)
        now = self._now(now)
        with self._lock:
            new_tat = max(self._tat, now) + n * self.interval_ns
            wait = max(0, new_tat - now - self._tau)
            if wait > max_wait_ns:
                self._rejected += 1
                return -1
            self._tat = new_tat
            self._admitted += 1
            return wait

    def wait_ns(self, n: int = 1, now: int = -1) -> int:
        """ns until n tokens would be available (0 = now); claims nothing."""
        check_n(n, self.capacity)
        now = self._now(now)
        return max(0, max(self._tat, now) + n * self.interval_ns - now - self._tau)

    def available(self, now: int = -1) -> int:
        """Whole tokens available at now."""
        now = self._now(now)
        return (self._tau - max(0, self._tat - now)) // self.interval_ns

    def refund(self, n: int = 1) -> None:
        """Give back n tokens claimed earlier and not used."""
        check_n(n, self.capacity)
        with self._lock:
            self._tat -= n * self.interval_ns

    def counts(self) -> tuple[int, int]:
        """(admitted, rejected) decisions since creation or reset()."""
        return self._admitted, self._rejected

    def reset(self) -> None:
        """Full bucket, counters back to zero."""
        with self._lock:
            self._tat = 0
            self._admitted = self._rejected = 0

    def __repr__(self) -> str:
        return f"GCRA(rate={self.rate!r}, capacity={self.capacity!r})"
