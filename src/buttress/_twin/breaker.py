"""Pure-Python twin of buttress._core.breaker: the circuit-breaker state machine, the spec.

The core decides and records; it never sleeps. `acquire()` returns a token (generation << 1 |
half-open bit) or -1; `record(token, outcome, start)` applies a result. Results whose generation
has passed are dropped. Events go to `hook(kind, a, b)` only when a hook is set. Times are int ns:
any int64 (None reads the clock); deadlines and durations saturate to the int64 range.

Outcomes (DESIGN §3c): anything that is not an Exception, and a UsageError (buttress refusing a wrong
use), is no outcome (the permit is returned); buttress's own rejections (`Rejected`, from inner stages)
are ignored unless `record` names their class. The classic breaker (failure_threshold > 0) counts
consecutive failures in CLOSED and consecutive successes in HALF_OPEN instead of rates.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import threading
import time
import types
import weakref
from typing import Any, Callable, Literal

from .._breaker_conf import (COUNT_WINDOW_MAX, DEFAULTS, State, breaker_conf, guard_astream, guard_stream,
                             open_duration_ns)
from .._params import check_int, describe
from .._spec import UsageError
from .._wrap import lazy_result, refuse_sync_result, sync_in_async
from ..errors import CircuitOpenError, Rejected
from .gcra import as_i64, track_bound, words_view
from .guard import _RUN, _VALUE, GuardedAwaitable, _raising, exit_args, exit_signature
from .state import Uninit

__all__ = ["BreakerCore", "Permit", "Guarded", "SUCCESS", "FAILURE", "IGNORED", "CANCELLED", "HEADER_WORDS", "REMOTE"]

log = logging.getLogger("buttress.circuit_breaker")

SUCCESS, FAILURE, IGNORED, CANCELLED = 0, 1, 2, 3
_CLOSED, _OPEN, _HALF_OPEN, _FORCED_OPEN, _DISABLED, _METRICS_ONLY = range(6)


_SYNC_STREAM = ("{cls}.call_async: {fn} is a generator function, not async: use the sync form (call, or the "
                "decorator), which guards its whole iteration")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_PERMIT_NEW = "Permit cannot be created directly; get one from CircuitBreaker.try_acquire()"
_GUARDED_NEW = ("Guarded cannot be created directly; get one from CircuitBreaker.guard(fn) or by decorating "
                "a function")


def _sat(v: int) -> int:
    """v clamped to the int64 range (what the compiled core's saturating arithmetic gives)."""
    return _INT64_MAX if v > _INT64_MAX else _INT64_MIN if v < _INT64_MIN else v


def _deadline(now: int, d: int) -> int:
    """now + d; one past int64 saturates to _INT64_MAX, which is never due (saturation must mean "not
    yet", never "now"). d == 0 is due at once, also at the last int64 reading."""
    t = _sat(now + d)
    return _INT64_MAX - 1 if t == _INT64_MAX and d == 0 else t


def _due(now: int, deadline: int) -> bool:
    return deadline != _INT64_MAX and now >= deadline


def _is_coroutine_gen(gen: Any) -> bool:
    """A generator-based coroutine (@types.coroutine): awaitable, not a stream."""
    return bool(gen.gi_code.co_flags & inspect.CO_ITERABLE_COROUTINE)


def _zero() -> int:
    return 0


# -- `with cb:` / `async with cb:` records (the compiled core's per-breaker frame dict) --------------------------
# Each __enter__ records [token, start, thread id, context key] in the breaker's `_wheld` dict under the
# caller's frame (frame -> that frame's records, latest last); __exit__ takes the latest record of its own
# frame (a generator / coroutine keeps its frame whichever thread or task resumes or finalises it), else the
# latest record of this thread and the current context (frames in the order their first record came) (contextlib.ExitStack enters and exits from frames of
# its own), else nothing (a no-op). The compiled core keys the fallback on the current contextvars.Context
# object, which Python code cannot name: the twin uses what a context stands for here: the running asyncio
# task (held weakly); in a loop callback outside a task (each runs in a context copy of its own), the Handle
# running it (held weakly; found on the stack); else the thread (None). A record whose frame finished and
# whose context is gone (the task collected, the callback over, the thread ended) can never be exited: it
# gives its permit back (no outcome) when an exit finds no record, or when the dict reaches `_sweep_at`
# frames (then set to twice what is left, at least 8), as the compiled core does.


class _Callback:
    """The context key of an acquisition in a loop callback (no task): the asyncio Handle running it, held
    weakly (its context is the callback's); none found (another loop): matches nothing else."""
    __slots__ = ("handle",)

    def __init__(self, handle: Any) -> None:
        self.handle = None if handle is None else weakref.ref(handle)


_HANDLE_RUN = asyncio.events.Handle._run.__code__


def _running_handle() -> Any:
    f: Any = sys._getframe(2)
    while f is not None:
        if f.f_code is _HANDLE_RUN:
            return f.f_locals.get("self")
        f = f.f_back
    return None


def _context_key() -> Any:
    loop = asyncio._get_running_loop()
    if loop is None:
        return None
    task = asyncio.current_task(loop)
    return _Callback(_running_handle()) if task is None else weakref.ref(task)


def _key_matches(key: Any, now: Any) -> bool:
    if key is None or now is None:
        return key is now
    if type(key) is _Callback:
        return (type(now) is _Callback and key.handle is not None and now.handle is not None
                and key.handle() is not None and key.handle() is now.handle())
    return type(key) is weakref.ref and type(now) is weakref.ref and key() is not None and key() is now()


def _key_dead(key: Any, tid: int) -> bool:
    if key is None:
        return not any(t.ident == tid for t in threading.enumerate())
    if type(key) is _Callback:
        # gone, or over: a callback no longer running in this thread is never current again (its record's
        # frame, Handle._run's, keeps the Handle itself alive)
        h = None if key.handle is None else key.handle()
        return h is None or (tid == threading.get_ident() and h is not _running_handle())
    return key() is None


def _frame_finished(frame: Any) -> bool:
    from .guard import _frame_finished as finished     # StageBase's test (a frame that no longer runs)
    return frame is None or finished(frame)

# -- the words (the compiled core's layout: see _core/breaker.pyx, bwords_t) ---------------------------------
HEADER_WORDS = 24
REMOTE = 1 << 62             # a token issued by a store's shared breaker (Redis), not by the words
_MAGIC = 0x4254425245414B31  # "BTBREAK1", written last by init_words
(_W_WORD, _W_SINCE, _W_UNTIL, _W_ATTEMPT, _W_NOT_PERMITTED, _W_METRICS_HALF, _W_TW_MARK, _W_CLOSED_GUARD,
 _W_HALF_GUARD, _W_CONS, _W_HALF_HEAD, _W_HALF_PACKED, _W_CLOSED_HEAD, _W_CLOSED_PACKED, _W_STOLEN,
 _W_MAGIC) = (0, 1, 5, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21)
_GEN_SHIFT, _FLIGHT_SHIFT, _MAX_FLIGHT = 24, 4, 0xFFFFF
_WG_SHIFT, _WG_CLOSED = 20, (1 << 43) - 1
_BIAS = 0x8000
_TW_FIELDS = 4
_TW_BITS = 28                # count bits of a 1 s bucket word (bt_window.pxd: clamp(bit_length(1e9), 16, 28))
_TW_BIAS = 1 << (63 - _TW_BITS)
_TW_EMAX = _TW_BIAS - 1
_TW_CMAX = (1 << _TW_BITS) - 1
_U64 = (1 << 64) - 1


def _i64(v: int) -> int:
    """An unsigned 64-bit pattern as the int64 a word holds."""
    v &= _U64
    return v - (1 << 64) if v >> 63 else v


_EMPTY_PACKED = _i64(_BIAS | _BIAS << 16 | _BIAS << 32 | _BIAS << 48)   # as the int64 word holds it


def _words_needed(window_size: int, time_window: bool, half_calls: int) -> int:
    n = HEADER_WORDS + (window_size * _TW_FIELDS if time_window else window_size) + half_calls
    return (n + 7) & ~7


class _WordCountWindow:
    """A count window on words (ring of outcome codes, a head, one packed word of four biased 16-bit
    counters), the compiled cw_record's layout; used under the store's lock."""

    def __init__(self, w: memoryview, head: int, packed: int, slots: int, size: int) -> None:
        self.w, self.head, self.packed, self.slots, self.size = w, head, packed, slots, size

    def reset(self) -> None:
        w = self.w
        for i in range(self.slots, self.slots + self.size):
            w[i] = 0
        w[self.head] = 0
        w[self.packed] = _EMPTY_PACKED

    def record(self, failed: bool, slow: bool, now: int) -> None:
        w = self.w
        code = 1 | (failed << 1) | (slow << 2)
        seq = w[self.head]
        w[self.head] = seq + 1
        i = self.slots + seq % self.size
        old = w[i]
        w[i] = code
        p = w[self.packed] & _U64
        f = [((p >> (16 * j)) & 0xFFFF) for j in range(4)]
        for c, d in ((old, -1), (code, 1)):
            if c:
                f[0] += d
                f[1] += d * bool(c & 2)
                f[2] += d * bool(c & 4)
                f[3] += d * ((c & 6) == 6)
        w[self.packed] = _i64(f[0] | f[1] << 16 | f[2] << 32 | f[3] << 48)

    def snapshot(self, now: int) -> tuple[int, int, int, int]:
        p = self.w[self.packed] & _U64
        f = [max(0, ((p >> (16 * j)) & 0xFFFF) - _BIAS) for j in range(4)]
        return (f[0], f[1], f[2], f[3])


class _WordTimeWindow:
    """A time window of 1 s buckets on words, each counter one word (epoch | count), the compiled
    tw_add / tw_read_bucket's layout (base 0: every int64 reading has its exact epoch)."""

    def __init__(self, w: memoryview, start: int, nbuckets: int) -> None:
        self.w, self.start, self.n = w, start, nbuckets

    def reset(self) -> None:
        for i in range(self.start, self.start + self.n * _TW_FIELDS):
            self.w[i] = 0

    @staticmethod
    def _epoch(now: int) -> int:
        return max(-_TW_EMAX, min(_TW_EMAX, now // 1_000_000_000))

    def _add(self, i: int, epoch: int) -> int:
        w = self.w
        old = w[i] & _U64
        count, uo, u = old & _TW_CMAX, old >> _TW_BITS, epoch + _TW_BIAS
        if count == 0 or uo < u:
            w[i] = _i64((u << _TW_BITS) | 1)
            uo = u
        elif count < _TW_CMAX:
            w[i] = _i64(old + 1)
        return uo - _TW_BIAS

    def record(self, failed: bool, slow: bool, now: int) -> None:
        epoch = self._epoch(now)
        b = self.start + (epoch % self.n) * _TW_FIELDS
        epoch = self._add(b, epoch)
        if failed:
            self._add(b + 1, epoch)
        if slow:
            self._add(b + 2, epoch)

    def snapshot(self, now: int) -> tuple[int, int, int, int]:
        u = self._epoch(now) + _TW_BIAS
        out = [0, 0, 0, 0]
        w = self.w
        for k in range(self.n):
            b = self.start + k * _TW_FIELDS
            w0 = w[b] & _U64
            count, uo = w0 & _TW_CMAX, w0 >> _TW_BITS
            if count == 0 or not (uo <= u < uo + self.n):
                continue
            out[0] += count
            for j in (1, 2):
                x = w[b + j] & _U64
                if x >> _TW_BITS == uo:
                    out[j] += x & _TW_CMAX
        return (out[0], out[1], out[2], out[3])


class _SharedLock:
    """The twin's lock over words in a store: re-entrant in this thread (listeners may call back), the
    store's lock (an fcntl byte lock + a threading.Lock) once at the outermost level, where the state is
    read from the words on entry and written back on exit (the state word last: a process killed while
    writing leaves the previous state word, every word a whole int64)."""

    __slots__ = ("core", "rlock", "locker", "depth")

    def __init__(self, core: "BreakerCore", locker: Any) -> None:
        self.core, self.rlock, self.locker, self.depth = core, threading.RLock(), locker, 0

    def __enter__(self) -> None:
        self.rlock.acquire()
        if self.depth == 0:
            try:
                self.locker.__enter__()
            except BaseException:
                self.rlock.release()
                raise
            try:
                self.core._pull()
            except BaseException:
                self.locker.__exit__(None, None, None)
                self.rlock.release()
                raise
        self.depth += 1

    def __exit__(self, *exc: Any) -> None:
        self.depth -= 1
        try:
            if self.depth == 0:
                try:
                    self.core._push()
                finally:
                    self.locker.__exit__(None, None, None)
        finally:
            self.rlock.release()


class _Window:
    """Counts of the last `size` outcomes (count window) or of `size` one-second buckets."""

    def __init__(self, size: int, time_based: bool) -> None:
        from .window import CountWindow, TimeWindow
        # 1 s buckets: every int64 reading has an exact epoch (no base, no saturation)
        self.w: Any = TimeWindow(size, 1_000_000_000, _zero) if time_based else CountWindow(size)
        self.time_based = time_based

    def record(self, failed: bool, slow: bool, now: int) -> None:
        if self.time_based:
            self.w.record(failed, slow, now)
        else:
            self.w.record(failed, slow)

    def snapshot(self, now: int) -> tuple[int, int, int, int]:
        counts: tuple[int, int, int, int] = self.w.snapshot(now) if self.time_based else self.w.snapshot()
        return counts


_D = DEFAULTS


class BreakerCore(Uninit):
    def __init__(self, name: str = "default", failure_rate_threshold: float = _D["failure_rate_threshold"],
                 slow_call_rate_threshold: float = _D["slow_call_rate_threshold"],
                 slow_call_duration: float | None = _D["slow_call_duration"], window: str = _D["window"],
                 window_size: int = _D["window_size"], minimum_calls: int = _D["minimum_calls"],
                 open_duration: Any = _D["open_duration"], half_open_calls: int = _D["half_open_calls"],
                 half_open_max_wait: float | None = None, record: Any = (Exception,), ignore: Any = (),
                 record_result: Any = None, clock_ns: Callable[[], int] | None = None,
                 failure_threshold: int | None = None, success_threshold: int | None = None,
                 timeout: float | None = None, words: Any = None, locker: Any = None) -> None:
        self._init_once()
        c = breaker_conf(name, failure_rate_threshold, slow_call_rate_threshold, slow_call_duration,
                         window, window_size, minimum_calls, open_duration, half_open_calls,
                         half_open_max_wait, record, ignore, record_result, clock_ns, failure_threshold,
                         success_threshold, timeout)
        if locker is not None and not (hasattr(type(locker), "__enter__") and hasattr(type(locker), "__exit__")):
            raise TypeError(f"locker must be None or a context manager, got {type(locker).__name__}")
        self._remote: Any = None
        self._wv: memoryview | None = None
        if words is not None:
            wv = words_view(words, _words_needed(c.window_size, c.time_window, c.half_open_calls),
                            "a circuit breaker").cast("q")
            if wv[_W_MAGIC] != _MAGIC:
                raise ValueError("words are not a breaker's: write them with BreakerCore.init_words() first "
                                 "(a store's bind(init=...) does that once, when it creates them)")
            self._wv = wv
        self._conf = c
        self._name = c.name
        self._clock_ns = c.clock_ns
        self._state, self._gen = _CLOSED, 0
        self._since = self._now(None)
        self._until = 0              # OPEN: when it may admit again
        self._flight = 0             # half-open permits out
        self._attempt = 0
        self._closed: Any = _Window(c.window_size, c.time_window)    # or a word window (same methods)
        self._cons = 0               # classic: consecutive failures recorded in CLOSED / METRICS_ONLY
        self._half: Any = _Window(c.half_open_calls, False)
        self._metrics_half = False   # metrics() reads the half-open window (after it tripped the breaker)
        self._not_permitted = 0
        self._hook: Callable[[str, Any, Any], None] | None = None
        self._wheld: dict[Any, list[list[Any]]] = {}    # `with` records: frame -> records, latest last
        self._held_lock = threading.Lock()
        self._sweep_at = 8
        if self._wv is not None:
            wv, closed_n = self._wv, c.window_size * (_TW_FIELDS if c.time_window else 1)
            self._closed = (_WordTimeWindow(wv, HEADER_WORDS, c.window_size) if c.time_window else
                            _WordCountWindow(wv, _W_CLOSED_HEAD, _W_CLOSED_PACKED, HEADER_WORDS, c.window_size))
            self._half = _WordCountWindow(wv, _W_HALF_HEAD, _W_HALF_PACKED, HEADER_WORDS + closed_n,
                                          c.half_open_calls)
            self._pushed = -1
            self._lock: Any = _SharedLock(self, threading.Lock() if locker is None else locker)
            if locker is not None:
                track_bound(self, locker)       # the store can close it (_close); last: may close it at once
        else:
            self._lock = threading.RLock()

    # -- words in a store (the twin decides on them under the store's lock) ----------------------------------
    @staticmethod
    def words_needed(window_size: int, time_window: bool, half_open_calls: int) -> int:
        """int64 words of a breaker's state (rounded up to whole 64-byte lines)."""
        ws = check_int("window_size", window_size, minimum=1, maximum=COUNT_WINDOW_MAX)
        hc = check_int("half_open_calls", half_open_calls, minimum=1, maximum=COUNT_WINDOW_MAX)
        return _words_needed(ws, bool(time_window), hc)

    @staticmethod
    def init_words(words: Any, window_size: int, time_window: bool, half_open_calls: int, now: int) -> None:
        """Write the words of a new breaker into `words` (CLOSED generation 0, begun at `now` ns)."""
        ws = check_int("window_size", window_size, minimum=1, maximum=COUNT_WINDOW_MAX)
        hc = check_int("half_open_calls", half_open_calls, minimum=1, maximum=COUNT_WINDOW_MAX)
        tw = bool(time_window)
        t = as_i64(now, "now")
        w = words_view(words, _words_needed(ws, tw, hc), "a circuit breaker").cast("q")
        for i in range(HEADER_WORDS, HEADER_WORDS + (ws * _TW_FIELDS if tw else ws) + hc):
            w[i] = 0
        for i, v in ((_W_WORD, 0), (_W_SINCE, -1), (_W_SINCE + 1, t), (_W_SINCE + 2, -1), (_W_SINCE + 3, 0),
                     (_W_UNTIL, -1), (_W_UNTIL + 1, 0), (_W_UNTIL + 2, -1), (_W_UNTIL + 3, 0), (_W_ATTEMPT, 0),
                     (_W_NOT_PERMITTED, 0), (_W_METRICS_HALF, 0), (_W_TW_MARK, -1), (_W_CONS, 0),
                     (_W_HALF_HEAD, 0), (_W_HALF_PACKED, _EMPTY_PACKED), (_W_CLOSED_HEAD, 0),
                     (_W_CLOSED_PACKED, _EMPTY_PACKED), (_W_STOLEN, -1), (_W_CLOSED_GUARD, 0),
                     (_W_HALF_GUARD, _WG_CLOSED << _WG_SHIFT)):
            w[i] = v
        # the since stamps are (generation, ns) pairs at since[g & 1]: generation 0 at slot 0
        w[_W_SINCE], w[_W_SINCE + 1] = 0, t
        w[_W_MAGIC] = _MAGIC

    def _pull(self) -> None:
        """Read the state from the words (the store's lock is held)."""
        w = self._wv
        assert w is not None
        word = w[_W_WORD]
        st, gen, flight = word & 7, word >> _GEN_SHIFT, (word >> _FLIGHT_SHIFT) & _MAX_FLIGHT
        self._state, self._gen, self._flight = st, gen, flight
        k = _W_SINCE + 2 * (gen & 1)
        self._since = w[k + 1] if w[k] == gen else self._now(None)
        k = _W_UNTIL + 2 * (gen & 1)
        self._until = w[k + 1] if w[k] == gen else 0
        self._attempt = w[_W_ATTEMPT]
        self._not_permitted = w[_W_NOT_PERMITTED]
        self._metrics_half = bool(w[_W_METRICS_HALF])
        self._cons = w[_W_CONS]
        self._pushed = word

    def _push(self) -> None:
        """Write the state back (the store's lock is held): stamps and counters first, the state word
        last."""
        w = self._wv
        assert w is not None
        gen, st = self._gen, self._state
        word = gen << _GEN_SHIFT | min(self._flight, _MAX_FLIGHT) << _FLIGHT_SHIFT | st
        if (self._pushed >> _GEN_SHIFT) != gen:
            k = _W_SINCE + 2 * (gen & 1)
            w[k], w[k + 1], w[k] = -1, self._since, gen
            if st == _OPEN:
                k = _W_UNTIL + 2 * (gen & 1)
                w[k], w[k + 1], w[k] = -1, self._until, gen
            tag = gen << _WG_SHIFT
            w[_W_CLOSED_GUARD] = tag if st in (_CLOSED, _METRICS_ONLY) else _WG_CLOSED << _WG_SHIFT
            w[_W_HALF_GUARD] = tag if st == _HALF_OPEN else _WG_CLOSED << _WG_SHIFT
        w[_W_ATTEMPT] = self._attempt
        w[_W_NOT_PERMITTED] = self._not_permitted
        w[_W_METRICS_HALF] = int(self._metrics_half)
        w[_W_CONS] = self._cons
        w[_W_WORD] = word
        self._pushed = word

    def _fresh_closed(self) -> None:
        if self._wv is None:
            self._closed = _Window(self._conf.window_size, self._conf.time_window)
        else:
            self._closed.reset()

    def _fresh_half(self) -> None:
        if self._wv is None:
            self._half = _Window(self._conf.half_open_calls, False)
        else:
            self._half.reset()

    def _close(self, message: str) -> None:
        """Its store closed in this process (stores/shm.py): every later decision, report and state read
        raises RuntimeError(message); a permit or awaitable dropped after it gives nothing back (the words
        are the store's no more); settings (name, conf, timing, hook, classify) still read. The first
        message stays; a breaker never initialised stays so."""
        lock = self.__dict__.get("_lock")
        if lock is None:
            return
        with lock:
            if "_lock" in self.__dict__:
                self.__dict__["_closed_msg"] = str(message)
                del self.__dict__["_lock"]

    def _reporting(self) -> bool:
        """An outcome report may proceed: False once its store closed (the report of a call admitted before
        the close is dropped: the call's result or exception passes through unchanged); not initialised:
        raises."""
        if "_closed_msg" in self.__dict__:
            return False
        self._lock
        return True

    def _set_remote(self, remote: Any) -> None:
        """Let a store's shared breaker (Redis) decide: remote.acquire() -> token >= 0, -1 refused, -2 decide
        here; remote.record(token, failed, slow, ignored); remote.rejection(now) -> CircuitOpenError or None."""
        self._lock
        self._remote = remote

    def _return_flight(self, gen: int, _half_open: int = _HALF_OPEN) -> None:
        """A dropped half-open permit of `gen` goes back (the compiled st_return_flight; no hook). Reads
        no module global: it may run from Permit.__del__ at interpreter shutdown."""
        with self._lock:
            if self._state == _half_open and self._gen == gen and self._flight > 0:
                self._flight -= 1

    def _refused(self) -> None:
        """Count a refusal decided by the store (not_permitted, the event)."""
        self._lock
        with self._lock:
            self._not_permitted += 1
        h = self._hook
        if h is not None:
            h("not_permitted", None, None)

    def _now(self, now: Any) -> int:
        if now is not None:
            return as_i64(now, "now")
        clock = self._clock_ns
        return time.monotonic_ns() if clock is None else as_i64(clock(), "clock_ns()")

    @property
    def hook(self) -> Callable[[str, Any, Any], None] | None:
        """callable(kind, a, b) or None: events are built only when set."""
        return self._hook

    @hook.setter
    def hook(self, value: Callable[[str, Any, Any], None] | None) -> None:
        self._lock
        if value is not None and not callable(value):
            raise TypeError(f"hook must be a callable(kind, a, b) or None, got {value!r}")
        self._hook = value

    # settings still read once closed (as the other cores bound to a store's words)
    @property
    def conf(self) -> Any:
        return self._conf

    @property
    def name(self) -> str:
        return self._name

    @property
    def timing(self) -> bool:
        """True when results need a clock reading (slow-call timing or a time window)."""
        return self._conf.slow_ns >= 0 or self._conf.time_window

    # -- transitions (caller holds the lock) ------------------------------------------------------------
    def _move(self, new: int, now: int, attempt: int | None = None) -> bool:
        """Start the next generation in `new`; False (nothing changed) when the open_duration callable
        (user code, which may switch threads or re-enter) saw the state move on meanwhile."""
        old, gen = self._state, self._gen
        if new == _OPEN:
            assert attempt is not None
            until = _deadline(now, open_duration_ns(self._conf, attempt, log))
            if (self._state, self._gen) != (old, gen):
                return False
            self._until = until
        self._state, self._gen, self._since, self._flight = new, self._gen + 1, now, 0
        if attempt is not None:
            self._attempt = attempt
        if new in (_CLOSED, _METRICS_ONLY):
            self._fresh_closed()
            self._cons = 0
            self._metrics_half = False
        elif new == _HALF_OPEN:
            self._fresh_half()
            self._metrics_half = True
        h = self._hook
        if h is not None and old != new:            # a manual restart of the same state is no change
            h("state_change", State(old), State(new))
        return True

    def _current(self, now: int) -> None:
        """What a state read applies (DESIGN §3c): OPEN whose open_duration has passed enters HALF_OPEN
        now (as a call would), and HALF_OPEN past half_open_max_wait re-opens."""
        if self._state == _OPEN and _due(now, self._until):
            self._move(_HALF_OPEN, now)
        self._expire_half_open(now)

    def _expire_half_open(self, now: int) -> None:
        c = self._conf
        if (self._state == _HALF_OPEN and c.half_open_max_wait_ns >= 0
                and _sat(now - self._since) >= c.half_open_max_wait_ns):
            self._move(_OPEN, now, self._attempt + 1)

    # -- decisions ----------------------------------------------------------------------------------------
    def acquire(self, now: int | None = None) -> int:
        """A token (generation << 1 | half-open bit) when the call may go ahead, else -1."""
        self._lock
        now = self._now(now)
        if self._remote is not None:
            r: int = self._remote.acquire()
            if r >= 0:
                return r | REMOTE
            if r == -1:
                self._refused()
                return -1
        with self._lock:
            if self._state == _OPEN and _due(now, self._until):
                self._move(_HALF_OPEN, now)
            self._expire_half_open(now)
            s = self._state
            if s in (_CLOSED, _METRICS_ONLY, _DISABLED):
                return self._gen << 1
            if s == _HALF_OPEN and self._flight < self._conf.half_open_calls:
                self._flight += 1
                return self._gen << 1 | 1
            self._not_permitted += 1
        h = self._hook
        if h is not None:
            h("not_permitted", None, None)
        return -1

    def rejection(self, now: int | None = None) -> CircuitOpenError:
        """The error for a refused call: retry_after is the time left in OPEN, else None."""
        self._lock
        now = self._now(now)
        if self._remote is not None:
            e = self._remote.rejection(now)
            if e is not None:
                return e  # type: ignore[no-any-return]
        with self._lock:
            s = self._state
            retry_after = max(0, _sat(self._until - now)) / 1e9 if s == _OPEN else None
        return CircuitOpenError(self._name, State(s), retry_after)

    def classify(self, exc: BaseException) -> int:
        """SUCCESS, FAILURE, IGNORED or CANCELLED for an exception (ignore wins over record). Anything
        not an Exception, and a UsageError, is CANCELLED (no outcome); a Rejected (buttress's own refusal,
        from an inner stage) is IGNORED unless `record` names its class."""
        c = self._conf
        if not isinstance(exc, Exception) or isinstance(exc, UsageError):
            return CANCELLED
        if isinstance(exc, Rejected) and (c.record_rejected is None or not isinstance(exc, c.record_rejected)):
            return IGNORED
        try:
            if c.ignore_t is not None and isinstance(exc, c.ignore_t) or c.ignore_fn is not None and c.ignore_fn(exc):
                return IGNORED
            if c.record_t is not None and isinstance(exc, c.record_t) or c.record_fn is not None and c.record_fn(exc):
                return FAILURE
        except Exception:  # noqa: BLE001 - a broken predicate must not break the call
            log.exception("circuit breaker %r: record/ignore predicate failed; counting a failure", self._name)
            return FAILURE
        return SUCCESS

    def classify_result(self, result: Any) -> int:
        """FAILURE when record_result matches the return value, else SUCCESS."""
        pred = self._conf.record_result
        if pred is None:
            return SUCCESS
        try:
            return FAILURE if pred(result) else SUCCESS
        except Exception:  # noqa: BLE001
            log.exception("circuit breaker %r: record_result predicate failed; counting a failure", self._name)
            return FAILURE

    def record(self, token: int, outcome: int, start: int, now: int | None = None, exc: Any = None) -> None:
        """Apply the outcome of a call admitted with `token` at `start` (ns)."""
        if not self._reporting():
            return
        token, start = as_i64(token, "token"), as_i64(start, "start")
        if type(outcome) is not int or not 0 <= outcome <= 3:
            raise ValueError(f"outcome must be SUCCESS, FAILURE, IGNORED or CANCELLED (0-3), got {outcome!r}")
        self._record(token, outcome, start, now, exc)

    def _record(self, token: int, outcome: int, start: int, now: Any, exc: Any) -> None:
        # the clock first (it may be any Python), then the record (under the lock, only if the token's
        # generation is current), then the hooks and the verdict
        if "_closed_msg" in self.__dict__:
            return                      # its store closed: the outcome of a call admitted before is dropped
        self._lock                  # not initialised: raises before anything
        c = self._conf
        gen, half = token >> 1, token & 1
        timing = self.timing
        if token & REMOTE:
            self._remote_record(token, outcome, start, now, exc)
            return
        if outcome >= IGNORED:
            with self._lock:
                if half and self._state == _HALF_OPEN and self._gen == gen and self._flight > 0:
                    self._flight -= 1
            h = self._hook
            if outcome == IGNORED and h is not None:
                h("ignored", exc, _sat(self._now(now) - start) if timing else None)
            return
        duration = 0
        if timing:
            now = self._now(now)
            duration = _sat(now - start)
        elif now is not None:
            now = as_i64(now, "now")
        failed, slow = outcome == FAILURE, c.slow_ns >= 0 and duration > c.slow_ns
        if c.classic:
            self._record_classic(gen, half, failed, exc, now, duration if timing else None)
            return
        with self._lock:
            s = self._state
            if self._gen != gen or s == _DISABLED or (s == _HALF_OPEN) != bool(half) or s not in (
                    _CLOSED, _METRICS_ONLY, _HALF_OPEN):
                return                                      # stale generation: dropped entirely
            w = self._half if s == _HALF_OPEN else self._closed
            w.record(failed, slow, 0 if now is None else now)
            calls, failures, slows, _ = w.snapshot(0 if now is None else now)
        h = self._hook
        if h is not None:
            h("error" if failed else "success", exc if failed else None, duration if timing else None)
        if s == _HALF_OPEN:
            if calls >= c.half_open_minimum:
                exceeded = self._exceeded(calls, failures, slows)
                now = self._now(now)                        # the verdict needs the time (its deadline)
                with self._lock:
                    if self._state == _HALF_OPEN and self._gen == gen:
                        if exceeded:
                            self._move(_OPEN, now, self._attempt + 1)
                        else:
                            self._move(_CLOSED, now, 0)
            return
        # METRICS_ONLY reports rates (events) on failures and slow calls; CLOSED decides every time
        if calls >= c.minimum_calls and (s == _CLOSED or failed or slow):
            if self._exceeded(calls, failures, slows) and s == _CLOSED:
                now = self._now(now)
                with self._lock:
                    if self._state == _CLOSED and self._gen == gen:
                        self._move(_OPEN, now, 1)

    def _remote_record(self, token: int, outcome: int, start: int, now: Any, exc: Any) -> None:
        """A call admitted by the store's shared breaker: its outcome goes there (CLOSED outcomes are
        counted locally and flushed by the store; half-open ones are reported at once)."""
        duration, slow = 0, False
        if self.timing:
            duration = _sat(self._now(now) - start)
            slow = outcome < IGNORED and self._conf.slow_ns >= 0 and duration > self._conf.slow_ns
        self._remote.record(token & ~REMOTE, outcome == FAILURE, slow, outcome >= IGNORED)
        h = self._hook
        if h is not None:
            if outcome == IGNORED:
                h("ignored", exc, duration if self.timing else None)
            elif outcome < IGNORED:
                failed = outcome == FAILURE
                h("error" if failed else "success", exc if failed else None, duration if self.timing else None)

    def _record_classic(self, gen: int, half: int, failed: bool, exc: Any, now: Any, duration: Any) -> None:
        """CLOSED: a failure adds one to the run of consecutive failures, a success ends it; the
        failure that makes the run failure_threshold long opens the breaker. HALF_OPEN: one failure
        re-opens, success_threshold successes close."""
        c = self._conf
        with self._lock:
            s = self._state
            if self._gen != gen or (s == _HALF_OPEN) != bool(half) or s not in (_CLOSED, _METRICS_ONLY, _HALF_OPEN):
                return                                      # stale generation: dropped entirely
            if s == _HALF_OPEN:
                self._half.record(failed, False, 0)
                calls, failures, _, _ = self._half.snapshot(0)
            elif failed:
                self._cons += 1
                run = self._cons
            else:
                self._cons = 0
        h = self._hook
        if h is not None:
            h("error" if failed else "success", exc if failed else None, duration)
        if s == _HALF_OPEN:
            if failed or (failures == 0 and calls >= c.success_threshold):
                now = self._now(now)
                with self._lock:
                    if self._state == _HALF_OPEN and self._gen == gen:
                        if failed:
                            self._move(_OPEN, now, self._attempt + 1)
                        else:
                            self._move(_CLOSED, now, 0)
        elif failed and run >= c.failure_threshold and s == _CLOSED:
            now = self._now(now)
            with self._lock:
                if self._state == _CLOSED and self._gen == gen:
                    self._move(_OPEN, now, 1)

    def _exceeded(self, calls: int, failures: int, slows: int) -> bool:
        c = self._conf
        fr, sr = failures / calls, slows / calls
        hit = False
        h = self._hook
        if fr >= c.failure_rate_threshold:
            hit = True
            if h is not None:
                h("failure_rate_exceeded", fr, None)
        if c.slow_ns >= 0 and sr >= c.slow_call_rate_threshold:
            hit = True
            if h is not None:
                h("slow_call_rate_exceeded", sr, None)
        return hit

    # -- state --------------------------------------------------------------------------------------------
    def state_now(self, now: int | None = None) -> int:
        """The state code now: an OPEN breaker whose open_duration has passed enters HALF_OPEN at this
        read, a HALF_OPEN one past half_open_max_wait re-opens."""
        self._lock
        now = self._now(now)
        with self._lock:
            self._current(now)
            return self._state

    def load(self) -> tuple[int, int, int]:
        """(state, generation, half-open permits out)."""
        with self._lock:
            return (self._state, self._gen, self._flight)

    @property
    def attempt(self) -> int:
        with self._lock:
            return self._attempt

    def transition_to(self, state: int, now: int | None = None) -> None:
        """Move to `state` from any state (a new generation). ValueError for HALF_OPEN outside OPEN and
        for a move to the current state."""
        self._lock
        state = int(State(state))
        now = self._now(now)
        with self._lock:
            while True:
                cur = self._state
                if state == cur or (state == _HALF_OPEN and cur != _OPEN):
                    raise ValueError(f"illegal transition: {State(cur).name} -> {State(state).name}")
                if self._move(state, now, self._attempt + 1 if state == _OPEN else (0 if state == _CLOSED else None)):
                    return

    def reset(self, now: int | None = None) -> None:
        """CLOSED with an empty window, attempt 0, not_permitted 0 (a new generation)."""
        self._lock
        now = self._now(now)
        with self._lock:
            self._not_permitted = 0
            self._move(_CLOSED, now, 0)

    def restart(self, state: int, now: int | None = None) -> None:
        """Enter the manual state `state` (CLOSED, FORCED_OPEN, DISABLED or METRICS_ONLY) from any state,
        the same one included: always a new generation (results of older permits are dropped); CLOSED
        and METRICS_ONLY start an empty window; CLOSED sets the attempt count back to 0."""
        self._lock
        state = int(State(state))
        if state in (_OPEN, _HALF_OPEN):
            raise ValueError(f"restart() enters a manual state (CLOSED, FORCED_OPEN, DISABLED, METRICS_ONLY), "
                             f"got {State(state).name}")
        now = self._now(now)
        with self._lock:
            self._move(state, now, 0 if state == _CLOSED else None)

    def metrics(self, now: int | None = None) -> tuple[int, int, int, int, float, float, int]:
        """(state, calls, failures, slow_calls, failure_rate, slow_call_rate, not_permitted)."""
        self._lock
        now = self._now(now)
        with self._lock:
            self._current(now)
            if self._metrics_half:
                calls, failures, slows, _ = self._half.snapshot(now)
                minimum = self._conf.half_open_minimum
            elif self._conf.classic:                        # the run of consecutive failures; no rates
                return (self._state, self._cons, self._cons, 0, -1.0, -1.0, self._not_permitted)
            else:
                calls, failures, slows, _ = self._closed.snapshot(now)
                minimum = self._conf.minimum_calls
            ok = calls >= minimum and calls > 0
            return (self._state, calls, failures, slows, failures / calls if ok else -1.0,
                    slows / calls if ok else -1.0, self._not_permitted)

    def __repr__(self) -> str:
        if "_closed_msg" in self.__dict__:
            return f"<{type(self).__name__} {self._name!r} (closed)>"
        if "_lock" not in self.__dict__:
            return f"<{type(self).__name__} (not initialised)>"
        return f"BreakerCore(name={self._name!r}, state={self.load()[0]})"

    # -- calling ------------------------------------------------------------------------------------------
    def start(self) -> int:
        """ns timestamp for a call about to start (0 when nothing is timed)."""
        self._lock
        return self._now(None) if self.timing else 0

    def enter(self) -> tuple[int, int]:
        """(token, start) for a call that may go ahead; raises CircuitOpenError otherwise."""
        self._lock
        now = self._now(None)
        token = self.acquire(now)
        if token < 0:
            raise self.rejection(now)
        return token, (now if self.timing else 0)

    def exit_ok(self, token: int, start: int, result: Any) -> None:
        if not self._reporting():
            return
        token, start = as_i64(token, "token"), as_i64(start, "start")
        self._record(token, self.classify_result(result), start, None, None)

    def exit_err(self, token: int, start: int, exc: BaseException) -> None:
        if not self._reporting():
            return
        token, start = as_i64(token, "token"), as_i64(start, "start")
        self._record(token, self.classify(exc), start, None, exc)

    def try_acquire(self) -> "Permit | None":
        """Two-step use: a Permit, or None when refused."""
        self._lock
        now = self._now(None)
        token = self.acquire(now)
        if token < 0:
            return None
        return Permit._make(self, token, now if self.timing else 0)

    def guard(self, fn: Callable[..., Any], asynchronous: bool = False) -> "Guarded":
        """A callable running fn under the breaker (vectorcall; binds like a function). asynchronous=True:
        fn is an async function; a call takes the permit and returns a compiled awaitable that drives fn's
        coroutine and records its outcome when it finishes (a refusal is raised when it is awaited)."""
        self._lock
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        if type(asynchronous) is not bool:
            raise TypeError(f"asynchronous must be a bool, got {asynchronous!r}")
        return Guarded._make(self, fn, asynchronous)

    def make_call(self, asynchronous: bool = False) -> "Guarded":
        """The `call(fn, *args, **kwargs)` entry (asynchronous=True: `call_async(fn, *args, **kwargs)`)."""
        self._lock
        if type(asynchronous) is not bool:
            raise TypeError(f"asynchronous must be a bool, got {asynchronous!r}")
        return Guarded._make(self, None, asynchronous)

    # -- with / async with (records: see _context_key) -----------------------------------------------------
    def __enter__(self) -> Any:
        """Take a permit (returns the breaker), or raise CircuitOpenError."""
        token, start = self.enter()
        self._with_push(sys._getframe(1), token, start)
        return self

    def _with_push(self, frame: Any, token: int, start: int) -> None:
        with self._held_lock:
            sweep = len(self._wheld) >= self._sweep_at and frame not in self._wheld
        if sweep:
            self._sweep()
        rec = [token, start, threading.get_ident(), _context_key()]
        with self._held_lock:
            self._wheld.setdefault(frame, []).append(rec)

    def _with_pop(self, frame: Any) -> list[Any] | None:
        with self._held_lock:
            recs = self._wheld.get(frame)
            if recs is not None:
                rec = recs.pop()
                if not recs:
                    del self._wheld[frame]
                return rec
            tid, key = threading.get_ident(), _context_key()
            best = best_frame = None
            for f in reversed(self._wheld):     # frames in the order their first record came, the last first
                for r in reversed(self._wheld[f]):
                    if r[2] == tid and _key_matches(r[3], key):
                        best, best_frame = r, f
                        break
                if best is not None:
                    break
            if best is not None:
                recs = self._wheld[best_frame]
                recs.remove(best)
                if not recs:
                    del self._wheld[best_frame]
            return best

    def _sweep(self) -> None:
        """Give back (no outcome) the permits of records that can never exit."""
        dead = []
        with self._held_lock:
            for f in list(self._wheld):
                if not _frame_finished(f):
                    continue
                recs = self._wheld[f]
                gone = [r for r in recs if _key_dead(r[3], r[2])]
                if gone:
                    dead.extend(gone)
                    recs[:] = [r for r in recs if not any(r is g for g in gone)]
                    if not recs:
                        del self._wheld[f]
            self._sweep_at = max(8, 2 * len(self._wheld))
        for r in dead:
            try:
                self._record(r[0], CANCELLED, r[1], None, None)
            except Exception:
                pass

    @exit_signature
    def __exit__(self, *args: Any, **kwargs: Any) -> Literal[False]:
        """Report the outcome of this frame's latest `with` acquisition (else: this context's latest; exc:
        a failure per the exception rules; None: a success); without one, a no-op. Never suppresses the
        exception."""
        self._with_exit(sys._getframe(1), exit_args("BreakerCore", "__exit__", args, kwargs))
        return False

    def _with_exit(self, frame: Any, exc: Any) -> None:
        closed = "_closed_msg" in self.__dict__
        if not closed:
            self._lock
        held = self._with_pop(frame)
        if closed:
            return                      # its store closed: the outcome of a call admitted before is dropped
        if held is None:
            self._sweep()               # records that can never exit: their permits go back
            return                      # a second exit of one acquisition, or no enter: a no-op
        token, start = held[0], held[1]
        if exc is None:
            self._record(token, self.classify_result(None), start, None, None)
        else:
            self._record(token, self.classify(exc), start, None, exc)

    def __aenter__(self) -> Any:
        """An awaitable: raises CircuitOpenError when refused, else returns the breaker holding a permit."""
        self._lock
        frame = sys._getframe(1)
        try:
            token, start = self.enter()
        except BaseException as exc:
            return _raising(exc)

        def done(value: Any) -> None:
            self._lock                  # its store closed before the await: refused
            self._with_push(frame, token, start)

        def undo(exc: Any) -> None:
            if "_lock" in self.__dict__:
                self._record(token, CANCELLED, start, None, None)

        return GuardedAwaitable(_VALUE, value=self, ok=done, err=undo)

    @exit_signature
    def __aexit__(self, *args: Any, **kwargs: Any) -> Any:
        self._with_exit(sys._getframe(1), exit_args("BreakerCore", "__aexit__", args, kwargs))
        return GuardedAwaitable(_VALUE, value=False)

    def _held(self) -> int:
        """How many `with` / `async with` acquisitions of this breaker this thread and the current context
        hold (records not yet exited)."""
        self._lock
        tid, key = threading.get_ident(), _context_key()
        with self._held_lock:
            return sum(1 for recs in self._wheld.values() for r in recs
                       if r[2] == tid and _key_matches(r[3], key))

    def settle(self, token: int, start: int, fn: Any, result: Any, want_async: bool = False) -> Any:
        """A call of `fn` admitted with (token, start) returned `result`, which is not a plain value for
        its form (a sync form: an awaitable, a generator or an async generator; an async form: anything
        not awaitable). Returns what the caller gets: a generator or async generator guarded over its
        whole iteration (the permit is held until it finishes or is closed), or a plain value (recorded
        as a success). Raises UsageError after returning the permit (and closing a coroutine) when a sync
        form got an awaitable or an async form got a sync result."""
        self._reporting()           # its store closed mid-call: the result passes through, its report dropped
        token, start = as_i64(token, "token"), as_i64(start, "start")
        kind = type(result)
        if kind is types.AsyncGeneratorType or (kind is types.GeneratorType and not want_async
                                                 and not _is_coroutine_gen(result)):
            p = Permit._make(self, token, start)
            return (guard_astream if kind is types.AsyncGeneratorType else guard_stream)(p, result)
        if want_async:
            if kind is types.CoroutineType or inspect.isawaitable(result):
                return result                               # the caller awaits it and reports
            self._record(token, CANCELLED, start, None, None)
            if kind is types.GeneratorType:
                result.close()
                raise UsageError(_SYNC_STREAM.format(cls=type(self).__name__, fn=describe(fn)))
            raise sync_in_async(self, fn, result)
        if inspect.isawaitable(result):
            self._record(token, CANCELLED, start, None, None)
            refuse_sync_result(self, fn, result, generators=False)
        self._record(token, self.classify_result(result), start, None, None)
        return result


class Permit:
    """One admitted call, reported once: success(result), failure(exc) or release(). Made only by
    CircuitBreaker.try_acquire() (calling the type is a TypeError). A permit dropped without a report is
    released when it is collected, so a half-open permit can never be lost."""

    __slots__ = ("_core", "_token", "_start", "_done", "_lock")
    _core: BreakerCore
    _token: int
    _start: int
    _done: bool
    _lock: threading.Lock

    def __new__(cls, *args: Any, **kwargs: Any) -> "Permit":
        raise TypeError(_PERMIT_NEW)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        raise TypeError("type 'buttress._core.breaker.Permit' is not an acceptable base type")

    @classmethod
    def _make(cls, core: BreakerCore, token: int, start: int) -> "Permit":
        p = object.__new__(cls)
        p._core, p._token, p._start, p._done = core, token, start, False
        p._lock = threading.Lock()
        return p

    def _once(self) -> bool:
        with self._lock:
            if self._done:
                return False
            self._done = True
            return True

    def success(self, result: Any = None) -> None:
        """Report success (record_result is applied to `result`)."""
        if self._once():
            self._core._record(self._token, self._core.classify_result(result), self._start, None, None)

    def failure(self, exc: BaseException) -> None:
        """Report an exception (ignore / record / cancellation rules apply)."""
        if not isinstance(exc, BaseException):
            raise TypeError(f"exc must be an exception instance, got {exc!r}")
        if self._once():
            self._core._record(self._token, self._core.classify(exc), self._start, None, exc)

    def release(self) -> None:
        """Give the permit back without an outcome."""
        if self._once():
            self._core._record(self._token, CANCELLED, self._start, None, None)

    @property
    def done(self) -> bool:
        return self._done

    def _stream_success(self) -> None:
        # a guarded stream finished: a success (record_result is not applied to a stream)
        if self._once():
            self._core._record(self._token, SUCCESS, self._start, None, None)

    def __del__(self, _remote: int = REMOTE, _finalizing: Callable[[], bool] = sys.is_finalizing) -> None:
        # never reported: return it (only a half-open permit holds anything; no hook runs, as in the
        # compiled __dealloc__). At interpreter shutdown module globals may already be None: what this
        # needs is bound as defaults, and what shutdown can still break (a store's locker) is dropped
        try:
            token, core = self._token, self._core
        except AttributeError:       # never made by _make
            return
        if token & 1 and not token & _remote and "_lock" in core.__dict__ and self._once():
            try:
                core._return_flight(token >> 1)
            except (TypeError, AttributeError, NameError, RuntimeError):
                if not _finalizing():
                    raise


class Guarded:
    """fn under a breaker; with fn None it is `call(fn, *args, **kwargs)`. Binds like a function.
    Made only by CircuitBreaker.guard() / make_call() (calling the type is a TypeError)."""

    # slots: functools.wraps copies the wrapped callable's __dict__ into ours; slots always win over it
    __slots__ = ("_core", "_fn", "_async", "__dict__")
    _core: BreakerCore
    _fn: Callable[..., Any] | None
    _async: bool

    def __new__(cls, *args: Any, **kwargs: Any) -> "Guarded":
        raise TypeError(_GUARDED_NEW)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        raise TypeError("type 'buttress._core.breaker.Guarded' is not an acceptable base type")

    @classmethod
    def _make(cls, core: BreakerCore, fn: Callable[..., Any] | None, asynchronous: bool = False) -> "Guarded":
        g = object.__new__(cls)
        g._core, g._fn, g._async = core, fn, asynchronous
        return g

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self._fn
        if fn is None:
            if not args:
                raise TypeError(f"{'call_async' if self._async else 'call'}() needs the function to call as its "
                                f"first argument")
            fn, args = args[0], args[1:]
            if not callable(fn):
                raise TypeError(f"fn must be callable, got {fn!r}")
        core = self._core
        if self._async:
            return _acall(core, fn, args, kwargs)
        token, start = core.enter()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            core.exit_err(token, start, exc)
            raise
        if lazy_result(result):             # an awaitable (refused) or a stream (guarded over its iteration)
            return core.settle(token, start, fn, result)
        core.exit_ok(token, start, result)
        return result

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else types.MethodType(self, obj)


def _acall(core: BreakerCore, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The async form (the compiled bt_aguard_vectorcall): the permit now, then an awaitable that drives fn's
    coroutine and records its outcome when it finishes; a refusal or an error now is raised when awaited."""
    try:
        token, start = core.enter()
    except BaseException as exc:
        return _raising(exc)
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        _exit_err(core, token, start, exc)
        return _raising(exc)
    tp = type(result)
    if tp is types.CoroutineType or (tp is types.GeneratorType and _is_coroutine_gen(result)):
        it = result
    elif hasattr(tp, "__await__"):
        try:
            it = result.__await__()
        except BaseException as exc:
            _exit_err(core, token, start, exc)
            return _raising(exc)
    else:
        try:        # no await slot: an async generator guarded over its iteration, else UsageError
            return GuardedAwaitable(_VALUE, value=core.settle(token, start, fn, result, True))
        except BaseException as exc:
            return _raising(exc)
    return _CallAwaitable(_RUN, it, ok=lambda value: core.exit_ok(token, start, value),
                          err=lambda exc: _exit_err(core, token, start, exc))


class _CallAwaitable(GuardedAwaitable):
    """The twin guard's awaitable, as the compiled bt_aw: an exception thrown in before the call was ever
    sent to is not its outcome (the call never ran): the permit goes back as on close()."""

    __slots__ = ("_started",)

    def send(self, arg: Any) -> Any:
        self._started = True
        return super().send(arg)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if self._state == _RUN and not getattr(self, "_started", False):
            try:
                return self._it.throw(typ, val, tb) if val is not None or tb is not None else self._it.throw(typ)
            except BaseException:
                self._fail(GeneratorExit())
                raise
        return super().throw(typ, val, tb)


def _exit_err(core: BreakerCore, token: int, start: int, exc: BaseException) -> None:
    """Record a failed or cancelled call; never raises (the call's own exception stands), as the compiled
    exit_err op; nothing once the breaker's store closed."""
    if "_lock" not in core.__dict__:
        return
    try:
        core.exit_err(token, start, exc)
    except BaseException:  # noqa: BLE001
        log.exception("circuit breaker %r: recording a failure failed", core._name)
