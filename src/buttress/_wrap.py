"""Decorating with a specialised wrapper: a pattern whose hot path is short inlines it into the
wrapper, saving the extra frame of `Policy.__call__`'s generic wrapper -> `call()` (about a third of a
guarded call's cost). The sync/async dispatch and the wrapper's metadata stay as in `Policy`."""
from __future__ import annotations

import functools
from typing import Any, Callable

from ._base import is_async_callable

__all__ = ["specialize"]


def specialize(policy: Any, fn: Any, make_sync: Callable[[Any], Any], make_async: Callable[[Any], Any]) -> Any:
    """`make_sync(fn)` / `make_async(fn)` build the wrapper; it gets fn's name, doc and signature."""
    if not callable(fn):
        raise TypeError(f"{type(policy).__name__} decorates a callable, got {fn!r}")
    wrapper = make_async(fn) if is_async_callable(fn) else make_sync(fn)
    return functools.wraps(fn)(wrapper)
