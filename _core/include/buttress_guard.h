/* buttress_guard.h -- a vectorcall entry for guarded calls.
 *
 * A guard object (a Cython cdef class whose first fields match bt_guard_head) is called through
 * bt_guard_vectorcall: enter() decides, the wrapped function runs with the caller's arguments
 * unchanged (no tuple, no dict), exit_ok()/exit_err() record the outcome. An exception raised by
 * the wrapped function passes through untouched: no extra traceback frame is added.
 * When the guard has no fn (fn == NULL), the first positional argument is the function: this is
 * `policy.call(fn, *args, **kwargs)`. A result of a lazy type (an awaitable, a generator, an async
 * generator: bt_guard_lazy) goes to settle() instead of exit_ok() (DESIGN §3c: refused, or guarded over
 * its whole iteration).
 */
#ifndef BUTTRESS_GUARD_H
#define BUTTRESS_GUARD_H
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(_MSC_VER) && !defined(__clang__)
#define BT_GUARD_INLINE __inline
#else
#define BT_GUARD_INLINE inline
#endif

typedef struct bt_guard_ops {
    /* 0: go (token/start set); -1: refuse, exception set */
    int (*enter)(PyObject *owner, int64_t *token, int64_t *start);
    /* 0: return the result; -1: exception set (the result is dropped) */
    int (*exit_ok)(PyObject *owner, int64_t token, int64_t start, PyObject *result);
    /* record an exception; never raises (the original exception is re-raised) */
    void (*exit_err)(PyObject *owner, int64_t token, int64_t start, PyObject *exc);
    /* a result of a lazy type (bt_guard_lazy): settle instead of exit_ok. Returns what the caller gets
     * (new reference; e.g. a generator guarded over its iteration, holding the permit) or NULL with an
     * exception set (e.g. an awaitable in a sync form, after the permit was returned). NULL op: exit_ok. */
    PyObject *(*settle)(PyObject *owner, PyObject *fn, int64_t token, int64_t start, PyObject *result);
    /* -- the async forms (bt_aguard_vectorcall); a guard with only the four sync ops leaves these NULL -- */
    /* 1: admitted (token/start set); 0: refused, nothing taken, no exception; -1: exception set */
    int (*try_enter)(PyObject *owner, int64_t *token, int64_t *start);
    /* refused: the slow path (Python): an awaitable that waits, runs fn and gives the permit back, or NULL
     * with the refusal set (raised when the caller awaits) */
    PyObject *(*refuse_async)(PyObject *owner, PyObject *fn, PyObject *const *args, size_t nargsf,
                              PyObject *kwnames);
    /* fn returned something without an await slot, permit held: returns what the caller awaits (an async
     * generator guarded over its iteration) or NULL + exception (a sync function: after the permit went back) */
    PyObject *(*settle_async)(PyObject *owner, PyObject *fn, int64_t token, int64_t start, PyObject *result);
} bt_guard_ops;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    const bt_guard_ops *ops;
    PyObject *owner;   /* the pattern object (borrowed from a Cython object field) */
    PyObject *fn;      /* the wrapped callable, or NULL for call(fn, ...) */
} bt_guard_head;

#if PY_VERSION_HEX >= 0x030C0000
#define BT_FETCH(exc) do { exc = PyErr_GetRaisedException(); } while (0)
#define BT_RESTORE(exc) PyErr_SetRaisedException(exc)
#else
/* (before 3.12) only the value is kept (BT_RESTORE takes its type from it): a value that is an exception
 * instance already -- anything raised by Python code -- needs no normalising (which costs a
 * PyObject_IsSubclass per failure); a missing or non-instance value is normalised */
#define BT_FETCH(exc) do { PyObject *_t, *_v, *_tb; PyErr_Fetch(&_t, &_v, &_tb); \
    if (_v == NULL || !PyExceptionInstance_Check(_v)) PyErr_NormalizeException(&_t, &_v, &_tb); \
    if (_tb != NULL && _v != NULL) PyException_SetTraceback(_v, _tb); \
    Py_XDECREF(_t); Py_XDECREF(_tb); exc = _v; } while (0)
