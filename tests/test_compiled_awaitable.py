"""The compiled awaitable of the guard patterns (buttress._core.guard: StageGuard(asynchronous=True),
StageBase._stage_call_async, `async with` on a stage, Admission) and its twin: the permit is taken when the
call is made, given back exactly once when the coroutine finishes, raises, is cancelled, thrown into, closed
or dropped; refusals are raised when awaited; no frame of the guard in a user's traceback; no leaks."""
import asyncio
import gc
import inspect
import sys
import threading
import tracemalloc
import traceback
import types

import pytest

import buttress
from buttress import Bulkhead, BulkheadFullError, LoadShedder, Overloaded, Priority
from helpers import race


class Boom(Exception):
    pass


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def _full():
    raise BulkheadFullError("full")


def stage(impl, n=2, **kw):
    p = impl.permits.Permits(n)
    return p, (lambda fn, **more: impl.guard.StageGuard(fn, p.try_acquire, _full, p.release, asynchronous=True,
                                                        **{**kw, **more}))


@types.coroutine
def suspend():
    """A suspension point that needs no event loop (the tests below drive the awaitable by hand)."""
    yield "suspended"


async def ok(x):
    await asyncio.sleep(0)
    return x * 2


async def fails():
    await asyncio.sleep(0)
    raise Boom("inner")


# -- the states of one call --------------------------------------------------------------------------------

def test_permit_held_from_the_call_to_the_end_of_the_coroutine(impl):
    p, guard = stage(impl)
    g = guard(ok)

    async def main():
        aw = g(21)
        assert p.in_use == 1                # taken when the call is made, in C
        assert await aw == 42
        assert p.in_use == 0
        with pytest.raises(Boom, match="inner"):
            await guard(fails)()
        assert p.in_use == 0

    run(main())


def test_refusal_is_raised_when_awaited_and_takes_nothing(impl):
    p, guard = stage(impl, n=1)
    g = guard(ok)

    async def main():
        first = g(1)
        refused = g(2)                      # no exception at the call: the awaitable carries it
        assert p.in_use == 1
        with pytest.raises(BulkheadFullError):
            await refused
        assert await first == 2 and p.in_use == 0

    run(main())


def test_a_function_raising_at_call_time_releases_and_raises_when_awaited(impl):
    p, guard = stage(impl)

    def not_a_coroutine_fn(x):
        raise Boom("at call")

    async def main():
        aw = guard(not_a_coroutine_fn)(1)
        assert p.in_use == 0
        with pytest.raises(Boom, match="at call"):
            await aw

    run(main())


def test_a_sync_function_is_a_usage_error_after_the_permit_went_back(impl):
    p, guard = stage(impl)

    async def main():
        with pytest.raises(TypeError, match="sync function"):
            await guard(lambda: 1)()
        assert p.in_use == 0

    run(main())


def test_any_awaitable_is_driven_through_its_await(impl):
    p, guard = stage(impl)

    class Later:
        def __await__(self):
            yield from asyncio.sleep(0).__await__()
            return "done"

    async def main():
        assert await guard(lambda: Later())() == "done"
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(fut.set_result, 7)
        assert await guard(lambda: fut)() == 7
        assert p.in_use == 0

    run(main())


def test_throw_into_a_running_call_returns_the_permit(impl):
    p, guard = stage(impl)

    async def waits():
        await suspend()

    aw = guard(waits)()
    assert p.in_use == 1
    assert aw.send(None) == "suspended"
    with pytest.raises(Boom, match="thrown"):
        aw.throw(Boom("thrown"))
    assert p.in_use == 0
    with pytest.raises(RuntimeError, match="cannot reuse"):
        aw.send(None)
    assert p.in_use == 0


def test_throw_caught_by_the_coroutine_then_returning_is_a_success(impl):
    p, guard = stage(impl)

    async def catches():
        try:
            await suspend()
        except Boom:
            return "handled"

    aw = guard(catches)()
    aw.send(None)
    with pytest.raises(StopIteration) as info:
        aw.throw(Boom())
    assert info.value.value == "handled" and p.in_use == 0


def test_throw_before_the_first_send_returns_the_permit(impl):
    p, guard = stage(impl)
    aw = guard(ok)(1)
    with pytest.raises(Boom):
        aw.throw(Boom)                      # the class form
    assert p.in_use == 0


def test_close_before_and_during_the_call_returns_the_permit_once(impl):
    p, guard = stage(impl)
    ran = []

    async def body():
        try:
            await suspend()
        finally:
            ran.append("finally")

    aw = guard(body)()
    aw.close()                              # never started
    assert p.in_use == 0
    aw.close()                              # again: a no-op
    assert p.in_use == 0
    aw = guard(body)()
    aw.send(None)
    aw.close()                              # suspended: its finally runs with the permit still held
    assert ran == ["finally"] and p.in_use == 0
    aw.close()
    assert p.in_use == 0


