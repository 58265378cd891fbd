"""Prometheus collector: scrape generate_latest after known traffic and check names and values."""
from __future__ import annotations

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from buttress import BulkheadFullError, CircuitOpenError, FakeClock, Overloaded, ThreadPoolBulkhead  # noqa: E402
from buttress.prometheus import ButtressCollector, register  # noqa: E402
from buttress.registry import Registry  # noqa: E402


def scrape(prom: CollectorRegistry) -> dict:
    """{(sample name, frozenset(labels)): value} from the text exposition format."""
    text = generate_latest(prom).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def L(**labels):
    return frozenset(labels.items())


def traffic(clock: FakeClock, reg: Registry) -> None:
    cb = reg.circuit_breaker("payment", window_size=10, minimum_calls=2, ignore=(KeyError,), clock=clock)

    def takes(seconds, exc=None):
        def fn():
            clock.advance(seconds)
            if exc is not None:
                raise exc
            return "ok"
        return fn

    cb.call(takes(0.003))
    cb.call(takes(0.02))
    for seconds, exc in ((0.2, ValueError("bad")), (0.0005, KeyError("ignored"))):
        with pytest.raises(type(exc)):
            cb.call(takes(seconds, exc))
    cb.force_open()
    for _ in range(2):
        with pytest.raises(CircuitOpenError):
            cb.call(takes(0.0))


def test_breaker_metrics_names_and_values():
    clock = FakeClock()
    reg = Registry()
    prom = CollectorRegistry()
    prom.register(ButtressCollector(reg, call_durations=True))
    traffic(clock, reg)
    m = scrape(prom)
    assert m[("buttress_circuitbreaker_state", L(name="payment", state="forced_open"))] == 1.0
    for state in ("closed", "open", "half_open", "disabled", "metrics_only"):
        assert m[("buttress_circuitbreaker_state", L(name="payment", state=state))] == 0.0
    assert m[("buttress_circuitbreaker_not_permitted_calls_total", L(name="payment"))] == 2.0
    assert m[("buttress_circuitbreaker_failure_rate", L(name="payment"))] == pytest.approx(1 / 3)
    assert m[("buttress_circuitbreaker_slow_call_rate", L(name="payment"))] == 0.0
    assert m[("buttress_circuitbreaker_buffered_calls", L(name="payment", kind="successful"))] == 2.0
    assert m[("buttress_circuitbreaker_buffered_calls", L(name="payment", kind="failed"))] == 1.0
    assert m[("buttress_circuitbreaker_slow_calls", L(name="payment"))] == 0.0
    h = "buttress_circuitbreaker_calls_seconds"
    assert m[(h + "_count", L(name="payment", kind="successful"))] == 2.0
    assert m[(h + "_sum", L(name="payment", kind="successful"))] == pytest.approx(0.023)
    assert m[(h + "_bucket", L(name="payment", kind="successful", le="0.0025"))] == 0.0
    assert m[(h + "_bucket", L(name="payment", kind="successful", le="0.005"))] == 1.0
    assert m[(h + "_bucket", L(name="payment", kind="successful", le="0.025"))] == 2.0
    assert m[(h + "_bucket", L(name="payment", kind="successful", le="+Inf"))] == 2.0
    assert m[(h + "_count", L(name="payment", kind="failed"))] == 1.0
    assert m[(h + "_sum", L(name="payment", kind="failed"))] == pytest.approx(0.2)
    assert m[(h + "_bucket", L(name="payment", kind="failed", le="0.1"))] == 0.0
    assert m[(h + "_bucket", L(name="payment", kind="failed", le="0.25"))] == 1.0
    # ignored calls are timed when the breaker's "ignored" event carries a duration (it does not yet)
    if ignored_event_has_duration():
        assert m[(h + "_count", L(name="payment", kind="ignored"))] == 1.0
        assert m[(h + "_bucket", L(name="payment", kind="ignored", le="0.0005"))] == 1.0   # le is inclusive
    else:
        assert (h + "_count", L(name="payment", kind="ignored")) not in m


def ignored_event_has_duration() -> bool:
    from buttress import CircuitBreaker
    cb = CircuitBreaker(name="probe", ignore=(KeyError,))
    events = []
    cb.on("ignored", events.append)
    with pytest.raises(KeyError):
        cb.call(lambda: {}["x"])
    return events[0].duration is not None


