"""Pure-Python twin of buttress._core.bucket: a GCRA that counts its decisions."""
from __future__ import annotations

from typing import Callable

from ._gcra_py import _INT64_MAX, GCRA

__all__ = ["Bucket"]


class Bucket(GCRA):
    """GCRA (see _gcra_py) plus admitted / rejected decision counters."""

    def __init__(self, rate: float, capacity: int, clock_ns: Callable[[], int] | None = None) -> None:
        super().__init__(rate, capacity, clock_ns)
        self._admitted = self._rejected = 0

    def reserve(self, n: int = 1, now: int = -1, max_wait_ns: int = _INT64_MAX) -> int:
        """Claim n tokens now if the wait is <= max_wait_ns; return that wait in ns, or -1 (nothing claimed)."""
        wait = super().reserve(n, now, max_wait_ns)
        with self._lock:
            if wait >= 0:
                self._admitted += 1
            else:
                self._rejected += 1
        return wait

    def counts(self) -> tuple[int, int]:
        """(admitted, rejected) decisions since creation or reset()."""
        return self._admitted, self._rejected

    def reset(self) -> None:
        """Full bucket, counters back to zero."""
        super().reset()
        with self._lock:
            self._admitted = self._rejected = 0

    def __repr__(self) -> str:
        return f"Bucket(rate={self.rate!r}, capacity={self.capacity!r})"
