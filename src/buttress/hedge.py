"""Hedged calls: when the first attempt has not answered after `delay`, start another; the first success
wins (DESIGN §6; Dean & Barroso, "The Tail at Scale"; Polly v8 / Resilience4j / failsafe-go hedging).

What a call through ``Hedge(delay, max_hedges, budget)`` does:

- attempt 1 (the primary) starts at once; hedge k (k = 1 .. max_hedges) starts ``k * delay`` after the
  call began, if no attempt has succeeded by then, at least one attempt is still running, and the shared
  `RetryBudget` (if any) allows one more attempt;
- the first attempt that returns wins; every other attempt is cancelled (async: the primary, which runs
  in the caller's task, gets a CancelledError at its current await and its cleanup runs before the call
  returns; hedges run in their own tasks and are cancelled in the background) or abandoned (sync: all
  attempts run on a `ThreadPoolBulkhead`; Python cannot stop a thread, so a loser runs on until it
  returns, holding its worker; a hedge still queued is cancelled and never runs);
- a failure is not a reason to hedge (that is Retry's job): an attempt that fails while others are still
  running is set aside; when every started attempt has failed, no further hedge starts and the exception
  of **the last attempt to fail** is raised as itself (like Retry's last exception), with a note naming
  the attempt count;
- anything that is not an `Exception` (cancellation, KeyboardInterrupt, custom BaseException subclasses)
  is no outcome (DESIGN §3c): it propagates at once and every other attempt is cancelled / abandoned;
- every attempt sees the same ``buttress.current_attempt().idempotency_key``: under a `Retry` it is the
  Retry's attempt (number and key); otherwise the Hedge keeps its own (number 1 = the primary, 2.. = the
  hedges);
- ``delay="p95"`` (any ``"pNN"``, 0 < NN < 100) hedges after that percentile of the latency of successful
  attempts, read from a small histogram (133 log-spaced buckets, ~19 % wide); until `min_samples`
  (default 100) successes were seen, `initial_delay` (default 0.05 s) is used.

Generator functions are refused with TypeError (a half-consumed stream cannot be hedged).
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import itertools
import math
import re
import threading
import types
import weakref
from typing import Any, Awaitable, Callable, NamedTuple, ParamSpec, TypeVar

from ._base import Policy, is_async_callable
from ._params import NS, SYNC, check_function, check_int, check_seconds, count_of, show
from ._spec import UsageError
from ._timers import call_later
from ._wrap import CORO, not_callable, check_decoratable, lazy_result, refuse_sync_result, sync_in_async, wraps
from .bulkhead import ThreadPoolBulkhead
from .clock import is_system_clock, resolve_clock
from .errors import BulkheadFullError
# the per-call attempt record that current_attempt() reads: one layout, owned by retry.py
from .retry import _ARGS, _CALL, _KEY, _KEY_LOCK, _KWARGS, _NUMBER, _RETRY, _START, RetryBudget, _key_function

__all__ = ["Hedge", "HedgeMetrics"]

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
T = TypeVar("T")
_HAS_NOTES = hasattr(BaseException, "add_note")
_PERCENTILE = re.compile(r"^p(\d+(?:\.\d+)?)$")
_BACKGROUND: set[asyncio.Task[Any]] = set()        # hedge tasks still running (the loop keeps only weak references to tasks)
_default_lock = threading.Lock()
_default: ThreadPoolBulkhead | None = None


def default_executor() -> ThreadPoolBulkhead:
    """The pool shared by every sync Hedge created without `executor=` (64 workers, 1024 queued calls)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ThreadPoolBulkhead(max_workers=64, queue_size=1024, name="hedge")
        return _default


class HedgeMetrics(NamedTuple):
    """A snapshot of one Hedge since it was created."""

    hedges_started: int     # hedged attempts started (the primary is not counted)
    hedges_won: int         # calls a hedge won (the primary lost)
    cancelled: int          # attempts cancelled (async) or abandoned (sync) because another won or the call ended
    budget_denied: int      # hedges not started because the RetryBudget was empty
    delay: float            # the delay in use now (seconds): fixed, or the percentile estimate


