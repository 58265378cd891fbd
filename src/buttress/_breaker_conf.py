"""CircuitBreaker arguments: checked once, here, for the compiled core and its twin alike."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Callable

from ._params import NS, check_float, check_int, exception_matcher

__all__ = ["State", "BreakerConf", "breaker_conf", "open_duration_ns", "COUNT_WINDOW_MAX", "HALF_OPEN_MAX"]

COUNT_WINDOW_MAX = 30000      # the compiled count window packs counts in 16-bit fields
# the half-open verdict is a count window of half_open_calls: the same 16-bit fields bound it
HALF_OPEN_MAX = COUNT_WINDOW_MAX


class State(enum.IntEnum):
    """Circuit breaker states (values are the core's state codes)."""
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2
    FORCED_OPEN = 3
    DISABLED = 4
    METRICS_ONLY = 5

    # str() and f-strings give the name on every Python (3.11 changed IntEnum's to the number)
    def __str__(self) -> str:
        return self.name

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)


@dataclass(frozen=True)
class BreakerConf:
    name: str
    failure_rate_threshold: float
    slow_call_rate_threshold: float
    slow_ns: int                  # -1: slow calls are not timed
    time_window: bool
    window_size: int
    minimum_calls: int            # effective minimum for the closed window
    open_ns: int                  # constant open duration, or -1 when open_fn is used
    open_fn: Callable[[int], float] | None
    half_open_calls: int
    half_open_minimum: int
    half_open_max_wait_ns: int    # -1: wait forever
    record_t: tuple | None        # exception classes counted as failures
    record_fn: Callable[[BaseException], Any] | None
    ignore_t: tuple | None
    ignore_fn: Callable[[BaseException], Any] | None
    record_result: Callable[[Any], Any] | None
    clock_ns: Callable[[], int] | None   # None: the system monotonic clock


def _classes_or_predicate(name: str, spec: object) -> tuple[tuple | None, Callable | None]:
    exception_matcher(name, spec)    # validates, with a message naming the parameter
    if isinstance(spec, type):
        return (spec,), None
    if isinstance(spec, (tuple, list, set, frozenset)):
        return (tuple(spec) or None), None
    return None, spec  # type: ignore[return-value]


def breaker_conf(name: object = "default", failure_rate_threshold: object = 0.5,
                 slow_call_rate_threshold: object = 1.0, slow_call_duration: object = 60.0,
                 window: object = "count", window_size: object = 100, minimum_calls: object = 100,
                 open_duration: object = 60.0, half_open_calls: object = 10, half_open_max_wait: object = None,
                 record: object = (Exception,), ignore: object = (), record_result: object = None,
                 clock_ns: object = None) -> BreakerConf:
    if not isinstance(name, str):
        raise TypeError(f"name must be a non-empty str, got {name!r} ({type(name).__name__})")
    if not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    fr = check_float("failure_rate_threshold", failure_rate_threshold, minimum=0.0, min_inclusive=False, maximum=1.0)
    sr = check_float("slow_call_rate_threshold", slow_call_rate_threshold, minimum=0.0, min_inclusive=False,
                     maximum=1.0)
    if slow_call_duration is None:
        slow_ns = -1
    else:
        sd = check_float("slow_call_duration", slow_call_duration, minimum=0.0, maximum=1e9)
        slow_ns = math.ceil(sd * NS)  # type: ignore[operator]
    if window not in ("count", "time"):
        raise ValueError(f"window must be 'count' or 'time', got {window!r}")
    time_window = window == "time"
    size = check_int("window_size", window_size, minimum=1, maximum=COUNT_WINDOW_MAX if not time_window else 3600)
    minimum = check_int("minimum_calls", minimum_calls, minimum=1)
    if not time_window:
        minimum = min(minimum, size)
    if callable(open_duration):
        open_ns, open_fn = -1, open_duration
    else:
        od = check_float("open_duration", open_duration, minimum=0.0, maximum=1e9)
        open_ns, open_fn = math.ceil(od * NS), None  # type: ignore[operator]
    half = check_int("half_open_calls", half_open_calls, minimum=1, maximum=HALF_OPEN_MAX)
    if half_open_max_wait is None:
        hmw = -1
    else:
        hmw = math.ceil(check_float("half_open_max_wait", half_open_max_wait, minimum=0.0, maximum=1e9) * NS)  # type: ignore[operator]
    record_t, record_fn = _classes_or_predicate("record", record)
    ignore_t, ignore_fn = _classes_or_predicate("ignore", ignore)
    if record_result is not None and not callable(record_result):
        raise TypeError(f"record_result must be a predicate callable(result) -> bool or None, got {record_result!r}")
    if clock_ns is not None and not callable(clock_ns):
        raise TypeError(f"clock_ns must be a callable returning int ns or None, got {clock_ns!r}")
    return BreakerConf(name, fr, sr, slow_ns, time_window, size, minimum, open_ns, open_fn,  # type: ignore[arg-type]
                       half, min(minimum, half), hmw, record_t, record_fn, ignore_t, ignore_fn,
                       record_result, clock_ns)  # type: ignore[arg-type]


def open_duration_ns(conf: BreakerConf, attempt: int, log: Any) -> int:
    """The open duration for `attempt` (1, 2, ...); a broken open_duration callable is logged and
    60 s is used, so it can never break the call that tripped the breaker."""
    if conf.open_fn is None:
        return conf.open_ns
    try:
        s = float(conf.open_fn(attempt))
        if not (math.isfinite(s) and 0.0 <= s <= 1e9):
            raise ValueError(f"open_duration({attempt}) returned {s!r}; seconds in [0, 1e9] are allowed")
        return math.ceil(s * NS)
    except Exception:  # noqa: BLE001 - user callback
        log.exception("circuit breaker %r: open_duration callable failed; using 60 s", conf.name)
        return 60 * NS
