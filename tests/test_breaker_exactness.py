"""Issue 12, breaker / state / window cores: each case failed on the old code. Both implementations
through the `impl` fixture (core level) or the facade (active implementation)."""
import gc
import sys
import threading

import pytest

import buttress
from buttress import CircuitBreaker, CircuitOpenError, FakeClock, State
from helpers import race

S = 1_000_000_000
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
CLOSED, OPEN, HALF_OPEN, FORCED_OPEN = 0, 1, 2, 3
UNINIT = "is not initialised: its __init__ never ran"
# clock starts (s): negative, zero, an epoch, and a few seconds short of int64 max ns (9.2233720368e9 s)
STARTS = [-5.0, 0.0, 1.7e9, 9.2233720e9]


def core(impl, **kw):
    kw.setdefault("window_size", 4)
    kw.setdefault("minimum_calls", 2)
    kw.setdefault("open_duration", 5.0)
    kw.setdefault("half_open_calls", 2)
    return impl.breaker.BreakerCore(**kw)


class Clock:
    """A clock_ns callable (Python, like FakeClock's) with an optional action run on a given read."""

    def __init__(self, t=0):
        self.t, self.reads, self.actions = t, 0, {}

    def __call__(self):
        self.reads += 1
        action = self.actions.pop(self.reads, None)
        if action is not None:
            action()
        return self.t


# -- 1. objects whose __init__ never ran -------------------------------------------------------------

@pytest.mark.parametrize("name", ["Permit", "Guarded"])
def test_permit_and_guarded_are_made_by_the_breaker_only(impl, name):
    tp = getattr(impl.breaker, name)
    msg = {"Permit": "Permit cannot be created directly; get one from CircuitBreaker.try_acquire()",
           "Guarded": "Guarded cannot be created directly; get one from CircuitBreaker.guard(fn) or by "
                      "decorating a function"}[name]
    with pytest.raises(TypeError) as e1:
        tp()
    with pytest.raises(TypeError) as e2:
        tp.__new__(tp)
    assert str(e1.value) == str(e2.value) == msg
    with pytest.raises(TypeError, match=f"type 'buttress._core.breaker.{name}' is not an acceptable base type"):
        type("Sub", (tp,), {})


def test_buttress_permit_cannot_be_misused():
    """`buttress.Permit().success()` segfaulted."""
    with pytest.raises(TypeError, match="get one from CircuitBreaker.try_acquire"):
        buttress.Permit().success()


def _uninit_objects(impl):
    types_ = [(impl.breaker.BreakerCore, ()), (impl.state.BreakerState, ()), (impl.window.CountWindow, ()),
              (impl.window.TimeWindow, ())]
    for tp, _ in types_:
        yield tp.__name__ + ".__new__", tp.__new__(tp)
        yield tp.__name__ + " subclass", type("Sub", (tp,), {"__init__": lambda self, *a, **k: None})()


def test_uninitialised_objects_raise_runtime_error(impl):
    calls = {
        "BreakerCore": [lambda o: o.acquire(0), lambda o: o.metrics(0), lambda o: o.record(0, 0, 0, 0),
                        lambda o: o.try_acquire(), lambda o: o.state_now(0), lambda o: o.reset(0),
                        lambda o: o.classify(ValueError()), lambda o: o.guard(len), lambda o: o.enter(),
                        lambda o: o.exit_ok(0, 0, None), lambda o: o.name, lambda o: o.attempt,
                        lambda o: o.timing, lambda o: o.hook, lambda o: o.load(), lambda o: o.rejection(0)],
        "BreakerState": [lambda o: o.load(), lambda o: o.since(0), lambda o: o.transition(0, 0, 1, 0),
                         lambda o: o.try_half_open(0, 1), lambda o: o.return_half_open(0)],
        "CountWindow": [lambda o: o.record(True), lambda o: o.snapshot(), lambda o: o.size,
                        lambda o: o.recorded, lambda o: o.reset()],
        "TimeWindow": [lambda o: o.record(True, now=0), lambda o: o.snapshot(0), lambda o: o.nbuckets,
                       lambda o: o.width_ns],
    }
    seen = 0
    for label, obj in _uninit_objects(impl):
        for call in calls[label.split(".")[0].split(" ")[0]]:
            with pytest.raises(RuntimeError, match=UNINIT):
                call(obj)
            seen += 1
        assert "not initialised" in repr(obj)
    assert seen == 2 * sum(len(v) for v in calls.values())


