"""Shared bits for the benchmark suites. Every suite has its floor cases in the same file."""
import pytest

from buttress import _impl


def _kinds():
    kinds = ["python"]
    if not _impl._flag("BUTTRESS_NO_EXTENSIONS"):
        try:
            for name in _impl.CORE_MODULES:
                _impl.compiled(name)
            kinds.insert(0, "cython")
        except ImportError:
            pass
    return kinds


@pytest.fixture
def shm_store():
    """A SharedMemoryStore of its own (/dev/shm/buttress.bench-PID-RANDOM), closed and unlinked after."""
    import os
    import uuid
    from buttress.stores import SharedMemoryStore
    store = SharedMemoryStore(f"bench-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    yield store
    store.close()
    store.unlink()


@pytest.fixture(params=_kinds())
def core_kind(request):
    """'cython' or 'python': benchmark both implementations of the core side by side."""
    return request.param


def core_module(kind, name):
    return _impl.compiled(name) if kind == "cython" else _impl.twin(name)


def bare():
    """The floor: a bare Python call."""
    return None


def bare_pair(a=bare, b=bare):
    """The floor for two-call cases (acquire + release)."""
    a()
    b()


async def bare_async():
    """The floor for async cases: awaiting a coroutine that returns at once."""
    return None


def bare_raise():
    raise ValueError("floor")


def catching(fn, exc=Exception):
    """A call that raises, caught: the raise+catch floor when fn is bare_raise."""
    def run():
        try:
            fn()
        except exc:
            pass
    return run


AWAITS_PER_ROUND = 1000


def awaiting(benchmark, make_awaitable, catch=()):
    """Benchmark `await make_awaitable()` AWAITS_PER_ROUND times per round inside one running loop;
    the per-await median is stored in extra_info['ns_per_await']."""
    import asyncio

    loop = asyncio.new_event_loop()

    async def batch():
        for _ in range(AWAITS_PER_ROUND):
            try:
                await make_awaitable()
            except catch:
                pass

    def run():
        loop.run_until_complete(batch())

    try:
        benchmark.pedantic(run, rounds=30, warmup_rounds=2)
    finally:
        loop.close()
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_await"] = benchmark.stats.stats.median * 1e9 / AWAITS_PER_ROUND
