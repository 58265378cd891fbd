"""`policy.call(fn)` / `call_async(fn)` with a fn that is not callable: a TypeError naming fn before
anything is admitted, spent or recorded -- a user's programming error is never a dependency's failure, never
spends a rate-limit unit, and a Fallback never replaces it with its fallback value (the reviewer's case:
`Fallback(0).call(None)` returned 0)."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

import buttress
from buttress import FakeClock

MAKERS = {
    "Bulkhead": lambda c: (buttress.Bulkhead(1, clock=c), lambda p: p.metrics().in_use == 0),
    "TokenBucket": lambda c: (buttress.TokenBucket(rate=1.0, capacity=1, clock=c), lambda p: p.try_acquire()),
    "LeakyBucket": lambda c: (buttress.LeakyBucket(rate=1.0, queue_size=1, clock=c), lambda p: p.try_acquire()),
    "FixedWindowLimiter": lambda c: (buttress.FixedWindowLimiter(1, 1.0, clock=c), lambda p: p.try_acquire()),
    "SlidingWindowLimiter": lambda c: (buttress.SlidingWindowLimiter(1, 1.0, clock=c), lambda p: p.try_acquire()),
    "KeyedLimiter": lambda c: (buttress.KeyedLimiter(rate=1.0, capacity=1, clock=c), lambda p: p.try_acquire("k")),
    "Retry": lambda c: (buttress.Retry(max_attempts=3, retry_on=(TypeError,), clock=c),
                        lambda p: sum(dataclasses.astuple(p.metrics())) == 0),
    "Fallback": lambda c: (buttress.Fallback(0, on=(TypeError,)), lambda p: True),
    "StaleCacheFallback": lambda c: (buttress.StaleCacheFallback(60.0), lambda p: len(p) == 0),
    "Timeout": lambda c: (buttress.Timeout(1.0, clock=c), lambda p: True),
    "LoadShedder": lambda c: (buttress.LoadShedder(max_in_flight=1, clock=c), lambda p: p.metrics().in_flight == 0),
    "ThreadPoolBulkhead": lambda c: (buttress.ThreadPoolBulkhead(1), lambda p: p.metrics().running == p.metrics().queued == 0),
    "Hedge": lambda c: (buttress.Hedge(0.05, clock=c), lambda p: True),
}


@pytest.mark.parametrize("form", ["call", "call_async"])
@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize("fn", [None, 42, "not a function"])
def test_a_non_callable_fn_is_a_type_error_and_nothing_is_taken(name, form, fn):
    policy, untouched = MAKERS[name](FakeClock())
    args = ("k", fn) if name == "KeyedLimiter" else (fn,)
    with pytest.raises(TypeError) as info:
        result = getattr(policy, form)(*args)
        if form == "call_async":
            async def run():
                return await result
            asyncio.run(run())
    assert "callable" in str(info.value)
    assert "fn must be callable" in str(info.value) and repr(fn) in str(info.value)
    assert untouched(policy), f"{name}.{form}({fn!r}) took or recorded something"


@pytest.mark.parametrize("make, owner", [
    (lambda: buttress.CircuitBreaker(name="x"), "BreakerCore"),
    (lambda: buttress.LoadShedder(max_in_flight=2).admit(buttress.Priority.HIGH), "Admission"),
])
@pytest.mark.parametrize("name", ["__exit__", "__aexit__"])
def test_exit_with_the_wrong_arguments_says_the_same_in_both_implementations(make, owner, name):
    """The compiled C methods take exactly 3 positional arguments; the twins raise the same messages
    (the reviewer saw "expected 3 arguments" against Python's "missing 3 required positional arguments")."""
    obj = make()
    method = getattr(obj, name)
    for args in [(), (None,), (None, None, None, None)]:
        with pytest.raises(TypeError) as info:
            method(*args)
        assert str(info.value) == (f"{name}() takes exactly 3 positional arguments (exc_type, exc, tb), "
                                   f"got {len(args)}")
    with pytest.raises(TypeError) as info:
        method(exc_type=None, exc=None, tb=None)
    # the class named depends on how CPython reached the C method (BreakerCore or CircuitBreaker)
    assert str(info.value).endswith(f".{name}() takes no keyword arguments")
