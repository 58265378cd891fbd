"""Health probes: Kubernetes threshold and caching semantics on FakeClock, breakers, startup gating."""
from __future__ import annotations

import asyncio
import json
import threading

import pytest

from buttress import CircuitBreaker, FakeClock
from buttress.health import HealthRegistry, HealthReport
from buttress.registry import Registry


class Flaky:
    """A sync check whose outcome the test sets; counts its calls."""

    def __init__(self, ok=True):
        self.ok = ok
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if isinstance(self.ok, BaseException):
            raise self.ok
        return self.ok


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def statuses(report):
    return {name: c["status"] for name, c in report["checks"].items()}


def test_liveness_up_and_down_sync_and_async():
    clock = FakeClock()
    h = HealthRegistry(clock=clock)
    sync_ok = Flaky(True)

    async def loop_ok():
        await clock.sleep_async(0.25)
        return "yes"

    h.add_liveness("sync", sync_ok)
    h.add_liveness("async", loop_ok)
    report = h.check_sync("liveness")
    assert isinstance(report, HealthReport)
    assert report["probe"] == "liveness" and report.status == "up" and report.http_status == 200
    assert report["checks"]["async"] == {"status": "up", "duration": 0.25, "error": None,
                                         "consecutive_successes": 1, "consecutive_failures": 0, "cached": False}
    sync_ok.ok = False
    report = h.check_sync("liveness")
    assert report.status == "down" and report.http_status == 503
    assert report["checks"]["sync"]["error"] == "check returned False"
    sync_ok.ok = ConnectionError("db gone")
    assert h.check_sync("liveness")["checks"]["sync"]["error"] == "ConnectionError: db gone"


def test_failure_and_success_thresholds_count_consecutive_results():
    h = HealthRegistry(clock=FakeClock())
    f = Flaky(True)
    h.add_liveness("loop", f, failure_threshold=3, success_threshold=2)
    assert h.check_sync("liveness").status == "up"
    f.ok = False
    assert h.check_sync("liveness").status == "up"            # 1 failure
    assert h.check_sync("liveness").status == "up"            # 2 failures
    f.ok = True
    assert h.check_sync("liveness").status == "up"            # a success resets the failure count
    f.ok = False
    for _ in range(2):
        assert h.check_sync("liveness").status == "up"
    r = h.check_sync("liveness")                              # third consecutive failure
    assert r.status == "down" and r["checks"]["loop"]["consecutive_failures"] == 3
    f.ok = True
    r = h.check_sync("liveness")
    assert r.status == "down" and r["checks"]["loop"]["consecutive_successes"] == 1
    assert h.check_sync("liveness").status == "up"            # second consecutive success
    assert f.calls == 9


def test_readiness_starts_not_ready_until_success_threshold():
    h = HealthRegistry(clock=FakeClock())
    h.add_readiness("db", Flaky(True), success_threshold=2)
    assert h.check_sync("readiness").status == "down"
    assert h.check_sync("readiness").status == "up"


def test_period_caches_results_on_the_clock():
    clock = FakeClock()
    h = HealthRegistry(clock=clock)
    f = Flaky(True)
    h.add_readiness("db", f, period=5.0, failure_threshold=2)
    assert h.check_sync("readiness")["checks"]["db"]["cached"] is False
    f.ok = False
    clock.advance(4.999)
    r = h.check_sync("readiness")
    assert r.status == "up" and r["checks"]["db"]["cached"] is True and f.calls == 1
    clock.advance(0.001)                                      # the period has passed: run again
    r = h.check_sync("readiness")
    assert f.calls == 2 and r["checks"]["db"]["consecutive_failures"] == 1 and r.status == "up"
    r = h.check_sync("readiness")                             # cached failure is not counted twice
    assert f.calls == 2 and r["checks"]["db"]["consecutive_failures"] == 1 and r.status == "up"
    clock.advance(5.0)
    assert h.check_sync("readiness").status == "down" and f.calls == 3


