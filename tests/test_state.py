import pytest

from helpers import race

CLOSED, OPEN, HALF_OPEN, FORCED_OPEN = 0, 1, 2, 3


def test_transitions_start_new_generations(impl):
    s = impl.state.BreakerState(now=5)
    assert s.load() == (CLOSED, 0, 0) and s.since(0) == 5
    assert s.transition(CLOSED, 0, OPEN, 10) == 1
    assert s.load() == (OPEN, 1, 0) and s.since(1) == 10
    assert s.transition(CLOSED, 0, OPEN, 11) == -1          # stale expectation
    assert s.transition(OPEN, 1, HALF_OPEN, 20) == 2
    assert s.since(2) == 20


def test_half_open_permits_are_bounded_and_tied_to_the_generation(impl):
    s = impl.state.BreakerState(now=0)
    s.transition(CLOSED, 0, HALF_OPEN, 0)
    assert [s.try_half_open(1, 2) for _ in range(3)] == [True, True, False]
    assert s.load() == (HALF_OPEN, 1, 2)
    assert s.return_half_open(1) and s.try_half_open(1, 2)
    assert not s.try_half_open(0, 5)          # older generation
    # the transition clears permits in flight; a late return of the old generation is a no-op
    assert s.transition(HALF_OPEN, 1, CLOSED, 1) == 2
    assert not s.return_half_open(1)
    assert s.load() == (CLOSED, 2, 0)


def test_transition_wins_even_when_permits_change_underneath(impl):
    s = impl.state.BreakerState(now=0)
    s.transition(CLOSED, 0, HALF_OPEN, 0)
    s.try_half_open(1, 3)
    assert s.transition(HALF_OPEN, 1, OPEN, 0) == 2


def test_bad_state(impl):
    s = impl.state.BreakerState(now=0)
    with pytest.raises(ValueError, match="new_state must be between 0 and 5"):
        s.transition(CLOSED, 0, 9, 0)


@pytest.mark.parametrize("rep", range(20))
def test_exactly_one_racer_wins_a_transition(impl, fast_switching, rep):
    s = impl.state.BreakerState(now=0)
    wins = race(16, lambda i: s.transition(CLOSED, 0, OPEN if i % 2 else FORCED_OPEN, i))
    assert sum(w != -1 for w in wins) == 1
    assert s.load()[1] == 1


@pytest.mark.parametrize("limit", [1, 3])
@pytest.mark.parametrize("rep", range(10))
def test_exactly_limit_half_open_permits_under_race(impl, fast_switching, limit, rep):
    s = impl.state.BreakerState(now=0)
    s.transition(CLOSED, 0, HALF_OPEN, 0)
    got = race(16, lambda i: sum(s.try_half_open(1, limit) for _ in range(50)))
    assert sum(got) == limit
