/* buttress_attempt.h -- the vectorcall entry of a retried call's first attempt.
 *
 * The first attempt of a logical call is the hot path: it calls fn with the caller's arguments unchanged,
 * and on success bumps a counter and returns. Only when fn raises an Exception does it build the args
 * tuple / kwargs dict and hand over to `on_failure(state, fn, args, kwargs, exc, None)` (the Python retry
 * loop). BaseExceptions (cancellation, KeyboardInterrupt, ...) pass through untouched.
 * A successful result of a lazy type (bt_guard_lazy: an awaitable, a generator) is shown to
 * bt_attempt_settle(owner, fn, result) first, which raises the sync-form TypeError for an awaitable
 * (DESIGN §3c: the function was async) and returns the result otherwise; every other result costs two loads.
 *
 * The attempt context is set eagerly. Every first attempt puts its state list
 * [1, None, start_ns, owner, None, None, None] in the ContextVar (PyContextVar_Set: a HAMT insert and a
 * token) before fn runs, and resets it (PyContextVar_Reset) when the attempt ends. So every context copied
 * during the attempt -- the task of an asyncio.run() inside the retried function, a user's
 * contextvars.copy_context(), a thread started with a copied or inherited context, a Timeout's or a
 * ThreadPoolBulkhead's worker -- carries the attempt and its idempotency key from attempt 1 on.
 * (A lazily set context, materialised only on the first read, was tried and removed: a copy made before
 * anyone read it carried no attempt, so attempt 1 could go out without the key attempt 2 sends -- a
 * possible double charge. Correct keys beat the ~150 ns it saved: +34 over a bare call against +183.)
 * The success path, all in C: one clock read (in C for time.monotonic_ns) and its int, the state list (the
 * guard's spare one when it has one, see below), the set and the reset (two HAMT updates and a token: what
 * any ContextVar set/reset costs), the call, one atomic add.
 *
 * The spare list: a success whose state list nothing else references after the reset (refcount 1: no
 * reader kept it, no copied context outlived the call) parks it in the guard with an atomic exchange, and
 * the guard's next first attempt takes it back with an atomic exchange and refills the start and the owner
 * instead of allocating a list (a GC-tracked object and its item array). A list anything else still holds
 * is never reused; a failure never parks; racing threads and recursion find no spare and allocate. A
 * parked list holds only ints and None (key and owner cleared), so the guard's reference to it, which the
 * GC does not traverse, keeps nothing else alive. The guard releases its spare when it is freed.
 */
#ifndef BUTTRESS_ATTEMPT_H
#define BUTTRESS_ATTEMPT_H
#include <Python.h>
#include "buttress_atomic.h"
#include "buttress_guard.h"   /* BT_FETCH / BT_RESTORE, bt_not_initialised */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *fn;
    PyObject *owner;        /* stored in the state list at index 3 */
    PyObject *var;          /* the ContextVar holding the state */
    PyObject *counter;      /* an iterator advanced once per first-attempt success (AttemptCounter: in C) */
    PyObject *on_failure;   /* callable(state, fn, args, kwargs, exc, None) -> result */
    PyObject *clock_ns;     /* callable() -> int ns */
    int sysclock;           /* clock_ns is time.monotonic_ns: read it in C (bt_attempt_now) */
    int64_t spare;          /* (intptr_t) a parked state list (owned), or 0: only through bt_exchange */
} bt_attempt_head;

/* set once at import by buttress._core.guard (new references kept for the life of the process) */
static PyObject *bt_attempt_settle = NULL;
static int64_t (*bt_attempt_now)(void) = NULL;       /* the C monotonic clock (time.monotonic_ns) */
static PyObject *bt_attempt_one = NULL;              /* the int 1 (item 0 of a fresh state) */

static PyTypeObject *bt_attempt_counter_type = NULL;    /* AttemptCounter: bumped in C */
static void (*bt_attempt_counter_bump)(PyObject *) = NULL;

