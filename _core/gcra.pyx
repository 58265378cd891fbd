# cython: language_level=3, freethreading_compatible=True, boundscheck=False, wraparound=False, cdivision=True
"""GCRA rate limiter core: one int64 theoretical-arrival-time word, one CAS per decision (bt_gcra.pxd),
plus two atomic decision counters, so the facade (buttress.TokenBucket) can hand out this object's bound
`try_acquire` as its own hot path and still report admitted / rejected.

Every method takes `now` in int ns (any int64; None, the default, reads the clock: the C monotonic
clock, same as time.monotonic_ns(), or `clock_ns()` when one was given). Time is kept relative to a
base and saturates ~73 years either side of it (DESIGN §3c): the base is `clock_ns()` read at creation
(any int64 reading: negative, epoch-based, near the int64 ends), or 0 for the C monotonic clock, whose
readings are uptime; 0 also makes answers to explicit `now=` the same here and in the twin.

Where the words live (DESIGN §5): by default in the object (`store=None`: process-local). Given `words`
(a writable, 8-byte aligned buffer of WORDS int64 words, e.g. a store binding's), the object decides with
the same CAS on those words, so every process that binds them shares one limit. The object registers with the store through `locker`
(`track_bound`), and `_close(message)` (the store closed in this process) makes every later decision and
state read raise RuntimeError(message). Layout:
    w[0] tat   w[1] interval   w[2] tau   w[3] base   w[4] admitted   w[5] rejected   w[6..7] 0
`init_words` writes it (once, by the store's creator, under the store's directory lock); the
constructor checks that interval and tau are this limiter's and takes the base from w[3], so every
process measures time from one base. `locker` is the twin's (it decides under that lock); the compiled
core ignores it.
"""
cimport cython
from libc.stdint cimport int64_t, INT64_MAX
from cpython.time cimport monotonic_ns
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_C_CONTIGUOUS
from bt_gcra cimport (gcra_t, gcra_init, gcra_rel, gcra_claim, gcra_wait, gcra_available, gcra_refund,
                      bt_as_i64, _bt_show, REL_MIN, TAT_MAX)
from bt_atomic cimport bt_load, bt_store, bt_fetch_add, bt_cas

from buttress._twin.gcra import words_view as _twin_words_view, track_bound as _track_bound  # cold path: one copy
from operator import index as _index

from buttress._params import emission_interval_ns, check_n

__all__ = ["GCRA", "WORDS"]

WORDS = 8           # int64 words of a GCRA in a store (see the module doc)


cdef int _check_words(object have_interval, object have_tau, object interval, object tau) except -1:
    if have_interval != interval or have_tau != tau:
        raise ValueError(f"words hold a GCRA with interval {have_interval} ns and tau {have_tau} ns, this one has "
                         f"interval {interval} ns and tau {tau} ns (words not written by GCRA.init_words for "
                         f"these settings)")
    return 0


cdef object bt_as_receipt(object v):
    if type(v) is not int:
        if isinstance(v, bool) or not hasattr(type(v), "__index__"):
            raise TypeError(f"receipt must be an int, got {v!r} ({type(v).__name__})")
        v = _index(v)
    return v


_N_MASK = (1 << 63) - 1

cdef str _UNINIT = "{} is not initialised: its __init__ never ran (a subclass must call super().__init__())"


