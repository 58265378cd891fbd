"""Pure-Python twin of buttress._core.shared: the spec and the fallback.

A crash-safe permit counter whose words live in a store (a shared-memory segment): every process that
holds permits has a lease slot, and the counter keeps, next to the global count, how many permits each
slot holds, so the permits of a process that died (SIGKILL at any instruction) can be taken back exactly.

Words (int64, bit 63 always 0), see docs/stores.md for the full argument:

    w[0]  G      count:22 | pending slot:10 | gseq:31     (bits 0-21, 22-31, 32-62)
    w[1]  LIMIT  max permits (resizable, shared)
    w[2]  RECLAIMED  permits taken back from dead slots (statistics)
    w[3..7] reserved
    w[8 + 2*(s-1)]  H_s  held:22 | slot op seq:41       (bits 0-21, 22-62)
    w[9 + 2*(s-1)]  I_s  amount:22 | release:1 | busy:1 | k:39   (the intent of slot s's op)

An op of slot s (acquire n or release n) is installed by one CAS of G that changes the count and marks
s pending; it is then applied to H_s by anyone who meets it (CAS H_s from seq k to k+1) and the pending
mark is cleared. So at every instant G.count == sum of held + the delta of an installed op not yet applied,
and a process killed anywhere leaves a state that any other process completes.

The compiled core does this lock-free (CAS on the words); this twin runs the same steps under a lock: the
store's ``locker`` (an fcntl byte lock on the store's lock file plus a threading.Lock), so a segment used
by the twin refuses the compiled core and the other way round (the store header's implementation kind).
"""
from __future__ import annotations

import ctypes
import threading
from typing import Any, Callable

from .._params import check_int

__all__ = ["SharedPermits", "HEADER_WORDS", "SLOT_WORDS", "MAX_PERMITS", "MAX_SLOTS"]

HEADER_WORDS = 8
SLOT_WORDS = 2
MAX_PERMITS = (1 << 22) - 1
MAX_SLOTS = (1 << 10) - 1

_CNT = MAX_PERMITS
_SLOT_SHIFT = 22
_SLOT_FIELD = MAX_SLOTS << _SLOT_SHIFT
_GSEQ_SHIFT = 32
_GSEQ_MASK = (1 << 31) - 1
_REL = 1 << 22
_BUSY = 1 << 23
_K_SHIFT = 24
_K_MASK = (1 << 39) - 1
_H_SEQ_SHIFT = 22
_H_SEQ_MASK = (1 << 41) - 1
_W_G, _W_LIMIT, _W_RECLAIMED = 0, 1, 2


def _uninit(obj: object) -> RuntimeError:
    return RuntimeError(f"{type(obj).__name__} is not initialised: its __init__ was not called "
                        f"(a subclass must call super().__init__())")


def _corrupt(what: str) -> RuntimeError:
    return RuntimeError(f"shared permit words are corrupt ({what}): something other than buttress wrote "
                        f"the store; stop its processes and unlink it")


def _view(words: object, nslots: int) -> memoryview:
    """`words` as int64 words: a writable, contiguous, 8-byte aligned buffer of enough bytes."""
    try:
        mv = memoryview(words)      # type: ignore[arg-type]
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
    return raw[:need].cast("q")


# ---- the steps on the words (the compiled core does the same with CAS; here they run under the lock) ----

def _cas(w: memoryview, i: int, old: int, new: int) -> bool:
    if w[i] != old:
        return False
    w[i] = new
    return True


