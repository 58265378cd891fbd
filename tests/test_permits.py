import threading

import pytest

from helpers import race


def test_acquire_release(impl):
    p = impl.permits.Permits(3)
    assert p.try_acquire(2) and p.try_acquire() and not p.try_acquire()
    assert (p.in_use, p.available, p.max_permits) == (3, 0, 3)
    p.release(3)
    assert p.in_use == 0 and p.available == 3


def test_over_release_is_refused_and_changes_nothing(impl):
    p = impl.permits.Permits(3)
    p.try_acquire()
    with pytest.raises(ValueError, match="n=2 permits released but only 1 are held"):
        p.release(2)
    assert p.in_use == 1


def test_shrinking_never_strands_holders(impl):
    p = impl.permits.Permits(4)
    assert p.try_acquire(4)
    p.resize(2)
    assert p.in_use == 4 and p.available == 0
    p.release(3)
    assert p.in_use == 1 and p.try_acquire() and not p.try_acquire()
    p.resize(5)
    assert p.try_acquire(3) and p.in_use == 5


def test_bad_args(impl):
    with pytest.raises(ValueError, match="max_permits must be between 1 and"):
        impl.permits.Permits(0)
    with pytest.raises(TypeError, match="max_permits must be an int"):
        impl.permits.Permits("3")
    p = impl.permits.Permits(1)
    with pytest.raises(ValueError, match="n must be"):
        p.try_acquire(0)
    with pytest.raises(ValueError, match="n must be"):
        p.release(0)


@pytest.mark.parametrize("limit", [1, 3, 5])
def test_never_above_max_and_all_returned(impl, fast_switching, limit):
    p = impl.permits.Permits(limit)
    lock = threading.Lock()
    inside = [0, 0]   # current, peak

    def body(i):
        got = 0
        for _ in range(2_000):
            if p.try_acquire():
                got += 1
                with lock:
                    inside[0] += 1
                    inside[1] = max(inside[1], inside[0])
                assert p.in_use <= limit
                with lock:
                    inside[0] -= 1
                p.release()
        return got

    got = race(16, body)
    assert inside[1] <= limit
    assert sum(got) > 0
    assert p.in_use == 0 and p.available == limit


def test_try_acquire_within_a_share(impl):
    p = impl.permits.Permits(10)
    assert [p.try_acquire_within(3) for _ in range(4)] == [True, True, True, False]
    assert p.try_acquire_within(100, 7) and not p.try_acquire_within(100)     # capped by max_permits
    assert p.in_use == 10
    with pytest.raises(ValueError, match="n must be"):
        p.try_acquire_within(5, 0)


def test_try_acquire_within_is_exact_under_threads(impl, fast_switching):
    p = impl.permits.Permits(1000)
    got = race(8, lambda i: sum(p.try_acquire_within(37) for _ in range(500)))
    assert sum(got) == 37 and p.in_use == 37