def test_async_timeout_on_fake_clock_and_concurrent_checks():
    clock = FakeClock()
    h = HealthRegistry(clock=clock)

    async def hangs():
        await clock.sleep_async(60.0)
        return True

    async def slow_ok():
        await clock.sleep_async(0.5)
        return True

    h.add_readiness("hangs", hangs, timeout=2.0)
    h.add_readiness("slow", slow_ok, timeout=2.0)
    h.add_readiness("slow2", slow_ok, timeout=2.0)
    start = clock.monotonic()
    r = h.check_sync("readiness")
    assert r.status == "down"
    assert r["checks"]["hangs"]["error"] == "timed out after 2s" and r["checks"]["hangs"]["duration"] == 2.0
    assert statuses(r) == {"hangs": "down", "slow": "up", "slow2": "up"}
    assert clock.monotonic() - start == 2.0                   # the checks ran concurrently


def test_hung_sync_check_times_out_and_is_not_started_again():
    release = threading.Event()
    started = []

    def hangs():
        started.append(1)
        release.wait(30)
        return True

    h = HealthRegistry()
    h.add_liveness("hangs", hangs, timeout=0.05)
    try:
        r = h.check_sync("liveness")
        assert r.status == "down" and r["checks"]["hangs"]["error"] == "timed out after 0.05s"
        r = h.check_sync("liveness")
        assert "still running" in r["checks"]["hangs"]["error"] and len(started) == 1
    finally:
        release.set()
    for _ in range(1000):                                     # hang guard: wait until the worker is free
        if h._checks["liveness"]["hangs"].running.done():
            break
        threading.Event().wait(0.01)
    assert h.check_sync("liveness").status == "up" and len(started) == 2


def test_breaker_makes_readiness_degraded_not_down():
    clock = FakeClock()
    h = HealthRegistry(clock=clock)
    cb = CircuitBreaker(name="payment", clock=clock)
    h.add_readiness("db", Flaky(True))
    h.add_breaker(cb)
    h.add_liveness("loop", Flaky(True))
    r = h.check_sync("readiness")
    assert r.status == "up" and r["checks"]["breaker:payment"] == {"status": "up", "state": "CLOSED"}
    cb.force_open()
    r = h.check_sync("readiness")
    assert r.status == "degraded" and r.http_status == 200
    assert r["checks"]["breaker:payment"] == {"status": "degraded", "state": "FORCED_OPEN"}
    live = h.check_sync("liveness")                           # liveness never looks at breakers
    assert live.status == "up" and set(live["checks"]) == {"loop"}
    cb.reset()
    assert h.check_sync("readiness").status == "up"


def test_breaker_when_open_down_and_degraded_http_status():
    h = HealthRegistry(clock=FakeClock(), degraded_http_status=299)
    strict = CircuitBreaker(name="auth")
    soft = CircuitBreaker(name="recs")
    h.add_breaker(soft)
    h.add_breaker(strict, when_open="down", name="auth-breaker")
    soft.force_open()
    r = h.check_sync("readiness")
    assert r.status == "degraded" and r.http_status == 299
    strict.force_open()
    r = h.check_sync("readiness")
    assert r.status == "down" and r.http_status == 503 and r["checks"]["auth-breaker"]["status"] == "down"


def test_breakers_from_a_registry_including_later_ones():
    reg = Registry()
    h = HealthRegistry()
    h.add_breakers(reg)
    a = reg.circuit_breaker("a")
    assert set(h.check_sync("readiness")["checks"]) == {"breaker:a"}
    b = reg.circuit_breaker("b")
    b.force_open()
    r = h.check_sync("readiness")
    assert r.status == "degraded" and statuses(r) == {"breaker:a": "up", "breaker:b": "degraded"}
    a.force_open()
    assert h.check_sync("liveness").status == "up"


