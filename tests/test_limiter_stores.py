"""Rate limiters in a store (issues 14 and 15, phase 2): store= / name= on TokenBucket, LeakyBucket, the
window limiters and KeyedLimiter. memory:// shares within the process, shm:// across the processes of the
host (the compiled core CASes the segment's words; the twin decides under the store's lock), redis://
across the fleet (the store's scripts decide). Exactness across 4 spawned processes behind a barrier, and
after a SIGKILL in the middle of 100 000 decisions."""
from __future__ import annotations

import os
import random
import uuid

import pytest

from buttress import (FakeClock, FixedWindowLimiter, KeyedLimiter, LeakyBucket, MultiLimiter, RateLimitExceeded,
                      SlidingWindowLimiter, TokenBucket)
from buttress.stores import SharedMemoryStore, store_from_url

from procs import JOIN, NPROC, barrier, kind, no_segments_left, run_all, sigkill_mid_run  # noqa: F401
from procs import unlink_segment
from redis_server import redis_server, redis_url  # noqa: F401 - fixtures

RUN = f"bt-lim-{os.getpid()}-{uuid.uuid4().hex[:8]}"
TRIES = 5_000
CAP = 100
SLOW = 1e-6            # capacity 100, no refill during a test
DAY = 86400.0
_count = iter(range(10**6))


@pytest.fixture(scope="module", autouse=True)
def no_leaked_segments():
    yield from no_segments_left(RUN)


@pytest.fixture
def seg(kind: str):
    n = f"{RUN}-{kind}-{next(_count)}"
    yield n
    unlink_segment(n)


def make_limiter(which: str, store, name: str = "lim", slow: float = SLOW):
    """The limiters under test, each admitting exactly CAP (per key for "keyed") and never refilling."""
    if which == "token_bucket":
        return TokenBucket(slow, CAP, name=name, store=store)
    if which == "leaky_bucket":                  # capacity 1: exactly one admission
        return LeakyBucket(slow, queue_size=0, name=name, store=store)
    if which == "fixed":
        return FixedWindowLimiter(CAP, DAY, name=name, store=store)
    if which == "sliding":
        return SlidingWindowLimiter(CAP, DAY, name=name, store=store)
    if which == "keyed":
        return KeyedLimiter(slow, CAP, max_keys=64, name=name, store=store)
    raise AssertionError(which)


EXPECTED = {"token_bucket": CAP, "leaky_bucket": 1, "fixed": CAP, "sliding": CAP, "keyed": CAP}
KEYS = ["alpha", "beta", 7]


def decide(lim, which: str, i: int) -> object:
    """One try_acquire; returns what was admitted (the key for a keyed limiter) or None."""
    if which == "keyed":
        key = KEYS[i % len(KEYS)]
        return key if lim.try_acquire(key) else None
    return "ok" if lim.try_acquire() else None


# -- in one process --------------------------------------------------------------------------------------------

def test_a_store_needs_a_name_and_a_shared_store_needs_the_system_clock(seg: str, kind: str) -> None:
    st = SharedMemoryStore(seg, implementation=kind)
    try:
        for cls, args in [(TokenBucket, (1.0,)), (LeakyBucket, (1.0, 1)), (FixedWindowLimiter, (1, 1.0)),
                          (SlidingWindowLimiter, (1, 1.0)), (KeyedLimiter, (1.0,))]:
            with pytest.raises(ValueError, match=f"^{cls.__name__}: store='shm://{seg}' needs name="):
                cls(*args, store=st)
            with pytest.raises(ValueError, match=r"clock=FakeClock.* cannot be shared through store="):
                cls(*args, name="x", store=st, clock=FakeClock())
            cls(*args, name="m", store="memory://fake-clock-ok", clock=FakeClock())   # this process: fine
        with pytest.raises(ValueError, match="limit must be <= 1048575 for a window limiter in a shm:// store"):
            FixedWindowLimiter(1 << 20, 1.0, name="big", store=st)
    finally:
        st.close()


