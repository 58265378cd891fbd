"""``memory://``: words in this process (the default store, ``store=None``).

Objects with the same (kind, name) in one MemoryStore share their words within the process; nothing is
shared with other processes. One lease slot (this process), nothing to reclaim.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Mapping

from .. import _impl
from . import Binding, WordStore, canonical_settings, check_kind, check_name, settings_mismatch

__all__ = ["MemoryStore"]


class MemoryStore(WordStore):
    scheme = "memory"

    def __init__(self, name: str = "", implementation: str | None = None) -> None:
        if name:
            check_name(name, "name")
        self._name = name
        self._impl = _impl_name(implementation)
        self.implementation_kind = "atomic" if self._impl == "cython" else "locked"
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str], tuple[str, bytearray, int]] = {}
        self._lockers: dict[int, threading.Lock] = {}
        self._next = 0

    @property
    def url(self) -> str:
        return f"memory://{self._name}"

    @property
    def slot(self) -> int:
        return 1

    @property
    def nslots(self) -> int:
        return 1

    @property
    def core(self) -> Any:
        return _impl.compiled("shared") if self._impl == "cython" else _impl.twin("shared")

    def bind(self, kind: str, name: str, settings: Mapping[str, object], nwords: int,
             init: Callable[[Any], None] | None = None, layout: str = "words") -> Binding:
        check_kind(kind)
        check_name(name, "name")
        text = canonical_settings(settings)
        if isinstance(nwords, bool) or not isinstance(nwords, int) or not 1 <= nwords <= 1 << 28:
            raise ValueError(f"nwords must be an int in [1, 2**28], got {nwords!r}")
        with self._lock:
            found = self._objects.get((kind, name))
            if found is not None:
                have, buf, offset = found
                if have != text:
                    raise settings_mismatch(self.url, kind, name, have, text)
                if len(buf) != 8 * nwords:
                    raise ValueError(f"{kind} {name!r} in {self.url} has {len(buf) // 8} words, "
                                     f"asked for {nwords} (another buttress version?)")
                return Binding(memoryview(buf), offset, False)
            buf = bytearray(8 * nwords)
            if init is not None:
                init(memoryview(buf))
            offset = self._next
            self._next += 8 * nwords
            self._objects[(kind, name)] = (text, buf, offset)
            self._lockers[offset] = threading.Lock()
            return Binding(memoryview(buf), offset, True)

    def locker(self, offset: int) -> Any:
        with self._lock:
            return self._lockers.get(offset)


def _impl_name(implementation: str | None) -> str:
    if implementation is None:
        return _impl.IMPLEMENTATION
    if implementation not in ("cython", "python"):
        raise ValueError(f"implementation must be 'cython', 'python' or None (this process's "
                         f"buttress.IMPLEMENTATION), got {implementation!r}")
    if implementation == "cython":
        _impl.compiled("shared")     # ImportError now, not at the first bind
    return implementation
