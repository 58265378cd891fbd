# cython: language_level=3, freethreading_compatible=True, boundscheck=False, wraparound=False, cdivision=True
"""GCRA rate limiter core: one int64 theoretical-arrival-time word, one CAS per decision (bt_gcra.pxd),
plus two atomic decision counters, so the facade (buttress.TokenBucket) can hand out this object's bound
`try_acquire` as its own hot path and still report admitted / rejected.

Every method takes `now` in int ns; a negative `now` (the default) reads the clock: the C monotonic
clock (same as time.monotonic_ns()), or `clock_ns()` when one was given.
"""
from libc.stdint cimport int64_t, INT64_MAX
from cpython.time cimport monotonic_ns
from cpython.long cimport PyLong_AsLongLongAndOverflow
from bt_gcra cimport gcra_t, gcra_init, gcra_claim, gcra_wait, gcra_available, gcra_refund
from bt_atomic cimport bt_load, bt_store, bt_fetch_add

from buttress._params import emission_interval_ns, check_n

__all__ = ["GCRA"]


cdef class GCRA:
    cdef gcra_t g
    cdef int64_t admitted_     # decisions that claimed tokens (atomic)
    cdef int64_t rejected_     # decisions refused (atomic)
    cdef readonly int64_t capacity
    cdef readonly double rate
    cdef readonly int64_t interval_ns
    cdef object _clock_ns

    def __init__(self, rate, capacity, clock_ns=None):
        r, cap, interval = emission_interval_ns(rate, capacity)
        if clock_ns is not None and not callable(clock_ns):
            raise TypeError(f"clock_ns must be a callable returning int ns or None, got {clock_ns!r}")
        self.rate = r
        self.capacity = cap
        self.interval_ns = interval
        self._clock_ns = clock_ns
        gcra_init(&self.g, interval, cap)

    cdef inline int64_t _now(self, int64_t now) except? -1:
        if now >= 0:
            return now
        if self._clock_ns is None:
            return monotonic_ns()
        return self._clock_ns()

    cdef inline int64_t _n(self, object n) except -1:
        cdef int overflow = 0
        cdef long long v
        if type(n) is int:
            v = PyLong_AsLongLongAndOverflow(n, &overflow)
            if overflow == 0 and 1 <= v <= self.capacity:
                return v
        return check_n(n, self.capacity)

    cdef inline int64_t _claim(self, int64_t n, int64_t now, int64_t max_wait) noexcept nogil:
        cdef int64_t w = gcra_claim(&self.g, n, now, max_wait)
        bt_fetch_add(&self.admitted_ if w >= 0 else &self.rejected_, 1)
        return w

    def try_acquire(self, n=1, int64_t now=-1):
        """Take n tokens if they are available now."""
        return self._claim(self._n(n), self._now(now), 0) == 0

    def reserve(self, n=1, int64_t now=-1, int64_t max_wait_ns=INT64_MAX):
        """Claim n tokens now if the wait is <= max_wait_ns; return that wait in ns, or -1 (nothing claimed)."""
        return self._claim(self._n(n), self._now(now), max_wait_ns)

    def wait_ns(self, n=1, int64_t now=-1):
        """ns until n tokens would be available (0 = now); claims nothing."""
        return gcra_wait(&self.g, self._n(n), self._now(now))

    def available(self, int64_t now=-1):
        """Whole tokens available at now."""
        return gcra_available(&self.g, self._now(now))

    def refund(self, n=1):
        """Give back n tokens claimed earlier and not used."""
        gcra_refund(&self.g, self._n(n))

    def counts(self):
        """(admitted, rejected) decisions since creation or reset()."""
        return bt_load(&self.admitted_), bt_load(&self.rejected_)

    def reset(self):
        """Full bucket, counters back to zero."""
        gcra_init(&self.g, self.g.interval, self.capacity)
        bt_store(&self.admitted_, 0)
        bt_store(&self.rejected_, 0)

    def __repr__(self):
        return f"GCRA(rate={self.rate!r}, capacity={self.capacity!r})"