#define BT_RESTORE(exc) do { PyObject *_e = (exc); PyObject *_ty = (PyObject *)Py_TYPE(_e); \
    Py_INCREF(_ty); PyErr_Restore(_ty, _e, PyException_GetTraceback(_e)); } while (0)
#endif

/* The error for an object whose __init__ never ran (T.__new__(T), a subclass skipping super().__init__()):
 * "<Type> is not initialised: ...", the short type name as type(obj).__name__ gives it. */
static BT_GUARD_INLINE PyObject *bt_not_initialised(PyObject *self)
{
    const char *name = Py_TYPE(self)->tp_name, *dot = strrchr(name, '.');
    PyErr_Format(PyExc_RuntimeError, "%s is not initialised: its __init__ was not called "
                 "(a subclass must call super().__init__())", dot != NULL ? dot + 1 : name);
    return NULL;
}

/* The same error with its own reason: "<Type> is not initialised: <what> (a subclass must call ...)". */
static BT_GUARD_INLINE PyObject *bt_not_initialised_what(PyObject *self, const char *what)
{
    const char *name = Py_TYPE(self)->tp_name, *dot = strrchr(name, '.');
    PyErr_Format(PyExc_RuntimeError, "%s is not initialised: %s (a subclass must call super().__init__())",
                 dot != NULL ? dot + 1 : name, what);
    return NULL;
}

/* A result that needs a second look from a sync form: a type with an await slot (a coroutine, a future,
 * anything with __await__: the function was async), a generator or an async generator (a stream). Two
 * pointer loads for every other result. Generators and async generators carry tp_as_async (am_send /
 * am_anext), so the common NULL tp_as_async ends the test at once. */
static BT_GUARD_INLINE int bt_guard_lazy(PyTypeObject *tp)
{
    PyAsyncMethods *am = tp->tp_as_async;
    return am != NULL && (am->am_await != NULL || tp == &PyGen_Type || tp == &PyAsyncGen_Type);
}

static PyObject *bt_guard_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    bt_guard_head *g = (bt_guard_head *)self;
    PyObject *fn = g->fn, *res, *exc;
    int64_t token, start;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);

    if (g->owner == NULL || g->ops == NULL)   /* never initialised: no owner to ask */
        return bt_not_initialised(self);

    if (fn == NULL) {   /* call(fn, *args, **kwargs) */
        if (nargs < 1) {
            PyErr_SetString(PyExc_TypeError, "call() needs the function to call as its first argument");
            return NULL;
        }
        fn = args[0];
        if (!PyCallable_Check(fn)) {   /* before the permit: a programming error is never an outcome */
            PyErr_Format(PyExc_TypeError, "fn must be callable, got %R", fn);
            return NULL;
        }
        args += 1;
        nargs -= 1;
        nargsf = (size_t)nargs;   /* args[-1] is our caller's slot: not ours to lend */
    }
    if (g->ops->enter(g->owner, &token, &start) < 0)
        return NULL;
    Py_INCREF(fn);
    res = PyObject_Vectorcall(fn, args, nargsf, kwnames);
    if (res == NULL) {
        Py_DECREF(fn);
        BT_FETCH(exc);
        if (exc == NULL) {   /* NULL without an exception: a broken callable */
            PyErr_SetString(PyExc_SystemError, "guarded callable returned NULL without an exception");
            return NULL;
        }
        g->ops->exit_err(g->owner, token, start, exc);
        BT_RESTORE(exc);
        return NULL;
    }
    if (g->ops->settle != NULL && bt_guard_lazy(Py_TYPE(res))) {
        PyObject *out = g->ops->settle(g->owner, fn, token, start, res);
        Py_DECREF(res);
        Py_DECREF(fn);
        return out;
    }
    Py_DECREF(fn);
    if (g->ops->exit_ok(g->owner, token, start, res) < 0) {
        Py_DECREF(res);
        return NULL;
    }
    return res;
}

