"""One validation layer (buttress._params, DESIGN §3c): every public numeric parameter takes any real
number (int, float, Fraction, numpy scalar) in its range; bool, NaN, inf, huge ints and non-numbers are a
ValueError / TypeError naming the parameter, the value and what is allowed, never an OverflowError."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

import buttress
from buttress import FakeClock, Retry, RetryBudget, Timeout, TokenBucket


# -- the cases of issue 13 ------------------------------------------------------------------------------

def test_a_huge_int_timeout_is_a_value_error_naming_seconds():
    with pytest.raises(ValueError, match=r"seconds must be a finite number > 0 and <= 1e\+09, got an int of about "
                                         r"401 digits \(~1e400\)"):
        Timeout(10**400)


def test_a_huge_int_beyond_the_int_str_limit_is_described_not_printed():
    with pytest.raises(ValueError, match="about 5001 digits"):
        Timeout(10**5000)       # its repr would raise "Exceeds the limit (4300 digits)"


def test_a_subnormal_budget_ratio_works_like_almost_zero():
    clock = FakeClock()
    budget = RetryBudget(ratio=5e-324, min_per_second=0.3, ttl=10.0, clock=clock)
    assert budget.balance == 3              # the floor alone
    for _ in range(1000):
        budget.deposit()
    assert budget.balance == 3
    assert budget.try_withdraw() and budget.balance == 2


def test_a_fake_clock_beyond_int64_ns_is_a_value_error():
    with pytest.raises(ValueError, match="start must be a finite number"):
        FakeClock(start=1e300)


def test_a_rate_too_low_for_int64_blames_rate_first():
    with pytest.raises(ValueError) as info:
        TokenBucket(rate=1e-12)             # capacity defaults from the rate: the user never passed it
    assert str(info.value).startswith("rate must be >= 2.17e-10 per second"), info.value
    assert "got 1e-12" in str(info.value)
    with pytest.raises(ValueError) as info:
        TokenBucket(rate=1e-9, capacity=10**9)
    assert str(info.value).startswith("rate=1e-09 is too low for capacity=1000000000"), info.value
    assert "lower capacity to <= 4" in str(info.value)


@pytest.mark.parametrize("backoff", [-1, -0.5, Fraction(-1, 2), np.float64(-1)])
def test_a_negative_backoff_names_backoff(backoff):
    with pytest.raises(ValueError, match="^backoff must be a finite number >= 0"):
        Retry(backoff=backoff)


@pytest.mark.parametrize("seconds, expected", [(np.int64(1), 1.0), (Fraction(1, 2), 0.5), (np.float32(0.25), 0.25),
                                               (np.uint8(2), 2.0), (-0.0, 0.0)])
def test_any_real_number_of_seconds_is_a_backoff(seconds, expected):
    r = Retry(backoff=seconds)
    assert r.backoff.delay(1) == expected and r.backoff.delay(5) == expected
    assert math.copysign(1.0, r.backoff.delay(1)) == 1.0        # -0.0 reads as 0.0


@pytest.mark.parametrize("value", [np.int64(3), Fraction(3, 1), np.float64(3.0), 3])
def test_any_real_number_is_a_timeout(value):
    assert Timeout(value).seconds == 3.0 and type(Timeout(value).seconds) is float


def test_a_huge_retry_after_on_an_exception_is_capped_not_an_overflow():
    clock = FakeClock()
    waits = []

    class Busy(Exception):
        retry_after = 10**400

    def fail():
        raise Busy()

    r = Retry(max_attempts=2, backoff=0, clock=clock, on_retry=lambda a, e, d: waits.append(d))
    with pytest.raises(Busy):
        r.call(fail)
    assert waits == [1e9]


def test_messages_never_leak_overflow_error_from_the_shared_helpers():
    from buttress._params import check_float, check_int, check_seconds, emission_interval_ns, seconds_to_ns
    for call in (lambda: check_float("x", 10**400), lambda: check_float("x", Fraction(10**400, 3)),
                 lambda: check_seconds("x", -10**400), lambda: seconds_to_ns("x", 10**400),
                 lambda: emission_interval_ns(10**400, 1), lambda: emission_interval_ns(1.0, 10**400),
                 lambda: check_int("x", 10**400), lambda: check_int("x", -10**400, minimum=None)):
        with pytest.raises(ValueError, match="^x must be|^rate must be|^capacity must be"):
            call()


# -- exception specs: one parser (buttress._spec) --------------------------------------------------------

class Halt(BaseException):
    """A custom BaseException (as gevent / trio cancellation use)."""


def _constructors():
    from buttress import CircuitBreaker, Fallback, Retry
    from buttress.fallback import StaleCacheFallback
    return [
        ("retry_on", lambda spec: Retry(retry_on=spec)),
        ("on", lambda spec: Fallback(0, on=spec)),
        ("on", lambda spec: StaleCacheFallback(1.0, on=spec)),
        ("record", lambda spec: CircuitBreaker(name="spec", record=spec)),
        ("ignore", lambda spec: CircuitBreaker(name="spec", ignore=spec)),
    ]


@pytest.mark.parametrize("spec", [KeyboardInterrupt, SystemExit, GeneratorExit, Halt, BaseException,
                                  (ValueError, KeyboardInterrupt), [Halt]])
@pytest.mark.parametrize("i", range(5))
def test_naming_a_class_that_is_not_an_exception_is_a_value_error(spec, i):
    name, make = _constructors()[i]
    with pytest.raises(ValueError, match=f"^{name} must name Exception subclasses, got "):
        make(spec)


@pytest.mark.parametrize("pred", [lambda: True, lambda a, b: True, lambda *, exc: True])
@pytest.mark.parametrize("i", range(5))
def test_a_predicate_of_the_wrong_arity_is_a_type_error_at_construction(pred, i):
    name, make = _constructors()[i]
    with pytest.raises(TypeError, match=f"^{name} must accept 1 positional argument"):
        make(pred)


@pytest.mark.parametrize("i", range(5))
def test_an_async_predicate_is_refused(i):
    async def pred(exc):
        return True

    name, make = _constructors()[i]
    with pytest.raises(TypeError, match=f"^{name} must be a plain function.*pred is an async def function"):
        make(pred)


@pytest.mark.parametrize("pred", [lambda e: True, lambda e, extra=1: True, lambda *a: True, callable])
def test_predicates_that_take_one_argument_are_accepted(pred):
    for _, make in _constructors():
        make(pred)


def test_the_parser_returns_classes_or_a_predicate():
    from buttress._spec import ExceptionSpec, parse_exceptions

    def pred(e):
        return True

    assert parse_exceptions("x", ValueError) == ExceptionSpec((ValueError,), None)
    assert parse_exceptions("x", [ValueError, OSError]) == ExceptionSpec((ValueError, OSError), None)
    assert parse_exceptions("x", ()) == ExceptionSpec((), None)
    assert parse_exceptions("x", pred) == ExceptionSpec((), pred)
    assert parse_exceptions("x", (ValueError,)).as_pair() == ((ValueError,), None)
    assert parse_exceptions("x", ()).as_pair() == (None, None)
    m = parse_exceptions("x", lambda e: True).matcher()
    assert m(ValueError()) and not m(Halt()) and not m(KeyboardInterrupt())     # predicates never see them
    with pytest.raises(TypeError, match=r"^x must be exception classes or a predicate, got 3 in \(<class"):
        parse_exceptions("x", (ValueError, 3))
    with pytest.raises(TypeError, match=r"^x must be an exception class, a tuple of them, or a predicate"):
        parse_exceptions("x", "ValueError")


# -- callables: kind and arity checked when given --------------------------------------------------------

async def _async_hook(*args):
    return None


def _gen_fn():
    yield True


async def _agen_fn():
    yield True


@pytest.mark.parametrize("kwargs, words", [
    (dict(on_retry=lambda attempt, exc: None), "on_retry must accept 3 positional arguments"),
    (dict(on_retry=_async_hook), "on_retry must be a plain function called as on_retry(attempt, exception, delay)"),
    (dict(on_give_up=lambda attempt: None), "on_give_up must accept 2 positional arguments"),
    (dict(on_give_up=_gen_fn), "on_give_up must be a plain function"),
    (dict(retry_on_result=lambda: True), "retry_on_result must accept 1 positional argument"),
    (dict(retry_on_result=_async_hook), "retry_on_result must be a plain function"),
    (dict(backoff=lambda: 1.0), "backoff must accept 1 positional argument"),
    (dict(backoff=_async_hook), "backoff must be a plain function"),
    (dict(idempotency_key=_async_hook), "idempotency_key must be a plain function"),
])
def test_retry_callables_are_checked_at_construction(kwargs, words):
    with pytest.raises(TypeError, match=f"^{words}".replace("(", r"\(").replace(")", r"\)")):
        Retry(**kwargs)


def test_a_retry_on_predicate_of_the_wrong_arity_no_longer_replaces_the_users_exception():
    with pytest.raises(TypeError, match="retry_on must accept 1 positional argument"):
        Retry(retry_on=lambda: True)        # was: accepted, then a TypeError replaced the call's exception


def test_a_hook_returning_a_coroutine_is_refused_not_left_unawaited():
    import gc
    import warnings

    async def notify(*args):
        return None

    r = Retry(max_attempts=2, backoff=0, clock=FakeClock(), on_retry=lambda a, e, d: notify(a, e, d))

    def fail():
        raise ConnectionError("down")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match="<lambda> is async"):
            r.call(fail)
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]


@pytest.mark.parametrize("fallback, words", [
    (lambda: 1, "fallback must accept at least 1 positional argument"),
    ([1, lambda: 2], r"fallback\[1\] must accept at least 1 positional argument"),
    (_gen_fn, "fallback must be a plain function or an async def function"),
    (_agen_fn, "fallback must be a plain function or an async def function"),
])
def test_fallback_callables_are_checked_at_construction(fallback, words):
    with pytest.raises(TypeError, match=f"^{words}"):
        buttress.Fallback(fallback)


def test_fallback_callables_that_take_the_exception_are_accepted():
    buttress.Fallback(lambda exc: 1)
    buttress.Fallback(lambda exc, *args, **kwargs: 1)
    buttress.Fallback(_async_hook)
    buttress.Fallback([lambda exc, x: x, print])        # print: no arity to check, accepted


def test_stale_cache_callables_are_checked_at_construction():
    from buttress.fallback import StaleCacheFallback
    with pytest.raises(TypeError, match="^on_stale must accept 1 positional argument"):
        StaleCacheFallback(1.0, on_stale=lambda: None)
    with pytest.raises(TypeError, match="^key must be a plain function"):
        StaleCacheFallback(1.0, key=_async_hook)


@pytest.mark.parametrize("fn, words", [
    (_gen_fn, "fn must be a plain function or an async def function.*_gen_fn is a generator function"),
    (_agen_fn, "fn must be a plain function or an async def function.*_agen_fn is an async generator function"),
    (lambda db: True, "fn must accept 0 positional arguments"),
])
def test_health_checks_are_checked_at_registration(fn, words):
    from buttress.health import HealthRegistry
    h = HealthRegistry()
    for add in (h.add_liveness, h.add_readiness, h.add_startup):
        with pytest.raises(TypeError, match=f"^{words}"):
            add("check", fn)


def test_a_sync_health_check_returning_a_coroutine_is_awaited_not_reported_up():
    from buttress.health import HealthRegistry

    async def ping():
        return False

    h = HealthRegistry(clock=FakeClock())
    h.add_readiness("db", lambda: ping())
    report = h.check_sync("readiness")
    assert report.status == "down" and report["checks"]["db"]["error"] == "check returned False"


def test_adaptive_callables_are_checked_at_construction():
    from buttress.adaptive import AdaptiveThrottle, Gradient2Limit
    with pytest.raises(TypeError, match="^rng must accept 0 positional arguments"):
        AdaptiveThrottle(rng=lambda x: 0.5)
    with pytest.raises(TypeError, match="^queue_size must accept 1 positional argument"):
        Gradient2Limit(queue_size=lambda: 4)


def test_listeners_must_be_plain_functions_of_the_event():
    from buttress._observe import check_listener
    with pytest.raises(TypeError, match=r"^callback must be a plain function called as callback\(event\); "
                                        r"_async_hook is an async def function"):
        check_listener("callback", _async_hook)
    with pytest.raises(TypeError, match="^callback must accept 1 positional argument"):
        check_listener("callback", lambda: None)
    f = lambda event: None  # noqa: E731
    assert check_listener("callback", f) is f


# -- the package's namespace ------------------------------------------------------------------------------

def test_dir_lists_only_the_public_api():
    names = dir(buttress)
    for private in ("Any", "annotations", "importlib", "TYPE_CHECKING", "_LAZY", "_impl"):
        assert private not in names
    assert set(buttress.__all__) <= set(names)
    assert {"Retry", "CircuitBreaker", "FakeClock", "backoff", "health", "IMPLEMENTATION", "__version__"} <= set(names)
    assert all(not n.startswith("_") or n == "__version__" for n in names), names
    for name in names:
        getattr(buttress, name)         # every listed name resolves
