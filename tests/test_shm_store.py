"""The store foundation (issue 14, phase 1): SharedMemoryStore lifecycle, header checks, directory and
settings, lease table, and SharedPermits in one process -- including a crash after every single word
write of every op (the protocol's crash safety, step by step), for both implementations."""
from __future__ import annotations

import os
import struct
import uuid

import pytest

from buttress import _impl
from buttress.stores import MemoryStore, SharedMemoryStore, store_from_url
from buttress.stores import shm as shm_mod
from buttress._twin import shared as twin_shared

from conftest import NO_EXT, _compiled_available
from procs import CTX, kind, no_segments_left, run_one  # noqa: F401 - the kind fixture

RUN = f"bt-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module", autouse=True)
def no_leaked_segments():
    yield from no_segments_left(RUN)


_count = iter(range(10**6))


def fresh(tag: str = "s") -> str:
    return f"{RUN}-{tag}-{next(_count)}"


@pytest.fixture
def store(kind: str):
    st = SharedMemoryStore(fresh(kind), implementation=kind)
    try:
        yield st
    finally:
        st.close()
        st.unlink()


def header(path: str) -> dict[str, object]:
    with open(path, "rb") as f:
        raw = f.read(shm_mod.HEADER_SIZE)
    q = lambda off: struct.unpack_from("q", raw, off)[0]   # noqa: E731
    return {"magic": q(shm_mod.H_MAGIC), "version": q(shm_mod.H_VERSION), "size": q(shm_mod.H_SIZE),
            "kind": q(shm_mod.H_KIND), "boot": raw[shm_mod.H_BOOT:shm_mod.H_BOOT + 16],
            "ready": q(shm_mod.H_READY), "nslots": q(shm_mod.H_NSLOTS)}


