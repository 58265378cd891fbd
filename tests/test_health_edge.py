"""Health endpoints under attack (issue 20, items 1-2): what an anonymous probe may see, and probe floods.

- Default bodies are the status alone: no exception text, check or breaker names, states, durations,
  counts or check return values; details are opt-in (``details=True`` or an authoriser). A falsy return
  value is never published with repr().
- Single flight: concurrent probes share one running check (whatever `period` is, across event loops and
  threads); a full check pool answers the last result or 503, never 500.
- Through a real uvicorn server (a child process, so the load generator does not share its GIL) on
  127.0.0.1: 300 concurrent /livez give no 500 and run the check once per period; 50 concurrent /readyz
  with period=0 run it exactly once (the check waits until all 50 have arrived, so single flight is what
  decides the count); a simulated kubelet with a 1 s timeout never fails a probe under a flood.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

from buttress import CircuitBreaker, FakeClock
from buttress.asgi import HealthEndpoints
from buttress.bulkhead import ThreadPoolBulkhead
from buttress.health import HealthRegistry

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def call(app, path: str, method: str = "GET", headers=()) -> tuple[int, dict, bytes]:
    """One request straight into an ASGI app: (status, headers, body)."""
    scope = {"type": "http", "method": method, "path": path, "headers": list(headers),
             "client": ("127.0.0.1", 5000)}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


class Secret:
    """A falsy check result whose repr holds a secret (a connection object, a status dict...)."""

    def __bool__(self):
        return False

    def __repr__(self):
        return "Conn(dsn='postgres://app:hunter2@payments-db.prod.internal:5432')"


def leaky_registry(clock=None) -> tuple[HealthRegistry, CircuitBreaker]:
    """Every kind of internal a report can carry: exception text with an address, a falsy value with a
    secret repr, a breaker whose name embeds a host name, open."""
    h = HealthRegistry(clock=clock)

    def db():
        raise ConnectionRefusedError(111, "Connection refused ('127.0.0.1', 9)")

    h.add_readiness("payments-db.prod.internal:5432", db)
    h.add_readiness("conn", lambda: Secret())
    cb = CircuitBreaker(name="payments-db.prod.internal:5432", clock=clock)
    cb.force_open()
    h.add_breaker(cb)
    h.add_liveness("loop", lambda: True)
    return h, cb


INTERNALS = ("payments", "prod.internal", "5432", "Connection", "refused", "127.0.0.1", "hunter2", "Conn(",
             "FORCED_OPEN", "duration", "consecutive", "error", "checks", "breaker", "Secret")


# -- item 1: what an anonymous probe sees ------------------------------------------------------------------


def test_default_body_is_the_status_alone():
    h, _ = leaky_registry(FakeClock())
    app = HealthEndpoints(None, h)
    status, headers, body = run(call(app, "/readyz"))
    assert status == 503 and json.loads(body) == {"status": "down"}
    assert headers["content-type"] == "application/json" and headers["cache-control"] == "no-store"
    for word in INTERNALS:
        assert word not in body.decode(), word
    status, _, body = run(call(app, "/livez"))
    assert status == 200 and json.loads(body) == {"status": "up"}
    # the report itself (in process) still has the details, but never the falsy value's repr
    report = h.check_sync("readiness")
    assert report["checks"]["conn"]["error"] == "check returned a falsy Secret"
    assert "hunter2" not in report.to_json()
    assert report["checks"]["payments-db.prod.internal:5432"]["error"].startswith("ConnectionRefusedError")
    assert report.to_json(details=False) == '{"status": "down"}'


def test_details_are_opt_in_and_an_authoriser_decides_per_request():
    h, _ = leaky_registry(FakeClock())
    status, _, body = run(call(HealthEndpoints(None, h, details=True), "/readyz"))
    doc = json.loads(body)
    assert status == 503 and doc["probe"] == "readiness" and doc["status"] == "down"
    assert doc["checks"]["breaker:payments-db.prod.internal:5432"] == {"status": "degraded", "state": "FORCED_OPEN"}
    assert doc["checks"]["conn"]["error"] == "check returned a falsy Secret" and "hunter2" not in body.decode()

    def operator(scope):
        return (b"authorization", b"Bearer ops-token") in scope["headers"]

    async def operator_async(scope):
        return operator(scope)

    for authoriser in (operator, operator_async):
        app = HealthEndpoints(None, h, details=authoriser)
        assert json.loads(run(call(app, "/readyz"))[2]) == {"status": "down"}
        assert "checks" in json.loads(run(call(app, "/readyz", headers=[(b"authorization", b"Bearer ops-token")]))[2])


def test_a_failing_authoriser_shows_the_status_only_never_500(caplog):
    h, _ = leaky_registry(FakeClock())

    def broken(scope):
        raise KeyError("authorization")

    app = HealthEndpoints(None, h, details=broken)
    for _ in range(3):
        status, _, body = run(call(app, "/readyz"))
        assert status == 503 and json.loads(body) == {"status": "down"}
    assert sum("details authoriser failed" in r.getMessage() for r in caplog.records) == 1   # logged once


def test_a_probe_that_fails_inside_the_registry_answers_503_not_500():
    class Broken:
        async def check(self, probe):
            raise RuntimeError("bug in a custom registry")

    status, _, body = run(call(HealthEndpoints(None, Broken()), "/livez"))
    assert status == 503 and json.loads(body) == {"status": "down"}


def test_draining_readiness_is_503_at_once_liveness_untouched():
    h = HealthRegistry()
    calls = []
    h.add_readiness("db", lambda: calls.append(1) or True)
    h.add_liveness("loop", lambda: True)
    app = HealthEndpoints(None, h)
    assert run(call(app, "/readyz"))[0] == 200 and calls == [1]
    h.draining = True
    status, _, body = run(call(app, "/readyz"))
    assert status == 503 and json.loads(body) == {"status": "draining"} and calls == [1]   # no check run
    assert run(call(app, "/livez"))[0] == 200
    h.draining = False
    assert run(call(app, "/readyz"))[0] == 200 and calls == [1, 1]
    with pytest.raises(TypeError, match="draining must be a bool, got 1"):
        h.draining = 1


# -- item 2: single flight, in process ---------------------------------------------------------------------


async def joined(h, probe, name, n):
    """Wait (yielding to the loop, bounded) until `n` probes wait on the check's run in progress."""
    check = h._checks[probe][name]
    for _ in range(10_000):
        flight = check.flight
        if flight is not None and len(flight.future._done_callbacks) >= n:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{n} probes never joined the run")


