"""The ASGI edge under attack (issue 20): hostile priorities, client identity behind proxies, UNIX
sockets, 429 counters, RateLimit-Policy, header-safe policy names, and exact admission under load.

Everything a client sends goes through a real uvicorn server on 127.0.0.1 (or a UNIX socket) and a
real HTTP client (httpx). Limiters run on FakeClock where an exact count is asserted; the load test on
the real clock asserts only the upper bound GCRA guarantees (capacity + floor(D * rate) over the span D
that contains every admission), which cannot fail by being slow.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import sys
import tempfile
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from buttress import FakeClock, KeyedLimiter, Overloaded, TokenBucket  # noqa: E402
from buttress.asgi import ClientIP, LoadSheddingMiddleware, RateLimitMiddleware, client_ip  # noqa: E402
from buttress.registry import Registry  # noqa: E402
from buttress.shedding import LoadShedder, Priority  # noqa: E402

TIMEOUT = httpx.Timeout(10.0)
GATE = threading.Event()


async def hello(scope, receive, send):
    """A bare ASGI app: echoes the path; /slow waits for the test's signal."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/slow":
        await asyncio.get_running_loop().run_in_executor(None, GATE.wait, 10)
    body = f"hello {scope['path']}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def serve(app, uds: str | None = None):
    """Run `app` on uvicorn in a thread, on a free loopback port (or the UNIX socket `uds`); yield its
    base URL; stop it."""
    if uds is None:
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets' connections; without it a
        # response's head and body wait for the client's delayed ACK (~40 ms a keep-alive request)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(uds)
        url = "http://localhost"
    # proxy_headers=False: uvicorn would otherwise rewrite scope["client"] from X-Forwarded-For itself
    config = uvicorn.Config(app, log_level="warning", proxy_headers=False, lifespan="off", access_log=False,
                            backlog=512)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def client():
    with httpx.Client(timeout=TIMEOUT) as c:
        yield c


def statuses(responses) -> list[int]:
    return [r.status_code for r in responses]


async def call(app, scope_extra: dict) -> tuple[int, dict]:
    """One request straight into an ASGI app (no server): (status, headers)."""
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "client": ("127.0.0.1", 5000),
             **scope_extra}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}


# -- item 4: priority ----------------------------------------------------------------------------------


def naive_priority(scope):
    """The priority function the docs used to show: a client header straight into Priority[...]."""
    value = dict(scope["headers"]).get(b"x-priority", b"medium")
    return Priority[value.decode().upper()]


def test_hostile_priority_values_never_give_500(client, caplog):
    shedder = LoadShedder(max_in_flight=100, default_priority=Priority.LOW)
    hostile = [b"urgent", b"", "\u00fcrgent".encode(), b"\xff\xfe", b"critical;q=1", b"__class__", b"9" * 5000]
    with caplog.at_level(logging.WARNING, logger="buttress.asgi"), \
            serve(LoadSheddingMiddleware(hello, shedder, priority=naive_priority)) as url:
        rs = [client.get(url + "/x", headers={"X-Priority": value}) for value in hostile]
        assert statuses(rs) == [200] * len(hostile)
        assert client.get(url + "/x", headers={"X-Priority": b"high"}).status_code == 200
    # every hostile value was admitted as the shedder's default priority (LOW), the valid one as HIGH
    assert shedder.metrics().admitted[Priority.LOW] == len(hostile)
    assert shedder.metrics().admitted[Priority.HIGH] == 1
    assert shedder.in_flight == 0
    assert len([r for r in caplog.records if "priority" in r.getMessage()]) == 1       # said once


@pytest.mark.parametrize("bad", [
    pytest.param(lambda scope: 1 / 0, id="raises"),
    pytest.param(lambda scope: "critical", id="a str"),
    pytest.param(lambda scope: 7, id="an int out of range"),
    pytest.param(lambda scope: True, id="a bool"),
    pytest.param(lambda scope: object(), id="an object"),
    pytest.param(lambda scope: None, id="None"),
])
def test_failing_or_unknown_priority_maps_to_default(client, bad):
    shedder = LoadShedder(max_in_flight=10, default_priority=Priority.MEDIUM)
    with serve(LoadSheddingMiddleware(hello, shedder, priority=bad)) as url:
        assert statuses(client.get(url + "/x") for _ in range(3)) == [200, 200, 200]
    assert shedder.metrics().admitted[Priority.MEDIUM] == 3
    assert sum(shedder.metrics().admitted.values()) == 3


