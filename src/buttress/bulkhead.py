"""Bulkheads: cap how many calls run at once, so one slow dependency cannot take every worker.

`Bulkhead` is a permit counter (the lock-free core `Permits`) with a first-come-first-served waiter
queue for callers that may wait. `ThreadPoolBulkhead` runs calls on its own
`concurrent.futures.ThreadPoolExecutor` behind a bounded admission, so a hung dependency occupies only
its own pool.

One acquisition, one release: a `Bulkhead` serves many callers at once, so `with bh:` records each
acquisition for the thread that entered (in the compiled stage, `buttress._core.guard.StageBase`) and
`async with bh:` for the task and frame that entered; an exit that finds no record of its own -- the
second exit of one acquisition -- is a no-op, never the release of another caller's permit.

Every form follows DESIGN §3c: a sync form given an async function (or one returning an awaitable) is a
TypeError pointing at call_async, after the permit is returned; call_async given a sync function is a
TypeError; a generator or async generator returned by a guarded call holds its permit over its whole
iteration (`hold_stream` / `hold_astream`: returned when it finishes, is closed, or is collected).
"""
from __future__ import annotations

import _thread
import asyncio
import collections
import concurrent.futures
import contextvars
import inspect
import itertools
import sys
import math
import threading
import time
import types
import os
import weakref
from asyncio import _get_running_loop
from inspect import isawaitable
from typing import TYPE_CHECKING, Any, Awaitable, Callable, NamedTuple, ParamSpec, Protocol, TypeVar

from ._base import Policy
from ._context import remaining
from ._impl import core
from ._params import ASYNC, ASYNC_GENERATOR, GENERATOR, SYNC, callable_kind, check_float, check_int, count_of, describe, NS
from ._spec import UsageError
from ._timers import call_later
from ._wrap import CORO, not_callable, lazy_result, refuse_sync_result, specialize, sync_in_async
from .clock import SYSTEM_CLOCK as _SYSTEM_CLOCK, resolve_clock
from .errors import BulkheadFullError, TimeoutExceeded, rejection

__all__ = ["Bulkhead", "BulkheadMetrics", "ThreadPoolBulkhead", "ThreadPoolMetrics"]

if TYPE_CHECKING:  # the twin is the compiled core's spec: same names, signatures and results
    from ._twin.guard import StageBase as _StageBase
    from ._twin.permits import Permits as _Permits

    class _PermitCounter(Protocol):
        """What a Bulkhead uses of its permit counter: the local core's Permits or a store's shared one
        (held and the *_async methods are read on a store's counter only)."""
        @property
        def max_permits(self) -> int: ...
        @property
        def available(self) -> int: ...
        @property
        def in_use(self) -> int: ...
        @property
        def held(self) -> int: ...
        def try_acquire(self) -> bool: ...
        def release(self) -> None: ...
        def close(self) -> None: ...
        def reopen(self) -> None: ...
        def resize(self, max_permits: int) -> None: ...
        async def try_acquire_async(self) -> bool: ...
        async def release_async(self) -> None: ...
else:
    _Permits = core("permits").Permits
    _StageBase = core("guard").StageBase

P = ParamSpec("P")
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
_MAX = 1 << 40
_DEFAULT: Any = object()        # "use max_wait"
_POLL_FIRST = 0.0005            # s: first sleep of a cross-process wait (store=), doubling up to _POLL_MAX
_POLL_MAX = 0.02
_SHARED_MAX = (1 << 22) - 1     # a shared permit counter's maximum (buttress._core.shared.MAX_PERMITS)
_GEN = types.GeneratorType
_AGEN = types.AsyncGeneratorType
_CO_ITERABLE_COROUTINE = inspect.CO_ITERABLE_COROUTINE
_SYNC_STREAM = ("{cls}.call_async: {fn} is a generator function, not async: use the sync form (call, or the "
                "decorator), which holds the permit over its whole iteration")


# -- streams (DESIGN §3c): a guarded generator holds its permit over the whole iteration ------------------

class _Collected:
    """`done(COLLECTED)`: the stream was dropped un-finished and collected (maybe inside the GC: take no
    lock that the collecting thread may hold)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "COLLECTED"


class _NotRun:
    """`done(NOT_RUN)`: the result was refused (an awaitable in a sync form): no outcome."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_RUN"


COLLECTED: Any = _Collected()
NOT_RUN: Any = _NotRun()


class Hold:
    """One permit held by a stream: `finish(exc)` calls `done(exc)` exactly once (exc: None when the
    stream finished, the exception that ended it, NOT_RUN, or COLLECTED when the stream was dropped before
    finishing and collected)."""

    __slots__ = ("_done",)

    def __init__(self, done: Callable[[Any], Any]) -> None:
        self._done = [done]

    def finish(self, exc: Any) -> None:
        try:
            done = self._done.pop()     # atomic: of racing finishers, exactly one gets it
        except IndexError:
            return
        done(exc)

    def __del__(self) -> None:
        try:
            done = self._done.pop()
        except (IndexError, AttributeError):
            return
        done(COLLECTED)


