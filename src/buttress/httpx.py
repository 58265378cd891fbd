"""Resilient HTTP clients: httpx transports with a per-host pipeline (DESIGN §6, docs/httpx.md).

``httpx.Client(transport=ResilientTransport())`` / ``httpx.AsyncClient(transport=AsyncResilientTransport())``.
Every request goes through its host's pipeline (one per ``scheme://host:port`` with ``per_host=True``,
the default; one for everything otherwise), built on first use by ``pipeline_factory(host)`` or by
`default_pipeline`:

- a total timeout: its ``remaining()`` becomes httpx's timeouts (connect / read / write / pool) of each
  attempt, and bounds the retry waits; when nothing is left, `TimeoutExceeded`;
- a Retry on connection errors and on 429 / 502 / 503 / 504, honouring ``Retry-After`` (seconds or an
  HTTP date) as a lower bound on the wait, for idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE,
  TRACE) or requests carrying the idempotency header; a connect error or pool timeout (the request was
  never sent) is retried for every method; a request body that cannot be replayed (a stream) never is;
- a CircuitBreaker per host that counts 5xx responses, timeouts and connection errors as failures and
  never a 4xx; for a streamed body the breaker's verdict waits for the end of the body (a failure in
  the middle of the stream is a failure);
- a rate limiter per host (optional), and hedging for GET / HEAD when asked (``hedge=0.05`` or "p95");
- a rejection raises buttress's own error (CircuitOpenError, RateLimitExceeded, ...) with retry_after;
  a response that is not retried, or the last one, is returned as a response, never raised;
- the body of a response to a retryable request, when its Content-Length is at most `buffer_limit`
  bytes (default 1 MiB), is read inside the attempt: a reply that breaks off in the middle (the
  connection drops after the headers) is retried like any connection error. Larger bodies, and bodies
  of unknown length, are streamed to the caller (the breaker still sees their end).

This module imports without httpx; the transports need it (``pip install buttress[httpx]``).
"""
from __future__ import annotations

import email.utils
import functools
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from . import _context
from ._params import MAX_SECONDS, NS, check_bool, check_int, check_seconds, show
from .clock import resolve_clock
from .errors import RateLimitExceeded, TimeoutExceeded

try:
    import httpx as _httpx
except ImportError:         # the transports say so when used
    _httpx = None  # type: ignore[assignment]

__all__ = ["ResilientTransport", "AsyncResilientTransport", "HostPipeline", "default_pipeline",
           "RetryableResponse", "parse_retry_after", "retryable", "IDEMPOTENT_METHODS", "RETRY_STATUSES"]

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
BUFFER_LIMIT = 1 << 20      # bytes: a retryable request's response up to this size is read inside the attempt
RETRY_STATUSES = frozenset({429, 502, 503, 504})
HEDGE_METHODS = frozenset({"GET", "HEAD"})
_TIMEOUT_KEYS = ("connect", "read", "write", "pool")


def _require_httpx() -> Any:
    if _httpx is None:
        raise ImportError("buttress.httpx needs httpx: pip install 'buttress[httpx]'")
    return _httpx


class RetryableResponse(Exception):
    """Raised inside the pipeline for a response that may be retried (429 / 502 / 503 / 504 of a
    retryable request): a Retry retries it, waiting at least `retry_after` (from the Retry-After
    header); the transport returns `.response` when no retry follows. Its body is already read."""

    def __init__(self, response: Any, retry_after: float | None) -> None:
        self.response = response
        self.retry_after = retry_after
        super().__init__(f"HTTP {response.status_code}" + ("" if retry_after is None
                                                          else f"; Retry-After {retry_after:.6g}s"))


class _ServerError(Exception):
    """What the breaker records for a 5xx response (never raised to the caller)."""

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(f"HTTP {status}")


class _Failed(NamedTuple):
    """An attempt's error that must not be retried, carried out of the Retry as a value."""
    exc: BaseException


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header value -> seconds to wait (>= 0, at most 1e9), or None when absent or
    unreadable. Accepts delta-seconds ("120", also "1.5") and HTTP dates ("Wed, 21 Oct 2015 07:28:00
    GMT"), the latter relative to `now` (wall-clock seconds, default time.time()).

    One rule for out-of-range values: a number or a date too far ahead to represent (a 400-digit
    number, "1e999", a year past 9999) is the maximum, 1e9 s -- "longer than any budget", as a value just
    inside the range is -- never "absent"; one in the past is 0. "inf" and "nan" are not numbers in HTTP."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
        if math.isnan(seconds) or value.lstrip("+-")[:1].isalpha():     # "nan", "inf", "Infinity"
            return None
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            parts = email.utils.parsedate_tz(value)
            return MAX_SECONDS if parts is not None and parts[0] > 9999 else None
        if when is None:
            return None
        if when.tzinfo is None:                 # RFC 9110: HTTP dates are GMT
            import datetime
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_SECONDS)      # a value that overflowed to +-inf is clamped too