def test_client_header_cannot_make_a_request_critical(client):
    """The docs' priority comes from the route (or authenticated identity), not a client header: a
    client sending X-Priority: critical is shed like any other LOW request."""
    shedder = LoadShedder(max_in_flight=2, default_priority=Priority.LOW)      # LOW admitted below 1 in flight

    def by_route(scope):
        return {"/checkout": Priority.CRITICAL}.get(scope["path"], Priority.LOW)

    GATE.clear()
    with serve(LoadSheddingMiddleware(hello, shedder, priority=by_route)) as url, \
            httpx.Client(timeout=TIMEOUT) as other:
        held: list = []
        holder = threading.Thread(target=lambda: held.append(other.get(url + "/slow")))
        holder.start()
        deadline = time.monotonic() + 10
        while shedder.in_flight < 1:
            assert time.monotonic() < deadline, "the slow request never arrived"
            time.sleep(0.005)
        forged = client.get(url + "/search", headers={"X-Priority": "critical"})
        checkout = client.get(url + "/checkout")
        GATE.set()
        holder.join(10)
    assert forged.status_code == 503 and checkout.status_code == 200 and held[0].status_code == 200


@pytest.mark.parametrize("retry_after, expected", [
    (float("nan"), "4"), (float("inf"), "4"), (-3.0, "1"), ("soon", "4"), (1e300, str(10**9)), (2.2, "3"),
])
def test_shed_retry_after_from_a_custom_shedder_is_sanitised(retry_after, expected):
    class Stubborn:
        @contextlib.contextmanager
        def admit(self, priority):
            exc = Overloaded("custom")
            exc.retry_after = retry_after                     # whatever a custom shedder puts there
            raise exc
            yield

    status, headers = asyncio.run(call(LoadSheddingMiddleware(hello, Stubborn(), retry_after=4), {}))
    assert status == 503 and headers["retry-after"] == expected


def test_fixed_priority_is_checked_at_construction():
    with pytest.raises(TypeError, match="priority must be a buttress.Priority.*got 'critical'"):
        LoadSheddingMiddleware(hello, LoadShedder(max_in_flight=2), priority="critical")
    with pytest.raises(TypeError, match="priority must be a buttress.Priority.*got True"):
        LoadSheddingMiddleware(hello, LoadShedder(max_in_flight=2), priority=True)
    LoadSheddingMiddleware(hello, LoadShedder(max_in_flight=2), priority=Priority.HIGH)
    LoadSheddingMiddleware(hello, LoadShedder(max_in_flight=2), priority=3)               # CRITICAL's value


# -- item 5: client identity ---------------------------------------------------------------------------


def test_direct_client_cannot_choose_its_key_unless_the_peer_is_a_listed_proxy(client):
    clock = FakeClock()

    def app(networks):
        limiter = KeyedLimiter(rate=1.0, capacity=1, max_keys=256, clock=clock)
        return RateLimitMiddleware(hello, limiter, trusted_proxies=1, proxy_networks=networks)

    forged = [{"X-Forwarded-For": f"198.51.100.{i}"} for i in range(40)]
    with serve(app(["10.0.0.0/8", "fd00::/8"])) as url:      # 127.0.0.1 is not a listed proxy
        rs = [client.get(url, headers=h) for h in forged]
        assert statuses(rs).count(200) == 1                   # one bucket: the socket peer's
    with serve(app("127.0.0.1/32")) as url:                   # now the peer is the proxy: its entries count
        rs = [client.get(url, headers=h) for h in forged]
        assert statuses(rs) == [200] * 40
    with pytest.raises(ValueError, match="trusted_proxies=1 needs proxy_networks"):
        RateLimitMiddleware(hello, KeyedLimiter(rate=1.0, max_keys=8), trusted_proxies=1)