static void bt_attempt_set_counter(PyTypeObject *tp, void (*bump)(PyObject *))
{
    bt_attempt_counter_type = tp;
    bt_attempt_counter_bump = bump;
}

/* one success of a first attempt: an AttemptCounter's atomic add, else next(counter) */
static BT_GUARD_INLINE void bt_attempt_count(bt_attempt_head *g)
{
    PyObject *tmp;
    if (Py_TYPE(g->counter) == bt_attempt_counter_type) {
        bt_attempt_counter_bump(g->counter);
        return;
    }
    tmp = PyIter_Next(g->counter);
    Py_XDECREF(tmp);
}

static int bt_attempt_set_settle(PyObject *fn, int64_t (*now)(void))
{
    bt_attempt_one = PyLong_FromLong(1);
    if (bt_attempt_one == NULL)
        return -1;
    Py_XINCREF(fn);
    bt_attempt_settle = fn;
    bt_attempt_now = now;
    return 0;
}

/* The guard is being freed: release its spare list. */
static void bt_attempt_drop_spare(PyObject *self)
{
    PyObject *spare = (PyObject *)(intptr_t)bt_exchange(&((bt_attempt_head *)self)->spare, 0);
    Py_XDECREF(spare);
}

/* Item i of a list held by no one else: replaced by `v` (stolen), the old item released after the store. */
static BT_GUARD_INLINE void bt_att_put(PyObject *list, Py_ssize_t i, PyObject *v)
{
    PyObject *old = PyList_GET_ITEM(list, i);
    PyList_SET_ITEM(list, i, v);
    Py_DECREF(old);
}

/* The state [1, None, now, owner, None, None, None] (`now` stolen), or NULL with an exception. */
static BT_GUARD_INLINE PyObject *bt_attempt_state(bt_attempt_head *g, PyObject *now)
{
    PyObject *state = (PyObject *)(intptr_t)bt_exchange(&g->spare, 0);
    if (state != NULL) {               /* ours alone: [1, None, old start, None, None, None, None] */
        bt_att_put(state, 2, now);
        Py_INCREF(g->owner);
        bt_att_put(state, 3, g->owner);
        return state;
    }
    state = PyList_New(7);
    if (state == NULL) {
        Py_DECREF(now);
        return NULL;
    }
    Py_INCREF(bt_attempt_one); PyList_SET_ITEM(state, 0, bt_attempt_one);
    Py_INCREF(Py_None); PyList_SET_ITEM(state, 1, Py_None);
    PyList_SET_ITEM(state, 2, now);
    Py_INCREF(g->owner); PyList_SET_ITEM(state, 3, g->owner);
    Py_INCREF(Py_None); PyList_SET_ITEM(state, 4, Py_None);
    Py_INCREF(Py_None); PyList_SET_ITEM(state, 5, Py_None);
    Py_INCREF(Py_None); PyList_SET_ITEM(state, 6, Py_None);
    return state;
}

/* The attempt is over and the ContextVar reset: park `state` (owned) as the spare when `ok` (the first
 * attempt succeeded), nothing else references it and its other items are as a fresh state's; else
 * release it. A parked list holds no key (the last call's, maybe read: the next call is a new logical
 * call) and no owner: only ints and None, so the guard's untraversed reference to it can never keep a
 * cycle through the Retry alive. */
