# Sliding windows of call outcomes. Header-only; cimported by absolute name.
#
# Count window: a ring of N outcome codes plus ONE packed word of four biased 16-bit counters
# (calls, failures, slow, failed-and-slow). A record swaps its code into the ring and adds
# (new - old) to the packed word in one fetch-add, so the totals always equal the ring's content
# once concurrent records land, and a snapshot is one atomic load. The bias (2**15) keeps a field
# that is transiently negative under lapping writers from borrowing from its neighbour.
#
# Time window: N buckets of W ns; each counter is one word packing (epoch:32, count:32), so resetting
# a stale bucket and counting into it is the same compare-and-swap: no count is lost at a boundary.
from libc.stdint cimport int64_t, uint64_t
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

cdef enum:
    TW_FIELDS = 4        # calls, failures, slow, failed-and-slow

cdef inline int64_t tw_pack(int64_t epoch, int64_t count) noexcept nogil:
    return <int64_t>(((<uint64_t>epoch & 0xFFFFFFFFULL) << 32) | (<uint64_t>count & 0xFFFFFFFFULL))

cdef inline void tw_add(int64_t *word, int64_t epoch) noexcept nogil:
    """Count one into a bucket word at epoch, resetting it first when it holds an older epoch."""
    cdef int64_t old, new, count
    cdef uint64_t diff
    while True:
        old = bt_load(word)
        diff = ((<uint64_t>epoch) - ((<uint64_t>old) >> 32)) & 0xFFFFFFFFULL
        count = old & 0xFFFFFFFFLL
        if count == 0:
            new = tw_pack(epoch, 1)     # an empty word: whatever epoch it holds, claim it
        elif diff == 0 or diff >= 0x80000000ULL:
            # current epoch, or a newer one (a late writer): count into it, saturating
            if count == 0xFFFFFFFFLL:
                return
            new = old + 1
        else:                           # an older epoch: reset and count, one CAS
            new = tw_pack(epoch, 1)
        if bt_cas(word, old, new):
            return

cdef inline int64_t tw_read(int64_t *word, int64_t epoch, int64_t nbuckets) noexcept nogil:
    """The count of a bucket word if its epoch lies in (epoch - nbuckets, epoch], else 0."""
    cdef int64_t w = bt_load(word)
    cdef uint64_t diff = ((<uint64_t>epoch) - ((<uint64_t>w) >> 32)) & 0xFFFFFFFFULL
    if diff < <uint64_t>nbuckets:
        return w & 0xFFFFFFFFLL
    return 0