/* ---- the compiled awaitable ------------------------------------------------------------------------------
 *
 * bt_aguard_vectorcall is the async form of bt_guard_vectorcall: it takes the permit in C (try_enter), calls
 * fn (an `async def` function: the call only creates its coroutine) and returns a bt_aw, a small awaitable
 * that drives that coroutine with PyIter_Send and, when it finishes, records the outcome (exit_ok / exit_err)
 * -- no Python frame of its own, so a traceback of the user's exception shows the user's frames only.
 * Python runs only when the permit is refused (refuse_async: wait, or raise) or fn returned no awaitable.
 *
 * States: RUN (driving `it`, the permit held), VALUE (finished at once: the first send returns `value` after
 * exit_ok, e.g. `async with`'s __aenter__), RAISE (the first send raises `value`, an exception caught at call
 * time: a refusal, fn raising), DONE. A bt_aw thrown into (throw()), closed (close()) or dropped while it
 * holds the permit gives it back through exit_err exactly once (GeneratorExit for close / dealloc), as a
 * Python coroutine's `finally` would. Freelisted (with the GIL; the free-threaded build allocates). */
enum { BT_AW_RUN = 0, BT_AW_VALUE = 1, BT_AW_RAISE = 2, BT_AW_DONE = 3 };

typedef struct {
    PyObject_HEAD
    PyObject *it;        /* RUN: the iterator driven (a coroutine, or an awaitable's __await__ iterator) */
    PyObject *value;     /* VALUE: the result; RAISE: the exception */
    PyObject *owner;     /* strong: the stage whose ops record the outcome */
    const bt_guard_ops *ops;
    int64_t token, start;
    int state;
    int started;         /* RUN: the iterator was sent to (0: a throw() now reaches a call that never ran) */
} bt_aw;

static PyTypeObject bt_aw_type;
static PyObject *bt_str_throw = NULL;    /* "throw", interned at bt_aw_ready */

#if defined(Py_GIL_DISABLED)
#define BT_AW_FREELIST 0
#else
#define BT_AW_FREELIST 64
static bt_aw *bt_aw_free[BT_AW_FREELIST];
static int bt_aw_nfree = 0;
#endif

static PyObject *bt_aw_make(PyObject *owner, const bt_guard_ops *ops, int state, PyObject *it, PyObject *value,
                            int64_t token, int64_t start)
{
    bt_aw *a;
#if BT_AW_FREELIST
    if (bt_aw_nfree > 0) {
        a = bt_aw_free[--bt_aw_nfree];
        (void)PyObject_Init((PyObject *)a, &bt_aw_type);
    }
    else
#endif
    {
        a = PyObject_GC_New(bt_aw, &bt_aw_type);
        if (a == NULL)
            return NULL;
    }
    Py_XINCREF(owner);
    Py_XINCREF(it);
    Py_XINCREF(value);
    a->owner = owner;
    a->ops = ops;
    a->it = it;
    a->value = value;
    a->token = token;
    a->start = start;
    a->state = state;
    a->started = 0;
    PyObject_GC_Track(a);
    return (PyObject *)a;
}

/* An exception to raise at the first send (a refusal, or fn raising at call time): the permit is not held. */
static PyObject *bt_aw_raising(void)
{
    PyObject *exc, *a;
    BT_FETCH(exc);
    if (exc == NULL) {
        PyErr_SetString(PyExc_SystemError, "buttress: an error path without an exception");
        return NULL;
    }
    a = bt_aw_make(NULL, NULL, BT_AW_RAISE, NULL, exc, 0, 0);
    Py_DECREF(exc);
    return a;
}

/* the permit goes back with `exc` as the outcome (borrowed; never raises: the caller's error stays set) */
static void bt_aw_exit_err(bt_aw *a, PyObject *exc)
{
    PyObject *owner = a->owner;
    const bt_guard_ops *ops = a->ops;
    a->state = BT_AW_DONE;
    a->owner = NULL;
    Py_CLEAR(a->it);
    Py_CLEAR(a->value);
    if (owner != NULL) {
        if (ops != NULL && ops->exit_err != NULL)
            ops->exit_err(owner, a->token, a->start, exc);
        Py_DECREF(owner);
    }
}

