"""LoadSheddingMiddleware with overload signals, through a real uvicorn server on 127.0.0.1.

The middleware starts the shedder's sampler inside the server's event loop on lifespan startup (or on the
first request when the server runs no lifespan) and stops it on lifespan shutdown; a request shed by a
signal gets 503 with Retry-After (the sample interval, whole seconds) and the signals' names.

Where timing logic is tested the shedder runs on a FakeClock without autojump: the test advances it, and
the sampler's tick (a task sleeping on that clock) samples. One test blocks the real loop (a handler in
time.sleep, 1 s) so that LoopLag measures a real stall.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from buttress import FakeClock, LoadShedder, Priority  # noqa: E402
from buttress.asgi import HealthEndpoints, LoadSheddingMiddleware, ShutdownMiddleware  # noqa: E402
from buttress.health import HealthRegistry  # noqa: E402
from buttress.lifecycle import Lifecycle  # noqa: E402
from buttress.shedding import LoopLag, QueueDepth  # noqa: E402

TIMEOUT = httpx.Timeout(10.0)
PRIORITY = {"/low": Priority.LOW, "/medium": Priority.MEDIUM, "/high": Priority.HIGH,
            "/critical": Priority.CRITICAL, "/block": Priority.CRITICAL}
BLOCKING = threading.Event()


def by_path(scope):
    return PRIORITY.get(scope["path"], Priority.LOW)


async def app(scope, receive, send):
    """A bare ASGI app without a lifespan protocol; /block stalls the event loop for 1 s (time.sleep)."""
    assert scope["type"] == "http"
    if scope["path"] == "/block":
        BLOCKING.set()
        time.sleep(1.0)         # noqa: ASYNC251 - on purpose: the loop stalls, LoopLag must see it
    body = b"ok " + scope["path"].encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class CountingShedder(LoadShedder):
    """A LoadShedder that counts start() and stop() calls and how many samples its sampler took."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.starts = self.stops = self.samples = 0
        self.loops = set()

    def start(self):
        self.starts += 1
        with contextlib.suppress(RuntimeError):
            self.loops.add(id(asyncio.get_running_loop()))
        super().start()

    def stop(self):
        self.stops += 1
        super().stop()

    def sample(self):
        self.samples += 1
        return super().sample()


@contextlib.contextmanager
def serve(asgi_app, lifespan="auto"):
    """Run `asgi_app` on uvicorn in a thread on a free loopback port; yield (base URL, server)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(asgi_app, log_level="warning", proxy_headers=False, lifespan=lifespan, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def wait_for(condition, what: str, seconds: float = 10.0) -> None:
    """Wait (bounded) for something the server's loop does in its own time: a tick after advance()."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def sampled_after_advance(clock: FakeClock, shed: CountingShedder, seconds: float) -> None:
    """Advance the shedder's clock by `seconds` and wait until its sampler's tick has run once more."""
    # the sampler's next tick is a task sleeping on the clock: advance only once it sleeps (a task
    # created by the previous tick, or by the first request, registers its sleep when it first runs)
    wait_for(lambda: clock.pending_sleepers > 0, "the sampler to sleep on the clock")
    before = shed.samples
    clock.advance(seconds)
    wait_for(lambda: shed.samples > before, "the sampler's tick")


def no_sampler_left(shed: LoadShedder) -> bool:
    threads = [t for t in threading.enumerate() if t.name == "buttress-shedder-sampler"]
    return shed._sampler is None and not threads


# -- QueueDepth, on a FakeClock --------------------------------------------------------------------------


