"""Timeouts with deadline propagation.

A `Timeout` sets the deadline min(outer deadline, now + seconds) for the duration of the call; inner
timeouts, retry waits and limiter waits see only what remains (`remaining()`).

- ``async def``: the call runs in the caller's task; a timer on the Timeout's clock cancels it at the
  deadline and the cancellation becomes `TimeoutExceeded` (the design of ``asyncio.timeout``, but on any
  clock, so a FakeClock drives it in tests).
- sync functions: the call runs on a worker of a `ThreadPoolBulkhead` and the caller waits for it until
  the deadline. Python cannot stop a thread: **on timeout the worker thread runs on** until the function
  returns, and keeps holding its slot in the pool.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import math
import types
from inspect import isawaitable
import threading
from typing import Any, AsyncIterator, Awaitable, Callable, ParamSpec, TypeVar, overload

from ._base import Policy
from ._context import pop_deadline, push_deadline, remaining, remaining_ns
from ._params import ASYNC, ASYNC_GENERATOR, GENERATOR, NS, callable_kind, check_seconds, describe
from ._spec import UsageError
from ._timers import call_later
from ._wrap import ASYNC_KINDS, CORO, not_callable, check_decoratable, lazy_result, refuse_sync_result, sync_in_async, wraps
from .bulkhead import ThreadPoolBulkhead
from .clock import resolve_clock
from .errors import TimeoutExceeded

__all__ = ["Timeout", "remaining", "default_executor"]

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
T = TypeVar("T")
Y = TypeVar("Y")

_default_lock = threading.Lock()
_default: ThreadPoolBulkhead | None = None


def default_executor() -> ThreadPoolBulkhead:
    """The pool shared by every Timeout created without `executor=` (64 workers, 1024 queued calls)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ThreadPoolBulkhead(max_workers=64, queue_size=1024, name="timeout")
        return _default


