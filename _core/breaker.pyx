# cython: language_level=3, freethreading_compatible=True, boundscheck=False, wraparound=False, cdivision=True
"""The circuit-breaker state machine, lock-free. Twin and spec: buttress/_twin/breaker.py.

State, generation and half-open permits live in one atomic word (bt_state.pxd): a transition and the
issue of a half-open permit are each one CAS, so HALF_OPEN never admits more than half_open_calls and
results of an older generation are recognised and dropped. A transition is claim / prepare / publish:
the winner prepares the new generation (its open deadline and start, stamped with the generation, its
windows cleared) before anyone can see it, so a probe of the new generation can never be wiped and a
deadline can never land in a later generation. Each window is entered under a guard carrying its
generation's tag (bt_window.pxd), so a result of an older generation is never counted, with or without
the GIL. Guarded calls go through a C vectorcall entry (bt_breaker_vectorcall below, the shape of
include/buttress_guard.h's): no argument tuple or dict is built and an exception from the wrapped call
passes through without an extra frame. A result whose type has an await slot, or is a generator or an
async generator, takes the slow path (`settle`): refused (an awaitable: use call_async) or guarded over
its whole iteration (a stream); for every other result that test is two pointer loads.

Outcomes (DESIGN §3c): anything not an Exception, and a UsageError, is no outcome (the permit is
returned); buttress's own rejections (Rejected, from inner stages) are ignored unless `record` names
their class. The classic breaker (failure_threshold > 0) keeps one word of consecutive failures in CLOSED
(a success stores 0 into it, a failure fetch-adds 1: the failure whose fetch-add makes the run
failure_threshold long opens the breaker) and counts half-open results in the half-open count window.

Times are int ns: any int64 reading is valid (None reads the clock); deadlines and durations saturate.
"""
cimport cython
from libc.stdint cimport int64_t, intptr_t
from libc.stdlib cimport calloc, free
from cpython.object cimport PyObject, PyTypeObject, PyObject_TypeCheck
from cpython.ref cimport Py_XINCREF, Py_XDECREF
from cpython.time cimport monotonic_ns
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_C_CONTIGUOUS
from bt_atomic cimport bt_load, bt_store, bt_fetch_add, bt_exchange, bt_cas
from bt_state cimport (state_t, stamp_t, st_state, st_prep, st_gen, st_flight, st_claim, st_publish,
                       st_publish_claimed, st_claim_word,
                       st_stamp_write, st_stamp_read, st_try_flight, st_return_flight,
                       ST_CLOSED, ST_OPEN, ST_HALF_OPEN, ST_FORCED_OPEN, ST_DISABLED, ST_METRICS_ONLY)
from bt_window cimport (cw_record, cw_field, cw_empty, tw_add, tw_read_bucket, tw_epoch, tw_cbits, TW_FIELDS,
                        bt_floormod, bt_sat_add, bt_sat_sub, wg_enter, wg_exit, wg_exit_tagged, wg_close, wg_open,
                        bt_mono_ns)
from bt_gcra cimport bt_as_i64

import inspect
import logging
import threading
import types

from buttress._breaker_conf import (COUNT_WINDOW_MAX, DEFAULTS, State, breaker_conf, guard_astream, guard_stream,
                                    open_duration_ns)
from buttress._params import check_int
from buttress._twin.gcra import words_view as _twin_words_view, track_bound as _track_bound
from buttress._params import describe
from buttress._spec import UsageError
from buttress._wrap import refuse_sync_result, sync_in_async
from buttress.errors import CircuitOpenError, Rejected

__all__ = ["BreakerCore", "Permit", "Guarded", "SUCCESS", "FAILURE", "IGNORED", "CANCELLED", "HEADER_WORDS", "REMOTE"]

log = logging.getLogger("buttress.circuit_breaker")

SUCCESS, FAILURE, IGNORED, CANCELLED = 0, 1, 2, 3
cdef enum:
    O_SUCCESS = 0
    O_FAILURE = 1
    O_IGNORED = 2
    O_CANCELLED = 3

cdef str _SYNC_STREAM = ("{cls}.call_async: {fn} is a generator function, not async: use the sync form (call, "
                         "or the decorator), which guards its whole iteration")
cdef object _D_FR = DEFAULTS["failure_rate_threshold"], _D_SR = DEFAULTS["slow_call_rate_threshold"]
cdef object _D_SD = DEFAULTS["slow_call_duration"], _D_W = DEFAULTS["window"], _D_WS = DEFAULTS["window_size"]
cdef object _D_MC = DEFAULTS["minimum_calls"], _D_OD = DEFAULTS["open_duration"], _D_HC = DEFAULTS["half_open_calls"]
cdef str _UNINIT = "{} is not initialised: its __init__ never ran (a subclass must call super().__init__())"
cdef object _HOOK_LOCK = threading.Lock()     # serialises hook assignments (rare); reads are lock-free


def _words_view(words, nwords):
    return _twin_words_view(words, nwords, "a circuit breaker")


cdef inline bint _is_instance(object exc, tuple classes) noexcept:
    cdef object c
    for c in classes:
        if PyObject_TypeCheck(exc, <PyTypeObject *>c):
            return True
    return False
cdef tuple _STATES = tuple(State)
cdef str _FMT_OPEN = "circuit breaker %r is %s"
cdef str _FMT_OPEN_RA = "circuit breaker %r is %s; retry after %.6gs"
cdef tuple _STATE_NAMES = tuple(s.name for s in State)
cdef int _CO_ITERABLE_COROUTINE = inspect.CO_ITERABLE_COROUTINE

cdef extern from "Python.h":
    ctypedef PyObject *(*vectorcallfunc)(PyObject *, PyObject *const *, size_t, PyObject *)

cdef extern from "buttress_guard.h":
    # the guard head's ops (include/buttress_guard.h): the sync entry (enter / exit_ok / exit_err / settle)
    # and the async one (try_enter / refuse_async / settle_async: the compiled awaitable, bt_aw)
    ctypedef struct bt_guard_ops:
        int (*enter)(PyObject *owner, int64_t *token, int64_t *start) except -1
        int (*exit_ok)(PyObject *owner, int64_t token, int64_t start, PyObject *result) except -1
        void (*exit_err)(PyObject *owner, int64_t token, int64_t start, PyObject *exc)
        object (*settle)(PyObject *owner, PyObject *fn, int64_t token, int64_t start, PyObject *result)
        int (*try_enter)(PyObject *owner, int64_t *token, int64_t *start) noexcept
        PyObject *(*refuse_async)(PyObject *owner, PyObject *fn, PyObject *const *args, size_t nargsf,
                                  PyObject *kwnames) noexcept
        object (*settle_async)(PyObject *owner, PyObject *fn, int64_t token, int64_t start, PyObject *result)
    int bt_guard_install(PyTypeObject *tp, Py_ssize_t offset) except -1
    int bt_guard_method_descriptor(PyTypeObject *tp) except -1
    PyObject *bt_guard_vectorcall(PyObject *, PyObject *const *, size_t, PyObject *)
    PyObject *bt_aguard_vectorcall(PyObject *, PyObject *const *, size_t, PyObject *)
    bint bt_lazy_type "bt_guard_lazy"(PyTypeObject *tp) noexcept
    PyObject *bt_aw_make(PyObject *owner, const bt_guard_ops *ops, int state, PyObject *it, PyObject *value,
                         int64_t token, int64_t start) noexcept
    PyObject *bt_aw_raising() noexcept
    int bt_aw_ready() except -1
    int BT_AW_VALUE
    PyTypeObject *Py_TYPE(object o) noexcept

cdef extern from *:
    """
    /* call(fn, ...) / call_async(fn, ...): a non-callable fn is the caller's error, a TypeError naming `fn`
       before any permit is taken (never a dependency failure); then the shared entries. */
    static PyObject *bt_cb_not_callable(PyObject *fn) {
        PyErr_Format(PyExc_TypeError, "fn must be callable, got %R", fn);
        return NULL;
    }
    static PyObject *bt_cb_call_vc(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
        if (PyVectorcall_NARGS(nargsf) >= 1 && !PyCallable_Check(args[0]))
            return bt_cb_not_callable(args[0]);
        return bt_guard_vectorcall(self, args, nargsf, kwnames);
    }
    static PyObject *bt_cb_acall_vc(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
        if (PyVectorcall_NARGS(nargsf) >= 1 && !PyCallable_Check(args[0]))
            return bt_cb_not_callable(args[0]);
        return bt_aguard_vectorcall(self, args, nargsf, kwnames);
    }
    """
    PyObject *bt_cb_call_vc(PyObject *, PyObject *const *, size_t, PyObject *)
    PyObject *bt_cb_acall_vc(PyObject *, PyObject *const *, size_t, PyObject *)

cdef extern from *:
    """
    /* Permit and Guarded are made by the breaker only: calling the type (or T.__new__(T)) is a TypeError.
       The module makes its own instances through the static tp_new function, which this does not touch. */
    static PyObject *bt_permit_refuse(PyTypeObject *tp, PyObject *a, PyObject *k) {
        PyErr_SetString(PyExc_TypeError,
            "Permit cannot be created directly; get one from CircuitBreaker.try_acquire()");
        return NULL;
    }
    static PyObject *bt_guarded_refuse(PyTypeObject *tp, PyObject *a, PyObject *k) {
        PyErr_SetString(PyExc_TypeError,
            "Guarded cannot be created directly; get one from CircuitBreaker.guard(fn) or by decorating a function");
        return NULL;
    }
    static void bt_refuse_new(PyTypeObject *permit, PyTypeObject *guarded) {
        permit->tp_new = bt_permit_refuse;
        guarded->tp_new = bt_guarded_refuse;
    #if PY_VERSION_HEX >= 0x03090000
        permit->tp_vectorcall = NULL;        /* a fast constructor entry would bypass tp_new */
        guarded->tp_vectorcall = NULL;
    #endif
        PyType_Modified(permit);
        PyType_Modified(guarded);
    }
    """
    void bt_refuse_new(PyTypeObject *permit, PyTypeObject *guarded)


cdef struct cwin_t:          # a count window: ring of outcome codes + one packed counter word
    int64_t *head
    int64_t *packed
    int64_t size
    int64_t *slots


cdef inline void cwin_reset(cwin_t *w) noexcept nogil:
    cdef int64_t i
    for i in range(w.size):
        bt_store(&w.slots[i], 0)
    bt_store(w.head, 0)
    bt_store(w.packed, cw_empty())


# The breaker's words: a header of HEADER_WORDS int64 words (this struct), then the closed window (a count
# window: window_size codes; a time window: window_size buckets of TW_FIELDS words), then the half-open
# window (half_open_calls codes). A process-local core owns them (one calloc); a core in a store points at
# the store's words (shm: a segment every process of the host maps), so every process decides with the
# same CAS on the same words. The twin lays its words out the same way (and decides under the store's lock).
cdef struct bwords_t:
    state_t st                   # 0..4: the state word, since[2] stamps
    stamp_t until[2]             # 5..8: OPEN generation g may admit again at until[g & 1] (stamped g)
    int64_t attempt              # 9
    int64_t not_permitted        # 10
    int64_t metrics_half         # 11: 1: metrics() reads the half-open window
    int64_t tw_mark              # 12: time window: epoch * 2 + (calls < minimum) at the last evaluation
    int64_t closed_guard         # 13: window guards (bt_window.pxd): tag = the generation recording
    int64_t half_guard           # 14
    int64_t cons                 # 15: classic: consecutive failures recorded in CLOSED / METRICS_ONLY
    int64_t half_head            # 16, 17: the half-open count window's head and packed counters
    int64_t half_packed
    int64_t closed_head          # 18, 19: the closed count window's
    int64_t closed_packed
    int64_t stolen               # 20: the highest generation whose stalled preparation was taken over
    int64_t magic                # 21: BW_MAGIC once init_words ran
    int64_t pad[2]

