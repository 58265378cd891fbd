"""One host-wide rate limit for every uvicorn worker process (docs/shared-state.md).

Every worker builds the same ``TokenBucket(rate, capacity, name="api", store="shm://NAME")``: the
bucket's words live in the shared-memory segment /dev/shm/buttress.NAME, so the 4 workers decide on
one bucket (a lock-free CAS on the same word), and the host admits `rate`/s, not 4 x `rate`/s.

    python docs/examples/shared_limit_app.py            # 4 workers, a load loop, a table; then stop, unlink
    python docs/examples/shared_limit_app.py --local    # the same with one bucket per worker, to compare
    python docs/examples/shared_limit_app.py serve --port 8000 --store api-demo   # only the server; Ctrl-C
                                                        # stops it and unlinks the segment
    BUTTRESS_EXAMPLE_STORE=api-demo uvicorn --workers 4 --factory \\
        --app-dir docs/examples shared_limit_app:make_app                # plain uvicorn (nobody unlinks)

GET /api is limited (200, or 429 with Retry-After); GET /healthz is not, and says which worker answered
and how many processes hold a lease on the segment. Every response carries ``x-worker-pid``.

Who unlinks: the process that started the workers, after they have all exited (here: `serve`, after
``uvicorn.run`` returns, which is after uvicorn's supervisor joined its workers). Never a worker: one
worker that unlinks while the others still run splits the host into two buckets.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))

ENV_STORE = "BUTTRESS_EXAMPLE_STORE"        # segment name (shm://NAME); "" = one bucket per process
ENV_RATE = "BUTTRESS_EXAMPLE_RATE"          # tokens per second (host-wide)
ENV_CAPACITY = "BUTTRESS_EXAMPLE_CAPACITY"  # the burst
DEFAULT_STORE, DEFAULT_RATE, DEFAULT_CAPACITY = "api-example", 50.0, 10


# -- the app (runs in every worker) ---------------------------------------------------------------------

def make_app() -> Any:
    """The ASGI app factory: uvicorn calls it once in each worker process (``--factory``)."""
    from buttress import TokenBucket
    from buttress.asgi import RateLimitMiddleware

    store_name = os.environ.get(ENV_STORE, DEFAULT_STORE)
    rate = float(os.environ.get(ENV_RATE, DEFAULT_RATE))
    capacity = int(os.environ.get(ENV_CAPACITY, DEFAULT_CAPACITY))
    # the one line that matters: same name, same settings, same store in every worker
    bucket = TokenBucket(rate=rate, capacity=capacity, name="api",
                         store=f"shm://{store_name}" if store_name else None)
    pid = str(os.getpid()).encode()

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    # the worker's store handle closes at exit (atexit): its lease slot is given back.
                    # A worker never unlinks the segment: the other workers still use it.
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/healthz":
            leases = sum(alive for _, _, alive in bucket.store.leases()) if bucket.store is not None else 0
            body = json.dumps({"pid": os.getpid(), "leases": leases}).encode()
        else:
            body = b"ok\n"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    # /healthz is not limited (key None), everything else takes a token of the one host-wide bucket
    limited = RateLimitMiddleware(endpoint, bucket, key=lambda scope: None if scope["path"] == "/healthz" else "api")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await limited(scope, receive, send)

        async def send_with_pid(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"x-worker-pid", pid)]}
            await send(message)

        await limited(scope, receive, send_with_pid)

    return app


# -- the supervisor: uvicorn's own, then unlink ----------------------------------------------------------

def serve(host: str, port: int, workers: int, store_name: str, log_level: str = "warning") -> None:
    """Run `workers` uvicorn workers (uvicorn's multiprocess supervisor, spawned processes); when it
    exits (SIGINT/SIGTERM: it stops and joins every worker first), unlink the segment."""
    import uvicorn

    os.environ[ENV_STORE] = store_name           # spawned workers inherit the environment
    try:
        uvicorn.run("shared_limit_app:make_app", factory=True, host=host, port=port, workers=workers,
                    app_dir=HERE, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        if store_name:
            unlink_store(store_name)


def unlink_store(store_name: str) -> bool:
    """Remove /dev/shm/buttress.NAME (and its lock file) if it is there; True if it was."""
    from buttress.stores import SharedMemoryStore
    from buttress.stores.shm import segment_path

    if not os.path.exists(segment_path(store_name)):
        return False
    store = SharedMemoryStore(store_name)        # opening it is how to reach unlink(); no object is bound
    try:
        store.unlink()
    finally:
        store.close()
    return True


# -- the load loop (the demo process: not a worker) --------------------------------------------------------

def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def wait_ready(base: str, workers: int, server: subprocess.Popen, timeout: float, shared: bool) -> set[int]:
    """Until every worker has built the app (it holds a lease on the segment) and answers, or timeout."""
    import httpx

    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=2.0,
                                 limits=httpx.Limits(max_keepalive_connections=0)) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with status {server.returncode} before it was ready")
            try:
                info = (await client.get("/healthz")).json()
            except (httpx.HTTPError, ValueError):
                await asyncio.sleep(0.1)
                continue
            seen.add(info["pid"])
            if (info["leases"] if shared else len(seen)) >= workers:
                return seen
            await asyncio.sleep(0.05)
    if not seen:
        raise SystemExit(f"no worker answered on {base} within {timeout:g} s")
    return seen


async def load(base: str, clients: int, duration: float) -> dict[str, Any]:
    """`clients` concurrent clients, each sending GET /api back to back for `duration` seconds, each
    request on a new connection (so the kernel hands the requests to different workers)."""
    import httpx

    per_pid: dict[int, Counter[int]] = {}
    errors = Counter[str]()
    async with httpx.AsyncClient(base_url=base, timeout=5.0,
                                 limits=httpx.Limits(max_connections=clients, max_keepalive_connections=0)) as client:
        t0 = time.monotonic()                    # before the first request is sent
        end = t0 + duration

        async def one_client() -> None:
            while time.monotonic() < end:
                try:
                    r = await client.get("/api")
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                per_pid.setdefault(int(r.headers.get("x-worker-pid", 0)), Counter())[r.status_code] += 1

        await asyncio.gather(*(one_client() for _ in range(clients)))
        t1 = time.monotonic()                    # after the last response arrived
    return {"duration": t1 - t0, "per_pid": per_pid, "errors": dict(errors)}


def report(result: dict[str, Any], rate: float, capacity: int, workers: int, clients: int, url: str,
           shared: bool) -> dict[str, Any]:
    per_pid, duration = result["per_pid"], result["duration"]
    requests = sum(sum(c.values()) for c in per_pid.values())
    admitted = sum(c[200] for c in per_pid.values())
    refused = sum(c[429] for c in per_pid.values())
    other = requests - admitted - refused
    # a token bucket admits at most capacity + floor(rate * D) over any interval D: the load ran inside
    # [t0, t1] of the same clock (CLOCK_MONOTONIC, one per host), so this bound is exact
    bound = capacity + math.floor(rate * duration)
    pids = sorted(p for p in per_pid if p)
    what = (f"TokenBucket(rate={rate:g}, capacity={capacity}, name='api', store='{url}')" if shared else
            f"TokenBucket(rate={rate:g}, capacity={capacity}) in each worker (--local: no store)")
    print(f"{what}\n{workers} uvicorn workers; {clients} clients for {duration:.2f} s, a new connection per request\n")
    print(f"{'worker pid':>10} {'requests':>9} {'admitted':>9} {'refused':>8}")
    for p in pids:
        c = per_pid[p]
        print(f"{p:>10} {sum(c.values()):>9} {c[200]:>9} {c[429]:>8}")
    print(f"{'total':>10} {requests:>9} {admitted:>9} {refused:>8}" + (f"   ({other} other statuses)" if other else ""))
    print(f"\nadmitted/s: {admitted / duration:.1f}; after the initial burst of {capacity}: "
          f"{max(0, admitted - capacity) / duration:.1f} (configured rate {rate:g}/s)")
    held = admitted <= bound
    print(f"host-wide bound: capacity + floor(rate x {duration:.2f} s) = {bound}; admitted {admitted}: "
          f"{'held' if held else 'EXCEEDED' + ('' if shared else ' (expected: no store)')}")
    print(f"{workers} independent per-process buckets would allow up to {workers} x {bound} = {workers * bound}")
    print(f"distinct worker pids that served /api: {len(pids)} of {workers}")
    if result["errors"]:
        print(f"transport errors: {result['errors']}")
    return {"requests": requests, "admitted": admitted, "refused": refused, "other": other,
            "duration": duration, "bound": bound, "held": held, "rate": rate, "capacity": capacity,
            "workers": workers, "pids": pids, "errors": result["errors"], "shared": shared}


def stop(server: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGINT to uvicorn's supervisor: it stops and joins its workers, returns from uvicorn.run, unlinks."""
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass
        os.killpg(server.pid, signal.SIGKILL)    # its own session: the supervisor and its workers
        server.wait()


def demo(args: argparse.Namespace) -> int:
    host = "127.0.0.1"
    port = args.port or free_port(host)
    store_name = "" if args.local else (args.store or f"example-{os.getpid()}")
    cmd = [sys.executable, os.path.abspath(__file__), "serve", "--host", host, "--port", str(port),
           "--workers", str(args.workers), "--store", store_name, "--rate", repr(args.rate),
           "--capacity", str(args.capacity)]
    # its own session, so that a last-resort kill reaches the workers too
    server = subprocess.Popen(cmd, start_new_session=True)
    base = f"http://{host}:{port}"
    try:
        asyncio.run(wait_ready(base, args.workers, server, args.ready_timeout, bool(store_name)))
        result = asyncio.run(load(base, args.clients, args.duration))
    finally:
        stop(server)
    summary = report(result, args.rate, args.capacity, args.workers, args.clients, f"shm://{store_name}",
                     bool(store_name))
    left = bool(store_name) and unlink_store(store_name)     # only if the supervisor could not
    if store_name:
        print(f"segment /dev/shm/buttress.{store_name}: "
              f"{'left behind by the supervisor, unlinked now' if left else 'unlinked by the supervisor'}")
    summary.update(store=store_name, left_behind=left, server_status=server.returncode)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f)
    return 0 if summary["held"] or not store_name else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", nargs="?", choices=["demo", "serve"], default="demo",
                    help="demo (default): start the server, load it, print the table, stop it; serve: only the server")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="default: a free port (demo), 8000 (serve)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--store", default=None, help="segment name: shm://NAME (demo default: example-<pid>, "
                    f"serve default: {DEFAULT_STORE}); '' for one bucket per process")
    ap.add_argument("--local", action="store_true", help="demo: one bucket per worker (no store), to compare")
    ap.add_argument("--rate", type=float, default=DEFAULT_RATE)
    ap.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds of load (bounded: at most 60)")
    ap.add_argument("--ready-timeout", type=float, default=60.0)
    ap.add_argument("--json", default=None, help="demo: also write the summary to this file")
    args = ap.parse_args(argv)
    if not 0 < args.duration <= 60 or not 1 <= args.clients <= 64 or not 1 <= args.workers <= 32:
        ap.error("--duration must be in (0, 60], --clients in [1, 64], --workers in [1, 32]")
    if args.mode == "serve":
        os.environ[ENV_RATE] = repr(args.rate)         # the spawned workers read these
        os.environ[ENV_CAPACITY] = str(args.capacity)
        serve(args.host, args.port or 8000, args.workers, DEFAULT_STORE if args.store is None else args.store)
        return 0
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
