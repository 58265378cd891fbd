"""Every rate limiter behaves as DESIGN §3c says (issues 13, 17): sync vs async, generators, pickling,
retry_after = the time until admission, `with` / `async with` blocks. Both implementations run these
(the suite runs once by default and once with BUTTRESS_NO_EXTENSIONS=1)."""
from __future__ import annotations

import asyncio
import pickle

import pytest

import buttress
from buttress import (FakeClock, FixedWindowLimiter, KeyedLimiter, LeakyBucket, MultiLimiter, RateLimitExceeded,
                      SlidingWindowLimiter, TokenBucket)

S = 1_000_000_000
SLOW = 1e-3        # one token per 1000 s: nothing refills during a test


def token_bucket(clock):
    return TokenBucket(SLOW, 1, clock=clock)


def leaky_bucket(clock):
    return LeakyBucket(SLOW, queue_size=0, clock=clock)


def leaky_queue(clock):
    return LeakyBucket(SLOW, queue_size=1, clock=clock)      # a block may wait for the next slot


def fixed(clock):
    return FixedWindowLimiter(1, 1000.0, clock=clock)


def sliding(clock):
    return SlidingWindowLimiter(1, 1000.0, clock=clock)


def multi(clock):
    return MultiLimiter(TokenBucket(SLOW, 5, clock=clock), FixedWindowLimiter(1, 1000.0, clock=clock))


LIMITERS = [token_bucket, leaky_bucket, fixed, sliding, multi]
IDS = ["TokenBucket", "LeakyBucket", "FixedWindow", "SlidingWindow", "MultiLimiter"]


@pytest.fixture(params=LIMITERS, ids=IDS)
def make(request):
    return request.param


async def answer():
    return 42


def one_left(lim) -> bool:
    """The limiter (capacity 1) has its one unit: taking it works, and then nothing is left."""
    return lim.try_acquire() and not lim.try_acquire()


# -- sync form, async function ----------------------------------------------------------------------------

def test_call_with_an_async_function_is_a_type_error_and_gives_the_unit_back(make):
    lim = make(FakeClock())
    made = []

    def fn():
        made.append(answer())
        return made[-1]

    with pytest.raises(TypeError, match=r"is async .*call_async"):
        lim.call(answer)
    with pytest.raises(TypeError, match=r"call_async"):
        lim.call(fn)
    assert made[0].cr_frame is None                  # closed: no "never awaited" warning, it never ran
    assert one_left(lim)                             # both units were given back


def test_a_decorated_sync_function_returning_an_awaitable_is_refused(make):
    lim = make(FakeClock())
    made = []

    @lim
    def fn():
        made.append(answer())
        return made[-1]

    with pytest.raises(TypeError, match=r"fn is async .*call_async"):
        fn()
    assert made[0].cr_frame is None
    assert one_left(lim)


def test_call_async_with_a_sync_function_is_a_type_error_and_gives_the_unit_back(make):
    lim = make(FakeClock())
    with pytest.raises(TypeError, match=r"call_async: .* is a sync function .*\.call\(fn"):
        asyncio.run(lim.call_async(lambda: 1))
    assert one_left(lim)


def test_an_async_decorated_function_that_returns_no_awaitable_is_refused(make):
    lim = make(FakeClock())

    class Weird:                                     # an "async" callable whose result is not awaitable
        async def __call__(self):
            return 1

    fn = lim(Weird())                                # decorated as an async function
    Weird.__call__ = lambda self: 1                  # ... whose calls now return a plain value
    with pytest.raises(TypeError, match="sync function"):
        asyncio.run(fn())
    assert one_left(lim)


def test_async_forms_still_work(make):
    lim = make(FakeClock())

    @lim
    async def fn():
        return 7

    assert asyncio.run(fn()) == 7
    with pytest.raises(RateLimitExceeded):
        asyncio.run(lim.call_async(answer))


# -- generators: one unit, taken when the iteration starts ---------------------------------------------------

def test_a_decorated_generator_takes_its_unit_when_iteration_starts(make):
    lim = make(FakeClock())

    @lim
    def stream(n):
        yield from range(n)

    a, b = stream(3), stream(2)                      # nothing taken yet
    assert list(a) == [0, 1, 2]                      # the unit is taken at the first next()
    with pytest.raises(RateLimitExceeded):
        next(b)
    assert not lim.try_acquire()


def test_a_decorated_async_generator_takes_its_unit_when_iteration_starts(make):
    lim = make(FakeClock())

    @lim
    async def stream(n):
        for i in range(n):
            yield i

    async def main():
        a, b = stream(3), stream(2)
        got = [x async for x in a]
        with pytest.raises(RateLimitExceeded):
            await b.__anext__()
        return got

    assert asyncio.run(main()) == [0, 1, 2]
    assert not lim.try_acquire()


def test_call_async_of_an_async_generator_function_returns_its_stream(make):
    lim = make(FakeClock())

    async def stream():
        yield 1
        yield 2

    async def main():
        return [x async for x in await lim.call_async(stream)]

    assert asyncio.run(main()) == [1, 2]
    assert not lim.try_acquire()                     # its unit was taken by the call


# -- pickling by reference ------------------------------------------------------------------------------------

@TokenBucket(1e6, 1000)
def tb_decorated(x):
    return x


@LeakyBucket(1e6, queue_size=10)
def lb_decorated(x):
    return x


@FixedWindowLimiter(1000, 1.0)
def fw_decorated(x):
    return x