def test_queue_depth_sheds_low_first_then_medium_with_retry_after_and_reason():
    clock = FakeClock(autojump=False)
    jobs: list[int] = []
    shed = CountingShedder(max_in_flight=100, clock=clock, sample_interval=2.5,
                           signals=[QueueDepth(lambda: len(jobs), low=5, medium=10)])
    with serve(LoadSheddingMiddleware(app, shed, priority=by_path)) as (url, _), \
            httpx.Client(timeout=TIMEOUT) as client:
        assert shed.starts == 1 and shed._sampler is not None     # started on lifespan startup, in the loop
        assert [client.get(url + p).status_code for p in ("/low", "/medium", "/critical")] == [200, 200, 200]

        jobs.extend(range(7))                                       # over LOW's threshold only
        sampled_after_advance(clock, shed, 2.5)
        assert shed.level == 1
        low = client.get(url + "/low")
        assert low.status_code == 503
        assert low.headers["retry-after"] == "3"                    # 2.5 s sample interval, rounded up
        assert low.text == "overloaded (queue_depth)\n"             # the signal's name, not its value
        assert [client.get(url + p).status_code for p in ("/medium", "/high", "/critical")] == [200, 200, 200]

        jobs.extend(range(5))                                       # 12: over MEDIUM's threshold too
        sampled_after_advance(clock, shed, 2.5)
        assert [client.get(url + p).status_code for p in ("/low", "/medium", "/high", "/critical")] == \
            [503, 503, 200, 200]
        head = client.head(url + "/medium")
        assert head.status_code == 503 and head.headers["retry-after"] == "3" and head.content == b""

        jobs.clear()                                                # the queue drained: admitted again
        sampled_after_advance(clock, shed, 2.5)
        assert shed.level == 0
        assert [client.get(url + p).status_code for p in ("/low", "/medium")] == [200, 200]
        metrics = shed.metrics()
        assert metrics.shed[Priority.LOW] == 2 and metrics.shed[Priority.MEDIUM] == 2
        assert metrics.shed[Priority.HIGH] == 0 and metrics.shed[Priority.CRITICAL] == 0
    assert (shed.starts, shed.stops) == (1, 1)
    assert no_sampler_left(shed)


def test_capacity_shed_is_not_reported_as_a_signal():
    clock = FakeClock(autojump=False)
    shed = LoadShedder(max_in_flight=1, clock=clock, signals=[QueueDepth(lambda: 0, low=5)])
    gate = threading.Event()

    async def slow(scope, receive, send):
        assert scope["type"] == "http"
        await asyncio.get_running_loop().run_in_executor(None, gate.wait, 10)
        await app(scope, receive, send)

    with serve(LoadSheddingMiddleware(slow, shed, priority=Priority.LOW)) as (url, _):
        with httpx.Client(timeout=TIMEOUT) as c1, httpx.Client(timeout=TIMEOUT) as c2:
            t = threading.Thread(target=c1.get, args=(url + "/x",))
            t.start()
            wait_for(lambda: shed.in_flight == 1, "the first request to be admitted")
            r = c2.get(url + "/y")                 # LOW bound: ceil(1 x 0.5) = 1 in flight
            gate.set()
            t.join(10)
        assert r.status_code == 503 and r.text == "overloaded\n"


# -- LoopLag -----------------------------------------------------------------------------------------------


def test_loop_lag_on_a_fake_clock_sheds_low_until_the_next_sample():
    clock = FakeClock(autojump=False)
    shed = CountingShedder(max_in_flight=100, clock=clock, sample_interval=0.5, signals=[LoopLag(low=0.2)])
    with serve(LoadSheddingMiddleware(app, shed, priority=by_path)) as (url, _), \
            httpx.Client(timeout=TIMEOUT) as client:
        sampled_after_advance(clock, shed, 0.5 + 0.3)      # the tick came 0.3 s late
        assert shed.metrics().signals["loop_lag"] == pytest.approx(0.3)
        r = client.get(url + "/low")
        assert (r.status_code, r.headers["retry-after"], r.text) == (503, "1", "overloaded (loop_lag)\n")
        assert client.get(url + "/critical").status_code == 200
        sampled_after_advance(clock, shed, 0.5)            # on time again
        assert client.get(url + "/low").status_code == 200
    assert (shed.starts, shed.stops) == (1, 1) and no_sampler_left(shed)


def _raw_request(sock: socket.socket, path: str) -> None:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())


