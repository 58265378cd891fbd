# cython: language_level=3, freethreading_compatible=True, boundscheck=False, wraparound=False, cdivision=True
"""One GCRA per key in one fixed open-addressing table: 16 bytes per slot, 2 slots per key.

Layout: `nslots = 2 * max_keys` slots of (key hash: int64, word: int64) allocated once, so memory
is 32 bytes per key and never grows. The word packs the key's theoretical arrival time and a
4-bit slot generation: word = tat << 4 | gen. A key lives in the WINDOW slots after its home slot
(home = fastrange of the hash's top 32 bits); lookups scan that window.

Time (DESIGN §3c): any int64 clock reading is valid. TATs are kept relative to a base: clock_ns() read
at creation (0 for the C monotonic clock, whose readings are uptime), and `now` saturates at [REL_MIN, 2**59 - 1 - tau] relative to it (about 18 years
either side for a bucket of seconds), so `tat << 4` always fits and never wraps. LOCKED is INT64_MIN,
a word no slot can hold (every stored TAT is > -2**59).

What is atomic (every field goes through buttress_atomic.h):
- a decision for a known key is one CAS on its word (exact under racing threads);
- taking a slot for a new key or evicting one: CAS the word to LOCKED, store the key, store the
  new word (generation + 1). Readers re-check the key after reading the word and retry on LOCKED,
  so a decision never lands on a key that replaced the one it looked up (the generation guards
  against ABA on the word).
- one key never gets two slots: a thread inserting key h first locks h's HOME slot (CAS its word to
  LOCKED, content unchanged), then looks for h again under that lock, and only then takes a slot.
  Every inserter of h needs the same home lock, so two threads can never both find h missing and
  place it twice (with or without the GIL: try_acquire_many releases it). A thread that cannot get
  the victim slot's lock while holding a home lock lets go of both and starts over (no lock is ever
  waited for while another is held).

Eviction (placing a new key when max_keys keys are live or its window is full) picks, in the new
key's window, the key with the earliest TAT among keys that could be admitted now: refilled keys
(TAT <= now; evicting them loses nothing) come first, then the least recently charged (approximate
LRU). A key that would be refused now is never evicted. If the window holds only such keys the new
key takes an empty slot past max_keys if there is one (the table never grows), else it is refused.
With idle_ns > 0, each new key also sweeps the next SWEEP slots, removing refilled keys idle for
at least idle_ns, so the live count shrinks when traffic moves on.
"""
from libc.stdint cimport int64_t, uint64_t, uint8_t, INT64_MAX, INT64_MIN
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.time cimport monotonic_ns
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from bt_atomic cimport bt_load, bt_store, bt_cas, bt_fetch_add
from bt_gcra cimport rel_time, bt_as_i64, _bt_show
cimport cython

from operator import index as _index

from buttress._params import emission_interval_ns, check_n, check_int

cdef extern from "buttress_prefetch.h" nogil:
    void bt_prefetch(const void *p)

__all__ = ["KeyedGCRA", "WINDOW", "MAX_KEYS", "MAX_TAU_NS", "MAX_NOW_NS"]

cdef enum:
    _WINDOW = 32      # slots a key may live in, from its home slot
    _SWEEP = 8        # slots swept for idle keys per new key (idle_ns > 0)
    _AHEAD = 16       # batch prefetch distance

WINDOW = _WINDOW
MAX_KEYS = 1 << 30
MAX_TAU_NS = 1 << 58          # capacity / rate at most ~9 years
MAX_NOW_NS = 1 << 58          # the largest idle_ns (any int64 clock reading is valid)

cdef int64_t LOCKED = INT64_MIN                 # never a slot's word: every stored TAT is > -2**59
cdef int64_t GEN_MASK = 15
cdef int64_t K_REL_MIN = -((<int64_t>1) << 59) + 1
cdef int64_t K_TAT_MAX = ((<int64_t>1) << 59) - 1