def hold_stream(hold: Hold, gen: Any) -> Any:
    """Iterate `gen` (send / throw / close delegated) holding `hold`'s permit until it finishes or is
    closed; a stream dropped before its first step gives the permit back when it is collected."""
    try:
        result = yield from gen
    except BaseException as exc:
        hold.finish(exc)
        raise
    hold.finish(None)
    return result


async def hold_astream(hold: Hold, agen: Any) -> Any:
    """The async-generator form of hold_stream: values sent in are passed on (``asend``); an exception
    thrown in (``athrow``) or ``aclose()`` closes `agen` and gives the permit back."""
    try:
        value = None
        while True:
            try:
                item = await agen.asend(value)
            except StopAsyncIteration:
                break
            value = yield item
    except BaseException as exc:
        try:
            await agen.aclose()
        finally:
            hold.finish(exc)
        raise
    hold.finish(None)


def mark_async(wrapper: Any, fn: Any) -> Any:
    """A compiled async guard reads as an async function (inspect / asyncio.iscoroutinefunction, so outer
    patterns and frameworks await it): fn's code object and defaults where it has them (Python 3.11's test),
    and the 3.12+ marker."""
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):
        wrapper.__code__ = code
        wrapper.__defaults__ = getattr(fn, "__defaults__", None)
        wrapper.__kwdefaults__ = getattr(fn, "__kwdefaults__", None)
    mark = getattr(inspect, "_is_coroutine_mark", None)
    if mark is not None:
        wrapper._is_coroutine_marker = mark
    return wrapper


def is_stream(result: object) -> bool:
    """A generator (not a generator-based coroutine) or an async generator."""
    tp = type(result)
    return tp is _AGEN or (tp is _GEN and not result.gi_code.co_flags & _CO_ITERABLE_COROUTINE)  # type: ignore[attr-defined]


def settle_sync(policy: Any, fn: Any, result: Any, done: Callable[[Any], Any]) -> Any:
    """A sync form's lazy result (LAZY_TYPES or __await__) with the permit held: a stream comes back
    guarded (`done` when it ends); an awaitable is refused after `done(NOT_RUN)` (UsageError pointing at
    call_async, the coroutine closed)."""
    hold = Hold(done)               # from here on the permit is the hold's: it goes back exactly once
    if type(result) is _AGEN:
        return hold_astream(hold, result)
    if is_stream(result):
        return hold_stream(hold, result)
    hold.finish(NOT_RUN)
    refuse_sync_result(policy, fn, result, generators=False)
    return result


def settle_async(policy: Any, fn: Any, result: Any, done: Callable[[Any], Any]) -> Any:
    """call_async / an async wrapper got a result that is not awaitable, with the permit held: an async
    generator comes back guarded; anything else is a UsageError after `done(NOT_RUN)` (a generator:
    use the sync form; anything else: a sync function, use call)."""
    hold = Hold(done)
    if type(result) is _AGEN:
        return hold_astream(hold, result)
    hold.finish(NOT_RUN)
    if type(result) is _GEN:
        result.close()
        raise UsageError(_SYNC_STREAM.format(cls=type(policy).__name__, fn=describe(fn)))
    raise sync_in_async(policy, fn, result)


def _check_name(name: object) -> str | None:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {name!r} ({type(name).__name__})")
    return name


def _open_store(kind: str, store: Any, name: str | None, maximum: int, lease: Any) -> tuple[Any, bool]:
    """(the store's shared permit counter for (kind, name) with `maximum`, whether it is a Redis store).
    A store needs a name; `lease` belongs to a Redis store."""
    from .stores import WordStore, store_from_url
    st = store_from_url(store)
    if name is None:
        raise ValueError(f"store={store!r} needs name=: objects with the same name in one store share one "
                         f"state, so a shared {kind} must be named")
    if isinstance(st, WordStore):
        if lease is not None:
            raise ValueError(f"lease={lease!r} applies to a Redis store only ({st.url} takes a dead process's "
                             f"permits back through its lease table)")
        return st.permits(kind, name, maximum), False
    return st.permits(kind, name, maximum, lease=lease), True  # type: ignore[attr-defined]  # a RedisStore here


def _drain_deadline(clock: Any, timeout: object) -> float | None:
    t = check_float("timeout", timeout, minimum=0.0, maximum=1e9, allow_none=True)
    return None if t is None else clock.monotonic() + t


def _seconds_left(clock: Any, deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - clock.monotonic())


def _wait_budget(timeout: float | None) -> float | None:
    """The wait allowed: `timeout` capped by the innermost deadline (None = unbounded)."""
    left = remaining()
    if left is None:
        return timeout
    return left if timeout is None else min(timeout, left)


class BulkheadMetrics(NamedTuple):
    """A snapshot of a Bulkhead."""
    available: int          # permits free now
    max_concurrent: int
    in_use: int             # calls holding a permit
    waiting: int            # callers queued for a permit
    rejected: int           # BulkheadFullError raised since creation


