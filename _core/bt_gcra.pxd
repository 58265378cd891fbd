# GCRA on one int64 "theoretical arrival time" (TAT) word; one CAS per decision.
# Header-only: cimported by absolute name by every module that limits rates.
#
# Time domain (DESIGN §3c): any int64 clock reading is valid. The core keeps time relative to a base
# taken at creation (`base`): rel = now - base, clamped (saturated) to [REL_MIN, REL_MAX], never wrapped.
# The TAT is kept in that relative frame and never exceeds TAT_MAX; a claim that would move it past
# TAT_MAX is refused (it cannot be represented). The bounds keep every difference in int64:
#   TAT_MAX - REL_MIN == INT64_MAX, tau <= 2**62 (checked by emission_interval_ns), REL_MAX + tau <= TAT_MAX.
from libc.stdint cimport int64_t, INT64_MAX
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.time cimport monotonic_ns
from bt_atomic cimport bt_load, bt_cas, bt_fetch_add, bt_store

from operator import index as _bt_index

cdef extern from *:
    """
    #define BT_GCRA_REL_MIN (-((int64_t)1 << 61))
    #define BT_GCRA_REL_MAX (((int64_t)1 << 61) - 1)
    #define BT_GCRA_TAT_MAX (((int64_t)1 << 61) + ((int64_t)1 << 62) - 1)
    """
    const int64_t REL_MIN "BT_GCRA_REL_MIN"
    const int64_t REL_MAX "BT_GCRA_REL_MAX"
    const int64_t TAT_MAX "BT_GCRA_TAT_MAX"

cdef struct gcra_t:
    int64_t tat        # theoretical arrival time, ns relative to base (atomic)
    int64_t interval   # ns per token (emission interval), >= 1; 0 = not initialised
    int64_t tau        # capacity * interval: how far TAT may run ahead of now
    int64_t base       # clock reading at creation (ns)


cdef inline int64_t rel_time(int64_t now, int64_t base, int64_t lo, int64_t hi) noexcept nogil:
    """now - base clamped to [lo, hi] (lo < 0 < hi), without overflow."""
    if base >= 0:
        if now < lo + base:        # lo + base cannot overflow: base >= 0 > lo
            return lo
    elif now > hi + base:          # hi + base cannot overflow: base < 0 < hi
        return hi
    cdef int64_t d = now - base    # in range now: no overflow
    if d < lo:
        return lo
    if d > hi:
        return hi
    return d


cdef inline void gcra_init(gcra_t *g, int64_t interval, int64_t capacity, int64_t base) noexcept nogil:
    g.interval = interval
    g.tau = interval * capacity
    g.base = base
    bt_store(&g.tat, REL_MIN)      # the distant past: full at any (clamped) now


cdef inline int64_t gcra_rel(gcra_t *g, int64_t now) noexcept nogil:
    return rel_time(now, g.base, REL_MIN, REL_MAX)


cdef inline int64_t gcra_claim(gcra_t *g, int64_t n, int64_t now, int64_t max_wait, bint live,
                               int64_t *end) noexcept nogil:
    """Claim n tokens if the caller would wait at most max_wait ns. `now` is relative; with `live` the
    monotonic clock is read inside the loop, after the TAT load (a decision never uses a reading older
    than the state it changes). Returns the wait in ns (0 = usable now) and stores the new TAT (the
    reservation's end, its receipt for a refund) in *end; -1 when refused (nothing claimed), including
    when the new TAT could not be represented."""
    cdef int64_t tat, b, new_tat, wait
    cdef int64_t cost = n * g.interval
    while True:
        tat = bt_load(&g.tat)
        if live:
            now = gcra_rel(g, monotonic_ns())
        b = tat if tat > now else now
        if b > TAT_MAX - cost:
            return -1              # beyond the representable horizon: refuse, never wrap
        new_tat = b + cost
        wait = new_tat - now - g.tau   # new_tat <= TAT_MAX, now >= REL_MIN: no overflow
        if wait < 0:
            wait = 0
        if wait > max_wait:
            return -1
        if bt_cas(&g.tat, tat, new_tat):
            end[0] = new_tat
            return wait


cdef inline int64_t gcra_wait(gcra_t *g, int64_t n, int64_t now) noexcept nogil:
    """ns until n tokens would be available; claims nothing (now relative)."""
    cdef int64_t ahead = bt_load(&g.tat) - now
    if ahead < 0:
        ahead = 0
    cdef int64_t wait = ahead - (g.tau - n * g.interval)
    return wait if wait > 0 else 0


cdef inline int64_t gcra_available(gcra_t *g, int64_t now) noexcept nogil:
    """Whole tokens available at now (relative); 0 when reservations run past the bucket."""
    cdef int64_t ahead = bt_load(&g.tat) - now
    if ahead < 0:
        ahead = 0
    if ahead >= g.tau:
        return 0
    return (g.tau - ahead) // g.interval


cdef inline bint gcra_refund(gcra_t *g, int64_t n, int64_t end) noexcept nogil:
    """Give back the n tokens of the claim whose new TAT was `end`, only if no later claim has built
    on it (TAT still equals end): one CAS, otherwise nothing (x/time/rate's rule). Restores exactly the
    TAT that claim started from, so a refund never makes more available than was claimed."""
    return bt_cas(&g.tat, end, end - n * g.interval)


# ---- argument conversion shared by the rate-limiting modules (same messages as the twins) ----

cdef inline str _bt_show(object v):
    if type(v) is int and (v.bit_length() > 256):
        return f"an int of {v.bit_length()} bits"
    return repr(v)


cdef inline int64_t bt_as_i64(object v, str name) except? -1:
    """An int in the int64 range, else TypeError / ValueError naming `name` (never OverflowError)."""
    cdef int overflow = 0
    cdef long long x
    if type(v) is not int:
        if isinstance(v, bool) or not hasattr(type(v), "__index__"):
            raise TypeError(f"{name} must be an int (ns), got {v!r} ({type(v).__name__})")
        v = _bt_index(v)
    x = PyLong_AsLongLongAndOverflow(v, &overflow)
    if overflow:
        raise ValueError(f"{name} must be an int in the int64 range [-2**63, 2**63 - 1], got {_bt_show(v)}")
    return x

