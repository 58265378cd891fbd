"""Processes sharing limits through a real redis-server: exact admission counts across 4 spawned
processes started behind a barrier, server time across skewed client clocks, bulkhead leases of a
SIGKILLed holder, a breaker opened in one process seen in another."""
from __future__ import annotations

import collections
import multiprocessing as mp
import os
import signal
import time

import pytest

from redis_server import redis_server, redis_url  # noqa: F401 - fixtures

np = pytest.importorskip("numpy")

SLOW = 1e-4            # no refill during a test
NPROC = 4
TRIES = 400
_KEYS = np.arange(20, dtype=np.int64) % 10


def _skew_clocks(seconds: float) -> None:
    """Move every client clock of this process by `seconds` (the server's TIME must be all that counts)."""
    shift = int(seconds * 1e9)
    real_time_ns, real_mono_ns = time.time_ns, time.monotonic_ns
    time.time_ns = lambda: real_time_ns() + shift                          # type: ignore[assignment]
    time.time = lambda: (real_time_ns() + shift) / 1e9                     # type: ignore[assignment]
    time.monotonic_ns = lambda: real_mono_ns() + shift                     # type: ignore[assignment]
    time.monotonic = lambda: (real_mono_ns() + shift) / 1e9                # type: ignore[assignment]


def _scenarios(store):
    """(name, object, run) for every shared pattern; run(obj, i) returns a hashable outcome or None."""
    k = store.keyed("keyed", SLOW, 10)
    w_fixed = store.window("fixed", 100, 86400 * 10**9, False)
    w_sliding = store.window("sliding", 100, 86400 * 10**9, True)
    many = store.keyed("many", SLOW, 10)
    return [
        ("gcra", store.gcra("gcra", SLOW, 100), lambda o, i: "ok" if o.try_acquire() else None),
        ("gcra_n3", store.gcra("gcra3", SLOW, 100), lambda o, i: "ok" if o.try_acquire(3) else None),
        ("keyed", k, lambda o, i: (i % 10) if o.try_acquire(i % 10) else None),
        ("fixed", w_fixed, lambda o, i: (lambda r: None if r is None else r[1])(o.claim(1))),
        ("sliding", w_sliding, lambda o, i: (lambda r: None if r is None else r[1])(o.claim(1))),
        ("many", many, lambda o, i: tuple((_KEYS[o.try_acquire_many(_KEYS)]).tolist()) if i < 10 else None),
    ]


def _exact_worker(url: str, barrier, out, skew: float) -> None:
    if skew:
        _skew_clocks(skew)
    from buttress.stores.redis import RedisStore
    store = RedisStore(url=url, timeout=5.0, on_error="closed")
    result = {}
    for name, obj, run in _scenarios(store):
        obj.bind()
        barrier.wait()
        got = collections.Counter()
        for i in range(TRIES):
            r = run(obj, i)
            if r is not None:
                if isinstance(r, tuple):
                    got.update(r)
                else:
                    got[r] += 1
        result[name] = dict(got)
    result["errors"] = store.metrics().errors
    out.put(result)
    store.close()


def test_four_processes_admit_exactly_the_capacity(redis_url):  # noqa: F811
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(NPROC)
    out = ctx.Queue()
    # one process's clocks run an hour ahead: the server's TIME decides, so it changes nothing
    procs = [ctx.Process(target=_exact_worker, args=(redis_url, barrier, out, 3600.0 if i == 0 else 0.0))
             for i in range(NPROC)]
    for p in procs:
        p.start()
    results = [out.get(timeout=50) for _ in procs]
    for p in procs:
        p.join(10)
    assert all(r["errors"] == 0 for r in results)
    total = collections.defaultdict(collections.Counter)
    for r in results:
        for name, got in r.items():
            if name != "errors":
                total[name].update(got)
    assert total["gcra"] == {"ok": 100}
    assert total["gcra_n3"] == {"ok": 33}                  # 33 x 3 = 99; a 34th would need 102
    assert total["keyed"] == {k: 10 for k in range(10)}
    for name in ("fixed", "sliding"):
        # per window: exactly the limit (a test that straddles a day's edge sees two windows)
        assert all(v == 100 for v in total[name].values()) and len(total[name]) in (1, 2)
    assert total["many"] == {k: 10 for k in range(10)}


def _skew_worker(url: str, barrier, out, skew: float) -> None:
    if skew:
        _skew_clocks(skew)
    from buttress.stores.redis import RedisStore
    store = RedisStore(url=url, timeout=5.0, on_error="closed")
    g = store.gcra("skew", 1.0, 10)
    g.bind()
    barrier.wait()
    n = sum(g.try_acquire() for _ in range(30))
    out.put((n, g.wait_ns(1), time.time()))
    store.close()


