# Sliding windows of call outcomes. Header-only; cimported by absolute name.
#
# Count window: a ring of N outcome codes plus ONE packed word of four biased 16-bit counters
# (calls, failures, slow, failed-and-slow). A record swaps its code into the ring and adds
# (new - old) to the packed word in one fetch-add, so the totals always equal the ring's content
# once concurrent records land, and a snapshot is one atomic load. The bias (2**15) keeps a field
# that is transiently negative under lapping writers from borrowing from its neighbour.
#
# Time window: N buckets of W ns; each counter is one word packing (epoch, count), so resetting a stale
# bucket and counting into it is the same compare-and-swap: no count is lost at a boundary.
#
# Why a relative, saturating epoch and not (epoch:32, count:32) modulo 2**32: a modular epoch compares
# "older / newer" by the sign of a 32-bit difference, so a bucket idle for 2**31 widths (36 min at 1 us,
# 25 days at 60 ms) looked newer than the present and swallowed new records. The epoch field now holds
# floor(now / width) - base, clamped, and comparisons are plain integer comparisons: exact, never
# modular; out of range it saturates (DESIGN 3c: saturate, never wrap). The other choice, a full 64-bit
# epoch beside each count, needs a two-word CAS or a reset that can lose a concurrent count. Field
# widths depend on the bucket width (see tw_cbits below).
#
# Window guard (the breaker's windows): one word (tag:43 | writers in flight:20). A record enters only
# while the window carries its generation's tag, so a result of an older generation can never land in
# the window of a newer one; a transition closes the guard (waits for the few atomics of writers already
# inside), clears the window, and opens it with the new generation's tag before publishing the state.
cimport cython
from libc.stdint cimport int64_t, uint64_t, INT64_MAX, INT64_MIN
from bt_atomic cimport bt_load, bt_cas, bt_fetch_add, bt_exchange, bt_store

cdef enum:
    CW_BIAS = 0x8000
    CW_MAX_SIZE = 30000

cdef inline int64_t cw_code(bint failed, bint slow) noexcept nogil:
    return 1 | (failed << 1) | (slow << 2)

cdef inline int64_t cw_delta(int64_t code) noexcept nogil:
    cdef uint64_t d
    if code == 0:
        return 0
    d = 1
    if code & 2:
        d |= (<uint64_t>1) << 16
    if code & 4:
        d |= (<uint64_t>1) << 32
    if (code & 6) == 6:
        d |= (<uint64_t>1) << 48
    return <int64_t>d

cdef inline int64_t cw_empty() noexcept nogil:
    cdef uint64_t b = CW_BIAS
    return <int64_t>(b | (b << 16) | (b << 32) | (b << 48))

cdef inline void cw_record(int64_t *head, int64_t *packed, int64_t *slots, int64_t size,
                           bint failed, bint slow) noexcept nogil:
    cdef int64_t code = cw_code(failed, slow)
    cdef int64_t seq = bt_fetch_add(head, 1)
    cdef int64_t old = bt_exchange(&slots[seq % size], code)
    bt_fetch_add(packed, <int64_t>(<uint64_t>cw_delta(code) - <uint64_t>cw_delta(old)))

cdef inline int64_t cw_field(int64_t packed, int shift) noexcept nogil:
    cdef int64_t v = <int64_t>(((<uint64_t>packed) >> shift) & 0xFFFF) - CW_BIAS
    return v if v > 0 else 0

# ---- integer helpers correct over the whole int64 domain (C `/` and `%` truncate toward zero) ----

@cython.cdivision(True)
cdef inline int64_t bt_floordiv(int64_t a, int64_t d) noexcept nogil:
    """floor(a / d) for d > 0 (never overflows)."""
    cdef int64_t q = a / d
    if (a % d) < 0:
        q -= 1
    return q


@cython.cdivision(True)
cdef inline int64_t bt_floormod(int64_t a, int64_t d) noexcept nogil:
    """a mod d in [0, d) for d > 0."""
    cdef int64_t r = a % d
    if r < 0:
        r += d
    return r


cdef inline int64_t bt_sat_add(int64_t a, int64_t b) noexcept nogil:
    """a + b saturated to the int64 range."""
    if b > 0 and a > INT64_MAX - b:
        return INT64_MAX
    if b < 0 and a < INT64_MIN - b:
        return INT64_MIN
    return a + b


