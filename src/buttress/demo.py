"""`python -m buttress demo`: the fault-tolerant checkout, naive vs protected, on asyncio with the real clock.

Three simulated dependencies fail on a seeded schedule (see docs/demo.md): a payment gateway (slow, with a
concurrency capacity, now and then hanging or losing its reply, and an outage window where calls hang and
then fail), an inventory service (fast, rare crashes and stalls) and a recommendation engine (non-critical,
fails often, and hangs during its own outage). Many asyncio clients run checkouts and browse requests
against them for a fixed time, twice over the same fault schedule: once calling them naively (plain
awaits, long timeouts, one blind retry of the payment), once through buttress. Both runs share the load
generator and the dependencies; they differ only in the `Naive` / `Protected` object that makes the calls.
Every number printed is measured from the run.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable

import buttress

from . import backoff
from .cli import positive_float, positive_int
from .errors import Overloaded, Rejected, TimeoutExceeded

NAIVE_TIMEOUT = 5.0         # what a naive client waits for any dependency (seconds)
THINK_TIME = 0.15           # mean pause between a client's requests (exponential)
CHECKOUT_SHARE = 0.5        # the rest are browse requests
CRITICAL_SHARE = 0.2        # checkouts sent with Priority.CRITICAL (the rest are HIGH)
POPULAR = ("bestseller-1", "bestseller-2", "bestseller-3")   # what a failed recommendation falls back to


# -- the fault schedule and the simulated dependencies ----------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """Outage windows, in seconds since the start of a run; drawn from the seed, the same for both runs."""
    payment_outage: tuple[float, float]
    recommendations_outage: tuple[float, float]

    @classmethod
    def draw(cls, seed: int, duration: float) -> Schedule:
        rng = random.Random(f"{seed}:schedule")
        pay = rng.uniform(0.25, 0.35)      # a fifth of the run, starting between 25 % and 35 % of it
        recs = rng.uniform(0.6, 0.7)       # 15 % of the run, starting between 60 % and 70 % of it
        return cls((round(pay * duration, 2), round((pay + 0.2) * duration, 2)),
                   (round(recs * duration, 2), round((recs + 0.15) * duration, 2)))


class Service:
    """A simulated remote service. Every request runs as its own server-side task, so a client that
    gives up (a timeout) does not stop the work, just as a remote server never learns that its client
    left. With a `capacity`, at most that many requests are served at once and the rest queue.
    Per-call faults are drawn from ``random.Random(f"{seed}:{name}")``, in the order calls arrive."""

    def __init__(self, name: str, seed: int, elapsed: Callable[[], float], capacity: int | None = None) -> None:
        self.name = name
        self.rng = random.Random(f"{seed}:{name}")
        self.elapsed = elapsed
        self.requests = 0
        self._slots = asyncio.Semaphore(capacity) if capacity else None
        self._tasks: set[asyncio.Task] = set()

    async def _serve(self, work: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        self.requests += 1
        task = asyncio.ensure_future(self._run(work, *args))
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return await asyncio.shield(task)       # the client may give up; the server-side task runs on

    async def _run(self, work: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        if self._slots is None:
            return await work(*args)
        async with self._slots:
            return await work(*args)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()        # retrieved: an abandoned request's error is not logged as "never retrieved"

    async def close(self) -> None:
        """Stop the server-side work still running (hung or abandoned requests) at the end of a run."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class PaymentGateway(Service):
    """Critical and slow (30-70 ms a charge), 16 charges at once. Per call: 2 % declined with a 503, 2 %
    charged but the reply lost, 1 % hanging 2-6 s before charging. In its outage a call hangs 1.5 s, then
    fails. Charges are deduplicated by idempotency key (when one is given)."""

    def __init__(self, seed: int, elapsed: Callable[[], float], outage: tuple[float, float]) -> None:
        super().__init__("payment", seed, elapsed, capacity=16)
        self.outage = outage
        self.charges: collections.Counter[str] = collections.Counter()    # order id -> times charged
        self.deduplicated = 0
        self._by_key: dict[str, str] = {}

    async def charge(self, order_id: str, idempotency_key: str | None = None) -> str:
        draw, latency, hang = self.rng.random(), self.rng.uniform(0.03, 0.07), self.rng.uniform(2.0, 6.0)
        return await self._serve(self._charge, order_id, idempotency_key, draw, latency, hang)

    async def _charge(self, order_id: str, key: str | None, draw: float, latency: float, hang: float) -> str:
        start, end = self.outage
        if start <= self.elapsed() < end:
            await asyncio.sleep(1.5)
            raise ConnectionError("payment gateway: outage (no reply after 1.5 s)")
        await asyncio.sleep(hang if draw >= 0.99 else latency)
        if draw < 0.02:
            raise ConnectionError("payment gateway: 503, card not charged")
        charge_id = self._commit(order_id, key)
        if draw < 0.04:
            raise ConnectionError("payment gateway: connection reset after the charge")
        return charge_id

    def _commit(self, order_id: str, key: str | None) -> str:
        if key is not None and key in self._by_key:
            self.deduplicated += 1
            return self._by_key[key]
        self.charges[order_id] += 1
        charge_id = f"ch_{order_id}_{self.charges[order_id]}"
        if key is not None:
            self._by_key[key] = charge_id
        return charge_id

    @property
    def double_charges(self) -> int:
        """Charges beyond the first for the same order."""
        return sum(n - 1 for n in self.charges.values() if n > 1)


