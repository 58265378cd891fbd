"""CircuitBreaker in a store (issues 14 / 15, phase 2): store= and name=. memory:// shares within the process,
shm:// across the processes of the host (the compiled core CASes the segment's words; the twin decides on the
same layout under the store's lock), redis:// across the fleet (the store's scripts make the transitions).
Runs in the process's implementation (compiled, or the twin with BUTTRESS_NO_EXTENSIONS=1: the spawned
children inherit it)."""
from __future__ import annotations

import os
import random
import signal
import time
import uuid

import pytest

import buttress
from buttress import CircuitBreaker, CircuitOpenError, FakeClock, State
from buttress._core import breaker as compiled_breaker_or_twin  # noqa: F401 - the process's core imports
from buttress.stores import SharedMemoryStore
from buttress.stores import shm as shm_mod

from procs import CTX, JOIN, barrier, no_segments_left, run_all, run_one, sigkill_mid_run, unlink_segment
from redis_server import redis_server, redis_url  # noqa: F401 - fixtures

RUN = f"bt-cb-{os.getpid()}-{uuid.uuid4().hex[:8]}"
COMPILED = buttress.IMPLEMENTATION == "cython"
_count = iter(range(10**6))


@pytest.fixture(scope="module", autouse=True)
def no_leaked_segments():
    yield from no_segments_left(RUN)


@pytest.fixture
def seg():
    name = f"{RUN}-{next(_count)}"
    yield name
    for s in list(shm_mod._segments.values()):
        if s.path == shm_mod.segment_path(name):
            s.close()
    unlink_segment(name)


def boom() -> None:
    raise OSError("dependency down")


