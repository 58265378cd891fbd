"""The three dependencies of the checkout, simulated, and the one seeded fault schedule they follow.

The same service objects serve both transports: called directly (``--transport inprocess``) or behind
uvicorn on 127.0.0.1 (``--transport http``, see `buttress.demo.http`). Every fault is a function of the
seed, never of timing or call order:

- outage windows (seconds since the start of a run) are drawn from ``random.Random(f"{seed}:faults")``;
- a per-call fault is drawn from ``random.Random(f"{seed}:{service}:{order}:{n}")`` where ``n`` counts the
  requests this service has received for that order (1 for the first, 2 for a retry, ...), so the naive
  and the protected run meet the same fault on the same request of the same checkout.
"""
from __future__ import annotations

import asyncio
import collections
import random
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")

__all__ = ["Faults", "DependencyError", "Unavailable", "ConnectionLost", "ServerError", "Service",
           "PaymentGateway", "Inventory", "Recommendations", "Dependencies", "POPULAR"]

POPULAR = ("bestseller-1", "bestseller-2", "bestseller-3")     # what a failed recommendation falls back to

PAYMENT_CAPACITY = 16           # charges the gateway serves at once; the rest queue


# -- the errors a dependency answers with (mapped to and from HTTP by buttress.demo.http) ------------------

class DependencyError(Exception):
    """A dependency answered with an error, or dropped the connection without an answer."""


class Unavailable(DependencyError):
    """HTTP 503: the request was not done (a declined charge, the gateway's outage)."""


class ConnectionLost(DependencyError):
    """The connection was reset without a reply; the work may or may not have been done."""


class ServerError(DependencyError):
    """HTTP 500."""


# -- the fault schedule ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Faults:
    """Outage windows in seconds since the start of a run, drawn from the seed; the same for both runs."""
    seed: int
    payment_outage: tuple[float, float]
    recommendations_outage: tuple[float, float]

    @classmethod
    def draw(cls, seed: int, duration: float) -> Faults:
        rng = random.Random(f"{seed}:faults")
        pay = rng.uniform(0.25, 0.35)      # a fifth of the arrivals' span, starting between 25 % and 35 % of it
        recs = rng.uniform(0.6, 0.7)       # 15 % of it, starting between 60 % and 70 % of it
        return cls(seed, (round(pay * duration, 2), round((pay + 0.2) * duration, 2)),
                   (round(recs * duration, 2), round((recs + 0.15) * duration, 2)))

    def as_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "payment_outage": list(self.payment_outage),
                "recommendations_outage": list(self.recommendations_outage)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Faults:
        return cls(int(d["seed"]), tuple(d["payment_outage"]), tuple(d["recommendations_outage"]))


# -- the services ------------------------------------------------------------------------------------------

