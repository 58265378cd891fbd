"""Retry: backoff with jitter, a deadline across attempts, a shared retry budget, idempotency keys.

What a call through `Retry` does (DESIGN §3 / §3b):

- attempt 1 runs at once; after a failed attempt k the wait is ``backoff.delay(k, previous)``, raised to
  the exception's ``retry_after`` when it has one (a lower bound), then attempt k + 1 runs;
- an exception is retried only when it matches `retry_on`; buttress's own rejections (`Rejected`:
  circuit open, rate limited, bulkhead full, overloaded) only when `retry_on` names their class;
- it stops at `max_attempts`, when the next wait would reach the deadline (its own `deadline` or any outer
  one in `buttress._context`), or when the shared `RetryBudget` has no retry left; then the last
  exception is re-raised as itself with a note of the attempt count (the last result is returned when
  `retry_on_result` kept matching);
- every attempt of one call sees the same `current_attempt().idempotency_key`.

The success path is kept lean: one list for the per-call state, one ContextVar set/reset, one clock read,
one counter bump; everything else lives on the failure path.
"""
from __future__ import annotations

import contextvars
import inspect
import itertools
import logging
from inspect import isawaitable
import math
import numbers
import threading
import uuid
from decimal import Decimal
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Awaitable, Callable, ParamSpec, TypeVar

from . import _context
from ._base import NoCopy, Policy, is_async_callable
from ._params import (MAX_SECONDS, NS, check_bool as check_bool_arg, check_float, check_function, check_int, check_real, check_seconds, count_of,
                      describe, show)
from ._spec import UsageError, parse_exceptions
from ._wrap import CORO, check_decoratable, lazy_result, refuse_sync_result, specialize, sync_in_async
from .backoff import Backoff, constant, exponential
from . import clock as _clock_module
from .clock import SYSTEM_CLOCK, resolve_clock
from ._impl import core
from .errors import Rejected

__all__ = ["Retry", "RetryBudget", "RetryMetrics", "Attempt", "current_attempt", "retry_call", "retry_call_async",
           "Attempts", "AttemptBlock", "log_retries", "log_give_up"]

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
T = TypeVar("T")
_HAS_NOTES = hasattr(BaseException, "add_note")     # Python 3.11+

# The per-call state is a plain list (cheapest to build on the success path), indexed by these names.
_NUMBER, _KEY, _START, _RETRY, _ARGS, _KWARGS, _PREV = range(7)
_FIRST = object()           # "no attempt made yet" for the retry loops
_KEY_LOCK = threading.Lock()
# The running call, per thread and per task. A ContextVar (not a thread-local stack, which would be
# cheaper) so that work run with a copied context (asyncio tasks, to_thread, a Timeout's worker
# thread) still sees its call's attempt and idempotency key.
_Call = list[Any]          # [number, key, start_ns, retry, args, kwargs, previous delay]
_CALL_VAR: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("buttress_retry_call", default=None)
# The Python paths use _CALL (get / set / reset, C methods of the compiled AttemptVar); every first attempt,
# compiled or not, sets _CALL_VAR eagerly and resets it when it ends (buttress_attempt.h), so every context
# copied during an attempt (a task, copy_context(), a worker thread) carries it.
_CALL = core("guard").AttemptVar(_CALL_VAR)
_AttemptGuard = core("guard").AttemptGuard
_AttemptCounter = core("guard").AttemptCounter


@dataclass(frozen=True, slots=True)
class Attempt:
    """What a retried call can know about itself: see `current_attempt()`."""

    number: int             # 1 for the first attempt, 2 for the first retry, ...
    idempotency_key: str    # the same for every attempt of one logical call
    elapsed: float          # seconds since the logical call started (waits included)


@dataclass(frozen=True, slots=True)
class RetryMetrics:
    """Snapshot of one `Retry`'s outcomes since it was created."""

    successful_without_retry: int
    successful_with_retry: int
    failed_without_retry: int
    failed_with_retry: int


def current_attempt() -> Attempt | None:
    """The attempt running in this thread / task under the innermost `Retry`, or None outside one."""
    call = _CALL.get()
    if call is None:
        return None
    retry = call[_RETRY]
    key = call[_KEY]
    if key is None:
        key = retry._make_key(call)
    return Attempt(call[_NUMBER], key, (retry._now_ns() - call[_START]) / NS)


