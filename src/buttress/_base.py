"""What every pattern object shares: use as a decorator (functions, async functions, methods).

A subclass implements `call(fn, *args, **kwargs)` and `call_async(fn, *args, **kwargs)`.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["Policy", "NoCopy", "Named", "refuse_copy", "is_async_callable"]


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


def _join_default_registry(obj: object) -> None:
    """A pattern object built with a name joins the default registry, weakly (collectors export it,
    Registry or not; dropping it removes it). Never raises: a constructor must not fail over metrics."""
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        return
    from .registry import default_registry
    try:
        default_registry._join(obj, name)
    except Exception:  # noqa: BLE001 - e.g. a subclass that cannot be weakly referenced: not exported
        pass


def _name_position(init: Callable[..., Any]) -> tuple[bool, int | None]:
    """-> (whether __init__ takes a `name` at all (or **kwargs), its index among the positional
    arguments after self, or None when it is keyword-only)."""
    try:
        params = list(inspect.signature(init).parameters.values())[1:]
    except (TypeError, ValueError):
        return False, None
    takes = any(p.name == "name" or p.kind is p.VAR_KEYWORD for p in params)
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return takes, positional.index("name") if "name" in positional else None


def _joining(init: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a pattern class's __init__: after it ran, an object given a name (not None) joins the
    default registry. Construction only: no call path is touched."""
    takes, pos = _name_position(init)
    if not takes:
        return init

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        named = kwargs.get("name") if "name" in kwargs else (
            args[pos] if pos is not None and len(args) > pos else None)
        if named is not None:
            _join_default_registry(self)

    __init__._buttress_joins = True  # type: ignore[attr-defined]
    return __init__


class Named:
    """Mixin of the pattern objects that metrics export by name. A subclass whose ``__init__`` takes a
    ``name`` joins the default registry weakly whenever it is given one (not None): its __init__ is
    wrapped here, once per class (buttress.registry; the objects must be weakly referenceable). Policy
    has it; a pattern object that is not a Policy (KeyedLimiter) inherits it directly."""

    __slots__ = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_buttress_joins", False):
            cls.__init__ = _joining(init)  # type: ignore[method-assign]


class Policy(Named, NoCopy):
    """Base of the pattern objects: `@policy` decorates sync and async callables. Pattern objects
    refuse pickling and copying (`NoCopy`); the functions they decorate pickle by reference; given a
    name, they are exported by the metrics collectors (`Named`)."""

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
