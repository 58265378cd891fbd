"""Circuit breaker: a Resilience4j-grade state machine over the lock-free core.

The decision and the bookkeeping live in the core (`buttress._core.breaker`, or its twin); this module
adds what needs Python: the `clock=` object, listeners, `metrics()` snapshots, the context-manager and
async forms. A decorated sync function is the core's vectorcall guard itself, so a guarded call
crosses the C boundary once.

Two breakers share the core, its state word and every form: the rate breaker (Resilience4j: failure and
slow-call rates over a sliding window) and the classic breaker (`failure_threshold=N`: N consecutive
failures open it, `success_threshold=M` consecutive half-open successes close it).

State (DESIGN §5): `store=None` keeps the process-local words. With `store=` (a Store or a URL) and
`name=`, breakers of that name in the store share one state: in a word store (memory://, shm://) the core
decides with the same CAS on words that live in the store (the twin: under the store's lock); in a Redis
store (time window only) the store's scripts make the transitions and issue the half-open permits, and
the local core decides while the store is down (on_error="local").
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from fractions import Fraction
from inspect import isawaitable
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Literal, ParamSpec, TypeVar, overload

from ._base import Policy
from ._breaker_conf import DEFAULTS, BreakerConf, State, breaker_conf, open_duration_ns
from ._impl import IMPLEMENTATION, core
from ._observe import check_listener
from ._params import ASYNC
from ._wrap import CORO, check_decoratable, wraps
from .bulkhead import mark_async
from .clock import is_system_clock, resolve_clock

__all__ = ["CircuitBreaker", "State", "Permit", "BreakerEvent", "BreakerMetrics", "EVENTS"]

_core = core("breaker")
if TYPE_CHECKING:  # the twin is the compiled core's spec: same names, signatures and results
    from ._twin.breaker import BreakerCore as _BreakerCore
    from ._twin.breaker import Permit as Permit
else:
    _BreakerCore = _core.BreakerCore
    Permit = _core.Permit
log = logging.getLogger("buttress.circuit_breaker")
F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
T = TypeVar("T")
Y = TypeVar("Y")

EVENTS = frozenset({"state_change", "success", "error", "ignored", "not_permitted", "failure_rate_exceeded",
                    "slow_call_rate_exceeded"})

@dataclass(frozen=True)
class BreakerMetrics:
    """A snapshot: the current window's counts and rates (-1.0 below the minimum), refusals since
    creation or reset(), and the state."""
    state: State
    calls: int
    failures: int
    slow_calls: int
    failure_rate: float
    slow_call_rate: float
    not_permitted: int


@dataclass(frozen=True, slots=True)
class BreakerEvent:
    """What listeners receive. `old`/`new` for state_change, `exception` for error/ignored,
    `duration` (s) for success/error, `rate` for *_rate_exceeded."""
    kind: str
    breaker: str
    old: State | None = None
    new: State | None = None
    exception: BaseException | None = None
    duration: float | None = None
    rate: float | None = None


class CircuitBreaker(_BreakerCore, Policy):
    """Refuses calls while a dependency is failing; see docs/circuit-breaker.md.

    >>> cb = CircuitBreaker(name="payment", failure_rate_threshold=0.5, window_size=20, minimum_calls=10)
    >>> @cb
    ... def charge(): ...
    """

    store: Any = None                  # the Store given as store= (None: process-local)
    _cluster: "_Cluster | None" = None  # a Redis store's shared breaker (the core's remote), else None

    def __init__(self, name: str | None = None, failure_rate_threshold: float = DEFAULTS["failure_rate_threshold"],
                 slow_call_rate_threshold: float = DEFAULTS["slow_call_rate_threshold"],
                 slow_call_duration: float | None = DEFAULTS["slow_call_duration"], window: str = DEFAULTS["window"],
                 window_size: int = DEFAULTS["window_size"], minimum_calls: int = DEFAULTS["minimum_calls"],
                 open_duration: float | Callable[[int], float] = DEFAULTS["open_duration"],
                 half_open_calls: int = DEFAULTS["half_open_calls"], half_open_max_wait: float | None = None,
                 record: Any = (Exception,), ignore: Any = (), record_result: Callable[[Any], Any] | None = None,
                 clock: Any = None, *, failure_threshold: int | None = None, success_threshold: int | None = None,
                 timeout: float | Callable[[int], float] | None = None, store: Any = None) -> None:
        clk = resolve_clock(clock)
        clock_ns = None if is_system_clock(clock) else clk.monotonic_ns
        args = ["default" if name is None else name, failure_rate_threshold, slow_call_rate_threshold, slow_call_duration, window, window_size,
                minimum_calls, open_duration, half_open_calls, half_open_max_wait, record, ignore, record_result,
                clock_ns, failure_threshold, success_threshold, timeout]
        words = locker = None
        if store is not None:
            st = _open_store(store, name, clock)
            conf = breaker_conf(*args)          # the arguments, checked (the same errors as without a store)
            if half_open_max_wait is None:
                # a prober killed mid-probe keeps its half-open permit until half_open_max_wait re-opens:
                # with a store it defaults to the open duration, so such a breaker always recovers
                args[9] = Fraction(open_duration_ns(conf, 1, log), 10**9)
                conf = breaker_conf(*args)
            from .stores import WordStore
            if isinstance(st, WordStore):
                words, locker = _bind(st, conf, clk if clock_ns is not None else None)
            elif conf.classic:
                raise ValueError(f"CircuitBreaker: the classic breaker (failure_threshold={conf.failure_threshold}) "
                                 f"cannot be shared through store={st.url!r}: it counts consecutive calls, which "
                                 f"have no order across processes; use the rate breaker with window='time' "
                                 f"(failure_rate_threshold=, window_size=, minimum_calls=) instead of "
                                 f"failure_threshold= / success_threshold= / timeout=")
            elif not conf.time_window:
                raise ValueError(f"CircuitBreaker: store={st.url!r} shares a time window only (per-second "
                                 f"buckets every process flushes into): window='count' has no meaning across "
                                 f"processes; pass window='time'")
            self.store = st
        # args holds the 17 positional parameters (mypy cannot count a list's length)
        super().__init__(*args, words=words, locker=locker)  # type: ignore[misc]
        if self.store is not None and words is None:
            self._cluster = _Cluster(self, self.store.breaker(self.name, self.conf, on_change=self._cluster_changed))
            self._set_remote(self._cluster)
        self.clock = clk
        self._listeners: dict[str, list[Callable[[BreakerEvent], Any]]] = {}
        # one bound method for the life of the breaker: the core's hook only ever holds this or None
        self._dispatch_hook = self._dispatch
        # an instance attribute, so `cb.call(fn, ...)` is the vectorcall guard, not a bound method; and
        # `cb.call_async(fn, ...)` its async entry (the compiled awaitable), except for a Redis store's
        # shared breaker, whose async forms await the store's round trips (the method below)
        self.call = self.make_call()  # type: ignore[method-assign]
        if self._cluster is None:
            self.call_async = self.make_call(True)  # type: ignore[method-assign]

    if TYPE_CHECKING:  # at run time the instance's `call` is the core's guard (set in __init__)
        def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
            """Call fn(*args, **kwargs) under the breaker; returns its result."""

    # -- forms ------------------------------------------------------------------------------------------
    def __call__(self, fn: F) -> F:
        """Decorate a function, an async function, a method, or a generator / async generator function
        (guarded over its whole iteration). The wrapper pickles by reference."""
        if check_decoratable(self, fn, generators=True) == ASYNC:
            cluster = self._cluster
            if cluster is None:
                # the core's async guard: the permit in C, a compiled awaitable drives fn's coroutine and
                # records its outcome when it finishes (no Python frame; a refusal raises when awaited)
                return wraps(fn)(mark_async(self.guard(fn, True), fn))
            enter, exit_ok, exit_err, settle = self.enter, self.exit_ok, self.exit_err, self.settle

            async def guarded(*args: Any, **kwargs: Any) -> Any:
                token, start = await cluster.enter_async()
                try:
                    aw = fn(*args, **kwargs)
                    if type(aw) is not CORO and not isawaitable(aw):
                        return settle(token, start, fn, aw, True)    # UsageError, permit returned
                    result = await aw
                except BaseException as exc:
                    exit_err(token, start, exc)
                    raise
                exit_ok(token, start, result)
                return result

            return wraps(fn)(guarded)
        # sync functions, and (generator / async generator) functions whose stream the guard holds the
        # permit over: the core's guard itself (the compiled one is a C vectorcall entry)
        return wraps(fn)(self.guard(fn))

    @overload
    async def call_async(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T: ...
    @overload
    async def call_async(self, fn: Callable[P, AsyncIterator[Y]], /, *args: P.args,
                         **kwargs: P.kwargs) -> AsyncIterator[Y]: ...

    async def call_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Await fn(*args, **kwargs) under the breaker. For an async generator function, returns its
        generator guarded over the whole iteration. A sync function is a TypeError (use call()).
        (Replaced per instance by the core's compiled async entry, except on a Redis store.)"""
        if not callable(fn):            # the caller's error: before any permit (never a dependency failure)
            raise TypeError(f"fn must be callable, got {fn!r}")
        token, start = self.enter() if self._cluster is None else await self._cluster.enter_async()
        try:
            aw = fn(*args, **kwargs)
            if type(aw) is not CORO and not isawaitable(aw):
                # an async generator: guarded over its iteration; anything else: UsageError, permit returned
                return self.settle(token, start, fn, aw, True)
            result = await aw
        except BaseException as exc:
            self.exit_err(token, start, exc)
            raise
        self.exit_ok(token, start, result)
        return result

    # `with cb:` / `async with cb:` are the core's (compiled: a C __enter__, the acquisition recorded under
    # the caller's frame -- else, for an exit stack, the thread and contextvars.Context -- so nested and
    # interleaved blocks across tasks, threads and generators each report their own outcome; a second exit
    # of one acquisition is a no-op). Both return the breaker.
    if TYPE_CHECKING:
        def __enter__(self) -> CircuitBreaker: ...
        def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Literal[False]: ...
        def __aenter__(self) -> Awaitable[CircuitBreaker]: ...
        def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Awaitable[Literal[False]]: ...

    # -- state ------------------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        c = self._cluster
        if c is not None and c.shared_now():
            return State(c.state())
        return State(self.state_now())

    def metrics(self) -> BreakerMetrics:  # type: ignore[override]
        s, calls, failures, slow, fr, sr, refused = super().metrics()
        c = self._cluster
        if c is not None and c.shared_now():
            v = c.shared.view
            s, minimum = c.state(), self.conf.minimum_calls
            calls, failures, slow = max(0, v.calls), max(0, v.failures), max(0, v.slow_calls)
            ok = calls >= minimum and calls > 0
            fr, sr = (failures / calls, slow / calls) if ok else (-1.0, -1.0)
        return BreakerMetrics(State(s), calls, failures, slow, fr, sr, refused)

    def restart(self, state: int, now: int | None = None) -> None:
        """Enter a manual state (see the core); with a Redis store, the fleet's state (this process
        follows it when the change comes back; while the store is down, this process alone)."""
        c = self._cluster
        if c is not None and c.shared.transition(int(state), reset=int(state) == State.CLOSED):
            return
        super().restart(state, now)

    def reset(self, now: int | None = None) -> None:
        """CLOSED with an empty window, attempt 0, not_permitted 0 (a new generation)."""
        c = self._cluster
        if c is not None:
            c.shared.transition(State.CLOSED, reset=True)
        super().reset(now)

    def _cluster_changed(self, old: Any, new: Any) -> None:
        # the fleet's state moved (seen by a sync or a round trip): this process's core follows it, so a
        # later outage starts from the fleet's state, and its listeners get the state_change event
        try:
            cur = self.load()[0]
            if new.state == cur:
                return
            if new.state == State.HALF_OPEN and cur != State.OPEN:
                self.transition_to(State.OPEN)
            if new.state in (State.OPEN, State.HALF_OPEN):
                self.transition_to(new.state)
            else:
                super().restart(new.state)
        except ValueError:       # moved meanwhile
            pass

    # Each manual move starts a new generation, also from the state it enters (results of permits
    # issued before it are dropped); state_change fires only on a real change (DESIGN §3c).
    def force_open(self) -> None:
        """Refuse every call until another transition (keeps the window, for metrics())."""
        self.restart(State.FORCED_OPEN)

    def disable(self) -> None:
        """Admit every call and record nothing (keeps the window, for metrics())."""
        self.restart(State.DISABLED)

    def metrics_only(self) -> None:
        """Admit every call, record it into a fresh window, never transition."""
        self.restart(State.METRICS_ONLY)

    def close(self) -> None:
        """Move to CLOSED with an empty window, attempt 1 next time (keeps not_permitted; reset() clears
        it too)."""
        self.restart(State.CLOSED)

    # -- events -----------------------------------------------------------------------------------------
    def on(self, event: str, callback: Callable[[BreakerEvent], Any]) -> Callable[[BreakerEvent], Any]:
        """Call `callback(event)` on each `event` ("*" for all). Returns the callback, so it can decorate.
        A listener that raises is logged and never breaks the call."""
        if event != "*" and event not in EVENTS:
            raise ValueError(f"event must be one of {sorted(EVENTS)} or '*', got {event!r}")
        check_listener("callback", callback)
        self._listeners.setdefault(event, []).append(callback)
        self.hook = self._dispatch_hook
        return callback

    def off(self, event: str, callback: Callable[[BreakerEvent], Any]) -> None:
        """Remove a listener; when none is left, events cost nothing again."""
        try:
            self._listeners.get(event, []).remove(callback)
        except ValueError:
            raise ValueError(f"callback {callback!r} is not listening to {event!r}") from None
        if not any(self._listeners.values()):
            self.hook = None

    def _dispatch(self, kind: str, a: Any, b: Any) -> None:
        listeners = self._listeners.get(kind, []) + self._listeners.get("*", [])
        if not listeners:
            return
        if kind == "state_change":
            event = BreakerEvent(kind, self.name, old=a, new=b)
        elif kind in ("success", "error", "ignored"):
            event = BreakerEvent(kind, self.name, exception=a, duration=None if b is None else b / 1e9)
        elif kind.endswith("_rate_exceeded"):
            event = BreakerEvent(kind, self.name, rate=a)
        else:
            event = BreakerEvent(kind, self.name)
        for callback in listeners:
            try:
                callback(event)
            except Exception:  # noqa: BLE001 - a listener never breaks the call
                log.exception("circuit breaker %r: %s listener %r failed", self.name, kind, callback)

    def __repr__(self) -> str:
        try:
            where = "" if self.store is None else f" in {self.store.url}"
            return f"<CircuitBreaker {self.name!r} {self.state.name}{where}>"
        except RuntimeError as e:       # __init__ never ran (a subclass that forgot super().__init__()),
            what = "not initialised" if "not initialised" in str(e) else f"closed: {e}"   # or its store closed
            return f"<{type(self).__name__} ({what})>"


