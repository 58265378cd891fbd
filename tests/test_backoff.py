"""buttress.backoff: schedules, jitter bounds, reproducibility, argument checks."""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buttress import backoff as bo

seconds = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)
jitters = st.sampled_from(bo.JITTERS)


def test_exponential_without_jitter_doubles_up_to_the_maximum():
    b = bo.exponential(initial=0.1, multiplier=2.0, maximum=1.0, jitter="none")
    assert list(b.delays(6)) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert b.delay(10**6) == 1.0            # no OverflowError for huge attempt numbers
    assert b.base(3) == pytest.approx(0.4)


def test_exponential_with_zero_initial_is_always_zero():
    b = bo.exponential(initial=0.0, multiplier=10.0, maximum=5.0, jitter="none")
    assert b.delay(1) == 0.0 and b.delay(10**6) == 0.0


def test_linear_and_constant():
    assert list(bo.linear(initial=1.0, increment=0.5, maximum=2.2).delays(5)) == [1.0, 1.5, 2.0, 2.2, 2.2]
    assert list(bo.constant(0.3).delays(3)) == [0.3, 0.3, 0.3]


def test_defaults_match_the_design():
    e = bo.exponential()
    assert (e.initial, e.maximum, e.jitter) == (0.1, 30.0, "full")
    assert bo.linear().jitter == "none" and bo.constant().jitter == "none"


def test_a_backoff_is_a_callable_of_the_attempt():
    b = bo.exponential(jitter="none")
    assert b(3) == b.delay(3) == pytest.approx(0.4)


@settings(max_examples=300, deadline=None)
@given(initial=seconds, extra=seconds, multiplier=st.floats(1.0, 10.0), jitter=jitters,
       attempt=st.integers(1, 2000), previous=st.none() | seconds, seed=st.integers(0, 2**32))
def test_every_delay_lies_within_its_jitter_bounds(initial, extra, multiplier, jitter, attempt, previous, seed):
    maximum = initial + extra
    b = bo.exponential(initial=initial, multiplier=multiplier, maximum=maximum, jitter=jitter,
                       rng=random.Random(seed))
    d = b.delay(attempt, previous)
    try:
        expected_base = min(maximum, initial * multiplier ** (attempt - 1))
    except OverflowError:
        expected_base = maximum if initial else 0.0
    base = b.base(attempt)
    assert base == expected_base
    if jitter == "none":
        assert d == base
    elif jitter == "full":
        assert 0.0 <= d <= base
    elif jitter == "equal":
        assert base / 2 <= d <= base
    else:   # decorrelated: min(maximum, uniform(initial, 3 * previous)), previous defaulting to initial
        prev = initial if previous is None else max(initial, previous)
        assert initial <= d <= min(maximum, 3 * prev) * (1 + 1e-12)


@settings(max_examples=100, deadline=None)
@given(initial=st.floats(0.001, 10.0), extra=seconds, seed=st.integers(0, 2**32), n=st.integers(1, 30))
def test_decorrelated_walk_threads_the_previous_delay(initial, extra, seed, n):
    maximum = initial + extra
    b = bo.exponential(initial=initial, maximum=maximum, jitter="decorrelated", rng=random.Random(seed))
    prev = initial
    for d in b.delays(n):
        assert initial <= d <= min(maximum, 3 * prev) + 1e-9
        prev = d


@pytest.mark.parametrize("make", [bo.exponential, bo.linear])
@pytest.mark.parametrize("jitter", ["full", "equal", "decorrelated"])
def test_a_seeded_rng_reproduces_the_delays(make, jitter):
    a = list(make(jitter=jitter, rng=random.Random(7)).delays(20))
    b = list(make(jitter=jitter, rng=random.Random(7)).delays(20))
    c = list(make(jitter=jitter, rng=random.Random(8)).delays(20))
    assert a == b
    assert a != c


class Pinned(random.Random):
    """A generator whose random() returns a chosen value: the jitter's extremes, exactly."""

    def __init__(self, value):
        super().__init__(0)
        self.value = value

    def random(self):
        return self.value


TOP = math.nextafter(1.0, 0.0)      # the largest value random() can return


@pytest.mark.parametrize("jitter, low, high", [("none", 0.8, 0.8), ("full", 0.0, 0.8), ("equal", 0.4, 0.8),
                                               ("decorrelated", 0.1, 0.6)])
def test_jitter_extremes(jitter, low, high):
    """attempt 4 of exponential(0.1, 2): base 0.8; decorrelated from previous 0.2: [0.1, 0.6]."""
    at = {r: bo.exponential(initial=0.1, jitter=jitter, rng=Pinned(r)).delay(4, 0.2) for r in (0.0, TOP)}
    assert at[0.0] == pytest.approx(low) and at[TOP] == pytest.approx(high)
    assert at[TOP] <= high


def test_full_jitter_spreads_over_the_whole_range():
    b = bo.constant(1.0, jitter="full", rng=random.Random(1))
    values = [b.delay(1) for _ in range(2000)]
    assert min(values) < 0.05 and max(values) > 0.95


def test_repr_names_the_schedule():
    assert repr(bo.exponential()) == "exponential(initial=0.1, multiplier=2.0, maximum=30.0, jitter='full')"
    assert repr(bo.constant(2)) == "constant(delay=2.0, jitter='none')"
    assert "linear(initial=0.1, increment=0.1" in repr(bo.linear())


@pytest.mark.parametrize("call, exc, words", [
    (lambda: bo.exponential(initial=-1), ValueError, ["initial", "-1"]),
    (lambda: bo.exponential(initial=math.nan), ValueError, ["initial", "nan"]),
    (lambda: bo.exponential(initial="1"), TypeError, ["initial", "'1'"]),
    (lambda: bo.exponential(multiplier=0.5), ValueError, ["multiplier", "0.5", ">= 1"]),
    (lambda: bo.exponential(initial=2.0, maximum=1.0), ValueError, ["maximum", "initial=2.0", "1.0"]),
    (lambda: bo.exponential(maximum=math.inf), ValueError, ["maximum", "inf"]),
    (lambda: bo.exponential(jitter="fancy"), ValueError, ["jitter", "'fancy'", "'decorrelated'"]),
    (lambda: bo.exponential(jitter=None), TypeError, ["jitter", "None"]),
    (lambda: bo.exponential(rng=42), TypeError, ["rng", "42", "random.Random"]),
    (lambda: bo.constant(-0.5), ValueError, ["delay", "-0.5"]),
    (lambda: bo.constant(1.0, jitter="decorrelated"), ValueError, ["decorrelated", "exponential"]),
    (lambda: bo.linear(increment=-1), ValueError, ["increment", "-1"]),
    (lambda: bo.linear(initial=3, maximum=2), ValueError, ["maximum", "initial=3", "2"]),
    (lambda: bo.exponential().delay(0), ValueError, ["attempt", ">= 1", "0"]),
    (lambda: bo.exponential().delay(1.5), TypeError, ["attempt", "1.5"]),
    (lambda: bo.exponential().delay(True), TypeError, ["attempt", "True"]),
    (lambda: list(bo.exponential().delays(-1)), ValueError, ["attempts", "-1"]),
])
def test_bad_arguments_are_rejected_with_clear_messages(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value)