def test_init_twice_is_refused(impl):
    for obj, args in [(impl.window.CountWindow(3), (3,)), (impl.window.TimeWindow(3), (3,)),
                      (impl.state.BreakerState(0), (0,)), (core(impl), ())]:
        with pytest.raises(RuntimeError, match="is already initialised"):
            obj.__init__(*args)


def test_facade_subclass_without_super_init():
    class Lazy(CircuitBreaker):
        def __init__(self):
            pass

    cb = Lazy()
    with pytest.raises(RuntimeError, match=UNINIT):
        cb.state
    with pytest.raises(RuntimeError, match=UNINIT):
        cb.try_acquire()
    assert "not initialised" in repr(cb)


# -- 2. any int64 clock: negative, zero, epoch-sized, near int64 max --------------------------------------

@pytest.mark.parametrize("window", ["count", "time"])
@pytest.mark.parametrize("start", STARTS)
def test_breaker_is_exact_on_any_clock(window, start):
    clock = FakeClock(start=start)
    cb = CircuitBreaker(window=window, window_size=10, minimum_calls=2, open_duration=1.0, half_open_calls=1,
                        clock=clock)
    assert cb.call(lambda: 1) == 1
    assert cb.metrics().calls == 1                          # the call was counted (compiled: 0 at -5.0)
    with pytest.raises(ZeroDivisionError):
        cb.call(lambda: 1 / 0)
    assert cb.state is State.OPEN and cb.metrics().calls == 2
    with pytest.raises(CircuitOpenError) as e:
        cb.call(lambda: 1)
    assert e.value.retry_after == 1.0
    clock.advance(1.0)
    assert cb.call(lambda: 2) == 2 and cb.state is State.CLOSED


@pytest.mark.parametrize("now", [-5 * S, -1, 0, 1_700_000_000 * S, INT64_MAX - 3 * S])
def test_time_window_breaker_counts_at_any_now(impl, now):
    b = core(impl, window="time", window_size=3, minimum_calls=100)
    for k in range(3):
        tok = b.acquire(now + k * S)
        b.record(tok, impl.breaker.FAILURE, now + k * S, now + k * S)
    assert b.metrics(now + 2 * S)[1:3] == (3, 3)
    assert b.metrics(now + 3 * S)[1] == 2                   # the oldest second left the window
    assert b.metrics(now - S)[1] == 0


def test_deadlines_saturate_near_int64_max(impl):
    b = core(impl, minimum_calls=1, window_size=1)
    now = INT64_MAX - S                                     # open_duration 5 s would pass int64 max
    b.record(b.acquire(now), impl.breaker.FAILURE, now, now)
    assert b.load()[0] == OPEN
    assert b.acquire(INT64_MAX - 1) == -1                   # the deadline saturated: it never wrapped
    assert b.rejection(now).retry_after == pytest.approx((INT64_MAX - now) / 1e9)
    assert b.acquire(INT64_MAX) == -1                       # ... and, saturated, is never due (not even at
    #                                                         int64 max: open_duration must not collapse to 0)


def test_durations_saturate(impl):
    b = core(impl, slow_call_duration=1.0, slow_call_rate_threshold=1.0, minimum_calls=1, window_size=1)
    b.record(b.acquire(INT64_MIN), impl.breaker.SUCCESS, INT64_MIN, INT64_MAX)   # a huge duration: slow
    assert b.load()[0] == OPEN
    b2 = core(impl, slow_call_duration=1.0, minimum_calls=1, window_size=1)
    b2.record(b2.acquire(INT64_MAX), impl.breaker.SUCCESS, INT64_MAX, INT64_MIN)  # negative: not slow
    assert b2.load()[0] == CLOSED


