"""The checkout, its open-loop load, and the two ways of calling the dependencies (naive and protected).

One seeded Poisson schedule of arrivals (`arrivals`) is replayed by both runs: checkout k arrives at its
scheduled second whether or not the shop is keeping up (users do not wait for each other). The shop
serves at most `workers` checkouts at once; the others wait in line for a worker, as requests queue in a
real server's backlog, so a slow run piles up (the line grows, and so does the time to an answer) without
running the machine out of memory. A checkout's latency runs from its scheduled arrival to its answer.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol, TypeVar

from .. import backoff
from ..bulkhead import Bulkhead
from ..circuit_breaker import CircuitBreaker
from ..errors import BulkheadFullError, CircuitOpenError, Overloaded, RateLimitExceeded, Rejected, TimeoutExceeded
from ..fallback import Fallback
from ..pipeline import Pipeline
from ..retry import Retry, RetryBudget
from ..shedding import CpuUsage, LoadShedder, LoopLag, OverloadSignal, Priority, QueueDepth
from ..timeout import Timeout
from .deps import POPULAR, ConnectionLost, Dependencies, DependencyError, Faults, Unavailable

NAIVE_TIMEOUT = 5.0     # what the naive shop waits for any dependency (seconds)
FAST = 0.1              # a refusal answered within this many seconds of arrival is "rejected fast"
T = TypeVar("T")



def header_retry_after(seconds: float | None) -> int:
    """The Retry-After the shop sends for a refusal: whole seconds (as HTTP has it), at least 1; 1 when the
    refusal carried no estimate."""
    return 1 if seconds is None else max(1, math.ceil(seconds))
TICK = 0.1              # how often a run samples the shop's line (and checks for a fatal error)

# what a dependency call can fail with in either transport; anything else is a bug and stops the demo
EXPECTED = (DependencyError, TimeoutError, asyncio.TimeoutError)

COMPLETED, FAILED, REJECTED = "completed", "failed_after_wait", "rejected_fast"


# -- the arrival schedule ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arrival:
    at: float       # seconds since the start of the run
    order: str
    item: str


def arrivals(seed: int, rate: float, duration: float) -> list[Arrival]:
    """A Poisson process of `rate` checkouts per second over `duration` seconds, from the seed alone."""
    rng = random.Random(f"{seed}:arrivals")
    out: list[Arrival] = []
    t = rng.expovariate(rate)
    while t < duration:
        out.append(Arrival(round(t, 6), f"{len(out) + 1:05d}", f"item-{rng.randrange(100)}"))
        t += rng.expovariate(rate)
    return out


def digest(schedule: list[Arrival]) -> str:
    """A fingerprint of an arrival schedule (what a run replayed), to show that both runs saw the same."""
    h = hashlib.sha256()
    for a in schedule:
        h.update(f"{a.at:.6f} {a.order} {a.item}\n".encode())
    return h.hexdigest()[:16]


# -- clients: how the shop reaches its dependencies --------------------------------------------------------

class Client(Protocol):
    async def stock(self, order: str, item: str) -> bool: ...
    async def charge(self, order: str, idempotency_key: str | None) -> str: ...
    async def recommendations(self, order: str, item: str) -> list[str]: ...


class InProcessClient:
    """Calls the simulated services directly (``--transport inprocess``)."""

    def __init__(self, deps: Dependencies) -> None:
        self.deps = deps

    async def stock(self, order: str, item: str) -> bool:
        return await self.deps.inventory.stock(order, item)

    async def charge(self, order: str, idempotency_key: str | None) -> str:
        return await self.deps.payment.charge(order, idempotency_key)

    async def recommendations(self, order: str, item: str) -> list[str]:
        return await self.deps.recommendations.for_item(order, item)


class GuardedClient:
    """A client whose call of each dependency runs through `around[service]` (anything with
    ``call_async``), when there is one: the protected run's guards (`Guard.in_process` in process; over
    HTTP only the bulkheads, the rest sits in the transport, see `buttress.demo.http`)."""

    def __init__(self, inner: Client, around: dict[str, Any]) -> None:
        self.inner, self.around = inner, around

    async def _call(self, service: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        guard = self.around.get(service)
        if guard is None:
            return await fn(*args)
        result: T = await guard.call_async(fn, *args)
        return result

    async def stock(self, order: str, item: str) -> bool:
        return await self._call("inventory", self.inner.stock, order, item)

    async def charge(self, order: str, idempotency_key: str | None) -> str:
        return await self._call("payment", self.inner.charge, order, idempotency_key)

    async def recommendations(self, order: str, item: str) -> list[str]:
        return await self._call("recommendations", self.inner.recommendations, order, item)


# -- what a run counts -------------------------------------------------------------------------------------

@dataclass
class Tally:
    answers: list[Any] = field(default_factory=list)     # (arrival, answered at s, outcome, reason, retry_after, tries)
    line: list[Any] = field(default_factory=list)        # (t, in progress, waiting for a worker)
    dispatched: list[Any] = field(default_factory=list)  # the arrivals this run replayed, in order
    retries: int = 0
    refusals: list[Any] = field(default_factory=list)    # every fast refusal: (t, Retry-After sent, order, by)
    fallbacks: int = 0
    transitions: list[Any] = field(default_factory=list)  # (t, old, new) of the protected payment breaker
    in_progress: int = 0
    waiting: int = 0
    end_line: tuple[int, int] = (0, 0)  # (in progress, waiting for a worker) when the run stopped
    in_line: set[Any] = field(default_factory=set)       # orders waiting for a worker
    unfinished_in_line: int = 0     # unfinished checkouts that were still waiting for a worker at the end
    after_user_left: collections.Counter[str] = field(default_factory=collections.Counter)  # outcome -> count
    shed_by: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)  # (why, priority)

    def popular(self, *_: Any) -> list[str]:
        """The fallback for recommendations (both runs serve it when the engine fails)."""
        self.fallbacks += 1
        return list(POPULAR)

    def count_retry(self, *_: Any) -> None:
        self.retries += 1

    def counts(self) -> collections.Counter[Any]:
        return collections.Counter(a[2] for a in self.answers)


def _reason(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    for cls, name in ((CircuitOpenError, "breaker"), (BulkheadFullError, "bulkhead"), (Overloaded, "shedder"),
                      (RateLimitExceeded, "limiter"), (Rejected, "rejected"), (TimeoutError, "timeout"),
                      (asyncio.TimeoutError, "timeout"), (Unavailable, "503"), (ConnectionLost, "connection lost")):
        if isinstance(exc, cls):
            return name
    return "error"


# -- the two ways of calling the dependencies --------------------------------------------------------------

class Naive:
    """What code without a resilience library usually does: plain awaits with a long timeout on every
    call; the payment is tried once more on any failure (as a user pressing "Pay" again would), without an
    idempotency key; a failed recommendation is replaced by the popular items, after waiting for it."""
    name = "naive"

    def __init__(self, client: Client, tally: Tally) -> None:
        self.client, self.tally = client, tally

    @contextlib.asynccontextmanager
    async def door(self, a: Arrival, tries: int) -> AsyncIterator[None]:
        yield                           # every checkout comes in

    async def checkout(self, a: Arrival) -> None:
        await asyncio.wait_for(self.client.stock(a.order, a.item), NAIVE_TIMEOUT)
        try:
            await asyncio.wait_for(self.client.charge(a.order, None), NAIVE_TIMEOUT)
        except EXPECTED:
            self.tally.retries += 1
            await asyncio.wait_for(self.client.charge(a.order, None), NAIVE_TIMEOUT)
        try:
            await asyncio.wait_for(self.client.recommendations(a.order, a.item), NAIVE_TIMEOUT)
        except EXPECTED:
            self.tally.popular()


@dataclass(frozen=True)
class Guard:
    """How the protected shop calls one dependency, the same in both transports.

    `bulkhead` (or None) is around the whole call, its retries and backoff waits included (over HTTP it
    is around the client call: `buttress.httpx` has no bulkhead stage). `remote` holds the stages a
    `buttress.httpx` pipeline takes (its Timeout is the TOTAL timeout of the call, a Retry, a breaker):
    over HTTP it is the transport's pipeline for the dependency's host. `attempt` (or None) is the
    timeout of one attempt: over HTTP the httpx client's own timeout, which the transport lowers to what
    is left of the total before each attempt; in process an innermost Timeout."""
    bulkhead: Bulkhead | None
    remote: Pipeline
    attempt: float | None

    def in_process(self) -> Pipeline:
        """The whole guard as one pipeline, for calling the services in this process. The bulkhead is
        nested on purpose (outside the retry, as over HTTP), so the order warning does not apply."""
        inner = Pipeline(*self.remote.strategies, *(() if self.attempt is None else (Timeout(self.attempt),)))
        return inner if self.bulkhead is None else Pipeline(self.bulkhead, inner)


def priority_of(seed: int, a: Arrival, tries: int) -> Priority:
    """Who the protected shop sheds first: a guest's first try (LOW), a signed-in customer's first try
    (MEDIUM; half of the users, drawn per order from the seed), then anyone told to come back who did
    (HIGH: refusing them twice loses them). CRITICAL is left for the shop's own traffic."""
    if tries > 1:
        return Priority.HIGH
    signed_in = random.Random(f"{seed}:customer:{a.order}").random() < 0.5
    return Priority.MEDIUM if signed_in else Priority.LOW


