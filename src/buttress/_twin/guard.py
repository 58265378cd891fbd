"""Pure-Python twin of buttress._core.guard: the spec and the fallback."""
from __future__ import annotations

import inspect
import itertools
import sys
import threading
import time
import types
from contextvars import ContextVar, Token
from typing import Any, Callable, Literal, TypeVar

from .._params import describe
from .._spec import UsageError
from .._wrap import lazy_result, refuse_sync_result
from .permits import Permits as _Permits

_F = TypeVar("_F", bound=Callable[..., Any])

__all__ = ["StageGuard", "StageBase", "AttemptGuard", "AttemptVar", "AttemptCounter", "ShedBase", "Admission"]

_ids = itertools.count(1)           # stage ids: never 0, never reused
_HELD_SLOTS = 8                     # BT_HELD_SLOTS in include/buttress_guard.h
# The latency EWMA (retry_after's estimate) is fed by one admission in SAMPLE_EVERY per priority (the first
# included): the clock reads are most of an admission's cost. A limiter is fed by every call (Python path).
SAMPLE_EVERY = 16
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

    __slots__ = ("acquire", "refuse", "release", "pending", "drain", "settle", "refuse_async", "settle_async",
                 "reject", "rejected", "closed", "id", "floating", "lock")

    def __init__(self, acquire: Any, refuse: Any, release: Any, pending: Any, drain: Any, settle: Any = None,
                 refuse_async: Any = None, settle_async: Any = None) -> None:
        _check_stage(acquire, refuse, release, pending, drain, settle)
        for name, value in (("refuse_async", refuse_async), ("settle_async", settle_async)):
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable or None, got {value!r}")
        self.acquire, self.refuse, self.release, self.pending, self.drain = acquire, refuse, release, pending, drain
        self.settle, self.refuse_async, self.settle_async = settle, refuse_async, settle_async
        self.reject: tuple[type, str] | None = None     # the quick refusal (_stage_reject)
        self.rejected = itertools.count()
        holder = getattr(acquire, "__self__", None)     # a permit counter's `closed` (a drain refuses in Python)
        self.closed = ((lambda: holder.closed) if type(holder) is _Permits and getattr(acquire, "__name__", "") ==
                       "try_acquire" else None)
        self.id = next(_ids)
        self.floating = 0
        self.lock = threading.Lock()

    def try_enter(self) -> bool:
        return self.acquire() is True

    def reject_now(self) -> None:
        """Raise the quick refusal when there is one and the permit word is not closed."""
        reject = self.reject
        if reject is not None and self.closed is not None and not self.closed():
            next(self.rejected)
            raise reject[0].__new__(reject[0], reject[1])

    def enter(self) -> None:
        if self.acquire() is not True:
            self.reject_now()
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
    asynchronous=True: fn is async; a call takes the permit now and returns an awaitable (GuardedAwaitable)
    that runs fn's coroutine and releases when it finishes; refused: refuse_async(fn, args, kwargs) (an
    awaitable) or refuse() (raises when awaited).
    Not initialised: every call raises RuntimeError. Initialised once."""

    # slots: functools.wraps copies the wrapped callable's __dict__ into ours; slots always win over it
    __slots__ = ("_fn", "_stage", "_async", "__dict__")
    _fn: Callable[..., Any] | None          # None: the call(fn, ...) / call_async(fn, ...) entry
    _stage: _Stage
    _async: bool

    def __init__(self, fn: Callable[..., Any], acquire: Callable[[], bool], refuse: Callable[[], Any],
                 release: Callable[[], Any] | None = None, pending: Any = None,
                 drain: Callable[[], Any] | None = None, settle: Callable[[Any, Any], Any] | None = None, *,
                 refuse_async: Callable[..., Any] | None = None, settle_async: Callable[[Any, Any], Any] | None = None,
                 asynchronous: bool = False) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        if type(asynchronous) is not bool:
            raise TypeError(f"asynchronous must be a bool, got {asynchronous!r}")
        stage = _Stage(acquire, refuse, release, pending, drain, settle, refuse_async, settle_async)
        try:
            self._stage
        except AttributeError:
            pass
        else:
            raise RuntimeError(f"{type(self).__name__} is already initialised")
        self._fn, self._async, self._stage = fn, asynchronous, stage

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            stage, fn = self._stage, self._fn
        except AttributeError:
            raise _not_initialised(self) from None
        if self._async:
            if fn is None:
                if not args:
                    raise TypeError("call_async() needs the function to call as its first argument")
                fn, args = args[0], args[1:]
                if not callable(fn):        # before the permit: a programming error is never an outcome
                    raise TypeError(f"fn must be callable, got {fn!r}")
            return _acall(stage, fn, args, kwargs)
        if fn is None:                      # the call(fn, *args, **kwargs) entry
            if not args:
                raise TypeError("call() needs the function to call as its first argument")
            fn, args = args[0], args[1:]
            if not callable(fn):            # before the permit: a programming error is never an outcome
                raise TypeError(f"fn must be callable, got {fn!r}")
        stage.enter()
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            stage.after()
            raise
        if lazy_result(result):
            return stage.settle_result(fn, result)
        stage.after()
        return result

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None and objtype is None:     # as the compiled slot (and a function) says
            raise TypeError("__get__(None, None) is invalid")
        return self if obj is None else types.MethodType(self, obj)


def _sync_in_async(fn: Any, result: Any) -> Any:
    """The default settle_async: the permit is back already; fn was a sync function."""
    if type(result) is types.GeneratorType:
        result.close()
    raise UsageError(f"call_async: {describe(fn)} is a sync function (it returned {type(result).__name__}, "
                     f"which cannot be awaited): use the pattern's call(fn, ...) or decorate it")


_RUN, _VALUE, _RAISE, _DONE = range(4)
_CO_ITERABLE_COROUTINE = 0x100          # inspect.CO_ITERABLE_COROUTINE: a types.coroutine generator


class GuardedAwaitable:
    """The awaitable of a guarded async call (twin of buttress_guard.h's bt_aw): drives `it` holding the
    permit; the outcome goes to `ok(result)` / `err(exc)` exactly once. States: RUN, VALUE (the first send
    returns `value` after ok), RAISE (the first send raises `value`), DONE. Thrown into, closed or dropped
    before it finished, it gives the permit back through err (GeneratorExit for close / collection)."""

    __slots__ = ("_it", "_value", "_ok", "_err", "_state", "_lock")

    def __init__(self, state: int, it: Any = None, value: Any = None, ok: Any = None, err: Any = None) -> None:
        self._state, self._it, self._value, self._ok, self._err = state, it, value, ok, err
        self._lock = threading.Lock()

    def _take(self) -> tuple[Any, Any]:
        with self._lock:
            ok, err = self._ok, self._err
            self._ok = self._err = None
            self._state = _DONE
            self._it = None
            return ok, err

    def _fail(self, exc: BaseException) -> None:
        _, err = self._take()
        if err is not None:
            err(exc)

    def _finish(self, value: Any) -> None:
        ok, _ = self._take()
        if ok is not None:
            ok(value)

    def __await__(self) -> Any:
        return self

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, arg: Any) -> Any:
        state = self._state
        if state == _RUN:
            try:
                return self._it.send(arg) if arg is not None or not hasattr(self._it, "__next__") \
                    else next(self._it)
            except StopIteration as stop:
                self._finish(stop.value)
                raise StopIteration(stop.value) from None
            except BaseException as exc:
                self._fail(exc)
                raise
        if state == _VALUE:
            value, self._value = self._value, None
            self._finish(value)
            raise StopIteration(value)
        if state == _RAISE:
            error, self._value = self._value, None
            self._state = _DONE
            raise error
        raise RuntimeError("cannot reuse already awaited coroutine")

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if self._state == _RUN:
            try:
                return self._it.throw(typ, val, tb) if val is not None or tb is not None else self._it.throw(typ)
            except StopIteration as stop:
                self._finish(stop.value)
                raise
            except BaseException as exc:
                self._fail(exc)
                raise
        error = typ if isinstance(typ, BaseException) else (val if isinstance(val, BaseException) else
                                                           (typ() if val is None else typ(val)))
        if tb is not None:
            error = error.with_traceback(tb)
        self._fail(error)
        raise error

    def close(self) -> None:
        if self._state == _RUN:
            try:
                self._it.close()
            except BaseException as exc:
                self._fail(exc)
                raise
        if self._state != _DONE:
            self._fail(GeneratorExit())

    def __del__(self) -> None:
        try:
            state = self._state
        except AttributeError:
            return
        if state != _DONE:
            self._it = None
            self._fail(GeneratorExit())


def _raising(exc: BaseException) -> GuardedAwaitable:
    return GuardedAwaitable(_RAISE, value=exc)


def _start(stage: _Stage, fn: Any, result: Any) -> Any:
    """The permit is held and fn returned `result`: drive it (a coroutine as it is, another awaitable through
    its __await__), or settle_async a result without an await slot."""
    def err(exc: Any) -> None:
        try:
            stage.after()
        except BaseException:  # noqa: BLE001 - as the compiled exit_err: logged, the call's outcome stands
            import logging
            logging.getLogger("buttress.guard").exception("releasing after a failed call failed")

    if type(result) is types.CoroutineType or (type(result) is types.GeneratorType
                                               and result.gi_code.co_flags & _CO_ITERABLE_COROUTINE):
        it = result
    elif hasattr(type(result), "__await__"):
        try:
            it = result.__await__()
        except BaseException as exc:
            err(exc)
            return _raising(exc)
    else:
        try:
            if stage.settle_async is not None:
                return GuardedAwaitable(_VALUE, value=stage.settle_async(fn, result))   # the guarded stream
            stage.after()
            return _sync_in_async(fn, result)
        except BaseException as exc:
            return _raising(exc)
    return GuardedAwaitable(_RUN, it, ok=lambda value: stage.after(), err=err)


def _acall(stage: _Stage, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        ok = stage.try_enter()
    except BaseException as exc:
        return _raising(exc)
    if not ok:
        try:
            stage.reject_now()
            if stage.refuse_async is not None:
                return stage.refuse_async(fn, args, kwargs)
            stage.refuse()
        except BaseException as exc:
            return _raising(exc)
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        stage.after()
        return _raising(exc)
    return _start(stage, fn, result)


def _stage_of(obj: Any) -> _Stage:
    try:
        return obj.__dict__["_stage"]  # type: ignore[no-any-return]
    except (AttributeError, KeyError):
        raise _not_initialised(obj, "_stage_setup() was not called") from None


class StageBase:
    """`with` / `async with` for admit-then-release patterns: a facade class inherits it and calls
    `_stage_setup(acquire, refuse, release, pending=None, drain=None)` once. `__enter__` / `__aenter__`
    return self.

    Each `__enter__` records the acquisition for the calling thread; `__exit__` consumes one record of
    the calling thread, and is a no-op when there is none (a second exit of the same acquisition).
    `async with` records under the entering frame (`_async_held`: frame -> count); `__aexit__` consumes its
    frame's record, else one whose frame finished, else nothing."""

    __slots__ = ()

    def _stage_setup(self, acquire: Callable[[], bool], refuse: Callable[[], Any],
                     release: Callable[[], Any] | None = None, pending: Any = None,
                     drain: Callable[[], Any] | None = None, settle: Callable[[Any, Any], Any] | None = None, *,
                     refuse_async: Callable[..., Any] | None = None,
                     settle_async: Callable[[Any, Any], Any] | None = None,
                     aenter_wait: Callable[[Any], Any] | None = None, remote: Any = None) -> None:
        stage = _Stage(acquire, refuse, release, pending, drain, settle, refuse_async, settle_async)
        if aenter_wait is not None and not callable(aenter_wait):
            raise TypeError(f"aenter_wait must be callable or None, got {aenter_wait!r}")
        if remote is not None and not (type(remote) is tuple and len(remote) == 2 and callable(remote[0])
                                       and callable(remote[1])):
            raise TypeError(f"remote must be None or a pair of callables (aenter, aexit), got {remote!r}")
        if "_stage" in self.__dict__:
            raise RuntimeError(f"{type(self).__name__} is already initialised: _stage_setup() was called before")
        self.__dict__["_stage_async"] = (aenter_wait, remote, threading.Lock())
        self.__dict__["_async_held"] = {}
        if self.__dict__.setdefault("_stage", stage) is not stage:
            raise RuntimeError(f"{type(self).__name__} is already initialised: _stage_setup() was called before")

    def _stage_reject(self, cls: Any, message: Any) -> None:
        """Refuse at once with cls.__new__(cls, message) (no __init__) while the permit word is not closed;
        None turns it off."""
        stage = _stage_of(self)
        if cls is None:
            stage.reject = None
            return
        if not (isinstance(cls, type) and issubclass(cls, BaseException)) or type(message) is not str:
            raise TypeError(f"_stage_reject needs an exception class and a str message, got {cls!r}, {message!r}")
        stage.reject = (cls, message)

    def _stage_rejected(self) -> int:
        """How many refusals the quick path (`_stage_reject`) raised."""
        return int(repr(_stage_of(self).rejected)[6:-1])

    def _stage_guard(self, fn: Callable[..., Any], asynchronous: bool = False) -> StageGuard:
        """A StageGuard for fn with this object's stage."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        stage = _stage_of(self)
        g = StageGuard.__new__(StageGuard)
        g._fn, g._async, g._stage = fn, bool(asynchronous), stage
        return g

    def _stage_call(self) -> StageGuard:
        """The `call(fn, *args, **kwargs)` entry with this object's stage."""
        stage = _stage_of(self)
        g = StageGuard.__new__(StageGuard)
        g._fn, g._async, g._stage = None, False, stage
        return g

    def _stage_call_async(self) -> StageGuard:
        """The `call_async(fn, *args, **kwargs)` entry with this object's stage."""
        stage = _stage_of(self)
        g = StageGuard.__new__(StageGuard)
        g._fn, g._async, g._stage = None, True, stage
        return g

    def _stage_release(self) -> None:
        """Give one permit back; hand it to a queued waiter."""
        _stage_of(self).after()

    def __enter__(self) -> Any:
        stage = _stage_of(self)
        stage.enter()
        if not _held_enter(stage.id):
            with stage.lock:
                stage.floating += 1
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        stage = _stage_of(self)
        if _held_exit(stage.id) or stage.take_floating():
            stage.after()
        return False

    def _stage_held(self) -> int:
        """How many `with` acquisitions of this object the calling thread has recorded."""
        return _held_table().get(_stage_of(self).id, 0)

    # -- async with -------------------------------------------------------------------------------------

    def __aenter__(self) -> Any:
        stage = _stage_of(self)
        aenter_wait, remote, _ = self.__dict__["_stage_async"]
        if remote is not None:
            return remote[0]()
        frame = sys._getframe(1)
        if not stage.try_enter():
            try:
                stage.reject_now()
            except BaseException as exc:
                return _raising(exc)
            if aenter_wait is None:
                stage.enter()
            else:
                return aenter_wait(frame)
        try:
            self._stage_record(frame)
        except BaseException:
            stage.after()
            raise

        def undo(exc: Any) -> None:
            if _unrecord(self, frame):
                stage.after()

        return GuardedAwaitable(_VALUE, value=self, err=undo)

    def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> Any:
        stage = _stage_of(self)
        remote = self.__dict__["_stage_async"][1]
        if remote is not None:
            return remote[1](exc_type, exc, tb)
        if self._stage_consume(sys._getframe(1)):
            stage.after()
        return GuardedAwaitable(_VALUE, value=False)

    def _stage_record(self, frame: Any) -> None:
        """Record an `async with` acquisition of `frame`."""
        with self.__dict__["_stage_async"][2]:
            held = self.__dict__["_async_held"]
            held[frame] = held.get(frame, 0) + 1

    def _stage_consume(self, frame: Any) -> bool:
        """Consume a record for an exit from `frame` (its own, else one whose frame finished)."""
        if _unrecord(self, frame):
            return True
        with self.__dict__["_stage_async"][2]:
            held = self.__dict__["_async_held"]
            for other in list(held):
                if _frame_finished(other):
                    n = held[other]
                    if n == 1:
                        del held[other]
                    else:
                        held[other] = n - 1
                    return True
        return False


def _unrecord(obj: Any, frame: Any) -> bool:
    with obj.__dict__["_stage_async"][2]:
        held = obj.__dict__["_async_held"]
        n = held.get(frame)
        if n is None:
            return False
        if n == 1:
            del held[frame]
        else:
            held[frame] = n - 1
        return True


def _frame_generator(frame: Any) -> Any:
    """The generator / coroutine running `frame` (CPython's PyFrame_GetGenerator), None for a plain frame;
    where that API is missing (not CPython), every frame reads as plain."""
    try:
        import ctypes
        api = ctypes.pythonapi
        get = api.PyFrame_GetGenerator
    except (ImportError, AttributeError):
        return None
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object]
    ptr = get(frame)
    if not ptr:
        return None
    gen = ctypes.cast(ptr, ctypes.py_object).value
    api.Py_DecRef.argtypes = [ctypes.c_void_p]
    api.Py_DecRef(ptr)                  # PyFrame_GetGenerator gave a new reference; `gen` holds its own
    return gen


