"""``shm://NAME``: one POSIX shared-memory segment per store, shared by the processes of one host.

The segment is the file /dev/shm/buttress.NAME (opened with os.open + mmap, never unlinked behind the
user's back, unlike multiprocessing.shared_memory's resource tracker), with a lock file
/dev/shm/buttress.NAME.lock beside it for fcntl locks. Layout (all int64 words, native byte order):

    header      magic, layout version, size, implementation kind, boot id, lease slots, directory
                capacity, heap pointers, created, ready (written last)
    lease table one 64-byte entry per slot 1..nslots: pid, process start time (/proc/<pid>/stat field 22)
    directory   one 512-byte entry per named object: used, offset, nwords, layout, kind, name, settings
    heap        the objects' words, each object 64-byte aligned

Only the directory (bind), the lease table (open, close, reclaim) and the locked twin's decisions take a
lock; the compiled core's decisions are lock-free CAS on the words. See docs/stores.md.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import mmap
import os
import struct
import sys
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Mapping

from .. import _impl
from . import (Binding, WordStore, canonical_settings, check_kind, check_name, permits_nwords,
               settings_mismatch)

__all__ = ["SharedMemoryStore", "SHM_DIR", "PREFIX", "LAYOUT_VERSION", "segment_path"]

SHM_DIR = "/dev/shm"
PREFIX = "buttress."
LAYOUT_VERSION = 2              # 2: window counters keep their latest window in w[7]
MAGIC = int.from_bytes(b"BUTTRESS", "little")
DEFAULT_SIZE = 1 << 20
DEFAULT_SLOTS = 128
MIN_SIZE = 64 << 10
MAX_SIZE = 1 << 40
KINDS = {1: "atomic", 2: "locked"}
KIND_CODES = {v: k for k, v in KINDS.items()}
LAYOUTS = {"words": 0, "permits": 1}
RECLAIM_INTERVAL = 0.05         # s between two scans of the lease table by one process

# header (byte offsets)
H_MAGIC, H_VERSION, H_SIZE, H_KIND, H_BOOT = 0, 8, 16, 24, 32     # boot id: 16 bytes
H_NSLOTS, H_DIRCAP, H_DIRUSED, H_HEAPNEXT, H_HEAPSTART = 48, 56, 64, 72, 80
H_LEASE, H_DIR, H_CREATED, H_READY = 88, 96, 104, 112
HEADER_SIZE = 256
LEASE_ENTRY = 64                # +0 pid, +8 start time (clock ticks since boot), +16 registered (wall ns)
DIR_ENTRY = 512                 # +0 used, +8 offset, +16 nwords, +24 layout, +32 kind, +64 name, +256 settings
DIR_KIND, DIR_NAME, DIR_SETTINGS = (32, 32), (64, 192), (256, 256)


def segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, PREFIX + name)


def _check_store_name(name: object) -> str:
    name = check_name(name, "name", maximum=200)
    if "/" in name or name in (".", "..") or any(c.isspace() for c in name):
        raise ValueError(f"name must be a segment name without '/' or spaces, got {name!r}")
    return name


def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return bytes(16)


def proc_start_time(pid: int) -> int | None:
    """The start time of live process `pid` (clock ticks after boot, /proc/<pid>/stat field 22), or None
    when it does not exist or is a zombie (killed, not yet reaped): a recycled pid has another start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = data[data.rindex(b")") + 2:].split()
    if rest[0] in (b"Z", b"X", b"x"):
        return None
    return int(rest[19])


def _alive(pid: int, start: int) -> bool:
    try:
        now = proc_start_time(pid)
    except OSError:
        return True             # cannot tell (hidepid, ...): never take a live process's permits
    return now is not None and now == start


