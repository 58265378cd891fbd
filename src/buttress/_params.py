"""Argument checking shared by the compiled core, its pure-Python twins and the facade.

One place for the rules and the messages: every error names the parameter, the value given
and what is allowed.
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction

__all__ = [
    "check_int", "check_float", "check_bool", "check_n", "emission_interval_ns", "NS",
    "MAX_RATE", "seconds_to_ns",
]

NS = 1_000_000_000
MAX_RATE = 1e9
_INT64_BUDGET = 1 << 62     # headroom so that now + capacity * interval never overflows int64


def check_int(name: str, value: object, minimum: int | None = 1, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        raise ValueError(f"{name} must be {_range(minimum, maximum)}, got {value!r}")
    return value


def check_float(name: str, value: object, *, minimum: float | None = None, maximum: float | None = None,
                min_inclusive: bool = True, max_inclusive: bool = True, allow_none: bool = False) -> float | None:
    """A finite real number within the given bounds (None only when allow_none)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    f = float(value)
    ok = math.isfinite(f)
    if ok and minimum is not None:
        ok = f >= minimum if min_inclusive else f > minimum
    if ok and maximum is not None:
        ok = f <= maximum if max_inclusive else f < maximum
    if not ok:
        lo = "" if minimum is None else f"{'>=' if min_inclusive else '>'} {minimum:g}"
        hi = "" if maximum is None else f"{'<=' if max_inclusive else '<'} {maximum:g}"
        rng = " and ".join(x for x in (lo, hi) if x)
        raise ValueError(f"{name} must be a finite number{' ' + rng if rng else ''}, got {value!r}")
    return f


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def _range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"between {minimum} and {maximum}"
    if minimum is not None:
        return f">= {minimum}"
    return f"<= {maximum}"


def emission_interval_ns(rate: object, capacity: object) -> tuple[float, int, int]:
    """Validate (rate, capacity) and return (rate, capacity, interval_ns).

    The interval is rounded UP to whole ns, so a limiter never admits more than `rate` per second.
    """
    r = check_float("rate", rate, minimum=0.0, min_inclusive=False, maximum=MAX_RATE)
    assert r is not None
    cap = check_int("capacity", capacity, minimum=1)
    interval = math.ceil(Fraction(NS) / Fraction(r))
    if interval * cap > _INT64_BUDGET:
        raise ValueError(
            f"capacity must be <= {_INT64_BUDGET // interval} at rate={rate!r} "
            f"(capacity / rate must stay below ~146 years), got {capacity!r}")
    return r, cap, interval


def check_n(n: object, capacity: int) -> int:
    """A token count: an int in [1, capacity]."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int, got {n!r} ({type(n).__name__})")
    if not 1 <= n <= capacity:
        raise ValueError(f"n must be between 1 and capacity={capacity}, got {n!r}")
    return int(n)


def seconds_to_ns(name: str, seconds: object, *, allow_zero: bool = True) -> int:
    s = check_float(name, seconds, minimum=0.0, min_inclusive=allow_zero, maximum=1e9)
    assert s is not None
    return math.ceil(s * NS)


def exception_matcher(name: str, spec: object):
    """`record=`, `ignore=`, `retry_on=`, `on=` ...: an exception class, a tuple/list of them, or a
    predicate `exc -> bool`. Returns a function `exc -> bool`."""
    if isinstance(spec, type) and issubclass(spec, BaseException):
        return lambda exc: isinstance(exc, spec)
    if isinstance(spec, (tuple, list, frozenset, set)):
        classes = tuple(spec)
        for c in classes:
            if not (isinstance(c, type) and issubclass(c, BaseException)):
                raise TypeError(f"{name} must be exception classes or a predicate, got {c!r} in {spec!r}")
        if not classes:
            return lambda exc: False
        return lambda exc: isinstance(exc, classes)
    if callable(spec):
        return lambda exc: bool(spec(exc))
    raise TypeError(f"{name} must be an exception class, a tuple of them, or a predicate "
                    f"callable(exc) -> bool, got {spec!r}")


def check_callable(name: str, value: object, allow_none: bool = True):
    if value is None and allow_none:
        return None
    if not callable(value):
        raise TypeError(f"{name} must be callable{' or None' if allow_none else ''}, got {value!r}")
    return value


def count_of(counter: object) -> int:
    """How many times next() was called on an itertools.count() (its repr is "count(N)"): lock-free
    counters for hot paths, read back here."""
    return int(repr(counter)[6:-1])