def _check_hedge(hedge: object) -> None:
    """`hedge=` is checked by Hedge(delay=...): its error names `hedge`, the parameter the caller passed."""
    from .hedge import Hedge
    try:
        Hedge(hedge)  # type: ignore[arg-type]  # any object: Hedge's own check is the validation
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"hedge must be None, seconds in [0, 1e9], a percentile string 'pNN' with 0 < NN < 100 "
                        f"(e.g. 'p95') or a buttress.Hedge, got {show(hedge)}") from None


def _replayable(request: Any) -> bool:
    """Whether the body can be sent again: bytes content (httpx.ByteStream) or an already read body."""
    httpx = _httpx
    stream = request.stream
    return isinstance(stream, httpx.ByteStream) or hasattr(request, "_content")


def _always_retryable(exc: BaseException) -> bool:
    """The request never left: connecting failed, or no connection came free in the pool."""
    httpx = _httpx
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))


def retryable(exc: BaseException) -> bool:
    """A Retry `retry_on` predicate for pipelines given by a `pipeline_factory`: True for what the
    transport raises inside the pipeline to ask for a retry (it raises nothing else there: an error
    that must not be retried travels out of the Retry as a value)."""
    return isinstance(exc, RetryableResponse) or (_httpx is not None and isinstance(exc, _httpx.TransportError))


class HostPipeline:
    """The strategies one host's requests go through; any of them may be None (left out).

    `timeout`: total seconds for a request (attempts and waits); `retry`: a `buttress.Retry` (its
    retry_on should accept `retryable`); `hedge`: a `buttress.Hedge`, used for GET / HEAD only;
    `breaker`: a `buttress.CircuitBreaker`; `limiter`: any limiter with ``try_acquire(1)`` and
    ``wait_time(1)`` (TokenBucket, LeakyBucket, ...)."""

    __slots__ = ("timeout", "retry", "hedge", "breaker", "limiter", "_timeout_ns")

    def __init__(self, *, timeout: float | None = None, retry: Any = None, hedge: Any = None, breaker: Any = None,
                 limiter: Any = None) -> None:
        from .circuit_breaker import CircuitBreaker
        from .hedge import Hedge
        from .retry import Retry
        self.timeout = check_seconds("timeout", timeout, allow_none=True, allow_zero=False)
        self._timeout_ns = None if self.timeout is None else math.ceil(self.timeout * NS)
        for name, value, cls in (("retry", retry, Retry), ("hedge", hedge, Hedge), ("breaker", breaker, CircuitBreaker)):
            if value is not None and not isinstance(value, cls):
                raise TypeError(f"{name} must be a buttress.{cls.__name__} or None, got {show(value)}")
        if limiter is not None and not (callable(getattr(limiter, "try_acquire", None))
                                        and callable(getattr(limiter, "wait_time", None))):
            raise TypeError(f"limiter must have try_acquire(n) and wait_time(n) (TokenBucket, LeakyBucket, ...) "
                            f"or be None, got {show(limiter)}")
        self.retry, self.hedge, self.breaker, self.limiter = retry, hedge, breaker, limiter

    @classmethod
    def from_pipeline(cls, pipeline: Any) -> HostPipeline:
        """A `buttress.Pipeline` (or one strategy) -> its HTTP roles: a Timeout is the total timeout,
        a Retry retries, a Hedge hedges GET / HEAD, a CircuitBreaker guards the host, a limiter limits.
        Anything else (a Fallback, a Bulkhead, ...) is a ValueError: say what it should do per request."""
        from .circuit_breaker import CircuitBreaker
        from .hedge import Hedge
        from .pipeline import Pipeline
        from .retry import Retry
        from .timeout import Timeout
        if isinstance(pipeline, HostPipeline):
            return pipeline
        stages = pipeline.strategies if isinstance(pipeline, Pipeline) else (pipeline,)
        if isinstance(pipeline, Pipeline) and pipeline.fallback is not None:
            raise ValueError("pipeline_factory: a Pipeline with a fallback cannot be an HTTP pipeline (a response "
                             "is always returned); handle the error around the client call instead")
        roles: dict[str, Any] = {}
        value: object
        for s in stages:
            if isinstance(s, Timeout):
                role, value = "timeout", s.seconds
            elif isinstance(s, Retry):
                role, value = "retry", s
            elif isinstance(s, Hedge):
                role, value = "hedge", s
            elif isinstance(s, CircuitBreaker):
                role, value = "breaker", s
            elif callable(getattr(s, "try_acquire", None)) and callable(getattr(s, "wait_time", None)):
                role, value = "limiter", s
            else:
                raise ValueError(f"pipeline_factory: {show(s)} has no role in an HTTP pipeline; allowed: Timeout "
                                 "(total), Retry, Hedge, CircuitBreaker, a rate limiter")
            if role in roles:
                raise ValueError(f"pipeline_factory: two stages for the {role} role ({show(roles[role])}, {show(value)})")
            roles[role] = value
        return cls(**roles)

    def __repr__(self) -> str:
        return (f"HostPipeline(timeout={self.timeout!r}, retry={self.retry!r}, hedge={self.hedge!r}, "
                f"breaker={self.breaker!r}, limiter={self.limiter!r})")


