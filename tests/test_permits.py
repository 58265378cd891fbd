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


# -- uninitialised objects, counts out of range (compiled and twin answer alike) --------------------

_UNINIT = "Permits is not initialised: its __init__ was not called (a subclass must call super().__init__())"


def _uninitialised(impl):
    class Sub(impl.permits.Permits):
        def __init__(self):             # forgets super().__init__()
            pass

    return [impl.permits.Permits.__new__(impl.permits.Permits), Sub()]


@pytest.mark.parametrize("call", [
    lambda p: p.try_acquire(), lambda p: p.try_acquire(3), lambda p: p.try_acquire_within(5),
    lambda p: p.release(), lambda p: p.resize(4),
])
def test_uninitialised_permits_raise_runtime_error(impl, call):
    for p in _uninitialised(impl):
        with pytest.raises(RuntimeError) as ei:
            call(p)
        assert str(ei.value) == _UNINIT.replace("Permits", type(p).__name__, 1)
        assert (p.in_use, p.max_permits, p.available) == (0, 0, 0)     # and it stays unusable


def test_bad_count_before_uninitialised(impl):
    p = impl.permits.Permits.__new__(impl.permits.Permits)
    with pytest.raises(ValueError, match="n must be"):
        p.try_acquire(0)


def test_initialised_once(impl):
    p = impl.permits.Permits(2)
    assert p.try_acquire()
    with pytest.raises(RuntimeError, match="Permits is already initialised"):
        p.__init__(5)                   # would forget the holder: its release would then be refused
    assert (p.in_use, p.max_permits) == (1, 2)
    p.release()


@pytest.mark.parametrize("n, exc", [
    (2**63 - 1, ValueError), (2**64, ValueError), (-(2**70), ValueError), ((1 << 40) + 1, ValueError),
    (True, TypeError), (1.0, TypeError), ("1", TypeError), (None, TypeError),
])
def test_counts_out_of_range_are_refused_alike(impl, n, exc):
    # compiled: 2**63-1 used to overflow in_use + n and admit (corrupting the word); 2**64 raised
    # OverflowError and True was taken as 1 -- the twin says ValueError / TypeError naming n
    p = impl.permits.Permits(3)
    assert p.try_acquire()
    for call in (p.try_acquire, p.release, lambda n: p.try_acquire_within(10, n)):
        with pytest.raises(exc, match="^n must be"):
            call(n)
    assert (p.in_use, p.available) == (1, 2)


@pytest.mark.parametrize("limit, expect", [(2**62, True), (-(2**62), False), (0, False), (1, False), (2, True)])
def test_try_acquire_within_takes_any_int_limit(impl, limit, expect):
    p = impl.permits.Permits(3)
    assert p.try_acquire()
    assert p.try_acquire_within(limit) is expect
    with pytest.raises(TypeError, match="^limit must be an int"):
        p.try_acquire_within(2.0)
    with pytest.raises(TypeError, match="^limit must be an int"):
        p.try_acquire_within(True)


def test_release_never_raises_available_above_max(impl):
    p = impl.permits.Permits(2)
    for n in (1, 2, 3):
        with pytest.raises(ValueError, match=f"n={n} permits released but only 0 are held"):
            p.release(n)
    assert (p.in_use, p.available, p.max_permits) == (0, 2, 2)
    assert p.try_acquire(2) and not p.try_acquire()


def _outcome(fn):
    try:
        return ("ok", fn())
    except Exception as exc:  # noqa: BLE001 - compared below
        return (type(exc), str(exc))


@pytest.mark.parametrize("limit", [2**63, 2**64, -(2**63) - 1, -(2**64), 2**63 - 1, -(2**63)])
def test_limits_beyond_int64_answer_as_the_twin(both, limit):
    # compiled used to raise OverflowError (an int64_t argument); now it answers exactly as the twin
    outcomes = []
    for impl in both:
        p = impl.permits.Permits(3)
        outcomes.append((_outcome(lambda: p.try_acquire_within(limit)), p.in_use))
    assert outcomes[0] == outcomes[1]


# -- close / reopen (a drain): the maximum stored negated in the limit word ----------------------------------

def test_a_closed_counter_refuses_everything_and_holders_still_release(impl):
    p = impl.permits.Permits(3)
    assert p.try_acquire(2)
    p.close()
    p.close()                                   # idempotent
    assert p.closed and not p.try_acquire() and not p.try_acquire_within(10)
    assert p.max_permits == 3 and p.available == 0 and p.in_use == 2
    p.resize(5)                                 # a closed counter stays closed
    assert p.closed and p.max_permits == 5 and not p.try_acquire()
    p.release(2)
    assert p.in_use == 0 and not p.try_acquire()
    p.reopen()
    p.reopen()
    assert not p.closed and p.try_acquire(5) and not p.try_acquire()
    p.release(5)


def test_close_of_an_uninitialised_counter_says_so(impl):
    p = impl.permits.Permits.__new__(impl.permits.Permits)
    for op in (p.close, p.reopen):
        with pytest.raises(RuntimeError, match="not initialised"):
            op()


def test_close_races_acquirers_without_over_admitting(impl, fast_switching):
    p = impl.permits.Permits(4)

    def body(i):
        if i == 0:
            p.close()
            return 0
        n = 0
        for _ in range(200):
            if p.try_acquire():
                n += 1
                p.release()
        return n

    race(4, body)
    assert p.closed and p.in_use == 0 and not p.try_acquire()
