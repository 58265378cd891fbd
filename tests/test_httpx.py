"""buttress.httpx end to end: a real uvicorn server (a child process) on a loopback port (an ASGI app written here that can
answer 503 + Retry-After, 500, slowly, break a body mid-stream), a raw socket server that drops every
connection, and real httpx clients. Every rule is checked by counting what the servers received.

Retry waits run on FakeClock (sync: sleep advances it; async: autojump), so Retry-After values are
checked as clock time, not waited for; only the timeout and hedging tests wait (well under a second).
"""
from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import buttress  # noqa: E402
from buttress import (CircuitOpenError, FakeClock, Pipeline, RateLimitExceeded, Retry,  # noqa: E402
                      TokenBucket)
from buttress.httpx import (AsyncResilientTransport, HostPipeline, ResilientTransport,  # noqa: E402
                            default_pipeline, parse_retry_after)

RECEIVED: list[tuple[str, str, dict]] = []     # (method, path, headers) of every request the app saw
_LOCK = threading.Lock()
_HITS: collections.Counter = collections.Counter()


_BASE: list[str] = []        # the server's URL, for hits() / keys()


def _received() -> list:
    return httpx.get(_BASE[0] + "/_received", timeout=10.0).json()


def hits(path):
    """How many requests for `path` the server received (since the test began)."""
    return sum(1 for _, p, _ in _received() if p == path)


def keys(path):
    return [h.get("idempotency-key") for _, p, h in _received() if p == path]


