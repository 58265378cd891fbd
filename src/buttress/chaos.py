"""Chaos injection: faults, latency and wrong results at a rate, seeded, switchable at runtime.

`Chaos` is a pattern object like the others (decorator, ``call``, ``call_async``), so it fits in a
`Pipeline` — put it innermost to exercise every other stage (``Pipeline(retry, breaker, chaos)``): the
retry and the breaker then see the injected failures as if the dependency produced them.

For each call, in this order: with probability `latency_rate` it waits `latency` seconds on the clock
first; with probability `fault_rate` it raises `exception` instead of calling; with probability
`result_rate` it returns `result` instead of calling. Each injection whose rate is > 0 draws one number
from ``random.Random(seed)``, so a seed gives the same sequence of decisions on every run.
"""
from __future__ import annotations

import functools
import itertools
import threading
from dataclasses import dataclass
from random import Random
from typing import Any, Callable, TypeVar

from ._base import Policy, is_async_callable
from ._params import check_bool, check_float
from .clock import resolve_clock
from .retry import _count

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["Chaos", "ChaosMetrics", "InjectedFault"]


class InjectedFault(ConnectionError):
    """The default injected exception: a ConnectionError (so retries and breakers treat it as a real
    dependency failure) that tests and logs can tell apart from a real one."""


@dataclass(frozen=True)
class ChaosMetrics:
    """Counts since creation: calls seen (while enabled) and injections made."""

    calls: int
    faults: int
    latencies: int
    results: int


def _rate(name: str, value: object) -> float:
    r = check_float(name, value, minimum=0.0, maximum=1.0)
    assert r is not None
    return r


def _check_exception(exception: object) -> object:
    if isinstance(exception, BaseException):
        return exception
    if isinstance(exception, type) and issubclass(exception, BaseException):
        return exception
    if callable(exception):
        return exception
    raise TypeError(f"exception must be an exception class, an exception instance or a callable() -> exception, "
                    f"got {exception!r}")


def _check_latency(latency: object) -> tuple[float, float]:
    if isinstance(latency, tuple):
        if len(latency) != 2:
            raise ValueError(f"latency must be seconds or a (low, high) pair, got {latency!r}")
        lo = check_float("latency", latency[0], minimum=0.0, maximum=1e9)
        hi = check_float("latency", latency[1], minimum=0.0, maximum=1e9)
        assert lo is not None and hi is not None
        if lo > hi:
            raise ValueError(f"latency (low, high) must have low <= high, got {latency!r}")
        return lo, hi
    s = check_float("latency", latency, minimum=0.0, maximum=1e9)
    assert s is not None
    return s, s