class _Peak:
    """A signal that remembers the largest value its sampler read (for the table: measured, not set)."""
    peak = 0.0

    def read(self, now_ns: int) -> float:
        v: float = super().read(now_ns)  # type: ignore[misc]
        if v > self.peak:
            self.peak = v
        return v


class PeakLoopLag(_Peak, LoopLag):
    pass


class PeakCpuUsage(_Peak, CpuUsage):
    pass


class PeakQueueDepth(_Peak, QueueDepth):
    pass


SAMPLE_INTERVAL = 0.1      # seconds between two samples of the shop's overload signals


def overload_signals(line: Callable[[], float], workers: int) -> tuple[OverloadSignal, ...]:
    """The shop's overload signals, thresholds per priority (LOW is shed first), sampled every 0.1 s on
    the run's event loop. The protected shop sheds by them; the naive run samples them too, to show
    what they saw there (it sheds nothing).

    - The line: checkouts waiting for a worker, the shop's own work queue. The seed sheds at a queue of
      10 000, which fits a service with thousands of workers; here `workers` (64) each hold a checkout for
      up to 2 s (the deadline) when a dependency is sick, so a line of 64 is about one such round (~2 s)
      of waiting: 40 % of a user's 5 s patience. LOW at a quarter of the workers (~0.5 s of waiting),
      MEDIUM at half (~1 s: as long as the Retry-After a refused user is given), HIGH at one full round.
    - Event-loop lag: every checkout, retry timer and (in process) every simulated service runs on this
      loop; a healthy checkout answers in about 0.1 s, so a loop running 0.1 s late doubles it (LOW);
      0.25 s (MEDIUM); 0.5 s, a quarter of the deadline (HIGH).
    - CPU of this process: GIL-bound, so one core is all it has (cpus=1). The seed's "cpu > 90 %" sheds
      LOW, 95 % MEDIUM; HIGH is never shed for CPU (a busy shop that keeps up still serves the users who
      come back when told to).
    """
    q = float(workers)
    return (PeakLoopLag(low=0.1, medium=0.25, high=0.5),
            PeakCpuUsage(low=0.9, medium=0.95, high=None),
            PeakQueueDepth(line, low=q / 4, medium=q / 2, high=q))


