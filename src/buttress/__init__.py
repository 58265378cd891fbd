"""buttress: fault tolerance for latency-sensitive Python services.

Circuit breakers, retries, bulkheads, timeouts, fallbacks, rate limiters, load shedding and health
probes over a lock-free Cython core. ``buttress.IMPLEMENTATION`` says whether the compiled core
("cython") or its pure-Python twins ("python") are in use.
"""
# No `from __future__ import annotations` and private aliases only: every global of this module that is
# not public is underscored, and __dir__ lists the public API alone (no Any, annotations, importlib...).
import importlib as _importlib
import typing as _typing
from typing import TYPE_CHECKING

from ._impl import IMPLEMENTATION
from ._version import __version__
from .clock import FakeClock, SystemClock
from .errors import (BulkheadFullError, ButtressError, CircuitOpenError, Overloaded, RateLimitExceeded,
                     Rejected, TimeoutExceeded)

if TYPE_CHECKING:  # what the lazy __getattr__ returns, for type checkers ("X as X": explicitly re-exported)
    from . import (adaptive as adaptive, asgi as asgi, backoff as backoff, bulkhead as bulkhead, chaos as chaos,
                   circuit_breaker as circuit_breaker, clock as clock, errors as errors, fallback as fallback,
                   health as health, hedge as hedge, httpx as httpx, lifecycle as lifecycle, otel as otel,
                   pipeline as pipeline, prometheus as prometheus, rate_limit as rate_limit, registry as registry,
                   retry as retry, shedding as shedding, stores as stores, testing as testing, timeout as timeout)
    from .bulkhead import Bulkhead as Bulkhead, ThreadPoolBulkhead as ThreadPoolBulkhead
    from .chaos import Chaos as Chaos
    from .circuit_breaker import CircuitBreaker as CircuitBreaker, Permit as Permit, State as State
    from .fallback import (Fallback as Fallback, served_stale as served_stale, Stale as Stale,
                           StaleCacheFallback as StaleCacheFallback)
    from .hedge import Hedge as Hedge, HedgeMetrics as HedgeMetrics
    from .pipeline import Pipeline as Pipeline, PipelineOrderWarning as PipelineOrderWarning
    from .rate_limit import (FixedWindowLimiter as FixedWindowLimiter, KeyedLimiter as KeyedLimiter,
                             LeakyBucket as LeakyBucket, MultiLimiter as MultiLimiter,
                             SlidingWindowLimiter as SlidingWindowLimiter, TokenBucket as TokenBucket)
    from .registry import Registry as Registry
    from .retry import (Attempt as Attempt, current_attempt as current_attempt, Retry as Retry,
                        RetryBudget as RetryBudget, retry_call as retry_call, retry_call_async as retry_call_async)
    from .testing import is_testing as is_testing, set_testing as set_testing
    from .shedding import LoadShedder as LoadShedder, Priority as Priority
    from .stores import store_from_url as store_from_url
    from .stores.redis import RedisStore as RedisStore
    from .stores.shm import SharedMemoryStore as SharedMemoryStore
    from .timeout import remaining as remaining, Timeout as Timeout
del TYPE_CHECKING

# Patterns are imported on first use: `import buttress` stays cheap and each pattern is one module.
_LAZY = {
    "CircuitBreaker": "circuit_breaker", "State": "circuit_breaker", "Permit": "circuit_breaker",
    "Retry": "retry", "RetryBudget": "retry", "current_attempt": "retry", "Attempt": "retry",
    "retry_call": "retry", "retry_call_async": "retry", "set_testing": "testing", "is_testing": "testing",
    "TokenBucket": "rate_limit", "LeakyBucket": "rate_limit", "KeyedLimiter": "rate_limit",
    "FixedWindowLimiter": "rate_limit", "SlidingWindowLimiter": "rate_limit", "MultiLimiter": "rate_limit",
    "Bulkhead": "bulkhead", "ThreadPoolBulkhead": "bulkhead",
    "Timeout": "timeout", "remaining": "timeout",
    "Fallback": "fallback", "StaleCacheFallback": "fallback", "served_stale": "fallback", "Stale": "fallback",
    "Chaos": "chaos", "Hedge": "hedge", "HedgeMetrics": "hedge",
    "SharedMemoryStore": "stores", "RedisStore": "stores", "store_from_url": "stores",
    "LoadShedder": "shedding", "Priority": "shedding",
    "Pipeline": "pipeline", "PipelineOrderWarning": "pipeline", "Registry": "registry",
}
_SUBMODULES = {"backoff", "health", "asgi", "chaos", "prometheus", "otel", "clock", "errors", "adaptive", "registry",
               "pipeline", "shedding", "circuit_breaker", "retry", "bulkhead", "timeout", "fallback", "rate_limit", "hedge", "httpx", "stores", "lifecycle", "testing"}

__all__ = ["IMPLEMENTATION", "__version__", "FakeClock", "SystemClock", "ButtressError", "Rejected",
           "CircuitOpenError", "RateLimitExceeded", "BulkheadFullError", "Overloaded", "TimeoutExceeded",
           *_LAZY]


def __getattr__(name: str) -> "_typing.Any":
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(_importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'buttress' has no attribute {name!r}")


def __dir__() -> "list[str]":
    """The public API only: the names of __all__ and the public submodules."""
    return sorted(set(__all__) | _SUBMODULES)
