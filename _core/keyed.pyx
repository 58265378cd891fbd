# cython: language_level=3, freethreading_compatible=True, boundscheck=False, wraparound=False, cdivision=True
"""One GCRA per key in one fixed open-addressing table: 16 bytes per slot, 2 slots per key.

Layout: `nslots = 2 * max_keys` slots of (key hash: int64, word: int64) allocated once, so memory
is 32 bytes per key and never grows. The word packs the key's theoretical arrival time and a
4-bit slot generation: word = tat << 4 | gen. A key lives in the WINDOW slots after its home slot
(home = fastrange of the hash's top 32 bits); lookups scan that window.

What is atomic (every field goes through buttress_atomic.h):
- a decision for a known key is one CAS on its word (exact under racing threads);
- taking a slot for a new key or evicting one: CAS the word to LOCKED, store the key, store the
  new word (generation + 1). Readers re-check the key after reading the word and retry on LOCKED,
  so a decision never lands on a key that replaced the one it looked up (the generation guards
  against ABA on the word).
What is not: two threads that see the same brand-new key at the same instant may both insert it
(free-threaded builds only; with the GIL a call is not interleaved). The later copy is orphaned
(never found first) and is evicted once refilled; at most one of those first requests is lost.

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
MAX_TAU_NS = 1 << 58          # capacity / rate at most ~9 years: tat << 4 stays in int64
MAX_NOW_NS = 1 << 58          # clock readings up to ~9 years

cdef int64_t LOCKED = -1
cdef int64_t GEN_MASK = 15
cdef int64_t C_MAX_NOW = (<int64_t>1) << 58

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
    raise ValueError(f"key must be an int in the int64 range (or a str / bytes), got {key!r}")


cdef class KeyedGCRA:
    cdef kslot *slots
    cdef readonly int64_t nslots
    cdef readonly int64_t max_keys
    cdef readonly int64_t capacity
    cdef readonly double rate
    cdef readonly int64_t interval_ns
    cdef readonly int64_t idle_ns
    cdef int64_t tau
    cdef int64_t count        # live keys (atomic)
    cdef int64_t hand         # idle sweep position (atomic)
    cdef object _clock_ns

    def __cinit__(self):
        self.slots = NULL

    def __init__(self, rate, capacity, max_keys, idle_ns=0, clock_ns=None):
        r, cap, interval = emission_interval_ns(rate, capacity)
        if interval * cap > MAX_TAU_NS:
            raise ValueError(f"capacity / rate must be at most {MAX_TAU_NS / 1e9:.0f} s for a keyed limiter, "
                             f"got capacity={capacity!r} at rate={rate!r}")
        mk = check_int("max_keys", max_keys, minimum=1, maximum=MAX_KEYS)
        idle = check_int("idle_ns", idle_ns, minimum=0, maximum=MAX_NOW_NS)
        if clock_ns is not None and not callable(clock_ns):
            raise TypeError(f"clock_ns must be a callable returning int ns or None, got {clock_ns!r}")
        if self.slots != NULL:
            raise RuntimeError("KeyedGCRA is already initialized")
        self.nslots = max(2 * mk, _WINDOW)
        self.slots = <kslot *>PyMem_Calloc(self.nslots, sizeof(kslot))
        if self.slots == NULL:
            raise MemoryError(f"cannot allocate {self.nslots * sizeof(kslot)} bytes for max_keys={mk}")
        self.max_keys = mk
        self.rate = r
        self.capacity = cap
        self.interval_ns = interval
        self.tau = interval * cap
        self.idle_ns = idle
        self._clock_ns = clock_ns

    def __dealloc__(self):
        PyMem_Free(self.slots)

    @property
    def nbytes(self):
        """Bytes held by the table (fixed at construction)."""
        return self.nslots * <int64_t>sizeof(kslot)

    def __len__(self):
        """Live keys (may exceed max_keys briefly when only limited keys could be evicted)."""
        return bt_load(&self.count)

    cdef inline int64_t _now(self, int64_t now) except? -1:
        if now < 0:
            now = monotonic_ns() if self._clock_ns is None else self._clock_ns()
        if now >= C_MAX_NOW:
            raise ValueError(f"now must be < {MAX_NOW_NS} ns, got {now}")
        return now

    cdef inline int64_t _n(self, object n) except -1:
        cdef int overflow = 0
        cdef long long v
        if type(n) is int:
            v = PyLong_AsLongLongAndOverflow(n, &overflow)
            if overflow == 0 and 1 <= v <= self.capacity:
                return v
        return check_n(n, self.capacity)

    cdef inline int64_t _home(self, int64_t h) noexcept nogil:
        return <int64_t>(((<uint64_t>h >> 32) * <uint64_t>self.nslots) >> 32)

    cdef int _acquire(self, int64_t h, int64_t cost, int64_t now) noexcept nogil:
        """1 admitted, 0 refused."""
        cdef kslot *s = self.slots
        cdef int64_t i, j, k, w, tat, best_tat, empty, victim
        cdef int64_t limit = self.tau - cost     # charge fits when max(tat, now) - now <= limit
        cdef int64_t evictable = self.tau - self.interval_ns
        cdef bint retry
        while True:
            retry = False
            empty = -1
            victim = -1
            best_tat = INT64_MAX
            i = self._home(h)
            for j in range(_WINDOW):
                k = bt_load(&s[i].key)
                if k == h:
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
                        if bt_cas(&s[i].word, w, ((tat + cost) << 4) | (w & GEN_MASK)):
                            return 1
                    break
                w = bt_load(&s[i].word)
                if w == LOCKED:
                    # a slot being filled, perhaps with h by another thread: skipping it would let this
                    # thread place h in a second slot (two buckets for one key). Look again once it lands.
                    retry = True
                    break
                if k == 0:
                    if empty < 0:
                        empty = i
                else:
                    tat = w >> 4
                    if tat - now <= evictable and tat < best_tat:
                        best_tat = tat
                        victim = i
                i += 1
                if i == self.nslots:
                    i = 0
            if retry:
                continue
            # h is not in its window: take a slot for it (its first request always fits: cost <= tau)
            if empty >= 0 and (victim < 0 or bt_load(&self.count) < self.max_keys):
                w = bt_load(&s[empty].word)
                if w == LOCKED or bt_load(&s[empty].key) != 0 or not bt_cas(&s[empty].word, w, LOCKED):
                    continue
                bt_store(&s[empty].key, h)
                bt_store(&s[empty].word, ((now + cost) << 4) | ((w + 1) & GEN_MASK))
                bt_fetch_add(&self.count, 1)
            elif victim >= 0:
                w = bt_load(&s[victim].word)
                if w == LOCKED or (w >> 4) != best_tat or not bt_cas(&s[victim].word, w, LOCKED):
                    continue
                bt_store(&s[victim].key, h)
                bt_store(&s[victim].word, ((now + cost) << 4) | ((w + 1) & GEN_MASK))
            else:
                return 0          # every slot in the window holds a key that is still limited
            if self.idle_ns > 0:
                self._sweep(now)
            return 1

    cdef void _sweep(self, int64_t now) noexcept nogil:
        cdef int64_t start = bt_fetch_add(&self.hand, _SWEEP)
        cdef int64_t j, i
        for j in range(_SWEEP):
            i = (start + j) % self.nslots
            self._expire(i, now - self.idle_ns)

    cdef bint _expire(self, int64_t i, int64_t idle_before) noexcept nogil:
        """Remove slot i's key if it is refilled and its TAT is <= idle_before."""
        cdef kslot *s = self.slots
        cdef int64_t w
        if bt_load(&s[i].key) == 0:
            return False
        w = bt_load(&s[i].word)
        if w == LOCKED or (w >> 4) > idle_before or not bt_cas(&s[i].word, w, LOCKED):
            return False
        bt_store(&s[i].key, 0)
        bt_store(&s[i].word, (w + 1) & GEN_MASK)
        bt_fetch_add(&self.count, -1)
        return True

    cdef int64_t _find_word(self, int64_t h) noexcept nogil:
        cdef int64_t i = self._home(h), j, w
        for j in range(_WINDOW):
            if bt_load(&self.slots[i].key) == h:
                w = bt_load(&self.slots[i].word)
                if w != LOCKED:
                    return w
            i += 1
            if i == self.nslots:
                i = 0
        return -1

    def key_hash(self, key):
        """The table's 64-bit hash of `key` as an unsigned int (same in the twin, stable across processes)."""
        return <uint64_t>hash_obj(key)

    def try_acquire(self, key, n=1, int64_t now=-1):
        """Take n tokens from key's bucket if they are available now (a new key starts full)."""
        cdef int64_t h = hash_obj(key)
        return self._acquire(h, self._n(n) * self.interval_ns, self._now(now)) == 1

    def try_acquire_many(self, const int64_t[::1] keys not None, n=1, int64_t now=-1):
        """Decide int64 keys in order (a duplicate consumes in turn); returns a numpy bool array."""
        import numpy
        cdef int64_t cost = self._n(n) * self.interval_ns
        cdef int64_t t = self._now(now)
        cdef Py_ssize_t m = keys.shape[0], idx
        cdef int64_t ring[_AHEAD]
        cdef int64_t h
        out = numpy.empty(m, dtype=numpy.bool_)
        cdef uint8_t[::1] o = out.view(numpy.uint8)
        with nogil:
            for idx in range(min(m, _AHEAD)):
                ring[idx] = hash_int(keys[idx])
                bt_prefetch(&self.slots[self._home(ring[idx])])
            for idx in range(m):
                h = ring[idx % _AHEAD]
                if idx + _AHEAD < m:
                    ring[idx % _AHEAD] = hash_int(keys[idx + _AHEAD])
                    bt_prefetch(&self.slots[self._home(ring[idx % _AHEAD])])
                o[idx] = self._acquire(h, cost, t)
        return out

    def wait_ns(self, key, n=1, int64_t now=-1):
        """ns until key's bucket has n tokens (0 = now; an unknown key is full); claims nothing."""
        cdef int64_t h = hash_obj(key)
        cdef int64_t cost = self._n(n) * self.interval_ns
        cdef int64_t t = self._now(now)
        cdef int64_t w = self._find_word(h)
        if w < 0:
            return 0
        cdef int64_t tat = w >> 4
        if tat < t:
            tat = t
        return max(0, tat + cost - t - self.tau)

    def purge(self, int64_t now=-1):
        """Remove every refilled key idle for at least idle_ns; returns how many were removed."""
        cdef int64_t t = self._now(now)
        cdef int64_t i, removed = 0
        with nogil:
            for i in range(self.nslots):
                removed += self._expire(i, t - self.idle_ns)
        return removed

    def reset(self):
        """Forget every key (not atomic with respect to concurrent callers)."""
        cdef int64_t i
        for i in range(self.nslots):
            bt_store(&self.slots[i].key, 0)
            bt_store(&self.slots[i].word, 0)
        bt_store(&self.count, 0)
        bt_store(&self.hand, 0)

    def __repr__(self):
        return (f"KeyedGCRA(rate={self.rate!r}, capacity={self.capacity!r}, max_keys={self.max_keys!r}, "
                f"idle_ns={self.idle_ns!r})")