def test_concurrent_probes_share_one_run_with_period_zero():
    h = HealthRegistry(clock=FakeClock())
    calls = []
    gate: list[asyncio.Event] = []

    async def db():
        calls.append(1)
        await gate[0].wait()
        return True

    h.add_readiness("db", db, timeout=60.0)

    async def main():
        gate.append(asyncio.Event())
        probes = [asyncio.ensure_future(h.check("readiness")) for _ in range(50)]
        await joined(h, "readiness", "db", 50)      # every probe waits on the one run (held by the gate)
        gate[0].set()
        return await asyncio.gather(*probes)

    reports = run(main())
    assert calls == [1] and {r.status for r in reports} == {"up"}
    assert {r["checks"]["db"]["consecutive_successes"] for r in reports} == {1}     # counted once
    assert h.check_sync("readiness")["checks"]["db"]["consecutive_successes"] == 2 and len(calls) == 2


def test_with_a_period_the_flood_costs_one_run_per_period():
    clock = FakeClock()
    h = HealthRegistry(clock=clock)
    calls = []
    h.add_liveness("loop", lambda: calls.append(1) or True, period=5.0)

    async def flood():
        return await asyncio.gather(*(h.check("liveness") for _ in range(100)))

    assert {r.status for r in run(flood())} == {"up"} and len(calls) == 1
    clock.advance(4.999)
    run(flood())
    assert len(calls) == 1
    clock.advance(0.001)
    run(flood())
    assert len(calls) == 2


def test_a_probe_that_goes_away_does_not_abandon_the_run_it_started():
    h = HealthRegistry(clock=FakeClock())
    calls = []
    gate: list[asyncio.Event] = []

    async def db():
        calls.append(1)
        await gate[0].wait()
        return True

    h.add_readiness("db", db, timeout=60.0)

    async def main():
        gate.append(asyncio.Event())
        leader = asyncio.ensure_future(h.check("readiness"))
        await joined(h, "readiness", "db", 1)
        follower = asyncio.ensure_future(h.check("readiness"))
        await joined(h, "readiness", "db", 2)
        leader.cancel()                     # the client that started the run disconnected
        await asyncio.sleep(0)
        gate[0].set()
        return await follower

    assert run(main()).status == "up" and calls == [1]