class Inventory(Service):
    """Critical and fast (2-8 ms a stock lookup). Per call: 1 % crash (connection reset), 0.5 % stall of 2 s."""

    def __init__(self, seed: int, elapsed: Callable[[], float]) -> None:
        super().__init__("inventory", seed, elapsed)

    async def stock(self, item: str) -> bool:
        draw, latency = self.rng.random(), self.rng.uniform(0.002, 0.008)
        return await self._serve(self._stock, draw, latency)

    async def _stock(self, draw: float, latency: float) -> bool:
        await asyncio.sleep(2.0 if draw >= 0.995 else latency)
        if draw < 0.01:
            raise ConnectionError("inventory: connection reset (crash)")
        return True


class Recommendations(Service):
    """Non-critical (10-30 ms); 25 % of calls fail; in its outage every call hangs (no reply at all)."""

    def __init__(self, seed: int, elapsed: Callable[[], float], outage: tuple[float, float]) -> None:
        super().__init__("recommendations", seed, elapsed)
        self.outage = outage

    async def for_item(self, item: str) -> tuple[str, ...]:
        draw, latency = self.rng.random(), self.rng.uniform(0.01, 0.03)
        return await self._serve(self._for_item, item, draw, latency)

    async def _for_item(self, item: str, draw: float, latency: float) -> tuple[str, ...]:
        start, end = self.outage
        if start <= self.elapsed() < end:
            await asyncio.sleep(3600.0)     # hangs until the run ends
        await asyncio.sleep(latency)
        if draw < 0.25:
            raise RuntimeError("recommendations: 500 internal error")
        return (f"{item}-goes-with-1", f"{item}-goes-with-2")


@dataclass
class Dependencies:
    payment: PaymentGateway
    inventory: Inventory
    recommendations: Recommendations

    async def close(self) -> None:
        for service in (self.payment, self.inventory, self.recommendations):
            await service.close()


# -- what a run counts ---------------------------------------------------------------------------------

@dataclass
class Tally:
    """Live counters of one run (the progress line reads them)."""
    started: collections.Counter = field(default_factory=collections.Counter)    # kind -> requests started
    outcomes: collections.Counter = field(default_factory=collections.Counter)   # (kind, outcome) -> count
    samples: list = field(default_factory=list)     # checkouts: (finished at s, latency s, outcome)
    retries: int = 0
    fallbacks: int = 0
    shed: int = 0
    transitions: list = field(default_factory=list)

    def popular(self, *_: Any) -> tuple[str, ...]:
        """The fallback for recommendations (both runs serve it when the engine fails)."""
        self.fallbacks += 1
        return POPULAR