cdef inline int64_t bt_sat_sub(int64_t a, int64_t b) noexcept nogil:
    """a - b saturated to the int64 range."""
    if b < 0 and a > INT64_MAX + b:
        return INT64_MAX
    if b > 0 and a < INT64_MIN + b:
        return INT64_MIN
    return a - b


# ---- time window words ----
#
# A word is (epoch:64-K | count:K); K = clamp(bit_length(width_ns), 16, 28): narrow buckets hold few
# records and get a wide epoch field. Epochs are relative to a base epoch, biased to be unsigned,
# compared exactly, and clamped (saturated) to +-(2**(63-K) - 1) around the base: 2**62 ns (146 years)
# either side for every width >= 2**15 ns (39 hours at width 1 ns). The base is 0 for width >= 2**28 ns
# (every int64 reading then has its exact epoch: the breaker's 1 s buckets), otherwise the epoch of the
# first reading the window sees (so explicit `now=` values and the clock give the same answers).

cdef enum:
    TW_FIELDS = 4        # calls, failures, slow, failed-and-slow

cdef extern from *:
    """
    #define BT_TW_EXACT_WIDTH ((int64_t)(1LL << 28))
    #define BT_TW_NO_BASE INT64_MIN
    """
    const int64_t TW_EXACT_WIDTH "BT_TW_EXACT_WIDTH"
    const int64_t TW_NO_BASE "BT_TW_NO_BASE"


cdef inline int tw_cbits(int64_t width) noexcept nogil:
    """K, the count bits of a word for buckets `width` ns wide."""
    cdef int k = 0
    while k < 63 and (width >> k) != 0:
        k += 1
    return 16 if k < 16 else (28 if k > 28 else k)


cdef inline int64_t tw_epoch(int64_t now, int64_t width, int64_t *base, int cbits) noexcept nogil:
    """The epoch of now relative to *base (set from this reading when still TW_NO_BASE), clamped."""
    cdef int64_t q = bt_floordiv(now, width), b = bt_load(base), emax
    if b == TW_NO_BASE:
        bt_cas(base, TW_NO_BASE, q)
        b = bt_load(base)
    q = bt_sat_sub(q, b)
    emax = ((<int64_t>1) << (63 - cbits)) - 1
    if q > emax:
        return emax
    if q < -emax:
        return -emax
    return q


cdef inline int64_t tw_add(int64_t *word, int64_t epoch, int cbits) noexcept nogil:
    """Count one into a bucket word at epoch (relative, clamped), resetting it first when it holds an
    older epoch; a late writer (the word holds a newer epoch) counts into the newer one. Returns the
    epoch counted into. The count saturates at 2**K - 1."""
    cdef int64_t old, new, count, cmax = ((<int64_t>1) << cbits) - 1
    cdef uint64_t u = <uint64_t>(epoch + ((<int64_t>1) << (63 - cbits))), uo
    while True:
        old = bt_load(word)
        count = old & cmax
        uo = (<uint64_t>old) >> cbits
        if count == 0 or uo < u:
            new = <int64_t>((u << cbits) | 1)        # empty or older: reset and count, one CAS
            uo = u
        elif count == cmax:
            return <int64_t>uo - ((<int64_t>1) << (63 - cbits))
        else:
            new = old + 1
        if bt_cas(word, old, new):
            return <int64_t>uo - ((<int64_t>1) << (63 - cbits))


cdef inline int64_t tw_read(int64_t *word, int64_t epoch, int64_t nbuckets, int cbits) noexcept nogil:
    """The count of a bucket word if its epoch lies in (epoch - nbuckets, epoch], else 0."""
    cdef int64_t w = bt_load(word)
    cdef int64_t count = w & (((<int64_t>1) << cbits) - 1)
    cdef uint64_t u = <uint64_t>(epoch + ((<int64_t>1) << (63 - cbits))), uo = (<uint64_t>w) >> cbits
    if count != 0 and uo <= u and uo + <uint64_t>nbuckets > u:
        return count
    return 0