def _help(w: memoryview, g: int, nslots: int) -> None:
    """Complete the op installed in G (= g): apply it to H_s unless applied, then clear the pending mark."""
    s = (g >> _SLOT_SHIFT) & MAX_SLOTS
    if not 1 <= s <= nslots:
        raise _corrupt(f"pending slot {s} outside 1..{nslots}")
    hi = HEADER_WORDS + SLOT_WORDS * (s - 1)
    i = w[hi + 1]
    h = w[hi]
    if w[_W_G] != g:            # someone completed it (a cleared op never comes back: gseq moved on)
        return
    k = (i >> _K_SHIFT) & _K_MASK
    if ((h >> _H_SEQ_SHIFT) & _K_MASK) == k:        # not applied yet
        amount = i & _CNT
        held = (h & _CNT) - amount if i & _REL else (h & _CNT) + amount
        if not 0 <= held <= _CNT:
            raise _corrupt(f"slot {s} would hold {held}")
        seq = ((h >> _H_SEQ_SHIFT) + 1) & _H_SEQ_MASK
        _cas(w, hi, h, (seq << _H_SEQ_SHIFT) | held)
    _cas(w, _W_G, g, g & ~_SLOT_FIELD)


def _settle(w: memoryview, nslots: int) -> int:
    """G with no op pending (completing the one that is)."""
    while True:
        g = w[_W_G]
        if not g & _SLOT_FIELD:
            return g
        _help(w, g, nslots)


def _install(w: memoryview, nslots: int, s: int, g: int, count: int, amount: int, release: bool,
             busy: int) -> bool:
    hi = HEADER_WORDS + SLOT_WORDS * (s - 1)
    k = (w[hi] >> _H_SEQ_SHIFT) & _K_MASK
    w[hi + 1] = busy | (k << _K_SHIFT) | (_REL if release else 0) | amount
    ng = ((((g >> _GSEQ_SHIFT) + 1) & _GSEQ_MASK) << _GSEQ_SHIFT) | (s << _SLOT_SHIFT) | count
    if not _cas(w, _W_G, g, ng):
        return False
    _help(w, ng, nslots)
    return True


def _busy_set(w: memoryview, s: int) -> None:
    # under the lock nobody else of this kind is inside an op: a busy bit found set is stale (an op
    # interrupted by an exception or a crash) and is simply taken over
    ii = HEADER_WORDS + SLOT_WORDS * (s - 1) + 1
    w[ii] = w[ii] | _BUSY


def _busy_clear(w: memoryview, s: int) -> None:
    ii = HEADER_WORDS + SLOT_WORDS * (s - 1) + 1
    w[ii] = w[ii] & ~_BUSY


def _acquire(w: memoryview, nslots: int, s: int, n: int, limit: int | None) -> bool:
    _busy_set(w, s)
    try:
        while True:
            g = _settle(w, nslots)
            lim = w[_W_LIMIT]
            if limit is not None and limit < lim:
                lim = limit
            if (g & _CNT) + n > lim:
                return False
            if _install(w, nslots, s, g, (g & _CNT) + n, n, False, _BUSY):
                return True
    finally:
        _busy_clear(w, s)


def _release(w: memoryview, nslots: int, s: int, n: int) -> bool:
    _busy_set(w, s)
    try:
        if w[HEADER_WORDS + SLOT_WORDS * (s - 1)] & _CNT < n:
            return False
        while True:
            g = _settle(w, nslots)
            if g & _CNT < n:
                raise _corrupt(f"count {g & _CNT} below what slot {s} holds")
            if _install(w, nslots, s, g, (g & _CNT) - n, n, True, _BUSY):
                return True
    finally:
        _busy_clear(w, s)


