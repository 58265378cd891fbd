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
#define BT_FETCH(exc) do { PyObject *_t, *_v, *_tb; PyErr_Fetch(&_t, &_v, &_tb); \
    PyErr_NormalizeException(&_t, &_v, &_tb); \
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
#endif /* BUTTRESS_GUARD_H */