cdef str _UNINIT = "{} is not initialised: its __init__ never ran (a subclass must call super().__init__())"


cdef inline int64_t pack(int64_t tat, int64_t gen) noexcept nogil:
    return <int64_t>((<uint64_t>tat << 4) | <uint64_t>(gen & GEN_MASK))

cdef struct kslot:
    int64_t key       # 64-bit key hash, 0 = empty (atomic)
    int64_t word      # tat << 4 | generation; LOCKED while a slot changes hands (atomic)


# ---- hashing: stable across processes; the twin computes the same values ----

cdef inline uint64_t fmix64(uint64_t k) noexcept nogil:
    # MurmurHash3 finalizer: a bijection with full avalanche
    k ^= k >> 33
    k *= 0xff51afd7ed558ccdULL
    k ^= k >> 33
    k *= 0xc4ceb9fe1a85ec53ULL
    k ^= k >> 33
    return k

cdef inline uint64_t fnv1a(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 0xcbf29ce484222325ULL
    cdef Py_ssize_t i
    for i in range(n):
        h ^= p[i]
        h *= 0x100000001b3ULL
    return h

cdef inline int64_t nonzero(uint64_t h) noexcept nogil:
    return <int64_t>h if h != 0 else 1

cdef inline int64_t hash_int(int64_t k) noexcept nogil:
    return nonzero(fmix64(<uint64_t>k ^ 0x9e3779b97f4a7c15ULL))

cdef int64_t hash_obj(object key) except? 0:
    """int (int64 range), str (UTF-8) or bytes -> nonzero 64-bit hash; str and bytes differ."""
    cdef Py_ssize_t size
    cdef const char *p
    cdef int overflow = 0
    cdef long long v
    if type(key) is int:
        v = PyLong_AsLongLongAndOverflow(key, &overflow)
        if overflow == 0:
            return hash_int(v)
    else:
        if isinstance(key, str):
            p = PyUnicode_AsUTF8AndSize(key, &size)
            return nonzero(fmix64(fnv1a(<const unsigned char *>p, size) ^ 0x5354520000000000ULL))
        if isinstance(key, bytes):
            return nonzero(fmix64(fnv1a(<const unsigned char *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))))
        try:
            key = _index(key)
        except TypeError:
            raise TypeError(f"key must be an int, str or bytes, got {key!r} ({type(key).__name__})") from None
        v = PyLong_AsLongLongAndOverflow(key, &overflow)
        if overflow == 0:
            return hash_int(v)
    raise ValueError(f"key must be an int in the int64 range (or a str / bytes), got {_bt_show(key)}")