def test_objects_of_one_name_share_one_limit_and_settings_must_agree(seg: str, kind: str) -> None:
    st = SharedMemoryStore(seg, implementation=kind)
    try:
        for which in EXPECTED:
            a, b = make_limiter(which, st), make_limiter(which, st)
            got = [x for i in range(3 * CAP) for x in [decide(a if i % 2 else b, which, i)] if x is not None]
            assert len(got) == EXPECTED[which] * (len(KEYS) if which == "keyed" else 1), which
            assert a.metrics().admitted == b.metrics().admitted == len(got)     # counts live in the store
        with pytest.raises(ValueError, match="capacity=5 here but capacity=100 in the store"):
            TokenBucket(SLOW, 5, name="lim", store=st)
        with pytest.raises(ValueError, match="limit=5 here but limit=100 in the store"):
            FixedWindowLimiter(5, DAY, name="lim", store=st)
    finally:
        st.close()


def test_memory_store_shares_within_the_process_with_a_fake_clock() -> None:
    clock = FakeClock(5.0)
    url = f"memory://{RUN}-mem"
    a = TokenBucket(10.0, 2, clock=clock, name="m", store=url)
    b = TokenBucket(10.0, 2, clock=clock, name="m", store=url)
    assert a.try_acquire() and b.try_acquire() and not a.try_acquire()
    clock.advance(0.1)
    assert b.try_acquire() and not a.try_acquire()
    w1 = SlidingWindowLimiter(2, 1.0, clock=clock, name="w", store=url)
    w2 = SlidingWindowLimiter(2, 1.0, clock=clock, name="w", store=url)
    assert w1.try_acquire() and w2.try_acquire() and not w1.try_acquire()
    with pytest.raises(RateLimitExceeded) as info:
        w2.acquire(timeout=0)
    assert info.value.retry_after == w1.wait_time() > 0
    clock.advance(info.value.retry_after)
    assert w2.try_acquire()
    k1 = KeyedLimiter(1.0, 1, max_keys=10, clock=clock, name="k", store=url)
    k2 = KeyedLimiter(1.0, 1, max_keys=10, clock=clock, name="k", store=url)
    assert k1.key_hash("a") == k2.key_hash("a")    # one seed per table in the store
    assert k1.try_acquire("a") and not k2.try_acquire("a")
    m = MultiLimiter(a, w1)
    assert not m.try_acquire()                       # parts in a store work in a MultiLimiter


@pytest.mark.parametrize("cls, args", [(TokenBucket, (10.0, 2)), (LeakyBucket, (10.0, 1)),
                                        (FixedWindowLimiter, (2, 1.0)), (SlidingWindowLimiter, (2, 1.0))])
def test_waiting_for_a_unit_another_object_holds_honours_the_timeout_exactly(cls, args) -> None:
    """acquire() on a limiter whose units another object of the same store took waits on the store's
    words, not by polling: a timeout 1 ns short of the wait fails at once (nothing slept, retry_after the
    whole wait); a timeout equal to the wait sleeps exactly the wait on the clock and is admitted.
    (memory:// with a FakeClock; shm:// uses the host's monotonic clock, which a test cannot step.)"""
    clock = FakeClock(5.0)
    url = f"memory://{RUN}-wait-{next(_count)}"
    a = cls(*args, clock=clock, name="w", store=url)
    b = cls(*args, clock=clock, name="w", store=url)
    while a.try_acquire():
        pass
    wait_ns = round(b.wait_time(1) * 1e9)
    assert wait_ns > 0
    t0 = clock.monotonic_ns()
    with pytest.raises(RateLimitExceeded) as info:
        b.acquire(1, timeout=(wait_ns - 1) / 1e9)
    assert clock.monotonic_ns() == t0, "refused without sleeping"
    assert info.value.retry_after == wait_ns / 1e9
    b.acquire(1, timeout=wait_ns / 1e9)
    assert clock.monotonic_ns() - t0 == wait_ns, "slept exactly the wait"
    assert a.metrics() == b.metrics(), "one state in the store"