def _raw_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def test_a_blocked_event_loop_sheds_low_and_admits_critical_then_recovers():
    """A handler stalls the real loop for 1 s. Requests written meanwhile (on connections uvicorn has
    accepted already) are read after the stall; the sampler's overdue tick runs before them and
    measures a lag of at least 1 s - 0.3 s: LOW is shed, CRITICAL passes; the next tick (0.3 s later,
    on time) admits LOW again."""
    BLOCKING.clear()
    shed = CountingShedder(max_in_flight=100, sample_interval=0.3, signals=[LoopLag(low=0.2, medium=None, high=None)])
    with serve(LoadSheddingMiddleware(app, shed, priority=by_path)) as (url, port):
        conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        try:
            for c in conns:                                    # accepted and served: keep-alive now
                _raw_request(c, "/critical")
                assert _raw_response(c)[0] == 200
            blocker = threading.Thread(target=httpx.get, args=(url + "/block",), kwargs={"timeout": TIMEOUT})
            blocker.start()
            assert BLOCKING.wait(10)
            _raw_request(conns[0], "/low")                     # in the kernel's buffer while the loop stalls
            _raw_request(conns[1], "/critical")
            _raw_request(conns[2], "/medium")
            low, critical, medium = (_raw_response(c) for c in conns)
            blocker.join(10)
            assert shed.metrics().signals["loop_lag"] >= 0.5
            assert low[0] == 503 and low[1]["retry-after"] == "1" and low[2] == b"overloaded (loop_lag)\n"
            assert critical[0] == 200
            assert medium[0] == 200                            # medium=None: LoopLag sheds LOW only
            wait_for(lambda: shed.level == 0, "an on-time tick")
            _raw_request(conns[0], "/low")
            assert _raw_response(conns[0])[0] == 200
        finally:
            for c in conns:
                c.close()
    assert shed.starts == 1 and shed.stops == 1 and len(shed.loops) == 1
    assert no_sampler_left(shed)


# -- starting and stopping the sampler -------------------------------------------------------------------


def test_middlewares_sharing_a_shedder_start_one_sampler_and_stop_it_at_shutdown():
    clock = FakeClock(autojump=False)
    shed = CountingShedder(max_in_flight=100, clock=clock, signals=[QueueDepth(lambda: 0, low=1)])
    stack = LoadSheddingMiddleware(LoadSheddingMiddleware(app, shed, priority=by_path), shed, priority=by_path)
    health = HealthRegistry()
    stack = HealthEndpoints(ShutdownMiddleware(stack, Lifecycle(shed, health=health), deadline=1.0,
                                               handle_sigterm=False), health)
    with serve(stack) as (url, _), httpx.Client(timeout=TIMEOUT) as client:
        assert shed.starts == 1
        assert client.get(url + "/low").status_code == 200
        assert client.get(url + "/readyz").status_code == 200
        assert shed.starts == 1
    assert shed.stops == 1 and no_sampler_left(shed)