def test_ip_port_entries_and_ipv6_prefix_grouping(client):
    clock = FakeClock()

    def app(**options):
        limiter = KeyedLimiter(rate=1.0, capacity=1, max_keys=256, clock=clock)
        return RateLimitMiddleware(hello, limiter, trusted_proxies=1, proxy_networks=["127.0.0.1"], **options)

    with serve(app()) as url:
        def get(xff):
            return client.get(url, headers={"X-Forwarded-For": xff}).status_code

        # Azure Application Gateway writes IP:port; each connection's port must not be a fresh key
        assert [get("203.0.113.5:1111"), get("203.0.113.5:2222"), get("9.9.9.9,203.0.113.5")] == [200, 429, 429]
        assert [get("[2001:db8:0:1::5]:443"), get("2001:db8:0:1:0:0:0:5"), get("[2001:db8:0:1::5]")] == \
            [200, 429, 429]
        assert [get("::ffff:192.0.2.9"), get("192.0.2.9:80")] == [200, 429]   # IPv4-mapped is the IPv4
        # default ipv6_prefix=64: 40 addresses of one /64 share one bucket; another /64 has its own
        rs = [get(f"2001:db8:aaaa:bbbb:{i:x}::{i + 1:x}") for i in range(40)]
        assert rs.count(200) == 1
        assert get("2001:db8:aaaa:cccc::1") == 200
    with serve(app(ipv6_prefix=128)) as url:                  # grouping off: each address its own bucket
        rs = [client.get(url, headers={"X-Forwarded-For": f"2001:db8:aaaa:bbbb::{i + 1:x}"}) for i in range(40)]
        assert statuses(rs) == [200] * 40
    with serve(app(ipv4_prefix=24)) as url:                   # IPv4 grouping when asked
        rs = [client.get(url, headers={"X-Forwarded-For": f"198.51.100.{i}"}) for i in range(10)]
        assert statuses(rs).count(200) == 1


def test_client_ip_normalises_and_groups():
    def scope(peer, *xff):
        return {"client": (peer, 1) if peer else None, "headers": [(b"x-forwarded-for", v) for v in xff]}

    assert client_ip(scope("::ffff:10.1.2.3")) == "10.1.2.3"
    assert client_ip(scope("2001:DB8::0:1")) == "2001:db8::1"
    assert client_ip(scope("2001:db8:1:2:3:4:5:6"), ipv6_prefix=64) == "2001:db8:1:2::/64"
    assert client_ip(scope("testclient")) == "testclient"                     # not an IP: as the server says
    nets = ["10.0.0.0/8"]
    # an entry that is not an address stops the walk at the nearest address to its right
    assert client_ip(scope("10.0.0.1", b"1.1.1.1, garbage, 10.0.0.2"), 3, proxy_networks=nets) == "10.0.0.2"
    assert client_ip(scope("10.0.0.1", b"unknown"), 1, proxy_networks=nets) == "10.0.0.1"
    assert client_ip(scope("10.0.0.1", b"1.1.1.1,"), 1, proxy_networks=nets) == "10.0.0.1"
    # the client forging an entry left of a listed proxy's does not move its key
    assert client_ip(scope("10.0.0.1", b"6.6.6.6, 1.1.1.1"), 1, proxy_networks=nets) == "1.1.1.1"
    # a proxy that appends a second header line: lines are read last to first
    assert client_ip(scope("10.0.0.1", b"6.6.6.6", b"10.0.0.5"), 2, proxy_networks=nets) == "6.6.6.6"


def test_only_the_last_n_forwarded_entries_are_parsed():
    """A 22 KB X-Forwarded-For must cost what its last N entries cost: only they reach the parser."""
    entries = [f"203.0.{i // 250}.{i % 250}" for i in range(1600)]
    header = ", ".join(entries).encode()
    assert len(header) > 20_000
    for n in (1, 3):
        ip = ClientIP(n, "*")
        scope = {"client": ("10.0.0.1", 1), "headers": [(b"host", b"x"), (b"x-forwarded-for", header)]}
        assert ip(scope) == entries[-n]
        assert ip._parse.cache_info().misses == 1 + n          # the peer, then n entries: nothing else


