# cython: language_level=3, freethreading_compatible=True, boundscheck=False, wraparound=False, cdivision=True
"""Sliding windows of call outcomes (calls, failures, slow calls, failed-and-slow calls).

CountWindow: the last N recorded outcomes, exactly. TimeWindow: N buckets of `width_ns`, aligned to the
clock (bucket = floor(now / width_ns)); the window at `now` is buckets current-N+1 .. current.
Snapshots are (calls, failures, slow, failed_slow) tuples. Times are int ns: any int64 (None reads the
clock); epochs are exact for width_ns >= 2**28, otherwise they saturate 2**62 ns (146 years) either side
of the first reading (less below 2**15 ns; see bt_window.pxd).
"""
cimport cython
from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free
from cpython.time cimport monotonic_ns
from bt_atomic cimport bt_load, bt_store
from bt_window cimport (cw_record, cw_field, cw_empty, CW_MAX_SIZE, tw_add, tw_read_bucket, tw_epoch,
                        tw_cbits, bt_floormod, TW_FIELDS, TW_EXACT_WIDTH, TW_NO_BASE)
from bt_gcra cimport bt_as_i64

from buttress._params import check_int, check_bool

__all__ = ["CountWindow", "TimeWindow", "COUNT_WINDOW_MAX"]

COUNT_WINDOW_MAX = CW_MAX_SIZE

cdef str _UNINIT = "{} is not initialised: its __init__ never ran (a subclass must call super().__init__())"


@cython.auto_pickle(False)
cdef class CountWindow:
    cdef int64_t head
    cdef int64_t packed
    cdef int64_t *slots
    cdef int64_t size_

    def __init__(self, size):
        if self.slots != NULL:
            raise RuntimeError(f"{type(self).__name__} is already initialised; create a new one instead")
        cdef int64_t n = check_int("size", size, minimum=1, maximum=CW_MAX_SIZE)
        cdef int64_t *slots = <int64_t *>calloc(n, sizeof(int64_t))
        if slots == NULL:
            raise MemoryError()
        bt_store(&self.packed, cw_empty())
        self.size_ = n
        self.slots = slots               # last: a non-NULL ring says "initialised"

    def __dealloc__(self):
        free(self.slots)

    cdef int _ready(self) except -1:
        if self.slots == NULL:
            raise RuntimeError(_UNINIT.format(type(self).__name__))
        return 0

    @property
    def size(self):
        self._ready()
        return self.size_

    def record(self, failed, slow=False):
        """Record one outcome; the oldest drops out once N are recorded."""
        self._ready()
        cw_record(&self.head, &self.packed, self.slots, self.size_, bool(failed), bool(slow))

    def snapshot(self):
        """(calls, failures, slow, failed_slow) over the last min(N, recorded) outcomes."""
        self._ready()
        cdef int64_t p = bt_load(&self.packed)
        return (cw_field(p, 0), cw_field(p, 16), cw_field(p, 32), cw_field(p, 48))

    @property
    def recorded(self):
        """Outcomes recorded since creation or reset."""
        self._ready()
        return bt_load(&self.head)

    def reset(self):
        """Empty the window (not atomic with respect to concurrent records)."""
        self._ready()
        cdef int64_t i
        for i in range(self.size_):
            bt_store(&self.slots[i], 0)
        bt_store(&self.head, 0)
        bt_store(&self.packed, cw_empty())

    def __repr__(self):
        if self.slots == NULL:
            return f"<{type(self).__name__} (not initialised)>"
        return f"CountWindow(size={self.size_})"


@cython.auto_pickle(False)
cdef class TimeWindow:
    cdef int64_t *words         # nbuckets * TW_FIELDS words of (epoch | count)
    cdef int64_t nbuckets_
    cdef int64_t width_ns_
    cdef int64_t base_epoch     # epochs are stored relative to this (0 when every reading is exact)
    cdef int cbits              # count bits of a word (bt_window.pxd)
    cdef object _clock_ns

    def __init__(self, nbuckets, width_ns=1_000_000_000, clock_ns=None):
        if self.words != NULL:
            raise RuntimeError(f"{type(self).__name__} is already initialised; create a new one instead")
        cdef int64_t n = check_int("nbuckets", nbuckets, minimum=1, maximum=1 << 20)
        cdef int64_t w = check_int("width_ns", width_ns, minimum=1)
        if clock_ns is not None and not callable(clock_ns):
            raise TypeError(f"clock_ns must be a callable returning int ns or None, got {clock_ns!r}")
        cdef int64_t *words = <int64_t *>calloc(n * TW_FIELDS, sizeof(int64_t))
        if words == NULL:
            raise MemoryError()
        self.nbuckets_, self.width_ns_ = n, w
        self.base_epoch = 0 if w >= TW_EXACT_WIDTH else TW_NO_BASE     # else: the first reading's epoch
        self.cbits = tw_cbits(w)
        self._clock_ns = clock_ns
        self.words = words               # last: non-NULL words say "initialised"

    def __dealloc__(self):
        free(self.words)

    cdef int _ready(self) except -1:
        if self.words == NULL:
            raise RuntimeError(_UNINIT.format(type(self).__name__))
        return 0

    @property
    def nbuckets(self):
        self._ready()
        return self.nbuckets_

    @property
    def width_ns(self):
        self._ready()
        return self.width_ns_

    cdef int64_t _epoch(self, object now) except? -1:
        cdef int64_t t
        if now is not None:
            t = bt_as_i64(now, "now")
        elif self._clock_ns is None:
            t = monotonic_ns()
        else:
            t = bt_as_i64(self._clock_ns(), "clock_ns()")
        return tw_epoch(t, self.width_ns_, &self.base_epoch, self.cbits)

    def record(self, failed, slow=False, now=None):
        """Record one outcome in the bucket of now."""
        self._ready()
        cdef bint f = bool(failed), s = bool(slow)
        cdef int64_t epoch = self._epoch(now)
        cdef int64_t *b = &self.words[bt_floormod(epoch, self.nbuckets_) * TW_FIELDS]
        epoch = tw_add(&b[0], epoch, self.cbits)   # a late writer counts every field into the newer epoch
        if f:
            tw_add(&b[1], epoch, self.cbits)
        if s:
            tw_add(&b[2], epoch, self.cbits)
            if f:
                tw_add(&b[3], epoch, self.cbits)

    def snapshot(self, now=None):
        """(calls, failures, slow, failed_slow) in the buckets of (now - N*width, now]."""
        self._ready()
        cdef int64_t epoch = self._epoch(now)
        cdef int64_t i
        cdef int64_t t[4]
        t[0] = t[1] = t[2] = t[3] = 0
        for i in range(self.nbuckets_):
            tw_read_bucket(&self.words[i * TW_FIELDS], TW_FIELDS, epoch, self.nbuckets_, self.cbits, t)
        return (t[0], t[1], t[2], t[3])

    def reset(self):
        """Empty the window (not atomic with respect to concurrent records)."""
        self._ready()
        cdef int64_t i
        for i in range(self.nbuckets_ * TW_FIELDS):
            bt_store(&self.words[i], 0)

    def __repr__(self):
        if self.words == NULL:
            return f"<{type(self).__name__} (not initialised)>"
        return f"TimeWindow(nbuckets={self.nbuckets_}, width_ns={self.width_ns_})"
