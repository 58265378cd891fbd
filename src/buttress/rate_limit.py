"""Rate limiters: GCRA token and leaky buckets, fixed and sliding windows, several limits at once,
and a keyed limiter for millions of clients in one fixed table.

The core answers (admit / refuse / "wait N ns"); this module waits (clock.sleep / sleep_async),
raises `RateLimitExceeded(retry_after=...)` and validates arguments. Every `retry_after` and
`wait_time` is the time until the request would be admitted (never "wait minus timeout"), rounded up
to a whole ns, so acquiring at now + retry_after succeeds.

Forms (DESIGN §3c): a decorated function, `call` / `call_async`, a decorated generator or async
generator function (one unit is taken when its iteration starts), and `with limiter:` /
`async with limiter:` (waits for one unit, as aiolimiter's `async with`). A sync form given an async
function raises TypeError pointing at `call_async` (the coroutine is closed, the unit given back);
`call_async` given a sync function raises TypeError too.

State (DESIGN §5): `store=None` keeps the process-local core. With `store=` (a Store or a URL) and
`name=`, objects of the same name in that store share one limit: `memory://` (this process),
`shm://NAME` (every process of the host: the compiled core decides with the same CAS on words in the
segment; the twin under the store's lock), `redis://...` (the fleet: the store's scripts decide).
"""
from __future__ import annotations

import inspect
import math
import numbers
import threading
import types
from dataclasses import dataclass
from inspect import isawaitable
from typing import Any, AsyncIterator, Awaitable, Callable, Literal, ParamSpec, TypeVar, overload

from . import _impl
from ._base import Named, Policy
from ._context import _DEADLINE, remaining_ns
from ._impl import core
from ._params import (ASYNC, ASYNC_GENERATOR, GENERATOR, MAX_RATE, NS, check_float, check_int, check_n,
                      check_seconds, describe, emission_interval_ns, seconds_to_ns, show)
from ._wrap import CORO, not_callable, UsageError, check_decoratable, lazy_result as _lazy, wraps
from .bulkhead import mark_async
from .clock import check_one_clock, is_system_clock, resolve_clock
from .errors import RateLimitExceeded, lazy_rejection

__all__ = ["TokenBucket", "LeakyBucket", "FixedWindowLimiter", "SlidingWindowLimiter", "MultiLimiter",
           "KeyedLimiter", "RateLimitMetrics", "KeyedMetrics"]

_INT64_MAX = (1 << 63) - 1
P = ParamSpec("P")
T = TypeVar("T")
Y = TypeVar("Y")
F = TypeVar("F", bound=Callable[..., Any])
_NO_WINDOW = -(1 << 64) - 2      # below any int64 clock reading // window (negative readings included)
_StageGuard = core("guard").StageGuard
_CO_COROUTINE = inspect.CO_COROUTINE


@dataclass(frozen=True)
class RateLimitMetrics:
    """Decisions since creation or reset(): admitted and rejected (calls, not tokens)."""

    admitted: int
    rejected: int


@dataclass(frozen=True)
class KeyedMetrics:
    """Table occupancy of a KeyedLimiter (its memory is fixed at construction) and its decisions since
    creation or reset(): admitted and rejected (calls, not tokens; a batch counts each key)."""

    keys: int
    max_keys: int
    nbytes: int
    admitted: int = 0
    rejected: int = 0

    @property
    def bytes_per_key(self) -> float:
        return self.nbytes / self.max_keys


def _seconds_up(ns: int) -> float:
    """ns -> float seconds s with ceil(s * 1e9) == ns where a float allows it (never below ns): clocks
    turn seconds into ns that way, so sleeping or advancing by s reaches exactly that instant."""
    s = ns / NS
    while math.ceil(s * NS) < ns:
        s = math.nextafter(s, math.inf)
    while math.ceil(s * NS) > ns:
        lower = math.nextafter(s, 0.0)
        if math.ceil(lower * NS) < ns:
            break
        s = lower
    return s


def _beyond_horizon(name: str | None, wait_ns: int) -> RateLimitExceeded:
    """A wait the core refused to represent (its arrival time would pass ~146 years from its base)."""
    retry_after = _seconds_up(max(wait_ns, 1))
    what = "rate limit" if name is None else f"rate limit {name!r}"
    return RateLimitExceeded(f"{what} exceeded: waiting {retry_after:.6g}s would push the limiter past the "
                             f"time it can represent; nothing was claimed", retry_after=retry_after)


def _budget_ns(timeout: object) -> int:
    """How long an acquire may wait: `timeout` (None = no limit), never past the context deadline."""
    budget = _INT64_MAX if timeout is None else seconds_to_ns("timeout", timeout)
    rem = remaining_ns()
    if rem is not None:
        budget = min(budget, max(0, rem))
    return budget


def _check_rate(rate: object) -> float:
    r = check_float("rate", rate, minimum=0.0, min_inclusive=False, maximum=MAX_RATE)
    assert r is not None
    return r


def _default_capacity(rate: object, capacity: int | None) -> int:
    return max(1, math.ceil(_check_rate(rate))) if capacity is None else capacity


def _check_name(name: object) -> str | None:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {name!r} ({type(name).__name__})")
    return name


def _clock_ns(clock: Any) -> Callable[[], int] | None:
    """What a core object reads: None = its own C monotonic clock (the system clock's)."""
    return None if is_system_clock(clock) else resolve_clock(clock).monotonic_ns   # None: the testing clock


# -- stores (DESIGN §5) -------------------------------------------------------------------------------------

def _open_store(store: object, name: str | None, clock: Any, cls: str) -> Any:
    """`store=` -> (the Store, whether it is a word store), or None for store=None. A store needs a
    name; a clock other than the system clock cannot be shared (memory:// is this process: fine)."""
    if store is None:
        return None
    from .stores import WordStore, store_from_url
    st = store_from_url(store)
    if name is None:
        raise ValueError(f"{cls}: store={st.url!r} needs name= (objects with the same name in one store share "
                         f"one limit), got name=None")
    if not is_system_clock(clock) and st.scheme != "memory":
        raise ValueError(f"{cls}: clock={clock!r} cannot be shared through store={st.url!r}: processes that share "
                         f"a limit measure time on the host's monotonic clock (or the server's); pass clock=None, "
                         f"or use a memory:// store in tests")
    return st, isinstance(st, WordStore)


