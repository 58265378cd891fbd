/* buttress_attempt.h -- the vectorcall entry of a retried call's first attempt.
 *
 * The first attempt of a logical call is the hot path: it calls fn with the caller's arguments unchanged,
 * and on success bumps a counter and returns. Only when fn raises an Exception does it build the args
 * tuple / kwargs dict and hand over to `on_failure(state, fn, args, kwargs, exc, None)` (the Python retry
 * loop), with the per-call state (a list [1, None, start_ns, owner, None, None, None]) set in the
 * ContextVar. BaseExceptions (cancellation, KeyboardInterrupt, ...) pass through untouched.
 * A successful result of a lazy type (bt_guard_lazy: an awaitable, a generator) is shown to
 * bt_attempt_settle(owner, fn, result) first, which raises the sync-form TypeError for an awaitable
 * (DESIGN §3c: the function was async) and returns the result otherwise; every other result costs two loads.
 *
 * The attempt context is materialised lazily. Setting the ContextVar (a HAMT insert, a token, and a
 * second HAMT update to reset it) was most of the success path's cost, and almost no call reads it. So
 * when the call runs in its thread's own context -- not inside Context.run(), which is where every asyncio
 * task and callback runs (a task created now would copy the context) -- the attempt only takes a slot in a small per-thread table: {sequence, the context it
 * runs in (identity), the guard, the start}. Whoever needs the state -- current_attempt(), the Python
 * paths that set or read the variable (AttemptVar.get / set, a Hedge), a Timeout before it copies the
 * context to its worker (_context.push_deadline), a failure -- calls bt_attempt_materialize() first: every
 * pending slot of the current context, oldest first, gets its list set in the ContextVar (so nesting
 * and copies made from then on are exactly as if it had been set at the start); the attempt resets the
 * variable when it ends. A slot is visible only in the context it was taken in (a ctx.run() of another
 * context, a greenlet with its own context, does not see it). Inside an entered context, or with the
 * table full, the ContextVar is set at once as before.
 * What is not covered: a context copied by user code with contextvars.copy_context() during a first
 * attempt outside an event loop, before anything materialised it, does not carry the attempt (read
 * current_attempt() before copying; buttress's own copies materialise first).
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
    int sysclock;           /* clock_ns is time.monotonic_ns: read it in C (bt_attempt_now) */
} bt_attempt_head;

/* set once at import by buttress._core.guard (new references kept for the life of the process) */
static PyObject *bt_attempt_settle = NULL;
static int64_t (*bt_attempt_now)(void) = NULL;       /* the C monotonic clock (time.monotonic_ns) */
static int bt_attempt_lazy_ok = 0;                   /* the context layout probe passed (bt_attempt_probe) */

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

static void bt_attempt_set_settle(PyObject *fn, int64_t (*now)(void))
{
    Py_XINCREF(fn);
    bt_attempt_settle = fn;
    bt_attempt_now = now;
}

/* Whether the current context is entered (Context.run: an asyncio task or callback, a trio task, a user's
 * ctx.run) or a thread's own base context (plain sync code). contextvars.Context's struct is not public
 * (Include/internal/pycore_context.h); its layout has been the same from 3.7 to 3.14: the head, ctx_prev,
 * ctx_vars, ctx_weakreflist, ctx_entered. It is read only after bt_attempt_probe() verified it on this
 * interpreter (a fresh Context reads 0, and 1 while it runs); otherwise every attempt takes the eager path.
 * One load -- asyncio._get_running_loop() calls getpid() whenever a loop runs (a system call per call). */
typedef struct {
    PyObject_HEAD
    void *ctx_prev;
    void *ctx_vars;
    PyObject *ctx_weakreflist;
    int ctx_entered;
} bt_ctx_layout;

static BT_GUARD_INLINE int bt_att_entered(PyObject *ctx)
{
    return ((bt_ctx_layout *)ctx)->ctx_entered != 0;
}

