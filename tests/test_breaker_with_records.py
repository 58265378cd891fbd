"""`with cb:` / `async with cb:` records (the breaker's frame dict): an exit ends the acquisition of its own
frame -- whichever thread or task resumes or finalises a generator / coroutine -- else the latest one of this
thread and context (contextlib.ExitStack); records that can never exit give their permits back. And the
outcome of a call admitted before its store closed passes through unchanged. Compiled and twin alike."""
import asyncio
import contextlib
import gc
import sys
import threading

import pytest

from helpers import race

CLOSED, OPEN, HALF_OPEN = 0, 1, 2


class Boom(Exception):
    pass


class Clock:
    def __init__(self):
        self.t = 0

    def __call__(self):
        return self.t


def core(impl, **kw):
    kw.setdefault("slow_call_duration", None)
    kw.setdefault("window_size", 4)
    kw.setdefault("minimum_calls", 4)
    kw.setdefault("open_duration", 10)
    kw.setdefault("half_open_calls", 1)
    clock = Clock()
    return impl.breaker.BreakerCore(name="dep", clock_ns=clock, **kw), clock


def half_open(impl, **kw):
    """A breaker in HALF_OPEN with one probe permit (load()[2]: the permits out)."""
    b, clock = core(impl, **kw)
    b.transition_to(OPEN)
    clock.t += 11 * 10**9
    assert b.state_now() == HALF_OPEN
    return b, clock


def out(b):
    return b.load()[2]


def calls_failures(b):
    m = b.metrics()
    return m[1], m[2]


def probe(b):
    with b:
        yield


def test_a_generator_finished_by_another_thread_reports_its_probe(impl):
    # Starlette's iterate_in_threadpool: the generator's `with` exits in a worker thread
    b, _ = half_open(impl)
    g = probe(b)
    next(g)
    assert out(b) == 1

    def finish():
        with pytest.raises(StopIteration):
            next(g)

    t = threading.Thread(target=finish)
    t.start()
    t.join()
    assert out(b) == 0 and b.state_now() == CLOSED
    with b:
        pass


def test_a_generator_started_by_an_ended_thread_reports_its_probe_in_main(impl):
    b, _ = half_open(impl)
    box = []

    def start():
        g = probe(b)
        next(g)
        box.append(g)

    t = threading.Thread(target=start)
    t.start()
    t.join()
    g = box.pop()
    with pytest.raises(StopIteration):
        next(g)
    assert out(b) == 0 and b.state_now() == CLOSED


def test_a_generator_closed_by_another_thread_gives_its_probe_back(impl):
    b, _ = half_open(impl)
    g = probe(b)
    next(g)
    t = threading.Thread(target=g.close)
    t.start()
    t.join()
    assert out(b) == 0 and b.state_now() == HALF_OPEN      # GeneratorExit: no outcome, the permit back
    with b:
        pass
    assert b.state_now() == CLOSED


def test_an_abandoned_async_generator_finalised_in_a_new_task_reports_its_probe(impl):
    # `break` out of `async for`: asyncio's finaliser runs aclose() in a task of its own (another context)
    b, _ = half_open(impl)
    finalised_in = []

    async def stream():
        try:
            async with b:
                yield 1
                yield 2
        finally:
            finalised_in.append(asyncio.current_task())

    async def worker():
        async for _ in stream():
            break
        gc.collect()
        for _ in range(5):
            await asyncio.sleep(0)
        assert finalised_in and finalised_in[0] is not asyncio.current_task()
        assert out(b) == 0 and b.state_now() == HALF_OPEN
        async with b:
            pass
        return b.state_now()

    assert asyncio.run(worker()) == CLOSED


def test_interleaved_generators_each_report_their_own_acquisition(impl):
    b, _ = core(impl, window_size=1, minimum_calls=1)

    def work(fail):
        with b:
            yield
            if fail:
                raise Boom("a")

    a = work(True)
    next(a)                         # admitted in generation 0
    b.reset()                       # a new generation: a's outcome is stale
    c = work(False)
    next(c)
    with pytest.raises(Boom):
        next(a)
    assert b.state_now() == CLOSED and calls_failures(b) == (0, 0)
    with pytest.raises(StopIteration):
        next(c)
    assert b.state_now() == CLOSED and calls_failures(b) == (1, 0)