def test_without_lifespan_the_first_request_starts_the_sampler_once():
    clock = FakeClock(autojump=False)
    jobs = [0] * 3
    shed = CountingShedder(max_in_flight=100, clock=clock, signals=[QueueDepth(lambda: len(jobs), low=2)])
    with serve(LoadSheddingMiddleware(app, shed, priority=by_path), lifespan="off") as (url, _):
        assert shed.starts == 0
        with httpx.Client(timeout=TIMEOUT) as client:
            codes = []
            threads = [threading.Thread(target=lambda: codes.append(client.get(url + "/critical").status_code))
                       for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            assert codes == [200] * 8 and shed.starts == 1
            sampled_after_advance(clock, shed, shed.sample_interval)
            assert client.get(url + "/low").status_code == 503
            assert shed.starts == 1
    shed.stop()                 # no lifespan shutdown: the application stops it (or it ends with its loop)


def test_a_sampler_the_application_started_is_left_running():
    shed = CountingShedder(max_in_flight=100, signals=[QueueDepth(lambda: 0, low=1)], sample_interval=0.05)
    shed.start()                # outside a loop: a thread, the application's own
    thread = next(t for t in threading.enumerate() if t.name == "buttress-shedder-sampler")
    try:
        with serve(LoadSheddingMiddleware(app, shed)) as (url, _):
            assert httpx.get(url + "/x", timeout=TIMEOUT).status_code == 200
        assert shed.stops == 0 and shed._sampler is not None and thread.is_alive()
    finally:
        shed.stop()
    thread.join(10)
    assert not thread.is_alive() and no_sampler_left(shed)


def test_a_sampler_that_fails_to_start_is_logged_and_requests_still_served(caplog):
    class Broken(LoadShedder):
        def start(self):
            raise RuntimeError("no sampler here")

    shed = Broken(max_in_flight=100, signals=[QueueDepth(lambda: 0, low=1)])
    with serve(LoadSheddingMiddleware(app, shed)) as (url, _):
        assert httpx.get(url + "/x", timeout=TIMEOUT).status_code == 200
    assert "sampler did not start" in caplog.text


def test_an_app_with_its_own_lifespan_still_runs_it():
    events = []
    clock = FakeClock(autojump=False)
    shed = CountingShedder(max_in_flight=10, clock=clock, signals=[QueueDepth(lambda: 0, low=1)])

    async def with_lifespan(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                events.append((message["type"], shed._sampler is not None))
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await app(scope, receive, send)

    with serve(LoadSheddingMiddleware(with_lifespan, shed)) as (url, _):
        assert httpx.get(url + "/x", timeout=TIMEOUT).status_code == 200
    # the app's startup sees the sampler running; its shutdown runs after the sampler stopped
    assert events == [("lifespan.startup", True), ("lifespan.shutdown", False)]
    assert (shed.starts, shed.stops) == (1, 1)


def test_readiness_stays_200_but_says_degraded_while_signals_shed():
    """The documented idiom: a non-critical readiness check on the shed level. A shedding replica stays in
    rotation (200: taking it out would push its load onto the others), its report says "degraded";
    draining is what turns readiness 503."""
    clock = FakeClock(autojump=False)
    jobs: list[int] = []
    shed = CountingShedder(max_in_flight=100, clock=clock, signals=[QueueDepth(lambda: len(jobs), low=1)])
    health = HealthRegistry()
    health.add_readiness("load", lambda: shed.level == 0, critical=False)
    stack = HealthEndpoints(LoadSheddingMiddleware(app, shed, priority=by_path), health, details=True)
    with serve(stack) as (url, _), httpx.Client(timeout=TIMEOUT) as client:
        assert client.get(url + "/readyz").json()["status"] == "up"
        jobs.append(1)
        sampled_after_advance(clock, shed, shed.sample_interval)
        ready = client.get(url + "/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert client.get(url + "/low").status_code == 503
        jobs.clear()
        sampled_after_advance(clock, shed, shed.sample_interval)
        assert client.get(url + "/readyz").json()["status"] == "up"
    assert (shed.starts, shed.stops) == (1, 1)


@pytest.mark.parametrize("lifespan", ["on", "off"])
def test_a_server_started_again_on_a_new_loop_gets_a_new_sampler_not_a_frozen_level(lifespan):
    """The same app served twice (a test suite, a reloader): the first loop's sampler died with its loop.
    Without lifespan the first request of the new loop starts a new one (once); the level is sampled
    again instead of staying at the old loop's last value (LOW was shed for good)."""
    clock = FakeClock(autojump=False)
    jobs = [1, 2, 3]
    shed = CountingShedder(max_in_flight=100, clock=clock, signals=[QueueDepth(lambda: len(jobs), low=2)])
    asgi_app = LoadSheddingMiddleware(app, shed, priority=by_path)
    with serve(asgi_app, lifespan=lifespan) as (url, _), httpx.Client(timeout=TIMEOUT) as client:
        assert client.get(url + "/critical").status_code == 200
        sampled_after_advance(clock, shed, shed.sample_interval)
        assert client.get(url + "/low").status_code == 503
    jobs.clear()
    with serve(asgi_app, lifespan=lifespan) as (url, _), httpx.Client(timeout=TIMEOUT) as client:
        assert client.get(url + "/critical").status_code == 200
        assert client.get(url + "/critical").status_code == 200
        sampled_after_advance(clock, shed, shed.sample_interval)
        assert client.get(url + "/low").status_code == 200
    assert shed.starts == 2 and len(shed.loops) == 2
    shed.stop()