/* finished with `result` (borrowed): 0, or -1 with an exception (exit_ok refused the result) */
static int bt_aw_exit_ok(bt_aw *a, PyObject *result)
{
    PyObject *owner = a->owner;
    const bt_guard_ops *ops = a->ops;
    int rc = 0;
    a->state = BT_AW_DONE;
    a->owner = NULL;
    Py_CLEAR(a->it);
    if (owner != NULL) {
        if (ops != NULL && ops->exit_ok != NULL)
            rc = ops->exit_ok(owner, a->token, a->start, result);
        Py_DECREF(owner);
    }
    return rc;
}

static PySendResult bt_aw_am_send(PyObject *self, PyObject *arg, PyObject **presult)
{
    bt_aw *a = (bt_aw *)self;
    PyObject *exc;
    PySendResult r;
    switch (a->state) {
    case BT_AW_RUN:
        a->started = 1;
        r = PyIter_Send(a->it, arg, presult);
        if (r == PYGEN_NEXT)
            return r;
        if (r == PYGEN_RETURN) {
            if (bt_aw_exit_ok(a, *presult) < 0) {
                Py_CLEAR(*presult);
                return PYGEN_ERROR;
            }
            return r;
        }
        *presult = NULL;
        BT_FETCH(exc);
        if (exc == NULL) {
            PyErr_SetString(PyExc_SystemError, "awaited iterator failed without an exception");
            BT_FETCH(exc);
        }
        bt_aw_exit_err(a, exc);
        BT_RESTORE(exc);
        return PYGEN_ERROR;
    case BT_AW_VALUE: {
        PyObject *v = a->value;
        a->value = NULL;
        if (bt_aw_exit_ok(a, v) < 0) {
            Py_XDECREF(v);
            *presult = NULL;
            return PYGEN_ERROR;
        }
        *presult = v;       /* the reference a->value held */
        return PYGEN_RETURN;
    }
    case BT_AW_RAISE:
        exc = a->value;
        a->value = NULL;
        a->state = BT_AW_DONE;
        BT_RESTORE(exc);    /* steals */
        *presult = NULL;
        return PYGEN_ERROR;
    default:
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        *presult = NULL;
        return PYGEN_ERROR;
    }
}

static PyObject *bt_aw_stop(PyObject *value)
{
    /* StopIteration(value) for a return value; a bare return of None ends the iteration with no exception */
    if (value != Py_None) {
        PyObject *e = PyObject_CallOneArg(PyExc_StopIteration, value);
        if (e != NULL) {
            PyErr_SetObject(PyExc_StopIteration, e);
            Py_DECREF(e);
        }
    }
    Py_DECREF(value);
    return NULL;
}

static PyObject *bt_aw_iternext(PyObject *self)
{
    PyObject *res;
    PySendResult r = bt_aw_am_send(self, Py_None, &res);
    if (r == PYGEN_NEXT)
        return res;
    if (r == PYGEN_RETURN)
        return bt_aw_stop(res);
    return NULL;
}

static PyObject *bt_aw_send(PyObject *self, PyObject *arg)
{
    PyObject *res;
    PySendResult r = bt_aw_am_send(self, arg, &res);
    if (r == PYGEN_NEXT)
        return res;
    if (r == PYGEN_RETURN) {
        if (res == Py_None) {               /* send() reports a return as StopIteration, also for None */
            Py_DECREF(res);
            PyErr_SetNone(PyExc_StopIteration);
            return NULL;
        }
        return bt_aw_stop(res);
    }
    return NULL;
}

static void bt_aw_release_closed(bt_aw *a)
{
    PyObject *ge = PyObject_CallNoArgs(PyExc_GeneratorExit);
    if (ge == NULL)
        PyErr_Clear();
    bt_aw_exit_err(a, ge);
    Py_XDECREF(ge);
}

/* throw(exc) / throw(type[, value[, tb]]): into the coroutine when it runs (its outcome is recorded as usual);
 * before the first send it is raised at once, giving back a permit the awaitable holds. */
