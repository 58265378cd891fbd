import math
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
    assert g.try_acquire(3, 0)
    assert g.available(0) == 0
    g.refund(2)
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
    for method in (g.try_acquire, g.wait_ns, g.reserve, g.refund):
        with pytest.raises(ValueError, match=r"n must be between 1 and capacity=3, got 4"):
            method(4)
        with pytest.raises(ValueError, match="n must be"):
            method(0)
    with pytest.raises(TypeError):
        g.try_acquire(1.5)