def _reclaim(w: memoryview, nslots: int, s: int, own: bool) -> int:
    """Release everything slot s holds (its process is dead, or is this one at close)."""
    total = 0
    if own:
        _busy_set(w, s)
    hi = HEADER_WORDS + SLOT_WORDS * (s - 1)
    try:
        while True:
            g = _settle(w, nslots)
            m = w[hi] & _CNT
            if m == 0:
                break
            if g & _CNT < m:
                raise _corrupt(f"count {g & _CNT} below what slot {s} holds")
            if _install(w, nslots, s, g, (g & _CNT) - m, m, True, _BUSY if own else 0):
                total += m
    finally:
        if own:
            _busy_clear(w, s)
        else:
            w[hi + 1] = 0       # a dead slot starts clean for its next owner
    if total:
        w[_W_RECLAIMED] = w[_W_RECLAIMED] + total
    return total


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class SharedPermits:
    """A crash-safe permit counter on int64 words in a store (see the module doc).

    ``words``: a writable buffer of at least 8 * (HEADER_WORDS + SLOT_WORDS * nslots) bytes (zeroed when
    new); ``slot``: this process's lease slot in 1..nslots; ``max_permits`` initialises new words (words
    already initialised keep their maximum); ``locker``: the context manager the twin decides under (the
    compiled core, lock-free, ignores it); ``on_refused``: called (no arguments) when an acquisition is
    refused; when it returns a true value (permits of dead holders were taken back) the acquisition is
    tried once more.
    """

    _w: memoryview | None = None
    _slot = 0
    _nslots = 0
    _closed: str | None = None

    def __init__(self, words: Any, slot: int, nslots: int, max_permits: int, locker: Any = None,
                 on_refused: Callable[[], object] | None = None) -> None:
        nslots = check_int("nslots", nslots, minimum=1, maximum=MAX_SLOTS)
        slot = check_int("slot", slot, minimum=1, maximum=nslots)
        max_permits = check_int("max_permits", max_permits, minimum=1, maximum=MAX_PERMITS)
        if locker is not None and not (hasattr(type(locker), "__enter__") and hasattr(type(locker), "__exit__")):
            raise TypeError(f"locker must be None or a context manager, got {type(locker).__name__}")
        if on_refused is not None and not callable(on_refused):
            raise TypeError(f"on_refused must be None or a callable, got {type(on_refused).__name__}")
        w = _view(words, nslots)
        if self._w is not None or self._closed is not None:
            raise RuntimeError(f"{type(self).__name__} is already initialised")
        self._lock: Any = threading.Lock() if locker is None else _NoLock()
        self._locker: Any = _NoLock() if locker is None else locker
        self._on_refused = on_refused
        self._slot = slot
        self._nslots = nslots
        with self._lock, self._locker:
            if w[_W_LIMIT] == 0:
                w[_W_LIMIT] = max_permits
        self._w = w

    def _words(self) -> memoryview:
        w = self._w
        if w is None:
            if self._closed is not None:
                raise RuntimeError(self._closed)
            raise _uninit(self)
        return w

    def _close(self, message: str) -> None:
        """Its store closed in this process (before its lease slot is given back): every later op
        raises RuntimeError(message); the words stay referenced until the object goes. Under the
        object's locks when they can be taken (an op in flight on another thread ends first); a forked
        child's segment that is already closed refuses its lock, and the child has one thread."""
        message = str(message)
        try:
            with self._lock, self._locker:
                self._close_now(message)
        except RuntimeError:
            self._close_now(message)

    def _close_now(self, message: str) -> None:
        if self._w is not None and self._closed is None:
            self._closed = message
            self._w = None

    def _readable(self) -> memoryview | None:
        """State reads: the words when ready, None before __init__ (they read 0), RuntimeError once closed."""
        w = self._w
        if w is None and self._closed is not None:
            raise RuntimeError(self._closed)
        return w

    def _try(self, n: int, limit: int | None) -> bool:
        self._words()
        with self._lock, self._locker:
            if _acquire(self._words(), self._nslots, self._slot, n, limit):    # under the lock: not closed
                return True
        cb = self._on_refused
        if cb is not None and cb():
            with self._lock, self._locker:
                return _acquire(self._words(), self._nslots, self._slot, n, limit)
        return False

    def try_acquire(self, n: int = 1) -> bool:
        """Take n permits if in_use + n <= max_permits (host-wide)."""
        n = check_int("n", n, minimum=1, maximum=MAX_PERMITS)
        return self._try(n, None)

    def try_acquire_within(self, limit: int, n: int = 1) -> bool:
        """Take n permits if in_use + n <= min(limit, max_permits): a caller-chosen share of the maximum."""
        n = check_int("n", n, minimum=1, maximum=MAX_PERMITS)
        limit = check_int("limit", limit, minimum=None)
        self._words()
        if limit < n:
            return False
        return self._try(n, min(limit, MAX_PERMITS))

    def release(self, n: int = 1) -> None:
        """Return n permits this process holds; ValueError (nothing changed) if it holds fewer. Once the
        store closed in this process, nothing (the permits of a call admitted before the close: closing
        gave every permit of this process back through the lease table, so the call's own result or
        exception passes through its guard unchanged)."""
        n = check_int("n", n, minimum=1, maximum=MAX_PERMITS)
        if self._closed is not None:
            return
        self._words()
        try:
            with self._lock, self._locker:
                w = self._w
                if w is None:
                    return      # closed meanwhile (_close takes these locks)
                if _release(w, self._nslots, self._slot, n):
                    return
                held = w[HEADER_WORDS + SLOT_WORDS * (self._slot - 1)] & _CNT
        except RuntimeError:
            if self._closed is not None:
                return          # the segment refused its lock: it closed after the check above
            raise
        raise ValueError(f"n={n} permits released but this process holds only {held}")

    def reclaim(self, slot: int, dead: bool = True) -> int:
        """Give back every permit lease slot `slot` holds and return how many. The caller makes sure the
        slot's process is dead (`dead`; its intent word is then reset for the slot's next owner) or is
        this process closing its lease (dead=False: its threads are serialised as for any op). The store
        does it under its directory lock, so two reclaimers never work on one slot."""
        w = self._words()
        slot = check_int("slot", slot, minimum=1, maximum=self._nslots)
        with self._lock, self._locker:
            return _reclaim(w, self._nslots, slot, not dead)

    def held_by(self, slot: int) -> int:
        """Permits lease slot `slot` holds."""
        w = self._words()
        slot = check_int("slot", slot, minimum=1, maximum=self._nslots)
        with self._lock, self._locker:
            _settle(w, self._nslots)
            return w[HEADER_WORDS + SLOT_WORDS * (slot - 1)] & _CNT

    def _set_slot(self, slot: int) -> None:
        """This process's lease slot changed (a forked child registered its own)."""
        self._words()
        self._slot = check_int("slot", slot, minimum=1, maximum=self._nslots)

    @property
    def in_use(self) -> int:
        w = self._readable()
        return 0 if w is None else w[_W_G] & _CNT

    @property
    def held(self) -> int:
        """Permits this process holds."""
        w = self._readable()
        return 0 if w is None else w[HEADER_WORDS + SLOT_WORDS * (self._slot - 1)] & _CNT

    @property
    def max_permits(self) -> int:
        w = self._readable()
        return 0 if w is None else w[_W_LIMIT]

    @property
    def available(self) -> int:
        w = self._readable()
        if w is None:
            return 0
        return max(0, w[_W_LIMIT] - (w[_W_G] & _CNT))

    @property
    def reclaimed(self) -> int:
        """Permits taken back from dead lease holders since the words were created."""
        w = self._readable()
        return 0 if w is None else w[_W_RECLAIMED]

    @property
    def slot(self) -> int:
        return self._slot

    @property
    def nslots(self) -> int:
        return self._nslots

    def resize(self, max_permits: int) -> None:
        """Change the host-wide maximum. Shrinking never strands holders."""
        max_permits = check_int("max_permits", max_permits, minimum=1, maximum=MAX_PERMITS)
        w = self._words()
        with self._lock, self._locker:
            w[_W_LIMIT] = max_permits

    def __repr__(self) -> str:
        if self._w is None:
            return f"{type(self).__name__}(<{'closed' if self._closed is not None else 'not initialised'}>)"
        return (f"{type(self).__name__}(max_permits={self.max_permits}, in_use={self.in_use}, "
                f"held={self.held}, slot={self._slot})")
