# cython: language_level=3, freethreading_compatible=True, boundscheck=False, wraparound=False, cdivision=True
"""Crash-safe permit counter on int64 words in a store (a shared-memory segment), lock-free.

Twin and spec: buttress._twin.shared (the layout and the steps are documented there and in
docs/stores.md). Every word goes through the atomics header; a process killed at any instruction leaves
either no op installed, or one op installed in G that the next process to meet it completes.
"""
from libc.stdint cimport int64_t, uintptr_t
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_C_CONTIGUOUS
from bt_atomic cimport bt_load, bt_store, bt_cas, bt_fetch_add, bt_fence_seq_cst, bt_fence_after_rmw

import ctypes

from buttress._params import check_int

__all__ = ["SharedPermits", "HEADER_WORDS", "SLOT_WORDS", "MAX_PERMITS", "MAX_SLOTS"]

HEADER_WORDS = 8
SLOT_WORDS = 2
MAX_PERMITS = (1 << 22) - 1
MAX_SLOTS = (1 << 10) - 1

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from *:
    """
    #define BT_SP_HDR 8
    #define BT_SP_CNT ((int64_t)0x3FFFFF)
    #define BT_SP_SLOT_SHIFT 22
    #define BT_SP_SLOT_MASK ((int64_t)0x3FF)
    #define BT_SP_GSEQ_SHIFT 32
    #define BT_SP_GSEQ_MASK ((int64_t)0x7FFFFFFF)
    #define BT_SP_REL ((int64_t)1 << 22)
    #define BT_SP_BUSY ((int64_t)1 << 23)
    #define BT_SP_K_SHIFT 24
    #define BT_SP_K_MASK ((((int64_t)1) << 39) - 1)
    #define BT_SP_H_SEQ_SHIFT 22
    #define BT_SP_H_SEQ_MASK ((((int64_t)1) << 41) - 1)
    """
    const int64_t HDR "BT_SP_HDR"
    const int64_t CNT "BT_SP_CNT"
    const int64_t SLOT_SHIFT "BT_SP_SLOT_SHIFT"
    const int64_t SLOT_MASK "BT_SP_SLOT_MASK"
    const int64_t GSEQ_SHIFT "BT_SP_GSEQ_SHIFT"
    const int64_t GSEQ_MASK "BT_SP_GSEQ_MASK"
    const int64_t REL "BT_SP_REL"
    const int64_t BUSY "BT_SP_BUSY"
    const int64_t K_SHIFT "BT_SP_K_SHIFT"
    const int64_t K_MASK "BT_SP_K_MASK"
    const int64_t H_SEQ_SHIFT "BT_SP_H_SEQ_SHIFT"
    const int64_t H_SEQ_MASK "BT_SP_H_SEQ_MASK"

# step results
cdef enum:
    SP_NO = 0
    SP_YES = 1
    SP_CORRUPT = -1


cdef inline int64_t *sp_h(int64_t *w, int64_t s) noexcept nogil:
    return w + HDR + 2 * (s - 1)


cdef inline int sp_help(int64_t *w, int64_t g, int64_t nslots) noexcept nogil:
    """Complete the op installed in G (= g): apply it to H_s unless applied, then clear the pending mark.
    Lock-free: any process may run it for any other, any number of times, concurrently."""
    cdef int64_t s = (g >> SLOT_SHIFT) & SLOT_MASK
    cdef int64_t i, h, k, amount, held, seq
    if s < 1 or s > nslots:
        return SP_CORRUPT
    i = bt_load(sp_h(w, s) + 1)
    h = bt_load(sp_h(w, s))
    # G unchanged since g: the op was pending while i and h were read (a cleared op never comes back:
    # gseq has moved on), so i is its intent and h's seq is k (not applied) or k + 1 (applied)
    if bt_load(w) != g:
        return SP_YES
    k = (i >> K_SHIFT) & K_MASK
    if ((h >> H_SEQ_SHIFT) & K_MASK) == k:
        amount = i & CNT
        held = (h & CNT) - amount if i & REL else (h & CNT) + amount
        if held < 0 or held > CNT:
            return SP_CORRUPT
        seq = ((h >> H_SEQ_SHIFT) + 1) & H_SEQ_MASK
        bt_cas(sp_h(w, s), h, (seq << H_SEQ_SHIFT) | held)     # fails only if another helper applied it
    bt_cas(w, g, g & ~(SLOT_MASK << SLOT_SHIFT))
    return SP_YES


cdef inline int sp_settle(int64_t *w, int64_t nslots, int64_t *out) noexcept nogil:
    """G with no op pending, in *out (completing the op that is)."""
    cdef int64_t g
    while True:
        g = bt_load(w)
        if not (g & (SLOT_MASK << SLOT_SHIFT)):
            out[0] = g
            return SP_YES
        if sp_help(w, g, nslots) == SP_CORRUPT:
            return SP_CORRUPT