cdef inline void tw_read_bucket(int64_t *b, int nfields, int64_t epoch, int64_t nbuckets, int cbits,
                                int64_t *out) noexcept nogil:
    """Add one bucket's counts (nfields words, the calls word first) to out[0 .. nfields) if the bucket's
    epoch lies in (epoch - nbuckets, epoch]. The calls word holds the bucket's epoch: another field counts
    only while it holds that same epoch (a field no record touched since the bucket moved on still holds
    an older epoch's count, which a reader whose clock went back would otherwise see)."""
    cdef int64_t w0 = bt_load(&b[0]), w, cmask = ((<int64_t>1) << cbits) - 1
    cdef int64_t count = w0 & cmask
    cdef uint64_t u = <uint64_t>(epoch + ((<int64_t>1) << (63 - cbits))), uo = (<uint64_t>w0) >> cbits
    cdef int j
    if count == 0 or not (uo <= u and uo + <uint64_t>nbuckets > u):
        return
    out[0] += count
    for j in range(1, nfields):
        w = bt_load(&b[j])
        if ((<uint64_t>w) >> cbits) == uo:
            out[j] += w & cmask


# ---- window guard: (tag:43 | writers in flight:20) ----

cdef enum:
    WG_SHIFT = 20

cdef extern from *:
    """
    #define BT_WG_WRITERS ((int64_t)0xFFFFF)
    #define BT_WG_CLOSED ((int64_t)((1LL << 43) - 1))
    """
    const int64_t WG_WRITERS "BT_WG_WRITERS"
    const int64_t WG_CLOSED "BT_WG_CLOSED"


cdef inline bint wg_enter(int64_t *g, int64_t tag) noexcept nogil:
    """Enter the window if it carries `tag`; False (nothing entered) otherwise."""
    cdef int64_t w
    while True:
        w = bt_load(g)
        if (w >> WG_SHIFT) != tag or (w & WG_WRITERS) == WG_WRITERS:
            return False
        if bt_cas(g, w, w + 1):
            return True


cdef inline void wg_exit(int64_t *g) noexcept nogil:
    bt_fetch_add(g, -1)


cdef inline void wg_exit_tagged(int64_t *g, int64_t tag) noexcept nogil:
    """wg_exit for a guard that may have been closed by force (shared words, wg_close with a stall bound):
    leave only while the guard still carries `tag` and counts a writer; otherwise there is nothing to leave
    (a forced close dropped us from the count) and the word belongs to a later generation."""
    cdef int64_t w
    while True:
        w = bt_load(g)
        if (w >> WG_SHIFT) != tag or (w & WG_WRITERS) == 0:
            return
        if bt_cas(g, w, w - 1):
            return


cdef extern from "<time.h>" nogil:
    ctypedef struct bt_timespec "struct timespec":
        long tv_sec
        long tv_nsec
    int bt_clock_gettime "clock_gettime"(int clk, bt_timespec *ts)
    int BT_CLOCK_MONOTONIC "CLOCK_MONOTONIC"

cdef extern from "<sched.h>" nogil:
    int bt_sched_yield "sched_yield"()


cdef inline int64_t bt_mono_ns() noexcept nogil:
    cdef bt_timespec ts
    bt_clock_gettime(BT_CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline void wg_close(int64_t *g, int64_t stall_ns) noexcept nogil:
    """Refuse new writers, then wait for those inside (a few atomics each, no Python, no waiting).
    stall_ns > 0 (words shared between processes): a writer still inside after stall_ns was killed there
    (SIGKILL can land between its enter and exit): close anyway, so a dead process never blocks a
    transition; its count is dropped and a late live writer leaves with wg_exit_tagged."""
    cdef int64_t w, spins = 0, t0 = 0
    while True:
        w = bt_load(g)
        if (w & WG_WRITERS) != 0:
            if stall_ns > 0:
                spins += 1
                if (spins & 1023) == 0:
                    if t0 == 0:
                        t0 = bt_mono_ns()
                    elif bt_mono_ns() - t0 >= stall_ns:
                        if bt_cas(g, w, WG_CLOSED << WG_SHIFT):
                            return
                    bt_sched_yield()
            continue
        if bt_cas(g, w, WG_CLOSED << WG_SHIFT):
            return


cdef inline void wg_open(int64_t *g, int64_t tag) noexcept nogil:
    bt_store(g, tag << WG_SHIFT)
