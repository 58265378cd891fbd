"""LoadShedder: priority admission, CRITICAL never shed, exact under races, adaptive capacity, bad input."""
import asyncio
import threading

import pytest

from buttress import FakeClock, LoadShedder, Overloaded, Priority, Rejected
from buttress.adaptive import AIMDLimit
from helpers import race


def test_priority_order():
    assert Priority.CRITICAL > Priority.HIGH > Priority.MEDIUM > Priority.LOW
    assert sorted([Priority.HIGH, Priority.LOW, Priority.CRITICAL, Priority.MEDIUM]) == list(Priority)


def _fill(shed, priority, n):
    held = []
    for _ in range(n):
        adm = shed.admit(priority)
        adm.__enter__()
        held.append(adm)
    return held


def test_each_priority_admitted_below_its_fraction_of_capacity():
    shed = LoadShedder(max_in_flight=100)
    held = _fill(shed, Priority.LOW, 50)                 # LOW: while in_flight < 50
    with pytest.raises(Overloaded):
        shed.admit(Priority.LOW).__enter__()
    held += _fill(shed, Priority.MEDIUM, 25)             # MEDIUM: while < 75
    with pytest.raises(Overloaded):
        shed.admit(Priority.MEDIUM).__enter__()
    held += _fill(shed, Priority.HIGH, 15)               # HIGH: while < 90
    with pytest.raises(Overloaded):
        shed.admit(Priority.HIGH).__enter__()
    held += _fill(shed, Priority.CRITICAL, 500)          # CRITICAL: always, even past capacity
    assert shed.in_flight == 590
    m = shed.metrics()
    assert dict(m.admitted) == {Priority.LOW: 50, Priority.MEDIUM: 25, Priority.HIGH: 15, Priority.CRITICAL: 500}
    assert dict(m.shed) == {Priority.LOW: 1, Priority.MEDIUM: 1, Priority.HIGH: 1, Priority.CRITICAL: 0}
    for adm in held:
        adm.__exit__(None, None, None)
    assert shed.in_flight == 0


def test_shed_order_holds_under_saturation():
    """With load rising, LOW is refused first, then MEDIUM, then HIGH; CRITICAL never."""
    shed = LoadShedder(max_in_flight=40, fractions={Priority.LOW: 0.25, Priority.MEDIUM: 0.5, Priority.HIGH: 0.75})
    held, first_refused = [], {}
    for step in range(200):
        for p in Priority:
            try:
                adm = shed.admit(p)
                adm.__enter__()
                held.append(adm)
            except Overloaded:
                first_refused.setdefault(p, step)
    assert Priority.CRITICAL not in first_refused
    assert first_refused[Priority.LOW] < first_refused[Priority.MEDIUM] < first_refused[Priority.HIGH]
    assert shed.metrics().admitted[Priority.CRITICAL] == 200


def test_overloaded_on_entering_with_retry_after_from_latency():
    clock = FakeClock()
    shed = LoadShedder(max_in_flight=2, clock=clock)
    with shed.admit(Priority.HIGH):
        clock.advance(0.2)
    err = None
    with shed.admit(Priority.LOW):                      # in_flight 0 < 1
        try:
            with shed.admit(Priority.LOW):              # in_flight 1, not < 2 * 0.5
                pass
        except Overloaded as exc:
            err = exc
    assert err is not None and err.retry_after == pytest.approx(0.2)
    assert LoadShedder(max_in_flight=1, fractions={Priority.LOW: 0.1}).admit(Priority.LOW).__enter__()
    fresh = LoadShedder(max_in_flight=1)
    with fresh.admit(Priority.CRITICAL):
        with pytest.raises(Overloaded) as info:
            fresh.call(lambda: None, priority=Priority.HIGH)
    assert info.value.retry_after is None               # nothing measured yet


def test_call_decorator_and_async():
    shed = LoadShedder(max_in_flight=10)

    @shed
    def f(x):
        return shed.in_flight + x

    @shed
    async def g(x):
        return shed.in_flight + x

    assert f(1) == 2 and f(1, priority=Priority.LOW) == 2
    assert asyncio.run(g(10, priority=Priority.CRITICAL)) == 11
    assert shed.call(lambda a, b: a + b, 1, b=2, priority=Priority.HIGH) == 3

    async def main():
        async with shed.admit(Priority.LOW):
            assert shed.in_flight == 1
        return await shed.call_async(g.__wrapped__, 5, priority=Priority.MEDIUM)

    assert asyncio.run(main()) == 6
    m = shed.metrics()
    assert m.admitted[Priority.MEDIUM] == 2 and m.admitted[Priority.LOW] == 2 and m.in_flight == 0
    with pytest.raises(ZeroDivisionError):
        shed.call(lambda: 1 / 0)
    assert shed.in_flight == 0                          # an error frees the slot


