"""Fallbacks: degrade gracefully when a call fails.

`Fallback` answers a failed call with a value, with what a callable returns, or with the first success
of a chain of them. `StaleCacheFallback` answers it with the last good result of the same call, if that
result is not older than `max_age`; `served_stale()` then tells the caller that it got a stale answer.

Neither ever catches what is not an `Exception`: KeyboardInterrupt, SystemExit, GeneratorExit and
asyncio.CancelledError always pass through.
"""
from __future__ import annotations

import collections
import contextvars
import inspect
import math
from inspect import isawaitable
import threading
from typing import Any, Awaitable, Callable, NamedTuple, ParamSpec, TypeVar

from ._base import Policy
from ._params import ASYNC, NS, SYNC, check_function, check_int, check_seconds
from ._spec import parse_exceptions
from ._wrap import CORO, not_callable, PLAIN, check_decoratable, lazy_result, refuse_sync_result, specialize, sync_in_async
from .clock import resolve_clock

__all__ = ["Fallback", "StaleCacheFallback", "Stale", "served_stale"]

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
T = TypeVar("T")


def _on_matcher(on: object) -> Callable[[BaseException], bool]:
    # buttress._spec: Exception classes or a one-argument predicate; naming KeyboardInterrupt & co is a
    # ValueError (a fallback never catches what is not an Exception)
    return parse_exceptions("on", on).matcher()


def _link(exc: BaseException, previous: BaseException, first: BaseException) -> None:
    """Chain a link's failure to the previous link's (Python would chain it to the original call's)."""
    if exc.__context__ is first and previous is not first:
        exc.__context__ = previous


