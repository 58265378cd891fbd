"""Pure ASGI middleware: per-client rate limiting, priority load shedding, health endpoints, graceful
shutdown.

Plain ASGI 3 callables (``await mw(scope, receive, send)``), so they wrap any ASGI app (Starlette,
FastAPI, Django, Litestar, a bare function) without Starlette's BaseHTTPMiddleware and without any
extra dependency. Only ``http`` scopes are acted on; ``websocket`` passes through, and so does
``lifespan``, which LoadSheddingMiddleware (its shedder's sampler) and ShutdownMiddleware (the drain) watch.

Rate-limit headers follow draft-ietf-httpapi-ratelimit-headers-09/-10 (structured fields)::

    RateLimit-Policy: "default";q=50;w=1;burst=10   # q units per window of w seconds, at most burst at once
    RateLimit: "default";r=7;t=1                    # r units left now; t seconds until the bucket is full

and a 429 also carries ``Retry-After`` (whole seconds, rounded up, at least 1).

Nothing a client sends can make these middleware answer 500: a priority or key that cannot be
computed falls back to the default (logged once), X-Forwarded-For is read only from listed proxies
and only as far as `trusted_proxies` entries from the right. See docs/asgi.md, "Deploying safely".
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import ipaddress
import itertools
import logging
import math
import threading
from typing import Any, Awaitable, Callable, Iterable, MutableMapping

from ._params import MAX_SECONDS, NS, check_bool, check_int, check_seconds, count_of, emission_interval_ns, show
from .errors import Overloaded

__all__ = ["RateLimitMiddleware", "LoadSheddingMiddleware", "HealthEndpoints", "ShutdownMiddleware", "ClientIP",
           "client_ip"]

log = logging.getLogger("buttress.asgi")

# as Starlette (and the ASGI spec's typing) has them: an app declared over MutableMapping is an ASGIApp here
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_XFF = b"x-forwarded-for"
_MAX_ADDRESS = 64          # longer than any textual IP address (with port and zone): not one, never cached
_NO_PEER = ("shared", "open")

def _check_app(app: object, allow_none: bool = False) -> Any:
    if app is None and allow_none:
        return None
    if not callable(app):
        raise TypeError(f"app must be an ASGI application (callable), got {app!r}")
    return app


def _retry_after(seconds: Any, default: int = 1) -> int:
    """Whole seconds for Retry-After: rounded up, at least 1, at most MAX_SECONDS; a value that is not a
    finite number (a custom shedder's None, NaN, inf, a str) gives `default`."""
    try:
        s = float(seconds)
    except (TypeError, ValueError, OverflowError):
        return max(1, default)
    if not math.isfinite(s):
        return max(1, default)
    return int(min(MAX_SECONDS, max(1, math.ceil(s))))


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]],
                   content_type: bytes = b"text/plain; charset=utf-8", head: bool = False) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": b"" if head else body})


class _Once:
    """A logger that says each thing once per middleware (a hostile client must not flood the log)."""

    __slots__ = ("said",)

    def __init__(self) -> None:
        self.said: set[str] = set()

    def warning(self, what: str, message: str, *args: Any, exc_info: Any = None) -> None:
        if what not in self.said:
            self.said.add(what)
            log.warning(message, *args, exc_info=exc_info)


# -- client identity -----------------------------------------------------------------------------------

def _networks(spec: object) -> tuple[tuple[Any, ...], bool, bool]:
    """proxy_networks -> (ip networks, any peer, UNIX-socket peers)."""
    if spec is None:
        return (), False, False
    items = spec.split(",") if isinstance(spec, str) else spec
    try:
        items = list(items)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"proxy_networks must be addresses or networks (str, list of str or ipaddress "
                        f"objects), '*' or 'unix', got {show(spec)}") from None
    nets: list[Any] = []
    any_peer = unix = False
    for item in items:
        if isinstance(item, str) and item.strip() in ("*", "unix"):
            any_peer |= item.strip() == "*"
            unix |= item.strip() == "unix"
            continue
        try:
            if isinstance(item, str):
                item = item.strip()
            net = ipaddress.ip_network(item)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"proxy_networks must hold IP addresses or networks (e.g. '10.0.0.0/8', "
                             f"'::1'), '*' or 'unix', got {show(item)} ({exc})") from None
        if net.version == 6 and net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
            net = ipaddress.ip_network((net.network_address.ipv4_mapped, net.prefixlen - 96))
        nets.append(net)
    if not nets and not any_peer and not unix:
        raise ValueError(f"proxy_networks must name at least one proxy address or network, got {show(spec)}")
    return tuple(nets), any_peer, unix