cdef extern from *:
    """
    #define BT_BW_MAGIC ((int64_t)0x4254425245414B31LL)   /* "BTBREAK1" */
    """
    const int64_t BW_MAGIC "BT_BW_MAGIC"

cdef enum:
    BW_HEADER = 24
HEADER_WORDS = BW_HEADER
BW_MAGIC_VALUE = 0x4254425245414B31
assert sizeof(bwords_t) == 8 * BW_HEADER
REMOTE = 1 << 62                 # a token issued by a store's shared breaker (Redis), not by these words
cdef int64_t _REMOTE = 1 << 62
cdef int64_t _NEVER = 0x7FFFFFFFFFFFFFFF
cdef enum:
    _CLS_KEPT = 16                   # exception types a breaker keeps for its classification cache
cdef enum:
    _CLOSED_MARK = 2                 # ready_ after _close(): not 1, so the one readiness test catches it    # an OPEN deadline past the int64 range: never reached


cdef inline int64_t _deadline(int64_t now, int64_t d) noexcept nogil:
    """now + d; one past int64 saturates to _NEVER, which is never due (saturation must mean "not yet",
    never "now"). d == 0 is due at once, also at the last int64 reading."""
    cdef int64_t t = bt_sat_add(now, d)
    if t == _NEVER and d == 0:
        return _NEVER - 1
    return t


cdef inline bint _due(int64_t now, int64_t deadline) noexcept nogil:
    return deadline != _NEVER and now >= deadline
cdef int64_t PREP_STALL_NS = 1000000000       # a preparation stalled this long was abandoned (a killed process)
cdef int64_t GUARD_STALL_NS = 50000000        # shared words: a writer inside a guard this long is dead


cdef inline int64_t _words_needed(int64_t window_size, bint time_window, int64_t half_calls) noexcept nogil:
    cdef int64_t n = BW_HEADER + (window_size * TW_FIELDS if time_window else window_size) + half_calls
    return (n + 7) & ~7


cdef void _init_words(bwords_t *w, int64_t *win, int64_t closed_n, int64_t half_n, bint time_window,
                      int64_t now) noexcept nogil:
    """Write the words of a new breaker: CLOSED generation 0 (begun at now), windows empty."""
    cdef int64_t i
    for i in range(closed_n + half_n):
        bt_store(&win[i], 0)
    bt_store(&w.st.word, 0)
    st_stamp_write(&w.st.since[1], -1, 0)
    st_stamp_write(&w.st.since[0], 0, now)
    st_stamp_write(&w.until[0], -1, 0)
    st_stamp_write(&w.until[1], -1, 0)
    bt_store(&w.attempt, 0)
    bt_store(&w.not_permitted, 0)
    bt_store(&w.metrics_half, 0)
    bt_store(&w.tw_mark, -1)
    bt_store(&w.cons, 0)
    bt_store(&w.half_head, 0)
    bt_store(&w.half_packed, cw_empty())
    bt_store(&w.closed_head, 0)
    bt_store(&w.closed_packed, cw_empty())
    bt_store(&w.stolen, -1)
    wg_open(&w.closed_guard, 0)          # CLOSED generation 0 records into the closed window
    wg_close(&w.half_guard, 0)
    bt_store(&w.magic, BW_MAGIC)


