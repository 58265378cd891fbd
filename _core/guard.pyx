# cython: language_level=3, freethreading_compatible=True, boundscheck=False, wraparound=False, cdivision=True
"""A compiled guard for admit-then-release patterns (bulkhead, rate limiter, load shedder, ...).

`StageGuard(fn, acquire, refuse, release, pending, drain, settle)` is a callable running fn as:

    if not acquire(): refuse()        # refuse raises the rejection, or returns once admitted (a wait)
    try: result = fn(*args, **kwargs)
    except: release(); if pending: drain(); raise
    if result is an awaitable, a generator or an async generator:      # one C type test (bt_guard_lazy)
        return settle(fn, result)     # takes over the permit: e.g. holds it over a stream's iteration
    release()                         # optional
    if pending: drain()               # optional: e.g. hand the permit to a waiter
    return result

Without `settle`, a lazy result is given the default treatment: the permit is returned, then an awaitable
is refused with the sync-form UsageError (DESIGN §3c: the function was async, use call_async) and a
generator is returned as a value.

acquire / release are the compiled core's bound methods, called through vectorcall; the guard itself is
called through the C vectorcall entry of include/buttress_guard.h: no argument tuple or dict is built
and an exception from fn passes through without an extra frame. Twin: buttress/_twin/guard.py.
"""
from libc.stdint cimport int64_t
from cpython.object cimport PyObject, PyTypeObject, PyObject_Length
from cpython.pycapsule cimport PyCapsule_GetPointer
from bt_permits cimport permits_t, permits_try, permits_try_limit, permits_release
from cpython.time cimport monotonic_ns

import logging
import time as _time
import types
from contextvars import ContextVar

from buttress._params import describe
from buttress._spec import UsageError
from buttress._wrap import refuse_sync_result

__all__ = ["StageGuard", "StageBase", "AttemptGuard", "AttemptVar", "AttemptCounter", "ShedBase", "Admission"]

log = logging.getLogger("buttress.guard")

cimport cython
from bt_atomic cimport bt_load, bt_store, bt_cas, bt_fetch_add

cdef extern from "Python.h":
    ctypedef PyObject *(*vectorcallfunc)(PyObject *, PyObject *const *, size_t, PyObject *)
    PyObject *PyObject_CallNoArgs(PyObject *) except NULL
    PyTypeObject *Py_TYPE(object o) noexcept

cdef extern from "buttress_guard.h":
    ctypedef struct bt_guard_ops:
        int (*enter)(PyObject *owner, int64_t *token, int64_t *start) noexcept
        int (*exit_ok)(PyObject *owner, int64_t token, int64_t start, PyObject *result) except -1
        void (*exit_err)(PyObject *owner, int64_t token, int64_t start, PyObject *exc)
        object (*settle)(PyObject *owner, PyObject *fn, int64_t token, int64_t start, PyObject *result)
        int (*try_enter)(PyObject *owner, int64_t *token, int64_t *start) noexcept
        PyObject *(*refuse_async)(PyObject *owner, PyObject *fn, PyObject *const *args, size_t nargsf,
                                  PyObject *kwnames) noexcept
        object (*settle_async)(PyObject *owner, PyObject *fn, int64_t token, int64_t start, PyObject *result)
    bint bt_guard_lazy(PyTypeObject *tp) noexcept
    PyObject *bt_guard_vectorcall(PyObject *, PyObject *const *, size_t, PyObject *)
    PyObject *bt_aguard_vectorcall(PyObject *, PyObject *const *, size_t, PyObject *)
    PyObject *bt_aw_make(PyObject *owner, const bt_guard_ops *ops, int state, PyObject *it, PyObject *value,
                         int64_t token, int64_t start) noexcept
    PyObject *bt_aw_raising() noexcept
    int bt_aw_ready() except -1
    int BT_AW_VALUE
    int BT_AW_RAISE
    int bt_guard_install(PyTypeObject *tp, Py_ssize_t offset) except -1
    int bt_guard_method_descriptor(PyTypeObject *tp) except -1
    bint bt_held_enter(int64_t id) noexcept nogil
    bint bt_held_exit(int64_t id) noexcept nogil
    int64_t bt_held_count(int64_t id) noexcept nogil

cdef extern from "Python.h":
    # raw forms: no Cython error handling (so no Cython traceback frame on a refusal)
    PyObject *bt_call0 "PyObject_CallNoArgs"(PyObject *)
    PyObject *bt_call3 "PyObject_CallFunctionObjArgs"(PyObject *, PyObject *, PyObject *, PyObject *, void *)
    void bt_decref "Py_DECREF"(PyObject *)
    void bt_incref "Py_INCREF"(PyObject *)
    PyObject *bt_tuple_new "PyTuple_New"(Py_ssize_t)
    void bt_tuple_set "PyTuple_SET_ITEM"(PyObject *, Py_ssize_t, PyObject *)
    PyObject *bt_dict_new "PyDict_New"()
    int bt_dict_set "PyDict_SetItem"(PyObject *, PyObject *, PyObject *)
    Py_ssize_t bt_tuple_size "PyTuple_GET_SIZE"(PyObject *)
    PyObject *bt_tuple_get "PyTuple_GET_ITEM"(PyObject *, Py_ssize_t)
    void bt_set_object "PyErr_SetObject"(PyObject *, PyObject *)
    PyObject *bt_true "Py_True"
    PyObject *bt_false "Py_False"
    ctypedef PyObject *(*newfunc)(PyTypeObject *, PyObject *, PyObject *)
    ctypedef struct PyTypeObject_new "PyTypeObject":
        newfunc tp_new
    Py_ssize_t PyVectorcall_NARGS(size_t) noexcept

from buttress._core.permits import Permits as _Permits

cdef bt_guard_ops _OPS           # the stage's ops (filled in below)
cdef bt_guard_ops _AENTER_OPS    # `async with`'s __aenter__ awaitable: undo when it never completes
cdef int64_t _next_id = 0          # stage ids: never 0, never reused (bt_fetch_add)


def _refuse_awaitable(fn, result):
    """The default settle of a guard given no `settle`: the permit is back already; an awaitable is the
    sync-form UsageError, anything else (a generator) is a value."""
    if type(result) is types.CoroutineType or hasattr(type(result), "__await__"):
        if type(result) is types.CoroutineType:
            result.close()          # never started: no "was never awaited" warning
        raise UsageError(f"{describe(fn)} is async (it returned {type(result).__name__}, an awaitable), so the "
                         f"sync form cannot guard it and would return it un-awaited: use the pattern's "
                         f"`await ....call_async(fn, ...)` or decorate the async def function")
    return result


def _attempt_settle(owner, fn, result):
    """AttemptGuard: a first attempt returned a lazy result; an awaitable is refused (not retried)."""
    refuse_sync_result(owner, fn, result)
    return result


cdef object _not_initialised(obj, what="its __init__ was not called"):
    return RuntimeError(f"{type(obj).__name__} is not initialised: {what} "
                        f"(a subclass must call super().__init__())")


def _sync_in_async(fn, result):
    """The default settle_async: the permit is back already; a result without an await slot means fn was a
    sync function (a generator is closed)."""
    if type(result) is types.GeneratorType:
        result.close()
    raise UsageError(f"call_async: {describe(fn)} is a sync function (it returned {type(result).__name__}, "
                     f"which cannot be awaited): use the pattern's call(fn, ...) or decorate it")