def test_probes_on_other_event_loops_and_threads_join_the_run():
    """A sync check blocks; probes from 4 threads (each with its own event loop via check_sync) join the
    run of the first; it is released only once all have joined: one call for 5 probes."""
    release = threading.Event()
    calls = []

    def db():
        calls.append(1)
        release.wait(30)
        return True

    h = HealthRegistry()
    h.add_readiness("db", db, timeout=30.0)
    results = []
    threads = [threading.Thread(target=lambda: results.append(h.check_sync("readiness").status)) for _ in range(5)]
    threads[0].start()
    check = h._checks["readiness"]["db"]
    deadline = time.monotonic() + 10
    while not calls:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    for t in threads[1:]:
        t.start()
    while len(check.flight.future._done_callbacks) < 5:       # every probe waits on the one run
        assert time.monotonic() < deadline
        time.sleep(0.001)
    release.set()
    for t in threads:
        t.join(10)
    assert results == ["up"] * 5 and calls == [1]


def test_a_full_check_pool_answers_the_last_result_or_503_never_500():
    release = threading.Event()
    h = HealthRegistry()
    h._executor = ThreadPoolBulkhead(max_workers=1, queue_size=0, name="health-test")   # one worker, no queue
    ran = []
    h.add_liveness("hangs", lambda: release.wait(30) and True, timeout=0.05)
    h.add_readiness("db", lambda: ran.append(1) or True)
    app = HealthEndpoints(None, h, details=True)
    try:
        assert run(call(app, "/readyz"))[0] == 200 and ran == [1]          # a last result: up
        status, _, body = run(call(app, "/livez"))                         # the hung check keeps the worker
        assert status == 503 and json.loads(body)["checks"]["hangs"]["error"] == "timed out after 0.05s"
        # the pool is full: db answers its last result (cached, not counted again), no BulkheadFullError
        status, _, body = run(call(app, "/readyz"))
        doc = json.loads(body)
        assert status == 200 and ran == [1] and doc["checks"]["db"]["cached"] is True
        assert doc["checks"]["db"]["consecutive_successes"] == 1
        h.add_readiness("cache", lambda: True)                            # never ran: no last result -> down
        status, _, body = run(call(app, "/readyz"))
        doc = json.loads(body)
        assert status == 503 and doc["checks"]["cache"]["error"] == "not run: the health check pool is full"
        assert doc["checks"]["cache"]["consecutive_failures"] == 0          # nothing recorded
    finally:
        release.set()


# -- through a real uvicorn server in a child process -------------------------------------------------------

CLOCK = FakeClock()
CALLS = {"flood": 0, "gate": 0, "kube": 0}
ARRIVED = {"gate": 0}
EXPECT = {"gate": 0}


def _sync_check(kind):
    def check():
        CALLS[kind] += 1
        time.sleep(random.uniform(0.005, 0.020))         # a 5-20 ms sync check, as in the issue
        return True
    return check


def _gate_check():
    """Runs until every expected /gate/readyz request has arrived at the server: single flight alone
    then decides how many runs there are."""
    CALLS["gate"] += 1
    deadline = time.monotonic() + 10
    while ARRIVED["gate"] < EXPECT["gate"] and time.monotonic() < deadline:
        time.sleep(0.001)
    return True


