# cython: language_level=3, freethreading_compatible=True, boundscheck=False, wraparound=False, cdivision=True
"""One GCRA per key in one fixed open-addressing table: 16 bytes per slot, 2 slots per key.

Layout: `nslots = 2 * max_keys` slots of (key hash: int64, word: int64) allocated once, so memory
is 32 bytes per key and never grows. The word packs the key's theoretical arrival time and a
4-bit slot generation: word = tat << 4 | gen. A key lives in the WINDOW slots after its home slot
(home = fastrange of the hash's top 32 bits; 0 in a table of at most WINDOW slots, which every lookup
scans whole); lookups scan that window.

Hashing (issue 20): SipHash-1-3 keyed with a 128-bit secret seed per table (`seed=`, 16 bytes; None =
os.urandom(16)), so nobody outside can compute which keys share a window; the twin computes the same
hash for the same seed. A table in a store keeps its seed in its words (written once by the creator), so
every process of the store hashes a key to the same slot.

Words (the table's own, or a store's, `words=`): HEADER_WORDS header words, then 2 per slot:
    h[0] live keys  h[1] sweep hand  h[2] base  h[3] h[4] seed  h[5] interval  h[6] tau
    h[7] admitted  h[8] rejected  h[9] idle_ns  h[10] nslots  h[11] max_keys  (h[12..15] 0)
`init_words` writes the header of a new shared table; the constructor checks the settings against it.

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
key takes an empty slot past max_keys if there is one (the table never grows), else it is ADMITTED
UNTRACKED (its first request always fits a full bucket; nothing is stored): a never-seen key is never
refused because other keys crowd its window, so nobody can lock a victim out by filling its
neighbourhood. Such a key is not limited while its window stays full of limited keys (a new key gets a
full bucket anyway, so a flood of fresh keys gains nothing from it).
With idle_ns > 0, each new key also sweeps the next SWEEP slots, removing refilled keys idle for
at least idle_ns, so the live count shrinks when traffic moves on.
"""
from libc.stdint cimport int64_t, uint64_t, uint8_t, INT64_MAX, INT64_MIN
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.time cimport monotonic_ns
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_C_CONTIGUOUS
from bt_atomic cimport bt_load, bt_store, bt_cas, bt_fetch_add
from bt_gcra cimport rel_time, bt_as_i64, _bt_show
cimport cython

from buttress._twin.gcra import words_view as _twin_words_view, track_bound as _track_bound  # cold path: one copy
import os as _os
from operator import index as _index

from buttress._params import emission_interval_ns, check_n, check_int

cdef extern from "buttress_prefetch.h" nogil:
    void bt_prefetch(const void *p)

__all__ = ["KeyedGCRA", "WINDOW", "MAX_KEYS", "MAX_TAU_NS", "MAX_NOW_NS", "HEADER_WORDS"]

cdef enum:
    _WINDOW = 32      # slots a key may live in, from its home slot
    _SWEEP = 8        # slots swept for idle keys per new key (idle_ns > 0)
    _AHEAD = 16       # batch prefetch distance
    _HDR = 16         # header words

WINDOW = _WINDOW
HEADER_WORDS = _HDR
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


# ---- hashing: SipHash-1-3 keyed per table; the twin computes the same values for the same seed ----

