"""Argument checking shared by the compiled core, its pure-Python twins and the facade.

One place for the rules and the messages: every error names the parameter, the value given
and what is allowed.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from decimal import Decimal
from fractions import Fraction
from typing import Any, Callable, Literal, overload

__all__ = [
    "check_int", "check_float", "check_bool", "check_n", "emission_interval_ns", "NS",
    "MAX_RATE", "seconds_to_ns", "MAX_SECONDS", "INT64_MAX", "show", "check_seconds", "check_real",
    "exception_matcher", "check_callable", "check_function", "callable_kind", "describe", "accepts",
    "max_positional", "count_of", "SYNC", "ASYNC", "GENERATOR", "ASYNC_GENERATOR",
]

NS = 1_000_000_000
MAX_RATE = 1e9
MAX_SECONDS = 1e9           # the ceiling of every duration, timeout and delay (DESIGN §3c)
INT64_MAX = (1 << 63) - 1   # the ceiling of every count no parameter gives a smaller maximum for
_INT64_BUDGET = 1 << 62     # headroom so that now + capacity * interval never overflows int64
_REAL = "a number (int, float, Fraction or numpy scalar)"


def show(value: object) -> str:
    """The value as an error message shows it: its repr, kept short; a huge int as its size (its
    repr may be thousands of digits long, or refused by the int/str conversion limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 100:
        digits = int(value.bit_length() * 0.30103) + 1
        return f"an int of about {digits} digits (~{'-' if value < 0 else ''}1e{digits - 1})"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ (or a huge Fraction) must not hide the real error
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= 80 else text[:77] + "..."


def _type_error(name: str, what: str, value: object) -> TypeError:
    return TypeError(f"{name} must be {what}, got {show(value)} ({type(value).__name__})")


def check_int(name: str, value: object, minimum: int | None = 1, maximum: int | None = None) -> int:
    """An int (numpy integers too; never a bool) in [minimum, maximum]; with no maximum, an int64."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _type_error(name, "an int", value)
    value = int(value)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        raise ValueError(f"{name} must be {_range(minimum, maximum)}, got {show(value)}")
    if maximum is None and value > INT64_MAX:
        lo = "" if minimum is None else f">= {minimum} and "
        raise ValueError(f"{name} must be {lo}<= {INT64_MAX} (an int64), got {show(value)}")
    if minimum is None and value < -INT64_MAX - 1:
        raise ValueError(f"{name} must be >= {-INT64_MAX - 1} (an int64), got {show(value)}")
    return value


def check_real(name: str, value: object, *, allow_none: bool = False) -> float | None:
    """`value` as a float: any real number (int, float, Fraction, Decimal, numpy scalar) but a bool.
    Never raises OverflowError: a number too large for a float reads as +-inf (and fails any bound)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Decimal)):
        raise _type_error(name, _REAL + (" or None" if allow_none else ""), value)
    try:
        f = float(value)
    except OverflowError:
        f = math.inf if value > 0 else -math.inf   # type: ignore[operator]
    except (TypeError, ValueError):                 # e.g. Decimal("sNaN")
        f = math.nan
    return f + 0.0      # -0.0 -> 0.0


@overload
def check_float(name: str, value: object, *, minimum: float | None = None, maximum: float | None = None,
                min_inclusive: bool = True, max_inclusive: bool = True, allow_none: Literal[False] = False) -> float: ...
@overload
def check_float(name: str, value: object, *, minimum: float | None = None, maximum: float | None = None,
                min_inclusive: bool = True, max_inclusive: bool = True, allow_none: bool) -> float | None: ...