def child_app():
    flood = HealthRegistry(clock=CLOCK)
    flood.add_liveness("loop", _sync_check("flood"), period=5.0)
    gate = HealthRegistry()
    gate.add_readiness("db", _gate_check, timeout=15.0)
    kube = HealthRegistry()
    kube.add_liveness("loop", _sync_check("kube"))                 # period 0: every probe may run it

    async def control(scope, receive, send):
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        query = dict(urllib.parse.parse_qsl(scope["query_string"].decode()))
        if scope["path"] == "/_advance":
            CLOCK.advance(float(query["s"]))
        elif scope["path"] == "/_expect":
            EXPECT["gate"], ARRIVED["gate"] = int(query["n"]), 0
        body = json.dumps(CALLS).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    app = HealthEndpoints(control, kube, livez="/k/livez", readyz=None, startupz=None)
    app = HealthEndpoints(app, gate, livez=None, readyz="/gate/readyz", startupz=None)
    inner = HealthEndpoints(app, flood, livez="/livez", readyz=None, startupz=None)

    async def counting(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/gate/readyz":
            ARRIVED["gate"] += 1
        await inner(scope, receive, send)
    return counting


async def _lifespan(receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def serve_child(fd: int, factory: str) -> None:
    """In the child: uvicorn on the inherited listening socket (IPPROTO_TCP, so asyncio sets TCP_NODELAY)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=fd)
    config = uvicorn.Config(globals()[factory](), log_level="critical", access_log=False, lifespan="on",
                            proxy_headers=False, backlog=2048, timeout_graceful_shutdown=1)
    uvicorn.Server(config).run(sockets=[sock])


def start_child(module: str, factory: str, env_extra: dict | None = None):
    """(process, base URL): `module.factory()` served by uvicorn in a child process on a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    port = sock.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-c", f"import {module} as t; t.serve_child({sock.fileno()}, "
                             f"{factory!r})"], env=env, pass_fds=[sock.fileno()])
    sock.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(base + "/_ping", timeout=1.0)
            return proc, base
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("uvicorn did not start")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server():
    proc, base = start_child("test_health_edge", "child_app")
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def control(base, path):
    return httpx.get(base + path, timeout=10.0).json()


async def _get(reader, writer, request: bytes) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return int(head[9:12])


async def flood(base: str, path: str, connections: int, per_connection: int) -> list[int]:
    """`connections` keep-alive connections opened together, each sending `per_connection` requests back
    to back; every status code."""
    host, port = base.removeprefix("http://").split(":")
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    codes: list[int] = []
    start = asyncio.Event()
    opened = [0]

    async def one():
        reader, writer = await asyncio.open_connection(host, int(port))
        opened[0] += 1
        if opened[0] == connections:         # every connection is open: all send at once
            start.set()
        try:
            await start.wait()
            for _ in range(per_connection):
                codes.append(await _get(reader, writer, request))
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(one()) for _ in range(connections)]
    await asyncio.gather(*tasks)
    return codes


def test_300_concurrent_livez_no_500_and_one_check_per_period(server):
    before = control(server, "/_count")["flood"]
    codes = asyncio.run(flood(server, "/livez", 300, 1))
    assert len(codes) == 300 and set(codes) == {200}, sorted(set(codes))
    assert control(server, "/_count")["flood"] == before + 1          # one run for the whole flood
    codes = asyncio.run(flood(server, "/livez", 300, 3))                # within the period: cached
    assert set(codes) == {200} and control(server, "/_count")["flood"] == before + 1
    control(server, "/_advance?s=5")                                    # the period has passed
    codes = asyncio.run(flood(server, "/livez", 300, 1))
    assert set(codes) == {200} and control(server, "/_count")["flood"] == before + 2


def test_50_concurrent_readyz_with_period_zero_run_the_check_once(server):
    for round_ in range(2):
        before = control(server, "/_expect?n=50")["gate"]
        codes = asyncio.run(flood(server, "/gate/readyz", 50, 1))
        assert codes == [200] * 50
        assert control(server, "/_count")["gate"] == before + 1, round_   # 50 probes, 1 check


def test_simulated_kubelet_never_fails_a_probe_under_a_flood(server):
    """A kubelet probes /k/livez every 100 ms on a fresh connection with a 1 s timeout while 300
    connections flood the same path (a 5-20 ms sync check, period 0): every probe 200 in time, no 500,
    and the flood shares runs (before: one run per request, BulkheadFullError as 500)."""
    host, port = server.removeprefix("http://").split(":")
    outcomes: list = []
    done = threading.Event()

    def kubelet():
        while not done.is_set() or len(outcomes) < 5:
            conn = http.client.HTTPConnection(host, int(port), timeout=1.0)
            try:
                conn.request("GET", "/k/livez")
                outcomes.append(conn.getresponse().status)
            except OSError as exc:              # a timeout is a failed probe
                outcomes.append(repr(exc))
            finally:
                conn.close()
            time.sleep(0.1)

    probe = threading.Thread(target=kubelet)
    before = control(server, "/_count")["kube"]
    probe.start()
    try:
        codes = asyncio.run(flood(server, "/k/livez", 300, 20))
    finally:
        done.set()
        probe.join(30)
    runs = control(server, "/_count")["kube"] - before
    print(f"\nkubelet: {len(outcomes)} probes {sorted(set(map(str, outcomes)))}; flood: {len(codes)} requests, "
          f"{runs} check runs")
    assert len(codes) == 6000 and set(codes) == {200}, sorted(set(codes))
    assert outcomes and set(outcomes) == {200}, outcomes
    assert runs < len(codes) + len(outcomes)