def test_client_ip_bad_arguments():
    with pytest.raises(ValueError, match=r"proxy_networks must hold IP addresses or networks.*'10.0.0.0/33'"):
        ClientIP(1, ["10.0.0.0/33"])
    with pytest.raises(ValueError, match=r"proxy_networks must hold .*'10.0.0.1/8'"):
        ClientIP(1, "10.0.0.1/8")                             # host bits set: a typo, not a network
    with pytest.raises(TypeError, match="proxy_networks must be"):
        ClientIP(1, 10)
    with pytest.raises(ValueError, match="proxy_networks must name at least one"):
        ClientIP(1, [])
    with pytest.raises(ValueError, match=r"proxy_networks=\['10.0.0.0/8'\] needs trusted_proxies >= 1"):
        ClientIP(0, ["10.0.0.0/8"])
    with pytest.raises(ValueError, match="ipv6_prefix must be between 1 and 128, got 129"):
        ClientIP(0, None, ipv6_prefix=129)
    with pytest.raises(ValueError, match="ipv4_prefix must be between 1 and 32, got 0"):
        ClientIP(0, None, ipv4_prefix=0)
    limiter = KeyedLimiter(rate=1.0, max_keys=8)
    with pytest.raises(ValueError, match="apply to the default key"):
        RateLimitMiddleware(hello, limiter, key=lambda s: "k", trusted_proxies=1, proxy_networks="*")
    with pytest.raises(ValueError, match="no_peer must be 'shared'.*or 'open'.*got 'closed'"):
        RateLimitMiddleware(hello, limiter, no_peer="closed")


@pytest.mark.parametrize("bad_key", [
    pytest.param(lambda scope: 1 / 0, id="raises"),
    pytest.param(lambda scope: {"a": 1}, id="a dict"),
    pytest.param(lambda scope: 1 << 70, id="a huge int"),
])
def test_failing_key_function_falls_back_to_the_client_address(client, bad_key):
    limiter = KeyedLimiter(rate=1.0, capacity=2, max_keys=16, clock=FakeClock())
    mw = RateLimitMiddleware(hello, limiter, key=bad_key)
    with serve(mw) as url:
        assert statuses(client.get(url) for _ in range(3)) == [200, 200, 429]
    assert limiter.wait_time("127.0.0.1") > 0                  # the peer's bucket was charged
    assert mw.metrics().admitted == 2 and mw.metrics().rejected == 1


# -- item 6: UNIX sockets ------------------------------------------------------------------------------


@pytest.fixture
def uds_path():
    if not hasattr(socket, "AF_UNIX"):
        pytest.skip("no UNIX sockets here")
    with tempfile.TemporaryDirectory() as d:
        yield os.path.join(d, "app.sock")