@cython.final
@cython.internal
cdef class _Stage:
    """The admit / release callables of one guard (the guard's `owner`). When acquire / release are
    the bound try_acquire / release of a compiled Permits, the permit word is used directly.
    Internal (not reachable from Python), built only by setup()."""
    cdef object acquire, refuse, release, pending, drain, holder, settle, refuse_async, settle_async
    cdef object reject_type, reject_args     # a refusal raised in C (no Python call): cls.__new__(cls, *args)
    cdef permits_t *p
    cdef int64_t id             # key of this stage in the per-thread `with` records
    cdef int64_t floating       # `with` acquisitions not recorded per thread (a thread's table was full)
    cdef int64_t rejected       # refusals raised in C (reject_type)

    cdef int setup(self, acquire, refuse, release, pending, drain, settle, refuse_async=None,
                   settle_async=None) except -1:
        for name, value in (("acquire", acquire), ("refuse", refuse)):
            if not callable(value):
                raise TypeError(f"{name} must be callable, got {value!r}")
        for name, value in (("release", release), ("drain", drain), ("settle", settle),
                            ("refuse_async", refuse_async), ("settle_async", settle_async)):
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable or None, got {value!r}")
        if (pending is None) != (drain is None):
            raise TypeError("pending and drain go together: give both or neither")
        self.acquire, self.refuse, self.release, self.pending, self.drain = acquire, refuse, release, pending, drain
        self.settle, self.refuse_async, self.settle_async = settle, refuse_async, settle_async
        holder = getattr(acquire, "__self__", None)
        if (type(holder) is _Permits and getattr(acquire, "__name__", "") == "try_acquire"
                and getattr(release, "__self__", None) is holder and getattr(release, "__name__", "") == "release"):
            self.p = <permits_t *>PyCapsule_GetPointer(holder._handle(), "buttress.permits_t")
            self.holder = holder        # keeps the permit word alive
        self.id = bt_fetch_add(&_next_id, 1) + 1
        return 0

    cdef inline int enter(self) except -1:
        if _enter(<PyObject *>self, NULL, NULL) < 0:
            raise_pending()
        return 0

    cdef inline int after(self) except -1:
        if self.p != NULL:
            if not permits_release(self.p, 1):
                self.release()          # raises the core's "released but not held" error
        elif self.release is not None:
            self.release()
        if self.pending is not None and PyObject_Length(self.pending) > 0:
            self.drain()
        return 0

    cdef object settle_result(self, fn, result):
        """A lazy result (bt_guard_lazy) with the permit still held: `settle` takes the permit over; the
        default returns it, then refuses an awaitable."""
        if self.settle is not None:
            return self.settle(fn, result)
        self.after()
        return _refuse_awaitable(fn, result)

    cdef inline bint take_floating(self) noexcept nogil:
        cdef int64_t cur
        while True:
            cur = bt_load(&self.floating)
            if cur <= 0:
                return False
            if bt_cas(&self.floating, cur, cur - 1):
                return True


cdef extern from *:
    """
    static void bt_raise_pending(void) {}
    """
    void bt_raise_pending() except *


cdef inline int raise_pending() except -1:
    # the exception is set already (by a raw call): let Cython see it
    bt_raise_pending()
    return 0


cdef int _try(_Stage s) noexcept:
    """1: admitted; 0: refused; -1: exception set (acquire raised). No Python frame on the permit word."""
    cdef PyObject *r
    if s.p != NULL:
        return 1 if permits_try(s.p, 1) else 0
    r = bt_call0(<PyObject *>s.acquire)
    if r == NULL:
        return -1
    bt_decref(r)
    return 1 if r == bt_true else 0


cdef int _reject_now(_Stage s) noexcept:
    """The refusal built in C when the stage has one and the permit word is not closed (a drain refuses
    in Python, with its own message): cls.__new__(cls, *args), no __init__, no Python frame. -1: raised;
    0: no quick refusal here (call `refuse`)."""
    cdef PyObject *exc
    if s.reject_type is None or s.p == NULL or bt_load(&s.p.limit) < 0:
        return 0
    exc = (<PyTypeObject_new *><PyObject *>s.reject_type).tp_new(<PyTypeObject *><PyObject *>s.reject_type,
                                                                 <PyObject *>s.reject_args, NULL)
    if exc == NULL:
        return -1
    bt_fetch_add(&s.rejected, 1)
    bt_set_object(<PyObject *>s.reject_type, exc)
    bt_decref(exc)
    return -1


cdef int _enter(PyObject *owner, int64_t *token, int64_t *start) noexcept:
    cdef _Stage s = <_Stage>owner
    cdef PyObject *r
    cdef int ok
    if token != NULL:
        token[0] = 0
        start[0] = 0
    ok = _try(s)
    if ok != 0:
        return 0 if ok > 0 else -1
    if _reject_now(s) < 0:
        return -1
    r = bt_call0(<PyObject *>s.refuse)      # raises, or returns once a permit was obtained
    if r == NULL:
        return -1
    bt_decref(r)
    return 0


cdef int _try_enter(PyObject *owner, int64_t *token, int64_t *start) noexcept:
    token[0] = 0
    start[0] = 0
    return _try(<_Stage>owner)


cdef PyObject *_refuse_async(PyObject *owner, PyObject *fn, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames) noexcept:
    """Refused in an async form: the stage's refusal (C), or refuse_async(fn, args, kwargs) -> an awaitable
    that waits, runs and releases (Python), or -- without refuse_async -- refuse() (raises) then fn."""
    cdef _Stage s = <_Stage>owner
    cdef Py_ssize_t nargs = PyVectorcall_NARGS(nargsf), i, nkw
    cdef PyObject *t
    cdef PyObject *d
    cdef PyObject *r
    if _reject_now(s) < 0:
        return NULL
    if s.refuse_async is None:
        r = bt_call0(<PyObject *>s.refuse)
        if r == NULL:
            return NULL
        bt_decref(r)
        return _aw_run(owner, fn, args, nargsf, kwnames)
    t = bt_tuple_new(nargs)
    if t == NULL:
        return NULL
    for i in range(nargs):
        bt_incref(args[i])
        bt_tuple_set(t, i, args[i])
    d = bt_dict_new()
    if d == NULL:
        bt_decref(t)
        return NULL
    nkw = 0 if kwnames == NULL else bt_tuple_size(kwnames)
    for i in range(nkw):
        if bt_dict_set(d, bt_tuple_get(kwnames, i), args[nargs + i]) < 0:
            bt_decref(t)
            bt_decref(d)
            return NULL
    r = bt_call3(<PyObject *>s.refuse_async, fn, t, d, NULL)
    bt_decref(t)
    bt_decref(d)
    return r


cdef extern from "buttress_guard.h":
    PyObject *bt_aw_call(PyObject *owner, const bt_guard_ops *ops, PyObject *fn, PyObject *const *args,
                         size_t nargsf, PyObject *kwnames, int64_t token, int64_t start) noexcept


cdef PyObject *_aw_run(PyObject *owner, PyObject *fn, PyObject *const *args, size_t nargsf,
                       PyObject *kwnames) noexcept:
    return bt_aw_call(owner, &_OPS, fn, args, nargsf, kwnames, 0, 0)


cdef object _settle_async(PyObject *owner, PyObject *fn, int64_t token, int64_t start, PyObject *result):
    cdef _Stage s = <_Stage>owner
    if s.settle_async is not None:
        return s.settle_async(<object>fn, <object>result)
    s.after()
    return _sync_in_async(<object>fn, <object>result)


cdef int _exit_ok(PyObject *owner, int64_t token, int64_t start, PyObject *result) except -1:
    return (<_Stage>owner).after()


cdef void _exit_err(PyObject *owner, int64_t token, int64_t start, PyObject *exc) noexcept:
    try:
        (<_Stage>owner).after()
    except BaseException:
        log.exception("releasing after a failed call failed")


cdef object _settle(PyObject *owner, PyObject *fn, int64_t token, int64_t start, PyObject *result):
    return (<_Stage>owner).settle_result(<object>fn, <object>result)


_OPS.enter = _enter
_OPS.exit_ok = _exit_ok
_OPS.exit_err = _exit_err
_OPS.settle = _settle
_OPS.try_enter = _try_enter
_OPS.refuse_async = _refuse_async
_OPS.settle_async = _settle_async


