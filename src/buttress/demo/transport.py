"""A stand-in for `buttress.httpx.AsyncResilientTransport` (DESIGN §6), used by the demo until it lands.

It has the constructor of the real one (``AsyncResilientTransport(transport=None, *, pipeline_factory=...,
per_host=True)``) and the rules the demo relies on: every request runs through the pipeline that
``pipeline_factory(origin)`` built for its origin (``"http://127.0.0.1:8001"``; one pipeline per origin, or
one for all with ``per_host=False``); a 5xx or a 429 becomes an `httpx.HTTPStatusError` inside the
pipeline (so a Retry can retry it and a breaker counts it; 4xx are answers, not failures), carrying the
response's ``Retry-After`` in seconds as ``retry_after``; the last response is returned, never raised;
buttress's own rejections (``CircuitOpenError``, ...) and transport errors propagate; ``remaining()``
of the innermost deadline becomes the request's httpx timeout. Swapping in the real transport is the
one import line in `buttress.demo.http`.
"""
from __future__ import annotations

from typing import Any, Callable

import httpx

from ..timeout import remaining

__all__ = ["AsyncResilientTransport", "StatusError"]


class StatusError(httpx.HTTPStatusError):
    """A 5xx / 429 answer seen inside the pipeline; `retry_after` is its Retry-After in seconds, or None."""

    def __init__(self, response: httpx.Response, request: httpx.Request) -> None:
        super().__init__(f"HTTP {response.status_code} from {request.url}", request=request, response=response)
        self.retry_after = _retry_after(response.headers.get("retry-after"))


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None     # an HTTP date: not sent by the demo's services
    return seconds if 0.0 <= seconds <= 1e9 else None


class AsyncResilientTransport(httpx.AsyncBaseTransport):
    def __init__(self, transport: httpx.AsyncBaseTransport | None = None, *,
                 pipeline_factory: Callable[[str], Any], per_host: bool = True) -> None:
        if not callable(pipeline_factory):
            raise TypeError(f"pipeline_factory must be a callable(origin) -> Pipeline, got {pipeline_factory!r}")
        self._inner = transport if transport is not None else httpx.AsyncHTTPTransport()
        self._factory = pipeline_factory
        self._per_host = per_host
        self._pipelines: dict[str, Any] = {}

    def _pipeline(self, url: httpx.URL) -> Any:
        origin = f"{url.scheme}://{url.host}:{url.port}" if self._per_host else "*"
        pipeline = self._pipelines.get(origin)
        if pipeline is None:
            pipeline = self._pipelines[origin] = self._factory(origin)
        return pipeline

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        async def attempt() -> httpx.Response:
            left = remaining()
            if left is not None:
                request.extensions = {**request.extensions, "timeout": httpx.Timeout(max(left, 1e-3)).as_dict()}
            response = await self._inner.handle_async_request(request)
            if response.status_code >= 500 or response.status_code == 429:
                await response.aread()
                await response.aclose()
                raise StatusError(response, request)
            return response

        try:
            return await self._pipeline(request.url).call_async(attempt)
        except StatusError as exc:
            return exc.response

    async def aclose(self) -> None:
        await self._inner.aclose()
