"""Bulkheads: cap how many calls run at once, so one slow dependency cannot take every worker.

`Bulkhead` is a permit counter (the lock-free core `Permits`) with a first-come-first-served waiter
queue for callers that may wait. `ThreadPoolBulkhead` runs calls on its own bounded pool of worker
threads with a bounded queue, so a hung dependency occupies only its own pool.
"""
from __future__ import annotations

import _thread
import asyncio
import collections
import concurrent.futures
import contextvars
import queue
import threading
from typing import Any, Callable, NamedTuple

from ._base import Policy, is_async_callable
from ._context import remaining
from ._impl import core
from ._params import check_float, check_int
from ._timers import call_later
from ._wrap import specialize
from .clock import resolve_clock
from .errors import BulkheadFullError, TimeoutExceeded

__all__ = ["Bulkhead", "BulkheadMetrics", "ThreadPoolBulkhead", "ThreadPoolMetrics"]

_Permits = core("permits").Permits
_StageBase = core("guard").StageBase
_MAX = 1 << 40
_DEFAULT: Any = object()        # "use max_wait"


def _check_name(name: object) -> str | None:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {name!r} ({type(name).__name__})")
    return name


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
        try:
            self.loop.call_soon_threadsafe(_wake, self.fut)  # type: ignore[union-attr]
        except RuntimeError:        # the loop closed in between
            return False
        return True


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class Bulkhead(_StageBase, Policy):
    """At most `max_concurrent` calls at once; others wait up to `max_wait` seconds (first come,
    first served), then get `BulkheadFullError`.

    Use as ``with bh:``, ``async with bh:``, ``@bh``, ``bh.call(fn, ...)``, ``await bh.call_async(...)``,
    or two-step: ``if bh.try_acquire(): try: ... finally: bh.release()``.

    ``max_wait=None`` waits as long as needed; every wait is also capped by the innermost deadline
    (`buttress.remaining()`). `clock` drives async waits (FakeClock in tests); a thread blocked in a
    sync wait always waits in real time.
    """

    def __init__(self, max_concurrent: int = 10, max_wait: float | None = 0.0, name: str | None = None,
                 clock: Any = None) -> None:
        self._permits = _Permits(check_int("max_concurrent", max_concurrent, minimum=1, maximum=_MAX))
        self._max_wait = check_float("max_wait", max_wait, minimum=0.0, maximum=1e9, allow_none=True)
        self.name = _check_name(name)
        self._clock = resolve_clock(clock)
        self._lock = threading.Lock()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._rejected = 0
        # The fast path is the core itself: no Python frame between the caller and the atomic.
        self.try_acquire = self._permits.try_acquire
        self._release_permit = self._permits.release
        # `with bh:` and `@bh` on sync functions run in the compiled stage (buttress._core.guard): the permit
        # word is used directly; only waiting (refused) and handing permits to waiters come back to Python.
        self._stage_setup(self._permits.try_acquire, self._wait_for_permit, self._permits.release,
                          self._waiters, self._drain)

    # -- the two-step API ---------------------------------------------------------------------------

    def try_acquire(self) -> bool:  # type: ignore[no-redef]  # replaced per instance by the core's method
        """Take a permit if one is free now; never waits. Does not queue behind waiters."""
        return self._permits.try_acquire()

    def release(self) -> None:
        """Return a permit; hands it to the longest waiter if there is one."""
        self._release_permit()
        if self._waiters:
            self._drain()

    def acquire(self, timeout: float | None = _DEFAULT) -> None:
        """Take a permit, waiting up to `timeout` seconds (default: max_wait; None: no limit).
        Raises BulkheadFullError when none came in time."""
        timeout = self._timeout(timeout)
        if not self.try_acquire():
            self._acquire_slow(timeout)

    async def acquire_async(self, timeout: float | None = _DEFAULT) -> None:
        """Like `acquire`, waiting without blocking the event loop."""
        timeout = self._timeout(timeout)
        if not self.try_acquire():
            await self._acquire_slow_async(timeout)

    def _timeout(self, timeout: object) -> float | None:
        if timeout is _DEFAULT:
            return self._max_wait
        return check_float("timeout", timeout, minimum=0.0, maximum=1e9, allow_none=True)

    # -- the guarded forms (each inlines `release` to save a call on the hot path) -------------------

    # __enter__ / __exit__ come from the compiled stage base: try the permit word, wait (Python) only
    # when refused; release, then hand the permit to a waiter (Python) only when one is queued.

    def _wait_for_permit(self) -> None:
        self._acquire_slow(self._max_wait)

    async def __aenter__(self) -> Bulkhead:
        if not self.try_acquire():
            await self._acquire_slow_async(self._max_wait)
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._release_permit()
        if self._waiters:
            self._drain()

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if not self.try_acquire():
            self._acquire_slow(self._max_wait)
        try:
            return fn(*args, **kwargs)
        finally:
            self._release_permit()
            if self._waiters:
                self._drain()

    async def call_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if not self.try_acquire():
            await self._acquire_slow_async(self._max_wait)
        try:
            return await fn(*args, **kwargs)
        finally:
            self._release_permit()
            if self._waiters:
                self._drain()

    def __call__(self, fn: Any) -> Any:
        """Decorate `fn`: the wrapper inlines `call` / `call_async` (one frame less)."""
        try_acquire, release_permit, waiters = self.try_acquire, self._release_permit, self._waiters

        def make_sync(fn: Callable[..., Any]) -> Callable[..., Any]:
            return self._stage_guard(fn)        # compiled: the whole guard is one vectorcall

        def make_async(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                if not try_acquire():
                    await self._acquire_slow_async(self._max_wait)
                try:
                    return await fn(*args, **kwargs)
                finally:
                    release_permit()
                    if waiters:
                        self._drain()
            return wrapper

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
            if not w.wake():
                w.granted = False
                self._release_permit()

    def _reject(self) -> BulkheadFullError:
        with self._lock:
            self._rejected += 1
        label = "bulkhead" if self.name is None else f"bulkhead {self.name!r}"
        return BulkheadFullError(f"{label} is full ({self.max_concurrent} concurrent calls)")

    def _enqueue(self, w: _Waiter) -> None:
        with self._lock:
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
        timeout = _wait_budget(timeout)
        if timeout is not None and timeout <= 0:
            raise self._reject()
        w = _Waiter()
        self._enqueue(w)
        try:
            if not w.granted:
                w.lock.acquire(timeout=-1 if timeout is None else timeout)  # type: ignore[union-attr]
        except BaseException:
            if self._settle(w):     # a permit handed over while we were interrupted: give it back
                self.release()
            raise
        if not self._settle(w):
            raise self._reject()

    async def _acquire_slow_async(self, timeout: float | None) -> None:
        timeout = _wait_budget(timeout)
        if timeout is not None and timeout <= 0:
            raise self._reject()
        w = _Waiter(asyncio.get_running_loop())
        self._enqueue(w)
        timer = None if timeout is None or w.granted else call_later(self._clock, timeout, lambda: _wake(w.fut))
        try:
            if not w.granted:
                await w.fut  # type: ignore[misc]
        except BaseException:
            if self._settle(w):
                self.release()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if not self._settle(w):
            raise self._reject()

    # -- configuration and metrics ---------------------------------------------------------------------

    @property
    def max_concurrent(self) -> int:
        return self._permits.max_permits

    @max_concurrent.setter
    def max_concurrent(self, value: int) -> None:
        """Resize at runtime. Growing wakes waiters; shrinking lets current holders finish."""
        self._permits.resize(check_int("max_concurrent", value, minimum=1, maximum=_MAX))
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
            return BulkheadMetrics(p.available, p.max_permits, p.in_use, len(self._waiters), self._rejected)

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


class ThreadPoolBulkhead(Policy):
    """Runs calls on its own pool of `max_workers` threads with room for `queue_size` waiting calls;
    a call submitted when the queue is full is rejected with `BulkheadFullError`.

    Give each dependency its own pool: a hung dependency then holds only its own threads. Workers are
    daemon threads started on demand, so a call that never returns cannot keep the process alive.
    The caller's contextvars (deadline, current attempt, ...) are copied into the worker.
    """

    def __init__(self, max_workers: int = 10, queue_size: int = 100, name: str | None = None) -> None:
        self._max_workers = check_int("max_workers", max_workers, minimum=1, maximum=1 << 16)
        self._queue_size = check_int("queue_size", queue_size, minimum=0, maximum=_MAX)
        self.name = _check_name(name)
        # accepted = running + queued, bounded by workers + queue: one lock-free counter decides admission
        self._accepted = _Permits(self._max_workers + self._queue_size)
        self._running = _Permits(self._max_workers)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._rejected = 0
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Queue `fn(*args, **kwargs)`; returns its Future. Raises BulkheadFullError when the queue is
        full and RuntimeError after shutdown."""
        if not self._accepted.try_acquire():
            with self._lock:
                self._rejected += 1
            label = "thread pool bulkhead" if self.name is None else f"thread pool bulkhead {self.name!r}"
            raise BulkheadFullError(f"{label} is full ({self._max_workers} workers busy, "
                                    f"{self._queue_size} calls queued)")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.add_done_callback(self._on_done)
        with self._lock:    # a call queued after shutdown's sentinels would never run
            if self._shutdown:
                self._accepted.release()
                raise RuntimeError(f"{self!r} is shut down")
            self._queue.put((fut, contextvars.copy_context(), fn, args, kwargs))
        if not self._idle.acquire(blocking=False):
            self._spawn()
        return fut

    def _on_done(self, fut: concurrent.futures.Future) -> None:
        if fut.cancelled():         # cancelled while queued: it never ran, so its permit is still held
            self._accepted.release()

    def _spawn(self) -> None:
        with self._lock:
            if self._shutdown or len(self._threads) >= self._max_workers:
                return
            prefix = "buttress-pool" if self.name is None else f"buttress-{self.name}"
            t = threading.Thread(target=self._work, name=f"{prefix}-{len(self._threads)}", daemon=True)
            self._threads.append(t)
        t.start()

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            self._run(*item)
            item = None                 # hold no reference to the call while idle
            self._idle.release()

    def _run(self, fut: concurrent.futures.Future, ctx: contextvars.Context, fn: Callable[..., Any],
             args: tuple, kwargs: dict) -> None:
        if not fut.set_running_or_notify_cancel():
            return                      # cancelled while queued; _on_done returned its slot
        self._running.try_acquire()     # always succeeds: at most max_workers threads run calls
        try:
            result = ctx.run(fn, *args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - delivered through the future
            self._finish()
            fut.set_exception(exc)
        else:
            self._finish()
            fut.set_result(result)

    def _finish(self) -> None:
        # free the slot before the caller hears the result, so it can submit again at once
        self._running.release()
        self._accepted.release()

    def call(self, fn: Callable[..., Any], /, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Run `fn` on the pool and wait for its result up to `timeout` seconds (capped by the innermost
        deadline), else raise TimeoutExceeded; the call itself runs on in its worker."""
        limit = _wait_budget(check_float("timeout", timeout, minimum=0.0, allow_none=True))
        fut = self.submit(fn, *args, **kwargs)
        done, _ = concurrent.futures.wait((fut,), limit)
        if not done:
            fut.cancel()
            raise TimeoutExceeded(f"call did not finish within {limit:.6g}s", timeout=limit)
        return fut.result()

    async def call_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run the sync `fn` on the pool and await its result without blocking the event loop."""
        if is_async_callable(fn):
            raise TypeError(f"ThreadPoolBulkhead runs sync functions in threads; {fn!r} is async")
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting calls. Queued calls still run unless `cancel_futures`; `wait` joins the workers
        (which waits for running calls, however long they take)."""
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in threads:
            self._queue.put(None)
        if wait:
            for t in threads:
                if t is not threading.current_thread():
                    t.join()

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
                                 max(0, self._accepted.in_use - running), self._rejected)

    def __repr__(self) -> str:
        return (f"ThreadPoolBulkhead(max_workers={self._max_workers}, queue_size={self._queue_size}, "
                f"name={self.name!r})")