@cython.no_gc_clear     # owner_ptr / fn_ptr borrow owner / fn: the GC must never clear them under a caller
cdef class StageGuard:
    """fn guarded by acquire / refuse / release; binds like a function (and, as a method descriptor, a
    method call passes the instance without building a bound method).
    With asynchronous=True fn is an async function: a call takes the permit in C and returns a compiled
    awaitable that drives fn's coroutine and releases when it finishes (buttress_guard.h: bt_aw); a refused
    call goes to refuse_async(fn, args, kwargs) -> an awaitable that waits, runs and releases (or raises),
    or, without it, to refuse() (which raises: the refusal comes when the call is awaited).
    Layout: the first fields must match bt_guard_head in include/buttress_guard.h.
    Not initialised (owner_ptr NULL): every call raises RuntimeError. Initialised once."""
    cdef vectorcallfunc vectorcall
    cdef const bt_guard_ops *ops
    cdef PyObject *owner_ptr
    cdef PyObject *fn_ptr
    cdef object owner
    cdef object fn
    cdef dict __dict__

    def __cinit__(self):
        self.vectorcall = bt_guard_vectorcall     # checks owner_ptr: an uninitialised guard says so

    def __init__(self, fn, acquire, refuse, release=None, pending=None, drain=None, settle=None, *,
                 refuse_async=None, settle_async=None, asynchronous=False):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        if type(asynchronous) is not bool:
            raise TypeError(f"asynchronous must be a bool, got {asynchronous!r}")
        cdef _Stage s = _Stage.__new__(_Stage)
        s.setup(acquire, refuse, release, pending, drain, settle, refuse_async, settle_async)
        if self.owner_ptr != NULL:      # a running call borrows owner and fn: they never change
            raise RuntimeError(f"{type(self).__name__} is already initialised")
        _bind(self, s, fn, asynchronous)

    def __call__(self, *args, **kwargs):     # only reached by callers that bypass vectorcall
        if self.owner_ptr == NULL:
            raise _not_initialised(self)
        cdef _Stage s = <_Stage>self.owner
        if self.vectorcall == bt_aguard_vectorcall:
            return _acall(self, args, kwargs)
        fn = self.fn
        if fn is None:                  # the call(fn, *args, **kwargs) entry
            if not args:
                raise TypeError("call() needs the function to call as its first argument")
            fn, args = args[0], args[1:]
        s.enter()
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            s.after()
            raise
        if bt_guard_lazy(Py_TYPE(result)):
            return s.settle_result(fn, result)
        s.after()
        return result

    def __get__(self, obj, objtype):
        return self if obj is None else types.MethodType(self, obj)


cdef object _acall(StageGuard g, tuple args, dict kwargs):
    """The async entry for a caller that bypassed vectorcall: the same C entry."""
    cdef list items = list(args)
    keys = tuple(kwargs)
    items.extend(kwargs.values())
    cdef tuple flat = tuple(items)
    return _steal(_vcall_tuple(<PyObject *>g, flat, len(args), keys if kwargs else None))


cdef PyObject *_vcall_tuple(PyObject *g, tuple flat, Py_ssize_t nargs, object kwnames) except NULL:
    cdef PyObject *r = bt_aguard_vectorcall(g, <PyObject *const *>&(<PyTupleObject_items *><PyObject *>flat).ob_item[0],
                                           <size_t>nargs, NULL if kwnames is None else <PyObject *>kwnames)
    return r


cdef inline void _bind(StageGuard g, _Stage s, fn, bint asynchronous=False) noexcept:
    g.owner = s
    g.fn = fn
    g.fn_ptr = NULL if fn is None else <PyObject *>fn     # NULL: the call(fn, *args) entry
    g.ops = &_OPS
    if asynchronous:
        g.vectorcall = bt_aguard_vectorcall
    g.owner_ptr = <PyObject *>s      # last: a non-NULL owner_ptr means "ready"


cdef extern from "Python.h":
    ctypedef struct PyTupleObject_items "PyTupleObject":
        PyObject *ob_item[1]

cdef extern from *:
    """
    static inline PyObject *bt_frame_generator(PyObject *f) { return PyFrame_GetGenerator((PyFrameObject *)f); }
    static inline PyObject *bt_current_frame(void) { return (PyObject *)PyEval_GetFrame(); }
    """
    PyObject *PyEval_GetFrame "bt_current_frame"()
    PyObject *PyFrame_GetGenerator "bt_frame_generator"(PyObject *frame)     # new reference or NULL (3.11+)


cdef class StageBase:
    """A compiled `with` / `async with` for admit-then-release patterns: a facade class inherits it and
    calls `_stage_setup(acquire, refuse, release, pending=None, drain=None)` once (same meaning as
    StageGuard's arguments). `__enter__` / `__aenter__` return self.

    One object serves many callers at once, so `__exit__` cannot be told which acquisition it ends: each
    `__enter__` records the acquisition for the calling thread (a small per-thread table, no lock, no
    allocation) and `__exit__` consumes one record of the calling thread. An `__exit__` that finds none
    -- a second exit of the same acquisition -- is a no-op: it never releases another caller's permit.

    `async with` records each acquisition under the frame that entered (`_async_held`: frame -> count,
    the frame kept alive by its record). An `__aexit__` consumes its own frame's record (also when another
    task finalises an async generator); failing that, a record whose frame has finished (an exit stack
    enters and exits from frames of its own); with none, it releases nothing. The fast path takes the
    permit and records in C and returns a completed compiled awaitable; waiting is `_stage_setup`'s
    `aenter_wait(frame)` (Python)."""
    cdef _Stage _s
    cdef readonly dict _async_held
    cdef object _aenter_wait, _remote_aenter, _remote_aexit

    def _stage_setup(self, acquire, refuse, release=None, pending=None, drain=None, settle=None, *,
                     refuse_async=None, settle_async=None, aenter_wait=None, remote=None):
        """aenter_wait(frame) -> awaitable: `async with` was refused a permit at once (wait, then
        `_stage_record(frame)` and return self; or raise). remote: (aenter, aexit) Python coroutine
        functions that replace the compiled `async with` (a store whose every step is awaited)."""
        cdef _Stage s = _Stage.__new__(_Stage)
        s.setup(acquire, refuse, release, pending, drain, settle, refuse_async, settle_async)
        for name, value in (("aenter_wait", aenter_wait),):
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable or None, got {value!r}")
        if remote is not None and not (type(remote) is tuple and len(remote) == 2 and callable(remote[0])
                                       and callable(remote[1])):
            raise TypeError(f"remote must be None or a pair of callables (aenter, aexit), got {remote!r}")
        if self._s is not None:         # holders of the first stage could never give their permits back
            raise RuntimeError(f"{type(self).__name__} is already initialised: _stage_setup() was called before")
        self._aenter_wait = aenter_wait
        if remote is not None:
            self._remote_aenter, self._remote_aexit = remote
        self._async_held = {}
        self._s = s

    def _stage_reject(self, cls, message):
        """Refuse at once (no Python call, no lock) with cls(message) built as cls.__new__(cls, message)
        (no __init__: retry_after stays the class's None) while the permit word is not closed; None turns
        it off (every refusal calls `refuse`)."""
        cdef _Stage s = _stage_of(self)
        if cls is None:
            s.reject_type = None
            return
        if not (isinstance(cls, type) and issubclass(cls, BaseException)) or type(message) is not str:
            raise TypeError(f"_stage_reject needs an exception class and a str message, got {cls!r}, {message!r}")
        s.reject_args = (message,)
        s.reject_type = cls

    def _stage_rejected(self):
        """How many refusals were raised by the compiled quick path (`_stage_reject`)."""
        return bt_load(&_stage_of(self).rejected)

    def _stage_guard(self, fn, asynchronous=False):
        """A StageGuard for fn with this object's stage (asynchronous: fn is an async function)."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        cdef _Stage s = _stage_of(self)
        cdef StageGuard g = StageGuard.__new__(StageGuard)
        _bind(g, s, fn, asynchronous)
        return g

    def _stage_call(self):
        """The `call(fn, *args, **kwargs)` entry with this object's stage: one vectorcall, no frame."""
        cdef _Stage s = _stage_of(self)
        cdef StageGuard g = StageGuard.__new__(StageGuard)
        _bind(g, s, None)
        return g

    def _stage_call_async(self):
        """The `call_async(fn, *args, **kwargs)` entry: one vectorcall returning the compiled awaitable."""
        cdef _Stage s = _stage_of(self)
        cdef StageGuard g = StageGuard.__new__(StageGuard)
        _bind(g, s, None, True)
        return g

    def _stage_release(self):
        """Give one permit back (the two-step API's release): the permit word in C; Python only to hand the
        permit to a queued waiter. More releases than acquisitions: the core's ValueError."""
        cdef _Stage s = self._s
        if s is None:
            raise _not_initialised(self, "_stage_setup() was not called")
        s.after()

    def __enter__(self):
        cdef _Stage s = self._s
        if s is None:
            raise _not_initialised(self, "_stage_setup() was not called")
        s.enter()
        if not bt_held_enter(s.id):
            bt_fetch_add(&s.floating, 1)
        return self

    def __exit__(self, exc_type, exc, tb):
        cdef _Stage s = self._s
        if s is None:
            raise _not_initialised(self, "_stage_setup() was not called")
        if bt_held_exit(s.id) or s.take_floating():
            s.after()
        return False

    def _stage_held(self):
        """How many `with` acquisitions of this object the calling thread has recorded."""
        cdef _Stage s = self._s
        if s is None:
            raise _not_initialised(self, "_stage_setup() was not called")
        return bt_held_count(s.id)

    # -- async with --------------------------------------------------------------------------------------

    def __aenter__(self):
        cdef _Stage s = self._s
        cdef PyObject *aw
        cdef int ok
        if s is None:
            raise _not_initialised(self, "_stage_setup() was not called")
        if self._remote_aenter is not None:
            return self._remote_aenter()
        frame = _caller_frame()
        ok = _try(s)
        if ok < 0:
            raise_pending()
        if ok == 0:
            if _reject_now(s) < 0:
                return _steal(_raising())
            if self._aenter_wait is None:
                s.enter()                   # refuse(): raises, or returns once admitted
            else:
                return self._aenter_wait(frame)
        try:
            _record(self._async_held, frame)
        except BaseException:
            s.after()
            raise
        aw = bt_aw_make(<PyObject *>self, &_AENTER_OPS, BT_AW_VALUE, NULL, <PyObject *>self,
                        <int64_t><Py_ssize_t><PyObject *>frame, 0)
        if aw == NULL:
            _unrecord(self._async_held, frame)
            s.after()
            raise_pending()
        return _steal(aw)

    def __aexit__(self, exc_type, exc, tb):
        cdef _Stage s = self._s
        if s is None:
            raise _not_initialised(self, "_stage_setup() was not called")
        if self._remote_aexit is not None:
            return self._remote_aexit(exc_type, exc, tb)
        if _consume(self._async_held, _caller_frame()):
            s.after()
        return _steal(_done_false())

    def _stage_record(self, frame):
        """Record an `async with` acquisition of `frame` (the slow path, after a wait)."""
        _record(self._async_held, frame)

    def _stage_consume(self, frame):
        """Consume a record for an exit from `frame` (its own, else one whose frame finished): whether one
        was found (a Redis store's __aexit__ then releases)."""
        return _consume(self._async_held, frame)