class Policies:
    """The protected run's buttress objects (one set per run); docs/demo.md says why each is there.

    `retry_on`: what the Retry of a dependency call retries in this transport (in process: the
    services' own errors and an attempt's timeout; over HTTP: `buttress.httpx.retryable`). `line()`: how
    many checkouts wait for a worker now (the shop's own work queue); `workers`: the shop's workers."""

    def __init__(self, seed: int, retry_on: Any, tally: Tally, elapsed: Callable[[], float], *,
                 line: Callable[[], float] = lambda: 0, workers: int = 64) -> None:
        self.seed = seed
        self.tally = tally
        self.breaker = CircuitBreaker(name="payment", failure_rate_threshold=0.5, window_size=20,
                                      minimum_calls=10, open_duration=1.0, half_open_calls=3)
        self.breaker.on("state_change", lambda ev: tally.transitions.append(
            (round(elapsed(), 2), ev.old.name, ev.new.name)))  # type: ignore[union-attr]  # state_change: both set
        self.payment = Guard(      # 16 checkouts charging at once; 1.2 s in all, 0.4 s an attempt
            Bulkhead(max_concurrent=16, max_wait=0.05, name="payment"),
            Pipeline(Timeout(1.2),
                     Retry(max_attempts=3, retry_on=retry_on,
                           backoff=backoff.exponential(initial=0.05, maximum=0.4,
                                                       rng=random.Random(f"{seed}:backoff")),
                           budget=RetryBudget(ratio=0.2, min_per_second=5.0, ttl=5.0), on_retry=tally.count_retry),
                     self.breaker),
            0.4)
        self.inventory = Guard(    # a stock lookup is a read: safe to try twice; 0.25 s an attempt
            Bulkhead(max_concurrent=24, max_wait=0.05, name="inventory"),
            Pipeline(Timeout(0.6), Retry(max_attempts=2, retry_on=retry_on, backoff=0.01, on_retry=tally.count_retry)),
            0.25)
        self.recommendations = Guard(None, Pipeline(Timeout(0.15)), None)     # one try, 150 ms in all
        self.fallback = Fallback(tally.popular, on=EXPECTED)
        self.deadline = Timeout(2.0)
        # The door: every try of a checkout is admitted (or refused at once, with Retry-After) before it
        # waits in line for a worker, as an ASGI LoadSheddingMiddleware admits a request before the app.
        # The signals and their thresholds: see `overload_signals`. The in-flight count (line + in progress)
        # is the exact backstop between two samples: capacity 4 x workers puts LOW's bound (half of it) at
        # a line of one full round of workers, past the line's own thresholds, and HIGH's at 0.9 x 4 x workers
        # (230.4 for 64 workers) checkouts in the shop.
        self.signals = overload_signals(line, workers)
        self.shedder = LoadShedder(max_in_flight=4 * workers, name="shop", signals=self.signals,
                                   sample_interval=SAMPLE_INTERVAL)

    def guards(self) -> dict[str, Guard]:
        return {"payment": self.payment, "inventory": self.inventory, "recommendations": self.recommendations}

    @staticmethod
    def shed_reason(exc: Overloaded) -> str:
        """Why the shedder refused a call: the signals that shed it (`Overloaded.signals`), else its
        in-flight count."""
        return "+".join(exc.signals) if exc.signals else "in_flight"


