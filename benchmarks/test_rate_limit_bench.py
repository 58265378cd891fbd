"""Rate limiters: TokenBucket, keyed limiter (1M live keys), batch decisions, with floors and peers.

python -m pytest benchmarks/test_rate_limit_bench.py --benchmark-columns=median,min,rounds --benchmark-sort=name \
    --benchmark-json=/tmp/rate.json && python benchmarks/report.py /tmp/rate.json

Floors: bare_call `f()`; bare_call_arg `f(key)` (the floor of keyed calls); bare_await (1000 awaits per
round in one loop run, reported per await); async_raise_catch (the floor of an async refusal); loop_call (a Python loop calling `f(k)` over 1000 keys, per
key: the floor of the random-key case). Batch cases report ns per decision (extra_info ns_per_op) and
decisions per second. Peers (limits, pyrate-limiter, token-bucket, throttled-py, aiolimiter) run when
installed, each configured so that it never refuses during the run.
"""
import numpy as np
import pytest

import buttress
from buttress import KeyedLimiter, TokenBucket
from conftest import awaiting, bare_async

N_KEYS = 1_000_000 if buttress.IMPLEMENTATION == "cython" else 20_000
LOOP = 1000
HUGE = dict(rate=1e9, capacity=10**9)               # never refuses within a benchmark


def f():
    return 1


def f1(key):
    return 1


# -- floors ----------------------------------------------------------------------------------------------

def test_floor_bare_call(benchmark):
    benchmark(f)


def test_floor_bare_call_arg(benchmark):
    benchmark(f1, 12345)


def test_floor_bare_await(benchmark):
    awaiting(benchmark, bare_async)


async def _raiser():
    raise ValueError("floor")


def test_floor_async_raise_catch(benchmark):
    """The floor of the async refusal case: awaiting a coroutine that raises, caught."""
    awaiting(benchmark, _raiser, catch=(ValueError,))