def _core_of(st: Any, name: str) -> Any:
    """The core module whose types decide on a word store's words: the twin for a "locked" store."""
    return _impl.twin(name) if st.implementation_kind == "locked" else _impl.compiled(name)


def _base_ns(clock: Any) -> int:
    return 0 if is_system_clock(clock) else clock.monotonic_ns()


def _bound_gcra(kind: str, name: str, st: Any, rate: float, cap: int, clock: Any, extra: dict[str, object]) -> Any:
    """A GCRA deciding on the words of (kind, name) in a word store."""
    mod = _core_of(st, "gcra")
    base = _base_ns(clock)
    b = st.bind(kind, name, {"rate": rate, "capacity": cap, **extra}, mod.WORDS,
                init=lambda w: mod.GCRA.init_words(w, rate, cap, base))
    return mod.GCRA(rate, cap, _clock_ns(clock), words=b.words, locker=st.locker(b.offset))


# -- sync vs async (DESIGN §3c) ----------------------------------------------------------------------------

def _awaitable_in_sync(policy: Any, fn: Any, result: object) -> UsageError:
    """A sync form got an awaitable from fn: close it (it never ran) and say to use call_async."""
    if type(result) is CORO:
        result.close()
    cls = type(policy).__name__
    return UsageError(f"{cls}: {describe(fn)} is async (it returned {type(result).__name__}, an awaitable), so "
                      f"the sync form cannot guard it and would return it un-awaited: use "
                      f"`await {cls.lower()}.call_async(fn, ...)` or decorate the async def function")


def _sync_in_async(policy: Any, fn: Any, result: object) -> UsageError:
    """call_async (or an async wrapper) got a result that cannot be awaited."""
    if isinstance(result, types.GeneratorType):
        result.close()
    cls = type(policy).__name__
    return UsageError(f"{cls}.call_async: {describe(fn)} is a sync function (it returned "
                      f"{type(result).__name__}, which cannot be awaited): use {cls.lower()}.call(fn, ...) "
                      "or decorate it")


def _await_it(policy: Any, fn: Any, result: object, give: Callable[[Any], None], receipt: Any) -> bool:
    """call_async (or an async wrapper) took a unit and fn returned `result`, which is not a coroutine:
    True: await it (another awaitable); False: return it as it is (an async generator: its unit was taken
    by this call). Anything else is a sync function's result: the unit is given back, then TypeError."""
    if type(result) is types.AsyncGeneratorType:
        return False
    if isawaitable(result):
        return True
    give(receipt)
    raise _sync_in_async(policy, fn, result)


def _check_count(n: object, maximum: int, allowed: Callable[[], str]) -> int:
    """n for a limiter that can ever admit at most `maximum` at once: an int in [1, maximum]. The
    ValueError says what the user configured (`allowed()`: e.g. "between 1 and limit=10"), not the
    core's internal capacity."""
    if type(n) is int and 1 <= n <= maximum:
        return n
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        check_n(n, maximum)             # the TypeError naming n
    v = int(n)  # type: ignore[call-overload]  # an Integral
    if 1 <= v <= maximum:
        assert isinstance(v, int)
        return v
    raise ValueError(f"n must be {allowed()}, got {show(n)}")


async def _iterate_async(agen: Any) -> Any:
    """Re-yield an async generator (values sent in go on to it; it is closed with the wrapper)."""
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