class _Histogram:
    """Latencies of successful attempts in log-spaced buckets; `estimate_ns` is the quantile's bucket
    upper bound (conservative: hedge a little late rather than early), refreshed every 64 samples.

    Lock-free enough: `counts[i] += 1` can lose an increment when two threads race on it, which only
    nudges the estimate; counts are halved every 4096 samples so the estimate follows the service."""

    N = 133                 # bucket 0: < 1024 ns; then 4 buckets per power of two up to 2**44 ns (~4.9 h)
    __slots__ = ("q", "counts", "n", "estimate_ns")

    def __init__(self, q: float) -> None:
        self.q = q
        self.counts = [0] * self.N
        self.n = 0
        self.estimate_ns: int | None = None

    def record(self, ns: int) -> None:
        if ns < 1024:
            i = 0
        else:
            b = ns.bit_length()
            i = (b - 11) * 4 + ((ns >> (b - 3)) & 3) + 1
            if i >= self.N:
                i = self.N - 1
        self.counts[i] += 1
        n = self.n = self.n + 1
        if not n & 63:
            self._refresh()

    @staticmethod
    def upper_ns(i: int) -> int:
        if i == 0:
            return 1024
        b, sub = divmod(i - 1, 4)
        return (5 + sub) << (b + 8)

    def _refresh(self) -> None:
        counts = list(self.counts)
        total = sum(counts)
        if not total:
            return
        target = max(1, math.ceil(total * self.q / 100.0))
        seen = 0
        for i, c in enumerate(counts):
            seen += c
            if seen >= target:
                self.estimate_ns = self.upper_ns(i)
                break
        if total >= 4096:
            for i in range(self.N):
                self.counts[i] //= 2


def _parse_delay(delay: object) -> tuple[float | None, float | None]:
    """-> (fixed seconds, None) or (None, percentile)."""
    if isinstance(delay, str):
        m = _PERCENTILE.match(delay)
        q = float(m.group(1)) if m else None
        if q is None or not 0.0 < q < 100.0:
            raise ValueError(f"delay must be seconds in [0, 1e9] or a percentile string 'pNN' with 0 < NN < 100 "
                             f"(e.g. 'p95', 'p99.9'), got {show(delay)}")
        return None, q
    return check_seconds("delay", delay), None