def _per_op(benchmark, run, ops):
    benchmark.pedantic(run, rounds=20, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_op"] = benchmark.stats.stats.median * 1e9 / ops
        benchmark.extra_info["ops_per_s"] = ops / benchmark.stats.stats.median


@pytest.fixture(scope="module")
def random_keys():
    return np.random.default_rng(0).choice(1 << 62, N_KEYS, replace=False).astype(np.int64)


def test_floor_loop_call(benchmark, random_keys):
    keys = random_keys[:LOOP].tolist()

    def run(fn=f1):
        for k in keys:
            fn(k)

    _per_op(benchmark, run, LOOP)


# -- TokenBucket -----------------------------------------------------------------------------------------

def test_token_bucket_try_acquire(benchmark):
    tb = TokenBucket(**HUGE)
    benchmark(tb.try_acquire)
    assert tb.metrics().rejected == 0


def test_token_bucket_try_acquire_refusing(benchmark):
    tb = TokenBucket(rate=1e-6, capacity=1)
    tb.try_acquire()
    benchmark(tb.try_acquire)
    assert tb.metrics().admitted == 1


def test_token_bucket_decorated_call(benchmark):
    tb = TokenBucket(**HUGE)
    benchmark(tb(f))


def test_token_bucket_acquire_async_no_wait(benchmark):
    tb = TokenBucket(**HUGE)
    awaiting(benchmark, tb.acquire_async)
    assert tb.metrics().rejected == 0


def test_token_bucket_decorated_async(benchmark):
    """@tb on an async def function: the compiled guard (one vectorcall, the coroutine driven in C)."""
    tb = TokenBucket(**HUGE)
    awaiting(benchmark, tb(bare_async))
    assert tb.metrics().rejected == 0


def test_token_bucket_call_async(benchmark):
    tb = TokenBucket(**HUGE)
    awaiting(benchmark, lambda: tb.call_async(bare_async))
    assert tb.metrics().rejected == 0


def test_token_bucket_decorated_async_refusing(benchmark):
    """An empty bucket: the refusal (RateLimitExceeded with retry_after) raised when awaited, caught."""
    tb = TokenBucket(rate=1e-6, capacity=1)
    tb.try_acquire()
    awaiting(benchmark, tb(bare_async), catch=(buttress.RateLimitExceeded,))


def test_sliding_window_decorated_async(benchmark):
    w = buttress.SlidingWindowLimiter(10**9, 1.0)
    awaiting(benchmark, w(bare_async))
    assert w.metrics().rejected == 0


def test_multi_limiter_decorated_async(benchmark):
    m = buttress.MultiLimiter(TokenBucket(**HUGE), TokenBucket(**HUGE))
    awaiting(benchmark, m(bare_async))


# -- shared state (issue 14): the same decision on words in a shared-memory segment --------------------------

def test_token_bucket_try_acquire_shm(benchmark, shm_store):
    """ratio to test_token_bucket_try_acquire: what deciding on words in /dev/shm costs (the same CAS)."""
    tb = TokenBucket(**HUGE, name="bench", store=shm_store)
    benchmark(tb.try_acquire)
    assert tb.metrics().rejected == 0


def test_token_bucket_try_acquire_memory_store(benchmark):
    tb = TokenBucket(**HUGE, name="bench", store="memory://bench")
    benchmark(tb.try_acquire)


def test_keyed_try_acquire_hot_key_shm(benchmark, shm_store):
    kl = KeyedLimiter(rate=1e6, capacity=10**6, max_keys=1000, name="bench-keyed", store=shm_store)
    benchmark(kl.try_acquire, 12345)


def test_sliding_window_try_acquire_shm(benchmark, shm_store):
    sw = buttress.SlidingWindowLimiter(limit=(1 << 20) - 1, window=1e-3, name="bench-sliding", store=shm_store)
    benchmark(sw.try_acquire)


def test_leaky_bucket_try_acquire(benchmark):
    lb = buttress.LeakyBucket(rate=1e9, queue_size=10)
    benchmark(lb.try_acquire)


def test_sliding_window_try_acquire(benchmark):
    sw = buttress.SlidingWindowLimiter(limit=10**12, window=1.0)
    benchmark(sw.try_acquire)


# -- keyed limiter: 1M live keys ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_table(random_keys):
    kl = KeyedLimiter(rate=1e6, capacity=10**6, max_keys=N_KEYS)
    admitted = kl.try_acquire_many(random_keys)
    assert admitted.sum() >= N_KEYS * 0.999
    return kl


def test_keyed_try_acquire_hot_key_1m_live(benchmark, full_table, random_keys):
    key = int(random_keys[12345])
    benchmark(full_table.try_acquire, key)
    benchmark.extra_info["live_keys"] = len(full_table)
    benchmark.extra_info["bytes_per_key"] = full_table.metrics().bytes_per_key


def test_keyed_try_acquire_str_key_1m_live(benchmark, full_table):
    benchmark(full_table.try_acquire, "api-key-7f3a9c")


def test_keyed_try_acquire_random_keys_1m_live(benchmark, full_table, random_keys):
    keys = np.random.default_rng(1).permutation(random_keys)[:LOOP].tolist()
    ta = full_table.try_acquire

    def run():
        for k in keys:
            ta(k)

    _per_op(benchmark, run, LOOP)


def test_keyed_try_acquire_many_1m_array(benchmark, full_table, random_keys):
    arr = np.random.default_rng(2).permutation(random_keys)
    _per_op(benchmark, lambda: full_table.try_acquire_many(arr), len(arr))


# -- peers (skipped when not installed) ----------------------------------------------------------------

def test_peer_limits_moving_window_hit(benchmark):
    limits = pytest.importorskip("limits")
    lim = limits.strategies.MovingWindowRateLimiter(limits.storage.MemoryStorage())
    item = limits.parse("1000000000/second")
    benchmark(lim.hit, item, "k")


def test_peer_limits_sliding_window_counter_hit(benchmark):
    limits = pytest.importorskip("limits")
    lim = limits.strategies.SlidingWindowCounterRateLimiter(limits.storage.MemoryStorage())
    item = limits.parse("1000000000/second")
    benchmark(lim.hit, item, "k")


def test_peer_pyrate_limiter_try_acquire(benchmark):
    pyrate = pytest.importorskip("pyrate_limiter")
    limiter = pyrate.Limiter(pyrate.Rate(10**9, pyrate.Duration.SECOND))
    benchmark(limiter.try_acquire, "k", 1, False)


def test_peer_token_bucket_consume(benchmark):
    token_bucket = pytest.importorskip("token_bucket")
    limiter = token_bucket.Limiter(10**9, 10**9, token_bucket.MemoryStorage())
    benchmark(limiter.consume, "k")


def test_peer_throttled_py_limit(benchmark):
    throttled = pytest.importorskip("throttled")
    t = throttled.Throttled(key="k", quota=throttled.rate_limiter.per_sec(10**9, burst=10**9),
                            using=throttled.RateLimiterType.TOKEN_BUCKET.value)
    benchmark(t.limit)


def test_peer_aiolimiter_acquire_async(benchmark):
    aiolimiter = pytest.importorskip("aiolimiter")
    lim = None

    def make():
        nonlocal lim
        if lim is None:
            lim = aiolimiter.AsyncLimiter(10**9, 1)
        return lim.acquire()

    awaiting(benchmark, make)