def default_pipeline(host: str, *, max_attempts: int = 3, timeout: float | None = 30.0, rate: float | None = 100.0,
                     hedge: Any = None, clock: Any = None) -> HostPipeline:
    """The defaults (DESIGN §6): 3 attempts (exponential backoff from 0.1 s, full jitter, at most 10 s,
    Retry-After as a lower bound), a 30 s total timeout, a breaker that opens when half of the last
    100 calls failed once 20 were seen (so after at most 20 consecutive 5xx), stays open 30 s and
    probes with 5 calls, and a token bucket of `rate` requests/s with a burst of `rate` (None: no
    limiter). `hedge`: None, seconds, "pNN" or a `buttress.Hedge`, for GET / HEAD."""
    from .backoff import exponential
    from .circuit_breaker import CircuitBreaker
    from .hedge import Hedge
    from .rate_limit import TokenBucket
    from .retry import Retry
    retry = Retry(max_attempts=check_int("max_attempts", max_attempts, minimum=1, maximum=100),
                  backoff=exponential(initial=0.1, maximum=10.0), retry_on=retryable, clock=clock)
    breaker = CircuitBreaker(name=f"http {host}", failure_rate_threshold=0.5, window_size=100, minimum_calls=20,
                             open_duration=30.0, half_open_calls=5, clock=clock)
    limiter = None
    if rate is not None:
        limiter = TokenBucket(rate=rate, capacity=max(1, math.ceil(rate)), clock=clock)
    if hedge is not None and not isinstance(hedge, Hedge):
        _check_hedge(hedge)
        hedge = Hedge(hedge, clock=clock)
    return HostPipeline(timeout=timeout, retry=retry, hedge=hedge, breaker=breaker, limiter=limiter)


# -- the shared per-request logic --------------------------------------------------------------------------

