"""Adaptive limits on a simulated service (FakeClock), and client-side adaptive throttling."""
import asyncio
import heapq
import random
import statistics

import pytest

from buttress import FakeClock, LoadShedder, Overloaded, Priority
from buttress.adaptive import AdaptiveThrottle, AIMDLimit, Gradient2Limit, ThrottleMetrics

ALL_IN = {Priority.LOW: 1.0, Priority.MEDIUM: 1.0, Priority.HIGH: 1.0}


def simulate(limiter, phases, demand=5000, timeout=0.03):
    """A closed loop on a FakeClock: `demand` clients call a service through LoadShedder(limiter=...).
    The service has a knee: latency is `base` up to `knee` concurrent calls, then grows linearly
    (a queue); calls slower than `timeout` fail with TimeoutError (a drop).
    Returns, per phase, the mean limit and mean latency / base over the phase's second half."""
    clock = FakeClock()
    shed = LoadShedder(limiter=limiter, clock=clock, fractions=ALL_IN)
    active, seq, out = [], 0, []
    for base, knee, duration in phases:
        end = clock.monotonic_ns() + int(duration * 1e9)
        limits, latencies = [], []
        while clock.monotonic_ns() < end:
            while len(active) < demand:
                adm = shed.admit(Priority.HIGH)
                try:
                    adm.__enter__()
                except Overloaded:
                    break
                latency = base * max(1.0, shed.in_flight / knee)
                done = clock.monotonic_ns() + int(min(latency, timeout) * 1e9)
                heapq.heappush(active, (done, seq, adm, latency))
                seq += 1
            done, _, adm, latency = heapq.heappop(active)
            clock.advance_ns(max(0, done - clock.monotonic_ns()))
            if latency > timeout:
                adm.__exit__(TimeoutError, TimeoutError(), None)
            else:
                adm.__exit__(None, None, None)
            limits.append(limiter.limit)
            latencies.append(latency / base)
        half = len(limits) // 2
        out.append((statistics.mean(limits[half:]), statistics.mean(latencies[half:])))
    return out


@pytest.mark.parametrize("make", [
    lambda: Gradient2Limit(initial_limit=20, min_limit=1, max_limit=5000),
    lambda: AIMDLimit(initial_limit=20, min_limit=1, max_limit=5000, timeout=1.0),
], ids=["gradient2", "aimd"])
def test_limit_converges_near_the_knee_and_backs_off_when_the_service_degrades(make):
    (healthy, lat1), (degraded, lat2) = simulate(make(), [(0.01, 200, 2.0), (0.01, 50, 2.0)])
    # far below the 5000 clients: the limit settles between the knee and the timeout (3 x knee)
    assert 0.75 * 200 <= healthy <= 3 * 200
    assert 0.75 * 50 <= degraded <= 3 * 50
    assert degraded < healthy / 2                    # backed off when capacity dropped 4x
    assert lat1 < 3.5 and lat2 < 3.5                 # latency kept near the timeout (3 x base), not 25x


# ---------- Gradient2 step by step ----------

def test_gradient2_grows_while_latency_is_steady_and_busy():
    g = Gradient2Limit(initial_limit=20, min_limit=1, max_limit=100, smoothing=0.2, queue_size=4)
    for _ in range(5):
        before = g._estimate
        g.on_sample(0.01, 20)
        assert g._estimate == pytest.approx(before + 0.2 * 4)
    assert g.limit == 24
    assert g.long_rtt == pytest.approx(0.01)


def test_gradient2_does_not_grow_when_app_limited():
    g = Gradient2Limit(initial_limit=40, min_limit=1)
    for _ in range(50):
        assert g.on_sample(0.01, 19) == 40            # in_flight < limit / 2