def test_interleaved_generators_fifo_exits_report_their_own_outcomes(impl):
    b, _ = core(impl, window_size=10, minimum_calls=10)

    def work(fail):
        with b:
            yield
            if fail:
                raise Boom()

    gens = [work(i % 2 == 0) for i in range(6)]
    for g in gens:
        next(g)
    for g in gens:                  # first in, first out
        with pytest.raises((Boom, StopIteration)):
            next(g)
    assert calls_failures(b) == (6, 3) and out(b) == 0


def test_enter_and_exit_in_two_loop_callbacks(impl):
    # each callback runs in a context copy of its own: the exit finds no record of its frame or context (no
    # outcome); the entered record can never exit and gives its permit back
    b, _ = half_open(impl)

    async def main():
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.call_soon(b.__enter__)

        def exit_():
            b.__exit__(Boom, Boom(), None)
            done.set_result(None)

        loop.call_soon(exit_)
        await done

    asyncio.run(main())
    gc.collect()
    assert calls_failures(b) == (0, 0) and b.state_now() == HALF_OPEN and out(b) == 0


def test_sync_with_around_await_in_many_tasks_exits_fifo(impl):
    b, _ = core(impl, window_size=1000, minimum_calls=1000)

    async def one(ev, i):
        with b:
            await ev.wait()
            if i % 4 == 0:
                raise Boom()

    async def main():
        ev = asyncio.Event()
        ts = [asyncio.ensure_future(one(ev, i)) for i in range(400)]
        await asyncio.sleep(0)
        assert out(b) == 0 and b._held() == 0      # held by the tasks, not by this one
        ev.set()
        return await asyncio.gather(*ts, return_exceptions=True)

    res = asyncio.run(main())
    assert sum(isinstance(r, Boom) for r in res) == 100
    assert calls_failures(b) == (400, 100) and b._held() == 0


def test_exit_stack_enters_and_exits_from_frames_of_its_own(impl):
    b, _ = core(impl, window_size=1, minimum_calls=1)
    with pytest.raises(Boom):
        with contextlib.ExitStack() as st:
            st.enter_context(b)
            assert b._held() == 1
            raise Boom()
    assert b.state_now() == OPEN and b._held() == 0
    b.reset()

    async def main():
        with pytest.raises(Boom):
            async with contextlib.AsyncExitStack() as st:
                await st.enter_async_context(b)
                raise Boom()
        return b.state_now()

    assert asyncio.run(main()) == OPEN


def test_nested_blocks_of_one_frame_exit_latest_first(impl):
    b, _ = core(impl, window_size=10, minimum_calls=10)
    with pytest.raises(Boom):
        with b:
            with b:
                assert b._held() == 2
            raise Boom()
    assert calls_failures(b) == (2, 1) and b._held() == 0


def test_a_second_exit_is_a_no_op(impl):
    b, _ = half_open(impl)
    b.__enter__()
    b.__exit__(None, None, None)
    assert b.state_now() == CLOSED
    b.__exit__(Boom, Boom(), None)
    assert b.state_now() == CLOSED and calls_failures(b) == (0, 0)


def test_threads_racing_with_blocks_count_every_outcome(impl):
    b, _ = core(impl, window_size=2000, minimum_calls=2000)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        def body(i):
            for k in range(200):
                try:
                    with b:
                        if k % 5 == 0:
                            raise Boom()
                except Boom:
                    pass
        race(8, body)
    finally:
        sys.setswitchinterval(old)
    assert calls_failures(b) == (1600, 320) and out(b) == 0 and b._held() == 0


# -- the store closes while a call runs --------------------------------------------------------------------

def test_a_call_running_when_the_store_closes_keeps_its_result(impl):
    b, _ = core(impl)

    def charge():
        b._close("gone")
        return "charged"

    assert b.guard(charge)() == "charged"
    with pytest.raises(RuntimeError, match="gone"):
        b.guard(charge)()                   # admitted after: refused


def test_an_exception_of_a_call_running_when_the_store_closes_passes_through(impl):
    b, _ = core(impl)

    def boom():
        b._close("gone")
        raise Boom("mine")

    with pytest.raises(Boom, match="mine"):
        b.guard(boom)()


