"""Issue 12, admission exactness of the rate limiters: refunds that never let two waiters through where
one fits, stale clock readings that never admit more, what cannot be represented is refused. Real
threads with clocks the test controls; exact counts, no timed assertions."""
import asyncio
import math
import random
import threading

import numpy as np
import pytest

from buttress import (FakeClock, FixedWindowLimiter, KeyedLimiter, LeakyBucket, MultiLimiter,
                      RateLimitExceeded, SlidingWindowLimiter, TokenBucket)
from helpers import race

S = 1_000_000_000


class StallingClock:
    """A clock= object: `ns` is the reading; `stall_next(value)` makes the next reading taken by another
    thread return `value` and then hold that thread (as if pre-empted right after reading the clock)
    until `go()`. Any int ns, negative included."""

    def __init__(self, ns=0):
        self.ns = ns
        self._stall = None
        self.reached = threading.Event()
        self._go = threading.Event()

    def stall_next(self, value):
        self._stall = value
        self.reached.clear()
        self._go.clear()

    def go(self):
        self._go.set()

    def monotonic_ns(self):
        if self._stall is not None and threading.current_thread() is not threading.main_thread():
            value, self._stall = self._stall, None
            self.reached.set()
            self._go.wait(10)
            return value
        return self.ns

    def monotonic(self):
        return self.monotonic_ns() / S

    def sleep(self, seconds):
        self.ns += math.ceil(seconds * S)

    async def sleep_async(self, seconds):
        self.sleep(seconds)


def _stale_race(clock, stale, fresh, decide):
    """Thread A reads `stale` and is held; then thread B decides at `fresh`; then A decides.
    Returns (A's answer, B's answer)."""
    out = {}
    clock.stall_next(stale)
    a = threading.Thread(target=lambda: out.__setitem__("a", decide()))
    a.start()
    assert clock.reached.wait(10)
    clock.ns = fresh
    b = threading.Thread(target=lambda: out.__setitem__("b", decide()))
    b.start()
    b.join(0.3)          # a limiter that decides inside its lock keeps B waiting here: that is fine
    clock.go()
    a.join(10)
    b.join(10)
    assert not a.is_alive() and not b.is_alive()
    return out["a"], out["b"]


# ---------- stale clock readings never admit more ----------