cdef inline object _steal(PyObject *p):
    """A new reference as an object (the cast adds one: drop ours)."""
    o = <object>p
    bt_decref(p)
    return o


cdef PyObject *_raising() except NULL:
    cdef PyObject *r = bt_aw_raising()
    if r == NULL:
        raise_pending()
    return r


cdef PyObject *_done_false() except NULL:
    cdef PyObject *r = bt_aw_make(NULL, NULL, BT_AW_VALUE, NULL, bt_false, 0, 0)
    if r == NULL:
        raise_pending()
    return r


cdef inline object _caller_frame():
    cdef PyObject *f = PyEval_GetFrame()
    return None if f == NULL else <object>f


cdef int _record(dict held, frame) except -1:
    with cython.critical_section(held):
        n = held.get(frame)
        held[frame] = 1 if n is None else n + 1
    return 0


cdef bint _unrecord(dict held, frame):
    """Consume one record of exactly `frame`."""
    with cython.critical_section(held):
        n = held.get(frame)
        if n is None:
            return False
        if n == 1:
            del held[frame]
        else:
            held[frame] = n - 1
    return True


cdef bint _finished(frame):
    """A frame that no longer runs: its generator / coroutine finished, or a plain frame (which cannot be
    suspended: an `async with` entered from it outlived it)."""
    cdef PyObject *g
    if frame is None:
        return True
    g = PyFrame_GetGenerator(<PyObject *>frame)
    if g == NULL:
        return True
    gen = <object>g
    bt_decref(g)
    for name in ("cr_frame", "gi_frame", "ag_frame"):
        f = getattr(gen, name, frame)
        if f is not frame:
            return f is None
    return False


cdef bint _consume(dict held, frame) except -1:
    if _unrecord(held, frame):
        return True
    if not held:
        return False
    with cython.critical_section(held):
        for other in list(held):
            if _finished(other):
                n = held[other]
                if n == 1:
                    del held[other]
                else:
                    held[other] = n - 1
                return True
    return False


cdef int _aenter_ok(PyObject *owner, int64_t token, int64_t start, PyObject *result) except -1:
    return 0        # the permit stays: __aexit__ gives it back


cdef void _aenter_undo(PyObject *owner, int64_t token, int64_t start, PyObject *exc) noexcept:
    """An __aenter__ awaitable thrown into, closed or dropped before it completed: the body never runs and
    __aexit__ never comes, so its record and permit go back here."""
    cdef StageBase b = <StageBase>owner
    try:
        with cython.critical_section(b._async_held):
            for frame in list(b._async_held):
                if <int64_t><Py_ssize_t><PyObject *>frame == token:
                    _unrecord(b._async_held, frame)
                    break
        b._s.after()
    except BaseException:
        log.exception("giving back an unfinished __aenter__'s permit failed")


_AENTER_OPS.exit_ok = _aenter_ok
_AENTER_OPS.exit_err = _aenter_undo


cdef _Stage _stage_of(obj):
    cdef _Stage s = (<StageBase>obj)._s
    if s is None:
        raise _not_initialised(obj, "_stage_setup() was not called")
    return s


# -- load shedding: the admission decision on the permit word ----------------------------------------------

cdef extern from *:
    """
    #include <string.h>
    static inline int64_t bt_f2i(double d) { int64_t i; memcpy(&i, &d, sizeof i); return i; }
    static inline double bt_i2f(int64_t i) { double d; memcpy(&d, &i, sizeof d); return d; }
    """
    int64_t bt_f2i(double d) noexcept nogil
    double bt_i2f(int64_t i) noexcept nogil

cdef int64_t _NO_LATENCY = 0x7ff8dead00000000       # a NaN pattern: "no latency measured yet"
cdef double _EWMA = 0.2
# The latency EWMA (retry_after's estimate) is fed by one admission in _SAMPLE per priority (the first
# included): two clock reads are most of an admission's cost. A limiter needs every latency: it is fed by
# every call (the Python path).
SAMPLE_EVERY = 16
cdef int64_t _SAMPLE_MASK = 15


