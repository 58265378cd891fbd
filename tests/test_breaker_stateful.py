"""Hypothesis drives the breaker against a small plain-Python model of DESIGN §3."""
from collections import deque

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from buttress import CircuitBreaker, CircuitOpenError, FakeClock, State

NS = 10**9
WINDOW, MINIMUM, HALF, SLOW_NS, HALF_WAIT_NS = 4, 3, 2, NS, 7 * NS


def open_ns(attempt):
    return 5 * attempt * NS


class Model:
    """The spec in as few lines as possible: count window, thresholds 0.5 / 0.5."""

    def __init__(self):
        self.state, self.gen, self.attempt, self.not_permitted = State.CLOSED, 0, 0, 0
        self.window, self.half, self.flight, self.since, self.until = deque(maxlen=WINDOW), [], 0, 0, 0
        self.show_half = False

    def move(self, new, now, attempt=None):
        self.state, self.gen, self.since, self.flight = new, self.gen + 1, now, 0
        if attempt is not None:
            self.attempt = attempt
        if new == State.OPEN:
            self.until = now + open_ns(self.attempt)
        if new in (State.CLOSED, State.METRICS_ONLY):
            self.window, self.show_half = deque(maxlen=WINDOW), False
        if new == State.HALF_OPEN:
            self.half, self.show_half = [], True

    def expire(self, now):
        if self.state == State.HALF_OPEN and now - self.since >= HALF_WAIT_NS:
            self.move(State.OPEN, now, self.attempt + 1)

    def acquire(self, now):
        if self.state == State.OPEN and now >= self.until:
            self.move(State.HALF_OPEN, now)
        self.expire(now)
        if self.state in (State.CLOSED, State.METRICS_ONLY, State.DISABLED):
            return (self.gen, False)
        if self.state == State.HALF_OPEN and self.flight < HALF:
            self.flight += 1
            return (self.gen, True)
        self.not_permitted += 1
        return None

    @staticmethod
    def tripped(outcomes):
        n = len(outcomes)
        return sum(f for f, _ in outcomes) / n >= 0.5 or sum(s for _, s in outcomes) / n >= 0.5

    def record(self, token, kind, duration, now):
        gen, half = token
        if kind == "ignored":
            if half and self.state == State.HALF_OPEN and self.gen == gen and self.flight:
                self.flight -= 1
            return
        if gen != self.gen or self.state == State.DISABLED:
            return
        outcome = (kind == "failure", duration > SLOW_NS)
        if self.state == State.HALF_OPEN:
            self.half.append(outcome)
            if len(self.half) >= min(MINIMUM, HALF):
                if self.tripped(self.half):
                    self.move(State.OPEN, now, self.attempt + 1)
                else:
                    self.move(State.CLOSED, now, 0)
        elif self.state in (State.CLOSED, State.METRICS_ONLY):
            self.window.append(outcome)
            if self.state == State.CLOSED and len(self.window) >= MINIMUM and self.tripped(self.window):
                self.move(State.OPEN, now, 1)

    def metrics(self, now):
        # a state read is current (DESIGN §3c): OPEN past its open_duration reads (and enters) HALF_OPEN
        if self.state == State.OPEN and now >= self.until:
            self.move(State.HALF_OPEN, now)
        self.expire(now)
        outcomes, minimum = (self.half, min(MINIMUM, HALF)) if self.show_half else (self.window, MINIMUM)
        n, f, s = len(outcomes), sum(x for x, _ in outcomes), sum(y for _, y in outcomes)
        ok = n >= minimum
        return (self.state, n, f, s, f / n if ok else -1.0, s / n if ok else -1.0, self.not_permitted)


class Boom(Exception):
    pass


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.clock = FakeClock()
        self.cb = CircuitBreaker(name="m", failure_rate_threshold=0.5, slow_call_rate_threshold=0.5,
                                 slow_call_duration=1.0, window_size=WINDOW, minimum_calls=MINIMUM,
                                 open_duration=lambda a: 5.0 * a, half_open_calls=HALF, half_open_max_wait=7.0,
                                 ignore=(KeyError,), clock=self.clock)
        self.model = Model()
        self.held = []

    def now(self):
        return self.clock.monotonic_ns()

    def _call(self, kind, duration_s):
        def body():
            self.clock.advance(duration_s)
            if kind == "failure":
                raise Boom()
            if kind == "ignored":
                raise KeyError("x")
            return 1

        token = self.model.acquire(self.now())
        try:
            self.cb.call(body)
            assert token is not None and kind == "success"
        except CircuitOpenError:
            assert token is None
            return
        except (Boom, KeyError):
            assert token is not None
        self.model.record(token, kind, round(duration_s * NS), self.now())

    @rule(kind=st.sampled_from(["success", "failure", "ignored"]), slow=st.booleans())
    def call(self, kind, slow):
        self._call(kind, 1.5 if slow else 0.25)

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 5.0, 7.0, 11.0]))
    def advance(self, seconds):
        self.clock.advance(seconds)

    @rule()
    def acquire(self):
        token = self.model.acquire(self.now())
        permit = self.cb.try_acquire()
        assert (permit is None) == (token is None)
        if permit is not None:
            self.held.append((token, permit, self.now()))

    @rule(i=st.integers(0, 5), kind=st.sampled_from(["success", "failure", "ignored"]))
    def finish(self, i, kind):
        if not self.held:
            return
        token, permit, start = self.held.pop(i % len(self.held))
        if kind == "success":
            permit.success()
        elif kind == "failure":
            permit.failure(Boom())
        else:
            permit.failure(KeyError("x"))
        self.model.record(token, kind, self.now() - start, self.now())

    @rule()
    def force_open(self):
        self.cb.force_open()            # a new generation even when already FORCED_OPEN
        self.model.move(State.FORCED_OPEN, self.now())

    @rule()
    def metrics_only(self):
        self.cb.metrics_only()          # a new generation and a fresh window, from any state
        self.model.move(State.METRICS_ONLY, self.now())

    @rule()
    def reset(self):
        self.cb.reset()
        self.model.not_permitted = 0
        self.model.move(State.CLOSED, self.now(), 0)

    @invariant()
    def agrees(self):
        assert self.cb.state == self.model.metrics(self.now())[0]
        assert tuple(self.cb.metrics().__dict__.values()) == self.model.metrics(self.now())
        assert self.cb.attempt == self.model.attempt


BreakerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestBreakerAgainstModel = BreakerMachine.TestCase
