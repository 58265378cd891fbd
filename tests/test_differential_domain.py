"""Hypothesis: compiled core and twin agree over the WHOLE int64 clock domain (DESIGN §3c).

tests/test_differential.py drives the primitives over friendly clocks; here every `now` comes from the
int64 edges, negative and epoch-sized readings, jumps backwards and readings just outside int64, and every
step must give the same result or the same exception type in both implementations.
"""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
S = 1_000_000_000

EDGES = [INT64_MIN, INT64_MIN + 1, -S * 5, -1, 0, 1, 1_700_000_000 * S, INT64_MAX - S, INT64_MAX - 1, INT64_MAX]
absolute = st.one_of(st.sampled_from(EDGES), st.integers(INT64_MIN, INT64_MAX))
# a step: a jump to an absolute reading, or a move (forwards or backwards) from the last one
moves = st.one_of(st.tuples(st.just("abs"), absolute),
                  st.tuples(st.just("rel"), st.integers(-3 * S, 3 * S)),
                  st.tuples(st.just("rel"), st.integers(0, S // 10)))
outside = st.sampled_from([INT64_MAX + 1, INT64_MIN - 1, 2**100, -(2**100)])


def _next(now: int, move: tuple[str, int]) -> int:
    kind, v = move
    return v if kind == "abs" else max(INT64_MIN, min(INT64_MAX, now + v))


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - compared, not swallowed
        return ("raise", type(exc).__name__)


def agree(pair, call):
    r = [outcome(call, obj) for obj in pair]
    assert r[0] == r[1], r
    assert r[0][0] == "ok" or r[0][1] in ("ValueError", "TypeError"), r[0]
    return r[0]


@settings(max_examples=200, deadline=None)
@given(rate=st.sampled_from([1e-6, 0.5, 10.0, 1e3, 1e9]), capacity=st.integers(1, 20), start=absolute,
       ops=st.lists(st.tuples(st.sampled_from(["try", "reserve", "reserve_max", "wait", "avail", "claim",
                                               "refund"]),
                              st.integers(1, 20), moves), max_size=40),
       bad=outside)
def test_gcra_any_clock(both, rate, capacity, start, ops, bad):
    pair = [i.gcra.GCRA(rate=rate, capacity=capacity) for i in both]
    now = start
    receipts: list[int] = []
    for op, n, move in ops:
        now = _next(now, move)
        n = min(n, capacity)
        if op == "refund":
            if receipts:
                agree(pair, lambda g: g.refund(receipts[-1]))
                receipts.pop()
            continue
        call = {"try": lambda g: g.try_acquire(n, now), "reserve": lambda g: g.reserve(n, now),
                "reserve_max": lambda g: g.reserve(n, now, S), "wait": lambda g: g.wait_ns(n, now),
                "avail": lambda g: g.available(now), "claim": lambda g: g.claim(n, now, S)}[op]
        result = agree(pair, call)
        if op == "claim" and result[0] == "ok" and result[1][0] >= 0:
            receipts.append(result[1][1])
    agree(pair, lambda g: g.try_acquire(1, bad))
    assert pair[0].counts() == pair[1].counts()


@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(1, 8), max_keys=st.integers(1, 8), start=absolute,
       ops=st.lists(st.tuples(st.sampled_from(["try", "wait", "purge"]), st.integers(0, 12), moves), max_size=40),
       bad=outside)
def test_keyed_any_clock(both, capacity, max_keys, start, ops, bad):
    pair = [i.keyed.KeyedGCRA(10.0, capacity, max_keys) for i in both]
    now = start
    for op, key, move in ops:
        now = _next(now, move)
        call = {"try": lambda k: k.try_acquire(key, 1, now), "wait": lambda k: k.wait_ns(key, 1, now),
                "purge": lambda k: k.purge(now)}[op]
        agree(pair, call)
    agree(pair, lambda k: k.try_acquire("x", 1, bad))


@settings(max_examples=150, deadline=None)
@given(nbuckets=st.integers(1, 6), width=st.sampled_from([1, 1000, S, 60 * S]), start=absolute,
       ops=st.lists(st.tuples(st.booleans(), st.booleans(), moves, st.booleans()), max_size=50), bad=outside)
def test_time_window_any_clock(both, nbuckets, width, start, ops, bad):
    pair = [i.window.TimeWindow(nbuckets, width) for i in both]
    now = start
    for failed, slow, move, read in ops:
        now = _next(now, move)
        if read:
            agree(pair, lambda w: w.snapshot(now))
        else:
            agree(pair, lambda w: w.record(failed, slow, now))
    agree(pair, lambda w: w.snapshot(now))
    agree(pair, lambda w: w.record(True, False, bad))


@settings(max_examples=150, deadline=None)
@given(start=absolute, ops=st.lists(st.tuples(st.sampled_from(["tr", "take", "give", "since"]), st.integers(0, 5),
                                              st.integers(0, 3), st.integers(0, 5), moves), max_size=40))
def test_breaker_state_any_clock(both, start, ops):
    now = start
    pair = [i.state.BreakerState(now=now) for i in both]
    for op, a, b, d, move in ops:
        now = _next(now, move)
        gen = pair[0].load()[1] - (b == 3)
        call = {"tr": lambda s: s.transition(s.load()[0] if b else a, gen, d, now),
                "take": lambda s: s.try_half_open(gen, a + 1), "give": lambda s: s.return_half_open(gen),
                "since": lambda s: s.since(s.load()[1])}[op]
        agree(pair, call)
        agree(pair, lambda s: s.load())


@settings(max_examples=150, deadline=None)
@given(window=st.sampled_from(["count", "time"]), start=absolute,
       ops=st.lists(st.tuples(st.sampled_from(["ok", "fail", "ignore", "metrics", "state", "reset"]), moves),
                    max_size=40))
def test_breaker_any_clock(both, window, start, ops):
    cores = [i.breaker.BreakerCore(window=window, window_size=4, minimum_calls=2, open_duration=5.0,
                                   half_open_calls=2) for i in both]
    outcomes = {"ok": both[0].breaker.SUCCESS, "fail": both[0].breaker.FAILURE, "ignore": both[0].breaker.IGNORED}
    now = start
    for op, move in ops:
        now = _next(now, move)
        if op in outcomes:
            tokens = [outcome(b.acquire, now) for b in cores]
            assert tokens[0][0] == tokens[1][0], tokens
            if tokens[0][0] == "ok" and tokens[0][1] >= 0 and tokens[1][1] >= 0:
                r = [outcome(b.record, tok[1], outcomes[op], now, now, None) for b, tok in zip(cores, tokens)]
                assert r[0] == r[1], r
        elif op == "metrics":
            m = [outcome(b.metrics, now) for b in cores]
            assert m[0] == m[1], m
        elif op == "state":
            agree(cores, lambda b: b.state_now(now))
        else:
            agree(cores, lambda b: b.reset(now))