cdef class ShedBase:
    """The compiled admission of a load shedder (buttress.shedding.LoadShedder inherits it): `admit(p)`
    returns an `Admission` (freelisted, not GC-tracked, no Python frame) whose enter / exit decide on the
    in-flight permit word in C: the level word (signals, drain), the priority's bound, the admitted / shed
    counters, the latency EWMA (fed by one admission in SAMPLE_EVERY per priority: only those read the
    clock) and the refusal (`_shed_reject`). Python runs for a limiter (capacity and samples, every call
    timed), a counter in a store, a drain or a signal's refusal (`_shed_setup`'s hooks)."""
    cdef permits_t *p
    cdef object flight, clock_ns, priorities, priority_type, enter_py, exit_py, refuse_py, sample_py, check_py
    cdef object reject_cls, reject_fmt, reject_what, reject_names, reject_capacity
    cdef public int64_t _level                  # priorities below it are refused (4: draining)
    cdef int64_t limits[4]
    cdef bint fast                              # limits set and the counter is a compiled Permits
    cdef int64_t default_priority
    cdef int64_t admitted[4]
    cdef int64_t shed[4]
    cdef int64_t latency                        # EWMA of call latency, ns as double bits (_NO_LATENCY: none)

    def __cinit__(self):
        self.latency = _NO_LATENCY

    def _shed_setup(self, flight, limits, clock_ns, priority_type, default_priority, check, enter, exit, refuse,
                    sample):
        """flight: the in-flight counter; limits: per priority, the in-flight bound (None: ask `enter`);
        clock_ns: None for the system clock, else a callable; enter(priority) -> in_flight and
        exit(start, in_flight, exc): the Python path (limiter, store); refuse(priority) -> the Overloaded to
        raise; sample(elapsed_ns, in_flight, exc) or None: after a call with an outcome (a limiter);
        check(value) -> a priority_type member (or ValueError / TypeError)."""
        for name, value in (("check", check), ("enter", enter), ("exit", exit), ("refuse", refuse)):
            if not callable(value):
                raise TypeError(f"{name} must be callable, got {value!r}")
        self.flight, self.clock_ns, self.priority_type = flight, clock_ns, priority_type
        self.priorities = tuple(priority_type)
        self.enter_py, self.exit_py, self.refuse_py, self.sample_py = enter, exit, refuse, sample
        self.check_py = check
        self.default_priority = int(default_priority)
        self.p = NULL
        if type(flight) is _Permits:
            self.p = <permits_t *>PyCapsule_GetPointer(flight._handle(), "buttress.permits_t")
        self._shed_limits(limits)

    def _shed_reject(self, cls, fmt, what, names, capacity):
        """The compiled path's refusal, built in C without calling `refuse`: an instance of cls made by
        cls.__new__(cls) with `_lazy = (fmt, (what, names[priority], in_flight, capacity))` (the message of
        errors.lazy_rejection, formatted when read) and `retry_after` = the latency EWMA in seconds (not set
        before any latency). cls None: every refusal calls `refuse(priority)`."""
        if cls is None:
            self.reject_cls = None
            return
        if not (isinstance(cls, type) and issubclass(cls, BaseException)) or type(fmt) is not str:
            raise TypeError(f"_shed_reject needs an exception class and a str format, got {cls!r}, {fmt!r}")
        if type(names) is not tuple or len(names) != 4 or type(capacity) is not int:
            raise TypeError(f"_shed_reject needs 4 names and an int capacity, got {names!r}, {capacity!r}")
        self.reject_fmt, self.reject_what, self.reject_names, self.reject_capacity = fmt, what, names, capacity
        self.reject_cls = cls

    def _shed_limits(self, limits):
        cdef int i
        if limits is None:
            self.fast = False
            return
        for i in range(4):
            self.limits[i] = limits[i]
        self.fast = self.p != NULL

    def _shed_counts(self):
        """(admitted, shed): per priority, the counts of the compiled path (zeros before _shed_setup)."""
        return (tuple(bt_load(&self.admitted[i]) for i in range(4)), tuple(bt_load(&self.shed[i]) for i in range(4)))

    @property
    def _latency_ns(self):
        cdef int64_t bits = bt_load(&self.latency)
        return None if bits == _NO_LATENCY else bt_i2f(bits)

    @_latency_ns.setter
    def _latency_ns(self, value):
        bt_store(&self.latency, _NO_LATENCY if value is None else bt_f2i(<double>value))

    cdef inline void record_latency(self, int64_t elapsed) noexcept:
        cdef int64_t bits = bt_load(&self.latency)
        cdef double lat
        if bits == _NO_LATENCY:
            lat = <double>elapsed
        else:
            lat = bt_i2f(bits)
            lat = lat + _EWMA * (<double>elapsed - lat)
        bt_store(&self.latency, bt_f2i(lat))   # racing updates may lose one sample, never corrupt

    def admit(self, priority=None):
        """Context manager (`with` or `async with`): raises Overloaded on entering when shed."""
        cdef int64_t prio = -1, i
        cdef tuple members = self.priorities
        if self.check_py is None:
            raise _not_initialised(self, "_shed_setup() was not called")
        if priority is None:
            prio = self.default_priority
        elif type(priority) is self.priority_type:
            for i in range(4):              # identity with the members: no int conversion
                if <PyObject *>priority == <PyObject *>members[i]:
                    prio = i
                    break
        if prio < 0:
            prio = int(self.check_py(priority))        # validates (ValueError / TypeError)
        cdef Admission a = Admission.__new__(Admission)
        bt_incref(<PyObject *>self)
        a.sh_p = <PyObject *>self
        a.prio = prio
        return a


@cython.freelist(64)
cdef class Admission:
    """One admitted call of a load shedder: `with` / `async with`; leaving frees its slot and reports its
    latency. One acquisition at a time: entering an admission that is held raises RuntimeError (take one
    `admit()` per call); a second exit of one entry is a no-op (it never frees another call's slot).
    Entered again after its exit, it admits anew. An entered admission collected without its exit gives
    its slot back (no outcome reported: DESIGN §3c); one that was exited gives nothing. The freelist
    hands out a zeroed object (Cython memsets it), so nothing carries over to the next admit().
    The shedder is held by a C pointer with its own reference (no object field): the type is not tracked
    by the GC, so an admission costs no GC bookkeeping. Its __enter__ / __exit__ / __aenter__ / __aexit__
    are C methods (installed by _install): no Cython frame, an `async with`'s exit awaits a shared
    completed awaitable."""
    cdef PyObject *sh_p                 # the shedder (a strong reference, released in __dealloc__)
    cdef int64_t prio, start, in_flight, held
    cdef int64_t fast                   # 0: the Python path; 1: the permit word, timed; 2: not timed

    def __dealloc__(self):
        cdef PyObject *p = self.sh_p
        if p == NULL:
            return
        self.sh_p = NULL
        try:
            sh = <ShedBase>p
            if not bt_cas(&self.held, 1, 0) or sh.flight is None:
                return                  # never entered, or exited: nothing of ours is held
            if self.fast:
                permits_release(sh.p, 1)    # lock-free
            else:
                sh.flight.release()     # the slot taken by enter_py (as the clock-failure path)
        finally:
            bt_decref(p)

    @property
    def _priority(self):
        if self.sh_p == NULL or (<ShedBase>self.sh_p).priorities is None:
            raise _not_initialised(self, "get one from LoadShedder.admit()")
        return (<ShedBase>self.sh_p).priorities[self.prio]


# -- Admission's methods in C: a refusal leaves without a Cython traceback frame -------------------------------