def test_clocks_an_hour_apart_share_one_limit(redis_url):  # noqa: F811
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    out = ctx.Queue()
    procs = [ctx.Process(target=_skew_worker, args=(redis_url, barrier, out, s)) for s in (0.0, 3600.0)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    results = [out.get(timeout=50) for _ in procs]
    elapsed = time.monotonic() - t0
    for p in procs:
        p.join(10)
    wall = sorted(r[2] for r in results)
    assert wall[1] - wall[0] > 3500                     # the two really disagree by an hour
    total = sum(r[0] for r in results)
    # capacity 10 at 1/s: at least the burst, at most the burst plus what refilled meanwhile (a client-clock
    # limiter would see an hour of refill in the skewed process and admit all 30 there)
    assert 10 <= total <= 10 + int(elapsed) + 1
    assert all(r[1] <= 1_000_000_000 for r in results)   # both see the same bucket: at most one interval away


def _holder(url: str, ready, lease: float) -> None:
    from buttress.stores.redis import RedisStore
    store = RedisStore(url=url, timeout=5.0, on_error="closed")
    p = store.permits("bulkhead", "db", 3, lease=lease)
    assert p.try_acquire(3)
    ready.set()
    time.sleep(600)


def _peak_worker(url: str, barrier, out) -> None:
    import redis
    from buttress.stores.redis import RedisStore
    store = RedisStore(url=url, timeout=5.0, on_error="closed")
    p = store.permits("bulkhead", "peak", 3, lease=5.0)
    p.bind()
    c = redis.Redis.from_url(url)
    barrier.wait()
    admitted, peak = 0, 0
    for _ in range(150):
        if p.try_acquire():
            admitted += 1
            peak = max(peak, c.incr("inside"))
            c.decr("inside")
            p.release()
    out.put((admitted, peak))
    store.close()


def test_bulkhead_peak_and_a_killed_holder(redis_url):  # noqa: F811
    from buttress.stores.redis import RedisStore
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(NPROC)
    out = ctx.Queue()
    procs = [ctx.Process(target=_peak_worker, args=(redis_url, barrier, out)) for _ in range(NPROC)]
    for p in procs:
        p.start()
    results = [out.get(timeout=50) for _ in procs]
    for p in procs:
        p.join(10)
    assert max(r[1] for r in results) <= 3 and sum(r[0] for r in results) > 0

    ready = ctx.Event()
    holder = ctx.Process(target=_holder, args=(redis_url, ready, 0.5))
    holder.start()
    assert ready.wait(30)
    store = RedisStore(url=redis_url, timeout=5.0, on_error="closed")
    permits = store.permits("bulkhead", "db", 3, lease=0.5)
    assert not permits.try_acquire()
    time.sleep(1.0)
    assert not permits.try_acquire()                 # a live holder renews its leases
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    t0 = time.monotonic()
    while not permits.try_acquire(3):                # all 3 come back once the dead holder's leases expire
        assert time.monotonic() - t0 < 3.0
        time.sleep(0.02)
    assert time.monotonic() - t0 <= 0.5 + 0.5
    permits.release(3)
    store.close()


def _breaker_worker(url: str, role: str, out) -> None:
    from buttress._breaker_conf import breaker_conf
    from buttress.stores.redis import RedisStore
    store = RedisStore(url=url, timeout=5.0, on_error="closed", sync_interval=0.05)
    conf = breaker_conf("payment", window="time", window_size=10, minimum_calls=5, open_duration=30.0)
    b = store.breaker("payment", conf)
    if role == "a":
        for _ in range(5):
            b.record(b.acquire(), failed=True)
        b.sync()
        out.put(("a", b.view.state, b.acquire()))
    else:
        t0 = time.monotonic()
        while b.view.state != 1 and time.monotonic() - t0 < 20:
            time.sleep(0.005)
        out.put(("b", b.view.state, b.acquire()))
    store.close()


def test_breaker_opened_in_one_process_refuses_in_another(redis_url):  # noqa: F811
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    pb = ctx.Process(target=_breaker_worker, args=(redis_url, "b", out))
    pb.start()
    pa = ctx.Process(target=_breaker_worker, args=(redis_url, "a", out))
    pa.start()
    got = dict((r[0], r[1:]) for r in (out.get(timeout=50), out.get(timeout=50)))
    pa.join(10), pb.join(10)
    assert got["a"] == (1, -1) and got["b"] == (1, -1)      # OPEN, and refused, in both
