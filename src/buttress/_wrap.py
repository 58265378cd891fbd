"""What every pattern's forms share, written once (DESIGN §3c):

- `specialize`: decorating with a specialised wrapper: a pattern whose hot path is short inlines it into
  the wrapper, saving the extra frame of `Policy.__call__`'s generic wrapper -> `call()` (about a third
  of a guarded call's cost). The sync/async dispatch and the wrapper's metadata stay as in `Policy`.
- `wraps` / `by_reference`: a decorated module-level function pickles by reference, like a
  ``functools.wraps`` function (so ``ProcessPoolExecutor.map(decorated, ...)`` works), whatever object
  the wrapper is (a Python function, a compiled guard, a twin guard object).
- sync vs async: `lazy_result` (a cheap test of a sync call's result), `refuse_sync_result` (the
  TypeError when a sync form got an async function, or a generator function it cannot guard),
  `sync_in_async` (the TypeError when `call_async` got a sync function).
- generators: `refuse_generator` for patterns that cannot replay a stream (Retry, Fallback, Hedge).
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable, TypeVar, cast

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

from ._base import is_async_callable
from ._params import ASYNC, ASYNC_GENERATOR, GENERATOR, callable_kind, describe, show
from ._spec import UsageError

__all__ = ["specialize", "wraps", "by_reference", "lazy_result", "refuse_sync_result", "sync_in_async", "not_callable",
           "refuse_generator", "check_decoratable", "UsageError", "CORO", "LAZY_TYPES"]

CORO = types.CoroutineType

# results of a sync call that need a second look: an awaitable (the function was async) or a generator
LAZY_TYPES = frozenset({types.CoroutineType, types.GeneratorType, types.AsyncGeneratorType})


def specialize(policy: Any, fn: F, make_sync: Callable[[Any], Any], make_async: Callable[[Any], Any]) -> F:
    """`make_sync(fn)` / `make_async(fn)` build the wrapper; it gets fn's name, doc and signature and
    pickles by reference (see `by_reference`)."""
    if not callable(fn):
        raise TypeError(f"{type(policy).__name__} decorates a callable, got {fn!r}")
    wrapper = make_async(fn) if is_async_callable(fn) else make_sync(fn)
    return wraps(fn)(wrapper)


# -- pickling by reference ---------------------------------------------------------------------------------

class _ByName:
    """A wrapper's ``__reduce_ex__``: the wrapper is pickled as the global ``__module__.__qualname__``
    (pickle looks it up there and checks it is the same object), as functions are. Holds the name, not
    the wrapper (no reference cycle)."""

    __slots__ = ("qualname",)

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname

    def __call__(self, protocol: int = 2) -> str:
        return self.qualname


def by_reference(wrapper: T) -> T:
    """Make `wrapper` (whose ``__module__`` / ``__qualname__`` name the decorated function, as
    functools.wraps sets them) pickle by reference. A Python function already does; any other object
    with a ``__dict__`` (a compiled or twin guard) gets an instance-level ``__reduce_ex__``, which pickle
    looks up on the instance. Returns `wrapper`. A wrapper that is not reachable under its name (a
    function decorated inside another function) still fails to pickle, as a plain function would."""
    if isinstance(wrapper, (types.FunctionType, types.BuiltinFunctionType, type)):
        return wrapper
    qualname = getattr(wrapper, "__qualname__", None)
    if isinstance(qualname, str):
        try:
            wrapper.__reduce_ex__ = _ByName(qualname)  # type: ignore[method-assign,assignment]
        except (AttributeError, TypeError):     # no __dict__: nothing to do (it pickles as it pickles)
            pass
    return wrapper


def wraps(fn: F) -> Callable[[Any], F]:
    """``functools.wraps(fn)`` plus `by_reference`: use it for every decorated-function wrapper (which,
    for a type checker, stands for fn: same parameters, same return type)."""
    def apply(wrapper: Any) -> F:
        return cast(F, by_reference(functools.update_wrapper(wrapper, fn)))
    return apply


# -- sync vs async, generators -----------------------------------------------------------------------------

# result types known to be plain values (not awaitable, not generators): the hot path's test is one set
# lookup (hasattr(type, "__await__") costs ~300 ns when it fails: the lookup raises inside). Bounded.
PLAIN: set[type] = {int, str, bytes, float, bool, type(None), dict, list, tuple}
_PLAIN = PLAIN      # the one set: `type(r) not in PLAIN and lazy_result(r)` is the inlined form
_PLAIN_MAX = 512


def lazy_result(result: object) -> bool:
    """Cheap test for the success path of a sync form: True when `result` may be an awaitable or a
    generator (then `refuse_sync_result` decides). Learns plain result types."""
    tp = type(result)
    if tp in _PLAIN:
        return False
    if tp in LAZY_TYPES or hasattr(tp, "__await__"):
        return True
    if len(_PLAIN) < _PLAIN_MAX:
        _PLAIN.add(tp)
    return False


def _close(result: object) -> None:
    # an un-awaited coroutine warns "was never awaited" when collected: close it (it never ran)
    if inspect.iscoroutine(result) or isinstance(result, types.GeneratorType):
        result.close()


def refuse_sync_result(policy: Any, fn: Any, result: object, *, generators: bool = True) -> None:
    """A sync form got `result` from `fn` and `lazy_result(result)` held: raise a TypeError when it is
    awaitable (the function is async: call_async), or, when `generators` (the pattern cannot guard a
    stream), when fn is a generator function. Returns when the result is fine after all (a plain
    function that returns a generator object is a value like any other)."""
    cls = type(policy).__name__
    if inspect.isawaitable(result):
        _close(result)
        raise UsageError(f"{cls}: {describe(fn)} is async (it returned {type(result).__name__}, an awaitable), "
                        f"so the sync form cannot guard it and would return it un-awaited: use "
                        f"`await {cls.lower()}.call_async(fn, ...)` or decorate the async def function")
    if generators:
        kind = callable_kind(fn)
        if kind in (GENERATOR, ASYNC_GENERATOR):
            if isinstance(result, types.GeneratorType):
                result.close()
            raise refuse_generator(policy, fn, kind)


def sync_in_async(policy: Any, fn: Any, result: object) -> TypeError:
    """The TypeError when `call_async` (or an async wrapper) got a function whose result is not awaitable."""
    cls = type(policy).__name__
    kind = callable_kind(fn)
    if kind in (GENERATOR, ASYNC_GENERATOR):
        if isinstance(result, types.GeneratorType):
            result.close()
        return refuse_generator(policy, fn, kind)
    return UsageError(f"{cls}.call_async: {describe(fn)} is a sync function (it returned "
                     f"{type(result).__name__}, which cannot be awaited): use {cls.lower()}.call(fn, ...) "
                     "or decorate it")


def refuse_generator(policy: Any, fn: Any, kind: str = GENERATOR) -> TypeError:
    """The TypeError of a pattern that cannot guard a stream (Retry, Fallback, Hedge)."""
    cls = type(policy).__name__
    return UsageError(f"{cls} cannot guard {describe(fn)}, {'an async generator' if kind == ASYNC_GENERATOR else 'a generator'} "
                     f"function: a half-consumed stream cannot be replayed or replaced. Apply {cls} to the "
                     "function that opens the stream, or collect the items into a list inside it")


def check_decoratable(policy: Any, fn: Any, *, generators: bool = False) -> str:
    """At decoration: fn must be callable; `generators=False` refuses generator functions. Returns its kind."""
    if not callable(fn):
        raise TypeError(f"{type(policy).__name__} decorates a callable, got {fn!r}")
    kind = callable_kind(fn)
    if not generators and kind in (GENERATOR, ASYNC_GENERATOR):
        raise refuse_generator(policy, fn, kind)
    return kind


ASYNC_KINDS = (ASYNC, ASYNC_GENERATOR)


def not_callable(policy: Any, form: str, fn: object) -> TypeError:
    """`policy.call(fn)` / `call_async(fn)` with a fn that is not callable: a TypeError naming fn, raised
    before anything is admitted or recorded (a user's programming error is never a dependency's failure,
    never spends a unit, and a Fallback never replaces it)."""
    return TypeError(f"{type(policy).__name__}.{form}: fn must be callable, got {show(fn)} ({type(fn).__name__})")
