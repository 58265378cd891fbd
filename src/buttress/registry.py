"""Registry: get-or-create pattern objects by name, with shared per-kind defaults.

One place that knows every breaker, limiter, bulkhead, shedder and retry of a service: metrics
collectors (`buttress.prometheus`, `buttress.otel`) and health probes (`buttress.health`) read from it.

>>> reg = Registry(defaults={"circuit_breaker": {"failure_rate_threshold": 0.3}})
>>> cb = reg.circuit_breaker("payment", window_size=20)
>>> reg.circuit_breaker("payment") is cb
True

Names are unique per kind (a breaker and a bulkhead may both be called "payment"). Asking again for
an existing name returns the same object; options given again must equal the ones it was built with,
otherwise ValueError (two call sites silently sharing differently configured objects is a bug).

Every pattern object built with a name (``CircuitBreaker(name="payment")``, ``Bulkhead(name=...)``,
``TokenBucket(name=...)``, ``LoadShedder(name=...)``, ``Retry(name=...)``...) also joins
`default_registry` by itself, weakly: the collectors export it without any Registry, and it leaves
when it is garbage collected. Of two live objects of one kind and name, the newest is the one held; an
object registered or built in the default registry itself (held strongly) wins over a joined one.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import threading
import weakref
from typing import Any, Callable, Iterator, Mapping, NamedTuple

__all__ = ["Registry", "Entry", "KINDS", "default_registry", "kind_of_class"]

log = logging.getLogger("buttress.registry")

# kind -> (module, class) of what the registry builds. Two kinds are only ever registered, never built:
# "rate_limiter" (LeakyBucket, window limiters, MultiLimiter) and "thread_pool_bulkhead".
_BUILT = {
    "circuit_breaker": ("circuit_breaker", "CircuitBreaker"),
    "token_bucket": ("rate_limit", "TokenBucket"),
    "keyed_limiter": ("rate_limit", "KeyedLimiter"),
    "bulkhead": ("bulkhead", "Bulkhead"),
    "load_shedder": ("shedding", "LoadShedder"),
    "retry": ("retry", "Retry"),
}
KINDS = (*_BUILT, "rate_limiter", "thread_pool_bulkhead")
_OTHER_LIMITERS = ("LeakyBucket", "FixedWindowLimiter", "SlidingWindowLimiter", "MultiLimiter")
# (module, class) -> kind, for objects joining by themselves (looked up along the MRO: no imports)
_KIND_OF_CLASS = {**{(f"buttress.{m}", c): kind for kind, (m, c) in _BUILT.items()},
                  **{("buttress.rate_limit", c): "rate_limiter" for c in _OTHER_LIMITERS},
                  ("buttress.bulkhead", "ThreadPoolBulkhead"): "thread_pool_bulkhead"}


def kind_of_class(cls: type) -> str | None:
    """The registry kind of a pattern class (or a subclass of one), or None."""
    for klass in cls.__mro__:
        kind = _KIND_OF_CLASS.get((klass.__module__, klass.__qualname__))
        if kind is not None:
            return kind
    return None


class Entry(NamedTuple):
    """One object held by a Registry."""

    kind: str
    name: str
    obj: Any


def _cls(kind: str) -> type:
    module, name = _BUILT[kind]
    cls: type = getattr(importlib.import_module(f"buttress.{module}"), name)
    return cls


def _check_kind(kind: object) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    assert isinstance(kind, str)
    return kind


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    return name


def _signature(kind: str) -> inspect.Signature:
    return inspect.signature(_cls(kind))


def _check_options(kind: str, options: Mapping[str, Any], what: str) -> dict[str, Any]:
    params = _signature(kind).parameters
    for key in options:
        if key == "name" and "name" in params:
            raise ValueError(f"{what}: 'name' is the registry key, do not pass it as an option")
        if key not in params:
            allowed = ", ".join(p for p in params if p != "name")
            raise ValueError(f"{what}: {key!r} is not an option of {_BUILT[kind][1]}; allowed: {allowed}")
    return dict(options)


class Registry:
    """Named pattern objects with shared defaults per kind.

    `defaults` maps a kind ("circuit_breaker", "token_bucket", "keyed_limiter", "bulkhead",
    "load_shedder", "retry") to constructor options used for every object of that kind; per-object
    options override them. Thread-safe: concurrent get-or-create of one name builds one object.
    """

    def __init__(self, defaults: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        if defaults is None:
            defaults = {}
        if not isinstance(defaults, Mapping):
            raise TypeError(f"defaults must be a mapping kind -> options, got {defaults!r}")
        self._defaults: dict[str, dict[str, Any]] = {}
        for kind, options in defaults.items():
            if kind not in _BUILT:
                raise ValueError(f"defaults: kind must be one of {', '.join(map(repr, _BUILT))}, got {kind!r}")
            if not isinstance(options, Mapping):
                raise TypeError(f"defaults[{kind!r}] must be a mapping of options, got {options!r}")
            self._defaults[kind] = _check_options(kind, options, f"defaults[{kind!r}]")
        self._lock = threading.RLock()
        self._objects: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        # named objects that joined by themselves (default registry only), held weakly; guarded by _lock
        self._joined: dict[str, weakref.WeakValueDictionary[str, Any]] = {
            kind: weakref.WeakValueDictionary() for kind in KINDS}
        self._building = threading.local()      # (kind, name) this thread is building: announced once, after
        self._configs: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._listeners: list[Callable[[Entry], Any]] = []

    # -- get-or-create ----------------------------------------------------------------------------------
    def circuit_breaker(self, name: str, **options: Any) -> Any:
        """The CircuitBreaker called `name`, built on first use."""
        return self._get_or_create("circuit_breaker", name, options)

    def token_bucket(self, name: str, **options: Any) -> Any:
        """The TokenBucket called `name` (needs `rate`, here or in defaults)."""
        return self._get_or_create("token_bucket", name, options)

    def keyed_limiter(self, name: str, **options: Any) -> Any:
        """The KeyedLimiter called `name` (needs `rate`, here or in defaults)."""
        return self._get_or_create("keyed_limiter", name, options)

    def bulkhead(self, name: str, **options: Any) -> Any:
        """The Bulkhead called `name`."""
        return self._get_or_create("bulkhead", name, options)

    def load_shedder(self, name: str, **options: Any) -> Any:
        """The LoadShedder called `name`."""
        return self._get_or_create("load_shedder", name, options)

    def retry(self, name: str, **options: Any) -> Any:
        """The Retry called `name`."""
        return self._get_or_create("retry", name, options)

    def _get_or_create(self, kind: str, name: str, options: dict[str, Any]) -> Any:
        obj = self._objects[kind].get(name)        # fast path: a dict read, no lock
        if obj is not None and not options:
            return obj
        _check_name(name)
        with self._lock:
            obj = self._objects[kind].get(name)
            if obj is not None:
                self._check_same(kind, name, options)
                return obj
            _check_options(kind, options, f"{kind} {name!r}")
            cls = _cls(kind)
            sig = _signature(kind)
            config = {**self._defaults.get(kind, {}), **options}
            kwargs = dict(config)
            if "name" in sig.parameters:
                kwargs["name"] = name
            self._building.key = (kind, name)
            try:
                obj = cls(**kwargs)
            finally:
                self._building.key = None
            # what the object was built with, every parameter included, to compare later requests against
            full = {p.name: p.default for p in sig.parameters.values()
                    if p.default is not inspect.Parameter.empty and p.name != "name"}
            full.update(config)
            self._store(kind, name, obj, full)
        self._announce(Entry(kind, name, obj))
        return obj

    def _check_same(self, kind: str, name: str, options: dict[str, Any]) -> None:
        config = self._configs[(kind, name)]
        if not options:
            return
        if config is None:
            raise ValueError(f"{kind} {name!r} was registered as an object; it takes no options "
                             f"(got {sorted(options)})")
        missing = object()
        for key, value in options.items():
            have = config.get(key, missing)
            if have is missing:
                _check_options(kind, {key: value}, f"{kind} {name!r}")
            if not (have is value or have == value):
                raise ValueError(f"{kind} {name!r} already exists with {key}={have!r}; got {key}={value!r} "
                                 f"(one name, one configuration)")

    def _store(self, kind: str, name: str, obj: Any, config: dict[str, Any] | None) -> None:
        self._objects[kind] = {**self._objects[kind], name: obj}    # copy-on-write: lock-free readers
        self._configs[(kind, name)] = config

    # -- register / look up / remove ----------------------------------------------------------------------
    def register(self, name: str, obj: Any, kind: str | None = None) -> Any:
        """Add an object built elsewhere under `name` (its kind is inferred from its class). ValueError if
        the name is taken by another object of that kind. Returns `obj`."""
        _check_name(name)
        kind = self._kind_of(obj) if kind is None else _check_kind(kind)
        with self._lock:
            held = self._objects[kind].get(name)
            if held is obj:
                return obj
            if held is not None:
                raise ValueError(f"{kind} {name!r} is already registered ({held!r})")
            self._store(kind, name, obj, None)
            announced = self._joined[kind].get(name) is obj     # it joined by itself: listeners know it
        if not announced:
            self._announce(Entry(kind, name, obj))
        return obj

    @staticmethod
    def _kind_of(obj: Any) -> str:
        for kind in _BUILT:
            try:
                cls = _cls(kind)
            except ImportError:     # a pattern module not available (yet): nothing can be an instance of it
                continue
            if isinstance(obj, cls):
                return kind
        rate_limit = importlib.import_module("buttress.rate_limit")
        if isinstance(obj, tuple(getattr(rate_limit, n) for n in _OTHER_LIMITERS if hasattr(rate_limit, n))):
            return "rate_limiter"
        if isinstance(obj, importlib.import_module("buttress.bulkhead").ThreadPoolBulkhead):
            return "thread_pool_bulkhead"
        raise TypeError(f"cannot tell the kind of {obj!r}: pass kind= (one of {', '.join(KINDS)})")

    def get(self, kind: str, name: str, default: Any = None) -> Any:
        """The object of `kind` called `name`, or `default`."""
        obj = self._objects[_check_kind(kind)].get(name)
        if obj is None:
            with self._lock:
                obj = self._joined[kind].get(name)
        return default if obj is None else obj

    def remove(self, kind: str, name: str) -> Any:
        """Forget an object (collectors stop reporting it); returns it. KeyError if absent."""
        _check_kind(kind)
        with self._lock:
            if name not in self._objects[kind]:
                return self._joined[kind].pop(name)      # KeyError if absent there too
            objects = dict(self._objects[kind])
            obj = objects.pop(name)
            self._objects[kind] = objects
            del self._configs[(kind, name)]
        return obj

    def _view(self, kind: str) -> dict[str, Any]:
        """name -> object of one kind: the held ones, then the live joined ones they do not shadow."""
        held = self._objects[kind]
        joined = self._joined[kind]
        if not joined:
            return held
        with self._lock:
            live = {n: o for n, o in joined.items() if n not in held}
        return {**live, **held} if live else held

    def names(self, kind: str) -> list[str]:
        return sorted(self._view(_check_kind(kind)))

    def entries(self, kind: str | None = None) -> list[Entry]:
        """What the registry holds (of one kind, or all), sorted by kind then name."""
        kinds = KINDS if kind is None else (_check_kind(kind),)
        return [Entry(k, n, o) for k in kinds for n, o in sorted(self._view(k).items())]

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries())

    def __len__(self) -> int:
        return sum(len(self._view(kind)) for kind in KINDS)

    def __contains__(self, key: object) -> bool:
        """``(kind, name) in registry``."""
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] in KINDS):
            return False
        return key[1] in self._view(key[0])

    # -- objects that join by themselves (weakly) ----------------------------------------------------------
    def _join(self, obj: Any, name: str) -> None:
        """Called by a pattern object built with a name (buttress._base.Named): hold it weakly under its
        kind and name (the newest of one name wins) and tell the listeners. An object of no known kind
        is ignored. Only the default registry is joined this way."""
        kind = kind_of_class(type(obj))
        if kind is None:
            return
        with self._lock:
            joined = self._joined[kind]
            if joined.get(name) is obj:
                return
            joined[name] = obj       # TypeError when obj cannot be weakly referenced (caller ignores it)
        if self._objects[kind].get(name) is None and getattr(self._building, "key", None) != (kind, name):
            self._announce(Entry(kind, name, obj))      # (shadowed, or being built here: announced as held)

    # -- listeners (collectors use them to follow new objects) ------------------------------------------------
    def on_add(self, callback: Callable[[Entry], Any]) -> Callable[[Entry], Any]:
        """Call `callback(entry)` for each object added from now on. Returns the callback."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {callback!r}")
        with self._lock:
            self._listeners = [*self._listeners, callback]
        return callback

    def off_add(self, callback: Callable[[Entry], Any]) -> None:
        with self._lock:
            listeners = list(self._listeners)
            listeners.remove(callback)
            self._listeners = listeners

    def _announce(self, entry: Entry) -> None:
        for callback in self._listeners:
            try:
                callback(entry)
            except Exception:  # noqa: BLE001 - a listener never breaks get-or-create
                log.exception("registry listener %r failed on %s %r", callback, entry.kind, entry.name)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={n}" for k in KINDS if (n := len(self._view(k))))
        return f"Registry({counts})"


default_registry = Registry()
"""The process-wide registry that collectors and health probes use when given none. Every pattern object
built with a name joins it by itself, weakly."""