@cython.auto_pickle(False)
cdef class KeyedGCRA:
    cdef kslot *slots
    cdef int64_t nslots_
    cdef int64_t max_keys_
    cdef int64_t capacity_
    cdef double rate_
    cdef int64_t interval
    cdef int64_t idle
    cdef int64_t tau
    cdef int64_t base         # clock reading at creation
    cdef int64_t rel_max      # K_TAT_MAX - tau: the latest relative now (saturated beyond)
    cdef int64_t count        # live keys (atomic)
    cdef int64_t hand         # idle sweep position (atomic)
    cdef object _clock_ns

    def __cinit__(self):
        self.slots = NULL

    def __init__(self, rate, capacity, max_keys, idle_ns=0, clock_ns=None):
        if self.slots != NULL:
            raise RuntimeError(f"{type(self).__name__} is already initialised; create a new one instead")
        r, cap, interval = emission_interval_ns(rate, capacity)
        if interval * cap > MAX_TAU_NS:
            raise ValueError(f"capacity / rate must be at most {MAX_TAU_NS / 1e9:.0f} s for a keyed limiter, "
                             f"got capacity={capacity!r} at rate={rate!r}")
        mk = check_int("max_keys", max_keys, minimum=1, maximum=MAX_KEYS)
        idle = check_int("idle_ns", idle_ns, minimum=0, maximum=MAX_NOW_NS)
        if clock_ns is not None and not callable(clock_ns):
            raise TypeError(f"clock_ns must be a callable returning int ns or None, got {clock_ns!r}")
        cdef int64_t base = 0 if clock_ns is None else bt_as_i64(clock_ns(), "clock_ns()")   # as in gcra
        cdef int64_t nslots = max(2 * mk, _WINDOW)
        cdef kslot *slots = <kslot *>PyMem_Calloc(nslots, sizeof(kslot))
        if slots == NULL:
            raise MemoryError(f"cannot allocate {nslots * sizeof(kslot)} bytes for max_keys={mk}")
        self.nslots_ = nslots
        self.max_keys_ = mk
        self.rate_ = r
        self.capacity_ = cap
        self.interval = interval
        self.tau = interval * cap
        self.idle = idle
        self.base = base
        self.rel_max = K_TAT_MAX - self.tau
        self._clock_ns = clock_ns
        self.slots = slots                 # last: a table says "initialised"

    def __dealloc__(self):
        PyMem_Free(self.slots)

    cdef int _ready(self) except -1:
        if self.slots == NULL:
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
        return self.interval

    @property
    def max_keys(self):
        self._ready()
        return self.max_keys_

    @property
    def nslots(self):
        self._ready()
        return self.nslots_

    @property
    def idle_ns(self):
        self._ready()
        return self.idle

    @property
    def nbytes(self):
        """Bytes held by the table (fixed at construction)."""
        self._ready()
        return self.nslots_ * <int64_t>sizeof(kslot)

    def __len__(self):
        """Live keys (may exceed max_keys briefly when only limited keys could be evicted)."""
        self._ready()
        return bt_load(&self.count)

    cdef inline int64_t _rel(self, object now) except? -1:
        """`now` (or a clock reading) -> time relative to the base, saturated."""
        cdef int64_t t
        if now is None:
            t = monotonic_ns() if self._clock_ns is None else bt_as_i64(self._clock_ns(), "clock_ns()")
        else:
            t = bt_as_i64(now, "now")
        return rel_time(t, self.base, K_REL_MIN, self.rel_max)

    cdef inline int64_t _n(self, object n) except -1:
        cdef int overflow = 0
        cdef long long v
        if type(n) is int:
            v = PyLong_AsLongLongAndOverflow(n, &overflow)
            if overflow == 0 and 1 <= v <= self.capacity_:
                return v
        self._ready()
        return check_n(n, self.capacity_)

    cdef inline int64_t _home(self, int64_t h) noexcept nogil:
        return <int64_t>(((<uint64_t>h >> 32) * <uint64_t>self.nslots_) >> 32)

    cdef int _acquire(self, int64_t h, int64_t cost, int64_t now) noexcept nogil:
        """1 admitted, 0 refused."""
        cdef kslot *s = self.slots
        cdef int64_t i, j, k, w, tat, best_tat, empty, victim, w_empty, w_victim, home, w_home, slot, w_slot
        cdef int64_t limit = self.tau - cost     # charge fits when max(tat, now) - now <= limit
        cdef int64_t evictable = self.tau - self.interval
        cdef bint retry, found, busy
        while True:
            # 1. lock-free lookup: a known key is decided by one CAS on its word
            retry = False
            found = False
            i = self._home(h)
            for j in range(_WINDOW):
                if bt_load(&s[i].key) == h:
                    found = True
                    while True:
                        w = bt_load(&s[i].word)
                        if w == LOCKED or bt_load(&s[i].key) != h:
                            retry = True
                            break
                        tat = w >> 4
                        if tat < now:
                            tat = now
                        if tat - now > limit:
                            return 0
                        if bt_cas(&s[i].word, w, pack(tat + cost, w)):
                            return 1
                    break
                i += 1
                if i == self.nslots_:
                    i = 0
            if found:
                continue          # the slot was changing hands: look again
            # 2. h looks new: lock its home slot (content unchanged) so no other thread can insert h
            home = self._home(h)
            w_home = bt_load(&s[home].word)
            if w_home == LOCKED or not bt_cas(&s[home].word, w_home, LOCKED):
                continue
            # 3. under the home lock, look for h again and choose a slot
            empty = -1
            victim = -1
            w_empty = 0
            w_victim = 0
            best_tat = INT64_MAX
            busy = False
            i = home
            for j in range(_WINDOW):
                # the word first, then the key: a later CAS on that word then proves the key unchanged
                w = w_home if i == home else bt_load(&s[i].word)
                k = bt_load(&s[i].key)
                if k == h:
                    found = True  # inserted meanwhile (or being moved out): decide on it in step 1
                    break
                if w == LOCKED:   # changing hands (never to h: we hold h's home); maybe free in a moment
                    busy = True
                else:
                    if k == 0:
                        if empty < 0:
                            empty = i
                            w_empty = w
                    else:
                        tat = w >> 4
                        if tat - now <= evictable and tat < best_tat:
                            best_tat = tat
                            victim = i
                            w_victim = w
                i += 1
                if i == self.nslots_:
                    i = 0
            if found:
                bt_store(&s[home].word, w_home)
                continue
            # h is not in its window: take a slot for it (its first request always fits: cost <= tau)
            if empty >= 0 and (victim < 0 or bt_load(&self.count) < self.max_keys_):
                slot = empty
                w_slot = w_empty
            elif victim >= 0:
                slot = victim
                w_slot = w_victim
            else:
                bt_store(&s[home].word, w_home)
                if busy:
                    continue      # a slot was changing hands: look again rather than refuse
                return 0          # every slot in the window holds a key that is still limited
            if slot != home and not bt_cas(&s[slot].word, w_slot, LOCKED):
                bt_store(&s[home].word, w_home)   # the slot changed: let go of everything, start over
                continue
            if slot == empty:
                bt_fetch_add(&self.count, 1)
            bt_store(&s[slot].key, h)
            bt_store(&s[slot].word, pack(now + cost, w_slot + 1))
            if slot != home:
                bt_store(&s[home].word, w_home)
            if self.idle > 0:
                self._sweep(now)
            return 1

    cdef void _sweep(self, int64_t now) noexcept nogil:
        cdef int64_t start = bt_fetch_add(&self.hand, _SWEEP)
        cdef int64_t j, i
        for j in range(_SWEEP):
            i = <int64_t>((<uint64_t>start + <uint64_t>j) % <uint64_t>self.nslots_)
            self._expire(i, now - self.idle, False)

    cdef bint _expire(self, int64_t i, int64_t idle_before, bint wait) noexcept nogil:
        """Remove slot i's key if its TAT is <= idle_before (with `wait`, spin past a locked slot)."""
        cdef kslot *s = self.slots
        cdef int64_t w
        while True:
            w = bt_load(&s[i].word)
            if bt_load(&s[i].key) == 0:
                return False
            if w == LOCKED:
                if wait:
                    continue
                return False
            if (w >> 4) > idle_before:
                return False
            if not bt_cas(&s[i].word, w, LOCKED):
                if wait:
                    continue
                return False
            if bt_load(&s[i].key) == 0:          # emptied between the key load and the CAS
                bt_store(&s[i].word, w)
                return False
            bt_store(&s[i].key, 0)
            bt_store(&s[i].word, pack(0, w + 1))
            bt_fetch_add(&self.count, -1)
            return True

    cdef int64_t _find_word(self, int64_t h) noexcept nogil:
        """h's word, or LOCKED when h is not in its window."""
        cdef int64_t i = self._home(h), j, w
        for j in range(_WINDOW):
            if bt_load(&self.slots[i].key) == h:
                w = bt_load(&self.slots[i].word)
                if w != LOCKED and bt_load(&self.slots[i].key) == h:
                    return w
            i += 1
            if i == self.nslots_:
                i = 0
        return LOCKED

    def key_hash(self, key):
        """The table's 64-bit hash of `key` as an unsigned int (same in the twin, stable across processes)."""
        self._ready()
        return <uint64_t>hash_obj(key)

    def try_acquire(self, key, n=1, now=None):
        """Take n tokens from key's bucket if they are available now (a new key starts full)."""
        cdef int64_t h = hash_obj(key) if self.slots != NULL else 0
        cdef int64_t cost = self._n(n) * self.interval
        return self._acquire(h, cost, self._rel(now)) == 1

    def try_acquire_many(self, keys, n=1, now=None):
        """Decide int64 keys in order (a duplicate consumes in turn); returns a numpy bool array."""
        self._ready()
        cdef const int64_t[::1] ks = _as_keys(keys)
        import numpy
        cdef int64_t cost = self._n(n) * self.interval
        cdef int64_t t = self._rel(now)
        cdef Py_ssize_t m = ks.shape[0], idx
        cdef int64_t ring[_AHEAD]
        cdef int64_t h
        out = numpy.empty(m, dtype=numpy.bool_)
        cdef uint8_t[::1] o = out.view(numpy.uint8)
        with nogil:
            for idx in range(min(m, _AHEAD)):
                ring[idx] = hash_int(ks[idx])
                bt_prefetch(&self.slots[self._home(ring[idx])])
            for idx in range(m):
                h = ring[idx % _AHEAD]
                if idx + _AHEAD < m:
                    ring[idx % _AHEAD] = hash_int(ks[idx + _AHEAD])
                    bt_prefetch(&self.slots[self._home(ring[idx % _AHEAD])])
                o[idx] = self._acquire(h, cost, t)
        return out

    def wait_ns(self, key, n=1, now=None):
        """ns until key's bucket has n tokens (0 = now; an unknown key is full); claims nothing."""
        self._ready()
        cdef int64_t h = hash_obj(key)
        cdef int64_t cost = self._n(n) * self.interval
        cdef int64_t t = self._rel(now)
        cdef int64_t w = self._find_word(h)
        if w == LOCKED:
            return 0
        cdef int64_t tat = w >> 4
        if tat < t:
            tat = t
        return max(0, tat + cost - t - self.tau)

    def purge(self, now=None):
        """Remove every refilled key idle for at least idle_ns; returns how many were removed."""
        self._ready()
        cdef int64_t t = self._rel(now)
        cdef int64_t i, removed = 0
        with nogil:
            for i in range(self.nslots_):
                removed += self._expire(i, t - self.idle, False)
        return removed

    def reset(self):
        """Forget every key (each slot is emptied atomically; keys inserted meanwhile may stay)."""
        self._ready()
        cdef int64_t i
        with nogil:
            for i in range(self.nslots_):
                self._expire(i, INT64_MAX, True)
        bt_store(&self.hand, 0)

    def __reduce__(self):
        raise TypeError(f"cannot pickle or copy {type(self).__name__} objects (they hold live limiter state)")

    def __repr__(self):
        if self.slots == NULL:
            return f"<{type(self).__name__} (not initialised)>"
        return (f"KeyedGCRA(rate={self.rate_!r}, capacity={self.capacity_!r}, max_keys={self.max_keys_!r}, "
                f"idle_ns={self.idle!r})")


cdef object _as_keys(object keys):
    """keys -> a 1-d C-contiguous int64 buffer (the twin's checks and messages)."""
    if keys is None:
        raise TypeError("keys must be a contiguous int64 array, got None")
    try:
        mv = memoryview(keys)
    except TypeError:
        raise TypeError(f"keys must be a contiguous int64 array, got {type(keys).__name__}") from None
    if mv.format not in ("q", "l", "=q", "<q", "@q") or mv.itemsize != 8 or mv.ndim != 1 or not mv.c_contiguous:
        raise ValueError(f"keys must be a 1-d contiguous int64 array, got format {mv.format!r}, ndim {mv.ndim}")
    return mv.cast("B").cast("q") if mv.format != "q" else mv