def _frame_finished(frame: Any) -> bool:
    """A frame that no longer runs: its generator / coroutine finished, or a plain frame."""
    gen = _frame_generator(frame)
    if gen is None:
        return True
    for name in ("cr_frame", "gi_frame", "ag_frame"):
        f = getattr(gen, name, frame)
        if f is not frame:
            return f is None
    return False


class ShedBase:
    """The admission of a load shedder (twin of buttress._core.guard.ShedBase): `admit(p)` returns an
    `Admission` whose enter / exit decide on the in-flight counter (level word, the priority's bound,
    counters, latency EWMA); Python hooks serve a limiter, a store's counter, a drain and refusals."""

    _level = 0
    _latency_ns: float | None = None

    def _shed_setup(self, flight: Any, limits: Any, clock_ns: Any, priority_type: Any, default_priority: Any,
                    check: Any, enter: Any, exit: Any, refuse: Any, sample: Any) -> None:
        for name, value in (("check", check), ("enter", enter), ("exit", exit), ("refuse", refuse)):
            if not callable(value):
                raise TypeError(f"{name} must be callable, got {value!r}")
        d = self.__dict__
        d["_shedbase"] = {"flight": flight, "clock_ns": clock_ns, "type": priority_type,
                      "priorities": tuple(priority_type), "default": int(default_priority), "check": check,
                      "enter": enter, "exit": exit, "refuse": refuse, "sample": sample,
                      "admitted": [itertools.count() for _ in range(4)], "shed": [itertools.count() for _ in range(4)],
                      "fast": False, "limits": None}
        self._shed_limits(limits)

    def _shed_reject(self, cls: Any, fmt: Any, what: Any, names: Any, capacity: Any) -> None:
        """The fast path's refusal without calling `refuse`: cls.__new__(cls) with `_lazy = (fmt, (what,
        names[priority], in_flight, capacity))` and `retry_after` = the latency EWMA in seconds (not set before
        any latency). cls None: every refusal calls `refuse(priority)`."""
        if cls is None:
            self.__dict__["_shedreject"] = None
            return
        if not (isinstance(cls, type) and issubclass(cls, BaseException)) or type(fmt) is not str:
            raise TypeError(f"_shed_reject needs an exception class and a str format, got {cls!r}, {fmt!r}")
        if type(names) is not tuple or len(names) != 4 or type(capacity) is not int:
            raise TypeError(f"_shed_reject needs 4 names and an int capacity, got {names!r}, {capacity!r}")
        self.__dict__["_shedreject"] = (cls, fmt, what, names, capacity)

    def _shed_refusal(self, prio: int) -> BaseException:
        reject = self.__dict__.get("_shedreject")
        sh = self.__dict__["_shedbase"]
        if reject is None:
            exc: BaseException = sh["refuse"](sh["priorities"][prio])
            return exc
        cls, fmt, what, names, capacity = reject
        made = cls.__new__(cls)
        made._lazy = (fmt, (what, names[prio], sh["flight"].in_use, capacity))
        latency = self._latency_ns
        if latency is not None:
            made.retry_after = max(latency, 0.0) / 1e9     # a clock stepped back: >= 0
        return made  # type: ignore[no-any-return]

    def _shed_limits(self, limits: Any) -> None:
        sh = self.__dict__.get("_shedbase")
        if sh is None:
            return
        sh["limits"] = None if limits is None else [int(x) for x in limits]
        sh["fast"] = limits is not None and type(sh["flight"]) is _Permits

    def _shed_counts(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        sh = self.__dict__.get("_shedbase")
        if sh is None:
            return (0, 0, 0, 0), (0, 0, 0, 0)
        return (tuple(int(repr(c)[6:-1]) for c in sh["admitted"]), tuple(int(repr(c)[6:-1]) for c in sh["shed"]))

    def admit(self, priority: Any = None) -> Admission:
        """Context manager (`with` or `async with`): raises Overloaded on entering when shed."""
        try:
            sh = self.__dict__["_shedbase"]
        except KeyError:
            raise _not_initialised(self, "_shed_setup() was not called") from None
        if priority is None:
            prio = sh["default"]
        elif type(priority) is sh["type"]:
            prio = int(priority)
        else:
            prio = int(sh["check"](priority))
        return Admission.__new__(Admission)._setup(self, prio)     # made only here, as the compiled one


def exit_signature(fn: _F) -> _F:
    """An `__exit__` / `__aexit__` taking (*args, **kwargs) to raise the compiled method's own messages
    (see exit_args) shows the compiled signature, (self, exc_type, exc, tb, /), to inspect and the stub
    checks."""
    P = inspect.Parameter
    fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [P(n, P.POSITIONAL_ONLY) for n in ("self", "exc_type", "exc", "tb")])
    return fn


