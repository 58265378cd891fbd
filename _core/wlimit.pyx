# cython: language_level=3, freethreading_compatible=True, boundscheck=False, wraparound=False, cdivision=True
"""Fixed / sliding window counter on ONE packed int64 word, decided by one CAS: rolling into a new
window and counting into it are the same compare-and-swap, so the word can live in a store (a
shared-memory segment) where every process decides on it lock-free.

Twin and spec: buttress._twin.wlimit (the word layout, the reading rules and the words are documented
there). Every mutable word goes through the atomics header.
"""
cimport cython
from libc.stdint cimport int64_t, uint64_t, INT64_MAX, INT64_MIN
from cpython.time cimport monotonic_ns
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_C_CONTIGUOUS
from bt_atomic cimport bt_load, bt_store, bt_cas, bt_fetch_add
from bt_gcra cimport bt_as_i64, _bt_show

from operator import index as _index

from buttress._twin.gcra import words_view as _words_view, track_bound as _track_bound
from buttress._twin.wlimit import _settings, _check_words, check_count as _check_count, window_wait as _window_wait

__all__ = ["WindowCounter", "WORDS", "MAX_LIMIT"]

WORDS = 8
MAX_LIMIT = (1 << 20) - 1

cdef extern from *:
    """
    /* a * b <= c * d for unsigned 64-bit values, exactly (128-bit products) */
    static inline int bt_mul_le(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
    #if defined(__SIZEOF_INT128__)
        return (unsigned __int128)a * b <= (unsigned __int128)c * d;
    #else
        uint64_t ah = a >> 32, al = a & 0xFFFFFFFFu, bh = b >> 32, bl = b & 0xFFFFFFFFu;
        uint64_t ch = c >> 32, cl = c & 0xFFFFFFFFu, dh = d >> 32, dl = d & 0xFFFFFFFFu;
        uint64_t x0 = al * bl, x1 = ah * bl, x2 = al * bh, x3 = ah * bh;
        uint64_t y0 = cl * dl, y1 = ch * dl, y2 = cl * dh, y3 = ch * dh;
        uint64_t xm = (x0 >> 32) + (x1 & 0xFFFFFFFFu) + (x2 & 0xFFFFFFFFu);
        uint64_t ym = (y0 >> 32) + (y1 & 0xFFFFFFFFu) + (y2 & 0xFFFFFFFFu);
        uint64_t xhi = x3 + (x1 >> 32) + (x2 >> 32) + (xm >> 32), xlo = (xm << 32) | (x0 & 0xFFFFFFFFu);
        uint64_t yhi = y3 + (y1 >> 32) + (y2 >> 32) + (ym >> 32), ylo = (ym << 32) | (y0 & 0xFFFFFFFFu);
        return xhi < yhi || (xhi == yhi && xlo <= ylo);
    #endif
    }
    """
    bint bt_mul_le(uint64_t a, uint64_t b, uint64_t c, uint64_t d) noexcept nogil

cdef int64_t M20 = (1 << 20) - 1
cdef int64_t M23 = (1 << 23) - 1
cdef int64_t M38 = ((<int64_t>1) << 38) - 1
cdef enum:
    W_WORD = 0
    W_ADMITTED = 4
    W_REJECTED = 5
    W_GEN = 6
    W_LATEST = 7        # the latest window any decision used (see the twin's module doc)

cdef str _UNINIT = "{} is not initialised: its __init__ never ran (a subclass must call super().__init__())"


cdef inline int64_t pack(int64_t idx, int64_t prev, int64_t curr) noexcept nogil:
    return <int64_t>((<uint64_t>1 << 63) | (<uint64_t>(idx & M23) << 40) | (<uint64_t>prev << 20) | <uint64_t>curr)


cdef inline void view(int64_t word, int64_t cur, int64_t latest, int64_t *idx, int64_t *prev,
                      int64_t *curr) noexcept nogil:
    """The word as a decision in window `cur` sees it, given `latest` read after the word (the twin's
    view: the word's window is the latest one <= latest that is idx modulo 2**23; cur >= latest)."""
    cdef int64_t c = cur & M23, i
    cdef uint64_t behind, d
    idx[0] = c
    prev[0] = 0
    curr[0] = 0
    if word >= 0:                   # never counted into
        return
    i = (word >> 40) & M23
    behind = <uint64_t>cur - <uint64_t>latest          # cur >= latest: exact, no overflow
    if behind >= 2:
        return
    d = behind + ((<uint64_t>latest - <uint64_t>i) & <uint64_t>M23)
    if d == 0:
        idx[0] = i
        prev[0] = (word >> 20) & M20
        curr[0] = word & M20
    elif d == 1:
        prev[0] = word & M20


cdef inline int64_t floor_div(int64_t a, int64_t b, int64_t *rem) noexcept nogil:
    cdef int64_t q = a // b, r = a % b      # C truncates towards zero (cdivision)
    if r < 0:
        q -= 1
        r += b
    rem[0] = r
    return q


