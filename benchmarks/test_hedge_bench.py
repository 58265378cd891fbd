"""Hedge: cost when the first attempt answers before the delay, with its floor (a bare await) in the same run,
and the tail latency of a service with a 5 % slow tail with and without hedging.

python -m pytest benchmarks/test_hedge_bench.py --benchmark-json=/tmp/hedge.json && python benchmarks/report.py /tmp/hedge.json

Async cases are per await inside one running loop (see conftest.awaiting). "answers at once" is a
coroutine that returns without suspending (the hedge arms no timer); "answers after one loop turn"
suspends once (asyncio.sleep(0)): the primary is registered with the Hedge's timer (one per loop, armed
once) and awaited directly after its first step.
The tail case runs on FakeClock (simulated time, deterministic): its numbers are latencies in simulated
ms, stored in extra_info (p50, p99 with and without hedging, and the share of calls that hedged).
"""
import asyncio
import random

from conftest import awaiting, bare_async

from buttress import FakeClock, Retry
from buttress.hedge import Hedge


async def one_turn():
    """The floor for the suspending case: a coroutine that yields to the loop once."""
    await asyncio.sleep(0)


# -- floors ----------------------------------------------------------------------------------------------

def test_floor_bare_await(benchmark):
    awaiting(benchmark, bare_async)


def test_floor_await_one_loop_turn(benchmark):
    awaiting(benchmark, one_turn)


def test_floor_retry_alone(benchmark):
    """The floor of the under-a-Retry case: the same Retry around the bare coroutine, no Hedge."""
    awaiting(benchmark, Retry(max_attempts=3)(bare_async))


# -- buttress --------------------------------------------------------------------------------------------

def test_async_answers_at_once_decorated(benchmark):
    awaiting(benchmark, Hedge(0.05)(bare_async))


def test_async_answers_at_once_call_async(benchmark):
    h = Hedge(0.05)
    awaiting(benchmark, lambda: h.call_async(bare_async))


def test_async_answers_at_once_under_a_retry(benchmark):
    """Inside a Retry the Hedge keeps no record of its own (the Retry's key is shared)."""
    awaiting(benchmark, Retry(max_attempts=3)(Hedge(0.05)(bare_async)))


def test_async_answers_at_once_p95_delay(benchmark):
    awaiting(benchmark, Hedge("p95")(bare_async))


def test_async_answers_after_one_loop_turn(benchmark):
    awaiting(benchmark, Hedge(0.05)(one_turn))


# -- tail latency: simulated on FakeClock -----------------------------------------------------------------

CALLS = 4000
FAST_MS, SLOW_MS, SLOW_SHARE = 10.0, 200.0, 0.05


def _service(clock, rng):
    async def call():
        # 95 %: 10 ms +- 20 %; 5 %: 200 ms (a GC pause, a cold cache, a slow replica)
        ms = SLOW_MS if rng.random() < SLOW_SHARE else FAST_MS * rng.uniform(0.8, 1.2)
        await clock.sleep_async(ms / 1000)
        return ms
    return call


def _latencies(hedge_delay):
    clock, rng = FakeClock(), random.Random(1234)
    service = _service(clock, rng)
    hedge = Hedge(hedge_delay, clock=clock, initial_delay=0.02) if hedge_delay is not None else None
    fn = hedge(service) if hedge is not None else service

    async def main():
        out = []
        for _ in range(CALLS):
            t = clock.monotonic()
            await fn()
            out.append((clock.monotonic() - t) * 1000)
        return out
    lat = sorted(asyncio.run(main()))
    hedged = hedge.metrics().hedges_started / CALLS if hedge is not None else 0.0
    return lat[CALLS // 2], lat[int(CALLS * 0.99)], hedged


def test_tail_p99_with_and_without_hedging(benchmark):
    results = {}

    def simulate():
        results["none"] = _latencies(None)
        results["fixed_20ms"] = _latencies(0.02)
        results["p95"] = _latencies("p95")
    benchmark.pedantic(simulate, rounds=1, iterations=1)
    for name, (p50, p99, hedged) in results.items():
        benchmark.extra_info[f"{name}_p50_ms"] = round(p50, 2)
        benchmark.extra_info[f"{name}_p99_ms"] = round(p99, 2)
        benchmark.extra_info[f"{name}_hedged_share"] = round(hedged, 4)
    base = results["none"][1]
    benchmark.extra_info["p99_ratio_fixed_20ms"] = round(results["fixed_20ms"][1] / base, 3)
    benchmark.extra_info["p99_ratio_p95"] = round(results["p95"][1] / base, 3)
    assert results["fixed_20ms"][1] < base     # a sanity check of the simulation, not a timing assertion
