"""The harness of the tests that run several processes on one store (shm://, redis://): spawned
processes started behind a barrier, one result each, exact counts; and the SIGKILL-mid-run harness
(kill one process in the middle of its decisions, collect the survivors' results).

Used by tests/test_shm_processes.py, tests/test_limiter_stores.py and tests/test_breaker_stores.py.
Targets must be module-level functions (spawn pickles them by reference) whose last argument is the
connection they report on:

- run_all / run_one: the target sends one result (an exception instance is raised here).
- sigkill_mid_run: the target sends ("ready", os.getpid()), then ("progress", k) now and then, then
  ("done", *result) -- or ("error", repr(exc)).
"""
from __future__ import annotations

import glob
import multiprocessing as mp
import os
import signal
from typing import Any, Callable, Iterator, Sequence

import pytest

from buttress.stores import shm as shm_mod

from conftest import NO_EXT, REQUIRE_EXT, _compiled_available

CTX = mp.get_context("spawn")
NPROC = 4
JOIN = 120          # s: a generous bound on a child's report (never a timed assertion: only a hang guard)

ArgsFor = Callable[[int], Sequence[Any]]


def barrier(n: int = NPROC) -> Any:
    """A barrier for n spawned processes (they all start deciding at once)."""
    return CTX.Barrier(n)


def start(target: Callable[..., None], args_for: ArgsFor, n: int = NPROC) -> list[tuple[Any, Any]]:
    """Start n spawned processes target(*args_for(i), conn); returns (reader, process) pairs."""
    out = []
    for i in range(n):
        r, w = CTX.Pipe(duplex=False)
        p = CTX.Process(target=target, args=(*args_for(i), w))
        p.start()
        out.append((r, p))
    return out


def receive(r: Any, p: Any) -> Any:
    """The next message of process p (a hang guard of JOIN seconds, never a timing assertion)."""
    assert r.poll(JOIN), f"process {p.pid} did not report within {JOIN} s"
    return r.recv()


def run_all(target: Callable[..., None], args_for: ArgsFor, n: int = NPROC) -> list[Any]:
    """Start n processes, collect one result from each (in order), join them; an exception a process
    sent is raised here, a process that did not exit 0 fails the test."""
    started = start(target, args_for, n)
    out = []
    for r, p in started:
        out.append(receive(r, p))
        p.join(JOIN)
        assert p.exitcode == 0, f"process {p.pid} exited with {p.exitcode}"
    for x in out:
        if isinstance(x, BaseException):
            raise x
    return out


def run_one(target: Callable[..., None], *args: Any) -> Any:
    """One process target(*args, conn): its one result."""
    return run_all(target, lambda i: args, 1)[0]


def sigkill_mid_run(target: Callable[..., None], args_for: ArgsFor, victim: int, kill_at: int,
                    n: int = NPROC) -> list[tuple[Any, ...] | None]:
    """Start n hammering processes; once all are ready and the victim reported progress >= kill_at,
    SIGKILL it. Returns each process's final ("done", ...) message, None for the victim (which must have
    died of the SIGKILL); a survivor that reported an error or no "done" fails the test."""
    started = start(target, args_for, n)
    pids = []
    for r, p in started:
        msg = receive(r, p)
        assert msg[0] == "ready", msg
        pids.append(msg[1])
    r, p = started[victim]
    while True:             # kill the victim mid-run, after it reported some progress
        msg = receive(r, p)
        assert msg[0] == "progress", msg
        if msg[1] >= kill_at:
            os.kill(pids[victim], signal.SIGKILL)
            break
    out: list[tuple[Any, ...] | None] = []
    for i, (r, p) in enumerate(started):
        if i == victim:
            p.join(JOIN)
            assert p.exitcode == -signal.SIGKILL, f"the victim exited with {p.exitcode}"
            out.append(None)
            continue
        while True:         # read to the end before joining (a full pipe would block the child)
            msg = receive(r, p)
            if msg[0] != "progress":
                break
        assert msg[0] == "done", msg
        p.join(JOIN)
        assert p.exitcode == 0, f"process {p.pid} exited with {p.exitcode}"
        out.append(tuple(msg))
    return out


# -- fixtures shared by the store tests (import them into the test module) ---------------------------------

@pytest.fixture(params=["cython", "python"])
def kind(request: pytest.FixtureRequest) -> str:
    """A store's implementation kind: "cython" (the compiled core's lock-free words) or "python" (the
    twin, under the segment's locks)."""
    if request.param == "cython":
        if NO_EXT:
            pytest.skip("BUTTRESS_NO_EXTENSIONS is set")
        if not _compiled_available():
            if REQUIRE_EXT:
                pytest.fail("BUTTRESS_REQUIRE_EXTENSIONS is set but the compiled core does not import")
            pytest.skip("compiled core not built")
    return str(request.param)


def no_segments_left(run: str) -> Iterator[None]:
    """Body of a module fixture: after the module, no segment whose name starts with `run` is left in
    /dev/shm (they are removed, then the test fails)."""
    yield
    left = glob.glob(os.path.join(shm_mod.SHM_DIR, shm_mod.PREFIX + run + "*"))
    for path in left:
        os.unlink(path)
    assert not left, f"segments left in /dev/shm: {left}"


def unlink_segment(name: str) -> None:
    """Remove segment `name` and its lock file if they exist."""
    for path in (shm_mod.segment_path(name), shm_mod.segment_path(name) + ".lock"):
        if os.path.exists(path):
            os.unlink(path)
