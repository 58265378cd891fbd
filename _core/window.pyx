# cython: language_level=3, freethreading_compatible=True, boundscheck=False, wraparound=False, cdivision=True
"""Sliding windows of call outcomes (calls, failures, slow calls, failed-and-slow calls).

CountWindow: the last N recorded outcomes, exactly. TimeWindow: N buckets of `width_ns`, aligned to the
clock (bucket = now // width_ns); the window at `now` is buckets current-N+1 .. current.
Snapshots are (calls, failures, slow, failed_slow) tuples.
"""
from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free
from cpython.time cimport monotonic_ns
from bt_atomic cimport bt_load, bt_store
from bt_window cimport (cw_record, cw_field, cw_empty, CW_MAX_SIZE, tw_add, tw_read, TW_FIELDS)

from buttress._params import check_int, check_bool

__all__ = ["CountWindow", "TimeWindow", "COUNT_WINDOW_MAX"]

COUNT_WINDOW_MAX = CW_MAX_SIZE


cdef class CountWindow:
    cdef int64_t head
    cdef int64_t packed
    cdef int64_t *slots
    cdef readonly int64_t size

    def __cinit__(self, size):
        self.size = check_int("size", size, minimum=1, maximum=CW_MAX_SIZE)
        self.slots = <int64_t *>calloc(self.size, sizeof(int64_t))
        if self.slots == NULL:
            raise MemoryError()
        bt_store(&self.packed, cw_empty())

    def __dealloc__(self):
        free(self.slots)

    def record(self, bint failed, bint slow=False):
        """Record one outcome; the oldest drops out once N are recorded."""
        cw_record(&self.head, &self.packed, self.slots, self.size, failed, slow)

    def snapshot(self):
        """(calls, failures, slow, failed_slow) over the last min(N, recorded) outcomes."""
        cdef int64_t p = bt_load(&self.packed)
        return (cw_field(p, 0), cw_field(p, 16), cw_field(p, 32), cw_field(p, 48))

    @property
    def recorded(self):
        """Outcomes recorded since creation or reset."""
        return bt_load(&self.head)

    def reset(self):
        """Empty the window (not atomic with respect to concurrent records)."""
        cdef int64_t i
        for i in range(self.size):
            bt_store(&self.slots[i], 0)
        bt_store(&self.head, 0)
        bt_store(&self.packed, cw_empty())

    def __repr__(self):
        return f"CountWindow(size={self.size})"


cdef class TimeWindow:
    cdef int64_t *words         # nbuckets * TW_FIELDS words of (epoch:32 | count:32)
    cdef readonly int64_t nbuckets
    cdef readonly int64_t width_ns
    cdef object _clock_ns

    def __cinit__(self, nbuckets, width_ns=1_000_000_000, clock_ns=None):
        self.nbuckets = check_int("nbuckets", nbuckets, minimum=1, maximum=1 << 20)
        self.width_ns = check_int("width_ns", width_ns, minimum=1)
        if clock_ns is not None and not callable(clock_ns):
            raise TypeError(f"clock_ns must be a callable returning int ns or None, got {clock_ns!r}")
        self._clock_ns = clock_ns
        self.words = <int64_t *>calloc(self.nbuckets * TW_FIELDS, sizeof(int64_t))
        if self.words == NULL:
            raise MemoryError()
        self._clear()

    def __dealloc__(self):
        free(self.words)

    cdef void _clear(self) noexcept:
        # a word with count 0 is empty whatever epoch it holds
        cdef int64_t i
        for i in range(self.nbuckets * TW_FIELDS):
            bt_store(&self.words[i], 0)

    cdef inline int64_t _now(self, int64_t now) except? -1:
        if now >= 0:
            return now
        if self._clock_ns is None:
            return monotonic_ns()
        return self._clock_ns()

    def record(self, bint failed, bint slow=False, int64_t now=-1):
        """Record one outcome in the bucket of now."""
        cdef int64_t epoch = self._now(now) // self.width_ns
        cdef int64_t *b = &self.words[(epoch % self.nbuckets) * TW_FIELDS]
        tw_add(&b[0], epoch)
        if failed:
            tw_add(&b[1], epoch)
        if slow:
            tw_add(&b[2], epoch)
            if failed:
                tw_add(&b[3], epoch)

    def snapshot(self, int64_t now=-1):
        """(calls, failures, slow, failed_slow) in the buckets of (now - N*width, now]."""
        cdef int64_t epoch = self._now(now) // self.width_ns
        cdef int64_t i, j
        cdef int64_t t[4]
        t[0] = t[1] = t[2] = t[3] = 0
        for i in range(self.nbuckets):
            for j in range(TW_FIELDS):
                t[j] += tw_read(&self.words[i * TW_FIELDS + j], epoch, self.nbuckets)
        return (t[0], t[1], t[2], t[3])

    def reset(self):
        """Empty the window (not atomic with respect to concurrent records)."""
        self._clear()

    def __repr__(self):
        return f"TimeWindow(nbuckets={self.nbuckets}, width_ns={self.width_ns})"