/* the probe's two steps: `outside` a fresh Context (not entered), then `inside` its run() (entered, current) */
static int bt_attempt_probe_step(PyObject *ctx, int inside)
{
    if (ctx == NULL || !PyContext_CheckExact(ctx))
        return 0;
    if (inside)
        return PyThreadState_GET()->context == ctx && ((bt_ctx_layout *)ctx)->ctx_entered == 1;
    return ((bt_ctx_layout *)ctx)->ctx_entered == 0;
}

/* ---- the per-thread table of first attempts not materialised yet ---- */
#define BT_ATT_SLOTS 32
typedef struct {
    int64_t seq;            /* 0: free; else the order the attempts started in (this thread) */
    PyObject *ctx;          /* the context the attempt runs in: compared by identity only */
    PyObject *guard;        /* the AttemptGuard (borrowed: its caller holds it for the call) */
    PyObject *state;        /* materialised: the state list (owned), else NULL */
    PyObject *token;        /* materialised: the ContextVar token (owned), else NULL */
    int64_t start;
} bt_att_slot;

typedef struct {
    int64_t seq;
    int used;               /* slots [0, used) may be taken */
    bt_att_slot slot[BT_ATT_SLOTS];
} bt_att_table;

static BT_GUARD_INLINE bt_att_table *bt_att_tls(void)
{
#if defined(_MSC_VER) && !defined(__clang__)
    static __declspec(thread) bt_att_table table;
#else
    static __thread bt_att_table table;
#endif
    return &table;
}

static BT_GUARD_INLINE PyObject *bt_att_context(void)
{
    return PyThreadState_GET()->context;    /* the current context (NULL before the thread made one) */
}

/* Set the state of slot s in its guard's ContextVar: 0, or -1 with an exception. */
static int bt_att_materialise_slot(bt_att_slot *s)
{
    bt_attempt_head *g = (bt_attempt_head *)s->guard;
    PyObject *state = PyList_New(7), *now, *token;
    if (state == NULL)
        return -1;
    now = PyLong_FromLongLong(s->start);
    if (now == NULL) {
        Py_DECREF(state);
        return -1;
    }
    PyList_SET_ITEM(state, 0, PyLong_FromLong(1));     /* a small int: cached, never NULL */
    Py_INCREF(Py_None); PyList_SET_ITEM(state, 1, Py_None);
    PyList_SET_ITEM(state, 2, now);
    Py_INCREF(g->owner); PyList_SET_ITEM(state, 3, g->owner);
    Py_INCREF(Py_None); PyList_SET_ITEM(state, 4, Py_None);
    Py_INCREF(Py_None); PyList_SET_ITEM(state, 5, Py_None);
    Py_INCREF(Py_None); PyList_SET_ITEM(state, 6, Py_None);
    token = PyContextVar_Set(g->var, state);
    if (token == NULL) {
        Py_DECREF(state);
        return -1;
    }
    s->state = state;
    s->token = token;
    return 0;
}

/* Materialise every pending attempt of the current context, oldest first: 0, or -1 with an exception. */
static int bt_attempt_materialize(void)
{
    bt_att_table *t = bt_att_tls();
    PyObject *ctx;
    int i;
    if (t->used == 0)
        return 0;
    ctx = bt_att_context();
    for (;;) {
        bt_att_slot *oldest = NULL;
        for (i = 0; i < t->used; i++) {
            bt_att_slot *s = &t->slot[i];
            if (s->seq != 0 && s->state == NULL && s->ctx == ctx && (oldest == NULL || s->seq < oldest->seq))
                oldest = s;
        }
        if (oldest == NULL)
            return 0;
        if (bt_att_materialise_slot(oldest) < 0)
            return -1;
    }
}

/* A free slot for an attempt in `ctx`, or NULL (table full: the caller sets the ContextVar at once). */
static BT_GUARD_INLINE bt_att_slot *bt_att_take(bt_att_table *t, PyObject *ctx, PyObject *guard, int64_t start)
{
    bt_att_slot *s = NULL;
    int i;
    for (i = 0; i < t->used; i++) {
        if (t->slot[i].seq == 0) {
            s = &t->slot[i];
            break;
        }
    }
    if (s == NULL) {
        if (t->used == BT_ATT_SLOTS)
            return NULL;
        s = &t->slot[t->used++];
    }
    s->seq = ++t->seq;
    s->ctx = ctx;
    s->guard = guard;
    s->state = NULL;
    s->token = NULL;
    s->start = start;
    return s;
}