class _Limiter(Policy):
    """Shared facade: decorator / call / call_async take one unit now or raise RateLimitExceeded (a
    LeakyBucket waits for its slot instead); acquire waits in a loop of "try, else sleep until
    wait_time" (TokenBucket and LeakyBucket reserve instead); `with` / `async with` wait for one unit.

    A subclass provides `_take()` (one unit now: a receipt, or raise the rejection), `_give(receipt)`
    (give that unit back: a sync form got an async function) and, where the store is remote,
    `_take_async()`."""

    name: str | None
    _clock: Any
    _remote = False          # decisions go through a Redis store (async paths await its *_async calls)
    _takes_now = True        # _take() never waits (a LeakyBucket's waits for its slot): async forms call it directly

    def _bound(self) -> str:
        """What this limiter can ever admit at once, as the user configured it (in n's error message)."""
        return f"{type(self).__name__}(at most {self._max_n})"

    def _n_allowed(self) -> str:
        return f"between 1 and {self._max_n}"

    def try_acquire(self, n: int = 1) -> bool:
        raise NotImplementedError

    def _wait_ns(self, n: int) -> int:
        raise NotImplementedError

    def wait_time(self, n: int = 1) -> float:
        """Seconds until n would be admitted (0.0 = now); claims nothing."""
        return _seconds_up(self._wait_ns(n))

    def _rejected(self, wait_ns: int) -> RateLimitExceeded:
        retry_after = _seconds_up(max(wait_ns, 1))
        what = "rate limit" if self.name is None else f"rate limit {self.name!r}"
        # a refusal is the hot path under overload: built without the constructor's checks (retry_after is
        # finite and >= 0 here), its message formatted only if someone reads it
        return lazy_rejection(RateLimitExceeded, "%s exceeded; retry after %.6gs", (what, retry_after), retry_after)

    # -- one unit for one call ------------------------------------------------------------------------------
    def _take(self) -> Any:
        receipt = self._claim(1)
        if receipt is None:
            raise self._rejected(self._wait_ns(1))
        return receipt

    async def _take_async(self) -> Any:
        return self._take()

    def _give(self, receipt: Any) -> None:
        self._unclaim(1, receipt)

    def __call__(self, fn: F) -> F:
        """Decorate fn: each call takes one unit now or raises RateLimitExceeded (a LeakyBucket waits for
        its slot). A generator or async generator function takes its unit when its iteration starts.
        The wrapper pickles by reference."""
        kind = check_decoratable(self, fn, generators=True)
        take, give = self._take, self._give
        if kind == GENERATOR:
            def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
                take()                          # when the iteration starts (the first next())
                return (yield from fn(*args, **kwargs))

            return wraps(fn)(gen_wrapper)
        if kind == ASYNC_GENERATOR:
            take_async = self._take_async

            async def agen_wrapper(*args: Any, **kwargs: Any) -> Any:
                await take_async()
                async for item in _iterate_async(fn(*args, **kwargs)):
                    yield item

            return wraps(fn)(agen_wrapper)
        if kind == ASYNC:
            guard = self._async_guard(fn)
            if guard is not None:
                return wraps(fn)(mark_async(guard, fn))
            policy = self
            if self._takes_now and not self._remote:
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    receipt = take()            # never waits: no coroutine of its own to await
                    aw = fn(*args, **kwargs)
                    if type(aw) is not CORO and not _await_it(policy, fn, aw, give, receipt):
                        give(receipt)           # an async generator from an "async" callable: refused too
                        raise _sync_in_async(policy, fn, aw)
                    return await aw
            else:
                take_async = self._take_async

                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    receipt = await take_async()
                    aw = fn(*args, **kwargs)
                    if type(aw) is not CORO and not _await_it(policy, fn, aw, give, receipt):
                        give(receipt)
                        raise _sync_in_async(policy, fn, aw)
                    return await aw

            return wraps(fn)(async_wrapper)
        return wraps(fn)(self._sync_wrapper(fn))

    # -- the compiled async form -----------------------------------------------------------------------------
    def _admit_one(self) -> Callable[[], bool]:
        """One unit now -> bool, for the compiled guard (a core's bound method where there is one)."""
        return self.try_acquire

    def _refuse_one(self) -> None:
        raise self._rejected(self._wait_ns(1))

    def _unit_not_returned(self, fn: Any, result: Any) -> Any:
        """The compiled guard's settle_async: unreachable for an `async def` function (it always returns a
        coroutine); were its code replaced by a sync function's, the unit stays taken (the guard keeps no
        receipt to give it back with)."""
        raise _sync_in_async(self, fn, result)

    def _async_guard(self, fn: Any) -> Any:
        """`@limiter` on an `async def` function: the compiled guard (buttress._core.guard) takes the unit
        and runs the coroutine in one vectorcall, no Python frame of ours. Only where a call always yields a
        coroutine (a plain `async def` function: the wrong-use paths that give a unit back cannot happen)
        and the unit is taken without waiting (not a LeakyBucket, not a Redis store)."""
        if (not self._takes_now or self._remote or type(fn) is not types.FunctionType
                or not fn.__code__.co_flags & _CO_COROUTINE):
            return None
        return _StageGuard(fn, self._admit_one(), self._refuse_one, settle_async=self._unit_not_returned,
                           asynchronous=True)

    def _sync_wrapper(self, fn: Any) -> Callable[..., Any]:
        take, give, policy = self._take, self._give, self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            receipt = take()
            result = fn(*args, **kwargs)
            if _lazy(result):
                policy._check_sync_result(fn, result, receipt)
            return result

        return wrapper

    def _check_sync_result(self, fn: Any, result: object, receipt: Any) -> None:
        """A sync form's result that may be an awaitable: give the unit back and refuse it."""
        if isawaitable(result):
            self._give(receipt)
            raise _awaitable_in_sync(self, fn, result)

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call fn if one unit is available now, else raise RateLimitExceeded. A generator function's
        generator is returned (its unit was taken by this call)."""
        if not callable(fn):
            raise not_callable(self, "call", fn)
        receipt = self._take()
        result = fn(*args, **kwargs)
        if _lazy(result):
            self._check_sync_result(fn, result, receipt)
        return result

    @overload
    async def call_async(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T: ...
    @overload
    async def call_async(self, fn: Callable[P, AsyncIterator[Y]], /, *args: P.args,
                         **kwargs: P.kwargs) -> AsyncIterator[Y]: ...

    async def call_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Await fn(*args, **kwargs) if one unit is available now. An async generator function's
        generator is returned (its unit was taken by this call); a sync function is a TypeError."""
        if not callable(fn):
            raise not_callable(self, "call_async", fn)
        receipt = self._take() if self._takes_now and not self._remote else await self._take_async()
        aw = fn(*args, **kwargs)
        if type(aw) is not CORO and not _await_it(self, fn, aw, self._give, receipt):
            return aw
        return await aw

    # -- blocks: wait for one unit (aiolimiter's `async with limiter:`) ----------------------------------------
    def __enter__(self) -> Any:
        self.acquire(1)
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        return False

    async def __aenter__(self) -> Any:
        await self.acquire_async(1)
        return self

    async def __aexit__(self, *exc: object) -> Literal[False]:
        return False

    def acquire(self, n: int = 1, timeout: float | None = None) -> None:
        """Wait until n are admitted; RateLimitExceeded at once when the wait would exceed `timeout`
        (or the context deadline); its retry_after is the time until n would be admitted."""
        budget = _budget_ns(timeout)
        start = self._clock.monotonic_ns()
        while not self.try_acquire(n):
            wait = self._wait_ns(n)
            spent = self._clock.monotonic_ns() - start
            if spent + wait > budget:
                raise self._rejected(wait)
            self._clock.sleep(_seconds_up(wait))

    async def acquire_async(self, n: int = 1, timeout: float | None = None) -> None:
        budget = _budget_ns(timeout)
        start = self._clock.monotonic_ns()
        while not await self._try_acquire_async(n):
            wait = await self._wait_ns_async(n)
            spent = self._clock.monotonic_ns() - start
            if spent + wait > budget:
                raise self._rejected(wait)
            await self._clock.sleep_async(_seconds_up(wait))

    async def _try_acquire_async(self, n: int) -> bool:
        return self.try_acquire(n)

    async def _wait_ns_async(self, n: int) -> int:
        return self._wait_ns(n)

    # MultiLimiter protocol: claim now (a receipt or None), give a claim back
    def _claim(self, n: int) -> Any:
        raise NotImplementedError

    def _unclaim(self, n: int, receipt: Any) -> None:
        raise NotImplementedError

    _max_n: int