class _Waiter:
    """A caller queued for a permit. `granted` is set (under the bulkhead lock) when a permit is
    handed to it; from then on the permit is the waiter's, whether or not it is still waiting."""

    __slots__ = ("granted", "lock", "loop", "fut")
    granted: bool
    lock: _thread.LockType | None                   # a thread's waiter
    loop: asyncio.AbstractEventLoop | None          # a task's waiter: its loop and future
    fut: asyncio.Future[None] | None

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.granted = False
        self.loop = loop
        if loop is None:
            self.lock = _thread.allocate_lock()
            self.lock.acquire()
            self.fut = None
        else:
            self.lock = None
            self.fut = loop.create_future()

    def gone(self) -> bool:
        """An async waiter that can no longer take a permit (woken by its timer, cancelled, dead loop)."""
        return self.fut is not None and (self.fut.done() or self.loop.is_closed())  # type: ignore[union-attr]

    def wake(self) -> bool:
        if self.lock is not None:
            self.lock.release()
            return True
        if _get_running_loop() is self.loop:
            # the releaser runs on the waiter's own loop (the common case): set the future directly.
            # call_soon_threadsafe would write the loop's self-pipe per hand-off (a syscall, ~10 us).
            _wake(self.fut)  # type: ignore[arg-type]
            return True
        try:
            self.loop.call_soon_threadsafe(_wake, self.fut)  # type: ignore[union-attr, arg-type]  # async: both set
        except RuntimeError:        # the loop closed in between
            return False
        return True


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:        # no running loop (a coroutine driven by hand)
        return None