def test_exact_under_racing_threads(fast_switching):
    shed = LoadShedder(max_in_flight=40)                # LOW admitted while < 20
    admitted = []
    lock = threading.Lock()

    def body(i):
        got = 0
        for _ in range(50):
            try:
                adm = shed.admit(Priority.LOW)
                adm.__enter__()
            except Overloaded:
                continue
            with lock:
                admitted.append(adm)
            got += 1
        return got

    assert sum(race(8, body)) == 20                     # nobody leaves: exactly 20 ever get in
    assert shed.in_flight == 20
    for adm in admitted:
        adm.__exit__(None, None, None)
    assert shed.in_flight == 0


def test_exact_under_1000_async_tasks():
    shed = LoadShedder(max_in_flight=100)               # MEDIUM while < 75
    release = None

    async def one(p):
        try:
            async with shed.admit(p):
                await release.wait()
                return True
        except Overloaded:
            return False

    async def main():
        nonlocal release
        release = asyncio.Event()
        tasks = [asyncio.ensure_future(one(Priority.MEDIUM)) for _ in range(1000)]
        tasks += [asyncio.ensure_future(one(Priority.CRITICAL)) for _ in range(10)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert shed.in_flight == 85
        release.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert sum(results[:1000]) == 75 and all(results[1000:])
    assert shed.in_flight == 0


def test_adaptive_limiter_sets_the_capacity_and_gets_samples():
    clock = FakeClock()
    limit = AIMDLimit(initial_limit=10, min_limit=2, max_limit=50, timeout=1.0)
    shed = LoadShedder(limiter=limit, clock=clock)
    assert shed.capacity == 10
    held = _fill(shed, Priority.CRITICAL, 6)
    for adm in held:                                    # +1 for each fast call made while busy (in_flight >= limit / 2)
        adm.__exit__(None, None, None)
    assert limit.limit == 12 and shed.capacity == 12
    with shed.admit(Priority.CRITICAL):
        clock.advance(2.0)                              # slower than the timeout: x 0.9
    assert limit.limit == 10
    with pytest.raises(TimeoutError):
        with shed.admit(Priority.CRITICAL):
            raise TimeoutError                          # a drop: x 0.9
    assert limit.limit == 9

    async def cancelled():
        async with shed.admit(Priority.CRITICAL):
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancelled())
    assert limit.limit == 9                             # cancellation is no sample
    assert LoadShedder(max_in_flight=5, limiter=limit).capacity == 5


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(max_in_flight=0), ValueError, ["max_in_flight", "0"]),
    (dict(max_in_flight=2.5), TypeError, ["max_in_flight", "2.5"]),
    (dict(fractions={Priority.LOW: 0}), ValueError, ["fractions[LOW]", "0"]),
    (dict(fractions={Priority.LOW: 1.5}), ValueError, ["fractions[LOW]", "1.5"]),
    (dict(fractions={Priority.CRITICAL: 0.5}), ValueError, ["CRITICAL"]),
    (dict(fractions={Priority.LOW: 0.9, Priority.HIGH: 0.5}), ValueError, ["decrease"]),
    (dict(fractions={"LOW": 0.5}), TypeError, ["priority", "'LOW'"]),
    (dict(fractions=[0.5]), TypeError, ["fractions", "mapping"]),
    (dict(limiter=object()), TypeError, ["limiter", "on_sample"]),
    (dict(clock=3), TypeError, ["clock"]),
    (dict(default_priority=7), ValueError, ["priority", "7"]),
    (dict(drop_on=5), TypeError, ["drop_on"]),
])
def test_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc) as info:
        LoadShedder(**kwargs)
    for w in words:
        assert w in str(info.value)


def test_bad_priority_at_admission():
    shed = LoadShedder()
    with pytest.raises(ValueError, match="priority must be a buttress.Priority"):
        shed.admit(9)
    with pytest.raises(TypeError, match="priority"):
        shed.admit("HIGH")
    assert shed.admit(2)._priority is Priority.HIGH


