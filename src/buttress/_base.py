"""What every pattern object shares: use as a decorator (functions, async functions, methods).

A subclass implements `call(fn, *args, **kwargs)` and `call_async(fn, *args, **kwargs)`.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["Policy", "is_async_callable"]


def is_async_callable(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


class Policy:
    """Base of the pattern objects: `@policy` decorates sync and async callables."""

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