@dataclass(frozen=True)
class Latency:
    p50: float | None
    p95: float | None
    p99: float | None

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        ordered = sorted(seconds)

        def pct(q: float) -> float | None:      # nearest rank, in ms
            return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1e3, 1) if ordered else None
        return cls(pct(0.50), pct(0.95), pct(0.99))


@dataclass(frozen=True)
class Transition:
    at: float       # seconds since the start of the run
    old: str
    new: str


@dataclass(frozen=True)
class Second:
    """Checkouts that finished during second `t` of a run."""
    t: int
    checkouts: int                  # finished (completed, failed or rejected)
    completed: int
    success_rate: float | None      # completed / finished
    p50_ms: float | None
    p95_ms: float | None


@dataclass(frozen=True)
class RunResult:
    name: str
    checkouts: int                  # started
    completed: int
    failed: int                     # an error or a timeout, after waiting for it
    rejected: int                   # refused at once by a breaker, bulkhead or load shedder
    unfinished: int                 # still running when the run ended
    latency_ms: Latency             # every finished checkout, whatever its outcome
    completed_latency_ms: Latency
    double_charges: int
    deduplicated_charges: int       # charges the gateway answered from its idempotency-key record
    payment_requests: int           # requests the gateway received (retries and abandoned ones included)
    retries: int
    fallbacks: int
    shed: int
    browse: int
    browse_served: int
    breaker_transitions: list[Transition]
    series: list[Second]

    @classmethod
    def build(cls, name: str, tally: Tally, deps: Dependencies, duration: float) -> RunResult:
        out = tally.outcomes
        per_second: dict[int, list] = collections.defaultdict(list)
        for at, latency, outcome in tally.samples:
            per_second[int(at)].append((latency, outcome))
        series = []
        for t in range(math.ceil(duration)):
            rows = per_second.get(t, [])
            lat = Latency.of([r[0] for r in rows])
            ok = sum(r[1] == "completed" for r in rows)
            series.append(Second(t, len(rows), ok, round(ok / len(rows), 4) if rows else None, lat.p50, lat.p95))
        done = out["checkout", "completed"] + out["checkout", "failed"] + out["checkout", "rejected"]
        return cls(
            name=name, checkouts=tally.started["checkout"], completed=out["checkout", "completed"],
            failed=out["checkout", "failed"], rejected=out["checkout", "rejected"],
            unfinished=tally.started["checkout"] - done,
            latency_ms=Latency.of([s[1] for s in tally.samples]),
            completed_latency_ms=Latency.of([s[1] for s in tally.samples if s[2] == "completed"]),
            double_charges=deps.payment.double_charges, deduplicated_charges=deps.payment.deduplicated,
            payment_requests=deps.payment.requests, retries=tally.retries, fallbacks=tally.fallbacks,
            shed=tally.shed, browse=tally.started["browse"], browse_served=out["browse", "completed"],
            breaker_transitions=list(tally.transitions), series=series)


# -- the two ways of calling the dependencies --------------------------------------------------------------

@dataclass(frozen=True)
class Order:
    id: str
    item: str


class Naive:
    """Plain awaits with a long timeout on everything; the payment is tried once more on any failure
    (as a user pressing "Pay" again would), without an idempotency key. A failed recommendation is
    replaced by the popular items, but only after waiting up to the full timeout."""
    name = "naive"

    def __init__(self, deps: Dependencies, tally: Tally, seed: int, elapsed: Callable[[], float]) -> None:
        self.deps, self.tally = deps, tally

    async def request(self, kind: str, priority: Any, flow: Callable[..., Awaitable[Any]], arg: Any) -> Any:
        return await flow(self, arg)

    async def inventory(self, item: str) -> bool:
        return await asyncio.wait_for(self.deps.inventory.stock(item), NAIVE_TIMEOUT)

    async def payment(self, order: Order) -> str:
        try:
            return await asyncio.wait_for(self.deps.payment.charge(order.id), NAIVE_TIMEOUT)
        except Exception:
            self.tally.retries += 1
            return await asyncio.wait_for(self.deps.payment.charge(order.id), NAIVE_TIMEOUT)

    async def recommendations(self, item: str) -> tuple[str, ...]:
        try:
            return await asyncio.wait_for(self.deps.recommendations.for_item(item), NAIVE_TIMEOUT)
        except Exception:
            return self.tally.popular()


