# cython: language_level=3, freethreading_compatible=True, boundscheck=False, wraparound=False, cdivision=True
"""A permit counter: one atomic word of permits in use against a resizable maximum.

The core answers only: try_acquire says yes or no; waiting for a permit is the facade's business.
"""
from libc.stdint cimport int64_t
from cpython.pycapsule cimport PyCapsule_New
from bt_atomic cimport bt_load, bt_store
from bt_permits cimport permits_t, permits_try, permits_try_limit, permits_release

from buttress._params import check_int

__all__ = ["Permits"]

_MAX = 1 << 40


cdef class Permits:
    cdef permits_t p

    def __init__(self, max_permits):
        bt_store(&self.p.limit, check_int("max_permits", max_permits, minimum=1, maximum=_MAX))
        bt_store(&self.p.in_use, 0)

    cdef int _bad(self, n) except -1:
        check_int("n", n, minimum=1, maximum=_MAX)
        raise ValueError(f"n={n} permits released but only {bt_load(&self.p.in_use)} are held")

    def try_acquire(self, int64_t n=1):
        """Take n permits if in_use + n <= max_permits."""
        if n < 1:
            self._bad(n)
        return permits_try(&self.p, n)

    def try_acquire_within(self, int64_t limit, int64_t n=1):
        """Take n permits if in_use + n <= min(limit, max_permits): a caller-chosen share of the maximum."""
        if n < 1:
            self._bad(n)
        cdef int64_t m = bt_load(&self.p.limit)
        return permits_try_limit(&self.p, n, limit if limit < m else m)

    def release(self, int64_t n=1):
        """Return n permits; ValueError (nothing changed) if fewer are held."""
        if n < 1 or not permits_release(&self.p, n):
            self._bad(n)

    @property
    def in_use(self):
        return bt_load(&self.p.in_use)

    @property
    def max_permits(self):
        return bt_load(&self.p.limit)

    @property
    def available(self):
        cdef int64_t a = bt_load(&self.p.limit) - bt_load(&self.p.in_use)
        return a if a > 0 else 0

    def resize(self, max_permits):
        """Change the maximum. Shrinking never strands holders: they release as usual and
        new permits are issued only once in_use is below the new maximum."""
        bt_store(&self.p.limit, check_int("max_permits", max_permits, minimum=1, maximum=_MAX))

    def _handle(self):
        """A capsule with the address of the permit word, for compiled guards (keep self alive)."""
        return PyCapsule_New(&self.p, "buttress.permits_t", NULL)

    def __repr__(self):
        return f"Permits(max_permits={self.max_permits}, in_use={self.in_use})"
