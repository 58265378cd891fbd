"""Hypothesis: compiled core and twin give identical answers over random operation sequences."""
from hypothesis import given, settings, strategies as st

S = 1_000_000_000
steps = st.integers(min_value=0, max_value=3 * S // 10)


@settings(max_examples=150, deadline=None)
@given(rate=st.floats(min_value=0.01, max_value=1e6), capacity=st.integers(1, 50),
       ops=st.lists(st.tuples(st.sampled_from(["try", "reserve", "reserve_max", "wait", "avail", "refund"]),
                              st.integers(1, 50), steps), max_size=60))
def test_gcra(both, rate, capacity, ops):
    c, t = (i.gcra.GCRA(rate=rate, capacity=capacity) for i in both)
    now = 10**12
    for op, n, dt in ops:
        now += dt
        n = min(n, capacity)
        if op == "try":
            r = [g.try_acquire(n, now) for g in (c, t)]
        elif op == "reserve":
            r = [g.reserve(n, now) for g in (c, t)]
        elif op == "reserve_max":
            r = [g.reserve(n, now, dt) for g in (c, t)]
        elif op == "wait":
            r = [g.wait_ns(n, now) for g in (c, t)]
        elif op == "avail":
            r = [g.available(now) for g in (c, t)]
        else:   # claim, then give it back (refund takes the claim's receipt)
            r = []
            for g in (c, t):
                w, receipt = g.claim(n, now)
                r.append((w, g.refund(receipt) if w >= 0 else None))
        assert r[0] == r[1], (op, n, now)
    assert c.counts() == t.counts()


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 20), ops=st.lists(st.tuples(st.booleans(), st.booleans()), max_size=80))
def test_count_window(both, size, ops):
    c, t = (i.window.CountWindow(size) for i in both)
    for failed, slow in ops:
        c.record(failed, slow)
        t.record(failed, slow)
        assert c.snapshot() == t.snapshot()
    assert c.recorded == t.recorded


@settings(max_examples=150, deadline=None)
@given(nbuckets=st.integers(1, 6), width=st.integers(1, 1000),
       ops=st.lists(st.tuples(st.booleans(), st.booleans(), st.integers(0, 700), st.booleans()), max_size=80))
def test_time_window(both, nbuckets, width, ops):
    c, t = (i.window.TimeWindow(nbuckets, width) for i in both)
    now = 5_000
    for failed, slow, dt, read in ops:
        now += dt
        if read:
            assert c.snapshot(now) == t.snapshot(now)
        else:
            c.record(failed, slow, now)
            t.record(failed, slow, now)
    assert c.snapshot(now) == t.snapshot(now)


@settings(max_examples=150, deadline=None)
@given(limit=st.integers(1, 5), ops=st.lists(st.tuples(st.sampled_from(["acq", "rel", "resize"]),
                                                       st.integers(1, 6)), max_size=60))
def test_permits(both, limit, ops):
    c, t = (i.permits.Permits(limit) for i in both)
    for op, n in ops:
        if op == "acq":
            assert c.try_acquire(n) == t.try_acquire(n)
        elif op == "rel":
            results = []
            for p in (c, t):
                try:
                    p.release(n)
                    results.append("ok")
                except ValueError:
                    results.append("err")
            assert results[0] == results[1]
        else:
            c.resize(n)
            t.resize(n)
        assert (c.in_use, c.available, c.max_permits) == (t.in_use, t.available, t.max_permits)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["tr", "take", "give"]), st.integers(0, 5), st.integers(0, 3),
                              st.integers(0, 5)), max_size=60))
def test_breaker_state(both, ops):
    c, t = (i.state.BreakerState(now=0) for i in both)
    for k, (op, a, b, d) in enumerate(ops):
        gen = c.load()[1] - (b == 3)    # sometimes an older generation
        if op == "tr":
            r = [s.transition(s.load()[0] if b else a, gen, d, k) for s in (c, t)]
        elif op == "take":
            r = [s.try_half_open(gen, a) for s in (c, t)]
        else:
            r = [s.return_half_open(gen) for s in (c, t)]
        assert r[0] == r[1]
        assert c.load() == t.load()
        assert c.since(c.load()[1]) == t.since(t.load()[1])
