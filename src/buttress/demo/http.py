"""``--transport http``: the three dependencies as real HTTP services (uvicorn on 127.0.0.1).

The services run in one child process (``python -m buttress.demo.http``), one uvicorn server listening on
three sockets bound to ports the OS picks at start; the request's local port says which service it is
for. They are the same simulated services as in process (`buttress.demo.deps`), with the same seeded
faults, answered over HTTP:

    POST /charges  {"order": id}  [Idempotency-Key]   200 {"charge": ...} | 503 | connection reset
    GET  /stock?order=&item=                          200 {"in_stock": true} | connection reset
    GET  /recommendations?order=&item=                200 {"items": [...]} | 500

"Connection reset" is a response whose headers were sent and whose body never comes (uvicorn closes the
connection), which httpx reports as a `RemoteProtocolError`. A run starts with ``POST /_demo/start``
(fresh services, the run's clock starts) and ends with ``POST /_demo/stop`` (hung work is stopped; the
answer is what the services counted). The child exits when its stdin closes (the demo ended or died).

The naive run calls the services with plain ``httpx.AsyncClient``. The protected run calls each service
through its own ``httpx.AsyncClient`` on a `buttress.httpx.AsyncResilientTransport`, with the same
guards as in process (`buttress.demo.checkout.Guard`): the guard's `remote` pipeline (total Timeout,
Retry, breaker) is the transport's pipeline for the host, its `attempt` timeout is the client's timeout
(which the transport lowers to what is left of the total), and its bulkhead is around the client call.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
import traceback
from typing import Any
from urllib.parse import parse_qs

from .deps import ConnectionLost, Dependencies, Faults, ServerError, Unavailable

SERVICES = ("payment", "inventory", "recommendations")
UNEXPECTED = "x-demo-unexpected"    # header of a 500 caused by a bug in the service (not a simulated fault)


# -- the server side (in the child process) ----------------------------------------------------------------

class _State:
    deps: Dependencies | None = None
    ports: dict[int, str] = {}


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b""
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _answer(send: Any, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def _reset(send: Any) -> None:
    """Headers, then no body: uvicorn closes the connection, the client sees a reset without a reply."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"64")]})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = await _body(receive)
    path, method = scope["path"], scope["method"]
    query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
    service = _State.ports.get(scope["server"][1]) if scope.get("server") else None
    try:
        if path == "/_demo/start" and method == "POST":
            if _State.deps is not None:
                await _State.deps.close()
            faults = Faults.from_dict(json.loads(body))
            t0 = time.monotonic()
            _State.deps = Dependencies.start(faults, lambda: time.monotonic() - t0)
            return await _answer(send, 200, {"started": True})
        if path == "/_demo/stop" and method == "POST":
            deps, _State.deps = _State.deps, None
            if deps is None:
                return await _answer(send, 409, {"error": "no run started"})
            await deps.close()
            return await _answer(send, 200, deps.stats())
        deps = _State.deps
        if deps is None:
            return await _answer(send, 409, {"error": "no run started"})
        if service == "payment" and path == "/charges" and method == "POST":
            key = dict(scope["headers"]).get(b"idempotency-key")
            charge = await deps.payment.charge(json.loads(body)["order"], key.decode() if key else None)
            return await _answer(send, 200, {"charge": charge})
        if service == "inventory" and path == "/stock" and method == "GET":
            return await _answer(send, 200, {"in_stock": await deps.inventory.stock(query["order"], query["item"])})
        if service == "recommendations" and path == "/recommendations" and method == "GET":
            items = await deps.recommendations.for_item(query["order"], query["item"])
            return await _answer(send, 200, {"items": items})
        return await _answer(send, 404, {"error": f"no {method} {path} on the {service} service"})
    except Unavailable as exc:
        await _answer(send, 503, {"error": str(exc)})
    except ServerError as exc:
        await _answer(send, 500, {"error": str(exc)})
    except ConnectionLost:
        await _reset(send)
    except asyncio.CancelledError:      # the run ended while this request hung: drop the connection
        await _reset(send)
    except Exception:                   # a bug in the demo's services: tell the client it is one
        await _answer(send, 500, {"error": traceback.format_exc()}, [(UNEXPECTED.encode(), b"1")])


def _exit_when_stdin_closes() -> None:
    try:
        sys.stdin.buffer.read()
    finally:
        os._exit(0)


