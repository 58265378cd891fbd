"""RedisStore against a real redis-server (tests/redis_server.py): scripts, round trips, keys, TTLs,
settings checks, sync and asyncio clients, the store breaker and the on_error policies under SIGSTOP and
SIGKILL. No fakes: every decision here is made by the server's Lua on the server's TIME."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from redis_server import RedisServer, need_redis, redis_server, redis_url  # noqa: F401 - fixtures

np = pytest.importorskip("numpy")

SLOW = 1e-4          # tokens per second: no refill during a test (capacity / rate stays < 26 days)


@pytest.fixture
def store(redis_url: str):  # noqa: F811
    from buttress.stores.redis import RedisStore
    # generous timeout: this box is shared; exactness must not depend on a timeout (a timed-out call is
    # ambiguous: it may have been decided on the server)
    s = RedisStore(url=redis_url, timeout=2.0, on_error="closed")
    yield s
    s.close()


def _wait_until(pred, limit: float = 5.0, step: float = 0.02) -> float:
    """Poll `pred` until true; returns the seconds it took (fails after `limit`)."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > limit:
            pytest.fail(f"condition not reached within {limit} s")
        time.sleep(step)
    return time.monotonic() - t0


class Counting:
    """A redis-py connection class that counts round trips (one send of packed commands = one trip)."""


def _counting_connection():
    import redis

    class CountingConnection(redis.Connection):
        sends = 0

        def send_packed_command(self, command, check_health=True):
            type(self).sends += 1
            return super().send_packed_command(command, check_health)

    return CountingConnection


# -- import and construction ---------------------------------------------------------------------------