@SlidingWindowLimiter(1000, 1.0)
def sw_decorated(x):
    return x


@MultiLimiter(TokenBucket(1e6, 1000))
def ml_decorated(x):
    return x


@TokenBucket(1e6, 1000)
def tb_stream(n):
    yield from range(n)


@TokenBucket(1e6, 1000)
async def tb_async(x):
    return x


@pytest.mark.parametrize("fn", [tb_decorated, lb_decorated, fw_decorated, sw_decorated, ml_decorated, tb_stream,
                                tb_async], ids=lambda f: f.__name__)
def test_decorated_functions_pickle_by_reference(fn):
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(fn, protocol)
        assert len(data) < 200 and pickle.loads(data) is fn


# -- retry_after: the time until admission ----------------------------------------------------------------------

@pytest.mark.parametrize("sync", [True, False], ids=["acquire", "acquire_async"])
def test_retry_after_is_the_time_until_admission_never_wait_minus_timeout(sync):
    clock = FakeClock()
    tb = TokenBucket(10.0, 1, clock=clock)
    assert tb.try_acquire()
    with pytest.raises(RateLimitExceeded) as info:
        if sync:
            tb.acquire(1, timeout=0.05)
        else:
            asyncio.run(tb.acquire_async(1, timeout=0.05))
    assert info.value.retry_after == 0.1 == tb.wait_time()
    assert clock.monotonic_ns() == 0
    clock.advance(info.value.retry_after)
    assert tb.try_acquire()                          # admitted exactly at now + retry_after


@pytest.mark.parametrize("make_window", [fixed, sliding, multi], ids=["fixed", "sliding", "multi"])
def test_window_acquire_retry_after_is_the_full_wait(make_window):
    clock = FakeClock()
    lim = make_window(clock)
    assert lim.try_acquire()
    with pytest.raises(RateLimitExceeded) as info:
        lim.acquire(1, timeout=1.0)
    assert info.value.retry_after == lim.wait_time() > 1.0


def test_leaky_bucket_retry_after_is_the_wait_for_its_slot():
    clock = FakeClock()
    lb = LeakyBucket(10.0, queue_size=1, clock=clock)
    lb.acquire()
    lb._core.reserve(1)                              # one waiter: the queue is full
    with pytest.raises(RateLimitExceeded) as info:
        lb.acquire(timeout=0.05)
    assert info.value.retry_after == 0.2 == lb.wait_time()


# -- blocks: `with limiter:` / `async with limiter:` wait for one unit (issue 17) ------------------------------

@pytest.mark.parametrize("make_block", [token_bucket, leaky_queue, fixed, sliding, multi], ids=IDS)
def test_with_waits_for_one_unit(make_block):
    clock = FakeClock()
    lim = make_block(clock)
    with lim as entered:
        assert entered is lim
    assert clock.monotonic_ns() == 0
    wait = lim.wait_time()
    assert wait > 0
    with lim:                                        # waits (FakeClock.sleep advances) for the next unit
        assert clock.monotonic() == pytest.approx(wait)


@pytest.mark.parametrize("make_block", [token_bucket, leaky_queue, fixed, sliding, multi], ids=IDS)
def test_async_with_waits_for_one_unit(make_block):
    clock = FakeClock()
    lim = make_block(clock)

    async def main():
        async with lim as entered:
            assert entered is lim
        wait = lim.wait_time()
        assert wait > 0 and clock.monotonic_ns() == 0
        async with lim:
            return wait, clock.monotonic()

    wait, elapsed = asyncio.run(main())
    assert elapsed == pytest.approx(wait)


def test_async_with_token_bucket_waits_exactly_one_interval():
    clock = FakeClock()
    tb = TokenBucket(4.0, 1, clock=clock)

    async def main():
        async with tb:
            async with tb:
                return clock.monotonic_ns()

    assert asyncio.run(main()) == S // 4


def test_a_block_exit_never_gives_a_unit_back():
    clock = FakeClock()
    tb = TokenBucket(SLOW, 2, clock=clock)
    with pytest.raises(KeyError):
        with tb:
            raise KeyError("x")                      # the unit was used: an error does not return it
    assert tb.available == 1


def test_keyed_limiter_has_no_block_form():
    kl = KeyedLimiter(1.0, 1, max_keys=10)
    with pytest.raises(TypeError, match="no `with` block: a block names no key"):
        with kl:
            pass

    async def main():
        async with kl:
            pass

    with pytest.raises(TypeError, match="no `with` block"):
        asyncio.run(main())


# -- KeyedLimiter ---------------------------------------------------------------------------------------------------

def test_keyed_call_with_an_async_function_gives_the_token_back():
    kl = KeyedLimiter(SLOW, 1, max_keys=10, clock=FakeClock())
    with pytest.raises(TypeError, match="call_async"):
        kl.call("k", answer)
    assert kl.try_acquire("k") and not kl.try_acquire("k")
    with pytest.raises(TypeError, match="sync function"):
        asyncio.run(kl.call_async("j", lambda: 1))
    assert kl.try_acquire("j") and not kl.try_acquire("j")
    assert kl.metrics().admitted == 4 and kl.metrics().rejected == 2


def test_keyed_idle_ttl_beyond_the_core_range_names_idle_ttl():
    with pytest.raises(ValueError, match=r"^idle_ttl must be .*got 300000000\.0"):
        KeyedLimiter(1.0, idle_ttl=3e8)
    assert KeyedLimiter(1.0, idle_ttl=2e8).idle_ttl == pytest.approx(2e8)
