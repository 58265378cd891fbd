"""Where a pattern keeps its state: one Store interface, three implementations (DESIGN §5).

- ``memory://`` (:class:`MemoryStore`): this process. The default (``store=None``).
- ``shm://NAME`` (:class:`SharedMemoryStore`): one POSIX shared-memory segment per store, shared by every
  process of the host that opens NAME. A decision is the same lock-free CAS on a word in the segment.
- ``redis://`` / ``rediss://`` / ``valkey://`` / ``valkeys://``: cluster-wide (:class:`RedisStore`, redis-py; ``pip install "buttress[redis]"``).

Objects with the same ``(kind, name)`` in the same store share one state. A *word store* (memory, shm)
hands out int64 words: ``bind(kind, name, settings, nwords)`` finds or creates the object's words in the
store's directory and checks that the settings agree (ValueError naming the setting otherwise). How each
core type lays out its words is in docs/stores.md.
"""
from __future__ import annotations

import json
import math
import re
import threading
from typing import Any, Callable, Mapping, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["Store", "WordStore", "Binding", "store_from_url", "canonical_settings", "check_name", "RedisStore",
           "MemoryStore", "SharedMemoryStore"]

# a name (of a store or of an object in it): printable, no control characters, bounded
_NAME_MAX = 191
_KIND_RE = re.compile(r"[a-z][a-z0-9_.]{0,30}\Z")


def check_name(name: object, what: str = "name", maximum: int = _NAME_MAX) -> str:
    """A non-empty str of printable characters, at most `maximum` bytes in UTF-8."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {name!r} ({type(name).__name__})")
    if not name or not name.isprintable():
        raise ValueError(f"{what} must be a non-empty printable str, got {name!r}")
    size = len(name.encode("utf-8"))
    if size > maximum:
        raise ValueError(f"{what} must be at most {maximum} bytes in UTF-8, got {size} bytes ({name[:40]!r}...)")
    return name


def check_kind(kind: object) -> str:
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise ValueError(f"kind must be a lower-case identifier of at most 31 characters "
                         f"(letters, digits, '_', '.'), got {kind!r}")
    return kind


def _canon_value(key: str, value: object) -> object:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"setting {key}={value!r} is not a finite number")
        return value
    if isinstance(value, (tuple, list)):
        return [_canon_value(key, v) for v in value]
    raise TypeError(f"setting {key} must be None, bool, int, float, str or a list of them, "
                    f"got {value!r} ({type(value).__name__})")


def canonical_settings(settings: Mapping[str, object]) -> str:
    """One canonical text for a settings mapping: JSON, keys sorted, no spaces, floats as repr (shortest
    round trip), so two processes that pass equal settings write byte-equal text."""
    if not isinstance(settings, Mapping):
        raise TypeError(f"settings must be a mapping of setting name -> value, got {type(settings).__name__}")
    out = {}
    for key, value in settings.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"setting names must be non-empty str, got {key!r}")
        out[key] = _canon_value(key, value)
    return json.dumps(out, sort_keys=True, separators=(",", ":"), allow_nan=False)


def settings_mismatch(where: str, kind: str, name: str, have: str, want: str) -> ValueError:
    """The ValueError for two openers of one (kind, name) whose settings differ: names every setting
    that differs with both values."""
    a, b = json.loads(have), json.loads(want)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            diffs.append(f"{key}={b.get(key, '<unset>')!r} here but {key}={a.get(key, '<unset>')!r} in the store")
    what = "; ".join(diffs) or f"settings {want} here but {have} in the store"
    return ValueError(f"{kind} {name!r} in {where} was created with other settings: {what}. "
                      f"Every process must open a shared name with the same settings (or use another name)")


class Binding(NamedTuple):
    """What ``WordStore.bind`` returns: a writable buffer over the object's int64 words, the words' byte
    offset in the store, and whether this call created them (zeroed, then passed to ``init``)."""
    words: Any
    offset: int
    created: bool


class Store:
    """The interface every store implements. A store is named by its URL; pattern objects take it as
    ``store=`` (a Store or a URL) together with ``name=``."""

    scheme: str = ""

    @property
    def url(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        """Release what this process holds in the store (for shm: its lease and permits)."""

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        # a store is named by its URL: a child process opens its own handle
        return (store_from_url, (self.url,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class WordStore(Store):
    """A store of int64 words (memory, shm): the compiled core decides on words that live in the store."""

    #: "atomic" (the compiled core's lock-free CAS) or "locked" (the twin, under a lock)
    implementation_kind: str = "atomic"

    @property
    def slot(self) -> int:
        """This process's lease slot (1..nslots)."""
        raise NotImplementedError

    @property
    def nslots(self) -> int:
        raise NotImplementedError

    @property
    def core(self) -> Any:
        """The core module (compiled or twin ``shared``) whose types decide on this store's words."""
        raise NotImplementedError

    def bind(self, kind: str, name: str, settings: Mapping[str, object], nwords: int,
             init: Callable[[Any], None] | None = None, layout: str = "words") -> Binding:
        raise NotImplementedError

    def locker(self, offset: int) -> Any:
        """The lock the twin decides under for the object at `offset` (None: its own threading.Lock)."""
        return None

    def reclaim(self) -> int:
        """Take back the permits of dead lease holders; returns how many."""
        return 0

    def permits(self, kind: str, name: str, max_permits: int) -> Any:
        """A ``SharedPermits`` (of this store's implementation) bound to (kind, name) with max_permits."""
        core = self.core
        nwords = permits_nwords(self.nslots, core)
        b = self.bind(kind, name, {"max_permits": max_permits}, nwords, layout="permits")
        return core.SharedPermits(b.words, self.slot, self.nslots, max_permits, self.locker(b.offset),
                                  self._on_refused)

    def _on_refused(self) -> int:
        return self.reclaim()


