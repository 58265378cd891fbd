"""Graceful shutdown: stop taking work, tell the load balancer, wait for what is running, say what was left.

One call::

    report = buttress.lifecycle.shutdown(health=health, deadline=20.0)        # sync code
    report = await buttress.lifecycle.shutdown_async(health=health, deadline=20.0)

1. **Readiness turns 503 at once** (`HealthRegistry.draining`): load balancers stop sending traffic.
   Liveness is untouched: a draining process must not be restarted.
2. **New work is shed** with `buttress.Overloaded` carrying `retry_after` (a `Lifecycle.admit()`, and
   the ASGI `ShutdownMiddleware`, answer 503 with Retry-After); bulkheads, shedders and thread pools
   with a ``drain`` method stop admitting themselves.
3. **In-flight work is waited for** up to `deadline` seconds, all objects at once: each object's own
   ``drain_async(timeout)`` / ``drain(timeout)`` where it has one, else its in-flight count
   (``metrics()``) is polled until it reaches zero.
4. **The report** (`ShutdownReport`) says what was still running when the deadline passed, per object.

The objects are given explicitly (bulkheads, load shedders, thread-pool bulkheads, `Registry` objects,
`HealthRegistry` objects) or read from a `buttress.Registry` when the drain begins (the default
registry when nothing is given). `Lifecycle` is the same as an object that an application keeps: its
`admit()` counts the application's own in-flight work (the ASGI middleware counts requests with it),
and `handle_signals()` turns SIGTERM into this drain before the server's own shutdown.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ._params import check_seconds as _check_seconds, show
from .clock import resolve_clock
from .errors import Overloaded

__all__ = ["Lifecycle", "ShutdownReport", "Drained", "shutdown", "shutdown_async"]

log = logging.getLogger("buttress.lifecycle")

_KINDS = ("bulkhead", "load_shedder", "thread_pool_bulkhead")     # what a Registry holds that runs work
def check_seconds(name: str, value: object) -> float:
    seconds = _check_seconds(name, value)
    assert seconds is not None          # allow_none is off
    return seconds


_POLL = 0.01                # seconds between in-flight reads of an object without a drain method


@dataclass(frozen=True)
class Drained:
    """One object's drain: `name` ("bulkhead 'db'", "requests"), `kind`, `in_flight` when the drain
    began (None if it cannot be read), `still_running` when it ended (0: drained; None: unknown),
    `how` it was waited for ("drain_async", "drain" or "polled") and `detail`: what the object's own
    drain returned, or the text of the error it raised."""

    name: str
    kind: str
    in_flight: int | None
    still_running: int | None
    how: str
    detail: Any = None

    def to_dict(self) -> dict[str, Any]:
        detail = self.detail if self.detail is None or isinstance(self.detail, (int, float, str, bool)) \
            else show(self.detail)
        return {"name": self.name, "kind": self.kind, "in_flight": self.in_flight,
                "still_running": self.still_running, "how": self.how, "detail": detail}


@dataclass(frozen=True)
class ShutdownReport:
    """What a drain found: `deadline` (s), `elapsed` (s, on the lifecycle's clock) and one `Drained`
    per object. `completed` is True when nothing was left running; `still_running` maps the names of
    the objects with work left to its count."""

    deadline: float
    elapsed: float
    drained: tuple[Drained, ...]

    @property
    def completed(self) -> bool:
        return all(d.still_running == 0 for d in self.drained)

    @property
    def still_running(self) -> dict[str, int | None]:
        return {d.name: d.still_running for d in self.drained if d.still_running != 0}

    def to_dict(self) -> dict[str, Any]:
        return {"completed": self.completed, "deadline": self.deadline, "elapsed": self.elapsed,
                "still_running": self.still_running, "drained": [d.to_dict() for d in self.drained]}

    def __str__(self) -> str:
        if self.completed:
            return f"drained in {self.elapsed:.3g}s ({len(self.drained)} objects)"
        left = ", ".join(f"{name}: {'unknown' if n is None else n}" for name, n in self.still_running.items())
        return f"deadline of {self.deadline:g}s passed with work still running ({left})"


# -- what an object is -------------------------------------------------------------------------------------

def _is_health(obj: Any) -> bool:
    return hasattr(type(obj), "draining") and callable(getattr(obj, "check", None))


def _is_registry(obj: Any) -> bool:
    return callable(getattr(obj, "entries", None)) and callable(getattr(obj, "register", None))


def _kind(obj: Any) -> str:
    from .bulkhead import Bulkhead, ThreadPoolBulkhead
    from .shedding import LoadShedder
    for cls, kind in ((Bulkhead, "bulkhead"), (LoadShedder, "load_shedder"),
                      (ThreadPoolBulkhead, "thread_pool_bulkhead")):
        if isinstance(obj, cls):
            return kind
    return type(obj).__name__


def _label(kind: str, obj: Any) -> str:
    name = getattr(obj, "name", None)
    return f"{kind} {name!r}" if isinstance(name, str) else f"{kind} at {id(obj):#x}"


def _in_flight(obj: Any) -> int | None:
    """Calls running in (or accepted by) `obj` now, from its metrics(): in_flight (LoadShedder), in_use
    (Bulkhead), running + queued (ThreadPoolBulkhead); None when it says none of these."""
    try:
        m = obj.metrics() if callable(getattr(obj, "metrics", None)) else obj
        for attr in ("in_flight", "in_use"):
            value = getattr(m, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        running = getattr(m, "running", None)
        if isinstance(running, int) and not isinstance(running, bool):
            queued = getattr(m, "queued", 0)
            return running + (queued if isinstance(queued, int) else 0)
    except Exception:  # noqa: BLE001 - a failing metrics() is an unknown count, not a failed shutdown
        log.debug("buttress.lifecycle: metrics() of %r failed", obj, exc_info=True)
    return None


def _drainable(obj: Any) -> bool:
    return (callable(getattr(obj, "drain_async", None)) or callable(getattr(obj, "drain", None))
            or _in_flight(obj) is not None)


def _count(result: Any) -> int | None:
    """What an object's drain returned, as a count of what was still running: an int as it is, a
    collection by its length, an object by its `still_running` / `in_flight` / `running` attribute."""
    if isinstance(result, bool):
        return None
    if isinstance(result, int):
        return result
    for attr in ("still_running", "in_flight", "running", "in_use"):
        value = getattr(result, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    try:
        return len(result)
    except TypeError:
        return None


# -- the coordinator ---------------------------------------------------------------------------------------

class _Own:
    """The lifecycle's own in-flight count (requests of the ASGI middleware, `admit()` blocks)."""

    name = "requests"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.used = False           # admit() (or the ASGI middleware) was used: the report lists "requests"


class _Admission:
    __slots__ = ("_lifecycle", "_held")

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle
        self._held = False

    def __enter__(self) -> _Admission:
        if self._held:
            raise RuntimeError("this admission is already entered: use one lifecycle.admit() per call")
        self._lifecycle._enter()
        self._held = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._held:
            self._held = False
            self._lifecycle._exit()

    async def __aenter__(self) -> _Admission:
        return self.__enter__()

    async def __aexit__(self, *exc: Any) -> None:
        self.__exit__(*exc)


class Lifecycle:
    """Graceful shutdown of a process: `begin()` (readiness 503, new work shed), `shutdown(deadline)` /
    ``await shutdown_async(deadline)`` (begin, then wait for in-flight work up to the deadline; returns
    a `ShutdownReport`), `admit()` (the application's own work: refused with `Overloaded` once the
    drain began), `handle_signals()` (SIGTERM starts the drain, then the server's own handler runs).

    - ``objects``: bulkheads, load shedders, thread-pool bulkheads (anything with ``drain_async`` /
      ``drain(timeout)``, or whose ``metrics()`` has an in-flight count), `Registry` objects (their
      bulkheads, shedders and thread pools, read when the drain begins) and `HealthRegistry` objects.
    - ``registry``: a `buttress.Registry` to read as well; when neither objects nor a registry are
      given, the default registry.
    - ``health``: a `HealthRegistry` (or several) whose readiness turns "draining" (503) at once.
    - ``retry_after``: seconds, carried by the `Overloaded` of shed work (and the ASGI Retry-After):
      when to try again, through the load balancer, which no longer sends here.
    - ``on_report``: called with the `ShutdownReport` once it is made (e.g. to log it somewhere).
    - ``clock``: the deadline's clock (FakeClock in tests).

    The drain runs once: a second `shutdown()` (or one from another thread or event loop) waits for
    the first and returns the same report.
    """

    def __init__(self, *objects: Any, registry: Any = None, health: Any = None, retry_after: float = 1.0,
                 on_report: Callable[[ShutdownReport], Any] | None = None, clock: Any = None) -> None:
        self._objects: list[Any] = []
        self._registries: list[Any] = []
        self._health: list[Any] = []
        for obj in objects:
            self._add(obj)
        if registry is not None:
            if not _is_registry(registry):
                raise TypeError(f"registry must be a buttress.Registry or None, got {show(registry)}")
            self._registries.append(registry)
        elif not self._objects and not self._registries:
            from .registry import default_registry
            self._registries.append(default_registry)
        for h in (health if isinstance(health, (list, tuple)) else () if health is None else (health,)):
            if not _is_health(h):
                raise TypeError(f"health must be a buttress.health.HealthRegistry (or a list of them) or None, "
                                f"got {show(h)}")
            self._health.append(h)
        self.retry_after = check_seconds("retry_after", retry_after)
        if on_report is not None and not callable(on_report):
            raise TypeError(f"on_report must be a callable(report) or None, got {show(on_report)}")
        self._on_report = on_report
        self._clock = resolve_clock(clock)
        self._own = _Own()
        self._draining = False
        self._began_ns: int | None = None
        self._report: concurrent.futures.Future[ShutdownReport] | None = None
        self._report_lock = threading.Lock()
        self._signals: dict[int, Any] = {}     # signal -> the handler it had before handle_signals()
        self._signalled = False
        self._signal_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signal_deadline = 30.0

    def _add(self, obj: Any) -> None:
        if _is_health(obj):
            self._health.append(obj)
        elif _is_registry(obj):
            self._registries.append(obj)
        elif _drainable(obj):
            self._objects.append(obj)
        else:
            raise TypeError(f"objects must be bulkheads, load shedders, thread-pool bulkheads (with drain / "
                            f"drain_async or an in-flight count in metrics()), Registry or HealthRegistry "
                            f"objects, got {show(obj)}")

    # -- state ---------------------------------------------------------------------------------------------
    @property
    def draining(self) -> bool:
        """True from `begin()` on: new work is refused."""
        return self._draining

    @property
    def in_flight(self) -> int:
        """Work admitted through `admit()` (or the ASGI middleware) and still running."""
        return self._own.count

    @property
    def report(self) -> ShutdownReport | None:
        """The report of the drain, once it is done."""
        fut = self._report
        return fut.result() if fut is not None and fut.done() else None

    # -- the application's own work -----------------------------------------------------------------------
    def admit(self) -> _Admission:
        """``with lifecycle.admit():`` / ``async with``: counts the block as in-flight work the drain waits
        for; once the drain began, raises `Overloaded` (with `retry_after`) instead."""
        return _Admission(self)

    def _refusal(self) -> Overloaded:
        return Overloaded(f"shutting down: new work is refused (retry after {self.retry_after:g}s)",
                          retry_after=self.retry_after)

    def _enter(self) -> None:
        own = self._own
        with own.lock:
            if self._draining:
                raise self._refusal()
            own.count += 1
            own.used = True

    def _exit(self) -> None:
        own = self._own
        with own.lock:
            own.count -= 1

    # -- the drain ----------------------------------------------------------------------------------------
    def begin(self) -> None:
        """Readiness 503 and new work refused, at once (idempotent). Takes no lock, so a signal handler
        may call it."""
        if not self._draining:
            self._began_ns = self._clock.monotonic_ns()
            self._draining = True
        for h in self._health:
            h.draining = True

    def _targets(self) -> list[tuple[str, str, Any]]:
        seen: set[int] = set()
        out: list[tuple[str, str, Any]] = []
        objects = list(self._objects)
        for registry in self._registries:
            objects += [entry.obj for kind in _KINDS for entry in registry.entries(kind)]
        for obj in objects:
            if id(obj) not in seen:
                seen.add(id(obj))
                kind = _kind(obj)
                out.append((_label(kind, obj), kind, obj))
        return out

    def shutdown(self, deadline: float = 30.0) -> ShutdownReport:
        """Begin, then wait up to `deadline` seconds for in-flight work; the report. Not from inside a
        running event loop (use ``await shutdown_async()``)."""
        d = check_seconds("deadline", deadline)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._shutdown(d, prefer_sync=True))
        raise RuntimeError("Lifecycle.shutdown() called from a running event loop: use "
                           "`await lifecycle.shutdown_async(...)`")

    async def shutdown_async(self, deadline: float = 30.0) -> ShutdownReport:
        """`shutdown` for async code: the event loop keeps serving while in-flight work finishes."""
        return await self._shutdown(check_seconds("deadline", deadline), prefer_sync=False)

    async def _shutdown(self, deadline: float, prefer_sync: bool) -> ShutdownReport:
        from .health import _wait
        self.begin()
        with self._report_lock:
            lead = self._report is None
            if lead:
                self._report = concurrent.futures.Future()
            fut = self._report
        assert fut is not None
        if not lead:
            report: ShutdownReport = await _wait(fut)        # the drain in progress (or done): its report
            return report
        try:
            report = await self._drain(deadline, prefer_sync)
        except BaseException as exc:
            fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError(f"the drain was interrupted "
                                                                                 f"({type(exc).__name__})"))
            with self._report_lock:
                self._report = None         # a later shutdown() drains again
            raise
        fut.set_result(report)
        (log.info if report.completed else log.warning)("buttress.lifecycle: %s", report)
        if self._on_report is not None:
            try:
                self._on_report(report)
            except Exception:  # noqa: BLE001 - a failing hook must not fail the shutdown
                log.exception("buttress.lifecycle: on_report failed")
        return report

    async def _drain(self, deadline: float, prefer_sync: bool) -> ShutdownReport:
        clock = self._clock
        began = self._began_ns if self._began_ns is not None else clock.monotonic_ns()
        end_ns = began + int(deadline * 1e9)
        targets = self._targets()
        own = [self._drain_own(end_ns)] if self._own.used else []
        results = await asyncio.gather(*own, *(self._drain_one(t, end_ns, prefer_sync) for t in targets))
        return ShutdownReport(deadline, (clock.monotonic_ns() - began) / 1e9, tuple(results))

    def _left(self, end_ns: int) -> float:
        return max(0.0, (end_ns - self._clock.monotonic_ns()) / 1e9)

    async def _poll(self, read: Callable[[], int | None], end_ns: int) -> int | None:
        clock = self._clock
        while True:
            n = read()
            left = self._left(end_ns)
            if not n or left <= 0:
                return n
            await clock.sleep_async(min(_POLL, left))

    async def _drain_own(self, end_ns: int) -> Drained:
        before = self._own.count
        left = await self._poll(lambda: self._own.count, end_ns)
        return Drained("requests", "lifecycle", before, left, "polled")

    async def _drain_one(self, target: tuple[str, str, Any], end_ns: int, prefer_sync: bool) -> Drained:
        name, kind, obj = target
        before = _in_flight(obj)
        drain_async: Any = getattr(obj, "drain_async", None)
        drain: Any = getattr(obj, "drain", None)
        use_sync = callable(drain) and (prefer_sync or not callable(drain_async))
        if not callable(drain_async) and not callable(drain):
            return Drained(name, kind, before, await self._poll(lambda: _in_flight(obj), end_ns), "polled")
        how = "drain" if use_sync else "drain_async"
        try:
            if use_sync:
                result = await asyncio.get_running_loop().run_in_executor(None, drain, self._left(end_ns))
            else:
                result = await drain_async(self._left(end_ns))
        except Exception as exc:  # noqa: BLE001 - one object's failure must not stop the others' drain
            log.warning("buttress.lifecycle: %s.%s failed (%s: %s); waiting for its in-flight count instead",
                        name, how, type(exc).__name__, exc)
            left = await self._poll(lambda: _in_flight(obj), end_ns)
            return Drained(name, kind, before, left, "polled", f"{how} failed: {type(exc).__name__}: {exc}")
        left = _count(result)
        return Drained(name, kind, before, _in_flight(obj) if left is None else left, how, result)

    # -- signals ------------------------------------------------------------------------------------------
    def handle_signals(self, deadline: float = 30.0, signals: Iterable[int] = (signal.SIGTERM,)) -> bool:
        """From the main thread, inside a running event loop (an ASGI server's lifespan startup): on the
        first of `signals`, `begin()` at once (in the handler), drain up to `deadline` seconds on the
        loop, then call the handler the signal had before (the server's own: uvicorn then stops
        accepting, waits for its connections and runs the lifespan shutdown). A second signal goes to
        the previous handler at once. False (nothing installed) outside the main thread."""
        self._signal_deadline = check_seconds("deadline", deadline)
        sigs = [signal.Signals(s) for s in signals]
        if threading.current_thread() is not threading.main_thread():
            return False
        self._loop = asyncio.get_running_loop()
        for sig in sigs:
            if sig not in self._signals:
                self._signals[sig] = signal.signal(sig, self._on_signal)
        return True

    def restore_signals(self) -> None:
        """Give the signals back to the handlers they had before `handle_signals()`."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in list(self._signals.items()):
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, previous)
            del self._signals[sig]

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signalled or self._loop is None or self._loop.is_closed():
            self._chain(signum, frame)      # a second signal, or no loop to drain on: the server's turn
            return
        self._signalled = True
        self.begin()                        # readiness 503 and new work refused before anything else runs
        self._loop.call_soon_threadsafe(self._start_drain, signum)

    def _start_drain(self, signum: int) -> None:
        assert self._loop is not None
        log.info("buttress.lifecycle: %s: draining (readiness 503, new work refused) for up to %gs",
                 signal.Signals(signum).name, self._signal_deadline)
        self._signal_task = self._loop.create_task(self._drain_then_chain(signum))

    async def _drain_then_chain(self, signum: int) -> None:
        try:
            await self.shutdown_async(self._signal_deadline)
        finally:
            self._chain(signum, None)

    def _chain(self, signum: int, frame: Any) -> None:
        previous = self._signals.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous is None or previous == signal.SIG_DFL:    # the default action (terminate), as if we had never been here
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def __repr__(self) -> str:
        return (f"Lifecycle(draining={self._draining}, in_flight={self._own.count}, objects={len(self._objects)}, "
                f"registries={len(self._registries)}, health={len(self._health)})")


def shutdown(*objects: Any, registry: Any = None, health: Any = None, deadline: float = 30.0,
             retry_after: float = 1.0, clock: Any = None) -> ShutdownReport:
    """Graceful shutdown in one call (see `Lifecycle`): readiness 503 at once, new work shed, in-flight
    work waited for up to `deadline` seconds; returns the `ShutdownReport`."""
    return Lifecycle(*objects, registry=registry, health=health, retry_after=retry_after,
                     clock=clock).shutdown(deadline)


async def shutdown_async(*objects: Any, registry: Any = None, health: Any = None, deadline: float = 30.0,
                         retry_after: float = 1.0, clock: Any = None) -> ShutdownReport:
    """`shutdown` for async code."""
    return await Lifecycle(*objects, registry=registry, health=health, retry_after=retry_after,
                           clock=clock).shutdown_async(deadline)