def test_dropped_without_awaiting_returns_the_permit(impl):
    p, guard = stage(impl)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # "coroutine 'ok' was never awaited"
        aw = guard(ok)(1)
        assert p.in_use == 1
        del aw
        gc.collect()
    assert p.in_use == 0


def test_cancelled_running_and_waiting_calls_return_every_permit(impl):
    """200 tasks through a stage of 5 whose refusal waits (refuse_async); 30 % cancelled, some running,
    some waiting: every permit comes back, never more than 5 at once."""
    p = impl.permits.Permits(5)
    inside, peak, freed = [0], [0], None

    async def main():
        nonlocal freed
        freed = asyncio.Condition()

        async def wait_then_run(fn, args, kwargs):
            while True:
                async with freed:
                    await freed.wait_for(lambda: p.available > 0)
                if p.try_acquire():
                    break
            try:
                return await fn(*args, **kwargs)
            finally:
                p.release()
                async with freed:
                    freed.notify_all()

        async def work(i):
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
            try:
                await asyncio.sleep(0.001 * (i % 3))
            finally:
                inside[0] -= 1
            return i

        def release():
            p.release()
            loop.call_soon(lambda: asyncio.ensure_future(notify()))

        async def notify():
            async with freed:
                freed.notify_all()

        loop = asyncio.get_running_loop()
        g = impl.guard.StageGuard(work, p.try_acquire, _full, release, refuse_async=wait_then_run,
                                  asynchronous=True)
        tasks = [asyncio.create_task(g(i)) for i in range(200)]
        await asyncio.sleep(0)
        for i in range(0, 200, 3):
            tasks[i].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        done = [r for r in results if isinstance(r, int)]
        cancelled = [r for r in results if isinstance(r, asyncio.CancelledError)]
        assert len(done) + len(cancelled) == 200 and len(cancelled) >= 60
        assert peak[0] <= 5

    run(main())
    assert p.in_use == 0


def test_reentrant_calls_and_a_waiting_refusal(impl):
    """A guarded coroutine awaiting another call of the same stage, and a refusal whose slow path awaits
    (a listener that awaits) before running the call: counts stay exact."""
    p = impl.permits.Permits(2)
    seen = []

    async def slow_path(fn, args, kwargs):
        await asyncio.sleep(0)              # the listener awaits
        seen.append(("waited", p.in_use))
        return await fn(*args, **kwargs)    # runs unguarded: this slow path took no permit

    g = impl.guard.StageGuard(lambda depth: inner(depth), p.try_acquire, _full, p.release,
                              refuse_async=slow_path, asynchronous=True)

    async def inner(depth):
        seen.append(("in", depth, p.in_use))
        if depth < 3:
            return await g(depth + 1)
        return depth

    assert run(g(0)) == 3
    assert seen[:2] == [("in", 0, 1), ("in", 1, 2)]
    assert ("waited", 2) in seen
    assert p.in_use == 0


def test_user_traceback_has_no_frame_of_the_guard(impl):
    p, guard = stage(impl)

    async def raiser():
        raise Boom("where")

    async def main():
        try:
            await guard(raiser)()
        except Boom as exc:
            return [f.name for f in traceback.extract_tb(exc.__traceback__)]

    names = run(main())
    assert names[-1] == "raiser"
    assert "main" in names
    if impl.kind == "cython":
        assert names == ["main", "raiser"]  # nothing between the caller and the user's coroutine


def test_send_values_pass_through(impl):
    p, guard = stage(impl)

    @types.coroutine
    def echo():
        got = yield "first"
        return got

    aw = guard(echo)()
    assert aw.send(None) == "first"
    with pytest.raises(StopIteration) as info:
        aw.send("back")
    assert info.value.value == "back" and p.in_use == 0


def test_bad_asynchronous_flag(impl):
    p = impl.permits.Permits(1)
    with pytest.raises(TypeError, match="asynchronous must be a bool"):
        impl.guard.StageGuard(ok, p.try_acquire, _full, p.release, asynchronous=1)


# -- the facade: Bulkhead and LoadShedder ----------------------------------------------------------------

def test_bulkhead_async_forms_are_compiled_coroutine_functions():
    bh = Bulkhead(2)

    @bh
    async def f(x):
        return x

    assert inspect.iscoroutinefunction(f) and asyncio.iscoroutinefunction(f)
    from buttress._base import is_async_callable
    assert is_async_callable(f)             # outer patterns (pipeline, retry) await it
    assert run(f(3)) == 3 and run(bh.call_async(f.__wrapped__, 4)) == 4 and bh.in_use == 0


def test_bulkhead_aenter_dropped_or_closed_gives_the_permit_back():
    bh = Bulkhead(1)

    async def main():
        aw = bh.__aenter__()
        assert bh.in_use == 1
        aw.close()                          # the body never runs, __aexit__ never comes
        assert bh.in_use == 0 and bh._async_held == {}
        aw = bh.__aenter__()
        del aw
        gc.collect()
        assert bh.in_use == 0 and bh._async_held == {}
        async with bh:
            assert bh.in_use == 1
        assert bh.in_use == 0

    run(main())


