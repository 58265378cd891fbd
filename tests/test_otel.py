"""OpenTelemetry bridge: the same instruments as the Prometheus collector, read with the SDK's
InMemoryMetricReader after known traffic."""
from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.metrics")
sdk_metrics = pytest.importorskip("opentelemetry.sdk.metrics")
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402

from buttress import CircuitOpenError, FakeClock  # noqa: E402
from buttress.otel import MeterBridge, instrument  # noqa: E402
from buttress.registry import Registry  # noqa: E402


def setup(call_durations=True):       # the bridge's default is False; most tests here want the histogram
    reader = InMemoryMetricReader()
    provider = sdk_metrics.MeterProvider(metric_readers=[reader])
    reg = Registry()
    bridge = instrument(reg, meter_provider=provider, call_durations=call_durations)
    return reg, reader, bridge


def collect(reader) -> dict:
    """{metric name: {frozenset(attributes): data point}}"""
    out: dict = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                points = out.setdefault(m.name, {})
                for dp in m.data.data_points:
                    points[frozenset(dp.attributes.items())] = dp
    return out


def A(**attrs):
    return frozenset(attrs.items())


def test_breaker_instruments_and_histogram():
    clock = FakeClock()
    reg, reader, bridge = setup()
    cb = reg.circuit_breaker("payment", window_size=10, minimum_calls=2, clock=clock)
    cb.call(lambda: clock.advance(0.003))
    cb.call(lambda: clock.advance(0.02))
    with pytest.raises(ValueError):
        cb.call(lambda: (clock.advance(0.2), int("x")))
    cb.force_open()
    with pytest.raises(CircuitOpenError):
        cb.call(lambda: None)
    m = collect(reader)
    assert m["buttress.circuitbreaker.state"][A(name="payment", state="forced_open")].value == 1
    assert m["buttress.circuitbreaker.state"][A(name="payment", state="closed")].value == 0
    assert m["buttress.circuitbreaker.not_permitted_calls"][A(name="payment")].value == 1
    assert m["buttress.circuitbreaker.failure_rate"][A(name="payment")].value == pytest.approx(1 / 3)
    assert m["buttress.circuitbreaker.buffered_calls"][A(name="payment", kind="failed")].value == 1
    ok = m["buttress.circuitbreaker.calls"][A(name="payment", kind="successful")]
    assert ok.count == 2 and ok.sum == pytest.approx(0.023)
    bounds = list(ok.explicit_bounds)
    assert ok.bucket_counts[bounds.index(0.005)] == 1 and ok.bucket_counts[bounds.index(0.025)] == 1
    failed = m["buttress.circuitbreaker.calls"][A(name="payment", kind="failed")]
    assert failed.count == 1 and failed.sum == pytest.approx(0.2)


def test_limiter_bulkhead_retry_instruments():
    clock = FakeClock()
    reg, reader, bridge = setup(call_durations=False)
    tb = reg.token_bucket("api", rate=1.0, capacity=1, clock=clock)
    tb.try_acquire()
    tb.try_acquire()
    bh = reg.bulkhead("db", max_concurrent=2)
    bh.try_acquire()
    retry = reg.retry("rpc", max_attempts=2, backoff=0.0, clock=clock)
    retry.call(lambda: "ok")
    m = collect(reader)
    assert m["buttress.ratelimiter.calls"][A(name="api", kind="admitted")].value == 1
    assert m["buttress.ratelimiter.calls"][A(name="api", kind="rejected")].value == 1
    assert m["buttress.bulkhead.available_concurrent_calls"][A(name="db")].value == 1
    assert m["buttress.bulkhead.max_allowed_concurrent_calls"][A(name="db")].value == 2
    assert m["buttress.retry.calls"][A(name="rpc", kind="successful_without_retry")].value == 1
    assert "buttress.circuitbreaker.calls" not in m
    bh.release()


def test_close_stops_reporting_and_unsubscribes():
    reg, reader, bridge = setup()
    cb = reg.circuit_breaker("x")
    assert isinstance(bridge, MeterBridge) and cb.hook is not None
    bridge.close()
    assert cb.hook is None
    m = collect(reader)
    assert not m.get("buttress.circuitbreaker.state")


def test_no_histogram_by_default():
    reader = InMemoryMetricReader()
    reg = Registry()
    cb = reg.circuit_breaker("x")
    instrument(reg, meter_provider=sdk_metrics.MeterProvider(metric_readers=[reader]))
    cb.call(lambda: None)
    assert cb.hook is None and "buttress.circuitbreaker.calls" not in collect(reader)


def test_bad_arguments():
    with pytest.raises(TypeError, match="registry must be a buttress.Registry"):
        instrument(object())
    with pytest.raises(ValueError, match="prefix must be a non-empty str"):
        instrument(Registry(), prefix="")
    with pytest.raises(TypeError, match="call_durations must be a bool"):
        instrument(Registry(), call_durations=None)
