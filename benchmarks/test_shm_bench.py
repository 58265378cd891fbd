"""Host-wide limits (issue #14): the same decision from 4 processes at once, decisions/s in total, on one
shared-memory TokenBucket, next to pyrate-limiter's MultiprocessBucket (its cross-process bucket: a
Manager list behind a multiprocessing RLock) and to 4 processes each deciding on a process-local bucket
(the floor: what the machine does with no sharing at all), in the same run.

python -m pytest benchmarks/test_shm_bench.py -s --benchmark-disable   # prints the table

Each process (spawn) waits at a barrier, then calls try_acquire() for DURATION seconds on a bucket that
never runs dry (rate 1e9/s), and reports how many decisions it made. The single-process cost per decision
(shm vs process-local) is in test_rate_limit_bench.py (test_token_bucket_try_acquire_shm).
"""
from __future__ import annotations

import multiprocessing as mp
import time
import uuid

import pytest

from conftest import bare, bare_pair

PROCS = 4
DURATION = 0.5
RESULTS: dict[str, float] = {}


def _spin(try_acquire, barrier, out) -> None:
    barrier.wait()
    n, end = 0, time.perf_counter() + DURATION
    while True:
        for _ in range(100):
            try_acquire()
        n += 100
        if time.perf_counter() >= end:
            break
    out.put(n)


def _buttress_worker(url: str, name: str, barrier, out) -> None:
    from buttress import TokenBucket
    kw = {} if url == "local" else {"store": url, "name": name}
    tb = TokenBucket(rate=1e9, capacity=10**9, **kw)
    _spin(tb.try_acquire, barrier, out)


def _pyrate_worker(bucket, barrier, out) -> None:
    from pyrate_limiter import Limiter
    limiter = Limiter(bucket)
    _spin(lambda: limiter.try_acquire("k"), barrier, out)


def _run(target, args, start="spawn") -> float:
    ctx = mp.get_context(start)
    barrier, out = ctx.Barrier(PROCS), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, out)) for _ in range(PROCS)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    return total / DURATION


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    if RESULTS:
        base = RESULTS.get("4 processes, process-local TokenBucket each (no sharing)")
        print(f"\n{'4 processes at once':60s} {'decisions/s':>14s} {'x local':>8s}")
        for case, rate in RESULTS.items():
            print(f"{case:60s} {rate:14,.0f} {rate / base if base else float('nan'):8.3f}")


def _record(benchmark, case: str, target, args, start="spawn") -> None:
    rate = benchmark.pedantic(lambda: _run(target, args, start), rounds=1, iterations=1)
    RESULTS[case] = rate
    benchmark.extra_info["decisions_per_s"] = rate


# -- one process: the cost per decision on shared words, next to the process-local object and the floors ------

def test_floor_bare_call(benchmark):
    benchmark(bare)


def test_floor_bare_pair(benchmark):
    benchmark(bare_pair)


def test_token_bucket_try_acquire_local(benchmark):
    from buttress import TokenBucket
    benchmark(TokenBucket(rate=1e9, capacity=10**9).try_acquire)


def test_token_bucket_try_acquire_shm(benchmark, shm_store):
    from buttress import TokenBucket
    benchmark(TokenBucket(rate=1e9, capacity=10**9, name="tb", store=shm_store).try_acquire)


def test_breaker_success_local(benchmark):
    from buttress import CircuitBreaker
    benchmark(CircuitBreaker(name="cb", window="time", slow_call_duration=None)(bare))


def test_breaker_success_shm(benchmark, shm_store):
    from buttress import CircuitBreaker
    benchmark(CircuitBreaker(name="cb", window="time", slow_call_duration=None, store=shm_store)(bare))


def _pair(bh):
    acquire, release = bh.try_acquire, bh.release

    def pair():
        acquire()
        release()
    return pair


def test_bulkhead_pair_local(benchmark):
    from buttress import Bulkhead
    benchmark(_pair(Bulkhead(10)))


def test_bulkhead_pair_shm(benchmark, shm_store):
    from buttress import Bulkhead
    benchmark(_pair(Bulkhead(10, name="bh", store=shm_store)))


# -- 4 processes at once ------------------------------------------------------------------------------------

def test_four_processes_local_buckets(benchmark):
    _record(benchmark, "4 processes, process-local TokenBucket each (no sharing)", _buttress_worker, ("local", ""))


def test_four_processes_one_shm_bucket(benchmark):
    name = "bench-" + uuid.uuid4().hex[:8]
    from buttress.stores import SharedMemoryStore
    store = SharedMemoryStore("bench-" + uuid.uuid4().hex[:8])
    try:
        _record(benchmark, "4 processes, one buttress TokenBucket in shm://", _buttress_worker,
                (store.url, name))
    finally:
        store.close()
        store.unlink()


def test_four_processes_pyrate_multiprocess_bucket(benchmark):
    pr = pytest.importorskip("pyrate_limiter")
    if not hasattr(pr, "MultiprocessBucket"):
        pytest.skip("pyrate-limiter without MultiprocessBucket")
    bucket = pr.MultiprocessBucket.init([pr.Rate(10**9, pr.Duration.SECOND)])
    # its lock is made in the default (fork) context, which pyrate-limiter's processes are meant to use
    _record(benchmark, "4 processes, one pyrate-limiter MultiprocessBucket", _pyrate_worker, (bucket,), "fork")
