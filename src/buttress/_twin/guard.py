"""Pure-Python twin of buttress._core.guard: the spec and the fallback."""
from __future__ import annotations

import itertools
import threading
import types
from contextvars import ContextVar
from typing import Any, Callable

from .._params import describe
from .._spec import UsageError
from .._wrap import LAZY_TYPES, refuse_sync_result

__all__ = ["StageGuard", "StageBase", "AttemptGuard"]

_ids = itertools.count(1)           # stage ids: never 0, never reused
_HELD_SLOTS = 8                     # BT_HELD_SLOTS in include/buttress_guard.h
_held = threading.local()


def _not_initialised(obj: object, what: str = "its __init__ was not called") -> RuntimeError:
    return RuntimeError(f"{type(obj).__name__} is not initialised: {what} "
                        f"(a subclass must call super().__init__())")


def _refuse_awaitable(fn: Any, result: Any) -> Any:
    """The default settle of a guard given no `settle`: the permit is back already; an awaitable is the
    sync-form UsageError, anything else (a generator) is a value."""
    if type(result) is types.CoroutineType or hasattr(type(result), "__await__"):
        if type(result) is types.CoroutineType:
            result.close()          # never started: no "was never awaited" warning
        raise UsageError(f"{describe(fn)} is async (it returned {type(result).__name__}, an awaitable), so the "
                         f"sync form cannot guard it and would return it un-awaited: use the pattern's "
                         f"`await ....call_async(fn, ...)` or decorate the async def function")
    return result


def _attempt_settle(owner: Any, fn: Any, result: Any) -> Any:
    """AttemptGuard: a first attempt returned a lazy result; an awaitable is refused (not retried)."""
    refuse_sync_result(owner, fn, result)
    return result


def _held_table() -> dict[int, int]:
    try:
        return _held.table  # type: ignore[no-any-return]
    except AttributeError:
        table = _held.table = {}
        return table


def _held_enter(sid: int) -> bool:
    """Record one `with` acquisition of stage `sid` for this thread; False when the table is full."""
    table = _held_table()
    n = table.get(sid)
    if n is not None:
        table[sid] = n + 1
        return True
    if len(table) >= _HELD_SLOTS:
        return False
    table[sid] = 1
    return True


def _held_exit(sid: int) -> bool:
    """Consume one record of this thread; False when it holds none."""
    table = _held_table()
    n = table.get(sid)
    if not n:
        return False
    if n == 1:
        del table[sid]
    else:
        table[sid] = n - 1
    return True


def _check_stage(acquire: Any, refuse: Any, release: Any, pending: Any, drain: Any, settle: Any) -> None:
    for name, value in (("acquire", acquire), ("refuse", refuse)):
        if not callable(value):
            raise TypeError(f"{name} must be callable, got {value!r}")
    for name, value in (("release", release), ("drain", drain), ("settle", settle)):
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable or None, got {value!r}")
    if (pending is None) != (drain is None):
        raise TypeError("pending and drain go together: give both or neither")


class _Stage:
    """The admit / release callables of one stage, its id in the per-thread `with` records, and the
    `with` acquisitions not recorded per thread (`floating`: a thread's table was full)."""

    __slots__ = ("acquire", "refuse", "release", "pending", "drain", "settle", "id", "floating", "lock")

    def __init__(self, acquire: Any, refuse: Any, release: Any, pending: Any, drain: Any, settle: Any = None) -> None:
        _check_stage(acquire, refuse, release, pending, drain, settle)
        self.acquire, self.refuse, self.release, self.pending, self.drain = acquire, refuse, release, pending, drain
        self.settle = settle
        self.id = next(_ids)
        self.floating = 0
        self.lock = threading.Lock()

    def enter(self) -> None:
        if self.acquire() is not True:
            self.refuse()                   # raises, or returns once admitted

    def after(self) -> None:
        if self.release is not None:
            self.release()
        if self.pending is not None and len(self.pending) > 0:
            self.drain()

    def settle_result(self, fn: Any, result: Any) -> Any:
        """A lazy result with the permit still held: `settle` takes the permit over; the default returns
        it, then refuses an awaitable."""
        if self.settle is not None:
            return self.settle(fn, result)
        self.after()
        return _refuse_awaitable(fn, result)

    def take_floating(self) -> bool:
        with self.lock:
            if self.floating <= 0:
                return False
            self.floating -= 1
            return True


