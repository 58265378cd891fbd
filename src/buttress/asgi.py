"""Pure ASGI middleware: per-client rate limiting, priority load shedding, health endpoints.

Plain ASGI 3 callables (``await mw(scope, receive, send)``), so they wrap any ASGI app (Starlette,
FastAPI, Django, Litestar, a bare function) without Starlette's BaseHTTPMiddleware and without any
extra dependency. Only ``http`` scopes are acted on; ``websocket`` and ``lifespan`` pass through.

Rate-limit headers follow draft-ietf-httpapi-ratelimit-headers-09/-10 (structured fields)::

    RateLimit-Policy: "default";q=20;w=2      # quota q per window of w seconds (see docs/asgi.md)
    RateLimit: "default";r=7;t=2              # r units left now; t seconds until the quota is full again

and a 429 also carries ``Retry-After`` (whole seconds, rounded up, at least 1).
"""
from __future__ import annotations

import math
from typing import Any, Awaitable, Callable

from ._params import NS, check_bool, check_int, emission_interval_ns
from .errors import Overloaded

__all__ = ["RateLimitMiddleware", "LoadSheddingMiddleware", "HealthEndpoints", "client_ip"]

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _check_app(app: object, allow_none: bool = False) -> Any:
    if app is None and allow_none:
        return None
    if not callable(app):
        raise TypeError(f"app must be an ASGI application (callable), got {app!r}")
    return app


def _retry_after(seconds: float | None, default: int = 1) -> int:
    """Whole seconds for Retry-After: rounded up, never below 1."""
    if seconds is None:
        return max(1, default)
    return max(1, math.ceil(seconds))


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]],
                   content_type: bytes = b"text/plain; charset=utf-8", head: bool = False) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": b"" if head else body})


def client_ip(scope: Scope, trusted_proxies: int = 0) -> str | None:
    """The client address of an HTTP scope.

    With ``trusted_proxies=0`` it is the socket peer (``scope["client"]``), and X-Forwarded-For is
    ignored (anyone can send one). With N > 0 trusted proxies in front of the app, each appends the
    address it received the request from, so the client is the N-th entry from the right of
    X-Forwarded-For; entries further left were written by the client and are not trusted. If the
    header has fewer than N entries, the socket peer is used.
    """
    peer = scope.get("client")
    host = peer[0] if peer else None
    if trusted_proxies:
        values: list[str] = []
        for name, value in scope.get("headers", ()):
            if name.lower() == b"x-forwarded-for":
                values.extend(v.strip() for v in value.decode("latin-1").split(","))
        values = [v for v in values if v]
        if len(values) >= trusted_proxies:
            return values[-trusted_proxies]
    return host