static PyObject *bt_aw_throw(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    bt_aw *a = (bt_aw *)self;
    PyObject *res, *exc, *it;
    if (nargs < 1 || nargs > 3) {
        PyErr_Format(PyExc_TypeError, "throw expected 1 to 3 arguments, got %zd", nargs);
        return NULL;
    }
    if (a->state == BT_AW_RUN) {
        PyObject *margs[4] = {NULL, NULL, NULL, NULL};
        Py_ssize_t i;
        it = a->it;
        Py_INCREF(it);
        margs[0] = it;
        for (i = 0; i < nargs; i++)
            margs[i + 1] = args[i];
        res = PyObject_VectorcallMethod(bt_str_throw, margs, (size_t)(nargs + 1), NULL);
        Py_DECREF(it);
        if (res != NULL)
            return res;                 /* the coroutine caught it and yielded */
        BT_FETCH(exc);
        if (exc == NULL)
            return NULL;
        if (!a->started) {
            /* thrown in before the call ever ran: the exception comes straight back (a coroutine that never
             * started cannot catch it) and is not the call's outcome: the permit goes back as on close() */
            bt_aw_release_closed(a);
            BT_RESTORE(exc);
            return NULL;
        }
        if (PyErr_GivenExceptionMatches(exc, PyExc_StopIteration)) {     /* it caught it and returned */
            PyObject *v = PyObject_GetAttrString(exc, "value");
            int rc;
            if (v == NULL) {
                Py_DECREF(exc);
                bt_aw_exit_err(a, NULL);
                return NULL;
            }
            rc = bt_aw_exit_ok(a, v);
            Py_DECREF(v);
            if (rc < 0) {
                Py_DECREF(exc);
                return NULL;
            }
        }
        else
            bt_aw_exit_err(a, exc);
        BT_RESTORE(exc);
        return NULL;
    }
    /* never started (VALUE / RAISE) or finished: raise what was thrown, as a fresh coroutine would */
    if (nargs == 1 && PyExceptionInstance_Check(args[0])) {
        exc = args[0];
        Py_INCREF(exc);
    }
    else if (PyExceptionClass_Check(args[0])) {
        exc = (nargs >= 2 && args[1] != Py_None)
            ? (PyExceptionInstance_Check(args[1]) ? (Py_INCREF(args[1]), args[1]) : PyObject_CallOneArg(args[0], args[1]))
            : PyObject_CallNoArgs(args[0]);
        if (exc == NULL)
            return NULL;
        if (nargs == 3 && args[2] != Py_None && PyException_SetTraceback(exc, args[2]) < 0) {
            Py_DECREF(exc);
            return NULL;
        }
    }
    else {
        PyErr_SetString(PyExc_TypeError, "exceptions must be classes or instances deriving from BaseException");
        return NULL;
    }
    bt_aw_exit_err(a, exc);
    BT_RESTORE(exc);
    return NULL;
}

static PyObject *bt_aw_close(PyObject *self, PyObject *unused)
{
    bt_aw *a = (bt_aw *)self;
    PyObject *res = NULL;
    if (a->state == BT_AW_RUN) {
        PyObject *it = a->it;
        Py_INCREF(it);
        res = PyObject_CallMethod(it, "close", NULL);     /* runs its finally blocks, permit still held */
        Py_DECREF(it);
        if (res == NULL) {
            PyObject *exc;
            BT_FETCH(exc);
            bt_aw_exit_err(a, exc);
            BT_RESTORE(exc);
            return NULL;
        }
        Py_DECREF(res);
    }
    if (a->state != BT_AW_DONE)
        bt_aw_release_closed(a);
    Py_RETURN_NONE;
}

static PyObject *bt_aw_await(PyObject *self)
{
    Py_INCREF(self);
    return self;
}

static int bt_aw_traverse(PyObject *self, visitproc visit, void *arg)
{
    bt_aw *a = (bt_aw *)self;
    Py_VISIT(a->it);
    Py_VISIT(a->value);
    Py_VISIT(a->owner);
    return 0;
}