# -- stores (DESIGN §5) -------------------------------------------------------------------------------------

def _open_store(store: object, name: object, clock: Any) -> Any:
    from .stores import store_from_url
    st = store_from_url(store)
    if name is None:
        raise ValueError(f"CircuitBreaker: store={st.url!r} needs name= (breakers with the same name in one "
                         f"store share one state), got name=None")
    if not is_system_clock(clock) and st.scheme != "memory":
        raise ValueError(f"CircuitBreaker: clock={clock!r} cannot be shared through store={st.url!r}: processes "
                         f"that share a breaker measure time on the host's monotonic clock (or the server's); "
                         f"pass clock=None, or use a memory:// store in tests")
    return st


def _seconds(ns: int) -> float | None:
    return None if ns < 0 else ns / 1e9


def _settings(conf: BreakerConf) -> dict[str, object]:
    """The settings that change decisions (two openers of one name must agree on them)."""
    if conf.open_fn is None:
        od: object = conf.open_ns / 1e9
    else:
        fn = conf.open_fn
        od = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"[:48]
    common = {"open_duration": od, "half_open_calls": conf.half_open_calls,
              "half_open_max_wait": _seconds(conf.half_open_max_wait_ns)}
    if conf.classic:
        return {"failure_threshold": conf.failure_threshold, "success_threshold": conf.success_threshold, **common}
    return {"failure_rate_threshold": conf.failure_rate_threshold,
            "slow_call_rate_threshold": conf.slow_call_rate_threshold,
            "slow_call_duration": _seconds(conf.slow_ns), "window": "time" if conf.time_window else "count",
            "window_size": conf.window_size, "minimum_calls": conf.minimum_calls, **common}


