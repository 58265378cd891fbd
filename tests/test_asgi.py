"""ASGI middleware end to end: a real uvicorn server on a loopback port, a real HTTP client (httpx).

Limiters run on FakeClock, so what is admitted is decided by the test, not by how fast requests go.
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

from buttress import CircuitBreaker, FakeClock, KeyedLimiter, Overloaded, TokenBucket  # noqa: E402
from buttress.asgi import (HealthEndpoints, LoadSheddingMiddleware, RateLimitMiddleware,  # noqa: E402
                           client_ip)
from buttress.health import HealthRegistry  # noqa: E402

TIMEOUT = httpx.Timeout(10.0)


async def hello(scope, receive, send):
    """A bare ASGI app (no framework): echoes the path; /slow waits for the test's signal."""
    assert scope["type"] == "http"
    if scope["path"] == "/slow":
        await asyncio.get_running_loop().run_in_executor(None, GATE.wait, 10)
    body = f"hello {scope['path']}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"x-app", b"1")]})
    await send({"type": "http.response.body", "body": body})


GATE = threading.Event()


@contextlib.contextmanager
def serve(app):
    """Run `app` on uvicorn in a thread on a free loopback port; yield its base URL; stop it."""
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets' connections; without it a
    # response's head and body wait for the client's delayed ACK (~40 ms a keep-alive request)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # proxy_headers=False: uvicorn would otherwise rewrite scope["client"] from X-Forwarded-For itself
    config = uvicorn.Config(app, log_level="warning", proxy_headers=False, lifespan="auto", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def client():
    with httpx.Client(timeout=TIMEOUT) as c:
        yield c


# -- rate limiting -------------------------------------------------------------------------------------


def test_keyed_rate_limit_429_retry_after_and_draft_headers(client):
    clock = FakeClock()
    limiter = KeyedLimiter(rate=0.5, capacity=3, max_keys=64, clock=clock)
    with serve(RateLimitMiddleware(hello, limiter)) as url:
        rs = [client.get(url + "/a") for _ in range(3)]
        assert [r.status_code for r in rs] == [200, 200, 200]
        assert rs[0].text == "hello /a" and rs[0].headers["x-app"] == "1"
        assert rs[0].headers["ratelimit-policy"] == '"default";q=3;w=6;burst=3'
        # r: what is left after this request; t: seconds until the bucket is full again (ceil)
        assert [r.headers["ratelimit"] for r in rs] == ['"default";r=2;t=2', '"default";r=1;t=4',
                                                        '"default";r=0;t=6']
        r = client.get(url + "/a")
        assert r.status_code == 429 and r.text == "rate limit exceeded\n"
        assert r.headers["retry-after"] == "2"
        assert r.headers["ratelimit"] == '"default";r=0;t=6'
        assert r.headers["ratelimit-policy"] == '"default";q=3;w=6;burst=3'
        assert "x-app" not in r.headers
        clock.advance(1.5)                                    # 0.5 s short of the next token
        r = client.get(url + "/a")
        assert r.status_code == 429 and r.headers["retry-after"] == "1"   # 0.5 s rounds up to 1
        clock.advance(0.5)
        assert client.get(url + "/a").status_code == 200
        assert client.get(url + "/a").status_code == 429


def test_retry_after_is_whole_seconds_at_least_one(client):
    clock = FakeClock()
    limiter = KeyedLimiter(rate=1000.0, capacity=1, max_keys=64, clock=clock)
    with serve(RateLimitMiddleware(hello, limiter, headers=False)) as url:
        r1 = client.get(url + "/")
        assert r1.status_code == 200 and "ratelimit" not in r1.headers     # headers=False
        r = client.get(url + "/")
        assert r.status_code == 429 and r.headers["retry-after"] == "1"    # 1 ms -> 1 s
        assert r.headers["ratelimit-policy"] == '"default";q=1000;w=1;burst=1'   # sustained 1000/s, 1 at once


def test_x_forwarded_for_only_as_far_as_trusted_proxies(client):
    clock = FakeClock()

    def app_for(trusted):
        return RateLimitMiddleware(hello, KeyedLimiter(rate=1.0, capacity=1, max_keys=64, clock=clock),
                                   trusted_proxies=trusted, proxy_networks=["127.0.0.1"] if trusted else None)

    with serve(app_for(0)) as url:                            # header ignored: every request is 127.0.0.1
        assert client.get(url, headers={"X-Forwarded-For": "1.1.1.1"}).status_code == 200
        assert client.get(url, headers={"X-Forwarded-For": "2.2.2.2"}).status_code == 429
    with serve(app_for(1)) as url:                            # one proxy: the rightmost entry is the client
        assert client.get(url, headers={"X-Forwarded-For": "1.1.1.1"}).status_code == 200
        assert client.get(url, headers={"X-Forwarded-For": "2.2.2.2"}).status_code == 200
        # a client forging a left entry does not get a fresh bucket: the proxy's entry decides
        assert client.get(url, headers={"X-Forwarded-For": "9.9.9.9, 1.1.1.1"}).status_code == 429
        assert client.get(url).status_code == 200            # no header: the socket peer
        assert client.get(url).status_code == 429


def test_client_ip_unit():
    scope = {"client": ("10.0.0.9", 5000),
             "headers": [(b"x-forwarded-for", b"6.6.6.6, 1.1.1.1"), (b"X-Forwarded-For", b"10.0.0.2")]}
    assert client_ip(scope, 0) == "10.0.0.9"
    # "*": every peer and entry is a proxy, so N counts entries from the right (header lines in order)
    assert client_ip(scope, 1, proxy_networks="*") == "10.0.0.2"
    assert client_ip(scope, 2, proxy_networks="*") == "1.1.1.1"
    assert client_ip(scope, 3, proxy_networks="*") == "6.6.6.6"
    assert client_ip(scope, 4, proxy_networks="*") == "6.6.6.6"       # fewer entries: the outermost one
    # listed networks: the walk steps over listed proxies and stops at the first other address
    assert client_ip(scope, 1, proxy_networks=["10.0.0.0/8"]) == "10.0.0.2"
    assert client_ip(scope, 3, proxy_networks=["10.0.0.0/8"]) == "1.1.1.1"
    assert client_ip(scope, 3, proxy_networks=["192.168.0.0/16"]) == "10.0.0.9"   # the peer is no proxy
    assert client_ip({"headers": []}, 0) is None


def test_key_function_and_global_bucket(client):
    clock = FakeClock()

    def api_key(scope):
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                return value
        return None                                           # no key: not limited

    limiter = KeyedLimiter(rate=1.0, capacity=1, max_keys=64, clock=clock)
    with serve(RateLimitMiddleware(hello, limiter, key=api_key, policy="per-key")) as url:
        assert client.get(url, headers={"X-Api-Key": "a"}).status_code == 200
        r = client.get(url, headers={"X-Api-Key": "a"})
        assert r.status_code == 429 and r.headers["ratelimit"] == '"per-key";r=0;t=1'
        assert client.get(url, headers={"X-Api-Key": "b"}).status_code == 200
        assert all(client.get(url).status_code == 200 for _ in range(3))
    bucket = TokenBucket(rate=1.0, capacity=2, clock=clock)
    with serve(RateLimitMiddleware(hello, bucket)) as url:
        r = client.get(url)
        assert r.status_code == 200 and r.headers["ratelimit"] == '"default";r=1;t=1'
        assert client.get(url, headers={"X-Forwarded-For": "3.3.3.3"}).status_code == 200
        r = client.get(url)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"


def test_rate_limit_bad_arguments():
    limiter = KeyedLimiter(rate=1.0, capacity=1, max_keys=8)
    with pytest.raises(TypeError, match="app must be an ASGI application"):
        RateLimitMiddleware(None, limiter)
    with pytest.raises(TypeError, match="limiter must be a buttress.KeyedLimiter or buttress.TokenBucket"):
        RateLimitMiddleware(hello, object())
    with pytest.raises(TypeError, match="key must be a callable"):
        RateLimitMiddleware(hello, limiter, key="ip")
    with pytest.raises(ValueError, match="trusted_proxies must be between 0 and 64, got -1"):
        RateLimitMiddleware(hello, limiter, trusted_proxies=-1)
    with pytest.raises(ValueError, match="policy must be a non-empty str"):
        RateLimitMiddleware(hello, limiter, policy='a"b')


# -- load shedding -------------------------------------------------------------------------------------


class OneSlot:
    """A stand-in shedder with the LoadShedder protocol: one request in flight unless CRITICAL."""

    def __init__(self):
        self.in_flight = 0
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def admit(self, priority):
        with self.lock:
            if self.in_flight >= 1 and priority != "critical":
                raise Overloaded(retry_after=2.5)
            self.in_flight += 1
        try:
            yield
        finally:
            with self.lock:
                self.in_flight -= 1


def by_header(scope):
    return dict(scope["headers"]).get(b"x-priority", b"low").decode()


def shed_scenario(client, url, shedder, critical):
    """One slow request holds the capacity; then a low request is shed and a critical one passes."""
    GATE.clear()
    with httpx.Client(timeout=TIMEOUT) as other:
        holder = threading.Thread(target=lambda: results.append(other.get(url + "/slow")))
        results: list = []
        holder.start()
        deadline = time.monotonic() + 10
        while shedder.in_flight < 1:
            assert time.monotonic() < deadline, "the slow request never arrived"
            time.sleep(0.005)
        shed = client.get(url + "/x")
        ok = client.get(url + "/x", headers={"X-Priority": critical})
        GATE.set()
        holder.join(10)
    assert results[0].status_code == 200
    return shed, ok


def test_load_shedding_503_with_retry_after_through_uvicorn(client):
    shedder = OneSlot()
    with serve(LoadSheddingMiddleware(hello, shedder, priority=by_header)) as url:
        shed, ok = shed_scenario(client, url, shedder, "critical")
        assert shed.status_code == 503 and shed.headers["retry-after"] == "3" and shed.text == "overloaded\n"
        assert ok.status_code == 200 and ok.text == "hello /x"
        assert client.get(url + "/x").status_code == 200     # capacity back after the slow one finished
        # the response is on the wire before the middleware's admission exits: wait (bounded) for the exit
        deadline = time.monotonic() + 10
        while shedder.in_flight and time.monotonic() < deadline:
            time.sleep(0.005)
        assert shedder.in_flight == 0


def test_load_shedding_releases_on_app_error(client):
    shedder = OneSlot()

    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    with serve(LoadSheddingMiddleware(broken, shedder, priority=lambda scope: "low")) as url:
        assert client.get(url).status_code == 500
        assert client.get(url).status_code == 500           # not 503: the slot was returned
    assert shedder.in_flight == 0


def test_load_shedding_with_real_shedder(client):
    shedding = pytest.importorskip("buttress.shedding")
    shedder = shedding.LoadShedder(max_in_flight=2, default_priority=shedding.Priority.LOW)
    prio = {"low": shedding.Priority.LOW, "critical": shedding.Priority.CRITICAL}
    with serve(LoadSheddingMiddleware(hello, shedder, priority=lambda s: prio[by_header(s)])) as url:
        shed, ok = shed_scenario(client, url, shedder, "critical")      # LOW admitted below 1 in flight
        assert shed.status_code == 503 and shed.headers["retry-after"] == "1"   # no latency known yet
        assert ok.status_code == 200
    assert shedder.metrics().shed[shedding.Priority.LOW] == 1
    with serve(LoadSheddingMiddleware(hello, shedder)) as url:          # None: the shedder's default (LOW)
        shed, ok = shed_scenario(client, url, shedder, "critical")
        assert shed.status_code == 503 and ok.status_code == 503      # no header is read: both LOW
    assert shedder.in_flight == 0


def test_load_shedding_bad_arguments():
    with pytest.raises(TypeError, match="shedder must be a buttress.LoadShedder"):
        LoadSheddingMiddleware(hello, object(), priority=lambda s: 0)
    with pytest.raises(ValueError, match="retry_after must be >= 1"):
        LoadSheddingMiddleware(hello, OneSlot(), priority=lambda s: 0, retry_after=0)


# -- health endpoints ----------------------------------------------------------------------------------


def test_health_endpoints_through_uvicorn(client):
    clock = FakeClock()
    health = HealthRegistry(clock=clock)
    warm = {"done": False}
    health.add_startup("warm", lambda: warm["done"], failure_threshold=100)
    health.add_liveness("loop", lambda: True)
    health.add_readiness("db", lambda: True)
    cb = CircuitBreaker(name="payment", clock=clock)
    health.add_breaker(cb)
    limiter = KeyedLimiter(rate=1.0, capacity=1, max_keys=8, clock=clock)
    # details=True: the whole report (opt-in; the default body is the status alone, see test_health_edge)
    app = HealthEndpoints(RateLimitMiddleware(hello, limiter), health, details=True)
    with serve(app) as url:
        for path in ("/livez", "/readyz", "/startupz"):
            r = client.get(url + path)
            assert r.status_code == 503 and r.json()["status"] == "starting", path
            assert r.headers["content-type"] == "application/json" and r.headers["cache-control"] == "no-store"
        warm["done"] = True
        r = client.get(url + "/startupz")
        assert r.status_code == 200 and r.json()["status"] == "up" and r.json()["probe"] == "startup"
        r = client.get(url + "/livez")
        assert r.status_code == 200 and set(r.json()["checks"]) == {"loop"}
        r = client.get(url + "/readyz")
        assert r.status_code == 200 and r.json()["status"] == "up"
        cb.force_open()
        r = client.get(url + "/readyz")
        assert r.status_code == 200 and r.json()["status"] == "degraded"
        assert r.json()["checks"]["breaker:payment"] == {"status": "degraded", "state": "FORCED_OPEN"}
        assert client.head(url + "/readyz").status_code == 200
        assert client.post(url + "/readyz").status_code == 405
        # probes are served before the rate limiter: many probes, then the app still has its token
        assert client.get(url + "/other").text == "hello /other"
        assert client.get(url + "/other").status_code == 429


def test_health_endpoints_standalone_and_custom_paths(client):
    health = HealthRegistry()
    health.add_readiness("db", lambda: False)
    with serve(HealthEndpoints(None, health, livez="/healthz", startupz=None)) as url:
        assert client.get(url + "/healthz").status_code == 200
        r = client.get(url + "/readyz")
        assert r.status_code == 503 and r.json() == {"status": "down"}          # the status alone by default
        assert client.get(url + "/startupz").status_code == 404
        assert client.get(url + "/livez").status_code == 404


def test_health_endpoints_bad_arguments():
    with pytest.raises(TypeError, match="health must be a buttress.health.HealthRegistry"):
        HealthEndpoints(None, object())
    with pytest.raises(ValueError, match="the path for readiness must be a str starting with '/'"):
        HealthEndpoints(None, HealthRegistry(), readyz="readyz")
    with pytest.raises(TypeError, match=r"details must be a bool or a callable\(scope\) -> bool .*got 'yes'"):
        HealthEndpoints(None, HealthRegistry(), details="yes")