class Service:
    """A simulated remote service. Every request runs as its own server-side task, so a client that
    gives up (a timeout) does not stop the work, as a remote server never learns that its client left.
    With a `capacity`, at most that many requests are served at once and the rest queue."""

    def __init__(self, name: str, faults: Faults, elapsed: Callable[[], float], capacity: int | None = None) -> None:
        self.name = name
        self.faults = faults
        self.elapsed = elapsed
        self.requests = 0
        self.seen: collections.Counter[str] = collections.Counter()   # order -> requests received for it
        self._slots = asyncio.Semaphore(capacity) if capacity else None
        self._tasks: set[asyncio.Task[Any]] = set()

    def draw(self, order: str) -> random.Random:
        """The fault generator of this request: the n-th request of this service for `order`."""
        self.requests += 1
        self.seen[order] += 1
        return random.Random(f"{self.faults.seed}:{self.name}:{order}:{self.seen[order]}")

    async def serve(self, work: Callable[..., Awaitable[T]], *args: Any) -> T:
        task = asyncio.ensure_future(self._run(work, *args))
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return await asyncio.shield(task)       # the client may give up; the server-side task runs on

    async def _run(self, work: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._slots is None or work.__name__ == "_black_hole":
            return await work(*args)
        async with self._slots:
            return await work(*args)

    def _done(self, task: asyncio.Task[Any]) -> None:
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
    """Critical and slow (30-70 ms a charge), 16 charges at once, the rest queue. Per request: 2 % declined
    with a 503 (not charged), 2 % charged but the reply is lost, 1 % hanging 2-6 s before charging. In its
    outage it is unreachable: a request gets no reply at all (it hangs until the client gives up) and
    charges nothing.
    Charges are deduplicated by idempotency key."""

    def __init__(self, faults: Faults, elapsed: Callable[[], float]) -> None:
        super().__init__("payment", faults, elapsed, capacity=PAYMENT_CAPACITY)
        self.charges: collections.Counter[str] = collections.Counter()    # order -> times charged
        self.deduplicated = 0
        self._by_key: dict[str, str] = {}

    async def charge(self, order: str, idempotency_key: str | None = None) -> str:
        rng = self.draw(order)
        draw, latency, hang = rng.random(), rng.uniform(0.03, 0.07), rng.uniform(2.0, 6.0)
        start, end = self.faults.payment_outage
        if start <= self.elapsed() < end:       # unreachable: the request never gets to a worker, no reply
            return await self.serve(self._black_hole)
        return await self.serve(self._charge, order, idempotency_key, draw, latency, hang)

    async def _black_hole(self) -> str:
        await asyncio.sleep(3600.0)     # stopped at the end of the run
        raise AssertionError("unreachable")

    async def _charge(self, order: str, key: str | None, draw: float, latency: float, hang: float) -> str:
        await asyncio.sleep(hang if draw >= 0.99 else latency)
        if draw < 0.02:
            raise Unavailable("payment gateway: 503, card not charged")
        charge_id = self._commit(order, key)
        if draw < 0.04:
            raise ConnectionLost("payment gateway: connection reset after the charge")
        return charge_id

    def _commit(self, order: str, key: str | None) -> str:
        if key is not None and key in self._by_key:
            self.deduplicated += 1
            return self._by_key[key]
        self.charges[order] += 1
        charge_id = f"ch_{order}_{self.charges[order]}"
        if key is not None:
            self._by_key[key] = charge_id
        return charge_id

    @property
    def double_charges(self) -> int:
        """Charges beyond the first for the same order."""
        return sum(n - 1 for n in self.charges.values() if n > 1)


class Inventory(Service):
    """Critical and fast (2-8 ms a stock lookup). Per request: 1 % crash (connection reset), 0.5 % stall of 2 s."""

    def __init__(self, faults: Faults, elapsed: Callable[[], float]) -> None:
        super().__init__("inventory", faults, elapsed)

    async def stock(self, order: str, item: str) -> bool:
        rng = self.draw(order)
        draw, latency = rng.random(), rng.uniform(0.002, 0.008)
        return await self.serve(self._stock, draw, latency)

    async def _stock(self, draw: float, latency: float) -> bool:
        await asyncio.sleep(2.0 if draw >= 0.995 else latency)
        if draw < 0.01:
            raise ConnectionLost("inventory: connection reset (crash)")
        return True


class Recommendations(Service):
    """Non-critical (10-30 ms); 25 % of requests fail with a 500; in its outage every request hangs."""

    def __init__(self, faults: Faults, elapsed: Callable[[], float]) -> None:
        super().__init__("recommendations", faults, elapsed)

    async def for_item(self, order: str, item: str) -> list[str]:
        rng = self.draw(order)
        draw, latency = rng.random(), rng.uniform(0.01, 0.03)
        return await self.serve(self._for_item, item, draw, latency)

    async def _for_item(self, item: str, draw: float, latency: float) -> list[str]:
        start, end = self.faults.recommendations_outage
        if start <= self.elapsed() < end:
            await asyncio.sleep(3600.0)     # no reply at all (stopped at the end of the run)
        await asyncio.sleep(latency)
        if draw < 0.25:
            raise ServerError("recommendations: 500 internal error")
        return [f"{item}-goes-with-1", f"{item}-goes-with-2"]


@dataclass
class Dependencies:
    payment: PaymentGateway
    inventory: Inventory
    recommendations: Recommendations

    @classmethod
    def start(cls, faults: Faults, elapsed: Callable[[], float]) -> Dependencies:
        return cls(PaymentGateway(faults, elapsed), Inventory(faults, elapsed), Recommendations(faults, elapsed))

    def stats(self) -> dict[str, Any]:
        """What the dependencies saw in one run (read by the run's result)."""
        return {"double_charges": self.payment.double_charges, "deduplicated_charges": self.payment.deduplicated,
                "charged_orders": sorted(self.payment.charges), "payment_requests": self.payment.requests,
                "inventory_requests": self.inventory.requests,
                "recommendations_requests": self.recommendations.requests}

    async def close(self) -> None:
        for service in (self.payment, self.inventory, self.recommendations):
            await service.close()
