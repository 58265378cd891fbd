"""Use after close (issue 14): once a SharedMemoryStore is closed in a process (store.close(), or a forked
child that could not take a lease), every object bound to its segment refuses to decide. Every form of
every pattern (try_acquire, acquire, the decorator, call, and the state / metrics reads) raises the one
closed error, never decides (the guarded function never runs, no word changes), never crashes -- for
the compiled core (lock-free words) and for the twin (under the segment's locks). Objects with their own
words are untouched by another store's close."""
from __future__ import annotations

import asyncio
import json
import os
import uuid
from typing import Any, Callable

import numpy as np
import pytest

import buttress
from buttress import (Bulkhead, CircuitBreaker, FixedWindowLimiter, KeyedLimiter, LeakyBucket, LoadShedder,
                      Priority, SlidingWindowLimiter, TokenBucket)
from buttress.stores import SharedMemoryStore

from procs import kind, no_segments_left  # noqa: F401 - the kind fixture

RUN = f"bt-closed-{os.getpid()}-{uuid.uuid4().hex[:8]}"
_count = iter(range(10**6))
PATTERNS = ["TokenBucket", "LeakyBucket", "FixedWindowLimiter", "SlidingWindowLimiter", "KeyedLimiter",
            "Bulkhead", "LoadShedder", "CircuitBreaker"]


@pytest.fixture(scope="module", autouse=True)
def no_leaked_segments():
    yield from no_segments_left(RUN)


def _breaker_on(kind: str) -> None:
    if (kind == "cython") != (buttress.IMPLEMENTATION == "cython"):
        pytest.skip("a CircuitBreaker shares words only with a store of its own implementation")


def make(pattern: str, st: Any) -> Any:
    if pattern == "TokenBucket":
        return TokenBucket(rate=1e-6, capacity=5, name="t", store=st)
    if pattern == "LeakyBucket":
        return LeakyBucket(rate=1e-6, queue_size=5, name="l", store=st)
    if pattern == "FixedWindowLimiter":
        return FixedWindowLimiter(limit=5, window=1000.0, name="f", store=st)
    if pattern == "SlidingWindowLimiter":
        return SlidingWindowLimiter(limit=5, window=1000.0, name="s", store=st)
    if pattern == "KeyedLimiter":
        return KeyedLimiter(rate=1e-6, capacity=5, max_keys=8, name="k", store=st)
    if pattern == "Bulkhead":
        return Bulkhead(max_concurrent=2, name="b", store=st)
    if pattern == "LoadShedder":
        return LoadShedder(max_in_flight=4, name="s", store=st)
    if pattern == "CircuitBreaker":
        return CircuitBreaker(name="c", window="time", window_size=10, minimum_calls=2, store=st)
    raise AssertionError(pattern)