static int bt_aw_clear(PyObject *self)
{
    bt_aw *a = (bt_aw *)self;
    if (a->state != BT_AW_DONE && a->owner != NULL)
        bt_aw_release_closed(a);        /* a cycle collected: the permit goes back first */
    Py_CLEAR(a->it);
    Py_CLEAR(a->value);
    Py_CLEAR(a->owner);
    return 0;
}

static void bt_aw_dealloc(PyObject *self)
{
    bt_aw *a = (bt_aw *)self;
    PyObject_GC_UnTrack(self);
    if (a->state != BT_AW_DONE) {
        /* dropped before it finished (never awaited, or its task was collected): the coroutine is dropped
         * first (its finally blocks run with the permit still held), then the permit goes back */
        PyObject *saved;
        BT_FETCH(saved);
        Py_CLEAR(a->it);
        if (a->owner != NULL)
            bt_aw_release_closed(a);
        if (PyErr_Occurred())
            PyErr_WriteUnraisable(self);
        if (saved != NULL)
            BT_RESTORE(saved);
    }
    Py_CLEAR(a->it);
    Py_CLEAR(a->value);
    Py_CLEAR(a->owner);
#if BT_AW_FREELIST
    if (bt_aw_nfree < BT_AW_FREELIST) {
        bt_aw_free[bt_aw_nfree++] = a;
        return;
    }
#endif
    PyObject_GC_Del(self);
}

static PyAsyncMethods bt_aw_as_async = {
    bt_aw_await,        /* am_await */
    0,                  /* am_aiter */
    0,                  /* am_anext */
    bt_aw_am_send,      /* am_send */
};