def test_limiter_bulkhead_retry_values():
    clock = FakeClock()
    reg = Registry()
    prom = CollectorRegistry()
    prom.register(ButtressCollector(reg, call_durations=False))
    tb = reg.token_bucket("api", rate=1.0, capacity=2, clock=clock)
    assert [tb.try_acquire() for _ in range(3)] == [True, True, False]
    kl = reg.keyed_limiter("clients", rate=1.0, max_keys=16, clock=clock)
    for key in ("a", "b", "c", "a"):
        kl.try_acquire(key)
    bh = reg.bulkhead("db", max_concurrent=1)
    with bh:
        with pytest.raises(BulkheadFullError):
            bh.call(lambda: None)
        m_inside = scrape(prom)
    retry = reg.retry("rpc", max_attempts=3, backoff=0.0, retry_on=(ConnectionError,), clock=clock)
    flaky = iter([ConnectionError(), "ok"])

    def call():
        v = next(flaky)
        if isinstance(v, Exception):
            raise v
        return v

    assert retry.call(call) == "ok"
    with pytest.raises(ValueError):
        retry.call(lambda: (_ for _ in ()).throw(ValueError()))
    pool = ThreadPoolBulkhead(max_workers=2, queue_size=5)
    reg.register("workers", pool)
    m = scrape(prom)
    pool.shutdown()
    assert m[("buttress_ratelimiter_calls_total", L(name="api", kind="admitted"))] == 2.0
    assert m[("buttress_ratelimiter_calls_total", L(name="api", kind="rejected"))] == 1.0
    assert m[("buttress_ratelimiter_available_permissions", L(name="api"))] == 0.0
    assert m[("buttress_ratelimiter_keys", L(name="clients"))] == 3.0
    assert m[("buttress_ratelimiter_max_keys", L(name="clients"))] == 16.0
    assert m_inside[("buttress_bulkhead_available_concurrent_calls", L(name="db"))] == 0.0
    assert m[("buttress_bulkhead_available_concurrent_calls", L(name="db"))] == 1.0
    assert m[("buttress_bulkhead_max_allowed_concurrent_calls", L(name="db"))] == 1.0
    assert m[("buttress_bulkhead_rejected_calls_total", L(name="db"))] == 1.0
    assert m[("buttress_bulkhead_waiting_calls", L(name="db"))] == 0.0
    assert m[("buttress_retry_calls_total", L(name="rpc", kind="successful_with_retry"))] == 1.0
    assert m[("buttress_retry_calls_total", L(name="rpc", kind="failed_without_retry"))] == 1.0
    assert m[("buttress_retry_calls_total", L(name="rpc", kind="successful_without_retry"))] == 0.0
    assert m[("buttress_retry_calls_total", L(name="rpc", kind="failed_with_retry"))] == 0.0
    assert m[("buttress_thread_pool_bulkhead_max_thread_pool_size", L(name="workers"))] == 2.0
    assert m[("buttress_thread_pool_bulkhead_queue_capacity", L(name="workers"))] == 5.0
    assert not any(name.startswith("buttress_circuitbreaker_calls_seconds") for name, _ in m)


def test_load_shedder_metrics():
    shedding = pytest.importorskip("buttress.shedding")
    reg = Registry()
    prom = CollectorRegistry()
    prom.register(ButtressCollector(reg))
    shed = reg.load_shedder("edge", max_in_flight=2)          # LOW admitted below 1 in flight
    with shed.admit(shedding.Priority.LOW):
        with pytest.raises(Overloaded):
            with shed.admit(shedding.Priority.LOW):
                pass
        with shed.admit(shedding.Priority.CRITICAL):
            m_inside = scrape(prom)
    m = scrape(prom)
    assert m_inside[("buttress_loadshedder_in_flight", L(name="edge"))] == 2.0
    assert m[("buttress_loadshedder_in_flight", L(name="edge"))] == 0.0
    assert m[("buttress_loadshedder_capacity", L(name="edge"))] == 2.0
    calls = "buttress_loadshedder_calls_total"
    assert m[(calls, L(name="edge", kind="admitted", priority="low"))] == 1.0
    assert m[(calls, L(name="edge", kind="shed", priority="low"))] == 1.0
    assert m[(calls, L(name="edge", kind="admitted", priority="critical"))] == 1.0
    assert m[(calls, L(name="edge", kind="shed", priority="medium"))] == 0.0


