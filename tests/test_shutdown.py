"""Graceful shutdown (issue 17): readiness 503 at once, new work shed with Overloaded(retry_after), in-flight
work waited for up to a deadline, a report of what was still running.

In process on FakeClock (the deadline and the polls run on it, so nothing waits for real); then through a
real uvicorn server in a child process that receives SIGTERM mid-load.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from buttress import Bulkhead, FakeClock, LoadShedder, Overloaded, Priority, ThreadPoolBulkhead
from buttress.asgi import HealthEndpoints, LoadSheddingMiddleware, ShutdownMiddleware
from buttress.health import HealthRegistry
from buttress.lifecycle import Drained, Lifecycle, ShutdownReport, shutdown, shutdown_async
from buttress.registry import Registry, default_registry


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def how(obj, sync=False) -> str:
    """How the lifecycle waits for `obj`: its own drain where it has one (the patterns are getting
    drain / drain_async), else by polling its in-flight count."""
    if sync and callable(getattr(obj, "drain", None)):
        return "drain"
    if callable(getattr(obj, "drain_async", None)):
        return "drain_async"
    return "drain" if callable(getattr(obj, "drain", None)) else "polled"


async def hold(bh: Bulkhead, clock: FakeClock, seconds: float) -> None:
    async with bh:
        await clock.sleep_async(seconds)


# -- the drain --------------------------------------------------------------------------------------------


def test_nothing_in_flight_drains_at_once():
    clock = FakeClock()
    bh, shed = Bulkhead(4, name="db"), LoadShedder(max_in_flight=10, name="edge")
    report = shutdown(bh, shed, deadline=5.0, clock=clock)
    assert isinstance(report, ShutdownReport) and report.completed and report.still_running == {}
    assert report.elapsed == 0.0 and report.deadline == 5.0
    assert [(d.name, d.kind, d.in_flight, d.still_running) for d in report.drained] == [
        ("bulkhead 'db'", "bulkhead", 0, 0), ("load_shedder 'edge'", "load_shedder", 0, 0)]


def test_in_flight_work_that_finishes_before_the_deadline():
    clock = FakeClock()
    bh = Bulkhead(4, name="db", clock=clock)
    lc = Lifecycle(bh, clock=clock)

    async def main():
        holders = [asyncio.ensure_future(hold(bh, clock, s)) for s in (1.0, 2.0)]
        await asyncio.sleep(0)
        assert bh.in_use == 2
        report = await lc.shutdown_async(deadline=5.0)
        await asyncio.gather(*holders)
        return report

    report = run(main())
    assert report.completed and report.drained[0].in_flight == 2 and report.drained[0].still_running == 0
    assert 2.0 <= report.elapsed < 2.1                  # the last holder left at 2 s (then seen within a poll)


def test_the_report_lists_what_was_still_running_at_the_deadline():
    clock = FakeClock()
    bh = Bulkhead(4, name="db", clock=clock)
    shed = LoadShedder(max_in_flight=10, name="edge", clock=clock)
    idle = Bulkhead(2, name="idle")

    async def shed_call(seconds):
        async with shed.admit(Priority.HIGH):
            await clock.sleep_async(seconds)

    async def main():
        tasks = [asyncio.ensure_future(hold(bh, clock, 10.0)), asyncio.ensure_future(hold(bh, clock, 1.0)),
                 asyncio.ensure_future(shed_call(20.0))]
        await asyncio.sleep(0)
        report = await shutdown_async(bh, shed, idle, deadline=3.0, clock=clock)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return report

    report = run(main())
    assert not report.completed and report.elapsed == 3.0
    assert report.still_running == {"bulkhead 'db'": 1, "load_shedder 'edge'": 1}
    assert {d.name: (d.in_flight, d.still_running, d.how) for d in report.drained} == {
        "bulkhead 'db'": (2, 1, how(bh)), "load_shedder 'edge'": (1, 1, how(shed)), "bulkhead 'idle'": (0, 0, how(idle))}
    assert str(report) == "deadline of 3s passed with work still running (bulkhead 'db': 1, load_shedder 'edge': 1)"
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["completed"] is False and doc["still_running"] == {"bulkhead 'db'": 1, "load_shedder 'edge'": 1}


def test_thread_pool_work_is_waited_for_running_and_queued():
    clock = FakeClock()
    pool = ThreadPoolBulkhead(max_workers=1, queue_size=4, name="files")
    release = threading.Event()
    started = threading.Event()
    try:
        pool.submit(lambda: started.set() or release.wait(30))
        pool.submit(lambda: None)                       # queued behind the first
        assert started.wait(10)
        report = shutdown(pool, deadline=0.2, clock=clock)       # (a pool's own drain waits in real time)
        assert report.still_running == {"thread_pool_bulkhead 'files'": 2}
        assert report.drained[0].in_flight == 2 and report.drained[0].how == how(pool, sync=True)
        if report.drained[0].how == "polled":
            assert report.elapsed == 0.2
    finally:
        release.set()
        pool.shutdown()


def test_readiness_503_and_new_work_shed_at_once_in_flight_admissions_waited_for():
    clock = FakeClock()
    health = HealthRegistry(clock=clock)
    health.add_readiness("db", lambda: True)
    health.add_liveness("loop", lambda: True)
    lc = Lifecycle(health=health, retry_after=2.5, clock=clock, registry=Registry())
    seen = {}

    async def work():
        async with lc.admit():
            await clock.sleep_async(1.0)

    async def main():
        assert (await health.check("readiness")).http_status == 200
        task = asyncio.ensure_future(work())
        await asyncio.sleep(0)
        assert lc.in_flight == 1
        drain = asyncio.ensure_future(lc.shutdown_async(deadline=10.0))
        await asyncio.sleep(0)
        r = await health.check("readiness")
        seen["ready"] = (r.status, r.http_status)
        seen["live"] = (await health.check("liveness")).http_status
        with pytest.raises(Overloaded) as info:
            with lc.admit():
                pass
        seen["retry_after"] = info.value.retry_after
        seen["message"] = str(info.value)
        await task
        return await drain

    report = run(main())
    assert seen == {"ready": ("draining", 503), "live": 200, "retry_after": 2.5,
                    "message": "shutting down: new work is refused (retry after 2.5s)"}
    assert report.completed and report.drained == (Drained("requests", "lifecycle", 1, 0, "polled"),)
    assert lc.draining and lc.in_flight == 0 and lc.report is report


class Draining:
    """A stand-in with the drain API the patterns are getting (drain / drain_async(timeout): stop
    admitting, wait for in-flight up to the timeout, return what was still running)."""

    def __init__(self, clock, name, busy_for, left, sync=True, asyn=True):
        self.clock, self.name, self.busy_for, self.left = clock, name, busy_for, left
        self.calls = []
        if not sync:
            self.drain = None
        if not asyn:
            self.drain_async = None

    def metrics(self):
        return type("M", (), {"in_flight": len(self.left)})()

    def drain(self, timeout):
        self.calls.append(("drain", timeout))
        return list(self.left)

    async def drain_async(self, timeout):
        self.calls.append(("drain_async", timeout))
        await self.clock.sleep_async(min(self.busy_for, timeout))
        return list(self.left)


def test_objects_with_a_drain_method_drain_themselves_all_at_once():
    clock = FakeClock()
    a = Draining(clock, "a", busy_for=4.0, left=["call 1", "call 2"])
    b = Draining(clock, "b", busy_for=9.0, left=[])
    c = Draining(clock, "c", busy_for=0, left=["x"], asyn=False)           # only the sync drain
    report = run(shutdown_async(a, b, c, deadline=6.0, clock=clock))
    assert a.calls == [("drain_async", 6.0)] and b.calls == [("drain_async", 6.0)] and c.calls == [("drain", 6.0)]
    assert report.elapsed == 6.0                        # concurrently: the longest, not the sum
    assert {d.name: (d.still_running, d.how, d.detail) for d in report.drained} == {
        "Draining 'a'": (2, "drain_async", ["call 1", "call 2"]), "Draining 'b'": (0, "drain_async", []),
        "Draining 'c'": (1, "drain", ["x"])}
    d = Draining(clock, "d", busy_for=0, left=[])
    assert shutdown(d, deadline=1.0, clock=clock).drained[0].how == "drain"     # sync code: the sync drain


def test_a_failing_drain_falls_back_to_the_in_flight_count():
    clock = FakeClock()

    class Broken(Draining):
        async def drain_async(self, timeout):
            raise RuntimeError("bug")

    report = run(shutdown_async(Broken(clock, "x", 0, left=["y"]), deadline=1.0, clock=clock))
    (d,) = report.drained
    assert (d.still_running, d.how, d.detail) == (1, "polled", "drain_async failed: RuntimeError: bug")


def test_registry_objects_are_read_when_the_drain_begins():
    clock = FakeClock()
    reg = Registry()
    lc = Lifecycle(registry=reg, clock=clock)
    reg.bulkhead("db", max_concurrent=2)
    reg.load_shedder("edge")
    reg.circuit_breaker("payment")                       # runs no work: not drained
    pool = reg.register("files", ThreadPoolBulkhead(max_workers=1, queue_size=1, name="files"))
    try:
        names = [d.name for d in lc.shutdown(deadline=1.0).drained]
    finally:
        pool.shutdown()
    assert names == ["bulkhead 'db'", "load_shedder 'edge'", "thread_pool_bulkhead 'files'"]
    assert Lifecycle()._registries == [default_registry]           # nothing given: the default registry
    assert Lifecycle(Bulkhead(1))._registries == []                 # objects given: only those


def test_the_drain_runs_once_and_every_caller_gets_its_report():
    clock = FakeClock()
    bh = Bulkhead(2, name="db", clock=clock)
    reports = []
    lc = Lifecycle(bh, clock=clock, on_report=reports.append)

    async def main():
        holder = asyncio.ensure_future(hold(bh, clock, 2.0))
        await asyncio.sleep(0)
        first, second = await asyncio.gather(lc.shutdown_async(5.0), lc.shutdown_async(1.0))
        await holder
        return first, second

    first, second = run(main())
    assert first is second and reports == [first] and first.completed
    assert lc.shutdown(9.0) is first and reports == [first]


def test_shutdown_bad_arguments():
    with pytest.raises(ValueError, match="deadline must be"):
        shutdown(Bulkhead(1), deadline=-1)
    with pytest.raises(ValueError, match="deadline must be"):
        shutdown(Bulkhead(1), deadline=math.nan)
    with pytest.raises(TypeError, match="deadline must be"):
        shutdown(Bulkhead(1), deadline="5")
    with pytest.raises(ValueError, match="retry_after must be"):
        Lifecycle(Bulkhead(1), retry_after=-1)
    with pytest.raises(TypeError, match=r"objects must be bulkheads, .* got 42"):
        Lifecycle(42)
    with pytest.raises(TypeError, match=r"objects must be bulkheads"):
        from buttress import CircuitBreaker
        Lifecycle(CircuitBreaker(name="x"))              # holds no in-flight work to wait for
    with pytest.raises(TypeError, match="health must be a buttress.health.HealthRegistry"):
        Lifecycle(Bulkhead(1), health=object())
    with pytest.raises(TypeError, match="registry must be a buttress.Registry or None, got 'r'"):
        Lifecycle(registry="r")
    with pytest.raises(TypeError, match="on_report must be a callable"):
        Lifecycle(Bulkhead(1), on_report=1)

    async def inside():
        with pytest.raises(RuntimeError, match="use `await lifecycle.shutdown_async"):
            Lifecycle(Bulkhead(1)).shutdown(1.0)
    run(inside())
    with pytest.raises(RuntimeError, match="already entered"):
        adm = Lifecycle(Bulkhead(1)).admit()
        with adm:
            with adm:
                pass


# -- signals, in process ----------------------------------------------------------------------------------


def test_sigterm_begins_at_once_drains_then_hands_over_to_the_previous_handler():
    clock = FakeClock()
    health = HealthRegistry(clock=clock)
    bh = Bulkhead(2, name="db", clock=clock)
    lc = Lifecycle(bh, health=health, clock=clock)
    handed: list = []
    seen = {}

    def server_handler(signum, frame):           # what uvicorn's handle_exit would be
        handed.append((signum, lc.report))

    original = signal.signal(signal.SIGTERM, server_handler)
    try:
        async def main():
            holder = asyncio.ensure_future(hold(bh, clock, 2.0))
            await asyncio.sleep(0)
            assert lc.handle_signals(deadline=5.0)
            signal.raise_signal(signal.SIGTERM)
            seen["draining"] = (health.draining, lc.draining)      # set in the handler itself
            seen["handed_yet"] = list(handed)
            for _ in range(10_000):
                if handed:
                    break
                await asyncio.sleep(0)
            await holder
            lc.restore_signals()
            seen["restored"] = signal.getsignal(signal.SIGTERM) is server_handler
        run(main())
    finally:
        signal.signal(signal.SIGTERM, original)
    assert seen == {"draining": (True, True), "handed_yet": [], "restored": True}
    assert handed == [(signal.SIGTERM, lc.report)] and lc.report.completed and 2.0 <= lc.report.elapsed < 2.1


def test_handle_signals_outside_the_main_thread_installs_nothing():
    out = []
    t = threading.Thread(target=lambda: out.append(run(_install(Lifecycle(Bulkhead(1))))))
    t.start()
    t.join(10)
    assert out == [False]


async def _install(lc):
    return lc.handle_signals()


# -- the ASGI middleware, in process ----------------------------------------------------------------------


async def asgi_http(app, path="/"):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app({"type": "http", "method": "GET", "path": path, "headers": [], "client": ("127.0.0.1", 1)},
              receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


async def asgi_lifespan(app, events: list):
    """Drive the lifespan protocol: startup, then shutdown; what the app sent."""
    inbox: asyncio.Queue = asyncio.Queue()
    sent: list = []
    for message in ({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}):
        inbox.put_nowait(message)

    async def receive():
        return await inbox.get()

    async def send(message):
        events.append(message["type"])
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    return sent


def test_middleware_sheds_with_503_retry_after_and_counts_in_flight_requests():
    clock = FakeClock()
    lc = Lifecycle(registry=Registry(), retry_after=3.0, clock=clock)
    gate = []

    async def app(scope, receive, send):
        await gate[0].wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    mw = ShutdownMiddleware(app, lc, handle_sigterm=False)

    async def main():
        gate.append(asyncio.Event())
        inflight = asyncio.ensure_future(asgi_http(mw))
        await asyncio.sleep(0)
        assert lc.in_flight == 1
        drain = asyncio.ensure_future(lc.shutdown_async(10.0))
        await asyncio.sleep(0)
        shed = await asgi_http(mw)
        gate[0].set()
        return shed, await inflight, await drain

    shed, ok, report = run(main())
    assert shed == (503, {b"content-type": b"text/plain; charset=utf-8", b"content-length": b"14",
                          b"retry-after": b"3", b"connection": b"close"}, b"shutting down\n")
    assert ok[0] == 200 and ok[2] == b"done"
    assert report.completed and report.drained[0].name == "requests" and report.drained[0].in_flight == 1


def test_lifespan_shutdown_drains_before_the_apps_own_shutdown():
    clock = FakeClock()
    bh = Bulkhead(1, name="db", clock=clock)
    events: list = []
    lc = Lifecycle(bh, clock=clock, on_report=lambda r: events.append(f"report: complete {r.completed}"))

    async def app(scope, receive, send):
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                events.append(f"app shutdown, db in use {bh.in_use}")
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def main():
        holder = asyncio.ensure_future(hold(bh, clock, 2.0))
        await asyncio.sleep(0)
        await asgi_lifespan(ShutdownMiddleware(app, lc, handle_sigterm=False), events)
        await holder

    run(main())
    assert events == ["lifespan.startup.complete", "report: complete True", "app shutdown, db in use 0",
                      "lifespan.shutdown.complete"]


def test_an_app_without_lifespan_gets_it_answered_and_drained():
    async def http_only(scope, receive, send):
        assert scope["type"] == "http"

    for app in (http_only, HealthEndpoints(http_only, HealthRegistry())):
        lc = Lifecycle(registry=Registry(), clock=FakeClock())
        events: list = []
        run(asgi_lifespan(ShutdownMiddleware(app, lc, handle_sigterm=False), events))
        assert events == ["lifespan.startup.complete", "lifespan.shutdown.complete"] and lc.report.completed


def test_shutdown_middleware_bad_arguments():
    async def app(scope, receive, send):
        pass
    with pytest.raises(TypeError, match="lifecycle must be a buttress.lifecycle.Lifecycle or None, got 1"):
        ShutdownMiddleware(app, 1)
    with pytest.raises(ValueError, match="deadline must be"):
        ShutdownMiddleware(app, Lifecycle(registry=Registry()), deadline=-1)
    with pytest.raises(TypeError, match="handle_sigterm must be a bool"):
        ShutdownMiddleware(app, Lifecycle(registry=Registry()), handle_sigterm="yes")
    assert isinstance(ShutdownMiddleware(app).lifecycle, Lifecycle)


# -- SIGTERM mid-load through a real uvicorn server (a child process) ----------------------------------------


def _wait_file(path: str, limit: float = 20.0) -> bool:
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def child_app():
    """/work waits for the WORK gate file; /stuck holds the 'db' bulkhead and a 'files' pool worker until the
    STUCK gate file; /_state says what is in flight. Readiness and liveness are served outside the drain."""
    from buttress.asgi import HealthEndpoints, LoadSheddingMiddleware, ShutdownMiddleware
    env = os.environ
    reg = Registry()
    db = reg.bulkhead("db", max_concurrent=10)
    edge = reg.load_shedder("edge", max_in_flight=100)
    files = reg.register("files", ThreadPoolBulkhead(max_workers=2, queue_size=4, name="files"))
    health = HealthRegistry()
    health.add_readiness("db", lambda: True)
    health.add_liveness("loop", lambda: True)

    def write_report(report):
        tmp = env["REPORT"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report.to_dict(), f)
        os.replace(tmp, env["REPORT"])

    lc = Lifecycle(registry=reg, health=health, retry_after=2.0, on_report=write_report)

    async def router(scope, receive, send):
        path = scope["path"]
        if path == "/work":
            while not os.path.exists(env["WORK_GATE"]):
                await asyncio.sleep(0.01)
        elif path == "/stuck":
            async with db:
                await asyncio.wrap_future(files.submit(_wait_file, env["STUCK_GATE"]))
        body = b"done " + path.encode()
        if path == "/_state":
            body = json.dumps({"requests": lc.in_flight, "db": db.in_use, "edge": edge.in_flight,
                               "files": files.metrics().running}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    app = LoadSheddingMiddleware(router, edge, priority=Priority.HIGH)
    app = ShutdownMiddleware(app, lc, deadline=float(env["DEADLINE"]))
    return HealthEndpoints(app, health)


def serve_child(fd: int, factory: str) -> None:
    import uvicorn
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=fd)
    config = uvicorn.Config(globals()[factory](), log_level="warning", access_log=False, lifespan="on",
                            proxy_headers=False, timeout_graceful_shutdown=30)
    uvicorn.Server(config).run(sockets=[sock])


def test_sigterm_mid_load_through_uvicorn(tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    files = {k: str(tmp_path / k.lower()) for k in ("REPORT", "WORK_GATE", "STUCK_GATE")}
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, **files, "DEADLINE": "4",
           "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", f"import test_shutdown as t; t.serve_child({sock.fileno()}, "
                             f"'child_app')"], env=env, pass_fds=[sock.fileno()])
    sock.close()
    results: dict[str, list] = {"/work": [], "/stuck": []}
    threads = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert httpx.get(base + "/readyz", timeout=1.0).status_code == 200
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.05)
        keep_alive = httpx.Client(timeout=10.0)
        assert keep_alive.get(base + "/hello").text == "done /hello"       # an idle keep-alive connection
        # bounded load: 5 requests that finish when told, 1 that outlives the deadline
        for path in ["/work"] * 5 + ["/stuck"]:
            t = threading.Thread(target=lambda p=path: results[p].append(httpx.get(base + p, timeout=30.0)))
            t.start()
            threads.append(t)
        while httpx.get(base + "/_state", timeout=5.0).json() != {"requests": 7, "db": 1, "edge": 7, "files": 1}:
            assert time.monotonic() < deadline, "the load never arrived"
            time.sleep(0.01)

        proc.send_signal(signal.SIGTERM)
        ready = httpx.get(base + "/readyz", timeout=5.0)                   # at once: draining
        live = httpx.get(base + "/livez", timeout=5.0)
        shed = httpx.get(base + "/new", timeout=5.0)                       # a new connection
        shed_keep_alive = keep_alive.get(base + "/new")                    # a keep-alive one
        keep_alive.close()
        open(files["WORK_GATE"], "w").close()                             # the in-flight work finishes
        for t in threads[:5]:
            t.join(20)
        assert _wait_file(files["REPORT"]), "no report"
        with open(files["REPORT"]) as f:
            report = json.load(f)
        open(files["STUCK_GATE"], "w").close()
        threads[5].join(20)
        code = proc.wait(30)
    finally:
        for name in ("WORK_GATE", "STUCK_GATE"):
            open(files[name], "a").close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for t in threads:
            t.join(10)

    assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
    assert live.status_code == 200
    for r in (shed, shed_keep_alive):
        assert (r.status_code, r.text, r.headers["retry-after"], r.headers["connection"]) == (
            503, "shutting down\n", "2", "close")
    assert [r.status_code for r in results["/work"]] == [200] * 5            # in-flight requests completed
    assert [r.text for r in results["/work"]] == ["done /work"] * 5
    assert [r.status_code for r in results["/stuck"]] == [200]               # uvicorn still let it finish
    assert report["completed"] is False and report["deadline"] == 4.0
    assert report["still_running"] == {"requests": 1, "bulkhead 'db'": 1, "load_shedder 'edge'": 1,
                                       "thread_pool_bulkhead 'files'": 1}
    assert {d["name"]: d["in_flight"] for d in report["drained"]} == {
        "requests": 6, "bulkhead 'db'": 1, "load_shedder 'edge'": 6, "thread_pool_bulkhead 'files'": 1}
    assert code == -signal.SIGTERM          # uvicorn re-raises the signal once it has stopped