class Bulkhead(_StageBase, Policy):
    """At most `max_concurrent` calls at once; others wait up to `max_wait` seconds (first come,
    first served), then get `BulkheadFullError`.

    Use as ``with bh:``, ``async with bh:``, ``@bh``, ``bh.call(fn, ...)``, ``await bh.call_async(...)``,
    or two-step: ``if bh.try_acquire(): try: ... finally: bh.release()``.

    ``max_wait=None`` waits as long as needed; every wait is also capped by the innermost deadline
    (`buttress.remaining()`). `clock` drives async waits (FakeClock in tests); a thread blocked in a
    sync wait always waits in real time.

    ``store=`` (with ``name=``) shares the permits between processes: ``"shm://NAME"`` (host-wide, a
    crash-safe lease table gives a killed process's permits back) or a Redis store (cluster-wide,
    leases of ``lease`` seconds renewed while held). ``store=None`` is this process's lock-free counter.
    With a store a waiter polls (a release in another process wakes nobody here).

    ``drain(timeout)`` / ``drain_async`` stop admitting and wait for the calls in flight (shutdown).
    """

    def __init__(self, max_concurrent: int = 10, max_wait: float | None = 0.0, name: str | None = None,
                 clock: Any = None, *, store: Any = None, lease: float | None = None) -> None:
        self._max_wait = check_float("max_wait", max_wait, minimum=0.0, maximum=1e9, allow_none=True)
        self.name = _check_name(name)
        self._clock = resolve_clock(clock)
        self._lock = threading.Lock()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._rejected = itertools.count()  # refusals raised in Python (next() is atomic); the stage counts its own
        self._label = "bulkhead" if self.name is None else f"bulkhead {self.name!r}"
        self._draining = False
        self._drain_deadline: float | None = None
        self._remote = False                # a Redis store: async forms await its round trips
        if store is None:
            if lease is not None:
                raise ValueError(f"lease={lease!r} applies to a Redis store only; store is None")
            # (the local counter has no held / *_async: they are read on a store's counter only)
            self._permits: _PermitCounter = _Permits(  # type: ignore[assignment]
                check_int("max_concurrent", max_concurrent, minimum=1, maximum=_MAX))
            self._shared = False
            # The fast path is the core itself: no Python frame between the caller and the atomic.
            self.try_acquire = self._permits.try_acquire  # type: ignore[method-assign]  # per instance, by design
            acquire = self._permits.try_acquire
        else:
            self._permits, self._remote = _open_store(
                "bulkhead", store, self.name, check_int("max_concurrent", max_concurrent, minimum=1,
                                                        maximum=_SHARED_MAX), lease)
            self._shared = True
            self.try_acquire = acquire = self._shared_try  # type: ignore[method-assign]  # per instance
        self._release_permit = self._permits.release
        # `with bh:`, `async with bh:`, `@bh` and call / call_async run in the compiled stage
        # (buttress._core.guard): the permit word is used directly; only waiting (refused), handing permits
        # to waiters and a drain's refusal come back to Python. A Redis store awaits its round trips:
        # its `async with` and async forms stay in Python.
        self._stage_setup(acquire, self._wait_for_permit, self._permits.release,
                          self._waiters, self._drain, self._settle_result,
                          refuse_async=self._call_waiting, settle_async=self._settle_async_result,
                          aenter_wait=self._aenter_wait,
                          remote=(self._remote_aenter, self._remote_aexit) if self._remote else None)
        self._set_full_message()
        # bh.call(fn, ...) is the same compiled guard with the function as its first argument
        self.call = self._stage_call()  # type: ignore[method-assign]
        if not self._remote:
            self.call_async = self._stage_call_async()  # type: ignore[method-assign]

    def _set_full_message(self) -> None:
        """The refusal of a full bulkhead, formatted once (and again on a resize): with max_wait=0 the
        compiled stage raises it itself, no Python call and no lock per refusal."""
        self._full_message = f"{self._label} is full ({self.max_concurrent} concurrent calls)"
        if self._max_wait == 0.0 and not self._shared:
            self._stage_reject(BulkheadFullError, self._full_message)

    def _shared_try(self) -> bool:
        """The store's counter has no closed state: a draining bulkhead refuses here."""
        return not self._draining and self._permits.try_acquire()

    # -- the two-step API ---------------------------------------------------------------------------

    def try_acquire(self) -> bool:  # replaced per instance by the core's method
        """Take a permit if one is free now; never waits. Does not queue behind waiters."""
        return self._permits.try_acquire()

    # Return a permit; hands it to the longest waiter if there is one. The compiled stage's release: the
    # permit word in C, Python only for a queued waiter.
    release = _StageBase._stage_release

    def acquire(self, timeout: float | None = _DEFAULT) -> None:
        """Take a permit, waiting up to `timeout` seconds (default: max_wait; None: no limit).
        Raises BulkheadFullError when none came in time."""
        timeout = self._timeout(timeout)
        if not self.try_acquire():
            self._acquire_slow(timeout)

    async def acquire_async(self, timeout: float | None = _DEFAULT) -> None:
        """Like `acquire`, waiting without blocking the event loop."""
        timeout = self._timeout(timeout)
        if self._remote:
            await self._remote_acquire(timeout)
        elif not self.try_acquire():
            await self._acquire_slow_async(timeout)

    async def _remote_acquire(self, timeout: float | None) -> None:
        """A Redis store in an async form: every round trip awaited, never blocking the loop."""
        if self._draining or not await self._permits.try_acquire_async():
            await self._poll_async(timeout)

    async def _remote_release(self) -> None:
        await self._permits.release_async()

    def _timeout(self, timeout: object) -> float | None:
        if timeout is _DEFAULT:
            return self._max_wait
        return check_float("timeout", timeout, minimum=0.0, maximum=1e9, allow_none=True)

    # -- the guarded forms (each inlines `release` to save a call on the hot path) -------------------

    # __enter__ / __exit__ come from the compiled stage base: try the permit word, wait (Python) only
    # when refused; release, then hand the permit to a waiter (Python) only when one is queued.

    def _wait_for_permit(self) -> None:
        self._acquire_slow(self._max_wait)

    # `async with` comes from the compiled stage base too: __aenter__ takes the permit and records the
    # acquisition under the entering frame in C and returns a completed compiled awaitable; __aexit__
    # consumes its frame's record (or one whose frame finished: exit stacks), else releases nothing (a second
    # exit). Python runs only to wait (`_aenter_wait`) and for a Redis store (`_remote_aenter`/`_remote_aexit`).

    async def _aenter_wait(self, frame: Any) -> Bulkhead:
        """`async with` refused at once: wait up to max_wait, then record the acquisition for `frame`."""
        await self._acquire_slow_async(self._max_wait)
        try:
            self._stage_record(frame)
        except BaseException:
            self.release()
            raise
        return self

    async def _remote_aenter(self) -> Bulkhead:
        frame = sys._getframe(1)        # the frame awaiting `async with`
        await self._remote_acquire(self._max_wait)
        try:
            self._stage_record(frame)
        except BaseException:
            await self._remote_release()
            raise
        return self

    async def _remote_aexit(self, exc_type: object, exc: object, tb: object) -> None:
        if self._stage_consume(sys._getframe(1)):
            await self._remote_release()

    async def _call_waiting(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """call_async / an async decorated call refused a permit at once: wait for one (or raise), then
        run as the compiled path does."""
        await self._acquire_slow_async(self._max_wait)
        held = True
        try:
            aw = fn(*args, **kwargs)
            if type(aw) is not CORO and not isawaitable(aw):
                held = False            # settle_async owns the permit now
                return settle_async(self, fn, aw, self._stream_done)
            return await aw
        finally:
            if held:
                self.release()

    def _settle_async_result(self, fn: Any, result: Any) -> Any:
        """An async form's result without an await slot, permit held (the compiled stage's settle_async)."""
        return settle_async(self, fn, result, self._stream_done)

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run fn(*args, **kwargs) holding a permit (replaced per instance by the compiled stage's call
        entry, which does exactly this)."""
        if not callable(fn):
            raise not_callable(self, "call", fn)
        if not self.try_acquire():
            self._acquire_slow(self._max_wait)
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            self._release_permit()
            if self._waiters:
                self._drain()
            raise
        if lazy_result(result):
            settled: T = self._settle_result(fn, result)     # a stream holds the permit; an awaitable is refused
            return settled
        self._release_permit()
        if self._waiters:
            self._drain()
        return result

    async def call_async(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Await fn(*args, **kwargs) holding a permit (replaced per instance by the compiled stage's async
        entry, except on a Redis store)."""
        if not callable(fn):
            raise not_callable(self, "call_async", fn)
        if self._remote:
            remote: T = await self._remote_call_async(fn, args, kwargs)
            return remote
        if not self.try_acquire():
            await self._acquire_slow_async(self._max_wait)
        held = True
        try:
            aw = fn(*args, **kwargs)
            if type(aw) is not CORO and not isawaitable(aw):
                held = False            # settle_async owns the permit now
                settled: T = settle_async(self, fn, aw, self._stream_done)
                return settled
            return await aw
        finally:
            if held:
                self._release_permit()
                if self._waiters:
                    self._drain()

    async def _remote_call_async(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        await self._remote_acquire(self._max_wait)
        held = True
        try:
            aw = fn(*args, **kwargs)
            if type(aw) is not CORO and not isawaitable(aw):
                held = False
                return settle_async(self, fn, aw, self._stream_done)
            return await aw
        finally:
            if held:
                await self._remote_release()

    def _settle_result(self, fn: Any, result: Any) -> Any:
        """A sync form's lazy result, permit held (also the compiled stage's `settle`)."""
        return settle_sync(self, fn, result, self._stream_done)

    def _stream_done(self, exc: Any) -> None:
        """A guarded stream ended (or was refused, or collected): its permit goes back."""
        if exc is not COLLECTED:
            self.release()
            return
        # maybe inside the GC, in a thread that may hold self._lock: never block on it
        self._release_permit()
        if self._waiters:
            if self._lock.acquire(False):
                try:
                    self._drain_locked()
                finally:
                    self._lock.release()
            else:
                threading.Thread(target=self._drain, name="buttress-bulkhead-drain", daemon=True).start()

    def __call__(self, fn: F) -> F:
        """Decorate `fn`: a compiled guard (sync or async: one vectorcall, the permit in C); a Redis store's
        async form stays a Python coroutine (its round trips are awaited)."""
        def make_sync(fn: Callable[..., Any]) -> Callable[..., Any]:
            return self._stage_guard(fn)        # compiled: the whole guard is one vectorcall

        def make_async(fn: Callable[..., Any]) -> Any:
            if self._remote:
                async def remote_wrapper(*args: Any, **kwargs: Any) -> Any:
                    return await self._remote_call_async(fn, args, kwargs)
                return remote_wrapper
            return mark_async(self._stage_guard(fn, True), fn)

        return specialize(self, fn, make_sync, make_async)

    # -- waiting (slow path) ---------------------------------------------------------------------------
    #
    # Protocol: a releaser returns its permit to the counter, then looks at the queue (no lock); a waiter
    # enqueues itself and then drains the queue under the lock. Whichever order they interleave in, the
    # permit reaches a waiter: either the releaser sees the queued waiter, or the waiter's drain sees the
    # released permit. `_drain` hands free permits to waiters in queue order.

    def _drain(self) -> None:
        with self._lock:
            self._drain_locked()

    def _drain_locked(self) -> None:
        waiters = self._waiters
        while waiters:
            w = waiters[0]
            if w.gone():
                waiters.popleft()
                continue
            if not self._permits.try_acquire():
                return
            waiters.popleft()
            w.granted = True
            try:
                woken = w.wake()
            except BaseException:
                woken = False
                raise
            finally:
                if not woken:           # nobody will take it: the permit goes back, never lost
                    w.granted = False
                    self._release_permit()

    def _reject(self) -> BulkheadFullError:
        """The refusal: no lock (the count is an atomic next()), the message formatted once."""
        next(self._rejected)
        if self._draining:              # closed until resume(): when it admits again is unknown (DESIGN §3c)
            return rejection(BulkheadFullError, f"{self._label} is draining (shutting down): it admits no new calls")
        return rejection(BulkheadFullError, self._full_message)

    def _poll(self, timeout: float | None) -> None:
        """A shared store's wait: a release in another process wakes nobody here, so try again after
        short sleeps (0.5 ms doubling to 20 ms), until the budget is spent. Real time (a blocked thread)."""
        timeout = _wait_budget(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _POLL_FIRST
        while True:
            if self._draining:
                raise self._reject()
            if self._permits.try_acquire():
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise self._reject()
            time.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, _POLL_MAX)

    async def _poll_async(self, timeout: float | None) -> None:
        timeout = _wait_budget(timeout)
        clock = self._clock
        # the deadline in int ns: float seconds lose ns at once and ~0.2 us on an epoch-sized clock
        deadline = None if timeout is None else clock.monotonic_ns() + math.ceil(timeout * NS)
        delay = _POLL_FIRST
        try_async = getattr(self._permits, "try_acquire_async", None)
        while True:
            if self._draining:
                raise self._reject()
            if await try_async() if try_async is not None else self._permits.try_acquire():
                return
            left = None if deadline is None else deadline - clock.monotonic_ns()
            if left is not None and left <= 0:
                raise self._reject()
            await clock.sleep_async(delay if left is None else min(delay, left / NS))
            delay = min(delay * 2, _POLL_MAX)

    def _enqueue(self, w: _Waiter) -> None:
        with self._lock:
            if self._draining:          # a drain began since the caller looked: not queued, woken at once
                w.wake()
                return
            self._waiters.append(w)
            self._drain_locked()

    def _settle(self, w: _Waiter) -> bool:
        """After waking or failing: True if w holds a permit, else w leaves the queue."""
        with self._lock:
            if w.granted:
                return True
            try:
                self._waiters.remove(w)
            except ValueError:
                pass
            return False

    def _acquire_slow(self, timeout: float | None) -> None:
        if self._shared:
            return self._poll(timeout)
        if self._draining:
            raise self._reject()
        timeout = _wait_budget(timeout)
        if timeout is not None and timeout <= 0:
            raise self._reject()
        w = _Waiter()
        # Everything from queueing to settling is inside the try: an exception at any step (an interrupt
        # while queueing, waiting or settling) leaves the queue and gives back a permit handed over.
        try:
            self._enqueue(w)
            if not w.granted:
                w.lock.acquire(timeout=-1 if timeout is None else timeout)  # type: ignore[union-attr]
            got = self._settle(w)
        except BaseException:
            if self._settle(w):     # a permit handed over while we were interrupted: give it back
                self.release()
            raise
        if not got:
            raise self._reject()

    async def _acquire_slow_async(self, timeout: float | None) -> None:
        if self._shared:
            return await self._poll_async(timeout)
        if self._draining:
            raise self._reject()
        timeout = _wait_budget(timeout)
        if timeout is not None and timeout <= 0:
            raise self._reject()
        w = _Waiter(asyncio.get_running_loop())
        timer = None
        try:
            self._enqueue(w)
            if not w.granted:
                if timeout is not None:
                    timer = call_later(self._clock, timeout, lambda: _wake(w.fut))  # type: ignore[arg-type]
                await w.fut  # type: ignore[misc]
            got = self._settle(w)
        except BaseException:       # cancelled (or anything else) while queued or waiting
            if self._settle(w):     # a permit handed over meanwhile: pass it on, never swallow it
                self.release()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if not got:
            raise self._reject()

    # -- graceful shutdown ------------------------------------------------------------------------------

    def _begin_drain(self, timeout: object) -> float | None:
        deadline = _drain_deadline(self._clock, timeout)
        with self._lock:
            self._drain_deadline = deadline
            self._draining = True
            if not self._shared:
                self._permits.close()   # the fast path refuses from now on, at no cost to it
            waiters = list(self._waiters)
            self._waiters.clear()
        for w in waiters:               # queued callers are refused now (BulkheadFullError, retry_after None)
            w.wake()
        return deadline

    def _running_here(self) -> int:
        """Calls of this process holding a permit (a shared store: this process's share only)."""
        return self._permits.held if self._shared else self._permits.in_use

    def drain(self, timeout: float | None = None) -> int:
        """Graceful shutdown: stop admitting (new calls and queued waiters get BulkheadFullError with
        ``retry_after`` None: the bulkhead stays closed after the drain until `resume()`, so when it
        admits again is unknown), then wait up to `timeout` seconds (None: as long
        as it takes) for this process's calls in flight to finish. Returns how many were still running
        at the deadline (0: all finished). The bulkhead keeps refusing until `resume()`."""
        deadline = self._begin_drain(timeout)
        delay = 0.001
        while True:
            n = self._running_here()
            left = _seconds_left(self._clock, deadline)
            if n == 0 or left == 0.0:
                return n
            self._clock.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, 0.05)

    async def drain_async(self, timeout: float | None = None) -> int:
        """`drain` without blocking the event loop (waits on the bulkhead's clock)."""
        deadline = self._begin_drain(timeout)
        delay = 0.001
        while True:
            n = self._running_here()
            left = _seconds_left(self._clock, deadline)
            if n == 0 or left == 0.0:
                return n
            await self._clock.sleep_async(delay if left is None else min(delay, left))
            delay = min(delay * 2, 0.05)

    def resume(self) -> None:
        """Admit again after a drain."""
        with self._lock:
            self._draining = False
            self._drain_deadline = None
            if not self._shared:
                self._permits.reopen()

    @property
    def draining(self) -> bool:
        return self._draining

    # -- configuration and metrics ---------------------------------------------------------------------

    @property
    def max_concurrent(self) -> int:
        return self._permits.max_permits

    @max_concurrent.setter
    def max_concurrent(self, value: int) -> None:
        """Resize at runtime. Growing wakes waiters; shrinking lets current holders finish."""
        self._permits.resize(check_int("max_concurrent", value, minimum=1, maximum=_SHARED_MAX if self._shared else _MAX))
        self._set_full_message()
        self._drain()

    @property
    def max_wait(self) -> float | None:
        return self._max_wait

    @property
    def available(self) -> int:
        return self._permits.available

    @property
    def in_use(self) -> int:
        return self._permits.in_use

    def metrics(self) -> BulkheadMetrics:
        p = self._permits
        with self._lock:
            return BulkheadMetrics(p.available, p.max_permits, p.in_use, len(self._waiters),
                                   count_of(self._rejected) + self._stage_rejected())

    def __repr__(self) -> str:
        return (f"Bulkhead(max_concurrent={self.max_concurrent}, max_wait={self._max_wait!r}, "
                f"name={self.name!r}, in_use={self.in_use})")


# ------------------------------------------------------------------------------------------------------


class ThreadPoolMetrics(NamedTuple):
    """A snapshot of a ThreadPoolBulkhead."""
    max_workers: int
    queue_size: int
    running: int            # calls executing on a worker
    queued: int             # accepted, not yet running
    rejected: int           # BulkheadFullError raised since creation


class _Slot:
    """One accepted call's admission permit, given back exactly once: by the call when it finishes
    (before its future is resolved, so the caller can submit again at once), by the future's done
    callback when it was cancelled before running, or by `submit` when the pool refused the call."""

    __slots__ = ("_held", "_permits")

    def __init__(self, permits: Any) -> None:
        self._held = [True]
        self._permits = permits

    def free(self) -> None:
        try:
            self._held.pop()        # atomic: of racing callers, exactly one gets it
        except IndexError:
            return
        self._permits.release()

    def free_if_cancelled(self, fut: concurrent.futures.Future[Any]) -> None:
        if fut.cancelled():         # never ran: the call cannot give it back itself
            self.free()


# every live pool, so a forked child can rebuild them (their threads do not survive fork)
_POOLS: "weakref.WeakSet[ThreadPoolBulkhead]" = weakref.WeakSet()


def _reset_pools_after_fork() -> None:
    for pool in list(_POOLS):
        pool._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pools_after_fork)