@cython.auto_pickle(False)
cdef class BreakerCore:
    cdef bwords_t *w                 # the words decided on: &own, or a store's words (buf)
    cdef bwords_t own
    cdef int64_t *own_win            # process-local: the windows' words (calloc)
    cdef Py_buffer *buf              # a store's words (malloc'd: a Py_buffer member would be traversed and
                                     # cleared by the GC while exported; buf.obj keeps the object alive)
    cdef int64_t guard_stall         # 0: wait for writers in a guard (process-local); else ns (shared)
    cdef int64_t prep_word, prep_seen   # a preparation seen in progress (word) and when (ns): take-over
    cdef cwin_t closed               # count window (closed state), when not time based
    cdef int64_t *tw                 # time window words (closed state), when time based
    cdef int64_t tw_base             # 0: 1 s buckets give every int64 reading its exact epoch
    cdef int tw_bits
    cdef cwin_t half                 # half-open count window
    cdef int64_t hook_               # borrowed PyObject * of the listener hook (0: none); owned below
    cdef object hook_owner
    cdef list hook_retired           # earlier hooks stay alive: a lock-free reader may still hold one
    cdef int64_t ready_              # 1 once __init__ completed
    cdef object remote_              # a store's shared breaker (Redis): decides instead of the words
    # configuration
    cdef object conf_
    cdef str name_
    cdef double fr_threshold, sr_threshold
    cdef int64_t slow_ns, window_size, minimum_calls, half_calls, half_minimum, half_max_wait_ns
    cdef bint time_window, timing_, classic_
    cdef int64_t fail_th, succ_th    # classic: failure_threshold, success_threshold
    cdef object record_t, record_fn, ignore_t, ignore_fn, record_result, clock_ns, record_rejected
    cdef dict held_                  # `with` / `async with` records: frame -> latest record (see below)
    cdef int64_t sweep_at            # the `with` records' dict size that triggers the next sweep
    cdef int64_t eval_gen            # count window: the generation whose minimum a success has judged
    cdef int64_t cls_cache           # _classify: the last exception type (pointer) | its outcome; 0: none
    cdef list cls_kept               # the types cls_cache may name (kept alive: a pointer is never reused)
    cdef tuple err_attrs             # per state: a refusal's attributes ({name, state, _lazy}), copied per refusal
    cdef object closed_msg           # _close(message): every decision and state read raises RuntimeError

    def __init__(self, name="default", failure_rate_threshold=_D_FR, slow_call_rate_threshold=_D_SR,
                 slow_call_duration=_D_SD, window=_D_W, window_size=_D_WS, minimum_calls=_D_MC,
                 open_duration=_D_OD, half_open_calls=_D_HC, half_open_max_wait=None, record=(Exception,),
                 ignore=(), record_result=None, clock_ns=None, failure_threshold=None, success_threshold=None,
                 timeout=None, words=None, locker=None):
        if bt_load(&self.ready_) or self.w != NULL:
            raise RuntimeError(f"{type(self).__name__} is already initialised; create a new one instead")
        c = breaker_conf(name, failure_rate_threshold, slow_call_rate_threshold, slow_call_duration, window,
                         window_size, minimum_calls, open_duration, half_open_calls, half_open_max_wait, record,
                         ignore, record_result, clock_ns, failure_threshold, success_threshold, timeout)
        if locker is not None and not (hasattr(type(locker), "__enter__") and hasattr(type(locker), "__exit__")):
            raise TypeError(f"locker must be None or a context manager, got {type(locker).__name__}")
        self.conf_ = c
        self.name_ = c.name
        self.fr_threshold, self.sr_threshold = c.failure_rate_threshold, c.slow_call_rate_threshold
        self.slow_ns, self.window_size, self.minimum_calls = c.slow_ns, c.window_size, c.minimum_calls
        self.half_calls, self.half_minimum, self.half_max_wait_ns = c.half_open_calls, c.half_open_minimum, c.half_open_max_wait_ns
        self.time_window = c.time_window
        self.timing_ = c.slow_ns >= 0 or c.time_window
        self.record_t, self.record_fn, self.ignore_t, self.ignore_fn = c.record_t, c.record_fn, c.ignore_t, c.ignore_fn
        self.record_result, self.clock_ns = c.record_result, c.clock_ns
        self.record_rejected = c.record_rejected
        self.classic_, self.fail_th, self.succ_th = c.classic, c.failure_threshold, c.success_threshold
        self.hook_retired = []
        self.cls_kept = []
        self.err_attrs = tuple({"name": self.name_, "state": st, "retry_after": None,
                                "_lazy": (_FMT_OPEN, (self.name_, st.name))} for st in _STATES)
        self.held_ = {}
        self.sweep_at = 8
        self.eval_gen = -1
        cdef int64_t closed_n = self.window_size * TW_FIELDS if self.time_window else self.window_size
        cdef int64_t nw = _words_needed(self.window_size, self.time_window, self.half_calls)
        cdef int64_t *win
        cdef bwords_t *bw
        if words is None:
            self.own_win = <int64_t *>calloc(closed_n + self.half_calls, sizeof(int64_t))
            if self.own_win == NULL:
                raise MemoryError()
            win, bw = self.own_win, &self.own
            _init_words(bw, win, closed_n, self.half_calls, self.time_window, self._now())
        else:
            raw = _words_view(words, nw)
            self.buf = <Py_buffer *>calloc(1, sizeof(Py_buffer))
            if self.buf == NULL:
                raise MemoryError()
            try:
                PyObject_GetBuffer(raw, self.buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)
            except BaseException:
                free(self.buf)
                self.buf = NULL
                raise
            bw = <bwords_t *>self.buf.buf
            if bt_load(&bw.magic) != BW_MAGIC:
                raise ValueError("words are not a breaker's: write them with BreakerCore.init_words() first "
                                 "(a store's bind(init=...) does that once, when it creates them)")
            win = (<int64_t *>self.buf.buf) + BW_HEADER
            self.guard_stall = GUARD_STALL_NS
        if self.time_window:
            self.tw = win
        else:
            self.closed.size = self.window_size
            self.closed.slots = win
        self.closed.head, self.closed.packed = &bw.closed_head, &bw.closed_packed
        self.half.size = self.half_calls
        self.half.slots = win + closed_n
        self.half.head, self.half.packed = &bw.half_head, &bw.half_packed
        self.tw_base, self.tw_bits = 0, tw_cbits(1000000000)
        self.w = bw
        bt_store(&self.ready_, 1)
        if words is not None and locker is not None:
            _track_bound(self, locker)          # the store can close it (_close); last: may close it at once

    def __dealloc__(self):
        free(self.own_win)
        if self.buf != NULL:
            PyBuffer_Release(self.buf)
            free(self.buf)

    @staticmethod
    def words_needed(window_size, time_window, half_open_calls):
        """int64 words of a breaker's state (rounded up to whole 64-byte lines)."""
        ws = check_int("window_size", window_size, minimum=1, maximum=COUNT_WINDOW_MAX)
        hc = check_int("half_open_calls", half_open_calls, minimum=1, maximum=COUNT_WINDOW_MAX)
        return _words_needed(ws, bool(time_window), hc)

    @staticmethod
    def init_words(words, window_size, time_window, half_open_calls, now):
        """Write the words of a new breaker into `words` (CLOSED generation 0, begun at `now` ns)."""
        cdef Py_buffer b
        cdef int64_t ws = check_int("window_size", window_size, minimum=1, maximum=COUNT_WINDOW_MAX)
        cdef int64_t hc = check_int("half_open_calls", half_open_calls, minimum=1, maximum=COUNT_WINDOW_MAX)
        cdef bint tw = bool(time_window)
        cdef int64_t t = bt_as_i64(now, "now")
        raw = _words_view(words, _words_needed(ws, tw, hc))
        PyObject_GetBuffer(raw, &b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)
        try:
            _init_words(<bwords_t *>b.buf, (<int64_t *>b.buf) + BW_HEADER, ws * TW_FIELDS if tw else ws, hc,
                        tw, t)
        finally:
            PyBuffer_Release(&b)

    def _set_remote(self, remote):
        """Let a store's shared breaker (Redis) decide: remote.acquire() -> token >= 0, -1 refused, -2 decide
        here; remote.record(token, failed, slow, ignored); remote.rejection(now) -> CircuitOpenError or None."""
        self._ready()
        self.remote_ = remote

    cdef inline int _ready(self) except -1:
        if bt_load(&self.ready_) != 1:         # 0: __init__ never ran; _CLOSED_MARK: _close() was called
            _not_ready(self)
        return 0

    cdef bint _reporting(self) except -1:
        """An outcome report may proceed: False once its store closed (the report of a call admitted before
        the close is dropped: the call's result or exception passes through unchanged); not initialised:
        raises."""
        cdef int64_t r = bt_load(&self.ready_)
        if r == 1:
            return True
        if r == _CLOSED_MARK:
            return False
        _not_ready(self)
        return False

    cdef inline int _inited(self) except -1:
        if bt_load(&self.ready_) == 0:         # settings: readable once closed too
            raise RuntimeError(_UNINIT.format(type(self).__name__))
        return 0

    def _close(self, message):
        """Its store closed in this process (stores/shm.py): every later decision, report and state read
        raises RuntimeError(message); a permit or awaitable dropped after it gives nothing back (the words
        are the store's no more); settings (name, conf, timing, hook, classify) still read. The first
        message stays; a breaker never initialised stays so."""
        if bt_load(&self.ready_) == 1:
            self.closed_msg = str(message)
            bt_store(&self.ready_, _CLOSED_MARK)

    cdef inline int64_t _now(self) except? -1:
        if self.clock_ns is None:
            return monotonic_ns()
        return bt_as_i64(self.clock_ns(), "clock_ns()")

    cdef inline int64_t _now_arg(self, object now) except? -1:
        if now is None:
            return self._now()
        return bt_as_i64(now, "now")

    # -- the listener hook: one atomic load into a local, never a check and a second read ----------------
    cdef inline object _hook(self):
        cdef PyObject *h = <PyObject *><intptr_t>bt_load(&self.hook_)
        if h == NULL:
            return None
        return <object>h

    @property
    def hook(self):
        """callable(kind, a, b) or None: events are built only when set."""
        self._inited()
        return self._hook()

    @hook.setter
    def hook(self, value):
        self._ready()
        if value is not None and not callable(value):
            raise TypeError(f"hook must be a callable(kind, a, b) or None, got {value!r}")
        with _HOOK_LOCK:
            old = self.hook_owner
            if old is not None and old is not value:
                self.hook_retired.append(old)
            self.hook_owner = value
            bt_store(&self.hook_, 0 if value is None else <int64_t><intptr_t><PyObject *>value)

    # settings still read once closed (as the other cores bound to a store's words)
    @property
    def conf(self):
        self._inited()
        return self.conf_

    @property
    def name(self):
        self._inited()
        return self.name_

    @property
    def timing(self):
        """True when results need a clock reading (slow-call timing or a time window)."""
        self._inited()
        return self.timing_

    @property
    def attempt(self):
        self._ready()
        return bt_load(&self.w.attempt)

    # -- transitions ----------------------------------------------------------------------------------
    cdef int64_t _move(self, int expect, int64_t gen, int new, int64_t now, int64_t attempt) except -2:
        """(expect, gen) -> new; attempt >= 0 sets the attempt count. Returns the new generation, or -1
        when another thread moved first (then nothing here happens). Claim, prepare, publish: whatever
        generation gen + 1 needs is in place before the state word shows it."""
        cdef int64_t w, claimed, open_ns = 0
        if new == ST_OPEN:
            w = bt_load(&self.w.st.word)
            if st_state(w) != expect or st_gen(w) != gen or st_prep(w):
                return -1
            open_ns = open_duration_ns(self.conf_, attempt, log)    # user code: before the claim
        claimed = st_claim_word(&self.w.st, expect, gen)
        if claimed < 0:
            return -1
        if not self._prepare_publish(claimed, new, gen + 1, now, attempt, open_ns):
            return -1                           # stalled so long that another process took it over
        h = self._hook()
        if h is not None and expect != new:     # a manual restart of the same state is no change
            h("state_change", _STATES[expect], _STATES[new])
        return gen + 1

    cdef bint _prepare_publish(self, int64_t claimed, int new, int64_t ng, int64_t now, int64_t attempt,
                               int64_t open_ns) noexcept nogil:
        """Prepare generation ng of state `new` and publish it over the claimed word (no Python from the
        claim to the publish, nothing can fail)."""
        st_stamp_write(&self.w.st.since[ng & 1], ng, now)
        if new == ST_OPEN:
            st_stamp_write(&self.w.until[ng & 1], ng, _deadline(now, open_ns))
        if attempt >= 0:
            bt_store(&self.w.attempt, attempt)
        wg_close(&self.w.closed_guard, self.guard_stall)   # older generations record nothing from here on
        wg_close(&self.w.half_guard, self.guard_stall)
        if new == ST_CLOSED or new == ST_METRICS_ONLY:
            self._reset_closed()
            bt_store(&self.w.metrics_half, 0)
            wg_open(&self.w.closed_guard, ng)
        elif new == ST_HALF_OPEN:
            cwin_reset(&self.half)
            bt_store(&self.w.metrics_half, 1)
            wg_open(&self.w.half_guard, ng)
        if self.guard_stall == 0:
            st_publish(&self.w.st, new, ng)     # process-local: nobody else can publish a claimed word
            return True
        return st_publish_claimed(&self.w.st, claimed, new, ng)

    cdef int _takeover(self, int64_t w) except -1:
        """Shared words: a transition claimed (PREP) and not published within PREP_STALL_NS belongs to a
        process killed between its claim and its publish. One process (the CAS on `stolen`) takes the
        claim over and publishes a fresh generation of the same state (OPEN: a fresh open_duration), so
        the breaker never stays frozen. Returns 1 when the word moved on (decide again)."""
        cdef int64_t t, v, gen = st_gen(w), open_ns = 0, mono
        cdef int s = st_state(w)
        if self.guard_stall == 0 or not st_prep(w):
            return 0
        mono = bt_mono_ns()
        if bt_load(&self.prep_word) != w:
            bt_store(&self.prep_word, w)
            bt_store(&self.prep_seen, mono)
            return 0
        if mono - bt_load(&self.prep_seen) < PREP_STALL_NS:
            return 0
        if s == ST_OPEN:
            open_ns = open_duration_ns(self.conf_, max(1, bt_load(&self.w.attempt)), log)
        t = self._now()
        while True:
            v = bt_load(&self.w.stolen)
            if v >= gen + 1 or bt_load(&self.w.st.word) != w:
                return 1                        # taken over by another process, or published meanwhile
            if bt_cas(&self.w.stolen, v, gen + 1):
                break
        self._prepare_publish(w, s, gen + 1, t, -1, open_ns)
        log.warning("circuit breaker %r: a transition left half-done by a dead process was taken over", self.name_)
        return 1

    cdef inline void _gexit(self, int64_t *g, int64_t tag) noexcept nogil:
        if self.guard_stall == 0:
            wg_exit(g)
        else:
            wg_exit_tagged(g, tag)

    cdef void _reset_closed(self) noexcept nogil:
        cdef int64_t i
        bt_store(&self.w.cons, 0)
        if self.time_window:
            for i in range(self.window_size * TW_FIELDS):
                bt_store(&self.tw[i], 0)
            bt_store(&self.w.tw_mark, -1)
        else:
            cwin_reset(&self.closed)

    cdef int _current(self, int64_t now) except -1:
        """What a state read applies (DESIGN §3c): OPEN whose open_duration has passed enters HALF_OPEN
        now (as a call would), and HALF_OPEN past half_open_max_wait re-opens."""
        cdef int64_t w = bt_load(&self.w.st.word), t
        if st_prep(w) and self._takeover(w):
            w = bt_load(&self.w.st.word)
        if (st_state(w) == ST_OPEN and not st_prep(w) and st_stamp_read(&self.w.until[st_gen(w) & 1], st_gen(w), &t)
                and _due(now, t)):
            self._move(ST_OPEN, st_gen(w), ST_HALF_OPEN, now, -1)
        return self._expire_half_open(now)

    cdef int _expire_half_open(self, int64_t now) except -1:
        cdef int64_t w = bt_load(&self.w.st.word), t
        if (st_state(w) == ST_HALF_OPEN and not st_prep(w) and self.half_max_wait_ns >= 0
                and st_stamp_read(&self.w.st.since[st_gen(w) & 1], st_gen(w), &t)
                and bt_sat_sub(now, t) >= self.half_max_wait_ns):
            self._move(ST_HALF_OPEN, st_gen(w), ST_OPEN, now, bt_load(&self.w.attempt) + 1)
        return 0

    # -- decisions ------------------------------------------------------------------------------------
    cdef int64_t _acquire(self, int64_t now, bint have_now) except -2:
        """A token, or -1. Without have_now the clock is read only if the state needs it."""
        cdef int64_t w, g, t
        cdef int s
        if self.remote_ is not None:
            t = self._remote_acquire()
            if t != -2:
                return t                        # -2: the store is down and its policy is "local"
        while True:
            w = bt_load(&self.w.st.word)
            s = st_state(w)
            g = st_gen(w)
            if s == ST_CLOSED or s == ST_METRICS_ONLY or s == ST_DISABLED:
                return g << 1
            if not have_now:
                now = self._now()               # only a non-CLOSED state needs the time
                have_now = True
            if st_prep(w):
                if self._takeover(w):           # a transition is being prepared: refuse as its old state
                    continue
            elif s == ST_OPEN:
                if not st_stamp_read(&self.w.until[g & 1], g, &t):
                    continue                    # the word moved on while we read: decide again
                if _due(now, t):
                    self._move(ST_OPEN, g, ST_HALF_OPEN, now, -1)
                    continue
            elif s == ST_HALF_OPEN:
                if self.half_max_wait_ns >= 0:
                    if not st_stamp_read(&self.w.st.since[g & 1], g, &t):
                        continue
                    if bt_sat_sub(now, t) >= self.half_max_wait_ns:
                        self._move(ST_HALF_OPEN, g, ST_OPEN, now, bt_load(&self.w.attempt) + 1)
                        continue
                if st_try_flight(&self.w.st, g, self.half_calls):
                    return g << 1 | 1
                if st_gen(bt_load(&self.w.st.word)) != g:
                    continue                    # moved on while we tried: decide again
            self._count_refusal()
            return -1

    cdef int _count_refusal(self) except -1:
        bt_fetch_add(&self.w.not_permitted, 1)
        h = self._hook()
        if h is not None:
            h("not_permitted", None, None)
        return 0

    cdef int64_t _remote_acquire(self) except -3:
        """The store's shared breaker decides: a token flagged REMOTE, -1 (refused), -2 (decide here)."""
        cdef int64_t r = self.remote_.acquire()
        if r >= 0:
            return r | _REMOTE
        if r == -1:
            self._count_refusal()
            return -1
        return -2

    def _refused(self):
        """Count a refusal decided by the store (not_permitted, the event)."""
        self._ready()
        self._count_refusal()

    def acquire(self, now=None):
        """A token (generation << 1 | half-open bit) when the call may go ahead, else -1."""
        self._ready()
        return self._acquire(self._now_arg(now), True)

    cdef object _rejection(self, int64_t now):
        cdef int64_t w, t
        cdef int s
        if self.remote_ is not None:
            e = self.remote_.rejection(now)
            if e is not None:
                return e
        while True:
            w = bt_load(&self.w.st.word)
            s = st_state(w)
            if s != ST_OPEN:
                return CircuitOpenError(self.name_, _STATES[s], None)
            if st_stamp_read(&self.w.until[st_gen(w) & 1], st_gen(w), &t):
                t = bt_sat_sub(t, now)
                return CircuitOpenError(self.name_, _STATES[s], (t if t > 0 else 0) / 1e9)

    def rejection(self, now=None):
        """The error for a refused call: retry_after is the time left in OPEN, else None."""
        self._ready()
        return self._rejection(self._now_arg(now))

    cdef inline int _classify(self, exc) except -1:
        """The outcome of an exception. Without record / ignore predicates the outcome is a function of the
        exception's type (every test is a PyObject_TypeCheck): the last type seen and its outcome are kept in
        one word (type pointer | outcome), so a repeated failure type costs one load and one compare. A
        cached type is kept alive by `cls_kept` (at most _CLS_KEPT types), so its address is never reused
        while the word may hold it."""
        cdef int64_t c = bt_load(&self.cls_cache)
        cdef int r
        if c != 0 and (c & ~<int64_t>3) == <int64_t><intptr_t>Py_TYPE(exc):
            return <int>(c & 3)
        r = self._classify_slow(exc)
        if self.ignore_fn is None and self.record_fn is None:
            self._cache_class(exc, r)
        return r

    cdef int _cache_class(self, exc, int r) except -1:
        cdef object tp = type(exc)
        cdef list kept = self.cls_kept
        if tp not in kept:
            if len(kept) >= _CLS_KEPT:
                return 0
            kept.append(tp)
        bt_store(&self.cls_cache, <int64_t><intptr_t><PyObject *>tp | r)
        return 0

    cdef int _classify_slow(self, exc) except -1:
        # PyObject_TypeCheck, not isinstance(): a failed isinstance() also looks up exc.__class__
        if (not PyObject_TypeCheck(exc, <PyTypeObject *>Exception)
                or PyObject_TypeCheck(exc, <PyTypeObject *>UsageError)):
            return O_CANCELLED              # no outcome: not an Exception, or buttress refusing a wrong use
        if PyObject_TypeCheck(exc, <PyTypeObject *>Rejected) and (
                self.record_rejected is None or not _is_instance(exc, <tuple>self.record_rejected)):
            return O_IGNORED                # buttress's own rejection (an inner stage): never a failure
        try:
            if (self.ignore_t is not None and _is_instance(exc, <tuple>self.ignore_t)
                    or self.ignore_fn is not None and self.ignore_fn(exc)):
                return O_IGNORED
            if (self.record_t is not None and _is_instance(exc, <tuple>self.record_t)
                    or self.record_fn is not None and self.record_fn(exc)):
                return O_FAILURE
        except Exception:
            log.exception("circuit breaker %r: record/ignore predicate failed; counting a failure", self.name_)
            return O_FAILURE
        return O_SUCCESS

    def classify(self, exc):
        """SUCCESS, FAILURE, IGNORED or CANCELLED for an exception (ignore wins over record)."""
        self._inited()
        return self._classify(exc)

    cdef int _classify_result(self, result) except -1:
        if self.record_result is None:
            return O_SUCCESS
        try:
            return O_FAILURE if self.record_result(result) else O_SUCCESS
        except Exception:
            log.exception("circuit breaker %r: record_result predicate failed; counting a failure", self.name_)
            return O_FAILURE

    def classify_result(self, result):
        """FAILURE when record_result matches the return value, else SUCCESS."""
        self._inited()
        return self._classify_result(result)

    cdef bint _exceeded(self, int64_t calls, int64_t failures, int64_t slows) except -1:
        cdef double fr = <double>failures / calls, sr = <double>slows / calls
        cdef bint hit = False
        h = self._hook()
        if fr >= self.fr_threshold:
            hit = True
            if h is not None:
                h("failure_rate_exceeded", fr, None)
        if self.slow_ns >= 0 and sr >= self.sr_threshold:
            hit = True
            if h is not None:
                h("slow_call_rate_exceeded", sr, None)
        return hit

    cdef int _record(self, int64_t token, int outcome, int64_t start, int64_t now, bint have_now, exc) except -1:
        """The clock is read first (it may be Python), the record itself is conditional on the token's
        generation (the window guard), hooks and the verdict come after."""
        cdef int64_t gen = token >> 1, w, p, calls, failures, slows, duration = 0, epoch
        cdef bint failed, slow, counted
        cdef int s
        if bt_load(&self.ready_) != 1:
            if bt_load(&self.ready_) == _CLOSED_MARK:
                return 0        # its store closed: the outcome of a call admitted before is dropped
            return _not_ready(self)
        if token & _REMOTE:
            return self._remote_record(token, outcome, start, now, have_now, exc)
        if outcome >= O_IGNORED:
            if token & 1:
                st_return_flight(&self.w.st, gen)
            if outcome == O_IGNORED:
                h = self._hook()
                if h is not None:
                    if self.timing_ and not have_now:
                        now = self._now()
                    h("ignored", exc, bt_sat_sub(now, start) if self.timing_ else None)
            return 0
        if self.timing_:
            if not have_now:
                now = self._now()
                have_now = True
            duration = bt_sat_sub(now, start)
        failed = outcome == O_FAILURE
        if self.classic_:
            return self._record_classic(token, failed, now, have_now, exc)
        slow = self.slow_ns >= 0 and duration > self.slow_ns
        if token & 1:                                  # a half-open probe
            if not wg_enter(&self.w.half_guard, gen):
                return 0                               # stale generation: dropped entirely
            cw_record(self.half.head, self.half.packed, self.half.slots, self.half.size, failed, slow)
            p = bt_load(self.half.packed)
            self._gexit(&self.w.half_guard, gen)
            self._outcome_hook(failed, exc, duration)
            calls = cw_field(p, 0)
            if calls >= self.half_minimum:
                if not have_now:
                    now = self._now()                  # the verdict needs the time (its deadline)
                if self._exceeded(calls, cw_field(p, 16), cw_field(p, 32)):
                    self._move(ST_HALF_OPEN, gen, ST_OPEN, now, bt_load(&self.w.attempt) + 1)
                else:
                    self._move(ST_HALF_OPEN, gen, ST_CLOSED, now, 0)
            return 0
        if not wg_enter(&self.w.closed_guard, gen):
            if self.guard_stall:
                self._takeover(bt_load(&self.w.st.word))   # a preparation left by a killed process?
            return 0                                   # stale generation, DISABLED, OPEN...: dropped
        if self.time_window:
            epoch = self._tw_record(failed, slow, now)
        else:
            cw_record(self.closed.head, self.closed.packed, self.closed.slots, self.closed.size, failed, slow)
            p = bt_load(self.closed.packed)
        self._gexit(&self.w.closed_guard, gen)
        self._outcome_hook(failed, exc, duration)
        w = bt_load(&self.w.st.word)
        if st_gen(w) != gen:
            return 0
        s = st_state(w)
        if self.time_window:
            if not (failed or slow) and bt_load(&self.w.tw_mark) == epoch * 2:
                # a fast success in the same second, with the minimum already reached, can only
                # lower the rates: skip summing the buckets
                return 0
            calls, failures, slows = self._tw_counts(now)
            bt_store(&self.w.tw_mark, epoch * 2 + (calls < self.minimum_calls))
        else:
            calls, failures, slows = cw_field(p, 0), cw_field(p, 16), cw_field(p, 32)
        # a fast success can only lower the rates, unless it is the call that reaches the minimum
        # (a time window's minimum can be reached again as buckets expire: it was summed above). A full
        # count window of exactly minimum_calls (the default) reads calls == minimum for every later call:
        # the first success of the generation seen there judges, the later ones cannot change the verdict
        # (eval_gen, this process's; another process judging once more is harmless)
        if calls >= self.minimum_calls and (failed or slow or s == ST_CLOSED and
                                             (self.time_window or calls == self.minimum_calls
                                              and bt_load(&self.eval_gen) != gen)):
            if not (failed or slow or self.time_window):
                bt_store(&self.eval_gen, gen)
            if self._exceeded(calls, failures, slows) and s == ST_CLOSED:
                if not have_now:
                    now = self._now()
                self._move(ST_CLOSED, gen, ST_OPEN, now, 1)
        return 0

    cdef int _remote_record(self, int64_t token, int outcome, int64_t start, int64_t now, bint have_now,
                            exc) except -1:
        """A call admitted by the store's shared breaker: its outcome goes there (CLOSED outcomes are
        counted locally and flushed by the store; half-open ones are reported at once)."""
        cdef int64_t duration = 0
        cdef bint failed = outcome == O_FAILURE, slow = False
        if self.timing_:
            if not have_now:
                now = self._now()
            duration = bt_sat_sub(now, start)
            slow = outcome < O_IGNORED and self.slow_ns >= 0 and duration > self.slow_ns
        self.remote_.record(token & ~_REMOTE, failed, slow, outcome >= O_IGNORED)
        h = self._hook()
        if h is not None:
            if outcome == O_IGNORED:
                h("ignored", exc, duration if self.timing_ else None)
            elif outcome < O_IGNORED:
                self._outcome_hook(failed, exc, duration)
        return 0

    cdef int _record_classic(self, int64_t token, bint failed, int64_t now, bint have_now, exc) except -1:
        """CLOSED: a failure fetch-adds one to the run of consecutive failures, a success stores 0 (or
        finds it 0 already: then it is ordered before any failure that follows); the failure whose
        fetch-add returns failure_threshold - 1 (or more) opens the breaker. HALF_OPEN: the half-open
        count window; one failure re-opens, success_threshold successes (and no failure) close."""
        cdef int64_t gen = token >> 1, p, run = 0
        if token & 1:
            if not wg_enter(&self.w.half_guard, gen):
                return 0                               # stale generation: dropped entirely
            cw_record(self.half.head, self.half.packed, self.half.slots, self.half.size, failed, False)
            p = bt_load(self.half.packed)
            self._gexit(&self.w.half_guard, gen)
            self._outcome_hook(failed, exc, 0)
            if failed or (cw_field(p, 16) == 0 and cw_field(p, 0) >= self.succ_th):
                if not have_now:
                    now = self._now()                  # the verdict needs the time (its deadline)
                if failed:
                    self._move(ST_HALF_OPEN, gen, ST_OPEN, now, bt_load(&self.w.attempt) + 1)
                else:
                    self._move(ST_HALF_OPEN, gen, ST_CLOSED, now, 0)
            return 0
        if not failed and bt_load(&self.w.cons) == 0:
            # nothing to reset: this success is ordered before any failure that follows
            if self._hook() is not None and st_gen(bt_load(&self.w.st.word)) == gen:
                self._outcome_hook(False, None, 0)
            return 0
        if not wg_enter(&self.w.closed_guard, gen):
            if self.guard_stall:
                self._takeover(bt_load(&self.w.st.word))   # a preparation left by a killed process?
            return 0                                   # stale generation, DISABLED, OPEN...: dropped
        if failed:
            run = bt_fetch_add(&self.w.cons, 1) + 1
        else:
            bt_store(&self.w.cons, 0)
        self._gexit(&self.w.closed_guard, gen)
        self._outcome_hook(failed, exc, 0)
        if failed and run >= self.fail_th and st_state(bt_load(&self.w.st.word)) == ST_CLOSED:
            if not have_now:
                now = self._now()
            self._move(ST_CLOSED, gen, ST_OPEN, now, 1)
        return 0

    cdef int _outcome_hook(self, bint failed, exc, int64_t duration) except -1:
        h = self._hook()
        if h is not None:
            if failed:
                h("error", exc, duration if self.timing_ else None)
            else:
                h("success", None, duration if self.timing_ else None)
        return 0

    cdef int64_t _tw_record(self, bint failed, bint slow, int64_t now) noexcept nogil:
        cdef int64_t epoch = tw_epoch(now, 1000000000, &self.tw_base, self.tw_bits)   # exact: base 0
        cdef int64_t *b = &self.tw[bt_floormod(epoch, self.window_size) * TW_FIELDS]
        epoch = tw_add(&b[0], epoch, self.tw_bits)
        if failed:
            tw_add(&b[1], epoch, self.tw_bits)
        if slow:
            tw_add(&b[2], epoch, self.tw_bits)
        return epoch

    cdef (int64_t, int64_t, int64_t) _tw_counts(self, int64_t now) noexcept nogil:
        cdef int64_t epoch = tw_epoch(now, 1000000000, &self.tw_base, self.tw_bits), i
        cdef int64_t t[3]
        t[0] = t[1] = t[2] = 0
        for i in range(self.window_size):
            tw_read_bucket(&self.tw[i * TW_FIELDS], 3, epoch, self.window_size, self.tw_bits, t)
        return t[0], t[1], t[2]

    def record(self, token, outcome, start, now=None, exc=None):
        """Apply the outcome of a call admitted with `token` at `start` (ns)."""
        if not self._reporting():
            return
        cdef int64_t tok = bt_as_i64(token, "token"), st = bt_as_i64(start, "start")
        if type(outcome) is not int or not 0 <= outcome <= 3:
            raise ValueError(f"outcome must be SUCCESS, FAILURE, IGNORED or CANCELLED (0-3), got {outcome!r}")
        if now is None:
            self._record(tok, outcome, st, 0, False, exc)
        else:
            self._record(tok, outcome, st, bt_as_i64(now, "now"), True, exc)

    # -- state ----------------------------------------------------------------------------------------
    def state_now(self, now=None):
        """The state code now: an OPEN breaker whose open_duration has passed enters HALF_OPEN at this
        read, a HALF_OPEN one past half_open_max_wait re-opens."""
        self._ready()
        self._current(self._now_arg(now))
        return st_state(bt_load(&self.w.st.word))

    def load(self):
        """(state, generation, half-open permits out)."""
        self._ready()
        cdef int64_t w = bt_load(&self.w.st.word)
        return (st_state(w), st_gen(w), st_flight(w))

    def transition_to(self, state, now=None):
        """Move to `state` from any state (a new generation). ValueError for HALF_OPEN outside OPEN and
        for a move to the current state."""
        self._ready()
        cdef int new = int(State(state))
        cdef int64_t w, attempt, t = self._now_arg(now)
        cdef int cur
        while True:
            w = bt_load(&self.w.st.word)
            if st_prep(w):
                self._takeover(w)               # another transition is being prepared (no GIL): wait
                continue
            cur = st_state(w)
            if new == cur or (new == ST_HALF_OPEN and cur != ST_OPEN):
                raise ValueError(f"illegal transition: {State(cur).name} -> {State(new).name}")
            attempt = bt_load(&self.w.attempt) + 1 if new == ST_OPEN else (0 if new == ST_CLOSED else -1)
            if self._move(cur, st_gen(w), new, t, attempt) >= 0:
                return

    def reset(self, now=None):
        """CLOSED with an empty window, attempt 0, not_permitted 0 (a new generation)."""
        self._ready()
        cdef int64_t w, t = self._now_arg(now)
        bt_store(&self.w.not_permitted, 0)
        while True:
            w = bt_load(&self.w.st.word)
            if st_prep(w):
                self._takeover(w)
                continue
            if self._move(st_state(w), st_gen(w), ST_CLOSED, t, 0) >= 0:
                return

    def restart(self, state, now=None):
        """Enter the manual state `state` (CLOSED, FORCED_OPEN, DISABLED or METRICS_ONLY) from any state,
        the same one included: always a new generation (results of older permits are dropped); CLOSED
        and METRICS_ONLY start an empty window; CLOSED sets the attempt count back to 0."""
        self._ready()
        cdef int new = int(State(state))
        if new == ST_OPEN or new == ST_HALF_OPEN:
            raise ValueError(f"restart() enters a manual state (CLOSED, FORCED_OPEN, DISABLED, METRICS_ONLY), "
                             f"got {State(new).name}")
        cdef int64_t w, t = self._now_arg(now)
        while True:
            w = bt_load(&self.w.st.word)
            if st_prep(w):
                self._takeover(w)
                continue
            if self._move(st_state(w), st_gen(w), new, t, 0 if new == ST_CLOSED else -1) >= 0:
                return

    def metrics(self, now=None):
        """(state, calls, failures, slow_calls, failure_rate, slow_call_rate, not_permitted)."""
        self._ready()
        cdef int64_t p, calls, failures, slows, minimum, t = self._now_arg(now)
        self._current(t)
        if bt_load(&self.w.metrics_half):
            p = bt_load(self.half.packed)
            calls, failures, slows = cw_field(p, 0), cw_field(p, 16), cw_field(p, 32)
            minimum = self.half_minimum
        elif self.classic_:                    # the run of consecutive failures; no rates
            calls = bt_load(&self.w.cons)
            return (st_state(bt_load(&self.w.st.word)), calls, calls, 0, -1.0, -1.0, bt_load(&self.w.not_permitted))
        elif self.time_window:
            calls, failures, slows = self._tw_counts(t)
            minimum = self.minimum_calls
        else:
            p = bt_load(self.closed.packed)
            calls, failures, slows = cw_field(p, 0), cw_field(p, 16), cw_field(p, 32)
            minimum = self.minimum_calls
        ok = calls >= minimum and calls > 0
        return (st_state(bt_load(&self.w.st.word)), calls, failures, slows,
                <double>failures / calls if ok else -1.0, <double>slows / calls if ok else -1.0,
                bt_load(&self.w.not_permitted))

    def __repr__(self):
        if not bt_load(&self.ready_):
            return f"<{type(self).__name__} (not initialised)>"
        if bt_load(&self.ready_) == _CLOSED_MARK:
            return f"<{type(self).__name__} {self.name_!r} (closed)>"
        return f"BreakerCore(name={self.name_!r}, state={st_state(bt_load(&self.w.st.word))})"

    # -- calling --------------------------------------------------------------------------------------
    def start(self):
        """ns timestamp for a call about to start (0 when nothing is timed)."""
        self._ready()
        return self._now() if self.timing_ else 0

    def enter(self):
        """(token, start) for a call that may go ahead; raises CircuitOpenError otherwise."""
        self._ready()
        cdef int64_t token, start
        _enter(<PyObject *>self, &token, &start)       # raises CircuitOpenError when refused
        return token, start

    def exit_ok(self, token, start, result):
        if not self._reporting():
            return
        self._record(bt_as_i64(token, "token"), self._classify_result(result), bt_as_i64(start, "start"), 0,
                     False, None)

    def exit_err(self, token, start, exc):
        if not self._reporting():
            return
        self._record(bt_as_i64(token, "token"), self._classify(exc), bt_as_i64(start, "start"), 0, False, exc)

    def try_acquire(self):
        """Two-step use: a Permit, or None when refused."""
        self._ready()
        cdef int64_t now = self._now()
        cdef int64_t token = self._acquire(now, True)
        if token < 0:
            return None
        cdef Permit p = Permit.__new__(Permit)
        p.core, p.token, p.start = self, token, (now if self.timing_ else 0)
        return p

    def guard(self, fn, asynchronous=False):
        """A callable running fn under the breaker (vectorcall; binds like a function). asynchronous=True:
        fn is an async function; a call takes the permit and returns a compiled awaitable that drives fn's
        coroutine and records its outcome when it finishes (a refusal is raised when it is awaited)."""
        self._ready()
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        if type(asynchronous) is not bool:
            raise TypeError(f"asynchronous must be a bool, got {asynchronous!r}")
        return _make_guard(self, fn, asynchronous)

    def make_call(self, asynchronous=False):
        """The `call(fn, *args, **kwargs)` entry (asynchronous=True: `call_async(fn, *args, **kwargs)`)."""
        self._ready()
        if type(asynchronous) is not bool:
            raise TypeError(f"asynchronous must be a bool, got {asynchronous!r}")
        return _make_guard(self, None, asynchronous)

    # -- with / async with (records: see _with_enter_c) -------------------------------------------------
    # __enter__ / __exit__ are C methods installed by _install() (_with_enter_c, _with_exit_c): no argument
    # parsing, and a refusal leaves with no traceback frame of ours

    # __aenter__ / __aexit__ too (_aenter_c, _aexit_c): a Cython def would be bound per `async with` (Cython
    # 3 methods are function objects: a bound method each lookup)

    def _held(self):
        """How many `with` / `async with` acquisitions of this breaker this thread and the current context
        hold (records not yet exited)."""
        self._ready()
        return _wcount(self)

    def settle(self, token, start, fn, result, want_async=False):
        """A call of `fn` admitted with (token, start) returned `result`, which is not a plain value for
        its form (a sync form: an awaitable, a generator or an async generator; an async form: anything
        not awaitable). Returns what the caller gets: a generator or async generator guarded over its
        whole iteration (the permit is held until it finishes or is closed), or a plain value (recorded
        as a success). Raises UsageError after returning the permit (and closing a coroutine) when a sync
        form got an awaitable or an async form got a sync result."""
        self._reporting()       # its store closed mid-call: the result passes through, its report dropped
        return self._settle(fn, bt_as_i64(token, "token"), bt_as_i64(start, "start"), result, bool(want_async))

    cdef object _settle(self, fn, int64_t token, int64_t start, result, bint want_async):
        cdef type kind = type(result)
        cdef Permit p
        if kind is types.AsyncGeneratorType or (kind is types.GeneratorType and not want_async
                                                 and not (result.gi_code.co_flags & _CO_ITERABLE_COROUTINE)):
            p = Permit.__new__(Permit)
            p.core, p.token, p.start = self, token, start
            return (guard_astream if kind is types.AsyncGeneratorType else guard_stream)(p, result)
        if want_async:
            if kind is types.CoroutineType or inspect.isawaitable(result):
                return result                               # the caller awaits it and reports
            self._record(token, O_CANCELLED, start, 0, False, None)
            if kind is types.GeneratorType:
                result.close()
                raise UsageError(_SYNC_STREAM.format(cls=type(self).__name__, fn=describe(fn)))
            raise sync_in_async(self, fn, result)
        if inspect.isawaitable(result):
            self._record(token, O_CANCELLED, start, 0, False, None)
            refuse_sync_result(self, fn, result, generators=False)
        self._record(token, self._classify_result(result), start, 0, False, None)
        return result


