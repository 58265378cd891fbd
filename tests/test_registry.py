"""Registry: get-or-create by name, shared defaults, conflicts, iteration, listeners, races."""
from __future__ import annotations

import subprocess
import sys

import pytest

from buttress import Bulkhead, CircuitBreaker, FakeClock, KeyedLimiter, Retry, TokenBucket
from buttress.rate_limit import LeakyBucket
from buttress.registry import KINDS, Entry, Registry, default_registry
from helpers import race


def test_same_name_same_object_and_name_passed():
    reg = Registry()
    cb = reg.circuit_breaker("payment")
    assert isinstance(cb, CircuitBreaker) and cb.name == "payment"
    assert reg.circuit_breaker("payment") is cb
    assert reg.circuit_breaker("search") is not cb
    tb = reg.token_bucket("api", rate=10.0)
    assert isinstance(tb, TokenBucket) and tb.name == "api" and tb.rate == 10.0
    assert reg.token_bucket("api") is tb
    bh = reg.bulkhead("db", max_concurrent=3)
    assert isinstance(bh, Bulkhead) and bh.name == "db" and bh.max_concurrent == 3
    kl = reg.keyed_limiter("clients", rate=5.0, max_keys=16)
    assert isinstance(kl, KeyedLimiter) and kl.max_keys == 16
    r = reg.retry("rpc", max_attempts=5)
    assert isinstance(r, Retry) and r.max_attempts == 5 and reg.retry("rpc") is r


def test_names_are_per_kind():
    reg = Registry()
    cb = reg.circuit_breaker("payment")
    bh = reg.bulkhead("payment")
    assert reg.get("circuit_breaker", "payment") is cb and reg.get("bulkhead", "payment") is bh
    assert len(reg) == 2


def test_defaults_apply_and_overrides_win():
    clock = FakeClock()
    reg = Registry(defaults={"circuit_breaker": {"failure_rate_threshold": 0.25, "window_size": 10,
                                                 "minimum_calls": 4, "clock": clock},
                             "token_bucket": {"rate": 100.0, "capacity": 5}})
    a = reg.circuit_breaker("a")
    b = reg.circuit_breaker("b", failure_rate_threshold=0.75)
    for _ in range(4):       # 1 failure in 4 = 25 %: trips a (threshold 0.25) but not b (0.75)
        for cb in (a, b):
            permit = cb.try_acquire()
            permit.failure(ValueError()) if _ == 0 else permit.success()
    assert a.state.name == "OPEN" and b.state.name == "CLOSED"
    assert a.clock is clock
    assert reg.token_bucket("x").capacity == 5 and reg.token_bucket("y", capacity=7).capacity == 7


def test_conflicting_options_raise_equal_options_pass():
    reg = Registry(defaults={"bulkhead": {"max_concurrent": 4}})
    bh = reg.bulkhead("db", max_wait=0.5)
    assert reg.bulkhead("db", max_wait=0.5) is bh
    assert reg.bulkhead("db", max_concurrent=4) is bh          # the default it was built with
    assert reg.bulkhead("db", max_wait=0.5, max_concurrent=4) is bh
    with pytest.raises(ValueError, match=r"bulkhead 'db' already exists with max_wait=0.5; got max_wait=1.0"):
        reg.bulkhead("db", max_wait=1.0)
    with pytest.raises(ValueError, match="max_concurrent=4; got max_concurrent=8"):
        reg.bulkhead("db", max_concurrent=8)
    cb = reg.circuit_breaker("p")
    assert reg.circuit_breaker("p", window_size=100) is cb      # the constructor default
    with pytest.raises(ValueError, match="window_size=100; got window_size=50"):
        reg.circuit_breaker("p", window_size=50)


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        Registry(defaults={"breaker": {}})
    with pytest.raises(ValueError, match=r"'treshold' is not an option of CircuitBreaker; allowed: "):
        Registry(defaults={"circuit_breaker": {"treshold": 0.5}})
    with pytest.raises(TypeError, match="defaults must be a mapping"):
        Registry(defaults=[("bulkhead", {})])
    with pytest.raises(TypeError, match=r"defaults\['bulkhead'\] must be a mapping"):
        Registry(defaults={"bulkhead": 3})
    with pytest.raises(ValueError, match="'name' is the registry key"):
        Registry(defaults={"bulkhead": {"name": "x"}})
    reg = Registry()
    with pytest.raises(TypeError, match="name must be a non-empty str, got ''"):
        reg.bulkhead("")
    with pytest.raises(TypeError, match="name must be a non-empty str, got 3"):
        reg.bulkhead(3)
    with pytest.raises(ValueError, match="'max_concurrency' is not an option of Bulkhead"):
        reg.bulkhead("db", max_concurrency=3)
    with pytest.raises(ValueError, match="max_concurrent"):        # the class's own validation
        reg.bulkhead("db", max_concurrent=0)
    assert "db" not in reg.names("bulkhead")                     # nothing stored when building failed
    with pytest.raises(ValueError, match="kind must be one of"):
        reg.get("breaker", "x")