def _bind(st: Any, conf: BreakerConf, clock: Any) -> tuple[Any, Any]:
    """The breaker's words in a word store: (words, locker). The core of this process must be the
    store's kind (the compiled core CASes the words; the twin locks them): the two never mix."""
    mine = "atomic" if IMPLEMENTATION == "cython" else "locked"
    if st.implementation_kind != mine:
        have = "the compiled core (lock-free)" if st.implementation_kind == "atomic" else "the pure-Python twin"
        run = "the compiled core" if mine == "atomic" else "the pure-Python twin"
        raise ValueError(f"CircuitBreaker: store={st.url!r} decides with {have}, but this process's "
                         f"CircuitBreaker runs {run}: the two cannot share words; open the store with "
                         f"implementation=None (this process's kind)")
    nwords = _core.BreakerCore.words_needed(conf.window_size, conf.time_window, conf.half_open_calls)
    now = time.monotonic_ns() if clock is None else clock.monotonic_ns()
    b = st.bind("circuit_breaker", conf.name, _settings(conf), nwords,
                init=lambda w: _core.BreakerCore.init_words(w, conf.window_size, conf.time_window,
                                                            conf.half_open_calls, now))
    return b.words, st.locker(b.offset)


class _Cluster:
    """The core's `remote`: a Redis store's shared breaker (stores.redis.RedisBreaker) decides."""

    def __init__(self, cb: CircuitBreaker, shared: Any) -> None:
        self.cb, self.shared, self.store = cb, shared, shared._store
        self.acquire = shared.acquire            # token >= 0, -1 refused, -2 (store down, "local") decide here
        self._tasks: set[Any] = set()

    def shared_now(self) -> bool:
        """Whether the fleet's state is what this process acts on now (False: the store is down and its
        policy is "local")."""
        return bool(self.store.available or self.store.on_error != "local")

    def state(self) -> int:
        """The fleet's state as last seen (within sync_interval); OPEN reads HALF_OPEN once its open time
        has passed (the next call moves the fleet there)."""
        v = self.shared.view
        if v.state == State.OPEN and v.open_left_ns >= 0 and time.monotonic_ns() - v.seen_ns >= v.open_left_ns:
            return int(State.HALF_OPEN)
        return v.state  # type: ignore[no-any-return]

    def rejection(self, now: int) -> Any:
        from .errors import CircuitOpenError
        if not self.store.available:
            if self.store.on_error == "local":
                return None                      # the local core refused: its own error
            return CircuitOpenError(self.cb.name, State(self.shared.view.state), self.store.retry_after_ns() / 1e9)
        v = self.shared.view
        retry_after = None
        if v.state == State.OPEN and v.open_left_ns >= 0:
            retry_after = max(0, v.open_left_ns - (time.monotonic_ns() - v.seen_ns)) / 1e9
        return CircuitOpenError(self.cb.name, State(v.state), retry_after)

    def record(self, token: int, failed: bool, slow: bool, ignored: bool) -> None:
        if token & 1 and getattr(self.store, "_sync_pool", True) is None:
            # an asyncio-only client: a half-open report is a round trip, sent from the running loop
            task = asyncio.get_running_loop().create_task(self.shared.record_async(token, failed, slow, ignored))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self.shared.record(token, failed, slow, ignored)

    async def enter_async(self) -> tuple[int, int]:
        """(token, start) for an async call: the store's round trip (only OPEN-due / HALF_OPEN need one) is
        awaited, never blocking the loop."""
        cb = self.cb
        r = await self.shared.acquire_async()
        if r == -2:
            return cb.enter()                    # the store is down: the local core decides (no round trip)
        if r == -1:
            cb._refused()
            raise cb.rejection()
        return r | _core.REMOTE, cb.start()