class RateLimitMiddleware:
    """Per-key rate limiting: 429 with Retry-After and RateLimit headers when a key is over its limit.

    `limiter` is a `buttress.KeyedLimiter` (one bucket per key) or a `buttress.TokenBucket` (one
    bucket for the whole app). `key(scope)` returns the key (str, int or bytes), or None to let the
    request through unlimited; by default the key is `client_ip(scope, trusted_proxies)`.
    `headers=False` leaves admitted responses untouched (429s always carry the headers).
    """

    def __init__(self, app: ASGIApp, limiter: Any, key: Callable[[Scope], Any] | None = None,
                 trusted_proxies: int = 0, policy: str = "default", headers: bool = True) -> None:
        from .rate_limit import KeyedLimiter, TokenBucket
        self.app = _check_app(app)
        if not isinstance(limiter, (KeyedLimiter, TokenBucket)):
            raise TypeError(f"limiter must be a buttress.KeyedLimiter or buttress.TokenBucket, got {limiter!r}")
        if key is not None and not callable(key):
            raise TypeError(f"key must be a callable(scope) -> key or None, got {key!r}")
        if not isinstance(policy, str) or not policy or '"' in policy or "\\" in policy:
            raise ValueError(f"policy must be a non-empty str without quotes or backslashes, got {policy!r}")
        self.limiter: Any = limiter
        self.keyed = isinstance(limiter, KeyedLimiter)
        self.key = key
        self.trusted_proxies = check_int("trusted_proxies", trusted_proxies, minimum=0, maximum=64)
        self.headers = check_bool("headers", headers)
        self.policy = policy
        window = max(1, math.ceil(limiter.capacity / limiter.rate))
        # q per w never promises more than the bucket gives: capacity + floor(w * rate) >= q in any w seconds
        self.policy_header = f'"{policy}";q={limiter.capacity};w={window}'.encode()
        self._interval_ns = emission_interval_ns(limiter.rate, limiter.capacity)[2]
        self._tau_ns = self._interval_ns * limiter.capacity

    def _key(self, scope: Scope) -> Any:
        if self.key is not None:
            return self.key(scope)
        ip = client_ip(scope, self.trusted_proxies)
        return "unknown" if ip is None else ip

    # -- the limiter, keyed or not ---------------------------------------------------------------------
    def _wait(self, key: Any, n: int) -> float:
        return self.limiter.wait_time(key, n) if self.keyed else self.limiter.wait_time(n)

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
        key = self._key(scope)
        if key is None:
            return await self.app(scope, receive, send)
        admitted = self.limiter.try_acquire(key) if self.keyed else self.limiter.try_acquire(1)
        if not admitted:
            retry_after = _retry_after(self._wait(key, 1))
            headers = [(b"retry-after", str(retry_after).encode()), *self._rate_headers(key, rejected=True)]
            return await _respond(send, 429, b"rate limit exceeded\n", headers,
                                  head=scope.get("method") == "HEAD")
        if not self.headers:
            return await self.app(scope, receive, send)
        extra = self._rate_headers(key)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class LoadSheddingMiddleware:
    """Admit requests through a `buttress.LoadShedder` by priority; a shed request gets 503 with
    Retry-After (the shedder's `retry_after`, else `retry_after` seconds).

    `priority` is a `buttress.Priority` for every request or a callable(scope) -> Priority (e.g. from a
    header or the path); None uses the shedder's `default_priority` (MEDIUM unless set). The request
    holds its slot until the response is sent.
    """

    def __init__(self, app: ASGIApp, shedder: Any, priority: Any = None, retry_after: int = 1) -> None:
        self.app = _check_app(app)
        if not callable(getattr(shedder, "admit", None)):
            raise TypeError(f"shedder must be a buttress.LoadShedder (with .admit(priority)), got {shedder!r}")
        self.shedder = shedder
        # None: the shedder's own default_priority; a Priority: for every request; else callable(scope)
        self.priority = priority if callable(priority) and not isinstance(priority, int) else (lambda scope: priority)
        self.retry_after = check_int("retry_after", retry_after, minimum=1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        admission = self.shedder.admit(self.priority(scope))
        try:
            admission.__enter__()
        except Overloaded as exc:
            headers = [(b"retry-after", str(_retry_after(exc.retry_after, self.retry_after)).encode())]
            return await _respond(send, 503, b"overloaded\n", headers, head=scope.get("method") == "HEAD")
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            if not admission.__exit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            admission.__exit__(None, None, None)


class HealthEndpoints:
    """Serve a `buttress.health.HealthRegistry` as JSON on GET/HEAD `livez`, `readyz` and `startupz`
    (set one to None to not serve it); every other request goes to `app` (404 when `app` is None).

    Put it outermost, so probes are never rate limited or shed.
    """

    def __init__(self, app: ASGIApp | None, health: Any, livez: str | None = "/livez",
                 readyz: str | None = "/readyz", startupz: str | None = "/startupz") -> None:
        self.app = _check_app(app, allow_none=True)
        if not callable(getattr(health, "check", None)):
            raise TypeError(f"health must be a buttress.health.HealthRegistry, got {health!r}")
        self.health = health
        self.routes: dict[str, str] = {}
        for probe, path in (("liveness", livez), ("readiness", readyz), ("startup", startupz)):
            if path is None:
                continue
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"the path for {probe} must be a str starting with '/' or None, got {path!r}")
            self.routes[path] = probe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            probe = self.routes.get(scope.get("path", ""))
            if probe is not None:
                return await self._serve(probe, scope, send)
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "http":
            await _respond(send, 404, b"not found\n", [])

    async def _serve(self, probe: str, scope: Scope, send: Send) -> None:
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            return await _respond(send, 405, b"method not allowed\n", [(b"allow", b"GET, HEAD")])
        report = await self.health.check(probe)
        body = report.to_json().encode()
        await _respond(send, report.http_status, body, [(b"cache-control", b"no-store")],
                       content_type=b"application/json", head=method == "HEAD")