static BT_GUARD_INLINE void bt_attempt_park(bt_attempt_head *g, PyObject *state, int ok)
{
    PyObject *old;
    if (ok && Py_REFCNT(state) == 1 && PyList_GET_SIZE(state) == 7 && PyList_GET_ITEM(state, 0) == bt_attempt_one
            && PyList_GET_ITEM(state, 3) == g->owner && PyList_GET_ITEM(state, 4) == Py_None
            && PyList_GET_ITEM(state, 5) == Py_None && PyList_GET_ITEM(state, 6) == Py_None) {
        Py_INCREF(Py_None);
        bt_att_put(state, 1, Py_None);
        Py_INCREF(Py_None);
        bt_att_put(state, 3, Py_None); /* the guard holds the owner anyway: this is never its last reference */
        old = (PyObject *)(intptr_t)bt_exchange(&g->spare, (int64_t)(intptr_t)state);
        Py_XDECREF(old);               /* a racing or nested call of the same guard parked one meanwhile */
        return;
    }
    Py_DECREF(state);
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

/* fn's outcome, with `state` set in the ContextVar (borrowed): the result (after a lazy result's check and
 * the counter), or an Exception handed to on_failure (the retry loop), or NULL with the exception set. */
static PyObject *bt_attempt_outcome(bt_attempt_head *g, PyObject *res, PyObject *state, PyObject *const *args,
                                    Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *exc, *targs, *tkwargs = NULL;
    if (res != NULL) {
        bt_attempt_count(g);
        return res;
    }
    BT_FETCH(exc);
    if (exc == NULL) {
        PyErr_SetString(PyExc_SystemError, "retried callable returned NULL without an exception");
        return NULL;
    }
    if (!PyObject_TypeCheck(exc, (PyTypeObject *)PyExc_Exception)) {
        BT_RESTORE(exc);                   /* cancellation and friends: not ours to retry */
        return NULL;
    }
    targs = bt_attempt_args(args, nargs, kwnames, &tkwargs);
    if (targs == NULL) {
        Py_DECREF(exc);
        return NULL;
    }
    PyList_SetItem(state, 4, targs);       /* steals */
    Py_INCREF(tkwargs);
    PyList_SetItem(state, 5, tkwargs);
    res = PyObject_CallFunctionObjArgs(g->on_failure, state, g->fn, targs, tkwargs, exc, Py_None, NULL);
    Py_DECREF(tkwargs);
    Py_DECREF(exc);
    return res;
}

/* Reset the ContextVar to before `token` (owned: released), keeping a pending exception; res is the call's
 * outcome (owned), returned, or NULL when the reset itself failed on a success. */
static PyObject *bt_attempt_reset(bt_attempt_head *g, PyObject *token, PyObject *res)
{
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
    return res;
}

/* fn(*args) and, for a lazy result, the settle check (NULL: refused, the TypeError set; not retried) */
static BT_GUARD_INLINE PyObject *bt_attempt_run(bt_attempt_head *g, PyObject *const *args, size_t nargsf,
                                                PyObject *kwnames, int *refused)
{
    PyObject *res = PyObject_Vectorcall(g->fn, args, nargsf, kwnames), *tmp;
    *refused = 0;
    if (res != NULL && bt_guard_lazy(Py_TYPE(res)) && bt_attempt_settle != NULL) {
        tmp = PyObject_CallFunctionObjArgs(bt_attempt_settle, g->owner, g->fn, res, NULL);
        Py_DECREF(res);
        res = tmp;
        *refused = res == NULL;
    }
    return res;
}

static PyObject *bt_attempt_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    bt_attempt_head *g = (bt_attempt_head *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *now, *state, *token, *res;
    int refused, ok;

    if (g->fn == NULL || g->owner == NULL || g->var == NULL || g->counter == NULL || g->on_failure == NULL
            || g->clock_ns == NULL)
        return bt_not_initialised(self);      /* __init__ never ran: nothing to call */
    if (g->sysclock && bt_attempt_now != NULL)
        now = PyLong_FromLongLong(bt_attempt_now());   /* the one clock read, in C */
    else
        now = PyObject_CallNoArgs(g->clock_ns);
    if (now == NULL)
        return NULL;
    state = bt_attempt_state(g, now);
    if (state == NULL)
        return NULL;
    token = PyContextVar_Set(g->var, state);
    if (token == NULL) {
        Py_DECREF(state);
        return NULL;
    }
    res = bt_attempt_run(g, args, nargsf, kwnames, &refused);
    ok = res != NULL;
    if (!refused)
        res = bt_attempt_outcome(g, res, state, args, nargs, kwnames);
    res = bt_attempt_reset(g, token, res);
    bt_attempt_park(g, state, ok && res != NULL);
    return res;
}
#endif /* BUTTRESS_ATTEMPT_H */