cdef extern from *:
    """
    typedef int (*bt_enter_impl)(PyObject *self);
    typedef int (*bt_exit_impl)(PyObject *self, PyObject *exc);
    static bt_enter_impl bt_adm_enter_impl = NULL, bt_stage_enter_impl = NULL;
    static bt_exit_impl bt_adm_exit_impl = NULL;
    static PyObject *bt_done_none = NULL;     /* the shared completed awaitable of __aexit__ (returns None) */
    static PyObject *bt_adm_enter(PyObject *self, PyObject *unused) {
        if (bt_adm_enter_impl(self) < 0)
            return NULL;
        Py_INCREF(self);
        return self;
    }
    static PyObject *bt_stage_enter(PyObject *self, PyObject *unused) {
        if (bt_stage_enter_impl(self) < 0)
            return NULL;
        Py_INCREF(self);
        return self;
    }
    static int bt_exit_nargs(const char *name, Py_ssize_t nargs) {
        if (nargs == 3)
            return 0;
        PyErr_Format(PyExc_TypeError, "%s() takes exactly 3 positional arguments (exc_type, exc, tb), got %zd", name, nargs);
        return -1;
    }
    static PyObject *bt_adm_exit(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
        if (bt_exit_nargs("__exit__", nargs) < 0 || bt_adm_exit_impl(self, args[1]) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    static PyObject *bt_adm_aenter(PyObject *self, PyObject *unused) {
        if (bt_adm_enter_impl(self) < 0)
            return bt_aw_raising();             /* raised when awaited, as an `async def __aenter__` would */
        return bt_aw_make(NULL, NULL, BT_AW_VALUE, NULL, self, 0, 0);
    }
    static PyObject *bt_adm_aexit(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
        if (bt_exit_nargs("__aexit__", nargs) < 0 || bt_adm_exit_impl(self, args[1]) < 0)
            return NULL;
        Py_INCREF(bt_done_none);
        return bt_done_none;
    }
    static PyMethodDef bt_adm_enter_def = {"__enter__", (PyCFunction)bt_adm_enter, METH_NOARGS,
        "__enter__($self, /)\\n--\\n\\nAdmit the call (returns the admission), or raise Overloaded."};
    static PyMethodDef bt_adm_exit_def = {"__exit__", (PyCFunction)(void (*)(void))bt_adm_exit, METH_FASTCALL,
        "__exit__($self, exc_type, exc, tb, /)\\n--\\n\\nFree the slot (a second exit is a no-op)."};
    static PyMethodDef bt_adm_aenter_def = {"__aenter__", (PyCFunction)bt_adm_aenter, METH_NOARGS,
        "__aenter__($self, /)\\n--\\n\\nAn awaitable: admits (returns the admission) or raises Overloaded."};
    static PyMethodDef bt_adm_aexit_def = {"__aexit__", (PyCFunction)(void (*)(void))bt_adm_aexit, METH_FASTCALL,
        "__aexit__($self, exc_type, exc, tb, /)\\n--\\n\\nFree the slot; returns a completed awaitable."};
    static PyMethodDef bt_stage_enter_def = {"__enter__", (PyCFunction)bt_stage_enter, METH_NOARGS,
        "Take a permit (waiting up to max_wait), or raise the refusal; returns self."};
    static int bt_set_enter(PyTypeObject *tp, PyMethodDef *def, bt_enter_impl impl, bt_enter_impl *slot) {
        *slot = impl;
        return bt_set_method(tp, def);
    }
    #define bt_type_of(o) ((PyObject *)Py_TYPE(o))

    /* the shared completed awaitable: awaiting it returns None at once; stateless, so one object serves
     * every await (never suspended: nothing can be thrown into it) */
    static PyObject *bt_done_await(PyObject *self) { Py_INCREF(self); return self; }
    static PySendResult bt_done_send(PyObject *self, PyObject *arg, PyObject **presult) {
        Py_INCREF(Py_None);
        *presult = Py_None;
        return PYGEN_RETURN;
    }
    static PyObject *bt_done_next(PyObject *self) { return NULL; }     /* exhausted: StopIteration(None) */
    static PyAsyncMethods bt_done_as_async = {bt_done_await, 0, 0, bt_done_send};
    static PyTypeObject bt_done_type = {
        PyVarObject_HEAD_INIT(NULL, 0)
        "buttress._core.guard.Done",                /* tp_name */
        sizeof(PyObject),                           /* tp_basicsize */
    };
    static int bt_done_ready(void) {
        if (bt_done_none != NULL)
            return 0;
        bt_done_type.tp_flags = Py_TPFLAGS_DEFAULT;
        bt_done_type.tp_as_async = &bt_done_as_async;
        bt_done_type.tp_iter = PyObject_SelfIter;
        bt_done_type.tp_iternext = bt_done_next;
        bt_done_type.tp_doc = "A completed awaitable: awaiting it returns None.";
        if (PyType_Ready(&bt_done_type) < 0)
            return -1;
        bt_done_none = PyObject_New(PyObject, &bt_done_type);     /* kept for the life of the process */
        return bt_done_none == NULL ? -1 : 0;
    }

    /* A shed refusal of the compiled path: cls.__new__(cls) with _lazy = (fmt, (what, name, in_use,
     * capacity)) and retry_after (latency_ns >= 0 as seconds; NaN: none), raised (set) here. Always -1. */
    static PyObject *bt_str_lazy = NULL, *bt_str_retry_after = NULL, *bt_empty_tuple = NULL;
    static int bt_shed_refuse(PyObject *cls, PyObject *fmt, PyObject *what, PyObject *name, long long in_use,
                              PyObject *capacity, double latency_ns) {
        PyObject *exc, *values, *lazy, *ra;
        if (bt_str_lazy == NULL) {
            bt_str_lazy = PyUnicode_InternFromString("_lazy");
            bt_str_retry_after = PyUnicode_InternFromString("retry_after");
            bt_empty_tuple = PyTuple_New(0);
            if (bt_str_lazy == NULL || bt_str_retry_after == NULL || bt_empty_tuple == NULL)
                return -1;
        }
        exc = ((PyTypeObject *)cls)->tp_new((PyTypeObject *)cls, bt_empty_tuple, NULL);
        if (exc == NULL)
            return -1;
        values = PyTuple_New(4);
        lazy = values == NULL ? NULL : PyTuple_New(2);
        if (lazy != NULL) {
            PyObject *n = PyLong_FromLongLong(in_use);
            if (n == NULL) {
                Py_CLEAR(lazy);
            }
            else {
                Py_INCREF(what); PyTuple_SET_ITEM(values, 0, what);
                Py_INCREF(name); PyTuple_SET_ITEM(values, 1, name);
                PyTuple_SET_ITEM(values, 2, n);
                Py_INCREF(capacity); PyTuple_SET_ITEM(values, 3, capacity);
                Py_INCREF(fmt); PyTuple_SET_ITEM(lazy, 0, fmt);
                PyTuple_SET_ITEM(lazy, 1, values);     /* steals */
                values = NULL;
            }
        }
        Py_XDECREF(values);
        if (lazy == NULL || PyObject_SetAttr(exc, bt_str_lazy, lazy) < 0) {
            Py_XDECREF(lazy);
            Py_DECREF(exc);
            return -1;
        }
        Py_DECREF(lazy);
        if (latency_ns == latency_ns) {         /* not NaN: a latency was measured */
            ra = PyFloat_FromDouble((latency_ns > 0.0 ? latency_ns : 0.0) / 1e9);     /* a clock stepped back: >= 0 */
            if (ra == NULL || PyObject_SetAttr(exc, bt_str_retry_after, ra) < 0) {
                Py_XDECREF(ra);
                Py_DECREF(exc);
                return -1;
            }
            Py_DECREF(ra);
        }
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
        return -1;
    }
    """
    ctypedef int (*bt_enter_impl)(PyObject *self) noexcept
    ctypedef int (*bt_exit_impl)(PyObject *self, PyObject *exc) except -1
    bt_enter_impl bt_adm_enter_impl, bt_stage_enter_impl
    bt_exit_impl bt_adm_exit_impl
    ctypedef struct PyMethodDef:
        const char *ml_name
    PyMethodDef bt_adm_enter_def, bt_stage_enter_def, bt_adm_exit_def, bt_adm_aenter_def, bt_adm_aexit_def
    int bt_set_enter(PyTypeObject *tp, PyMethodDef *d, bt_enter_impl impl, bt_enter_impl *slot) except -1
    int bt_set_method(PyTypeObject *tp, PyMethodDef *d) except -1
    int bt_done_ready() except -1
    PyObject *bt_type_of(PyObject *o) noexcept
    PyObject *bt_not_initialised_what(PyObject *o, const char *what) noexcept
    int bt_shed_refuse(PyObject *cls, PyObject *fmt, PyObject *what, PyObject *name, long long in_use,
                       PyObject *capacity, double latency_ns) noexcept

cdef extern from "Python.h":
    PyObject *bt_call1 "PyObject_CallOneArg"(PyObject *, PyObject *)
    long long bt_as_ll "PyLong_AsLongLong"(PyObject *)
    PyObject *bt_err_occurred "PyErr_Occurred"()
    void bt_err_string "PyErr_SetString"(PyObject *, const char *)
    void bt_err_fetch "PyErr_Fetch"(PyObject **, PyObject **, PyObject **)
    void bt_err_restore "PyErr_Restore"(PyObject *, PyObject *, PyObject *)
    PyObject *bt_callmethod0 "PyObject_CallMethod"(PyObject *, const char *, const char *)


cdef int _clock_read(ShedBase sh, int64_t *out) noexcept:
    cdef PyObject *r
    cdef long long v
    if sh.clock_ns is None:
        out[0] = monotonic_ns()
        return 0
    r = bt_call0(<PyObject *>sh.clock_ns)
    if r == NULL:
        return -1
    v = bt_as_ll(r)
    bt_decref(r)
    if v == -1 and bt_err_occurred() != NULL:
        return -1
    out[0] = v
    return 0