class Protected:
    """The same checkout through buttress: a load shedder admits it at the door (before the line for a
    worker), a 2 s deadline bounds it, each dependency call runs through its pipeline (`Policies`), and
    the order id is the payment's idempotency key, so a retried charge is never charged twice."""
    name = "protected"

    def __init__(self, client: Client, policies: Policies) -> None:
        self.client, self.p = client, policies

    @contextlib.asynccontextmanager
    async def door(self, a: Arrival, tries: int) -> AsyncIterator[None]:
        priority = priority_of(self.p.seed, a, tries)
        try:
            admission = self.p.shedder.admit(priority)
            await admission.__aenter__()
        except Overloaded as exc:
            self.p.tally.shed_by[(self.p.shed_reason(exc), priority.name)] += 1
            raise
        try:
            yield
        except BaseException as exc:
            await admission.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        else:
            await admission.__aexit__(None, None, None)

    async def checkout(self, a: Arrival) -> None:
        await self.p.deadline.call_async(self._flow, a)

    async def _flow(self, a: Arrival) -> None:
        await self.client.stock(a.order, a.item)
        await self.client.charge(a.order, f"order-{a.order}")
        await self.p.fallback.call_async(self.client.recommendations, a.order, a.item)


# -- one run -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunConfig:
    seed: int
    rate: float             # checkouts per second (Poisson)
    duration: float         # seconds of arrivals
    drain: float            # seconds the run goes on after the last arrival, for the answers still due
    patience: float         # seconds a user waits for an answer, then leaves (the shop is not told)
    workers: int            # checkouts the shop serves at once; the others wait in line


class Session(Protocol):
    """One run's dependencies, as a transport provides them (`InProcess`, `buttress.demo.http.Http`)."""
    t0: float
    retry_on: Any       # what the protected run's retries retry in this transport

    def client(self, policies: Policies | None) -> Client: ...
    async def end(self) -> dict[str, int]: ...


class InProcess:
    """``--transport inprocess``: the simulated services are objects in this process."""
    name = "inprocess"
    detail = "simulated services called in this process"

    async def __aenter__(self) -> InProcess:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        pass

    async def begin(self, faults: Faults) -> InProcessSession:
        return InProcessSession(faults)


