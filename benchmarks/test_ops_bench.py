"""Operations overhead: metrics collectors on a breaker's hot path, chaos, registry look-ups, ASGI
middleware per request, health checks; with the floors (bare call, bare await, bare ASGI app).

python -m pytest benchmarks/test_ops_bench.py --benchmark-json=out.json && python benchmarks/report.py out.json
"""
import pytest

from conftest import awaiting, bare, bare_async

import buttress
from buttress.chaos import Chaos
from buttress.registry import Registry


# -- floors ---------------------------------------------------------------------------------------------
def test_floor_bare_call(benchmark):
    benchmark(bare)


def test_floor_bare_await(benchmark):
    awaiting(benchmark, bare_async)


def test_floor_raise_catch(benchmark):
    from conftest import bare_raise, catching
    benchmark(catching(bare_raise, ValueError))


def test_floor_with_c_lock(benchmark):
    """`with lock: f()` on a threading.Lock: the `with` statement on a C context manager (two bound
    methods, a three-argument __exit__) plus an uncontended lock: the floor of the shedder's sync case."""
    import threading
    lock = threading.Lock()

    def run():
        with lock:
            return bare()
    benchmark(run)


# -- load shedder admission (issue 16): total, and a refusal caught ------------------------------------------
def test_shedder_with_admit_low(benchmark):
    from buttress.shedding import LoadShedder, Priority
    shed = LoadShedder(max_in_flight=100)
    admit, low = shed.admit, Priority.LOW

    def run():
        with admit(low):
            return bare()
    benchmark(run)
    assert shed.in_flight == 0


def test_shedder_refused_caught(benchmark):
    """A shed LOW request, caught: floor raise_catch."""
    from buttress.shedding import LoadShedder, Priority
    shed = LoadShedder(max_in_flight=1)
    held = shed.admit(Priority.CRITICAL)
    held.__enter__()
    admit, low = shed.admit, Priority.LOW

    def run():
        try:
            with admit(low):
                return bare()
        except buttress.Overloaded:
            return None
    benchmark(run)
    held.__exit__(None, None, None)
    assert shed.in_flight == 0


# -- a breaker with and without metrics collectors ------------------------------------------------------
def _breaker(reg):
    return reg.circuit_breaker("bench", slow_call_duration=None)


def test_breaker_no_collector(benchmark):
    benchmark(_breaker(Registry())(bare))


def test_breaker_prometheus_snapshots_only(benchmark):
    pytest.importorskip("prometheus_client")
    from buttress.prometheus import ButtressCollector
    reg = Registry()
    cb = _breaker(reg)
    ButtressCollector(reg, call_durations=False)
    benchmark(cb(bare))


def test_breaker_prometheus_call_durations(benchmark):
    pytest.importorskip("prometheus_client")
    from buttress.prometheus import ButtressCollector
    reg = Registry()
    cb = _breaker(reg)
    collector = ButtressCollector(reg, call_durations=True)
    try:
        benchmark(cb(bare))
    finally:
        collector.close()


def test_prometheus_scrape_10_breakers(benchmark):
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest

    from buttress.prometheus import ButtressCollector
    reg = Registry()
    for i in range(10):
        reg.circuit_breaker(f"cb{i}")
    prom = CollectorRegistry()
    prom.register(ButtressCollector(reg))
    benchmark(generate_latest, prom)


# -- chaos ----------------------------------------------------------------------------------------------
def test_chaos_disabled(benchmark):
    benchmark(Chaos(fault_rate=0.5, enabled=False)(bare))


def test_chaos_enabled_zero_rates(benchmark):
    benchmark(Chaos()(bare))


def test_chaos_enabled_three_draws_no_injection(benchmark):
    benchmark(Chaos(fault_rate=1e-12, latency_rate=1e-12, result_rate=1e-12, seed=1)(bare))


# -- registry -------------------------------------------------------------------------------------------
def test_registry_get_existing(benchmark):
    reg = Registry()
    reg.circuit_breaker("payment")
    benchmark(reg.circuit_breaker, "payment")


# -- ASGI middleware, in process (no server: the middleware's own cost) ---------------------------------
_SCOPE = {"type": "http", "method": "GET", "path": "/", "headers": [], "client": ("10.0.0.1", 1234)}


async def _receive():
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message):
    return None


async def _app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _request(app):
    return lambda: app(_SCOPE, _receive, _send)


def test_asgi_await_bare_app(benchmark):
    awaiting(benchmark, _request(_app))


def test_asgi_await_rate_limit_no_headers(benchmark):
    from buttress.asgi import RateLimitMiddleware
    limiter = buttress.KeyedLimiter(rate=1e9, capacity=1000, max_keys=1024)
    awaiting(benchmark, _request(RateLimitMiddleware(_app, limiter, headers=False)))


def test_asgi_await_rate_limit_with_headers(benchmark):
    from buttress.asgi import RateLimitMiddleware
    limiter = buttress.KeyedLimiter(rate=1e9, capacity=1000, max_keys=1024)
    awaiting(benchmark, _request(RateLimitMiddleware(_app, limiter)))


def test_asgi_await_load_shedding(benchmark):
    from buttress.asgi import LoadSheddingMiddleware
    shedding = pytest.importorskip("buttress.shedding")
    awaiting(benchmark, _request(LoadSheddingMiddleware(_app, shedding.LoadShedder(max_in_flight=100))))


# -- health -----------------------------------------------------------------------------------------------
def test_health_await_readiness_async_check_and_breaker(benchmark):
    from buttress.health import HealthRegistry
    h = HealthRegistry()

    async def ok():
        return True

    h.add_readiness("db", ok)
    h.add_breaker(buttress.CircuitBreaker(name="payment"))
    awaiting(benchmark, lambda: h.check("readiness"))