async def app(scope, receive, send):
    """/status/<code>?ra=<Retry-After>  answers <code>;  /flaky/<n>/<code>  answers <code> to the first n
    requests of that path, then 200;  /slow/<ms>  answers after ms;  /slowfirst/<ms>  the first request
    of the path after ms, the others at once;  /break  sends half a body then fails;  /breakfirst/<n>
    does that to the first n requests of the path (headers, 1000 of 2000 bytes), then sends all 2000;
    /stallfirst/<ms>  the first request of the path gets headers and half its body, the rest after ms;
    /ok  200."""
    if scope["type"] != "http":
        return
    while True:             # drain the request body
        msg = await receive()
        if not msg.get("more_body"):
            break
    path = scope["path"]
    if path in ("/_received", "/_reset"):     # the test's view of what was received
        with _LOCK:
            body = json.dumps(RECEIVED).encode()
            if path == "/_reset":
                RECEIVED.clear()
                _HITS.clear()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return
    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    with _LOCK:
        RECEIVED.append((scope["method"], path, headers))
        _HITS[path] += 1
        n = _HITS[path]
    parts = path.strip("/").split("/")
    status, extra, body = 200, [], b"ok"
    query = dict(urllib.parse.parse_qsl(scope["query_string"].decode()))
    if parts[0] == "status":
        status = int(parts[1])
    elif parts[0] == "flaky":
        if n <= int(parts[1]):
            status = int(parts[2])
    elif parts[0] == "slow":
        await asyncio.sleep(int(parts[1]) / 1000)
    elif parts[0] == "slowfirst":
        if n == 1:
            await asyncio.sleep(int(parts[1]) / 1000)
        body = f"attempt {n}".encode()
    elif parts[0] == "break" or parts[0] == "breakfirst" and n <= int(parts[1]):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"100000" if parts[0] == "break" else b"2000")]})
        await send({"type": "http.response.body", "body": b"x" * 1000, "more_body": True})
        raise RuntimeError("the server breaks off the body")
    elif parts[0] == "breakfirst":
        body = b"y" * 2000
    elif parts[0] == "stallfirst":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2000")]})
        await send({"type": "http.response.body", "body": b"z" * 1000, "more_body": True})
        if n == 1:
            await asyncio.sleep(int(parts[1]) / 1000)
        await send({"type": "http.response.body", "body": b"z" * 1000})
        return
    if "ra" in query:
        extra.append((b"retry-after", query["ra"].encode()))
    await send({"type": "http.response.start", "status": status,   # content-length: one write, no chunking
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def server():
    """uvicorn serving `app` in a child process on a free loopback port (in a thread of this process
    every sync round trip costs ~40 ms here); what it received is read back over HTTP."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", "import uvicorn, test_httpx as t; uvicorn.run(t.app, "
                             f"host='127.0.0.1', port={port}, log_level='critical', access_log=False, "
                             "lifespan='off', timeout_graceful_shutdown=1)"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/_received", timeout=1.0)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def url(server):
    """The server, with its record of received requests emptied for this test."""
    httpx.get(server + "/_reset", timeout=10.0)
    _BASE[:] = [server]
    return server


@pytest.fixture(scope="module")
def dropper():
    """A raw TCP server that accepts and closes every connection at once; counts them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    count = [0]
    stop = threading.Event()

    def loop():
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conn.recv(65536)
            count[0] += 1
            conn.close()
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", count
    stop.set()
    t.join(5)
    sock.close()


def client(**kwargs):
    return httpx.Client(transport=ResilientTransport(**kwargs), timeout=10.0)


def aclient(**kwargs):
    return httpx.AsyncClient(transport=AsyncResilientTransport(**kwargs), timeout=10.0)


# -- retries ------------------------------------------------------------------------------------------------

def test_get_retried_on_503_honouring_retry_after_seconds(url):
    clock = FakeClock()
    with client(clock=clock) as c:
        r = c.get(f"{url}/flaky/2/503?ra=7")
    assert r.status_code == 200 and r.text == "ok"
    assert hits("/flaky/2/503") == 3
    assert clock.monotonic() >= 14.0            # two waits of at least Retry-After


def test_async_get_retried_on_502_504_and_429(url):
    clock = FakeClock()

    async def main():
        async with aclient(clock=clock) as c:
            return [(await c.get(f"{url}/flaky/2/{code}?ra=1")).status_code for code in (502, 504, 429)]
    assert asyncio.run(main()) == [200, 200, 200]
    assert [hits(f"/flaky/2/{code}") for code in (502, 504, 429)] == [3, 3, 3]
    assert clock.monotonic() >= 6.0


def test_retry_after_http_date(url):
    clock = FakeClock()
    when = email.utils.formatdate(time.time() + 5, usegmt=True).replace(" ", "%20")
    with client(clock=clock) as c:
        assert c.get(f"{url}/flaky/1/503?ra={when}").status_code == 200
    assert hits("/flaky/1/503") == 2
    assert clock.monotonic() >= 3.0             # a date 5 s ahead (1 s resolution, a little time passed)


def test_last_response_is_returned_not_raised(url):
    clock = FakeClock()
    with client(clock=clock) as c:
        r = c.get(f"{url}/status/503?ra=1")
    assert r.status_code == 503 and r.text == "ok" and r.headers["retry-after"] == "1"
    assert hits("/status/503") == 3             # 3 attempts by default


def test_post_is_not_retried(url):
    with client(clock=FakeClock()) as c:
        assert c.post(f"{url}/status/503", content=b"pay").status_code == 503
        assert c.post(f"{url}/status/502", json={"a": 1}).status_code == 502
    assert hits("/status/503") == 1 and hits("/status/502") == 1


def test_post_with_idempotency_key_header_is_retried(url):
    with client(clock=FakeClock()) as c:
        r = c.post(f"{url}/status/503", content=b"pay", headers={"Idempotency-Key": "order-1"})
    assert r.status_code == 503
    assert keys("/status/503") == ["order-1"] * 3


def test_attempt_key_set_on_the_header_when_asked(url):
    with client(clock=FakeClock(), idempotency_header="Idempotency-Key") as c:
        assert c.post(f"{url}/flaky/2/503", content=b"pay").status_code == 200
    ks = keys("/flaky/2/503")
    assert len(ks) == 3 and ks[0] and len(set(ks)) == 1      # one key, sent with every attempt


def test_streamed_request_body_is_never_retried(url):
    def body():
        yield b"part"
    with client(clock=FakeClock()) as c:
        assert c.put(f"{url}/status/503", content=body()).status_code == 503
    assert hits("/status/503") == 1


def test_500_is_not_retried(url):
    with client(clock=FakeClock()) as c:
        assert c.get(f"{url}/status/500").status_code == 500
    assert hits("/status/500") == 1


def test_retry_after_longer_than_the_total_timeout_gives_up_at_once(url):
    clock = FakeClock()
    pipe = default_pipeline("x", timeout=5.0, clock=clock)
    with client(clock=clock, pipeline_factory=lambda host: pipe) as c:
        r = c.get(f"{url}/status/503?ra=60")
    assert r.status_code == 503 and hits("/status/503") == 1
    assert clock.monotonic() == 0.0


@pytest.mark.parametrize("ra", ["99999999999999999999", "9" * 400, "1e999"])
def test_out_of_range_retry_after_is_one_rule_wait_longer_than_the_budget(url, ra):
    """Too large to represent is the maximum (1e9 s), never "absent": given up at once, like 60 s over a
    5 s budget -- a 400-digit value was treated as no header and retried quickly."""
    assert parse_retry_after(ra) == 1e9
    clock = FakeClock()
    pipe = default_pipeline("x", timeout=5.0, clock=clock)
    with client(clock=clock, pipeline_factory=lambda host: pipe) as c:
        r = c.get(f"{url}/status/503?ra={ra}")
    assert r.status_code == 503 and hits("/status/503") == 1
    assert clock.monotonic() == 0.0


def test_dropped_connection_retried_for_get_not_for_post(dropper):
    base, count = dropper
    with client(clock=FakeClock()) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            c.get(f"{base}/x")
        assert count[0] == 3
        with pytest.raises(httpx.RemoteProtocolError):
            c.post(f"{base}/x", content=b"pay")
        assert count[0] == 4


def test_connect_error_is_retried_for_every_method():
    sent = []

    class Spy(httpx.HTTPTransport):
        def handle_request(self, request):
            sent.append(request.method)
            return super().handle_request(request)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                   # nothing listens there: connection refused
    with httpx.Client(transport=ResilientTransport(Spy(), clock=FakeClock())) as c:
        with pytest.raises(httpx.ConnectError):
            c.post(f"http://127.0.0.1:{port}/", content=b"pay")
    assert sent == ["POST"] * 3     # never sent: safe to send again


# -- timeouts -----------------------------------------------------------------------------------------------

def test_remaining_total_timeout_becomes_the_attempt_timeout(url):
    seen = []

    class Spy(httpx.HTTPTransport):
        def handle_request(self, request):
            seen.append(request.extensions["timeout"])
            return super().handle_request(request)
    clock = FakeClock()
    pipe = default_pipeline("x", timeout=4.0, clock=clock)
    clock.advance(0)
    with httpx.Client(transport=ResilientTransport(Spy(), pipeline_factory=lambda h: pipe, clock=clock),
                      timeout=10.0) as c:
        assert c.get(f"{url}/flaky/1/503?ra=1").status_code == 200
    assert seen[0] == {"connect": 4.0, "read": 4.0, "write": 4.0, "pool": 4.0}
    assert seen[1]["read"] <= 3.0           # 1 s (at least) of Retry-After went by on the clock


def test_slow_server_times_out_within_the_total_timeout(url):
    pipe = default_pipeline("x", timeout=0.3)
    t = time.monotonic()
    with client(pipeline_factory=lambda h: pipe) as c:
        with pytest.raises(httpx.TimeoutException):
            c.get(f"{url}/slow/3000")
    assert time.monotonic() - t < 2.5           # bounded by the total timeout, not 3 s x 3 attempts
    assert hits("/slow/3000") == 1              # no time left for a second attempt
    assert pipe.breaker.metrics().failures == 1


# -- the breaker --------------------------------------------------------------------------------------------

def test_breaker_counts_5xx_never_4xx_and_rejects_with_retry_after(url):
    clock = FakeClock()

    async def main():
        async with aclient(clock=clock) as c:
            for _ in range(30):
                assert (await c.get(f"{url}/status/404")).status_code == 404
            pipe = c._transport.pipeline_for(c._transport._host(c.build_request("GET", url)))
            assert pipe.breaker.metrics().failures == 0
            # window 100, rate 50 %: after 30 answers (4xx: successes) the 30th consecutive 5xx opens it
            for _ in range(30):
                assert (await c.post(f"{url}/status/500")).status_code == 500
            with pytest.raises(CircuitOpenError) as info:
                await c.get(f"{url}/ok")
            return info.value
    err = asyncio.run(main())
    assert hits("/status/500") == 30 and hits("/ok") == 0
    assert err.retry_after == pytest.approx(30.0)


def test_breaker_opens_after_at_most_100_consecutive_5xx_from_any_history(url):
    clock = FakeClock()

    async def main():
        async with aclient(pipeline_factory=lambda host: default_pipeline(host, rate=None, clock=clock)) as c:
            for _ in range(100):        # a window of 100 successes: the worst history
                await c.get(f"{url}/status/404")
            for _ in range(100):
                try:
                    await c.post(f"{url}/status/500")
                except CircuitOpenError:
                    break
            with pytest.raises(CircuitOpenError):
                await c.post(f"{url}/status/500")
    asyncio.run(main())
    assert hits("/status/500") <= 100


def test_breakers_are_per_host(url):
    clock = FakeClock()
    other = url.replace("127.0.0.1", "localhost")

    async def main():
        async with aclient(clock=clock) as c:
            for _ in range(20):         # minimum_calls 20: 20 consecutive 5xx from a fresh start open it
                await c.post(f"{url}/status/500")
            with pytest.raises(CircuitOpenError):
                await c.get(f"{url}/ok")
            assert (await c.get(f"{other}/ok")).status_code == 200
    asyncio.run(main())
    assert hits("/ok") == 1 and hits("/status/500") == 20


def test_mid_stream_failure_is_a_breaker_failure(url):
    with client(clock=FakeClock(), buffer_limit=0) as c:      # every body streamed to the caller
        host = c._transport._host(c.build_request("GET", url))
        with c.stream("GET", f"{url}/ok") as r:
            assert r.read() == b"ok"
        pipe = c._transport.pipeline_for(host)
        assert (pipe.breaker.metrics().calls, pipe.breaker.metrics().failures) == (1, 0)
        with pytest.raises(httpx.RemoteProtocolError):
            with c.stream("GET", f"{url}/break") as r:
                for _ in r.iter_bytes():
                    pass
        assert (pipe.breaker.metrics().calls, pipe.breaker.metrics().failures) == (2, 1)


def test_async_mid_stream_failure_is_a_breaker_failure(url):
    async def main():
        async with aclient(clock=FakeClock(), buffer_limit=1000) as c:    # /break's 100000 bytes: streamed
            host = c._transport._host(c.build_request("GET", url))
            with pytest.raises(httpx.RemoteProtocolError):
                async with c.stream("GET", f"{url}/break") as r:
                    async for _ in r.aiter_bytes():
                        pass
            return c._transport.pipeline_for(host).breaker.metrics()
    m = asyncio.run(main())
    assert (m.calls, m.failures) == (1, 1)


def test_reply_that_breaks_off_is_retried_for_get_and_keyed_post(url):
    """Headers, then the connection drops in the body: for a retryable request that is a connection
    error like any other (retried, a breaker failure), not an error the caller meets after the retries."""
    with client(clock=FakeClock()) as c:
        host = c._transport._host(c.build_request("GET", url))
        r = c.get(f"{url}/breakfirst/2")
        assert r.status_code == 200 and r.content == b"y" * 2000
        assert hits("/breakfirst/2") == 3
        m = c._transport.pipeline_for(host).breaker.metrics()
        assert (m.calls, m.failures) == (3, 2)
        with c.stream("GET", f"{url}/breakfirst/1") as r:       # streamed by the caller: read already
            assert r.read() == b"y" * 2000
        assert hits("/breakfirst/1") == 2
        r = c.post(f"{url}/breakfirst/1/post", content=b"pay", headers={"Idempotency-Key": "order-7"})
        assert r.content == b"y" * 2000
    assert keys("/breakfirst/1/post") == ["order-7", "order-7"]


def test_async_reply_that_breaks_off_is_retried_with_the_same_key(url):
    async def main():
        async with aclient(clock=FakeClock(), idempotency_header="Idempotency-Key") as c:
            r = await c.post(f"{url}/breakfirst/2", content=b"pay")
            return r.status_code, len(r.content)
    assert asyncio.run(main()) == (200, 2000)
    ks = keys("/breakfirst/2")
    assert len(ks) == 3 and ks[0] and len(set(ks)) == 1


def test_client_timeout_is_the_attempt_timeout_also_for_a_body_that_stalls(url):
    """The client's timeout bounds each attempt (the pipeline's Timeout is the total): a first attempt
    whose body stalls for 3 s is cut at 0.2 s and the GET sent again, within the 5 s total."""
    pipe = default_pipeline("x", timeout=5.0)
    with httpx.Client(transport=ResilientTransport(pipeline_factory=lambda h: pipe), timeout=0.2) as c:
        r = c.get(f"{url}/stallfirst/3000")
    assert r.content == b"z" * 2000
    assert hits("/stallfirst/3000") == 2
    assert pipe.breaker.metrics().failures == 1         # the stalled attempt (a ReadTimeout)


def test_reply_that_breaks_off_is_not_retried_unkeyed_post_or_over_buffer_limit(url):
    with client(clock=FakeClock()) as c:
        with pytest.raises(httpx.RemoteProtocolError):      # a POST without a key: never sent twice
            c.post(f"{url}/breakfirst/5", content=b"pay")
        assert hits("/breakfirst/5") == 1
    with client(clock=FakeClock(), buffer_limit=1999) as c:
        with pytest.raises(httpx.RemoteProtocolError):      # 2000 bytes > the limit: streamed, not retried
            c.get(f"{url}/breakfirst/5")
        assert hits("/breakfirst/5") == 2
    with pytest.raises(ValueError, match="buffer_limit"):
        ResilientTransport(buffer_limit=-1)
    with pytest.raises(TypeError, match="buffer_limit"):
        AsyncResilientTransport(buffer_limit=1.5)


# -- the limiter --------------------------------------------------------------------------------------------

def test_rate_limited_request_raises_with_retry_after_and_is_not_sent(url):
    clock = FakeClock()
    factory = lambda host: Pipeline(Retry(max_attempts=3, clock=clock),  # noqa: E731
                                    TokenBucket(rate=1.0, capacity=1, clock=clock))
    with client(clock=clock, pipeline_factory=factory) as c:
        assert c.get(f"{url}/ok").status_code == 200
        with pytest.raises(RateLimitExceeded) as info:
            c.get(f"{url}/ok")
    assert info.value.retry_after == pytest.approx(1.0)
    assert hits("/ok") == 1


# -- hedging ------------------------------------------------------------------------------------------------

def test_hedged_get_returns_the_fast_answer(url):
    with client(hedge=0.05) as c:
        r = c.get(f"{url}/slowfirst/800")
    assert r.text == "attempt 2"
    assert hits("/slowfirst/800") == 2


def test_async_hedged_get_returns_the_fast_answer_and_posts_are_not_hedged(url):
    async def main():
        async with aclient(hedge=0.05) as c:
            a = await c.get(f"{url}/slowfirst/800")
            b = await c.post(f"{url}/slowfirst/300")
            return a.text, b.text
    assert asyncio.run(main()) == ("attempt 2", "attempt 1")
    assert hits("/slowfirst/800") == 2 and hits("/slowfirst/300") == 1


# -- construction and the module itself -------------------------------------------------------------------

def test_defaults():
    pipe = default_pipeline("h")
    assert pipe.retry.max_attempts == 3 and pipe.timeout == 30.0
    assert pipe.limiter.rate >= 50
    assert pipe.breaker.state is buttress.State.CLOSED and pipe.hedge is None


def test_pipeline_factory_roles_and_refusals():
    p = HostPipeline.from_pipeline(Pipeline(buttress.Timeout(2.0), Retry(), buttress.CircuitBreaker(name="h")))
    assert p.timeout == 2.0 and p.retry is not None and p.breaker is not None and p.limiter is None
    with pytest.raises(ValueError, match="no role"):
        HostPipeline.from_pipeline(Pipeline(buttress.Bulkhead(2)))
    with pytest.raises(ValueError, match="fallback"):
        HostPipeline.from_pipeline(Pipeline(Retry(), fallback=1))
    with pytest.raises(TypeError, match="pipeline_factory"):
        ResilientTransport(pipeline_factory=3)
    with pytest.raises(TypeError, match="per_host"):
        ResilientTransport(per_host=1)
    for bad, exc in (("p200", ValueError), (-1, ValueError), (float("nan"), ValueError), (True, TypeError)):
        for make in (AsyncResilientTransport, ResilientTransport, lambda hedge: default_pipeline("h", hedge=hedge)):
            with pytest.raises(exc, match=r"^hedge must be None, seconds in \[0, 1e9\], a percentile .* got "):
                make(hedge=bad)


@pytest.mark.parametrize("value, expected", [
    ("120", 120.0), ("1.5", 1.5), ("-3", 0.0), ("  7 ", 7.0), ("soon", None), ("", None), (None, None),
    ("inf", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ("nan", None), ("-Infinity", None), ("9" * 400, 1e9), ("1e999", 1e9), ("-1e999", 0.0), ("99999999999999999999", 1e9),
    ("Fri, 31 Dec 9999 23:59:59 GMT", 1e9), ("Wed, 21 Oct 99999 07:28:00 GMT", 1e9),
])
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value) == expected


def test_parse_retry_after_date_relative_to_now():
    now = 1_700_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0


def test_module_imports_without_httpx():
    code = ("import sys; sys.modules['httpx'] = None\n"
            "import buttress.httpx as m\n"
            "try:\n    m.ResilientTransport()\nexcept ImportError as e:\n    print('ImportError', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ImportError" in out.stdout and "buttress[httpx]" in out.stdout



def test_body_already_in_memory_is_a_success_at_once():
    transport = ResilientTransport(httpx.MockTransport(lambda request: httpx.Response(200, content=b"ok")),
                                   clock=FakeClock())
    with httpx.Client(transport=transport) as c:
        assert c.get("http://h/x").text == "ok"
        m = transport.pipeline_for("http://h:80").breaker.metrics()
    assert (m.calls, m.failures) == (1, 0)
