"""buttress.httpx: the transport's cost per request over a plain httpx client against the same local server.

python -m pytest benchmarks/test_httpx_bench.py --benchmark-json=/tmp/httpx.json && python benchmarks/report.py /tmp/httpx.json

The server is uvicorn in a child process on 127.0.0.1 (so it does not share the client's GIL), answering
GET /ok with a 2-byte body over keep-alive. Floors: a bare call (the suite convention) and, the one that
matters here, the same GET through a plain ``httpx.Client`` / ``httpx.AsyncClient`` (sync cases are per
request; async cases run 200 requests per round in one loop, stored in extra_info['ns_per_await']).
The resilient cases use the default pipeline (total timeout, Retry, per-host breaker, token bucket with
a rate high enough never to refuse) and read the whole body, so the breaker's verdict waits for its end.
"""
import asyncio
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import bare

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from buttress.httpx import AsyncResilientTransport, ResilientTransport, default_pipeline  # noqa: E402

REQUESTS_PER_ROUND = 200


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", f"import uvicorn, test_httpx_bench as b; uvicorn.run(b.app, "
                             f"host='127.0.0.1', port={port}, log_level='critical', access_log=False, lifespan='off')"],
                            env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(base + "/ok", timeout=1.0)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def _factory(host):
    return default_pipeline(host, rate=1e6)


# -- floors ----------------------------------------------------------------------------------------------

def test_floor_bare_call(benchmark):
    benchmark(bare)


def test_floor_plain_httpx_get(benchmark, url):
    with httpx.Client() as c:
        c.get(url + "/ok")
        benchmark(lambda: c.get(url + "/ok").content)


def test_floor_plain_httpx_async_get(benchmark, url):
    _async_bench(benchmark, lambda: httpx.AsyncClient(), url)


# -- buttress --------------------------------------------------------------------------------------------

def test_resilient_get(benchmark, url):
    with httpx.Client(transport=ResilientTransport(pipeline_factory=_factory)) as c:
        c.get(url + "/ok")
        benchmark(lambda: c.get(url + "/ok").content)


def test_resilient_async_get(benchmark, url):
    _async_bench(benchmark, lambda: httpx.AsyncClient(transport=AsyncResilientTransport(pipeline_factory=_factory)),
                 url)


def _async_bench(benchmark, make_client, url):
    loop = asyncio.new_event_loop()
    client = loop.run_until_complete(_enter(make_client))

    async def batch():
        for _ in range(REQUESTS_PER_ROUND):
            (await client.get(url + "/ok")).content

    try:
        loop.run_until_complete(batch())
        benchmark.pedantic(lambda: loop.run_until_complete(batch()), rounds=15, warmup_rounds=1)
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_await"] = benchmark.stats.stats.median * 1e9 / REQUESTS_PER_ROUND


async def _enter(make_client):
    return make_client()
