"""Pipeline: strategies composed outermost first, sync and async (Polly v8's resilience pipeline).

``Pipeline(Timeout(2.0), retry, breaker, bulkhead, limiter, fallback=...)`` runs a call as
``timeout(retry(breaker(bulkhead(limiter(fn)))))``, with the fallback outside everything. Each stage
is any pattern object (anything with ``call`` and ``call_async``); a decorated function is wrapped
once by every stage's own decorator, so it runs through each stage's fastest path (for a compiled
circuit breaker, its C vectorcall guard).

Orders that make no sense are reported when the pipeline is built (`PipelineOrderWarning`, or a
`ValueError` with ``strict=True``): a Retry that retries a circuit breaker's, limiter's or bulkhead's
rejection from inside it, a bulkhead outside a retry (its permit is held through every backoff wait),
an inner Timeout no shorter than an outer one, or the same object twice.
"""
from __future__ import annotations

import functools
from inspect import isawaitable
import warnings
from typing import Any, AsyncIterator, Awaitable, Callable, ParamSpec, TypeVar, overload

from ._base import Policy, is_async_callable
from ._params import ASYNC, ASYNC_GENERATOR, GENERATOR, callable_kind, describe
from ._spec import UsageError
from ._wrap import ASYNC_KINDS, CORO, by_reference, lazy_result, refuse_sync_result, sync_in_async
from ._breaker_conf import State
from .clock import check_one_clock
from .errors import BulkheadFullError, CircuitOpenError, Overloaded, RateLimitExceeded

__all__ = ["Pipeline", "PipelineOrderWarning"]

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
T = TypeVar("T")
Y = TypeVar("Y")
_CHAIN_CACHE = 256


class PipelineOrderWarning(UserWarning):
    """A pipeline's stages are in an order that defeats one of them."""


def _kind(stage: object) -> str:
    return type(stage).__name__


def _rejection_of(stage: object) -> BaseException | None:
    """The rejection a stage raises, as a sample exception (for checking what a Retry would retry)."""
    from .bulkhead import Bulkhead
    from .circuit_breaker import CircuitBreaker
    if isinstance(stage, CircuitBreaker):
        return CircuitOpenError(stage.name, State.OPEN, 1.0)
    if isinstance(stage, Bulkhead):
        return BulkheadFullError()
    name = _kind(stage)
    if "Limiter" in name or "Bucket" in name:
        return RateLimitExceeded(retry_after=1.0)
    if name == "LoadShedder":
        return Overloaded(retry_after=1.0)
    return None


def _order_problems(stages: tuple[Any, ...]) -> list[str]:
    from .bulkhead import Bulkhead
    from .retry import Retry
    from .timeout import Timeout
    problems = []
    ids = [id(s) for s in stages]
    if len(set(ids)) != len(ids):
        problems.append("the same strategy object appears twice")
    for i, outer in enumerate(stages):
        inner_stages = stages[i + 1:]
        if isinstance(outer, Retry):
            for inner in inner_stages:
                sample = _rejection_of(inner)
                if sample is not None and outer._retryable(sample):
                    problems.append(f"Retry at position {i} retries the {type(sample).__name__} of the "
                                    f"{_kind(inner)} inside it: retrying a rejection only hammers it; "
                                    "put the Retry inside, or drop the class from retry_on")
        if isinstance(outer, Bulkhead) and any(isinstance(s, Retry) for s in inner_stages):
            problems.append(f"Bulkhead at position {i} is outside a Retry: its permit is held through every "
                            "backoff wait; put the Bulkhead inside the Retry")
        if isinstance(outer, Timeout):
            for inner in inner_stages:
                if isinstance(inner, Timeout) and inner.seconds >= outer.seconds:
                    problems.append(f"inner Timeout({inner.seconds:g}) is not shorter than the outer "
                                    f"Timeout({outer.seconds:g}) at position {i}: it can never fire")
    return problems


