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


# -- named objects join the default registry by themselves, weakly (issue 17) ------------------------------

import gc  # noqa: E402
import itertools as _itertools  # noqa: E402
import uuid  # noqa: E402
import weakref  # noqa: E402

from buttress import (FixedWindowLimiter, LoadShedder, MultiLimiter, SlidingWindowLimiter,  # noqa: E402
                      ThreadPoolBulkhead)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def joined(prefix: str) -> dict:
    """{(kind, name): obj} of default_registry entries whose name starts with prefix."""
    return {(e.kind, e.name): e.obj for e in default_registry.entries() if e.name.startswith(prefix)}


def every_named(p: str) -> dict:
    clock = FakeClock()
    return {
        ("circuit_breaker", f"{p}-cb"): CircuitBreaker(name=f"{p}-cb", clock=clock),
        ("token_bucket", f"{p}-tb"): TokenBucket(rate=5.0, name=f"{p}-tb", clock=clock),
        ("keyed_limiter", f"{p}-kl"): KeyedLimiter(rate=5.0, max_keys=16, name=f"{p}-kl", clock=clock),
        ("rate_limiter", f"{p}-lb"): LeakyBucket(rate=5.0, queue_size=2, name=f"{p}-lb", clock=clock),
        ("rate_limiter", f"{p}-fw"): FixedWindowLimiter(limit=3, window=1.0, name=f"{p}-fw", clock=clock),
        ("rate_limiter", f"{p}-sw"): SlidingWindowLimiter(limit=3, window=1.0, name=f"{p}-sw", clock=clock),
        ("rate_limiter", f"{p}-ml"): MultiLimiter(TokenBucket(rate=1.0, clock=clock), name=f"{p}-ml"),
        ("bulkhead", f"{p}-bh"): Bulkhead(max_concurrent=2, name=f"{p}-bh"),
        ("thread_pool_bulkhead", f"{p}-tp"): ThreadPoolBulkhead(max_workers=1, name=f"{p}-tp"),
        ("load_shedder", f"{p}-ls"): LoadShedder(max_in_flight=4, name=f"{p}-ls", clock=clock),
        ("retry", f"{p}-r"): Retry(name=f"{p}-r", clock=clock),
    }


def test_every_named_pattern_object_joins_the_default_registry_without_one():
    p = unique("join")
    objs = every_named(p)
    assert joined(p) == objs
    for (kind, name), obj in objs.items():
        assert default_registry.get(kind, name) is obj and (kind, name) in default_registry
        assert name in default_registry.names(kind)


def test_dropped_objects_leave_and_unnamed_ones_never_join():
    p = unique("drop")
    objs = every_named(p)
    refs = [weakref.ref(o) for o in objs.values()]
    assert len(joined(p)) == len(objs)
    del objs
    gc.collect()
    assert all(r() is None for r in refs)      # the registry does not keep them alive
    assert joined(p) == {}
    before = len(default_registry)
    keep = [CircuitBreaker(clock=FakeClock()), TokenBucket(rate=1.0), Bulkhead(), LoadShedder(max_in_flight=2),
            Retry(), KeyedLimiter(rate=1.0, max_keys=8), Bulkhead(name=None), CircuitBreaker(clock=FakeClock())]
    assert len(default_registry) == before and keep      # the breaker's default name "default" is no name


def test_the_name_may_be_positional_and_subclasses_join_once_under_their_pattern_kind():
    p = unique("pos")
    cb = CircuitBreaker(f"{p}-cb")                       # name is CircuitBreaker's first parameter

    class MyBreaker(CircuitBreaker):
        def __init__(self, service: str) -> None:
            super().__init__(name=f"{p}-{service}", window_size=10, minimum_calls=5)

    mine = MyBreaker("svc")
    seen = []
    default_registry.on_add(seen.append)
    try:
        other = MyBreaker("svc2")
    finally:
        default_registry.off_add(seen.append)
    assert joined(p) == {("circuit_breaker", f"{p}-cb"): cb, ("circuit_breaker", f"{p}-svc"): mine,
                         ("circuit_breaker", f"{p}-svc2"): other}
    assert seen == [Entry("circuit_breaker", f"{p}-svc2", other)]       # announced once


def test_of_two_live_objects_of_one_name_the_newest_is_held_and_a_registered_one_wins():
    p = unique("dup")
    old = Bulkhead(name=p)
    new = Bulkhead(name=p)
    assert default_registry.get("bulkhead", p) is new and len(joined(p)) == 1
    del new
    gc.collect()
    assert default_registry.get("bulkhead", p) is None and old is not None     # the newest went; no resurrection
    held = default_registry.bulkhead(p, max_concurrent=3)       # built in the default registry: held strongly
    joiner = Bulkhead(name=p)
    assert default_registry.get("bulkhead", p) is held and joined(p) == {("bulkhead", p): held}
    assert default_registry.remove("bulkhead", p) is held
    assert default_registry.get("bulkhead", p) is joiner        # the joined one shows again
    assert default_registry.remove("bulkhead", p) is joiner
    with pytest.raises(KeyError):
        default_registry.remove("bulkhead", p)


def test_objects_of_another_registry_join_the_default_one_too_and_are_announced_once():
    p = unique("reg")
    reg = Registry()
    seen, seen_default = [], []
    reg.on_add(seen.append)
    default_registry.on_add(seen_default.append)
    try:
        cb = reg.circuit_breaker(f"{p}-a", clock=FakeClock())
        held = default_registry.circuit_breaker(f"{p}-b", clock=FakeClock())
        registered = default_registry.register(f"{p}-c", CircuitBreaker(name=f"{p}-c", clock=FakeClock()))
    finally:
        default_registry.off_add(seen_default.append)
    assert seen == [Entry("circuit_breaker", f"{p}-a", cb)]
    assert [e for e in seen_default if e.name.startswith(p)] == [
        Entry("circuit_breaker", f"{p}-a", cb), Entry("circuit_breaker", f"{p}-b", held),
        Entry("circuit_breaker", f"{p}-c", registered)]
    assert default_registry.get("circuit_breaker", f"{p}-a") is cb
    default_registry.remove("circuit_breaker", f"{p}-b")
    default_registry.remove("circuit_breaker", f"{p}-c")


def test_racing_threads_join_exactly_their_objects(fast_switching):
    p = unique("race")
    kinds = _itertools.cycle([lambda n: CircuitBreaker(name=n, clock=FakeClock()), lambda n: Bulkhead(name=n),
                              lambda n: TokenBucket(rate=1.0, name=n), lambda n: Retry(name=n)])
    makers = [next(kinds) for _ in range(8)]
    made = race(8, lambda i: [makers[i](f"{p}-{i}-{j}") for j in range(25)])
    got = joined(p)
    assert len(got) == 200 and {id(o) for o in got.values()} == {id(o) for objs in made for o in objs}
    del made, got
    gc.collect()
    assert joined(p) == {}


def test_retry_name_is_checked_and_shown():
    with pytest.raises(TypeError, match="name must be a non-empty str or None, got 5"):
        Retry(name=5)
    with pytest.raises(ValueError, match="name must be a non-empty str or None, got ''"):
        Retry(name="")
    assert repr(Retry(name="rpc", clock=FakeClock())).endswith("name='rpc')")
