"""What the metrics bridges (buttress.prometheus, buttress.otel) read, written once.

`FAMILIES` names every instrument (Resilience4j's names with a `buttress` prefix); `read(registry)`
turns a Registry's snapshots into samples, on demand (a scrape or an OTel collection), so nothing is
paid between scrapes. `CallTimer` is the one part that listens to events: it subscribes to the
"success" / "error" / "ignored" events of every circuit breaker in a registry (now and later) and
hands each call's duration to a sink; it exists only while a bridge with call durations is enabled,
and `close()` removes its listeners (a breaker with no listener builds no events at all).
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, NamedTuple

from ._params import check_function

__all__ = ["Family", "FAMILIES", "GROUP_KINDS", "read", "CallTimer", "CALLS_HELP", "KIND_OF_EVENT", "DEFAULT_BUCKETS",
           "check_listener"]


def check_listener(name: str, callback: Any, role: str = "callback(event)") -> Any:
    """An event listener (``cb.on(event, callback)``, ``registry.on_add(callback)``): a plain function that
    takes the event. Listeners are called synchronously, inside the call that produced the event and
    possibly in a thread with no event loop, so an ``async def`` listener (whose coroutine would never be
    awaited) or a generator function is refused with a TypeError; to do async work, schedule it from a
    plain listener (``loop.call_soon_threadsafe``)."""
    return check_function(name, callback, nargs=1, allow_none=False, role=role)


class Family(NamedTuple):
    group: str          # circuitbreaker, ratelimiter, ...
    metric: str         # state, failure_rate, ...
    type: str           # "gauge" or "counter" (a counter is cumulative since the object's creation)
    help: str
    labels: tuple[str, ...]


FAMILIES = (
    Family("circuitbreaker", "state", "gauge", "1 for the breaker's current state, 0 for the others",
           ("name", "state")),
    Family("circuitbreaker", "failure_rate", "gauge",
           "Failure rate of the current window, a fraction (-1 below minimum_calls)", ("name",)),
    Family("circuitbreaker", "slow_call_rate", "gauge",
           "Slow-call rate of the current window, a fraction (-1 below minimum_calls)", ("name",)),
    Family("circuitbreaker", "buffered_calls", "gauge", "Calls in the current window by kind (successful, failed)",
           ("name", "kind")),
    Family("circuitbreaker", "slow_calls", "gauge", "Slow calls in the current window", ("name",)),
    Family("circuitbreaker", "not_permitted_calls", "counter", "Calls refused by the breaker", ("name",)),
    Family("ratelimiter", "calls", "counter", "Rate limiter decisions by kind (admitted, rejected)", ("name", "kind")),
    Family("ratelimiter", "available_permissions", "gauge", "Tokens available now", ("name",)),
    Family("ratelimiter", "keys", "gauge", "Live keys in a keyed limiter's table", ("name",)),
    Family("ratelimiter", "max_keys", "gauge", "Capacity of a keyed limiter's table", ("name",)),
    Family("bulkhead", "available_concurrent_calls", "gauge", "Permits free now", ("name",)),
    Family("bulkhead", "max_allowed_concurrent_calls", "gauge", "Permits in total", ("name",)),
    Family("bulkhead", "waiting_calls", "gauge", "Callers queued for a permit", ("name",)),
    Family("bulkhead", "rejected_calls", "counter", "Calls rejected with BulkheadFullError", ("name",)),
    Family("thread_pool_bulkhead", "max_thread_pool_size", "gauge", "Worker threads at most", ("name",)),
    Family("thread_pool_bulkhead", "running_calls", "gauge", "Calls executing on a worker", ("name",)),
    Family("thread_pool_bulkhead", "queue_depth", "gauge", "Calls accepted and not yet running", ("name",)),
    Family("thread_pool_bulkhead", "queue_capacity", "gauge", "Queue size", ("name",)),
    Family("thread_pool_bulkhead", "rejected_calls", "counter", "Calls rejected with BulkheadFullError", ("name",)),
    Family("retry", "calls", "counter", "Logical calls by outcome (successful_without_retry, successful_with_retry, "
           "failed_without_retry, failed_with_retry)", ("name", "kind")),
    Family("loadshedder", "in_flight", "gauge", "Calls admitted and not finished", ("name",)),
    Family("loadshedder", "capacity", "gauge", "In-flight calls the shedder is sized for now (adaptive when a "
           "limiter drives it)", ("name",)),
    Family("loadshedder", "calls", "counter", "Admission decisions by kind (admitted, shed) and priority",
           ("name", "kind", "priority")),
)
_INDEX = {(f.group, f.metric): i for i, f in enumerate(FAMILIES)}

# seconds: 100 us .. 10 s, for calls guarded in latency-sensitive services
DEFAULT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)
CALLS_HELP = "Duration of calls through the circuit breaker, by kind (successful, failed, ignored)"
KIND_OF_EVENT = {"success": "successful", "error": "failed", "ignored": "ignored"}

Samples = list[list[tuple[dict[str, str], float]]]


# which registry kinds feed which family group
GROUP_KINDS = {
    "circuitbreaker": ("circuit_breaker",),
    "ratelimiter": ("token_bucket", "rate_limiter", "keyed_limiter"),
    "bulkhead": ("bulkhead",),
    "thread_pool_bulkhead": ("bulkhead", "thread_pool_bulkhead"),
    "retry": ("retry",),
    "loadshedder": ("load_shedder",),
}


def _states() -> list[tuple[Any, str]]:
    global _STATES
    if _STATES is None:
        from .circuit_breaker import State
        _STATES = [(st, st.name.lower()) for st in State]
    return _STATES


_STATES: list[tuple[Any, str]] | None = None


def read(registry: Any, kinds: tuple[str, ...] | None = None) -> Samples:
    """Samples for every family, in FAMILIES order: ``out[i] = [(labels, value), ...]``; only from
    objects of `kinds` when given."""
    out: Samples = [[] for _ in FAMILIES]

    def add(group: str, metric: str, labels: dict[str, str], value: Any) -> None:
        if value is not None:
            out[_INDEX[(group, metric)]].append((labels, float(value)))

    for entry in registry.entries():
        kind, name, obj = entry
        if kinds is not None and kind not in kinds:
            continue
        n = {"name": name}
        try:
            m = obj.metrics()
        except Exception:  # noqa: BLE001 - an object without metrics() reports nothing
            continue
        if kind == "circuit_breaker":
            for st, label in _states():
                add("circuitbreaker", "state", {**n, "state": label}, 1 if m.state == st else 0)
            add("circuitbreaker", "failure_rate", n, m.failure_rate)
            add("circuitbreaker", "slow_call_rate", n, m.slow_call_rate)
            add("circuitbreaker", "buffered_calls", {**n, "kind": "successful"}, m.calls - m.failures)
            add("circuitbreaker", "buffered_calls", {**n, "kind": "failed"}, m.failures)
            add("circuitbreaker", "slow_calls", n, m.slow_calls)
            add("circuitbreaker", "not_permitted_calls", n, m.not_permitted)
        elif kind in ("token_bucket", "rate_limiter", "keyed_limiter"):
            if hasattr(m, "admitted"):          # KeyedLimiter counts no decisions (its metrics are the table's)
                add("ratelimiter", "calls", {**n, "kind": "admitted"}, m.admitted)
                add("ratelimiter", "calls", {**n, "kind": "rejected"}, m.rejected)
            available = getattr(obj, "available", None)
            if isinstance(available, int):
                add("ratelimiter", "available_permissions", n, available)
            if kind == "keyed_limiter":
                add("ratelimiter", "keys", n, m.keys)
                add("ratelimiter", "max_keys", n, m.max_keys)
        elif kind == "bulkhead" and hasattr(m, "max_concurrent"):
            add("bulkhead", "available_concurrent_calls", n, m.available)
            add("bulkhead", "max_allowed_concurrent_calls", n, m.max_concurrent)
            add("bulkhead", "waiting_calls", n, m.waiting)
            add("bulkhead", "rejected_calls", n, m.rejected)
        elif kind in ("bulkhead", "thread_pool_bulkhead") and hasattr(m, "max_workers"):
            add("thread_pool_bulkhead", "max_thread_pool_size", n, m.max_workers)
            add("thread_pool_bulkhead", "running_calls", n, m.running)
            add("thread_pool_bulkhead", "queue_depth", n, m.queued)
            add("thread_pool_bulkhead", "queue_capacity", n, m.queue_size)
            add("thread_pool_bulkhead", "rejected_calls", n, m.rejected)
        elif kind == "retry":
            for outcome in ("successful_without_retry", "successful_with_retry", "failed_without_retry",
                            "failed_with_retry"):
                add("retry", "calls", {**n, "kind": outcome}, getattr(m, outcome, None))
        elif kind == "load_shedder":
            add("loadshedder", "in_flight", n, m.in_flight)
            add("loadshedder", "capacity", n, m.capacity)
            for outcome, counts in (("admitted", m.admitted), ("shed", m.shed)):
                for priority, count in counts.items():
                    add("loadshedder", "calls", {**n, "kind": outcome, "priority": priority.name.lower()}, count)
    return out


class CallTimer:
    """Feeds `sink(breaker_name, kind, seconds)` from every circuit breaker of `registry`, including
    breakers added later. `close()` unsubscribes everything."""

    _EVENTS = tuple(KIND_OF_EVENT)

    def __init__(self, registry: Any, sink: Callable[[str, str, float], Any]) -> None:
        self._sink = sink
        self._lock = threading.Lock()
        self._followed: dict[int, tuple[weakref.ref[Any], Callable[[Any], None]]] = {}
        self._registry = registry
        self._closed = False
        registry.on_add(self._on_add)
        for entry in registry.entries("circuit_breaker"):
            self._on_add(entry)

    def _on_add(self, entry: Any) -> None:
        if entry.kind != "circuit_breaker":
            return
        breaker, name = entry.obj, entry.name
        with self._lock:
            if self._closed or id(breaker) in self._followed:
                return
            sink = self._sink

            def listener(event: Any, _name: str = name) -> None:
                if event.duration is not None:
                    sink(_name, KIND_OF_EVENT[event.kind], event.duration)

            for kind in self._EVENTS:
                breaker.on(kind, listener)
            # held weakly: a breaker that joined the default registry by itself must stay collectable;
            # its entry goes when it does (dict.pop, no lock: the callback may run inside a locked step)
            key = id(breaker)
            followed = self._followed

            def forget(_ref: weakref.ref[Any], _key: int = key, _followed: dict[int, Any] = followed) -> None:
                _followed.pop(_key, None)

            self._followed[key] = (weakref.ref(breaker, forget), listener)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            followed, self._followed = self._followed, {}
        try:
            self._registry.off_add(self._on_add)
        except ValueError:
            pass
        for ref, listener in followed.values():
            breaker = ref()
            if breaker is None:
                continue
            for kind in self._EVENTS:
                try:
                    breaker.off(kind, listener)
                except ValueError:
                    pass