cdef int _shed_refused(ShedBase sh, int64_t prio, PyObject *name) noexcept:
    """The fast path refused `prio` (counted already): raise its Overloaded, built in C when `_shed_reject`
    configured it, else by the `refuse` hook. Always -1 (exception set)."""
    cdef PyObject *r
    cdef int64_t bits
    if sh.reject_cls is not None:
        bits = bt_load(&sh.latency)
        return bt_shed_refuse(<PyObject *>sh.reject_cls, <PyObject *>sh.reject_fmt, <PyObject *>sh.reject_what,
                              bt_tuple_get(<PyObject *>sh.reject_names, prio), bt_load(&sh.p.in_use),
                              <PyObject *>sh.reject_capacity, bt_i2f(bits))   # _NO_LATENCY is a NaN
    r = bt_call1(<PyObject *>sh.refuse_py, name)      # the Overloaded (lazy message)
    if r != NULL:
        bt_set_object(bt_type_of(r), r)
        bt_decref(r)
    return -1


cdef int _adm_enter_c(PyObject *o) noexcept:
    cdef Admission a = <Admission>o
    cdef ShedBase sh
    cdef int64_t lim, m, start, n
    cdef long long v
    cdef PyObject *r
    cdef PyObject *prio
    cdef PyObject *et
    cdef PyObject *ev
    cdef PyObject *etb
    if a.sh_p == NULL or (<ShedBase>a.sh_p).priorities is None:
        bt_not_initialised_what(o, b"get one from LoadShedder.admit()")
        return -1
    sh = <ShedBase>a.sh_p
    if not bt_cas(&a.held, 0, 1):
        bt_err_string(<PyObject *>RuntimeError, b"this admission is already entered: use one shedder.admit() per call")
        return -1
    prio = bt_tuple_get(<PyObject *>sh.priorities, a.prio)
    if sh.fast and a.prio >= bt_load(&sh._level):
        lim = sh.limits[a.prio]
        m = bt_load(&sh.p.limit)
        if lim > m:
            lim = m
        if lim >= 1 and permits_try_limit(sh.p, 1, lim):
            n = bt_fetch_add(&sh.admitted[a.prio], 1)
            a.fast = 1
            if n & _SAMPLE_MASK:        # not sampled: no clock read, at entry or exit
                a.fast = 2
                return 0
            a.in_flight = bt_load(&sh.p.in_use)
        else:
            bt_fetch_add(&sh.shed[a.prio], 1)
            bt_store(&a.held, 0)
            return _shed_refused(sh, a.prio, prio)
    else:
        a.fast = 0
        r = bt_call1(<PyObject *>sh.enter_py, prio)           # Overloaded when shed
        if r == NULL:
            bt_store(&a.held, 0)
            return -1
        v = bt_as_ll(r)
        bt_decref(r)
        a.in_flight = v
    if _clock_read(sh, &start) < 0:     # a clock that fails: the slot taken goes back
        bt_store(&a.held, 0)
        bt_err_fetch(&et, &ev, &etb)
        if a.fast:
            permits_release(sh.p, 1)
        else:
            r = bt_callmethod0(<PyObject *>sh.flight, b"release", NULL)
            if r != NULL:
                bt_decref(r)
            else:
                bt_err_restore(NULL, NULL, NULL)
        bt_err_restore(et, ev, etb)
        return -1
    a.start = start
    return 0


cdef int _adm_exit_c(PyObject *o, PyObject *exc_p) except -1:
    cdef Admission a = <Admission>o
    cdef ShedBase sh
    cdef int64_t now
    if a.sh_p == NULL or not bt_cas(&a.held, 1, 0):
        return 0                        # not entered, or exited already: nothing of ours to free
    sh = <ShedBase>a.sh_p
    if a.fast == 2:
        permits_release(sh.p, 1)        # not sampled: the slot goes back, nothing else
        return 0
    exc = <object>exc_p
    if not a.fast:
        sh.exit_py(a.start, a.in_flight, exc)
        return 0
    try:
        now = monotonic_ns() if sh.clock_ns is None else sh.clock_ns()
    finally:
        permits_release(sh.p, 1)        # whatever the clock does, the slot goes back exactly once
    if exc is not None and (not isinstance(exc, Exception) or type(exc) is UsageError):
        return 0                        # no outcome (DESIGN §3c)
    sh.record_latency(now - a.start)
    if sh.sample_py is not None:
        sh.sample_py(now - a.start, a.in_flight, exc)
    return 0


cdef int _stage_enter_c(PyObject *o) noexcept:
    cdef StageBase b = <StageBase>o
    cdef _Stage s = b._s
    if s is None:
        bt_not_initialised_what(o, b"_stage_setup() was not called")
        return -1
    if _enter(<PyObject *>s, NULL, NULL) < 0:
        return -1
    if not bt_held_enter(s.id):
        bt_fetch_add(&s.floating, 1)
    return 0


cdef extern from "buttress_attempt.h":
    ctypedef int64_t (*bt_now_fn)() noexcept
    PyObject *bt_attempt_vectorcall(PyObject *, PyObject *const *, size_t, PyObject *)
    int bt_attempt_set_settle(PyObject *fn, bt_now_fn now) except -1
    ctypedef void (*bt_bump_fn)(PyObject *) noexcept
    void bt_attempt_set_counter(PyTypeObject *tp, bt_bump_fn bump)
    void bt_attempt_drop_spare(PyObject *self) noexcept
    ctypedef struct bt_attempt_head:
        pass
    Py_ssize_t bt_attempt_spare_offset "offsetof(bt_attempt_head, spare)"

cdef extern from "Python.h":
    int bt_cvar_get "PyContextVar_Get"(object var, PyObject *default_value, PyObject **value) except -1
    object bt_cvar_set "PyContextVar_Set"(object var, object value)
    int bt_cvar_reset "PyContextVar_Reset"(object var, object token) except -1


cdef int64_t _attempt_now() noexcept:
    return monotonic_ns()


cdef class AttemptCounter:
    """A lock-free counter with the part of itertools.count's interface buttress uses: next() counts and
    returns the count before it, repr() is "count(N)" (what _params.count_of reads back). A first attempt
    of AttemptGuard bumps it in C with one atomic add (itertools.count made and freed an int per call)."""
    cdef int64_t n

    def __iter__(self):
        return self

    def __next__(self):
        return bt_fetch_add(&self.n, 1)

    def __repr__(self):
        return f"count({bt_load(&self.n)})"


cdef void _counter_bump(PyObject *c) noexcept:
    bt_fetch_add(&(<AttemptCounter>c).n, 1)


cdef class AttemptVar:
    """The ContextVar of a retried call's state, as the Python paths use it (get / set / reset), as C
    methods: get() is var.get(None). Every first attempt sets the variable eagerly
    (include/buttress_attempt.h), so this is the variable and nothing more."""
    cdef object _v

    @property
    def var(self):
        return self._var()

    def __init__(self, var):
        if type(var) is not ContextVar:
            raise TypeError(f"var must be a contextvars.ContextVar, got {var!r}")
        if self._v is not None:
            raise RuntimeError(f"{type(self).__name__} is already initialised")
        self._v = var

    cdef inline object _var(self):
        if self._v is None:
            raise _not_initialised(self)
        return self._v

    # get / set / reset are C methods (installed by _install: one METH_NOARGS / METH_O call, as the
    # ContextVar's own): the Python paths of Retry and Hedge call them on every call