# -- the vectorcall entry ---------------------------------------------------------------------------------
# The ops of include/buttress_guard.h: bt_guard_vectorcall (sync forms) and bt_aguard_vectorcall (async forms:
# the permit is taken in C and a compiled awaitable, bt_aw, drives fn's coroutine and records its outcome in
# C when it finishes; no Python frame of its own). A refusal is raised with no Cython traceback frame: the
# CircuitOpenError is built in C (_refuse) and set as the pending error; only errors that are not refusals
# (a failing user clock, a listener) pass through Cython's error handling.

cdef extern from *:
    """
    /* cls.__new__(cls) (no __init__ chain) whose __dict__ is a copy of `attrs` (the breaker's cached
       {name, state, _lazy} of a refusal in that state), plus retry_after / _lazy when given (OPEN: they
       change with the time left). The copy goes straight into the exception's dict slot when the class
       keeps its dict there (a Python subclass of Exception does); else through the generic __dict__. */
    static PyObject *bt_k_retry_after = NULL, *bt_k_lazy = NULL, *bt_empty = NULL;
    static int bt_exc_dict_slot = 0;
    static int bt_open_error_ready(PyObject *cls) {
        bt_k_retry_after = PyUnicode_InternFromString("retry_after");
        bt_k_lazy = PyUnicode_InternFromString("_lazy");
        bt_empty = PyTuple_New(0);
        if (bt_k_retry_after == NULL || bt_k_lazy == NULL || bt_empty == NULL)
            return -1;
        bt_exc_dict_slot = ((PyTypeObject *)cls)->tp_dictoffset == (Py_ssize_t)offsetof(PyBaseExceptionObject, dict);
        return 0;
    }
    static PyObject *bt_open_error(PyObject *cls, PyObject *attrs, PyObject *retry_after, PyObject *lazy) {
        PyObject *exc, *d = PyDict_Copy(attrs);
        if (d == NULL)
            return NULL;
        if ((retry_after != NULL && PyDict_SetItem(d, bt_k_retry_after, retry_after) < 0)
                || (lazy != NULL && PyDict_SetItem(d, bt_k_lazy, lazy) < 0)) {
            Py_DECREF(d);
            return NULL;
        }
        exc = ((PyTypeObject *)cls)->tp_new((PyTypeObject *)cls, bt_empty, NULL);
        if (exc == NULL) {
            Py_DECREF(d);
            return NULL;
        }
        if (bt_exc_dict_slot && ((PyBaseExceptionObject *)exc)->dict == NULL) {
            ((PyBaseExceptionObject *)exc)->dict = d;        /* steals */
            return exc;
        }
        if (PyObject_GenericSetDict(exc, d, NULL) < 0) {
            Py_DECREF(d);
            Py_DECREF(exc);
            return NULL;
        }
        Py_DECREF(d);
        return exc;
    }
    """
    PyObject *bt_open_error(PyObject *cls, PyObject *attrs, PyObject *retry_after, PyObject *lazy) noexcept
    int bt_open_error_ready(PyObject *cls) except -1