class Protected:
    """The same calls through buttress: see docs/demo.md for what each protection does and why."""
    name = "protected"

    def __init__(self, deps: Dependencies, tally: Tally, seed: int, elapsed: Callable[[], float]) -> None:
        self.deps, self.tally = deps, tally
        self.breaker = buttress.CircuitBreaker(name="payment", failure_rate_threshold=0.5, window_size=20,
                                               minimum_calls=10, open_duration=1.0, half_open_calls=3)
        self.breaker.on("state_change", lambda ev: tally.transitions.append(
            Transition(round(elapsed(), 2), ev.old.name, ev.new.name)))
        self._payment = buttress.Pipeline(         # outermost first; each attempt gets its own 0.4 s
            buttress.Retry(max_attempts=3, retry_on=(ConnectionError, TimeoutExceeded),
                           backoff=backoff.exponential(initial=0.05, maximum=0.4,
                                                       rng=random.Random(f"{seed}:backoff")),
                           budget=buttress.RetryBudget(ratio=0.2, min_per_second=5.0, ttl=5.0),
                           idempotency_key=lambda order: f"order-{order.id}", on_retry=self._count_retry),
            buttress.Bulkhead(max_concurrent=16, max_wait=0.05, name="payment"),
            self.breaker,
            buttress.Timeout(0.4))
        self._inventory = buttress.Pipeline(       # a stock lookup is a read: safe to try twice
            buttress.Retry(max_attempts=2, retry_on=(ConnectionError, TimeoutExceeded), backoff=0.01,
                           on_retry=self._count_retry),
            buttress.Bulkhead(max_concurrent=24, max_wait=0.05, name="inventory"),
            buttress.Timeout(0.25))
        self._recommendations = buttress.Pipeline(buttress.Timeout(0.15), fallback=tally.popular)
        self._deadline = {"checkout": buttress.Timeout(2.0), "browse": buttress.Timeout(1.0)}
        self._shedder = buttress.LoadShedder(max_in_flight=40)

    def _count_retry(self, attempt: int, exc: BaseException | None, delay: float) -> None:
        self.tally.retries += 1

    async def request(self, kind: str, priority: Any, flow: Callable[..., Awaitable[Any]], arg: Any) -> Any:
        async with self._shedder.admit(priority):
            return await self._deadline[kind].call_async(flow, self, arg)

    async def inventory(self, item: str) -> bool:
        return await self._inventory.call_async(self.deps.inventory.stock, item)

    async def payment(self, order: Order) -> str:
        return await self._payment.call_async(self._charge, order)

    async def _charge(self, order: Order) -> str:
        key = buttress.current_attempt().idempotency_key     # the same for every attempt of this order
        return await self.deps.payment.charge(order.id, idempotency_key=key)

    async def recommendations(self, item: str) -> tuple[str, ...]:
        return await self._recommendations.call_async(self.deps.recommendations.for_item, item)


Calls = Naive | Protected


async def checkout(calls: Calls, order: Order) -> None:
    await calls.inventory(order.item)
    await calls.payment(order)
    await calls.recommendations(order.item)     # for the confirmation page


async def browse(calls: Calls, item: str) -> None:
    await calls.inventory(item)
    await calls.recommendations(item)


# -- the load generator ----------------------------------------------------------------------------------

async def _one_request(calls: Calls, tally: Tally, t0: float, kind: str, priority: Any, flow: Any, arg: Any) -> None:
    tally.started[kind] += 1
    start = time.monotonic()
    try:
        await calls.request(kind, priority, flow, arg)
        outcome = "completed"
    except Rejected as exc:
        outcome = "rejected"
        tally.shed += isinstance(exc, Overloaded)
    except Exception:
        outcome = "failed"
    end = time.monotonic()
    tally.outcomes[kind, outcome] += 1
    if kind == "checkout":
        tally.samples.append((end - t0, end - start, outcome))


