"""Health probes with Kubernetes semantics: liveness, readiness and startup.

- **liveness** answers "is this process stuck?"; it never looks at dependencies (no breakers, no
  readiness checks), so a failing database never gets every pod restarted.
- **readiness** answers "should traffic come here?". An OPEN / FORCED_OPEN circuit breaker makes it
  "degraded" (HTTP 200 by default), not "down": a tripped breaker already protects the dependency, and
  pulling every replica out of the load balancer at once would turn one failing dependency into a
  full outage. `when_open="down"` opts out per breaker.
- **startup** gates the other two: until every startup check has passed, liveness and readiness report
  "starting" (HTTP 503) without running their checks. Once passed, startup stays passed.

Each check is a sync or async callable; it passes when it returns a truthy value within `timeout`
seconds without raising. `failure_threshold` / `success_threshold` count consecutive results before the
check's status flips (initially: liveness up, readiness down, startup starting); a result younger
than `period` seconds is reused instead of running the check again (and is not counted twice).

One run at a time per check (single flight): probes that arrive while a check runs wait for that run
and share its result, whatever `period` is (also across event loops and threads), so a flood of probes
costs one check per period (or per run), never one per probe. A check that cannot be started (the
worker pool of sync checks is full) answers its last result, or "down" when it has none: never an error.

`draining = True` (set by `buttress.lifecycle` on shutdown) makes readiness "draining" (HTTP 503) at
once, without running checks; liveness is not affected (a draining process must not be restarted).

Reports carry details (errors, durations, counts) for in-process use; `buttress.asgi.HealthEndpoints`
publishes only the status unless details are allowed. A falsy return value is never published with
its repr(): only its type is named (it may be an object holding secrets).

Async checks are timed on the registry's clock (`buttress.Timeout`, so a FakeClock drives them in
tests); sync checks run on a small worker pool and are awaited in real time (a thread cannot be
stopped: a hung sync check keeps its worker, and is reported as failing, without being started again,
until it returns).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from ._params import ASYNC, NS, SYNC, callable_kind, check_function, check_int, check_seconds, seconds_to_ns
from .clock import resolve_clock

__all__ = ["HealthRegistry", "HealthReport", "PROBES", "UP", "DEGRADED", "DOWN", "STARTING", "DRAINING"]

PROBES = ("liveness", "readiness", "startup")
UP, DEGRADED, DOWN, STARTING, DRAINING = "up", "degraded", "down", "starting", "draining"
_OPEN_STATES = ("OPEN", "FORCED_OPEN")
_INITIAL = {"liveness": True, "readiness": False, "startup": None}     # None: no verdict yet


class HealthReport(dict[str, Any]):
    """A probe's result: a dict ``{"probe", "status", "checks": {name: {...}}}`` with `http_status`
    (200 up, `degraded_http_status` for degraded, 503 down / starting) and `to_json()`."""

    def __init__(self, probe: str, status: str, checks: dict[str, dict[str, Any]], http_status: int) -> None:
        super().__init__(probe=probe, status=status, checks=checks)
        self.http_status = http_status

    @property
    def status(self) -> str:
        return str(self["status"])

    def public(self) -> dict[str, Any]:
        """What may be shown to anyone: the status alone (no check names, errors, durations, counts)."""
        return {"status": self["status"]}

    def to_json(self, indent: int | None = None, details: bool = True) -> str:
        """The report as JSON; ``details=False``: `public()` only."""
        return json.dumps(self if details else self.public(), indent=indent, sort_keys=False, default=str)


def _check_probe(probe: object) -> str:
    if not isinstance(probe, str) or probe not in PROBES:
        raise ValueError(f"probe must be one of {', '.join(map(repr, PROBES))}, got {probe!r}")
    return probe


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    return name


@dataclass(eq=False)
class _Check:
    probe: str
    name: str
    fn: Callable[[], Any]
    is_async: bool
    timeout: float
    period_ns: int
    failure_threshold: int
    success_threshold: int
    critical: bool
    passing: bool | None = None
    successes: int = 0          # consecutive
    failures: int = 0           # consecutive
    last_ns: int | None = None
    duration: float | None = None
    error: str | None = None
    running: Any = None         # the future of a sync check still running after its timeout
    flight: Any = None          # the _Flight of the run in progress (single flight), None when idle
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, ok: bool, duration: float, error: str | None, now_ns: int) -> None:
        with self.lock:
            self.last_ns, self.duration, self.error = now_ns, duration, error
            if ok:
                self.successes, self.failures = self.successes + 1, 0
                if self.successes >= self.success_threshold:
                    self.passing = True
            else:
                self.failures, self.successes = self.failures + 1, 0
                if self.failures >= self.failure_threshold:
                    self.passing = False

    def status(self) -> str:
        return STARTING if self.passing is None else UP if self.passing else DOWN

    def report(self, cached: bool) -> dict[str, Any]:
        with self.lock:
            return {"status": self.status(), "duration": self.duration, "error": self.error,
                    "consecutive_successes": self.successes, "consecutive_failures": self.failures,
                    "cached": cached, **({} if self.critical else {"critical": False})}

    def not_run(self, why: str) -> dict[str, Any]:
        """The answer of a run that could not take place: the last result (not counted again), or
        "down" when there is none. Nothing is recorded."""
        report = self.report(True)
        if self.last_ns is None:
            report.update(status=DOWN, error=why, cached=False)
        return report


class _Flight:
    """One run of a check that every concurrent probe shares: `future` (a concurrent.futures.Future,
    so probes on other event loops and threads can wait for it) and the loop that runs it."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self.loop = loop


