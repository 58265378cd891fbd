"""CircuitBreaker arguments: checked once, here, for the compiled core and its twin alike; and the two
stream guards both implementations hand out for generator results (plain Python, so a guarded generator
is a real generator in both)."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Callable

from ._params import NS, check_float, check_function, check_int, check_seconds, show
from ._spec import parse_exceptions
from .errors import Rejected

__all__ = ["State", "BreakerConf", "breaker_conf", "open_duration_ns", "COUNT_WINDOW_MAX", "HALF_OPEN_MAX",
           "DEFAULTS", "guard_stream", "guard_astream"]

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


# -- defaults that know they were not given ---------------------------------------------------------------
# The rate settings and open_duration default to these: equal to (and shown as) the documented values,
# but of a private type, so that breaker_conf can tell "not given" from "given with the default value"
# (mixing a rate setting with failure_threshold is a ValueError even when the value is the default).

class _DefaultFloat(float):
    __slots__ = ()


class _DefaultInt(int):
    __slots__ = ()


class _DefaultStr(str):
    __slots__ = ()


_NOT_GIVEN = (_DefaultFloat, _DefaultInt, _DefaultStr)

# Any: each is the parameter's own type (a float, int or str subclass)
DEFAULTS: dict[str, Any] = {
    "failure_rate_threshold": _DefaultFloat(0.5),
    "slow_call_rate_threshold": _DefaultFloat(1.0),
    "slow_call_duration": _DefaultFloat(60.0),
    "window": _DefaultStr("count"),
    "window_size": _DefaultInt(100),
    "minimum_calls": _DefaultInt(100),
    "open_duration": _DefaultFloat(60.0),
    "half_open_calls": _DefaultInt(10),
}
_RATE_SETTINGS = ("failure_rate_threshold", "slow_call_rate_threshold", "slow_call_duration", "window",
                  "window_size", "minimum_calls")


def given(value: object) -> bool:
    """Whether a parameter with a DEFAULTS default was passed by the caller."""
    return type(value) not in _NOT_GIVEN


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
    record_t: tuple[type[BaseException], ...] | None        # exception classes counted as failures
    record_fn: Callable[[BaseException], Any] | None
    ignore_t: tuple[type[BaseException], ...] | None
    ignore_fn: Callable[[BaseException], Any] | None
    record_result: Callable[[Any], Any] | None
    clock_ns: Callable[[], int] | None   # None: the system monotonic clock
    record_rejected: tuple[type[BaseException], ...] | None = None  # the Rejected subclasses `record` names explicitly (DESIGN §3c)
    failure_threshold: int = 0    # > 0: the classic breaker (consecutive failures); 0: the rate breaker
    success_threshold: int = 0    # classic: consecutive half-open successes that close it

    @property
    def classic(self) -> bool:
        return self.failure_threshold > 0


def breaker_conf(name: object = "default", failure_rate_threshold: object = DEFAULTS["failure_rate_threshold"],
                 slow_call_rate_threshold: object = DEFAULTS["slow_call_rate_threshold"],
                 slow_call_duration: object = DEFAULTS["slow_call_duration"], window: object = DEFAULTS["window"],
                 window_size: object = DEFAULTS["window_size"], minimum_calls: object = DEFAULTS["minimum_calls"],
                 open_duration: object = DEFAULTS["open_duration"],
                 half_open_calls: object = DEFAULTS["half_open_calls"], half_open_max_wait: object = None,
                 record: object = (Exception,), ignore: object = (), record_result: object = None,
                 clock_ns: object = None, failure_threshold: object = None, success_threshold: object = None,
                 timeout: object = None) -> BreakerConf:
    if not isinstance(name, str):
        raise TypeError(f"name must be a non-empty str, got {name!r} ({type(name).__name__})")
    if not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    # -- the classic breaker (DESIGN §6): failure_threshold / success_threshold / timeout -----------------
    classic = failure_threshold is not None
    if not classic:
        if success_threshold is not None:
            raise ValueError(f"success_threshold={show(success_threshold)} belongs to the classic breaker: give "
                             "failure_threshold= too (or use half_open_calls= with the rate settings)")
        if timeout is not None:
            raise ValueError(f"timeout={show(timeout)} is the classic breaker's alias of open_duration: give "
                             "failure_threshold= too, or use open_duration=")
        fth = sth = 0
    else:
        fth = check_int("failure_threshold", failure_threshold, minimum=1)
        mixed = [p for p, v in zip(_RATE_SETTINGS, (failure_rate_threshold, slow_call_rate_threshold,
                                                    slow_call_duration, window, window_size, minimum_calls))
                 if given(v)]
        if mixed:
            raise ValueError(f"failure_threshold (the classic breaker: N consecutive failures) cannot be mixed "
                             f"with {mixed[0]} (a rate-breaker setting); use either failure_threshold / "
                             f"success_threshold, or the rate settings (failure_rate_threshold, window, "
                             f"window_size, minimum_calls, slow_call_*)")
        sth = 1 if success_threshold is None else check_int("success_threshold", success_threshold, minimum=1,
                                                           maximum=HALF_OPEN_MAX)
        if timeout is not None:
            if given(open_duration):
                raise ValueError("timeout and open_duration are the same setting (timeout is its classic "
                                 "alias): give one of them")
            open_duration = timeout
        if not given(half_open_calls):
            half_open_calls = sth
        slow_call_duration = None        # the classic breaker counts failures only: nothing to time
    fr = check_float("failure_rate_threshold", failure_rate_threshold, minimum=0.0, min_inclusive=False, maximum=1.0)
    sr = check_float("slow_call_rate_threshold", slow_call_rate_threshold, minimum=0.0, min_inclusive=False,
                     maximum=1.0)
    if slow_call_duration is None:
        slow_ns = -1
    else:
        sd = check_seconds("slow_call_duration", slow_call_duration)
        slow_ns = math.ceil(sd * NS)
    if window not in ("count", "time"):
        raise ValueError(f"window must be 'count' or 'time', got {show(window)}")
    time_window = window == "time"
    size = check_int("window_size", window_size, minimum=1, maximum=COUNT_WINDOW_MAX if not time_window else 3600)
    minimum_given = check_int("minimum_calls", minimum_calls, minimum=1)
    # a count window's minimum is at most its size; the half-open minimum is never clamped by window_size
    minimum = min(minimum_given, size) if not time_window else minimum_given
    # the classic breaker's timeout= is checked under its own name (errors name the parameter passed)
    od_name = "timeout" if classic and timeout is not None else "open_duration"
    if callable(open_duration):
        open_ns, open_fn = -1, check_function(od_name, open_duration, nargs=1, allow_none=False,
                                             role=f"{od_name}(attempt) -> seconds")
    else:
        od = check_seconds(od_name, open_duration)
        open_ns, open_fn = math.ceil(od * NS), None
    half = check_int("half_open_calls", half_open_calls, minimum=1, maximum=HALF_OPEN_MAX)
    if classic and half < sth:
        raise ValueError(f"half_open_calls={half} is below success_threshold={sth}: the breaker could never "
                         "see enough half-open successes to close")
    if half_open_max_wait is None:
        hmw = -1
    else:
        hmw = math.ceil(check_seconds("half_open_max_wait", half_open_max_wait) * NS)
    record_spec = parse_exceptions("record", record)
    record_t, record_fn = record_spec.as_pair()
    ignore_t, ignore_fn = parse_exceptions("ignore", ignore).as_pair()
    # own rejections are never failures unless record names their class (a predicate never sees one)
    rejected = tuple(c for c in record_spec.classes if issubclass(c, Rejected)) or None
    check_function("record_result", record_result, nargs=1, role="a predicate record_result(result) -> bool")
    if clock_ns is not None and not callable(clock_ns):
        raise TypeError(f"clock_ns must be a callable returning int ns or None, got {show(clock_ns)}")
    return BreakerConf(name, fr, sr, slow_ns, time_window, size, minimum, open_ns, open_fn,
                       half, min(minimum_given, half) if not classic else sth, hmw, record_t, record_fn, ignore_t,
                       ignore_fn, record_result, clock_ns, rejected, fth, sth)  # type: ignore[arg-type]


def open_duration_ns(conf: BreakerConf, attempt: int, log: Any) -> int:
    """The open duration for `attempt` (1, 2, ...); a broken open_duration callable (it raises, or returns
    anything but seconds in [0, 1e9]) is logged and 60 s is used, so it can never break the call that
    tripped the breaker."""
    if conf.open_fn is None:
        return conf.open_ns
    try:
        s = check_seconds(f"open_duration({attempt})", conf.open_fn(attempt))
        return math.ceil(s * NS)
    except Exception:  # noqa: BLE001 - user callback
        log.exception("circuit breaker %r: open_duration callable failed; using 60 s", conf.name)
        return 60 * NS


# -- streams (DESIGN §3c): a guarded generator holds its permit over the whole iteration ------------------

def guard_stream(permit: Any, gen: Any) -> Any:
    """Iterate `gen` (send / throw / close delegated) holding `permit`: an exception raised during the
    iteration is the outcome (GeneratorExit, i.e. close(), and anything not an Exception are none: the
    permit is returned), finishing is a success (record_result is not applied to a stream). A guard
    dropped before its first step returns the permit when it is collected (the permit's own rule)."""
    try:
        result = yield from gen
    except BaseException as exc:
        permit.failure(exc)
        raise
    permit._stream_success()
    return result


async def guard_astream(permit: Any, agen: Any) -> Any:
    """The async-generator form of guard_stream: values sent in are passed on (``asend``); an exception
    the consumer throws in (``athrow``) is the outcome and closes `agen`."""
    try:
        value = None
        while True:
            try:
                item = await agen.asend(value)
            except StopAsyncIteration:
                break
            value = yield item
    except BaseException as exc:
        try:
            await agen.aclose()
        finally:
            permit.failure(exc)
        raise
    permit._stream_success()