class Chaos(Policy):
    """Inject faults, latency and results into calls; see the module docstring and docs/chaos.md.

    `exception`: a class (instantiated with a message per injection), an instance, or a callable
    returning one. `latency`: seconds, or a (low, high) pair drawn uniformly. `result`: the value
    returned instead of calling (a callable is called with no arguments to make it; to return a
    callable, wrap it in a lambda). `enabled` and the three rates can be changed at any time.
    """

    def __init__(self, fault_rate: float = 0.0, exception: Any = InjectedFault, latency_rate: float = 0.0,
                 latency: float | tuple[float, float] = 0.0, result_rate: float = 0.0, result: Any = None,
                 seed: int | None = None, enabled: bool = True, clock: Any = None) -> None:
        self._fault_rate = _rate("fault_rate", fault_rate)
        self._latency_rate = _rate("latency_rate", latency_rate)
        self._result_rate = _rate("result_rate", result_rate)
        self.exception = _check_exception(exception)
        self._latency = _check_latency(latency)
        self.result = result
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, str, bytes))):
            raise TypeError(f"seed must be an int, str, bytes or None, got {seed!r}")
        self.seed = seed
        self._rng = Random(seed)
        self._enabled = check_bool("enabled", enabled)
        self._clock = resolve_clock(clock)
        self._lock = threading.Lock()       # one decision = consecutive draws: keeps a seeded run reproducible
        self._calls = itertools.count()     # next() is atomic: the no-injection path takes no lock
        self._faults = self._latencies = self._results = 0

    # -- runtime switches ------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = check_bool("enabled", value)

    @property
    def fault_rate(self) -> float:
        return self._fault_rate

    @fault_rate.setter
    def fault_rate(self, value: float) -> None:
        self._fault_rate = _rate("fault_rate", value)

    @property
    def latency_rate(self) -> float:
        return self._latency_rate

    @latency_rate.setter
    def latency_rate(self, value: float) -> None:
        self._latency_rate = _rate("latency_rate", value)

    @property
    def result_rate(self) -> float:
        return self._result_rate

    @result_rate.setter
    def result_rate(self, value: float) -> None:
        self._result_rate = _rate("result_rate", value)

    @property
    def latency(self) -> float | tuple[float, float]:
        lo, hi = self._latency
        return lo if lo == hi else (lo, hi)

    @latency.setter
    def latency(self, value: float | tuple[float, float]) -> None:
        self._latency = _check_latency(value)

    def reseed(self, seed: int | None = None) -> None:
        """Start the decision sequence again (from `seed`, or the constructor's seed)."""
        with self._lock:
            self.seed = self.seed if seed is None else seed
            self._rng = Random(self.seed)

    # -- decisions -------------------------------------------------------------------------------------
    def _decide(self) -> tuple[float, bool, bool] | None:
        """(seconds to wait, raise?, replace the result?) for one call; None when every rate is 0."""
        next(self._calls)
        if not (self._latency_rate or self._fault_rate or self._result_rate):
            return None
        with self._lock:
            rng = self._rng
            delay = 0.0
            if self._latency_rate and rng.random() < self._latency_rate:
                lo, hi = self._latency
                delay = lo if lo == hi else rng.uniform(lo, hi)
                self._latencies += 1
            fault = bool(self._fault_rate) and rng.random() < self._fault_rate
            result = bool(self._result_rate) and rng.random() < self._result_rate
            if fault:
                self._faults += 1
            elif result:
                self._results += 1
            return delay, fault, result

    def _fault(self) -> BaseException:
        exc = self.exception
        if isinstance(exc, BaseException):
            return exc.with_traceback(None)
        if isinstance(exc, type):
            fault: BaseException = exc("chaos: injected fault")     # a BaseException class (checked)
            return fault
        made = exc()  # type: ignore[operator]
        if not isinstance(made, BaseException):
            raise TypeError(f"chaos exception factory returned {made!r}, not an exception")
        return made

    def _result(self) -> Any:
        return self.result() if callable(self.result) else self.result

    def __call__(self, fn: F) -> F:
        """Decorate a function or an async function; while disabled the wrapper only reads a flag."""
        if not callable(fn):
            raise TypeError(f"Chaos decorates a callable, got {fn!r}")
        if is_async_callable(fn):
            return super().__call__(fn)
        call = self.call

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not self._enabled:
                return fn(*args, **kwargs)
            return call(fn, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if not self._enabled:
            return fn(*args, **kwargs)
        decision = self._decide()
        if decision is None:
            return fn(*args, **kwargs)
        delay, fault, result = decision
        if delay:
            self._clock.sleep(delay)
        if fault:
            raise self._fault()
        if result:
            return self._result()
        return fn(*args, **kwargs)

    async def call_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if not self._enabled:
            return await fn(*args, **kwargs)
        decision = self._decide()
        if decision is None:
            return await fn(*args, **kwargs)
        delay, fault, result = decision
        if delay:
            await self._clock.sleep_async(delay)
        if fault:
            raise self._fault()
        if result:
            return self._result()
        return await fn(*args, **kwargs)

    def metrics(self) -> ChaosMetrics:
        with self._lock:
            return ChaosMetrics(_count(self._calls), self._faults, self._latencies, self._results)

    def __repr__(self) -> str:
        return (f"Chaos(fault_rate={self._fault_rate!r}, latency_rate={self._latency_rate!r}, "
                f"latency={self.latency!r}, result_rate={self._result_rate!r}, seed={self.seed!r}, "
                f"enabled={self._enabled!r})")