def test_sliding_window_stale_reader_is_not_admitted_beside_a_later_one():
    # issue 12: A read 5.95 s and was pre-empted; B admitted at 6.10 s; A was admitted too: 2 where 1 fits
    clock = StallingClock(5 * S)
    sw = SlidingWindowLimiter(3, 1.0, clock=clock)
    assert sw.try_acquire()
    clock.ns = 5 * S + S // 10
    assert sw.try_acquire()                          # window 5 holds 2
    a, b = _stale_race(clock, 5 * S + 95 * S // 100, 6 * S + S // 10, sw.try_acquire)
    assert a + b == 1                                # either A at 5.95 (then B weighs 3) or B, never both
    assert sw.metrics().admitted == 3


def test_window_rollback_of_a_stale_reader_undoes_the_window_it_counted_in():
    clock = StallingClock(5 * S)
    sw = SlidingWindowLimiter(2, 1.0, clock=clock)
    tb = TokenBucket(0.5, 1, clock=clock)
    multi = MultiLimiter(sw, tb)
    assert tb.try_acquire()                          # the bucket refuses until 7.0 s: multi rolls sw back
    a, b = _stale_race(clock, 5 * S + 95 * S // 100, 6 * S + S // 10, multi.try_acquire)
    assert (a, b) == (False, False)
    # both claims were undone in the windows they were counted in: nothing left at 6.10 s
    assert sw.try_acquire(2) and not sw.try_acquire()


@pytest.mark.parametrize("make", [
    lambda c: TokenBucket(1.0, 1, clock=c),
    lambda c: LeakyBucket(1.0, 0, clock=c),
    lambda c: MultiLimiter(TokenBucket(1.0, 1, clock=c), SlidingWindowLimiter(5, 1.0, clock=c)),
])
def test_gcra_limiters_stale_reader_never_admits_more(make):
    clock = StallingClock(5 * S)
    lim = make(clock)
    assert lim.try_acquire()                         # next token at 6.0 s
    a, b = _stale_race(clock, 5 * S + 95 * S // 100, 6 * S + S // 10, lim.try_acquire)
    assert (a, b) == (False, True)                   # a stale 5.95 s never takes the 6.0 s token twice


def test_keyed_limiter_stale_reader_never_admits_more():
    clock = StallingClock(5 * S)
    kl = KeyedLimiter(1.0, 1, max_keys=16, clock=clock)
    assert kl.try_acquire("k")
    a, b = _stale_race(clock, 5 * S + 95 * S // 100, 6 * S + S // 10, lambda: kl.try_acquire("k"))
    assert (a, b) == (False, True)
    # a brand-new key whose first reader is stale: still one bucket, capacity 1
    a, b = _stale_race(clock, 6 * S, 6 * S + S // 10, lambda: kl.try_acquire("new"))
    assert a + b == 1


def test_window_time_never_runs_backwards_inside_the_limiter():
    clock = StallingClock(10 * S)
    sw = SlidingWindowLimiter(2, 1.0, clock=clock)
    assert sw.try_acquire(2)
    clock.ns = 9 * S + S // 2                        # a clock that jumps back is read as "still 10.0 s"
    assert not sw.try_acquire()
    assert sw.wait_time() == pytest.approx(1.5)      # from 10.0 s: half of the next window must pass


@pytest.mark.parametrize("cls", [FixedWindowLimiter, SlidingWindowLimiter])
@pytest.mark.parametrize("start", [-5 * S, -(2**63), 1_700_000_000 * S, 2**63 - 1 - 3 * S])
def test_windows_on_any_int64_clock(cls, start):
    # a clock below zero: the first window number was compared with 0 and never rolled forward
    clock = StallingClock(start)
    w = cls(3, 1.0, clock=clock)
    assert [w.try_acquire() for _ in range(5)] == [True] * 3 + [False] * 2
    clock.ns += 2 * S
    assert w.try_acquire(3) and not w.try_acquire()


# ---------- refunds: a cancelled reservation gives back only what nobody built on ----------

def _waiters_scenario(make, cancel):
    clock = FakeClock(autojump=False)
    lim = make(clock)
    released = {}

    async def waiter(name):
        await lim.acquire_async()
        released[name] = clock.monotonic_ns()

    async def settle():
        for _ in range(20):
            await asyncio.sleep(0)

    async def main():
        assert lim.try_acquire()                     # t = 0: the token
        tasks = {name: asyncio.ensure_future(waiter(name)) for name in "AB"}
        await settle()                               # A holds slot 1.0 s, B slot 2.0 s
        clock.advance(0.5)
        for name in cancel:
            tasks[name].cancel()
        await settle()
        tasks["C"] = asyncio.ensure_future(waiter("C"))
        await settle()
        for _ in range(10):
            clock.advance(0.5)
            await settle()
        await asyncio.gather(*tasks.values(), return_exceptions=True)

    asyncio.run(main())
    return released


@pytest.mark.parametrize("make", [lambda c: TokenBucket(1.0, 1, clock=c), lambda c: LeakyBucket(1.0, 5, clock=c)])
def test_cancelling_a_waiter_with_a_later_waiter_gives_nothing_back(make):
    # issue 12: cancel A (slot 1.0) after B took slot 2.0; C then got 2.0 as well: two where one fits
    assert _waiters_scenario(make, "A") == {"B": 2 * S, "C": 3 * S}


@pytest.mark.parametrize("make", [lambda c: TokenBucket(1.0, 1, clock=c), lambda c: LeakyBucket(1.0, 5, clock=c)])
def test_cancelling_the_last_waiter_gives_its_slot_back(make):
    assert _waiters_scenario(make, "B") == {"A": 1 * S, "C": 2 * S}
    assert _waiters_scenario(make, "BA") == {"C": 1 * S}   # last first, then the new last: both back


class InterruptingClock(FakeClock):
    """sleep() raises, as a KeyboardInterrupt arriving during a blocking acquire would."""

    def sleep(self, seconds):
        raise KeyboardInterrupt


@pytest.mark.parametrize("make", [lambda c: TokenBucket(1.0, 1, clock=c), lambda c: LeakyBucket(1.0, 5, clock=c)])
def test_interrupted_blocking_acquire_refunds_only_the_last_claim(make):
    clock = InterruptingClock()
    lim = make(clock)
    assert lim.try_acquire()
    with pytest.raises(KeyboardInterrupt):
        lim.acquire()                                # the last claim: given back
    assert lim.wait_time() == pytest.approx(1.0)
    core = lim._core
    _, later = core.claim(1)                         # someone queues at 1.0 s ...
    with pytest.raises(KeyboardInterrupt):
        lim.acquire()                                # ... so this claim (2.0 s) is last: back again
    assert lim.wait_time() == pytest.approx(2.0)
    assert core.refund(later) is True


def test_multi_limiter_rollback_never_frees_a_later_claim():
    clock = FakeClock()
    tb = TokenBucket(1.0, 2, clock=clock)
    fw = FixedWindowLimiter(1, 10.0, clock=clock)
    assert fw.try_acquire()                          # the window refuses from now on
    original = fw._claim

    def claim_with_an_interloper(n):                 # another caller takes a token between the two steps
        assert tb.try_acquire()
        return original(n)

    fw._claim = claim_with_an_interloper
    multi = MultiLimiter(tb, fw)
    assert not multi.try_acquire()
    fw._claim = original
    assert tb.available == 0                         # the rollback found a later claim on top: gave nothing
    assert not tb.try_acquire()                      # (before: it freed the interloper's token: 2 + 1 > 2)
    clock.advance(1.0)
    assert tb.try_acquire() and not tb.try_acquire()


def test_window_rollback_after_reset_gives_nothing_back():
    clock = FakeClock()
    fw = FixedWindowLimiter(2, 10.0, clock=clock)
    receipt = fw._claim(1)
    fw.reset()
    assert fw.try_acquire(2)
    fw._unclaim(1, receipt)                          # from before reset(): void, the count stays 2
    assert not fw.try_acquire()


def test_multi_limiter_refuses_mixed_clocks():
    with pytest.raises(ValueError, match="limiters must share one clock"):
        MultiLimiter(TokenBucket(1.0, clock=FakeClock()), FixedWindowLimiter(1, 1.0, clock=FakeClock()))
    MultiLimiter(TokenBucket(1.0), FixedWindowLimiter(1, 1.0))    # both on the system clock


@pytest.mark.parametrize("seed", range(4))
def test_claims_and_refunds_racing_account_exactly(impl, fast_switching, seed):
    g = impl.gcra.GCRA(1e-6, 1000, clock_ns=lambda: 5)   # frozen time, no refill
    rnd = [random.Random(seed * 10 + i) for i in range(8)]
    granted = [0] * 8
    refunded = [0] * 8

    def body(i):
        for _ in range(300):
            wait, receipt = g.claim(1, None, 0)
            if wait == 0:
                granted[i] += 1
                if rnd[i].random() < 0.5:
                    refunded[i] += g.refund(receipt)

    race(8, body)
    held = sum(granted) - sum(refunded)
    assert g.available() == 1000 - held              # every refund gave back exactly its own token
    assert held <= 1000


# ---------- what cannot be represented is refused, never wrapped ----------

def test_unbounded_reserve_past_the_horizon_raises_and_claims_nothing():
    clock = FakeClock()
    tb = TokenBucket(1e-6, 1, clock=clock)
    n = 0
    with pytest.raises(RateLimitExceeded, match="past the time it can represent") as info:
        while True:
            assert tb.reserve() >= n * 1e6           # waits only grow: never "usable now" again
            n += 1
            assert n < 10_000
    assert n > 4000
    assert info.value.retry_after == pytest.approx(n * 1e6)
    with pytest.raises(RateLimitExceeded, match="past the time it can represent"):
        tb.acquire()                                 # timeout=None: the same refusal, without sleeping
    with pytest.raises(RateLimitExceeded, match="past the time it can represent"):
        asyncio.run(tb.acquire_async())
    assert clock.monotonic_ns() == 0
    lb = LeakyBucket(1e-6, 1 << 40, clock=clock)
    with pytest.raises(RateLimitExceeded, match="past the time it can represent"):
        for _ in range(10_000):
            lb._reserve(None)                        # the claim acquire() makes, without its sleep


def test_keyed_limiter_many_threads_on_an_epoch_clock_exact(fast_switching):
    kl = KeyedLimiter(1e-3, 25, max_keys=1000, clock=FakeClock(start=1.7e9))
    keys = np.arange(100, dtype=np.int64).repeat(4)
    got = race(8, lambda i: int(kl.try_acquire_many(keys).sum()) + sum(kl.try_acquire(int(k)) for k in keys))
    assert sum(got) == 100 * 25


# -- phase 2 (issue 14): the packed-word window core and words bound from a store ------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(sliding=st.booleans(), limit=st.integers(1, 6), width=st.sampled_from([1, 7, 1000, S]),
       start=st.integers(-(1 << 62), 1 << 62),
       ops=st.lists(st.tuples(st.integers(0, 3 * S), st.integers(1, 6), st.booleans()), max_size=40))
def test_packed_window_core_decides_as_the_process_local_windows(both, sliding, limit, width, start, ops):
    """wlimit.WindowCounter (one CAS on one packed word) admits exactly what the process-local window
    limiter admits, compiled and twin alike, with the same waits."""
    clock = FakeClock()
    clock.advance_ns(start) if start >= 0 else clock.__init__(start / 1e9)
    start = clock.monotonic_ns()
    ref = (SlidingWindowLimiter if sliding else FixedWindowLimiter)(limit, width / 1e9, clock=clock)
    ref._w = width                                     # exact ns window (the facade rounds seconds up)
    cores = [i.wlimit.WindowCounter(limit, width, sliding) for i in both]
    now = start
    for move, n, wait in ops:
        now += move
        clock.advance_ns(move)
        n = min(n, limit)
        if wait:
            w = [c.wait_ns(n, now) for c in cores]
            assert w[0] == w[1] == ref._wait_ns(n), (now, n)
        else:
            got = [c.try_acquire(n, now) for c in cores]
            assert got[0] == got[1] == ref.try_acquire(n), (now, n)
    assert cores[0].counts() == cores[1].counts() == tuple(ref.metrics().__dict__.values())


def test_packed_window_receipts_ahead_readers_and_reset(impl):
    W = impl.wlimit.WindowCounter
    c = W(3, 100, False)
    r = c.claim(2, 1000)                               # window 10
    assert r and not c.claim(2, 1050)
    assert c.unclaim(2, r) and c.claim(3, 1099)        # given back in its own window
    r2 = c.claim(1, 1200)
    assert r2 and c.unclaim(1, r2)                     # window 12: r2 counted there, given back there
    assert c.claim(3, 1250)
    assert not c.claim(1, 1000)                        # a stale reading (window 10) decides in the word's
    assert c.wait_ns(1, 1000) == 100                   # window (12), at its start: conservative
    c.reset()
    assert not c.unclaim(1, r2)                        # receipts before reset() are void
    assert c.claim(3, 1250) and c.counts() == (1, 0)
    with pytest.raises(ValueError, match="receipt must be a receipt returned by claim"):
        c.unclaim(1, 2)
    with pytest.raises(ValueError, match="limit must be between 1 and 1048575"):
        W(1 << 20, 100, False)
    with pytest.raises(TypeError, match="sliding must be a bool"):
        W(1, 100, 1)


def test_a_packed_window_word_older_than_the_ring_reads_as_empty(impl):
    c = impl.wlimit.WindowCounter(1, 10, True)
    assert c.try_acquire(1, 0) and not c.try_acquire(1, 5)
    assert c.try_acquire(1, 10 * (1 << 22))            # half the ring later: older, so empty
    assert not c.try_acquire(1, 10 * (1 << 22) + 5)


def test_gcra_words_are_shared_and_checked(both):
    buf = bytearray(64 + 8)
    words = memoryview(buf)[8:]                        # 8-byte aligned view inside
    c_mod, t_mod = (i.gcra for i in both)
    c_mod.GCRA.init_words(words, 10.0, 3, 5 * S)
    a, b = c_mod.GCRA(10.0, 3, words=words), c_mod.GCRA(10.0, 3, words=words)
    assert [a.try_acquire(1, 5 * S), b.try_acquire(2, 5 * S), a.try_acquire(1, 5 * S)] == [True, True, False]
    assert a.counts() == b.counts() == (2, 1)
    twin = t_mod.GCRA(10.0, 3, words=bytearray(bytes(words)))   # the twin reads the same layout
    assert twin.wait_ns(1, 5 * S) == a.wait_ns(1, 5 * S) == S // 10
    for mod in (c_mod, t_mod):
        with pytest.raises(ValueError, match="words hold a GCRA with interval 100000000 ns and tau 300000000 ns"):
            mod.GCRA(10.0, 4, words=words)
        with pytest.raises(TypeError, match="words must be a writable buffer"):
            mod.GCRA(10.0, 3, words=bytes(64))
        with pytest.raises(ValueError, match="words holds 8 bytes, a GCRA needs 64"):
            mod.GCRA(10.0, 3, words=bytearray(8))


def test_take_and_untake_give_back_only_the_last_claim(impl):
    g = impl.gcra.GCRA(10.0, 2)
    e1 = g.take(0)
    e2 = g.take(0)
    assert e1 is not None and e2 is not None and g.take(0) is None
    assert not g.untake(e1)                            # a later claim built on it: nothing given back
    assert g.untake(e2) and not g.untake(e2)           # the last one: once
    assert g.available(0) == 1
    with pytest.raises(ValueError, match="end must be a value returned by take"):
        g.untake(-(1 << 62))


def test_keyed_claim_and_refund(impl):
    t = impl.keyed.KeyedGCRA(1e-3, 2, 100, seed=bytes(16))
    r1, r2 = t.claim("a", 1, 0), t.claim("a", 1, 0)
    assert r1 and r2 and not t.claim("a", 1, 0)
    assert not t.refund(r1)                            # a later claim charged the key since
    assert t.refund(r2) and not t.refund(r2)
    assert t.try_acquire("a", 1, 0) and not t.try_acquire("a", 1, 0)
    with pytest.raises(ValueError, match="receipt must be a receipt returned by claim"):
        t.refund(1 << 200)
