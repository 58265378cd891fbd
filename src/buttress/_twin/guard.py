"""Pure-Python twin of buttress._core.guard: the spec and the fallback."""
from __future__ import annotations

import types
from contextvars import ContextVar
from typing import Any, Callable

__all__ = ["StageGuard", "StageBase", "AttemptGuard"]


class StageGuard:
    """fn guarded by acquire / refuse / release (see buttress._core.guard); binds like a function."""

    # slots: functools.wraps copies the wrapped callable's __dict__ into ours; slots always win over it
    __slots__ = ("_fn", "_acquire", "_refuse", "_release", "_pending", "_drain", "__dict__")

    def __init__(self, fn: Callable[..., Any], acquire: Callable[[], bool], refuse: Callable[[], Any],
                 release: Callable[[], Any] | None = None, pending: Any = None,
                 drain: Callable[[], Any] | None = None) -> None:
        for name, value in (("fn", fn), ("acquire", acquire), ("refuse", refuse)):
            if not callable(value):
                raise TypeError(f"{name} must be callable, got {value!r}")
        for name, value in (("release", release), ("drain", drain)):
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable or None, got {value!r}")
        if (pending is None) != (drain is None):
            raise TypeError("pending and drain go together: give both or neither")
        self._fn, self._acquire, self._refuse = fn, acquire, refuse
        self._release, self._pending, self._drain = release, pending, drain

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._acquire() is not True:
            self._refuse()                  # raises, or returns once admitted
        try:
            return self._fn(*args, **kwargs)
        finally:
            if self._release is not None:
                self._release()
            if self._pending is not None and len(self._pending) > 0:
                self._drain()               # type: ignore[misc]

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else types.MethodType(self, obj)


class StageBase:
    """`with` for admit-then-release patterns: a facade class inherits it and calls
    `_stage_setup(acquire, refuse, release, pending=None, drain=None)` once. `__enter__` returns self."""

    __slots__ = ()

    def _stage_setup(self, acquire: Callable[[], bool], refuse: Callable[[], Any],
                     release: Callable[[], Any] | None = None, pending: Any = None,
                     drain: Callable[[], Any] | None = None) -> None:
        # validates exactly as StageGuard does
        object.__setattr__(self, "_stage", StageGuard(lambda: None, acquire, refuse, release, pending, drain))

    def _stage_guard(self, fn: Callable[..., Any]) -> StageGuard:
        """A StageGuard for fn with this object's stage."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        st = self.__dict__.get("_stage")
        if st is None:
            raise RuntimeError("_stage_setup() was not called")
        return StageGuard(fn, st._acquire, st._refuse, st._release, st._pending, st._drain)

    def __enter__(self) -> Any:
        st = self._stage  # type: ignore[attr-defined]
        if st._acquire() is not True:
            st._refuse()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        st = self._stage  # type: ignore[attr-defined]
        if st._release is not None:
            st._release()
        if st._pending is not None and len(st._pending) > 0:
            st._drain()
        return False


class AttemptGuard:
    """The first attempt of a retried call: sets the state list [1, None, clock_ns(), owner, None, None,
    None] in `var`, calls fn, advances `counter` on success; on an Exception hands over to
    on_failure(state, fn, args, kwargs, exc, None). Binds like a function."""

    __slots__ = ("_fn", "_owner", "_var", "_counter", "_on_failure", "_clock_ns", "__dict__")

    def __init__(self, fn: Callable[..., Any], owner: Any, var: ContextVar, counter: Any,
                 on_failure: Callable[..., Any], clock_ns: Callable[[], int]) -> None:
        for name, value in (("fn", fn), ("on_failure", on_failure), ("clock_ns", clock_ns)):
            if not callable(value):
                raise TypeError(f"{name} must be callable, got {value!r}")
        if type(var) is not ContextVar:
            raise TypeError(f"var must be a contextvars.ContextVar, got {var!r}")
        if not hasattr(counter, "__next__"):
            raise TypeError(f"counter must be an iterator (itertools.count), got {counter!r}")
        self._fn, self._owner, self._var, self._counter = fn, owner, var, counter
        self._on_failure, self._clock_ns = on_failure, clock_ns

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = [1, None, self._clock_ns(), self._owner, None, None, None]
        token = self._var.set(state)
        try:
            try:
                result = self._fn(*args, **kwargs)
            except Exception as e:
                exc = e
            else:
                next(self._counter)
                return result
            # outside the except block, so later attempts' errors do not chain onto this one
            state[4], state[5] = args, kwargs
            return self._on_failure(state, self._fn, args, kwargs, exc, None)
        finally:
            self._var.reset(token)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else types.MethodType(self, obj)