def test_a_with_block_running_when_the_store_closes_exits_quietly(impl):
    b, _ = core(impl)
    with b:
        b._close("gone")
    b2, _ = core(impl)
    with pytest.raises(Boom):
        with b2:
            b2._close("gone")
            raise Boom()
    with pytest.raises(RuntimeError, match="gone"):
        with b2:
            pass


def test_an_async_call_running_when_the_store_closes_keeps_its_result(impl):
    b, _ = core(impl)

    async def fn():
        await asyncio.sleep(0)
        return "r"

    async def main():
        t = asyncio.ensure_future(b.guard(fn, True)())
        await asyncio.sleep(0)
        b._close("gone")
        return await t

    assert asyncio.run(main()) == "r"

    b2, _ = core(impl)

    async def main2():
        async with b2:
            b2._close("gone")
        return "left"

    assert asyncio.run(main2()) == "left"


def test_an_aenter_awaited_after_the_close_refuses(impl):
    b, _ = core(impl)

    async def main():
        aw = b.__aenter__()
        b._close("gone")
        with pytest.raises(RuntimeError, match="gone"):
            await aw

    asyncio.run(main())


# -- call(fn) with a fn that is not callable: the caller's error, not a dependency failure -----------------

@pytest.mark.parametrize("fn", [None, 123, "not a function"])
def test_call_with_a_non_callable_is_a_type_error_before_any_permit(impl, fn):
    b, _ = half_open(impl, window_size=1, minimum_calls=1)
    call, acall = b.make_call(), b.make_call(True)
    msg = r"^fn must be callable, got " + __import__("re").escape(repr(fn)) + "$"
    for use in (lambda: call(fn), lambda: call(fn, 1, k=2), lambda: acall(fn), lambda: acall(fn, 1),
                lambda: call.__call__(fn), lambda: acall.__call__(fn)):
        with pytest.raises(TypeError, match=msg):
            use()
        assert out(b) == 0 and b.state_now() == HALF_OPEN and calls_failures(b) == (0, 0)
    with pytest.raises(TypeError, match="fn must be callable"):
        b.guard(fn)
    assert call(lambda: 5) == 5 and b.state_now() == CLOSED


def test_generators_handed_between_racing_threads_report_exactly(impl):
    # each thread enters `with` in a generator and hands it to the next thread, which finishes it
    b, _ = core(impl, window_size=3000, minimum_calls=3000)
    n, k_max = 4, 300
    handed = [[] for _ in range(n)]
    lock = threading.Lock()

    def work(i):
        for k in range(k_max):
            def gen(k=k):
                with b:
                    yield
                    if k % 3 == 0:
                        raise Boom()
            g = gen()
            next(g)
            with lock:
                handed[(i + 1) % n].append(g)
            while True:
                with lock:
                    if not handed[i]:
                        break
                    mine = handed[i].pop()
                with pytest.raises((StopIteration, Boom)):
                    next(mine)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        race(n, work)
    finally:
        sys.setswitchinterval(old)
    for lst in handed:
        for g in lst:
            with pytest.raises((StopIteration, Boom)):
                next(g)
    assert calls_failures(b) == (n * k_max, n * k_max // 3) and out(b) == 0


def test_a_stream_returned_by_a_call_running_when_the_store_closes_passes_through(impl):
    b, _ = core(impl, record_result=lambda r: seen.append(r))
    seen = []

    def numbers():
        yield 1
        yield 2

    def make():
        b._close("gone")
        return numbers()

    assert list(b.guard(make)()) == [1, 2]

    def value():
        b2._close("gone")
        return "v"

    b2, _ = core(impl, record_result=lambda r: seen.append(r))
    assert b2.guard(value)() == "v" and seen == []      # no predicate runs for a dropped report


def test_an_exit_stack_inside_one_loop_callback_reports_its_outcome(impl):
    # the fallback inside one callback: its own context (compiled) / its own Handle (twin)
    b, _ = core(impl, window_size=1, minimum_calls=1)

    async def main():
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def callback():
            try:
                with contextlib.ExitStack() as st:
                    st.enter_context(b)
                    raise Boom()
            except Boom:
                pass
            done.set_result(b.state_now())

        loop.call_soon(callback)
        return await done

    assert asyncio.run(main()) == OPEN
