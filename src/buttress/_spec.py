"""The one parser of exception specs: ``retry_on=``, ``on=``, ``record=``, ``ignore=``, ``drop_on=`` ...

A spec is an exception class, a tuple / list / set of them, or a predicate ``callable(exc) -> bool``.
`parse_exceptions(name, spec)` checks it once, when it is given, and returns an `ExceptionSpec`
``(classes, predicate)``: exactly one of the two is in use (classes is () for a predicate, predicate is
None for classes). The rules live here and nowhere else (DESIGN §3c):

- only `Exception` subclasses may be named: a class that is not one (KeyboardInterrupt, SystemExit,
  GeneratorExit, asyncio.CancelledError, a custom BaseException subclass such as gevent's or trio's
  cancellation) is a ValueError, because buttress treats such exceptions as "no outcome" everywhere: they
  are never retried, recorded, ignored or answered by a fallback, so naming one could never match;
- a predicate must be a plain (sync) function that takes one positional argument: an ``async def``
  predicate (its coroutine would always be truthy), a generator function, or one of the wrong arity is a
  TypeError naming the parameter, at construction rather than in the middle of a failing call;
- the matcher (`ExceptionSpec.matcher()`) never matches anything that is not an `Exception` (a
  BaseExceptionGroup holding a non-Exception is not one), so a predicate is never even shown one; nor a
  `UsageError` (buttress refusing a wrong use, e.g. a sync form given an async function).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

from ._params import check_function, show

__all__ = ["ExceptionSpec", "parse_exceptions", "is_outcome", "UsageError"]


class UsageError(TypeError):
    """A TypeError buttress raises when a pattern is used wrongly (a sync form given an async function,
    a generator given to Retry, ...). It is a programming error, not an outcome of the dependency: no
    matcher matches it, so it is never retried, never answered by a fallback."""

_SEQUENCES = (tuple, list, set, frozenset)


def is_outcome(exc: BaseException) -> bool:
    """Whether an exception is an outcome of the call at all: an `Exception` (an ExceptionGroup is one;
    a BaseExceptionGroup holding any non-Exception is not). Everything else (cancellation, interrupts,
    exit, custom BaseException subclasses) is no outcome: passed through, never retried or recorded."""
    return isinstance(exc, Exception)


class ExceptionSpec(NamedTuple):
    """A parsed spec: `classes` (a tuple of Exception subclasses, possibly empty) or `predicate`."""

    classes: tuple[type[Exception], ...]
    predicate: Callable[[BaseException], Any] | None

    def matcher(self) -> Callable[[BaseException], bool]:
        """exc -> bool; False for anything that is not an Exception."""
        predicate, classes = self.predicate, self.classes
        if predicate is not None:
            return lambda exc: isinstance(exc, Exception) and type(exc) is not UsageError and bool(predicate(exc))
        if not classes:
            return lambda exc: False
        # only Exception subclasses are in `classes`, so isinstance alone keeps BaseExceptions out
        return lambda exc: isinstance(exc, classes) and type(exc) is not UsageError

    def names(self, cls: type) -> bool:
        """Whether the spec names `cls` (or a base class of it) explicitly (predicates name nothing)."""
        return any(issubclass(cls, c) for c in self.classes)

    def as_pair(self) -> tuple[tuple[type[Exception], ...] | None, Callable[[BaseException], Any] | None]:
        """(classes or None when empty, predicate): the shape the circuit breaker's core takes."""
        return (self.classes or None), self.predicate


def parse_exceptions(name: str, spec: object) -> ExceptionSpec:
    """Check `spec` (given for the parameter `name`) and return its ExceptionSpec."""
    if isinstance(spec, type):
        return ExceptionSpec((_check_class(name, spec, spec),), None)
    if isinstance(spec, _SEQUENCES):
        items = tuple(spec)
        for c in items:
            if not isinstance(c, type):
                raise TypeError(f"{name} must be exception classes or a predicate, got {show(c)} in {show(spec)}")
            _check_class(name, c, spec)
        return ExceptionSpec(items, None)
    if callable(spec):
        check_function(name, spec, nargs=1, allow_none=False, role=f"a predicate {name}(exception) -> bool")
        return ExceptionSpec((), spec)
    raise TypeError(f"{name} must be an exception class, a tuple of them, or a predicate "
                    f"callable(exception) -> bool, got {show(spec)} ({type(spec).__name__})")


def _check_class(name: str, cls: type, spec: object) -> type[Exception]:
    if not issubclass(cls, BaseException):
        raise TypeError(f"{name} must be exception classes or a predicate, got {show(cls)} in {show(spec)}")
    if not issubclass(cls, Exception):
        where = "" if spec is cls else f" in {show(spec)}"
        raise ValueError(
            f"{name} must name Exception subclasses, got {cls.__name__}{where}: buttress never handles what is "
            "not an Exception (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError, custom "
            "BaseException subclasses); it always passes through, so naming it could never match")
    return cls
