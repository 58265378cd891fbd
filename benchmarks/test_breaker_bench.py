"""Circuit breaker overhead per guarded call, with the floors (bare call, raise+catch, bare await).

python -m pytest benchmarks/test_breaker_bench.py --benchmark-json=out.json && python benchmarks/report.py out.json
"""
import pytest

from conftest import awaiting, bare, bare_async, bare_raise, catching, core_module


def breaker(kind, **kw):
    return core_module(kind, "breaker").BreakerCore(name="bench", **kw)


# -- floors ---------------------------------------------------------------------------------------------
def test_floor_bare_call(benchmark):
    benchmark(bare)


def test_floor_raise_catch(benchmark):
    benchmark(catching(bare_raise))


def test_floor_bare_await(benchmark):
    awaiting(benchmark, bare_async)


# -- buttress -------------------------------------------------------------------------------------------
def test_success_count_window_untimed(benchmark, core_kind):
    benchmark(breaker(core_kind, slow_call_duration=None).guard(bare))


def test_success_count_window_slow_timing(benchmark, core_kind):
    benchmark(breaker(core_kind).guard(bare))


def test_success_time_window(benchmark, core_kind):
    benchmark(breaker(core_kind, window="time", window_size=10, slow_call_duration=None).guard(bare))


def test_success_call_form(benchmark, core_kind):
    call = breaker(core_kind, slow_call_duration=None).make_call()
    benchmark(call, bare)


def test_failure_raise_catch(benchmark, core_kind):
    cb = breaker(core_kind, slow_call_duration=None)
    cb.transition_to(5)        # METRICS_ONLY: records every failure, never opens
    benchmark(catching(cb.guard(bare_raise)))


def test_rejected_open(benchmark, core_kind):
    cb = breaker(core_kind)
    cb.transition_to(1)
    benchmark(catching(cb.guard(bare)))


def test_async_success(benchmark):
    import buttress
    cb = buttress.CircuitBreaker(slow_call_duration=None)
    awaiting(benchmark, cb(bare_async))


def test_async_failure(benchmark):
    import buttress
    cb = buttress.CircuitBreaker(slow_call_duration=None)
    cb.metrics_only()

    async def araise():
        raise ValueError

    awaiting(benchmark, cb(araise), catch=ValueError)


def test_floor_async_raise_catch(benchmark):
    async def araise():
        raise ValueError

    awaiting(benchmark, araise, catch=ValueError)


# -- the core's async guard (the compiled awaitable) and with / async with (issue 16) ---------------------
# floors: bare_await / async_raise_catch above; `with cb:` against the bare call (the with-block's function is
# a Python call like bare); `async with` against test_floor_nested_await (its body awaits bare_async)
def test_floor_nested_await(benchmark):
    async def g():
        return await bare_async()

    awaiting(benchmark, g)


def test_async_core_success(benchmark, core_kind):
    awaiting(benchmark, breaker(core_kind, slow_call_duration=None).guard(bare_async, True))


def test_async_core_failure(benchmark, core_kind):
    cb = breaker(core_kind, slow_call_duration=None)
    cb.transition_to(5)        # METRICS_ONLY: records every failure, never opens

    async def araise():
        raise ValueError

    awaiting(benchmark, cb.guard(araise, True), catch=ValueError)


def test_async_core_rejected_open(benchmark, core_kind):
    cb = breaker(core_kind)
    cb.transition_to(1)
    awaiting(benchmark, cb.guard(bare_async, True), catch=Exception)


def test_async_call_async(benchmark):
    import buttress
    cb = buttress.CircuitBreaker(slow_call_duration=None)
    awaiting(benchmark, lambda: cb.call_async(bare_async))


def test_floor_with_lock(benchmark):
    """What a `with` block costs by itself, over the bare call: a C context manager doing little (an
    uncontended threading.Lock); the `with cb:` cases read against it too."""
    import threading
    lock = threading.Lock()

    def run():
        with lock:
            pass

    benchmark(run)


def test_with_success(benchmark, core_kind):
    cb = breaker(core_kind, slow_call_duration=None)

    def run():
        with cb:
            pass

    benchmark(run)


def test_with_failure(benchmark, core_kind):
    cb = breaker(core_kind, slow_call_duration=None)
    cb.transition_to(5)

    def run():
        try:
            with cb:
                raise ValueError("floor")
        except ValueError:
            pass

    benchmark(run)


def test_with_rejected_open(benchmark, core_kind):
    cb = breaker(core_kind)
    cb.transition_to(1)

    def run():
        try:
            with cb:
                pass
        except Exception:
            pass

    benchmark(run)


def test_async_with_success(benchmark, core_kind):
    cb = breaker(core_kind, slow_call_duration=None)

    async def g():
        async with cb:
            return await bare_async()

    awaiting(benchmark, g)


# -- peers (skipped when not installed: pip install ".[bench]") ----------------------------------------
def test_peer_pybreaker(benchmark):
    pybreaker = pytest.importorskip("pybreaker")
    benchmark(pybreaker.CircuitBreaker()(bare))


def test_peer_circuitbreaker(benchmark):
    circuitbreaker = pytest.importorskip("circuitbreaker")
    benchmark(circuitbreaker.CircuitBreaker()(bare))


def test_peer_purgatory_async(benchmark):
    purgatory = pytest.importorskip("purgatory")
    awaiting(benchmark, purgatory.AsyncCircuitBreakerFactory()("bench")(bare_async))


def test_peer_aiobreaker_async(benchmark):
    aiobreaker = pytest.importorskip("aiobreaker")
    awaiting(benchmark, aiobreaker.CircuitBreaker()(bare_async))