class StageGuard:
    """fn guarded by acquire / refuse / release (see buttress._core.guard); binds like a function.
    Not initialised: every call raises RuntimeError. Initialised once."""

    # slots: functools.wraps copies the wrapped callable's __dict__ into ours; slots always win over it
    __slots__ = ("_fn", "_stage", "__dict__")

    def __init__(self, fn: Callable[..., Any], acquire: Callable[[], bool], refuse: Callable[[], Any],
                 release: Callable[[], Any] | None = None, pending: Any = None,
                 drain: Callable[[], Any] | None = None, settle: Callable[[Any, Any], Any] | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        stage = _Stage(acquire, refuse, release, pending, drain, settle)
        try:
            self._stage
        except AttributeError:
            pass
        else:
            raise RuntimeError(f"{type(self).__name__} is already initialised")
        self._fn, self._stage = fn, stage

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            stage, fn = self._stage, self._fn
        except AttributeError:
            raise _not_initialised(self) from None
        if fn is None:                      # the call(fn, *args, **kwargs) entry
            if not args:
                raise TypeError("call() needs the function to call as its first argument")
            fn, args = args[0], args[1:]
        stage.enter()
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            stage.after()
            raise
        if type(result) in LAZY_TYPES or hasattr(type(result), "__await__"):
            return stage.settle_result(fn, result)
        stage.after()
        return result

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None and objtype is None:     # as the compiled slot (and a function) says
            raise TypeError("__get__(None, None) is invalid")
        return self if obj is None else types.MethodType(self, obj)


def _stage_of(obj: Any) -> _Stage:
    try:
        return obj.__dict__["_stage"]  # type: ignore[no-any-return]
    except (AttributeError, KeyError):
        raise _not_initialised(obj, "_stage_setup() was not called") from None


class StageBase:
    """`with` for admit-then-release patterns: a facade class inherits it and calls
    `_stage_setup(acquire, refuse, release, pending=None, drain=None)` once. `__enter__` returns self.

    Each `__enter__` records the acquisition for the calling thread; `__exit__` consumes one record of
    the calling thread, and is a no-op when there is none (a second exit of the same acquisition)."""

    __slots__ = ()

    def _stage_setup(self, acquire: Callable[[], bool], refuse: Callable[[], Any],
                     release: Callable[[], Any] | None = None, pending: Any = None,
                     drain: Callable[[], Any] | None = None, settle: Callable[[Any, Any], Any] | None = None) -> None:
        stage = _Stage(acquire, refuse, release, pending, drain, settle)
        if self.__dict__.setdefault("_stage", stage) is not stage:
            raise RuntimeError(f"{type(self).__name__} is already initialised: _stage_setup() was called before")

    def _stage_guard(self, fn: Callable[..., Any]) -> StageGuard:
        """A StageGuard for fn with this object's stage."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        stage = _stage_of(self)
        g = StageGuard.__new__(StageGuard)
        g._fn, g._stage = fn, stage
        return g

    def _stage_call(self) -> StageGuard:
        """The `call(fn, *args, **kwargs)` entry with this object's stage."""
        stage = _stage_of(self)
        g = StageGuard.__new__(StageGuard)
        g._fn, g._stage = None, stage
        return g

    def __enter__(self) -> Any:
        stage = _stage_of(self)
        stage.enter()
        if not _held_enter(stage.id):
            with stage.lock:
                stage.floating += 1
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        stage = _stage_of(self)
        if _held_exit(stage.id) or stage.take_floating():
            stage.after()
        return False

    def _stage_held(self) -> int:
        """How many `with` acquisitions of this object the calling thread has recorded."""
        return _held_table().get(_stage_of(self).id, 0)


class AttemptGuard:
    """The first attempt of a retried call: sets the state list [1, None, clock_ns(), owner, None, None,
    None] in `var`, calls fn, advances `counter` on success; on an Exception hands over to
    on_failure(state, fn, args, kwargs, exc, None). Binds like a function.
    Not initialised: every call raises RuntimeError. Initialised once."""

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
        try:
            self._fn
        except AttributeError:
            pass
        else:
            raise RuntimeError(f"{type(self).__name__} is already initialised")
        self._owner, self._var, self._counter = owner, var, counter
        self._on_failure, self._clock_ns = on_failure, clock_ns
        self._fn = fn                       # last: its presence means "ready"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            fn = self._fn
        except AttributeError:
            raise _not_initialised(self) from None
        state = [1, None, self._clock_ns(), self._owner, None, None, None]
        token = self._var.set(state)
        try:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                exc = e
            else:
                if type(result) in LAZY_TYPES or hasattr(type(result), "__await__"):
                    result = _attempt_settle(self._owner, fn, result)
                next(self._counter)
                return result
            # outside the except block, so later attempts' errors do not chain onto this one
            state[4], state[5] = args, kwargs
            return self._on_failure(state, fn, args, kwargs, exc, None)
        finally:
            self._var.reset(token)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None and objtype is None:     # as the compiled slot (and a function) says
            raise TypeError("__get__(None, None) is invalid")
        return self if obj is None else types.MethodType(self, obj)
