import random

import pytest

from helpers import race

S = 1_000_000_000


def test_count_window_keeps_exactly_the_last_n(impl):
    w = impl.window.CountWindow(5)
    rnd = random.Random(1)
    history = []
    for _ in range(200):
        f, s = rnd.random() < 0.4, rnd.random() < 0.3
        w.record(f, s)
        history.append((f, s))
        last = history[-5:]
        assert w.snapshot() == (len(last), sum(f for f, _ in last), sum(s for _, s in last),
                                sum(f and s for f, s in last))
    assert w.recorded == 200


def test_count_window_reset_and_partial_fill(impl):
    w = impl.window.CountWindow(100)
    assert w.snapshot() == (0, 0, 0, 0)
    w.record(True)
    w.record(False, True)
    assert w.snapshot() == (2, 1, 1, 0)
    w.reset()
    assert w.snapshot() == (0, 0, 0, 0) and w.recorded == 0


def test_count_window_size_bounds(impl):
    for bad in (0, -1, impl.window.COUNT_WINDOW_MAX + 1):
        with pytest.raises(ValueError, match="size must be between 1 and"):
            impl.window.CountWindow(bad)
    with pytest.raises(TypeError, match="size must be an int"):
        impl.window.CountWindow(2.0)


@pytest.mark.parametrize("size", [1, 7, 100, 50_000 // 10])
def test_count_window_exact_under_threads(impl, fast_switching, size):
    w = impl.window.CountWindow(size)

    def body(i):
        for k in range(10_000):
            w.record(k % 4 == 0, k % 2 == 0)

    race(4, body)
    calls, failures, slow, both = w.snapshot()
    assert calls == min(size, 40_000)
    assert w.recorded == 40_000
    if size == 5_000:
        # every thread records the same periodic pattern: over the last N the mix is 1/4, 1/2, 1/4
        assert 0 <= failures <= calls and 0 <= slow <= calls and both <= min(failures, slow)


def test_count_window_totals_exact_when_window_holds_everything(impl, fast_switching):
    w = impl.window.CountWindow(30_000)

    def body(i):
        for k in range(7_000):
            w.record(k % 3 == 0, k % 5 == 0)

    race(4, body)
    per = (7_000, len(range(0, 7000, 3)), len(range(0, 7000, 5)), len(range(0, 7000, 15)))
    assert w.snapshot() == tuple(4 * x for x in per)


def test_time_window_buckets_are_aligned_to_the_clock(impl):
    w = impl.window.TimeWindow(3, S)
    w.record(True, now=int(2.9 * S))          # bucket 2
    w.record(False, now=3 * S)                # bucket 3
    w.record(False, True, now=int(4.5 * S))   # bucket 4
    assert w.snapshot(now=int(4.9 * S)) == (3, 1, 1, 0)    # buckets 2..4
    assert w.snapshot(now=5 * S) == (2, 0, 1, 0)           # buckets 3..5: bucket 2 dropped
    assert w.snapshot(now=6 * S) == (1, 0, 1, 0)
    assert w.snapshot(now=7 * S) == (0, 0, 0, 0)


def test_time_window_stale_bucket_is_reset_on_reuse(impl):
    w = impl.window.TimeWindow(2, 10)
    for _ in range(5):
        w.record(True, True, now=0)
    assert w.snapshot(now=0) == (5, 5, 5, 5)
    w.record(False, now=20)     # same slot as epoch 0, two epochs later: reset, then count
    assert w.snapshot(now=20) == (1, 0, 0, 0)
    assert w.snapshot(now=29) == (1, 0, 0, 0)
    assert w.snapshot(now=30) == (1, 0, 0, 0)
    assert w.snapshot(now=40) == (0, 0, 0, 0)


def test_time_window_uses_clock_callable(impl):
    t = [0]
    w = impl.window.TimeWindow(2, S, clock_ns=lambda: t[0])
    w.record(True)
    t[0] = S
    w.record(False)
    assert w.snapshot() == (2, 1, 0, 0)
    t[0] = 2 * S
    assert w.snapshot() == (1, 0, 0, 0)


def test_time_window_no_count_lost_at_a_boundary(impl, fast_switching):
    """Threads cross bucket boundaries together: every record lands in some bucket of the window."""
    w = impl.window.TimeWindow(4, 1000)

    def body(i):
        for k in range(10_000):
            w.record(k % 2 == 0, now=k // 10)   # epochs 0..9 across the run: buckets reset under load

    race(4, body)
    # the window at now=9999//10 holds epochs 6..9 of width 1000 ns... all records are in epoch 0 here
    assert w.snapshot(now=999) == (40_000, 20_000, 0, 0)


def test_time_window_exact_across_two_buckets_under_threads(impl, fast_switching):
    w = impl.window.TimeWindow(2, 100)

    def body(i):
        for k in range(10_000):
            w.record(k % 2 == 0, k % 3 == 0, now=50 if (k + i) % 2 else 150)   # epochs 0 and 1

    race(4, body)
    assert w.snapshot(now=199) == (40_000, 20_000, len(range(0, 10_000, 3)) * 4, len(range(0, 10_000, 6)) * 4)
    assert w.snapshot(now=200)[0] == 20_000          # epoch 0 has left the window


def test_time_window_bad_args(impl):
    with pytest.raises(ValueError, match="nbuckets must be"):
        impl.window.TimeWindow(0)
    with pytest.raises(ValueError, match="width_ns must be >= 1"):
        impl.window.TimeWindow(1, 0)
    with pytest.raises(TypeError, match="clock_ns must be a callable"):
        impl.window.TimeWindow(1, 1, clock_ns=5)