class InProcessSession:
    retry_on = (DependencyError, TimeoutExceeded)      # a service's error, an attempt's Timeout

    def __init__(self, faults: Faults) -> None:
        self.t0 = time.monotonic()
        self.deps = Dependencies.start(faults, lambda: time.monotonic() - self.t0)

    def client(self, policies: Policies | None) -> Client:
        plain = InProcessClient(self.deps)
        if policies is None:
            return plain
        return GuardedClient(plain, {name: guard.in_process() for name, guard in policies.guards().items()})

    async def end(self) -> dict[str, int]:
        await self.deps.close()
        return self.deps.stats()


async def run(kind: str, schedule: list[Arrival], backend: Any, faults: Faults, cfg: RunConfig,
              progress: Callable[[str, float, Tally], None] | None = None) -> dict[str, Any]:
    """Replay `schedule` against fresh dependencies; return the raw record of the run.

    An exception other than a dependency failure or a buttress rejection in any checkout stops the run at
    once and is re-raised (with a note saying where it happened)."""
    loop = asyncio.get_running_loop()
    session = await backend.begin(faults)
    t0 = session.t0
    tally = Tally()
    if kind == "naive":
        calls: Naive | Protected = Naive(session.client(None), tally)
        # the same signals, sampled the same way, for the table: the naive shop sheds nothing by them
        signals = overload_signals(lambda: tally.waiting, cfg.workers)
        sampler = LoadShedder(name="naive-monitor", signals=signals, sample_interval=SAMPLE_INTERVAL)
    else:
        policies = Policies(cfg.seed, session.retry_on, tally, lambda: time.monotonic() - t0,
                            line=lambda: tally.waiting, workers=cfg.workers)
        calls = Protected(session.client(policies), policies)
        signals, sampler = policies.signals, policies.shedder
    sampler.start()         # sampling: a timer on this loop (LoopLag measures it), stopped below
    fatal: asyncio.Future[Any] = loop.create_future()
    slots = asyncio.Semaphore(cfg.workers)
    tasks: set[asyncio.Task[Any]] = set()
    waiting_user: dict[str, asyncio.TimerHandle] = {}     # order -> the moment its user gives up

    def give_up(a: Arrival) -> None:
        """The user waited `patience` seconds without an answer and left; the shop is not told."""
        del waiting_user[a.order]
        tally.answers.append((a, a.at + cfg.patience, FAILED, "user gave up", None, 0))

    async def attempt(a: Arrival, tries: int) -> tuple[str, BaseException | None] | None:
        """One try of a checkout: through the shop's door (the protected shop's shedder), then wait in line
        for a worker and run it; None after a fatal error."""
        try:
            async with calls.door(a, tries):
                return await served(a)
        except Rejected as e:
            return REJECTED, e

    async def served(a: Arrival) -> tuple[str, BaseException | None] | None:
        tally.waiting += 1
        tally.in_line.add(a.order)
        entered = False
        try:
            await slots.acquire()
            tally.in_line.discard(a.order)
            tally.waiting -= 1
            entered = True
            tally.in_progress += 1
            try:
                await calls.checkout(a)
                return COMPLETED, None
            except Rejected as e:
                return REJECTED, e
            except EXPECTED as e:
                return FAILED, e
            except Exception as e:      # a bug, not a simulated fault: stop the demo with it
                if not fatal.done():
                    fatal.set_result((a, e))
                return None
        finally:
            if entered:
                tally.in_progress -= 1
                slots.release()
            else:
                tally.in_line.discard(a.order)
                tally.waiting -= 1

    async def one(a: Arrival) -> None:
        """A user's checkout: tried until answered, or given up on after `patience` seconds. A fast refusal
        says when to try again (Retry-After, whole seconds); the user does, if that is within their patience."""
        waiting_user[a.order] = loop.call_at(t0 + a.at + cfg.patience, give_up, a)
        tries = 0
        while True:
            tries += 1
            began = time.monotonic() - t0
            result = await attempt(a, tries)
            if result is None:
                return
            outcome, exc = result
            answered = time.monotonic() - t0
            if a.order not in waiting_user:     # too late: the user had left (the work was done for nobody)
                tally.after_user_left[outcome] += 1
                return
            retry_after = None
            if outcome == REJECTED:
                if answered - began > FAST:
                    outcome = FAILED            # refused, but only after a wait: not "fast"
                else:
                    retry_after = header_retry_after(getattr(exc, "retry_after", None))
                    tally.refusals.append((answered, retry_after, a.order, _reason(exc)))
                    if answered + retry_after < a.at + cfg.patience:     # the user tries again, as told
                        await asyncio.sleep(retry_after)
                        continue
            waiting_user.pop(a.order).cancel()
            reason = _reason(exc)
            if outcome == FAILED and isinstance(exc, Rejected):
                reason = f"{reason}, after a wait"
            tally.answers.append((a, answered, outcome, reason, retry_after, tries))
            return

    async def dispatch() -> None:
        for a in schedule:
            delay = t0 + a.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tally.dispatched.append(a)
            task = loop.create_task(one(a))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    dispatcher = loop.create_task(dispatch())
    end = t0 + cfg.duration + cfg.drain
    try:
        while True:
            now = time.monotonic()
            tally.line.append((round(now - t0, 3), tally.in_progress, tally.waiting))
            if progress is not None:
                progress(kind, now - t0, tally)
            if fatal.done() or now >= end or (dispatcher.done() and not tasks):
                break
            await asyncio.wait({fatal, dispatcher} if not dispatcher.done() else {fatal},
                               timeout=min(TICK, end - now), return_when=asyncio.FIRST_COMPLETED)
    finally:
        tally.end_line = (tally.in_progress, tally.waiting)
        tally.unfinished_in_line = len(waiting_user.keys() & tally.in_line)
        for user in waiting_user.values():      # users still waiting for an answer: unfinished
            user.cancel()
        waiting_user.clear()
        dispatcher.cancel()
        for task in list(tasks):    # the shop's work still going on is stopped
            task.cancel()
        await asyncio.gather(dispatcher, *tasks, return_exceptions=True)
        sampler.stop()
        stats = await session.end()
    if not dispatcher.cancelled() and dispatcher.exception() is not None:
        raise dispatcher.exception()    # type: ignore[misc]
    if fatal.done():
        a, exc = fatal.result()
        if hasattr(exc, "add_note"):
            exc.add_note(f"buttress demo: raised in the {kind} run by the checkout of order {a.order} "
                         f"(arrived at {a.at:.2f} s); the demo stopped")
        raise exc
    return {"kind": kind, "tally": tally, "stats": stats, "ended": time.monotonic() - t0,
            "signals": signals_record(signals),
            "shedder": None if kind == "naive" else shedder_record(policies)}


