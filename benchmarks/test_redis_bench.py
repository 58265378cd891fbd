"""RedisStore over loopback against its peers in the same run: `limits`' Redis storage (moving window and
fixed window) and pyrate-limiter's Redis bucket, sync and asyncio; plus the floors (a bare call, a bare
redis-py PING round trip) and the cost of a decision once the store's breaker is open (Redis down).

pytest-benchmark times each case; each case also records N single decisions with perf_counter_ns, and
the module prints a table at the end: decisions/s, p50 and p99 per decision, and the throughput ratio of
buttress to each peer (goal: >= 1.5x).

    python -m pytest -q -p no:cacheprovider benchmarks/test_redis_bench.py
"""
from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_server import RedisServer, need_redis  # noqa: E402

from conftest import bare  # noqa: E402

np = pytest.importorskip("numpy")

N = 3000                 # single decisions timed for p50 / p99 per case
BIG = 10**9              # a limit that never refuses during the benchmark
RESULTS: dict[str, tuple[float, float, float]] = {}    # case -> (decisions/s, p50 us, p99 us)


@pytest.fixture(scope="module")
def server(request):
    need_redis()
    srv = RedisServer()
    yield srv
    srv.stop()
    _report(request)


def _report(request) -> None:
    if not RESULTS:
        return
    lines = ["", "Redis decisions over loopback (this run; ratio = buttress throughput / peer throughput)",
             f"{'case':48s} {'decisions/s':>12s} {'p50 us':>8s} {'p99 us':>8s}"]
    for case, (tput, p50, p99) in RESULTS.items():
        lines.append(f"{case:48s} {tput:12.0f} {p50:8.1f} {p99:8.1f}".replace("nan", "  -"))
    pairs = [("sync gcra", "buttress sync gcra try_acquire", ["limits sync moving window hit",
                                                              "limits sync fixed window hit",
                                                              "pyrate-limiter sync redis bucket"]),
             ("sync fixed window", "buttress sync fixed window try_acquire", ["limits sync fixed window hit"]),
             ("sync sliding window", "buttress sync sliding window try_acquire", ["limits sync moving window hit"]),
             ("async gcra", "buttress async gcra try_acquire", ["limits async moving window hit",
                                                                "limits async fixed window hit",
                                                                "pyrate-limiter async redis bucket"]),
             (f"async gcra, {TASKS} tasks", f"buttress async gcra, {TASKS} tasks",
              [f"limits async moving window, {TASKS} tasks", f"limits async fixed window, {TASKS} tasks",
               f"pyrate-limiter async redis bucket, {TASKS} tasks"])]
    lines.append("")
    for label, ours, peers in pairs:
        if ours not in RESULTS:
            continue
        for peer in peers:
            if peer in RESULTS:
                lines.append(f"ratio {label:22s} vs {peer:36s} {RESULTS[ours][0] / RESULTS[peer][0]:5.2f}x")
    text = "\n".join(lines)
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print(text)
    else:  # pragma: no cover
        print(text)


