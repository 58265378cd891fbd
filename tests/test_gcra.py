import copy
import math
import pickle
import random

import pytest

from helpers import race

S = 1_000_000_000


def test_burst_then_refill(impl):
    g = impl.gcra.GCRA(rate=10.0, capacity=5)
    assert g.interval_ns == S // 10
    assert [g.try_acquire(1, 0) for _ in range(6)] == [True] * 5 + [False]
    assert g.available(0) == 0
    # one token per 100 ms
    assert not g.try_acquire(1, S // 10 - 1)
    assert g.try_acquire(1, S // 10)
    assert not g.try_acquire(1, S // 10)
    # after a long pause the bucket is full again, never more than capacity
    assert g.available(100 * S) == 5


def test_at_most_capacity_plus_rate_times_d(impl):
    g = impl.gcra.GCRA(rate=3.0, capacity=4)
    now, admitted = 0, 0
    for _ in range(10_000):
        now += 7_000_000  # 7 ms steps
        admitted += g.try_acquire(1, now)
    d = now - 7_000_000
    assert admitted <= 4 + math.floor(d / S * 3.0)
    assert admitted >= math.floor(d / S * 3.0) - 1


def test_wait_is_exact(impl):
    g = impl.gcra.GCRA(rate=7.0, capacity=3)
    for _ in range(3):
        assert g.try_acquire(1, 1000)
    w = g.wait_ns(2, 1000)
    assert w > 0
    assert not g.try_acquire(2, 1000 + w - 1)
    assert g.try_acquire(2, 1000 + w)


def test_rate_rounds_interval_up(impl):
    g = impl.gcra.GCRA(rate=3.0, capacity=1)
    assert g.interval_ns == 333_333_334          # never faster than 3 per second
    assert impl.gcra.GCRA(rate=1e9, capacity=1).interval_ns == 1


def test_reserve_claims_and_reports_the_wait(impl):
    g = impl.gcra.GCRA(rate=10.0, capacity=2)
    assert g.reserve(2, 0) == 0
    assert g.reserve(1, 0) == S // 10
    assert g.reserve(1, 0) == 2 * S // 10
    # a bounded reserve refuses without claiming
    assert g.reserve(1, 0, S // 10) == -1
    assert g.wait_ns(1, 0) == 3 * S // 10


def test_refund_returns_tokens(impl):
    g = impl.gcra.GCRA(rate=1.0, capacity=3)
    assert g.try_acquire(1, 0)
    wait, receipt = g.claim(2, 0)
    assert wait == 0 and g.available(0) == 0
    assert g.refund(receipt) is True
    assert g.available(0) == 2
    assert g.refund(receipt) is False                # used once: the TAT no longer ends there
    assert g.available(0) == 2
    g.reset()
    assert g.available(0) == 3


def test_clock_callable_is_used_when_now_is_omitted(impl):
    t = [0]
    g = impl.gcra.GCRA(rate=1.0, capacity=1, clock_ns=lambda: t[0])
    assert g.try_acquire()
    assert not g.try_acquire()
    t[0] = S
    assert g.try_acquire()


def test_real_clock_default(impl):
    g = impl.gcra.GCRA(rate=1e-3, capacity=2)
    assert g.try_acquire() and g.try_acquire() and not g.try_acquire()


@pytest.mark.parametrize("seed", range(20))
def test_exact_admission_under_racing_threads(impl, fast_switching, seed):
    g = impl.gcra.GCRA(rate=1e-6, capacity=100)   # no refill within the test
    rnd = random.Random(seed)
    now = rnd.randrange(1, 10**12)

    def body(i):
        return sum(g.try_acquire(1, now) for _ in range(5_000))

    assert sum(race(8, body)) == 100


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(rate=0, capacity=1), ValueError, ["rate", "0", "> 0"]),
    (dict(rate=-1.0, capacity=1), ValueError, ["rate", "-1.0"]),
    (dict(rate=float("nan"), capacity=1), ValueError, ["rate", "nan", "finite"]),
    (dict(rate=float("inf"), capacity=1), ValueError, ["rate", "inf"]),
    (dict(rate=2e9, capacity=1), ValueError, ["rate", "<= 1e+09"]),
    (dict(rate="10", capacity=1), TypeError, ["rate", "'10'", "number"]),
    (dict(rate=1.0, capacity=0), ValueError, ["capacity", ">= 1", "0"]),
    (dict(rate=1.0, capacity=2.5), TypeError, ["capacity", "int", "2.5"]),
    (dict(rate=1.0, capacity=True), TypeError, ["capacity", "int"]),
    (dict(rate=1e-9, capacity=10**9), ValueError, ["capacity"]),
])
def test_bad_constructor_arguments(impl, kwargs, exc, words):
    with pytest.raises(exc) as info:
        impl.gcra.GCRA(**kwargs)
    for w in words:
        assert w in str(info.value)


def test_bad_n(impl):
    g = impl.gcra.GCRA(rate=1.0, capacity=3)
    for method in (g.try_acquire, g.wait_ns, g.reserve, g.claim):
        with pytest.raises(ValueError, match=r"n must be between 1 and capacity=3, got 4"):
            method(4)
        with pytest.raises(ValueError, match="n must be"):
            method(0)
    with pytest.raises(TypeError):
        g.try_acquire(1.5)


# ---------- an object whose __init__ never ran (issue 12) ----------

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
UNINIT = "{} is not initialised: its __init__ never ran (a subclass must call super().__init__())"


def _uninitialised(cls):
    yield cls.__new__(cls)
    yield type("Forgetful", (cls,), {"__init__": lambda self, *a, **k: None})()


def test_uninitialised_gcra_raises_a_clear_runtime_error(impl):
    cls = impl.gcra.GCRA
    for g in _uninitialised(cls):
        calls = [lambda: g.try_acquire(), lambda: g.try_acquire(1, 0), lambda: g.try_acquire(None),
                 lambda: g.reserve(1, 0), lambda: g.claim(), lambda: g.wait_ns(1, 0), lambda: g.available(0),
                 lambda: g.refund((1 << 63) + 1), lambda: g.counts(), lambda: g.reset(),
                 lambda: g.rate, lambda: g.capacity, lambda: g.interval_ns]
        for call in calls:
            with pytest.raises(RuntimeError) as info:
                call()
            assert str(info.value) == UNINIT.format(type(g).__name__)
        assert "not initialised" in repr(g)


def test_gcra_refuses_a_second_init_and_copying(impl):
    g = impl.gcra.GCRA(1.0, 1)
    with pytest.raises(RuntimeError, match="GCRA is already initialised"):
        g.__init__(1e9, 10**6)                       # would change the interval under racing callers
    assert (g.rate, g.capacity) == (1.0, 1)
    for dup in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot pickle or copy GCRA objects"):
            dup(g)


# ---------- any int64 clock reading (DESIGN §3c) ----------

@pytest.mark.parametrize("start", [-5 * S, -1, 0, 1_700_000_000 * S, INT64_MAX - 10 * S, INT64_MIN + 1, INT64_MAX])
def test_any_int64_clock_reading_starts_full_and_refills(impl, start):
    t = [start]
    g = impl.gcra.GCRA(10.0, 5, clock_ns=lambda: t[0])
    assert [g.try_acquire() for _ in range(6)] == [True] * 5 + [False]
    assert g.wait_ns() == S // 10 and g.available() == 0
    if start <= INT64_MAX - S:
        t[0] = start + S // 10 - 1
        assert not g.try_acquire()
        t[0] += 1
        assert g.try_acquire() and not g.try_acquire()
        t[0] = start + S
        assert g.available() == 5                    # full again, never more
    # the same readings passed as now=: identical answers
    h = impl.gcra.GCRA(10.0, 5, clock_ns=lambda: start)
    assert [h.try_acquire(1, start) for _ in range(6)] == [True] * 5 + [False]
    assert h.reserve(1, start) == S // 10


def test_now_far_from_the_base_saturates_and_never_admits_more(impl):
    g = impl.gcra.GCRA(10.0, 5, clock_ns=lambda: 0)
    for now in (INT64_MAX, INT64_MAX - 1, 1 << 62):   # all beyond ~73 years: one saturated instant
        assert sum(g.try_acquire(1, now) for _ in range(10)) == (5 if now == INT64_MAX else 0)
    for now in (INT64_MIN, INT64_MIN + 1, -(1 << 62)):
        assert not g.try_acquire(1, now)             # earlier than the TAT: nothing, no wrap
    assert g.wait_ns(1, INT64_MIN) > 0 and g.available(INT64_MIN) == 0


@pytest.mark.parametrize("bad, exc, words", [
    (2**63, ValueError, ["now", "int64 range", "9223372036854775808"]),
    (-(2**63) - 1, ValueError, ["now", "int64 range"]),
    (2**4000, ValueError, ["now", "an int of 4001 bits"]),
    (1.5, TypeError, ["now", "1.5", "float"]),
    (True, TypeError, ["now", "bool"]),
    ("0", TypeError, ["now", "'0'"]),
])
def test_bad_now_is_a_clean_error(impl, bad, exc, words):
    g = impl.gcra.GCRA(10.0, 5)
    for call in (lambda: g.try_acquire(1, bad), lambda: g.reserve(1, bad), lambda: g.claim(1, bad),
                 lambda: g.wait_ns(1, bad), lambda: g.available(bad)):
        with pytest.raises(exc) as info:
            call()
        for w in words:
            assert w in str(info.value)
    assert g.counts() == (0, 0)


def test_a_clock_returning_garbage_is_a_clean_error(impl):
    reading = [0]
    g = impl.gcra.GCRA(10.0, 5, clock_ns=lambda: reading[0])
    for bad, exc in ((2**64, ValueError), (1.0, TypeError), (None, TypeError)):
        reading[0] = bad
        with pytest.raises(exc, match=r"clock_ns\(\) must be an int"):
            g.try_acquire()
    with pytest.raises(ValueError, match=r"clock_ns\(\) must be an int in the int64 range"):
        impl.gcra.GCRA(10.0, 5, clock_ns=lambda: -(2**70))
    with pytest.raises(ValueError, match="max_wait_ns must be >= 0"):
        g.reserve(1, 0, -1)
    with pytest.raises(ValueError, match="max_wait_ns must be an int in the int64 range"):
        g.reserve(1, 0, 2**63)


# ---------- the arrival time never overflows (issue 12: the 9 224th reserve was "usable now") ----------

def test_reserve_refuses_what_cannot_be_represented(impl):
    g = impl.gcra.GCRA(1e-6, 1, clock_ns=lambda: 0)
    waits = []
    while True:
        w = g.reserve(1, 0)
        if w < 0:
            break
        waits.append(w)
        assert len(waits) < 10_000, "the arrival time grew without bound"
    assert waits[0] == 0
    assert all(b - a == g.interval_ns for a, b in zip(waits, waits[1:]))   # never wraps back to "now"
    assert len(waits) > 4000                         # > 140 years of reservations were representable
    assert g.reserve(1, 0) == -1 and g.claim(1, 0) == (-1, 0) and not g.try_acquire(1, 0)
    assert g.wait_ns(1, 0) == waits[-1] + g.interval_ns   # still answers exactly
    assert g.counts() == (len(waits), 4)


@pytest.mark.parametrize("now", [INT64_MAX, INT64_MIN, 0])
def test_reserve_at_the_int64_edges_is_monotone(impl, now):
    g = impl.gcra.GCRA(1e-3, 3, clock_ns=lambda: now)
    waits = [g.reserve(3, now) for _ in range(50)]
    ok = [w for w in waits if w >= 0]
    assert ok == sorted(ok) and len(set(ok)) == len(ok)
    assert waits[len(ok):] == [-1] * (len(waits) - len(ok))


# ---------- refunds (x/time/rate's rule) ----------

def test_refund_after_a_later_claim_gives_nothing_back(impl):
    g = impl.gcra.GCRA(1.0, 1, clock_ns=lambda: 0)
    assert g.try_acquire(1, 0)
    wait_a, receipt_a = g.claim(1, 0)
    wait_b, receipt_b = g.claim(1, 0)
    assert (wait_a, wait_b) == (S, 2 * S)
    assert g.refund(receipt_a) is False              # B built on A's slot: giving it back would double it
    assert g.claim(1, S // 2)[0] == 3 * S - S // 2   # C queues after B (3.0 s), not beside it (2.0 s)
    assert g.wait_ns(1, S // 2) == 4 * S - S // 2


def test_refund_of_the_last_claim_restores_exactly_its_start(impl):
    g = impl.gcra.GCRA(1.0, 3, clock_ns=lambda: 0)
    _, receipt = g.claim(2, 0)
    assert g.available(0) == 1
    assert g.refund(receipt) is True
    assert g.available(0) == 3 and g.available(100 * S) == 3    # never more than was claimed
    wait, receipt = g.claim(3, 10 * S)
    assert wait == 0 and g.available(10 * S) == 0
    assert g.refund(receipt) is True and g.available(10 * S) == 3
    g.reset()
    _, r1 = g.claim(1, 0)
    g.reset()
    assert g.refund(r1) is False                     # a receipt from before reset() is void


def test_bad_receipts(impl):
    g = impl.gcra.GCRA(1.0, 3, clock_ns=lambda: 0)
    big = impl.gcra.GCRA(1.0, 30, clock_ns=lambda: 0)
    _, receipt = big.claim(20, 0)
    for bad in (0, -1, receipt, 2**200, (5 << 63) + 4):
        with pytest.raises(ValueError, match="receipt must be a receipt returned by claim()"):
            g.refund(bad)
    for bad in (None, 1.5, True, "r"):
        with pytest.raises(TypeError, match="receipt must be an int"):
            g.refund(bad)