def check_float(name: str, value: object, *, minimum: float | None = None, maximum: float | None = None,
                min_inclusive: bool = True, max_inclusive: bool = True, allow_none: bool = False) -> float | None:
    """A finite real number within the given bounds (None only when allow_none)."""
    if value is None and allow_none:
        return None
    f = check_real(name, value, allow_none=allow_none)
    assert f is not None
    ok = math.isfinite(f)
    if ok and minimum is not None:
        ok = f >= minimum if min_inclusive else f > minimum
    if ok and maximum is not None:
        ok = f <= maximum if max_inclusive else f < maximum
    if not ok:
        lo = "" if minimum is None else f"{'>=' if min_inclusive else '>'} {minimum:g}"
        hi = "" if maximum is None else f"{'<=' if max_inclusive else '<'} {maximum:g}"
        rng = " and ".join(x for x in (lo, hi) if x)
        none = " (or None)" if allow_none else ""
        raise ValueError(f"{name} must be a finite number{' ' + rng if rng else ''}{none}, got {show(value)}")
    return f


@overload
def check_seconds(name: str, value: object, *, allow_none: Literal[False] = False, allow_zero: bool = True,
                  maximum: float = MAX_SECONDS) -> float: ...
@overload
def check_seconds(name: str, value: object, *, allow_none: bool, allow_zero: bool = True,
                  maximum: float = MAX_SECONDS) -> float | None: ...


def check_seconds(name: str, value: object, *, allow_none: bool = False, allow_zero: bool = True,
                  maximum: float = MAX_SECONDS) -> float | None:
    """A duration, timeout or delay (DESIGN §3c): any real number of seconds in [0, 1e9] (or (0, 1e9]
    when not allow_zero), or None when allow_none. bool, NaN, inf, huge ints: ValueError / TypeError."""
    return check_float(name, value, minimum=0.0, min_inclusive=allow_zero, maximum=maximum, allow_none=allow_none)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _type_error(name, "a bool", value)
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
    `capacity` intervals must fit in 2**62 ns (~146 years); when they do not, the message names `rate`
    first (a rate far too low is the usual cause: 1e-12/s).
    """
    r = check_float("rate", rate, minimum=0.0, min_inclusive=False, maximum=MAX_RATE)
    assert r is not None
    cap = check_int("capacity", capacity, minimum=1)
    interval = math.ceil(Fraction(NS) / Fraction(r))
    if interval > _INT64_BUDGET:
        raise ValueError(f"rate must be >= {NS / _INT64_BUDGET:.3g} per second (one token every ~146 years "
                         f"at most), got {show(rate)}")
    if interval * cap > _INT64_BUDGET:
        raise ValueError(
            f"rate={show(rate)} is too low for capacity={show(capacity)}: capacity / rate must stay below "
            f"~146 years; raise rate to >= {cap * NS / _INT64_BUDGET:.3g} or lower capacity to "
            f"<= {_INT64_BUDGET // interval}")
    return r, cap, interval


def check_n(n: object, capacity: int) -> int:
    """A token count: an int in [1, capacity]."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise _type_error("n", "an int", n)
    v = int(n)      # exact for an Integral
    if not 1 <= v <= capacity:
        raise ValueError(f"n must be between 1 and capacity={capacity}, got {show(n)}")
    return v


def seconds_to_ns(name: str, seconds: object, *, allow_zero: bool = True) -> int:
    """A duration (see check_seconds) in whole ns, rounded up."""
    s = check_seconds(name, seconds, allow_zero=allow_zero)
    assert s is not None
    return math.ceil(s * NS)


def exception_matcher(name: str, spec: object) -> Callable[[BaseException], bool]:
    """`record=`, `ignore=`, `retry_on=`, `on=` ...: an exception class, a tuple/list of them, or a
    predicate `exc -> bool`. Returns a function `exc -> bool`; see buttress._spec (the one parser:
    naming a class that is not an Exception is a ValueError, a predicate's arity is checked)."""
    from ._spec import parse_exceptions
    return parse_exceptions(name, spec).matcher()


def check_callable(name: str, value: object, allow_none: bool = True) -> Callable[..., Any] | None:
    if value is None and allow_none:
        return None
    if not callable(value):
        raise TypeError(f"{name} must be callable{' or None' if allow_none else ''}, got {show(value)}")
    return value


# -- callables: kind and arity, checked when they are given (not when they are first called) ------------