def test_module_imports_without_redis_py():
    code = ("import sys; sys.modules['redis'] = None\n"
            "import buttress.stores.redis as r\n"
            "try:\n    r.RedisStore(url='redis://127.0.0.1:1/0')\nexcept ImportError as e:\n    print('IE', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "IE" in out.stdout and "pip install" in out.stdout


def test_bad_arguments_name_the_parameter(redis_url):  # noqa: F811
    from buttress.stores.redis import RedisStore
    with pytest.raises(ValueError, match="on_error"):
        RedisStore(url=redis_url, on_error="maybe")
    with pytest.raises(ValueError, match="timeout"):
        RedisStore(url=redis_url, timeout=0)
    with pytest.raises(ValueError, match="connect_timeout"):
        RedisStore(url=redis_url, connect_timeout=0)
    with pytest.raises(ValueError, match="connect_timeout"):
        RedisStore(url=redis_url + "?connect_timeout=100")
    with pytest.raises(TypeError, match="client= .* or url="):
        RedisStore()
    with pytest.raises(ValueError, match="scheme"):
        RedisStore(url="http://127.0.0.1/")
    with pytest.raises(ValueError, match="on_error"):
        RedisStore(url=redis_url + "?on_error=nope")
    s = RedisStore(url=redis_url)
    with pytest.raises(ValueError, match="capacity / rate"):
        s.gcra("x", 1e-9, 10)
    with pytest.raises(ValueError, match="window must be a whole number of microseconds"):
        s.window("w", 3, 1500, False)
    s.close()


def test_from_url_schemes_and_parameters(redis_server):  # noqa: F811
    from buttress.stores.redis import RedisStore
    for scheme in ("redis", "valkey"):
        s = RedisStore.from_url(f"{scheme}://127.0.0.1:{redis_server.port}/0?prefix=p1:&timeout=0.5&on_error=open")
        assert (s.prefix, s.timeout, s.on_error) == ("p1:", 0.5, "open")
        assert s.gcra("u" + scheme, 1.0, 1).try_acquire()
        assert RedisStore.from_url(s.url) is s       # one store (one store breaker) per URL and process
        s.close()


# -- keys, TTLs, settings ------------------------------------------------------------------------------

def test_key_layout_hash_tag_and_ttls(store, redis_server):  # noqa: F811
    c = redis_server.client()
    g = store.gcra("checkout", SLOW, 5)
    assert g.try_acquire()
    key = b"bt:{token_bucket:checkout}"
    assert c.exists(key) and 0 < c.pttl(key)
    assert c.get(b"bt:{token_bucket:checkout}:settings") == b'{"capacity":5,"rate":0.0001}'
    k = store.keyed("per-client", SLOW, 2)
    k.try_acquire("alice"), k.try_acquire(b"alice"), k.try_acquire(7)
    for sub in (b"salice", b"balice", b"i7"):
        name = b"bt:{keyed_limiter:per-client}:" + sub
        assert c.exists(name) and 0 < c.pttl(name)
    assert len(k) == 3
    # a fast limit's key disappears once the bucket is full again
    f = store.gcra("fast", 1000.0, 1)
    assert f.try_acquire()
    _wait_until(lambda: not c.exists(b"bt:{token_bucket:fast}"), limit=2.0)
    c.close()


def test_settings_mismatch_names_the_setting(store):
    store.gcra("same", SLOW, 5).try_acquire()
    other = store.gcra("same", SLOW, 6)
    with pytest.raises(ValueError, match=r"capacity=6 here but capacity=5 in the store"):
        other.try_acquire()
    store.gcra("same", SLOW, 5).try_acquire()    # equal settings: fine


# -- decisions match the process-local core --------------------------------------------------------------

def test_gcra_exact_and_refund(store):
    g = store.gcra("g", SLOW, 5)
    assert [g.try_acquire() for _ in range(7)] == [True] * 5 + [False] * 2
    assert g.counts() == (5, 2)
    assert g.available() == 0
    assert g.wait_ns(1) > 1e12                   # one token takes 10 000 s
    h = store.gcra("h", 1.0, 3)
    wait, receipt, _ = h.claim_ex(3)
    assert wait == 0
    assert h.refund(receipt) and h.available() == 3
    assert h.try_acquire(3)
    w1, r1 = h.claim(1, None, None)               # a reservation: waits about one interval
    assert 0 < w1 <= 1_000_000_000
    w2, r2 = h.claim(1, None, None)
    assert not h.refund(r1)                       # a later claim built on it: never given back
    assert h.refund(r2)
    assert h.reserve(1, None, 0) == -1            # nothing within a zero budget
    need = h.claim_ex(1, None, 0)[2]
    assert 0 < need <= 2_000_000_000


def test_leaky_bucket_is_capacity_one(store):
    lb = store.gcra("lb", 10.0, 1, kind="leaky_bucket")
    waits = [lb.reserve(1, None, 10**9) for _ in range(5)]
    assert waits[0] == 0
    assert all(0 < b - a <= 100_000_000 + 1_000_000 for a, b in zip(waits, waits[1:]))


@pytest.mark.parametrize("sliding", [False, True])
def test_windows_exact(store, sliding):
    w = store.window(f"w{sliding}", 3, 3600 * 10**9, sliding)
    receipts = [w.claim(1) for _ in range(5)]
    assert [r is not None for r in receipts] == [True] * 3 + [False] * 2
    assert w.wait_ns(1) > 0
    w.unclaim(1, receipts[0])                     # given back: one more fits
    assert w.try_acquire() and not w.try_acquire()


def test_keyed_many_matches_the_local_core(store):
    from buttress._impl import core
    rng = np.random.default_rng(5)
    keys = rng.integers(0, 40, 3000).astype(np.int64)
    k = store.keyed("many", SLOW, 3)
    got = k.try_acquire_many(keys)
    local = core("keyed").KeyedGCRA(SLOW, 3, 1000)
    want = local.try_acquire_many(keys, 1, 0)
    assert got.dtype == bool and np.array_equal(got, want)
    assert got.sum() == 3 * len(set(keys.tolist()))
    assert not k.try_acquire(int(keys[0]))       # the batch and single calls share one key
    assert k.try_acquire_many(np.zeros(0, dtype=np.int64)).shape == (0,)


# -- one round trip per decision ------------------------------------------------------------------------

def test_one_round_trip_per_decision(redis_server):  # noqa: F811
    import redis
    from buttress.stores.redis import RedisStore
    redis_server.flush()
    Conn = _counting_connection()
    client = redis.Redis(connection_pool=redis.ConnectionPool(host="127.0.0.1", port=redis_server.port,
                                                              connection_class=Conn))
    store = RedisStore(client=client, timeout=2.0, on_error="closed")
    g = store.gcra("rt", SLOW, 50)
    k = store.keyed("rtk", SLOW, 50)
    w = store.window("rtw", 50, 3600 * 10**9, True)
    g.try_acquire(), k.try_acquire(1), w.try_acquire()          # first call also records the settings
    admin = redis_server.client()
    before = admin.info("commandstats")
    sends = Conn.sends
    for i in range(20):
        g.try_acquire()
        k.try_acquire(i)
        w.try_acquire()
    assert Conn.sends - sends == 60
    sends = Conn.sends
    k.try_acquire_many(np.arange(1000, dtype=np.int64))          # 4 scripts of 256 keys, ONE round trip
    assert Conn.sends - sends == 1
    after = admin.info("commandstats")
    calls = {c: after[c]["calls"] - before.get(c, {"calls": 0})["calls"] for c in after}
    assert calls["cmdstat_evalsha"] == 60 + 4
    # commandstats also counts the commands a script runs (TIME, GET, SET, ...); none of the client-side
    # ones that would mean a second step: no EVAL / SCRIPT LOAD, no MULTI/EXEC, no WATCH
    for c in ("cmdstat_eval", "cmdstat_script", "cmdstat_multi", "cmdstat_exec", "cmdstat_watch"):
        assert calls.get(c, 0) == 0, (c, calls)
    assert calls["cmdstat_time"] == 60 + 4                          # one server TIME per script
    store.close()
    admin.close()


def test_noscript_reloads_in_the_same_call(store, redis_server):  # noqa: F811
    g = store.gcra("ns", SLOW, 3)
    assert g.try_acquire()
    c = redis_server.client()
    c.script_flush()
    assert g.try_acquire() and g.try_acquire() and not g.try_acquire()
    assert store.metrics().errors == 0
    c.close()


# -- asyncio -------------------------------------------------------------------------------------------

def test_asyncio_client_and_url(redis_server):  # noqa: F811
    import redis.asyncio as aredis
    from buttress.stores.redis import RedisStore
    redis_server.flush()

    async def main():
        client = aredis.Redis(host="127.0.0.1", port=redis_server.port)
        st = RedisStore(client=client, timeout=2.0, on_error="closed")
        g = st.gcra("a", SLOW, 4)
        got = await asyncio.gather(*[g.try_acquire_async() for _ in range(10)])
        assert sum(got) == 4
        with pytest.raises(TypeError, match="_async"):
            g.try_acquire()                  # a sync call on an asyncio-only store is a usage error
        k = st.keyed("ak", SLOW, 2)
        res = await k.try_acquire_many_async(np.array([1, 1, 1, 2], dtype=np.int64))
        assert res.tolist() == [True, True, False, True]
        w = st.window("aw", 2, 3600 * 10**9, False)
        assert [await w.try_acquire_async() for _ in range(3)] == [True, True, False]
        p = st.permits("bulkhead", "ab", 1)
        assert await p.try_acquire_async() and not await p.try_acquire_async()
        await p.release_async()
        assert await p.try_acquire_async()
        await p.release_async()
        # a URL store serves sync and async callers alike (one shared state)
        su = RedisStore(url=redis_server.url, timeout=2.0, on_error="closed")
        gu = su.gcra("a", SLOW, 4)
        assert not await gu.try_acquire_async() and not gu.try_acquire()
        su.close()
        await client.aclose()

    asyncio.run(main())


# -- leases --------------------------------------------------------------------------------------------

def test_bulkhead_leases_expire_and_renew(store, redis_server):  # noqa: F811
    from buttress.stores.redis import RedisStore
    p = store.permits("bulkhead", "db", 2, lease=0.3)
    assert p.try_acquire() and p.try_acquire() and not p.try_acquire()
    # held across several lease periods: the store renews them
    time.sleep(1.0)
    assert not p.try_acquire() and p.lost == 0
    p.release(2)
    assert p.in_use == 0
    with pytest.raises(ValueError, match="holds 0 permit"):
        p.release()
    # a holder that stops renewing (a dead host) loses its permits within the lease
    dead = RedisStore(url=redis_server.url, timeout=2.0, on_error="closed")
    q = dead.permits("bulkhead", "db", 2, lease=0.3)
    dead._bg_stop.set()
    assert q.try_acquire(2)
    dead._bg_stop.set()
    assert not p.try_acquire()
    took = _wait_until(p.try_acquire, limit=3.0)
    assert took < 1.5
    p.release()


# -- the cluster breaker ------------------------------------------------------------------------------------

def _conf(**kw):
    from buttress._breaker_conf import breaker_conf
    base = dict(window="time", window_size=10, minimum_calls=4, failure_rate_threshold=0.5, open_duration=0.3,
                half_open_calls=2)
    base.update(kw)
    return breaker_conf("pay", **base)


def test_cluster_breaker_opens_once_and_half_open_permits_are_fleet_wide(redis_server):  # noqa: F811
    from buttress.stores.redis import RedisStore, REFUSED
    redis_server.flush()
    a = RedisStore(url=redis_server.url, timeout=2.0, on_error="closed", sync_interval=0.05)
    b = RedisStore(url=redis_server.url, timeout=2.0, on_error="closed", sync_interval=0.05)
    changes = []
    ba = a.breaker("pay", _conf(), on_change=lambda o, n: changes.append(("a", o.state, n.state)))
    bb = b.breaker("pay", _conf(), on_change=lambda o, n: changes.append(("b", o.state, n.state)))
    for br in (ba, bb):
        for _ in range(2):
            t = br.acquire()
            assert t >= 0
            br.record(t, failed=True)
    _wait_until(lambda: ba.view.state == 1 and bb.view.state == 1, limit=2.0)   # both see OPEN
    assert ba.view.generation == bb.view.generation == 1                       # opened ONCE
    assert ba.acquire() == REFUSED and bb.acquire() == REFUSED
    time.sleep(0.35)
    tokens = [ba.acquire(), bb.acquire(), ba.acquire(), bb.acquire()]
    granted = [t for t in tokens if t >= 0]
    assert len(granted) == 2 and all(t & 1 for t in granted)                  # exactly half_open_calls
    ba.record(granted[0], failed=False)
    ba.record(granted[1], failed=False)
    _wait_until(lambda: ba.view.state == 0 and bb.view.state == 0, limit=2.0)
    assert ba.view.generation == bb.view.generation == 3
    assert ba.transition(3) and ba.view.state == 3                             # FORCED_OPEN, by anyone
    _wait_until(lambda: bb.view.state == 3, limit=2.0)
    assert ("b", 0, 1) in changes and ("a", 0, 1) in changes
    a.close(), b.close()


# -- failure policies: SIGSTOP, SIGKILL ---------------------------------------------------------------

@pytest.mark.parametrize("policy", ["local", "open", "closed"])
def test_paused_server_policy_and_recovery(redis_server, policy):  # noqa: F811
    from buttress.stores.redis import RedisStore
    redis_server.flush()
    st = RedisStore(url=redis_server.url, timeout=0.02, on_error=policy)
    other = RedisStore(url=redis_server.url, timeout=2.0, on_error="closed")
    events = []
    st.on("store_error", events.append)
    g, h = st.gcra("p", SLOW, 20), other.gcra("p", SLOW, 20)
    assert g.try_acquire()
    redis_server.pause()
    try:
        t0 = time.monotonic()
        got = [g.try_acquire() for _ in range(2000)]          # no exception reaches the caller
        elapsed = time.monotonic() - t0
        assert 1 <= st.metrics().errors <= 5 + int(elapsed / st.probe) + 1
        assert events and all(e.kind == "store_error" and e.policy == policy for e in events)
        if policy == "local":
            assert sum(got) == 19       # the local twin of the same limit, carrying the 1 this process took
        elif policy == "open":
            assert all(got)
        else:
            assert not any(got)
            assert g.wait_ns() >= 1_000_000                 # a retry-after while the store is down
    finally:
        redis_server.resume()
    # shared again within 5 s. (The calls that timed out were still in the paused server's socket
    # buffers and ran when it resumed: a timed-out decision may still count on the server.)
    _wait_until(lambda: g.available() == h.available() and st.available, limit=5.0)
    before = g.available()
    assert 0 < before < 20
    assert h.try_acquire()                                  # another process's decision ...
    assert g.available() == before - 1                      # ... is seen here
    st.close(), other.close()


def test_killed_and_restarted_server(redis_server):  # noqa: F811
    from buttress.stores.redis import RedisStore
    redis_server.flush()
    st = RedisStore(url=redis_server.url, timeout=0.05, on_error="local")
    other = RedisStore(url=redis_server.url, timeout=0.05, on_error="local")
    g, h = st.gcra("k", SLOW, 3), other.gcra("k", SLOW, 3)
    assert g.try_acquire()
    redis_server.kill()
    for _ in range(100):
        g.try_acquire(), h.try_acquire(), g.wait_ns(), g.available()     # never raises
    redis_server.restart()                                 # empty server: no keys, no scripts

    def shared() -> bool:
        return g.try_acquire() and not h.try_acquire(3) and st.available and other.available

    _wait_until(shared, limit=5.0)
    st.close(), other.close()


def test_store_breaker_makes_a_dead_store_cheap(redis_server):  # noqa: F811
    """Once the store's breaker is open a decision is one local step: at most 5 + probes calls ever
    reach the (dead) server however many decisions are made."""
    from buttress.stores.redis import RedisStore
    st = RedisStore(url="redis://127.0.0.1:1/0", timeout=0.01, on_error="local")
    g = st.gcra("d", SLOW, 10)
    n = sum(g.try_acquire() for _ in range(20000))
    assert n == 10
    m = st.metrics()
    assert m.errors <= 5 + 4 and m.fallbacks == 20000 and m.breaker_state in ("OPEN", "HALF_OPEN")
    st.close()


# -- connection setup is not part of a decision; the local twin carries this process's consumption -------

class _SlowFirstReply:
    """A TCP proxy to the server that holds back the first reply of each connection it is armed for by
    `delay` s (a connection set up on a busy machine: TCP + handshake slower than a decision's timeout)."""

    def __init__(self, port: int, delay: float) -> None:
        import socket
        import threading
        self.port, self.delay, self.armed = port, delay, 0
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.url = f"redis://127.0.0.1:{self.lsock.getsockname()[1]}/0"
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            with self._lock:
                slow, self.armed = self.armed > 0, max(0, self.armed - 1)
            u = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=self._pipe, args=(c, u, 0.0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, self.delay if slow else 0.0), daemon=True).start()

    @staticmethod
    def _pipe(src, dst, delay: float) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if delay:
                    time.sleep(delay)
                    delay = 0.0
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.lsock.close()