def fail(cb: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        with pytest.raises(OSError):
            cb.call(boom)


# -- in one process ----------------------------------------------------------------------------------------

def test_a_store_needs_a_name_and_a_shared_store_needs_the_system_clock(seg: str) -> None:
    st = SharedMemoryStore(seg)
    try:
        with pytest.raises(ValueError, match=f"^CircuitBreaker: store='shm://{seg}' needs name="):
            CircuitBreaker(store=st)
        with pytest.raises(ValueError, match=r"clock=FakeClock.* cannot be shared through store='shm://"):
            CircuitBreaker(name="x", store=st, clock=FakeClock())
        CircuitBreaker(name="m", store=f"memory://{RUN}-clock", clock=FakeClock())      # this process: fine
        with pytest.raises(ValueError, match="window_size must be"):
            CircuitBreaker(name="bad", window_size=0, store=st)                     # the same argument errors
    finally:
        st.close()


def test_settings_must_agree_and_name_the_setting(seg: str) -> None:
    st = SharedMemoryStore(seg)
    try:
        CircuitBreaker(name="dep", window_size=10, minimum_calls=5, store=st)
        with pytest.raises(ValueError, match="window_size=20 here but window_size=10 in the store"):
            CircuitBreaker(name="dep", window_size=20, minimum_calls=5, store=st)
        with pytest.raises(ValueError, match="open_duration=5.0 here but open_duration=60.0 in the store"):
            CircuitBreaker(name="dep", window_size=10, minimum_calls=5, open_duration=5, store=st)
        with pytest.raises(ValueError, match="failure_threshold=3 here but failure_threshold='<unset>'"):
            CircuitBreaker(name="dep", failure_threshold=3, store=st)
        # a name is one breaker per store: another name is another breaker
        CircuitBreaker(name="other", failure_threshold=3, store=st)
    finally:
        st.close()


def test_the_other_implementations_segment_is_refused(seg: str) -> None:
    other = "python" if COMPILED else "cython"
    if other == "cython":
        pytest.skip("the twin process opening a compiled store needs the compiled core")
    st = SharedMemoryStore(seg, implementation=other)
    try:
        with pytest.raises(ValueError, match="decides with the pure-Python twin, but this process's CircuitBreaker "
                                             "runs the compiled core: the two cannot share words"):
            CircuitBreaker(name="dep", store=st)
    finally:
        st.close()


def test_half_open_max_wait_defaults_to_open_duration_with_a_store() -> None:
    url = f"memory://{RUN}-hmw"
    assert CircuitBreaker(name="a").conf.half_open_max_wait_ns == -1                # process-local: unchanged
    assert CircuitBreaker(name="a", open_duration=7.5, store=url).conf.half_open_max_wait_ns == 7_500_000_000
    assert CircuitBreaker(name="b", open_duration=lambda k: 2.0 * k, store=url).conf.half_open_max_wait_ns == 2 * 10**9
    assert CircuitBreaker(name="c", failure_threshold=2, timeout=3, store=url).conf.half_open_max_wait_ns == 3 * 10**9
    assert CircuitBreaker(name="d", half_open_max_wait=1, store=url).conf.half_open_max_wait_ns == 10**9


def test_memory_store_shares_one_breaker_within_the_process() -> None:
    clock = FakeClock(5.0)
    url = f"memory://{RUN}-mem"
    a = CircuitBreaker(name="m", window_size=4, minimum_calls=4, open_duration=10, clock=clock, store=url)
    b = CircuitBreaker(name="m", window_size=4, minimum_calls=4, open_duration=10, clock=clock, store=url)
    fail(a, 2)
    fail(b, 2)                                   # four failures over two objects: one window
    assert a.state is State.OPEN and b.state is State.OPEN
    with pytest.raises(CircuitOpenError) as info:
        b.call(lambda: 1)
    assert info.value.retry_after == 10.0
    assert a.metrics().not_permitted == 1        # counted in the shared words
    clock.advance(10)
    p = [a.try_acquire() for _ in range(12)]
    assert sum(x is not None for x in p) == 10   # half_open_calls over both objects
    assert b.try_acquire() is None
    for x in p[:4]:
        x.success()                              # the half-open minimum, min(4, 10): closes
    assert a.state is State.CLOSED and b.state is State.CLOSED
    b.force_open()
    assert a.state is State.FORCED_OPEN
    a.reset()
    assert b.state is State.CLOSED and b.metrics().not_permitted == 0


@pytest.mark.parametrize("window", ["count", "time"])
def test_compiled_and_twin_decide_alike_on_words(both, window: str) -> None:
    """The twin's word layout is the compiled one's: the same random history gives the same states,
    metrics and words (read back through a fresh core of the other kind)."""
    rng = random.Random(7)
    kw = dict(name="d", window=window, window_size=5, minimum_calls=3, open_duration=2.0, half_open_calls=2,
              half_open_max_wait=5.0, slow_call_duration=None)
    cores = []
    for impl in both:
        cls = impl.breaker.BreakerCore
        n = cls.words_needed(5, window == "time", 2)
        buf = bytearray(8 * n)
        cls.init_words(memoryview(buf), 5, window == "time", 2, 10**12)
        cores.append((cls(**kw, words=memoryview(buf)), buf))
    t = 10**12
    for step in range(400):
        t += rng.choice((0, 10**8, 7 * 10**8, 3 * 10**9))
        op = rng.random()
        got = []
        for core, _ in cores:
            if op < 0.8:
                tok = core.acquire(t)
                if tok >= 0:
                    core.record(tok, random.Random(step).choice((0, 1, 1, 2, 3)), t, t)
                got.append((tok, core.metrics(t)))
            elif op < 0.9:
                got.append(core.state_now(t))
            else:
                core.restart(random.Random(step).choice((0, 3, 4, 5)), t)
                got.append(core.load())
        assert got[0] == got[1], (step, got)
    (c, cbuf), (p, pbuf) = cores
    assert c.load() == p.load()
    # the same words: a core of the other kind reads the same state from them
    for (_, buf), impl in zip(cores, reversed(both)):
        other = impl.breaker.BreakerCore(**kw, words=memoryview(buf))
        assert other.load() == c.load() and other.metrics(t) == c.metrics(t)


def test_a_preparation_left_by_a_killed_process_is_taken_over(seg: str) -> None:
    """SIGKILL between a transition's claim and its publish leaves the PREP bit in the state word, and
    between a guard's enter and exit leaves a writer counted: neither may freeze the breaker."""
    if not COMPILED:
        pytest.skip("the twin has no PREP bit and no guard words to leave behind (it decides under a lock)")
    st = SharedMemoryStore(seg)
    try:
        cb = CircuitBreaker(name="k", window_size=2, minimum_calls=2, store=st)
        cb.call(lambda: 1)
        n = cb.words_needed(2, False, 10)
        raw = _words_of(st, "k", n)
        raw[13] += 1                              # a writer inside the closed guard, never leaving
        t0 = time.monotonic()
        fail(cb, 1)                               # 1 of 2 failed: the trip's transition closes the guard anyway
        assert cb.state is State.OPEN
        assert time.monotonic() - t0 < 5
        raw[0] |= 8                               # a claimed transition, never published
        t0 = time.monotonic()
        cb.reset()                                # waits, then takes the claim over
        assert 0.9 < time.monotonic() - t0 < 10
        cb.reset()
        assert cb.state is State.CLOSED and cb.load()[0] == State.CLOSED
        fail(cb, 2)
        assert cb.state is State.OPEN
    finally:
        st.close()


def _words_of(st: SharedMemoryStore, name: str, nwords: int):
    for obj in st.objects():
        if obj["kind"] == "circuit_breaker" and obj["name"] == name:
            return st._seg._slice(obj["offset"], nwords).cast("q")
    raise AssertionError(name)


# -- across processes (shm) -------------------------------------------------------------------------------

SHARED = dict(window_size=10, minimum_calls=5, open_duration=3600.0)


def _opener(seg: str, conn) -> None:
    try:
        st = SharedMemoryStore(seg)
        cb = CircuitBreaker(name="payment", store=st, **SHARED)
        for _ in range(5):
            try:
                cb.call(boom)
            except OSError:
                pass
        conn.send((cb.state.name, os.getpid()))
        st.close()
    except BaseException as exc:  # noqa: BLE001
        conn.send(exc)


def test_a_breaker_opened_in_process_a_refuses_in_process_b(seg: str) -> None:
    st = SharedMemoryStore(seg)
    try:
        b = CircuitBreaker(name="payment", store=st, **SHARED)
        assert b.state is State.CLOSED
        state, pid = run_one(_opener, seg)
        assert state == "OPEN" and pid != os.getpid()
        assert b.state is State.OPEN
        with pytest.raises(CircuitOpenError) as info:
            b.call(lambda: "never runs")
        assert 3500 < info.value.retry_after <= 3600
        m = b.metrics()
        assert (m.calls, m.failures, m.not_permitted) == (5, 5, 1)
    finally:
        st.close()


def _prober(seg: str, tries: int, barrier, conn) -> None:
    try:
        st = SharedMemoryStore(seg)
        cb = CircuitBreaker(name="probe", window_size=10, minimum_calls=5, open_duration=0.0, half_open_calls=3,
                            half_open_max_wait=3600.0, store=st)
        barrier.wait(JOIN)
        held = [p for p in (cb.try_acquire() for _ in range(tries)) if p is not None]
        conn.send(len(held))
        barrier.wait(JOIN)                        # hold the permits until every process has counted
        for p in held:
            p.release()
        st.close()
    except BaseException as exc:  # noqa: BLE001
        conn.send(exc)


def test_a_half_open_race_across_four_processes_admits_exactly_half_open_calls(seg: str) -> None:
    st = SharedMemoryStore(seg)
    try:
        cb = CircuitBreaker(name="probe", window_size=10, minimum_calls=5, open_duration=0.0, half_open_calls=3,
                            half_open_max_wait=3600.0, store=st)
        for round_ in range(3 if COMPILED else 1):
            cb.transition_to(State.OPEN)          # open_duration 0: the first call moves it to HALF_OPEN
            b = barrier()
            got = run_all(_prober, lambda i: (seg, 500 if COMPILED else 100, b))
            assert sum(got) == 3, (round_, got)
            assert cb.load()[0] == State.HALF_OPEN and cb.load()[2] == 0     # every permit came back
            cb.reset()
    finally:
        st.close()


HALF = dict(window_size=2, minimum_calls=2, open_duration=5.0, half_open_calls=1)    # half_open_max_wait: None
S = 10**9


def _probe_holder(seg: str, at: int, conn) -> None:
    try:
        st = SharedMemoryStore(seg)
        cb = CircuitBreaker(name="probe", store=st, **HALF)
        conn.send((cb.acquire(at), os.getpid()))       # OPEN -> HALF_OPEN at `at`; takes the only probe
        time.sleep(600)                                 # killed long before, holding it
    except BaseException as exc:  # noqa: BLE001
        conn.send(exc)


def test_a_probe_held_by_a_killed_process_comes_back_by_half_open_max_wait(seg: str) -> None:
    """Half-open probes are counted in the state word, not in the lease table (which process holds which
    probe is not recorded: the vectorcall guard takes a probe in one CAS), so the lease table cannot give
    a dead prober's probe back. half_open_max_wait does (Resilience4j's maxWaitDurationInHalfOpenState),
    and with a store it defaults to open_duration: a probe taken by a process that is then SIGKILLed is
    refused to every survivor until exactly half_open_max_wait after HALF_OPEN was entered, the breaker
    then re-opens (attempt 2), and after open_duration(2) a survivor gets a probe. Explicit ns times on the
    shared words (the decisions take `now`): no sleeping, no timed assertion."""
    st = SharedMemoryStore(seg)
    try:
        cb = CircuitBreaker(name="probe", store=st, **HALF)
        mw = cb.conf.half_open_max_wait_ns
        od = 5 * S
        assert mw == od, "with a store, half_open_max_wait defaults to open_duration"
        t0 = time.monotonic_ns() + 1000 * S            # explicit times, ahead of every real reading
        for _ in range(2):
            cb.record(cb.acquire(t0), 1, t0, t0)        # two failures of two: OPEN at t0
        assert cb.state_now(t0) == State.OPEN
        th = t0 + od
        r, w = CTX.Pipe(duplex=False)
        holder = CTX.Process(target=_probe_holder, args=(seg, th, w))
        holder.start()
        assert r.poll(JOIN)
        got = r.recv()
        if isinstance(got, BaseException):
            raise got
        token, pid = got
        assert token >= 0, "the holder took the only half-open probe"
        os.kill(pid, signal.SIGKILL)
        holder.join(JOIN)
        assert holder.exitcode == -signal.SIGKILL
        assert st.reclaim() == 0, "no lease-table permit: the probe is in the state word"
        # the survivor: refused while the dead holder's probe is outstanding ...
        assert cb.acquire(th) == -1 and cb.acquire(th + mw - 1) == -1
        assert cb.state_now(th + mw - 1) == State.HALF_OPEN
        # ... re-opened by half_open_max_wait (attempt 2: open_duration(2) = 5 s) ...
        assert cb.state_now(th + mw) == State.OPEN and cb.acquire(th + mw + od - 1) == -1
        # ... and a probe of its own once that has passed: within half_open_max_wait + open_duration(2)
        mine = cb.acquire(th + mw + od)
        assert mine >= 0 and cb.state_now(th + mw + od) == State.HALF_OPEN
        cb.record(mine, 0, th + mw + od, th + mw + od)  # its probe succeeds: CLOSED
        assert cb.state_now(th + mw + od) == State.CLOSED
        assert cb.record(token, 0, th, th + mw + od) is None and cb.state_now(th + mw + od) == State.CLOSED, \
            "the dead holder's probe, reported late by nobody, could never move it anyway"
    finally:
        st.close()


def _hammer(seg: str, ops: int, seed: int, barrier, conn) -> None:
    try:
        st = SharedMemoryStore(seg)
        cb = CircuitBreaker(name="hammered", window_size=4, minimum_calls=4, open_duration=0.0005,
                            half_open_calls=2, store=st)
        rng = random.Random(seed)
        conn.send(("ready", os.getpid()))
        barrier.wait(JOIN)
        admitted = 0
        for i in range(ops):
            p = cb.try_acquire()
            if p is not None:
                admitted += 1
                if rng.random() < 0.5:
                    p.failure(OSError("x"))
                else:
                    p.success()
            if i % 2000 == 1999:
                conn.send(("progress", i + 1))
        conn.send(("done", admitted))
        st.close()
    except BaseException as exc:  # noqa: BLE001
        conn.send(("error", repr(exc)))


def test_sigkill_mid_run_leaves_the_survivors_breaker_working(seg: str) -> None:
    ops = 40_000 if COMPILED else 4_000
    b = barrier()
    sigkill_mid_run(_hammer, lambda i: (seg, ops, i, b), victim=2, kill_at=2000)
    # every word is valid: the state word decodes, the breaker still decides and moves exactly
    st = SharedMemoryStore(seg)
    try:
        cb = CircuitBreaker(name="hammered", window_size=4, minimum_calls=4, open_duration=0.0005, half_open_calls=2,
                            store=st)
        state, gen, flight = cb.load()
        assert state in tuple(State) and gen > 0 and 0 <= flight <= 2
        cb.reset()
        assert cb.load()[:3:2] == (State.CLOSED, 0)
        for _ in range(3):
            assert cb.call(lambda: 7) == 7
        m = cb.metrics()
        assert (m.calls, m.failures) == (3, 0)
        fail(cb, 2)                                # 2 of the last 4 failed (rate 0.5): opens
        assert cb.state is State.OPEN
        time.sleep(0.002)
        held = [cb.try_acquire(), cb.try_acquire(), cb.try_acquire()]
        assert [p is not None for p in held] == [True, True, False]
        for p in held[:2]:
            p.success()
        assert cb.state is State.CLOSED
    finally:
        st.close()
        st.unlink()


# -- Redis --------------------------------------------------------------------------------------------------

def _redis_opener(url: str, conn) -> None:
    try:
        from buttress.stores.redis import RedisStore
        store = RedisStore(url=url, timeout=5.0, on_error="closed")
        cb = CircuitBreaker(name="payment", window="time", window_size=10, minimum_calls=3, open_duration=3600.0,
                            store=store)
        for _ in range(3):
            try:
                cb.call(boom)
            except OSError:
                pass
        view = cb._cluster.shared.sync()          # flush the counts now (the background sync would, too)
        conn.send((State(view.state).name, store.metrics().errors))
        store.close()
    except BaseException as exc:  # noqa: BLE001
        conn.send(exc)


def test_the_same_through_redis(redis_url: str) -> None:  # noqa: F811
    from buttress.stores.redis import RedisStore
    store = RedisStore(url=redis_url, timeout=5.0, on_error="closed")
    try:
        with pytest.raises(ValueError, match="shares a time window only.*window='count'.*pass window='time'"):
            CircuitBreaker(name="count", store=store)
        with pytest.raises(ValueError, match="the classic breaker .* cannot be shared"):
            CircuitBreaker(name="classic", failure_threshold=3, store=store)
        b = CircuitBreaker(name="payment", window="time", window_size=10, minimum_calls=3, open_duration=3600.0,
                           store=store)
        changes = []
        b.on("state_change", lambda e: changes.append((e.old, e.new)))
        assert b.call(lambda: 1) == 1
        state, errors = run_one(_redis_opener, redis_url)
        assert (state, errors) == ("OPEN", 0)
        deadline = time.monotonic() + 5
        while b.state is not State.OPEN:          # seen within sync_interval (0.1 s) by polling
            assert time.monotonic() < deadline, "process B never saw the fleet's OPEN"
            time.sleep(0.01)
        with pytest.raises(CircuitOpenError) as info:
            b.call(lambda: "never runs")
        assert 3500 < info.value.retry_after <= 3600
        assert b.metrics().not_permitted == 1
        assert changes == [(State.CLOSED, State.OPEN)]
        b.reset()                                 # the fleet's state: closed again for everyone
        assert b._cluster.shared.sync().state == State.CLOSED
        assert b.call(lambda: 2) == 2
        assert store.metrics().errors == 0
    finally:
        store.close()