class _Base:
    """What both transports share: the host pipelines and the rules of an attempt."""

    def _setup(self, transport: Any, pipeline_factory: Any, per_host: object, hedge: Any,
               idempotency_header: object, clock: Any, buffer_limit: object) -> None:
        _require_httpx()
        self._transport = transport
        if pipeline_factory is not None and not callable(pipeline_factory):
            raise TypeError(f"pipeline_factory must be a callable(host) -> Pipeline / HostPipeline or None, "
                            f"got {show(pipeline_factory)}")
        self._factory = pipeline_factory
        self._per_host = check_bool("per_host", per_host)
        if hedge is not None:
            from .hedge import Hedge
            if not isinstance(hedge, Hedge):
                _check_hedge(hedge)     # now, not on the first request
        self._hedge = hedge
        if idempotency_header is not None and (not isinstance(idempotency_header, str) or not idempotency_header):
            raise TypeError(f"idempotency_header must be a header name (str) or None, got {show(idempotency_header)}")
        self._key_header = idempotency_header
        self._buffer_limit = check_int("buffer_limit", buffer_limit, minimum=0)
        self._clock = resolve_clock(clock) if clock is not None else None
        self._pipelines: dict[str, HostPipeline] = {}
        self._by_origin: dict[tuple[Any, ...], HostPipeline] = {}
        self._lock = threading.Lock()

    def pipeline_for(self, host: str) -> HostPipeline:
        """The pipeline of `host` ("scheme://host:port"), built on first use."""
        pipe = self._pipelines.get(host)
        if pipe is None:
            with self._lock:
                pipe = self._pipelines.get(host)
                if pipe is None:
                    if self._factory is not None:
                        made = self._factory(host)
                        pipe = HostPipeline.from_pipeline(made)
                        if pipe.hedge is None and self._hedge is not None:
                            pipe.hedge = self._hedge_for()
                    else:
                        pipe = default_pipeline(host, hedge=self._hedge_for(), clock=self._clock)
                    self._pipelines[host] = pipe
        return pipe

    def _hedge_for(self) -> Any:
        from .hedge import Hedge
        h = self._hedge
        if h is None or isinstance(h, Hedge):
            return h
        return Hedge(h, clock=self._clock, on_discard=_close_response)

    def _host(self, request: Any) -> str:
        """The pipeline key of a request: "scheme://host:port", or "*" with per_host=False."""
        if not self._per_host:
            return "*"
        url = request.url
        return f"{url.scheme}://{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"

    def _pipeline_of(self, request: Any) -> HostPipeline:
        if not self._per_host:
            return self.pipeline_for("*")
        url = request.url
        key = (url.raw_scheme, url.raw_host, url.port)      # cheaper than formatting the name
        pipe = self._by_origin.get(key)
        if pipe is None:
            pipe = self._by_origin[key] = self.pipeline_for(self._host(request))
        return pipe

    def _plan(self, request: Any) -> tuple[HostPipeline, bool, Any]:
        """(pipeline, whether the request may be retried, the hedge to use or None)."""
        pipe = self._pipeline_of(request)
        method = request.method
        if method in IDEMPOTENT_METHODS:        # no header lookups on the common path (they are slow)
            may_retry = _replayable(request)
            return pipe, may_retry, pipe.hedge if method in HEDGE_METHODS else None
        header = self._key_header
        headers = request.headers
        keyed = "idempotency-key" in headers or header is not None and header in headers
        if header is not None and header not in headers:
            request.extensions = {**request.extensions, "buttress_set_key": header}
            keyed = True
        return pipe, keyed and _replayable(request), None

    def _before_attempt(self, pipe: HostPipeline, request: Any) -> Any:
        """Checks and settings of one attempt; returns the breaker permit (or None)."""
        left = _context.remaining_ns()
        if left is not None and left <= 0:
            raise TimeoutExceeded(f"HTTP request to {request.url.host}: no time left of the total timeout "
                                  "before this attempt", timeout=pipe.timeout)
        limiter = pipe.limiter
        if limiter is not None and not limiter.try_acquire(1):
            raise RateLimitExceeded(retry_after=limiter.wait_time(1))
        breaker = pipe.breaker
        permit = None
        if breaker is not None:
            permit = breaker.try_acquire()
            if permit is None:
                raise breaker.rejection()
        ext = request.extensions
        header = ext.get("buttress_set_key")
        if header is not None:
            from .retry import current_attempt
            attempt = current_attempt()
            if attempt is not None:
                request.headers[header] = attempt.idempotency_key
        if left is not None:
            s = left / NS
            old = ext.get("timeout") or {}
            timeouts = {}
            for k in _TIMEOUT_KEYS:
                v = old.get(k)
                timeouts[k] = s if v is None or v > s else v
            request.extensions = {**ext, "timeout": timeouts}
        return permit

    @staticmethod
    def _error(exc: BaseException, permit: Any, may_retry: bool) -> Any:
        """An attempt raised: report it; re-raise it to retry, or carry it out as a value."""
        if permit is not None:
            permit.failure(exc)         # timeouts, connection errors: failures; BaseException: no outcome
        if not isinstance(exc, Exception):
            raise exc
        if (may_retry or _always_retryable(exc)) and isinstance(exc, _httpx.TransportError):
            raise exc
        return _Failed(exc)

    def _buffer(self, response: Any, may_retry: bool) -> bool:
        """Whether to read the body inside the attempt (so that a body breaking off is retried): a
        retryable request's answer with a Content-Length of at most `buffer_limit` bytes."""
        if not may_retry or not self._buffer_limit or hasattr(response, "_content"):
            return False
        length = response.headers.get("content-length")
        try:
            return length is not None and 0 <= int(length) <= self._buffer_limit
        except ValueError:
            return False

    def _classify(self, response: Any, permit: Any, may_retry: bool) -> bool:
        """Report the status to the breaker where it is final; True when the response should be retried
        (its body must then be read and the response raised as RetryableResponse)."""
        status = response.status_code
        if status >= 500:
            if permit is not None:
                permit.failure(_ServerError(status))
            return may_retry and status in RETRY_STATUSES
        if status == 429 and may_retry:
            if permit is not None:
                permit.success()        # a 4xx is the server answering: never a breaker failure
            return True
        return False