def test_register_existing_objects_and_kinds():
    reg = Registry()
    cb = CircuitBreaker(name="ext")
    assert reg.register("ext", cb) is cb
    assert reg.circuit_breaker("ext") is cb
    assert reg.register("ext", cb) is cb                       # idempotent
    with pytest.raises(ValueError, match="already registered"):
        reg.register("ext", CircuitBreaker(name="ext"))
    with pytest.raises(ValueError, match="registered as an object; it takes no options"):
        reg.circuit_breaker("ext", window_size=5)
    lb = LeakyBucket(rate=10.0, queue_size=2)
    reg.register("smooth", lb)
    assert reg.get("rate_limiter", "smooth") is lb
    with pytest.raises(TypeError, match="cannot tell the kind of"):
        reg.register("thing", object())
    thing = object()
    assert reg.register("thing", thing, kind="bulkhead") is thing
    with pytest.raises(ValueError, match="kind must be one of"):
        reg.register("thing", thing, kind="nope")


def test_iteration_entries_contains_remove():
    reg = Registry()
    bh = reg.bulkhead("b")
    cb2 = reg.circuit_breaker("z")
    cb1 = reg.circuit_breaker("a")
    assert list(reg) == [Entry("circuit_breaker", "a", cb1), Entry("circuit_breaker", "z", cb2),
                         Entry("bulkhead", "b", bh)]
    assert reg.entries("bulkhead") == [("bulkhead", "b", bh)]
    assert reg.names("circuit_breaker") == ["a", "z"]
    assert ("circuit_breaker", "a") in reg and ("bulkhead", "a") not in reg and "a" not in reg
    assert reg.remove("circuit_breaker", "a") is cb1
    assert ("circuit_breaker", "a") not in reg and len(reg) == 2
    with pytest.raises(KeyError):
        reg.remove("circuit_breaker", "a")
    assert reg.circuit_breaker("a") is not cb1                  # a fresh one after removal
    assert set(KINDS) >= {"circuit_breaker", "token_bucket", "keyed_limiter", "bulkhead", "load_shedder", "retry"}


def test_on_add_listener_sees_created_and_registered():
    reg = Registry()
    seen = []
    reg.on_add(seen.append)
    cb = reg.circuit_breaker("a")
    reg.circuit_breaker("a")                                    # no second announcement
    bh = reg.register("b", Bulkhead(2))

    def broken(entry):
        raise RuntimeError("listener bug")

    reg.on_add(broken)                                          # a failing listener never breaks the registry
    tb = reg.token_bucket("t", rate=1.0)
    assert seen == [("circuit_breaker", "a", cb), ("bulkhead", "b", bh), ("token_bucket", "t", tb)]
    reg.off_add(seen.append)
    reg.bulkhead("c")
    assert len(seen) == 3
    with pytest.raises(TypeError):
        reg.on_add(42)


def test_concurrent_get_or_create_builds_one(fast_switching):
    reg = Registry()
    created = []
    reg.on_add(created.append)
    results = race(8, lambda i: reg.circuit_breaker("shared"))
    assert len({id(r) for r in results}) == 1 and len(created) == 1


def test_load_shedder_kind():
    shedding = pytest.importorskip("buttress.shedding")
    reg = Registry(defaults={"load_shedder": {"max_in_flight": 4}})
    shed = reg.load_shedder("api")
    assert isinstance(shed, shedding.LoadShedder) and reg.load_shedder("api") is shed


def test_default_registry_is_a_registry():
    assert isinstance(default_registry, Registry)
    import buttress
    assert buttress.Registry is Registry


def test_imports_without_extras_and_clear_error():
    """Every operations module imports with no optional extra; using one needs its extra."""
    code = """
import sys
for m in ("prometheus_client", "opentelemetry", "uvicorn", "starlette", "httpx"):
    sys.modules[m] = None
import buttress.asgi, buttress.health, buttress.chaos, buttress.registry, buttress.prometheus, buttress.otel
from buttress.registry import Registry
try:
    buttress.prometheus.ButtressCollector(Registry())
except ImportError as exc:
    assert "pip install 'buttress[prometheus]'" in str(exc), exc
else:
    raise AssertionError("no ImportError")
try:
    buttress.otel.instrument(Registry())
except ImportError as exc:
    assert "pip install 'buttress[otel]'" in str(exc), exc
else:
    raise AssertionError("no ImportError")
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