class TokenBucket(_Limiter):
    """GCRA token bucket: `capacity` tokens (the burst), refilled at `rate` per second.

    At one instant at most `capacity` are admitted; over any interval D at most
    capacity + floor(D * rate). `capacity` defaults to max(1, ceil(rate)). With `store=` and `name=`,
    every TokenBucket of that name in the store shares one bucket (DESIGN §5).
    """

    def __init__(self, rate: float, capacity: int | None = None, clock: Any = None, name: str | None = None,
                 store: Any = None) -> None:
        capacity = _default_capacity(rate, capacity)
        self._clock = resolve_clock(clock)
        self.name = _check_name(name)
        opened = _open_store(store, self.name, clock, "TokenBucket")
        self.store = None if opened is None else opened[0]
        if opened is None:
            self._core = core("gcra").GCRA(rate, capacity, _clock_ns(clock))
        else:
            r, cap, _ = emission_interval_ns(rate, capacity)
            st, words = opened
            if words:
                self._core = _bound_gcra("token_bucket", name, st, r, cap, clock, {})  # type: ignore[arg-type]
            else:
                self._core = st.gcra(name, r, cap, kind="token_bucket", clock_ns=_clock_ns(clock))
                self._remote = True
        self.rate: float = self._core.rate
        self.capacity: int = self._core.capacity
        self._max_n = self.capacity
        # the hot path is the core's own method: no Python frame between the caller and the CAS
        self.try_acquire = self._core.try_acquire  # type: ignore[method-assign]

    def try_acquire(self, n: int = 1) -> bool:  # replaced per instance by the core's bound method
        """Take n tokens if they are available now."""
        ok: bool = self._core.try_acquire(n)
        return ok

    def _bound(self) -> str:
        return f"TokenBucket(capacity={self.capacity})"

    def _admit_one(self) -> Callable[[], bool]:
        return self._core.try_acquire      # type: ignore[no-any-return]  # the guard calls it through vectorcall

    def _take(self) -> Any:
        if self._remote:
            wait, receipt, need = self._core.claim_ex(1, None, 0)
            if wait < 0:
                raise self._rejected(need)
            return receipt
        end = self._core.take()
        if end is None:
            raise self._rejected(self._core.wait_ns(1))
        return end

    async def _take_async(self) -> Any:
        if not self._remote:
            return self._take()
        wait, receipt, need = await self._core.claim_ex_async(1, None, 0)
        if wait < 0:
            raise self._rejected(need)
        return receipt

    def _give(self, receipt: Any) -> None:
        if self._remote:
            self._core.refund(receipt)
        else:
            self._core.untake(receipt)      # only if no later claim built on it

    def _sync_wrapper(self, fn: Any) -> Callable[..., Any]:
        if self._remote:
            return super()._sync_wrapper(fn)
        take, wait_ns, rejected, policy = self._core.take, self._core.wait_ns, self._rejected, self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            end = take()
            if end is None:
                raise rejected(wait_ns(1))
            result = fn(*args, **kwargs)
            if _lazy(result):
                policy._check_sync_result(fn, result, end)
            return result

        return wrapper

    async def _try_acquire_async(self, n: int) -> bool:
        if self._remote:
            return bool(await self._core.try_acquire_async(n))
        return bool(self._core.try_acquire(n))

    async def _wait_ns_async(self, n: int) -> int:
        if self._remote:
            return int(await self._core.wait_ns_async(n))
        return int(self._core.wait_ns(n))

    def _wait_ns(self, n: int) -> int:
        ns: int = self._core.wait_ns(n)
        return ns

    def _claim_for_wait(self, n: int, timeout: float | None) -> tuple[int, Any]:
        """Claim n tokens for a caller that may wait: (wait ns, receipt), or raise RateLimitExceeded at
        once (nothing claimed) when the wait would exceed the budget or cannot be represented."""
        c = self._core
        budget = _INT64_MAX if timeout is None and _DEADLINE.get() is None else _budget_ns(timeout)
        if self._remote:
            wait, receipt, need = c.claim_ex(n, None, budget)
        else:
            wait, receipt = c.claim(n, None, budget)
            need = c.wait_ns(n) if wait < 0 else 0
        return self._claimed(wait, receipt, need, budget)

    async def _claim_for_wait_async(self, n: int, timeout: float | None) -> tuple[int, Any]:
        if not self._remote:
            return self._claim_for_wait(n, timeout)
        budget = _INT64_MAX if timeout is None and _DEADLINE.get() is None else _budget_ns(timeout)
        wait, receipt, need = await self._core.claim_ex_async(n, None, budget)
        return self._claimed(wait, receipt, need, budget)

    def _claimed(self, wait: int, receipt: Any, need: int, budget: int) -> tuple[int, Any]:
        if wait < 0:
            if need <= budget:             # refused although within budget: past the core's time horizon
                raise _beyond_horizon(self.name, need)
            raise self._rejected(need)     # the time until admission, never "wait minus timeout"
        return wait, receipt

    def acquire(self, n: int = 1, timeout: float | None = None) -> None:
        """Take n tokens, sleeping (clock.sleep) until they are usable; RateLimitExceeded at once,
        without sleeping, when the wait would exceed `timeout` (None = no limit) or the context deadline."""
        wait, receipt = self._claim_for_wait(n, timeout)
        if wait:
            try:
                self._clock.sleep(_seconds_up(wait))
            except BaseException:
                self._core.refund(receipt)   # interrupted: given back unless a later claim built on it
                raise

    async def acquire_async(self, n: int = 1, timeout: float | None = None) -> None:
        """Like acquire, awaiting clock.sleep_async; a cancelled wait gives its tokens back when no later
        reservation has built on them (otherwise giving them back would let two waiters through where
        one fits)."""
        if self._remote:
            wait, receipt = await self._claim_for_wait_async(n, timeout)
        else:
            wait, receipt = self._claim_for_wait(n, timeout)     # decided now: no coroutine of its own
        if wait:
            try:
                await self._clock.sleep_async(_seconds_up(wait))
            except BaseException:
                if self._remote:
                    await self._core.refund_async(receipt)
                else:
                    self._core.refund(receipt)
                raise

    def reserve(self, n: int = 1) -> float:
        """Claim n tokens now; returns the seconds to wait before using them (0.0 = now).
        RateLimitExceeded (nothing claimed) when that wait is past what the limiter can represent."""
        wait = self._core.reserve(n)
        if wait < 0:
            raise _beyond_horizon(self.name, self._core.wait_ns(n))
        return _seconds_up(wait)

    @property
    def available(self) -> int:
        """Whole tokens available now."""
        tokens: int = self._core.available()
        return tokens

    def metrics(self) -> RateLimitMetrics:
        return RateLimitMetrics(*self._core.counts())

    def reset(self) -> None:
        """Full bucket; metrics back to zero."""
        self._core.reset()

    def _claim(self, n: int) -> Any:
        wait, receipt = self._core.claim(n, None, 0)
        return receipt if wait == 0 else None

    def _unclaim(self, n: int, receipt: Any) -> None:
        self._core.refund(receipt)          # only if no later claim built on it

    def __repr__(self) -> str:
        name = "" if self.name is None else f", name={self.name!r}"
        store = "" if self.store is None else f", store={self.store.url!r}"
        return f"TokenBucket(rate={self.rate!r}, capacity={self.capacity!r}{name}{store})"