class Fallback(Policy):
    """On an exception matching `on`, return a fallback instead.

    `fallback` is a value (returned as is), a callable (called as ``fn(exc, *args, **kwargs)`` with the
    exception and the call's arguments; awaited if it returns an awaitable, in async calls), or a list
    of them tried in order: a callable that raises a matching exception passes it on to the next one,
    and when the last one raises, that exception propagates. To return a callable (or a list) as the
    value, wrap it in a lambda: ``Fallback(lambda exc, *a, **kw: default_handler)``.
    """

    def __init__(self, fallback: Any, on: Any = (Exception,)) -> None:
        chain = tuple(fallback) if isinstance(fallback, list) else (fallback,)
        if not chain:
            raise ValueError("fallback must be a value, a callable or a non-empty list of them, got []")
        for i, alt in enumerate(chain):
            if callable(alt):       # called as alt(exc, *args, **kwargs): checked now, not mid-failure
                check_function("fallback" if len(chain) == 1 and not isinstance(fallback, list) else f"fallback[{i}]",
                               alt, min_args=1, kinds=(SYNC, ASYNC), role="fn(exception, *args, **kwargs)")
        self._chain = chain
        self._on = _on_matcher(on)

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """fn(*args, **kwargs), or the fallback's value when it raises a matching exception (typed as fn's
        result: a type checker cannot see the fallback's own type)."""
        if not callable(fn):
            raise not_callable(self, "call", fn)
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            if not self._on(exc):
                raise
            recovered: T = self._recover(exc, args, kwargs)
            return recovered
        if lazy_result(result):
            refuse_sync_result(self, fn, result)
        return result

    def __call__(self, fn: F) -> F:
        """Decorate `fn`: the wrapper inlines `call` / `call_async` (one frame less)."""
        on, recover, recover_async = self._on, self._recover, self._recover_async
        check_decoratable(self, fn)     # a generator function: TypeError now (a stream cannot be replaced)
        policy, plain = self, PLAIN     # closure cells: cheaper than globals on the success path

        def make_sync(fn: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    result = fn(*args, **kwargs)
                except Exception as exc:
                    if not on(exc):
                        raise
                    return recover(exc, args, kwargs)
                if type(result) not in plain and lazy_result(result):  # one set lookup: the common case
                    refuse_sync_result(policy, fn, result)
                return result
            return wrapper

        def make_async(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await fn(*args, **kwargs)
                except Exception as exc:
                    if not on(exc):
                        raise
                    return await recover_async(exc, args, kwargs)
            return wrapper

        return specialize(self, fn, make_sync, make_async)

    async def call_async(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        if not callable(fn):
            raise not_callable(self, "call_async", fn)
        try:
            aw = fn(*args, **kwargs)
            if type(aw) is not CORO and not isawaitable(aw):
                raise sync_in_async(self, fn, aw)
            return await aw
        except Exception as exc:
            if not self._on(exc):
                raise
            recovered: T = await self._recover_async(exc, args, kwargs)
            return recovered

    def _recover(self, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        first, last = exc, len(self._chain) - 1
        for i, alt in enumerate(self._chain):
            if not callable(alt):
                return alt
            try:
                result = alt(exc, *args, **kwargs)
            except Exception as e:
                _link(e, exc, first)
                if i == last or not self._on(e):
                    raise
                exc = e
                continue
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()
                raise TypeError(f"fallback {alt!r} returned an awaitable in a sync call; "
                                "async fallbacks need an async function (call_async)")
            return result
        raise AssertionError("unreachable")     # the chain is never empty

    async def _recover_async(self, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        first, last = exc, len(self._chain) - 1
        for i, alt in enumerate(self._chain):
            if not callable(alt):
                return alt
            try:
                result = alt(exc, *args, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
            except Exception as e:
                _link(e, exc, first)
                if i == last or not self._on(e):
                    raise
                exc = e
                continue
            return result
        raise AssertionError("unreachable")

    def __repr__(self) -> str:
        chain = list(self._chain) if len(self._chain) > 1 else self._chain[0]
        return f"Fallback({chain!r})"


# ------------------------------------------------------------------------------------------------------


class Stale(NamedTuple):
    """What `served_stale()` returns after a call answered from the stale cache."""
    age: float                  # seconds since the served result was fresh
    exception: BaseException    # the failure that the stale result replaced
    key: Any                    # the cache key of the call


_STALE: contextvars.ContextVar[Stale | None] = contextvars.ContextVar("buttress_served_stale", default=None)


def served_stale() -> Stale | None:
    """After a call through a StaleCacheFallback in this thread or task: a `Stale` if that call was
    answered from the cache (it failed), None if its result is fresh."""
    return _STALE.get()


def _default_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args if not kwargs else (args, tuple(sorted(kwargs.items())))


class StaleCacheFallback(Policy):
    """Remember the last good result of each call (by `key`); when a call fails with an exception
    matching `on`, return the remembered result if it is at most `max_age` seconds old, else re-raise.

    The result is returned as is (no wrapper); `buttress.fallback.served_stale()` tells the caller
    whether it was stale, and `on_stale(Stale)` (if given) is called each time a stale result is served.
    `key(*args, **kwargs)` maps a call to its cache key (default: the arguments; they must be hashable).
    At most `max_entries` keys are kept, least recently stored dropped first.
    """

    def __init__(self, max_age: float, on: Any = (Exception,), key: Callable[..., Any] | None = None,
                 clock: Any = None, max_entries: int = 1024,
                 on_stale: Callable[[Stale], object] | None = None) -> None:
        age = check_seconds("max_age", max_age, allow_zero=False)
        assert age is not None
        self.max_age = age
        self._max_age_ns = math.ceil(age * NS)
        self._on = _on_matcher(on)
        self._key = check_function("key", key, role="key(*args, **kwargs) -> hashable")
        self._clock = resolve_clock(clock)
        self.max_entries = check_int("max_entries", max_entries, minimum=1)
        self._on_stale = check_function("on_stale", on_stale, nargs=1, role="on_stale(stale)")
        self._cache: collections.OrderedDict[Any, tuple[Any, int]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _key_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        k = _default_key(args, kwargs) if self._key is None else self._key(*args, **kwargs)
        try:
            hash(k)
        except TypeError:
            raise TypeError(f"StaleCacheFallback needs a hashable cache key, got {k!r}; pass "
                            "key=callable(*args, **kwargs) -> hashable") from None
        return k

    def _store(self, k: Any, value: Any) -> None:
        now = self._clock.monotonic_ns()
        with self._lock:
            self._cache[k] = (value, now)
            self._cache.move_to_end(k)
            if len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        if _STALE.get() is not None:
            _STALE.set(None)

    def _serve(self, k: Any, exc: Exception) -> Any:
        """The cached value for k if fresh enough; re-raises exc otherwise."""
        now = self._clock.monotonic_ns()
        with self._lock:
            entry = self._cache.get(k)
            if entry is not None and now - entry[1] > self._max_age_ns:
                del self._cache[k]
                entry = None
        if entry is None:
            raise exc
        info = Stale((now - entry[1]) / NS, exc, k)
        _STALE.set(info)
        if self._on_stale is not None:
            self._on_stale(info)
        return entry[0]

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        if not callable(fn):
            raise not_callable(self, "call", fn)
        k = self._key_of(args, kwargs)
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            if not self._on(exc):
                raise
            stale: T = self._serve(k, exc)
            return stale
        if lazy_result(result):
            refuse_sync_result(self, fn, result)
        self._store(k, result)
        return result

    async def call_async(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        if not callable(fn):
            raise not_callable(self, "call_async", fn)
        k = self._key_of(args, kwargs)
        try:
            aw = fn(*args, **kwargs)
            if type(aw) is not CORO and not isawaitable(aw):
                raise sync_in_async(self, fn, aw)
            result = await aw
        except Exception as exc:
            if not self._on(exc):
                raise
            stale: T = self._serve(k, exc)
            return stale
        self._store(k, result)
        return result

    def __call__(self, fn: F) -> F:
        """Decorate `fn` (sync, async, methods); a generator function is a TypeError (a stream cannot
        be cached or replayed)."""
        check_decoratable(self, fn)
        return Policy.__call__(self, fn)

    def clear(self) -> None:
        """Forget every remembered result."""
        with self._lock:
            self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)

    def __repr__(self) -> str:
        return f"StaleCacheFallback(max_age={self.max_age!r}, entries={len(self._cache)})"