async def _client(i: int, calls: Calls, tally: Tally, seed: int, t0: float, end: float) -> None:
    Priority = buttress.Priority
    rng = random.Random(f"{seed}:client:{i}")     # the same request mix in both runs
    n = 0
    while True:
        await asyncio.sleep(rng.expovariate(1.0 / THINK_TIME))
        if time.monotonic() >= end:
            return
        n += 1
        item = f"item-{rng.randrange(100)}"
        if rng.random() < CHECKOUT_SHARE:
            priority = Priority.CRITICAL if rng.random() < CRITICAL_SHARE else Priority.HIGH
            await _one_request(calls, tally, t0, "checkout", priority, checkout, Order(f"{i}-{n}", item))
        else:
            await _one_request(calls, tally, t0, "browse", Priority.LOW, browse, item)


def _progress_line(name: str, elapsed: float, duration: float, tally: Tally) -> str:
    o = tally.outcomes
    return (f"{name:>9}  {min(elapsed, duration):5.1f}/{duration:g} s  checkouts: {o['checkout', 'completed']} ok, "
            f"{o['checkout', 'failed']} failed, {o['checkout', 'rejected']} rejected fast  "
            f"browse: {o['browse', 'completed']} served ")


async def _run(kind: type[Naive] | type[Protected], schedule: Schedule, args: argparse.Namespace) -> RunResult:
    t0 = time.monotonic()

    def elapsed() -> float:
        return time.monotonic() - t0

    deps = Dependencies(PaymentGateway(args.seed, elapsed, schedule.payment_outage), Inventory(args.seed, elapsed),
                        Recommendations(args.seed, elapsed, schedule.recommendations_outage))
    tally = Tally()
    calls = kind(deps, tally, args.seed, elapsed)
    end = t0 + args.duration
    clients = [asyncio.create_task(_client(i, calls, tally, args.seed, t0, end)) for i in range(args.clients)]
    live = not args.quiet and sys.stderr.isatty()      # a log file gets only the final line of each run
    while (left := end - time.monotonic()) > 0:
        if live:
            sys.stderr.write("\r" + _progress_line(kind.name, elapsed(), args.duration, tally))
            sys.stderr.flush()
        await asyncio.sleep(min(0.25, left))
    for c in clients:       # requests still in flight now are counted as unfinished
        c.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    await deps.close()
    if not args.quiet:
        sys.stderr.write(("\r" if live else "") + _progress_line(kind.name, args.duration, args.duration, tally) + "\n")
    return RunResult.build(kind.name, tally, deps, args.duration)


# -- output ------------------------------------------------------------------------------------------------

def _table(runs: list[RunResult]) -> list[tuple[str, ...]]:
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    def row(label: str, get: Callable[[RunResult], Any]) -> tuple[str, ...]:
        return (label, *(cell(get(r)) for r in runs))

    return [
        ("", *(r.name for r in runs)),
        row("checkouts started", lambda r: r.checkouts),
        row("  completed", lambda r: r.completed),
        row("  failed (after waiting)", lambda r: r.failed),
        row("  rejected fast", lambda r: r.rejected),
        row("  unfinished at the end", lambda r: r.unfinished),
        row("checkout latency p50 (ms)", lambda r: r.latency_ms.p50),
        row("checkout latency p95 (ms)", lambda r: r.latency_ms.p95),
        row("checkout latency p99 (ms)", lambda r: r.latency_ms.p99),
        row("  p99 of completed (ms)", lambda r: r.completed_latency_ms.p99),
        row("double charges", lambda r: r.double_charges),
        row("charges deduplicated by key", lambda r: r.deduplicated_charges),
        row("payment requests received", lambda r: r.payment_requests),
        row("retries", lambda r: r.retries),
        row("fallbacks served", lambda r: r.fallbacks),
        row("requests shed", lambda r: r.shed),
        row("browse requests served", lambda r: f"{r.browse_served} of {r.browse}"),
        row("breaker transitions", lambda r: len(r.breaker_transitions)),
    ]