class Timeout(Policy):
    """Bound a call to `seconds` (and to any enclosing deadline); raise `TimeoutExceeded` when it is hit.

    `executor` is the `ThreadPoolBulkhead` that runs sync calls (default: a pool shared by all
    Timeouts; give a dependency that may hang its own pool). `clock` drives the async timer and the
    deadline arithmetic; a sync caller waits on its worker in real time.
    """

    def __init__(self, seconds: float, clock: Any = None, executor: ThreadPoolBulkhead | None = None) -> None:
        s = check_seconds("seconds", seconds, allow_zero=False)
        assert s is not None
        self.seconds = s
        self._ns = math.ceil(s * NS)
        self._clock = resolve_clock(clock)
        if executor is not None and not isinstance(executor, ThreadPoolBulkhead):
            raise TypeError(f"executor must be a buttress.ThreadPoolBulkhead or None, got {executor!r}")
        self._executor = executor
        # keyed by the task (None only if __aexit__ ran outside one: then the lookup fails, as it should)
        self._scopes: dict[asyncio.Task[Any] | None, list[_AsyncScope]] = {}

    @property
    def executor(self) -> ThreadPoolBulkhead:
        return self._executor if self._executor is not None else default_executor()

    def _budget_ns(self) -> tuple[int, bool]:
        """(ns this call may take, whether an enclosing deadline is what limits it)."""
        outer = remaining_ns()
        if outer is not None and outer < self._ns:
            return outer, True
        return self._ns, False

    def _error(self, budget_ns: int, by_outer: bool) -> TimeoutExceeded:
        if by_outer:
            return TimeoutExceeded(f"deadline exceeded ({max(budget_ns, 0) / NS:.6g}s were left of an "
                                   f"enclosing deadline; own timeout {self.seconds:.6g}s)",
                                   timeout=max(budget_ns, 0) / NS)
        return TimeoutExceeded(f"call timed out after {self.seconds:.6g}s", timeout=self.seconds)

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run the sync `fn` on the executor; raise TimeoutExceeded at the deadline (the thread runs on).
        For a generator function, return its generator guarded over the whole iteration (`iterate`)."""
        if not callable(fn):
            raise not_callable(self, "call", fn)
        kind = callable_kind(fn)
        if kind in ASYNC_KINDS:
            raise UsageError(f"Timeout.call: {describe(fn)} is {'an async def' if kind == ASYNC else 'an async generator'} "
                             "function: use `await timeout.call_async(fn, ...)` or decorate it")
        if kind == GENERATOR:
            guarded: T = self.iterate(fn, *args, **kwargs)
            return guarded
        budget, by_outer = self._budget_ns()
        if budget <= 0:
            raise self._error(budget, by_outer)
        deadline = self._clock.monotonic_ns() + budget
        token = push_deadline(deadline, self._clock)
        try:
            fut = self.executor.submit(fn, *args, **kwargs)     # copies the context: the worker sees the deadline
        finally:
            pop_deadline(token)
        done, _ = concurrent.futures.wait((fut,), budget / NS)
        if not done:
            fut.cancel()            # if it is still queued it never runs; if it runs, it runs on
            raise self._error(budget, by_outer)
        result: T = fut.result()
        if lazy_result(result):
            if type(result) is types.GeneratorType:     # a stream (from a wrapped generator function):
                stream: T = self._iterate(result, deadline, budget, by_outer)    # the deadline covers it
                return stream
            refuse_sync_result(self, fn, result, generators=False)
        return result

    @overload
    async def call_async(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T: ...
    @overload
    async def call_async(self, fn: Callable[P, AsyncIterator[Y]], /, *args: P.args,
                         **kwargs: P.kwargs) -> AsyncIterator[Y]: ...

    async def call_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Await `fn(*args, **kwargs)` in the caller's task, cancelling it at the deadline. For an async
        generator function, return its generator guarded over the whole iteration (`iterate_async`)."""
        if not callable(fn):
            raise not_callable(self, "call_async", fn)
        aw = fn(*args, **kwargs)
        if type(aw) is not CORO:
            if type(aw) is types.AsyncGeneratorType:
                budget, by_outer = self._budget_ns()
                return self._iterate_async(aw, self._clock.monotonic_ns() + budget, budget, by_outer)
            if not isawaitable(aw):
                raise sync_in_async(self, fn, aw)
        try:
            scope = _AsyncScope(self)
        except BaseException:
            if type(aw) is CORO:
                aw.close()      # never started: no "never awaited" warning
            raise
        try:
            result = await aw
        except BaseException as exc:
            scope.exit(exc)
            raise
        scope.exit(None)
        return result

    def __call__(self, fn: F) -> F:
        """Decorate `fn`: sync functions run on the executor, async ones in the caller's task, and
        generator / async generator functions are guarded over their whole iteration."""
        kind = check_decoratable(self, fn, generators=True)
        if kind == GENERATOR:
            iterate = self.iterate

            def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
                return (yield from iterate(fn, *args, **kwargs))

            return wraps(fn)(gen_wrapper)
        if kind == ASYNC_GENERATOR:
            iterate_async = self.iterate_async

            async def agen_wrapper(*args: Any, **kwargs: Any) -> Any:
                agen = iterate_async(fn, *args, **kwargs)
                try:
                    value = None
                    while True:
                        try:
                            item = await agen.asend(value)
                        except StopAsyncIteration:
                            return
                        value = yield item
                finally:
                    await agen.aclose()

            return wraps(fn)(agen_wrapper)
        return Policy.__call__(self, fn)

    # -- generators: the timeout covers the whole iteration ------------------------------------------------

    def iterate(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Iterate the generator `fn(*args, **kwargs)` under one deadline (now + seconds, or an
        enclosing deadline if sooner) that covers the whole iteration, consumer time included.

        A sync generator runs in its consumer's thread and cannot be interrupted: the deadline is checked
        before each step (``next`` / ``send``) and after it (a step that finished past the deadline
        does not hand out its item), and during each step `remaining()` reports the time left, so the
        generator can bound its own blocking calls with it. A step that blocks for ever blocks for ever.
        On timeout the generator is closed (its ``finally`` blocks run) and TimeoutExceeded is raised."""
        budget, by_outer = self._budget_ns()
        clock = self._clock
        deadline = clock.monotonic_ns() + budget
        return self._iterate(fn(*args, **kwargs), deadline, budget, by_outer)

    def _iterate(self, gen: Any, deadline: int, budget: int, by_outer: bool) -> Any:
        clock = self._clock
        try:
            value = None
            while True:
                if clock.monotonic_ns() >= deadline:
                    raise self._error(budget, by_outer)
                token = push_deadline(deadline, clock)
                try:
                    item = gen.send(value)
                except StopIteration as stop:
                    return stop.value
                finally:
                    pop_deadline(token)
                if clock.monotonic_ns() > deadline:
                    raise self._error(budget, by_outer)
                value = yield item
        finally:
            gen.close()

    def iterate_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Iterate the async generator `fn(*args, **kwargs)` under one deadline that covers the whole
        iteration: each step (``__anext__`` / ``asend``) runs with what remains of it and is cancelled at
        the deadline (then TimeoutExceeded; the generator's ``finally`` blocks run). Time the consumer
        spends between steps counts too: the next step gets only what is left."""
        budget, by_outer = self._budget_ns()
        deadline = self._clock.monotonic_ns() + budget
        return self._iterate_async(fn(*args, **kwargs), deadline, budget, by_outer)

    async def _iterate_async(self, agen: Any, deadline: int, budget: int, by_outer: bool) -> Any:
        try:
            value = None
            while True:
                scope = _AsyncScope(self, deadline, budget, by_outer)
                try:
                    item = await agen.asend(value)
                except StopAsyncIteration:
                    scope.exit(None)
                    return
                except BaseException as exc:
                    scope.exit(exc)
                    raise
                scope.exit(None)
                value = yield item
        finally:
            await agen.aclose()

    async def __aenter__(self) -> Timeout:
        """``async with timeout:`` bounds the block like call_async bounds a call."""
        scope = _AsyncScope(self)
        self._scopes.setdefault(scope.task, []).append(scope)     # per task: one Timeout serves many
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        task = asyncio.current_task()
        stack = self._scopes[task]
        scope = stack.pop()
        if not stack:
            del self._scopes[task]
        scope.exit(exc)

    def __enter__(self) -> None:
        raise TypeError("a Timeout cannot interrupt a block of sync code: use `async with`, "
                        "timeout.call(fn, ...) (runs fn on a worker thread) or the decorator")

    def __exit__(self, *exc: object) -> None:   # pragma: no cover - __enter__ always raises
        pass

    def __repr__(self) -> str:
        return f"Timeout({self.seconds!r})"


class _AsyncScope:
    """One timed stretch of a task: pushes the deadline and arms a timer that cancels the task; `exit`
    disarms them and turns the timer's own cancellation into TimeoutExceeded (as asyncio.timeout does)."""

    __slots__ = ("owner", "task", "budget", "total", "by_outer", "fired", "cancelling", "token", "timer")

    def __init__(self, owner: Timeout, deadline: int | None = None, total: int = 0, by_outer: bool = False) -> None:
        if deadline is None:
            self.budget, self.by_outer = owner._budget_ns()
        else:       # one step of an iteration: what is left of the iteration's deadline
            left = deadline - owner._clock.monotonic_ns()
            if left <= 0:
                raise owner._error(total, by_outer)
            self.budget, self.by_outer = left, by_outer
        self.total = total if deadline is not None else self.budget
        if self.budget <= 0:
            raise owner._error(self.budget, self.by_outer)
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("an async Timeout must run inside an asyncio task")
        self.owner, self.task, self.fired = owner, task, False
        self.cancelling = task.cancelling() if hasattr(task, "cancelling") else 0     # 3.11+
        clock = owner._clock
        self.token = push_deadline(clock.monotonic_ns() + self.budget, clock)
        self.timer = call_later(clock, self.budget / NS, self._fire)

    def _fire(self) -> None:
        self.fired = True
        self.task.cancel()

    def exit(self, exc: BaseException | None) -> None:
        self.timer.cancel()
        pop_deadline(self.token)
        if not self.fired:
            return
        # take back our cancel request; the cancellation is ours only if nobody else asked for one too
        uncancel = getattr(self.task, "uncancel", None)
        ours = uncancel is None or uncancel() <= self.cancelling
        if ours and isinstance(exc, asyncio.CancelledError):
            raise self.owner._error(self.total, self.by_outer) from None
