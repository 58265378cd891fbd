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
from bt_permits cimport permits_t, permits_try, permits_release

import logging
import types
from contextvars import ContextVar

from buttress._params import describe
from buttress._spec import UsageError
from buttress._wrap import refuse_sync_result

__all__ = ["StageGuard", "StageBase", "AttemptGuard"]

log = logging.getLogger("buttress.guard")

cimport cython
from bt_atomic cimport bt_load, bt_cas, bt_fetch_add

cdef extern from "Python.h":
    ctypedef PyObject *(*vectorcallfunc)(PyObject *, PyObject *const *, size_t, PyObject *)
    PyObject *PyObject_CallNoArgs(PyObject *) except NULL
    PyTypeObject *Py_TYPE(object o) noexcept

cdef extern from "buttress_guard.h":
    ctypedef struct bt_guard_ops:
        int (*enter)(PyObject *owner, int64_t *token, int64_t *start) except -1
        int (*exit_ok)(PyObject *owner, int64_t token, int64_t start, PyObject *result) except -1
        void (*exit_err)(PyObject *owner, int64_t token, int64_t start, PyObject *exc)
        object (*settle)(PyObject *owner, PyObject *fn, int64_t token, int64_t start, PyObject *result)
    bint bt_guard_lazy(PyTypeObject *tp) noexcept
    PyObject *bt_guard_vectorcall(PyObject *, PyObject *const *, size_t, PyObject *)
    int bt_guard_install(PyTypeObject *tp, Py_ssize_t offset) except -1
    bint bt_held_enter(int64_t id) noexcept nogil
    bint bt_held_exit(int64_t id) noexcept nogil
    int64_t bt_held_count(int64_t id) noexcept nogil

from buttress._core.permits import Permits as _Permits

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


@cython.final
@cython.internal
cdef class _Stage:
    """The admit / release callables of one guard (the guard's `owner`). When acquire / release are
    the bound try_acquire / release of a compiled Permits, the permit word is used directly.
    Internal (not reachable from Python), built only by setup()."""
    cdef object acquire, refuse, release, pending, drain, holder, settle
    cdef permits_t *p
    cdef int64_t id             # key of this stage in the per-thread `with` records
    cdef int64_t floating       # `with` acquisitions not recorded per thread (a thread's table was full)

    cdef int setup(self, acquire, refuse, release, pending, drain, settle) except -1:
        for name, value in (("acquire", acquire), ("refuse", refuse)):
            if not callable(value):
                raise TypeError(f"{name} must be callable, got {value!r}")
        for name, value in (("release", release), ("drain", drain), ("settle", settle)):
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable or None, got {value!r}")
        if (pending is None) != (drain is None):
            raise TypeError("pending and drain go together: give both or neither")
        self.acquire, self.refuse, self.release, self.pending, self.drain = acquire, refuse, release, pending, drain
        self.settle = settle
        holder = getattr(acquire, "__self__", None)
        if (type(holder) is _Permits and getattr(acquire, "__name__", "") == "try_acquire"
                and getattr(release, "__self__", None) is holder and getattr(release, "__name__", "") == "release"):
            self.p = <permits_t *>PyCapsule_GetPointer(holder._handle(), "buttress.permits_t")
            self.holder = holder        # keeps the permit word alive
        self.id = bt_fetch_add(&_next_id, 1) + 1
        return 0

    cdef inline int enter(self) except -1:
        if self.p != NULL:
            if not permits_try(self.p, 1):
                self.refuse()           # raises, or returns once a permit was obtained
        elif self.acquire() is not True:
            self.refuse()
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


cdef int _enter(PyObject *owner, int64_t *token, int64_t *start) except -1:
    token[0] = 0
    start[0] = 0
    return (<_Stage>owner).enter()


cdef int _exit_ok(PyObject *owner, int64_t token, int64_t start, PyObject *result) except -1:
    return (<_Stage>owner).after()


cdef void _exit_err(PyObject *owner, int64_t token, int64_t start, PyObject *exc) noexcept:
    try:
        (<_Stage>owner).after()
    except BaseException:
        log.exception("releasing after a failed call failed")


cdef object _settle(PyObject *owner, PyObject *fn, int64_t token, int64_t start, PyObject *result):
    return (<_Stage>owner).settle_result(<object>fn, <object>result)


cdef bt_guard_ops _OPS
_OPS.enter = _enter
_OPS.exit_ok = _exit_ok
_OPS.exit_err = _exit_err
_OPS.settle = _settle


