# cython: language_level=3, freethreading_compatible=True, boundscheck=False, wraparound=False, cdivision=True
"""The circuit-breaker state word: (generation, half-open permits in flight, state) in one int64.

Transitions are one CAS each (exactly one racer wins); every transition starts a new generation,
so results of calls admitted under an older generation can be recognised and dropped.
States: 0 CLOSED, 1 OPEN, 2 HALF_OPEN, 3 FORCED_OPEN, 4 DISABLED, 5 METRICS_ONLY.
"""
from libc.stdint cimport int64_t
from cpython.time cimport monotonic_ns
from bt_atomic cimport bt_load, bt_store
from bt_state cimport (state_t, st_state, st_gen, st_flight, st_transition, st_try_flight,
                       st_return_flight, ST_MAX_FLIGHT)

from buttress._params import check_int

__all__ = ["BreakerState", "MAX_HALF_OPEN"]

MAX_HALF_OPEN = ST_MAX_FLIGHT


cdef class BreakerState:
    cdef state_t s

    def __init__(self, int64_t now=-1):
        bt_store(&self.s.word, 0)
        bt_store(&self.s.since[0], now if now >= 0 else monotonic_ns())

    def load(self):
        """(state, generation, half-open permits in flight)."""
        cdef int64_t w = bt_load(&self.s.word)
        return (st_state(w), st_gen(w), st_flight(w))

    def since(self, int64_t generation):
        """ns at which `generation` began."""
        return bt_load(&self.s.since[generation & 1])

    def transition(self, int expect_state, int64_t expect_gen, int new_state, int64_t now=-1):
        """(expect_state, expect_gen) -> new_state; the new generation, or -1 if another won."""
        if not 0 <= new_state <= 5:
            check_int("new_state", new_state, minimum=0, maximum=5)
        return st_transition(&self.s, expect_state, expect_gen, new_state,
                             now if now >= 0 else monotonic_ns())

    def try_half_open(self, int64_t generation, int64_t limit):
        """Take a half-open permit of `generation` if fewer than `limit` are out."""
        return st_try_flight(&self.s, generation, limit)

    def return_half_open(self, int64_t generation):
        """Give back a half-open permit of `generation`; False if the generation has passed."""
        return st_return_flight(&self.s, generation)

    def __repr__(self):
        return "BreakerState(state=%d, generation=%d, in_flight=%d)" % self.load()
