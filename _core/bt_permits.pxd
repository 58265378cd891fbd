# A permit counter: one atomic word of permits in use, checked against a resizable maximum.
from libc.stdint cimport int64_t
from bt_atomic cimport bt_load, bt_cas, bt_store

cdef struct permits_t:
    int64_t in_use
    int64_t limit

cdef inline bint permits_try(permits_t *p, int64_t n) noexcept nogil:
    cdef int64_t cur
    while True:
        cur = bt_load(&p.in_use)
        if cur + n > bt_load(&p.limit):
            return False
        if bt_cas(&p.in_use, cur, cur + n):
            return True

cdef inline bint permits_try_limit(permits_t *p, int64_t n, int64_t limit) noexcept nogil:
    """Take n permits if in_use + n <= limit (a per-call limit, e.g. a priority's share)."""
    cdef int64_t cur
    while True:
        cur = bt_load(&p.in_use)
        if cur + n > limit:
            return False
        if bt_cas(&p.in_use, cur, cur + n):
            return True

cdef inline bint permits_release(permits_t *p, int64_t n) noexcept nogil:
    """Returns False (and changes nothing) when fewer than n permits are held."""
    cdef int64_t cur
    while True:
        cur = bt_load(&p.in_use)
        if cur < n:
            return False
        if bt_cas(&p.in_use, cur, cur - n):
            return True