def test_half_open_max_wait_with_clock_jumps(impl):
    b = core(impl, minimum_calls=1, window_size=1, open_duration=0.0, half_open_max_wait=2.0)
    b.record(b.acquire(INT64_MIN), impl.breaker.FAILURE, INT64_MIN, INT64_MIN)
    assert b.acquire(INT64_MIN) & 1                         # HALF_OPEN entered at int64 min
    assert b.state_now(INT64_MIN + 2 * S - 1) == HALF_OPEN
    assert b.state_now(INT64_MAX) == OPEN                   # now - since saturates: expired, no wrap


@pytest.mark.parametrize("bad", [2**63, INT64_MIN - 1, 2**200])
def test_now_outside_int64_is_a_value_error(impl, bad):
    b = core(impl)
    for call in (lambda: b.acquire(bad), lambda: b.metrics(bad), lambda: b.state_now(bad),
                 lambda: impl.state.BreakerState(bad), lambda: impl.window.TimeWindow(2).record(True, now=bad)):
        with pytest.raises(ValueError, match="now must be an int in the int64 range"):
            call()
    with pytest.raises(TypeError, match="now must be an int"):
        b.acquire(1.5)


def test_negative_epochs_use_floor_buckets(impl):
    w = impl.window.TimeWindow(3, 10)
    w.record(True, now=-1)            # epoch -1 (C `/` said 0)
    w.record(False, now=0)            # epoch 0
    assert w.snapshot(now=-1) == (1, 1, 0, 0)
    assert w.snapshot(now=9) == (2, 1, 0, 0)
    assert w.snapshot(now=19) == (2, 1, 0, 0)
    assert w.snapshot(now=20) == (1, 0, 0, 0)


# -- 3. time-window epochs exact however long a bucket stays idle ------------------------------------------

@pytest.mark.parametrize("width, idle", [(1000, 2**31), (1000, 2**31 + 1), (1000, 2**32), (60_000_000, 2**31),
                                         (S, 2**32 + 3), (1, 2**40)])
def test_time_window_bucket_idle_for_2_31_widths_counts_new_records(impl, width, idle):
    w = impl.window.TimeWindow(4, width)
    w.record(True, now=0)
    later = idle * width
    w.record(False, now=later)
    assert w.snapshot(now=later) == (1, 0, 0, 0)
    w.record(False, now=later)
    assert w.snapshot(now=later + 3 * width) == (2, 0, 0, 0)
    assert w.snapshot(now=later + 4 * width) == (0, 0, 0, 0)