def test_follows_breakers_added_later_and_close_unsubscribes():
    clock = FakeClock()
    reg = Registry()
    prom = CollectorRegistry()
    collector = ButtressCollector(reg, call_durations=True)
    prom.register(collector)
    late = reg.circuit_breaker("late", clock=clock)
    late.call(lambda: clock.advance(0.5))
    assert scrape(prom)[("buttress_circuitbreaker_calls_seconds_count", L(name="late", kind="successful"))] == 1.0
    assert late.hook is not None
    collector.close()
    assert late.hook is None                                  # no listener left: events cost nothing again
    late.call(lambda: None)
    m = scrape(prom)
    assert not any(name.startswith("buttress_circuitbreaker_calls_seconds") for name, _ in m)
    assert m[("buttress_circuitbreaker_state", L(name="late", state="closed"))] == 1.0
    reg.circuit_breaker("after-close")
    assert reg.circuit_breaker("after-close").hook is None


def test_nothing_subscribed_by_default():
    reg = Registry()
    cb = reg.circuit_breaker("x")
    prom = CollectorRegistry()
    prom.register(ButtressCollector(reg))
    reg.circuit_breaker("y")
    assert cb.hook is None and reg.circuit_breaker("y").hook is None
    assert not any(name.startswith("buttress_circuitbreaker_calls_seconds") for name, _ in scrape(prom))


def test_register_helper_prefix_and_describe():
    reg = Registry()
    reg.bulkhead("db")
    prom = CollectorRegistry(auto_describe=True)
    collector = register(reg, prom, prefix="svc", call_durations=False)
    m = scrape(prom)
    assert m[("svc_bulkhead_max_allowed_concurrent_calls", L(name="db"))] == 10.0
    with pytest.raises(ValueError):                           # describe() names clash with a second copy
        prom.register(ButtressCollector(reg, prefix="svc", call_durations=False))
    prom.unregister(collector)
    assert scrape(prom) == {}


def test_default_registry_used_when_none():
    from buttress.registry import default_registry
    collector = ButtressCollector(call_durations=False)
    assert collector.registry is default_registry


def test_bad_arguments():
    with pytest.raises(TypeError, match="registry must be a buttress.Registry"):
        ButtressCollector(object())
    with pytest.raises(ValueError, match="prefix must be a metric name prefix"):
        ButtressCollector(Registry(), prefix="my-app")
    with pytest.raises(ValueError, match="buckets must be increasing positive seconds"):
        ButtressCollector(Registry(), buckets=(0.5, 0.1))
    with pytest.raises(ValueError, match="buckets must be a finite number > 0"):
        ButtressCollector(Registry(), buckets=(0.0, 1.0))
    with pytest.raises(TypeError, match="call_durations must be a bool"):
        ButtressCollector(Registry(), call_durations="yes")


# -- every named object is exported, Registry or not (issue 17) ---------------------------------------------

import gc  # noqa: E402
import uuid  # noqa: E402
import weakref  # noqa: E402


def ours(m: dict, p: str) -> dict:
    """The samples whose name label starts with p."""
    return {k: v for k, v in m.items() if dict(k[1]).get("name", "").startswith(p)}


