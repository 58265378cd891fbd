"""Pure-Python twin of buttress._core.state: the spec and the fallback."""
from __future__ import annotations

import threading
import time
from typing import Any

from .._params import check_int
from .gcra import as_i64

__all__ = ["BreakerState", "MAX_HALF_OPEN"]

MAX_HALF_OPEN = 0xFFFFF
_UNINIT = "{} is not initialised: its __init__ never ran (a subclass must call super().__init__())"


class Uninit:
    """A failed attribute lookup on an object whose __init__ never ran raises the compiled core's
    RuntimeError (a subclass that forgot super().__init__() gets the same answer in both)."""

    def __getattr__(self, name: str) -> Any:
        closed = self.__dict__.get("_closed_msg")
        if closed is not None and name == "_lock":
            raise RuntimeError(closed)      # _close(message) took the lock away: every later use raises
        if name.startswith("__") or "_lock" in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raise RuntimeError(_UNINIT.format(type(self).__name__))

    def _init_once(self) -> None:
        if "_lock" in self.__dict__ or "_closed_msg" in self.__dict__:
            raise RuntimeError(f"{type(self).__name__} is already initialised; create a new one instead")


class BreakerState(Uninit):
    """(state, generation, half-open permits in flight), changed atomically.

    States: 0 CLOSED, 1 OPEN, 2 HALF_OPEN, 3 FORCED_OPEN, 4 DISABLED, 5 METRICS_ONLY."""

    def __init__(self, now: int | None = None) -> None:
        self._init_once()
        t = time.monotonic_ns() if now is None else as_i64(now, "now")
        self._state = self._gen = self._flight = 0
        self._since = [(0, t), (-1, 0)]          # (generation, ns) stamps, slot = generation & 1
        self._lock = threading.Lock()

    def load(self) -> tuple[int, int, int]:
        """(state, generation, half-open permits in flight)."""
        with self._lock:
            return (self._state, self._gen, self._flight)

    def since(self, generation: int) -> int | None:
        """ns at which `generation` began; None once its slot holds a later generation."""
        self._lock
        g = check_int("generation", generation, minimum=None)
        stamp_gen, value = self._since[g & 1]
        return value if g >= 0 and stamp_gen == g else None

    def transition(self, expect_state: int, expect_gen: int, new_state: int, now: int | None = None) -> int:
        """(expect_state, expect_gen) -> new_state; the new generation, or -1 if another won."""
        self._lock
        es = check_int("expect_state", expect_state, minimum=0, maximum=5)
        eg = check_int("expect_gen", expect_gen, minimum=None)
        ns = check_int("new_state", new_state, minimum=0, maximum=5)
        t = time.monotonic_ns() if now is None else as_i64(now, "now")
        with self._lock:
            if (self._state, self._gen) != (es, eg):
                return -1
            self._gen += 1
            self._since[self._gen & 1] = (self._gen, t)
            self._state, self._flight = ns, 0
            return self._gen

    def try_half_open(self, generation: int, limit: int) -> bool:
        """Take a half-open permit of `generation` if fewer than `limit` are out."""
        self._lock
        g = check_int("generation", generation, minimum=None)
        n = check_int("limit", limit, minimum=0, maximum=MAX_HALF_OPEN)
        with self._lock:
            if self._state != 2 or self._gen != g or self._flight >= n:
                return False
            self._flight += 1
            return True

    def return_half_open(self, generation: int) -> bool:
        """Give back a half-open permit of `generation`; False if the generation has passed."""
        self._lock
        g = check_int("generation", generation, minimum=None)
        with self._lock:
            if self._state != 2 or self._gen != g or self._flight == 0:
                return False
            self._flight -= 1
            return True

    def __repr__(self) -> str:
        if "_lock" not in self.__dict__:
            return f"<{type(self).__name__} (not initialised)>"
        return "BreakerState(state=%d, generation=%d, in_flight=%d)" % self.load()
