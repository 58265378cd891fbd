"""Threads of several processes deciding on one twin (locked) shm store.

POSIX record locks (lockf) belong to the process: the kernel's deadlock detector sees a thread holding
object X and another thread of the same process waiting for Y as one owner holding X and waiting for Y,
and with a second process doing the reverse it failed a wait with EDEADLK -- an OSError out of
try_acquire(). The store takes Linux OFD locks (owned by its lock-file descriptor, no such detector), and
where they are missing waits a false EDEADLK out. Both modes run here: exact counts, no OSError."""
from __future__ import annotations

import errno
import fcntl
import os
import sys
import threading
import uuid

import pytest

import buttress
from buttress.stores import SharedMemoryStore
from buttress.stores import shm as shm_mod

from procs import JOIN, barrier, no_segments_left, run_all, unlink_segment

RUN = f"bt-thr-{os.getpid()}-{uuid.uuid4().hex[:8]}"
_count = iter(range(10**6))
THREADS = 4
CAP = 300


@pytest.fixture(scope="module", autouse=True)
def no_leaked_segments():
    yield from no_segments_left(RUN)


@pytest.fixture
def name():
    n = f"{RUN}-{next(_count)}"
    yield n
    unlink_segment(n)


def _racer(name: str, ofd: bool, ops: int, pbarrier, conn) -> None:
    try:
        if not ofd:
            shm_mod._ofd[0] = False     # the lockf fallback (a false EDEADLK waited out)
        sys.setswitchinterval(1e-6)
        st = SharedMemoryStore(name, implementation="python")
        tb = {k: buttress.TokenBucket(rate=1e-6, capacity=CAP, name=k, store=st)
              for k in ("a", "b")}
        bh = buttress.Bulkhead(max_concurrent=37, name="bh", store=st)
        got = {"a": 0, "b": 0, "bh": 0}
        errors: list[str] = []
        lock = threading.Lock()
        tbarrier = threading.Barrier(THREADS)

        def work(i: int) -> None:
            order = ("a", "b") if i % 2 else ("b", "a")     # the crossing orders of the false cycle
            mine = {"a": 0, "b": 0, "bh": 0}
            try:
                tbarrier.wait()
                for _ in range(ops):
                    for k in order:
                        mine[k] += bool(tb[k].try_acquire())
                    mine["bh"] += bool(bh.try_acquire())
            except BaseException as exc:  # noqa: BLE001
                errors.append(repr(exc))
            with lock:
                for k in got:
                    got[k] += mine[k]

        pbarrier.wait(JOIN)
        ts = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        pbarrier.wait(JOIN)         # nobody closes (gives its bulkhead permits back) before all decided
        conn.send((got, errors))
        st.close()
    except BaseException as exc:  # noqa: BLE001
        conn.send(exc)


@pytest.mark.parametrize("ofd", [True, False], ids=["ofd", "lockf"])
def test_threads_of_processes_on_a_twin_store_exact_and_no_oserror(name: str, ofd: bool) -> None:
    b = barrier()
    results = run_all(_racer, lambda i: (name, ofd, 200, b))
    assert [e for _, e in results] == [[]] * len(results), "no error reaches a caller"
    total = {k: sum(g[k] for g, _ in results) for k in ("a", "b", "bh")}
    assert total == {"a": CAP, "b": CAP, "bh": 37}


@pytest.mark.skipif(not getattr(shm_mod, "_ofd", [False])[0], reason="OFD locks not available here")
def test_a_forked_child_locks_on_its_own_descriptor(name: str) -> None:
    """An OFD lock belongs to the open file description: a child that kept the parent's descriptor
    would be the same owner and not be excluded by a lock the parent holds."""
    st = SharedMemoryStore(name, implementation="python")
    lk = st.locker(4096)
    r, w = os.pipe()
    with lk:
        pid = os.fork()
        if pid == 0:            # pragma: no cover - the child
            code = 0
            try:
                fd = st._seg.lockfd
                try:
                    fcntl.fcntl(fd, shm_mod._F_OFD_SETLK,
                                shm_mod._FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 4096, 1, 0))
                    code = 1    # taken: the child shares the parent's lock owner
                except OSError as exc:
                    code = 2 if exc.errno in (errno.EAGAIN, errno.EACCES) else 3
                st.close()
            finally:
                os.write(w, bytes([code]))
                os._exit(0)
        os.close(w)
        got = os.read(r, 1)
        os.close(r)
        os.waitpid(pid, 0)
    st.close()
    assert got == bytes([2]), "the parent's lock excludes the forked child"


def test_threads_deciding_while_the_store_closes_get_only_the_closed_error(name: str) -> None:
    """close() on one thread while others decide on twin objects: each decision either decides or raises
    the closed error -- never an OSError (EBADF) or ValueError from a byte lock taken on the descriptor
    close() just dropped (nor a lock on whatever file reuses its number)."""
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for rnd in range(40):
            st = SharedMemoryStore(f"{name}-{rnd}", implementation="python")
            objs = [buttress.TokenBucket(rate=1e6, capacity=10**6, name="t", store=st),
                    buttress.FixedWindowLimiter(10**6, 1e5, name="f", store=st),
                    buttress.Bulkhead(max_concurrent=10**6, name="b", store=st)]
            start = threading.Barrier(len(objs) + 1)
            bad: list[str] = []

            def work(o: object) -> None:
                start.wait()
                try:
                    while True:
                        o.try_acquire()         # type: ignore[attr-defined]
                except RuntimeError as exc:
                    if "is closed in this process" not in str(exc):
                        bad.append(repr(exc))
                except BaseException as exc:  # noqa: BLE001 - the defect under test
                    bad.append(repr(exc))

            ts = [threading.Thread(target=work, args=(o,)) for o in objs]
            for t in ts:
                t.start()
            start.wait()
            st.close()
            for t in ts:
                t.join()
            unlink_segment(f"{name}-{rnd}")
            assert bad == [], f"round {rnd}: {bad}"
    finally:
        sys.setswitchinterval(old_interval)
