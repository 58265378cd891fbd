"""`python -m buttress bench`: the overhead per call of every pattern, in one process.

Each case is timed as a loop of calls (auto-calibrated to ~`--min-time` per repeat, `--repeat` repeats,
median taken) next to its floor measured the same way in the same run: a bare call, a bare
raise+catch, a bare await. Output: median ns per call, ns over the floor and the ratio to it; the
compiled core and the pure-Python twins (a second process with BUTTRESS_NO_EXTENSIONS=1) and every
installed peer (pip install "buttress[bench]").
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

FLOORS = {"call": "bare call", "pair": "two bare calls in a function", "lambda": "a lambda calling a bare call",
          "raise": "raise+catch", "await": "bare await", "araise": "async raise+catch"}


@dataclass
class Case:
    pattern: str           # what is measured, e.g. "circuit breaker: success"
    who: str               # "buttress" or the peer's name
    floor: str             # a key of FLOORS
    make: Callable[[], Any]   # -> a zero-arg callable (sync) or a zero-arg coroutine function (async)
    is_async: bool = False


@dataclass
class Result:
    pattern: str
    who: str
    implementation: str    # "cython", "python" or "-" (peers, floors)
    floor: str
    median_ns: float
    floor_ns: float = 0.0
    over_ns: float = 0.0
    ratio: float = 1.0


# -- the harness -----------------------------------------------------------------------------------------

def _time_sync(fn: Callable[[], Any], n: int) -> float:
    rng = range(n)
    t0 = time.perf_counter_ns()
    for _ in rng:
        fn()
    return (time.perf_counter_ns() - t0) / n


def _time_async(fn: Callable[[], Any], n: int, loop: asyncio.AbstractEventLoop) -> float:
    async def batch() -> float:
        rng = range(n)
        t0 = time.perf_counter_ns()
        for _ in rng:
            await fn()
        return (time.perf_counter_ns() - t0) / n
    return loop.run_until_complete(batch())


def measure(fn: Callable[[], Any], is_async: bool, min_time: float, repeat: int,
            loop: asyncio.AbstractEventLoop) -> float:
    """Median ns per call over `repeat` timed loops of ~min_time seconds each."""
    def timed(n: int) -> float:
        return _time_async(fn, n, loop) if is_async else _time_sync(fn, n)

    n = 1
    while True:                                   # calibrate: grow n until one loop takes min_time / 4
        per = timed(n)
        if per * n >= min_time * 1e9 / 4 or n >= 10_000_000:
            break
        n *= 4
    n = max(1, int(min_time * 1e9 / max(per, 1.0)))
    return statistics.median(timed(n) for _ in range(repeat))


# -- cases -------------------------------------------------------------------------------------------

def _bare() -> None:
    return None


def _raise() -> None:
    raise ValueError("bench")


def _catching(fn: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except ValueError:
            pass
    return run


async def _abare() -> None:
    return None


async def _araise() -> None:
    raise ValueError("bench")


def _acatching(fn: Callable[[], Any]) -> Callable[[], Any]:
    async def run() -> None:
        try:
            await fn()
        except ValueError:
            pass
    return run


def _bare_pair(a: Callable[[], Any] = _bare, b: Callable[[], Any] = _bare) -> None:
    a()
    b()


def floor_cases() -> list[Case]:
    return [Case(FLOORS["call"], "floor", "call", lambda: _bare),
            Case(FLOORS["pair"], "floor", "pair", lambda: _bare_pair),
            Case(FLOORS["lambda"], "floor", "lambda", lambda: (lambda: _bare())),
            Case(FLOORS["raise"], "floor", "raise", lambda: _catching(_raise)),
            Case(FLOORS["await"], "floor", "await", lambda: _abare, True),
            Case(FLOORS["araise"], "floor", "araise", lambda: _acatching(_araise), True)]


def buttress_cases() -> list[Case]:
    import buttress
    from buttress.clock import FakeClock

    def breaker_failure() -> Callable[[], Any]:
        cb = buttress.CircuitBreaker(name="bench", slow_call_duration=None)
        cb.metrics_only()                         # records every failure, never opens
        return _catching(cb(_raise))

    def breaker_async_failure() -> Callable[[], Any]:
        cb = buttress.CircuitBreaker(name="bench", slow_call_duration=None)
        cb.metrics_only()
        return _acatching(cb(_araise))

    def retry_one_failure() -> Callable[[], Any]:
        clock = FakeClock()
        state = [0]

        def flaky() -> None:
            state[0] += 1
            if state[0] % 2:
                raise ConnectionError()

        return buttress.Retry(max_attempts=2, backoff=buttress.backoff.constant(0.001), clock=clock)(flaky)

    def bulkhead_pair() -> Callable[[], Any]:
        bh = buttress.Bulkhead(max_concurrent=10)
        acq, rel = bh.try_acquire, bh.release

        def pair() -> None:
            acq()
            rel()
        return pair

    def bulkhead_with() -> Callable[[], Any]:
        bh = buttress.Bulkhead(max_concurrent=10)

        def run() -> None:
            with bh:
                _bare()
        return run

    def bulkhead_async() -> Callable[[], Any]:
        bh = buttress.Bulkhead(max_concurrent=10)

        async def run() -> None:
            async with bh:
                await _abare()
        return run

    def keyed() -> Callable[[], Any]:
        kl = buttress.KeyedLimiter(rate=1e9, capacity=1_000_000, max_keys=100_000)
        for k in range(50_000):
            kl.try_acquire(k)
        return lambda: kl.try_acquire(12_345)

    def token_async() -> Callable[[], Any]:
        tb = buttress.TokenBucket(rate=1e9, capacity=10**9)
        return lambda: tb.acquire_async(1)

    def shedder() -> Callable[[], Any]:
        from buttress.shedding import LoadShedder, Priority
        shed = LoadShedder(max_in_flight=100)

        def run() -> None:
            with shed.admit(Priority.LOW):
                _bare()
        return run

    def shedder_refused() -> Callable[[], Any]:
        from buttress.shedding import LoadShedder, Priority
        shed = LoadShedder(max_in_flight=1)
        admit, low = shed.admit, Priority.LOW
        holder = [admit(Priority.CRITICAL)]         # held while the case lives (collected, it gives the slot back)
        holder[0].__enter__()

        def run() -> None:
            try:
                with admit(low):
                    _bare()
            except buttress.Overloaded:
                pass
        run.holder = holder  # type: ignore[attr-defined]
        return run

    def shedder_async() -> Callable[[], Any]:
        from buttress.shedding import LoadShedder, Priority
        shed = LoadShedder(max_in_flight=100)
        admit, high = shed.admit, Priority.HIGH

        async def run() -> None:
            async with admit(high):
                return await _abare()
        return run

    def pipeline() -> Callable[[], Any]:
        p = buttress.Pipeline(buttress.Retry(), buttress.CircuitBreaker(name="p", slow_call_duration=None),
                              buttress.Bulkhead(max_concurrent=10), buttress.TokenBucket(rate=1e9, capacity=10**9))
        return p(_bare)

    def pipeline_async() -> Callable[[], Any]:
        p = buttress.Pipeline(buttress.Retry(), buttress.CircuitBreaker(name="p", slow_call_duration=None),
                              buttress.Bulkhead(max_concurrent=10), buttress.TokenBucket(rate=1e9, capacity=10**9))
        return p(_abare)

    def breaker_open() -> Any:
        cb = buttress.CircuitBreaker(name="bench-open", slow_call_duration=None)
        cb.force_open()
        return cb

    def breaker_refused() -> Callable[[], Any]:
        guarded = breaker_open()(_bare)

        def run() -> None:
            try:
                guarded()
            except buttress.CircuitOpenError:
                pass
        return run

    def breaker_async_refused() -> Callable[[], Any]:
        guarded = breaker_open()(_abare)

        async def run() -> None:
            try:
                await guarded()
            except buttress.CircuitOpenError:
                pass
        return run

    def breaker_method() -> Callable[[], Any]:
        cb = buttress.CircuitBreaker(name="bench", slow_call_duration=None)

        class Client:
            @cb
            def get(self) -> None:
                return None
        return Client().get

    def breaker_with() -> Callable[[], Any]:
        cb = buttress.CircuitBreaker(name="bench", slow_call_duration=None)

        def run() -> None:
            with cb:
                _bare()
        return run

    def bulkhead_full() -> Callable[[], Any]:
        bh = buttress.Bulkhead(max_concurrent=1)
        bh.try_acquire()                            # held for the life of the case: every call is refused
        guarded = bh(_bare)

        def run() -> None:
            try:
                guarded()
            except buttress.BulkheadFullError:
                pass
        return run

    def bucket_empty() -> Callable[[], Any]:
        tb = buttress.TokenBucket(rate=1e-3, capacity=1)
        tb.try_acquire()                            # empty for the next ~1000 s
        guarded = tb(_bare)

        def run() -> None:
            try:
                guarded()
            except buttress.RateLimitExceeded:
                pass
        return run

    def hedge_at_once() -> Callable[[], Any]:
        return buttress.Hedge(0.05)(_abare)

    from buttress._impl import core

    def permits_pair() -> Callable[[], Any]:
        p = core("permits").Permits(10)
        acq, rel = p.try_acquire, p.release

        def pair() -> None:
            acq()
            rel()
        return pair

    def window_record(kind: str) -> Callable[[], Any]:
        w = core("window").CountWindow(100) if kind == "count" else core("window").TimeWindow(10)
        record = w.record
        return lambda: record(False)

    return [
        Case("core: GCRA try_acquire", "buttress", "call",
             lambda: core("gcra").GCRA(rate=1e9, capacity=10**9).try_acquire),
        Case("core: permits try_acquire + release pair", "buttress", "pair", permits_pair),
        Case("core: count window record", "buttress", "lambda", lambda: window_record("count")),
        Case("core: time window record", "buttress", "lambda", lambda: window_record("time")),
        Case("circuit breaker: success", "buttress", "call",
             lambda: buttress.CircuitBreaker(name="bench", slow_call_duration=None)(_bare)),
        Case("circuit breaker: success, slow-call timing", "buttress", "call",
             lambda: buttress.CircuitBreaker(name="bench")(_bare)),
        Case("circuit breaker: failure", "buttress", "raise", breaker_failure),
        Case("circuit breaker: async success", "buttress", "await",
             lambda: buttress.CircuitBreaker(name="bench", slow_call_duration=None)(_abare), True),
        Case("circuit breaker: async failure", "buttress", "araise", breaker_async_failure, True),
        Case("circuit breaker: refusal (open), caught", "buttress", "raise", breaker_refused),
        Case("circuit breaker: async refusal (open), caught", "buttress", "araise", breaker_async_refused, True),
        Case("circuit breaker: @cb on a method", "buttress", "call", breaker_method),
        Case("circuit breaker: with cb around a call", "buttress", "call", breaker_with),
        Case("retry: success", "buttress", "call", lambda: buttress.Retry(max_attempts=3)(_bare)),
        Case("retry: one failed attempt, then success", "buttress", "raise", retry_one_failure),
        Case("bulkhead: try_acquire + release", "buttress", "call", bulkhead_pair),
        Case("bulkhead: with around a call", "buttress", "call", bulkhead_with),
        Case("bulkhead: async with", "buttress", "await", bulkhead_async, True),
        Case("bulkhead: @bh on an async def", "buttress", "await",
             lambda: buttress.Bulkhead(max_concurrent=10)(_abare), True),
        Case("bulkhead: full, refused, caught", "buttress", "raise", bulkhead_full),
        Case("fallback: success path", "buttress", "call", lambda: buttress.Fallback("x")(_bare)),
        Case("rate limiter: try_acquire", "buttress", "call",
             lambda: buttress.TokenBucket(rate=1e9, capacity=10**9).try_acquire),
        Case("rate limiter: async acquire, no wait", "buttress", "await", token_async, True),
        Case("rate limiter: @tb on an async def", "buttress", "await",
             lambda: buttress.TokenBucket(rate=1e9, capacity=10**9)(_abare), True),
        Case("rate limiter: empty bucket, refused, caught", "buttress", "raise", bucket_empty),
        Case("keyed limiter: try_acquire, 50k live keys", "buttress", "call", keyed),
        Case("load shedder: admit LOW", "buttress", "call", shedder),
        Case("load shedder: shed LOW, caught", "buttress", "raise", shedder_refused),
        Case("load shedder: async with admit", "buttress", "await", shedder_async, True),
        Case("retry: async success", "buttress", "await", lambda: buttress.Retry(max_attempts=3)(_abare), True),
        Case("pipeline: retry+breaker+bulkhead+limiter", "buttress", "call", pipeline),
        Case("pipeline: retry+breaker+bulkhead+limiter, async", "buttress", "await", pipeline_async, True),
        Case("hedge: primary answers at once", "buttress", "await", hedge_at_once, True),
    ]


# the peers are optional (the `bench` extra): their imports tell mypy they may be absent or untyped
def peer_cases() -> list[Case]:
    cases: list[Case] = []

    def add(pattern: str, who: str, floor: str, make: Callable[[], Any], is_async: bool = False) -> None:
        cases.append(Case(pattern, who, floor, make, is_async))

    def pybreaker_() -> Any:
        import pybreaker  # type: ignore[import-not-found, import-untyped, unused-ignore]
        return pybreaker.CircuitBreaker()(_bare)

    def circuitbreaker_() -> Any:
        import circuitbreaker  # type: ignore[import-not-found, import-untyped, unused-ignore]
        return circuitbreaker.CircuitBreaker()(_bare)

    def purgatory_() -> Any:
        import purgatory  # type: ignore[import-not-found, import-untyped, unused-ignore]
        return purgatory.AsyncCircuitBreakerFactory()("bench")(_abare)

    def aiobreaker_() -> Any:
        import aiobreaker  # type: ignore[import-not-found, import-untyped, unused-ignore]
        return aiobreaker.CircuitBreaker()(_abare)

    def tenacity_() -> Any:
        import tenacity  # type: ignore[import-not-found, import-untyped, unused-ignore]
        return tenacity.retry(stop=tenacity.stop_after_attempt(3))(_bare)

    def backoff_() -> Any:
        import backoff  # type: ignore[import-not-found, import-untyped, unused-ignore]
        return backoff.on_exception(backoff.expo, Exception, max_tries=3)(_bare)

    def stamina_() -> Any:
        import stamina  # type: ignore[import-not-found, import-untyped, unused-ignore]
        return stamina.retry(on=Exception, attempts=3)(_bare)

    def limits_() -> Any:
        from limits import parse, storage, strategies  # type: ignore[import-not-found, import-untyped, unused-ignore]
        lim = strategies.MovingWindowRateLimiter(storage.MemoryStorage())
        item = parse("1000000000/second")
        return lambda: lim.hit(item, "k")

    def pyrate_() -> Any:
        import pyrate_limiter as pr  # type: ignore[import-not-found, import-untyped, unused-ignore]
        lim = pr.Limiter(pr.Rate(10**9, pr.Duration.SECOND))
        return lambda: lim.try_acquire("k")

    def token_bucket_() -> Any:
        import token_bucket  # type: ignore[import-not-found, import-untyped, unused-ignore]
        lim = token_bucket.Limiter(10**9, 10**9, token_bucket.MemoryStorage())
        return lambda: lim.consume(b"k")

    def throttled_() -> Any:
        from throttled import Throttled, per_sec  # type: ignore[import-not-found, import-untyped, unused-ignore]
        t = Throttled(key="k", quota=per_sec(10**9))
        return t.limit

    def aiolimiter_() -> Any:
        from aiolimiter import AsyncLimiter  # type: ignore[import-not-found, import-untyped, unused-ignore]
        al = AsyncLimiter(10**9, 1)

        async def run() -> None:
            async with al:
                await _abare()
        return run

    def semaphore_() -> Any:
        sem = asyncio.Semaphore(10)

        async def run() -> None:
            async with sem:
                await _abare()
        return run

    add("bulkhead: async with", "asyncio.Semaphore", "await", semaphore_, True)
    add("circuit breaker: success", "pybreaker", "call", pybreaker_)
    add("circuit breaker: success", "circuitbreaker", "call", circuitbreaker_)
    add("circuit breaker: async success", "purgatory", "await", purgatory_, True)
    add("circuit breaker: async success", "aiobreaker", "await", aiobreaker_, True)
    add("retry: success", "tenacity", "call", tenacity_)
    add("retry: success", "backoff", "call", backoff_)
    add("retry: success", "stamina", "call", stamina_)
    add("rate limiter: try_acquire", "limits", "call", limits_)
    add("rate limiter: try_acquire", "pyrate-limiter", "call", pyrate_)
    add("rate limiter: try_acquire", "token-bucket", "call", token_bucket_)
    add("rate limiter: try_acquire", "throttled-py", "call", throttled_)
    add("rate limiter: async acquire, no wait", "aiolimiter", "await", aiolimiter_, True)
    return cases


# -- running -----------------------------------------------------------------------------------------

def run_cases(cases: list[Case], implementation: str, min_time: float, repeat: int,
              progress: Callable[[str], None]) -> tuple[list[Result], list[str]]:
    loop = asyncio.new_event_loop()
    results, skipped = [], []
    try:
        for i, case in enumerate(cases, 1):
            progress(f"[{i}/{len(cases)}] {case.who}: {case.pattern}")
            try:
                fn = case.make()
            except ImportError as exc:
                skipped.append(f"{case.who} ({exc.name or exc})")
                continue
            ns = measure(fn, case.is_async, min_time, repeat, loop)
            impl = implementation if case.who == "buttress" else "-"
            results.append(Result(case.pattern, case.who, impl, case.floor, ns))
    finally:
        loop.close()
    return results, skipped


def _relate(results: list[Result]) -> None:
    floors = {r.floor: r.median_ns for r in results if r.who == "floor"}
    for r in results:
        r.floor_ns = floors.get(r.floor, 0.0)
        r.over_ns = r.median_ns - r.floor_ns
        r.ratio = r.median_ns / r.floor_ns if r.floor_ns else float("nan")


def _twin_results(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The buttress cases again, in a child process running the pure-Python twins."""
    env = dict(os.environ, BUTTRESS_NO_EXTENSIONS="1")
    env.pop("BUTTRESS_REQUIRE_EXTENSIONS", None)
    cmd = [sys.executable, "-m", "buttress", "bench", "--json", "--no-peers", "--no-twins",
           "--min-time", str(args.min_time), "--repeat", str(args.repeat), "--quiet"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"pure-Python bench failed: {out.stderr.strip()[-500:]}")
    return [r for r in json.loads(out.stdout)["results"] if r["who"] == "buttress"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import number_in
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    # bounded, so a typo cannot run for ever: 1 ms .. 10 s per loop, 1 .. 101 loops
    parser.add_argument("--min-time", type=number_in(0.0, 10.0, low_open=True), default=0.05, metavar="S",
                        help="seconds per timed loop, in (0, 10] (default 0.05)")
    parser.add_argument("--repeat", type=number_in(1, 101, whole=True), default=5,
                        help="timed loops per case, in [1, 101]; the median is kept")
    parser.add_argument("--no-peers", action="store_true", help="skip the peer libraries")
    parser.add_argument("--no-twins", action="store_true", help="skip the pure-Python twins")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    import buttress
    def progress(msg: str) -> None:
        if not args.quiet:
            sys.stderr.write(f"\r\x1b[2Kbench {msg}" if sys.stderr.isatty() else f"bench {msg}\n")
            sys.stderr.flush()

    cases = floor_cases() + buttress_cases() + ([] if args.no_peers else peer_cases())
    t0 = time.monotonic()
    results, skipped = run_cases(cases, buttress.IMPLEMENTATION, args.min_time, args.repeat, progress)
    _relate(results)
    if buttress.IMPLEMENTATION == "cython" and not args.no_twins:
        progress("pure-Python twins (child process) ...")
        results += [Result(**r) for r in _twin_results(args)]    # related to the child's own floors
    if not args.quiet and sys.stderr.isatty():
        sys.stderr.write("\r\x1b[2K")
    elapsed = time.monotonic() - t0
    if args.json:
        print(json.dumps({"python": sys.version.split()[0], "implementation": buttress.IMPLEMENTATION,
                          "seconds": round(elapsed, 2), "skipped": skipped,
                          "results": [asdict(r) for r in results]}, indent=2))
        return 0
    print(format_table(results))
    if skipped:
        print(f"\nnot installed (pip install \"buttress[bench]\"): {', '.join(skipped)}")
    print(f"\nPython {sys.version.split()[0]}, {elapsed:.0f} s; medians of {args.repeat} loops of "
          f"~{args.min_time:g} s; 'over' = ns added to the floor measured in the same run")
    return 0


def format_table(results: list[Result]) -> str:
    order = {p: i for i, p in enumerate(dict.fromkeys(r.pattern for r in results))}
    rows = sorted(results, key=lambda r: (r.who != "floor", order[r.pattern], r.who != "buttress",
                                          r.implementation != "cython", r.who))
    lines = ["| pattern | library | impl | median ns | floor | over floor | x floor |",
             "|---|---|---|---:|---|---:|---:|"]
    for r in rows:
        over = "" if r.who == "floor" else f"{r.over_ns:+.0f}"
        ratio = "" if r.who == "floor" else f"{r.ratio:.2f}"
        lines.append(f"| {r.pattern} | {r.who} | {r.implementation} | {r.median_ns:.0f} | "
                     f"{FLOORS[r.floor]} | {over} | {ratio} |")
    return "\n".join(lines)