static PyMethodDef bt_aw_methods[] = {
    {"send", (PyCFunction)bt_aw_send, METH_O, "send(value): resume the guarded coroutine"},
    {"throw", (PyCFunction)(void (*)(void))bt_aw_throw, METH_FASTCALL, "throw(exc): raise exc in the guarded coroutine"},
    {"close", (PyCFunction)bt_aw_close, METH_NOARGS, "close(): close the guarded coroutine, giving its permit back"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject bt_aw_type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    "buttress._core.guard.GuardedAwaitable",    /* tp_name */
    sizeof(bt_aw),                              /* tp_basicsize */
};

static int bt_aw_ready(void)
{
    if (bt_aw_type.tp_flags & Py_TPFLAGS_READY)
        return 0;
    bt_str_throw = PyUnicode_InternFromString("throw");
    if (bt_str_throw == NULL)
        return -1;
    bt_aw_type.tp_dealloc = bt_aw_dealloc;
    bt_aw_type.tp_as_async = &bt_aw_as_async;
    bt_aw_type.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC;
    bt_aw_type.tp_doc = "The awaitable of a guarded async call: drives the call's coroutine, holding its permit.";
    bt_aw_type.tp_traverse = bt_aw_traverse;
    bt_aw_type.tp_clear = bt_aw_clear;
    bt_aw_type.tp_iter = PyObject_SelfIter;
    bt_aw_type.tp_iternext = bt_aw_iternext;
    bt_aw_type.tp_methods = bt_aw_methods;
    return PyType_Ready(&bt_aw_type);
}

/* a generator-based coroutine (types.coroutine): awaitable although its type has no await slot */
static int bt_gen_is_coroutine(PyObject *gen)
{
    PyObject *code = PyObject_GetAttrString(gen, "gi_code"), *flags;
    long f = 0;
    if (code == NULL) {
        PyErr_Clear();
        return 0;
    }
    flags = PyObject_GetAttrString(code, "co_flags");
    Py_DECREF(code);
    if (flags == NULL) {
        PyErr_Clear();
        return 0;
    }
    f = PyLong_AsLong(flags);
    Py_DECREF(flags);
    if (f == -1 && PyErr_Occurred())
        PyErr_Clear();
    return (f & CO_ITERABLE_COROUTINE) != 0;
}

/* Start driving `res` (new reference, fn's result) with the permit held: a coroutine is driven as it is,
 * another awaitable through its __await__ iterator; no await slot goes to settle_async. */
static PyObject *bt_aw_start(PyObject *owner, const bt_guard_ops *ops, PyObject *fn, PyObject *res,
                             int64_t token, int64_t start)
{
    PyTypeObject *tp = Py_TYPE(res);
    PyObject *it, *a;
    if (tp == &PyCoro_Type || (tp == &PyGen_Type && bt_gen_is_coroutine(res))) {
        it = res;
    }
    else if (tp->tp_as_async != NULL && tp->tp_as_async->am_await != NULL) {
        it = tp->tp_as_async->am_await(res);
        Py_DECREF(res);
        if (it == NULL) {
            PyObject *exc;
            BT_FETCH(exc);
            ops->exit_err(owner, token, start, exc);
            BT_RESTORE(exc);
            return bt_aw_raising();
        }
    }
    else {
        PyObject *out = ops->settle_async(owner, fn, token, start, res), *done;
        Py_DECREF(res);
        if (out == NULL)
            return bt_aw_raising();
        done = bt_aw_make(NULL, NULL, BT_AW_VALUE, NULL, out, 0, 0);    /* awaiting gives the guarded stream */
        Py_DECREF(out);
        return done;
    }
    a = bt_aw_make(owner, ops, BT_AW_RUN, it, NULL, token, start);
    Py_DECREF(it);
    if (a == NULL) {
        PyObject *exc;
        BT_FETCH(exc);
        ops->exit_err(owner, token, start, exc);
        BT_RESTORE(exc);
    }
    return a;
}

/* The permit is held: call fn and drive what it returns (an exception now is raised when awaited). */
static PyObject *bt_aw_call(PyObject *owner, const bt_guard_ops *ops, PyObject *fn, PyObject *const *args,
                            size_t nargsf, PyObject *kwnames, int64_t token, int64_t start)
{
    PyObject *res, *exc, *out;
    Py_INCREF(fn);
    res = PyObject_Vectorcall(fn, args, nargsf, kwnames);
    if (res == NULL) {
        Py_DECREF(fn);
        BT_FETCH(exc);
        if (exc == NULL) {
            PyErr_SetString(PyExc_SystemError, "guarded callable returned NULL without an exception");
            BT_FETCH(exc);
        }
        ops->exit_err(owner, token, start, exc);
        BT_RESTORE(exc);
        return bt_aw_raising();
    }
    out = bt_aw_start(owner, ops, fn, res, token, start);
    Py_DECREF(fn);
    return out;
}

static PyObject *bt_aguard_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    bt_guard_head *g = (bt_guard_head *)self;
    const bt_guard_ops *ops = g->ops;
    PyObject *fn = g->fn, *out;
    int64_t token = 0, start = 0;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    int ok;

    if (g->owner == NULL || ops == NULL || ops->try_enter == NULL)
        return bt_not_initialised(self);
    if (fn == NULL) {   /* call_async(fn, *args, **kwargs) */
        if (nargs < 1) {
            PyErr_SetString(PyExc_TypeError, "call_async() needs the function to call as its first argument");
            return NULL;
        }
        fn = args[0];
        if (!PyCallable_Check(fn)) {   /* before the permit: a programming error is never an outcome */
            PyErr_Format(PyExc_TypeError, "fn must be callable, got %R", fn);
            return NULL;
        }
        args += 1;
        nargs -= 1;
        nargsf = (size_t)nargs;
    }
    ok = ops->try_enter(g->owner, &token, &start);
    if (ok < 0)
        return bt_aw_raising();
    if (ok == 0) {      /* refused: wait (a Python coroutine) or raise when awaited */
        Py_INCREF(fn);
        out = ops->refuse_async(g->owner, fn, args, nargsf, kwnames);
        Py_DECREF(fn);
        return out != NULL ? out : bt_aw_raising();
    }
    return bt_aw_call(g->owner, ops, fn, args, nargsf, kwnames, token, start);
}