SYNC, ASYNC, GENERATOR, ASYNC_GENERATOR = "sync", "async", "generator", "async generator"
_KIND_TEXT = {SYNC: "a plain function", ASYNC: "an async def function", GENERATOR: "a generator function",
              ASYNC_GENERATOR: "an async generator function"}


def _unwrap(fn: Any) -> Any:
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif inspect.ismethod(fn):
            fn = fn.__func__
        else:
            return fn


def callable_kind(fn: object) -> str:
    """"sync", "async", "generator" or "async generator": what calling `fn` returns (partials, bound
    methods and objects with such a __call__ included). A decorated function reads as what its
    outermost wrapper is (functools.wraps' __wrapped__ is not followed: the wrapper decides)."""
    f = _unwrap(fn)
    if inspect.isclass(f):          # calling a class builds an instance
        return SYNC
    for g in (f, _unwrap(getattr(f, "__call__", None)) if not inspect.isroutine(f) else None):
        if g is None:
            continue
        if inspect.isasyncgenfunction(g):
            return ASYNC_GENERATOR
        if inspect.iscoroutinefunction(g):
            return ASYNC
        if inspect.isgeneratorfunction(g):
            return GENERATOR
    return SYNC


def describe(fn: object) -> str:
    """A callable as error messages name it: its qualified name when it has one."""
    f = _unwrap(fn)
    name = getattr(f, "__qualname__", None) or getattr(f, "__name__", None)
    return name if isinstance(name, str) else show(fn)


def max_positional(fn: object) -> float:
    """How many positional arguments `fn` accepts (inf with *args; inf when it has no signature)."""
    try:
        sig = inspect.signature(fn)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.inf
    n = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return math.inf
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            n += 1
    return n


def accepts(fn: object, nargs: int) -> bool:
    """True when fn(a1, ..., a_nargs) binds (or fn has no introspectable signature)."""
    try:
        sig = inspect.signature(fn)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(*range(nargs))
    except TypeError:
        return False
    return True


def check_function(name: str, value: object, *, nargs: int | None = None, min_args: int | None = None,
                   allow_none: bool = True, kinds: tuple[str, ...] = (SYNC,), role: str = "") -> Any:
    """A callable of one of `kinds` that can be called with exactly `nargs` positional arguments (or
    with at least `min_args` of them), checked when it is given: a wrong one would otherwise surface
    as a TypeError in the middle of a call, replacing the exception that was being handled.
    `role` says how it is called, for the message (e.g. "on_retry(attempt, exception, delay)")."""
    if value is None and allow_none:
        return None
    if not callable(value):
        raise TypeError(f"{name} must be callable{' (called as ' + role + ')' if role else ''}"
                        f"{' or None' if allow_none else ''}, got {show(value)}")
    kind = callable_kind(value)
    if kind not in kinds:
        allowed = " or ".join(_KIND_TEXT[k] for k in kinds)
        why = {ASYNC: "it would return a coroutine that is never awaited",
               GENERATOR: "it would return a generator instead of running",
               ASYNC_GENERATOR: "it would return an async generator instead of running"}.get(kind, "")
        raise TypeError(f"{name} must be {allowed}{' called as ' + role if role else ''}; "
                        f"{describe(value)} is {_KIND_TEXT[kind]}{': ' + why if why else ''}")
    if nargs is not None and not accepts(value, nargs):
        raise TypeError(f"{name} must accept {nargs} positional argument{'s' if nargs != 1 else ''}"
                        f"{' (called as ' + role + ')' if role else ''}; {describe(value)} has the signature "
                        f"{_signature(value)}")
    if min_args is not None and max_positional(value) < min_args:
        raise TypeError(f"{name} must accept at least {min_args} positional argument{'s' if min_args != 1 else ''}"
                        f"{' (called as ' + role + ')' if role else ''}; {describe(value)} has the signature "
                        f"{_signature(value)}")
    return value


def _signature(fn: object) -> str:
    try:
        return str(inspect.signature(fn))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(?)"


def count_of(counter: object) -> int:
    """How many times next() was called on an itertools.count() (its repr is "count(N)"): lock-free
    counters for hot paths, read back here."""
    return int(repr(counter)[6:-1])