class RetryBudget(NoCopy):
    """Caps retries at a fraction of recent first attempts, plus a floor (Finagle's RetryBudget).

    Every logical call deposits `ratio` of a retry; every retry withdraws one. A retry is allowed while
    the balance (``min_per_second * ttl`` retries of reserve, plus deposits, minus withdrawals) holds a
    whole retry. Deposits and withdrawals expire `ttl` seconds after they were made (kept in ten
    slices of ttl/10, so an entry lives between 0.9 * ttl and ttl). So over any stretch shorter than
    `ttl`: retries <= ratio * calls + min_per_second * ttl. Retries still waiting in backoff have
    already withdrawn. Share one budget between every `Retry` that calls the same dependency.
    """

    _UNIT = 1000        # a deposit, in integer units (integers: the accounting never drifts)
    _SLICES = 10

    __slots__ = ("ratio", "min_per_second", "ttl", "_deposit", "_withdraw", "_reserve", "_width_ns",
                 "_slots", "_lock", "_now_ns")

    def __init__(self, ratio: float = 0.2, min_per_second: float = 10.0, ttl: float = 10.0,
                 clock: Any = None) -> None:
        # [0, 1]: 0 is a budget of the floor alone (min_per_second * ttl), documented in docs/retry.md
        self.ratio = check_float("ratio", ratio, minimum=0.0, maximum=1.0)
        self.min_per_second = check_float("min_per_second", min_per_second, minimum=0.0, maximum=1e9)
        ttl_s = check_seconds("ttl", ttl, allow_zero=False)
        assert self.ratio is not None and self.min_per_second is not None and ttl_s is not None
        self.ttl: float = ttl_s
        ttl_ns = math.ceil(self.ttl * NS)
        self._now_ns = resolve_clock(clock).monotonic_ns
        # withdrawing costs unit / ratio deposits, rounded up so the budget never allows more than ratio;
        # exact integer arithmetic (Fractions): a subnormal ratio (5e-324) is a huge withdrawal, not inf
        self._deposit = self._UNIT if self.ratio > 0 else 0
        self._withdraw = math.ceil(Fraction(self._UNIT) / Fraction(self.ratio)) if self.ratio > 0 else self._UNIT
        self._reserve = math.floor(Fraction(self.min_per_second * self.ttl) * self._withdraw)
        self._width_ns = -(-ttl_ns // self._SLICES)
        # slot i: [time slice, deposits made in it (an itertools.count), units withdrawn in it]
        self._slots: list[list[Any]] = [[-1, itertools.count(), 0] for _ in range(self._SLICES)]
        self._lock = threading.Lock()

    def deposit(self) -> None:
        """Count one logical call (a first attempt). Runs on every call's success path, so no lock:
        one next() on the slice's counter, atomic under the GIL. (A thread stalled for a whole `ttl`
        between reading a slot and counting into it may count into an expired slice: a lost deposit,
        which only makes the budget stricter.)"""
        if self._deposit:
            epoch = self._now_ns() // self._width_ns
            slot = self._slots[epoch % self._SLICES]
            if slot[0] != epoch:
                with self._lock:
                    slot = self._slot(epoch)
            next(slot[1])

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; False (nothing taken) when the budget is empty."""
        epoch = self._now_ns() // self._width_ns
        with self._lock:
            if self._balance_units(epoch) < self._withdraw:
                return False
            self._slot(epoch)[2] += self._withdraw
            return True

    @property
    def balance(self) -> int:
        """Whole retries the budget would allow now."""
        epoch = self._now_ns() // self._width_ns
        with self._lock:
            return max(0, self._balance_units(epoch) // self._withdraw)

    def _slot(self, epoch: int) -> list[Any]:
        # caller holds the lock; slot i can only hold in-window slice `epoch`, so any other is stale
        # and is replaced (not reset in place: a deposit racing on the stale one cannot leak into it)
        i = epoch % self._SLICES
        slot = self._slots[i]
        if slot[0] != epoch:
            slot = self._slots[i] = [epoch, itertools.count(), 0]
        return slot

    def _balance_units(self, epoch: int) -> int:
        oldest = epoch - self._SLICES
        units = self._reserve
        for e, deposits, withdrawn in self._slots:
            if e > oldest:
                units += _count(deposits) * self._deposit - int(withdrawn)
        return units

    def __repr__(self) -> str:
        return (f"RetryBudget(ratio={self.ratio!r}, min_per_second={self.min_per_second!r}, ttl={self.ttl!r}, "
                f"balance={self.balance})")


class Retry(Policy):
    """Retry a call with backoff; see the module docstring and docs/retry.md.

    Hooks are called positionally: ``on_retry(attempt, exception, delay)`` before each wait (attempt is
    the number that just failed; exception is None when `retry_on_result` matched) and
    ``on_give_up(attempt, exception)`` once when a retryable failure cannot be retried any more.
    ``idempotency_key(*args, **kwargs) -> str`` derives the key from the call's arguments (a callable
    with no parameters is called without them); by default it is a random uuid4 hex. Either way it is
    made only when someone reads it.
    """

    __slots__ = ("max_attempts", "backoff", "deadline", "budget", "_delay", "_retryable", "_result_pred",
                 "_deadline_ns", "_setup", "_on_retry", "_on_give_up", "_key_fn", "_key_from_args", "_key_needs_args", "_clock", "_now_ns",
                 "_ok_first", "_ok_retried", "_failed_first", "_failed_retried", "name", "__weakref__")

    def __init__(self, max_attempts: int = 3, backoff: Backoff | Callable[[int], float] | float | None = None,
                 retry_on: Any = (Exception,), retry_on_result: Callable[[Any], bool] | None = None,
                 deadline: float | None = None, budget: RetryBudget | None = None,
                 on_retry: Callable[[int, BaseException | None, float], Any] | None = None,
                 on_give_up: Callable[[int, BaseException | None], Any] | None = None,
                 idempotency_key: Callable[..., str] | None = None, clock: Any = None,
                 name: str | None = None) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a non-empty str or None, got {show(name)} ({type(name).__name__})")
        if name == "":
            raise ValueError("name must be a non-empty str or None, got ''")
        self.name = name        # given: exported by the metrics collectors (it joins the default registry)
        self.max_attempts = check_int("max_attempts", max_attempts, minimum=1)
        self.backoff, self._delay = _check_backoff(backoff)
        self._retryable = _retry_matcher(retry_on)
        self._result_pred = check_function("retry_on_result", retry_on_result, nargs=1,
                                           role="a predicate retry_on_result(result) -> bool")
        self.deadline = check_seconds("deadline", deadline, allow_none=True, allow_zero=False)
        self._deadline_ns = None if self.deadline is None else math.ceil(self.deadline * NS)
        if budget is not None and not isinstance(budget, RetryBudget):
            raise TypeError(f"budget must be a buttress.RetryBudget or None, got {budget!r}")
        self.budget = budget
        self._setup = self._deadline_ns is not None or budget is not None
        # hooks are called synchronously from sync and async calls alike: an async hook would never run
        self._on_retry = check_function("on_retry", on_retry, nargs=3, role="on_retry(attempt, exception, delay)")
        self._on_give_up = check_function("on_give_up", on_give_up, nargs=2, role="on_give_up(attempt, exception)")
        self._key_fn = _key_function(check_function("idempotency_key", idempotency_key,
                                                    role="idempotency_key(*args, **kwargs) -> str"))
        self._key_from_args = idempotency_key is not None     # the default key ignores the arguments
        self._key_needs_args = self._key_from_args and not _binds_empty(idempotency_key)
        self._clock = resolve_clock(clock)
        self._now_ns = self._clock.monotonic_ns
        # itertools.count: next() is one C call, atomic under the GIL (no lock on the success path)
        # _ok_first: bumped by every first-attempt success; the compiled AttemptGuard adds to it in C
        self._ok_first, self._ok_retried = _AttemptCounter(), itertools.count()
        self._failed_first, self._failed_retried = itertools.count(), itertools.count()

    # -- the two entry points: the success path inline, the rest in _loop_* and _after_failure ---------

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        call = [1, None, self._now_ns(), self, args, kwargs, None]
        token = _CALL.set(call)
        try:
            if self._setup:
                first: T = self._loop_sync(call, fn, args, kwargs, _FIRST, None)
                return first
            result: T
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                exc: BaseException | None = e
                result = None  # type: ignore[assignment]  # no result: _loop_sync reads exc
            else:
                if lazy_result(result):
                    refuse_sync_result(self, fn, result)
                if self._result_pred is None or not self._result_pred(result):
                    next(self._ok_first)
                    return result
                exc = None
            # outside the except block, so later attempts' errors do not chain onto this one
            last: T = self._loop_sync(call, fn, args, kwargs, exc, result)
            return last
        finally:
            _CALL.reset(token)

    async def call_async(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        call = [1, None, self._now_ns(), self, args, kwargs, None]
        token = _CALL.set(call)
        try:
            if self._setup:
                first: T = await self._loop_async(call, fn, args, kwargs, _FIRST, None)
                return first
            result: T
            try:
                aw = fn(*args, **kwargs)
                if type(aw) is not CORO and not isawaitable(aw):
                    raise sync_in_async(self, fn, aw)
                result = await aw
            except Exception as e:
                exc: BaseException | None = e
                result = None  # type: ignore[assignment]  # no result: _loop_async reads exc
            else:
                if self._result_pred is None or not self._result_pred(result):
                    next(self._ok_first)
                    return result
                exc = None
            last: T = await self._loop_async(call, fn, args, kwargs, exc, result)
            return last
        finally:
            _CALL.reset(token)

    def __call__(self, fn: F) -> F:
        """Decorate `fn` (sync, async, methods). The wrapper inlines `call()`'s (or `call_async()`'s)
        success path: one Python frame fewer than `Policy`'s generic wrapper."""
        check_decoratable(self, fn)     # a generator function cannot be retried: TypeError now
        return specialize(self, fn, self._sync_wrapper, self._async_wrapper)

    # the two wrappers below repeat call() / call_async() with `self` and `fn` bound; keep them in step
    def _sync_wrapper(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        retry, now_ns, pred, ok_first, setup = self, self._now_ns, self._result_pred, self._ok_first, self._setup
        if not setup and pred is None and not self._key_from_args:
            # the common case: the first attempt runs in the compiled guard (one vectorcall, the state
            # set in _CALL from C); a failure hands over to the same _loop_sync as below
            return _AttemptGuard(fn, self, _CALL_VAR, ok_first, self._loop_sync, now_ns)  # type: ignore[no-any-return]

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            call = [1, None, now_ns(), retry, args, kwargs, None]
            token = _CALL.set(call)
            try:
                if setup:
                    return retry._loop_sync(call, fn, args, kwargs, _FIRST, None)
                try:
                    result = fn(*args, **kwargs)
                except Exception as e:
                    exc: BaseException | None = e
                    result = None
                else:
                    if lazy_result(result):
                        refuse_sync_result(retry, fn, result)
                    if pred is None or not pred(result):
                        next(ok_first)
                        return result
                    exc = None
                return retry._loop_sync(call, fn, args, kwargs, exc, result)
            finally:
                _CALL.reset(token)

        return wrapper

    def _async_wrapper(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        retry, now_ns, pred, ok_first, setup = self, self._now_ns, self._result_pred, self._ok_first, self._setup

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            call = [1, None, now_ns(), retry, args, kwargs, None]
            token = _CALL.set(call)
            try:
                if setup:
                    return await retry._loop_async(call, fn, args, kwargs, _FIRST, None)
                try:
                    aw = fn(*args, **kwargs)
                    if type(aw) is not CORO and not isawaitable(aw):
                        raise sync_in_async(self, fn, aw)
                    result = await aw
                except Exception as e:
                    exc: BaseException | None = e
                    result = None
                else:
                    if pred is None or not pred(result):
                        next(ok_first)
                        return result
                    exc = None
                return await retry._loop_async(call, fn, args, kwargs, exc, result)
            finally:
                _CALL.reset(token)

        return wrapper

    def attempts(self, idempotency_key: str | None = None) -> Attempts:
        """The block form, for code that is not a function (DESIGN §6)::

            for attempt in retry.attempts():
                with attempt:
                    reply = session.post(url, headers={"Idempotency-Key": attempt.idempotency_key})

        ``async for attempt in retry.attempts(): with attempt: ...`` waits with ``clock.sleep_async``.
        Same rules as a decorated call: a failed block that `retry_on` matches is swallowed, the loop
        waits its backoff and runs the next attempt; when Retry stops, the last exception leaves the
        ``with`` (and the loop) as itself, with the attempt note. `idempotency_key` (a str) is what every
        attempt reads; by default the Retry's own (a random key, or its `idempotency_key` function
        called without arguments: a block has none)."""
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str):
                raise TypeError(f"idempotency_key must be a str or None, got {show(idempotency_key)} "
                                f"({type(idempotency_key).__name__})")
            if not idempotency_key:
                raise ValueError("idempotency_key must be a non-empty str, got ''")
        elif self._key_needs_args:
            raise TypeError("this Retry derives its idempotency key from the call's arguments "
                            f"({describe(self._key_fn)}) and a block has none: pass "
                            "retry.attempts(idempotency_key=...)")
        return Attempts(self, idempotency_key)

    # -- the retry loops: after a failed attempt (exc, or result when exc is None), or from the start
    #    (exc=_FIRST) when a deadline or budget has to be set up first (and the deadline popped after) ---

    def _loop_sync(self, call: _Call, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                   exc: Any, result: Any) -> Any:
        if exc is not _FIRST and not callable(fn):     # off the success path: a call of it failed, never retried
            raise _not_callable(self, fn)
        token = self._begin(call) if exc is _FIRST else None
        try:
            pred = self._result_pred
            while True:
                if exc is not _FIRST:
                    delay = self._after_failure(call, exc)
                    if delay is None:
                        if exc is None:
                            return result
                        try:
                            raise exc
                        finally:
                            exc = None      # no frame <-> traceback cycle
                    clock = self._clock     # (self._sleeper() inlined: the testing switch, see there)
                    if clock is SYSTEM_CLOCK and _clock_module._testing is not None:
                        clock = _clock_module._testing
                    clock.sleep(delay)
                    call[_NUMBER] += 1
                try:
                    result = fn(*args, **kwargs)
                except Exception as e:
                    if not callable(fn):
                        raise _not_callable(self, fn) from None
                    exc = e
                    continue
                if lazy_result(result):
                    refuse_sync_result(self, fn, result)
                if pred is None or not pred(result):
                    next(self._ok_first if call[_NUMBER] == 1 else self._ok_retried)
                    return result
                exc = None
        finally:
            if token is not None:
                _context.pop_deadline(token)

    async def _loop_async(self, call: _Call, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                          exc: Any, result: Any) -> Any:
        if exc is not _FIRST and not callable(fn):     # off the success path: a call of it failed, never retried
            raise _not_callable(self, fn)
        token = self._begin(call) if exc is _FIRST else None
        try:
            pred = self._result_pred
            while True:
                if exc is not _FIRST:
                    delay = self._after_failure(call, exc)
                    if delay is None:
                        if exc is None:
                            return result
                        try:
                            raise exc
                        finally:
                            exc = None
                    clock = self._clock
                    if clock is SYSTEM_CLOCK and _clock_module._testing is not None:
                        clock = _clock_module._testing
                    await clock.sleep_async(delay)
                    call[_NUMBER] += 1
                try:
                    aw = fn(*args, **kwargs)
                    if type(aw) is not CORO and not isawaitable(aw):
                        raise sync_in_async(self, fn, aw)
                    result = await aw
                except Exception as e:
                    if not callable(fn):
                        raise _not_callable(self, fn) from None
                    exc = e
                    continue
                if pred is None or not pred(result):
                    next(self._ok_first if call[_NUMBER] == 1 else self._ok_retried)
                    return result
                exc = None
        finally:
            if token is not None:
                _context.pop_deadline(token)

    # -- the failure path ------------------------------------------------------------------------------

    def _sleeper(self) -> Callable[[float], Any]:
        """What backoff waits sleep on: the Retry's clock; but a Retry built on the default clock before
        testing mode was turned on (a module-level ``@Retry()``) waits on the testing clock instead, so
        it never sleeps for real in a test (buttress.testing)."""
        clock = self._clock
        if clock is SYSTEM_CLOCK and _clock_module._testing is not None:
            clock = _clock_module._testing
        return clock.sleep

    def _sleeper_async(self) -> Callable[[float], Any]:
        clock = self._clock
        if clock is SYSTEM_CLOCK and _clock_module._testing is not None:
            clock = _clock_module._testing
        return clock.sleep_async

    def _begin(self, call: _Call) -> contextvars.Token[Any] | None:
        """Count the first attempt in the budget; make the deadline visible to the call (remaining())."""
        if self.budget is not None:
            self.budget.deposit()
        if self._deadline_ns is not None:
            return _context.push_deadline(call[_START] + self._deadline_ns, self._clock)
        return None

    def _after_failure(self, call: _Call, exc: BaseException | None) -> float | None:
        """After a failed attempt (exc, or a result that matched retry_on_result when exc is None):
        the seconds to wait before the next attempt, or None to stop."""
        attempt = call[_NUMBER]
        if exc is not None and not self._retryable(exc):
            if attempt == 1:            # passes through untouched, as if there were no Retry
                next(self._failed_first)
                return None
            return self._give_up(call, exc, "not retryable", hook=False)
        if attempt >= self.max_attempts:
            return self._give_up(call, exc, f"max_attempts={self.max_attempts} reached")
        try:
            wait = self._delay(attempt, call[_PREV])
        except (TypeError, ValueError) as err:     # a user backoff returned garbage: keep the cause
            raise err from exc
        call[_PREV] = wait
        retry_after = _retry_after(exc)
        if retry_after is not None and retry_after > wait:
            wait = retry_after
        left = _context.remaining_ns()
        if left is not None and wait * NS >= left:
            return self._give_up(call, exc, f"the next wait ({wait:.6g}s) would reach the deadline")
        if self.budget is not None and not self.budget.try_withdraw():
            return self._give_up(call, exc, "retry budget exhausted")
        if self._on_retry is not None:
            _hook_result(self, self._on_retry, self._on_retry(attempt, exc, wait))
        return wait

    def _give_up(self, call: _Call, exc: BaseException | None, reason: str, hook: bool = True) -> float | None:
        """Count the failure, note it, call on_give_up; -> None ("stop"), for _after_failure to return."""
        attempt = call[_NUMBER]
        next(self._failed_retried if attempt > 1 else self._failed_first)
        if exc is not None and _HAS_NOTES:
            exc.add_note(f"buttress.Retry: gave up after {attempt} attempt{'s' if attempt > 1 else ''} "
                         f"({reason})")
        if hook and self._on_give_up is not None:
            _hook_result(self, self._on_give_up, self._on_give_up(attempt, exc))
        return None

    def _make_key(self, call: _Call) -> str:
        # the compiled first attempt fills in args / kwargs only on failure (the default key ignores them)
        key = self._key_fn(*(call[_ARGS] or ()), **(call[_KWARGS] or {}))
        if not isinstance(key, str):
            raise TypeError(f"idempotency_key must return a str, got {key!r} ({type(key).__name__})")
        with _KEY_LOCK:             # two threads of one call reading it first: one key wins for both
            if call[_KEY] is None:
                call[_KEY] = key
            made: str = call[_KEY]
            return made

    # -- introspection ---------------------------------------------------------------------------------

    def metrics(self) -> RetryMetrics:
        return RetryMetrics(_count(self._ok_first), _count(self._ok_retried), _count(self._failed_first),
                            _count(self._failed_retried))

    def __repr__(self) -> str:
        name = "" if self.name is None else f", name={self.name!r}"
        return (f"Retry(max_attempts={self.max_attempts}, backoff={self.backoff!r}, deadline={self.deadline!r}, "
                f"budget={self.budget!r}{name})")


_count = count_of      # kept under this name: buttress._observe reads counters with it


# -- ready hooks that log (tenacity's before_sleep_log / after_log) ----------------------------------------------

def _check_logger(logger: object) -> Any:
    if logger is None:
        return logging.getLogger("buttress.retry")
    if isinstance(logger, str):
        return logging.getLogger(logger)
    if isinstance(logger, (logging.Logger, logging.LoggerAdapter)):
        return logger
    raise TypeError(f"logger must be a logging.Logger, a LoggerAdapter, a logger name (str) or None, "
                    f"got {show(logger)} ({type(logger).__name__})")


def _check_level(level: object) -> int:
    if isinstance(level, str):
        value = logging.getLevelName(level.upper())
        if isinstance(value, int):
            return value
        raise ValueError(f"level must be a logging level (an int, or a name such as 'WARNING'), got {level!r}")
    return check_int("level", level, minimum=0, maximum=1000)


def _who() -> str:
    call = _CALL.get()
    name = None if call is None else getattr(call[_RETRY], "name", None)
    return "buttress.Retry" if name is None else f"buttress.Retry {name!r}"


def _what(exc: BaseException | None) -> str:
    if exc is None:
        return "a result that retry_on_result matched"
    text = str(exc)
    return f"{type(exc).__qualname__}: {text}" if text else type(exc).__qualname__


def log_retries(logger: logging.Logger | logging.LoggerAdapter[Any] | str | None = None, level: int | str = logging.WARNING,
                *, exc_info: bool = False) -> Callable[[int, BaseException | None, float], None]:
    """An ``on_retry`` hook that logs each retry through `logging`::

        Retry(on_retry=buttress.retry.log_retries(logging.getLogger(__name__)))
        # WARNING buttress.Retry 'payment': attempt 1 failed with ConnectionError: refused; retrying in 0.42s

    `logger` is a Logger, a LoggerAdapter, a logger name, or None ("buttress.retry"); `level` an int or a
    level name; ``exc_info=True`` adds the traceback. The record's ``extra`` carries ``buttress_retry`` (the
    Retry's name or None), ``buttress_attempt``, ``buttress_delay`` and ``buttress_exception`` (the class
    name) for structured logging. Nothing is formatted when the level is disabled."""
    log = _check_logger(logger)
    lvl = _check_level(level)
    with_exc = check_bool_arg("exc_info", exc_info)

    def on_retry(attempt: int, exception: BaseException | None, delay: float) -> None:
        if not log.isEnabledFor(lvl):
            return
        call = _CALL.get()
        log.log(lvl, "%s: attempt %d failed with %s; retrying in %.3gs", _who(), attempt, _what(exception), delay,
                exc_info=exception if with_exc and exception is not None else None,
                extra={"buttress_retry": None if call is None else getattr(call[_RETRY], "name", None),
                       "buttress_attempt": attempt, "buttress_delay": delay,
                       "buttress_exception": None if exception is None else type(exception).__qualname__})
    return on_retry


def log_give_up(logger: logging.Logger | logging.LoggerAdapter[Any] | str | None = None, level: int | str = logging.ERROR,
                *, exc_info: bool = False) -> Callable[[int, BaseException | None], None]:
    """An ``on_give_up`` hook that logs the end of a retried call that failed::

        # ERROR buttress.Retry 'payment': giving up after 3 attempts; last: ConnectionError: refused

    Same parameters and ``extra`` as `log_retries` (without the delay). The exception is still raised to
    the caller, so ``exc_info`` is off by default (the caller's handler usually logs the traceback)."""
    log = _check_logger(logger)
    lvl = _check_level(level)
    with_exc = check_bool_arg("exc_info", exc_info)

    def on_give_up(attempt: int, exception: BaseException | None) -> None:
        if not log.isEnabledFor(lvl):
            return
        call = _CALL.get()
        log.log(lvl, "%s: giving up after %d attempt%s; last: %s", _who(), attempt, "" if attempt == 1 else "s",
                _what(exception), exc_info=exception if with_exc and exception is not None else None,
                extra={"buttress_retry": None if call is None else getattr(call[_RETRY], "name", None),
                       "buttress_attempt": attempt,
                       "buttress_exception": None if exception is None else type(exception).__qualname__})
    return on_give_up


# -- the block form: for attempt in retry.attempts(): with attempt: ... ----------------------------------------

_NEW, _RUNNING, _ENDED = 0, 1, 2


class AttemptBlock:
    """One attempt of `Retry.attempts()`: run its code inside ``with attempt:`` (or ``async with``).

    ``number`` (1, 2, ...) and ``idempotency_key`` (the same for every attempt) are as in
    `current_attempt()`, which also works inside the block. With `retry_on_result`, report the block's
    value with ``attempt.set_result(value)``: a matching value is retried like a failure."""

    __slots__ = ("_owner", "number", "_state", "_token", "_dtoken", "_result", "_has_result")

    def __init__(self, owner: Attempts, number: int) -> None:
        self._owner = owner
        self.number = number
        self._state = _NEW
        self._token: contextvars.Token[Any] | None = None
        self._dtoken: contextvars.Token[Any] | None = None
        self._result: Any = None
        self._has_result = False

    @property
    def idempotency_key(self) -> str:
        call = self._owner._call
        key = call[_KEY]
        return self._owner._retry._make_key(call) if key is None else key

    @property
    def result(self) -> Any:
        """What `set_result` was given (None before)."""
        return self._result

    def set_result(self, value: Any) -> None:
        """The block's value, for `retry_on_result` (without one it is only kept in `result`)."""
        self._result = value
        self._has_result = True

    def __enter__(self) -> AttemptBlock:
        if self._state != _NEW:
            raise RuntimeError(f"attempt {self.number} was already entered: each attempt runs once, in one "
                               "`with attempt:` block")
        owner = self._owner
        call = owner._call
        retry = owner._retry
        self._state = _RUNNING
        self._token = _CALL.set(call)
        if retry._deadline_ns is not None:      # remaining() in the block; _after_failure reads it too
            self._dtoken = _context.push_deadline(call[_START] + retry._deadline_ns, retry._clock)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if self._state != _RUNNING:
            raise RuntimeError(f"attempt {self.number}: __exit__ without a matching __enter__")
        self._state = _ENDED
        owner = self._owner
        retry = owner._retry
        call = owner._call
        try:
            if exc is None:
                if (retry._result_pred is None or not self._has_result
                        or not retry._result_pred(self._result)):
                    next(retry._ok_first if call[_NUMBER] == 1 else retry._ok_retried)
                    return False
                owner._delay = retry._after_failure(call, None)     # None: gave up, the loop ends
                return False
            if not isinstance(exc, Exception):      # BaseException: no outcome, nothing retried (§3c)
                return False
            delay = retry._after_failure(call, exc)
            if delay is None:           # not retried: the exception leaves the block as itself (noted)
                return False
            owner._delay = delay
            return True                 # swallowed: the loop waits `delay`, then the next attempt
        finally:
            if self._dtoken is not None:
                _context.pop_deadline(self._dtoken)
                self._dtoken = None
            if self._token is not None:
                _CALL.reset(self._token)
                self._token = None

    async def __aenter__(self) -> AttemptBlock:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        return self.__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"<AttemptBlock {self.number} of {self._owner._retry.max_attempts}>"


class Attempts:
    """What `Retry.attempts()` returns: iterate it with ``for`` (waits with ``clock.sleep``) or
    ``async for`` (``clock.sleep_async``); each item is an `AttemptBlock`. One logical call: iterate it
    once."""

    __slots__ = ("_retry", "_call", "_block", "_delay")

    def __init__(self, retry: Retry, key: str | None) -> None:
        self._retry = retry
        self._call: _Call = [1, key, 0, retry, (), {}, None]
        self._block: AttemptBlock | None = None
        self._delay: float | None = None

    def __iter__(self) -> Attempts:
        return self

    def __aiter__(self) -> Attempts:
        return self

    def _step(self) -> float | None:
        """Before the next attempt: None for the first one, else the wait; StopIteration when done."""
        block = self._block
        if block is None:
            retry = self._retry
            self._call[_START] = retry._now_ns()
            if retry.budget is not None:
                retry.budget.deposit()
            return None
        if block._state != _ENDED:
            what = "was not run in a `with attempt:` block" if block._state == _NEW else "is still running"
            raise RuntimeError(f"attempt {block.number} {what}: write `for attempt in retry.attempts(): "
                               "with attempt: ...`")
        delay = self._delay
        if delay is None:               # it succeeded, or Retry gave up on a result: the loop ends
            raise StopIteration
        self._delay = None
        return delay

    def _next_block(self) -> AttemptBlock:
        if self._block is not None:
            self._call[_NUMBER] += 1
        block = self._block = AttemptBlock(self, self._call[_NUMBER])
        return block

    def __next__(self) -> AttemptBlock:
        delay = self._step()
        if delay is not None:
            self._retry._sleeper()(delay)
        return self._next_block()

    async def __anext__(self) -> AttemptBlock:
        try:
            delay = self._step()
        except StopIteration:
            raise StopAsyncIteration from None
        if delay is not None:
            await self._retry._sleeper_async()(delay)
        return self._next_block()

    def __repr__(self) -> str:
        return f"<Attempts of {self._retry!r}: attempt {self._call[_NUMBER]}>"


# -- retry_call: the textbook form (DESIGN §6) ----------------------------------------------------------------

# Retry objects built by retry_call, by configuration: building one checks every argument (~14 us, ten
# times a retried call's own cost), so equal configurations share one. Bounded; cleared when full.
_CALL_RETRIES: dict[tuple[object, ...], Retry] = {}
_CALL_RETRIES_MAX = 256


def _typed(value: object) -> object:
    """A cache-key part that keeps values apart that compare equal across types (1, 1.0, True)."""
    if isinstance(value, tuple):
        return tuple(_typed(v) for v in value)
    return (type(value), value)


def _call_retry(max_attempts: object, base_delay: object, max_delay: object, jitter: object, retry_on: object,
                retry_on_result: object, deadline: object, budget: object, on_retry: object, on_give_up: object,
                clock: object) -> Retry:
    clk = resolve_clock(clock)          # the testing switch decides what None means now
    key: tuple[object, ...] | None = tuple(_typed(v) for v in (max_attempts, base_delay, max_delay, jitter, retry_on,
                                                   retry_on_result, deadline, budget, on_retry, on_give_up))
    key = (*key, id(clk))       # type: ignore[misc]
    try:
        retry = _CALL_RETRIES.get(key)
    except TypeError:           # something unhashable (a list of classes): build one for this call
        retry, key = None, None
    if retry is not None and retry._clock is clk:
        return retry
    # named as retry_call names them (exponential() would say initial / maximum)
    base = check_seconds("base_delay", base_delay)
    cap = check_seconds("max_delay", max_delay)
    assert base is not None and cap is not None
    if cap < base:
        raise ValueError(f"max_delay must be >= base_delay={show(base_delay)}, got {show(max_delay)}")
    retry = Retry(max_attempts=max_attempts,  # type: ignore[arg-type]
                  backoff=exponential(initial=base, multiplier=2.0, maximum=cap, jitter=jitter),  # type: ignore[arg-type]
                  retry_on=retry_on, retry_on_result=retry_on_result,  # type: ignore[arg-type]
                  deadline=deadline, budget=budget, on_retry=on_retry, on_give_up=on_give_up,  # type: ignore[arg-type]
                  clock=clk)
    if key is not None:
        if len(_CALL_RETRIES) >= _CALL_RETRIES_MAX:
            _CALL_RETRIES.clear()
        _CALL_RETRIES[key] = retry
    return retry


def _given_key(idempotency_key: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """retry_call's idempotency_key -> the key every attempt sees (None: Retry's lazy random key)."""
    if idempotency_key is None:
        return None
    if isinstance(idempotency_key, str):
        key = idempotency_key
    elif callable(idempotency_key):
        check_function("idempotency_key", idempotency_key, role="idempotency_key(*args, **kwargs) -> str")
        key = _key_function(idempotency_key)(*args, **kwargs)
        if not isinstance(key, str):
            raise TypeError(f"idempotency_key must return a str, got {show(key)} ({type(key).__name__})")
    else:
        raise TypeError(f"idempotency_key must be a str, a callable of the call's arguments returning a str, "
                        f"or None, got {show(idempotency_key)} ({type(idempotency_key).__name__})")
    if not key:
        raise ValueError("idempotency_key must be a non-empty str (an empty key would make every call the same "
                         "request to the server), got ''")
    return key


def retry_call(fn: Callable[..., Any], /, *args: Any, max_attempts: int = 3, base_delay: float = 1.0,
               max_delay: float = 32.0, jitter: str = "full", idempotency_key: str | Callable[..., str] | None = None,
               retry_on: Any = (Exception,), retry_on_result: Callable[[Any], bool] | None = None,
               deadline: float | None = None, budget: RetryBudget | None = None,
               on_retry: Callable[[int, BaseException | None, float], Any] | None = None,
               on_give_up: Callable[[int, BaseException | None], Any] | None = None, clock: Any = None,
               **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` and retry it: the textbook form of `Retry` (DESIGN §6).

    The wait after attempt k is ``min(max_delay, base_delay * 2 ** (k - 1))`` scaled by `jitter` ("full":
    uniform in [0, d]; "equal", "decorrelated", "none"). `retry_on` defaults to ``(Exception,)``, as
    `Retry`'s does (buttress's own rejections are still never retried unless named). A non-None
    `idempotency_key` (a str, or a callable given the call's arguments, called once before the first
    attempt) is what ``current_attempt().idempotency_key`` returns in every attempt; by default each call
    gets a random one. `deadline`, `budget`, `on_retry`, `on_give_up`, `retry_on_result` and `clock` are
    `Retry`'s. The last exception is re-raised as itself, with the attempt count as a note.

    These keyword names belong to retry_call: to pass an argument of the same name to `fn`, bind it first
    (``retry_call(functools.partial(fn, max_attempts=5))``). An ``async def`` function is a TypeError:
    use ``await retry_call_async(fn, ...)``.
    """
    if is_async_callable(fn):
        raise TypeError(f"retry_call: {describe(fn)} is async, so retry_call would return its coroutine "
                        f"un-awaited and retry nothing: use `await buttress.retry_call_async(fn, ...)`")
    retry = _call_retry(max_attempts, base_delay, max_delay, jitter, retry_on, retry_on_result, deadline, budget,
                        on_retry, on_give_up, clock)
    key = _given_key(idempotency_key, args, kwargs)
    if key is None:
        return retry.call(fn, *args, **kwargs)
    call = [1, key, retry._now_ns(), retry, args, kwargs, None]
    token = _CALL.set(call)
    try:
        return retry._loop_sync(call, fn, args, kwargs, _FIRST, None)
    finally:
        _CALL.reset(token)


async def retry_call_async(fn: Callable[..., Any], /, *args: Any, max_attempts: int = 3, base_delay: float = 1.0,
                           max_delay: float = 32.0, jitter: str = "full",
                           idempotency_key: str | Callable[..., str] | None = None, retry_on: Any = (Exception,),
                           retry_on_result: Callable[[Any], bool] | None = None, deadline: float | None = None,
                           budget: RetryBudget | None = None,
                           on_retry: Callable[[int, BaseException | None, float], Any] | None = None,
                           on_give_up: Callable[[int, BaseException | None], Any] | None = None, clock: Any = None,
                           **kwargs: Any) -> Any:
    """`retry_call` for async functions: ``await retry_call_async(fetch, url, max_attempts=5)``. Waits
    sleep on ``clock.sleep_async``; a sync function is a TypeError (use `retry_call`)."""
    retry = _call_retry(max_attempts, base_delay, max_delay, jitter, retry_on, retry_on_result, deadline, budget,
                        on_retry, on_give_up, clock)
    key = _given_key(idempotency_key, args, kwargs)
    if key is None:
        return await retry.call_async(fn, *args, **kwargs)
    call = [1, key, retry._now_ns(), retry, args, kwargs, None]
    token = _CALL.set(call)
    try:
        return await retry._loop_async(call, fn, args, kwargs, _FIRST, None)
    finally:
        _CALL.reset(token)


def _binds_empty(fn: Any) -> bool:
    """Whether fn can be called with no arguments (a Retry's key function, for a block)."""
    try:
        inspect.signature(fn).bind()
    except TypeError:
        return False
    except ValueError:          # no introspectable signature: assume it can
        return True
    return True


def _key_function(fn: Callable[..., str] | None) -> Callable[..., str]:
    """idempotency_key -> key(*args, **kwargs): a callable taking no parameters is called without the
    call's arguments (``lambda: f"req-{uuid4()}"``), any other with them (``lambda order_id: ...``)."""
    if fn is None:
        return lambda *args, **kwargs: uuid.uuid4().hex
    try:
        takes_none = not inspect.signature(fn).parameters
    except (TypeError, ValueError):         # no introspectable signature: pass the arguments
        takes_none = False
    return (lambda *args, **kwargs: fn()) if takes_none else fn


def _not_callable(retry: Retry, fn: object) -> TypeError:
    return TypeError(f"{type(retry).__name__}.call: fn must be callable, got {show(fn)} ({type(fn).__name__})")


def _hook_result(retry: Retry, hook: Any, result: object) -> None:
    """A hook that returned an awaitable was an async function in disguise (a lambda returning a
    coroutine): it would never run. Close it and say so."""
    if result is not None and lazy_result(result):
        refuse_sync_result(retry, hook, result, generators=False)


def _retry_after(exc: BaseException | None) -> float | None:
    """An exception's `retry_after` as seconds in [0, 1e9] (larger values are capped: a wait that long
    is a wait for ever), or None when it has none that is a real number."""
    value = getattr(exc, "retry_after", None)
    if value is None:
        return None
    try:
        s = check_real("retry_after", value)
    except TypeError:
        return None
    if s is None or not s >= 0.0:        # NaN, negative
        return None
    return min(s, MAX_SECONDS)


def _check_backoff(backoff: object) -> tuple[object, Callable[[int, float | None], float]]:
    """-> (the schedule as given, delay(attempt, previous) -> seconds)."""
    if backoff is None:
        backoff = exponential()
    if isinstance(backoff, Backoff):
        return backoff, backoff.delay
    if isinstance(backoff, (numbers.Real, Decimal)) or isinstance(backoff, bool):
        # any real number of seconds (int, float, Fraction, numpy scalar), named as the user named it
        fixed = constant(check_seconds("backoff", backoff))
        return fixed, fixed.delay
    if callable(backoff):
        check_function("backoff", backoff, nargs=1, allow_none=False, role="backoff(attempt) -> seconds")

        def delay(attempt: int, previous: float | None) -> float:
            d = check_float(f"backoff({attempt})", backoff(attempt), minimum=0.0, maximum=1e9)
            assert d is not None
            return d
        return backoff, delay
    raise TypeError(f"backoff must be a buttress.backoff schedule, a number of seconds, or a "
                    f"callable(attempt) -> seconds, got {backoff!r}")


def _retry_matcher(spec: object) -> Callable[[BaseException], bool]:
    """retry_on -> exc -> bool (buttress._spec: Exception classes or a one-argument predicate), never true
    for a `Rejected` whose class retry_on does not name (a predicate names none: it never sees one)."""
    parsed = parse_exceptions("retry_on", spec)
    pred = parsed.predicate
    if pred is not None:
        return lambda exc: (not isinstance(exc, Rejected) and isinstance(exc, Exception)
                            and type(exc) is not UsageError and bool(pred(exc)))
    classes = parsed.classes
    named = tuple(c for c in classes if issubclass(c, Rejected))
    # one function, no nested call: this runs on every failed attempt
    return lambda exc: (isinstance(exc, classes) and (not isinstance(exc, Rejected) or isinstance(exc, named))
                        and type(exc) is not UsageError)
