"""Child-process probe for tests/test_crash_safety.py: pokes one core module of one implementation
the way a fuzzer or a careless user would and prints one JSON line per step, flushed before the step
runs, so a crash or a hang names the step that caused it.

    python tests/crash_probe.py uninit cython breaker
    python tests/crash_probe.py now python gcra

The probe itself never judges; the parent compares outcomes (compiled vs twin) and checks that no
step crashed, hung, or raised anything but a clear TypeError / ValueError / RuntimeError.
"""
from __future__ import annotations

import json
import math
import sys

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
# every `now=` a caller can pass: the int64 edges, just outside them, huge ints, the sentinel -1
NOWS = [0, 1, -1, -2, -5_000_000_000, 1_700_000_000 * 10**9, INT64_MAX, INT64_MAX - 1, INT64_MIN, INT64_MIN + 1,
        2**63, -(2**63) - 1, 2**64, 2**200, -(2**200)]
# argument lists tried on every public method of an uninitialised object
ARGSETS = [(), (1,), (0,), (1, 0), (1, 1, 0), (0, 0, 0), (None,), ("k",), (ValueError("x"),),
           (1, 0, 0, 0, None)]


def emit(**kw: object) -> None:
    print(json.dumps(kw, default=repr), flush=True)


def outcome(fn, *args, value: bool = False) -> str:
    """'raise:<type>', 'nan', or 'ok:<type>' (with the value's repr when `value`, for plain data)."""
    try:
        r = fn(*args)
    except BaseException as exc:  # noqa: BLE001 - the probe records everything
        return "raise:" + type(exc).__name__
    if isinstance(r, float) and math.isnan(r):
        return "nan"
    if isinstance(r, (tuple, list)) and any(isinstance(x, float) and math.isnan(x) for x in r):
        return "nan"
    if value and _plain(r):
        return f"ok:{r!r}"
    return "ok:" + type(r).__name__


def _plain(r: object) -> bool:
    if isinstance(r, (bool, int, float, str, type(None))):
        return True
    return isinstance(r, (tuple, list)) and all(_plain(x) for x in r)


def module(kind: str, name: str):
    from buttress import _impl
    return _impl.compiled(name) if kind == "cython" else _impl.twin(name)


def public_types(mod) -> list[type]:
    return [getattr(mod, n) for n in getattr(mod, "__all__", []) if isinstance(getattr(mod, n), type)]


def members(tp: type) -> list[str]:
    names = [n for n in dir(tp) if not n.startswith("_")]
    return sorted(set(names) | {n for n in ("__call__", "__len__", "__enter__", "__exit__", "__get__")
                                if n in tp.__dict__})


def poke(label: str, obj: object, tp: type) -> None:
    for name in members(tp):
        step = f"{label}.{name}"
        emit(step=step, phase="start")
        try:
            attr = getattr(obj, name)
        except BaseException as exc:  # noqa: BLE001
            emit(step=step, result="raise:" + type(exc).__name__)
            continue
        if not callable(attr):
            emit(step=step, result="ok:" + type(attr).__name__ if not (isinstance(attr, float) and math.isnan(attr))
                 else "nan")
            continue
        for i, args in enumerate(ARGSETS):
            emit(step=f"{step}#{i}", phase="start")
            emit(step=f"{step}#{i}", result=outcome(attr, *args))


def uninit(kind: str, name: str) -> None:
    mod = module(kind, name)
    for tp in public_types(mod):
        emit(step=f"{tp.__name__}.__new__", phase="start")
        try:
            obj = tp.__new__(tp)
        except BaseException as exc:  # noqa: BLE001
            emit(step=f"{tp.__name__}.__new__", result="raise:" + type(exc).__name__)
        else:
            emit(step=f"{tp.__name__}.__new__", result="ok")
            poke(f"{tp.__name__}[new]", obj, tp)
        emit(step=f"{tp.__name__}.subclass", phase="start")
        try:
            sub = type("Sub" + tp.__name__, (tp,), {"__init__": lambda self, *a, **k: None})
            obj = sub()
        except BaseException as exc:  # noqa: BLE001
            emit(step=f"{tp.__name__}.subclass", result="raise:" + type(exc).__name__)
        else:
            emit(step=f"{tp.__name__}.subclass", result="ok")
            poke(f"{tp.__name__}[sub]", obj, tp)


def _fixed_clock(ns: int):
    return lambda: ns


def now_sweep(kind: str, name: str) -> None:
    """Every core method that takes `now=` (or reads a clock) over the whole int64 domain and beyond."""
    mod = module(kind, name)
    for now in NOWS:
        clk = _fixed_clock(max(INT64_MIN, min(INT64_MAX, now)))
        steps = []
        if name == "gcra":
            g = mod.GCRA(10.0, 5, clk)
            steps = [("try_acquire", lambda: [g.try_acquire(1, now) for _ in range(7)]),
                     ("wait_ns", lambda: g.wait_ns(1, now)), ("available", lambda: g.available(now)),
                     ("reserve", lambda: [g.reserve(1, now) for _ in range(3)]),
                     ("clock", lambda: [mod.GCRA(10.0, 5, clk).try_acquire(1) for _ in range(3)])]
        elif name == "keyed":
            k = mod.KeyedGCRA(10.0, 5, 100, 0, clk)
            steps = [("try_acquire", lambda: [k.try_acquire("client", 1, now) for _ in range(7)]),
                     ("wait_ns", lambda: k.wait_ns("client", 1, now)), ("purge", lambda: k.purge(now)),
                     ("clock", lambda: [mod.KeyedGCRA(10.0, 5, 100, 0, clk).try_acquire(b"x") for _ in range(3)])]
        elif name == "window":
            t = mod.TimeWindow(10, 10**9, clk)
            c = mod.CountWindow(10)
            steps = [("tw.record", lambda: [t.record(True, False, now) for _ in range(3)]),
                     ("tw.snapshot", lambda: t.snapshot(now)),
                     ("tw.clock", lambda: _tw_clock(mod, clk)),
                     ("cw.record", lambda: (c.record(True, False), c.snapshot()))]
        elif name == "state":
            def state_steps(now=now):
                s = mod.BreakerState(now)
                return s.load(), s.transition(0, 0, 1, now), s.load(), s.since(1)
            steps = [("state", state_steps)]
        elif name == "breaker":
            for window in ("count", "time"):
                b = mod.BreakerCore(window=window, window_size=5, minimum_calls=2, clock_ns=clk)
                steps += [(f"{window}.acquire", lambda b=b: b.acquire(now)),
                          (f"{window}.record", lambda b=b: b.record(b.acquire(now), 1, now, now, None)),
                          (f"{window}.metrics", lambda b=b: b.metrics(now)),
                          (f"{window}.state_now", lambda b=b: b.state_now(now)),
                          (f"{window}.reset", lambda b=b: b.reset(now))]
        for label, fn in steps:
            step = f"now={now}:{label}"
            emit(step=step, phase="start")
            emit(step=step, result=outcome(fn, value=True))


def _tw_clock(mod, clk):
    t = mod.TimeWindow(10, 10**9, clk)
    t.record(True, True)
    return t.snapshot()


if __name__ == "__main__":
    what, kind, name = sys.argv[1:4]
    {"uninit": uninit, "now": now_sweep}[what](kind, name)
    emit(step="done", result="ok")
