"""OpenTelemetry metrics for everything in a `buttress.Registry` (optional extra: ``buttress[otel]``,
which is opentelemetry-api only; the application brings the SDK and exporters).

    from buttress.otel import instrument
    bridge = instrument(registry)            # uses the global MeterProvider unless one is given

The same instruments as `buttress.prometheus`, with dotted names: ``buttress.circuitbreaker.state``
(an observable gauge with attributes name, state), ``buttress.circuitbreaker.not_permitted_calls``
(an observable counter), ..., and the ``buttress.circuitbreaker.calls`` histogram (unit "s",
attributes name, kind), which a Prometheus exporter exposes as ``buttress_circuitbreaker_calls_seconds``.
Observable instruments read snapshots only when the SDK collects; the histogram exists only with
``call_durations=True`` (it subscribes to breaker events, about 2 us per guarded call); ``close()``
unsubscribes.

This module imports without opentelemetry; `instrument` needs it.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from ._observe import CALLS_HELP, DEFAULT_BUCKETS, FAMILIES, GROUP_KINDS, CallTimer, read

__all__ = ["MeterBridge", "instrument"]


def _require() -> Any:
    try:
        from opentelemetry import metrics
    except ImportError as exc:
        raise ImportError("buttress.otel needs opentelemetry-api: pip install 'buttress[otel]'") from exc
    return metrics


class MeterBridge:
    """Observable instruments over a registry, plus the call-duration histogram. Create it with
    `instrument()`."""

    def __init__(self, registry: Any = None, meter_provider: Any = None, prefix: str = "buttress",
                 call_durations: bool = False) -> None:
        metrics = _require()
        from ._params import check_bool
        from ._version import __version__
        if registry is None:
            from .registry import default_registry as registry
        if not callable(getattr(registry, "entries", None)):
            raise TypeError(f"registry must be a buttress.Registry, got {registry!r}")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty str, got {prefix!r}")
        check_bool("call_durations", call_durations)
        self.registry = registry
        self._closed = False
        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        self.meter = meter = provider.get_meter("buttress", __version__)
        self.instruments = []
        for i, fam in enumerate(FAMILIES):
            create = meter.create_observable_counter if fam.type == "counter" else meter.create_observable_gauge
            self.instruments.append(create(f"{prefix}.{fam.group}.{fam.metric}", callbacks=[self._callback(i)],
                                           description=fam.help))
        self._histogram = None
        self._timer = None
        if call_durations:
            name = f"{prefix}.circuitbreaker.calls"
            try:
                self._histogram = meter.create_histogram(name, unit="s", description=CALLS_HELP,
                                                         explicit_bucket_boundaries_advisory=list(DEFAULT_BUCKETS))
            except TypeError:       # opentelemetry-api older than 1.23: no bucket advice
                self._histogram = meter.create_histogram(name, unit="s", description=CALLS_HELP)
            record = self._histogram.record
            self._timer = CallTimer(registry, lambda n, kind, s: record(s, {"name": n, "kind": kind}))

    def _callback(self, index: int) -> Callable[[Any], Iterable[Any]]:
        from opentelemetry.metrics import Observation
        kinds = GROUP_KINDS[FAMILIES[index].group]

        def observe(options: Any = None) -> Iterable[Any]:
            if self._closed:
                return []
            return [Observation(value, labels) for labels, value in read(self.registry, kinds)[index]]

        return observe

    def close(self) -> None:
        """Stop reporting: observable callbacks return nothing, breaker listeners are removed."""
        self._closed = True
        if self._timer is not None:
            self._timer.close()
            self._timer = None


def instrument(registry: Any = None, meter_provider: Any = None, prefix: str = "buttress",
               call_durations: bool = False) -> MeterBridge:
    """Report `registry` (the default registry when None) through `meter_provider` (the global one when
    None). Returns the bridge; ``bridge.close()`` stops it."""
    return MeterBridge(registry, meter_provider, prefix, call_durations)