def test_a_keyed_table_in_a_store_is_seeded_per_store(seg: str, kind: str) -> None:
    st = SharedMemoryStore(seg, implementation=kind)
    try:
        a = KeyedLimiter(1.0, max_keys=10, name="t1", store=st)
        b = KeyedLimiter(1.0, max_keys=10, name="t1", store=st)
        c = KeyedLimiter(1.0, max_keys=10, name="t2", store=st)
        keys = ["a", b"a", 1, "user-42"]
        assert [a.key_hash(k) for k in keys] == [b.key_hash(k) for k in keys]
        assert [a.key_hash(k) for k in keys] != [c.key_hash(k) for k in keys]
    finally:
        st.close()


# -- across processes ----------------------------------------------------------------------------------------------

def _worker(seg: str, kind: str, which: str, name: str, tries: int, seed: int, barrier, conn) -> None:
    try:
        st = SharedMemoryStore(seg, implementation=kind)
        lim = make_limiter(which, st, name)
        rng = random.Random(seed)
        order = list(range(tries))
        rng.shuffle(order)
        barrier.wait(JOIN)
        got: dict = {}
        for i in order:
            x = decide(lim, which, i)
            if x is not None:
                got[x] = got.get(x, 0) + 1
        conn.send(got)
        st.close()
    except BaseException as exc:  # noqa: BLE001
        conn.send(exc)


@pytest.mark.parametrize("which", list(EXPECTED))
def test_four_processes_admit_exactly_the_capacity(seg: str, kind: str, which: str) -> None:
    tries = TRIES if kind == "cython" else 1_000
    seeds = (0, 1, 2) if kind == "cython" else (0,)
    for seed in seeds:
        name = f"{which}-{seed}"
        b = barrier()
        results = run_all(_worker, lambda i: (seg, kind, which, name, tries, seed * 10 + i, b))
        total: dict = {}
        for got in results:
            for k, v in got.items():
                total[k] = total.get(k, 0) + v
        if which == "keyed":
            assert total == {k: CAP for k in KEYS}, (seed, total)          # exactly the capacity per key
        else:
            assert total == {"ok": EXPECTED[which]}, (seed, total)
        st = SharedMemoryStore(seg, implementation=kind)
        lim = make_limiter(which, st, name)
        admitted = sum(total.values())
        assert lim.metrics().admitted == admitted                          # host-wide counts
        assert lim.metrics().rejected == NPROC * tries - admitted
        st.close()
    SharedMemoryStore(seg, implementation=kind).unlink()


def _hammer(seg: str, kind: str, which: str, ops: int, barrier, conn) -> None:
    try:
        st = SharedMemoryStore(seg, implementation=kind)
        lim = make_limiter(which, st, "hammered")
        conn.send(("ready", os.getpid()))
        barrier.wait(JOIN)
        got = 0
        for i in range(ops):
            if decide(lim, which, i) is not None:
                got += 1
            if i % 5000 == 4999:
                conn.send(("progress", i + 1))
        conn.send(("done", got))
        st.close()
    except BaseException as exc:  # noqa: BLE001
        conn.send(("error", repr(exc)))


@pytest.mark.parametrize("which", ["token_bucket", "sliding", "keyed"])
def test_sigkill_in_the_middle_of_100000_decisions_survivors_stay_exact(seg: str, kind: str, which: str) -> None:
    ops = 100_000 if kind == "cython" else 15_000
    b = barrier()
    finals = sigkill_mid_run(_hammer, lambda i: (seg, kind, which, ops, b), victim=1, kill_at=5000)
    survivors = sum(f[1] for f in finals if f is not None)
    # every word stayed valid: the limit, read afresh, holds exactly (nothing refills, nothing was lost)
    st = SharedMemoryStore(seg, implementation=kind)
    lim = make_limiter(which, st, "hammered")
    admitted, rejected = lim.metrics().admitted, lim.metrics().rejected
    total = EXPECTED[which] * (len(KEYS) if which == "keyed" else 1)
    assert admitted == total, (admitted, survivors)
    assert survivors <= total
    assert not any(decide(lim, which, i) for i in range(10))       # and it is still full
    assert lim.metrics().rejected == rejected + 10
    st.close()
    st.unlink()