def exit_args(owner: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The compiled C `__exit__` / `__aexit__` argument rules (exactly 3 positional, no keywords), same
    messages: returns the exception (args[1])."""
    if kwargs:
        raise TypeError(f"{owner}.{name}() takes no keyword arguments")
    if len(args) != 3:
        raise TypeError(f"{name}() takes exactly 3 positional arguments (exc_type, exc, tb), got {len(args)}")
    return args[1]


class Admission:
    """One admitted call: `with` / `async with`; leaving frees its slot and reports its latency. Entering
    one that is held raises RuntimeError; a second exit is a no-op; entered again after its exit, it admits
    anew. Collected while entered, it gives its slot back (no outcome)."""

    __slots__ = ("_shedder", "_prio", "_start", "_in_flight", "_held", "_fast")

    def _setup(self, shedder: ShedBase, prio: int) -> Admission:
        self._shedder, self._prio = shedder, prio
        self._start = self._in_flight = 0
        self._fast = 0                  # 0: the Python path; 1: the counter, timed; 2: not timed
        self._held: list[bool] = []     # [True] while entered; append / pop are atomic, also without the GIL
        return self

    @property
    def _priority(self) -> Any:
        try:
            return self._shedder.__dict__["_shedbase"]["priorities"][self._prio]
        except (AttributeError, KeyError):
            raise _not_initialised(self, "get one from LoadShedder.admit()") from None

    def _enter(self) -> None:
        try:
            held, shedder = self._held, self._shedder
            shedder.__dict__["_shedbase"]
        except (AttributeError, KeyError):
            raise _not_initialised(self, "get one from LoadShedder.admit()") from None
        held.append(True)
        if len(held) != 1:              # entered already (here or in another thread)
            held.pop()
            raise RuntimeError("this admission is already entered: use one shedder.admit() per call")
        shedder = self._shedder
        sh = shedder.__dict__["_shedbase"]
        prio = self._prio
        priority = sh["priorities"][prio]
        try:
            if sh["fast"] and prio >= shedder._level:
                flight = sh["flight"]
                if flight.try_acquire_within(sh["limits"][prio]):
                    n = next(sh["admitted"][prio])
                    if n % SAMPLE_EVERY:    # not sampled: no clock read, at entry or exit
                        self._fast = 2
                        return
                    self._fast = 1
                    self._in_flight = flight.in_use
                else:
                    next(sh["shed"][prio])
                    raise shedder._shed_refusal(prio)
            else:
                self._fast = 0
                self._in_flight = sh["enter"](priority)
        except BaseException:
            held.pop()
            raise
        try:
            self._start = time.monotonic_ns() if sh["clock_ns"] is None else sh["clock_ns"]()
        except BaseException:           # a clock that fails: the slot taken goes back
            held.pop()
            sh["flight"].release()
            raise

    def _exit(self, exc: Any) -> None:
        try:
            self._held.pop()
        except (IndexError, AttributeError):
            return                      # not entered, or exited already: nothing of ours to free
        shedder = self._shedder
        sh = shedder.__dict__["_shedbase"]
        if self._fast == 2:
            sh["flight"].release()      # not sampled: the slot goes back, nothing else
            return
        if not self._fast:
            sh["exit"](self._start, self._in_flight, exc)
            return
        try:
            now = time.monotonic_ns() if sh["clock_ns"] is None else sh["clock_ns"]()
        finally:
            sh["flight"].release()      # whatever the clock does, the slot goes back exactly once
        if exc is not None and (not isinstance(exc, Exception) or type(exc) is UsageError):
            return
        elapsed = now - self._start
        latency = shedder._latency_ns
        shedder._latency_ns = float(elapsed) if latency is None else latency + 0.2 * (elapsed - latency)
        if sh["sample"] is not None:
            sh["sample"](elapsed, self._in_flight, exc)

    def __del__(self) -> None:
        """Collected while entered (no exit): the slot goes back, no outcome reported (DESIGN §3c); an
        admission that was exited gives nothing."""
        try:
            self._held.pop()
        except (IndexError, AttributeError):
            return                      # never entered, or exited: nothing of ours is held
        self._shedder.__dict__["_shedbase"]["flight"].release()

    def __enter__(self) -> Admission:
        self._enter()
        return self

    @exit_signature
    def __exit__(self, *args: Any, **kwargs: Any) -> None:
        self._exit(exit_args("Admission", "__exit__", args, kwargs))

    def __aenter__(self) -> Any:
        try:
            self._enter()
        except BaseException as exc:
            return _raising(exc)
        return GuardedAwaitable(_VALUE, value=self)

    @exit_signature
    def __aexit__(self, *args: Any, **kwargs: Any) -> Any:
        self._exit(exit_args("Admission", "__aexit__", args, kwargs))
        return _DONE_NONE


class _Done:
    """The shared completed awaitable of Admission.__aexit__: awaiting it returns None at once; stateless,
    so one object serves every await (it is never suspended: nothing can be thrown into it)."""

    __slots__ = ()

    def __await__(self) -> _Done:
        return self

    def __iter__(self) -> _Done:
        return self

    def __next__(self) -> Any:
        raise StopIteration

    def send(self, value: Any) -> Any:
        raise StopIteration


_DONE_NONE = _Done()


class AttemptCounter:
    """A lock-free counter with the part of itertools.count's interface buttress uses: next() counts and
    returns the count before it, repr() is "count(N)". (The compiled one is bumped in C by AttemptGuard.)"""

    __slots__ = ("_c",)

    def __init__(self) -> None:
        self._c = itertools.count()

    def __iter__(self) -> AttemptCounter:
        return self

    def __next__(self) -> int:
        return next(self._c)

    def __repr__(self) -> str:
        return repr(self._c)


class AttemptVar:
    """The ContextVar of a retried call's state, as the Python paths use it (get / set / reset): get() is
    var.get(None). Every first attempt sets the variable eagerly, so this is the variable and nothing more
    (the compiled one has them as C methods)."""

    __slots__ = ("_v",)

    def __init__(self, var: ContextVar[Any]) -> None:
        if type(var) is not ContextVar:
            raise TypeError(f"var must be a contextvars.ContextVar, got {var!r}")
        if hasattr(self, "_v"):
            raise RuntimeError(f"{type(self).__name__} is already initialised")
        self._v = var

    def _var(self) -> ContextVar[Any]:
        try:
            return self._v
        except AttributeError:
            raise _not_initialised(self) from None

    @property
    def var(self) -> ContextVar[Any]:
        return self._var()

    def get(self, /) -> Any:
        return self._var().get(None)

    def set(self, value: Any, /) -> Token[Any]:
        return self._var().set(value)

    def reset(self, token: Token[Any], /) -> None:
        self._var().reset(token)


class AttemptGuard:
    """The first attempt of a retried call: sets the state list [1, None, clock_ns(), owner, None, None,
    None] in `var` (eagerly; reset when the attempt ends), calls fn, advances `counter` on success; on an Exception hands over to
    on_failure(state, fn, args, kwargs, exc, None). Binds like a function.
    Not initialised: every call raises RuntimeError. Initialised once."""

    __slots__ = ("_fn", "_owner", "_var", "_counter", "_on_failure", "_clock_ns", "__dict__")
    _fn: Callable[..., Any]
    _owner: Any
    _var: ContextVar[list[Any]]
    _counter: Any
    _on_failure: Callable[..., Any]
    _clock_ns: Callable[[], int]

    def __init__(self, fn: Callable[..., Any], owner: Any, var: ContextVar[list[Any]], counter: Any,
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
                if lazy_result(result):
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
