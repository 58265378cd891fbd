"""Fallback and StaleCacheFallback."""
from __future__ import annotations

import asyncio
import threading

import pytest

import buttress
from buttress import FakeClock, Fallback, StaleCacheFallback
from buttress.fallback import Stale, served_stale
from helpers import race


def run(coro, limit: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, limit))


def fail(exc):
    def f(*args, **kwargs):
        raise exc
    return f


def test_exports():
    assert buttress.Fallback is Fallback and buttress.StaleCacheFallback is StaleCacheFallback


# -- Fallback -----------------------------------------------------------------------------------------


def test_value_on_failure_and_passthrough_on_success():
    fb = Fallback("default")
    assert fb.call(lambda: "real") == "real"
    assert fb.call(fail(ValueError("x"))) == "default"
    assert Fallback(None).call(fail(RuntimeError())) is None


def test_callable_gets_exception_and_arguments():
    seen = []

    def handler(exc, *args, **kwargs):
        seen.append((type(exc), args, kwargs))
        return "handled"

    @Fallback(handler)
    def get(a, b=0):
        raise ConnectionError(a)

    assert get(1, b=2) == "handled"
    assert seen == [(ConnectionError, (1,), {"b": 2})]


def test_on_filters_exceptions():
    fb = Fallback("d", on=(ConnectionError, TimeoutError))
    assert fb.call(fail(ConnectionResetError())) == "d"      # subclass matches
    with pytest.raises(KeyError):
        fb.call(fail(KeyError("k")))
    pred = Fallback("d", on=lambda e: "retryable" in str(e))
    assert pred.call(fail(RuntimeError("retryable"))) == "d"
    with pytest.raises(RuntimeError):
        pred.call(fail(RuntimeError("fatal")))


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError])
def test_never_catches_base_exceptions(exc):
    with pytest.raises(exc):
        Fallback("d").call(fail(exc()))
    with pytest.raises(exc):
        Fallback("d", on=lambda e: True).call(fail(exc()))
    with pytest.raises(exc):
        StaleCacheFallback(10).call(fail(exc()))


def test_chain_tries_each_in_order():
    calls = []

    def first(exc):
        calls.append(("first", type(exc)))
        raise ConnectionError("replica down")

    def second(exc):
        calls.append(("second", type(exc)))
        raise TimeoutError("cache slow")

    fb = Fallback([first, second, "static"])
    assert fb.call(fail(ValueError())) == "static"
    # each link gets the exception the previous one raised
    assert calls == [("first", ValueError), ("second", ConnectionError)]


def test_chain_stops_at_first_success_and_raises_last_failure():
    assert Fallback([fail(OSError()), lambda exc: "b", "c"]).call(fail(ValueError())) == "b"
    with pytest.raises(TimeoutError) as ei:
        Fallback([fail(OSError("a")), fail(TimeoutError("b"))]).call(fail(ValueError("orig")))
    assert isinstance(ei.value.__context__, OSError)            # the whole story is kept
    assert isinstance(ei.value.__context__.__context__, ValueError)


def test_chain_link_failure_not_matching_on_propagates():
    fb = Fallback([fail(KeyError("bug")), "never"], on=(ConnectionError,))
    with pytest.raises(KeyError):
        fb.call(fail(ConnectionError()))


def test_callable_as_value_needs_a_lambda():
    def handler():
        return 1

    fb = Fallback(lambda exc: handler)
    assert fb.call(fail(ValueError())) is handler
    assert Fallback(lambda exc: [1, 2]).call(fail(ValueError())) == [1, 2]


def test_async_call_and_async_fallback():
    async def boom(x):
        await asyncio.sleep(0)
        raise ConnectionError(x)

    async def async_handler(exc, x):
        await asyncio.sleep(0)
        return f"async {x} {type(exc).__name__}"

    async def main():
        assert await Fallback(async_handler).call_async(boom, 1) == "async 1 ConnectionError"
        assert await Fallback(lambda exc, x: f"sync {x}").call_async(boom, 2) == "sync 2"
        assert await Fallback("v").call_async(boom, 3) == "v"

        async def async_fail(exc, x):
            raise OSError("also down")

        assert await Fallback([async_fail, "last"]).call_async(boom, 4) == "last"

        @Fallback("cached")
        async def decorated():
            raise TimeoutError

        assert await decorated() == "cached"

        async def cancelled():
            raise asyncio.CancelledError

        with pytest.raises(asyncio.CancelledError):
            await Fallback("no").call_async(cancelled)

    run(main())


def test_async_fallback_in_sync_call_is_refused():
    async def handler(exc):
        return 1

    with pytest.raises(TypeError, match="awaitable"):
        Fallback(handler).call(fail(ValueError()))


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"fallback": []}, ValueError, ["fallback", "non-empty", "[]"]),
    ({"fallback": 1, "on": KeyboardInterrupt}, ValueError, ["on", "KeyboardInterrupt", "Exception"]),
    ({"fallback": 1, "on": (ValueError, BaseException)}, ValueError, ["on", "BaseException"]),
    ({"fallback": 1, "on": (ValueError, 3)}, TypeError, ["on", "3"]),
    ({"fallback": 1, "on": "ValueError"}, TypeError, ["on", "'ValueError'"]),
])
def test_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc) as ei:
        Fallback(**kwargs)
    for w in words:
        assert w in str(ei.value)


# -- StaleCacheFallback -------------------------------------------------------------------------------