def render(runs: list[RunResult], schedule: Schedule, args: argparse.Namespace, implementation: str) -> str:
    rows = _table(runs)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"buttress demo: checkout under faults, {args.duration:g} s per run, {args.clients} clients, "
             f"seed {args.seed} ({implementation} core)",
             f"fault schedule: payment outage {schedule.payment_outage[0]:g}-{schedule.payment_outage[1]:g} s, "
             f"recommendations outage {schedule.recommendations_outage[0]:g}-"
             f"{schedule.recommendations_outage[1]:g} s", ""]
    for r in rows:
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]).rstrip())
    for run in runs:
        if run.breaker_transitions:
            moves = ", ".join(f"{t.at:g} s {t.old}->{t.new}" for t in run.breaker_transitions)
            lines.append(f"\n{run.name} payment breaker (s since start): {moves}")
    return "\n".join(lines)


def plot(runs: list[RunResult], schedule: Schedule, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (done, rate, latency) = plt.subplots(3, 1, sharex=True, figsize=(9, 8))
    for run, color in zip(runs, ("tab:red", "tab:blue")):
        xs = [s.t + 0.5 for s in run.series]
        done.plot(xs, [s.completed for s in run.series], marker="o", color=color, label=run.name)
        rate.plot(xs, [None if s.success_rate is None else 100 * s.success_rate for s in run.series],
                  marker="o", color=color, label=run.name)
        latency.plot(xs, [s.p95_ms for s in run.series], marker="o", color=color, label=f"{run.name} p95")
        latency.plot(xs, [s.p50_ms for s in run.series], linestyle="--", color=color, label=f"{run.name} p50")
    for ax in (done, rate, latency):
        ax.axvspan(*schedule.payment_outage, color="red", alpha=0.08)
        ax.axvspan(*schedule.recommendations_outage, color="orange", alpha=0.12)
        ax.grid(alpha=0.3)
    done.text(sum(schedule.payment_outage) / 2, 0.97, "payment outage", transform=done.get_xaxis_transform(),
              ha="center", va="top", fontsize="small")
    done.text(sum(schedule.recommendations_outage) / 2, 0.97, "recommendations outage",
              transform=done.get_xaxis_transform(), ha="center", va="top", fontsize="small")
    done.set_ylabel("checkouts completed / s")
    done.legend(fontsize="small", loc="lower left")
    rate.set_ylabel("finished that succeeded (%)")
    rate.set_ylim(-5, 105)
    latency.set_ylabel("checkout latency (ms)")
    latency.set_yscale("log")
    latency.set_xlabel("seconds since start (a gap: no checkout finished in that second)")
    latency.legend(fontsize="small", loc="upper left", ncol=2)
    fig.suptitle("buttress demo: checkouts per second, naive vs protected")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the command -------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=positive_float, default=12.0, metavar="SECONDS",
                        help="seconds per run; two runs (default: 12)")
    parser.add_argument("--clients", type=positive_int, default=40, help="concurrent clients (default: 40)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault schedule (default: 1)")
    parser.add_argument("--json", action="store_true", help="print every number as JSON instead of the table")
    parser.add_argument("--plot", metavar="FILE.png", help="draw success rate and latency over time (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")


def _error(message: str) -> int:
    print(f"python -m buttress demo: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if args.plot is not None:       # check before spending the run's time
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _error("--plot needs matplotlib, which is not installed (pip install matplotlib)")
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            return _error(f"--plot: folder {folder!r} does not exist")
    schedule = Schedule.draw(args.seed, args.duration)
    runs = [asyncio.run(_run(kind, schedule, args)) for kind in (Naive, Protected)]
    if args.json:
        print(json.dumps({"config": {"duration": args.duration, "clients": args.clients, "seed": args.seed,
                                     "implementation": buttress.IMPLEMENTATION},
                          "schedule": asdict(schedule), "runs": {r.name: asdict(r) for r in runs}}, indent=2))
    else:
        print(render(runs, schedule, args, buttress.IMPLEMENTATION))
    if args.plot is not None:
        plot(runs, schedule, args.plot)
        if not args.quiet:
            print(f"plot written to {args.plot}", file=sys.stderr)
    return 0