cdef extern from "Python.h":
    # raw forms: no Cython error handling (a refusal leaves without a Cython traceback frame)
    PyObject *bt_call2 "PyObject_CallFunctionObjArgs"(PyObject *, PyObject *, PyObject *, void *)
    PyObject *bt_ll "PyLong_FromLongLong"(long long)
    PyObject *bt_float "PyFloat_FromDouble"(double)
    PyObject *bt_pack2 "PyTuple_Pack"(Py_ssize_t, PyObject *, PyObject *)
    PyObject *bt_pack3 "PyTuple_Pack"(Py_ssize_t, PyObject *, PyObject *, PyObject *)
    void bt_set_object "PyErr_SetObject"(PyObject *, PyObject *)
    void bt_decref "Py_DECREF"(PyObject *)
    void bt_xdecref "Py_XDECREF"(PyObject *)
    PyObject *bt_none "Py_None"
    PyObject *bt_false "Py_False"



def _remote_rejection(BreakerCore b, now):
    return b._rejection(now)


cdef int _refuse(BreakerCore b, int64_t now) noexcept:
    """Set the refusal of a call refused at `now` as the pending error; returns -1. CircuitOpenError built as
    cls.__new__(cls) with its attributes set and its message formatted when first read (errors.Rejected's
    lazy message): what CircuitOpenError(name, state, retry_after) gives, without its Python __init__. A
    state without retry_after copies the breaker's cached attributes of that state as they are."""
    cdef int64_t w, t = -1
    cdef int s
    cdef PyObject *e
    cdef PyObject *o
    cdef PyObject *ra
    cdef PyObject *vals
    cdef PyObject *lazy
    if b.remote_ is not None:
        o = bt_ll(now)
        if o == NULL:
            return -1
        e = bt_call2(<PyObject *>_remote_rejection, <PyObject *>b, o, NULL)
        bt_decref(o)
        if e == NULL:
            return -1
        bt_set_object(<PyObject *>Py_TYPE(<object>e), e)
        bt_decref(e)
        return -1
    while True:
        w = bt_load(&b.w.st.word)
        s = st_state(w)
        if s != ST_OPEN:
            break
        if st_stamp_read(&b.w.until[st_gen(w) & 1], st_gen(w), &t):
            t = bt_sat_sub(t, now)
            if t < 0:
                t = 0
            break
    if s != ST_OPEN:
        e = bt_open_error(<PyObject *>CircuitOpenError, <PyObject *>b.err_attrs[s], NULL, NULL)
    else:
        ra = bt_float(<double>t / 1e9)
        if ra == NULL:
            return -1
        vals = bt_pack3(3, <PyObject *>b.name_, <PyObject *>_STATE_NAMES[s], ra)
        if vals == NULL:
            bt_decref(ra)
            return -1
        lazy = bt_pack2(2, <PyObject *>_FMT_OPEN_RA, vals)
        bt_decref(vals)
        if lazy == NULL:
            bt_decref(ra)
            return -1
        e = bt_open_error(<PyObject *>CircuitOpenError, <PyObject *>b.err_attrs[s], ra, lazy)
        bt_decref(ra)
        bt_decref(lazy)
    if e == NULL:
        return -1
    bt_set_object(<PyObject *>CircuitOpenError, e)
    bt_decref(e)
    return -1