def test_unix_socket_peer_warns_once_and_lets_the_user_choose(uds_path, caplog):
    clock = FakeClock()
    transport = httpx.HTTPTransport(uds=uds_path)

    def limiter():
        return KeyedLimiter(rate=1.0, capacity=1, max_keys=64, clock=clock)

    with caplog.at_level(logging.WARNING, logger="buttress.asgi"):
        with serve(RateLimitMiddleware(hello, limiter()), uds=uds_path) as url, \
                httpx.Client(transport=transport, timeout=TIMEOUT) as c:
            assert statuses(c.get(url) for _ in range(3)) == [200, 429, 429]     # "shared": one bucket
        warned = [r.getMessage() for r in caplog.records if "without a client address" in r.getMessage()]
        assert len(warned) == 1 and "no_peer='shared'" in warned[0]
    os.unlink(uds_path)
    with serve(RateLimitMiddleware(hello, limiter(), no_peer="open"), uds=uds_path) as url, \
            httpx.Client(transport=httpx.HTTPTransport(uds=uds_path), timeout=TIMEOUT) as c:
        assert statuses(c.get(url) for _ in range(3)) == [200, 200, 200]     # "open": not limited
    os.unlink(uds_path)
    # behind a proxy on the socket: list it as "unix" and its X-Forwarded-For entries are the clients
    mw = RateLimitMiddleware(hello, limiter(), trusted_proxies=1, proxy_networks="unix")
    with serve(mw, uds=uds_path) as url, \
            httpx.Client(transport=httpx.HTTPTransport(uds=uds_path), timeout=TIMEOUT) as c:
        rs = [c.get(url, headers={"X-Forwarded-For": ip}) for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.1")]
        assert statuses(rs) == [200, 200, 429]
    os.unlink(uds_path)
    with serve(RateLimitMiddleware(hello, limiter(), key=lambda s: s["headers"][0][1]), uds=uds_path) as url, \
            httpx.Client(transport=httpx.HTTPTransport(uds=uds_path), timeout=TIMEOUT) as c:
        assert c.get(url).status_code == 200                  # a key function of the user's choosing


# -- items 8, 9: RateLimit-Policy ----------------------------------------------------------------------


def test_ratelimit_policy_advertises_the_sustained_rate_and_the_burst(client):
    clock = FakeClock()
    limiter = KeyedLimiter(rate=50.0, capacity=10, max_keys=64, clock=clock)
    with serve(RateLimitMiddleware(hello, limiter)) as url:
        r = client.get(url)
        assert r.headers["ratelimit-policy"] == '"default";q=50;w=1;burst=10'
        # a client pacing itself by the policy (q per w, evenly) is always admitted: q is not a fifth of it
        admitted = 0
        for _ in range(100):
            clock.advance(1 / 50)
            admitted += client.get(url).status_code == 200
        assert admitted == 100
        # and the burst is what it may send at once
        clock.advance(1.0)
        assert statuses(client.get(url) for _ in range(11)) == [200] * 10 + [429]


@pytest.mark.parametrize("rate, capacity, header", [
    (2.5, 1, '"p";q=5;w=2;burst=1'),          # 2 per 1 s would lose a fifth; 5 per 2 s is exact
    (0.5, 3, '"p";q=3;w=6;burst=3'),
    (1000.0, 1, '"p";q=1000;w=1;burst=1'),
    (10.0, 20, '"p";q=20;w=2;burst=20'),
    (0.7, 1, '"p";q=7;w=10;burst=1'),
])
def test_ratelimit_policy_values(rate, capacity, header):
    mw = RateLimitMiddleware(hello, TokenBucket(rate=rate, capacity=capacity), policy="p")
    assert mw.policy_header.decode() == header


@pytest.mark.parametrize("policy", ["a\r\nSet-Cookie: x=1", "a\nb", "tab\there", "caf\u00e9", "", "x" * 65, 'a"b',
                                    "a\\b", "nul\x00", "del\x7f"])
def test_policy_name_must_be_printable_ascii(policy):
    with pytest.raises(ValueError, match="policy must be a non-empty str of at most 64 printable ASCII"):
        RateLimitMiddleware(hello, KeyedLimiter(rate=1.0, max_keys=8), policy=policy)


def test_policy_name_type_and_a_valid_one_over_the_wire(client):
    with pytest.raises(TypeError, match="policy must be a str, got b'api'"):
        RateLimitMiddleware(hello, KeyedLimiter(rate=1.0, max_keys=8), policy=b"api")
    limiter = KeyedLimiter(rate=1.0, capacity=1, max_keys=8, clock=FakeClock())
    with serve(RateLimitMiddleware(hello, limiter, policy="api v1 (per IP)")) as url:
        r = client.get(url)
        assert r.headers["ratelimit"] == '"api v1 (per IP)";r=0;t=1'


# -- item 7: 429 counters ------------------------------------------------------------------------------


def test_429_counters_exported_to_prometheus(client):
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from buttress.prometheus import ButtressCollector

    reg = Registry()
    clock = FakeClock()
    limiter = reg.keyed_limiter("clients-table", rate=1.0, capacity=2, max_keys=64, clock=clock)
    mw = RateLimitMiddleware(hello, limiter, name="clients", registry=reg)
    prom = prometheus_client.CollectorRegistry()
    prom.register(ButtressCollector(reg))
    with serve(mw) as url:
        assert statuses(client.get(url) for _ in range(5)) == [200, 200, 429, 429, 429]

    def scrape():
        text = prometheus_client.generate_latest(prom).decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    m = scrape()
    calls = "buttress_ratelimiter_calls_total"
    assert m[(calls, (("kind", "admitted"), ("name", "clients")))] == 2.0
    assert m[(calls, (("kind", "rejected"), ("name", "clients")))] == 3.0
    assert m[("buttress_ratelimiter_keys", (("name", "clients-table"),))] == 1.0
    # the KeyedLimiter counts the same decisions under its own name
    assert m[(calls, (("kind", "admitted"), ("name", "clients-table")))] == 2.0
    assert m[(calls, (("kind", "rejected"), ("name", "clients-table")))] == 3.0
    # a middleware named like its own limiter leaves the export to the limiter (no duplicate series)
    same = RateLimitMiddleware(hello, limiter, name="clients-table", registry=reg)
    assert same.name == "clients-table" and reg.get("rate_limiter", "clients-table") is None
    # the app is rebuilt (Starlette builds its middleware stack again): the new middleware takes the name
    mw2 = RateLimitMiddleware(hello, limiter, name="clients", registry=reg)
    assert reg.get("rate_limiter", "clients") is mw2
    assert scrape()[(calls, (("kind", "admitted"), ("name", "clients")))] == 0.0
    # a TokenBucket already exports calls under its own name: the middleware may not take it too
    reg.token_bucket("api", rate=1.0)
    with pytest.raises(ValueError, match="name 'api' is taken by token_bucket"):
        RateLimitMiddleware(hello, limiter, name="api", registry=reg)
    with pytest.raises(ValueError, match="name must be a non-empty str"):
        RateLimitMiddleware(hello, limiter, name="", registry=reg)


def test_429_counters_without_a_registry_of_your_own(client):
    prometheus_client = pytest.importorskip("prometheus_client")
    from buttress.prometheus import ButtressCollector
    from buttress.registry import default_registry

    mw = RateLimitMiddleware(hello, KeyedLimiter(rate=1.0, capacity=1, max_keys=8, clock=FakeClock()),
                             name="test-asgi-edge")
    try:
        prom = prometheus_client.CollectorRegistry()
        prom.register(ButtressCollector())                    # the default registry
        with serve(mw) as url:
            assert statuses(client.get(url) for _ in range(3)) == [200, 429, 429]
        value = prom.get_sample_value("buttress_ratelimiter_calls_total", {"name": "test-asgi-edge",
                                                                           "kind": "rejected"})
        assert value == 2.0
    finally:
        default_registry.remove("rate_limiter", "test-asgi-edge")


def test_metric_cardinality_is_fixed_under_20000_random_paths_and_headers():
    """No per-key, per-path or per-header label: the set of series after 20 000 random requests (random
    paths, forwarded addresses, IPv6 clients, API keys) is the set after the first one."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from buttress.prometheus import ButtressCollector

    reg = Registry()
    rng = random.Random(20)
    by_ip = RateLimitMiddleware(hello, reg.keyed_limiter("ip", rate=1.0, capacity=1, max_keys=4096,
                                                         clock=FakeClock()),
                                trusted_proxies=2, proxy_networks="*", name="ip", registry=reg)
    by_key = RateLimitMiddleware(by_ip, reg.keyed_limiter("key", rate=1.0, capacity=1, max_keys=4096,
                                                          clock=FakeClock()),
                                 key=lambda s: dict(s["headers"]).get(b"x-api-key"), name="key", registry=reg)
    app = LoadSheddingMiddleware(by_key, reg.load_shedder("edge", max_in_flight=10), priority=naive_priority)
    prom = prometheus_client.CollectorRegistry()
    prom.register(ButtressCollector(reg))

    def series():
        return {(s.name, tuple(sorted(s.labels.items())))
                for fam in prom.collect() for s in fam.samples}

    def request():
        r = rng.random
        headers = [(b"x-forwarded-for", f"{rng.getrandbits(32) >> 24}.{rng.randrange(256)}.0.{rng.randrange(256)}, "
                                        f"2001:db8:{rng.getrandbits(16):x}::{rng.getrandbits(16):x}".encode()),
                   (b"x-api-key", os.urandom(8).hex().encode()),
                   (b"x-priority", rng.choice([b"low", b"urgent", b"\xff", os.urandom(4).hex().encode()]))]
        if r() < 0.3:
            headers.append((os.urandom(6).hex().encode(), os.urandom(12)))
        path = "/" + os.urandom(6).hex() + ("/%00\u00e9" if r() < 0.1 else "")
        return call(app, {"path": path, "headers": headers})

    async def run(n):
        return [(await request())[0] for _ in range(n)]

    asyncio.run(run(1))
    before = series()
    codes = asyncio.run(run(19_999))
    assert series() == before
    assert set(codes) <= {200, 429}
    total = sum(mw.metrics().admitted + mw.metrics().rejected for mw in (by_key,))
    assert total == 20_000


def test_counters_are_exact_under_threads():
    """Each thread runs its own event loop against one middleware; admitted + rejected is every request
    and admitted is exactly the bucket (FakeClock never moves)."""
    limiter = TokenBucket(rate=1.0, capacity=100, clock=FakeClock())
    mw = RateLimitMiddleware(hello, limiter, headers=False)
    threads, per_thread = 8, 300
    barrier = threading.Barrier(threads)
    old = sys.getswitchinterval()

    def worker():
        async def go():
            for _ in range(per_thread):
                await call(mw, {})
        barrier.wait()
        asyncio.run(go())

    sys.setswitchinterval(1e-6)
    try:
        ts = [threading.Thread(target=worker) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
    finally:
        sys.setswitchinterval(old)
    m = mw.metrics()
    assert (m.admitted, m.rejected) == (100, threads * per_thread - 100)
    assert limiter.metrics().admitted == 100


# -- load: exact per-client admission through the real server ------------------------------------------


async def _raw_get(reader, writer, request: bytes) -> int:
    """One keep-alive HTTP/1.1 exchange on an open connection: the status code (a small raw client: httpx
    costs ~1 ms a request, which would measure the client, not the server)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def _hammer(url: str, ips: list[str], per_client: int | None = None, duration: float | None = None,
                  connections: int = 2) -> dict[str, list[int]]:
    """Each client (its own X-Forwarded-For address) sends over `connections` keep-alive connections,
    back to back, `per_client` requests in all, or until `duration` seconds have passed (a bound either
    way). Returns {client: [status, ...]}."""
    host, port = url.removeprefix("http://").split(":")
    out: dict[str, list[int]] = {ip: [] for ip in ips}
    deadline = time.monotonic() + (duration if duration is not None else 60.0)
    budget = {ip: per_client if per_client is not None else 1 << 30 for ip in ips}

    async def conn(ip):
        request = (f"GET /load HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-For: {ip}\r\n\r\n").encode()
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while budget[ip] > 0 and time.monotonic() < deadline:
                budget[ip] -= 1
                out[ip].append(await _raw_get(reader, writer, request))
        finally:
            writer.close()

    await asyncio.gather(*(conn(ip) for ip in ips for _ in range(connections)))
    return out


def test_exact_per_client_admission_under_concurrent_load():
    """20 clients x 15 requests per round over 40 concurrent connections, 5 rounds, the clock advanced
    1 s between rounds: each client is admitted exactly capacity, then rate per second: 10 + 4 x 5 = 30,
    and nothing but 200 and 429."""
    clock = FakeClock()
    limiter = KeyedLimiter(rate=5.0, capacity=10, max_keys=1024, clock=clock)
    mw = RateLimitMiddleware(hello, limiter, trusted_proxies=1, proxy_networks=["127.0.0.1"])
    ips = [f"198.51.100.{i}" for i in range(20)]
    admitted = dict.fromkeys(ips, 0)
    with serve(mw) as url:
        for round_ in range(5):
            result = asyncio.run(_hammer(url, ips, per_client=15))
            for ip, codes in result.items():
                assert len(codes) == 15 and set(codes) <= {200, 429}, codes
                assert codes.count(200) == (10 if round_ == 0 else 5), (round_, ip, codes)
                admitted[ip] += codes.count(200)
            clock.advance(1.0)
    assert set(admitted.values()) == {30}
    assert mw.metrics().admitted == 600 and mw.metrics().rejected == 20 * 15 * 5 - 600


def test_load_on_the_real_clock_never_admits_above_the_bound():
    """3 s of 20 clients as fast as the server goes: per client, admitted <= capacity + floor(D * rate)
    over the span D that contains every request (an upper bound: being slow cannot fail it)."""
    rate, capacity = 50.0, 10                               # the 50/s with burst 10
    limiter = KeyedLimiter(rate=rate, capacity=capacity, max_keys=1024)
    mw = RateLimitMiddleware(hello, limiter, trusted_proxies=1, proxy_networks=["127.0.0.1"])
    ips = [f"198.51.100.{i}" for i in range(20)]
    with serve(mw) as url:
        start = time.monotonic()
        result = asyncio.run(_hammer(url, ips, duration=3.0))
        span = time.monotonic() - start
    bound = capacity + int(span * rate)
    admitted = sorted(codes.count(200) for codes in result.values())
    sent = sum(len(codes) for codes in result.values())
    print(f"\nload: {sent} requests in {span:.2f} s ({sent / span:.0f}/s, {sent / span / len(ips):.0f}/s per "
          f"client); admitted per client {admitted[0]}..{admitted[-1]} ({admitted[-1] / span:.1f}/s) against "
          f"the bound {bound} (capacity {capacity} + {rate:g}/s x {span:.2f} s)")
    assert all(set(codes) <= {200, 429} for codes in result.values())
    assert admitted[-1] <= bound
    assert mw.metrics().admitted == sum(admitted) and mw.metrics().rejected == sent - sum(admitted)