class LeakyBucket(_Limiter):
    """Admissions spaced evenly at `rate` per second: each caller waits for its own slot.

    A capacity-1 GCRA whose slots are claimed with reserve(): the k-th caller in line waits
    about k / rate. When `queue_size` callers are already waiting, the next is rejected at once
    with RateLimitExceeded (the wait it would get is > queue_size / rate: one CAS decides it, no
    queue object). A cancelled or interrupted waiter gives its slot back only when it is the last in
    line (no later caller has queued behind it); otherwise the slot stays unused, so two admissions are
    never closer than 1 / rate.
    """

    def __init__(self, rate: float, queue_size: int, clock: Any = None, name: str | None = None,
                 store: Any = None) -> None:
        self._clock = resolve_clock(clock)
        self.name = _check_name(name)
        opened = _open_store(store, self.name, clock, "LeakyBucket")
        self.store = None if opened is None else opened[0]
        if opened is None:
            self._core = core("gcra").GCRA(rate, 1, _clock_ns(clock))
        self.queue_size = check_int("queue_size", queue_size, minimum=0, maximum=1 << 40)
        if opened is not None:
            r, _, _ = emission_interval_ns(rate, 1)
            st, words = opened
            if words:
                self._core = _bound_gcra("leaky_bucket", name, st, r, 1, clock,  # type: ignore[arg-type]
                                         {"queue_size": self.queue_size})
            else:
                self._core = st.gcra(name, r, 1, kind="leaky_bucket", clock_ns=_clock_ns(clock))
                self._remote = True
        self.rate: float = self._core.rate
        self._max_n = 1
        self._queue_ns = min(self.queue_size * self._core.interval_ns, _INT64_MAX)

    _takes_now = False       # as a decorator, call() or a block it waits for its slot

    def _bound(self) -> str:
        return "LeakyBucket(one call per slot)"

    def _n_allowed(self) -> str:
        return (f"1: a LeakyBucket admits one call per slot, 1/rate apart (queue_size={self.queue_size} is how "
                f"many callers may wait for theirs)")

    def _n(self, n: object) -> int:
        return 1 if n == 1 and type(n) is int else _check_count(n, 1, self._n_allowed)

    def try_acquire(self, n: int = 1) -> bool:
        """Admit now if this instant's slot is free (never waits). n must be 1."""
        ok: bool = self._core.try_acquire(self._n(n))
        return ok

    def _wait_ns(self, n: int) -> int:
        ns: int = self._core.wait_ns(self._n(n))
        return ns

    async def _try_acquire_async(self, n: int) -> bool:
        if self._remote:
            return bool(await self._core.try_acquire_async(self._n(n)))
        return bool(self._core.try_acquire(self._n(n)))

    async def _wait_ns_async(self, n: int) -> int:
        if self._remote:
            return int(await self._core.wait_ns_async(self._n(n)))
        return int(self._core.wait_ns(self._n(n)))

    @property
    def waiting(self) -> int:
        """Callers holding a future slot now."""
        w: int = self._core.wait_ns(1)
        interval: int = self._core.interval_ns
        return max(0, -(-w // interval) - 1)

    def _reserved(self, wait: int, receipt: Any, need: int, budget: int) -> tuple[int, Any]:
        if wait < 0:
            if need <= budget:
                raise _beyond_horizon(self.name, need)
            raise self._rejected(need)      # the time until its slot, never "wait minus budget"
        return wait, receipt

    def _reserve(self, timeout: float | None) -> tuple[int, Any]:
        budget = min(self._queue_ns, _budget_ns(timeout))
        if self._remote:
            wait, receipt, need = self._core.claim_ex(1, None, budget)
            return self._reserved(wait, receipt, need, budget)
        wait, receipt = self._core.claim(1, None, budget)
        return self._reserved(wait, receipt, self._core.wait_ns(1) if wait < 0 else 0, budget)

    async def _reserve_async(self, timeout: float | None) -> tuple[int, Any]:
        if not self._remote:
            return self._reserve(timeout)
        budget = min(self._queue_ns, _budget_ns(timeout))
        wait, receipt, need = await self._core.claim_ex_async(1, None, budget)
        return self._reserved(wait, receipt, need, budget)

    def _wait_for_slot(self, timeout: float | None) -> Any:
        wait, receipt = self._reserve(timeout)
        if wait:
            try:
                self._clock.sleep(_seconds_up(wait))
            except BaseException:
                self._core.refund(receipt)   # only the last slot in line is given back
                raise
        return receipt

    async def _wait_for_slot_async(self, timeout: float | None) -> Any:
        wait, receipt = await self._reserve_async(timeout)
        if wait:
            try:
                await self._clock.sleep_async(_seconds_up(wait))
            except BaseException:
                if self._remote:
                    await self._core.refund_async(receipt)
                else:
                    self._core.refund(receipt)
                raise
        return receipt

    def acquire(self, n: int = 1, timeout: float | None = None) -> None:
        """Wait for the next slot; RateLimitExceeded at once when the queue is full or the wait would
        exceed `timeout` (or the context deadline). n must be 1."""
        self._n(n)
        self._wait_for_slot(timeout)

    async def acquire_async(self, n: int = 1, timeout: float | None = None) -> None:
        self._n(n)
        await self._wait_for_slot_async(timeout)

    # as a decorator, call() and a block a leaky bucket waits for its slot (rejected when the queue is full)
    def _take(self) -> Any:
        return self._wait_for_slot(None)

    async def _take_async(self) -> Any:
        return await self._wait_for_slot_async(None)

    def _give(self, receipt: Any) -> None:
        self._core.refund(receipt)

    def metrics(self) -> RateLimitMetrics:
        return RateLimitMetrics(*self._core.counts())

    def reset(self) -> None:
        self._core.reset()

    def __repr__(self) -> str:
        name = "" if self.name is None else f", name={self.name!r}"
        store = "" if self.store is None else f", store={self.store.url!r}"
        return f"LeakyBucket(rate={self.rate!r}, queue_size={self.queue_size!r}{name}{store})"


class _WindowLimiter(_Limiter):
    """At most `limit` per window of `window` seconds; windows are aligned to the clock's multiples
    of `window` (like `limits`). Exact under threads: one lock per limiter (not a hot path).

    The clock is read inside the lock, and time never runs backwards inside the limiter (the latest
    reading wins), so a thread that read the clock and was pre-empted cannot decide with a stale time
    after another thread decided with a later one.

    With `store=` the counts live in the store: in a word store (memory://, shm://) one packed word
    (window index, previous count, current count: buttress._core.wlimit) decided by one CAS, so
    `limit` is at most 2**20 - 1 there; in Redis the store's window script decides."""

    _sliding = False

    def __init__(self, limit: int, window: float, clock: Any = None, name: str | None = None,
                 store: Any = None) -> None:
        self.limit = check_int("limit", limit, minimum=1, maximum=1 << 40)
        self._w = seconds_to_ns("window", window, allow_zero=False)
        self.window: float = self._w / NS
        self._clock = resolve_clock(clock)
        self.name = _check_name(name)
        self._max_n = self.limit
        self._r: Any = None      # the store's decider (a wlimit.WindowCounter or a RedisWindow), or None
        opened = _open_store(store, self.name, clock, type(self).__name__)
        self.store = None if opened is None else opened[0]
        if opened is not None:
            st, words = opened
            kind = "sliding_window" if self._sliding else "fixed_window"
            if words:
                mod = _core_of(st, "wlimit")
                if self.limit > mod.MAX_LIMIT:
                    raise ValueError(f"limit must be <= {mod.MAX_LIMIT} for a window limiter in a "
                                     f"{st.scheme}:// store (its counts share one 64-bit word), got {self.limit}")
                b = st.bind(kind, name, {"limit": self.limit, "window_ns": self._w},
                            mod.WORDS, init=lambda w: mod.WindowCounter.init_words(w, self.limit, self._w,
                                                                                   self._sliding))
                self._r = mod.WindowCounter(self.limit, self._w, self._sliding, _clock_ns(clock), words=b.words,
                                            locker=st.locker(b.offset))
                self.try_acquire = self._r.try_acquire  # type: ignore[method-assign]  # the core's n check names limit=
            else:
                self._r = st.window(name, self.limit, self._w, self._sliding, kind=kind, clock_ns=_clock_ns(clock))
                self._remote = True
        self._lock = threading.Lock()
        self._last: int | None = None   # latest clock reading used (monotone max)
        self._gen = 0            # bumped by reset(): receipts of older claims are void
        self._idx = _NO_WINDOW   # current window number (now // window); below any real one at first
        self._prev = 0           # count in window _idx - 1
        self._curr = 0           # count in window _idx
        self._n_admitted = self._n_rejected = 0

    def _time(self) -> tuple[int, int]:
        """(window number, ns into it) for now; call with the lock held."""
        t: int = self._clock.monotonic_ns()
        if self._last is not None and t < self._last:
            t = self._last
        else:
            self._last = t
        return divmod(t, self._w)

    def _roll(self, idx: int) -> None:
        if idx > self._idx:
            self._prev = self._curr if idx == self._idx + 1 else 0
            self._curr = 0
            self._idx = idx

    def _fits(self, n: int, e: int) -> bool:
        raise NotImplementedError

    def _bound(self) -> str:
        return f"{type(self).__name__}(limit={self.limit})"

    def _n_allowed(self) -> str:
        return f"between 1 and limit={self.limit}"

    def _n(self, n: object) -> int:
        if type(n) is int and 1 <= n <= self.limit:
            return n
        return _check_count(n, self.limit, self._n_allowed)

    def _admit_one(self) -> Callable[[], bool]:
        admit: Callable[[], bool] = self._r.try_acquire if self._r is not None else self.try_acquire
        return admit

    def _claim(self, n: int) -> Any:
        if type(n) is not int or not 1 <= n <= self.limit:
            n = self._n(n)
        if self._r is not None:
            return self._r.claim(n) or None
        with self._lock:
            idx, e = self._time()
            self._roll(idx)
            if not self._fits(n, e):
                self._n_rejected += 1
                return None
            self._curr += n
            self._n_admitted += 1
            return (self._gen, idx)

    async def _take_async(self) -> Any:
        if not self._remote:
            return self._take()
        receipt = await self._r.claim_async(1)
        if receipt is None:
            raise self._rejected(await self._r.wait_ns_async(1))
        return receipt

    async def _try_acquire_async(self, n: int) -> bool:
        if self._remote:
            return (await self._r.claim_async(self._n(n))) is not None
        return self._claim(n) is not None

    async def _wait_ns_async(self, n: int) -> int:
        if self._remote:
            return int(await self._r.wait_ns_async(self._n(n)))
        return self._wait_ns(n)

    def _unclaim(self, n: int, receipt: Any) -> None:
        if self._r is not None:
            self._r.unclaim(n, receipt)
            return
        gen, idx = receipt
        with self._lock:
            if gen != self._gen:
                return                   # counted before reset(): nothing of it is left to give back
            if idx == self._idx:
                self._curr -= n
            elif idx == self._idx - 1:
                self._prev -= n

    def _counts(self, n: int) -> tuple[int, int, int]:
        """(prev, curr, e) as the next decision would see them, without changing anything."""
        self._n(n)
        with self._lock:
            idx, e = self._time()
            if idx == self._idx:
                return self._prev, self._curr, e
            return (self._curr if idx == self._idx + 1 else 0), 0, e

    def try_acquire(self, n: int = 1) -> bool:
        """Count n in this window if the limit allows it now."""
        return self._claim(n) is not None

    def metrics(self) -> RateLimitMetrics:
        if self._r is not None:
            return RateLimitMetrics(*self._r.counts())
        with self._lock:
            return RateLimitMetrics(self._n_admitted, self._n_rejected)

    def reset(self) -> None:
        if self._r is not None:
            self._r.reset()
            return
        with self._lock:
            self._gen += 1
            self._prev = self._curr = self._n_admitted = self._n_rejected = 0

    def __repr__(self) -> str:
        name = "" if self.name is None else f", name={self.name!r}"
        store = "" if self.store is None else f", store={self.store.url!r}"
        return f"{type(self).__name__}(limit={self.limit!r}, window={self.window!r}{name}{store})"


class FixedWindowLimiter(_WindowLimiter):
    """At most `limit` per aligned window; a new window starts from zero (bursts of up to 2 x limit
    across a window edge are possible: that is the fixed-window trade-off)."""

    def _fits(self, n: int, e: int) -> bool:
        return self._curr + n <= self.limit

    def _wait_ns(self, n: int) -> int:
        if self._r is not None:
            return int(self._r.wait_ns(self._n(n)))
        _, curr, e = self._counts(n)
        return 0 if curr + n <= self.limit else self._w - e


class SlidingWindowLimiter(_WindowLimiter):
    """Sliding-window counter (as in `limits`): the previous window's count weighted by the part of it
    still inside the sliding window, plus the current count: admit n when
    prev * (window - elapsed) / window + curr + n <= limit (decided in exact integers)."""

    def _first_fit(self, prev: int, curr: int, n: int) -> int | None:
        """Smallest elapsed ns in a window with these counts at which n fits, or None."""
        room = (self.limit - curr - n) * self._w       # need prev * (W - e) <= room
        if room < 0:
            return None
        if prev == 0:
            return 0
        e = max(0, self._w - room // prev)
        return e if e < self._w else None

    def _fits(self, n: int, e: int) -> bool:
        return self._prev * (self._w - e) + (self._curr + n) * self._w <= self.limit * self._w

    _sliding = True

    def _wait_ns(self, n: int) -> int:
        if self._r is not None:
            return int(self._r.wait_ns(self._n(n)))
        prev, curr, e = self._counts(n)
        first = self._first_fit(prev, curr, n)
        if first is not None:
            return max(0, first - e)
        first = self._first_fit(curr, 0, n)
        if first is not None:
            return self._w - e + first
        return 2 * self._w - e


class MultiLimiter(_Limiter):
    """Several limits at once (e.g. 5/s and 1000/h), all or nothing: a request is admitted only if
    every limiter admits it; when one refuses, what the others took is given back.

    Accepts TokenBucket, FixedWindowLimiter, SlidingWindowLimiter and MultiLimiter. acquire() sleeps
    on the first limiter's clock.
    """

    def __init__(self, *limiters: _Limiter, name: str | None = None) -> None:
        if not limiters:
            raise ValueError("MultiLimiter needs at least one limiter, got none")
        for lim in limiters:
            if not isinstance(lim, (TokenBucket, _WindowLimiter, MultiLimiter)):
                raise TypeError(f"limiters must be TokenBucket, FixedWindowLimiter, SlidingWindowLimiter or "
                                f"MultiLimiter objects, got {lim!r}")
        check_one_clock("MultiLimiter", "limiters", limiters)
        self.limiters = tuple(limiters)
        self.name = _check_name(name)
        self._clock = limiters[0]._clock
        self._max_n = min(lim._max_n for lim in limiters)
        self._lock = threading.Lock()
        self._n_admitted = self._n_rejected = 0

    def _bound(self) -> str:
        return f"MultiLimiter({', '.join(lim._bound() for lim in self.limiters)})"

    def _n_allowed(self) -> str:
        return (f"between 1 and {self._max_n} (the most every one of its limiters can ever admit at once: "
                f"{', '.join(lim._bound() for lim in self.limiters)})")

    def _claim(self, n: int) -> Any:
        if type(n) is not int or not 1 <= n <= self._max_n:
            n = _check_count(n, self._max_n, self._n_allowed)
        taken: list[tuple[_Limiter, object]] = []
        for lim in self.limiters:
            receipt = lim._claim(n)
            if receipt is None:
                for done, r in reversed(taken):
                    done._unclaim(n, r)
                with self._lock:
                    self._n_rejected += 1
                return None
            taken.append((lim, receipt))
        with self._lock:
            self._n_admitted += 1
        return taken

    def _unclaim(self, n: int, receipt: Any) -> None:
        for lim, r in reversed(receipt):
            lim._unclaim(n, r)

    def try_acquire(self, n: int = 1) -> bool:
        """Take n from every limiter, or from none."""
        return self._claim(n) is not None

    def _wait_ns(self, n: int) -> int:
        n = _check_count(n, self._max_n, self._n_allowed)
        return max(lim._wait_ns(n) for lim in self.limiters)

    def metrics(self) -> RateLimitMetrics:
        """This MultiLimiter's own decisions (each inner limiter also counts its part, rolled back or not)."""
        with self._lock:
            return RateLimitMetrics(self._n_admitted, self._n_rejected)

    def __repr__(self) -> str:
        return f"MultiLimiter({', '.join(map(repr, self.limiters))})"


class KeyedLimiter(Named):     # Named: given a name, exported by the metrics collectors
    """One GCRA bucket per key (client id, IP, API key: int, str or bytes) in one fixed table.

    Memory is allocated once: 2 * max_keys slots of 16 bytes (32 bytes per key). Keys are hashed with
    SipHash-1-3 under a secret seed per table (per store for a shared table), so nobody outside can
    pick keys that crowd a victim's slots. When max_keys keys are live, a new key evicts, from its probe
    window, a refilled key first (nothing is lost), then the least recently charged one; a key that is
    still limited is never evicted, and a never-seen key whose window holds only limited keys is
    admitted untracked (never locked out by its neighbours). With `idle_ttl`, refilled keys idle that
    long are also swept out (purge() sweeps them all). With `store=` and `name=` the table lives in the
    store (DESIGN §5). No `with` block: a block names no key (use call(key, fn) or try_acquire(key)).
    See docs/rate-limiting.md for what is atomic.
    """

    _remote = False

    def __init__(self, rate: float, capacity: int | None = None, max_keys: int = 1_000_000,
                 idle_ttl: float | None = None, clock: Any = None, name: str | None = None,
                 store: Any = None) -> None:
        capacity = _default_capacity(rate, capacity)
        mod = core("keyed")
        ttl = check_seconds("idle_ttl", idle_ttl, allow_none=True, allow_zero=False, maximum=mod.MAX_NOW_NS / NS)
        idle_ns = 0 if ttl is None else min(math.ceil(ttl * NS), mod.MAX_NOW_NS)
        self._clock = resolve_clock(clock)
        self.name = _check_name(name)
        opened = _open_store(store, self.name, clock, "KeyedLimiter")
        self.store = None if opened is None else opened[0]
        if opened is None:
            self._core = mod.KeyedGCRA(rate, capacity, max_keys, idle_ns, _clock_ns(clock))
        else:
            r, cap, _ = emission_interval_ns(rate, capacity)
            mk = check_int("max_keys", max_keys, minimum=1, maximum=mod.MAX_KEYS)
            st, words = opened
            if words:
                kmod = _core_of(st, "keyed")
                base = _base_ns(clock)
                b = st.bind("keyed_limiter", name, {"rate": r, "capacity": cap, "max_keys": mk,
                                                    "idle_ns": idle_ns}, kmod.KeyedGCRA.nwords(mk),
                            init=lambda w: kmod.KeyedGCRA.init_words(w, r, cap, mk, idle_ns, base))
                self._core = kmod.KeyedGCRA(r, cap, mk, idle_ns, _clock_ns(clock), words=b.words,
                                            locker=st.locker(b.offset))
            else:
                self._core = st.keyed(name, r, cap, mk, idle_ns, clock_ns=_clock_ns(clock))
                self._remote = True
        self.rate: float = self._core.rate
        self.capacity: int = self._core.capacity
        self.max_keys: int = self._core.max_keys
        self.idle_ttl = None if ttl is None else idle_ns / NS
        self.try_acquire = self._core.try_acquire  # type: ignore[method-assign]

    def try_acquire(self, key: int | str | bytes, n: int = 1) -> bool:  # replaced by the core's method
        """Take n tokens from key's bucket if available now (a key seen for the first time starts full)."""
        ok: bool = self._core.try_acquire(key, n)
        return ok

    def try_acquire_many(self, keys: Any, n: int = 1) -> Any:
        """Decide a numpy array of int ids in order in one call (a duplicate consumes in turn);
        returns a numpy bool array. Integer arrays of other dtypes are converted to int64."""
        try:
            import numpy as np
        except ImportError:
            raise ImportError('KeyedLimiter.try_acquire_many needs numpy: pip install "buttress[numpy]"') from None

        arr = np.asarray(keys)
        if arr.ndim != 1:
            raise ValueError(f"keys must be a one-dimensional array, got shape {arr.shape}")
        if arr.dtype != np.int64:
            if arr.dtype.kind == "u" and arr.size and int(arr.max()) > _INT64_MAX:
                raise ValueError(f"keys must fit in int64, got {int(arr.max())}")
            if arr.dtype.kind not in "iu" and arr.size:
                raise TypeError(f"keys must be an array of int ids (int64), got dtype {arr.dtype}")
            arr = arr.astype(np.int64)
        return self._core.try_acquire_many(np.ascontiguousarray(arr), n)

    def wait_time(self, key: int | str | bytes, n: int = 1) -> float:
        """Seconds until key's bucket has n tokens (0.0 = now); claims nothing."""
        return _seconds_up(self._core.wait_ns(key, n))

    def _rejected(self, key: object) -> RateLimitExceeded:
        retry_after = _seconds_up(max(self._core.wait_ns(key, 1), 1))
        what = "rate limit" if self.name is None else f"rate limit {self.name!r}"
        return lazy_rejection(RateLimitExceeded, "%s exceeded for key %r; retry after %.6gs",
                              (what, key, retry_after), retry_after)

    def _take(self, key: object) -> Any:
        """One token of key's bucket now: a receipt (None from a Redis store: nothing to give back), or raise."""
        if self._remote:
            if not self._core.try_acquire(key):
                raise self._rejected(key)
            return None
        receipt = self._core.claim(key)
        if not receipt:
            raise self._rejected(key)
        return receipt

    def _give(self, receipt: Any) -> None:
        if receipt is not None:
            self._core.refund(receipt)

    def call(self, key: int | str | bytes, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call fn if key has a token now, else raise RateLimitExceeded. An async function is a
        TypeError (the coroutine is closed and the token given back): use call_async."""
        if not callable(fn):
            raise not_callable(self, "call", fn)
        receipt = self._take(key)
        result = fn(*args, **kwargs)
        if _lazy(result) and isawaitable(result):
            self._give(receipt)
            raise _awaitable_in_sync(self, fn, result)
        return result

    @overload
    async def call_async(self, key: int | str | bytes, fn: Callable[P, Awaitable[T]], /, *args: P.args,
                         **kwargs: P.kwargs) -> T: ...
    @overload
    async def call_async(self, key: int | str | bytes, fn: Callable[P, AsyncIterator[Y]], /, *args: P.args,
                         **kwargs: P.kwargs) -> AsyncIterator[Y]: ...

    async def call_async(self, key: int | str | bytes, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Await fn(*args, **kwargs) if key has a token now; a sync function is a TypeError."""
        if not callable(fn):
            raise not_callable(self, "call_async", fn)
        if self._remote:
            if not await self._core.try_acquire_async(key):
                raise self._rejected(key)
            receipt = None
        else:
            receipt = self._take(key)
        aw = fn(*args, **kwargs)
        if type(aw) is not CORO and not _await_it(self, fn, aw, self._give, receipt):
            return aw
        return await aw

    def __enter__(self) -> Any:
        raise TypeError("KeyedLimiter has no `with` block: a block names no key; use "
                        "kl.call(key, fn, ...) / await kl.call_async(key, fn, ...) or kl.try_acquire(key)")

    def __exit__(self, *exc: object) -> Literal[False]:
        return False

    async def __aenter__(self) -> Any:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> Literal[False]:
        return False

    def key_hash(self, key: int | str | bytes) -> int:
        """The table's 64-bit hash of `key` (SipHash-1-3 under the table's secret seed)."""
        h: int = self._core.key_hash(key)
        return h

    def purge(self) -> int:
        """Remove every refilled key (idle at least idle_ttl when set); returns how many."""
        purged: int = self._core.purge()
        return purged

    def reset(self) -> None:
        """Forget every key; metrics back to zero."""
        self._core.reset()

    def __len__(self) -> int:
        return len(self._core)

    @property
    def nbytes(self) -> int:
        """Bytes held by the table (fixed at construction)."""
        nbytes: int = self._core.nbytes
        return nbytes

    def metrics(self) -> KeyedMetrics:
        counts = getattr(self._core, "counts", None)
        admitted, rejected = counts() if counts is not None else (0, 0)
        return KeyedMetrics(keys=len(self._core), max_keys=self.max_keys, nbytes=self._core.nbytes,
                            admitted=admitted, rejected=rejected)

    def __reduce__(self) -> Any:
        from ._base import refuse_copy
        raise refuse_copy(self)

    def __repr__(self) -> str:
        return (f"KeyedLimiter(rate={self.rate!r}, capacity={self.capacity!r}, max_keys={self.max_keys!r}, "
                f"idle_ttl={self.idle_ttl!r})")
