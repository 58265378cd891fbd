"""Chaos injection: binomial rates for a fixed seed, determinism, runtime switching, sync and async."""
from __future__ import annotations

import asyncio
import math

import pytest

from buttress import CircuitBreaker, FakeClock, Retry
from buttress.chaos import Chaos, ChaosMetrics, InjectedFault

N = 10_000


def ok():
    return "real"


async def aok():
    return "real"


def within_4_sigma(count: int, n: int, p: float) -> bool:
    mean, sigma = n * p, math.sqrt(n * p * (1 - p))
    return abs(count - mean) <= 4 * sigma


def outcomes(chaos: Chaos, n: int) -> list[str]:
    out = []
    for _ in range(n):
        try:
            out.append(chaos.call(ok))
        except InjectedFault:
            out.append("fault")
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fault_rate_within_binomial_bounds(seed):
    chaos = Chaos(fault_rate=0.1, seed=seed)
    faults = outcomes(chaos, N).count("fault")
    assert within_4_sigma(faults, N, 0.1), faults
    assert chaos.metrics() == ChaosMetrics(calls=N, faults=faults, latencies=0, results=0)


def test_latency_and_result_rates_within_binomial_bounds():
    clock = FakeClock()
    chaos = Chaos(latency_rate=0.2, latency=0.5, result_rate=0.05, result="stale", seed=7, clock=clock)
    results = outcomes(chaos, N)
    m = chaos.metrics()
    assert within_4_sigma(m.latencies, N, 0.2) and within_4_sigma(m.results, N, 0.05)
    assert results.count("stale") == m.results and results.count("real") == N - m.results
    assert clock.monotonic() == pytest.approx(0.5 * m.latencies)      # every injected wait was on the clock


def test_same_seed_same_decisions_different_seed_different():
    a = outcomes(Chaos(fault_rate=0.3, result_rate=0.3, result="x", seed=42), 500)
    b = outcomes(Chaos(fault_rate=0.3, result_rate=0.3, result="x", seed=42), 500)
    c = outcomes(Chaos(fault_rate=0.3, result_rate=0.3, result="x", seed=43), 500)
    assert a == b and a != c
    chaos = Chaos(fault_rate=0.3, seed=42)
    first = outcomes(chaos, 100)
    chaos.reseed()
    assert outcomes(chaos, 100) == first


def test_runtime_switching():
    chaos = Chaos(fault_rate=1.0, seed=0)
    with pytest.raises(InjectedFault, match="chaos: injected fault"):
        chaos.call(ok)
    chaos.enabled = False
    assert outcomes(chaos, 100) == ["real"] * 100
    assert chaos.metrics().calls == 1                         # disabled calls are not even counted
    chaos.enabled = True
    chaos.fault_rate = 0.0
    assert outcomes(chaos, 100) == ["real"] * 100
    chaos.result_rate = 1.0
    chaos.result = lambda: ["fresh"]
    assert chaos.call(ok) == ["fresh"]
    chaos.fault_rate = 1.0                                    # a fault wins over a result
    assert outcomes(chaos, 3) == ["fault"] * 3
    with pytest.raises(ValueError, match="fault_rate must be a finite number >= 0 and <= 1, got 1.5"):
        chaos.fault_rate = 1.5
    with pytest.raises(TypeError, match="enabled must be a bool"):
        chaos.enabled = 1


def test_async_latency_on_fake_clock_and_faults():
    clock = FakeClock()
    chaos = Chaos(latency_rate=1.0, latency=(1.0, 3.0), seed=5, clock=clock)

    async def main():
        waits = []
        for _ in range(20):
            t0 = clock.monotonic()
            assert await chaos.call_async(aok) == "real"
            waits.append(clock.monotonic() - t0)
        return waits

    waits = asyncio.run(main())
    assert all(1.0 <= w <= 3.0 for w in waits) and len(set(waits)) > 1

    chaos2 = Chaos(fault_rate=1.0, exception=TimeoutError("injected timeout"))

    @chaos2
    async def fetch():
        raise AssertionError("not called when a fault is injected")

    with pytest.raises(TimeoutError, match="injected timeout"):
        asyncio.run(fetch())


def test_decorator_sync_and_exception_forms():
    calls = []

    @Chaos(fault_rate=1.0, exception=ValueError)
    def f(x):
        calls.append(x)

    with pytest.raises(ValueError, match="chaos: injected fault"):
        f(1)
    assert calls == [] and f.__name__ == "f"
    g = Chaos(fault_rate=1.0, exception=lambda: KeyError("made"))(ok)
    with pytest.raises(KeyError, match="made"):
        g()
    bad = Chaos(fault_rate=1.0, exception=lambda: "not an exception")
    with pytest.raises(TypeError, match="factory returned 'not an exception'"):
        bad.call(ok)


def test_in_front_of_retry_and_breaker():
    """Injected faults look like real failures to the stages outside: retried, counted by the breaker."""
    clock = FakeClock()
    chaos = Chaos(fault_rate=1.0, seed=1)
    cb = CircuitBreaker(name="dep", window_size=4, minimum_calls=4, clock=clock)
    retry = Retry(max_attempts=4, backoff=0.0, clock=clock)
    with pytest.raises(InjectedFault):
        retry.call(cb.call, chaos.call, ok)
    assert chaos.metrics().faults == 4 and cb.state.name == "OPEN"


def test_in_a_pipeline():
    pipeline_mod = pytest.importorskip("buttress.pipeline")
    clock = FakeClock()     # one clock for every stage (§3c: a mixed Pipeline is a ValueError)
    chaos = Chaos(fault_rate=0.5, seed=3, clock=clock)
    retry = Retry(max_attempts=10, backoff=0.0, clock=clock)
    pipe = pipeline_mod.Pipeline(retry, chaos)
    assert all(pipe.call(ok) == "real" for _ in range(50))   # every injected fault was retried away
    assert chaos.metrics().faults > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="latency_rate must be a finite number >= 0 and <= 1, got -0.1"):
        Chaos(latency_rate=-0.1)
    with pytest.raises(TypeError, match="result_rate must be a number"):
        Chaos(result_rate="0.1")
    with pytest.raises(TypeError, match="exception must be an exception class"):
        Chaos(exception=42)
    with pytest.raises(ValueError, match="latency must be a finite number >= 0"):
        Chaos(latency=-1)
    with pytest.raises(ValueError, match="low <= high"):
        Chaos(latency=(2.0, 1.0))
    with pytest.raises(ValueError, match="latency must be seconds or a"):
        Chaos(latency=(1.0, 2.0, 3.0))
    with pytest.raises(TypeError, match="seed must be an int"):
        Chaos(seed=1.5)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        Chaos(enabled="yes")
    with pytest.raises(TypeError, match="clock must provide"):
        Chaos(clock=object())