def signals_record(signals: tuple[OverloadSignal, ...]) -> dict[str, Any]:
    """Each overload signal's thresholds and the largest value its sampler read in the run."""
    return {sig.name: {"low": sig.thresholds[0], "medium": sig.thresholds[1], "high": sig.thresholds[2],
                       "peak": round(getattr(sig, "peak", 0.0), 4)} for sig in signals}


def shedder_record(p: Policies) -> dict[str, Any]:
    """What the protected shop's door did: tries admitted and shed per priority, and the shed ones by
    reason (the signal whose last sample shed it, or in_flight) and priority."""
    m = p.shedder.metrics()
    by: dict[str, dict[str, int]] = {}
    for (why, prio), n in sorted(p.tally.shed_by.items()):
        by.setdefault(why, {})[prio] = n
    return {
        "sample_interval_s": p.shedder.sample_interval,
        "max_in_flight": p.shedder.capacity,
        "admitted": {prio.name: n for prio, n in m.admitted.items()},
        "shed": {prio.name: n for prio, n in m.shed.items()},
        "shed_by": by,
    }


# -- the numbers of a run ----------------------------------------------------------------------------------

def _pct(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile, in ms."""
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1e3, 1) if ordered else None


def latency(seconds: list[float]) -> dict[str, float | None]:
    ordered = sorted(seconds)
    return {"p50": _pct(ordered, 0.50), "p95": _pct(ordered, 0.95), "p99": _pct(ordered, 0.99)}


def summarize(record: dict[str, Any], schedule: list[Arrival], cfg: RunConfig) -> dict[str, Any]:
    """The JSON record of one run: every number the table and the plot show, and the per-second series."""
    tally: Tally = record["tally"]
    counts = tally.counts()
    n = len(schedule)
    waits = {o: [ans - a.at for a, ans, oc, *_ in tally.answers if oc == o] for o in (COMPLETED, FAILED, REJECTED)}
    rejected = [x for x in tally.answers if x[2] == REJECTED]
    span = cfg.duration + cfg.drain
    seconds = math.ceil(span)
    per_second: dict[int, list[Any]] = collections.defaultdict(list)
    by_arrival: dict[int, list[Any]] = collections.defaultdict(list)
    for a, ans, outcome, *_ in tally.answers:
        per_second[min(int(ans), seconds - 1)].append((ans - a.at, outcome))
        by_arrival[int(a.at)].append(ans - a.at)
    arrived = collections.Counter(int(a.at) for a in schedule)
    refused = collections.Counter(min(int(x[0]), seconds - 1) for x in tally.refusals)
    line: dict[int, tuple[int, int]] = {}
    for t, busy, waiting in tally.line:
        s = min(int(t), seconds - 1)
        old = line.get(s, (0, 0))
        line[s] = (max(old[0], busy + waiting), max(old[1], waiting))
    series = []
    for t in range(seconds):
        rows = per_second.get(t, [])
        series.append({
            "t": t, "arrivals": arrived.get(t, 0),
            "completed": sum(o == COMPLETED for _, o in rows),
            "failed_after_wait": sum(o == FAILED for _, o in rows),
            "rejected_fast": sum(o == REJECTED for _, o in rows),
            "fast_refusals": refused.get(t, 0),
            "p99_ms": _pct(sorted(by_arrival.get(t, [])), 0.99),     # of the checkouts that arrived in second t
            "in_shop": line.get(t, (0, 0))[0], "waiting_for_worker": line.get(t, (0, 0))[1]})
    answered = len(tally.answers)
    peak = max(tally.line, key=lambda x: x[1] + x[2]) if tally.line else (0.0, 0, 0)
    return {
        "arrivals": n,
        "arrivals_sha256": digest(tally.dispatched),
        "completed": counts[COMPLETED],
        "failed_after_wait": counts[FAILED],
        "rejected_fast": counts[REJECTED],
        "unfinished": n - answered,
        "goodput_per_s": round(counts[COMPLETED] / cfg.duration, 1),
        "latency_ms": latency([ans - a.at for a, ans, *_ in tally.answers]),
        "completed_latency_ms": latency(waits[COMPLETED]),
        "failed_wait_ms": latency(waits[FAILED]),
        "rejected_latency_ms": latency(waits[REJECTED]),
        "rejected_by": dict(collections.Counter(x[3] for x in rejected)),
        "rejected_late": sum(1 for x in tally.answers if x[2] == FAILED and "after a wait" in (x[3] or "")),
        "fast_refusals": len(tally.refusals),
        "fast_refusals_by_retry_after_s": {str(k): v for k, v in sorted(collections.Counter(
            x[1] for x in tally.refusals).items())},
        "fast_refusals_by": dict(collections.Counter(x[3] for x in tally.refusals)),
        "completed_after_retry_after": sum(1 for x in tally.answers if x[2] == COMPLETED and x[5] > 1),
        "users_told_to_retry": len({x[2] for x in tally.refusals}),
        "failed_by": dict(collections.Counter(x[3] for x in tally.answers if x[2] == FAILED)),
        "unfinished_waiting_for_worker": tally.unfinished_in_line,
        "answered_after_user_left": dict(tally.after_user_left),
        "charged_without_confirmation": len(set(record["stats"]["charged_orders"]) - {
            a.order for a, _, outcome, *_ in tally.answers if outcome == COMPLETED}),
        "peak_in_shop": {"at": peak[0], "in_progress": peak[1], "waiting_for_worker": peak[2]},
        "double_charges": record["stats"]["double_charges"],
        "charged_orders": len(record["stats"]["charged_orders"]),
        "deduplicated_charges": record["stats"]["deduplicated_charges"],
        "payment_requests": record["stats"]["payment_requests"],
        "retries": tally.retries,
        "fallbacks": tally.fallbacks,
        "breaker_transitions": [{"at": t, "old": o, "new": nw} for t, o, nw in tally.transitions],
        "signals": record["signals"],
        "shedder": record["shedder"],
        "ran_s": round(record["ended"], 2),
        "series": series,
    }
