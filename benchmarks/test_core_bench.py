"""Core primitives: compiled vs twin, with the bare-call floor in the same run.

python -m pytest benchmarks/test_core_bench.py --benchmark-columns=median,min,rounds --benchmark-sort=name
"""
from conftest import bare, bare_pair, core_module

S = 1_000_000_000


def test_floor_bare_call(benchmark):
    benchmark(bare)


def test_floor_bare_pair(benchmark):
    benchmark(bare_pair)


def test_gcra_try_acquire(benchmark, core_kind):
    g = core_module(core_kind, "gcra").GCRA(rate=1e9, capacity=1_000_000)   # always admitted
    benchmark.group = "gcra.try_acquire"
    assert benchmark(g.try_acquire)


def test_gcra_try_acquire_rejected(benchmark, core_kind):
    g = core_module(core_kind, "gcra").GCRA(rate=1e-3, capacity=1)
    g.try_acquire()
    assert benchmark(g.try_acquire) is False


def test_permits_acquire_release_pair(benchmark, core_kind):
    p = core_module(core_kind, "permits").Permits(10)

    def pair(acq=p.try_acquire, rel=p.release):
        acq()
        rel()

    benchmark(pair)
    assert p.in_use == 0


def test_count_window_record(benchmark, core_kind):
    w = core_module(core_kind, "window").CountWindow(100)
    benchmark(w.record, False)


def test_time_window_record(benchmark, core_kind):
    w = core_module(core_kind, "window").TimeWindow(10)
    benchmark(w.record, False)


def test_breaker_state_load(benchmark, core_kind):
    s = core_module(core_kind, "state").BreakerState()
    benchmark(s.load)