cdef extern from *:
    """
    static inline uint64_t bt_rotl64(uint64_t x, int b) { return (x << b) | (x >> (64 - b)); }
    #define BT_SIPROUND do { \
        v0 += v1; v1 = bt_rotl64(v1, 13); v1 ^= v0; v0 = bt_rotl64(v0, 32); \
        v2 += v3; v3 = bt_rotl64(v3, 16); v3 ^= v2; \
        v0 += v3; v3 = bt_rotl64(v3, 21); v3 ^= v0; \
        v2 += v1; v1 = bt_rotl64(v1, 17); v1 ^= v2; v2 = bt_rotl64(v2, 32); } while (0)
    #define BT_SIPINIT(k0, k1) \
        uint64_t v0 = 0x736f6d6570736575ULL ^ (k0), v1 = 0x646f72616e646f6dULL ^ (k1); \
        uint64_t v2 = 0x6c7967656e657261ULL ^ (k0), v3 = 0x7465646279746573ULL ^ (k1)
    #define BT_SIPFINISH(b) \
        v3 ^= (b); BT_SIPROUND; v0 ^= (b); v2 ^= 0xff; BT_SIPROUND; BT_SIPROUND; BT_SIPROUND; \
        return v0 ^ v1 ^ v2 ^ v3
    /* SipHash-1-3 of p[0..n) (little-endian words), key (k0, k1) */
    static uint64_t bt_siphash13(uint64_t k0, uint64_t k1, const unsigned char *p, size_t n) {
        BT_SIPINIT(k0, k1);
        uint64_t m, b = ((uint64_t)n) << 56;
        size_t i = 0, end = n & ~(size_t)7;
        int j;
        for (; i < end; i += 8) {
            m = 0;
            for (j = 7; j >= 0; j--) m = (m << 8) | p[i + j];
            v3 ^= m; BT_SIPROUND; v0 ^= m;
        }
        for (j = (int)(n & 7) - 1; j >= 0; j--) b |= ((uint64_t)p[i + j]) << (8 * j);
        BT_SIPFINISH(b);
    }
    /* the same for the 8 bytes of one int64, little-endian */
    static inline uint64_t bt_siphash13_u64(uint64_t k0, uint64_t k1, uint64_t m) {
        BT_SIPINIT(k0, k1);
        v3 ^= m; BT_SIPROUND; v0 ^= m;
        BT_SIPFINISH(((uint64_t)8) << 56);
    }
    """
    uint64_t bt_siphash13(uint64_t k0, uint64_t k1, const unsigned char *p, size_t n) noexcept nogil
    uint64_t bt_siphash13_u64(uint64_t k0, uint64_t k1, uint64_t m) noexcept nogil

cdef uint64_t TAG_INT = 0x9e3779b97f4a7c15ULL     # int, str and bytes keys hash under different keys
cdef uint64_t TAG_STR = 0x5354520000000000ULL

cdef inline int64_t nonzero(uint64_t h) noexcept nogil:
    return <int64_t>h if h != 0 else 1

cdef inline int64_t hash_int(uint64_t k0, uint64_t k1, int64_t k) noexcept nogil:
    return nonzero(bt_siphash13_u64(k0 ^ TAG_INT, k1, <uint64_t>k))

cdef int64_t hash_obj(uint64_t k0, uint64_t k1, object key) except? 0:
    """int (int64 range), str (UTF-8) or bytes -> nonzero 64-bit hash; str and bytes differ."""
    cdef Py_ssize_t size
    cdef const char *p
    cdef int overflow = 0
    cdef long long v
    if type(key) is int:
        v = PyLong_AsLongLongAndOverflow(key, &overflow)
        if overflow == 0:
            return hash_int(k0, k1, v)
    else:
        if isinstance(key, str):
            p = PyUnicode_AsUTF8AndSize(key, &size)
            return nonzero(bt_siphash13(k0 ^ TAG_STR, k1, <const unsigned char *>p, size))
        if isinstance(key, bytes):
            return nonzero(bt_siphash13(k0, k1, <const unsigned char *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)))
        try:
            key = _index(key)
        except TypeError:
            raise TypeError(f"key must be an int, str or bytes, got {key!r} ({type(key).__name__})") from None
        v = PyLong_AsLongLongAndOverflow(key, &overflow)
        if overflow == 0:
            return hash_int(k0, k1, v)
    raise ValueError(f"key must be an int in the int64 range (or a str / bytes), got {_bt_show(key)}")


cdef tuple _seed_words(object seed):
    """seed (16 bytes, or None for a fresh secret) -> (k0, k1) as signed int64 words."""
    if seed is None:
        seed = _os.urandom(16)
    elif not isinstance(seed, (bytes, bytearray)):
        raise TypeError(f"seed must be 16 bytes or None (a fresh secret from os.urandom), got "
                        f"{type(seed).__name__}")
    if len(seed) != 16:
        raise ValueError(f"seed must be 16 bytes, got {len(seed)} bytes")
    return (int.from_bytes(seed[:8], "little", signed=True), int.from_bytes(seed[8:], "little", signed=True))


def _settings(rate, capacity, max_keys, idle_ns):
    r, cap, interval = emission_interval_ns(rate, capacity)
    if interval * cap > MAX_TAU_NS:
        raise ValueError(f"capacity / rate must be at most {MAX_TAU_NS / 1e9:.0f} s for a keyed limiter, "
                         f"got capacity={capacity!r} at rate={rate!r}")
    mk = check_int("max_keys", max_keys, minimum=1, maximum=MAX_KEYS)
    idle = check_int("idle_ns", idle_ns, minimum=0, maximum=MAX_NOW_NS)
    return r, cap, interval, mk, idle, max(2 * mk, _WINDOW)


