"""The error hierarchy: retry_after is None or a finite number of seconds >= 0 (DESIGN §3c)."""
import fractions
import pickle

import pytest

from buttress import BulkheadFullError, CircuitOpenError, Overloaded, RateLimitExceeded, Rejected
from buttress.errors import lazy_rejection, rejection

_MAKERS = [
    ("Rejected", lambda v: Rejected(retry_after=v)),
    ("RateLimitExceeded", lambda v: RateLimitExceeded(retry_after=v)),
    ("RateLimitExceeded msg", lambda v: RateLimitExceeded("limited", retry_after=v)),
    ("BulkheadFullError", lambda v: BulkheadFullError(retry_after=v)),
    ("Overloaded", lambda v: Overloaded(retry_after=v)),
    ("CircuitOpenError", lambda v: CircuitOpenError("db", "OPEN", v)),
    ("CircuitOpenError kw", lambda v: CircuitOpenError("db", "OPEN", retry_after=v, message="m")),
]


@pytest.mark.parametrize("make", [m for _, m in _MAKERS], ids=[n for n, _ in _MAKERS])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), -1, -0.5, -1e-12])
def test_retry_after_out_of_range_is_a_value_error(make, value):
    # used to be accepted: RateLimitExceeded(retry_after=nan) said "retry after nans"
    with pytest.raises(ValueError, match="retry_after must be a finite number >= 0"):
        make(value)


@pytest.mark.parametrize("make", [m for _, m in _MAKERS], ids=[n for n, _ in _MAKERS])
@pytest.mark.parametrize("value", [True, "1", b"1", [1], 1j])
def test_retry_after_of_a_wrong_type_is_a_type_error(make, value):
    with pytest.raises(TypeError, match="retry_after"):
        make(value)


@pytest.mark.parametrize("make", [m for _, m in _MAKERS], ids=[n for n, _ in _MAKERS])
@pytest.mark.parametrize("value, expected", [(None, None), (0, 0.0), (0.0, 0.0), (2, 2.0), (1.5, 1.5),
                                             (fractions.Fraction(1, 4), 0.25), (1e12, 1e12)])
def test_retry_after_valid_values(make, value, expected):
    exc = make(value)
    assert exc.retry_after == expected
    assert expected is None or type(exc.retry_after) is float
    back = pickle.loads(pickle.dumps(exc))
    assert back.retry_after == expected and str(back) == str(exc)


def test_the_internal_fast_constructors_keep_their_values():
    # rejection / lazy_rejection (and the refusals built in C) take values the patterns computed: no check
    exc = rejection(Overloaded, "shed", 0.25)
    assert exc.retry_after == 0.25 and str(exc) == "shed"
    lazy = lazy_rejection(RateLimitExceeded, "%s over", ("x",), 1.5)
    assert lazy.retry_after == 1.5 and str(lazy) == "x over"
    assert rejection(BulkheadFullError, "full").retry_after is None