# -- Redis: 4 processes through the facade -------------------------------------------------------------------------

def _redis_worker(url: str, which: str, tries: int, barrier, conn) -> None:
    try:
        from buttress.stores.redis import RedisStore
        store = RedisStore(url=url, timeout=5.0, on_error="closed")
        lim = make_limiter(which, store, f"r-{which}", 1e-4)   # capacity / rate <= 26 days in Redis
        barrier.wait(JOIN)
        got: dict = {}
        for i in range(tries):
            x = decide(lim, which, i)
            if x is not None:
                got[x] = got.get(x, 0) + 1
        conn.send((got, store.metrics().errors))
        store.close()
    except BaseException as exc:  # noqa: BLE001
        conn.send(exc)


@pytest.mark.parametrize("which", list(EXPECTED))
def test_four_processes_through_redis_admit_exactly_the_capacity(redis_url: str, which: str) -> None:  # noqa: F811
    url = redis_url
    b = barrier()
    results = run_all(_redis_worker, lambda i: (url, which, 300, b))
    total: dict = {}
    for got, errors in results:
        assert errors == 0
        for k, v in got.items():
            total[k] = total.get(k, 0) + v
    if which == "keyed":
        assert total == {k: CAP for k in KEYS}
    else:
        assert total == {"ok": EXPECTED[which]}


def test_redis_backed_limiters_answer_through_the_facade(redis_url: str) -> None:  # noqa: F811
    url = redis_url
    import asyncio
    from buttress.stores.redis import RedisStore
    st = RedisStore(url=url, timeout=5.0, on_error="closed")    # its own store breaker, not the URL's shared one
    assert store_from_url(st) is st
    tb = TokenBucket(0.1, 1, name="facade-tb", store=st)
    assert tb.try_acquire() and not tb.try_acquire()
    with pytest.raises(RateLimitExceeded) as info:
        tb.acquire(timeout=0.01)
    assert 5.0 < info.value.retry_after <= 10.0            # the time until admission, from the server
    fw = FixedWindowLimiter(1, DAY, name="facade-fw", store=st)

    @fw
    async def f():
        return 1

    assert asyncio.run(f()) == 1
    with pytest.raises(RateLimitExceeded):
        asyncio.run(f())
    kl = KeyedLimiter(1e-4, 1, name="facade-kl", store=st)
    assert asyncio.run(kl.call_async("a", asyncio.sleep, 0, "x")) == "x"
    with pytest.raises(RateLimitExceeded):
        kl.call("a", lambda: 1)
    assert st.metrics().errors == 0
    st.close()


@pytest.mark.parametrize("sliding", [False, True])
@pytest.mark.parametrize("width", [1, 7, 1000])
def test_a_packed_window_idle_just_under_2_23_windows_reads_as_empty(impl, sliding: bool, width: int) -> None:
    """The packed word keeps its window modulo 2**23. It used to take a word up to 1024 windows "ahead"
    modulo 2**23 for a stale reader's, so a counter idle 2**23 - j windows (j <= 1024: 8 ms of 1 ns
    windows, 2.3 hours of 1 ms ones) refused with its old counts for up to j windows. The latest window
    (w[7]) gives the word's full window number: it reads as empty, as the process-local limiter does."""
    W = impl.wlimit.WindowCounter
    for j in (1, 2, 1000, 1024, 1025, 1 << 22):
        c = W(2, width, sliding)
        assert c.try_acquire(2, 0) and not c.try_acquire(1, 0)
        t = ((1 << 23) - j) * width
        assert c.wait_ns(1, t) == 0, j
        assert c.try_acquire(2, t), j
        assert not c.try_acquire(1, t)
        assert not c.try_acquire(1, 0), "a stale reading decides in the latest window"
        assert c.counts() == (2, 3)