def _host(text: str) -> str:
    """'1.2.3.4:80' -> '1.2.3.4', '[2001:db8::1]:443' -> '2001:db8::1', a bare IPv6 address as it is
    (Azure Application Gateway and some load balancers write the client's port into X-Forwarded-For)."""
    if text.startswith("["):
        end = text.find("]")
        if end > 0 and (end + 1 == len(text) or text[end + 1] == ":"):
            return text[1:end]
        return text
    if text.count(":") == 1:
        return text.split(":", 1)[0]
    return text


class ClientIP:
    """The client address of an HTTP scope as a rate-limit key: ``ClientIP(...)(scope) -> str | None``.

    - ``trusted_proxies``: how many proxies in front of the app append to X-Forwarded-For. With 0
      the header is ignored and the socket peer is the client.
    - ``proxy_networks``: who those proxies are (required with ``trusted_proxies``): addresses or
      networks ("10.0.0.0/8", "::1", ipaddress objects, or one comma-separated str), "unix" for
      peers on a UNIX socket (no address), "*" for any peer. X-Forwarded-For is read only when the
      socket peer is one of them; then at most the last ``trusted_proxies`` entries are parsed, right
      to left, stepping over entries that are themselves listed proxies: the first other address is
      the client (as uvicorn's ``forwarded_allow_ips``). An entry that is not an IP address stops the
      walk at the nearest address to its right (never a key the client wrote).
    - Addresses are normalised with ``ipaddress`` (ports stripped: ``1.2.3.4:80``, ``[v6]:443``;
      IPv4-mapped IPv6 as IPv4), and grouped by ``ipv4_prefix`` / ``ipv6_prefix`` bits: with
      ``ipv6_prefix=64`` the key is ``"2001:db8:1:2::/64"`` for every address of that /64.
    - None when the server gives no peer address (a UNIX socket) and no proxy entry applies; a peer
      that is not an IP address (a test client's name) is returned as the server gave it.
    """

    def __init__(self, trusted_proxies: int = 0, proxy_networks: Any = None, ipv4_prefix: int = 32,
                 ipv6_prefix: int = 128) -> None:
        self.trusted_proxies = check_int("trusted_proxies", trusted_proxies, minimum=0, maximum=64)
        self.ipv4_prefix = check_int("ipv4_prefix", ipv4_prefix, minimum=1, maximum=32)
        self.ipv6_prefix = check_int("ipv6_prefix", ipv6_prefix, minimum=1, maximum=128)
        nets, self._any, self._unix = _networks(proxy_networks)
        if self.trusted_proxies and proxy_networks is None:
            raise ValueError(f"trusted_proxies={self.trusted_proxies} needs proxy_networks: the addresses or "
                             f"networks of those proxies (e.g. ['10.0.0.0/8'], 'unix' for a UNIX socket, '*' "
                             f"for any peer), so that a client connecting directly cannot choose its key")
        if proxy_networks is not None and not self.trusted_proxies:
            raise ValueError(f"proxy_networks={show(proxy_networks)} needs trusted_proxies >= 1 (how many proxies "
                             f"append to X-Forwarded-For); with trusted_proxies=0 the header is never read")
        self.proxy_networks: tuple[Any, ...] = (*nets, *(("unix",) if self._unix else ()),
                                                *(("*",) if self._any else ()))
        self._nets4 = tuple(n for n in nets if n.version == 4)
        self._nets6 = tuple(n for n in nets if n.version == 6)
        self._parse = functools.lru_cache(maxsize=8192)(self._parse_uncached)

    def _parse_uncached(self, raw: str | bytes) -> tuple[str | None, bool]:
        """One address as written (peer or X-Forwarded-For entry) -> (key or None, is a listed proxy)."""
        text = (raw.decode("latin-1") if isinstance(raw, bytes) else raw).strip()
        host = _host(text).split("%", 1)[0]
        try:
            addr: Any = ipaddress.ip_address(host)
        except ValueError:
            return None, False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if addr.version == 4:
            trusted = self._any or any(addr in n for n in self._nets4)
            prefix, full = self.ipv4_prefix, 32
        else:
            trusted = self._any or any(addr in n for n in self._nets6)
            prefix, full = self.ipv6_prefix, 128
        key = str(addr) if prefix == full else str(ipaddress.ip_network((addr, prefix), strict=False))
        return key, trusted

    def __call__(self, scope: Scope) -> str | None:
        client = scope.get("client")
        if client:
            host = client[0]
            key, trusted = self._parse(host) if type(host) is str and len(host) <= _MAX_ADDRESS else (None, False)
            if key is None:                  # not an IP address: the server's word, as it is
                key = str(host) if host else None
                trusted = self._any
        else:                                # no peer address: a UNIX socket (or a server that does not say)
            key, trusted = None, self._unix or self._any
        n = self.trusted_proxies
        if not n or not trusted:
            return key
        values = [v for k, v in scope.get("headers", ()) if len(k) == 15 and k.lower() == _XFF]
        for value in reversed(values):       # later header lines were appended later: read them first
            parts = value.rsplit(b",", n)    # only the last n entries are split out, whatever the length
            if len(parts) > n:
                del parts[0]                 # the rest of the header: entries no listed proxy vouches for
            for raw in reversed(parts):
                entry, trusted = self._parse(raw) if len(raw) <= _MAX_ADDRESS else (None, False)
                if entry is None:
                    return key
                key = entry
                n -= 1
                if not trusted or not n:
                    return key
        return key