_NOT_RUN = object()


@dataclass(eq=False)
class _BreakerCheck:
    breaker: Any
    when_open: str

    def report(self) -> dict[str, Any]:
        state = self.breaker.state
        name = getattr(state, "name", str(state))
        return {"status": self.when_open if name in _OPEN_STATES else UP, "state": name}


class HealthRegistry:
    """Liveness, readiness and startup checks; ``await check(probe)`` or ``check_sync(probe)``.

    `degraded_http_status` is the HTTP status of a "degraded" report (200: keep serving). `clock`
    times checks and cache periods (FakeClock in tests).
    """

    def __init__(self, clock: Any = None, degraded_http_status: int = 200) -> None:
        self._clock = resolve_clock(clock)
        self.degraded_http_status = check_int("degraded_http_status", degraded_http_status, minimum=100,
                                              maximum=599)
        self._checks: dict[str, dict[str, _Check]] = {p: {} for p in PROBES}
        self._breakers: dict[str, _BreakerCheck] = {}
        self._registries: list[tuple[Any, str]] = []
        self._lock = threading.Lock()
        self._started = False
        self._draining = False
        self._executor: Any = None
        self._tasks: set[asyncio.Task[None]] = set()      # runs in progress (strong references)

    # -- registration ------------------------------------------------------------------------------------
    def add_liveness(self, name: str, fn: Callable[[], Any], timeout: float = 1.0, period: float = 0.0,
                     failure_threshold: int = 1, success_threshold: int = 1) -> None:
        """A check that the process itself works (event loop responsive, no deadlock). Never a dependency."""
        self._add("liveness", name, fn, timeout, period, failure_threshold, success_threshold, True)

    def add_readiness(self, name: str, fn: Callable[[], Any], timeout: float = 1.0, period: float = 0.0,
                      failure_threshold: int = 1, success_threshold: int = 1, critical: bool = True) -> None:
        """A check that this instance can serve. A failing non-`critical` check makes readiness
        "degraded" instead of "down"."""
        self._add("readiness", name, fn, timeout, period, failure_threshold, success_threshold, critical)

    def add_startup(self, name: str, fn: Callable[[], Any], timeout: float = 1.0, period: float = 0.0,
                    failure_threshold: int = 1, success_threshold: int = 1) -> None:
        """A check that must pass once before liveness and readiness are evaluated. It reports
        "starting" until it passes, "down" after `failure_threshold` consecutive failures."""
        self._add("startup", name, fn, timeout, period, failure_threshold, success_threshold, True)

    def _add(self, probe: str, name: str, fn: Callable[[], Any], timeout: float, period: float,
             failure_threshold: int, success_threshold: int, critical: bool) -> None:
        _check_name(name)
        # called with no arguments, a plain or an async def function: a generator function would hand back
        # a (truthy) generator and always report "up", so it is refused here
        check_function("fn", fn, nargs=0, allow_none=False, kinds=(SYNC, ASYNC), role="fn() -> truthy when healthy")
        t = check_seconds("timeout", timeout, allow_zero=False)
        period_ns = seconds_to_ns("period", period)
        if not isinstance(critical, bool):
            raise TypeError(f"critical must be a bool, got {critical!r}")
        check = _Check(probe, name, fn, callable_kind(fn) == ASYNC, t, period_ns,
                       check_int("failure_threshold", failure_threshold, minimum=1),
                       check_int("success_threshold", success_threshold, minimum=1), critical,
                       passing=_INITIAL[probe])
        with self._lock:
            if name in self._checks[probe] or (probe == "readiness" and name in self._breakers):
                raise ValueError(f"a {probe} check named {name!r} already exists")
            self._checks[probe] = {**self._checks[probe], name: check}
            if probe == "startup":
                self._started = False

    def add_breaker(self, breaker: Any, affects: str = "readiness", when_open: str = DEGRADED,
                    name: str | None = None) -> None:
        """Report `breaker` in readiness: OPEN / FORCED_OPEN makes readiness `when_open` ("degraded" or
        "down"). The check is named "breaker:<breaker.name>" unless `name` is given."""
        if affects == "liveness":
            raise ValueError("affects='liveness' is not allowed: liveness never depends on dependencies "
                             "(a tripped breaker would restart every replica); use 'readiness'")
        if affects != "readiness":
            raise ValueError(f"affects must be 'readiness', got {affects!r}")
        if when_open not in (DEGRADED, DOWN):
            raise ValueError(f"when_open must be 'degraded' or 'down', got {when_open!r}")
        if not hasattr(breaker, "state"):
            raise TypeError(f"breaker must be a buttress.CircuitBreaker (with .state), got {breaker!r}")
        key = _check_name(name) if name is not None else f"breaker:{breaker.name}"
        with self._lock:
            if key in self._breakers or key in self._checks["readiness"]:
                raise ValueError(f"a readiness check named {key!r} already exists")
            self._breakers = {**self._breakers, key: _BreakerCheck(breaker, when_open)}

    def add_breakers(self, registry: Any = None, when_open: str = DEGRADED) -> None:
        """Report every circuit breaker of a `buttress.Registry` (the default registry when None) in
        readiness, including breakers added to it later."""
        if registry is None:
            from .registry import default_registry as registry
        if when_open not in (DEGRADED, DOWN):
            raise ValueError(f"when_open must be 'degraded' or 'down', got {when_open!r}")
        if not callable(getattr(registry, "entries", None)):
            raise TypeError(f"registry must be a buttress.Registry, got {registry!r}")
        with self._lock:
            self._registries = [*self._registries, (registry, when_open)]

    def remove(self, probe: str, name: str) -> None:
        """Remove a check (or a breaker, from readiness). KeyError if absent."""
        _check_probe(probe)
        with self._lock:
            if probe == "readiness" and name in self._breakers:
                self._breakers = {k: v for k, v in self._breakers.items() if k != name}
                return
            if name not in self._checks[probe]:
                raise KeyError(f"no {probe} check named {name!r}")
            self._checks[probe] = {k: v for k, v in self._checks[probe].items() if k != name}

    @property
    def started(self) -> bool:
        """True once every startup check has passed (or there are none)."""
        return self._started or not self._checks["startup"]

    @property
    def draining(self) -> bool:
        """True while the process is shutting down: readiness answers "draining" (503) without running
        its checks, so load balancers stop sending traffic; liveness and startup are not affected.
        `buttress.lifecycle` sets it; set it back to False to serve again."""
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"draining must be a bool, got {value!r}")
        self._draining = value

    # -- evaluation -------------------------------------------------------------------------------------
    async def check(self, probe: str) -> HealthReport:
        """Run (or reuse cached results of) the probe's checks and aggregate them."""
        _check_probe(probe)
        if probe == "readiness" and self._draining:
            return self._report(probe, DRAINING, {})
        if probe == "startup" or not self.started:
            startup = await self._startup()
            if probe == "startup":
                return startup
            if startup.status != UP:
                return self._report(probe, STARTING, {})
        checks = self._checks[probe]
        results = await asyncio.gather(*(self._run(c) for c in checks.values()))
        reports = dict(zip(checks, results))
        if probe == "liveness":
            return self._report(probe, DOWN if any(r["status"] != UP for r in reports.values()) else UP, reports)
        status = UP
        for r in reports.values():
            if r["status"] != UP:
                status = DOWN if r.get("critical", True) else _worse(status, DEGRADED)
        for key, bc in self._breaker_checks().items():
            r = reports[key] = bc.report()
            if r["status"] != UP:
                status = _worse(status, r["status"])
        return self._report(probe, status, reports)

    def check_sync(self, probe: str) -> HealthReport:
        """`check` for sync code (runs an event loop); not from inside a running loop."""
        _check_probe(probe)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.check(probe))
        raise RuntimeError("check_sync() called from a running event loop: use `await registry.check(...)`")

    async def _startup(self) -> HealthReport:
        checks = self._checks["startup"]
        if self._started or not checks:
            return self._report("startup", UP, {name: c.report(True) for name, c in checks.items()})
        results = await asyncio.gather(*(self._run(c) for c in checks.values()))
        reports = dict(zip(checks, results))
        statuses = {r["status"] for r in reports.values()}
        status = DOWN if DOWN in statuses else STARTING if STARTING in statuses else UP
        if status == UP:
            with self._lock:
                if self._checks["startup"] is checks:       # no startup check was added meanwhile
                    self._started = True
        return self._report("startup", status, reports)

    def _breaker_checks(self) -> dict[str, _BreakerCheck]:
        out = dict(self._breakers)
        for registry, when_open in self._registries:
            for entry in registry.entries("circuit_breaker"):
                out.setdefault(f"breaker:{entry.name}", _BreakerCheck(entry.obj, when_open))
        return out

    def _report(self, probe: str, status: str, checks: dict[str, dict[str, Any]]) -> HealthReport:
        code = 200 if status == UP else self.degraded_http_status if status == DEGRADED else 503   # down,
        # starting, draining
        return HealthReport(probe, status, checks, code)

    async def _run(self, c: _Check) -> dict[str, Any]:
        """The check's result: cached when younger than `period`, else the run in progress (joined), else a
        new run. The run is a task of its own, so a probe that goes away (a client disconnecting) does not
        abandon the probes that share it."""
        loop = asyncio.get_running_loop()
        start = self._clock.monotonic_ns()
        with c.lock:
            fresh = c.last_ns is not None and c.period_ns and start - c.last_ns < c.period_ns
            flight = None if fresh else c.flight
            if flight is not None and flight.loop.is_closed():  # its loop was closed under it: abandoned
                flight = None
            lead = not fresh and flight is None
            if lead:
                flight = c.flight = _Flight(loop)
        if fresh:
            return c.report(True)
        assert flight is not None
        if lead:
            task = loop.create_task(self._execute(c, flight, start))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return dict(await _wait(flight.future))

    async def _execute(self, c: _Check, flight: _Flight, start: int) -> None:
        result: dict[str, Any] | None = None
        try:
            outcome = await (self._call_async(c) if c.is_async else self._call_sync(c))
            if outcome is _NOT_RUN:
                result = c.not_run("not run: the health check pool is full")
            else:
                ok, error = outcome
                end = self._clock.monotonic_ns()
                c.record(ok, (end - start) / NS, error, end)
                result = c.report(False)
        except Exception as exc:  # noqa: BLE001 - e.g. a clock that failed: answered, never a task's
            # unretrieved exception (its message is not logged: it may hold what a check held)
            result = c.not_run(f"not run: {type(exc).__name__} while judging the check")
        finally:
            if result is None:      # cancelled (its event loop is closing)
                result = c.not_run("not run: the probe was cancelled")
            with c.lock:
                if c.flight is flight:
                    c.flight = None
            if not flight.future.done():
                flight.future.set_result(result)

    async def _call_async(self, c: _Check) -> tuple[bool, str | None]:
        from .errors import TimeoutExceeded
        from .timeout import Timeout
        try:
            result = await Timeout(c.timeout, clock=self._clock).call_async(c.fn)
        except TimeoutExceeded:
            return False, f"timed out after {c.timeout:g}s"
        except Exception as exc:  # noqa: BLE001 - a failing check is a result, not an error
            return False, _describe(exc)
        return _verdict(result)

    async def _call_sync(self, c: _Check) -> Any:
        from .errors import BulkheadFullError
        if c.running is not None and not c.running.done():
            return False, f"still running after its {c.timeout:g}s timeout (not started again)"
        try:
            fut = self._pool().submit(c.fn)
        except (BulkheadFullError, RuntimeError):       # full (hung checks), or shut down
            return _NOT_RUN
        try:
            result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), c.timeout)
        except asyncio.TimeoutError:
            c.running = fut
            return False, f"timed out after {c.timeout:g}s"
        except Exception as exc:  # noqa: BLE001
            return False, _describe(exc)
        if inspect.isawaitable(result):     # a sync callable that returns a coroutine: await it, timed
            return await self._await_result(c, result)
        return _verdict(result)

    async def _await_result(self, c: _Check, awaitable: Any) -> tuple[bool, str | None]:
        from .errors import TimeoutExceeded
        from .timeout import Timeout

        async def wait() -> Any:
            return await awaitable
        try:
            result = await Timeout(c.timeout, clock=self._clock).call_async(wait)
        except TimeoutExceeded:
            return False, f"timed out after {c.timeout:g}s"
        except Exception as exc:  # noqa: BLE001
            return False, _describe(exc)
        return _verdict(result)

    def _pool(self) -> Any:
        with self._lock:
            if self._executor is None:
                from .bulkhead import ThreadPoolBulkhead
                self._executor = ThreadPoolBulkhead(max_workers=8, queue_size=256, name="health")
            return self._executor

    def __repr__(self) -> str:
        counts = ", ".join(f"{p}={len(c)}" for p, c in self._checks.items())
        return f"HealthRegistry({counts}, breakers={len(self._breaker_checks())})"