cdef int _not_ready(BreakerCore b) except -1:
    if bt_load(&b.ready_) == _CLOSED_MARK:
        raise RuntimeError(b.closed_msg)
    raise RuntimeError(_UNINIT.format(type(b).__name__))


cdef int _enter(PyObject *owner, int64_t *token, int64_t *start) except -1:
    cdef BreakerCore b = <BreakerCore>owner
    cdef int64_t now = 0, t
    cdef bint timed = b.timing_
    if bt_load(&b.ready_) != 1:
        return _not_ready(b)
    if timed:
        now = b._now()
    t = b._acquire(now, timed)
    if t < 0:
        return _refuse(b, now if timed else b._now())      # the pending error; no frame
    token[0] = t
    start[0] = now
    return 0


ctypedef int (*_raw_enter_t)(PyObject *, int64_t *, int64_t *) noexcept
cdef _raw_enter_t _enter_raw = <_raw_enter_t>_enter         # errors left pending for the C caller


cdef int _try_enter(PyObject *owner, int64_t *token, int64_t *start) noexcept:
    """The async entry's decision: 1 admitted; -1 refused or failed (the error, raised when awaited)."""
    if _enter_raw(owner, token, start) < 0:
        return -1
    return 1


cdef PyObject *_refuse_async(PyObject *owner, PyObject *fn, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames) noexcept:
    return NULL         # never reached: _try_enter answers 1 or -1 (a breaker never waits)


cdef int _exit_ok(PyObject *owner, int64_t token, int64_t start, PyObject *result) except -1:
    cdef BreakerCore b = <BreakerCore>owner
    cdef int outcome = O_SUCCESS
    if bt_load(&b.ready_) == _CLOSED_MARK:
        return 0                        # its store closed mid-call: the result passes through
    if b.record_result is not None:
        outcome = b._classify_result(<object>result)
    return b._record(token, outcome, start, 0, False, None)


cdef void _exit_err(PyObject *owner, int64_t token, int64_t start, PyObject *exc) noexcept:
    cdef BreakerCore b = <BreakerCore>owner
    if bt_load(&b.ready_) != 1:
        return                          # its store closed: nothing to record into
    try:
        b._record(token, b._classify(<object>exc), start, 0, False, <object>exc)
    except BaseException:
        log.exception("circuit breaker %r: recording a failure failed", b.name_)


cdef object _settle_op(PyObject *owner, PyObject *fn, int64_t token, int64_t start, PyObject *result):
    return (<BreakerCore>owner)._settle(<object>fn, token, start, <object>result, False)


cdef object _settle_async_op(PyObject *owner, PyObject *fn, int64_t token, int64_t start, PyObject *result):
    # fn returned no awaitable, permit held: an async generator guarded over its iteration, else UsageError
    return (<BreakerCore>owner)._settle(<object>fn, token, start, <object>result, True)


cdef bt_guard_ops _OPS
_OPS.enter = _enter
_OPS.exit_ok = _exit_ok
_OPS.exit_err = _exit_err
_OPS.settle = _settle_op
_OPS.try_enter = _try_enter
_OPS.refuse_async = _refuse_async
_OPS.settle_async = _settle_async_op


@cython.final
@cython.auto_pickle(False)
cdef class Guarded:
    """fn under a breaker; with fn None it is `call(fn, *args, **kwargs)`. Binds like a function (and, as a
    method descriptor, a method call passes the instance without building a bound method). An async one
    (guard(fn, asynchronous=True), make_call(True)) returns the compiled awaitable of include/buttress_guard.h.
    Made only by CircuitBreaker.guard() / make_call() (calling the type is a TypeError), so it always
    has its core. Layout: the first fields must match bt_guard_head in include/buttress_guard.h."""
    cdef vectorcallfunc vectorcall
    cdef const bt_guard_ops *ops
    cdef PyObject *owner_ptr
    cdef PyObject *fn_ptr
    cdef object owner                 # the owning references (and what the GC sees)
    cdef object fn
    cdef dict __dict__                # __name__, __doc__, __wrapped__ ... set by functools.update_wrapper

    def __call__(self, *args, **kwargs):    # only reached by callers that bypass vectorcall
        if self.vectorcall == bt_aguard_vectorcall or self.vectorcall == bt_cb_acall_vc:
            if self.fn is None and args and not callable(args[0]):
                raise TypeError(f"fn must be callable, got {args[0]!r}")
            return _acall(self, args, kwargs)
        fn = self.fn
        if fn is None:
            if not args:
                raise TypeError("call() needs the function to call as its first argument")
            fn, args = args[0], args[1:]
            if not callable(fn):
                raise TypeError(f"fn must be callable, got {fn!r}")
        return _slow_call(<BreakerCore>self.owner, fn, args, kwargs)

    def __get__(self, obj, objtype):
        return self if obj is None else types.MethodType(self, obj)

    @property
    def __wrapped_core__(self):
        return self.owner