@cython.no_gc_clear     # owner_ptr / fn_ptr borrow owner / fn: the GC must never clear them under a caller
cdef class StageGuard:
    """fn guarded by acquire / refuse / release; binds like a function.
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

    def __init__(self, fn, acquire, refuse, release=None, pending=None, drain=None, settle=None):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        cdef _Stage s = _Stage.__new__(_Stage)
        s.setup(acquire, refuse, release, pending, drain, settle)
        if self.owner_ptr != NULL:      # a running call borrows owner and fn: they never change
            raise RuntimeError(f"{type(self).__name__} is already initialised")
        _bind(self, s, fn)

    def __call__(self, *args, **kwargs):     # only reached by callers that bypass vectorcall
        if self.owner_ptr == NULL:
            raise _not_initialised(self)
        cdef _Stage s = <_Stage>self.owner
        cdef int64_t token, start
        fn = self.fn
        if fn is None:                  # the call(fn, *args, **kwargs) entry
            if not args:
                raise TypeError("call() needs the function to call as its first argument")
            fn, args = args[0], args[1:]
        _enter(<PyObject *>s, &token, &start)
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


cdef inline void _bind(StageGuard g, _Stage s, fn) noexcept:
    g.owner = s
    g.fn = fn
    g.fn_ptr = NULL if fn is None else <PyObject *>fn     # NULL: the call(fn, *args) entry
    g.ops = &_OPS
    g.owner_ptr = <PyObject *>s      # last: a non-NULL owner_ptr means "ready"


cdef class StageBase:
    """A compiled `with` / `async with` for admit-then-release patterns: a facade class inherits it and
    calls `_stage_setup(acquire, refuse, release, pending=None, drain=None)` once (same meaning as
    StageGuard's arguments). `__enter__` returns self.

    One object serves many callers at once, so `__exit__` cannot be told which acquisition it ends: each
    `__enter__` records the acquisition for the calling thread (a small per-thread table, no lock, no
    allocation) and `__exit__` consumes one record of the calling thread. An `__exit__` that finds none
    -- a second exit of the same acquisition -- is a no-op: it never releases another caller's permit."""
    cdef _Stage _s

    def _stage_setup(self, acquire, refuse, release=None, pending=None, drain=None, settle=None):
        cdef _Stage s = _Stage.__new__(_Stage)
        s.setup(acquire, refuse, release, pending, drain, settle)
        if self._s is not None:         # holders of the first stage could never give their permits back
            raise RuntimeError(f"{type(self).__name__} is already initialised: _stage_setup() was called before")
        self._s = s

    def _stage_guard(self, fn):
        """A StageGuard for fn with this object's stage."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        if self._s is None:
            raise _not_initialised(self, "_stage_setup() was not called")
        cdef StageGuard g = StageGuard.__new__(StageGuard)
        _bind(g, self._s, fn)
        return g

    def _stage_call(self):
        """The `call(fn, *args, **kwargs)` entry with this object's stage: one vectorcall, no frame."""
        if self._s is None:
            raise _not_initialised(self, "_stage_setup() was not called")
        cdef StageGuard g = StageGuard.__new__(StageGuard)
        _bind(g, self._s, None)
        return g

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


cdef extern from "buttress_attempt.h":
    PyObject *bt_attempt_vectorcall(PyObject *, PyObject *const *, size_t, PyObject *)
    void bt_attempt_set_settle(PyObject *fn)


@cython.no_gc_clear     # the *_p fields borrow the object fields: the GC must never clear them under a caller
cdef class AttemptGuard:
    """The first attempt of a retried call, compiled (see include/buttress_attempt.h): sets the state list
    [1, None, clock_ns(), owner, None, None, None] in `var`, calls fn, advances `counter` on success; on
    an Exception hands over to on_failure(state, fn, args, kwargs, exc, None). Binds like a function.
    Layout: the first fields must match bt_attempt_head. Not initialised (fn_p NULL): every call raises
    RuntimeError. Initialised once."""
    cdef vectorcallfunc vectorcall
    cdef PyObject *fn_p
    cdef PyObject *owner_p
    cdef PyObject *var_p
    cdef PyObject *counter_p
    cdef PyObject *on_failure_p
    cdef PyObject *clock_p
    cdef object fn, owner, var, counter, on_failure, clock_ns
    cdef dict __dict__

    def __cinit__(self):
        self.vectorcall = bt_attempt_vectorcall   # checks the fields: an uninitialised guard says so

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
    bt_attempt_set_settle(<PyObject *>_attempt_settle)
    cdef StageGuard probe = StageGuard.__new__(StageGuard)
    bt_guard_install(<PyTypeObject *>StageGuard, <Py_ssize_t>(<char *>&probe.vectorcall - <char *><PyObject *>probe))
    cdef AttemptGuard probe2 = AttemptGuard.__new__(AttemptGuard)
    bt_guard_install(<PyTypeObject *>AttemptGuard, <Py_ssize_t>(<char *>&probe2.vectorcall - <char *><PyObject *>probe2))

_install()