def _worse(a: str, b: str) -> str:
    order = (UP, DEGRADED, DOWN)
    return a if order.index(a) >= order.index(b) else b


async def _wait(future: concurrent.futures.Future[Any]) -> Any:
    """Await a concurrent.futures.Future from any event loop. Cancelling the waiter leaves the future
    alone (asyncio.wrap_future would cancel it, and with it every other probe sharing the run)."""
    if not future.done():
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()

        def wake(_: Any) -> None:
            try:
                loop.call_soon_threadsafe(_settle, waiter)
            except RuntimeError:        # the waiter's loop is closed: nobody is waiting any more
                pass

        future.add_done_callback(wake)
        await waiter
    return future.result()


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _verdict(result: Any) -> tuple[bool, str | None]:
    """A falsy value is named by its type, never by its repr (an object may hold a password or a
    host name); False and None are their own description. A result whose truth value raises (a numpy
    array, a __bool__ that fails) is a failure named by the exception's type only: its message may
    hold what the result held."""
    try:
        if result:
            return True, None
    except Exception as exc:  # noqa: BLE001 - the check's result, not our error
        return False, f"check returned a {type(result).__name__} with no truth value ({type(exc).__name__})"
    if result is None or result is False:
        return False, f"check returned {result}"
    return False, f"check returned a falsy {type(result).__name__}"


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails is named by its type
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