@cython.auto_pickle(False)
cdef class GCRA:
    cdef gcra_t *gp            # -> own_ (process-local) or the words of a store
    cdef int64_t *cp           # -> counts_ or words 4..5: admitted, rejected (atomic)
    cdef gcra_t own_
    cdef int64_t counts_[2]
    cdef Py_buffer *buf        # a store's words (PyMem_Calloc'd: a Py_buffer member is traversed and cleared by
                               # the GC while exported; the export keeps its owner alive until __dealloc__)
    cdef bint has_buf
    cdef int64_t capacity_     # 0 until __init__ ran
    cdef int64_t nmax_         # capacity_ while the object decides; 0 before __init__ and after _close
                               # (atomic): the fast paths' range check on n is also their open check
    cdef int64_t closing_      # 1 once _close ran (atomic: one message, written once)
    cdef object closed_        # _close's message
    cdef double rate_
    cdef object _clock_ns
    cdef object locker_
    cdef object __weakref__    # a store keeps a weak set of the objects bound to its words

    def __cinit__(self):
        self.gp = &self.own_
        self.cp = self.counts_

    def __init__(self, rate, capacity, clock_ns=None, words=None, locker=None):
        if self.capacity_ != 0 or self.has_buf:
            raise RuntimeError(f"{type(self).__name__} is already initialised; create a new one instead")
        r, cap, interval = emission_interval_ns(rate, capacity)
        if clock_ns is not None and not callable(clock_ns):
            raise TypeError(f"clock_ns must be a callable returning int ns or None, got {clock_ns!r}")
        cdef int64_t base
        cdef int64_t *w
        if words is None:
            base = 0 if clock_ns is None else bt_as_i64(clock_ns(), "clock_ns()")   # see the module doc
            gcra_init(&self.own_, interval, cap, base)
        else:
            raw = _twin_words_view(words, WORDS)
            mv = raw.cast("q")
            _check_words(mv[1], mv[2], interval, interval * cap)
            if self.buf == NULL:
                self.buf = <Py_buffer *>PyMem_Calloc(1, sizeof(Py_buffer))
                if self.buf == NULL:
                    raise MemoryError()
            PyObject_GetBuffer(raw, self.buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)   # freed in __dealloc__ if it fails
            self.has_buf = True
            w = <int64_t *>self.buf.buf
            self.gp = <gcra_t *>w
            self.cp = w + 4
        self.rate_ = r
        self._clock_ns = clock_ns
        self.locker_ = locker
        self.capacity_ = cap           # last: a capacity > 0 says "initialised" to the fast path
        if not bt_load(&self.closing_):
            bt_store(&self.nmax_, cap)
        if words is not None:
            _track_bound(self, locker)        # the store can close it (cold path: the twin's)

    def __dealloc__(self):
        if self.has_buf:
            PyBuffer_Release(self.buf)
        PyMem_Free(self.buf)

    @staticmethod
    def init_words(words, rate, capacity, base_ns=0):
        """Write the words of a new shared GCRA (a full bucket; time measured from base_ns)."""
        r, cap, interval = emission_interval_ns(rate, capacity)
        cdef int64_t b = bt_as_i64(base_ns, "base_ns")
        mv = _twin_words_view(words, WORDS).cast("q")
        for i, v in enumerate((REL_MIN, interval, interval * cap, b, 0, 0, 0, 0)):
            mv[i] = v

    cdef int _ready(self) except -1:
        if self.capacity_ == 0:
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
    def rate(self):
        self._ready()
        return self.rate_

    @property
    def capacity(self):
        self._ready()
        return self.capacity_

    @property
    def interval_ns(self):
        self._ready()
        return self.gp.interval

    cdef inline int64_t _rel(self, object now) except? -1:
        """`now` (or a clock reading) -> time relative to the base, saturated."""
        if now is None:
            if self._clock_ns is None:
                return gcra_rel(self.gp, monotonic_ns())
            return gcra_rel(self.gp, bt_as_i64(self._clock_ns(), "clock_ns()"))
        return gcra_rel(self.gp, bt_as_i64(now, "now"))

    cdef inline int64_t _n(self, object n) except -1:
        cdef int overflow = 0
        cdef long long v
        if type(n) is int:
            v = PyLong_AsLongLongAndOverflow(n, &overflow)
            if overflow == 0 and 1 <= v <= bt_load(&self.nmax_):
                return v
        self._live()
        return check_n(n, self.capacity_)

    cdef inline int64_t _claim(self, int64_t n, object now, int64_t max_wait, int64_t *end) except -2:
        cdef int64_t w
        if now is None and self._clock_ns is None:
            w = gcra_claim(self.gp, n, 0, max_wait, True, end)      # clock read inside the CAS loop
        else:
            w = gcra_claim(self.gp, n, self._rel(now), max_wait, False, end)
        bt_fetch_add(self.cp if w >= 0 else self.cp + 1, 1)
        return w

    cdef int64_t _max_wait(self, object max_wait_ns) except -1:
        if max_wait_ns is None:
            return INT64_MAX
        cdef int64_t m = bt_as_i64(max_wait_ns, "max_wait_ns")
        if m < 0:
            raise ValueError(f"max_wait_ns must be >= 0 (or None for no limit), got {max_wait_ns!r}")
        return m

    def try_acquire(self, n=1, now=None):
        """Take n tokens if they are available now."""
        cdef int64_t end
        return self._claim(self._n(n), now, 0, &end) == 0

    def take(self, now=None):
        """try_acquire(1) that returns the claim's end (its new theoretical arrival time, an int) for
        untake(), or None when refused (nothing claimed): the cheap receipt of a facade that may have to
        give the token back (a sync form that got an async function)."""
        cdef int64_t end
        if bt_load(&self.nmax_) == 0:
            self._live()
        if self._claim(1, now, 0, &end) != 0:
            return None
        return end

    def untake(self, end):
        """Give back the token of the take() that returned `end`, only if no later claim has built on it
        (one CAS, as refund); returns whether it was given back. False once the store closed in this
        process (a call admitted before the close keeps its own result or exception)."""
        self._ready()
        cdef int64_t e = bt_as_i64(end, "end")
        if not REL_MIN + self.gp.interval <= e <= TAT_MAX:
            raise ValueError(f"end must be a value returned by take(), got {_bt_show(end)}")
        if bt_load(&self.nmax_) == 0:
            return False
        return gcra_refund(self.gp, 1, e)

    def reserve(self, n=1, now=None, max_wait_ns=None):
        """Claim n tokens now if the wait is <= max_wait_ns (None: any representable wait); return that
        wait in ns, or -1 (nothing claimed)."""
        cdef int64_t end
        cdef int64_t k = self._n(n)
        return self._claim(k, now, self._max_wait(max_wait_ns), &end)

    def claim(self, n=1, now=None, max_wait_ns=None):
        """reserve() that also returns a receipt for refund(): (wait_ns, receipt), or (-1, 0) when
        refused (nothing claimed). The receipt is an int: the claim's end (its new theoretical arrival
        time, absolute ns) times 2**63, plus n."""
        cdef int64_t end = 0
        cdef int64_t k = self._n(n)
        cdef int64_t w = self._claim(k, now, self._max_wait(max_wait_ns), &end)
        if w < 0:
            return -1, 0
        return w, ((<object>end + <object>self.gp.base) << 63) + k

    def wait_ns(self, n=1, now=None):
        """ns until n tokens would be available (0 = now); claims nothing."""
        cdef int64_t k = self._n(n)
        return gcra_wait(self.gp, k, self._rel(now))

    def available(self, now=None):
        """Whole tokens available at now."""
        self._live()
        return gcra_available(self.gp, self._rel(now))

    def refund(self, receipt):
        """Give back the tokens of the claim that returned `receipt`, only if no later claim has built on
        it (one CAS); returns whether they were given back. Never more than that claim took; use each
        receipt once. False once the store closed in this process (a call admitted before the close
        keeps its own result or exception: nothing is given back after the close)."""
        self._ready()
        r = bt_as_receipt(receipt)
        k = r & _N_MASK
        rel = (r >> 63) - <object>self.gp.base
        if not (1 <= k <= self.capacity_ and REL_MIN + k * self.gp.interval <= rel <= TAT_MAX):
            raise ValueError(f"receipt must be a receipt returned by claim(), got {_bt_show(receipt)}")
        if bt_load(&self.nmax_) == 0:
            return False
        return gcra_refund(self.gp, <int64_t>k, <int64_t>rel)

    def counts(self):
        """(admitted, rejected) decisions since creation or reset()."""
        self._live()
        return bt_load(self.cp), bt_load(self.cp + 1)

    def reset(self):
        """Full bucket, counters back to zero."""
        self._live()
        bt_store(&self.gp.tat, REL_MIN)
        bt_store(self.cp, 0)
        bt_store(self.cp + 1, 0)

    def __reduce__(self):
        raise TypeError(f"cannot pickle or copy {type(self).__name__} objects (they hold live limiter state)")

    def __repr__(self):
        if self.capacity_ == 0:
            return f"<{type(self).__name__} (not initialised)>"
        return f"GCRA(rate={self.rate_!r}, capacity={self.capacity_!r})"