# Byte locks on the lock file. Linux open-file-description (OFD) locks belong to the segment's lock-file
# descriptor, not to the process: classic POSIX record locks (lockf) belong to the process, so the
# kernel's deadlock detector sees one process as one owner and fails a wait with EDEADLK on a false cycle
# (process A: thread 1 holds X, thread 2 waits for Y; process B: holds Y, waits for X), an error no caller
# should ever see. Both kinds exclude each other. Threads of one process never share a wait: every byte
# lock is taken under a threading lock of its own first (OFD locks do not exclude one descriptor's users).
# Where OFD locks are missing (not Linux, old kernels) lockf is used and a false EDEADLK is waited out:
# no thread ever waits for a byte lock while holding another except the directory lock's holder, which
# waits for object locks in that one order, so the cycle the kernel reports is one of threads, not real.
_LINUX = sys.platform.startswith("linux")
_F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", -1) if _LINUX else -1
_F_OFD_SETLKW: int = getattr(fcntl, "F_OFD_SETLKW", -1) if _LINUX else -1
_F_OFD_GETLK: int = getattr(fcntl, "F_OFD_GETLK", -1) if _LINUX else -1
_FLOCK = struct.Struct("hhqqi4x")      # struct flock of 64-bit Linux (l_pid 0: required for OFD locks)
_ofd = [min(_F_OFD_SETLKW, _F_OFD_SETLK, _F_OFD_GETLK) >= 0 and _FLOCK.size == 32 and struct.calcsize("P") == 8]
_ofd_probed = [False]


def _probe_ofd(fd: int) -> None:
    """Once, before this process takes its first byte lock: does the kernel have OFD locks (3.15+)? The
    kind never changes afterwards (a lock must be given back by the kind that took it)."""
    if _ofd_probed[0]:
        return
    if _ofd[0]:
        try:
            fcntl.fcntl(fd, _F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                _ofd[0] = False
    _ofd_probed[0] = True


def _byte_lock(fd: int, offset: int) -> None:
    if _ofd[0]:
        fcntl.fcntl(fd, _F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
        return
    delay = 1e-5
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, offset)
            return
        except OSError as exc:
            if exc.errno != errno.EDEADLK:
                raise
        time.sleep(delay)       # a false cycle between threads: the holder is running, not waiting
        delay = min(2 * delay, 1e-3)


def _byte_unlock(fd: int, offset: int) -> None:
    if _ofd[0]:
        fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, offset, 1, 0))
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)


class _ObjLock:
    """The locked twin's lock for one object: a threading.Lock (fcntl locks do not exclude the threads of
    one process) and an fcntl lock on one byte of the lock file (the object's offset)."""

    __slots__ = ("seg", "offset", "tlock")

    def __init__(self, seg: "_Segment", offset: int) -> None:
        self.seg, self.offset, self.tlock = seg, offset, threading.Lock()

    def __enter__(self) -> None:
        self.tlock.acquire()
        try:
            if self.seg.closed:     # every twin object bound to the segment decides under this lock
                raise self.seg.closed_error()
            _byte_lock(self.seg.lockfd, self.offset)
        except BaseException:
            self.tlock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            _byte_unlock(self.seg.lockfd, self.offset)
        finally:
            self.tlock.release()

    def track(self, obj: Any) -> None:
        """A twin object bound to the words at `offset` (see _twin.gcra.track_bound)."""
        self.seg.track(obj)


class _Tracker:
    """What locker() gives the compiled core of an "atomic" segment: no lock (its decisions are lock-free
    CAS), only the hook by which every object bound to the segment's words registers, so that close()
    (or a forked child without a lease) can close it. Entering it is an error: only the twin decides
    under a locker, and the twin never decides on an atomic segment's words."""

    __slots__ = ("seg",)

    def __init__(self, seg: "_Segment") -> None:
        self.seg = seg

    def __enter__(self) -> None:
        raise RuntimeError(f"{self.seg.url} decides with the compiled core (lock-free atomic words): the "
                           f"pure-Python twin cannot decide on its words (open it with implementation='python' "
                           f"for the twin)")

    def __exit__(self, *exc: object) -> None:
        return None

    def track(self, obj: Any) -> None:
        self.seg.track(obj)