def poke(path: str, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


# ---- lifecycle and header ------------------------------------------------------------------------------

def test_lifecycle_create_reopen_close_unlink(kind: str) -> None:
    name = fresh(kind)
    st = SharedMemoryStore(name, implementation=kind)
    path = shm_mod.segment_path(name)
    assert os.path.exists(path) and os.path.exists(path + ".lock")
    h = header(path)
    assert h["magic"] == shm_mod.MAGIC and h["ready"] == shm_mod.MAGIC
    assert h["version"] == shm_mod.LAYOUT_VERSION and h["size"] == 1 << 20 == os.path.getsize(path)
    assert shm_mod.KINDS[h["kind"]] == ("atomic" if kind == "cython" else "locked")
    assert h["boot"] == shm_mod._boot_id() and h["nslots"] == 128
    p = st.permits("bulkhead", "db", 3)
    assert p.try_acquire(2)
    st.close()
    assert os.path.exists(path), "close keeps the segment for the other processes"
    assert "closed" in repr(st)
    with pytest.raises(RuntimeError, match="closed"):
        st.bind("bulkhead", "db", {"max_permits": 3}, 8)
    st2 = SharedMemoryStore(name, implementation=kind)
    p2 = st2.permits("bulkhead", "db", 3)
    assert p2.in_use == 0, "a clean close gives the process's permits back"
    assert [o["name"] for o in st2.objects()] == ["db"]
    st2.close()
    st2.unlink()
    assert not os.path.exists(path) and not os.path.exists(path + ".lock")
    st2.unlink()        # twice is fine


def test_handles_in_one_process_share_the_segment_and_lease(kind: str) -> None:
    name = fresh(kind)
    a = SharedMemoryStore(name, implementation=kind)
    b = store_from_url(f"shm://{name}")
    try:
        assert isinstance(b, SharedMemoryStore) and b.slot == a.slot and b.implementation_kind == a.implementation_kind
        pa, pb = a.permits("bulkhead", "x", 2), b.permits("bulkhead", "x", 2)
        assert pa.try_acquire() and pb.try_acquire() and not pa.try_acquire()
        assert pa.held == pb.held == 2
        a.close()
        assert pb.try_acquire() is False and pb.in_use == 2, "closing one handle keeps the other's lease"
        pb.release(2)
    finally:
        b.close()
        b.unlink()


def test_other_layout_version_is_a_clear_error(kind: str) -> None:
    name = fresh(kind)
    st = SharedMemoryStore(name, implementation=kind)
    st.close()
    path = shm_mod.segment_path(name)
    poke(path, shm_mod.H_VERSION, struct.pack("q", shm_mod.LAYOUT_VERSION + 1))
    try:
        v = shm_mod.LAYOUT_VERSION
        with pytest.raises(ValueError, match=rf"layout version {v + 1}, this buttress reads version {v}.*unlink"):
            SharedMemoryStore(name, implementation=kind)
    finally:
        st.unlink()


def test_foreign_file_is_refused(kind: str) -> None:
    name = fresh(kind)
    path = shm_mod.segment_path(name)
    with open(path, "wb") as f:
        f.write(b"not ours" * 1024)
    try:
        with pytest.raises(ValueError, match="is not a buttress segment"):
            SharedMemoryStore(name, implementation=kind)
        with open(path, "rb") as f:
            assert f.read(8) == b"not ours", "a foreign file is never overwritten"
    finally:
        os.unlink(path)
        os.unlink(path + ".lock")


@pytest.mark.parametrize("damage", ["boot", "ready", "empty"])
def test_segment_from_an_earlier_boot_or_unfinished_is_reinitialised(kind: str, damage: str) -> None:
    name = fresh(kind)
    st = SharedMemoryStore(name, implementation=kind)
    p = st.permits("bulkhead", "db", 3)
    assert p.try_acquire(3)
    st.close()
    del p
    path = shm_mod.segment_path(name)
    if damage == "boot":
        poke(path, shm_mod.H_BOOT, uuid.uuid4().bytes)
    elif damage == "ready":
        poke(path, shm_mod.H_READY, struct.pack("q", 0))
    else:
        os.truncate(path, 0)
    st = SharedMemoryStore(name, implementation=kind)
    try:
        assert st.objects() == [], "nothing of an earlier boot or an unfinished creation survives"
        assert header(path)["boot"] == shm_mod._boot_id()
        assert st.permits("bulkhead", "db", 5).max_permits == 5
    finally:
        st.close()
        st.unlink()


def test_size_and_slots_are_fixed_at_creation(kind: str) -> None:
    name = fresh(kind)
    st = SharedMemoryStore(name, size=128 << 10, slots=8, implementation=kind)
    try:
        assert st.size == 128 << 10 and st.nslots == 8
        with pytest.raises(ValueError, match=r"size=262144 but shm://.* was created with size=131072"):
            SharedMemoryStore(name, size=256 << 10, implementation=kind)
        with pytest.raises(ValueError, match=r"slots=9 but .* was created with slots=8"):
            SharedMemoryStore(name, slots=9, implementation=kind)
        same = store_from_url(f"shm://{name}?size={128 << 10}&slots=8")
        assert same.size == 128 << 10
        same.close()
    finally:
        st.close()
        st.unlink()


@pytest.mark.parametrize("bad, exc, match", [
    (dict(name=3), TypeError, "name must be a str"),
    (dict(name=""), ValueError, "non-empty"),
    (dict(name="a/b"), ValueError, "without '/'"),
    (dict(name="x" * 201), ValueError, "at most 200 bytes"),
    (dict(name="ok", size=1.5), TypeError, "size must be an int"),
    (dict(name="ok", size=True), TypeError, "size must be an int"),
    (dict(name="ok", size=1000), ValueError, r"size must be in \[65536"),
    (dict(name="ok", slots=0), ValueError, r"slots must be in \[1, 1023\], got 0"),
    (dict(name="ok", slots=1024), ValueError, r"slots must be in \[1, 1023\]"),
    (dict(name="ok", implementation="rust"), ValueError, "implementation must be"),
])
def test_bad_arguments_are_named(bad: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        SharedMemoryStore(**bad)


def test_store_from_url() -> None:
    m = store_from_url("memory://")
    assert isinstance(m, MemoryStore) and store_from_url("memory://") is m and m.url == "memory://"
    assert store_from_url("memory://other") is not m
    assert store_from_url(m) is m
    with pytest.raises(ValueError, match=r"unknown scheme 'ftp'.*allowed: memory://, shm://NAME, redis://"):
        store_from_url("ftp://x")
    with pytest.raises(ValueError, match="unknown parameter 'colour'"):
        store_from_url("shm://x?colour=red")
    with pytest.raises(ValueError, match="size must be an int, got 'big'"):
        store_from_url("shm://x?size=big")
    with pytest.raises(ValueError, match="names no segment"):
        store_from_url("shm://")
    with pytest.raises(TypeError, match="store must be a Store or a URL str"):
        store_from_url(5)


# ---- directory -----------------------------------------------------------------------------------------

def test_settings_mismatch_names_every_setting_with_both_values(store: SharedMemoryStore) -> None:
    b = store.bind("token_bucket", "checkout", {"rate": 100.0, "capacity": 20}, 8)
    assert b.created and len(b.words) == 64 and b.offset % 64 == 0
    again = store.bind("token_bucket", "checkout", {"capacity": 20, "rate": 100.0}, 8)
    assert not again.created and again.offset == b.offset, "key order does not matter"
    with pytest.raises(ValueError) as info:
        store.bind("token_bucket", "checkout", {"rate": 50.0, "capacity": 20, "window": 3}, 8)
    msg = str(info.value)
    assert "rate=50.0 here but rate=100.0 in the store" in msg
    assert "window=3 here but window='<unset>' in the store" in msg
    assert "capacity" not in msg and "token_bucket 'checkout'" in msg and store.url in msg
    other = store.bind("leaky_bucket", "checkout", {"rate": 1.0}, 8)
    assert other.created and other.offset != b.offset, "(kind, name) is the key"
    with pytest.raises(ValueError, match="asked for 16"):
        store.bind("token_bucket", "checkout", {"rate": 100.0, "capacity": 20}, 16)


def test_bind_runs_init_once_on_zeroed_words(store: SharedMemoryStore) -> None:
    seen = []

    def init(words):
        seen.append(bytes(words))
        words.cast("q")[0] = 42
    b = store.bind("gcra", "g", {}, 8, init=init)
    assert seen == [bytes(64)] and b.words.cast("q")[0] == 42
    store.bind("gcra", "g", {}, 8, init=init)
    assert len(seen) == 1


@pytest.mark.parametrize("settings, exc, match", [
    ({"rate": float("nan")}, ValueError, "not a finite number"),
    ({"rate": object()}, TypeError, "setting rate must be"),
    ({1: 2}, TypeError, "setting names"),
    ({"x": "y" * 300}, ValueError, "at most 255"),
])
def test_bad_settings_are_named(store: SharedMemoryStore, settings: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        store.bind("gcra", "g", settings, 8)


def test_bad_kind_name_nwords(store: SharedMemoryStore) -> None:
    with pytest.raises(ValueError, match="kind must be"):
        store.bind("Token Bucket", "g", {}, 8)
    with pytest.raises(ValueError, match="at most 191 bytes"):
        store.bind("gcra", "x" * 192, {}, 8)
    with pytest.raises(ValueError, match="nwords must be"):
        store.bind("gcra", "g", {}, 0)
    with pytest.raises(ValueError, match="layout must be"):
        store.bind("gcra", "g", {}, 8, layout="heap")


def test_full_segment_says_which_size_to_pass(kind: str) -> None:
    name = fresh(kind)
    st = SharedMemoryStore(name, size=64 << 10, slots=4, implementation=kind)
    try:
        st.bind("gcra", "a", {}, 1000)
        with pytest.raises(ValueError, match=rf"shm://{name} is full: gcra 'big' needs 80000 bytes.*"
                                             rf"SharedMemoryStore\('{name}', size=262144\)"):
            st.bind("gcra", "big", {}, 10000)
        n = 1
        with pytest.raises(ValueError, match="its directory holds 16 objects.*size="):
            while True:
                st.bind("gcra", f"small{n}", {}, 1)
                n += 1
        assert n == 16, "every entry of the directory is usable"
    finally:
        st.close()
        st.unlink()


# ---- lease table ---------------------------------------------------------------------------------------

def _child_open(name: str, kind: str, conn) -> None:
    st = SharedMemoryStore(name, implementation=kind)
    p = st.permits("bulkhead", "db", 3)
    p.try_acquire(2)
    conn.send(st.slot)
    os._exit(0)      # no close: the lease and the permits stay behind as after a crash


def test_dead_lease_is_found_and_its_permits_taken_back(store: SharedMemoryStore, kind: str) -> None:
    p = store.permits("bulkhead", "db", 3)
    slot = run_one(_child_open, store.name, kind)
    assert slot != store.slot and p.held_by(slot) == 2 and p.in_use == 2
    assert [s for s, _pid, alive in store.leases() if not alive] == [slot]
    assert store.dead_slots() == [slot]
    assert store.reclaim() == 2
    assert p.held_by(slot) == 0 and store.dead_slots() == [] and p.reclaimed == 2
    while p.held:
        p.release()
    assert p.try_acquire(3) and p.in_use == 3 and not p.try_acquire()
    p.release(3)


def test_recycled_pid_is_not_the_old_process(store: SharedMemoryStore) -> None:
    """A lease names pid + start time: our own pid with another start time is a dead process."""
    p = store.permits("bulkhead", "db", 2)
    seg = store._seg
    slot = next(s for s in range(1, store.nslots + 1) if seg.rd(seg._lease_off(s)) == 0)
    off = seg._lease_off(slot)
    start = shm_mod.proc_start_time(os.getpid())
    assert start is not None
    seg.wr(off + 8, start - 1)
    seg.wr(off, os.getpid())
    words = store.bind("bulkhead", "db", {"max_permits": 2}, _nwords(store), layout="permits").words
    p2 = store.core.SharedPermits(words, slot, store.nslots, 2, store.locker(p2_offset(store)))
    assert p2.try_acquire(2) and p.in_use == 2
    assert store.dead_slots() == [slot]
    assert p.try_acquire() is True, "a refused acquisition takes back the dead holder's permits"
    assert p.held == 1 and p.held_by(slot) == 0 and seg.rd(off) == 0
    p.release()


def p2_offset(store):
    return next(o["offset"] for o in store.objects() if o["name"] == "db")


def _nwords(store):
    from buttress.stores import permits_nwords
    return permits_nwords(store.nslots, store.core)


def test_slots_run_out_with_a_clear_error(kind: str) -> None:
    name = fresh(kind)
    st = SharedMemoryStore(name, slots=1, implementation=kind)
    try:
        with CTX.Pool(1) as pool:
            r = pool.apply(_open_and_report, (name, kind))
        assert "all 1 lease slots" in r and "slots=2" in r
    finally:
        st.close()
        st.unlink()


def _open_and_report(name: str, kind: str) -> str:
    try:
        SharedMemoryStore(name, implementation=kind)
    except ValueError as exc:
        return str(exc)
    return "opened"


def test_fork_child_gets_its_own_lease(store: SharedMemoryStore) -> None:
    p = store.permits("bulkhead", "db", 4)
    assert p.try_acquire()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ok = p.slot != 0 and p.held == 0 and p.try_acquire(2) and p.held == 2 and p.in_use == 3
            os.write(w, f"{int(bool(ok))} {p.slot}".encode())
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 100).decode().split()
    os.close(r)
    os.waitpid(pid, 0)
    assert out[0] == "1" and int(out[1]) != store.slot, "the child decided on a slot of its own"
    assert p.held == 1 and p.in_use == 3
    store.reclaim()       # the child exited without closing: its 2 permits come back
    assert p.in_use == 1
    p.release()


# ---- kinds: compiled (atomic words) and twin (locked) never mix -----------------------------------------

def _hold_open(name: str, kind: str, started, stop) -> None:
    st = SharedMemoryStore(name, implementation=kind)
    started.set()
    stop.wait(60)
    st.close()


def test_a_segment_refuses_the_other_implementation_while_in_use() -> None:
    if NO_EXT or not _compiled_available():
        pytest.skip("needs the compiled core")
    name = fresh("mix")
    started, stop = CTX.Event(), CTX.Event()
    child = CTX.Process(target=_hold_open, args=(name, "python", started, stop))
    child.start()
    try:
        assert started.wait(60)
        with pytest.raises(ValueError, match=r"in use by the pure-Python twin .* this process runs the "
                                             r"compiled core.*cannot share one segment"):
            SharedMemoryStore(name, implementation="cython")
    finally:
        stop.set()
        child.join(60)
    st = SharedMemoryStore(name, implementation="cython")    # nobody holds it now: it changes kind
    try:
        assert header(st.path)["kind"] == shm_mod.KIND_CODES["atomic"]
    finally:
        st.close()
        st.unlink()


# ---- SharedPermits in one process ----------------------------------------------------------------------

def test_permits_exact_in_one_process(store: SharedMemoryStore) -> None:
    p = store.permits("bulkhead", "db", 3)
    assert [p.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert (p.in_use, p.held, p.available, p.max_permits) == (3, 3, 0, 3)
    with pytest.raises(ValueError, match="n=4 permits released but this process holds only 3"):
        p.release(4)
    p.release(2)
    assert p.try_acquire_within(1) is False and p.try_acquire_within(2) is True and p.in_use == 2
    p.resize(5)
    assert p.try_acquire(3) and p.in_use == 5 and p.max_permits == 5 and not p.try_acquire()
    p.release(5)
    assert p.in_use == 0 and p.held == 0


def test_memory_store_permits(kind: str) -> None:
    m = MemoryStore(implementation=kind)
    p = m.permits("bulkhead", "db", 2)
    q = m.permits("bulkhead", "db", 2)
    assert p.try_acquire() and q.try_acquire() and not p.try_acquire() and q.held == 2
    with pytest.raises(ValueError, match="max_permits=3 here but max_permits=2"):
        m.permits("bulkhead", "db", 3)


class Crash(Exception):
    pass


class Dying:
    """Int64 words that take `budget` writes and then die: the write that would exceed it, and every
    later one, raise Crash and change nothing (a process killed between two stores)."""

    def __init__(self, w: memoryview, budget: int) -> None:
        self.w, self.budget = w, budget

    def __getitem__(self, i: int) -> int:
        return self.w[i]

    def __setitem__(self, i: int, v: int) -> None:
        if self.budget <= 0:
            raise Crash
        self.budget -= 1
        self.w[i] = v


NSLOTS = 3


def _words(limit: int) -> memoryview:
    buf = bytearray(8 * (twin_shared.HEADER_WORDS + twin_shared.SLOT_WORDS * NSLOTS))
    w = memoryview(buf).cast("q")
    w[1] = limit
    return w


def _held(w: memoryview, s: int) -> int:
    return w[twin_shared.HEADER_WORDS + 2 * (s - 1)] & twin_shared.MAX_PERMITS


def _check(w: memoryview) -> None:
    twin_shared._settle(w, NSLOTS)
    assert w[0] & twin_shared.MAX_PERMITS == sum(_held(w, s) for s in range(1, NSLOTS + 1))


OPS = {
    "acquire": lambda w: twin_shared._acquire(w, NSLOTS, 2, 1, None),
    "release": lambda w: twin_shared._release(w, NSLOTS, 2, 1),
    "reclaim-other": lambda w: twin_shared._reclaim(w, NSLOTS, 3, False),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_a_crash_after_any_write_leaves_every_permit_recoverable(op: str) -> None:
    """The protocol (shared by both implementations, step for step) killed after each of its writes:
    the words stay valid, another process completes any installed op, and reclaiming the dead slot
    gives back exactly what it held -- never a lost or doubled permit."""
    budgets = 0
    for budget in range(0, 50):
        w = _words(5)
        # slot 1 holds 1, slot 2 holds 2 (before the op), slot 3 holds 1
        for s, n in ((1, 1), (2, 2), (3, 1)):
            assert twin_shared._acquire(w, NSLOTS, s, n, None)
        try:
            result = OPS[op](Dying(w, budget))
            finished = True
            assert result == (1 if op == "reclaim-other" else True), "the op itself works"
        except Crash:
            finished = False
        _check(w)        # a survivor completes a half-done op: the count matches the holdings exactly
        if finished:
            break
        budgets += 1
        dead = 3 if op == "reclaim-other" else 2
        held = _held(w, dead)
        got = twin_shared._reclaim(w, NSLOTS, dead, False)
        assert got == held and _held(w, dead) == 0
        _check(w)
        # everything not held by a live slot is usable again, never more
        free = 5 - _held(w, 1) - (_held(w, 3) if dead == 2 else _held(w, 2))
        assert twin_shared._acquire(w, NSLOTS, dead, free, None)
        assert not twin_shared._acquire(w, NSLOTS, 1, 1, None)
    assert budgets >= 5, "the op was interrupted at each of its writes"


def test_crash_between_install_and_apply_is_completed_by_any_op() -> None:
    """An op installed in G whose process died before applying it: the next op of any slot finishes it."""
    w = _words(3)
    assert twin_shared._acquire(w, NSLOTS, 1, 1, None)
    # slot 2's acquire of 2, killed right after its CAS of G (intent + G written, H_2 not)
    with pytest.raises(Crash):
        twin_shared._acquire(Dying(w, 3), NSLOTS, 2, 2, None)
    assert w[0] >> 22 & twin_shared.MAX_SLOTS == 2 and w[0] & twin_shared.MAX_PERMITS == 3
    assert _held(w, 2) == 0
    assert not twin_shared._acquire(w, NSLOTS, 3, 1, None), "the dead op's permits count: full"
    assert _held(w, 2) == 2 and w[0] >> 22 & twin_shared.MAX_SLOTS == 0, "completed by the refused slot"
    assert twin_shared._reclaim(w, NSLOTS, 2, False) == 2
    assert twin_shared._acquire(w, NSLOTS, 3, 2, None) and w[0] & twin_shared.MAX_PERMITS == 3


@pytest.mark.parametrize("bad, exc, match", [
    (dict(words=b"x" * 4096), TypeError, "writable buffer, got a read-only bytes"),
    (dict(words=5), TypeError, "words must be a writable buffer"),
    (dict(words=bytearray(16)), ValueError, "words holds 16 bytes but 2 lease slots need 96"),
    (dict(slot=3), ValueError, "slot must be"),
    (dict(nslots=1024), ValueError, "nslots must be"),
    (dict(max_permits=1 << 22), ValueError, "max_permits must be"),
    (dict(locker=5), TypeError, "locker must be None or a context manager"),
    (dict(on_refused=5), TypeError, "on_refused must be None or a callable"),
])
def test_shared_permits_bad_arguments_same_in_both(kind: str, bad: dict, exc: type, match: str) -> None:
    mod = _impl.compiled("shared") if kind == "cython" else _impl.twin("shared")
    args = dict(words=bytearray(4096), slot=1, nslots=2, max_permits=2)
    args.update(bad)
    with pytest.raises(exc, match=match):
        mod.SharedPermits(**args)


def test_unaligned_words_are_refused(kind: str) -> None:
    mod = _impl.compiled("shared") if kind == "cython" else _impl.twin("shared")
    with pytest.raises(ValueError, match="8-byte aligned"):
        mod.SharedPermits(memoryview(bytearray(4096))[3:], 1, 2, 2)


def test_threads_of_one_process_share_its_slot_exactly(store: SharedMemoryStore, fast_switching) -> None:
    """The threads of one process take turns on its slot (busy bit): counts stay exact under a race."""
    from helpers import race
    p = store.permits("bulkhead", "db", 3)
    q = store.permits("bulkhead", "db", 3)        # a second object over the same words
    rounds = 2000 if store.implementation_kind == "atomic" else 300

    def body(i: int) -> tuple[int, int]:
        obj = p if i % 2 else q
        got = over = 0
        for _ in range(rounds):
            if obj.try_acquire():
                got += 1
                if obj.in_use > 3:
                    over += 1
                obj.release()
        return got, over

    results = race(8, body)
    assert all(over == 0 for _, over in results)
    assert sum(got for got, _ in results) >= rounds, "permits were admitted"
    assert p.in_use == 0 and p.held == 0 and p.try_acquire(3) and not p.try_acquire()
    p.release(3)


# ---- use after close -----------------------------------------------------------------------------------

def test_objects_bound_to_a_closed_store_raise_one_clear_error_and_never_admit(kind: str) -> None:
    """close() gives this process's lease slot back: a bulkhead / shedder bound to it must not admit on that
    slot any more (compiled admitted 3 against max_concurrent=2; the twin leaked a ValueError about fd -1)."""
    from buttress import Bulkhead, LoadShedder, Priority
    name = fresh(kind)
    st = SharedMemoryStore(name, implementation=kind)
    try:
        bh = Bulkhead(max_concurrent=2, name="b", store=st)
        sh = LoadShedder(max_in_flight=2, name="s", store=st)
        raw = st.permits("raw", "p", 2)
        assert bh.try_acquire() and raw.try_acquire()
        st.close()
        msg = f"SharedMemoryStore {name!r} is closed in this process"
        # the release of a permit taken before the close is dropped: the close gave it back already
        # (a guarded call's own result must not be replaced by the store's error)
        for _ in range(3):
            assert bh.release() is None and raw.release() is None and raw.release(2) is None
        with pytest.raises(ValueError, match="n must be"):
            raw.release(0)                  # bad input is still named
        for use in (bh.try_acquire, lambda: sh.admit(Priority.CRITICAL).__enter__(),
                    raw.try_acquire, lambda: raw.try_acquire_within(1), lambda: raw.held_by(1),
                    lambda: raw.resize(3), lambda: raw.reclaim(1), lambda: raw._set_slot(1), st.reclaim,
                    lambda: st.slot):
            for _ in range(3):
                with pytest.raises(RuntimeError) as info:
                    use()
                assert str(info.value) in (msg, f"SharedMemoryStore {name!r} is closed")
        assert repr(raw) == "SharedPermits(<closed>)"
        for read in ("in_use", "held", "max_permits", "available", "reclaimed"):   # never a stale 0
            with pytest.raises(RuntimeError, match=f"^{msg}$"):
                getattr(raw, read)
        other = SharedMemoryStore(name, implementation=kind)      # a fresh opener: nothing held any more
        try:
            assert other.permits("raw", "p", 2).in_use == 0
            assert other.permits("bulkhead", "b", 2).in_use == 0
        finally:
            other.close()
    finally:
        SharedMemoryStore(name, implementation=kind).unlink()


def test_twin_objects_bound_to_a_closed_store_say_so(kind: str) -> None:
    """The twin decides under the segment's lock file: closed, every object says the store's error
    (not an internal ValueError about a negative file descriptor)."""
    import buttress
    if kind != "python" or buttress.IMPLEMENTATION == "cython":
        pytest.skip("the twin's locks (run with BUTTRESS_NO_EXTENSIONS=1)")
    from buttress import CircuitBreaker, TokenBucket
    name = fresh(kind)
    st = SharedMemoryStore(name, implementation=kind)
    try:
        tb = TokenBucket(rate=1, capacity=5, name="t", store=st)
        cb = CircuitBreaker(name="c", failure_threshold=2, store=st)
        st.close()
        for use in (tb.try_acquire, cb.try_acquire):
            with pytest.raises(RuntimeError, match=f"^SharedMemoryStore {name!r} is closed in this process$"):
                use()
    finally:
        SharedMemoryStore(name, implementation=kind).unlink()