def uses(pattern: str, obj: Any, ran: list[int]) -> dict[str, Callable[[], object]]:
    """Every form of the pattern, each one call; `ran` counts runs of the guarded function."""
    def fn() -> int:
        ran.append(1)
        return 1

    async def afn() -> int:
        ran.append(1)
        return 1

    out: dict[str, Callable[[], object]] = {}
    if pattern == "KeyedLimiter":
        out["call"] = lambda: obj.call("a", fn)
        out["call_async"] = lambda: asyncio.run(obj.call_async("a", afn))
    elif pattern != "LoadShedder":
        out["decorator"] = lambda: obj(fn)()
        out["call"] = lambda: obj.call(fn)
        out["call_async"] = lambda: asyncio.run(obj.call_async(afn))
    if pattern in ("TokenBucket", "LeakyBucket", "FixedWindowLimiter", "SlidingWindowLimiter"):
        out.update(try_acquire=lambda: obj.try_acquire(),
                   acquire=lambda: obj.acquire(), acquire_timeout=lambda: obj.acquire(1, timeout=0.0),
                   acquire_async=lambda: asyncio.run(obj.acquire_async()),
                   wait_time=lambda: obj.wait_time(1), metrics=lambda: obj.metrics(), reset=lambda: obj.reset())
    if pattern in ("TokenBucket", "FixedWindowLimiter", "SlidingWindowLimiter"):
        out.update(try_acquire_n=lambda: obj.try_acquire(2))
    if pattern == "TokenBucket":
        out.update(available=lambda: obj.available(), reserve=lambda: obj.reserve(1))
    if pattern == "KeyedLimiter":
        out.update(try_acquire=lambda: obj.try_acquire("a"), try_acquire_int=lambda: obj.try_acquire(7),
                   try_acquire_many=lambda: obj.try_acquire_many(np.arange(4, dtype=np.int64)),
                   wait_time=lambda: obj.wait_time("a"), metrics=lambda: obj.metrics(), purge=lambda: obj.purge(),
                   reset=lambda: obj.reset())
    if pattern == "Bulkhead":
        out.update(try_acquire=lambda: obj.try_acquire(), acquire=lambda: obj.acquire(),
                   acquire_async=lambda: asyncio.run(obj.acquire_async()), release=lambda: obj.release(),
                   with_=lambda: obj.__enter__(), in_use=lambda: obj.in_use, available=lambda: obj.available,
                   metrics=lambda: obj.metrics())
    if pattern == "LoadShedder":
        out.update(admit=lambda: obj.admit(Priority.LOW).__enter__(),
                   admit_critical=lambda: obj.admit(Priority.CRITICAL).__enter__(),
                   call=lambda: obj.call(fn), call_async=lambda: asyncio.run(obj.call_async(afn)),
                   decorator=lambda: obj(fn)(), in_flight=lambda: obj.in_flight, metrics=lambda: obj.metrics())
    if pattern == "CircuitBreaker":
        out.update(try_acquire=lambda: obj.try_acquire(), state=lambda: obj.state, metrics=lambda: obj.metrics(),
                   force_open=lambda: obj.force_open(), reset=lambda: obj.reset())
    return out


def outcomes(pattern: str, obj: Any) -> dict[str, str]:
    """Each form's outcome: "closed: <message>" for a RuntimeError, else what it did."""
    ran: list[int] = []
    res: dict[str, str] = {}
    for form, use in uses(pattern, obj, ran).items():
        for _ in range(2):             # a second try says the same (nothing half-closed)
            try:
                got = use()
            except RuntimeError as exc:
                res[form] = f"closed: {exc}"
            except Exception as exc:   # noqa: BLE001 - any other answer is the defect under test
                res[form] = f"{type(exc).__name__}: {exc}"
            else:
                res[form] = f"decided: {got!r}"
    res["fn ran"] = str(len(ran))
    return res


# A release after the close is the end of a call admitted before it: dropped (closing gave this process's
# permits back through the lease table), never an error replacing that call's result. Decisions refuse.
DROPPED = {"Bulkhead": {"release": "decided: None"}}


def expected(pattern: str, message: str) -> dict[str, str]:
    return {**{form: f"closed: {message}" for form in uses(pattern, None, [])}, **DROPPED.get(pattern, {}),
            "fn ran": "0"}