class Pipeline(Policy):
    """Strategies composed outermost first; see the module docstring and docs/pipeline.md."""

    def __init__(self, *strategies: Any, fallback: Any = None, strict: bool = False) -> None:
        for i, s in enumerate(strategies):
            if not (callable(getattr(s, "call", None)) and callable(getattr(s, "call_async", None))):
                raise TypeError(f"strategies[{i}] must be a pattern object with call() and call_async() "
                                f"(CircuitBreaker, Retry, Bulkhead, Timeout, TokenBucket, ...), got {s!r}")
        if fallback is not None and not isinstance(fallback, Policy):
            from .fallback import Fallback
            fallback = Fallback(fallback)
        self.strategies = tuple(strategies)
        self.fallback = fallback
        self._stages = ((fallback,) if fallback is not None else ()) + self.strategies
        check_one_clock("Pipeline", "strategies", self._stages)
        problems = _order_problems(self.strategies)
        if problems:
            if strict:
                raise ValueError("pipeline order: " + "; ".join(problems))
            for p in problems:
                warnings.warn(p, PipelineOrderWarning, stacklevel=2)
        self._chains: dict[Any, Callable[..., Any]] = {}
        self._async_chains: dict[Any, Callable[..., Any]] = {}

    def _chain(self, fn: Callable[..., Any], cache: dict[Any, Callable[..., Any]], attr: str) -> Callable[..., Any]:
        chain = cache.get(fn)
        if chain is None:
            chain = self._innermost(fn, attr)
            for stage in reversed(self._stages):
                chain = functools.partial(getattr(stage, attr), chain)
            if len(cache) >= _CHAIN_CACHE:
                cache.clear()
            cache[fn] = chain
        return chain

    def _innermost(self, fn: Callable[..., Any], attr: str) -> Callable[..., Any]:
        """Checked once per function (the chain is cached): a sync call of an async function is refused
        before any stage runs; a function that is not a coroutine function gets its result checked
        innermost (an awaitable in a sync call, a non-awaitable in an async one), so no stage ever
        records an un-awaited coroutine as a success."""
        if not callable(fn):
            raise TypeError(f"Pipeline.{attr}: fn must be callable, got {fn!r}")
        kind = callable_kind(fn)
        pipeline = self
        if attr == "call":
            if kind in ASYNC_KINDS:
                raise UsageError(f"Pipeline.call: {describe(fn)} is {'an async def' if kind == ASYNC else 'an async generator'} "
                                 "function: use `await pipeline.call_async(fn, ...)` or decorate it")
            if kind == GENERATOR:
                return fn       # the stages decide: Timeout guards the iteration, Retry / Fallback refuse it

            def checked(*args: Any, **kwargs: Any) -> Any:
                result = fn(*args, **kwargs)
                if lazy_result(result):
                    refuse_sync_result(pipeline, fn, result, generators=False)
                return result
            return checked
        if kind in (ASYNC, ASYNC_GENERATOR):
            return fn

        async def checked_async(*args: Any, **kwargs: Any) -> Any:
            aw = fn(*args, **kwargs)
            if type(aw) is not CORO and not isawaitable(aw):
                raise sync_in_async(pipeline, fn, aw)
            return await aw
        return checked_async

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run fn(*args, **kwargs) through every stage."""
        result: T = self._chain(fn, self._chains, "call")(*args, **kwargs)
        return result

    @overload
    async def call_async(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T: ...
    @overload
    async def call_async(self, fn: Callable[P, AsyncIterator[Y]], /, *args: P.args,
                         **kwargs: P.kwargs) -> AsyncIterator[Y]: ...

    async def call_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Await fn(*args, **kwargs) through every stage (each stage's call_async)."""
        return await self._chain(fn, self._async_chains, "call_async")(*args, **kwargs)

    def __call__(self, fn: F) -> F:
        """Decorate fn: every stage wraps it once with its own decorator (its fastest path)."""
        if not callable(fn):
            raise TypeError(f"Pipeline decorates a callable, got {fn!r}")
        wrapped: Callable[..., Any] = fn
        for stage in reversed(self._stages):
            wrapped = stage(wrapped)
        if is_async_callable(fn) and not is_async_callable(wrapped):   # keep it awaitable-looking
            return Policy.__call__(self, fn)
        # each stage's decorator kept fn's metadata; whatever object the outermost wrapper is, the
        # decorated function pickles by reference
        return by_reference(wrapped)  # type: ignore[return-value]

    def __repr__(self) -> str:
        inner = ", ".join(repr(s) for s in self.strategies)
        return f"Pipeline({inner}{', fallback=' + repr(self.fallback) if self.fallback is not None else ''})"