@functools.lru_cache(maxsize=64)
def _client_ip_of(trusted_proxies: int, proxy_networks: Any, ipv4_prefix: int, ipv6_prefix: int) -> ClientIP:
    return ClientIP(trusted_proxies, proxy_networks, ipv4_prefix, ipv6_prefix)


def client_ip(scope: Scope, trusted_proxies: int = 0, *, proxy_networks: Any = None, ipv4_prefix: int = 32,
              ipv6_prefix: int = 128) -> str | None:
    """The client address of an HTTP scope (see `ClientIP`, which a middleware should hold instead:
    it parses its networks once). With ``trusted_proxies=0`` it is the socket peer, normalised."""
    if proxy_networks is not None and not isinstance(proxy_networks, str):
        try:
            proxy_networks = tuple(proxy_networks)
            hash(proxy_networks)
        except TypeError:
            return ClientIP(trusted_proxies, proxy_networks, ipv4_prefix, ipv6_prefix)(scope)
    return _client_ip_of(trusted_proxies, proxy_networks, ipv4_prefix, ipv6_prefix)(scope)


# -- rate limiting -------------------------------------------------------------------------------------

def _check_policy(policy: object) -> str:
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a str, got {show(policy)} ({type(policy).__name__})")
    if not (0 < len(policy) <= 64 and policy.isascii() and policy.isprintable()) or '"' in policy or "\\" in policy:
        raise ValueError(f"policy must be a non-empty str of at most 64 printable ASCII characters without "
                         f"quotes or backslashes (it is sent in the RateLimit headers), got {show(policy)}")
    return policy