def test_non_critical_readiness_check_degrades():
    h = HealthRegistry()
    h.add_readiness("cache", Flaky(False), critical=False)
    h.add_readiness("db", Flaky(True))
    r = h.check_sync("readiness")
    assert r.status == "degraded" and r["checks"]["cache"]["critical"] is False
    h.add_readiness("queue", Flaky(False))
    assert h.check_sync("readiness").status == "down"


def test_startup_gates_liveness_and_readiness():
    h = HealthRegistry(clock=FakeClock())
    warm = Flaky(False)
    live, ready = Flaky(True), Flaky(True)
    h.add_startup("warm", warm, failure_threshold=3)
    h.add_liveness("loop", live)
    h.add_readiness("db", ready)
    assert not h.started
    for probe in ("liveness", "readiness"):
        r = h.check_sync(probe)
        assert r.status == "starting" and r.http_status == 503 and r["checks"] == {}
    assert live.calls == 0 and ready.calls == 0              # nothing ran before startup passed
    r = h.check_sync("startup")
    assert r.status == "down" and r.http_status == 503      # third consecutive failure: give up
    warm.ok = True
    r = h.check_sync("readiness")                             # readiness runs startup itself when needed
    assert r.status == "up" and h.started and ready.calls == 1
    warm.ok = False
    calls = warm.calls
    r = h.check_sync("startup")                               # once passed, startup is not run again
    assert r.status == "up" and r.http_status == 200 and warm.calls == calls
    assert h.check_sync("liveness").status == "up"


def test_startup_reports_starting_below_failure_threshold():
    h = HealthRegistry()
    h.add_startup("warm", Flaky(False), failure_threshold=2)
    assert h.check_sync("startup").status == "starting"
    assert h.check_sync("startup").status == "down"


def test_report_json_and_check_sync_inside_loop():
    h = HealthRegistry()
    h.add_liveness("ok", lambda: True)
    doc = json.loads(h.check_sync("liveness").to_json())
    assert doc["probe"] == "liveness" and doc["status"] == "up" and doc["checks"]["ok"]["status"] == "up"

    async def inside():
        with pytest.raises(RuntimeError, match="use `await registry.check"):
            h.check_sync("liveness")
        return await h.check("liveness")

    assert run(inside()).status == "up"


def test_empty_registry_is_up():
    h = HealthRegistry()
    for probe in ("liveness", "readiness", "startup"):
        r = h.check_sync(probe)
        assert r.status == "up" and r["checks"] == {}


def test_remove():
    h = HealthRegistry()
    h.add_readiness("db", Flaky(False))
    h.add_breaker(CircuitBreaker(name="x"))
    h.remove("readiness", "db")
    h.remove("readiness", "breaker:x")
    assert h.check_sync("readiness")["checks"] == {}
    with pytest.raises(KeyError):
        h.remove("readiness", "db")


def test_bad_arguments():
    h = HealthRegistry()
    ok = Flaky()
    with pytest.raises(ValueError, match="probe must be one of 'liveness', 'readiness', 'startup', got 'ready'"):
        h.check_sync("ready")
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        h.add_liveness("", ok)
    with pytest.raises(TypeError, match="fn must be callable"):
        h.add_liveness("x", 42)
    with pytest.raises(ValueError, match="timeout must be a finite number > 0"):
        h.add_liveness("x", ok, timeout=0)
    with pytest.raises(ValueError, match="period must be a finite number >= 0"):
        h.add_liveness("x", ok, period=-1)
    with pytest.raises(ValueError, match="failure_threshold must be >= 1, got 0"):
        h.add_liveness("x", ok, failure_threshold=0)
    with pytest.raises(TypeError, match="success_threshold must be an int"):
        h.add_liveness("x", ok, success_threshold=1.5)
    with pytest.raises(TypeError, match="critical must be a bool"):
        h.add_readiness("x", ok, critical="no")
    h.add_liveness("x", ok)
    with pytest.raises(ValueError, match="a liveness check named 'x' already exists"):
        h.add_liveness("x", ok)
    cb = CircuitBreaker(name="p")
    with pytest.raises(ValueError, match="liveness never depends on dependencies"):
        h.add_breaker(cb, affects="liveness")
    with pytest.raises(ValueError, match="affects must be 'readiness'"):
        h.add_breaker(cb, affects="startup")
    with pytest.raises(ValueError, match="when_open must be 'degraded' or 'down', got 'up'"):
        h.add_breaker(cb, when_open="up")
    with pytest.raises(TypeError, match="breaker must be a buttress.CircuitBreaker"):
        h.add_breaker(object())
    with pytest.raises(TypeError, match="registry must be a buttress.Registry"):
        h.add_breakers(object())
    with pytest.raises(ValueError, match="degraded_http_status must be between 100 and 599"):
        HealthRegistry(degraded_http_status=42)
    with pytest.raises(TypeError, match="clock must provide"):
        HealthRegistry(clock=object())