cdef inline int sp_install(int64_t *w, int64_t nslots, int64_t s, int64_t g, int64_t count,
                           int64_t amount, bint release, int64_t busy) noexcept nogil:
    """Write slot s's intent, then install the op in G with one CAS; SP_NO when G moved (retry)."""
    cdef int64_t k = (bt_load(sp_h(w, s)) >> H_SEQ_SHIFT) & K_MASK
    cdef int64_t ng
    bt_store(sp_h(w, s) + 1, busy | (k << K_SHIFT) | (REL if release else 0) | amount)
    ng = ((((g >> GSEQ_SHIFT) + 1) & GSEQ_MASK) << GSEQ_SHIFT) | (s << SLOT_SHIFT) | count
    if not bt_cas(w, g, ng):
        return SP_NO
    if sp_help(w, ng, nslots) == SP_CORRUPT:
        return SP_CORRUPT
    return SP_YES


cdef inline void sp_busy_set(int64_t *w, int64_t s) noexcept nogil:
    """Serialise the threads of this process on slot s (other processes never wait on it)."""
    cdef int64_t *ip = sp_h(w, s) + 1
    cdef int64_t i
    cdef int spins = 0
    while True:
        i = bt_load(ip)
        if not (i & BUSY) and bt_cas(ip, i, i | BUSY):
            return
        spins += 1
        if spins > 64:
            sched_yield()


cdef inline void sp_busy_clear(int64_t *w, int64_t s) noexcept nogil:
    cdef int64_t *ip = sp_h(w, s) + 1
    bt_store(ip, bt_load(ip) & ~BUSY)


cdef inline int sp_acquire(int64_t *w, int64_t nslots, int64_t s, int64_t n, int64_t limit) noexcept nogil:
    """Take n permits for slot s if count + n <= min(limit, LIMIT) (limit < 0: LIMIT alone)."""
    cdef int64_t g = 0, lim
    cdef int r
    cdef bint fenced = False
    sp_busy_set(w, s)
    while True:
        if sp_settle(w, nslots, &g) == SP_CORRUPT:
            r = SP_CORRUPT
            break
        lim = bt_load(w + 1)
        if limit >= 0 and limit < lim:
            lim = limit
        if (g & CNT) + n > lim:
            if fenced:
                r = SP_NO
                break
            bt_fence_seq_cst()      # a waiter's side of the release/wake-up handshake: look once more
            fenced = True
            continue
        r = sp_install(w, nslots, s, g, (g & CNT) + n, n, False, BUSY)
        if r != SP_NO:
            break
    sp_busy_clear(w, s)
    return r


cdef inline int sp_release(int64_t *w, int64_t nslots, int64_t s, int64_t n) noexcept nogil:
    cdef int64_t g = 0
    cdef int r
    sp_busy_set(w, s)
    if (bt_load(sp_h(w, s)) & CNT) < n:
        sp_busy_clear(w, s)
        return SP_NO
    while True:
        if sp_settle(w, nslots, &g) == SP_CORRUPT:
            r = SP_CORRUPT
            break
        if (g & CNT) < n:
            r = SP_CORRUPT
            break
        r = sp_install(w, nslots, s, g, (g & CNT) - n, n, True, BUSY)
        if r != SP_NO:
            break
    sp_busy_clear(w, s)
    bt_fence_after_rmw()
    return r


cdef inline int64_t sp_reclaim(int64_t *w, int64_t nslots, int64_t s, bint own) noexcept nogil:
    """Release everything slot s holds; returns the count, or -1 if the words are corrupt."""
    cdef int64_t g = 0, m, total = 0
    cdef int r = SP_YES
    if own:
        sp_busy_set(w, s)
    while True:
        if sp_settle(w, nslots, &g) == SP_CORRUPT:
            r = SP_CORRUPT
            break
        m = bt_load(sp_h(w, s)) & CNT
        if m == 0:
            break
        if (g & CNT) < m:
            r = SP_CORRUPT
            break
        r = sp_install(w, nslots, s, g, (g & CNT) - m, m, True, BUSY if own else 0)
        if r == SP_CORRUPT:
            break
        if r == SP_YES:
            total += m
    if own:
        sp_busy_clear(w, s)
    else:
        bt_store(sp_h(w, s) + 1, 0)     # a dead slot starts clean for its next owner
    if total:
        bt_fetch_add(w + 2, total)
        bt_fence_after_rmw()
    return -1 if r == SP_CORRUPT else total


cdef object _uninit(obj):
    return RuntimeError(f"{type(obj).__name__} is not initialised: its __init__ was not called "
                        f"(a subclass must call super().__init__())")