def test_time_window_with_the_clock_after_a_long_idle(impl):
    t = [0]
    w = impl.window.TimeWindow(60, 1_000_000, clock_ns=lambda: t[0])    # 1 ms buckets
    w.record(True)
    t[0] += 60 * (2**31 // 60 + 1) * 1_000_000                            # ~25 days idle, same bucket
    w.record(False)
    assert w.snapshot() == (1, 0, 0, 0)


# -- 4. HALF_OPEN: clear first, publish last -----------------------------------------------------------------

@pytest.mark.parametrize("rep", range(5))
def test_half_open_never_locks_out_under_racing_probes(impl, fast_switching, rep):
    n = 600
    b = core(impl, window="time", window_size=1, minimum_calls=n, half_open_calls=n, open_duration=0.0)
    b.transition_to(OPEN, 0)

    def probe(i):
        mine = 0
        for _ in range(400):
            tok = b.acquire(1)
            if tok >= 0 and tok & 1:
                mine += 1
                b.record(tok, impl.breaker.SUCCESS, 1, 1)
        return mine

    got = race(4, probe)
    assert sum(got) == n                   # exactly n probes, every result counted: the verdict came
    assert b.load()[0] == CLOSED


# -- 5. a deadline belongs to its generation --------------------------------------------------------------

def test_open_deadline_is_never_stored_into_a_later_generation(impl):
    """open_duration runs user code (a switch point): meanwhile the breaker is reset and re-opened for
    1000 s. The stale 1 s deadline must not let a call through after 1 s."""
    b = None
    calls = []

    def open_duration(attempt):
        calls.append(attempt)
        if len(calls) == 1:                          # the first trip, interrupted
            b.reset(0)
            b.transition_to(FORCED_OPEN, 0)
            b.transition_to(OPEN, 0)                 # nested call: 1000 s
            return 1.0
        return 1000.0

    b = core(impl, minimum_calls=1, window_size=1, open_duration=open_duration)
    b.record(b.acquire(0), impl.breaker.FAILURE, 0, 0)
    assert b.load()[0] == OPEN
    assert b.acquire(2 * S) == -1                    # old compiled core admitted here
    assert b.rejection(2 * S).retry_after == pytest.approx(998.0)
    assert b.acquire(1000 * S) >= 0


def test_since_is_tagged_with_its_generation(impl):
    s = impl.state.BreakerState(now=5)
    assert s.since(0) == 5 and s.since(1) is None
    s.transition(CLOSED, 0, OPEN, 10)
    s.transition(OPEN, 1, HALF_OPEN, 20)
    assert (s.since(1), s.since(2)) == (10, 20)
    assert s.since(0) is None and s.since(-1) is None     # slot reused by generation 2 / no such generation


# -- 6. results of an older generation are never counted --------------------------------------------------

def test_result_dropped_when_reset_runs_during_the_clock_read(impl):
    clk = Clock()
    b = core(impl, window_size=10, minimum_calls=10, clock_ns=clk)
    tok = b.acquire()
    clk.actions[clk.reads + 1] = lambda: b.reset()          # the record's clock read: a switch point
    b.record(tok, impl.breaker.FAILURE, 0)
    assert b.metrics()[1] == 0


def test_result_dropped_when_a_listener_resets(impl):
    b = core(impl, window_size=10, minimum_calls=10)
    first = []

    def hook(kind, a, c):
        if kind in ("error", "success") and not first:
            first.append(kind)
            b.reset(0)

    tok = b.acquire(0)
    b.hook = hook
    b.record(tok, impl.breaker.FAILURE, 0, 0)               # hooks run after the record: it counted
    assert first == ["error"]                               # ... and then reset() cleared it
    assert b.metrics(0)[1] == 0
    tok = b.acquire(0)
    b.hook = None
    b.reset(0)
    b.record(tok, impl.breaker.SUCCESS, 0, 0)               # a token of the old generation
    assert b.metrics(0)[1] == 0


@pytest.mark.parametrize("rep", range(3))
def test_reset_racing_records_counts_only_the_new_generation(impl, fast_switching, rep):
    clk = Clock()
    b = core(impl, window_size=30000, minimum_calls=30000, failure_rate_threshold=1.0, clock_ns=clk)
    stop = threading.Event()

    def body(i):
        if i == 4:
            for _ in range(30):
                b.reset()
            stop.set()
            return []
        tokens = []
        while not stop.is_set():
            tok = b.acquire()
            b.record(tok, impl.breaker.SUCCESS, 0)           # reads the (Python) clock: a switch point
            tokens.append(tok)
        for _ in range(200):
            tok = b.acquire()
            b.record(tok, impl.breaker.SUCCESS, 0)
            tokens.append(tok)
        return tokens

    tokens = [t for ts in race(5, body) for t in ts]
    gen = b.load()[1]
    assert b.metrics()[1] == sum(t >> 1 == gen for t in tokens) >= 800   # only the last generation's


# -- 7. half-open counters and their range ------------------------------------------------------------

def test_half_open_calls_range_matches_the_counters(impl):
    with pytest.raises(ValueError, match="half_open_calls must be between 1 and 30000, got 30001"):
        core(impl, half_open_calls=30001)
    with pytest.raises(ValueError, match="half_open_calls must be between 1 and 30000"):
        core(impl, half_open_calls=0xFFFFF)


def test_max_half_open_calls_close_the_breaker(impl):
    n = 30000
    b = core(impl, window="time", window_size=1, minimum_calls=n, half_open_calls=n, open_duration=0.0)
    b.transition_to(OPEN, 0)
    tokens = [b.acquire(0) for _ in range(n)]
    assert all(t & 1 for t in tokens) and b.acquire(0) == -1
    for t in tokens:
        b.record(t, impl.breaker.SUCCESS, 0, 0)
    assert b.load()[0] == CLOSED


def test_try_half_open_limit_is_checked(impl):
    s = impl.state.BreakerState(now=0)
    s.transition(CLOSED, 0, HALF_OPEN, 0)
    with pytest.raises(ValueError, match="limit must be between 0 and 1048575"):
        s.try_half_open(1, 0x100000)


# -- 8. the listener field is read once --------------------------------------------------------------------

@pytest.mark.parametrize("rep", range(3))
def test_listener_toggled_while_calls_run(fast_switching, rep):
    cb = CircuitBreaker(window_size=100, minimum_calls=100, clock=FakeClock())
    seen = []

    def listener(event):
        seen.append(event.kind)

    def body(i):
        if i == 0:
            for _ in range(300):
                cb.on("success", listener)
                cb.off("success", listener)
            return 0
        for _ in range(2000):
            cb.call(lambda: None)                 # old twin: `None(...)` TypeError between check and call
        return 1

    race(3, body)
    assert cb.metrics().calls == 100


def test_hook_must_be_callable(impl):
    b = core(impl)
    with pytest.raises(TypeError, match="hook must be a callable"):
        b.hook = 5
    b.hook = print
    assert b.hook is print
    b.hook = None
    assert b.hook is None


# -- 9. a dropped permit comes back ----------------------------------------------------------------------

def test_dropped_half_open_permit_is_returned_when_collected():
    clock = FakeClock()
    cb = CircuitBreaker(window_size=1, minimum_calls=1, open_duration=1.0, half_open_calls=1, clock=clock)
    with pytest.raises(ZeroDivisionError):
        cb.call(lambda: 1 / 0)
    clock.advance(1.0)
    p = cb.try_acquire()
    assert p is not None and cb.try_acquire() is None
    del p
    gc.collect()
    assert cb.call(lambda: 1) == 1 and cb.state is State.CLOSED   # not wedged in HALF_OPEN


def test_dropped_permit_in_a_cycle_is_returned(impl):
    b = core(impl, half_open_calls=1, open_duration=0.0)
    b.transition_to(OPEN, 0)
    holder = [b.try_acquire()]
    assert holder[0] is not None
    holder.append(holder)                         # a cycle: only the collector frees it
    assert b.acquire(0) == -1
    del holder
    gc.collect()
    tok = b.acquire(0)
    assert tok >= 0 and tok & 1


def test_reported_permit_is_not_returned_twice(impl):
    b = core(impl, half_open_calls=2, open_duration=0.0, minimum_calls=100)
    b.transition_to(OPEN, 0)
    p, q = b.try_acquire(), b.try_acquire()
    p.release()
    p.release()                                   # no-op
    del p
    gc.collect()
    assert b.load()[2] == 1                       # q still out, p returned once
    assert q.done is False


# -- §3c: state names ---------------------------------------------------------------------------------------

def test_state_str_and_format_give_the_name():
    cb = CircuitBreaker(clock=FakeClock())
    assert str(cb.state) == "CLOSED" and f"{cb.state}" == "CLOSED"
    assert str(State.OPEN) == "OPEN" and f"{State.HALF_OPEN:>10}" == " HALF_OPEN"
    assert State.OPEN == 1 and repr(State.OPEN) == "<State.OPEN: 1>"
