"""Nothing a caller does crashes the interpreter, hangs, or gets an unclear error (issue 12, DESIGN §3c).

Every case runs in a child process with a timeout, so a segfault or a spin with the GIL held is a test
failure that names the step (tests/crash_probe.py prints each step before running it), not a dead run.
- every compiled type (and its twin) used uninitialised: `T.__new__(T)` and a subclass that forgets
  `super().__init__()`; every public member called with a spread of arguments;
- every core method that takes `now=` over the int64 edges and beyond (int64 max/min, just outside,
  2**200): compiled and twin give the same answers and exception types, never OverflowError;
- every public pattern on a FakeClock that starts negative, at zero, at an epoch, near int64 max: the
  same exact admissions and counts as at zero.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from buttress import _impl

from conftest import NO_EXT, REQUIRE_EXT, _compiled_available

PROBE = str(Path(__file__).with_name("crash_probe.py"))
TIMEOUT = 120
# the only exceptions a caller may see from misuse: clear errors (ButtressError subclasses are rejections)
ALLOWED = {"TypeError", "ValueError", "RuntimeError", "CircuitOpenError", "RateLimitExceeded",
           "BulkheadFullError", "Overloaded", "TimeoutExceeded"}
KINDS = ["cython", "python"]


def _need(kind: str) -> None:
    if kind == "cython":
        if NO_EXT:
            pytest.skip("BUTTRESS_NO_EXTENSIONS is set")
        if not _compiled_available():
            if REQUIRE_EXT:
                pytest.fail("BUTTRESS_REQUIRE_EXTENSIONS is set but the compiled core does not import")
            pytest.skip("compiled core not built")


def _env(kind: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("BUTTRESS_REQUIRE_EXTENSIONS", None)
    if kind == "python":
        env["BUTTRESS_NO_EXTENSIONS"] = "1"
    else:
        env.pop("BUTTRESS_NO_EXTENSIONS", None)
        env["BUTTRESS_REQUIRE_EXTENSIONS"] = "1"
    return env


def run_probe(what: str, kind: str, name: str) -> dict[str, str]:
    """step -> outcome; fails the test on a crash, a hang, or a probe that did not finish."""
    try:
        r = subprocess.run([sys.executable, PROBE, what, kind, name], env=_env(kind), capture_output=True,
                           text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        last = out.strip().splitlines()[-1:] or ["<nothing>"]
        pytest.fail(f"{kind} {name}: hung (> {TIMEOUT} s) at {last[0]}")
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines or lines[-1].get("step") != "done":
        last = lines[-1] if lines else "<nothing>"
        pytest.fail(f"{kind} {name}: exit code {r.returncode} after {last}\n{r.stderr[-3000:]}")
    return {x["step"]: x["result"] for x in lines if "result" in x and x["step"] != "done"}


def _unclear(results: dict[str, str]) -> dict[str, str]:
    return {step: res for step, res in results.items()
            if res == "nan" or (res.startswith("raise:") and res[6:] not in ALLOWED)}


@pytest.mark.parametrize("name", _impl.CORE_MODULES)
@pytest.mark.parametrize("kind", KINDS)
def test_uninitialised_and_subclassed_objects_never_crash(kind: str, name: str) -> None:
    _need(kind)
    results = run_probe("uninit", kind, name)
    assert not _unclear(results), f"{kind} {name}: unclear errors or NaN on uninitialised objects"


@pytest.mark.parametrize("name", _impl.CORE_MODULES)
def test_uninitialised_objects_behave_the_same_in_both(name: str) -> None:
    _need("cython")
    compiled, twin = run_probe("uninit", "cython", name), run_probe("uninit", "python", name)
    diff = {s: (compiled[s], twin[s]) for s in compiled.keys() & twin.keys() if compiled[s] != twin[s]}
    assert not diff, f"{name}: compiled vs twin differ on uninitialised objects"


NOW_MODULES = ["gcra", "keyed", "window", "state", "breaker"]


@pytest.mark.parametrize("name", NOW_MODULES)
@pytest.mark.parametrize("kind", KINDS)
def test_any_now_is_answered_or_refused_clearly(kind: str, name: str) -> None:
    _need(kind)
    results = run_probe("now", kind, name)
    bad = {s: r for s, r in results.items() if r.startswith("raise:") and r[6:] not in ("ValueError", "TypeError")}
    assert not bad, f"{kind} {name}: now= outside the happy domain"


@pytest.mark.parametrize("name", NOW_MODULES)
def test_any_now_gives_the_same_answer_in_both(name: str) -> None:
    _need("cython")
    compiled, twin = run_probe("now", "cython", name), run_probe("now", "python", name)
    diff = {s: (compiled[s], twin.get(s)) for s in compiled if compiled[s] != twin.get(s)}
    assert not diff, f"{name}: compiled vs twin differ over the int64 domain"


# --- every public pattern on clocks far from zero ------------------------------------------------------

# seconds: negative, just below zero, zero, an epoch, 290 years, just below int64 max ns
CLOCK_STARTS = [-5.0, -1e-9, 0.0, 1.7e9, 9.2e9, 9.223e9, -9.2e9]

SCENARIO = textwrap.dedent("""
    import asyncio, sys
    import buttress
    from buttress import FakeClock
    start = float(sys.argv[1])
    C = lambda: FakeClock(start=start)

    # GCRA: capacity at one instant, one more per interval, wait_time exact
    c = C(); tb = buttress.TokenBucket(rate=10.0, capacity=5, clock=c)
    assert [tb.try_acquire() for _ in range(7)] == [True] * 5 + [False] * 2
    assert 0 < tb.wait_time(1) <= 0.1 + 1e-9, tb.wait_time(1)
    c.advance(0.1); assert tb.try_acquire() and not tb.try_acquire()

    # keyed: per-key capacity, keys independent
    c = C(); kl = buttress.KeyedLimiter(10.0, 5, max_keys=100, clock=c)
    assert [kl.try_acquire("client") for _ in range(7)] == [True] * 5 + [False] * 2
    assert kl.try_acquire(b"other") and kl.try_acquire(7)
    c.advance(0.1); assert kl.try_acquire("client") and not kl.try_acquire("client")

    # leaky bucket and windows: admissions bounded and refilled
    c = C(); lb = buttress.LeakyBucket(rate=10.0, queue_size=3, clock=c)
    n = sum(lb.try_acquire() for _ in range(10)); assert 1 <= n <= 4, n
    for cls in (buttress.FixedWindowLimiter, buttress.SlidingWindowLimiter):
        c = C(); w = cls(limit=3, window=1.0, clock=c)
        assert [w.try_acquire() for _ in range(5)] == [True] * 3 + [False] * 2, cls
        c.advance(2.0); assert w.try_acquire(), cls

    # breakers: every call counted, trips, refuses, half-opens after open_duration
    for window in ("count", "time"):
        c = C()
        cb = buttress.CircuitBreaker(window=window, window_size=10, minimum_calls=2, open_duration=5.0, clock=c)
        def boom(): raise ConnectionError("down")
        cb.call(lambda: 1)
        assert cb.metrics().calls == 1, (window, cb.metrics())
        for _ in range(3):
            try: cb.call(boom)
            except (ConnectionError, buttress.CircuitOpenError): pass
        assert str(cb.state).endswith("OPEN"), (window, cb.state)
        try: cb.call(lambda: 1); raise AssertionError("OPEN admitted")
        except buttress.CircuitOpenError as e: assert 0 < e.retry_after <= 5.0, e.retry_after
        c.advance(5.0)
        assert cb.call(lambda: 2) == 2

    # bulkhead, shedder, retry with backoff sleeps on the fake clock, budget, throttle
    bh = buttress.Bulkhead(max_concurrent=2)
    assert [bh.try_acquire() for _ in range(3)] == [True, True, False]; bh.release(); bh.release()
    c = C(); n = []
    r = buttress.Retry(max_attempts=3, retry_on=(ConnectionError,), clock=c)
    def flaky():
        n.append(1)
        if len(n) < 3: raise ConnectionError
        return "ok"
    assert r.call(flaky) == "ok" and len(n) == 3
    c = C(); rb = buttress.RetryBudget(ratio=0.5, min_per_second=1.0, ttl=10.0, clock=c)
    c = C(); th = buttress.adaptive.AdaptiveThrottle(clock=c)
    c = C(); t = buttress.Timeout(1.0, clock=c)
    assert t.call(lambda: 3) == 3
    async def main():
        c = C(); tb = buttress.TokenBucket(rate=10.0, capacity=1, clock=c)
        await tb.acquire_async(1); await tb.acquire_async(1)
        assert abs(c.monotonic() - start - 0.1) < 1e-6 or start > 1e9, c.monotonic() - start
    asyncio.run(main())
    print("scenario ok")
""")


@pytest.mark.parametrize("start", CLOCK_STARTS)
@pytest.mark.parametrize("kind", KINDS)
def test_patterns_are_exact_on_any_clock(kind: str, start: float) -> None:
    _need(kind)
    try:
        r = subprocess.run([sys.executable, "-c", SCENARIO, repr(start)], env=_env(kind), capture_output=True,
                           text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{kind}: hung on a clock starting at {start} s")
    assert r.returncode == 0 and "scenario ok" in r.stdout, f"{kind} start={start}:\n{r.stderr[-3000:]}"
