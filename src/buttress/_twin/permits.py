"""Pure-Python twin of buttress._core.permits: the spec and the fallback."""
from __future__ import annotations

import threading
from typing import Any

from .._params import check_int

__all__ = ["Permits"]

_MAX = 1 << 40


def _uninit(obj: object) -> RuntimeError:
    return RuntimeError(f"{type(obj).__name__} is not initialised: its __init__ was not called "
                        f"(a subclass must call super().__init__())")


class Permits:
    """A permit counter: permits in use against a resizable maximum.

    n is an int in [1, 2**40]; a release of more than is held is refused (in_use never goes below 0, so
    available never rises above max_permits). An object whose __init__ never ran (``Permits.__new__``,
    a subclass that skips ``super().__init__()``) has max_permits 0 and raises RuntimeError.
    Waking waiters (the facade's "release, then look for waiters" against "queue, then look for a
    permit"): both the release and a refused try take `_lock`, which orders them like the compiled
    core's fences do. close() stores the maximum negated (every try refused until reopen()).
    """

    _limit = 0                      # class defaults: what an uninitialised object reads
    _in_use = 0
    _lock: Any = None

    def __init__(self, max_permits: int) -> None:
        limit = check_int("max_permits", max_permits, minimum=1, maximum=_MAX)
        if self._lock is not None:
            raise RuntimeError(f"{type(self).__name__} is already initialised")
        self._lock = threading.Lock()
        self._in_use = 0
        self._limit = limit

    def _locked(self) -> Any:
        lock = self._lock
        if lock is None:
            raise _uninit(self)
        return lock

    def try_acquire(self, n: int = 1) -> bool:
        """Take n permits if in_use + n <= max_permits."""
        n = check_int("n", n, minimum=1, maximum=_MAX)
        with self._locked():
            if self._in_use + n > self._limit:
                return False
            self._in_use += n
            return True

    def try_acquire_within(self, limit: int, n: int = 1) -> bool:
        """Take n permits if in_use + n <= min(limit, max_permits): a caller-chosen share of the maximum."""
        n = check_int("n", n, minimum=1, maximum=_MAX)
        limit = check_int("limit", limit, minimum=None)
        with self._locked():
            if self._in_use + n > min(limit, self._limit):
                return False
            self._in_use += n
            return True

    def release(self, n: int = 1) -> None:
        """Return n permits; ValueError (nothing changed) if fewer are held."""
        n = check_int("n", n, minimum=1, maximum=_MAX)
        with self._locked():
            if self._in_use < n:
                raise ValueError(f"n={n} permits released but only {self._in_use} are held")
            self._in_use -= n

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def max_permits(self) -> int:
        return abs(self._limit)

    @property
    def closed(self) -> bool:
        """True between close() and reopen(): every acquisition is refused."""
        return self._limit < 0

    def close(self) -> None:
        """Refuse every acquisition until reopen() (holders release as usual). Idempotent."""
        with self._locked():
            self._limit = -abs(self._limit)

    def reopen(self) -> None:
        """Admit again after close(). Idempotent."""
        with self._locked():
            self._limit = abs(self._limit)

    @property
    def available(self) -> int:
        return max(0, self._limit - self._in_use)

    def resize(self, max_permits: int) -> None:
        """Change the maximum. Shrinking never strands holders: they release as usual and
        new permits are issued only once in_use is below the new maximum."""
        limit = check_int("max_permits", max_permits, minimum=1, maximum=_MAX)
        with self._locked():
            self._limit = -limit if self._limit < 0 else limit     # a closed counter stays closed

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_permits={self.max_permits}, in_use={self.in_use})"
