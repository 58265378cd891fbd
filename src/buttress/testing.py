"""The testing switch: make every pattern built while it is on use one fake clock and never sleep for real.

For users' own test suites (as stamina's ``set_testing``)::

    import buttress

    @pytest.fixture(autouse=True)
    def fake_time():
        with buttress.set_testing() as clock:     # a new FakeClock, or set_testing(clock=my_clock)
            yield clock

    def test_payment_retries(fake_time):
        ...                                       # backoff waits advance fake_time instead of sleeping
        assert fake_time.monotonic() == 3.0

While it is on, ``clock=None`` (every pattern's default) means the testing clock: CircuitBreaker, Retry,
RetryBudget, retry_call, TokenBucket and the other limiters, Bulkhead, Timeout, LoadShedder, Hedge,
Fallback, Chaos, health checks... An explicit ``clock=`` is kept. Objects built before the switch keep
the clock they were built with (a limiter or breaker cannot change its time base mid-life), except that a
`Retry` built with the default clock sends its backoff waits to the testing clock, so module-level
``@Retry(...)`` functions do not sleep in tests. See docs/testing.md.
"""
from __future__ import annotations

from typing import Any

from .clock import Clock, FakeClock, _swap_testing, resolve_clock, testing_clock
from ._params import show

__all__ = ["set_testing", "is_testing", "testing_clock", "Testing"]


class Testing:
    """What `set_testing` returns. As a context manager it gives the clock on entry and puts back, on
    exit, the setting that was in force before the `set_testing` call (so blocks nest)."""

    __slots__ = ("clock", "_previous", "_restored")

    def __init__(self, clock: Clock | None, previous: Clock | None) -> None:
        self.clock = clock              # the clock now in force (None: testing mode off)
        self._previous = previous
        self._restored = False

    def __enter__(self) -> Any:
        return self.clock

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back the setting from before this `set_testing` call (a second call does nothing)."""
        if not self._restored:
            self._restored = True
            _swap_testing(self._previous)

    def __repr__(self) -> str:
        return f"<buttress testing {'off' if self.clock is None else 'on: ' + repr(self.clock)}>"


def set_testing(on: bool = True, *, clock: Any = None) -> Testing:
    """Turn testing mode on (with `clock`, or a new ``FakeClock()``) or off (``set_testing(False)``).

    Works as a plain call (it stays in force until changed) and as a context manager
    (``with set_testing() as clock:``, restored on exit). Process-wide: threads started by the test see
    it too. Returns a `Testing` whose ``.clock`` is the clock in force."""
    if not isinstance(on, bool):
        raise TypeError(f"on must be a bool, got {show(on)} ({type(on).__name__})")
    if not on:
        if clock is not None:
            raise ValueError(f"clock must be None when turning testing mode off, got {show(clock)}")
        return Testing(None, _swap_testing(None))
    chosen = FakeClock() if clock is None else resolve_clock(clock)    # a TypeError for a non-clock
    return Testing(chosen, _swap_testing(chosen))


def is_testing() -> bool:
    """Whether testing mode is on."""
    return testing_clock() is not None