cdef object _corrupt(str what):
    return RuntimeError(f"shared permit words are corrupt ({what}): something other than buttress wrote "
                        f"the store; stop its processes and unlink it")


cdef object _view(object words, object nslots):
    """The same checks (types, messages) as the twin's _view; returns the byte memoryview."""
    try:
        mv = memoryview(words)
    except TypeError:
        raise TypeError(f"words must be a writable buffer (an mmap, bytearray or memoryview), "
                        f"got {type(words).__name__}") from None
    if mv.readonly:
        raise TypeError(f"words must be a writable buffer, got a read-only {type(words).__name__}")
    if not mv.c_contiguous:
        raise ValueError("words must be a contiguous buffer")
    need = 8 * (HEADER_WORDS + SLOT_WORDS * nslots)
    if mv.nbytes < need:
        raise ValueError(f"words holds {mv.nbytes} bytes but {nslots} lease slots need {need}")
    raw = mv.cast("B")
    if ctypes.addressof(ctypes.c_char.from_buffer(raw)) % 8:
        raise ValueError("words must start at an 8-byte aligned address")
    return raw[:need]


cdef class SharedPermits:
    """A crash-safe permit counter on int64 words in a store (see buttress._twin.shared)."""
    cdef int64_t *w
    cdef Py_buffer *buf        # a store's words (PyMem_Calloc'd: a Py_buffer member is traversed and cleared by
                               # the GC while exported; the export keeps its owner alive until __dealloc__)
    cdef int64_t ready          # 0 new, 1 initialising, 2 ready (atomic)
    cdef int64_t slot_
    cdef int64_t nslots_
    cdef object locker_
    cdef object on_refused_
    cdef object closed_         # the error of a closed store (ready == 3)
    cdef int64_t closing_       # 1 once _close ran (atomic: one message, written once)
    cdef object __weakref__

    def __init__(self, words, slot, nslots, max_permits, locker=None, on_refused=None):
        cdef int64_t ns = check_int("nslots", nslots, minimum=1, maximum=MAX_SLOTS)
        cdef int64_t sl = check_int("slot", slot, minimum=1, maximum=ns)
        cdef int64_t mp = check_int("max_permits", max_permits, minimum=1, maximum=MAX_PERMITS)
        if locker is not None and not (hasattr(type(locker), "__enter__") and hasattr(type(locker), "__exit__")):
            raise TypeError(f"locker must be None or a context manager, got {type(locker).__name__}")
        if on_refused is not None and not callable(on_refused):
            raise TypeError(f"on_refused must be None or a callable, got {type(on_refused).__name__}")
        raw = _view(words, ns)
        if not bt_cas(&self.ready, 0, 1):
            raise RuntimeError(f"{type(self).__name__} is already initialised")
        try:
            if self.buf == NULL:
                self.buf = <Py_buffer *>PyMem_Calloc(1, sizeof(Py_buffer))
                if self.buf == NULL:
                    raise MemoryError()
            PyObject_GetBuffer(raw, self.buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)
        except BaseException:
            bt_store(&self.ready, 0)
            raise
        self.w = <int64_t *>self.buf.buf
        self.slot_ = sl
        self.nslots_ = ns
        self.locker_ = locker
        self.on_refused_ = on_refused
        bt_cas(self.w + 1, 0, mp)        # new words get their maximum; initialised words keep theirs
        bt_store(&self.ready, 2)

    def __dealloc__(self):
        if bt_load(&self.ready) >= 2:
            PyBuffer_Release(self.buf)
        PyMem_Free(self.buf)

    cdef inline int64_t *_words(self) except NULL:
        if bt_load(&self.ready) != 2:
            if bt_load(&self.ready) == 3:
                raise RuntimeError(self.closed_)
            raise _uninit(self)
        return self.w

    def _close(self, message):
        """Its store closed in this process (before its lease slot is given back): every later op
        raises RuntimeError(message); the words stay referenced until the object goes."""
        msg = str(message)
        if bt_cas(&self.closing_, 0, 1):
            self.closed_ = msg          # before ready: a reader that sees 3 sees the message
            bt_cas(&self.ready, 2, 3)

    cdef inline bint _readable(self) except -1:
        """State reads: True when ready, False before __init__ (they read 0), RuntimeError once closed."""
        cdef int64_t r = bt_load(&self.ready)
        if r == 2:
            return True
        if r == 3:
            raise RuntimeError(self.closed_)
        return False

    cdef bint _try(self, int64_t n, int64_t limit) except -1:
        cdef int64_t *w = self._words()
        cdef int r = sp_acquire(w, self.nslots_, bt_load(&self.slot_), n, limit)
        if r == SP_NO:
            cb = self.on_refused_
            if cb is not None and cb():
                r = sp_acquire(w, self.nslots_, bt_load(&self.slot_), n, limit)
        if r == SP_CORRUPT:
            raise _corrupt("an op could not be completed")
        return r == SP_YES

    def try_acquire(self, n=1):
        """Take n permits if in_use + n <= max_permits (host-wide)."""
        cdef int64_t k
        if type(n) is int and 1 <= n <= MAX_PERMITS:
            k = n
        else:
            k = check_int("n", n, minimum=1, maximum=MAX_PERMITS)
        return self._try(k, -1)

    def try_acquire_within(self, limit, n=1):
        """Take n permits if in_use + n <= min(limit, max_permits): a caller-chosen share of the maximum."""
        cdef int64_t k = check_int("n", n, minimum=1, maximum=MAX_PERMITS)
        limit = check_int("limit", limit, minimum=None)
        self._words()
        if limit < k:
            return False
        return self._try(k, min(limit, MAX_PERMITS))

    def release(self, n=1):
        """Return n permits this process holds; ValueError (nothing changed) if it holds fewer. Once the
        store closed in this process, nothing (the permits of a call admitted before the close: closing
        gave every permit of this process back through the lease table, so the call's own result or
        exception passes through its guard unchanged)."""
        cdef int64_t k
        if type(n) is int and 1 <= n <= MAX_PERMITS:
            k = n
        else:
            k = check_int("n", n, minimum=1, maximum=MAX_PERMITS)
        if bt_load(&self.ready) == 3:
            return
        cdef int64_t *w = self._words()
        cdef int r = sp_release(w, self.nslots_, bt_load(&self.slot_), k)
        if r == SP_YES:
            return
        if bt_load(&self.ready) == 3:
            return              # closed meanwhile: the lease table took this process's permits back
        if r == SP_CORRUPT:
            raise _corrupt("an op could not be completed")
        raise ValueError(f"n={n} permits released but this process holds only "
                         f"{bt_load(sp_h(w, bt_load(&self.slot_))) & CNT}")

    def reclaim(self, slot, dead=True):
        """Give back every permit lease slot `slot` holds and return how many. The caller makes sure the
        slot's process is dead (`dead`; its intent word is then reset for the slot's next owner) or is
        this process closing its lease (dead=False: its threads are serialised as for any op). The store
        does it under its directory lock, so two reclaimers never work on one slot."""
        cdef int64_t *w = self._words()
        cdef int64_t s = check_int("slot", slot, minimum=1, maximum=self.nslots_)
        cdef int64_t r = sp_reclaim(w, self.nslots_, s, not dead)
        if r < 0:
            raise _corrupt("an op could not be completed")
        return r

    def held_by(self, slot):
        """Permits lease slot `slot` holds."""
        cdef int64_t *w = self._words()
        cdef int64_t s = check_int("slot", slot, minimum=1, maximum=self.nslots_)
        cdef int64_t g = 0
        if sp_settle(w, self.nslots_, &g) == SP_CORRUPT:
            raise _corrupt("an op could not be completed")
        return bt_load(sp_h(w, s)) & CNT

    def _set_slot(self, slot):
        """This process's lease slot changed (a forked child registered its own)."""
        self._words()
        bt_store(&self.slot_, check_int("slot", slot, minimum=1, maximum=self.nslots_))

    @property
    def in_use(self):
        if not self._readable():
            return 0
        return bt_load(self.w) & CNT

    @property
    def held(self):
        """Permits this process holds."""
        if not self._readable():
            return 0
        return bt_load(sp_h(self.w, bt_load(&self.slot_))) & CNT

    @property
    def max_permits(self):
        if not self._readable():
            return 0
        return bt_load(self.w + 1)

    @property
    def available(self):
        if not self._readable():
            return 0
        cdef int64_t a = bt_load(self.w + 1) - (bt_load(self.w) & CNT)
        return a if a > 0 else 0

    @property
    def reclaimed(self):
        """Permits taken back from dead lease holders since the words were created."""
        if not self._readable():
            return 0
        return bt_load(self.w + 2)

    @property
    def slot(self):
        return bt_load(&self.slot_)

    @property
    def nslots(self):
        return self.nslots_

    def resize(self, max_permits):
        """Change the host-wide maximum. Shrinking never strands holders."""
        cdef int64_t m = check_int("max_permits", max_permits, minimum=1, maximum=MAX_PERMITS)
        cdef int64_t *w = self._words()
        bt_store(w + 1, m)

    def __repr__(self):
        if bt_load(&self.ready) != 2:
            return f"{type(self).__name__}(<{'closed' if bt_load(&self.ready) == 3 else 'not initialised'}>)"
        return (f"{type(self).__name__}(max_permits={self.max_permits}, in_use={self.in_use}, "
                f"held={self.held}, slot={self.slot})")
