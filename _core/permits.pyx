# cython: language_level=3, freethreading_compatible=True, boundscheck=False, wraparound=False, cdivision=True
"""A permit counter: one atomic word of permits in use against a resizable maximum.

The core answers only: try_acquire says yes or no; waiting for a permit is the facade's business.
Counts are checked before the word is touched: n is an int in [1, 2**40] (so in_use + n cannot
overflow), and a release of more than is held is refused (in_use never goes below 0, so available never
rises above max_permits). An object whose __init__ never ran has max_permits 0 and admits nothing;
every method says so with a RuntimeError (checked off the hot path: only when the word says no).

close() (a drain: stop admitting) stores the maximum negated in the same limit word, so every try is
refused by the comparison it makes anyway (in_use + n > a negative limit): closing costs the hot path
nothing. Holders release as usual; reopen() restores the maximum; resize() keeps the sign.
"""
from libc.stdint cimport int64_t
from cpython.pycapsule cimport PyCapsule_New
from bt_atomic cimport bt_load, bt_store, bt_cas
from bt_permits cimport permits_t, permits_try, permits_try_limit, permits_release

from buttress._params import check_int

__all__ = ["Permits"]

_MAX = 1 << 40
cdef int64_t C_MAX = 1099511627776      # _MAX, as a C constant

cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object, int *) except? -1


cdef inline int64_t _count(object n) except -1:
    """n as a count in [1, 2**40]; anything else raises as check_int does (same types, same messages)."""
    cdef int overflow = 0
    cdef long long v
    if type(n) is int:
        v = PyLong_AsLongLongAndOverflow(n, &overflow)
        if overflow == 0 and 1 <= v <= C_MAX:
            return v
    return check_int("n", n, minimum=1, maximum=_MAX)


cdef object _uninit(obj):
    return RuntimeError(f"{type(obj).__name__} is not initialised: its __init__ was not called "
                        f"(a subclass must call super().__init__())")


cdef class Permits:
    cdef permits_t p

    def __init__(self, max_permits):
        cdef int64_t m = check_int("max_permits", max_permits, minimum=1, maximum=_MAX)
        # once: a second __init__ would forget the holders (their releases would then be refused)
        if not bt_cas(&self.p.limit, 0, m):
            raise RuntimeError(f"{type(self).__name__} is already initialised")

    def try_acquire(self, n=1):
        """Take n permits if in_use + n <= max_permits."""
        cdef int64_t k = _count(n)
        if permits_try(&self.p, k):
            return True
        if bt_load(&self.p.limit) == 0:
            raise _uninit(self)
        return False

    def try_acquire_within(self, limit, n=1):
        """Take n permits if in_use + n <= min(limit, max_permits): a caller-chosen share of the maximum."""
        cdef int overflow = 0
        cdef long long lim
        cdef int64_t k = _count(n)
        cdef int64_t m = bt_load(&self.p.limit)     # negative while closed: refuses below
        if type(limit) is int:
            lim = PyLong_AsLongLongAndOverflow(limit, &overflow)
        if type(limit) is not int or overflow:      # as the twin: TypeError for bool, float, str ...
            limit = check_int("limit", limit, minimum=None)
            lim = PyLong_AsLongLongAndOverflow(limit, &overflow)
        if overflow > 0 or lim > m:
            lim = m
        if m == 0:
            raise _uninit(self)
        if overflow < 0 or lim < k:
            return False
        return permits_try_limit(&self.p, k, lim)

    def release(self, n=1):
        """Return n permits; ValueError (nothing changed) if fewer are held."""
        cdef int64_t k = _count(n)
        if not permits_release(&self.p, k):
            if bt_load(&self.p.limit) == 0:
                raise _uninit(self)
            raise ValueError(f"n={n} permits released but only {bt_load(&self.p.in_use)} are held")

    @property
    def in_use(self):
        return bt_load(&self.p.in_use)

    @property
    def max_permits(self):
        cdef int64_t m = bt_load(&self.p.limit)
        return -m if m < 0 else m

    @property
    def available(self):
        cdef int64_t a = bt_load(&self.p.limit) - bt_load(&self.p.in_use)
        return a if a > 0 else 0

    @property
    def closed(self):
        """True between close() and reopen(): every acquisition is refused."""
        return bt_load(&self.p.limit) < 0

    def close(self):
        """Refuse every acquisition until reopen() (holders release as usual). Idempotent."""
        cdef int64_t cur
        while True:
            cur = bt_load(&self.p.limit)
            if cur == 0:
                raise _uninit(self)
            if cur < 0 or bt_cas(&self.p.limit, cur, -cur):
                return

    def reopen(self):
        """Admit again after close(). Idempotent."""
        cdef int64_t cur
        while True:
            cur = bt_load(&self.p.limit)
            if cur == 0:
                raise _uninit(self)
            if cur > 0 or bt_cas(&self.p.limit, cur, -cur):
                return

    def resize(self, max_permits):
        """Change the maximum. Shrinking never strands holders: they release as usual and
        new permits are issued only once in_use is below the new maximum."""
        cdef int64_t m = check_int("max_permits", max_permits, minimum=1, maximum=_MAX)
        cdef int64_t cur
        while True:             # never turns an uninitialised object into a working one
            cur = bt_load(&self.p.limit)
            if cur == 0:
                raise _uninit(self)
            if bt_cas(&self.p.limit, cur, -m if cur < 0 else m):    # a closed counter stays closed
                return

    def _handle(self):
        """A capsule with the address of the permit word, for compiled guards (keep self alive)."""
        if bt_load(&self.p.limit) == 0:
            raise _uninit(self)
        return PyCapsule_New(&self.p, "buttress.permits_t", NULL)

    def __repr__(self):
        return f"{type(self).__name__}(max_permits={self.max_permits}, in_use={self.in_use})"