cdef extern from "Python.h":
    ctypedef struct PyTupleObject_items "PyTupleObject":
        PyObject *ob_item[1]


cdef object _acall(Guarded g, tuple args, dict kwargs):
    """The async entry for a caller that bypassed vectorcall: the same C entry."""
    cdef list items = list(args)
    keys = tuple(kwargs)
    items.extend(kwargs.values())
    cdef tuple flat = tuple(items)
    cdef PyObject *r = bt_aguard_vectorcall(<PyObject *>g, <PyObject *const *>&(<PyTupleObject_items *><PyObject *>flat).ob_item[0],
                                           <size_t>len(args), NULL if not kwargs else <PyObject *>keys)
    if r == NULL:
        _raise_pending()
    return _steal(r)


cdef extern from *:
    """
    static void bt_raise_pending(void) {}
    """
    void _raise_pending "bt_raise_pending"() except *


cdef inline object _steal(PyObject *p):
    """A new reference as an object (the cast adds one: drop ours)."""
    o = <object>p
    bt_decref(p)
    return o


cdef object _slow_call(BreakerCore b, fn, tuple args, dict kwargs):
    cdef int64_t token, start
    _enter(<PyObject *>b, &token, &start)
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        _exit_err(<PyObject *>b, token, start, <PyObject *>exc)
        raise
    if bt_lazy_type(Py_TYPE(result)):
        return b._settle(fn, token, start, result, False)
    _exit_ok(<PyObject *>b, token, start, <PyObject *>result)
    return result


cdef Guarded _make_guard(BreakerCore owner, fn, bint asynchronous=False):
    cdef Guarded g = Guarded.__new__(Guarded)
    if fn is None:
        g.vectorcall = bt_cb_acall_vc if asynchronous else bt_cb_call_vc
    else:
        g.vectorcall = bt_aguard_vectorcall if asynchronous else bt_guard_vectorcall
    g.ops = &_OPS
    g.owner = owner
    g.fn = fn
    g.owner_ptr = <PyObject *>owner
    g.fn_ptr = NULL if fn is None else <PyObject *>fn
    return g


# -- `with cb:` / `async with cb:` -------------------------------------------------------------------------
# One breaker serves many callers at once, so __exit__ cannot be told which acquisition it ends. Each
# __enter__ records the acquisition in the breaker's `held_` dict under the caller's frame (frame -> the
# latest record of that frame, a tuple (token, start, context, previous record of the frame)).
# __exit__ takes first the latest record of its own frame (O(1)): a generator or coroutine keeps its frame
# whichever thread or task resumes or finalises it (Starlette's iterate_in_threadpool, asyncio's aclose() of
# an abandoned async generator in a new task), and interleaved generators each end their own. With no record
# of its frame (contextlib.ExitStack enters and exits from frames of its own) it takes the latest record of
# the current contextvars.Context (each asyncio task, each loop callback and each thread runs in its own);
# with none, it is a no-op (a second exit of one acquisition, or no enter).
# A record holds its frame and context (their addresses cannot be reused while it exists); a record whose
# frame finished and whose context only this breaker's records hold can never be exited: it gives its permit
# back (no outcome) when an exit finds no record, or when the dict reaches `sweep_at` frames (then doubled).
# The dict is guarded by its critical section (free-threaded: Py_BEGIN_CRITICAL_SECTION; else the GIL).
# StageBase (_core/guard.pyx) keys its `async with` records by frame the same way; the two record mechanisms
# should become one.
# `async with`: __aenter__ takes the permit and returns a compiled awaitable holding it (its owner: the pair
# (breaker, calling frame)); awaiting it records the acquisition under that frame, in the awaiting task's
# context (an __aenter__ never awaited, thrown into or closed gives its permit back with no outcome).

cdef extern from *:
    """
    /* the current context (borrowed); a thread that has none yet gets its own first */
    static PyObject *bt_ctx_now(void) {
        PyThreadState *ts = PyThreadState_Get();
        PyObject *c = ts->context;
        if (c == NULL) {
            PyObject *copy = PyContext_CopyCurrent();
            if (copy == NULL)
                return NULL;
            Py_DECREF(copy);
            c = ts->context;
            if (c == NULL)
                PyErr_SetString(PyExc_SystemError, "buttress: no current contextvars.Context");
        }
        return c;
    }
    /* the current context or NULL (none yet), borrowed */
    static inline PyObject *bt_ctx_peek(void) { return PyThreadState_Get()->context; }
    /* the calling Python frame (borrowed), None without one */
    static inline PyObject *bt_cb_frame(void) {
        PyObject *f = (PyObject *)PyEval_GetFrame();
        return f != NULL ? f : Py_None;
    }
    static inline PyObject *bt_cb_frame_gen(PyObject *f) {
        return f == Py_None ? NULL : PyFrame_GetGenerator((PyFrameObject *)f);
    }
    static inline Py_ssize_t bt_cb_refcnt(PyObject *o) { return Py_REFCNT(o); }

    typedef int (*bt_with_impl)(PyObject *self);
    static bt_with_impl bt_cb_enter_impl = NULL;
    static PyObject *bt_cb_enter(PyObject *self, PyObject *unused) {
        if (bt_cb_enter_impl(self) < 0)
            return NULL;
        Py_INCREF(self);
        return self;
    }
    static PyMethodDef bt_cb_enter_def = {"__enter__", (PyCFunction)bt_cb_enter, METH_NOARGS,
        "__enter__($self, /)\\n--\\n\\nTake a permit (returns the breaker), or raise CircuitOpenError."};
    typedef int (*bt_exit_impl)(PyObject *self, PyObject *exc);
    static bt_exit_impl bt_cb_exit_impl = NULL;
    static PyObject *bt_cb_exit(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
        if (nargs != 3) {
            PyErr_Format(PyExc_TypeError, "__exit__() takes exactly 3 positional arguments (exc_type, exc, tb), got %zd", nargs);
            return NULL;
        }
        if (bt_cb_exit_impl(self, args[1]) < 0)
            return NULL;
        Py_RETURN_FALSE;
    }
    static PyMethodDef bt_cb_exit_def = {"__exit__", (PyCFunction)(void (*)(void))bt_cb_exit, METH_FASTCALL,
        "__exit__($self, exc_type, exc, tb, /)\\n--\\n\\n"
        "Report the outcome of this context's latest `with` acquisition (exc: a failure per the exception "
        "rules; None: a success); without one, a no-op. Never suppresses the exception."};
    typedef PyObject *(*bt_aenter_impl)(PyObject *self);
    typedef PyObject *(*bt_aexit_impl)(PyObject *self, PyObject *exc);
    static bt_aenter_impl bt_cb_aenter_impl = NULL;
    static bt_aexit_impl bt_cb_aexit_impl = NULL;
    static PyObject *bt_cb_aenter(PyObject *self, PyObject *unused) {
        return bt_cb_aenter_impl(self);
    }
    static PyObject *bt_cb_aexit(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
        if (nargs != 3) {
            PyErr_Format(PyExc_TypeError, "__aexit__() takes exactly 3 positional arguments (exc_type, exc, tb), got %zd", nargs);
            return NULL;
        }
        return bt_cb_aexit_impl(self, args[1]);
    }
    static PyMethodDef bt_cb_aenter_def = {"__aenter__", (PyCFunction)bt_cb_aenter, METH_NOARGS,
        "__aenter__($self, /)\\n--\\n\\n"
        "An awaitable: raises CircuitOpenError when refused, else returns the breaker holding a permit."};
    static PyMethodDef bt_cb_aexit_def = {"__aexit__", (PyCFunction)(void (*)(void))bt_cb_aexit, METH_FASTCALL,
        "__aexit__($self, exc_type, exc, tb, /)\\n--\\n\\n"
        "Report the outcome of this context's latest `async with` acquisition (as __exit__); an awaitable of False."};
    static int bt_cb_set_with(PyTypeObject *tp, bt_with_impl enter, bt_exit_impl exit, bt_aenter_impl aenter,
                              bt_aexit_impl aexit) {
        bt_cb_enter_impl = enter;
        bt_cb_exit_impl = exit;
        bt_cb_aenter_impl = aenter;
        bt_cb_aexit_impl = aexit;
        return bt_set_method(tp, &bt_cb_enter_def) < 0 || bt_set_method(tp, &bt_cb_exit_def) < 0
            || bt_set_method(tp, &bt_cb_aenter_def) < 0 || bt_set_method(tp, &bt_cb_aexit_def) < 0 ? -1 : 0;
    }
    """
    PyObject *bt_ctx_now() noexcept
    PyObject *bt_ctx_peek() noexcept
    PyObject *bt_cb_frame() noexcept
    PyObject *bt_cb_frame_gen(PyObject *f) noexcept
    Py_ssize_t bt_cb_refcnt(PyObject *o) noexcept
    ctypedef int (*bt_with_impl)(PyObject *self) noexcept
    ctypedef int (*bt_exit_impl)(PyObject *self, PyObject *exc) noexcept
    ctypedef PyObject *(*bt_aenter_impl)(PyObject *self) noexcept
    ctypedef PyObject *(*bt_aexit_impl)(PyObject *self, PyObject *exc) noexcept
    int bt_cb_set_with(PyTypeObject *tp, bt_with_impl enter, bt_exit_impl exit, bt_aenter_impl aenter,
                       bt_aexit_impl aexit) except -1



cdef enum:
    R_TOKEN = 0
    R_START = 1
    R_CTX = 2
    R_PREV = 3


cdef int _wpush(BreakerCore b, frame, int64_t token, int64_t start) except -1:
    """Record an acquisition under `frame` (and the current context)."""
    cdef PyObject *c = bt_ctx_now()
    cdef dict held = b.held_
    cdef bint sweep
    if c == NULL:
        _raise_pending()
    ctx = <object>c
    with cython.critical_section(held):
        top = held.get(frame)
        sweep = top is None and len(held) >= bt_load(&b.sweep_at)
        if not sweep:
            held[frame] = (token, start, ctx, top)
            return 0
    _sweep(b)
    with cython.critical_section(held):
        held[frame] = (token, start, ctx, held.get(frame))
    return 0


cdef inline bint _mine(tuple rec, PyObject *ctx):
    return PyTuple_GET_ITEM(rec, R_CTX) == ctx


cdef void _without(dict held, frame, tuple rec):
    """Take `rec` out of `frame`'s records (inside the dict's critical section)."""
    cdef list recs = []
    top = held[frame]
    while top is not None:
        if top is not rec:
            recs.append(top)
        top = (<tuple>top)[R_PREV]
    top = None
    for r in reversed(recs):
        top = (r[R_TOKEN], r[R_START], r[R_CTX], top)
    if top is None:
        del held[frame]
    else:
        held[frame] = top