def test_admission_exits_once_and_cannot_be_entered_twice():
    from buttress import LoadShedder, Priority
    shed = LoadShedder(max_in_flight=10)
    other = shed.admit(Priority.CRITICAL)
    other.__enter__()
    adm = shed.admit(Priority.CRITICAL)
    with adm:
        assert shed.in_flight == 2
        with pytest.raises(RuntimeError, match="already entered"):
            adm.__enter__()
        assert shed.in_flight == 2
    adm.__exit__(None, None, None)          # a second exit: used to free `other`'s slot
    assert shed.in_flight == 1
    with adm:                               # entered again after its exit: admits anew
        assert shed.in_flight == 2
    other.__exit__(None, None, None)
    assert shed.in_flight == 0
    shed.admit().__exit__(None, None, None)  # never entered: nothing to free
    assert shed.in_flight == 0


def test_admission_async_second_exit_is_a_no_op():
    import asyncio
    from buttress import LoadShedder

    async def main():
        shed = LoadShedder(max_in_flight=10)
        adm = shed.admit()
        async with adm:
            assert shed.in_flight == 1
        await adm.__aexit__(None, None, None)
        assert shed.in_flight == 0

    asyncio.run(main())


def test_a_failing_clock_gives_the_slot_back():
    from buttress import LoadShedder

    class Clock:
        fail = False

        def monotonic(self):
            return 0.0

        def monotonic_ns(self):
            if self.fail:
                raise OSError("clock")
            return 0

        def sleep(self, s):
            pass

        async def sleep_async(self, s):
            pass

    clock = Clock()
    shed = LoadShedder(max_in_flight=10, clock=clock)
    adm = shed.admit()
    clock.fail = True
    with pytest.raises(OSError):
        adm.__enter__()
    assert shed.in_flight == 0
    clock.fail = False
    shed = LoadShedder(max_in_flight=10, clock=clock)   # its first admission is timed (a sampled one)
    adm = shed.admit()
    adm.__enter__()
    clock.fail = True
    with pytest.raises(OSError):
        adm.__exit__(None, None, None)
    assert shed.in_flight == 0


def test_double_exits_racing_threads_never_exceed_capacity(fast_switching):
    import threading
    from buttress import LoadShedder, Overloaded, Priority
    from helpers import race
    shed = LoadShedder(max_in_flight=4, fractions={Priority.LOW: 1.0, Priority.MEDIUM: 1.0, Priority.HIGH: 1.0})
    lock, inside, peak = threading.Lock(), [0], [0]

    def body(i):
        for _ in range(300):
            adm = shed.admit(Priority.LOW)
            try:
                with adm:
                    with lock:
                        inside[0] += 1
                        peak[0] = max(peak[0], inside[0])
                    with lock:
                        inside[0] -= 1
            except Overloaded:
                pass
            adm.__exit__(None, None, None)

    race(8, body)
    assert peak[0] <= 4 and shed.in_flight == 0


@pytest.mark.parametrize("path", ["fast", "system-clock", "limiter"])
def test_an_entered_admission_collected_without_exit_gives_its_slot_back(path):
    # DESIGN §3c: a permit dropped without a report is returned when collected (the compiled Admission in
    # tp_dealloc, the twin in __del__); it used to stay in flight for ever. "limiter" is the Python path.
    import gc
    kwargs = {"fast": dict(max_in_flight=2, clock=FakeClock()), "system-clock": dict(max_in_flight=2),
              "limiter": dict(limiter=AIMDLimit(initial_limit=2, min_limit=1, max_limit=4), clock=FakeClock())}[path]
    shed = LoadShedder(**kwargs)
    kept = shed.admit(Priority.CRITICAL)
    kept.__enter__()
    dropped = shed.admit(Priority.CRITICAL)
    dropped.__enter__()
    assert shed.in_flight == 2
    del dropped
    gc.collect()
    assert shed.in_flight == 1
    exited = shed.admit(Priority.CRITICAL)
    with exited:
        pass
    del exited                              # exited: collecting it gives nothing back (never double)
    gc.collect()
    assert shed.in_flight == 1
    # the next admissions (the compiled freelist hands out the dropped objects) start clean
    fresh = [shed.admit(Priority.CRITICAL) for _ in range(3)]
    for adm in fresh:
        adm.__enter__()
    assert shed.in_flight == 4
    for adm in fresh:
        adm.__exit__(None, None, None)
    kept.__exit__(None, None, None)
    assert shed.in_flight == 0
    m = shed.metrics()
    assert m.admitted[Priority.CRITICAL] == 6


def test_an_async_admission_dropped_inside_its_block_gives_its_slot_back():
    import gc

    async def main():
        shed = LoadShedder(max_in_flight=2, clock=FakeClock())
        adm = shed.admit(Priority.HIGH)
        await adm.__aenter__()
        assert shed.in_flight == 1
        del adm
        gc.collect()
        return shed.in_flight

    assert asyncio.run(main()) == 0