def test_a_fresh_event_loop_per_round_admits_exactly_capacity(redis_server):  # noqa: F811
    """Each new event loop opens its connection: that setup (here 0.3 s) must not count against the
    decision's timeout (0.1 s), or the first call is decided by a fresh full local bucket and 3 pass
    against capacity 2 (only the first connection of each round is slow)."""
    import asyncio
    from buttress import RateLimitExceeded, TokenBucket
    from buttress.stores.redis import RedisStore
    redis_server.flush()
    proxy = _SlowFirstReply(redis_server.port, 0.3)
    st = RedisStore(url=proxy.url, timeout=0.1, on_error="local")
    admitted = []

    async def run(i: int) -> None:
        tb = TokenBucket(rate=SLOW, capacity=2, name=f"as{i}", store=st)
        n = 0
        for _ in range(4):
            try:
                await tb.acquire_async(1, timeout=0)
                n += 1
            except RateLimitExceeded:
                pass
        admitted.append(n)
    try:
        for i in range(4):
            proxy.armed = 1
            asyncio.run(run(i))
        assert admitted == [2, 2, 2, 2]
        assert st.metrics().errors == 0 and st.metrics().fallbacks == 0
        # and the sync path: a new thread's connection is set up on the connect timeout too
        import threading
        got = []
        proxy.armed = 1
        t = threading.Thread(target=lambda: got.extend(st.gcra("sync", SLOW, 2).try_acquire() for _ in range(4)))
        t.start(), t.join()
        assert got == [True, True, False, False] and st.metrics().errors == 0
    finally:
        st.close()
        proxy.close()


