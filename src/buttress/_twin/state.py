"""Pure-Python twin of buttress._core.state: the spec and the fallback."""
from __future__ import annotations

import threading
import time

from .._params import check_int

__all__ = ["BreakerState", "MAX_HALF_OPEN"]

MAX_HALF_OPEN = 0xFFFFF


class BreakerState:
    """(state, generation, half-open permits in flight), changed atomically.

    States: 0 CLOSED, 1 OPEN, 2 HALF_OPEN, 3 FORCED_OPEN, 4 DISABLED, 5 METRICS_ONLY."""

    def __init__(self, now: int = -1) -> None:
        self._lock = threading.Lock()
        self._state = self._gen = self._flight = 0
        self._since = [now if now >= 0 else time.monotonic_ns(), 0]

    def load(self) -> tuple[int, int, int]:
        """(state, generation, half-open permits in flight)."""
        with self._lock:
            return (self._state, self._gen, self._flight)

    def since(self, generation: int) -> int:
        """ns at which `generation` began."""
        return self._since[generation & 1]

    def transition(self, expect_state: int, expect_gen: int, new_state: int, now: int = -1) -> int:
        """(expect_state, expect_gen) -> new_state; the new generation, or -1 if another won."""
        check_int("new_state", new_state, minimum=0, maximum=5)
        now = now if now >= 0 else time.monotonic_ns()
        with self._lock:
            if (self._state, self._gen) != (expect_state, expect_gen):
                return -1
            self._gen += 1
            self._since[self._gen & 1] = now
            self._state, self._flight = new_state, 0
            return self._gen

    def try_half_open(self, generation: int, limit: int) -> bool:
        """Take a half-open permit of `generation` if fewer than `limit` are out."""
        with self._lock:
            if self._state != 2 or self._gen != generation or self._flight >= limit:
                return False
            self._flight += 1
            return True

    def return_half_open(self, generation: int) -> bool:
        """Give back a half-open permit of `generation`; False if the generation has passed."""
        with self._lock:
            if self._state != 2 or self._gen != generation or self._flight == 0:
                return False
            self._flight -= 1
            return True

    def __repr__(self) -> str:
        return "BreakerState(state=%d, generation=%d, in_flight=%d)" % self.load()