def test_named_objects_built_without_a_registry_are_exported_and_leave_when_dropped():
    from buttress import Bulkhead, CircuitBreaker, KeyedLimiter, LoadShedder, Retry, TokenBucket
    from buttress.shedding import Priority
    p = f"direct-{uuid.uuid4().hex[:6]}"
    clock = FakeClock()
    prom = CollectorRegistry()
    collector = ButtressCollector(call_durations=True)        # the default registry
    prom.register(collector)
    cb = CircuitBreaker(name=f"{p}-payment", window_size=4, minimum_calls=2, clock=clock)
    bh = Bulkhead(max_concurrent=3, name=f"{p}-db")
    tb = TokenBucket(rate=1.0, capacity=2, name=f"{p}-api", clock=clock)
    kl = KeyedLimiter(rate=1.0, capacity=1, max_keys=64, name=f"{p}-clients", clock=clock)
    shed = LoadShedder(max_in_flight=4, name=f"{p}-edge", clock=clock)
    retry = Retry(max_attempts=2, backoff=0.0, name=f"{p}-rpc", clock=clock)

    def work():
        clock.advance(0.002)
        return "ok"
    for _ in range(3):
        assert cb.call(work) == "ok"
    assert [tb.try_acquire() for _ in range(3)] == [True, True, False]
    with bh, shed.admit(Priority.LOW):
        m_inside = scrape(prom)
    assert retry.call(lambda: "ok") == "ok"
    m = ours(scrape(prom), p)
    assert m[("buttress_circuitbreaker_state", L(name=f"{p}-payment", state="closed"))] == 1.0
    assert m[("buttress_circuitbreaker_buffered_calls", L(name=f"{p}-payment", kind="successful"))] == 3.0
    assert m[("buttress_circuitbreaker_calls_seconds_count", L(name=f"{p}-payment", kind="successful"))] == 3.0
    assert m_inside[("buttress_bulkhead_available_concurrent_calls", L(name=f"{p}-db"))] == 2.0
    assert m[("buttress_bulkhead_max_allowed_concurrent_calls", L(name=f"{p}-db"))] == 3.0
    assert m[("buttress_ratelimiter_calls_total", L(name=f"{p}-api", kind="admitted"))] == 2.0
    assert m[("buttress_ratelimiter_calls_total", L(name=f"{p}-api", kind="rejected"))] == 1.0
    assert m[("buttress_ratelimiter_max_keys", L(name=f"{p}-clients"))] == 64.0
    assert m_inside[("buttress_loadshedder_in_flight", L(name=f"{p}-edge"))] == 1.0
    assert m[("buttress_loadshedder_calls_total", L(name=f"{p}-edge", kind="admitted", priority="low"))] == 1.0
    assert m[("buttress_retry_calls_total", L(name=f"{p}-rpc", kind="successful_without_retry"))] == 1.0
    # dropped objects disappear (the collector and its call timer hold them weakly); gauges and counters
    # go at once, the breaker's call-duration histogram stays (it is the collector's own record)
    refs = [weakref.ref(o) for o in (cb, bh, tb, kl, shed, retry)]
    del cb, bh, tb, kl, shed, retry
    gc.collect()
    assert all(r() is None for r in refs)
    left = ours(scrape(prom), p)
    assert {name for name, _ in left} <= {"buttress_circuitbreaker_calls_seconds_bucket",
                                          "buttress_circuitbreaker_calls_seconds_count",
                                          "buttress_circuitbreaker_calls_seconds_sum",
                                          "buttress_circuitbreaker_calls_seconds_created"}
    prom.unregister(collector)
    collector.close()


def test_unnamed_objects_are_not_exported_and_series_do_not_grow_with_traffic():
    from buttress import Bulkhead, CircuitBreaker, KeyedLimiter, LoadShedder, Retry, TokenBucket
    from buttress.registry import default_registry
    p = f"card-{uuid.uuid4().hex[:6]}"
    clock = FakeClock()
    prom = CollectorRegistry()
    prom.register(ButtressCollector())
    before = len(default_registry)
    unnamed = [CircuitBreaker(clock=clock), Bulkhead(), TokenBucket(rate=1.0, clock=clock), Retry(clock=clock),
               LoadShedder(max_in_flight=2, clock=clock), KeyedLimiter(rate=1.0, max_keys=8, clock=clock)]
    assert len(default_registry) == before and unnamed
    kl = KeyedLimiter(rate=1.0, capacity=1, max_keys=4096, name=f"{p}-keyed", clock=clock)
    tb = TokenBucket(rate=100.0, name=f"{p}-tb", clock=clock)
    kl.try_acquire("first")
    tb.try_acquire()
    series = set(ours(scrape(prom), p))
    for i in range(2000):                   # hostile traffic: every request a new key
        kl.try_acquire(f"client-{i}")
        tb.try_acquire()
        clock.advance(0.001)
    after = ours(scrape(prom), p)
    assert set(after) == series and len(series) > 0
    assert all(set(dict(labels)) <= {"name", "kind", "state", "priority"} for _, labels in after)