def test_gradient2_shrinks_on_a_latency_rise_at_most_by_half_per_step():
    g = Gradient2Limit(initial_limit=100, min_limit=1, max_limit=200, smoothing=1.0, queue_size=0)
    for _ in range(10):
        g.on_sample(0.010, 100)
    assert g.limit == 100
    g.on_sample(0.020, 100)                          # gradient = 1.5 * long / short
    assert g._estimate == pytest.approx(100 * 1.5 * g.long_rtt / 0.020)
    assert 70 <= g.limit < 80
    before = g._estimate
    g.on_sample(10.0, 100)                           # huge outlier: the gradient is clamped to 0.5
    assert g._estimate == pytest.approx(before * 0.5)


def test_gradient2_backs_off_on_drops_and_respects_bounds():
    g = Gradient2Limit(initial_limit=50, min_limit=10, max_limit=60)
    g.on_sample(0.01, 50, dropped=True)
    assert g.limit == 45                             # 50 * 0.8 + (25 + 4) * 0.2
    for _ in range(100):
        g.on_sample(0.01, 50, dropped=True)
    assert g.limit == 10
    for _ in range(2000):
        g.on_sample(0.01, 1000)
    assert g.limit == 60
    sqrt_q = Gradient2Limit(initial_limit=100, max_limit=1000, smoothing=1.0, queue_size=lambda lim: int(lim ** 0.5))
    sqrt_q.on_sample(0.01, 100)
    assert sqrt_q.limit == 110


def test_gradient2_recovers_its_long_average_after_an_overload():
    g = Gradient2Limit(initial_limit=50, min_limit=1, long_window=600)
    for _ in range(10):
        g.on_sample(1.0, 50)                         # long average ~1 s
    for _ in range(100):
        g.on_sample(0.01, 50)                        # short 100x below: long decays 5% per sample
    assert g.long_rtt < 0.05


# ---------- AIMD step by step ----------

def test_aimd_steps():
    a = AIMDLimit(initial_limit=10, min_limit=5, max_limit=12, backoff_ratio=0.5, timeout=0.1)
    assert a.on_sample(0.01, 4) == 10                # app-limited: unchanged
    assert a.on_sample(0.01, 5) == 11                # in use: +1
    assert a.on_sample(0.01, 9) == 12
    assert a.on_sample(0.01, 9) == 12                # max
    assert a.on_sample(0.2, 9) == 6                  # slower than timeout: x 0.5
    assert a.on_sample(0.01, 9, dropped=True) == 5   # drop, floored at min_limit