def test_a_packed_window_idle_exactly_2_23_windows_reads_as_empty_too(impl) -> None:
    """A word idle exactly k * 2**23 windows used to read as current (its old counts refused until the
    window changed); with the latest window it reads as empty. (Only a decision in flight -- latest
    raised, word not yet written -- can still show old counts as current: refusing more, never admitting
    more, until it lands.)"""
    for k in (1, 2, 1000):
        c = impl.wlimit.WindowCounter(2, 1, False)
        assert c.try_acquire(2, 0)
        assert c.wait_ns(1, k << 23) == 0
        assert c.try_acquire(2, k << 23) and not c.try_acquire(1, k << 23)


def test_the_window_core_names_limit_as_the_window_limiters_do(impl) -> None:
    """WindowCounter's n check names its own setting, `limit` (it named `capacity=`, so a window limiter
    in a word store had to check n again in Python before the core's CAS to say limit=)."""
    core = impl.wlimit.WindowCounter(10, 10**9, False)
    lim = FixedWindowLimiter(10, 1.0, name="n", store=f"memory://{RUN}-n-{next(_count)}")
    for bad in (11, 0, -1, 1 << 70, True, "1", 2.0):
        got = []
        for fn in (core.try_acquire, core.claim, core.wait_ns, lim.try_acquire):
            with pytest.raises((ValueError, TypeError)) as info:
                fn(bad)
            got.append((type(info.value), str(info.value)))
        assert len(set(got)) == 1, (bad, got)
    with pytest.raises(ValueError, match=r"^n must be between 1 and limit=10, got 11$"):
        core.try_acquire(11)


# ---- a call admitted before its store closes: the give-back is dropped, the call's own outcome passes ------

class _Awaitable:
    """What a sync function must not return to a sync form (the unit is given back, then TypeError)."""

    def __await__(self):
        yield from ()
        return 1


@pytest.mark.parametrize("which", ["token_bucket", "leaky_bucket", "fixed", "sliding", "keyed"])
def test_a_give_back_after_the_close_keeps_the_calls_own_error(seg: str, kind: str, which: str) -> None:
    """A sync form whose function closes the store (a shutdown hook on another thread) and returns an
    awaitable: the unit is given back after the close -- dropped, so the caller gets the TypeError about
    the awaitable, not the store's RuntimeError. A decision after the close raises the closed error."""
    st = SharedMemoryStore(seg, implementation=kind)
    lim = make_limiter(which, st)
    ran: list[int] = []

    def fn() -> object:
        ran.append(1)
        st.close()
        return _Awaitable()

    call = (lambda f: lim.call("alpha", f)) if which == "keyed" else lim.call
    with pytest.raises(TypeError, match="awaitable"):
        call(fn)
    assert ran == [1]
    with pytest.raises(RuntimeError, match="is closed in this process"):
        call(lambda: ran.append(2))
    assert ran == [1]


@pytest.mark.parametrize("which", ["token_bucket", "leaky_bucket"])
def test_a_cancelled_wait_after_the_close_is_cancelled_not_a_store_error(seg: str, kind: str, which: str) -> None:
    """acquire_async reserved a future slot and sleeps; the store closes, the task is cancelled: the refund
    of its reservation is dropped and the task ends cancelled (never RuntimeError)."""
    import asyncio

    st = SharedMemoryStore(seg, implementation=kind)
    lim = (TokenBucket(SLOW, 1, name="w", store=st) if which == "token_bucket"
           else LeakyBucket(SLOW, queue_size=4, name="w", store=st))
    assert lim.try_acquire()                   # the next unit is ~1/SLOW s away: the wait below sleeps

    async def main() -> str:
        task = asyncio.ensure_future(lim.acquire_async())
        for _ in range(3):
            await asyncio.sleep(0)
        assert not task.done()
        st.close()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        except BaseException as exc:  # noqa: BLE001 - the defect under test
            return f"{type(exc).__name__}: {exc}"
        return "admitted"

    assert asyncio.run(main()) == "cancelled"
    with pytest.raises(RuntimeError, match="is closed in this process"):
        lim.try_acquire()
