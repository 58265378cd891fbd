"""What every pattern object shares: use as a decorator (functions, async functions, methods).

A subclass implements `call(fn, *args, **kwargs)` and `call_async(fn, *args, **kwargs)`.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["Policy", "NoCopy", "refuse_copy", "is_async_callable"]


def is_async_callable(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def refuse_copy(obj: object) -> TypeError:
    """The TypeError of pickling or copying a pattern object (DESIGN §3c): its state (counters, windows,
    permits, waiters, timers) lives in this process, and a copy would silently split it in two."""
    cls = type(obj).__name__
    return TypeError(f"{cls} objects cannot be pickled or copied: a copy would split its state (counters, "
                     f"windows, permits) in two. Share the {cls} object itself, or share state between "
                     "processes with store= (a buttress store); a decorated module-level function pickles "
                     "by reference")


class NoCopy:
    """Mixin: pickling, copy.copy and copy.deepcopy raise `refuse_copy`'s TypeError."""

    __slots__ = ()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise refuse_copy(self)

    def __reduce__(self) -> Any:
        raise refuse_copy(self)

    def __copy__(self) -> Any:
        raise refuse_copy(self)

    def __deepcopy__(self, memo: Any) -> Any:
        raise refuse_copy(self)


class Policy(NoCopy):
    """Base of the pattern objects: `@policy` decorates sync and async callables. Pattern objects
    refuse pickling and copying (`NoCopy`); the functions they decorate pickle by reference."""

    __slots__ = ()

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def call_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def __call__(self, fn: F) -> F:
        """Decorate `fn`; the wrapper keeps __name__, __doc__, the signature, and works on methods."""
        if not callable(fn):
            raise TypeError(f"{type(self).__name__} decorates a callable, got {fn!r}")
        if is_async_callable(fn):
            call_async = self.call_async

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                return await call_async(fn, *args, **kwargs)

            return async_wrapper  # type: ignore[return-value]
        call = self.call

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return call(fn, *args, **kwargs)

        return wrapper  # type: ignore[return-value]