def test_async_check_failures_are_results():
    h = HealthRegistry(clock=FakeClock())

    async def raises():
        raise OSError("disk full")

    async def falsy():
        return 0

    h.add_readiness("disk", raises)
    h.add_readiness("queue", falsy)
    r = h.check_sync("readiness")
    assert r.status == "down"
    assert r["checks"]["disk"]["error"] == "OSError: disk full"
    assert r["checks"]["queue"]["error"] == "check returned a falsy int"      # its type, never its repr


class _NoTruth:
    def __bool__(self):
        raise RuntimeError("postgres://user:SECRET@db")


class _NoStr(Exception):
    def __str__(self):
        raise RuntimeError("postgres://user:SECRET@db")


def test_a_result_without_truth_value_is_a_failure_named_by_type_only(caplog):
    """A numpy array or a __bool__ that raises is a counted failure (not "cancelled"), the error names the
    exception type only, and nothing with its message is logged (no unretrieved task exception)."""
    np = pytest.importorskip("numpy")

    async def async_bad():
        return _NoTruth()

    async def awaited():
        return np.array([1, 2])

    def raises_nostr():
        raise _NoStr()

    h = HealthRegistry()
    h.add_readiness("arr", lambda: np.array([1, 2]))
    h.add_readiness("sync", lambda: _NoTruth())
    h.add_readiness("async", async_bad)
    h.add_readiness("awaitable", lambda: awaited())
    h.add_readiness("nostr", raises_nostr)
    caplog.set_level("DEBUG")
    for round_ in (1, 2):
        checks = h.check_sync("readiness")["checks"]
        for name in ("arr", "sync", "async", "awaitable"):
            c = checks[name]
            assert c["status"] == "down" and c["consecutive_failures"] == round_, (name, c)
            assert "no truth value" in c["error"] and "cancelled" not in c["error"]
        assert checks["sync"]["error"].endswith("(RuntimeError)") and checks["arr"]["error"].endswith("(ValueError)")
        assert checks["nostr"]["error"] == "_NoStr" and checks["nostr"]["consecutive_failures"] == round_
    assert "SECRET" not in h.check_sync("readiness").to_json()
    assert "SECRET" not in caplog.text and "never retrieved" not in caplog.text


def test_a_failing_clock_is_answered_not_left_in_a_task(caplog):
    class Breaks(FakeClock):
        fail = False

        def monotonic_ns(self):
            if self.fail:
                raise RuntimeError("clock SECRET")
            return super().monotonic_ns()

    clock = Breaks()
    h = HealthRegistry(clock=clock)

    def check():
        clock.fail = True
        return True
    h.add_readiness("db", check)
    c = h.check_sync("readiness")["checks"]["db"]
    assert c["status"] == "down" and c["error"] == "not run: RuntimeError while judging the check"
    assert "SECRET" not in caplog.text and "never retrieved" not in caplog.text
