"""buttress: fault tolerance for latency-sensitive Python services.

Circuit breakers, retries, bulkheads, timeouts, fallbacks, rate limiters, load shedding and health
probes over a lock-free Cython core. ``buttress.IMPLEMENTATION`` says whether the compiled core
("cython") or its pure-Python twins ("python") are in use.
"""
from __future__ import annotations

import importlib
from typing import Any

from ._impl import IMPLEMENTATION
from ._version import __version__
from .clock import FakeClock, SystemClock
from .errors import (BulkheadFullError, ButtressError, CircuitOpenError, Overloaded, RateLimitExceeded,
                     Rejected, TimeoutExceeded)

# Patterns are imported on first use: `import buttress` stays cheap and each pattern is one module.
_LAZY = {
    "CircuitBreaker": "circuit_breaker", "State": "circuit_breaker", "Permit": "circuit_breaker",
    "Retry": "retry", "RetryBudget": "retry", "current_attempt": "retry", "Attempt": "retry",
    "TokenBucket": "rate_limit", "LeakyBucket": "rate_limit", "KeyedLimiter": "rate_limit",
    "FixedWindowLimiter": "rate_limit", "SlidingWindowLimiter": "rate_limit", "MultiLimiter": "rate_limit",
    "Bulkhead": "bulkhead", "ThreadPoolBulkhead": "bulkhead",
    "Timeout": "timeout", "remaining": "timeout",
    "Fallback": "fallback", "StaleCacheFallback": "fallback",
    "LoadShedder": "shedding", "Priority": "shedding",
    "Pipeline": "pipeline", "PipelineOrderWarning": "pipeline", "Registry": "registry",
}
_SUBMODULES = {"backoff", "health", "asgi", "chaos", "prometheus", "otel", "clock", "errors", "adaptive"}

__all__ = ["IMPLEMENTATION", "__version__", "FakeClock", "SystemClock", "ButtressError", "Rejected",
           "CircuitOpenError", "RateLimitExceeded", "BulkheadFullError", "Overloaded", "TimeoutExceeded",
           *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'buttress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