class ThreadPoolBulkhead(Policy):
    """Runs calls on its own pool of `max_workers` threads with room for `queue_size` waiting calls;
    a call submitted when the queue is full is rejected with `BulkheadFullError`.

    The pool is a `concurrent.futures.ThreadPoolExecutor` (its shutdown, cancellation and
    submit-during-shutdown rules); in front of it one lock-free permit counter admits at most
    `max_workers + queue_size` calls at once. Give each dependency its own pool: a hung dependency then
    holds only its own threads. The caller's contextvars (deadline, current attempt, ...) are copied
    into the worker.
    """

    def __init__(self, max_workers: int = 10, queue_size: int = 100, name: str | None = None) -> None:
        self._max_workers = check_int("max_workers", max_workers, minimum=1, maximum=1 << 16)
        self._queue_size = check_int("queue_size", queue_size, minimum=0, maximum=_MAX)
        self.name = _check_name(name)
        # accepted = running + queued, bounded by workers + queue: one lock-free counter decides admission
        self._accepted = _Permits(self._max_workers + self._queue_size)
        self._running = _Permits(_MAX)
        self._lock = threading.Lock()
        self._rejected = itertools.count()
        self._label = "thread pool bulkhead" if self.name is None else f"thread pool bulkhead {self.name!r}"
        self._full_message = (f"{self._label} is full ({self._max_workers} workers busy, "
                              f"{self._queue_size} calls queued)")      # formatted once
        self._drain_deadline: float | None = None
        self._prefix = "buttress-pool" if self.name is None else f"buttress-{self.name}"
        self._thread_ids = itertools.count()
        self._workers: set[int] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(self._max_workers, thread_name_prefix=self._prefix,
                                                           initializer=self._started)
        _POOLS.add(self)

    def _after_fork_in_child(self) -> None:
        """A forked child (ProcessPoolExecutor, gunicorn's pre-fork workers) inherits the parent's executor
        without its threads and the parent's in-flight counts: start over with an empty pool."""
        self._accepted = _Permits(self._max_workers + self._queue_size)
        self._running = _Permits(_MAX)
        self._lock = threading.Lock()
        self._workers = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(self._max_workers, thread_name_prefix=self._prefix,
                                                           initializer=self._started)

    def _started(self) -> None:
        t = threading.current_thread()
        t.name = f"{self._prefix}-{next(self._thread_ids)}"
        self._workers.add(t.ident)  # type: ignore[arg-type]

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Queue `fn(*args, **kwargs)`; returns its Future. Raises BulkheadFullError when the queue is
        full and RuntimeError after shutdown. `fn` must be a plain sync function: an async def or
        (async) generator function is a TypeError here. Like `Executor.submit`, the Future holds whatever
        fn returned; `call` / `call_async` also refuse an awaitable result (a thread cannot run it)."""
        kind = callable_kind(fn)
        if kind != SYNC:
            raise self._refuse_kind(fn, kind)
        if not self._accepted.try_acquire():
            next(self._rejected)        # no lock: next() is atomic
            if self._accepted.closed:   # closed until resume(): retry_after None (unknown)
                raise rejection(BulkheadFullError, f"{self._label} is draining (shutting down): it admits no new "
                                f"calls")
            raise rejection(BulkheadFullError, self._full_message)
        slot = _Slot(self._accepted)
        try:
            fut = self._pool.submit(self._run, slot, contextvars.copy_context(), fn, args, kwargs)
        except RuntimeError as exc:     # shut down (the executor checks under its lock, as it starts workers)
            slot.free()
            raise RuntimeError(f"{self!r} is shut down: {exc}") from None
        except BaseException:
            slot.free()
            raise
        fut.add_done_callback(slot.free_if_cancelled)
        return fut

    def _refuse_kind(self, fn: Any, kind: str) -> UsageError:
        what = {ASYNC: "an async def function", ASYNC_GENERATOR: "an async generator function",
                GENERATOR: "a generator function"}[kind]
        if kind == GENERATOR:
            return UsageError(f"ThreadPoolBulkhead cannot run {describe(fn)}, {what}: a worker would only create "
                              f"the generator, and its body would run where it is iterated, outside the pool. "
                              f"Collect the items into a list inside a plain function, or iterate it under a "
                              f"buttress.Bulkhead, which holds its permit over the whole iteration")
        return UsageError(f"ThreadPoolBulkhead runs sync functions on worker threads; {describe(fn)} is {what}, "
                          f"which a thread cannot run: await it on the event loop instead (e.g. "
                          f"`await bulkhead.call_async(fn, ...)` with a buttress.Bulkhead)")

    @staticmethod
    def _checked(fn: Any, result: T) -> T:
        """The guarded forms' result: an awaitable (fn was async after all) is a UsageError, closed."""
        if type(result) is not _GEN and lazy_result(result):
            if type(result) is CORO:
                result.close()  # type: ignore[attr-defined]  # a coroutine (CORO); never started: no "never awaited" warning
            raise UsageError(f"ThreadPoolBulkhead: {describe(fn)} is async (it returned "
                             f"{type(result).__name__}), so a worker thread cannot run it and would return it "
                             f"un-awaited: await it on the event loop instead (a pattern's "
                             f"`await ....call_async(fn, ...)`, e.g. Bulkhead or Timeout)")
        return result

    def _run(self, slot: _Slot, ctx: contextvars.Context, fn: Callable[..., Any], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        self._running.try_acquire()
        try:
            return ctx.run(fn, *args, **kwargs)
        finally:
            # free the slot before the caller hears the result, so it can submit again at once
            self._running.release()
            slot.free()

    def call(self, fn: Callable[..., T], /, *args: Any, timeout: float | None = None, **kwargs: Any) -> T:
        """Run `fn` on the pool and wait for its result up to `timeout` seconds (capped by the innermost
        deadline), else raise TimeoutExceeded; the call itself runs on in its worker."""
        if not callable(fn):
            raise not_callable(self, "call", fn)
        limit = _wait_budget(check_float("timeout", timeout, minimum=0.0, maximum=1e9, allow_none=True))
        fut = self.submit(fn, *args, **kwargs)
        done, _ = concurrent.futures.wait((fut,), limit)
        if not done:
            fut.cancel()
            raise TimeoutExceeded(f"call did not finish within {limit:.6g}s", timeout=limit)
        return self._checked(fn, fut.result())

    async def call_async(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run the sync `fn` on the pool and await its result without blocking the event loop (the one
        pattern whose call_async takes a sync function: that is its purpose)."""
        if not callable(fn):
            raise not_callable(self, "call_async", fn)
        return self._checked(fn, await asyncio.wrap_future(self.submit(fn, *args, **kwargs)))

    def _begin_drain(self, timeout: object) -> float | None:
        self._drain_deadline = _drain_deadline(_SYSTEM_CLOCK, timeout)
        self._accepted.close()          # submit refuses from now on (BulkheadFullError, retry_after None)
        return self._drain_deadline

    def drain(self, timeout: float | None = None) -> int:
        """Graceful shutdown: stop accepting calls (submit raises BulkheadFullError with ``retry_after``
        None: it stays closed until `resume()`), then wait up to `timeout` seconds (None: as long as it takes) for
        the accepted calls, running and queued, to finish. Returns how many were still accepted at the
        deadline (0: all finished). The workers stay; `shutdown()` stops them, `resume()` accepts again."""
        deadline = self._begin_drain(timeout)
        delay = 0.001
        while True:
            n = self._accepted.in_use
            left = _seconds_left(_SYSTEM_CLOCK, deadline)
            if n == 0 or left == 0.0:
                return n
            time.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, 0.05)

    async def drain_async(self, timeout: float | None = None) -> int:
        """`drain` without blocking the event loop."""
        deadline = self._begin_drain(timeout)
        delay = 0.001
        while True:
            n = self._accepted.in_use
            left = _seconds_left(_SYSTEM_CLOCK, deadline)
            if n == 0 or left == 0.0:
                return n
            await asyncio.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, 0.05)

    def resume(self) -> None:
        """Accept calls again after a drain (not after shutdown())."""
        self._drain_deadline = None
        self._accepted.reopen()

    @property
    def draining(self) -> bool:
        return bool(self._accepted.closed)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting calls. Queued calls still run unless `cancel_futures` (their futures are
        cancelled and their slots freed); `wait` joins the workers (which waits for running calls, however
        long they take). A call submitted while this runs is either accepted before it (and runs) or
        refused with RuntimeError: never left pending."""
        if threading.get_ident() in self._workers:
            wait = False                # a worker cannot join itself
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)

    def __enter__(self) -> ThreadPoolBulkhead:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.shutdown(wait=True)

    @property
    def max_workers(self) -> int:
        return self._max_workers

    @property
    def queue_size(self) -> int:
        return self._queue_size

    def metrics(self) -> ThreadPoolMetrics:
        running = self._running.in_use
        return ThreadPoolMetrics(self._max_workers, self._queue_size, running,
                                 max(0, self._accepted.in_use - running), count_of(self._rejected))

    def __repr__(self) -> str:
        return (f"ThreadPoolBulkhead(max_workers={self._max_workers}, queue_size={self._queue_size}, "
                f"name={self.name!r})")