def test_a_refused_second_enter_claims_nothing():
    # the reviewer's case, isolated: the refusal comes before the permit, so one exit frees the one slot
    import gc
    shed = LoadShedder(max_in_flight=2, clock=FakeClock())
    adm = shed.admit(Priority.CRITICAL)
    adm.__enter__()
    with pytest.raises(RuntimeError, match="already entered"):
        adm.__enter__()

    async def again():
        await adm.__aenter__()

    with pytest.raises(RuntimeError, match="already entered"):
        asyncio.run(again())
    assert shed.in_flight == 1
    adm.__exit__(None, None, None)
    adm.__exit__(None, None, None)
    assert shed.in_flight == 0
    del adm
    gc.collect()
    assert shed.in_flight == 0


@pytest.mark.parametrize("timeout", [None, 0.0, 5.0])
def test_a_drain_refuses_with_retry_after_none(timeout):
    # DESIGN §3c: retry_after is the time until the same request is admitted; a drained shedder refuses
    # until resume(), which nobody can predict (it used to give the seconds left in the drain)
    clock = FakeClock()
    shed = LoadShedder(max_in_flight=4, clock=clock)
    shed._begin_drain(timeout)
    for prio in Priority:
        with pytest.raises(Overloaded, match="draining") as info:
            shed.admit(prio).__enter__()
        assert info.value.retry_after is None
        with pytest.raises(Overloaded, match="draining") as info:
            shed.call(lambda: 1, priority=prio)
        assert info.value.retry_after is None
    assert shed.drain(timeout=timeout if timeout is not None else 1.0) == 0
    clock.advance(10.0)                     # past the drain's deadline: still closed, still unknown
    with pytest.raises(Overloaded) as info:
        shed.admit(Priority.CRITICAL).__enter__()
    assert info.value.retry_after is None
    shed.resume()
    with shed.admit(Priority.LOW):
        assert shed.in_flight == 1


def test_a_shed_refusal_never_carries_a_negative_retry_after():
    # the refusal is built without the constructor's check (errors.lazy_rejection), so the shedder keeps
    # it valid itself: a user clock that steps back made the latency EWMA, and retry_after, negative
    class SteppingClock:
        t = 10**9

        def monotonic_ns(self):
            return self.t

        def monotonic(self):
            return self.t / 1e9

        def sleep(self, s):
            pass

        async def sleep_async(self, s):
            pass

    clock = SteppingClock()
    shed = LoadShedder(max_in_flight=2, clock=clock)
    with shed.admit(Priority.CRITICAL):
        clock.t -= 5 * 10**8
    held = _fill(shed, Priority.CRITICAL, 2)
    with pytest.raises(Overloaded) as info:
        shed.admit(Priority.LOW).__enter__()
    assert info.value.retry_after == 0.0
    for adm in held:
        adm.__exit__(None, None, None)


# -- the compiled admission's fast path (issue 16): sampled latency, refusals built in C --------------------

class CountingClock:
    """A FakeClock-like clock that counts its readings."""

    def __init__(self):
        self.t, self.reads = 0, 0

    def monotonic_ns(self):
        self.reads += 1
        return self.t

    def monotonic(self):
        return self.t / 1e9

    def sleep(self, s):
        self.t += int(s * 1e9)

    async def sleep_async(self, s):
        self.t += int(s * 1e9)


def test_only_one_admission_in_sample_every_per_priority_reads_the_clock():
    from buttress._impl import core
    every = core("guard").SAMPLE_EVERY
    assert every == 16
    clock = CountingClock()
    shed = LoadShedder(max_in_flight=100, clock=clock)
    reads = []
    for _ in range(2 * every + 1):
        before = clock.reads
        with shed.admit(Priority.LOW):
            clock.t += 1000
        reads.append(clock.reads - before)
    assert reads == ([2] + [0] * (every - 1)) * 2 + [2]       # the 1st, 17th and 33rd LOW admission
    before = clock.reads
    with shed.admit(Priority.HIGH):                           # per priority: HIGH's first is timed too
        pass
    assert clock.reads - before == 2
    assert shed.in_flight == 0
    assert shed.metrics().admitted[Priority.LOW] == 2 * every + 1


