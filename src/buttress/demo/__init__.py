"""`python -m buttress demo`: a shop's checkout under open-loop load and seeded faults, naive vs protected.

One seeded Poisson schedule of checkouts (`checkout.arrivals`) and one seeded fault schedule
(`deps.Faults`) are replayed twice: once by a shop that calls its three dependencies naively, once by
the same shop calling them through buttress. The dependencies are simulated services, called in this
process (``--transport inprocess``, the default) or over real HTTP (``--transport http``: uvicorn on
127.0.0.1, see `buttress.demo.http`). Every number printed is measured from the two runs; see
docs/demo.md.

Modules: `deps` (the services and the faults), `checkout` (arrivals, naive and protected calls, one run,
its numbers), `http` (the services over HTTP, called through `buttress.httpx`), `table`, `plot`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from ..cli import number_in

__all__ = ["add_arguments", "run", "demo"]

TRANSPORTS = ("inprocess", "http")
# checkouts per second users attempt, by transport: a rate the healthy shop serves (no outage: no line for
# a worker, answers in about 0.1 s) and the faulty one cannot. Over HTTP every checkout is three loopback
# requests through httpx and uvicorn, each side a Python process: on a 2-core machine shared with other
# work, a healthy run kept up at 30/s every time and fell behind at 40/s now and then (docs/demo.md).
DEFAULT_RATE = {"inprocess": 50.0, "http": 30.0}
# What the demo can run: it replays its arrivals in real time and keeps every one in memory, so each number
# is bounded (an unbounded --rate built a schedule of millions of arrivals: gigabytes, and a hang) and so is
# their product, the arrivals of one run.
MAX_RATE = 1000.0           # checkouts per second (20x the default; beyond it the shop, not the demo, is measured)
MAX_SECONDS = 3600.0        # --duration
MAX_WAIT = 600.0            # --patience, --drain
MAX_WORKERS = 10_000
MAX_ARRIVALS = 100_000      # --rate x --duration


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transport", choices=TRANSPORTS, default="inprocess",
                        help="how the shop reaches its dependencies: objects in this process, or uvicorn HTTP "
                             "services on 127.0.0.1 (needs httpx and uvicorn) (default: inprocess)")
    parser.add_argument("--duration", type=number_in(0, MAX_SECONDS, low_open=True), default=10.0, metavar="SECONDS",
                        help="seconds of arrivals in each run (default: 10)")
    parser.add_argument("--rate", type=number_in(0, MAX_RATE, low_open=True), default=None, metavar="PER_SECOND",
                        help="checkouts users attempt per second, on average (default: 50, or 30 with "
                             "--transport http: what the HTTP services serve when healthy on 2 cores)")
    parser.add_argument("--drain", type=number_in(0, MAX_WAIT), default=None, metavar="SECONDS",
                        help="seconds a run waits for answers after the last arrival (default: the patience, "
                             "so that every user has an answer or has given up)")
    parser.add_argument("--patience", type=number_in(0, MAX_WAIT, low_open=True), default=5.0, metavar="SECONDS",
                        help="seconds a user waits for an answer before giving up; the shop is not told "
                             "and carries on (default: 5)")
    parser.add_argument("--workers", type=number_in(1, MAX_WORKERS, whole=True), default=64,
                        help="checkouts the shop serves at once; the rest wait in line (default: 64)")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of the arrivals and of the faults (default: 1)")
    parser.add_argument("--json", action="store_true", help="print every number as JSON instead of the table")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw both runs second by second (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _error(message: str) -> int:
    print(f"python -m buttress demo: error: {message}", file=sys.stderr)
    return 2


class _Progress:
    """A live line on a terminal; on anything else one line per finished run."""

    def __init__(self, enabled: bool, duration: float) -> None:
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.duration = duration

    @staticmethod
    def line(kind: str, t: float, tally: Any, end: bool = False) -> str:
        c = tally.counts()
        busy, waiting = tally.end_line if end else (tally.in_progress, tally.waiting)
        return (f"{kind:>9} {t:5.1f} s  arrived {len(tally.dispatched)}: {c['completed']} completed, "
                f"{c['failed_after_wait']} failed after waiting, {c['rejected_fast']} rejected fast; "
                f"{busy + waiting} in the shop ({waiting} waiting for a worker) ")

    def __call__(self, kind: str, t: float, tally: Any) -> None:
        if self.live:
            sys.stderr.write("\r" + self.line(kind, t, tally))
            sys.stderr.flush()

    def done(self, kind: str, t: float, tally: Any) -> None:
        if self.enabled:
            sys.stderr.write(("\r" if self.live else "") + self.line(kind, t, tally, end=True) + "\n")
            sys.stderr.flush()


async def demo(args: argparse.Namespace, progress: _Progress | None = None) -> dict[str, Any]:
    """Both runs; returns the JSON record (see docs/demo.md)."""
    import buttress

    from . import checkout
    from .deps import Faults

    if args.drain is None:
        args.drain = args.patience
    if args.rate is None:
        args.rate = DEFAULT_RATE[args.transport]
    cfg = checkout.RunConfig(seed=args.seed, rate=args.rate, duration=args.duration, drain=args.drain,
                             patience=args.patience, workers=args.workers)
    schedule = checkout.arrivals(args.seed, args.rate, args.duration)
    faults = Faults.draw(args.seed, args.duration)
    if args.transport == "http":
        from .http import Http
        backend: Any = Http()
    else:
        backend = checkout.InProcess()
    runs: dict[str, Any] = {}
    async with backend:
        for kind in ("naive", "protected"):
            record = await checkout.run(kind, schedule, backend, faults, cfg, progress)
            if progress is not None:
                progress.done(kind, record["ended"], record["tally"])
            runs[kind] = checkout.summarize(record, schedule, cfg)
        detail = backend.detail
    return {"transport": backend.name, "transport_detail": detail, "implementation": buttress.IMPLEMENTATION,
            "seed": args.seed, "rate_per_s": args.rate,
            "default_rate_per_s": DEFAULT_RATE[args.transport], "duration_s": args.duration, "drain_s": args.drain,
            "patience_s": args.patience, "workers": args.workers, "arrivals": len(schedule), "arrivals_sha256": checkout.digest(schedule),
            "faults": faults.as_dict(), "runs": runs}


def run(args: argparse.Namespace) -> int:
    rate = DEFAULT_RATE[args.transport] if args.rate is None else args.rate
    if rate * args.duration > MAX_ARRIVALS:
        return _error(f"argument --rate x --duration: at most {MAX_ARRIVALS} arrivals per run (every one is kept "
                      f"in memory), got {rate:g}/s x {args.duration:g} s = {rate * args.duration:.0f}")
    if args.plot is not None:       # checked before spending the runs' time
        from .plot import check_path
        problem = check_path(args.plot)
        if problem:
            return _error(problem)
    if args.transport == "http":
        try:
            import httpx  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as exc:
            return _error(f"--transport http needs httpx and uvicorn ({exc}; pip install httpx uvicorn)")
    result = asyncio.run(demo(args, _Progress(not args.quiet, args.duration)))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_render(result))
    if args.plot is not None:
        from .plot import draw
        draw(result, args.plot)
        if not args.quiet:
            print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _render(result: dict[str, Any]) -> str:
    from .table import render
    return render(result)