def _close_response(response: Any) -> None:
    close = getattr(response, "close", None)
    if close is not None:
        close()


def _outcome(result: Any) -> Any:
    if type(result) is _Failed:
        exc: BaseException | None
        exc = result.exc
        try:
            raise exc
        finally:
            exc = None
    return result


def _deadline(pipe: HostPipeline, clock: Any) -> Any:
    if pipe._timeout_ns is None:
        return None
    c = resolve_clock(clock)     # the testing switch's clock when none was given
    return _context.push_deadline(c.monotonic_ns() + pipe._timeout_ns, c)


if TYPE_CHECKING:    # type-checked against httpx (the `httpx` extra); at run time object stands in without it
    from httpx import AsyncBaseTransport as _AsyncBase
    from httpx import AsyncByteStream as _AsyncStream
    from httpx import BaseTransport as _SyncBase
    from httpx import SyncByteStream as _SyncStream
elif _httpx is not None:
    _SyncBase = _httpx.BaseTransport
    _AsyncBase = _httpx.AsyncBaseTransport
    _SyncStream = _httpx.SyncByteStream
    _AsyncStream = _httpx.AsyncByteStream
else:
    _SyncBase = _AsyncBase = _SyncStream = _AsyncStream = object


class _GuardedStream(_SyncStream):
    """A response body whose end (or failure) is the breaker's verdict on the request."""

    def __init__(self, inner: Any, permit: Any) -> None:
        self._inner, self._permit = inner, permit

    def __iter__(self) -> Any:
        try:
            for chunk in self._inner:
                yield chunk
        except BaseException as exc:  # GeneratorExit (closed early) and cancellation: no outcome
            self._permit.failure(exc)
            raise
        self._permit.success()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._permit.release()      # no-op after a verdict; closed before the end: no outcome


class _AsyncGuardedStream(_AsyncStream):
    def __init__(self, inner: Any, permit: Any) -> None:
        self._inner, self._permit = inner, permit

    async def __aiter__(self) -> Any:
        try:
            async for chunk in self._inner:
                yield chunk
        except BaseException as exc:  # noqa: BLE001 - reported, then re-raised
            self._permit.failure(exc)
            raise
        self._permit.success()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._permit.release()