def test_full_bulkhead_async_refusal_and_its_count():
    bh = Bulkhead(1)

    async def main():
        async with bh:
            with pytest.raises(BulkheadFullError, match=r"bulkhead is full \(1 concurrent calls\)"):
                async with bh:
                    pass
            with pytest.raises(BulkheadFullError):
                await bh.call_async(ok, 1)
        return bh.metrics().rejected

    assert run(main()) == 2 and bh.in_use == 0


def test_bulkhead_method_calls_pass_self_without_a_bound_method():
    bh = Bulkhead(2)

    class C:
        @bh
        def m(self, x):
            return (self, x)

        @bh
        async def am(self, x):
            return (self, x)

    c = C()
    assert c.m(1) == (c, 1) and C.m(c, 2) == (c, 2)
    assert run(c.am(3)) == (c, 3)
    if buttress.IMPLEMENTATION == "cython":
        assert type(C.__dict__["m"]).__flags__ & (1 << 17)      # Py_TPFLAGS_METHOD_DESCRIPTOR


def test_bulkhead_release_without_waiters_and_with_one():
    bh = Bulkhead(1, max_wait=None)
    assert bh.try_acquire()
    got = []
    t = threading.Thread(target=lambda: (bh.acquire(), got.append(1), bh.release()))
    t.start()
    while bh.metrics().waiting != 1:
        pass
    bh.release()                            # hands the permit to the waiter (Python)
    t.join(30)
    assert got == [1] and bh.in_use == 0
    with pytest.raises(ValueError, match="released but only 0 are held"):
        bh.release()


def test_shedder_async_admission_refused_when_awaited():
    shed = LoadShedder(max_in_flight=2)     # LOW while in flight < 1

    async def main():
        async with shed.admit(Priority.LOW):
            adm = shed.admit(Priority.LOW)
            aw = adm.__aenter__()           # decided now, raised when awaited
            with pytest.raises(Overloaded, match="shed a LOW call"):
                await aw
        return shed.metrics()

    m = run(main())
    assert m.in_flight == 0 and m.shed[Priority.LOW] == 1 and m.admitted[Priority.LOW] == 1


def test_overloaded_message_is_formatted_on_first_read():
    import pickle
    shed = LoadShedder(max_in_flight=2, name="api")
    with shed.admit(Priority.LOW):
        with pytest.raises(Overloaded) as info:
            shed.admit(Priority.LOW).__enter__()
    exc = info.value
    assert str(exc) == "load shedder 'api' shed a LOW call (1 in flight, capacity 2)"
    assert exc.args == (str(exc),) and repr(exc) == f"Overloaded({str(exc)!r})"
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is Overloaded and str(back) == str(exc) and back.retry_after == exc.retry_after


# -- no growth -----------------------------------------------------------------------------------------------

def test_no_reference_or_memory_growth_over_many_awaited_calls(impl):
    p, guard = stage(impl, n=1)
    result = object()

    async def returns():
        return result

    g_ok, g_fail = guard(returns), guard(fails)
    held = guard(returns)

    async def batch(n):
        for _ in range(n):
            assert await g_ok() is result
            try:
                await g_fail()
            except Boom:
                pass
            blocker = held()                # holds the only permit: the next call is refused
            try:
                await g_ok()
            except BulkheadFullError:
                pass
            await blocker

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(batch(2000))        # warm up: freelists, caches
        gc.collect()                                # tracebacks of the caught errors hold frames in cycles
        refs = (sys.getrefcount(result), sys.getrefcount(returns), sys.getrefcount(g_ok))
        tracemalloc.start()
        try:
            loop.run_until_complete(batch(200))
            gc.collect()                    # garbage cycles are not growth (the free-threaded GC runs later)
            before = tracemalloc.get_traced_memory()[0]
            loop.run_until_complete(batch(20000))
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
    finally:
        loop.close()
    gc.collect()
    assert (sys.getrefcount(result), sys.getrefcount(returns), sys.getrefcount(g_ok)) == refs
    assert after - before < 64 * 1024       # 80 000 awaited calls: nothing kept per call
    assert p.in_use == 0


def test_racing_threads_each_with_a_loop_never_exceed_the_permits(impl, fast_switching):
    p = impl.permits.Permits(3)
    lock, inside, peak = threading.Lock(), [0], [0]

    async def body():
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        await asyncio.sleep(0)
        with lock:
            inside[0] -= 1

    g = impl.guard.StageGuard(body, p.try_acquire, _full, p.release, asynchronous=True)

    def thread(i):
        async def main():
            admitted = 0
            for _ in range(200):
                try:
                    await g()
                    admitted += 1
                except BulkheadFullError:
                    pass
            return admitted
        return asyncio.run(main())

    assert sum(race(6, thread)) > 0
    assert peak[0] <= 3 and p.in_use == 0