def permits_nwords(nslots: int, core: Any) -> int:
    """Words of one SharedPermits with `nslots` lease slots, rounded up to whole 64-byte lines."""
    n: int = core.HEADER_WORDS + core.SLOT_WORDS * nslots
    return (n + 7) & ~7


_memory_lock = threading.Lock()
_memory_stores: dict[str, Any] = {}


def store_from_url(url: object) -> Store:
    """A store from its URL: ``memory://`` (or ``memory://NAME``: a process-wide store of that name),
    ``shm://NAME`` (optionally ``?size=BYTES&slots=N``), ``redis://`` / ``rediss://`` / ``valkey://`` / ``valkeys://``."""
    if isinstance(url, Store):
        return url
    if not isinstance(url, str):
        raise TypeError(f"store must be a Store or a URL str, got {url!r} ({type(url).__name__})")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        from .memory import MemoryStore
        name = unquote(parts.netloc + parts.path)
        with _memory_lock:
            store = _memory_stores.get(name)
            if store is None:
                store = _memory_stores[name] = MemoryStore(name)
            return store
    if scheme == "shm":
        from .shm import SharedMemoryStore
        name = unquote(parts.netloc + parts.path)
        kwargs: dict[str, Any] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
            if key not in ("size", "slots"):
                raise ValueError(f"store URL {url!r}: unknown parameter {key!r} (allowed: size, slots)")
            try:
                kwargs[key] = int(value)
            except ValueError:
                raise ValueError(f"store URL {url!r}: {key} must be an int, got {value!r}") from None
        if not name:
            raise ValueError(f"store URL {url!r} names no segment: use shm://NAME")
        return SharedMemoryStore(name, **kwargs)
    if scheme in ("redis", "rediss", "valkey", "valkeys"):
        from .redis import RedisStore
        return RedisStore.from_url(url)
    raise ValueError(f"store URL {url!r}: unknown scheme {parts.scheme!r} "
                     f"(allowed: memory://, shm://NAME, redis://, rediss://, valkey://, valkeys://)")


def __getattr__(name: str) -> Any:
    if name == "MemoryStore":
        from .memory import MemoryStore
        return MemoryStore
    if name == "SharedMemoryStore":
        from .shm import SharedMemoryStore
        return SharedMemoryStore
    if name == "RedisStore":
        from .redis import RedisStore
        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