@pytest.mark.parametrize("make, exc, words", [
    (lambda: AIMDLimit(initial_limit=0), ValueError, ["initial_limit", "0"]),
    (lambda: AIMDLimit(min_limit=10, max_limit=5), ValueError, ["max_limit", "5"]),
    (lambda: AIMDLimit(initial_limit=2, min_limit=5), ValueError, ["initial_limit", "2"]),
    (lambda: AIMDLimit(backoff_ratio=1.0), ValueError, ["backoff_ratio", "1.0"]),
    (lambda: AIMDLimit(timeout=0), ValueError, ["timeout", "0"]),
    (lambda: Gradient2Limit(smoothing=0), ValueError, ["smoothing", "0"]),
    (lambda: Gradient2Limit(rtt_tolerance=0.5), ValueError, ["rtt_tolerance", "0.5"]),
    (lambda: Gradient2Limit(long_window=0), ValueError, ["long_window", "0"]),
    (lambda: Gradient2Limit(queue_size=-1), ValueError, ["queue_size", "-1"]),
    (lambda: Gradient2Limit(queue_size="4"), TypeError, ["queue_size", "'4'"]),
    (lambda: AIMDLimit().on_sample(-1.0, 3), ValueError, ["latency", "-1.0"]),
    (lambda: Gradient2Limit().on_sample(0.1, -3), ValueError, ["in_flight", "-3"]),
    (lambda: AdaptiveThrottle(k=0.5), ValueError, ["k", "0.5"]),
    (lambda: AdaptiveThrottle(window=0), ValueError, ["window", "0"]),
    (lambda: AdaptiveThrottle(clock=1), TypeError, ["clock"]),
    (lambda: AdaptiveThrottle(rng=0.5), TypeError, ["rng", "0.5"]),
    (lambda: AdaptiveThrottle(reject_on=3), TypeError, ["reject_on"]),
])
def test_bad_arguments(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    for w in words:
        assert w in str(info.value)


# ---------- client-side adaptive throttling ----------

class Backend:
    """Accepts a call with probability `accept`; otherwise raises ConnectionRefusedError."""

    def __init__(self, accept, seed=0):
        self.accept = accept
        self.calls = 0
        self._rnd = random.Random(seed)

    def __call__(self):
        self.calls += 1
        if self._rnd.random() >= self.accept:
            raise ConnectionRefusedError("overloaded")
        return "ok"


def test_throttle_probability_formula():
    clock = FakeClock()
    t = AdaptiveThrottle(k=2.0, window=10.0, clock=clock, rng=lambda: 0.999999)
    for _ in range(10):
        t.call(lambda: None)
    assert t.probability() == 0.0
    for _ in range(30):
        with pytest.raises(ConnectionRefusedError):
            t.call(Backend(0.0))
    # 40 requests, 10 accepts: (40 - 2 * 10) / 41
    assert t.metrics() == ThrottleMetrics(requests=40, accepts=10, probability=pytest.approx(20 / 41))
    clock.advance(11.0)                              # the window forgets
    assert t.probability() == 0.0


def test_throttle_rejects_locally_and_counts_those_as_requests():
    clock = FakeClock()
    draws = iter([0.0] * 100)
    t = AdaptiveThrottle(k=1.0, window=10.0, clock=clock, rng=lambda: next(draws))
    backend = Backend(0.0)
    with pytest.raises(ConnectionRefusedError):
        t.call(backend)                              # p = 0 before any request
    with pytest.raises(Overloaded):
        t.call(backend)                              # p = 1/2: the draw 0.0 refuses locally
    assert backend.calls == 1
    assert t.metrics().requests == 2 and t.metrics().accepts == 0


def test_throttle_converges_to_k_times_accepts():
    """SRE book: the backend sees about k x the requests it accepts."""
    clock = FakeClock()
    rnd = random.Random(3)
    t = AdaptiveThrottle(k=2.0, window=60.0, clock=clock, rng=rnd.random)
    backend = Backend(0.25, seed=4)
    for _ in range(20_000):
        clock.advance(0.005)
        try:
            t.call(backend)
        except (Overloaded, ConnectionRefusedError):
            pass
    m = t.metrics()
    assert m.probability > 0.3
    # of the requests in the window, about k * accepts reach the backend
    sent = m.requests * (1 - m.probability)
    assert sent == pytest.approx(2.0 * m.accepts, rel=0.15)


def test_throttle_only_reject_on_counts_against_the_backend():
    t = AdaptiveThrottle(clock=FakeClock(), reject_on=(ConnectionError,))
    for _ in range(20):
        with pytest.raises(KeyError):
            t.call(lambda: {}["x"])                  # an application error: the backend accepted it
    assert t.metrics().accepts == 20


def test_throttle_async_and_decorator():
    clock = FakeClock()
    t = AdaptiveThrottle(k=1.0, window=10.0, clock=clock, rng=lambda: 0.0)

    @t
    async def ok():
        return 1

    @t
    async def refused():
        raise ConnectionRefusedError

    @t
    async def cancelled():
        raise asyncio.CancelledError

    assert asyncio.run(ok()) == 1
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancelled())
    assert t.metrics().requests == 1                 # cancellation counts as nothing
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(refused())
    with pytest.raises(Overloaded):                  # p = (2 - 1) / 3 and the draw is 0.0
        asyncio.run(ok())
    assert t.metrics() == ThrottleMetrics(requests=3, accepts=1, probability=pytest.approx(0.5))
    t.reset()
    assert asyncio.run(ok()) == 1
