# GCRA on one int64 "theoretical arrival time" (TAT) word; one CAS per decision.
# Header-only: cimported by absolute name by every module that limits rates.
from libc.stdint cimport int64_t
from bt_atomic cimport bt_load, bt_cas, bt_fetch_add, bt_store

cdef struct gcra_t:
    int64_t tat        # theoretical arrival time, ns (atomic)
    int64_t interval   # ns per token (emission interval), >= 1
    int64_t tau        # capacity * interval: how far TAT may run ahead of now

cdef inline void gcra_init(gcra_t *g, int64_t interval, int64_t capacity) noexcept nogil:
    g.interval = interval
    g.tau = interval * capacity
    bt_store(&g.tat, 0)

cdef inline int64_t gcra_claim(gcra_t *g, int64_t n, int64_t now, int64_t max_wait) noexcept nogil:
    """Claim n tokens if the caller would wait at most max_wait ns.
    Returns the wait in ns (0 = usable now), or -1 when refused (nothing claimed)."""
    cdef int64_t tat, base, new_tat, wait
    while True:
        tat = bt_load(&g.tat)
        base = tat if tat > now else now
        new_tat = base + n * g.interval
        wait = new_tat - now - g.tau
        if wait < 0:
            wait = 0
        if wait > max_wait:
            return -1
        if bt_cas(&g.tat, tat, new_tat):
            return wait

cdef inline int64_t gcra_wait(gcra_t *g, int64_t n, int64_t now) noexcept nogil:
    """ns until n tokens would be available; claims nothing."""
    cdef int64_t tat = bt_load(&g.tat)
    cdef int64_t base = tat if tat > now else now
    cdef int64_t wait = base + n * g.interval - now - g.tau
    return wait if wait > 0 else 0

cdef inline int64_t gcra_available(gcra_t *g, int64_t now) noexcept nogil:
    """Whole tokens available at now."""
    cdef int64_t ahead = bt_load(&g.tat) - now
    if ahead < 0:
        ahead = 0
    return (g.tau - ahead) // g.interval

cdef inline void gcra_refund(gcra_t *g, int64_t n) noexcept nogil:
    # Moving TAT back returns the tokens; a TAT in the past means "full", so no clamp is needed.
    bt_fetch_add(&g.tat, -n * g.interval)