def test_the_latency_estimate_comes_from_the_sampled_admissions():
    clock = CountingClock()
    shed = LoadShedder(max_in_flight=2, clock=clock)
    with shed.admit(Priority.HIGH):
        clock.t += 200_000_000                                # timed: 0.2 s
    for _ in range(15):
        with shed.admit(Priority.HIGH):
            clock.t += 900_000_000                            # not timed: the estimate stays 0.2 s
    with shed.admit(Priority.LOW):                            # LOW's first: timed, 0 s when it exits
        with pytest.raises(Overloaded) as info:
            shed.admit(Priority.LOW).__enter__()
    assert info.value.retry_after == pytest.approx(0.2)
    with shed.admit(Priority.HIGH):                           # the 17th HIGH: timed
        clock.t += 1_000_000_000
    with shed.admit(Priority.CRITICAL):
        with pytest.raises(Overloaded) as info:
            shed.admit(Priority.LOW).__enter__()
    assert info.value.retry_after == pytest.approx(0.16 + 0.2 * (1.0 - 0.16))     # 0.2 * 0.8, then 1.0 s


def test_a_limiter_still_gets_every_call_s_latency():
    clock = CountingClock()
    lim = AIMDLimit(initial_limit=10, min_limit=1, max_limit=100)
    samples = []
    orig = lim.on_sample
    lim.on_sample = lambda latency, in_flight, dropped: (samples.append(latency), orig(latency, in_flight, dropped))
    shed = LoadShedder(limiter=lim, clock=clock)
    for i in range(20):
        with shed.admit(Priority.HIGH):
            clock.t += 1_000_000
    assert samples == [0.001] * 20


def test_the_fast_refusal_is_the_same_overloaded_as_the_python_one():
    shed = LoadShedder(max_in_flight=2, name="api")
    with shed.admit(Priority.HIGH):                           # a latency measured: retry_after is set
        pass
    with shed.admit(Priority.LOW):
        with pytest.raises(Overloaded) as info:
            with shed.admit(Priority.LOW):
                pass
        with pytest.raises(Overloaded) as called:
            shed.call(lambda: None, priority=Priority.LOW)        # the Python path's refusal
    fast, slow = info.value, called.value
    assert type(fast) is Overloaded and isinstance(fast, Rejected)
    assert str(fast) == str(slow) == "load shedder 'api' shed a LOW call (1 in flight, capacity 2)"
    assert fast.args == slow.args and fast.retry_after == slow.retry_after is not None
    assert repr(fast) == repr(slow)
    fresh = LoadShedder(max_in_flight=1)
    with fresh.admit(Priority.CRITICAL):
        with pytest.raises(Overloaded) as info:
            fresh.admit(Priority.MEDIUM).__enter__()
    assert info.value.retry_after is None                     # nothing measured yet
    assert str(info.value) == "load shedder shed a MEDIUM call (1 in flight, capacity 1)"
    assert fresh.metrics().shed[Priority.MEDIUM] == 1 and fresh.in_flight == 0


def test_untimed_admissions_exit_once_and_give_the_slot_back_when_dropped():
    shed = LoadShedder(max_in_flight=100)
    with shed.admit(Priority.LOW):
        pass                                                  # the timed first one
    adm = shed.admit(Priority.LOW)
    adm.__enter__()                                           # not timed
    assert shed.in_flight == 1
    adm.__exit__(None, None, None)
    adm.__exit__(None, None, None)                            # a second exit is a no-op
    assert shed.in_flight == 0
    held = shed.admit(Priority.LOW)
    held.__enter__()
    other = shed.admit(Priority.LOW)
    other.__enter__()
    del other                                                 # collected while entered: its slot goes back
    import gc
    gc.collect()
    assert shed.in_flight == 1
    held.__exit__(None, None, None)
    assert shed.in_flight == 0


def test_async_with_the_fast_path_many_times_and_under_200_tasks():
    shed = LoadShedder(max_in_flight=400)                     # HIGH admitted while < 360

    async def one(gate):
        async with shed.admit(Priority.HIGH) as adm:
            assert adm._priority is Priority.HIGH
            await gate.wait()
        return shed.in_flight

    async def main():
        for _ in range(100):
            async with shed.admit(Priority.LOW):
                pass
        gate = asyncio.Event()
        tasks = [asyncio.ensure_future(one(gate)) for _ in range(200)]
        for _ in range(3):
            await asyncio.sleep(0)
        assert shed.in_flight == 200
        gate.set()
        await asyncio.gather(*tasks)
        aexit = shed.admit(Priority.LOW).__aexit__(None, None, None)
        assert await aexit is None and await aexit is None    # the shared completed awaitable
        return shed.in_flight

    assert asyncio.run(main()) == 0
    assert shed.metrics().admitted[Priority.HIGH] == 200 and shed.metrics().admitted[Priority.LOW] == 100


def test_exit_with_wrong_arguments_is_a_type_error():
    adm = LoadShedder(max_in_flight=2).admit()
    adm.__enter__()
    with pytest.raises(TypeError):
        adm.__exit__(None)
    adm.__exit__(None, None, None)
