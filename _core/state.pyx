# cython: language_level=3, freethreading_compatible=True, boundscheck=False, wraparound=False, cdivision=True
"""The circuit-breaker state word: (generation, half-open permits in flight, state) in one int64.

Transitions are claim / prepare / publish (bt_state.pxd): exactly one racer wins, and the timestamp of
generation g is stamped with g before g is published, so it can never be overwritten by a late racer.
States: 0 CLOSED, 1 OPEN, 2 HALF_OPEN, 3 FORCED_OPEN, 4 DISABLED, 5 METRICS_ONLY.
Times are int ns: any int64 (None reads the clock); ints outside int64 are a ValueError.
"""
cimport cython
from libc.stdint cimport int64_t
from cpython.time cimport monotonic_ns
from bt_atomic cimport bt_load, bt_store
from bt_state cimport (state_t, st_state, st_gen, st_flight, st_transition, st_try_flight,
                       st_return_flight, st_stamp_write, st_stamp_read, ST_MAX_FLIGHT)
from bt_gcra cimport bt_as_i64

from buttress._params import check_int

__all__ = ["BreakerState", "MAX_HALF_OPEN"]

MAX_HALF_OPEN = ST_MAX_FLIGHT

cdef str _UNINIT = "{} is not initialised: its __init__ never ran (a subclass must call super().__init__())"


@cython.auto_pickle(False)
cdef class BreakerState:
    cdef state_t s
    cdef int64_t ready_

    def __init__(self, now=None):
        if bt_load(&self.ready_):
            raise RuntimeError(f"{type(self).__name__} is already initialised; create a new one instead")
        cdef int64_t t = monotonic_ns() if now is None else bt_as_i64(now, "now")
        bt_store(&self.s.word, 0)
        st_stamp_write(&self.s.since[1], -1, 0)
        st_stamp_write(&self.s.since[0], 0, t)
        bt_store(&self.ready_, 1)

    cdef int _ready(self) except -1:
        if not bt_load(&self.ready_):
            raise RuntimeError(_UNINIT.format(type(self).__name__))
        return 0

    def load(self):
        """(state, generation, half-open permits in flight)."""
        self._ready()
        cdef int64_t w = bt_load(&self.s.word)
        return (st_state(w), st_gen(w), st_flight(w))

    def since(self, generation):
        """ns at which `generation` began; None once its slot holds a later generation."""
        self._ready()
        cdef int64_t g = check_int("generation", generation, minimum=None), v
        if st_stamp_read(&self.s.since[g & 1], g, &v):
            return v
        return None

    def transition(self, expect_state, expect_gen, new_state, now=None):
        """(expect_state, expect_gen) -> new_state; the new generation, or -1 if another won."""
        self._ready()
        cdef int es = check_int("expect_state", expect_state, minimum=0, maximum=5)
        cdef int64_t eg = check_int("expect_gen", expect_gen, minimum=None)
        cdef int ns = check_int("new_state", new_state, minimum=0, maximum=5)
        cdef int64_t t = monotonic_ns() if now is None else bt_as_i64(now, "now")
        return st_transition(&self.s, es, eg, ns, t)

    def try_half_open(self, generation, limit):
        """Take a half-open permit of `generation` if fewer than `limit` are out."""
        self._ready()
        cdef int64_t g = check_int("generation", generation, minimum=None)
        cdef int64_t n = check_int("limit", limit, minimum=0, maximum=ST_MAX_FLIGHT)
        return st_try_flight(&self.s, g, n)

    def return_half_open(self, generation):
        """Give back a half-open permit of `generation`; False if the generation has passed."""
        self._ready()
        return st_return_flight(&self.s, check_int("generation", generation, minimum=None))

    def __repr__(self):
        if not bt_load(&self.ready_):
            return f"<{type(self).__name__} (not initialised)>"
        return "BreakerState(state=%d, generation=%d, in_flight=%d)" % self.load()
