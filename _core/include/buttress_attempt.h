/* buttress_attempt.h -- the vectorcall entry of a retried call's first attempt.
 *
 * The first attempt of a logical call is the hot path: it sets the per-call state (a fresh list
 * [1, None, now_ns, owner, None, None, None]) in a ContextVar so the call can read its attempt and
 * idempotency key, calls fn with the caller's arguments unchanged, and on success bumps a counter and
 * returns. Only when fn raises an Exception does it build the args tuple / kwargs dict and hand over
 * to `on_failure(state, fn, args, kwargs, exc, None)` (the Python retry loop), with the ContextVar still
 * set. BaseExceptions (cancellation, KeyboardInterrupt, ...) pass through untouched.
 * A successful result of a lazy type (bt_guard_lazy: an awaitable, a generator) is shown to
 * bt_attempt_settle(owner, fn, result) first, which raises the sync-form TypeError for an awaitable
 * (DESIGN §3c: the function was async) and returns the result otherwise; every other result costs two loads.
 */
#ifndef BUTTRESS_ATTEMPT_H
#define BUTTRESS_ATTEMPT_H
#include <Python.h>
#include "buttress_guard.h"   /* BT_FETCH / BT_RESTORE, bt_not_initialised */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *fn;
    PyObject *owner;        /* stored in the state list at index 3 */
    PyObject *var;          /* the ContextVar holding the state */
    PyObject *counter;      /* an iterator advanced once per first-attempt success (itertools.count) */
    PyObject *on_failure;   /* callable(state, fn, args, kwargs, exc, None) -> result */
    PyObject *clock_ns;     /* callable() -> int ns */
} bt_attempt_head;

/* set once at import by buttress._core.guard (a new reference kept for the life of the process) */
static PyObject *bt_attempt_settle = NULL;

static void bt_attempt_set_settle(PyObject *fn)
{
    Py_XINCREF(fn);
    bt_attempt_settle = fn;
}

static PyObject *bt_attempt_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **kwargs)
{
    PyObject *tuple = PyTuple_New(nargs), *dict = NULL;
    Py_ssize_t i, nkw;
    if (tuple == NULL)
        return NULL;
    for (i = 0; i < nargs; i++) {
        Py_INCREF(args[i]);
        PyTuple_SET_ITEM(tuple, i, args[i]);
    }
    dict = PyDict_New();
    if (dict == NULL) {
        Py_DECREF(tuple);
        return NULL;
    }
    nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (i = 0; i < nkw; i++) {
        if (PyDict_SetItem(dict, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0) {
            Py_DECREF(tuple);
            Py_DECREF(dict);
            return NULL;
        }
    }
    *kwargs = dict;
    return tuple;
}

static PyObject *bt_attempt_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    bt_attempt_head *g = (bt_attempt_head *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *now, *state, *token, *res, *exc, *targs, *tkwargs = NULL, *tmp;

    if (g->fn == NULL || g->owner == NULL || g->var == NULL || g->counter == NULL || g->on_failure == NULL
            || g->clock_ns == NULL)
        return bt_not_initialised(self);      /* __init__ never ran: nothing to call */
    now = PyObject_CallNoArgs(g->clock_ns);
    if (now == NULL)
        return NULL;
    state = PyList_New(7);
    if (state == NULL) {
        Py_DECREF(now);
        return NULL;
    }
    PyList_SET_ITEM(state, 0, PyLong_FromLong(1));
    Py_INCREF(Py_None); PyList_SET_ITEM(state, 1, Py_None);
    PyList_SET_ITEM(state, 2, now);
    Py_INCREF(g->owner); PyList_SET_ITEM(state, 3, g->owner);
    Py_INCREF(Py_None); PyList_SET_ITEM(state, 4, Py_None);
    Py_INCREF(Py_None); PyList_SET_ITEM(state, 5, Py_None);
    Py_INCREF(Py_None); PyList_SET_ITEM(state, 6, Py_None);
    if (PyList_GET_ITEM(state, 0) == NULL) {
        Py_DECREF(state);
        return NULL;
    }
    token = PyContextVar_Set(g->var, state);
    if (token == NULL) {
        Py_DECREF(state);
        return NULL;
    }
    res = PyObject_Vectorcall(g->fn, args, nargsf, kwnames);
    if (res != NULL && bt_guard_lazy(Py_TYPE(res)) && bt_attempt_settle != NULL) {
        tmp = PyObject_CallFunctionObjArgs(bt_attempt_settle, g->owner, g->fn, res, NULL);
        Py_DECREF(res);
        res = tmp;         /* NULL: refused (an awaitable), the TypeError is set; not retried */
        if (res == NULL)
            goto done;
    }
    if (res != NULL) {
        tmp = PyIter_Next(g->counter);
        Py_XDECREF(tmp);
        goto done;
    }
    BT_FETCH(exc);
    if (exc == NULL) {
        PyErr_SetString(PyExc_SystemError, "retried callable returned NULL without an exception");
        goto done;
    }
    if (!PyObject_TypeCheck(exc, (PyTypeObject *)PyExc_Exception)) {
        BT_RESTORE(exc);                   /* cancellation and friends: not ours to retry */
        goto done;
    }
    targs = bt_attempt_args(args, nargs, kwnames, &tkwargs);
    if (targs == NULL) {
        Py_DECREF(exc);
        goto done;
    }
    PyList_SetItem(state, 4, targs);       /* steals */
    Py_INCREF(tkwargs);
    PyList_SetItem(state, 5, tkwargs);
    res = PyObject_CallFunctionObjArgs(g->on_failure, state, g->fn, targs, tkwargs, exc, Py_None, NULL);
    Py_DECREF(tkwargs);
    Py_DECREF(exc);
done:
    if (res == NULL) {                     /* reset with no exception pending, then restore it */
        PyObject *pending;
        BT_FETCH(pending);
        if (PyContextVar_Reset(g->var, token) < 0)
            PyErr_Clear();
        if (pending != NULL)
            BT_RESTORE(pending);
    }
    else if (PyContextVar_Reset(g->var, token) < 0) {
        Py_DECREF(res);
        res = NULL;
    }
    Py_DECREF(token);
    Py_DECREF(state);
    return res;
}
#endif /* BUTTRESS_ATTEMPT_H */
