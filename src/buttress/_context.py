"""Per-task context shared by the patterns: the innermost deadline.

A `Timeout` (or a Retry's `deadline`) pushes an absolute deadline in the clock's ns; inner timeouts,
retry waits and limiter waits never exceed what remains. ContextVars make it per thread and per task.
"""
from __future__ import annotations

import contextvars
from typing import Any

from .clock import SYSTEM_CLOCK

__all__ = ["current_deadline_ns", "push_deadline", "pop_deadline", "remaining", "remaining_ns"]

# (deadline_ns, clock) of the innermost active deadline, or None
_DEADLINE: contextvars.ContextVar[tuple[int, Any] | None] = contextvars.ContextVar("buttress_deadline", default=None)


def current_deadline_ns() -> int | None:
    d = _DEADLINE.get()
    return None if d is None else d[0]


def push_deadline(deadline_ns: int, clock: Any = SYSTEM_CLOCK) -> contextvars.Token[tuple[int, Any] | None]:
    """Set the deadline to min(current, deadline_ns); returns a token for pop_deadline."""
    cur = _DEADLINE.get()
    if cur is not None and cur[0] <= deadline_ns:
        return _DEADLINE.set(cur)
    return _DEADLINE.set((deadline_ns, clock))


def pop_deadline(token: contextvars.Token[tuple[int, Any] | None]) -> None:
    _DEADLINE.reset(token)


def remaining_ns() -> int | None:
    """ns left before the innermost deadline (may be <= 0), or None when there is none."""
    d = _DEADLINE.get()
    if d is None:
        return None
    now: int = d[1].monotonic_ns()
    return d[0] - now


def remaining() -> float | None:
    """Seconds left before the innermost deadline (never negative), or None when there is none."""
    r = remaining_ns()
    return None if r is None else max(0.0, r / 1e9)