def _sustained(rate: float, capacity: int, interval_ns: int) -> tuple[int, int]:
    """(q, w): the quota a client pacing itself evenly gets per window of w whole seconds. w is at least
    the time to refill the bucket (so q >= capacity), lengthened (base + 0..9 s, or base x 1..10) where
    that makes rate * w a whole number (2.5/s -> 5 per 2 s, not 2 per 1 s), else to the candidate
    that loses least; q = floor(rate * w) never promises more than the configured rate."""
    base = max(1, -(-capacity * interval_ns // NS))
    best_q, best_w = 0, base
    for w in sorted({*range(base, base + 10), *range(base, 10 * base + 1, base)}):
        exact = rate * w
        if abs(exact - round(exact)) <= 1e-9 * exact:
            return max(1, round(exact)), w
        q = math.floor(exact)
        if q * best_w > best_q * w:
            best_q, best_w = q, w
    return max(1, best_q), best_w


class RateLimitMiddleware:
    """Per-key rate limiting: 429 with Retry-After and RateLimit headers when a key is over its limit.

    `limiter` is a `buttress.KeyedLimiter` (one bucket per key) or a `buttress.TokenBucket` (one
    bucket for the whole app). `key(scope)` returns the key (str, int or bytes), or None to let the
    request through unlimited; by default the key is the client address (a `ClientIP` built from
    `trusted_proxies`, `proxy_networks`, `ipv4_prefix`, `ipv6_prefix`). A key function that raises or
    returns something the limiter cannot take falls back to the client address (logged once).
    `no_peer`: what the default key does when the server gives no peer address (a UNIX socket) and no
    proxy entry applies: "shared" (one bucket for every such request) or "open" (not limited); either
    is logged once. `headers=False` leaves admitted responses untouched (429s always carry the headers).
    `metrics()` counts decisions (admitted, rejected = 429s); with `name` the middleware registers
    itself as a "rate_limiter" in `registry` (the default registry when None), so the Prometheus
    collector exports ``buttress_ratelimiter_calls_total{name=..., kind="admitted"|"rejected"}``.
    """

    def __init__(self, app: ASGIApp, limiter: Any, key: Callable[[Scope], Any] | None = None,
                 trusted_proxies: int = 0, policy: str = "default", headers: bool = True, *,
                 proxy_networks: Any = None, ipv4_prefix: int = 32, ipv6_prefix: int = 64,
                 no_peer: str = "shared", name: str | None = None, registry: Any = None) -> None:
        from .rate_limit import KeyedLimiter, TokenBucket
        self.app: ASGIApp = _check_app(app)
        if not isinstance(limiter, (KeyedLimiter, TokenBucket)):
            raise TypeError(f"limiter must be a buttress.KeyedLimiter or buttress.TokenBucket, got {limiter!r}")
        if key is not None and not callable(key):
            raise TypeError(f"key must be a callable(scope) -> key or None, got {key!r}")
        if key is not None and (trusted_proxies or proxy_networks is not None):
            raise ValueError("trusted_proxies and proxy_networks apply to the default key (the client address); "
                             "with key= given, read the address in the key function (e.g. with ClientIP)")
        if no_peer not in _NO_PEER:
            raise ValueError(f"no_peer must be 'shared' (one bucket for requests without a peer address) or "
                             f"'open' (not limited), got {show(no_peer)}")
        self.policy = _check_policy(policy)
        self.limiter: Any = limiter
        self.keyed = isinstance(limiter, KeyedLimiter)
        self.key = key
        self.client_ip = ClientIP(trusted_proxies, proxy_networks, ipv4_prefix, ipv6_prefix)
        self.trusted_proxies = self.client_ip.trusted_proxies
        self.no_peer = no_peer
        self.headers = check_bool("headers", headers)
        self._interval_ns = emission_interval_ns(limiter.rate, limiter.capacity)[2]
        self._tau_ns = self._interval_ns * limiter.capacity
        q, w = _sustained(limiter.rate, limiter.capacity, self._interval_ns)
        # the sustained quota (what an evenly paced client gets) and the burst (what it may send at once)
        self.policy_header = f'"{policy}";q={q};w={w};burst={limiter.capacity}'.encode()
        self._admitted = itertools.count()
        self._rejected = itertools.count()
        self._once = _Once()
        self.name = None if name is None else self._register(name, registry)

    # -- metrics -------------------------------------------------------------------------------------
    def metrics(self) -> Any:
        """Decisions since creation: admitted and rejected (429) requests; unlimited ones (key None) are
        not counted."""
        from .rate_limit import RateLimitMetrics
        return RateLimitMetrics(count_of(self._admitted), count_of(self._rejected))

    def _register(self, name: object, registry: Any) -> str:
        if not isinstance(name, str) or not name:
            raise (TypeError if not isinstance(name, str) else ValueError)(
                f"name must be a non-empty str or None, got {show(name)}")
        if registry is None:
            from .registry import default_registry as registry
        if not callable(getattr(registry, "register", None)):
            raise TypeError(f"registry must be a buttress.Registry or None, got {show(registry)}")
        for kind in ("token_bucket", "rate_limiter", "keyed_limiter"):
            held = registry.get(kind, name)
            if held is not None and held is self.limiter:
                # the middleware's own limiter, of the same name, already exports these decisions
                return name
            if held is not None and held is not self and not isinstance(held, RateLimitMiddleware):
                raise ValueError(f"name {name!r} is taken by {kind} {held!r}, which exports "
                                 f"buttress_ratelimiter_calls_total{{name={name!r}}} itself; choose another name")
        held = registry.get("rate_limiter", name)
        if isinstance(held, RateLimitMiddleware) and held is not self:
            registry.remove("rate_limiter", name)      # the app was rebuilt: the newest middleware reports
        registry.register(name, self, kind="rate_limiter")
        return name

    # -- the key ---------------------------------------------------------------------------------------
    def _default_key(self, scope: Scope) -> Any:
        ip = self.client_ip(scope)
        return self._no_peer_key() if ip is None else ip

    def _no_peer_key(self) -> Any:
        self._once.warning("no_peer", "buttress.asgi.RateLimitMiddleware: a request without a client address "
                           "(a UNIX socket?); no_peer=%r: %s. Pass no_peer='shared' or 'open', trusted_proxies "
                           "with proxy_networks=['unix'] behind a proxy, or key=.", self.no_peer,
                           "every such request shares one bucket" if self.no_peer == "shared" else "not limited")
        return "unknown" if self.no_peer == "shared" else None

    def _key_failed(self, scope: Scope, exc: BaseException) -> Any:
        self._once.warning("key", "buttress.asgi.RateLimitMiddleware: the key function failed (%s: %s); "
                           "such requests are keyed by client address", type(exc).__name__, exc,
                           exc_info=exc)
        return self._default_key(scope)

    # -- the limiter, keyed or not ---------------------------------------------------------------------
    def _wait(self, key: Any, n: int) -> float:
        return float(self.limiter.wait_time(key, n) if self.keyed else self.limiter.wait_time(n))

    def _rate_headers(self, key: Any, rejected: bool = False) -> list[tuple[bytes, bytes]]:
        # GCRA: the wait until the bucket is full, F ns, says everything: r = (capacity * I - F) // I
        # tokens are available now (I = the emission interval), and the quota is whole again in F.
        full = self._wait(key, self.limiter.capacity)
        full_ns = math.ceil(full * NS)
        r = 0 if rejected else max(0, (self._tau_ns - full_ns) // self._interval_ns)
        return [(b"ratelimit-policy", self.policy_header),
                (b"ratelimit", f'"{self.policy}";r={r};t={math.ceil(full)}'.encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key is None:
            key = self.client_ip(scope)
            if key is None:
                key = self._no_peer_key()
        else:
            try:
                key = self.key(scope)
            except Exception as exc:  # noqa: BLE001 - a hostile request must not turn into a 500
                key = self._key_failed(scope, exc)
        if key is None:
            return await self.app(scope, receive, send)
        if self.keyed:
            try:
                admitted = self.limiter.try_acquire(key)
            except (TypeError, ValueError) as exc:     # a key the limiter cannot take (a dict, a huge int)
                key = self._key_failed(scope, exc)
                if key is None:
                    return await self.app(scope, receive, send)
                admitted = self.limiter.try_acquire(key)
        else:
            admitted = self.limiter.try_acquire(1)
        if not admitted:
            next(self._rejected)
            retry_after = _retry_after(self._wait(key, 1))
            headers = [(b"retry-after", str(retry_after).encode()), *self._rate_headers(key, rejected=True)]
            return await _respond(send, 429, b"rate limit exceeded\n", headers,
                                  head=scope.get("method") == "HEAD")
        next(self._admitted)
        if not self.headers:
            return await self.app(scope, receive, send)
        extra = self._rate_headers(key)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- load shedding -------------------------------------------------------------------------------------

class _Samplers:
    """Who asked each shedder's sampler to run: middlewares sharing one shedder start one sampler, and the
    last of them to shut down stops it -- only if a middleware started it (a sampler the application
    started itself is left running)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[int, list[Any]] = {}      # id(shedder) -> [shedder, users, started by us]

    def acquire(self, shedder: Any) -> None:
        start = getattr(shedder, "start", None)
        if not callable(start):
            return                                  # a custom shedder without a sampler
        with self._lock:
            entry = self._users.get(id(shedder))
            if entry is None:
                before = _is_sampling(shedder)
                start()                             # inside the running loop: a timer on it (LoopLag needs it)
                after = _is_sampling(shedder)
                entry = self._users[id(shedder)] = [shedder, 0, before is not True and after is not False]
            entry[1] += 1

    def release(self, shedder: Any) -> None:
        with self._lock:
            entry = self._users.get(id(shedder))
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._users[id(shedder)]
        if entry[2]:
            try:
                shedder.stop()
            except RuntimeError as exc:     # a custom shedder whose timer's loop is closed already
                log.debug("buttress.asgi: stopping the shedder's sampler: %s", exc)


_SAMPLERS = _Samplers()


def _is_sampling(shedder: Any) -> bool | None:
    """Whether the shedder's sampler runs now (None: a custom shedder that does not say)."""
    sampling = getattr(shedder, "is_sampling", None)
    return sampling if isinstance(sampling, bool) else None


def _signal_reason(exc: BaseException) -> bytes | None:
    """The names of the signals that shed a request (b'loop_lag, cpu', from `Overloaded.signals`); None
    for a refusal by in-flight count or a drain. The measured values stay in the logs and metrics, not in
    a response a client reads."""
    names = [n for n in getattr(exc, "signals", ()) if isinstance(n, str) and n.isascii() and n.isprintable()]
    return ", ".join(names).encode() if names else None


class LoadSheddingMiddleware:
    """Admit requests through a `buttress.LoadShedder` by priority; a shed request gets 503 with
    Retry-After (the shedder's `retry_after`, else `retry_after` seconds).

    `priority` is a `buttress.Priority` for every request or a callable(scope) -> Priority (e.g. from
    the route, or from an identity your authentication set); None uses the shedder's
    `default_priority` (MEDIUM unless set). A callable that raises, or returns None or a value the
    shedder does not accept (``"urgent"``, 7), gives the shedder's `default_priority` (logged once):
    never a 500. The request holds its slot until the response is sent.
    Do not take the priority from a header the client can set: see docs/asgi.md, "Deploying safely".

    Overload signals (`LoopLag`, `CpuUsage`, `QueueDepth`): the shedder's sampler is started inside the
    server's running event loop on lifespan startup and stopped on lifespan shutdown; a server without
    the lifespan protocol starts it on the first request (once). Middlewares sharing one shedder start
    one sampler. A request shed by a signal gets 503 ``overloaded (loop_lag)`` (the signals' names)
    with Retry-After: the sample interval, rounded up to whole seconds.
    """

    def __init__(self, app: ASGIApp, shedder: Any, priority: Any = None, retry_after: int = 1) -> None:
        self.app: ASGIApp = _check_app(app)
        if not callable(getattr(shedder, "admit", None)):
            raise TypeError(f"shedder must be a buttress.LoadShedder (with .admit(priority)), got {shedder!r}")
        self.shedder = shedder
        if priority is not None and not callable(priority) or isinstance(priority, int):
            from .shedding import LoadShedder, Priority
            if isinstance(shedder, LoadShedder) and (isinstance(priority, bool) or
                                                     priority not in Priority._value2member_map_):
                raise TypeError(f"priority must be a buttress.Priority, a callable(scope) -> Priority or None, "
                                f"got {show(priority)}")
            fixed = priority
            self.priority: Callable[[Scope], Any] = lambda scope: fixed
        else:
            # None: the shedder's own default_priority; else callable(scope)
            self.priority = priority if priority is not None else (lambda scope: None)
        self.retry_after = check_int("retry_after", retry_after, minimum=1)
        self._once = _Once()
        # Without a lifespan startup (the server runs none) requests start the sampler: `_lazy` stays True and
        # each request compares its loop with the one the sampler was started in (`_loop`), so a server
        # started again on a new loop (the old loop closed: its timer is gone) gets a new sampler, never a
        # level frozen at the old loop's last sample. A lifespan startup sets `_lazy` False: no per-request cost.
        self._lazy = True
        self._loop: Any = None
        self._sampling = False      # this middleware counts as one user of the shedder's sampler
        self._sampling_lock = threading.Lock()

    def _start_sampling(self, when: str, lazy: bool = False) -> None:
        with self._sampling_lock:
            loop = asyncio.get_running_loop()
            if not lazy:
                self._lazy = False
            if self._sampling and loop is self._loop:
                return                                      # started in this loop already
            self._release()                                 # started in another loop, which has ended
            self._loop = loop
            try:
                _SAMPLERS.acquire(self.shedder)
            except Exception as exc:  # noqa: BLE001 - shedding by in-flight count still works without signals
                self._once.warning("start", "buttress.asgi.LoadSheddingMiddleware: the shedder's sampler did not "
                                   "start on %s (%s: %s); overload signals are not sampled", when,
                                   type(exc).__name__, exc, exc_info=exc)
                return
            self._sampling = True

    def _stop_sampling(self) -> None:
        with self._sampling_lock:
            self._lazy, self._loop = True, None             # a later server without lifespan starts it again
            self._release()

    def _release(self) -> None:
        if self._sampling:
            self._sampling = False
            _SAMPLERS.release(self.shedder)

    def _admission(self, scope: Scope) -> Any:
        try:
            priority = self.priority(scope)
        except Exception as exc:  # noqa: BLE001 - a hostile header must not turn into a 500
            self._once.warning("priority", "buttress.asgi.LoadSheddingMiddleware: the priority function failed "
                               "(%s: %s); such requests get the shedder's default priority",
                               type(exc).__name__, exc, exc_info=exc)
            return self.shedder.admit(None)
        if priority is None:
            return self.shedder.admit(None)
        try:
            return self.shedder.admit(priority)
        except (TypeError, ValueError, KeyError) as exc:
            self._once.warning("value", "buttress.asgi.LoadSheddingMiddleware: priority %s is not one the shedder "
                               "takes (%s); such requests get the shedder's default priority", show(priority), exc)
            return self.shedder.admit(None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                return await self._lifespan(scope, receive, send)
            return await self.app(scope, receive, send)
        if self._lazy and asyncio.get_running_loop() is not self._loop:
            self._start_sampling("the first request (no lifespan startup)", lazy=True)
        admission = self._admission(scope)
        try:
            admission.__enter__()
        except Overloaded as exc:
            headers = [(b"retry-after", str(_retry_after(exc.retry_after, self.retry_after)).encode())]
            reason = _signal_reason(exc)
            body = b"overloaded\n" if reason is None else b"overloaded (" + reason + b")\n"
            return await _respond(send, 503, body, headers, head=scope.get("method") == "HEAD")
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            if not admission.__exit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            admission.__exit__(None, None, None)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = []

        async def hooked() -> Message:
            message = await receive()
            kind = message.get("type")
            received.append(kind)
            if kind == "lifespan.startup":
                self._start_sampling("lifespan startup")
            elif kind == "lifespan.shutdown":
                self._stop_sampling()
            return message

        async def watched(message: Message) -> None:
            if message.get("type") in ("lifespan.startup.failed", "lifespan.shutdown.complete",
                                       "lifespan.shutdown.failed"):
                self._stop_sampling()   # the server stops: so does the timer
            await send(message)

        try:
            try:
                await self.app(scope, hooked, watched)
            except Exception:
                if received:
                    raise
                log.debug("buttress.asgi.LoadSheddingMiddleware: the app has no lifespan protocol; answered here")
            else:
                if received:
                    return              # (an app whose lifespan returns after startup: sampling goes on)
            await _serve_lifespan(hooked, watched)
        except BaseException:
            self._stop_sampling()       # a failed startup, a cancelled lifespan task: no timer left behind
            raise


# -- health endpoints ----------------------------------------------------------------------------------

class HealthEndpoints:
    """Serve a `buttress.health.HealthRegistry` on GET/HEAD `livez`, `readyz` and `startupz` (set one to
    None to not serve it); every other request goes to `app` (404 when `app` is None).

    The body is ``{"status": "up"}`` (the status alone: no check names, errors, durations, counts or
    breaker names) unless `details` allows the whole report: True for every request, or a
    callable(scope) -> bool (or an awaitable bool), e.g. an authenticated operator; an authoriser that
    raises allows nothing. Kubernetes reads only the status code. A probe that fails inside the
    registry answers 503, never 500.

    Put it outermost, so probes are never rate limited or shed, and keep its paths unreachable from
    outside (see docs/health.md, "Deploying safely").
    """

    def __init__(self, app: ASGIApp | None, health: Any, livez: str | None = "/livez",
                 readyz: str | None = "/readyz", startupz: str | None = "/startupz", *,
                 details: bool | Callable[[Scope], Any] = False) -> None:
        self.app: ASGIApp | None = _check_app(app, allow_none=True)
        if not callable(getattr(health, "check", None)):
            raise TypeError(f"health must be a buttress.health.HealthRegistry, got {health!r}")
        if not isinstance(details, bool) and not callable(details):
            raise TypeError(f"details must be a bool or a callable(scope) -> bool (an authoriser), "
                            f"got {show(details)}")
        self.health = health
        self.details = details
        self.routes: dict[str, str] = {}
        for probe, path in (("liveness", livez), ("readiness", readyz), ("startup", startupz)):
            if path is None:
                continue
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"the path for {probe} must be a str starting with '/' or None, got {path!r}")
            self.routes[path] = probe
        self._once = _Once()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            probe = self.routes.get(scope.get("path", ""))
            if probe is not None:
                return await self._serve(probe, scope, send)
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] == "lifespan":
            await _serve_lifespan(receive, send)
        elif scope["type"] == "http":
            await _respond(send, 404, b"not found\n", [])

    async def _allowed(self, scope: Scope) -> bool:
        details = self.details
        if details is True or details is False:
            return details
        try:
            allowed = details(scope)
            if inspect.isawaitable(allowed):
                allowed = await allowed
            return allowed is True or bool(allowed)
        except Exception as exc:  # noqa: BLE001 - a failing authoriser shows nothing, never a 500
            self._once.warning("details", "buttress.asgi.HealthEndpoints: the details authoriser failed (%s); "
                               "such probes get the status only", type(exc).__name__, exc_info=exc)
            return False

    async def _serve(self, probe: str, scope: Scope, send: Send) -> None:
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            return await _respond(send, 405, b"method not allowed\n", [(b"allow", b"GET, HEAD")])
        try:
            report = await self.health.check(probe)
            status, show_all = report.http_status, await self._allowed(scope)
            body = report.to_json(details=show_all).encode()
        except Exception as exc:  # noqa: BLE001 - a probe that cannot be answered is "down", not a 500
            self._once.warning("check", "buttress.asgi.HealthEndpoints: the %s probe failed (%s); answered 503",
                               probe, type(exc).__name__, exc_info=exc)
            status, body = 503, b'{"status": "down"}'
        await _respond(send, status, body, [(b"cache-control", b"no-store")],
                       content_type=b"application/json", head=method == "HEAD")


async def _serve_lifespan(receive: Receive, send: Send) -> None:
    """Answer the lifespan protocol for an app that has none (startup and shutdown complete at once)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# -- graceful shutdown ---------------------------------------------------------------------------------

class ShutdownMiddleware:
    """Graceful shutdown of an ASGI app through a `buttress.lifecycle.Lifecycle` (a new one over the
    default registry when None).

    - Every HTTP request is counted as in-flight work; once the drain began, a new request gets **503**
      ``shutting down`` with Retry-After (the lifecycle's `retry_after`) and ``Connection: close``.
    - Lifespan startup: with `handle_sigterm` (and the server in the main thread, as uvicorn runs),
      SIGTERM starts the drain at once (readiness 503, new requests 503) while the server still
      accepts, waits up to `deadline` seconds for in-flight requests and the lifecycle's objects, then
      hands the signal to the server's own handler (uvicorn then closes its sockets and stops).
    - Lifespan shutdown (however it came: SIGINT, the server's own exit): the same drain, if it has not
      run yet, before the app's own shutdown runs (so its connection pools close after the last call).
      An app without a lifespan protocol gets one answered here.

    Put it inside `HealthEndpoints`, so probes are answered during the drain (readiness "draining",
    liveness up). WebSocket connections pass through uncounted.
    """

    def __init__(self, app: ASGIApp, lifecycle: Any = None, *, deadline: float = 30.0,
                 handle_sigterm: bool = True) -> None:
        from .lifecycle import Lifecycle
        self.app: ASGIApp = _check_app(app)
        if lifecycle is None:
            lifecycle = Lifecycle()
        elif not isinstance(lifecycle, Lifecycle):
            raise TypeError(f"lifecycle must be a buttress.lifecycle.Lifecycle or None, got {show(lifecycle)}")
        self.lifecycle = lifecycle
        self.deadline = check_seconds("deadline", deadline)
        self.handle_sigterm = check_bool("handle_sigterm", handle_sigterm)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            lifecycle = self.lifecycle
            try:
                lifecycle._enter()
            except Overloaded as exc:
                headers = [(b"retry-after", str(_retry_after(exc.retry_after)).encode()), (b"connection", b"close")]
                return await _respond(send, 503, b"shutting down\n", headers, head=scope.get("method") == "HEAD")
            try:
                await self.app(scope, receive, send)
            finally:
                lifecycle._exit()
            return
        if kind == "lifespan":
            return await self._lifespan(scope, receive, send)
        await self.app(scope, receive, send)

    async def _on(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "lifespan.startup" and self.handle_sigterm:
            try:
                self.lifecycle.handle_signals(self.deadline)
            except (ValueError, RuntimeError, OSError) as exc:     # no signals here (a platform without them)
                log.warning("buttress.asgi.ShutdownMiddleware: SIGTERM not handled (%s); the drain runs at "
                            "lifespan shutdown", exc)
        elif kind == "lifespan.shutdown":
            try:
                await self.lifecycle.shutdown_async(self.deadline)
            finally:
                self.lifecycle.restore_signals()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = []

        async def hooked() -> Message:
            message = await receive()
            received.append(message.get("type"))
            await self._on(message)
            return message

        try:
            await self.app(scope, hooked, send)
        except Exception:
            if received:
                raise
            log.debug("buttress.asgi.ShutdownMiddleware: the app has no lifespan protocol; answered here")
        else:
            if received:
                return
        await _serve_lifespan(hooked, send)