def test_stale_cache_serves_last_good_within_max_age():
    clock = FakeClock()
    sc = StaleCacheFallback(max_age=10.0, clock=clock)
    results = {"v": 1, "fail": False}

    @sc
    def price(item):
        if results["fail"]:
            raise ConnectionError("down")
        return (item, results["v"])

    assert price("a") == ("a", 1) and served_stale() is None
    results["fail"] = True
    clock.advance(4.0)
    assert price("a") == ("a", 1)
    info = served_stale()
    assert isinstance(info, Stale) and info.age == 4.0 and info.key == ("a",)
    assert isinstance(info.exception, ConnectionError)
    with pytest.raises(ConnectionError):          # never cached for this key
        price("b")
    clock.advance(6.0)
    assert price("a") == ("a", 1)                 # exactly max_age old: still served
    clock.advance(0.5)
    with pytest.raises(ConnectionError):          # too old
        price("a")
    results["fail"] = False
    results["v"] = 2
    assert price("a") == ("a", 2) and served_stale() is None     # fresh again


def test_stale_cache_keys_and_on_stale_hook():
    clock = FakeClock()
    served = []
    sc = StaleCacheFallback(60.0, key=lambda user, **kw: user, clock=clock, on_stale=served.append)
    state = {"fail": False}

    def fetch(user, verbose=False):
        if state["fail"]:
            raise TimeoutError
        return f"{user}:{verbose}"

    assert sc.call(fetch, "ann", verbose=True) == "ann:True"
    state["fail"] = True
    assert sc.call(fetch, "ann") == "ann:True"     # same key, other kwargs
    assert [s.key for s in served] == ["ann"]


def test_stale_cache_default_key_and_unhashable_args():
    sc = StaleCacheFallback(60.0, clock=FakeClock())
    assert sc.call(lambda a, b=0: a + b, 1, b=2) == 3
    assert sc.call(fail(OSError()), 1, b=2) == 3
    with pytest.raises(OSError):
        sc.call(fail(OSError()), 1, b=3)
    with pytest.raises(TypeError, match="key="):
        sc.call(lambda x: x, [1, 2])


def test_stale_cache_on_filter_and_max_entries():
    clock = FakeClock()
    sc = StaleCacheFallback(60.0, on=(ConnectionError,), clock=clock, max_entries=2)
    for k in "abc":
        sc.call(lambda k: k.upper(), k)
    assert len(sc) == 2                            # "a" was dropped
    with pytest.raises(ConnectionError):
        sc.call(fail(ConnectionError()), "a")
    assert sc.call(fail(ConnectionError()), "c") == "C"
    with pytest.raises(KeyError):                  # not in `on`: never served stale
        sc.call(fail(KeyError()), "c")
    sc.clear()
    assert len(sc) == 0


def test_stale_cache_async():
    clock = FakeClock()
    sc = StaleCacheFallback(5.0, clock=clock)
    state = {"fail": False}

    @sc
    async def quote(sym):
        await clock.sleep_async(1.0)
        if state["fail"]:
            raise ConnectionError
        return 100

    async def main():
        assert await quote("X") == 100
        state["fail"] = True
        assert await quote("X") == 100
        assert served_stale().age == 1.0
        await clock.sleep_async(10.0)
        with pytest.raises(ConnectionError):
            await quote("X")

    run(main())


def test_served_stale_is_per_thread():
    clock = FakeClock()
    sc = StaleCacheFallback(60.0, clock=clock)
    sc.call(lambda: 1)
    assert sc.call(fail(OSError())) == 1 and served_stale() is not None
    other = []
    t = threading.Thread(target=lambda: other.append(served_stale()))
    t.start()
    t.join()
    assert other == [None]


def test_stale_cache_threads(fast_switching):
    clock = FakeClock()
    sc = StaleCacheFallback(60.0, clock=clock, max_entries=8)

    def body(i):
        stale = 0
        for j in range(300):
            k = j % 16
            if j % 3 == 0:
                assert sc.call(lambda k: k * 10, k) == k * 10
            else:
                try:
                    assert sc.call(fail(OSError()), k) == k * 10
                    stale += 1
                except OSError:
                    pass
        return stale

    race(8, body)
    assert len(sc) <= 8


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"max_age": 0}, ValueError, ["max_age", "0", "> 0"]),
    ({"max_age": -5}, ValueError, ["max_age", "-5"]),
    ({"max_age": "5"}, TypeError, ["max_age", "'5'", "number"]),
    ({"max_age": 5, "on": SystemExit}, ValueError, ["on", "SystemExit"]),
    ({"max_age": 5, "key": "user"}, TypeError, ["key", "'user'", "callable"]),
    ({"max_age": 5, "max_entries": 0}, ValueError, ["max_entries", "0"]),
    ({"max_age": 5, "max_entries": 2.0}, TypeError, ["max_entries", "2.0", "int"]),
    ({"max_age": 5, "on_stale": 1}, TypeError, ["on_stale", "1", "callable"]),
    ({"max_age": 5, "clock": "now"}, TypeError, ["clock", "'now'"]),
])
def test_stale_cache_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc) as ei:
        StaleCacheFallback(**kwargs)
    for w in words:
        assert w in str(ei.value)


def test_decorated_method_and_non_callable():
    class Svc:
        @Fallback(lambda exc, self, x: (self.name, x))
        def get(self, x):
            raise ConnectionError

        name = "svc"

    assert Svc().get(3) == ("svc", 3)
    with pytest.raises(TypeError, match="decorates a callable"):
        Fallback(1)("not callable")
