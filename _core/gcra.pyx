# cython: language_level=3, freethreading_compatible=True, boundscheck=False, wraparound=False, cdivision=True
"""GCRA rate limiter core: one int64 theoretical-arrival-time word, one CAS per decision (bt_gcra.pxd),
plus two atomic decision counters, so the facade (buttress.TokenBucket) can hand out this object's bound
`try_acquire` as its own hot path and still report admitted / rejected.

Every method takes `now` in int ns (any int64; None, the default, reads the clock: the C monotonic
clock, same as time.monotonic_ns(), or `clock_ns()` when one was given). Time is kept relative to a
base and saturates ~73 years either side of it (DESIGN §3c): the base is `clock_ns()` read at creation
(any int64 reading: negative, epoch-based, near the int64 ends), or 0 for the C monotonic clock, whose
readings are uptime; 0 also makes answers to explicit `now=` the same here and in the twin.
"""
cimport cython
from libc.stdint cimport int64_t, INT64_MAX
from cpython.time cimport monotonic_ns
from cpython.long cimport PyLong_AsLongLongAndOverflow
from bt_gcra cimport (gcra_t, gcra_init, gcra_rel, gcra_claim, gcra_wait, gcra_available, gcra_refund,
                      bt_as_i64, _bt_show, REL_MIN, TAT_MAX)
from bt_atomic cimport bt_load, bt_store, bt_fetch_add

from operator import index as _index

from buttress._params import emission_interval_ns, check_n

__all__ = ["GCRA"]


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
    cdef gcra_t g
    cdef int64_t admitted_     # decisions that claimed tokens (atomic)
    cdef int64_t rejected_     # decisions refused (atomic)
    cdef int64_t capacity_     # 0 until __init__ ran
    cdef double rate_
    cdef object _clock_ns

    def __init__(self, rate, capacity, clock_ns=None):
        if self.g.interval != 0:
            raise RuntimeError(f"{type(self).__name__} is already initialised; create a new one instead")
        r, cap, interval = emission_interval_ns(rate, capacity)
        if clock_ns is not None and not callable(clock_ns):
            raise TypeError(f"clock_ns must be a callable returning int ns or None, got {clock_ns!r}")
        cdef int64_t base = 0 if clock_ns is None else bt_as_i64(clock_ns(), "clock_ns()")   # see the module doc
        self.rate_ = r
        self._clock_ns = clock_ns
        gcra_init(&self.g, interval, cap, base)
        self.capacity_ = cap           # last: a capacity > 0 says "initialised" to the fast path

    cdef int _ready(self) except -1:
        if self.capacity_ == 0:
            raise RuntimeError(_UNINIT.format(type(self).__name__))
        return 0

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
        return self.g.interval

    cdef inline int64_t _rel(self, object now) except? -1:
        """`now` (or a clock reading) -> time relative to the base, saturated."""
        if now is None:
            if self._clock_ns is None:
                return gcra_rel(&self.g, monotonic_ns())
            return gcra_rel(&self.g, bt_as_i64(self._clock_ns(), "clock_ns()"))
        return gcra_rel(&self.g, bt_as_i64(now, "now"))

    cdef inline int64_t _n(self, object n) except -1:
        cdef int overflow = 0
        cdef long long v
        if type(n) is int:
            v = PyLong_AsLongLongAndOverflow(n, &overflow)
            if overflow == 0 and 1 <= v <= self.capacity_:
                return v
        self._ready()
        return check_n(n, self.capacity_)

    cdef inline int64_t _claim(self, int64_t n, object now, int64_t max_wait, int64_t *end) except -2:
        cdef int64_t w
        if now is None and self._clock_ns is None:
            w = gcra_claim(&self.g, n, 0, max_wait, True, end)      # clock read inside the CAS loop
        else:
            w = gcra_claim(&self.g, n, self._rel(now), max_wait, False, end)
        bt_fetch_add(&self.admitted_ if w >= 0 else &self.rejected_, 1)
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
        return w, ((<object>end + <object>self.g.base) << 63) + k

    def wait_ns(self, n=1, now=None):
        """ns until n tokens would be available (0 = now); claims nothing."""
        cdef int64_t k = self._n(n)
        return gcra_wait(&self.g, k, self._rel(now))

    def available(self, now=None):
        """Whole tokens available at now."""
        self._ready()
        return gcra_available(&self.g, self._rel(now))

    def refund(self, receipt):
        """Give back the tokens of the claim that returned `receipt`, only if no later claim has built on
        it (one CAS); returns whether they were given back. Never more than that claim took; use each
        receipt once."""
        self._ready()
        r = bt_as_receipt(receipt)
        k = r & _N_MASK
        rel = (r >> 63) - <object>self.g.base
        if not (1 <= k <= self.capacity_ and REL_MIN + k * self.g.interval <= rel <= TAT_MAX):
            raise ValueError(f"receipt must be a receipt returned by claim(), got {_bt_show(receipt)}")
        return gcra_refund(&self.g, <int64_t>k, <int64_t>rel)

    def counts(self):
        """(admitted, rejected) decisions since creation or reset()."""
        self._ready()
        return bt_load(&self.admitted_), bt_load(&self.rejected_)

    def reset(self):
        """Full bucket, counters back to zero."""
        self._ready()
        bt_store(&self.g.tat, REL_MIN)
        bt_store(&self.admitted_, 0)
        bt_store(&self.rejected_, 0)

    def __reduce__(self):
        raise TypeError(f"cannot pickle or copy {type(self).__name__} objects (they hold live limiter state)")

    def __repr__(self):
        if self.capacity_ == 0:
            return f"<{type(self).__name__} (not initialised)>"
        return f"GCRA(rate={self.rate_!r}, capacity={self.capacity_!r})"