class _Segment:
    """One mapped segment, shared by every SharedMemoryStore of that name in this process."""

    def __init__(self, name: str, size: int | None, slots: int | None, impl: str) -> None:
        self.name = name
        self.url = f"shm://{name}"
        self.path = segment_path(name)
        self.lockpath = self.path + ".lock"
        self.impl = impl
        self.kind = "atomic" if impl == "cython" else "locked"
        self.core = _impl.compiled("shared") if impl == "cython" else _impl.twin("shared")
        self.tlock = threading.RLock()
        self.dir_depth = 0
        self.refs = 0
        self.slot = 0
        self.objects: dict[tuple[str, str], tuple[str, int, int]] = {}
        self.lockers: dict[int, _ObjLock] = {}
        self.bound: "weakref.WeakSet[Any]" = weakref.WeakSet()   # every object deciding on its words
        self.tracker = _Tracker(self)
        self.last_scan = 0.0
        self.closing = False        # close() began: an object bound from here on is closed at once
        self.exited = False         # the exit hook gave the lease back: so is a permit counter bound later
        self.closed = False
        self.lockfd = os.open(self.lockpath, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _probe_ofd(self.lockfd)
            with self.dir_lock():
                self._open(size, slots)
                self.slot = self._register()
        except BaseException:
            self._drop()
            raise

    # -- locking ------------------------------------------------------------------------------------
    def dir_lock(self) -> "_DirLock":
        return _DirLock(self)

    # -- words of the header, lease table and directory (under the lock, or single aligned loads) ---
    def rd(self, off: int) -> int:
        return self.words[off >> 3]

    def wr(self, off: int, value: int) -> None:
        self.words[off >> 3] = value

    # -- open / create ------------------------------------------------------------------------------
    def _open(self, size: int | None, slots: int | None) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.fd = fd
        have = os.fstat(fd).st_size
        state = self._inspect(have)
        if state != "ok":
            self._create(size if size is not None else DEFAULT_SIZE, slots if slots is not None else DEFAULT_SLOTS)
            return
        real = self.rd(H_SIZE)
        if size is not None and size != real:
            raise ValueError(f"size={size} but {self.url} was created with size={real} (a segment's size is "
                             f"fixed at creation: stop its processes and unlink() it to change it)")
        nslots = self.rd(H_NSLOTS)
        if slots is not None and slots != nslots:
            raise ValueError(f"slots={slots} but {self.url} was created with slots={nslots} (fixed at "
                             f"creation: stop its processes and unlink() it to change it)")
        self.nslots = nslots
        kind = KINDS.get(self.rd(H_KIND), "?")
        if kind != self.kind:
            self._switch_kind(kind)

    def _map(self, length: int) -> None:
        self.mm = mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.words = memoryview(self.mm).cast("q")

    def _unmap(self) -> None:
        words, mm = getattr(self, "words", None), getattr(self, "mm", None)
        self.words = self.mm = None     # type: ignore[assignment]
        if words is not None:
            words.release()
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass            # core objects still hold its words: it is unmapped when they go

    def _inspect(self, have: int) -> str:
        """'ok' (valid, this layout, this boot), 'new' (empty, never finished, or from an earlier
        boot: safe to initialise) -- or a ValueError for anything else."""
        if have < HEADER_SIZE:
            return "new"
        self._map(have)
        magic, version, ready = self.rd(H_MAGIC), self.rd(H_VERSION), self.rd(H_READY)
        if magic == 0 and ready == 0:
            return "new"                # a creator died before writing the header
        if magic != MAGIC:
            raise ValueError(f"{self.path} is not a buttress segment (magic {magic:#x}): pick another name")
        if version != LAYOUT_VERSION:
            raise ValueError(f"{self.url} has layout version {version}, this buttress reads version "
                             f"{LAYOUT_VERSION}: stop the processes that use it and unlink it "
                             f"(rm {self.path} {self.lockpath}), or use another name")
        if ready != MAGIC:
            return "new"                # a creator died while writing the header: nobody ever used it
        if self.rd(H_SIZE) != have:
            raise ValueError(f"{self.url}: the header says {self.rd(H_SIZE)} bytes but the file has {have}: "
                             f"the segment was changed from outside; unlink it")
        if bytes(self.mm[H_BOOT:H_BOOT + 16]) != _boot_id():
            # monotonic times and leases from an earlier boot mean nothing now, and no process of this
            # boot can have used the segment (the first one to open it, under this lock, re-initialises)
            return "new"
        return "ok"

    def _create(self, size: int, slots: int) -> None:
        self._unmap()
        nslots = slots
        dircap = max(16, min(4096, size // 8192))
        lease = HEADER_SIZE
        directory = _align(lease + LEASE_ENTRY * nslots, 64)
        heap = _align(directory + DIR_ENTRY * dircap, 4096)
        if heap + 4096 > size:
            raise ValueError(f"size={size} is too small for {slots} lease slots and a directory of {dircap} "
                             f"objects: at least {heap + 4096} bytes")
        os.ftruncate(self.fd, 0)        # zero everything a dead creator may have written
        os.ftruncate(self.fd, size)
        self._map(size)
        self.wr(H_VERSION, LAYOUT_VERSION)
        self.wr(H_SIZE, size)
        self.wr(H_KIND, KIND_CODES[self.kind])
        self.mm[H_BOOT:H_BOOT + 16] = _boot_id()
        self.wr(H_NSLOTS, nslots)
        self.wr(H_DIRCAP, dircap)
        self.wr(H_DIRUSED, 0)
        self.wr(H_HEAPSTART, heap)
        self.wr(H_HEAPNEXT, heap)
        self.wr(H_LEASE, lease)
        self.wr(H_DIR, directory)
        self.wr(H_CREATED, time.time_ns())
        self.wr(H_MAGIC, MAGIC)
        self.wr(H_READY, MAGIC)         # last: a segment is valid only once everything above is written
        self.nslots = nslots

    def _switch_kind(self, kind: str) -> None:
        """A segment's implementation kind may change only when no live process holds a lease on it."""
        live = [(s, pid) for s, pid, start in self._leases() if _alive(pid, start)]
        if live:
            pids = ", ".join(str(pid) for _, pid in live[:5])
            mine = ("the compiled core (lock-free atomic words)" if self.kind == "atomic" else
                    "the pure-Python twin (decides under an fcntl lock)")
            theirs = ("the compiled core (lock-free atomic words)" if kind == "atomic" else
                      "the pure-Python twin (decides under an fcntl lock)" if kind == "locked" else
                      f"an unknown implementation kind {self.rd(H_KIND)}")
            raise ValueError(f"{self.url} is in use by {theirs} (pids {pids}) but this process runs {mine}; "
                             f"the two cannot share one segment. Run every process with the same "
                             f"implementation (BUTTRESS_NO_EXTENSIONS, or a build of the compiled core), "
                             f"or use another name")
        for s, _pid, _start in self._leases():
            self._reclaim_slot(s, mark_free=True)
        self.wr(H_KIND, KIND_CODES[self.kind])

    # -- lease table --------------------------------------------------------------------------------
    def _lease_off(self, s: int) -> int:
        return self.rd(H_LEASE) + LEASE_ENTRY * (s - 1)

    def _leases(self) -> list[tuple[int, int, int]]:
        """(slot, pid, start) of every slot with a holder (live or dead)."""
        out = []
        base = self.rd(H_LEASE)
        for s in range(1, self.nslots + 1):
            off = base + LEASE_ENTRY * (s - 1)
            pid = self.rd(off)
            if pid:
                out.append((s, pid, self.rd(off + 8)))
        return out

    def _register(self) -> int:
        """A lease slot for this process (under the directory lock)."""
        pid = os.getpid()
        start = proc_start_time(pid) or 0
        free = 0
        for s in range(1, self.nslots + 1):
            off = self._lease_off(s)
            if self.rd(off) == 0:
                free = s
                break
        if not free:
            for s, spid, sstart in self._leases():
                if not _alive(spid, sstart):
                    self._reclaim_slot(s, mark_free=True)
                    free = s
                    break
        if not free:
            raise ValueError(f"all {self.nslots} lease slots of {self.url} are held by live processes: "
                             f"create the segment with more slots (SharedMemoryStore({self.name!r}, "
                             f"slots={min(1023, 2 * self.nslots)}) or shm://{self.name}?slots=...; "
                             f"at most 1023) after unlinking it")
        off = self._lease_off(free)
        self.wr(off + 8, start)
        self.wr(off + 16, time.time_ns())
        self.wr(off, pid)               # last: the slot is taken once its pid is there
        return free

    def _permit_objects(self) -> list[tuple[int, int]]:
        out = []
        d = self.rd(H_DIR)
        for e in range(self.rd(H_DIRCAP)):
            off = d + DIR_ENTRY * e
            if self.rd(off) and self.rd(off + 24) == LAYOUTS["permits"]:
                out.append((self.rd(off + 8), self.rd(off + 16)))
        return out

    def _attach(self, offset: int, nwords: int) -> Any:
        # the slot given here is never used for an op of its own: reclaim names the slot it works on
        return self.core.SharedPermits(self._slice(offset, nwords), 1, self.nslots, 1, self.locker(offset))

    def _reclaim_slot(self, s: int, mark_free: bool) -> int:
        """Give back every permit slot s holds in every permit counter (under the directory lock; the
        slot's process is dead, or is this one closing)."""
        total = 0
        dead = s != self.slot
        for offset, nwords in self._permit_objects():
            total += self._attach(offset, nwords).reclaim(s, dead)
        if mark_free:
            off = self._lease_off(s)
            self.wr(off, 0)
            self.wr(off + 8, 0)
            self.wr(off + 16, 0)
        return total

    def reclaim(self, force: bool = False) -> int:
        """Take back the permits of dead lease holders. Lock-free look first (throttled to one scan per
        RECLAIM_INTERVAL per process unless `force`); the lock only when a dead holder is found."""
        now = time.monotonic()
        if self.closed or (not force and now - self.last_scan < RECLAIM_INTERVAL):
            return 0
        self.last_scan = now
        dead = [s for s, pid, start in self._leases() if s != self.slot and not _alive(pid, start)]
        if not dead:
            return 0
        total = 0
        with self.dir_lock():
            for s in dead:
                off = self._lease_off(s)
                pid, start = self.rd(off), self.rd(off + 8)
                if pid and not _alive(pid, start):      # still dead, not re-registered meanwhile
                    total += self._reclaim_slot(s, mark_free=True)
        return total

    def dead_slots(self) -> list[int]:
        return [s for s, pid, start in self._leases() if not _alive(pid, start)]

    # -- directory ----------------------------------------------------------------------------------
    def bind(self, kind: str, name: str, settings: Mapping[str, object], nwords: int,
             init: Callable[[Any], None] | None, layout: str) -> Binding:
        check_kind(kind)
        check_name(name, "name")
        text = canonical_settings(settings)
        if isinstance(nwords, bool) or not isinstance(nwords, int) or not 1 <= nwords <= 1 << 28:
            raise ValueError(f"nwords must be an int in [1, 2**28], got {nwords!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        kb, nb, sb = kind.encode(), name.encode(), text.encode()
        if len(sb) >= DIR_SETTINGS[1]:
            raise ValueError(f"settings of {kind} {name!r} take {len(sb)} bytes in canonical form, "
                             f"at most {DIR_SETTINGS[1] - 1}")
        self._check_open()
        with self.dir_lock():
            d, cap = self.rd(H_DIR), self.rd(H_DIRCAP)
            empty = -1
            for e in range(cap):
                off = d + DIR_ENTRY * e
                if not self.rd(off):
                    if empty < 0:
                        empty = e
                    continue
                if self._field(off, DIR_KIND) != kb or self._field(off, DIR_NAME) != nb:
                    continue
                have = self._field(off, DIR_SETTINGS).decode()
                if have != text:
                    raise settings_mismatch(self.url, kind, name, have, text)
                offset, have_words = self.rd(off + 8), self.rd(off + 16)
                if have_words != nwords or self.rd(off + 24) != LAYOUTS[layout]:
                    raise ValueError(f"{kind} {name!r} in {self.url} has {have_words} words of layout "
                                     f"{self.rd(off + 24)}, asked for {nwords} of {layout!r} "
                                     f"(processes of different buttress versions?)")
                return Binding(self._slice(offset, nwords), offset, False)
            need = 8 * nwords
            offset = _align(self.rd(H_HEAPNEXT), 64)
            size = self.rd(H_SIZE)
            if empty < 0 or offset + need > size:
                used = offset - self.rd(H_HEAPSTART)
                suggest = _pow2(2 * (offset + need))
                what = (f"its directory holds {cap} objects" if empty < 0 else
                        f"{kind} {name!r} needs {need} bytes but {max(0, size - offset)} of {size} are free")
                raise ValueError(f"{self.url} is full: {what} ({used} bytes of objects). Pass a larger size= "
                                 f"when the segment is created, e.g. SharedMemoryStore({self.name!r}, "
                                 f"size={suggest}) or shm://{self.name}?size={suggest}; a segment's size is "
                                 f"fixed at creation, so stop its processes and unlink() it first")
            self.wr(H_HEAPNEXT, offset + need)        # first: a crash below leaks space, never shares it
            self.mm[offset:offset + need] = bytes(need)
            buf = self._slice(offset, nwords)
            if init is not None:
                init(buf)
            off = d + DIR_ENTRY * empty
            self.wr(off + 8, offset)
            self.wr(off + 16, nwords)
            self.wr(off + 24, LAYOUTS[layout])
            self._put(off, DIR_KIND, kb)
            self._put(off, DIR_NAME, nb)
            self._put(off, DIR_SETTINGS, sb)
            self.wr(off, 1)                 # last: the entry exists once it is marked used
            self.wr(H_DIRUSED, self.rd(H_DIRUSED) + 1)
            return Binding(buf, offset, True)

    def directory(self) -> list[dict[str, Any]]:
        out = []
        with self.dir_lock():
            d = self.rd(H_DIR)
            for e in range(self.rd(H_DIRCAP)):
                off = d + DIR_ENTRY * e
                if self.rd(off):
                    layout = {v: k for k, v in LAYOUTS.items()}.get(self.rd(off + 24), "?")
                    out.append({"kind": self._field(off, DIR_KIND).decode(),
                                "name": self._field(off, DIR_NAME).decode(),
                                "settings": json.loads(self._field(off, DIR_SETTINGS).decode()),
                                "offset": self.rd(off + 8), "nwords": self.rd(off + 16), "layout": layout})
        return out

    def _slice(self, offset: int, nwords: int) -> memoryview:
        return self.words.cast("B")[offset:offset + 8 * nwords]

    def _field(self, off: int, field: tuple[int, int]) -> bytes:
        raw = bytes(self.mm[off + field[0]:off + field[0] + field[1]])
        return raw.rstrip(b"\0")

    def _put(self, off: int, field: tuple[int, int], data: bytes) -> None:
        self.mm[off + field[0]:off + field[0] + field[1]] = data.ljust(field[1], b"\0")

    def locker(self, offset: int) -> Any:
        if self.kind == "atomic":
            return self.tracker
        with self.tlock:
            lk = self.lockers.get(offset)
            if lk is None:
                lk = self.lockers[offset] = _ObjLock(self, offset)
            return lk

    def track(self, obj: Any) -> None:
        """Remember `obj` (a core object deciding on this segment's words) for close(): it is closed
        with the segment (at once if the segment is closing or closed already)."""
        if not callable(getattr(obj, "_close", None)):
            raise TypeError(f"{type(obj).__name__} cannot be bound to {self.url}: it has no _close(message) "
                            f"(every object deciding on a store's words must refuse once the store closes)")
        with self.tlock:
            late = self.closing or self.closed or (self.exited and hasattr(obj, "_set_slot"))
            if not late:
                try:
                    self.bound.add(obj)
                except TypeError:
                    raise TypeError(f"{type(obj).__name__} cannot be bound to {self.url}: the store keeps weak "
                                    f"references to the objects on its words (give the type __weakref__)") from None
        if late:
            obj._close(str(self.closed_error()))

    def _close_bound(self, holders_only: bool = False) -> None:
        """Every object bound to the segment refuses from now on (one message: closed_error's); with
        `holders_only`, only those that hold permits on this process's lease slot (they have _set_slot)."""
        with self.tlock:
            if holders_only:
                self.exited = True  # a permit counter bound from here on is closed at once too
            else:
                self.closing = True
            objs = [o for o in self.bound if not holders_only or hasattr(o, "_set_slot")]
        message = str(self.closed_error())
        for obj in objs:
            try:
                obj._close(message)
            except Exception:       # noqa: BLE001 - one object's failure must not leave the others open
                pass

    def _check_open(self) -> None:
        if self.closed:
            raise self.closed_error()

    def closed_error(self) -> RuntimeError:
        """The one error of every use of a closed segment: its stores and every object bound to it."""
        err = getattr(self, "fork_error", None)
        return RuntimeError(f"SharedMemoryStore {self.name!r} is closed in this process" +
                            (f" (no lease after fork: {err})" if err else ""))

    # -- close / fork -------------------------------------------------------------------------------
    def release_lease(self) -> None:
        """Give back this process's permits and its lease slot (a clean close)."""
        if self.closed or not self.slot or getattr(self, "words", None) is None:
            return
        try:
            with self.dir_lock():
                off = self._lease_off(self.slot)
                if self.rd(off) == os.getpid():
                    self._reclaim_slot(self.slot, mark_free=True)
        except (OSError, ValueError):
            pass                # the lease table is the crash path's business then

    def close(self) -> None:
        if self.closed:
            return
        # first the objects bound to it refuse every op (one clear error, never an admission on the lease
        # slot given back next), then the slot's permits are given back
        self._close_bound()
        self.release_lease()
        self.closed = True
        # no thread may be between its closed check and its fcntl call when the descriptor goes (EBADF,
        # -1, or a lock on whatever file reuses the number): every byte lock is taken and given back under
        # its threading lock, so passing each of them once waits for the holders; new ones see `closed`
        with self.tlock:
            lockers = list(self.lockers.values())
        for lk in lockers:
            with lk.tlock:
                pass
        with self.tlock:            # the directory lock's holder (it holds tlock) too
            self._drop()

    def _drop(self) -> None:
        self._unmap()
        for fd in (getattr(self, "fd", -1), self.lockfd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self.lockfd = -1

    def after_fork_in_child(self) -> None:
        self.tlock = threading.RLock()
        self.dir_depth = 0
        for lk in self.lockers.values():
            lk.tlock = threading.Lock()
        self.last_scan = 0.0
        if self.closed:
            return
        if _ofd[0] and self.lockfd >= 0:
            # the inherited lock-file descriptor shares its open file description, and so the owner of its
            # OFD locks, with the parent: a lock of the parent would not exclude this process. A description
            # of its own, of the same file (through /proc: the name may be unlinked already, and must never
            # be created again here)
            old = self.lockfd
            try:
                fd = os.open(f"/proc/self/fd/{old}", os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                fd = os.open(self.lockpath, os.O_RDWR | os.O_CLOEXEC)
            self.lockfd = fd
            os.close(old)       # never releases the parent's locks: its descriptor still refers to them
        with self.dir_lock():
            self.slot = self._register()
        for obj in list(self.bound):
            set_slot = getattr(obj, "_set_slot", None)     # permit counters hold their process's slot
            if set_slot is not None:
                set_slot(self.slot)


class _DirLock:
    """The directory lock: this process's RLock, then an fcntl lock on byte 0 of the lock file (the kernel
    drops it when its holder dies, so a crash never leaves it taken)."""

    __slots__ = ("seg",)

    def __init__(self, seg: _Segment) -> None:
        self.seg = seg

    def __enter__(self) -> None:
        seg = self.seg
        seg.tlock.acquire()
        if seg.dir_depth == 0:
            try:
                if seg.lockfd < 0:      # close() dropped it (after marking the segment closed)
                    raise seg.closed_error()
                _byte_lock(seg.lockfd, 0)
            except BaseException:
                seg.tlock.release()
                raise
        seg.dir_depth += 1

    def __exit__(self, *exc: object) -> None:
        seg = self.seg
        seg.dir_depth -= 1
        try:
            if seg.dir_depth == 0:
                _byte_unlock(seg.lockfd, 0)
        finally:
            seg.tlock.release()


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


_segments_lock = threading.Lock()
_segments: dict[str, _Segment] = {}


def _after_fork_in_child() -> None:
    global _segments_lock
    _segments_lock = threading.Lock()
    for seg in list(_segments.values()):
        try:
            seg.after_fork_in_child()
        except Exception as exc:    # noqa: BLE001 - a child without a lease must not use the segment
            seg.fork_error = exc    # type: ignore[attr-defined]
            seg._close_bound()      # never on the parent's lease slot: every bound object refuses
            seg.closed = True


def _close_all() -> None:
    """At interpreter exit: give back this process's permits and lease slots. The permit counters bound
    to a segment are closed first (a later atexit handler or a daemon thread would otherwise take a permit
    on the freed slot, which nobody ever gives back); limiters keep deciding (they hold no lease)."""
    for seg in list(_segments.values()):
        seg._close_bound(holders_only=True)
        seg.release_lease()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all)


class SharedMemoryStore(WordStore):
    """A store in the POSIX shared-memory segment /dev/shm/buttress.NAME, shared by every process of this
    host that opens NAME (``"shm://NAME"``).

    ``size``: bytes, fixed when the segment is created (default 1 MiB; None when opening an existing one
    means "whatever it has"); ``slots``: lease slots (processes that may hold it open at once, default
    128, at most 1023); ``implementation``: "cython" (lock-free, the default where the compiled core is
    built) or "python" (the twin, under locks) -- one segment serves one kind at a time.
    The segment lives until ``unlink()`` (or a reboot): see docs/stores.md for who calls it.
    """

    scheme = "shm"

    def __init__(self, name: str, size: int | None = None, slots: int | None = None,
                 implementation: str | None = None) -> None:
        name = _check_store_name(name)
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int):
                raise TypeError(f"size must be an int (bytes) or None, got {size!r} ({type(size).__name__})")
            if not MIN_SIZE <= size <= MAX_SIZE:
                raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}] bytes, got {size}")
            size = _align(size, 4096)
        if slots is not None:
            if isinstance(slots, bool) or not isinstance(slots, int):
                raise TypeError(f"slots must be an int or None, got {slots!r} ({type(slots).__name__})")
            if not 1 <= slots <= 1023:
                raise ValueError(f"slots must be in [1, 1023], got {slots}")
        from .memory import _impl_name
        self._name = name
        self._closed = False
        path = segment_path(name)
        with _segments_lock:
            seg = _segments.get(path)
            if seg is not None and seg.closed:
                seg = None
            # not given: the implementation this process already opened the segment with, else its own
            impl = _impl_name(seg.impl if implementation is None and seg is not None else implementation)
            if seg is not None:
                if seg.impl != impl:
                    raise ValueError(f"{seg.url} is open in this process with implementation={seg.impl!r}; "
                                     f"implementation={impl!r} cannot share it")
                if size is not None and size != seg.rd(H_SIZE):
                    raise ValueError(f"size={size} but {seg.url} was created with size={seg.rd(H_SIZE)} "
                                     f"(fixed at creation)")
                if slots is not None and slots != seg.nslots:
                    raise ValueError(f"slots={slots} but {seg.url} was created with slots={seg.nslots} "
                                     f"(fixed at creation)")
            else:
                seg = _Segment(name, size, slots, impl)
                _segments[path] = seg
            seg.refs += 1
        self._seg = seg
        self.implementation_kind = seg.kind

    # -- the Store interface ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"shm://{self._name}"

    @property
    def name(self) -> str:
        return self._name

    @property
    def path(self) -> str:
        return self._seg.path

    @property
    def size(self) -> int:
        return self._live().rd(H_SIZE)

    @property
    def slot(self) -> int:
        return self._live().slot

    @property
    def nslots(self) -> int:
        return self._seg.nslots

    @property
    def core(self) -> Any:
        return self._seg.core

    def _live(self) -> _Segment:
        if self._closed:
            raise RuntimeError(f"SharedMemoryStore {self._name!r} is closed")
        seg = self._seg
        if seg.closed:
            raise seg.closed_error()
        return seg

    def bind(self, kind: str, name: str, settings: Mapping[str, object], nwords: int,
             init: Callable[[Any], None] | None = None, layout: str = "words") -> Binding:
        return self._live().bind(kind, name, settings, nwords, init, layout)

    def locker(self, offset: int) -> Any:
        return self._live().locker(offset)

    def permits(self, kind: str, name: str, max_permits: int) -> Any:
        seg = self._live()
        obj = super().permits(kind, name, max_permits)
        seg.track(obj)
        return obj

    def _on_refused(self) -> int:
        seg = self._seg
        return 0 if seg.closed else seg.reclaim()

    def reclaim(self) -> int:
        """Take back now the permits of every dead lease holder; returns how many."""
        return self._live().reclaim(force=True)

    def dead_slots(self) -> list[int]:
        """Lease slots whose process is dead and whose permits were not taken back yet."""
        return self._live().dead_slots()

    def leases(self) -> list[tuple[int, int, bool]]:
        """(slot, pid, alive) for every slot with a holder."""
        return [(s, pid, _alive(pid, start)) for s, pid, start in self._live()._leases()]

    def objects(self) -> list[dict[str, Any]]:
        """The directory: kind, name, settings, offset, nwords and layout of every object."""
        return self._live().directory()

    def close(self) -> None:
        """This handle is done. When the last handle of this process closes, the process gives back its
        permits and its lease slot and unmaps the segment (which stays for the other processes)."""
        if self._closed:
            return
        self._closed = True
        seg = self._seg
        with _segments_lock:
            seg.refs -= 1
            if seg.refs > 0:
                return
            if _segments.get(seg.path) is seg:
                del _segments[seg.path]
        seg.close()

    def unlink(self) -> None:
        """Remove the segment and its lock file from /dev/shm. Processes that still have it mapped keep
        working on the old memory (freed when the last one unmaps it), but new openers create a fresh
        segment: call it only when no process uses the store any more (see docs/stores.md)."""
        for path in (self._seg.path, self._seg.lockpath):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"slot {self._seg.slot}/{self._seg.nslots}, {self._seg.kind}"
        return f"SharedMemoryStore({self._name!r}, {state})"