/* Per-thread records of `with` acquisitions (StageBase): which stage ids this thread holds, how many times.
 * A `with` block's __enter__ and __exit__ run in one thread, so __exit__ consumes this thread's record;
 * an __exit__ that finds none (a second exit of the same acquisition) is a no-op instead of releasing
 * another caller's permit. The table is small and fixed (no allocation, nothing to free at thread
 * exit): a thread holding more than BT_HELD_SLOTS different stages at once records the extra ones as
 * "floating" on the stage itself (any exit without a record may take a floating one). */
#define BT_HELD_SLOTS 8
typedef struct {
    int64_t id[BT_HELD_SLOTS];      /* stage ids are never 0 and never reused */
    int64_t count[BT_HELD_SLOTS];
} bt_held_t;

static BT_GUARD_INLINE bt_held_t *bt_held_table(void)
{
#if defined(_MSC_VER) && !defined(__clang__)
    static __declspec(thread) bt_held_t table;
#else
    static __thread bt_held_t table;
#endif
    return &table;
}

/* 1: recorded for this thread; 0: table full (the caller counts it as floating). */
static BT_GUARD_INLINE int bt_held_enter(int64_t id)
{
    bt_held_t *h = bt_held_table();
    int i, free_slot = -1;
    for (i = 0; i < BT_HELD_SLOTS; i++) {
        if (h->id[i] == id) {
            h->count[i]++;
            return 1;
        }
        if (free_slot < 0 && h->count[i] == 0)
            free_slot = i;
    }
    if (free_slot < 0)
        return 0;
    h->id[free_slot] = id;
    h->count[free_slot] = 1;
    return 1;
}

/* 1: a record of this thread was consumed; 0: this thread holds none. */
static BT_GUARD_INLINE int bt_held_exit(int64_t id)
{
    bt_held_t *h = bt_held_table();
    int i;
    for (i = 0; i < BT_HELD_SLOTS; i++) {
        if (h->id[i] == id && h->count[i] > 0) {
            if (--h->count[i] == 0)
                h->id[i] = 0;
            return 1;
        }
    }
    return 0;
}

/* How many `with` acquisitions of stage `id` this thread holds (for tests and metrics). */
static BT_GUARD_INLINE int64_t bt_held_count(int64_t id)
{
    bt_held_t *h = bt_held_table();
    int i;
    for (i = 0; i < BT_HELD_SLOTS; i++)
        if (h->id[i] == id)
            return h->count[i];
    return 0;
}

/* The type flag that lets `obj.method(...)` call a guard without a bound method (as for functions). */
static int bt_guard_method_descriptor(PyTypeObject *tp)
{
    tp->tp_flags |= Py_TPFLAGS_METHOD_DESCRIPTOR;
    PyType_Modified(tp);
    return 0;
}

/* Make a Cython cdef class callable through bt_guard_vectorcall. */
static int bt_guard_install(PyTypeObject *tp, Py_ssize_t vectorcall_offset)
{
    if (vectorcall_offset != (Py_ssize_t)offsetof(bt_guard_head, vectorcall)) {
        PyErr_SetString(PyExc_SystemError, "buttress: guard layout does not match bt_guard_head");
        return -1;
    }
    tp->tp_vectorcall_offset = vectorcall_offset;
    tp->tp_call = PyVectorcall_Call;
    tp->tp_flags |= Py_TPFLAGS_HAVE_VECTORCALL;
    PyType_Modified(tp);
    return 0;
}
/* Install a C method (METH_FASTCALL / METH_NOARGS) on a type after it is made: the compiled `with` /
 * `async with` methods of the breaker, the stages and the shedder's admission (no Cython frame of ours). */
static int bt_set_method(PyTypeObject *tp, PyMethodDef *def)
{
    PyObject *d = PyDescr_NewMethod(tp, def);
    int rc;
    if (d == NULL)
        return -1;
    rc = PyDict_SetItemString(tp->tp_dict, def->ml_name, d);
    Py_DECREF(d);
    PyType_Modified(tp);
    return rc;
}

#endif /* BUTTRESS_GUARD_H */