class Hedge(Policy):
    """Start a second attempt when the first is slow; the first success wins. See the module docstring
    and docs/hedging.md.

    `delay`: seconds, or ``"pNN"``: that percentile of successful attempts' latency (`initial_delay`
    until `min_samples` successes). `max_hedges`: extra attempts at most (hedge k starts at k * delay).
    `budget`: a `RetryBudget` shared with retries (every call deposits, every hedge withdraws; a call
    under a Retry holding the same budget does not deposit twice). `idempotency_key`: as for Retry.
    `executor`: the `ThreadPoolBulkhead` sync attempts run on (default: a pool shared by sync Hedges).
    `on_discard(result)`: called with the result of a losing attempt that still returned after the call
    had its answer (a sync loser running on, an async one finishing in the same loop turn), e.g. to
    close a response; its errors are swallowed.
    """

    __slots__ = ("delay", "max_hedges", "budget", "initial_delay", "min_samples", "_delay_ns", "_hist",
                 "_key_fn", "_executor", "_clock", "_now_ns", "_started", "_won", "_cancelled", "_denied",
                 "_on_discard", "_last", "_regs", "_regs_lock")

    def __init__(self, delay: float | str = 0.05, max_hedges: int = 1, budget: RetryBudget | None = None, *,
                 initial_delay: float = 0.05, min_samples: int = 100,
                 idempotency_key: Callable[..., str] | None = None,
                 executor: ThreadPoolBulkhead | None = None, on_discard: Callable[[Any], Any] | None = None,
                 clock: Any = None) -> None:
        fixed, q = _parse_delay(delay)
        self.delay = delay
        self.max_hedges = check_int("max_hedges", max_hedges, minimum=1, maximum=100)
        if budget is not None and not isinstance(budget, RetryBudget):
            raise TypeError(f"budget must be a buttress.RetryBudget or None, got {show(budget)}")
        self.budget = budget
        init = check_seconds("initial_delay", initial_delay)
        assert init is not None
        self.initial_delay = init
        self.min_samples = check_int("min_samples", min_samples, minimum=1)
        self._delay_ns = math.ceil((fixed if fixed is not None else init) * NS)
        self._hist = _Histogram(q) if q is not None else None
        self._key_fn = _key_function(check_function("idempotency_key", idempotency_key, kinds=(SYNC,),
                                                    role="idempotency_key(*args, **kwargs) -> str"))
        if executor is not None and not isinstance(executor, ThreadPoolBulkhead):
            raise TypeError(f"executor must be a buttress.ThreadPoolBulkhead or None, got {show(executor)}")
        self._executor = executor
        self._on_discard = check_function("on_discard", on_discard, nargs=1, role="on_discard(result)")
        self._clock = resolve_clock(clock)
        self._now_ns = self._clock.monotonic_ns
        self._started, self._won = itertools.count(), itertools.count()
        self._cancelled, self._denied = itertools.count(), itertools.count()
        # async primaries not answered yet, per event loop (see _Registry); _last: (thread, loop, registry)
        self._regs: weakref.WeakKeyDictionary[Any, _Registry] = weakref.WeakKeyDictionary()
        self._regs_lock = threading.Lock()
        self._last: tuple[Any, Any, Any] = (None, None, None)

    # -- what every attempt sees -------------------------------------------------------------------------

    def _make_key(self, call: list[Any]) -> str:
        """current_attempt() calls this (as Retry's) to make the call's key on first read."""
        key = self._key_fn(*(call[_ARGS] or ()), **(call[_KWARGS] or {}))
        if not isinstance(key, str):
            raise TypeError(f"idempotency_key must return a str, got {show(key)} ({type(key).__name__})")
        with _KEY_LOCK:
            if call[_KEY] is None:
                call[_KEY] = key
            made: str = call[_KEY]
            return made

    def _attempt_record(self, call: list[Any], own: bool, number: int) -> list[Any]:
        """The record attempt `number` runs with: the call's own record for the primary, a new one sharing
        its key for a hedge, or (under a Retry) the Retry's record itself (its number and key)."""
        if not own or number == 1:
            return call
        key = call[_KEY] if call[_KEY] is not None else self._make_key(call)
        return [number, key, call[_START], self, call[_ARGS], call[_KWARGS], None]

    def _discard(self, result: Any) -> None:
        if self._on_discard is not None:
            try:
                self._on_discard(result)
            except Exception:  # noqa: BLE001 - a loser's cleanup must not fail the winner's call
                pass

    def _deposit(self, outer: list[Any] | None) -> None:
        budget = self.budget
        if budget is not None and (outer is None or getattr(outer[_RETRY], "budget", None) is not budget):
            budget.deposit()

    def _next_delay_ns(self) -> int:
        hist = self._hist
        if hist is not None and hist.n >= self.min_samples and hist.estimate_ns is not None:
            return hist.estimate_ns
        return self._delay_ns

    # -- entry points ------------------------------------------------------------------------------------

    def __call__(self, fn: F) -> F:
        """Decorate `fn` (sync, async, methods); generator functions are refused (TypeError)."""
        check_decoratable(self, fn)
        wrapper = self._async_wrapper(fn) if is_async_callable(fn) else self._sync_wrapper(fn)
        return wraps(fn)(wrapper)

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run the sync `fn(*args, **kwargs)` hedged; its attempts run on the executor."""
        if not callable(fn):
            raise not_callable(self, "call", fn)
        result: T = self._run_sync(fn, args, kwargs)
        return result

    async def call_async(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Await the async `fn(*args, **kwargs)` hedged."""
        if not callable(fn):
            raise not_callable(self, "call_async", fn)
        outer = _CALL.get()
        if outer is None:
            call = [1, None, self._now_ns(), self, args, kwargs, None]
            token = _CALL.set(call)
        else:
            call, token = outer, None
        try:
            if self.budget is not None:
                self._deposit(outer)
            t0 = self._now_ns() if self._hist is not None else None
            coro = fn(*args, **kwargs)
            if type(coro) is not CORO:
                coro = _as_coroutine(self, fn, coro)
            try:
                first = coro.send(None)
            except StopIteration as stop:
                if t0 is not None:
                    self._hist.record(self._now_ns() - t0)  # type: ignore[union-attr]  # t0 is set only with a hist
                value: T = stop.value
                return value
            result: T = await self._suspended(coro, first, fn, args, kwargs, call, outer is None, t0)
            return result
        finally:
            if token is not None:
                _CALL.reset(token)

    # the wrapper repeats call_async() with everything bound: one frame fewer on the fast path
    def _async_wrapper(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        hedge, suspended, now_ns, hist = self, self._suspended, self._now_ns, self._hist
        get_call, set_call, reset_call = _CALL.get, _CALL.set, _CALL.reset
        deposit = self._deposit if self.budget is not None else None

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            outer = get_call()
            if outer is None:
                call = [1, None, now_ns(), hedge, args, kwargs, None]
                token = set_call(call)
            else:
                call, token = outer, None
            try:
                if deposit is not None:
                    deposit(outer)
                t0 = now_ns() if hist is not None else None
                coro = fn(*args, **kwargs)
                if type(coro) is not CORO:
                    coro = _as_coroutine(hedge, fn, coro)
                try:
                    first = coro.send(None)
                except StopIteration as stop:
                    if t0 is not None:
                        hist.record(now_ns() - t0)  # type: ignore[union-attr]  # t0 is set only with a hist
                    return stop.value
                return await suspended(coro, first, fn, args, kwargs, call, outer is None, t0)
            finally:
                if token is not None:
                    reset_call(token)

        return wrapper

    def _sync_wrapper(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        run = self._run_sync

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return run(fn, args, kwargs)

        return wrapper

    # -- async: the primary runs in the caller's task; hedges in their own tasks ----------------------------

    async def _suspended(self, coro: Any, first: Any, fn: Callable[..., Any], args: tuple[Any, ...],
                         kwargs: dict[str, Any], call: list[Any], own: bool, t0: int | None) -> Any:
        """The primary waits (its first step yielded `first`): register it so that the registry's timer
        starts its first hedge when the delay passes, and await the rest of it directly (no Python code
        per step: `_resume` yields `first` to the Task, then delegates with ``yield from``)."""
        start = t0 if t0 is not None else call[_START] if own else self._now_ns()
        ident = _get_ident()
        last = self._last
        if last[0] == ident and last[1]._thread_id == ident:
            loop, reg = last[1], last[2]
        else:
            loop, reg = self._registry(ident)
        rec = [start, contextvars.copy_context(), call, own, _task_of(loop), None, fn, args, kwargs]
        pending = reg.pending
        pending[coro] = rec
        if not reg.state:
            self._arm(reg, loop)
        elif self._hist is not None:
            self._sooner(reg, loop, start)
        try:
            result = await _resume(coro, first)
        except BaseException as exc:
            race = rec[_R_RACE]
            if race is None:
                del pending[coro]
                if not pending and not self._linger:
                    reg.disarm()
                raise
            return await race.primary_raised(exc)
        race = rec[_R_RACE]
        if race is None:
            del pending[coro]
            if not pending and not self._linger:
                reg.disarm()
            if self._hist is not None:
                self._hist.record(self._now_ns() - start)
            return result
        return race.primary_returned(result)

    def _registry(self, ident: int) -> tuple[asyncio.AbstractEventLoop, _Registry]:
        """(the running loop, the registry of this Hedge's unanswered primaries on it), made on first use.

        asyncio.get_running_loop() costs a getpid() system call per call on Python < 3.12, more than the
        rest of the fast path: the last (thread, loop, registry) is kept in one tuple, valid while that loop
        runs in this thread (an asyncio loop's `_thread_id`; one loop runs per thread at a time)."""
        loop = asyncio.get_running_loop()
        with self._regs_lock:
            reg = self._regs.get(loop)
            if reg is None:
                reg = _Registry()
                try:
                    self._regs[loop] = reg
                except TypeError:       # a loop that cannot be weakly referenced: a registry per switch
                    pass
        if getattr(loop, "_thread_id", None) == ident:
            self._last = (ident, loop, reg)     # one tuple: a racing thread never pairs one loop with another's registry
        return loop, reg

    @property
    def _linger(self) -> bool:
        """A registry timer on the system clock is left to fire when its primaries all answered (cheaper
        than cancelling it per call); on any other clock (a task sleeping on it) it is cancelled, so a
        test's clock has no sleeper left behind."""
        return is_system_clock(self._clock)

    def _sooner(self, reg: _Registry, loop: asyncio.AbstractEventLoop, start: int) -> None:
        """A percentile delay that dropped since the timer was armed: a new primary may be due first."""
        if reg.state == _ARMED and start + self._next_delay_ns() < reg.due:
            reg.disarm()
            self._arm(reg, loop)

    def _arm(self, reg: _Registry, loop: asyncio.AbstractEventLoop) -> None:
        for rec in reg.pending.values():        # the oldest first (insertion order is start order)
            due = rec[_R_START] + self._next_delay_ns()
            reg.state, reg.due = _ARMED, due
            reg.timer = call_later(self._clock, max(0, due - self._now_ns()) / NS,
                                   functools.partial(self._tick, reg, loop))
            return

    def _tick(self, reg: _Registry, loop: asyncio.AbstractEventLoop) -> None:
        """The registry's timer: every primary whose delay has passed starts racing (its first hedge)."""
        if reg.state != _ARMED:
            return
        reg.state, reg.timer = _IDLE, None
        pending = reg.pending
        now, delay = self._now_ns(), self._next_delay_ns()
        due = []
        for coro, rec in pending.items():
            if rec[_R_START] + delay > now:
                break
            due.append((coro, rec))
        for coro, rec in due:
            del pending[coro]
            race = rec[_R_RACE] = _AsyncRace(self, loop, rec)
            race.fire()
        if pending and reg.state == _IDLE:
            self._arm(reg, loop)

    # -- sync: every attempt on the executor; the caller waits -------------------------------------------

    def _run_sync(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        outer = _CALL.get()
        own = outer is None
        call: list[Any] = [1, None, self._now_ns(), self, args, kwargs, None] if outer is None else outer
        if self.budget is not None:
            self._deposit(outer)
        race = _SyncRace(self, fn, args, kwargs, call, own)
        return race.run()

    # -- introspection -----------------------------------------------------------------------------------

    def metrics(self) -> HedgeMetrics:
        return HedgeMetrics(count_of(self._started), count_of(self._won), count_of(self._cancelled),
                            count_of(self._denied), self._next_delay_ns() / NS)

    def __repr__(self) -> str:
        return f"Hedge(delay={self.delay!r}, max_hedges={self.max_hedges}, budget={self.budget!r})"


def _as_coroutine(hedge: Hedge, fn: Any, aw: Any) -> Any:
    """An awaitable that is not a coroutine (a Future, an object with __await__) driven as one; anything
    else is refused (a sync function given to the async form)."""
    if not inspect.isawaitable(aw):
        raise sync_in_async(hedge, fn, aw)

    async def wait() -> Any:
        return await aw
    return wait()


@types.coroutine
def _resume(coro: Any, value: Any) -> Any:
    """Go on awaiting a coroutine whose first step (run with send(None)) yielded `value`: hand `value` to
    the Task, then delegate with ``yield from`` (an asyncio Task resumes with send(None), which is what
    ``yield from`` sends first), so the rest runs without Python code per step."""
    while True:
        try:
            sent = yield value
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # noqa: BLE001 - delivered to the primary, as a Task would
            try:
                value = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        if sent is None:
            break
        try:                            # not an asyncio Task: pass the value on, as yield from would
            value = coro.send(sent)
        except StopIteration as stop:
            return stop.value
    return (yield from coro)


def _current_task_getter() -> Callable[[asyncio.AbstractEventLoop], Any]:
    """current_task(loop) at C speed: the builtin where asyncio has one (3.12+), else the dict the C
    tasks of 3.10 / 3.11 keep (asyncio.current_task is a Python function there)."""
    if isinstance(asyncio.current_task, types.BuiltinFunctionType):
        return asyncio.current_task
    current: dict[Any, Any] = asyncio.tasks._current_tasks  # type: ignore[attr-defined]
    return current.get


_get_ident = threading.get_ident
_task_of = _current_task_getter()
_CAN_UNCANCEL = hasattr(asyncio.Task, "uncancel")      # 3.11+
# a primary's record in its registry: [start ns, context for hedges, attempt record, own record?, task,
# race (None until its first hedge starts), fn, args, kwargs]
_R_START, _R_CTX, _R_CALL, _R_OWN, _R_TASK, _R_RACE, _R_FN, _R_ARGS, _R_KWARGS = range(9)
_IDLE, _ARMED = 0, 1


class _Registry:
    """The primaries of one Hedge on one event loop that are waiting and have not answered yet (keyed by
    their coroutine, oldest first) and the one timer that starts their first hedge.

    A waiting primary costs a dict insert and delete, no timer of its own: the timer is armed for the
    oldest primary, and one already armed for an older primary serves the newer ones (it re-arms for the
    next due when it fires, and finds nothing to do when they all answered). A primary that answers
    without waiting is never registered."""

    __slots__ = ("pending", "state", "due", "timer")

    def __init__(self) -> None:
        self.pending: dict[Any, list[Any]] = {}
        self.state = _IDLE
        self.due = 0
        self.timer: Any = None

    def disarm(self) -> None:
        if self.state == _ARMED:
            self.state = _IDLE
            timer, self.timer = self.timer, None
            if timer is not None:
                timer.cancel()


class _AsyncRace:
    """One hedged async call whose primary did not answer within the delay: the hedge tasks, the timer
    for the next hedge and the outcome. The primary keeps running in the caller's task; a winning hedge
    interrupts it where it waits (cancelling the future its task waits on, as Task.cancel() would)."""

    __slots__ = ("hedge", "fn", "args", "kwargs", "ctx", "call", "own", "start", "loop", "task", "timer", "tasks",
                 "inflight", "done", "result", "error", "waiter", "killed", "by_task_cancel", "cancelling",
                 "primary_running", "counted")

    def __init__(self, hedge: Hedge, loop: asyncio.AbstractEventLoop, rec: list[Any]) -> None:
        self.hedge, self.loop = hedge, loop
        self.fn, self.args, self.kwargs, self.ctx = rec[_R_FN], rec[_R_ARGS], rec[_R_KWARGS], rec[_R_CTX]
        self.call, self.own, self.start, self.task = rec[_R_CALL], rec[_R_OWN], rec[_R_START], rec[_R_TASK]
        self.timer: Any = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.inflight = 1                   # the primary
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[Any] | None = None
        self.killed = self.by_task_cancel = False
        task = self.task
        # cancellation requests the caller's task had when racing began (3.11+): more at the end means
        # someone else cancelled it too, and that cancellation is theirs to see
        self.cancelling = task.cancelling() if task is not None and _CAN_UNCANCEL else 0
        self.primary_running = True
        self.counted: set[asyncio.Task[Any]] = set()           # tasks already counted as cancelled

    def arm(self) -> None:
        """Schedule hedge number len(tasks) + 1 at start + k * delay."""
        hedge = self.hedge
        k = len(self.tasks) + 1
        due = self.start + k * hedge._next_delay_ns()
        self.timer = call_later(hedge._clock, max(0, due - hedge._now_ns()) / NS, self.fire)

    def fire(self) -> None:
        self.timer = None
        if self.done or self.inflight == 0:
            return
        hedge = self.hedge
        if hedge.budget is not None and not hedge.budget.try_withdraw():
            next(hedge._denied)
            return                          # no more hedges for this call
        number = len(self.tasks) + 2
        ctx = self.ctx.copy()
        if self.own:
            ctx.run(_CALL.set, hedge._attempt_record(self.call, True, number))
        task = ctx.run(self.loop.create_task, self._attempt())
        _BACKGROUND.add(task)
        task.add_done_callback(self._hedge_done)
        self.tasks.append(task)
        self.inflight += 1
        next(hedge._started)
        if len(self.tasks) < hedge.max_hedges:
            self.arm()

    async def _attempt(self) -> tuple[Any, int]:
        now_ns = self.hedge._now_ns
        t = now_ns()
        result = await self.fn(*self.args, **self.kwargs)
        return result, now_ns() - t

    def _hedge_done(self, task: asyncio.Task[Any]) -> None:
        _BACKGROUND.discard(task)
        self.inflight -= 1
        if task.cancelled():
            return
        exc = task.exception()              # always retrieved: no "never retrieved" log
        if self.done:
            if exc is None:
                self.hedge._discard(task.result()[0])
            return
        hedge = self.hedge
        if exc is None:
            result, latency = task.result()
            if hedge._hist is not None:
                hedge._hist.record(latency)
            next(hedge._won)
            self._finish(result, None)
        elif not isinstance(exc, Exception):    # no outcome: propagate, stop everything
            self._finish(None, exc)
        elif self.inflight == 0:            # every started attempt failed: the last one is the answer
            self._finish(None, exc)

    def _finish(self, result: Any, error: BaseException | None) -> None:
        self.done = True
        self.result, self.error = result, error
        self._stop_timer()
        self._cancel_tasks()
        if self.primary_running:            # stop the primary where it waits (it runs in the caller's task)
            self._interrupt()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _interrupt(self) -> None:
        """Throw CancelledError into the primary at its current await, as Task.cancel() does."""
        task = self.task
        if task is None:                    # not run by a Task: it cannot be interrupted; it runs to its end
            return
        next(self.hedge._cancelled)
        fut = getattr(task, "_fut_waiter", None)
        if fut is not None and fut.cancel():
            self.killed = True              # the CancelledError arrives through that future
        elif getattr(task, "_must_cancel", False):
            pass                            # someone else's cancellation is about to arrive: it is theirs
        else:                               # the task is about to run (its future is done, or it yielded)
            self.killed = self.by_task_cancel = True
            task.cancel()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _cancel_tasks(self) -> None:
        for t in self.tasks:
            if not t.done() and t not in self.counted:
                self.counted.add(t)
                t.cancel()
                next(self.hedge._cancelled)

    def outcome(self) -> Any:
        if self.error is not None:
            err, self.error = self.error, None
            _note(err, len(self.tasks) + 1)
            try:
                raise err
            finally:
                err = None  # type: ignore[assignment]
        return self.result

    def _ours(self) -> bool:
        """After the primary saw our cancellation (or swallowed it): give back the request we made with
        Task.cancel(), and say whether no one else asked to cancel the caller meanwhile."""
        task = self.task
        if self.by_task_cancel and _CAN_UNCANCEL:
            self.by_task_cancel = False
            task.uncancel()
        return not (_CAN_UNCANCEL and task is not None and task.cancelling() > self.cancelling)

    def primary_returned(self, result: Any) -> Any:
        try:
            if self.done:                   # a hedge won; the primary still returned (it swallowed our cancel)
                self.hedge._discard(result)
                if self.killed:
                    self._ours()
                return self.outcome()
            self.primary_running = False
            self.done = True
            hist = self.hedge._hist
            if hist is not None:
                hist.record(self.hedge._now_ns() - self.start)
            return result
        finally:
            self.close()

    async def primary_raised(self, exc: BaseException) -> Any:
        try:
            if isinstance(exc, asyncio.CancelledError):
                if self.done and self.killed and self._ours():
                    return self.outcome()       # we cancelled the primary because a hedge won
                raise exc
            if not isinstance(exc, Exception):
                raise exc
            if self.done:
                return self.outcome()
            self.primary_running = False
            self.inflight -= 1
            if self.inflight == 0:          # nothing else running: fail as an unhedged call would
                self.done = True
                self._stop_timer()
                if self.tasks:
                    _note(exc, len(self.tasks) + 1)
                raise exc
            self.waiter = self.loop.create_future()
            await self.waiter
            return self.outcome()
        finally:
            exc = None  # type: ignore[assignment]
            self.close()

    def close(self) -> None:
        """On the way out (also on cancellation or a BaseException): nothing keeps running."""
        self.primary_running = False
        self.done = True
        self._stop_timer()
        self._cancel_tasks()


def _note(exc: BaseException, attempts: int) -> None:
    if _HAS_NOTES and attempts > 1:
        notes = getattr(exc, "__notes__", ())
        text = f"buttress.Hedge: all {attempts} attempts failed; this is the last to fail"
        if text not in notes:
            exc.add_note(text)


class _SyncRace:
    """One hedged sync call: attempts on the executor, the caller waits on a condition."""

    __slots__ = ("hedge", "fn", "args", "kwargs", "call", "own", "cond", "futures", "running", "done", "result",
                 "error")

    def __init__(self, hedge: Hedge, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], call: list[Any],
                 own: bool) -> None:
        self.hedge, self.fn, self.args, self.kwargs, self.call, self.own = hedge, fn, args, kwargs, call, own
        self.cond = threading.Condition(threading.Lock())
        self.futures: list[tuple[int, Any]] = []             # (attempt number, Future)
        self.running: set[int] = set()      # attempt numbers submitted and not finished
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> Any:
        hedge = self.hedge
        now_ns = hedge._now_ns
        real = is_system_clock(hedge._clock)
        start = now_ns()
        hedges = 0
        with self.cond:
            self._submit(1)                 # BulkheadFullError here: the pool is full, nothing ran
            while not self.done:
                if hedges < hedge.max_hedges and self.running:
                    due = start + (hedges + 1) * hedge._next_delay_ns()
                    now = now_ns()
                    if now >= due:
                        hedges += 1
                        if not self._start_hedge(hedges + 1):
                            hedges = hedge.max_hedges       # no more hedges for this call
                        continue
                    # the real clock: sleep until due; any other clock moves only when told: look often
                    self.cond.wait((due - now) / NS if real else 0.001)
                else:
                    self.cond.wait()
        if self.error is not None:
            err, self.error = self.error, None
            _note(err, len(self.futures))
            try:
                raise err
            finally:
                err = None  # type: ignore[assignment]
        return self.result

    def _submit(self, number: int) -> None:
        """Called with the condition held (a fast attempt reports only once we wait)."""
        hedge = self.hedge
        executor = hedge._executor if hedge._executor is not None else default_executor()
        token = _CALL.set(hedge._attempt_record(self.call, self.own, number))   # submit copies the context
        self.running.add(number)
        try:
            fut = executor.submit(self._attempt, number)
        except BaseException:
            self.running.discard(number)
            raise
        finally:
            _CALL.reset(token)
        self.futures.append((number, fut))

    def _start_hedge(self, number: int) -> bool:
        """Called with the condition held. False when no hedge can start (budget, pool full)."""
        hedge = self.hedge
        if hedge.budget is not None and not hedge.budget.try_withdraw():
            next(hedge._denied)
            return False
        try:
            self._submit(number)
        except BulkheadFullError:
            return False
        next(hedge._started)
        return True

    def _attempt(self, number: int) -> None:
        """Runs on a worker thread."""
        now_ns = self.hedge._now_ns
        t = now_ns()
        try:
            result = self.fn(*self.args, **self.kwargs)
            if lazy_result(result):
                refuse_sync_result(self.hedge, self.fn, result)     # an async or generator function
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._finished(number, None, exc, 0)
        else:
            self._finished(number, result, None, now_ns() - t)

    def _finished(self, number: int, result: Any, exc: BaseException | None, latency: int) -> None:
        hedge = self.hedge
        with self.cond:
            self.running.discard(number)
            if self.done:                   # a loser that ran on
                if exc is None:
                    hedge._discard(result)
                return
            if exc is None:
                if hedge._hist is not None:
                    hedge._hist.record(latency)
                if number > 1:
                    next(hedge._won)
                self._finish(result, None)
            elif not isinstance(exc, Exception) or type(exc) is UsageError or not self.running:
                self._finish(None, exc)     # no outcome, a wrong use, or every started attempt failed
            else:
                self.error = exc            # set aside: raised only if every attempt fails
            self.cond.notify_all()

    def _finish(self, result: Any, exc: BaseException | None) -> None:
        self.done = True
        self.result, self.error = result, exc
        for n, fut in self.futures:         # losers: cancelled if still queued, else abandoned (they run on)
            if n in self.running:
                fut.cancel()
                next(self.hedge._cancelled)