def _record(case: str, fn, n: int = N) -> None:
    for _ in range(50):
        fn()
    lat = []
    pc = time.perf_counter_ns
    t0 = pc()
    for _ in range(n):
        a = pc()
        fn()
        lat.append(pc() - a)
    total = pc() - t0
    lat.sort()
    RESULTS[case] = (n / (total / 1e9), lat[len(lat) // 2] / 1e3, lat[int(len(lat) * 0.99)] / 1e3)


def _record_async(case: str, make, n: int = N) -> None:
    async def run():
        fn = await make()
        for _ in range(50):
            await fn()
        lat = []
        pc = time.perf_counter_ns
        t0 = pc()
        for _ in range(n):
            a = pc()
            await fn()
            lat.append(pc() - a)
        total = pc() - t0
        lat.sort()
        RESULTS[case] = (n / (total / 1e9), lat[len(lat) // 2] / 1e3, lat[int(len(lat) * 0.99)] / 1e3)
    asyncio.run(run())


TASKS, PER_TASK = 32, 40


def _record_concurrent(case: str, make) -> None:
    """Throughput with TASKS concurrent tasks on one event loop (a service's request handlers)."""
    async def run():
        fn = await make()
        for _ in range(20):
            await fn()

        async def task():
            for _ in range(PER_TASK):
                await fn()
        t0 = time.perf_counter_ns()
        await asyncio.gather(*[task() for _ in range(TASKS)])
        total = time.perf_counter_ns() - t0
        n = TASKS * PER_TASK
        RESULTS[case] = (n / (total / 1e9), float("nan"), float("nan"))
    asyncio.run(run())


def _bench_async(benchmark, make, per_round: int = 200) -> None:
    """pytest-benchmark over rounds of `per_round` sequential awaited decisions on one event loop."""
    loop = asyncio.new_event_loop()
    fn = loop.run_until_complete(make())

    async def rounds():
        for _ in range(per_round):
            await fn()

    try:
        benchmark.extra_info["decisions_per_round"] = per_round
        benchmark.pedantic(lambda: loop.run_until_complete(rounds()), rounds=5, iterations=1, warmup_rounds=1)
    finally:
        loop.close()


# -- floors -------------------------------------------------------------------------------------------

def test_floor_bare_call(benchmark):
    benchmark(bare)


def test_floor_redis_py_ping(benchmark, server):
    c = server.client()
    benchmark(c.ping)
    _record("floor: redis-py PING round trip", c.ping)


# -- buttress ----------------------------------------------------------------------------------------------

@pytest.fixture
def store(server):
    from buttress.stores.redis import RedisStore
    server.flush()
    s = RedisStore(url=server.url, timeout=1.0)
    yield s
    s.close()


def test_buttress_sync_gcra(benchmark, store):
    g = store.gcra("bench", 1e6, BIG)
    benchmark(g.try_acquire)
    _record("buttress sync gcra try_acquire", g.try_acquire)


def test_buttress_sync_keyed(benchmark, store):
    k = store.keyed("bench", 1e6, BIG)
    benchmark(k.try_acquire, "client-1")
    _record("buttress sync keyed try_acquire", lambda: k.try_acquire("client-1"))


def test_buttress_sync_keyed_many_1000(benchmark, store):
    k = store.keyed("bench-many", 1e6, BIG)
    keys = np.arange(1000, dtype=np.int64)
    benchmark(k.try_acquire_many, keys)


def test_buttress_sync_fixed_window(benchmark, store):
    w = store.window("bench", BIG, 10**9, False)
    benchmark(w.try_acquire)
    _record("buttress sync fixed window try_acquire", w.try_acquire)


def test_buttress_sync_sliding_window(benchmark, store):
    w = store.window("bench", BIG, 10**9, True)
    benchmark(w.try_acquire)
    _record("buttress sync sliding window try_acquire", w.try_acquire)


def test_buttress_async_gcra(benchmark, server):
    from buttress.stores.redis import RedisStore
    server.flush()

    async def make():
        s = RedisStore(url=server.url, timeout=1.0)
        return s.gcra("bench-async", 1e6, BIG).try_acquire_async

    _bench_async(benchmark, make)
    _record_async("buttress async gcra try_acquire", make)
    _record_concurrent(f"buttress async gcra, {TASKS} tasks", make)


def test_buttress_decision_with_store_down(benchmark):
    """Redis unreachable: once the store's breaker is open, a decision is one local step (goal <= 2 us)."""
    from buttress.stores.redis import RedisStore
    s = RedisStore(url="redis://127.0.0.1:1/0", timeout=0.01, probe=1.0)
    g = s.gcra("down", 1e9, BIG)
    for _ in range(10):
        g.try_acquire()
    benchmark(g.try_acquire)
    _record("buttress decision, store down (breaker open)", g.try_acquire, n=20000)
    s.close()


# -- peers ---------------------------------------------------------------------------------------------

def _limits():
    return pytest.importorskip("limits", reason="limits is not installed (pip install limits)")


def test_peer_limits_sync_moving_window(benchmark, server):
    limits = _limits()
    from limits.storage import RedisStorage
    from limits.strategies import MovingWindowRateLimiter
    lim = MovingWindowRateLimiter(RedisStorage(server.url))
    item = limits.parse("1000000/second")
    benchmark(lim.hit, item, "bench")
    _record("limits sync moving window hit", lambda: lim.hit(item, "bench"))


def test_peer_limits_sync_fixed_window(benchmark, server):
    limits = _limits()
    from limits.storage import RedisStorage
    from limits.strategies import FixedWindowRateLimiter
    lim = FixedWindowRateLimiter(RedisStorage(server.url))
    item = limits.parse("1000000000/second")
    benchmark(lim.hit, item, "bench")
    _record("limits sync fixed window hit", lambda: lim.hit(item, "bench"))


@pytest.mark.parametrize("strategy", ["moving", "fixed"])
def test_peer_limits_async(benchmark, server, strategy):
    limits = _limits()
    try:
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
    except ImportError as exc:
        pytest.skip(f"limits.aio not importable: {exc}")
    item = limits.parse("1000000/second")
    cls = MovingWindowRateLimiter if strategy == "moving" else FixedWindowRateLimiter

    async def make():
        lim = cls(RedisStorage("async+" + server.url, implementation="redispy"))
        return lambda: lim.hit(item, f"bench-async-{strategy}")

    _bench_async(benchmark, make)
    _record_async(f"limits async {strategy} window hit", make)
    _record_concurrent(f"limits async {strategy} window, {TASKS} tasks", make)


def _pyrate():
    return pytest.importorskip("pyrate_limiter", reason="pyrate-limiter is not installed (pip install pyrate-limiter)")


def test_peer_pyrate_limiter_sync_redis_bucket(benchmark, server):
    pyrate = _pyrate()
    import redis
    bucket = pyrate.RedisBucket.init([pyrate.Rate(10**6, pyrate.Duration.SECOND)], redis.Redis.from_url(server.url),
                                     "bench")
    lim = pyrate.Limiter(bucket)
    fn = lambda: lim.try_acquire("bench", blocking=False)  # noqa: E731
    assert fn() is True
    benchmark(fn)
    _record("pyrate-limiter sync redis bucket", fn)


def test_peer_pyrate_limiter_async_redis_bucket(benchmark, server):
    pyrate = _pyrate()
    import redis.asyncio as aredis

    async def make():
        bucket = await pyrate.RedisBucket.init([pyrate.Rate(10**6, pyrate.Duration.SECOND)],
                                               aredis.Redis.from_url(server.url), "bench-async")
        lim = pyrate.Limiter(bucket)
        return lambda: lim.try_acquire("bench", blocking=False)

    _bench_async(benchmark, make)
    _record_async("pyrate-limiter async redis bucket", make)
    _record_concurrent(f"pyrate-limiter async redis bucket, {TASKS} tasks", make)