static BT_GUARD_INLINE void bt_att_free(bt_att_table *t, bt_att_slot *s)
{
    s->seq = 0;
    s->ctx = s->guard = NULL;
    s->state = s->token = NULL;
    while (t->used > 0 && t->slot[t->used - 1].seq == 0)
        t->used--;
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
    PyObject *now, *state, *token, *res, *ctx;
    bt_att_slot *s = NULL;
    bt_att_table *t = NULL;
    int64_t start = 0;
    int refused, have_start = 0;

    if (g->fn == NULL || g->owner == NULL || g->var == NULL || g->counter == NULL || g->on_failure == NULL
            || g->clock_ns == NULL)
        return bt_not_initialised(self);      /* __init__ never ran: nothing to call */
    ctx = bt_att_context();
    now = NULL;
    if (ctx != NULL && bt_attempt_lazy_ok && bt_attempt_now != NULL && PyContext_CheckExact(ctx)) {
        if (!bt_att_entered(ctx)) {        /* plain sync code in its thread's own context: no task runs here */
            if (g->sysclock) {
                start = bt_attempt_now();
            }
            else {                         /* a clock= object: its reading as int64 ns (else: the eager path) */
                now = PyObject_CallNoArgs(g->clock_ns);
                if (now == NULL)
                    return NULL;
                start = PyLong_AsLongLong(now);
                if (start == -1 && PyErr_Occurred())
                    PyErr_Clear();
                else
                    Py_CLEAR(now);
            }
            if (now == NULL) {
                have_start = 1;
                t = bt_att_tls();
                s = bt_att_take(t, ctx, self, start);
            }
        }
    }
    if (s != NULL) {                       /* the lazy path: a slot, materialised only if someone asks */
        res = bt_attempt_run(g, args, nargsf, kwnames, &refused);
        if (res == NULL && !refused) {
            PyObject *exc;
            BT_FETCH(exc);
            if (exc != NULL && PyObject_TypeCheck(exc, (PyTypeObject *)PyExc_Exception)) {
                /* a failure: the retry loop runs with the state set (this attempt's and every older one) */
                int rc = bt_attempt_materialize();
                if (rc < 0 || s->state == NULL) {
                    if (rc == 0)
                        PyErr_SetString(PyExc_SystemError, "buttress: the attempt's slot was not materialised");
                    Py_DECREF(exc);       /* the failure to set the state wins: nothing can be retried */
                    goto lazy_done;
                }
            }
            if (exc != NULL)
                BT_RESTORE(exc);
            if (s->state != NULL) {
                res = bt_attempt_outcome(g, NULL, s->state, args, nargs, kwnames);
                goto lazy_done;
            }
            goto lazy_done;                /* a BaseException: passes through */
        }
        if (res != NULL)
            bt_attempt_count(g);
    lazy_done:
        token = s->token;
        state = s->state;
        bt_att_free(t, s);
        if (token != NULL)
            res = bt_attempt_reset(g, token, res);
        Py_XDECREF(state);
        return res;
    }

    /* the eager path: inside Context.run (a task created now copies the context), or the table is full */
    if (now == NULL && have_start) {       /* the table was full: the reading taken already */
        now = PyLong_FromLongLong(start);
        if (now == NULL)
            return NULL;
    }
    if (now == NULL)
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
    if (bt_attempt_materialize() < 0) {    /* older lazy attempts of this context first: nesting order */
        Py_DECREF(state);
        return NULL;
    }
    token = PyContextVar_Set(g->var, state);
    if (token == NULL) {
        Py_DECREF(state);
        return NULL;
    }
    res = bt_attempt_run(g, args, nargsf, kwnames, &refused);
    if (!refused)
        res = bt_attempt_outcome(g, res, state, args, nargs, kwnames);
    res = bt_attempt_reset(g, token, res);
    Py_DECREF(state);
    return res;
}
#endif /* BUTTRESS_ATTEMPT_H */