def _store(kind: str, **kw: Any) -> SharedMemoryStore:
    return SharedMemoryStore(f"{RUN}-{kind}-{next(_count)}", implementation=kind, **kw)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_form_refuses_after_close(kind: str, pattern: str) -> None:
    if pattern == "CircuitBreaker":
        _breaker_on(kind)
    st = _store(kind)
    name = st.name
    try:
        obj = make(pattern, st)
        local = make(pattern, None) if pattern != "LoadShedder" else LoadShedder(max_in_flight=4)
        st.close()
        message = f"SharedMemoryStore {name!r} is closed in this process"
        assert outcomes(pattern, obj) == expected(pattern, message)
        # an object with its own words keeps deciding
        if pattern == "KeyedLimiter":
            assert local.try_acquire("a")
        elif pattern == "LoadShedder":
            with local.admit(Priority.LOW):
                pass
        else:
            assert local.try_acquire()
    finally:
        SharedMemoryStore(name, implementation=kind).unlink()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_forked_child_without_a_lease_refuses(kind: str, pattern: str) -> None:
    """slots=1: the parent holds the only lease slot, so a forked child cannot take one. Its objects must
    not decide on the parent's slot (nor on the words at all): every form raises the closed error that
    names the fork. The parent's objects keep working."""
    if pattern == "CircuitBreaker":
        _breaker_on(kind)
    st = _store(kind, slots=1)
    name = st.name
    try:
        obj = make(pattern, st)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                    # pragma: no cover - the child
            code = 1
            try:
                os.close(r)
                res = outcomes(pattern, obj)
                os.write(w, json.dumps(res).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
        res = json.loads(data)
        prefix = f"closed: SharedMemoryStore {name!r} is closed in this process (no lease after fork: "
        assert res.pop("fn ran") == "0", "the guarded function ran in a child without a lease"
        assert set(res) == set(uses(pattern, None, [])), res
        for form, out in DROPPED.get(pattern, {}).items():
            assert res.pop(form) == out, form
        bad = {form: out for form, out in res.items() if not out.startswith(prefix)}
        assert not bad, bad
        assert "lease slots" in next(iter(res.values()))
        # the parent still decides on its own lease
        if pattern == "KeyedLimiter":
            assert obj.try_acquire("p")
        elif pattern == "LoadShedder":
            with obj.admit(Priority.LOW):
                pass
        elif pattern == "CircuitBreaker":
            assert obj.state is buttress.State.CLOSED
        else:
            assert obj.try_acquire()
            if pattern == "Bulkhead":
                obj.release()
    finally:
        st.close()
        st.unlink()


def test_an_object_bound_while_the_store_closes_is_closed_too(kind: str) -> None:
    """track() after close began (the store's lock orders it): the late object is closed at once."""
    st = _store(kind)
    name = st.name
    try:
        tb = TokenBucket(rate=1e-6, capacity=5, name="t", store=st)
        seg = st._seg
        st.close()
        # an object built on the segment's words after the close (a race with another thread) is closed
        core = tb._core
        seg.track(core)
        with pytest.raises(RuntimeError, match="is closed in this process"):
            core.try_acquire()
    finally:
        SharedMemoryStore(name, implementation=kind).unlink()


def test_close_keeps_the_first_message_and_the_settings_readable(kind: str) -> None:
    st = _store(kind)
    name = st.name
    try:
        core = TokenBucket(rate=2.0, capacity=5, name="t", store=st)._core
        st.close()
        core._close("another message")           # a second close keeps the first message
        with pytest.raises(RuntimeError, match=f"^SharedMemoryStore {name!r} is closed in this process$"):
            core.counts()
        assert (core.rate, core.capacity) == (2.0, 5)        # settings, not state: still readable
        assert "GCRA(rate=2.0, capacity=5)" == repr(core)
    finally:
        SharedMemoryStore(name, implementation=kind).unlink()


def test_core_close_contract_is_the_same_in_both(impl: Any) -> None:
    """_close on the bare core types: compiled and twin raise the same RuntimeError(message) from every
    decision and state read, and an object never closed (own words) is unaffected."""
    msg = "store gone"
    gv = aligned(impl.gcra.WORDS)
    impl.gcra.GCRA.init_words(gv, 1.0, 3)
    g = impl.gcra.GCRA(1.0, 3, words=gv)
    wv = aligned(impl.wlimit.WORDS)
    impl.wlimit.WindowCounter.init_words(wv, 3, 10**9, True)
    wc = impl.wlimit.WindowCounter(3, 10**9, True, words=wv)
    kv = aligned(impl.keyed.KeyedGCRA.nwords(4))
    impl.keyed.KeyedGCRA.init_words(kv, 1.0, 3, 4)
    kg = impl.keyed.KeyedGCRA(1.0, 3, 4, words=kv)
    own = impl.gcra.GCRA(1.0, 3)
    assert g.try_acquire(1, now=0) and wc.try_acquire(1, now=0) and kg.try_acquire("a", now=0)
    # claims made before the close: giving them back afterwards is a no-op (False), never an error
    end = g.take(now=0)
    _, greceipt = g.claim(1, now=0)
    wreceipt = wc.claim(1, now=0)
    kreceipt = kg.claim("a", now=0)
    assert end is not None and greceipt and wreceipt and kreceipt
    before = bytes(gv), bytes(wv), bytes(kv)
    for o in (g, wc, kg):
        o._close(msg)
    forms = [lambda: g.try_acquire(), lambda: g.try_acquire(1, now=0), lambda: g.take(),
             lambda: g.reserve(), lambda: g.claim(), lambda: g.wait_ns(), lambda: g.available(),
             lambda: g.counts(), lambda: g.reset(), lambda: g.try_acquire(0),
             lambda: wc.claim(), lambda: wc.try_acquire(1, now=0), lambda: wc.wait_ns(),
             lambda: wc.counts(), lambda: wc.reset(), lambda: wc.try_acquire(99),
             lambda: kg.try_acquire("a"), lambda: kg.try_acquire(object()), lambda: kg.claim("a"),
             lambda: kg.counts(), lambda: kg.wait_ns("a"), lambda: kg.purge(),
             lambda: kg.reset(), lambda: len(kg), lambda: kg.try_acquire_many(np.arange(3, dtype=np.int64))]
    for use in forms:
        with pytest.raises(RuntimeError, match=f"^{msg}$"):
            use()
    gives = [lambda: g.untake(end), lambda: g.refund(greceipt), lambda: wc.unclaim(1, wreceipt),
             lambda: kg.refund(kreceipt)]
    assert [give() for give in gives] == [False] * 4
    # bad input is still named after the close
    for bad, exc in ((lambda: g.untake(-1 << 62), ValueError), (lambda: g.refund(5), ValueError),
                     (lambda: wc.unclaim(1, 2), ValueError), (lambda: wc.unclaim(99, wreceipt), ValueError),
                     (lambda: kg.refund(1 << 200), ValueError), (lambda: g.refund("x"), TypeError)):
        with pytest.raises(exc):
            bad()
    assert (bytes(gv), bytes(wv), bytes(kv)) == before, "a closed object changed its words"
    assert (g.rate, g.capacity, wc.limit, kg.max_keys) == (1.0, 3, 3, 4)
    assert own.try_acquire(1, now=0), "an object with its own words is not affected"


def aligned(nwords: int) -> memoryview:
    """A writable, 8-byte aligned buffer of nwords zeroed int64 words."""
    import ctypes
    buf = bytearray(8 * nwords + 8)
    skip = -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % 8
    return memoryview(buf)[skip:skip + 8 * nwords]


_LATE_USER = r'''
import atexit, sys
got = []
def late():                       # registered before buttress: runs after buttress's own exit hook
    for use in (lambda: bh.try_acquire(), lambda: sh.admit(Priority.LOW).__enter__()):
        try:
            got.append(repr(use()))
        except RuntimeError as exc:
            got.append("closed")
    print(" ".join(got), flush=True)
atexit.register(late)
from buttress import Bulkhead, LoadShedder, Priority
from buttress.stores import SharedMemoryStore
st = SharedMemoryStore(sys.argv[1], implementation=sys.argv[2])
bh = Bulkhead(max_concurrent=2, name="b", store=st)
sh = LoadShedder(max_in_flight=4, name="s", store=st)
assert bh.try_acquire()           # held at exit: given back by the exit hook
'''


def test_permits_taken_after_the_exit_hook_gave_the_lease_back_never_leak(kind: str, tmp_path: Any) -> None:
    """At interpreter exit buttress gives back the process's permits and its lease slot. A use after that
    (a later atexit handler, a daemon thread) must not take a permit on the freed slot -- nobody would
    ever give it back (the next process to take the slot does not reclaim a free slot): it refuses with
    the closed error instead."""
    import subprocess
    import sys
    name = f"{RUN}-{kind}-{next(_count)}"
    script = tmp_path / "late_user.py"
    script.write_text(_LATE_USER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    try:
        out = subprocess.run([sys.executable, str(script), name, kind], env=env, capture_output=True,
                             text=True, timeout=120)
    finally:
        st = SharedMemoryStore(name, implementation=kind)
    try:
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["closed", "closed"], out.stdout + out.stderr
        assert st.permits("bulkhead", "b", 2).in_use == 0
        assert [s for s, _pid, alive in st.leases() if s != st.slot] == []
    finally:
        st.close()
        st.unlink()


def test_a_core_collected_in_a_cycle_releases_its_words_once(impl: Any) -> None:
    """A core bound to words and caught in a reference cycle is collected by the GC. The compiled tp_clear
    used to drop the exporter of its Py_buffer without releasing the export ("Exception ignored in
    tp_clear: BufferError: memoryview has 1 exported buffer"), before __dealloc__ released a buffer whose
    owner was gone. The cycle is built so the GC clears the core first: its callable (clock_ns /
    on_refused) is a bound method of a dict that is untracked by one collection and tracked again (so
    placed after the core) when the core is put in it."""
    import gc
    import sys
    cases = [
        ("GCRA", impl.gcra.WORDS, lambda w: _init(impl.gcra.GCRA, w, (1.0, 3)),
         lambda w, c: impl.gcra.GCRA(1.0, 3, c, words=w)),
        ("WindowCounter", impl.wlimit.WORDS, lambda w: _init(impl.wlimit.WindowCounter, w, (3, 10**9, True)),
         lambda w, c: impl.wlimit.WindowCounter(3, 10**9, True, c, words=w)),
        ("KeyedGCRA", impl.keyed.KeyedGCRA.nwords(4), lambda w: _init(impl.keyed.KeyedGCRA, w, (1.0, 3, 4)),
         lambda w, c: impl.keyed.KeyedGCRA(1.0, 3, 4, 0, c, words=w)),
        ("SharedPermits", impl.shared.HEADER_WORDS + impl.shared.SLOT_WORDS, lambda w: None,
         lambda w, c: impl.shared.SharedPermits(w, 1, 1, 2, on_refused=c)),
    ]
    unraisable: list[Any] = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        for what, nwords, init, make_core in cases:
            buf, box, core = _cycle_parts(nwords, init, make_core)
            gc.collect()                     # box (empty) is untracked; the core moves to the oldest gen
            box["core"] = core               # box tracked again, after the core
            del box, core
            gc.collect()
            buf.append(0)                    # BufferError while any export of buf is left
            assert not unraisable, (what, [str(u.exc_value) for u in unraisable])
    finally:
        sys.unraisablehook = old_hook


def _init(cls: Any, words: memoryview, args: tuple[Any, ...]) -> None:
    cls.init_words(words, *args)


def _cycle_parts(nwords: int, init: Callable[[memoryview], None],
                 make_core: Callable[[memoryview, Callable[[], int]], Any]) -> tuple[bytearray, dict[str, Any], Any]:
    import ctypes
    buf = bytearray(8 * nwords + 8)
    skip = -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % 8
    words = memoryview(buf)[skip:skip + 8 * nwords]
    init(words)
    box: dict[str, Any] = {}
    return buf, box, make_core(words, box.__len__)


def test_only_objects_that_can_be_closed_are_bound(kind: str) -> None:
    """track() refuses, with a clear TypeError, an object the store could not close later: one without
    _close(message), or one that cannot be weakly referenced (the store must not keep it alive)."""
    class NoWeak:
        __slots__ = ()

        def _close(self, message: str) -> None:
            pass

    st = _store(kind)
    try:
        with pytest.raises(TypeError, match=r"^object cannot be bound to shm://.*: it has no _close\(message\)"):
            st._seg.track(object())
        with pytest.raises(TypeError, match=r"^NoWeak cannot be bound to shm://.*weak references"):
            st._seg.track(NoWeak())
    finally:
        st.close()
        st.unlink()