cdef tuple _wpop(BreakerCore b, frame):
    """The record an exit from `frame` ends, taken out: the latest of that frame, else the latest of the
    current context (frames in the order their first record came, the last first; a context is current in
    one thread at a time); None without one."""
    cdef dict held = b.held_
    cdef tuple rec, best = None
    cdef PyObject *ctx
    with cython.critical_section(held):
        top = held.get(frame)
        if top is not None:
            rec = <tuple>top
            if rec[R_PREV] is None:
                del held[frame]
            else:
                held[frame] = rec[R_PREV]
            return rec
        ctx = bt_ctx_peek()
        if not held or ctx == NULL:
            return None
        best_frame = None
        for f in reversed(held):
            top = held[f]
            while top is not None:
                rec = <tuple>top
                if _mine(rec, ctx):
                    best, best_frame = rec, f
                    break
                top = rec[R_PREV]
            if best is not None:
                break
        if best is not None:
            _without(held, best_frame, best)
    return best


cdef Py_ssize_t _wcount(BreakerCore b):
    cdef dict held = b.held_
    cdef PyObject *ctx = bt_ctx_peek()
    cdef Py_ssize_t n = 0
    with cython.critical_section(held):
        for top in held.values():
            while top is not None:
                n += _mine(<tuple>top, ctx)
                top = (<tuple>top)[R_PREV]
    return n


cdef bint _finished(frame):
    """A frame that no longer runs: its generator / coroutine finished, or a plain frame (it cannot be
    suspended: a record of it outlived it). The same test as StageBase's (_core/guard.pyx)."""
    cdef PyObject *g = bt_cb_frame_gen(<PyObject *>frame)
    if g == NULL:
        return True
    gen = <object>g
    bt_decref(g)
    for name in ("cr_frame", "gi_frame", "ag_frame"):
        f = getattr(gen, name, frame)
        if f is not frame:
            return f is None
    return False


cdef list _wtake_dead(BreakerCore b):
    """Take out the records that can never exit: frame finished, context held by nothing but this breaker's
    records. Returns them."""
    cdef dict held = b.held_
    cdef dict refs = {}
    cdef list dead = []
    cdef tuple rec
    cdef PyObject *c
    with cython.critical_section(held):
        for top in held.values():
            while top is not None:
                k = <intptr_t>PyTuple_GET_ITEM(<tuple>top, R_CTX)
                refs[k] = refs.get(k, 0) + 1
                top = (<tuple>top)[R_PREV]
        for f in list(held):
            if not _finished(f):
                continue
            top = held[f]
            while top is not None:
                rec = <tuple>top
                c = PyTuple_GET_ITEM(rec, R_CTX)
                if bt_cb_refcnt(c) <= <Py_ssize_t>refs[<intptr_t>c]:
                    dead.append((f, rec))
                top = rec[R_PREV]
        for f, rec in dead:
            _without(held, f, rec)
        bt_store(&b.sweep_at, max(8, 2 * len(held)))
    return dead


cdef int _with_enter_c(PyObject *o) noexcept:
    """`with cb:`'s __enter__ (a C method: a refusal leaves with no traceback frame of ours)."""
    cdef BreakerCore b = <BreakerCore>o
    cdef int64_t token, start
    cdef PyObject *et
    cdef PyObject *ev
    cdef PyObject *etb
    if _enter_raw(o, &token, &start) < 0:
        return -1
    if _wpush_raw(b, <object>bt_cb_frame(), token, start) < 0:   # no memory: the permit goes back
        bt_err_fetch(&et, &ev, &etb)
        _record_raw(b, token, start)
        bt_err_restore(et, ev, etb)
        return -1
    return 0


ctypedef int (*_raw_wpush_t)(BreakerCore, object, int64_t, int64_t) noexcept
cdef _raw_wpush_t _wpush_raw = <_raw_wpush_t>_wpush


cdef int _cancel(BreakerCore b, int64_t token, int64_t start) except -1:
    return b._record(token, O_CANCELLED, start, 0, False, None)


ctypedef int (*_raw_cancel_t)(BreakerCore, int64_t, int64_t) noexcept
cdef _raw_cancel_t _cancel_raw = <_raw_cancel_t>_cancel


cdef void _sweep(BreakerCore b) noexcept:
    """Give back (no outcome) the permits of `b`'s records that can never exit."""
    cdef list dead
    try:
        dead = _wtake_dead(b)
    except BaseException:
        bt_err_clear()
        return
    for f, rec in dead:
        _record_raw(b, rec[R_TOKEN], rec[R_START])


cdef void _record_raw(BreakerCore b, int64_t token, int64_t start) noexcept:
    """Give a permit back with no outcome, dropping any error of that (the caller's error stands)."""
    if _cancel_raw(b, token, start) < 0:
        bt_err_clear()


cdef extern from "Python.h":
    void bt_err_fetch "PyErr_Fetch"(PyObject **, PyObject **, PyObject **)
    void bt_err_restore "PyErr_Restore"(PyObject *, PyObject *, PyObject *)
    void bt_err_clear "PyErr_Clear"()
    PyObject *PyTuple_GET_ITEM(object, Py_ssize_t)


cdef int _with_exit(BreakerCore b, frame, exc) except -1:
    cdef int64_t token, start
    cdef int64_t r = bt_load(&b.ready_)
    if r != 1 and r != _CLOSED_MARK:
        _not_ready(b)
    rec = _wpop(b, frame)
    if r != 1:
        return 0                        # its store closed: the outcome of a call admitted before is dropped
    if rec is None:
        _sweep(b)
        return 0                        # a second exit of one acquisition, or no enter: a no-op
    token, start = rec[R_TOKEN], rec[R_START]
    if exc is None:
        _exit_ok(<PyObject *>b, token, start, bt_none)
    else:
        b._record(token, b._classify(exc), start, 0, False, exc)
    return 0


ctypedef int (*_raw_with_exit_t)(BreakerCore, object, object) noexcept
cdef _raw_with_exit_t _with_exit_raw = <_raw_with_exit_t>_with_exit


cdef int _with_exit_c(PyObject *o, PyObject *exc) noexcept:
    return _with_exit_raw(<BreakerCore>o, <object>bt_cb_frame(), <object>exc)


ctypedef int (*_raw_not_ready_t)(BreakerCore) noexcept
cdef _raw_not_ready_t _not_ready_raw = <_raw_not_ready_t>_not_ready


cdef PyObject *_aenter_c(PyObject *o) noexcept:
    """`async with cb:`'s __aenter__: an awaitable raising the refusal, or one holding the permit whose
    await records the acquisition (_aenter_done) and returns the breaker. Its owner is the pair
    (breaker, calling frame): the frame the record is kept under."""
    cdef BreakerCore b = <BreakerCore>o
    cdef int64_t token, start
    cdef PyObject *aw = NULL
    cdef PyObject *pair
    cdef PyObject *et
    cdef PyObject *ev
    cdef PyObject *etb
    if bt_load(&b.ready_) != 1:
        _not_ready_raw(b)
        return NULL
    if _enter_raw(o, &token, &start) < 0:
        return bt_aw_raising()
    pair = _pair_raw(b, <object>bt_cb_frame())
    if pair != NULL:
        aw = bt_aw_make(pair, &_AENTER_OPS, BT_AW_VALUE, NULL, o, token, start)
        bt_decref(pair)
    if aw == NULL:                      # no memory: the permit goes back, the error stands
        bt_err_fetch(&et, &ev, &etb)
        _record_raw(b, token, start)
        bt_err_restore(et, ev, etb)
    return aw


cdef object _pair(BreakerCore b, frame):
    return (b, frame)


ctypedef PyObject *(*_raw_pair_t)(BreakerCore, object) noexcept
cdef _raw_pair_t _pair_raw = <_raw_pair_t>_pair


cdef PyObject *_aexit_c(PyObject *o, PyObject *exc) noexcept:
    if _with_exit_raw(<BreakerCore>o, <object>bt_cb_frame(), <object>exc) < 0:
        return NULL
    return bt_aw_make(NULL, NULL, BT_AW_VALUE, NULL, bt_false, 0, 0)


cdef int _aenter_done(PyObject *owner, int64_t token, int64_t start, PyObject *result) except -1:
    """An __aenter__ awaitable was awaited: the acquisition is recorded under the frame that called
    __aenter__, in the awaiting task's context."""
    cdef tuple pair = <tuple>owner
    cdef BreakerCore b = <BreakerCore>pair[0]
    if bt_load(&b.ready_) != 1:
        return _not_ready(b)            # its store closed before the await: the permit is the store's no more
    try:
        _wpush(b, pair[1], token, start)
    except BaseException:
        _record_raw(b, token, start)
        raise
    return 0


cdef void _aenter_undo(PyObject *owner, int64_t token, int64_t start, PyObject *exc) noexcept:
    """An __aenter__ awaitable thrown into, closed or dropped before it completed: the body never runs and
    __aexit__ never comes: its permit goes back with no outcome."""
    cdef BreakerCore b = <BreakerCore>(<tuple>owner)[0]
    if bt_load(&b.ready_) == 1:
        _record_raw(b, token, start)


cdef bt_guard_ops _AENTER_OPS
_AENTER_OPS.exit_ok = _aenter_done
_AENTER_OPS.exit_err = _aenter_undo


def _install():
    bt_aw_ready()
    bt_open_error_ready(<PyObject *>CircuitOpenError)
    cdef Guarded probe = Guarded.__new__(Guarded)
    bt_guard_install(<PyTypeObject *>Guarded, <Py_ssize_t>(<char *>&probe.vectorcall - <char *><PyObject *>probe))
    bt_guard_method_descriptor(<PyTypeObject *>Guarded)
    bt_cb_set_with(<PyTypeObject *>BreakerCore, _with_enter_c, _with_exit_c, _aenter_c, _aexit_c)

_install()


@cython.final
@cython.no_gc_clear                  # the finalizer needs `core` even when the permit dies in a cycle
@cython.auto_pickle(False)
cdef class Permit:
    """One admitted call, reported once: success(result), failure(exc) or release(). Made only by
    CircuitBreaker.try_acquire() (calling the type is a TypeError). A permit dropped without a report is
    released when it is collected, so a half-open permit can never be lost."""
    cdef BreakerCore core
    cdef int64_t token, start
    cdef int64_t done_

    cdef inline bint _once(self) noexcept:
        return bt_fetch_add(&self.done_, 1) == 0

    def success(self, result=None):
        """Report success (record_result is applied to `result`)."""
        if self._once():
            self.core._record(self.token, self.core._classify_result(result), self.start, 0, False, None)

    def failure(self, exc):
        """Report an exception (ignore / record / cancellation rules apply)."""
        if not isinstance(exc, BaseException):
            raise TypeError(f"exc must be an exception instance, got {exc!r}")
        if self._once():
            self.core._record(self.token, self.core._classify(exc), self.start, 0, False, exc)

    def release(self):
        """Give the permit back without an outcome."""
        if self._once():
            self.core._record(self.token, O_CANCELLED, self.start, 0, False, None)

    @property
    def done(self):
        return bt_load(&self.done_) != 0

    def _stream_success(self):
        # a guarded stream finished: a success (record_result is not applied to a stream)
        if self._once():
            self.core._record(self.token, O_SUCCESS, self.start, 0, False, None)

    def __dealloc__(self):
        # never reported: return it (only a half-open permit holds anything; no Python runs here)
        if (self.core is not None and (self.token & 1) and not (self.token & _REMOTE)
                and bt_load(&self.core.ready_) == 1 and self._once()):
            st_return_flight(&self.core.w.st, self.token >> 1)


bt_refuse_new(<PyTypeObject *>Permit, <PyTypeObject *>Guarded)
