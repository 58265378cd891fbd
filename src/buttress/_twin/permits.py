"""Pure-Python twin of buttress._core.permits: the spec and the fallback."""
from __future__ import annotations

import threading

from .._params import check_int

__all__ = ["Permits"]

_MAX = 1 << 40


class Permits:
    """A permit counter: permits in use against a resizable maximum."""

    def __init__(self, max_permits: int) -> None:
        self._limit = check_int("max_permits", max_permits, minimum=1, maximum=_MAX)
        self._in_use = 0
        self._lock = threading.Lock()

    def try_acquire(self, n: int = 1) -> bool:
        """Take n permits if in_use + n <= max_permits."""
        check_int("n", n, minimum=1, maximum=_MAX)
        with self._lock:
            if self._in_use + n > self._limit:
                return False
            self._in_use += n
            return True

    def try_acquire_within(self, limit: int, n: int = 1) -> bool:
        """Take n permits if in_use + n <= min(limit, max_permits): a caller-chosen share of the maximum."""
        check_int("n", n, minimum=1, maximum=_MAX)
        with self._lock:
            if self._in_use + n > min(limit, self._limit):
                return False
            self._in_use += n
            return True

    def release(self, n: int = 1) -> None:
        """Return n permits; ValueError (nothing changed) if fewer are held."""
        check_int("n", n, minimum=1, maximum=_MAX)
        with self._lock:
            if self._in_use < n:
                raise ValueError(f"n={n} permits released but only {self._in_use} are held")
            self._in_use -= n

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def max_permits(self) -> int:
        return self._limit

    @property
    def available(self) -> int:
        return max(0, self._limit - self._in_use)

    def resize(self, max_permits: int) -> None:
        """Change the maximum. Shrinking never strands holders: they release as usual and
        new permits are issued only once in_use is below the new maximum."""
        self._limit = check_int("max_permits", max_permits, minimum=1, maximum=_MAX)

    def __repr__(self) -> str:
        return f"Permits(max_permits={self.max_permits}, in_use={self.in_use})"