class ResilientTransport(_Base, _SyncBase):
    """An httpx transport that sends every request through its host's pipeline (module docstring).

    `transport`: the transport that really sends (default: a new ``httpx.HTTPTransport()``).
    `pipeline_factory(host) -> Pipeline | HostPipeline`: each host's strategies (default:
    `default_pipeline`). `per_host`: one pipeline per ``scheme://host:port`` (True) or one for all.
    `hedge`: seconds, "pNN" or a Hedge: hedge GET / HEAD (sync attempts run on a thread pool).
    `idempotency_header`: e.g. "Idempotency-Key": a request of a non-idempotent method without that
    header gets the attempt's idempotency key in it (the same for every attempt), and is retried.
    `buffer_limit`: bytes; the answer to a retryable request with a Content-Length up to this is read
    inside the attempt, so a body that breaks off is retried (0: every body is streamed to the caller).
    """

    def __init__(self, transport: Any = None, *, pipeline_factory: Callable[[str], Any] | None = None,
                 per_host: bool = True, hedge: Any = None, idempotency_header: str | None = None,
                 clock: Any = None, buffer_limit: int = BUFFER_LIMIT) -> None:
        httpx = _require_httpx()
        if transport is None:
            transport = httpx.HTTPTransport()
        elif not callable(getattr(transport, "handle_request", None)):
            raise TypeError(f"transport must be an httpx transport (with handle_request), got {show(transport)}")
        self._setup(transport, pipeline_factory, per_host, hedge, idempotency_header, clock, buffer_limit)

    def handle_request(self, request: Any) -> Any:
        pipe, may_retry, hedge = self._plan(request)
        attempt = functools.partial(self._attempt, pipe, request, may_retry)
        token = _deadline(pipe, self._clock)
        try:
            fn = functools.partial(hedge.call, attempt) if hedge is not None else attempt
            result = pipe.retry.call(fn) if pipe.retry is not None else fn()
        except RetryableResponse as exc:
            return exc.response         # no retry followed: the last response, as a response
        finally:
            if token is not None:
                _context.pop_deadline(token)
        return _outcome(result)

    def _attempt(self, pipe: HostPipeline, request: Any, may_retry: bool) -> Any:
        permit = self._before_attempt(pipe, request)
        try:
            response = self._transport.handle_request(request)
        except BaseException as exc:  # noqa: BLE001 - sorted by _error
            return self._error(exc, permit, may_retry)
        if self._classify(response, permit, may_retry):
            try:
                response.read()
            except BaseException as exc:  # noqa: BLE001
                return self._error(exc, None, may_retry)
            finally:
                response.close()
            raise RetryableResponse(response, parse_retry_after(response.headers.get("retry-after")))
        if self._buffer(response, may_retry):
            try:
                response.read()
            except BaseException as exc:  # noqa: BLE001 - the reply broke off: sorted by _error
                response.close()
                return self._error(exc, permit if response.status_code < 500 else None, may_retry)
        if permit is not None and response.status_code < 500:
            if hasattr(response, "_content"):       # the body is already in memory: nothing left to fail
                permit.success()
            else:
                response.stream = _GuardedStream(response.stream, permit)
        return response

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> ResilientTransport:
        self._transport.__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        self._transport.__exit__(*args)


class AsyncResilientTransport(_Base, _AsyncBase):
    """The asyncio twin of `ResilientTransport` (default inner transport: ``httpx.AsyncHTTPTransport()``);
    hedged attempts run as tasks, a losing one is cancelled."""

    def __init__(self, transport: Any = None, *, pipeline_factory: Callable[[str], Any] | None = None,
                 per_host: bool = True, hedge: Any = None, idempotency_header: str | None = None,
                 clock: Any = None, buffer_limit: int = BUFFER_LIMIT) -> None:
        httpx = _require_httpx()
        if transport is None:
            transport = httpx.AsyncHTTPTransport()
        elif not callable(getattr(transport, "handle_async_request", None)):
            raise TypeError(f"transport must be an httpx async transport (with handle_async_request), "
                            f"got {show(transport)}")
        self._setup(transport, pipeline_factory, per_host, hedge, idempotency_header, clock, buffer_limit)

    async def handle_async_request(self, request: Any) -> Any:
        pipe, may_retry, hedge = self._plan(request)
        attempt = functools.partial(self._attempt, pipe, request, may_retry)
        token = _deadline(pipe, self._clock)
        try:
            fn = functools.partial(hedge.call_async, attempt) if hedge is not None else attempt
            result = await (pipe.retry.call_async(fn) if pipe.retry is not None else fn())
        except RetryableResponse as exc:
            return exc.response
        finally:
            if token is not None:
                _context.pop_deadline(token)
        return _outcome(result)

    async def _attempt(self, pipe: HostPipeline, request: Any, may_retry: bool) -> Any:
        permit = self._before_attempt(pipe, request)
        try:
            response = await self._transport.handle_async_request(request)
        except BaseException as exc:  # noqa: BLE001 - sorted by _error
            return self._error(exc, permit, may_retry)
        if self._classify(response, permit, may_retry):
            try:
                await response.aread()
            except BaseException as exc:  # noqa: BLE001
                return self._error(exc, None, may_retry)
            finally:
                await response.aclose()
            raise RetryableResponse(response, parse_retry_after(response.headers.get("retry-after")))
        if self._buffer(response, may_retry):
            try:
                await response.aread()
            except BaseException as exc:  # noqa: BLE001 - the reply broke off: sorted by _error
                await response.aclose()
                return self._error(exc, permit if response.status_code < 500 else None, may_retry)
        if permit is not None and response.status_code < 500:
            if hasattr(response, "_content"):       # the body is already in memory: nothing left to fail
                permit.success()
            else:
                response.stream = _AsyncGuardedStream(response.stream, permit)
        return response

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def __aenter__(self) -> AsyncResilientTransport:
        await self._transport.__aenter__()
        return self

    async def __aexit__(self, *args: Any) -> None:
        await self._transport.__aexit__(*args)