cdef extern from *:
    """
    typedef PyObject *(*bt_av_impl)(PyObject *self, PyObject *arg);
    static bt_av_impl bt_av_get_impl = NULL, bt_av_set_impl = NULL, bt_av_reset_impl = NULL;
    static PyObject *bt_av_get(PyObject *self, PyObject *unused) { return bt_av_get_impl(self, NULL); }
    static PyObject *bt_av_set(PyObject *self, PyObject *arg) { return bt_av_set_impl(self, arg); }
    static PyObject *bt_av_reset(PyObject *self, PyObject *arg) { return bt_av_reset_impl(self, arg); }
    static PyMethodDef bt_av_get_def = {"get", (PyCFunction)bt_av_get, METH_NOARGS,
        "get($self, /)\\n--\\n\\nThe state of the innermost retried call here, or None."};
    static PyMethodDef bt_av_set_def = {"set", (PyCFunction)bt_av_set, METH_O,
        "set($self, value, /)\\n--\\n\\nSet the variable; returns its token."};
    static PyMethodDef bt_av_reset_def = {"reset", (PyCFunction)bt_av_reset, METH_O,
        "reset($self, token, /)\\n--\\n\\nReset the variable to before `token`."};
    """
    ctypedef PyObject *(*bt_av_impl)(PyObject *self, PyObject *arg) noexcept
    bt_av_impl bt_av_get_impl, bt_av_set_impl, bt_av_reset_impl
    PyMethodDef bt_av_get_def, bt_av_set_def, bt_av_reset_def

cdef extern from "Python.h":
    PyObject *bt_cvar_set_raw "PyContextVar_Set"(PyObject *var, PyObject *value) noexcept
    int bt_cvar_reset_raw "PyContextVar_Reset"(PyObject *var, PyObject *token) noexcept
    int bt_cvar_get_raw "PyContextVar_Get"(PyObject *var, PyObject *default_value, PyObject **value) noexcept
    PyObject *bt_none "Py_None"


cdef inline PyObject *_av_var(PyObject *o) noexcept:
    cdef object v = (<AttemptVar>o)._v
    if v is None:
        bt_not_initialised_what(o, b"its __init__ was not called")
        return NULL
    return <PyObject *>v         # borrowed: the AttemptVar holds it


cdef PyObject *_av_get(PyObject *o, PyObject *unused) noexcept:
    cdef PyObject *var = _av_var(o)
    cdef PyObject *value = NULL
    if var == NULL or bt_cvar_get_raw(var, NULL, &value) < 0:
        return NULL
    if value == NULL:
        bt_incref(bt_none)
        return bt_none
    return value


cdef PyObject *_av_set(PyObject *o, PyObject *value) noexcept:
    cdef PyObject *var = _av_var(o)
    if var == NULL:
        return NULL
    return bt_cvar_set_raw(var, value)


cdef PyObject *_av_reset(PyObject *o, PyObject *token) noexcept:
    cdef PyObject *var = _av_var(o)
    if var == NULL or bt_cvar_reset_raw(var, token) < 0:
        return NULL
    bt_incref(bt_none)
    return bt_none


@cython.no_gc_clear     # the *_p fields borrow the object fields: the GC must never clear them under a caller
cdef class AttemptGuard:
    """The first attempt of a retried call, compiled (see include/buttress_attempt.h): sets the state list
    [1, None, clock_ns(), owner, None, None, None] in `var` (eagerly, reset when the attempt ends; a
    success's unshared list is kept as the next call's), calls fn, advances `counter` on success; on an
    Exception hands over to on_failure(state, fn, args, kwargs, exc, None). Binds like a function.
    Layout: the first fields must match bt_attempt_head. Not initialised (fn_p NULL): every call raises
    RuntimeError. Initialised once."""
    cdef vectorcallfunc vectorcall
    cdef PyObject *fn_p
    cdef PyObject *owner_p
    cdef PyObject *var_p
    cdef PyObject *counter_p
    cdef PyObject *on_failure_p
    cdef PyObject *clock_p
    cdef int sysclock           # clock_ns is time.monotonic_ns: the first attempt reads the clock in C
    cdef int64_t spare          # a parked state list (owned; bt_exchange only), or 0
    cdef object fn, owner, var, counter, on_failure, clock_ns
    cdef dict __dict__

    def __cinit__(self):
        self.vectorcall = bt_attempt_vectorcall   # checks the fields: an uninitialised guard says so

    def __dealloc__(self):
        bt_attempt_drop_spare(<PyObject *>self)

    def __init__(self, fn, owner, var, counter, on_failure, clock_ns):
        for name, value in (("fn", fn), ("on_failure", on_failure), ("clock_ns", clock_ns)):
            if not callable(value):
                raise TypeError(f"{name} must be callable, got {value!r}")
        if type(var) is not ContextVar:
            raise TypeError(f"var must be a contextvars.ContextVar, got {var!r}")
        if not hasattr(counter, "__next__"):
            raise TypeError(f"counter must be an iterator (itertools.count), got {counter!r}")
        if self.fn_p != NULL:           # a running call borrows the fields: they never change
            raise RuntimeError(f"{type(self).__name__} is already initialised")
        self.fn, self.owner, self.var, self.counter, self.on_failure, self.clock_ns = (
            fn, owner, var, counter, on_failure, clock_ns)
        self.fn_p, self.owner_p, self.var_p = <PyObject *>fn, <PyObject *>owner, <PyObject *>var
        self.counter_p, self.on_failure_p, self.clock_p = <PyObject *>counter, <PyObject *>on_failure, <PyObject *>clock_ns
        self.sysclock = clock_ns is _time.monotonic_ns

    def __call__(self, *args, **kwargs):     # only reached by callers that bypass vectorcall
        if self.fn_p == NULL:
            raise _not_initialised(self)
        state = [1, None, self.clock_ns(), self.owner, None, None, None]
        token = self.var.set(state)
        try:
            try:
                result = self.fn(*args, **kwargs)
            except Exception as e:
                exc = e
            else:
                if bt_guard_lazy(Py_TYPE(result)):
                    result = _attempt_settle(self.owner, self.fn, result)
                next(self.counter)
                return result
            state[4], state[5] = args, kwargs
            return self.on_failure(state, self.fn, args, kwargs, exc, None)
        finally:
            self.var.reset(token)

    def __get__(self, obj, objtype):
        return self if obj is None else types.MethodType(self, obj)


def _install():
    bt_aw_ready()
    bt_done_ready()
    bt_set_enter(<PyTypeObject *>Admission, &bt_adm_enter_def, _adm_enter_c, &bt_adm_enter_impl)
    global bt_adm_exit_impl
    bt_adm_exit_impl = _adm_exit_c
    bt_set_method(<PyTypeObject *>Admission, &bt_adm_exit_def)
    bt_set_method(<PyTypeObject *>Admission, &bt_adm_aenter_def)
    bt_set_method(<PyTypeObject *>Admission, &bt_adm_aexit_def)
    bt_set_enter(<PyTypeObject *>StageBase, &bt_stage_enter_def, _stage_enter_c, &bt_stage_enter_impl)
    bt_attempt_set_settle(<PyObject *>_attempt_settle, _attempt_now)
    bt_attempt_set_counter(<PyTypeObject *>AttemptCounter, _counter_bump)
    global bt_av_get_impl, bt_av_set_impl, bt_av_reset_impl
    bt_av_get_impl, bt_av_set_impl, bt_av_reset_impl = _av_get, _av_set, _av_reset
    bt_set_method(<PyTypeObject *>AttemptVar, &bt_av_get_def)
    bt_set_method(<PyTypeObject *>AttemptVar, &bt_av_set_def)
    bt_set_method(<PyTypeObject *>AttemptVar, &bt_av_reset_def)
    cdef StageGuard probe = StageGuard.__new__(StageGuard)
    bt_guard_install(<PyTypeObject *>StageGuard, <Py_ssize_t>(<char *>&probe.vectorcall - <char *><PyObject *>probe))
    bt_guard_method_descriptor(<PyTypeObject *>StageGuard)
    cdef AttemptGuard probe2 = AttemptGuard.__new__(AttemptGuard)
    if <Py_ssize_t>(<char *>&probe2.spare - <char *><PyObject *>probe2) != bt_attempt_spare_offset:
        raise SystemError("AttemptGuard's fields do not match bt_attempt_head (buttress_attempt.h)")
    bt_guard_install(<PyTypeObject *>AttemptGuard, <Py_ssize_t>(<char *>&probe2.vectorcall - <char *><PyObject *>probe2))
    bt_guard_method_descriptor(<PyTypeObject *>AttemptGuard)

_install()