@cython.auto_pickle(False)
cdef class KeyedGCRA:
    cdef int64_t *hdr         # HEADER_WORDS words: count, hand, ..., admitted, rejected (see the module doc)
    cdef kslot *slots         # NULL until __init__ ran
    cdef void *own            # the table's own words (process-local), else NULL
    cdef Py_buffer *buf        # a store's words (PyMem_Calloc'd: a Py_buffer member is traversed and cleared by
                               # the GC while exported; the export keeps its owner alive until __dealloc__)
    cdef bint has_buf
    cdef int64_t nslots_
    cdef int64_t max_keys_
    cdef int64_t capacity_
    cdef int64_t nmax_        # capacity_ while the table decides; 0 before __init__ and after _close
                              # (atomic): the fast paths' range check on n is also their open check
    cdef int64_t closing_     # 1 once _close ran (atomic: one message, written once)
    cdef object closed_       # _close's message
    cdef double rate_
    cdef int64_t interval
    cdef int64_t idle
    cdef int64_t tau
    cdef int64_t base         # clock reading at creation
    cdef int64_t rel_max      # K_TAT_MAX - tau: the latest relative now (saturated beyond)
    cdef uint64_t k0, k1      # the hash seed
    cdef object _clock_ns
    cdef object locker_
    cdef object __weakref__    # a store keeps a weak set of the objects bound to its words

    def __cinit__(self):
        self.slots = NULL
        self.own = NULL

    def __init__(self, rate, capacity, max_keys, idle_ns=0, clock_ns=None, seed=None, words=None, locker=None):
        if self.slots != NULL or self.has_buf:
            raise RuntimeError(f"{type(self).__name__} is already initialised; create a new one instead")
        r, cap, interval, mk, idle, nslots = _settings(rate, capacity, max_keys, idle_ns)
        if clock_ns is not None and not callable(clock_ns):
            raise TypeError(f"clock_ns must be a callable returning int ns or None, got {clock_ns!r}")
        cdef int64_t nwords = _HDR + 2 * nslots
        cdef int64_t *w
        if words is None:
            k0, k1 = _seed_words(seed)
            base = 0 if clock_ns is None else bt_as_i64(clock_ns(), "clock_ns()")   # as in gcra
            w = <int64_t *>PyMem_Calloc(nwords, 8)
            if w == NULL:
                raise MemoryError(f"cannot allocate {nwords * 8} bytes for max_keys={mk}")
            self.own = w
            w[2], w[3], w[4], w[5], w[6], w[9], w[10], w[11] = base, k0, k1, interval, interval * cap, idle, nslots, mk
        else:
            if seed is not None:
                raise ValueError("seed must be None when words are given: the table's seed lives in its words")
            raw = _twin_words_view(words, nwords, "this table")
            _check_header(raw.cast("q"), interval, interval * cap, idle, nslots, mk)
            if self.buf == NULL:
                self.buf = <Py_buffer *>PyMem_Calloc(1, sizeof(Py_buffer))
                if self.buf == NULL:
                    raise MemoryError()
            PyObject_GetBuffer(raw, self.buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)   # freed in __dealloc__ if it fails
            self.has_buf = True
            w = <int64_t *>self.buf.buf
        self.hdr = w
        self.nslots_ = nslots
        self.max_keys_ = mk
        self.rate_ = r
        self.capacity_ = cap
        self.interval = interval
        self.tau = interval * cap
        self.idle = idle
        self.base = w[2]
        self.k0 = <uint64_t>w[3]
        self.k1 = <uint64_t>w[4]
        self.rel_max = K_TAT_MAX - self.tau
        self._clock_ns = clock_ns
        self.locker_ = locker
        self.slots = <kslot *>(w + _HDR)     # last: a table says "initialised"
        if not bt_load(&self.closing_):
            bt_store(&self.nmax_, cap)
        if words is not None:
            _track_bound(self, locker)        # the store can close it (cold path: the twin's)

    def __dealloc__(self):
        PyMem_Free(self.own)
        if self.has_buf:
            PyBuffer_Release(self.buf)
        PyMem_Free(self.buf)

    @staticmethod
    def nwords(max_keys):
        """int64 words of a table of max_keys keys in a store (header + 2 per slot)."""
        mk = check_int("max_keys", max_keys, minimum=1, maximum=MAX_KEYS)
        return HEADER_WORDS + 2 * max(2 * mk, _WINDOW)

    @staticmethod
    def init_words(words, rate, capacity, max_keys, idle_ns=0, base_ns=0, seed=None):
        """Write the header of a new shared table (every key unknown; seed None = a fresh secret)."""
        r, cap, interval, mk, idle, nslots = _settings(rate, capacity, max_keys, idle_ns)
        cdef int64_t b = bt_as_i64(base_ns, "base_ns")
        k0, k1 = _seed_words(seed)
        mv = _twin_words_view(words, HEADER_WORDS, "this table").cast("q")
        for i, v in enumerate((0, 0, b, k0, k1, interval, interval * cap, 0, 0, idle, nslots, mk, 0, 0, 0, 0)):
            mv[i] = v

    cdef int _ready(self) except -1:
        if self.slots == NULL:
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
        self._live()
        return bt_load(self.hdr)

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
            if overflow == 0 and 1 <= v <= bt_load(&self.nmax_):
                return v
        self._live()
        return check_n(n, self.capacity_)

    cdef inline int64_t _home(self, int64_t h) noexcept nogil:
        if self.nslots_ <= _WINDOW:
            return 0          # one window holds the whole table: placement does not depend on the hash
        return <int64_t>(((<uint64_t>h >> 32) * <uint64_t>self.nslots_) >> 32)

    cdef int _acquire(self, int64_t h, int64_t cost, int64_t now, int64_t *at) noexcept nogil:
        """1 admitted, 0 refused. *at: the slot that was charged (its new word in at[1]), -1 when the key
        was admitted untracked."""
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
                            at[0] = i
                            at[1] = pack(tat + cost, w)
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
            if empty >= 0 and (victim < 0 or bt_load(self.hdr) < self.max_keys_):
                slot = empty
                w_slot = w_empty
            elif victim >= 0:
                slot = victim
                w_slot = w_victim
            else:
                bt_store(&s[home].word, w_home)
                if busy:
                    continue      # a slot was changing hands: look again
                at[0] = -1        # every slot in the window holds a key that is still limited: a
                return 1          # never-seen key is admitted untracked, never locked out by its neighbours
            if slot != home and not bt_cas(&s[slot].word, w_slot, LOCKED):
                bt_store(&s[home].word, w_home)   # the slot changed: let go of everything, start over
                continue
            if slot == empty:
                bt_fetch_add(self.hdr, 1)
            bt_store(&s[slot].key, h)
            bt_store(&s[slot].word, pack(now + cost, w_slot + 1))
            at[0] = slot
            at[1] = pack(now + cost, w_slot + 1)
            if slot != home:
                bt_store(&s[home].word, w_home)
            if self.idle > 0:
                self._sweep(now)
            return 1

    cdef void _sweep(self, int64_t now) noexcept nogil:
        cdef int64_t start = bt_fetch_add(self.hdr + 1, _SWEEP)
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
            bt_fetch_add(self.hdr, -1)
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
        """The table's 64-bit hash of `key` as an unsigned int: SipHash-1-3 under the table's secret seed
        (the twin computes the same for the same seed; tables with other seeds disagree)."""
        self._ready()
        return <uint64_t>hash_obj(self.k0, self.k1, key)

    cdef inline int _count(self, int ok) noexcept nogil:
        bt_fetch_add(self.hdr + (7 if ok else 8), 1)
        return ok

    def try_acquire(self, key, n=1, now=None):
        """Take n tokens from key's bucket if they are available now (a new key starts full)."""
        cdef int64_t h = hash_obj(self.k0, self.k1, key) if bt_load(&self.nmax_) != 0 else 0
        cdef int64_t cost = self._n(n) * self.interval
        cdef int64_t at[2]
        return self._count(self._acquire(h, cost, self._rel(now), at)) == 1

    def claim(self, key, n=1, now=None):
        """try_acquire that returns a receipt for refund() (an int > 0), or 0 when refused."""
        cdef int64_t h = hash_obj(self.k0, self.k1, key) if bt_load(&self.nmax_) != 0 else 0
        cdef int64_t k = self._n(n)
        cdef int64_t at[2]
        if not self._count(self._acquire(h, k * self.interval, self._rel(now), at)):
            return 0
        return ((<object>(at[0] + 1) << 96) | (<object>k << 64) | <object><uint64_t>at[1]) if at[0] >= 0 else <object>k << 64

    def refund(self, receipt):
        """Give back the tokens of the claim that returned `receipt`, only if its key is still in that
        slot and no later claim has charged it (one CAS); returns whether they were given back. False once the store closed in this process (a call admitted before
        the close keeps its own result or exception: nothing is given back after the close)."""
        self._ready()
        r = _as_receipt(receipt)
        slot1, k, word = r >> 96, (r >> 64) & 0xFFFFFFFF, r & 0xFFFFFFFFFFFFFFFF
        if r >> 128 or not (1 <= k <= self.capacity_ and 0 <= slot1 <= self.nslots_):
            raise ValueError(f"receipt must be a receipt returned by claim(), got {_bt_show(receipt)}")
        if slot1 == 0:
            return False          # admitted untracked: nothing was charged
        cdef int64_t w = <int64_t><uint64_t>word
        cdef int64_t i = slot1 - 1
        if w == LOCKED or (w >> 4) - k * self.interval < K_REL_MIN:
            raise ValueError(f"receipt must be a receipt returned by claim(), got {_bt_show(receipt)}")
        if bt_load(&self.nmax_) == 0:
            return False
        return bt_cas(&self.slots[i].word, w, pack((w >> 4) - k * self.interval, w))

    def counts(self):
        """(admitted, rejected) decisions since creation or reset() (try_acquire_many counts each key)."""
        self._live()
        return bt_load(self.hdr + 7), bt_load(self.hdr + 8)

    def try_acquire_many(self, keys, n=1, now=None):
        """Decide int64 keys in order (a duplicate consumes in turn); returns a numpy bool array."""
        self._live()
        cdef const int64_t[::1] ks = _as_keys(keys)
        import numpy
        cdef int64_t cost = self._n(n) * self.interval
        cdef int64_t t = self._rel(now)
        cdef Py_ssize_t m = ks.shape[0], idx
        cdef int64_t ring[_AHEAD]
        cdef int64_t h, ok = 0
        cdef int64_t at[2]
        cdef uint64_t k0 = self.k0, k1 = self.k1
        out = numpy.empty(m, dtype=numpy.bool_)
        cdef uint8_t[::1] o = out.view(numpy.uint8)
        with nogil:
            for idx in range(min(m, _AHEAD)):
                ring[idx] = hash_int(k0, k1, ks[idx])
                bt_prefetch(&self.slots[self._home(ring[idx])])
            for idx in range(m):
                h = ring[idx % _AHEAD]
                if idx + _AHEAD < m:
                    ring[idx % _AHEAD] = hash_int(k0, k1, ks[idx + _AHEAD])
                    bt_prefetch(&self.slots[self._home(ring[idx % _AHEAD])])
                o[idx] = self._acquire(h, cost, t, at)
                ok += o[idx]
            bt_fetch_add(self.hdr + 7, ok)
            bt_fetch_add(self.hdr + 8, m - ok)
        return out

    def wait_ns(self, key, n=1, now=None):
        """ns until key's bucket has n tokens (0 = now; an unknown key is full); claims nothing."""
        self._live()
        cdef int64_t h = hash_obj(self.k0, self.k1, key)
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
        self._live()
        cdef int64_t t = self._rel(now)
        cdef int64_t i, removed = 0
        with nogil:
            for i in range(self.nslots_):
                removed += self._expire(i, t - self.idle, False)
        return removed

    def reset(self):
        """Forget every key (each slot is emptied atomically; keys inserted meanwhile may stay); counts
        back to zero."""
        self._live()
        cdef int64_t i
        with nogil:
            for i in range(self.nslots_):
                self._expire(i, INT64_MAX, True)
        bt_store(self.hdr + 1, 0)
        bt_store(self.hdr + 7, 0)
        bt_store(self.hdr + 8, 0)

    def __reduce__(self):
        raise TypeError(f"cannot pickle or copy {type(self).__name__} objects (they hold live limiter state)")

    def __repr__(self):
        if self.slots == NULL:
            return f"<{type(self).__name__} (not initialised)>"
        return (f"KeyedGCRA(rate={self.rate_!r}, capacity={self.capacity_!r}, max_keys={self.max_keys_!r}, "
                f"idle_ns={self.idle!r})")


cdef int _check_header(object h, object interval, object tau, object idle, object nslots, object mk) except -1:
    have = (h[5], h[6], h[9], h[10], h[11])
    want = (interval, tau, idle, nslots, mk)
    if have != want:
        raise ValueError(f"words hold a keyed table with (interval, tau, idle_ns, nslots, max_keys) = {have}, "
                         f"this one has {want} (words not written by KeyedGCRA.init_words for these settings)")
    return 0


cdef object _as_receipt(object v):
    if type(v) is not int:
        if isinstance(v, bool) or not hasattr(type(v), "__index__"):
            raise TypeError(f"receipt must be an int, got {v!r} ({type(v).__name__})")
        v = _index(v)
    if v <= 0:
        raise ValueError(f"receipt must be a receipt returned by claim(), got {_bt_show(v)}")
    return v


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