def test_paused_server_local_twin_never_admits_past_what_this_process_used(redis_server):  # noqa: F811
    """A process that used a limit through the store, then lost the server (SIGSTOP), decides on a local
    twin that carries its consumption: never more than capacity from this process (was: a full local
    bucket, capacity more). Token bucket, fixed and sliding windows, bulkhead."""
    from buttress import Bulkhead, FixedWindowLimiter, SlidingWindowLimiter, TokenBucket
    from buttress.stores.redis import RedisStore
    redis_server.flush()
    st = RedisStore(url=redis_server.url, timeout=0.02, on_error="local")
    tb = TokenBucket(rate=SLOW, capacity=3, name="tb", store=st)
    fw = FixedWindowLimiter(limit=3, window=3600, name="fw", store=st)
    sw = SlidingWindowLimiter(limit=3, window=3600, name="sw", store=st)
    bh = Bulkhead(max_concurrent=3, name="bh", store=st)
    kl = st.keyed("kl", SLOW, 3)
    assert [kl.try_acquire("a") for _ in range(2)] == [True, True]
    assert list(kl.try_acquire_many(np.array([7, 7], dtype=np.int64))) == [True, True]
    assert [tb.try_acquire() for _ in range(2)] == [True, True]
    assert [fw.try_acquire() for _ in range(2)] == [True, True]
    assert [sw.try_acquire() for _ in range(2)] == [True, True]
    assert [bh.try_acquire() for _ in range(2)] == [True, True]
    assert st.metrics().errors == 0
    redis_server.pause()
    try:
        for lim in (tb, fw, sw, bh):
            got = [lim.try_acquire() for _ in range(200)]
            assert sum(got) == 1, (lim, sum(got))       # 2 + 1 = capacity, however many tries
        assert sum(kl.try_acquire("a") for _ in range(50)) == 1
        assert int(kl.try_acquire_many(np.full(50, 7, dtype=np.int64)).sum()) == 1
        assert sum(kl.try_acquire("b") for _ in range(50)) == 3     # a key this process never used
        assert st.metrics().errors >= 1
    finally:
        redis_server.resume()
        st.close()