cdef inline int64_t moment(int64_t t, int64_t width, int64_t latest, int64_t *e) noexcept nogil:
    """The window of a decision at reading t (and *e, ns into it): a reading older than latest's window
    decides at the start of latest's window."""
    cdef int64_t cur = floor_div(t, width, e)
    if cur < latest:
        e[0] = 0
        return latest
    return cur


@cython.auto_pickle(False)
cdef class WindowCounter:
    cdef int64_t *w            # -> own_ or a store's words
    cdef int64_t own_[8]
    cdef Py_buffer *buf        # a store's words (PyMem_Calloc'd: a Py_buffer member is traversed and cleared by
                               # the GC while exported; the export keeps its owner alive until __dealloc__)
    cdef bint has_buf
    cdef int64_t limit_        # 0 until __init__ ran
    cdef int64_t nmax_         # limit_ while the object decides; 0 before __init__ and after _close
                               # (atomic): the fast path's range check on n is also its open check
    cdef int64_t closing_      # 1 once _close ran (atomic: one message, written once)
    cdef object closed_        # _close's message
    cdef int64_t width
    cdef bint sliding_
    cdef object _clock_ns
    cdef object locker_
    cdef object __weakref__    # a store keeps a weak set of the objects bound to its words

    def __cinit__(self):
        self.w = self.own_

    def __init__(self, limit, window_ns, sliding, clock_ns=None, words=None, locker=None):
        if self.limit_ != 0 or self.has_buf:
            raise RuntimeError(f"{type(self).__name__} is already initialised; create a new one instead")
        lim, width, sl = _settings(limit, window_ns, sliding)
        if clock_ns is not None and not callable(clock_ns):
            raise TypeError(f"clock_ns must be a callable returning int ns or None, got {clock_ns!r}")
        if words is None:
            self.own_[1], self.own_[2], self.own_[3], self.own_[7] = width, lim, int(sl), INT64_MIN
        else:
            raw = _words_view(words, WORDS, "a window counter")
            _check_words(raw.cast("q"), lim, width, sl)
            if self.buf == NULL:
                self.buf = <Py_buffer *>PyMem_Calloc(1, sizeof(Py_buffer))
                if self.buf == NULL:
                    raise MemoryError()
            PyObject_GetBuffer(raw, self.buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)   # freed in __dealloc__ if it fails
            self.has_buf = True
            self.w = <int64_t *>self.buf.buf
        self.width = width
        self.sliding_ = sl
        self._clock_ns = clock_ns
        self.locker_ = locker
        self.limit_ = lim              # last: a limit > 0 says "initialised"
        if not bt_load(&self.closing_):
            bt_store(&self.nmax_, lim)
        if words is not None:
            _track_bound(self, locker)        # the store can close it (cold path: the twin's)

    def __dealloc__(self):
        if self.has_buf:
            PyBuffer_Release(self.buf)
        PyMem_Free(self.buf)

    @staticmethod
    def init_words(words, limit, window_ns, sliding):
        """Write the words of a new shared counter (every window empty)."""
        lim, width, sl = _settings(limit, window_ns, sliding)
        mv = _words_view(words, WORDS, "a window counter").cast("q")
        for i, v in enumerate((0, width, lim, int(sl), 0, 0, 0, -(1 << 63))):
            mv[i] = v

    cdef int _ready(self) except -1:
        if self.limit_ == 0:
            raise RuntimeError(_UNINIT.format(type(self).__name__))
        return 0

    cdef int _live(self) except -1:
        """Initialised and not closed: every decision and every read of the words checks it."""
        if bt_load(&self.nmax_) == 0:
            self._ready()
            raise RuntimeError(self.closed_)
        return 0

    def _close(self, message):
        """The store holding its words closed in this process (or a forked child got no lease): every
        later decision and state read raises RuntimeError(message). The words stay referenced until the
        object goes (a decision racing this call on another thread may still be reading them)."""
        msg = str(message)
        if bt_cas(&self.closing_, 0, 1):
            self.closed_ = msg                 # before nmax_: a reader that sees 0 sees the message
            bt_store(&self.nmax_, 0)

    @property
    def limit(self):
        self._ready()
        return self.limit_

    @property
    def window_ns(self):
        self._ready()
        return self.width

    @property
    def sliding(self):
        self._ready()
        return self.sliding_

    cdef inline int64_t _n(self, object n) except -1:
        cdef int overflow = 0
        cdef long long v
        if type(n) is int:
            v = PyLong_AsLongLongAndOverflow(n, &overflow)
            if overflow == 0 and 1 <= v <= bt_load(&self.nmax_):
                return v
        self._live()
        return _check_count(n, self.limit_)

    cdef inline int64_t _now(self, object now) except? -1:
        if now is None:
            if self._clock_ns is None:
                return monotonic_ns()
            return bt_as_i64(self._clock_ns(), "clock_ns()")
        return bt_as_i64(now, "now")

    cdef inline bint _fits(self, int64_t prev, int64_t curr, int64_t n, int64_t e) noexcept nogil:
        cdef int64_t room = self.limit_ - curr - n
        if room < 0:
            return False
        if not self.sliding_ or prev == 0:
            return True
        return bt_mul_le(<uint64_t>prev, <uint64_t>(self.width - e), <uint64_t>room, <uint64_t>self.width)

    def claim(self, n=1, now=None):
        """Count n in the current window if the limit allows it now: a receipt for unclaim() (an int > 0),
        or 0 when refused (nothing counted)."""
        cdef int64_t k = self._n(n)
        cdef int64_t t, cur, e, old, latest, idx, prev, curr
        cdef bint live = now is None and self._clock_ns is None
        if not live:
            t = self._now(now)
        while True:
            old = bt_load(self.w + W_WORD)
            latest = bt_load(self.w + W_LATEST)     # after the word: a writer raised it before its CAS
            if live:
                t = monotonic_ns()       # read inside the decision, after the word
            cur = moment(t, self.width, latest, &e)
            if cur > latest and not bt_cas(self.w + W_LATEST, latest, cur):
                continue                 # another decision moved latest: look again
            view(old, cur, latest, &idx, &prev, &curr)
            if not self._fits(prev, curr, k, e):
                bt_fetch_add(self.w + W_REJECTED, 1)
                return 0
            if bt_cas(self.w + W_WORD, old, pack(idx, prev, curr + k)):
                bt_fetch_add(self.w + W_ADMITTED, 1)
                return ((bt_load(self.w + W_GEN) & M38) << 24) | (idx << 1) | 1

    def try_acquire(self, n=1, now=None):
        """Count n in the current window if the limit allows it now."""
        return self.claim(n, now) != 0

    def unclaim(self, n, receipt):
        """Take back the n counted by the claim that returned `receipt`, while its window is still the
        current or the previous one and no reset() came between; returns whether it was taken back. False once the store closed in this process (a call admitted before
        the close keeps its own result or exception: nothing is given back after the close)."""
        self._ready()
        cdef int64_t k = _check_count(n, self.limit_)
        if type(receipt) is not int:
            if isinstance(receipt, bool) or not hasattr(type(receipt), "__index__"):
                raise TypeError(f"receipt must be an int, got {receipt!r} ({type(receipt).__name__})")
            receipt = _index(receipt)
        if receipt <= 0 or not receipt & 1 or receipt >> 63:
            raise ValueError(f"receipt must be a receipt returned by claim(), got {_bt_show(receipt)}")
        cdef int64_t r = receipt
        cdef int64_t ridx = (r >> 1) & M23, gen = r >> 24
        cdef int64_t old, idx, prev, curr, new
        if bt_load(&self.nmax_) == 0:
            return False
        while True:
            if gen != (bt_load(self.w + W_GEN) & M38):
                return False
            old = bt_load(self.w + W_WORD)
            if old >= 0:
                return False
            idx = (old >> 40) & M23
            prev = (old >> 20) & M20
            curr = old & M20
            if idx == ridx and curr >= k:
                new = pack(idx, prev, curr - k)
            elif ((idx - ridx) & M23) == 1 and prev >= k:
                new = pack(idx, prev - k, curr)
            else:
                return False
            if bt_cas(self.w + W_WORD, old, new):
                return True

    def wait_ns(self, n=1, now=None):
        """ns until n would be admitted (0 = now); claims nothing."""
        self._live()
        cdef int64_t k = self._n(n)
        cdef int64_t e, idx, prev, curr
        cdef int64_t old = bt_load(self.w + W_WORD)
        cdef int64_t latest = bt_load(self.w + W_LATEST)
        cdef int64_t cur = moment(self._now(now), self.width, latest, &e)
        view(old, cur, latest, &idx, &prev, &curr)
        return _window_wait(self.sliding_, self.limit_, self.width, prev, curr, k, e)

    def counts(self):
        """(admitted, rejected) decisions since creation or reset()."""
        self._live()
        return bt_load(self.w + W_ADMITTED), bt_load(self.w + W_REJECTED)

    def reset(self):
        """Every window empty, counters back to zero; receipts of earlier claims are void."""
        self._live()
        bt_fetch_add(self.w + W_GEN, 1)
        bt_store(self.w + W_WORD, 0)
        bt_store(self.w + W_ADMITTED, 0)
        bt_store(self.w + W_REJECTED, 0)

    def __reduce__(self):
        raise TypeError(f"cannot pickle or copy {type(self).__name__} objects (they hold live limiter state)")

    def __repr__(self):
        if self.limit_ == 0:
            return f"<{type(self).__name__} (not initialised)>"
        return f"WindowCounter(limit={self.limit_!r}, window_ns={self.width!r}, sliding={self.sliding_!r})"