def serve() -> None:
    """The child process: bind three sockets, print their ports as one JSON line, serve until stdin closes."""
    import uvicorn
    sockets = []
    for name in SERVICES:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accepted connections inherit this: without it a keep-alive reply (headers, then body: two
        # writes) waits for the client's delayed ACK, ~40 ms a request on Linux (Nagle's algorithm)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        _State.ports[sock.getsockname()[1]] = name
    threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()
    config = uvicorn.Config(app, log_config=None, log_level="critical", access_log=False, lifespan="off",
                            http="h11", loop="asyncio", timeout_keep_alive=30)
    server = uvicorn.Server(config)
    print(json.dumps({name: port for port, name in _State.ports.items()}), flush=True)
    asyncio.run(server.serve(sockets=sockets))


# -- the client side (in the demo's process) ---------------------------------------------------------------

class Http:
    """``--transport http``: starts the services' child process; each run is a session against it."""
    name = "http"

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.ports: dict[str, int] = {}

    @property
    def detail(self) -> str:
        where = ", ".join(f"{n} {p}" for n, p in self.ports.items())
        return f"uvicorn in a child process, 127.0.0.1 ports {where}"

    async def __aenter__(self) -> Http:
        import httpx  # noqa: F401   (fail here, before any run, when the extra is missing)
        import buttress
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(buttress.__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "buttress.demo.http", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env)
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 30.0)
            self.ports = json.loads(line)
        except (asyncio.TimeoutError, ValueError) as exc:
            await self.__aexit__()
            raise RuntimeError(f"the HTTP services did not start (their process said {line!r})") from exc
        return self

    async def __aexit__(self, *exc: Any) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    async def begin(self, faults: Faults) -> HttpSession:
        session = HttpSession(self)
        await session.start(faults)
        return session


class HttpSession:
    def __init__(self, http: Http) -> None:
        from ..httpx import retryable
        self.http = http
        self.retry_on = retryable       # what buttress.httpx raises inside a pipeline to ask for a retry
        self.clients: list[Any] = []
        self.t0 = 0.0

    async def start(self, faults: Faults) -> None:
        import httpx
        async with httpx.AsyncClient(base_url=self.http.url("payment")) as control:
            r = await control.post("/_demo/start", content=json.dumps(faults.as_dict()))
            r.raise_for_status()
        self.t0 = time.monotonic()

    async def end(self) -> dict[str, int]:
        import httpx
        for client in self.clients:
            await client.aclose()
        async with httpx.AsyncClient(base_url=self.http.url("payment"), timeout=30.0) as control:
            r = await control.post("/_demo/stop")
            r.raise_for_status()
            counts: dict[str, int] = r.json()
            return counts

    def client(self, policies: Any) -> Any:
        """Plain httpx clients (naive, `policies` None; the caller's asyncio timeouts bound them), or the
        protected run's: `buttress.httpx` transports with the policies' guards."""
        import httpx

        from ..httpx import AsyncResilientTransport

        def make(service: str) -> httpx.AsyncClient:
            transport, timeout = None, None
            if policies is not None:
                guard = policies.guards()[service]
                transport = AsyncResilientTransport(pipeline_factory=lambda host: guard.remote)
                timeout = guard.attempt
            client = httpx.AsyncClient(base_url=self.http.url(service), transport=transport, timeout=timeout)
            self.clients.append(client)
            return client
        plain = HttpClient({s: make(s) for s in SERVICES})
        if policies is None:
            return plain
        from .checkout import GuardedClient
        return GuardedClient(plain, {name: g.bulkhead for name, g in policies.guards().items() if g.bulkhead})


class HttpClient:
    """The checkout's view of the services over HTTP: an answer, or the same errors as in process
    (`Unavailable` for a 503, `ServerError` for another 5xx, `ConnectionLost` for a transport error,
    `TimeoutError` for an httpx timeout). Anything else (a 4xx, a bug in a service) is a bug: RuntimeError."""

    def __init__(self, clients: dict[str, Any]) -> None:
        self.clients = clients

    async def _send(self, service: str, method: str, path: str, **kw: Any) -> Any:
        import httpx
        try:
            r = await self.clients[service].request(method, path, **kw)
        except httpx.TimeoutException as exc:
            raise TimeoutError(f"{service}: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise ConnectionLost(f"{service}: {type(exc).__name__}: {exc}") from exc
        if r.headers.get(UNEXPECTED):
            raise RuntimeError(f"the {service} service failed unexpectedly:\n{r.json()['error']}")
        if r.status_code == 503:
            raise Unavailable(f"{service}: 503 {r.json()['error']}")
        if r.status_code >= 500:
            raise ServerError(f"{service}: {r.status_code} {r.json()['error']}")
        if r.status_code != 200:
            raise RuntimeError(f"{service}: unexpected answer {r.status_code} {r.text}")
        return r.json()

    async def stock(self, order: str, item: str) -> bool:
        return bool((await self._send("inventory", "GET", "/stock", params={"order": order, "item": item}))["in_stock"])

    async def charge(self, order: str, idempotency_key: str | None) -> str:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return str((await self._send("payment", "POST", "/charges", json={"order": order}, headers=headers))["charge"])

    async def recommendations(self, order: str, item: str) -> list[str]:
        return list((await self._send("recommendations", "GET", "/recommendations",
                                      params={"order": order, "item": item}))["items"])


if __name__ == "__main__":
    serve()
