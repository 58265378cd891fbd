"""Rate limiters: GCRA conformance on FakeClock, exact admission under races, waits, windows, bad input."""
import asyncio
import math
import threading
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

import buttress
from buttress import (FakeClock, FixedWindowLimiter, LeakyBucket, MultiLimiter, RateLimitExceeded,
                      SlidingWindowLimiter, TokenBucket)
from buttress._context import pop_deadline, push_deadline
from helpers import race

S = 1_000_000_000


# ---------- the GCRA core counts its decisions (both implementations) ----------

def test_gcra_core_counts_decisions(impl):
    b = impl.gcra.GCRA(rate=10.0, capacity=2)
    assert [b.try_acquire(1, 0) for _ in range(3)] == [True, True, False]
    assert b.reserve(1, 0, S // 10) == S // 10       # claims, waits 100 ms
    assert b.reserve(1, 0, 0) == -1
    assert b.counts() == (3, 2)
    b.reset()
    assert b.counts() == (0, 0) and b.available(0) == 2


# ---------- TokenBucket: conformance on FakeClock ----------

def _bound(d_ns, rate, capacity):
    return capacity + math.floor(Fraction(d_ns) * Fraction(rate) / S)


@settings(max_examples=150, deadline=None)
@given(rate=st.sampled_from([0.5, 1.0, 3.0, 7.0, 10.0, 250.0, 1e6]),
       capacity=st.integers(1, 12),
       steps=st.lists(st.tuples(st.integers(0, 400_000_000), st.integers(1, 12)), min_size=1, max_size=120))
def test_token_bucket_never_exceeds_capacity_plus_rate_times_d(rate, capacity, steps):
    clock = FakeClock()
    tb = TokenBucket(rate, capacity, clock=clock)
    admitted = []                                    # (time ns, tokens)
    for dt, n in steps:
        clock.advance_ns(dt)
        n = min(n, capacity)
        if tb.try_acquire(n):
            admitted.append((clock.monotonic_ns(), n))
    for i in range(len(admitted)):                   # every interval [t_i, t_j]
        total = 0
        for j in range(i, len(admitted)):
            total += admitted[j][1]
            assert total <= _bound(admitted[j][0] - admitted[i][0], rate, capacity)


@settings(max_examples=150, deadline=None)
@given(rate=st.sampled_from([0.3, 1.0, 3.0, 7.0, 1000.0]), capacity=st.integers(1, 6),
       n=st.integers(1, 6), start=st.integers(0, 10**12), burst=st.integers(0, 8))
def test_retry_after_is_exact(rate, capacity, n, start, burst):
    n = min(n, capacity)
    clock = FakeClock()
    clock.advance_ns(start)
    tb = TokenBucket(rate, capacity, clock=clock)
    for _ in range(burst):
        tb.try_acquire(1)
    if tb.try_acquire(n):
        return
    with pytest.raises(RateLimitExceeded) as info:
        tb.call(lambda: None) if n == 1 else tb.acquire(n, timeout=0)
    ra = info.value.retry_after
    wait = math.ceil(ra * S)
    assert wait == math.ceil(tb.wait_time(n) * S)
    assert ra > 0
    clock.advance_ns(wait - 1)
    assert not tb.try_acquire(n)                     # one ns early is too early
    clock.advance_ns(1)
    assert tb.try_acquire(n)                         # at now + retry_after it succeeds


def test_instant_burst_is_capacity_and_defaults():
    clock = FakeClock(5.0)
    tb = TokenBucket(2.5, clock=clock)               # capacity defaults to ceil(rate)
    assert tb.capacity == 3
    assert [tb.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert TokenBucket(0.1).capacity == 1
    assert tb.available == 0
    assert tb.wait_time() == pytest.approx(0.4)
    assert tb.metrics() == buttress.rate_limit.RateLimitMetrics(admitted=3, rejected=1)
    tb.reset()
    assert tb.available == 3 and tb.metrics().admitted == 0


def test_try_acquire_is_the_core_method():
    tb = TokenBucket(10.0)
    assert tb.try_acquire.__self__ is tb._core       # no Python frame on the hot path


def test_reserve_claims_and_returns_the_wait():
    clock = FakeClock()
    tb = TokenBucket(10.0, 2, clock=clock)
    assert tb.reserve(2) == 0.0
    assert tb.reserve(1) == pytest.approx(0.1)
    assert tb.reserve(1) == pytest.approx(0.2)
    assert tb.wait_time() == pytest.approx(0.3)      # claims nothing
    assert tb.wait_time() == pytest.approx(0.3)
    assert not hasattr(tb, "refund")                 # a receipt-less refund could free a later caller's slot


def test_acquire_waits_within_timeout_and_fails_at_once_beyond():
    clock = FakeClock()
    tb = TokenBucket(10.0, 1, clock=clock)
    tb.acquire()
    with pytest.raises(RateLimitExceeded) as info:
        tb.acquire(timeout=0.05)
    assert clock.monotonic() == 0.0                  # failed without sleeping
    assert info.value.retry_after == 0.1             # the time until admission, not wait - timeout (0.05)
    assert info.value.retry_after == tb.wait_time()
    assert tb.metrics().rejected == 1
    tb.acquire(timeout=0.1)                          # wait == timeout is allowed
    assert clock.monotonic_ns() == S // 10
    tb.acquire()                                     # None waits as long as needed
    assert clock.monotonic_ns() == 2 * S // 10


def test_acquire_never_waits_past_the_context_deadline():
    clock = FakeClock()
    tb = TokenBucket(10.0, 1, clock=clock)
    tb.acquire()
    token = push_deadline(clock.monotonic_ns() + S // 20, clock)   # 50 ms left
    try:
        with pytest.raises(RateLimitExceeded):
            tb.acquire()
        with pytest.raises(RateLimitExceeded):
            asyncio.run(tb.acquire_async(timeout=10.0))
        assert clock.monotonic() == 0.0
    finally:
        pop_deadline(token)
    tb.acquire(timeout=10.0)
    assert clock.monotonic_ns() == S // 10


def test_acquire_rejects_more_than_capacity():
    tb = TokenBucket(10.0, 3)
    for call in (tb.try_acquire, tb.acquire, tb.wait_time, tb.reserve):
        with pytest.raises(ValueError, match="n must be between 1 and capacity=3, got 4"):
            call(4)
    with pytest.raises(ValueError, match="n must be"):
        asyncio.run(tb.acquire_async(0))
    with pytest.raises(ValueError, match="timeout"):
        tb.acquire(1, timeout=-1.0)


def test_acquire_async_waits_and_cancel_refunds():
    clock = FakeClock()
    tb = TokenBucket(10.0, 1, clock=clock)

    async def main():
        await tb.acquire_async()
        await tb.acquire_async()                     # sleeps 100 ms on the fake clock
        assert clock.monotonic_ns() == S // 10
        with pytest.raises(RateLimitExceeded):
            await tb.acquire_async(timeout=0.01)
        task = asyncio.ensure_future(tb.acquire_async())
        await asyncio.sleep(0)
        assert tb.wait_time() == pytest.approx(0.2)  # claimed by the waiting task
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert tb.wait_time() == pytest.approx(0.1)  # cancelled: its token came back

    asyncio.run(main())


def test_decorator_and_call():
    clock = FakeClock()
    tb = TokenBucket(1.0, 2, clock=clock, name="api")

    @tb
    def f(x):
        return x * 2

    @tb
    async def g(x):
        return x * 3

    assert f(2) == 4 and asyncio.run(g(2)) == 6
    with pytest.raises(RateLimitExceeded, match="'api'") as info:
        f(1)
    assert info.value.retry_after == pytest.approx(1.0)
    with pytest.raises(RateLimitExceeded):
        asyncio.run(g(1))
    clock.advance(1.0)
    assert tb.call(lambda a, b=0: a + b, 1, b=2) == 3
    clock.advance(1.0)
    assert asyncio.run(tb.call_async(g.__wrapped__, 1)) == 3
    assert f.__name__ == "f"


# ---------- exact admission under races ----------

@pytest.mark.parametrize("seed", range(5))
def test_token_bucket_exact_under_racing_threads(fast_switching, seed):
    clock = FakeClock(seed)                          # frozen time: no refill during the race
    tb = TokenBucket(1.0, 100, clock=clock)
    assert sum(race(8, lambda i: sum(tb.try_acquire() for _ in range(2000)))) == 100
    assert tb.metrics() == buttress.rate_limit.RateLimitMetrics(100, 8 * 2000 - 100)


@pytest.mark.parametrize("make", [
    lambda c: FixedWindowLimiter(100, 10.0, clock=c),
    lambda c: SlidingWindowLimiter(100, 10.0, clock=c),
    lambda c: MultiLimiter(TokenBucket(1.0, 150, clock=c), FixedWindowLimiter(100, 10.0, clock=c)),
    lambda c: MultiLimiter(FixedWindowLimiter(100, 10.0, clock=c), TokenBucket(1.0, 150, clock=c)),
])
def test_window_and_multi_exact_under_racing_threads(fast_switching, make):
    lim = make(FakeClock(3.0))
    assert sum(race(8, lambda i: sum(lim.try_acquire() for _ in range(500)))) == 100


def test_exact_under_1000_async_tasks():
    clock = FakeClock()
    tb = TokenBucket(10.0, 10, clock=clock)

    async def one():
        try:
            await tb.acquire_async(timeout=1.0)
            return clock.monotonic_ns()
        except RateLimitExceeded:
            return None

    async def main():
        return await asyncio.gather(*(one() for _ in range(1000)))

    times = [t for t in asyncio.run(main()) if t is not None]
    # 10 at once, then one per 100 ms up to the 1 s timeout
    assert sorted(times) == [0] * 10 + [k * S // 10 for k in range(1, 11)]

    tb2 = TokenBucket(1.0, 37, clock=FakeClock())

    async def many():
        async def call():
            try:
                return await tb2.call_async(asyncio.sleep, 0, True)
            except RateLimitExceeded:
                return False
        return await asyncio.gather(*(call() for _ in range(1000)))

    assert sum(asyncio.run(many())) == 37


# ---------- LeakyBucket ----------

def test_leaky_bucket_spaces_callers_and_bounds_the_queue():
    clock = FakeClock()
    lb = LeakyBucket(10.0, queue_size=3, clock=clock)

    async def one():
        try:
            await lb.acquire_async()
            return clock.monotonic_ns()
        except RateLimitExceeded:
            return None

    async def main():
        return await asyncio.gather(*(one() for _ in range(10)))

    times = asyncio.run(main())
    assert times[:4] == [0, S // 10, 2 * S // 10, 3 * S // 10]   # evenly spaced, one immediate + 3 queued
    assert times[4:] == [None] * 6
    assert lb.metrics() == buttress.rate_limit.RateLimitMetrics(4, 6)


def test_leaky_bucket_sync_waits_for_its_slot_and_counts_waiters():
    clock = FakeClock()
    lb = LeakyBucket(4.0, queue_size=2, clock=clock)
    lb.acquire()
    assert clock.monotonic_ns() == 0
    assert lb.waiting == 0
    lb.acquire()                                     # sleeps to its slot
    assert clock.monotonic_ns() == S // 4
    assert lb.try_acquire() is False
    # two callers holding future slots fill a queue of 2
    assert lb._core.reserve(1) > 0 and lb._core.reserve(1) > 0
    assert lb.waiting == 2
    with pytest.raises(RateLimitExceeded) as info:
        lb.acquire()
    assert info.value.retry_after == 0.75            # until its slot (not 0.75 - the queue's 0.5)
    assert info.value.retry_after == lb.wait_time()
    clock.advance(0.25)                              # one waiter left: room in the queue again
    assert lb.call(lambda: 5) == 5
    assert clock.monotonic_ns() == S                 # its slot: 1.0 s
    with pytest.raises(ValueError, match=r"n must be 1: a LeakyBucket .*queue_size=2 .*got 2"):
        lb.acquire(2)


def test_leaky_bucket_queue_size_zero_never_waits():
    clock = FakeClock()
    lb = LeakyBucket(10.0, queue_size=0, clock=clock)
    lb.acquire()
    with pytest.raises(RateLimitExceeded):
        lb.acquire()
    clock.advance(0.1)
    lb.acquire()
    assert clock.monotonic_ns() == S // 10


# ---------- fixed and sliding windows ----------

def test_fixed_window_is_aligned_and_resets():
    clock = FakeClock(10.5)
    fw = FixedWindowLimiter(3, 1.0, clock=clock)
    assert [fw.try_acquire() for _ in range(4)] == [True] * 3 + [False]
    assert fw.wait_time() == pytest.approx(0.5)       # next aligned window starts at 11.0
    clock.advance(0.5)
    assert fw.try_acquire(3) and not fw.try_acquire()
    assert fw.metrics() == buttress.rate_limit.RateLimitMetrics(4, 2)


def _weighted_ok(prev, curr, n, limit, w, e):
    return prev * (w - e) + (curr + n) * w <= limit * w


@settings(max_examples=150, deadline=None)
@given(limit=st.integers(1, 8), window=st.sampled_from([1.0, 0.25, 3.0]),
       steps=st.lists(st.tuples(st.integers(0, 900_000_000), st.integers(1, 8)), min_size=1, max_size=60))
def test_sliding_window_matches_the_weighted_count(limit, window, steps):
    clock = FakeClock()
    sw = SlidingWindowLimiter(limit, window, clock=clock)
    w = round(window * S)
    counts = {}
    for dt, n in steps:
        clock.advance_ns(dt)
        n = min(n, limit)
        idx, e = divmod(clock.monotonic_ns(), w)
        expect = _weighted_ok(counts.get(idx - 1, 0), counts.get(idx, 0), n, limit, w, e)
        wait = sw.wait_time(n)
        assert (wait == 0.0) == expect
        assert sw.try_acquire(n) == expect
        if not expect:                               # retry_after exact: 1 ns early fails, on time works
            ns = math.ceil(wait * S)
            clock.advance_ns(ns - 1)
            assert not sw.try_acquire(n)
            clock.advance_ns(1)
            assert sw.try_acquire(n)
            idx = clock.monotonic_ns() // w
        counts[idx] = counts.get(idx, 0) + n


def test_sliding_window_weights_the_previous_window():
    clock = FakeClock()
    sw = SlidingWindowLimiter(10, 1.0, clock=clock)
    assert sw.try_acquire(10)
    clock.advance(1.5)                               # half of the previous window still counts: 5
    assert sw.try_acquire(5) and not sw.try_acquire(1)
    assert sw.wait_time() == pytest.approx(0.1)      # prev weight 10*(1-e) + 5 + 1 <= 10 at e = 0.6


# ---------- MultiLimiter ----------

def test_multi_limiter_is_all_or_nothing():
    clock = FakeClock()
    per_second = TokenBucket(5.0, 5, clock=clock)
    per_hour = FixedWindowLimiter(7, 3600.0, clock=clock)
    multi = MultiLimiter(per_second, per_hour)
    assert sum(multi.try_acquire() for _ in range(10)) == 5
    assert per_second.available == 0
    clock.advance(1.0)
    assert per_second.available == 5
    assert [multi.try_acquire() for _ in range(3)] == [True, True, False]   # the hour limit refuses
    assert per_second.available == 3                 # the refused call took nothing from per_second
    assert multi.wait_time() == pytest.approx(3599.0)
    with pytest.raises(RateLimitExceeded) as info:
        multi.call(lambda: None)
    assert info.value.retry_after == pytest.approx(3599.0)
    assert multi.metrics() == buttress.rate_limit.RateLimitMetrics(7, 7)


def test_multi_limiter_acquire_sleeps_until_all_admit():
    clock = FakeClock()
    multi = MultiLimiter(TokenBucket(1.0, 1, clock=clock), SlidingWindowLimiter(2, 10.0, clock=clock))
    multi.acquire()
    multi.acquire()
    assert clock.monotonic() == pytest.approx(1.0)
    with pytest.raises(RateLimitExceeded):
        multi.acquire(timeout=1.0)
    asyncio.run(multi.acquire_async())
    assert multi.metrics().admitted == 3


# ---------- bad arguments ----------

@pytest.mark.parametrize("make, exc, words", [
    (lambda: TokenBucket(0), ValueError, ["rate", "0"]),
    (lambda: TokenBucket("5"), TypeError, ["rate", "'5'"]),
    (lambda: TokenBucket(1.0, 0), ValueError, ["capacity", ">= 1", "0"]),
    (lambda: TokenBucket(1.0, 1.5), TypeError, ["capacity", "int", "1.5"]),
    (lambda: TokenBucket(1.0, clock=object()), TypeError, ["clock", "monotonic"]),
    (lambda: TokenBucket(1.0, name=3), TypeError, ["name", "3"]),
    (lambda: LeakyBucket(1.0, -1), ValueError, ["queue_size", "-1"]),
    (lambda: LeakyBucket(1.0, None), TypeError, ["queue_size", "None"]),
    (lambda: LeakyBucket(-2.0, 1), ValueError, ["rate", "-2.0"]),
    (lambda: FixedWindowLimiter(0, 1.0), ValueError, ["limit", "0"]),
    (lambda: FixedWindowLimiter(5, 0), ValueError, ["window", "0"]),
    (lambda: SlidingWindowLimiter(5, "1s"), TypeError, ["window", "'1s'"]),
    (lambda: SlidingWindowLimiter(2.5, 1.0), TypeError, ["limit", "2.5"]),
    (lambda: MultiLimiter(), ValueError, ["at least one"]),
    (lambda: MultiLimiter(LeakyBucket(1.0, 1)), TypeError, ["limiters", "LeakyBucket"]),
])
def test_bad_arguments(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    for w in words:
        assert w in str(info.value)


def test_threads_blocking_acquire_are_spaced():
    clock = FakeClock()
    tb = TokenBucket(100.0, 1, clock=clock)
    lock = threading.Lock()
    waits = []

    def body(i):
        w = tb.reserve()
        with lock:
            waits.append(w)

    race(8, body)
    assert sorted(round(w * 100) for w in waits) == list(range(8))


# ---------- n that can never be admitted: the message names what the user configured ----------

_NAMES = iter(range(1 << 30))


def _stored(store, kind):
    """store= and a name no other test uses (a memory:// store is shared by the whole process)."""
    return {"store": store, "name": f"n-check-{kind}-{next(_NAMES)}"} if store else {}


def _n_cases():
    """(id, limiter factory, n too big, the words the ValueError must say) for every limiter kind, process-
    local and in a word store (memory://: the compiled or twin core deciding on store words)."""
    def lb(store=None):
        return LeakyBucket(10.0, queue_size=50, clock=FakeClock(), **_stored(store, "lb"))

    def fw(store=None):
        return FixedWindowLimiter(10, 1.0, clock=FakeClock(), **_stored(store, "fw"))

    def sw(store=None):
        return SlidingWindowLimiter(10, 1.0, clock=FakeClock(), **_stored(store, "sw"))

    def ml(store=None):
        c = FakeClock()
        return MultiLimiter(TokenBucket(10.0, 5, clock=c), FixedWindowLimiter(3, 1.0, clock=c))

    def tb(store=None):
        return TokenBucket(10.0, 5, clock=FakeClock(), **_stored(store, "tb"))

    lb_words = r"n must be 1: a LeakyBucket admits one call per slot.*queue_size=50.*, got 2$"
    window_words = r"n must be between 1 and limit=10, got 11$"
    ml_words = (r"n must be between 1 and 3 \(the most every one of its limiters can ever admit at once: "
                r"TokenBucket\(capacity=5\), FixedWindowLimiter\(limit=3\)\), got 4$")
    cases = []
    for store in (None, "memory://"):
        where = "local" if store is None else "memory-store"
        cases += [(f"LeakyBucket-{where}", lambda s=store: lb(s), 2, lb_words),
                  (f"FixedWindow-{where}", lambda s=store: fw(s), 11, window_words),
                  (f"SlidingWindow-{where}", lambda s=store: sw(s), 11, window_words),
                  (f"TokenBucket-{where}", lambda s=store: tb(s), 6, r"n must be between 1 and capacity=5, got 6$")]
    cases.append(("MultiLimiter", ml, 4, ml_words))
    return cases


N_CASES = _n_cases()
N_METHODS = ["try_acquire", "wait_time", "acquire", "acquire_async", "acquire_timeout_0", "acquire_async_timeout_0"]


def _ask(lim, method, n):
    if method == "try_acquire":
        return lim.try_acquire(n)
    if method == "wait_time":
        return lim.wait_time(n)
    if method == "acquire":
        return lim.acquire(n)
    if method == "acquire_timeout_0":
        return lim.acquire(n, timeout=0)
    if method == "acquire_async":
        return asyncio.run(lim.acquire_async(n))
    return asyncio.run(lim.acquire_async(n, timeout=0))


@pytest.mark.parametrize("method", N_METHODS)
@pytest.mark.parametrize("case", N_CASES, ids=[c[0] for c in N_CASES])
def test_an_n_that_can_never_be_admitted_names_the_configured_bound(case, method):
    _, make, n, words = case
    lim = make()
    with pytest.raises(ValueError, match=words):
        _ask(lim, method, n)
    assert lim.metrics().rejected == 0 and lim.metrics().admitted == 0     # nothing was decided or claimed
    assert lim.try_acquire()                                               # and the limiter still admits


@pytest.mark.parametrize("case", N_CASES, ids=[c[0] for c in N_CASES])
def test_n_bad_types_and_zero_name_n(case):
    _, make, _, _ = case
    lim = make()
    for bad, exc in ((True, TypeError), (1.0, TypeError), ("1", TypeError), (0, ValueError), (-1, ValueError)):
        with pytest.raises(exc, match=r"^n must be"):
            lim.try_acquire(bad)


def test_keyed_limiter_n_names_its_capacity():
    kl = buttress.KeyedLimiter(10.0, 5, max_keys=8, clock=FakeClock())
    for ask in (lambda: kl.try_acquire("k", 6), lambda: kl.wait_time("k", 6)):
        with pytest.raises(ValueError, match=r"n must be between 1 and capacity=5, got 6$"):
            ask()


def test_a_multilimiter_inside_a_multilimiter_names_the_inner_bounds():
    c = FakeClock()
    inner = MultiLimiter(TokenBucket(10.0, 4, clock=c), SlidingWindowLimiter(7, 1.0, clock=c))
    outer = MultiLimiter(inner, FixedWindowLimiter(9, 1.0, clock=c))
    with pytest.raises(ValueError, match=r"between 1 and 4 .*MultiLimiter\(TokenBucket\(capacity=4\), "
                                         r"SlidingWindowLimiter\(limit=7\)\), FixedWindowLimiter\(limit=9\)\), got 5$"):
        outer.try_acquire(5)
    assert outer.try_acquire(4)


# ---------- @limiter on an async def function: the compiled guard ----------

@pytest.mark.parametrize("make", [
    lambda c: TokenBucket(1e-3, 2, clock=c),
    lambda c: FixedWindowLimiter(2, 1000.0, clock=c),
    lambda c: SlidingWindowLimiter(2, 1000.0, clock=c),
    lambda c: MultiLimiter(TokenBucket(1e-3, 5, clock=c), FixedWindowLimiter(2, 1000.0, clock=c)),
    lambda c: FixedWindowLimiter(2, 1000.0, clock=c, store="memory://", name="guarded-window"),
], ids=["TokenBucket", "FixedWindow", "SlidingWindow", "MultiLimiter", "FixedWindow-memory-store"])
def test_decorated_async_def_takes_one_unit_per_call_and_refuses_when_awaited(make):
    import inspect
    import traceback
    clock = FakeClock()
    lim = make(clock)

    class Boom(Exception):
        pass

    @lim
    async def fn(x, fail=False):
        if fail:
            raise Boom(x)
        return x * 2

    assert inspect.iscoroutinefunction(fn) and fn.__name__ == "fn"

    async def main():
        assert await fn(1) == 2
        with pytest.raises(Boom) as info:        # the second unit: the user's exception passes through
            await fn(2, fail=True)
        frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
        assert frames[-1] == "fn"
        refused = fn(3)                          # refused: nothing raised until awaited
        with pytest.raises(RateLimitExceeded) as info:
            await refused
        assert info.value.retry_after == lim.wait_time()
    asyncio.run(main())
    m = lim.metrics()
    assert (m.admitted, m.rejected) == (2, 1)


def test_decorated_async_method_binds_and_each_instance_shares_the_limiter():
    tb = TokenBucket(1e-3, 2, clock=FakeClock())

    class Client:
        def __init__(self, name):
            self.name = name

        @tb
        async def get(self, path):
            return f"{self.name}{path}"

    a, b = Client("a"), Client("b")
    assert asyncio.run(a.get("/x")) == "a/x" and asyncio.run(b.get("/y")) == "b/y"
    with pytest.raises(RateLimitExceeded):
        asyncio.run(a.get("/z"))


def test_a_refusal_reads_as_one_built_by_the_constructor():
    """Refusals are built lazily (the hot path under overload): message, args, retry_after, pickling."""
    import pickle
    clock = FakeClock()
    tb = TokenBucket(0.5, 1, clock=clock, name="api")
    kl = buttress.KeyedLimiter(0.5, 1, max_keys=8, clock=clock)
    assert tb.try_acquire() and kl.try_acquire("a")
    for fail, text in ((lambda: tb.call(lambda: 1), "rate limit 'api' exceeded; retry after 2s"),
                       (lambda: kl.call("a", lambda: 1), "rate limit exceeded for key 'a'; retry after 2s")):
        with pytest.raises(RateLimitExceeded) as info:
            fail()
        exc = info.value
        assert str(exc) == text and exc.args == (text,) and exc.retry_after == 2.0
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is RateLimitExceeded and back.args == (text,) and back.retry_after == 2.0
