# A permit counter: one atomic word of permits in use, checked against a resizable maximum.
# Callers keep n in [1, 2**40] (Permits checks it), so in_use + n never overflows.
#
# Wake-up handshake (a bulkhead's waiters): a releaser does "release (CAS), then look for waiters"; a
# waiter does "queue itself, then look for a permit". Each is a store followed by a load of the other's
# location, which a weakly ordered CPU (AArch64; x86's store buffer too) may reorder, so both could miss
# each other and the waiter sleeps for ever. Hence a full fence after every release, and before the last
# look of a refused try (the refused path only: admitting is a CAS and needs no extra fence).
from libc.stdint cimport int64_t
from bt_atomic cimport bt_load, bt_cas, bt_store, bt_fence_seq_cst, bt_fence_after_rmw

cdef struct permits_t:
    int64_t in_use
    int64_t limit

cdef inline bint permits_try_limit(permits_t *p, int64_t n, int64_t limit) noexcept nogil:
    """Take n permits if in_use + n <= limit (a per-call limit, e.g. a priority's share)."""
    cdef int64_t cur
    cdef bint fenced = False
    while True:
        cur = bt_load(&p.in_use)
        if cur + n > limit:
            if fenced:
                return False
            bt_fence_seq_cst()      # the waiter's side of the handshake: look once more after a fence
            fenced = True
            continue
        if bt_cas(&p.in_use, cur, cur + n):
            return True

cdef inline bint permits_try(permits_t *p, int64_t n) noexcept nogil:
    cdef int64_t cur
    cdef bint fenced = False
    while True:
        cur = bt_load(&p.in_use)
        if cur + n > bt_load(&p.limit):
            if fenced:
                return False
            bt_fence_seq_cst()
            fenced = True
            continue
        if bt_cas(&p.in_use, cur, cur + n):
            return True

cdef inline bint permits_release(permits_t *p, int64_t n) noexcept nogil:
    """Returns False (and changes nothing) when fewer than n permits are held. A successful release is
    followed by a full fence, so the caller's next look at its waiters cannot be ordered before it."""
    cdef int64_t cur
    while True:
        cur = bt_load(&p.in_use)
        if cur < n:
            return False
        if bt_cas(&p.in_use, cur, cur - n):
            bt_fence_after_rmw()
            return True
