"""Prometheus metrics for everything in a `buttress.Registry` (optional extra: ``buttress[prometheus]``).

    from prometheus_client import REGISTRY
    from buttress.prometheus import ButtressCollector
    REGISTRY.register(ButtressCollector())          # or ButtressCollector(registry)

With no registry the collector reads the default registry, which every pattern object built with a name
joins by itself, weakly: ``CircuitBreaker(name="direct-payment")`` is exported with no Registry in
sight, and stops being exported once it is garbage collected. Unnamed objects are never exported.

A custom collector: snapshots (`metrics()`) are read at scrape time, so between scrapes nothing is
paid. Names mirror Resilience4j's (``resilience4j_circuitbreaker_state`` ->
``buttress_circuitbreaker_state``); see docs/observability.md for the full list. The one metric built
from events is the ``buttress_circuitbreaker_calls_seconds{name,kind}`` histogram, built only with
``call_durations=True``: the collector then subscribes to each breaker's success / error / ignored
events, which costs about 2 us per guarded call (an event object per call); by default the breakers'
hot paths are untouched. ``close()`` unsubscribes.

Labels are object names and fixed kinds only, never a key, path or header value, so hostile
traffic cannot grow the number of series; an HTTP `RateLimitMiddleware` given ``name=`` is
exported as a rate limiter (its admitted requests and 429s).

This module imports without prometheus_client; creating a collector needs it.
"""
from __future__ import annotations

import bisect
import re
import threading
from typing import Any, Iterator, Sequence

from ._observe import CALLS_HELP, DEFAULT_BUCKETS, FAMILIES, CallTimer, read

__all__ = ["ButtressCollector", "DEFAULT_BUCKETS", "register"]


def _require() -> Any:
    try:
        import prometheus_client.core as core
    except ImportError as exc:
        raise ImportError("buttress.prometheus needs prometheus_client: pip install 'buttress[prometheus]'") from exc
    return core


class _Histogram:
    """Cumulative-bucket histogram state for one (breaker, kind)."""

    __slots__ = ("counts", "total", "lock")

    def __init__(self, nbuckets: int) -> None:
        self.counts = [0] * (nbuckets + 1)      # the last one is +Inf
        self.total = 0.0
        self.lock = threading.Lock()


class ButtressCollector:
    """A prometheus_client collector over `registry` (the default registry when None)."""

    def __init__(self, registry: Any = None, prefix: str = "buttress", call_durations: bool = False,
                 buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self._core = _require()
        from ._params import check_bool, check_float
        if registry is None:
            from .registry import default_registry as registry
        if not callable(getattr(registry, "entries", None)):
            raise TypeError(f"registry must be a buttress.Registry, got {registry!r}")
        if not isinstance(prefix, str) or not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", prefix):
            raise ValueError(f"prefix must be a metric name prefix ([a-zA-Z_][a-zA-Z0-9_]*), got {prefix!r}")
        bounds: list[float] = [check_float("buckets", b, minimum=0.0, min_inclusive=False)
                               for b in buckets]
        if not bounds or bounds != sorted(set(bounds)):
            raise ValueError(f"buckets must be increasing positive seconds, got {tuple(buckets)!r}")
        self.registry = registry
        self.prefix = prefix
        self.buckets: tuple[float, ...] = tuple(bounds)
        self._hists: dict[tuple[str, str], _Histogram] = {}
        self._lock = threading.Lock()
        self._timer = CallTimer(registry, self._observe) if check_bool("call_durations", call_durations) else None

    def _observe(self, name: str, kind: str, seconds: float) -> None:
        h = self._hists.get((name, kind))
        if h is None:
            with self._lock:
                h = self._hists.setdefault((name, kind), _Histogram(len(self.buckets)))
        i = bisect.bisect_left(self.buckets, seconds)      # first bucket with le >= seconds
        with h.lock:
            h.counts[i] += 1
            h.total += seconds

    def close(self) -> None:
        """Stop listening to breaker events (snapshot metrics keep working)."""
        if self._timer is not None:
            self._timer.close()
            self._timer = None

    def describe(self) -> Iterator[Any]:
        """The families, without samples (so registering does not read every object)."""
        yield from self._families(empty=True)

    def collect(self) -> Iterator[Any]:
        yield from self._families(empty=False)

    def _families(self, empty: bool) -> Iterator[Any]:
        core = self._core
        samples = None if empty else read(self.registry)
        for i, fam in enumerate(FAMILIES):
            name = f"{self.prefix}_{fam.group}_{fam.metric}"
            cls = core.CounterMetricFamily if fam.type == "counter" else core.GaugeMetricFamily
            family = cls(name, fam.help, labels=fam.labels)
            if samples is not None:
                for labels, value in samples[i]:
                    family.add_metric([labels[k] for k in fam.labels], value)
            yield family
        if self._timer is None:
            return
        family = core.HistogramMetricFamily(f"{self.prefix}_circuitbreaker_calls_seconds", CALLS_HELP,
                                            labels=("name", "kind"))
        if not empty:
            with self._lock:
                hists = sorted(self._hists.items())
            for (name, kind), h in hists:
                with h.lock:
                    counts, total = list(h.counts), h.total
                cumulative, running = [], 0
                for le, c in zip((*map(repr, self.buckets), "+Inf"), counts):
                    running += c
                    cumulative.append((le, running))
                family.add_metric([name, kind], cumulative, total)
        yield family


def register(registry: Any = None, prometheus_registry: Any = None, **options: Any) -> ButtressCollector:
    """Create a ButtressCollector and register it with `prometheus_registry` (prometheus_client's
    global REGISTRY when None). Returns the collector (``prometheus_registry.unregister(c); c.close()``
    undoes it)."""
    core = _require()
    collector = ButtressCollector(registry, **options)
    (core.REGISTRY if prometheus_registry is None else prometheus_registry).register(collector)
    return collector
