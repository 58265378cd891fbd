"""The compiled admit/release guard and its twin."""
import inspect
import threading

import pytest

from helpers import race


class Gate:
    def __init__(self, permits):
        self.free, self.log, self.lock = permits, [], threading.Lock()
        self.waiting = []

    def acquire(self):
        with self.lock:
            if self.free > 0:
                self.free -= 1
                return True
            return False

    def refuse(self):
        self.log.append("refused")
        raise RuntimeError("full")

    def release(self):
        with self.lock:
            self.free += 1


def test_admits_calls_and_releases(impl):
    gate = Gate(1)
    g = impl.guard.StageGuard(lambda x, y=0: x + y, gate.acquire, gate.refuse, gate.release)
    assert g(1, y=2) == 3 and gate.free == 1


def test_refusal_raises_and_does_not_release(impl):
    gate = Gate(0)
    g = impl.guard.StageGuard(lambda: "ran", gate.acquire, gate.refuse, gate.release)
    with pytest.raises(RuntimeError, match="full"):
        g()
    assert gate.free == 0 and gate.log == ["refused"]


def test_refuse_may_admit_after_waiting(impl):
    gate = Gate(0)
    g = impl.guard.StageGuard(lambda: "ran", gate.acquire, lambda: gate.log.append("waited"), gate.release)
    assert g() == "ran" and gate.log == ["waited"] and gate.free == 1


def test_exception_passes_through_unchanged_and_releases(impl):
    gate = Gate(1)
    err = KeyError("k")

    def boom():
        raise err

    g = impl.guard.StageGuard(boom, gate.acquire, gate.refuse, gate.release)
    with pytest.raises(KeyError) as info:
        g()
    assert info.value is err and gate.free == 1
    assert info.traceback[-1].name == "boom"


def test_drain_runs_only_when_something_is_pending(impl):
    gate, drained, pending = Gate(1), [], []
    g = impl.guard.StageGuard(lambda: 1, gate.acquire, gate.refuse, gate.release, pending,
                              lambda: drained.append(pending.pop()))
    g()
    assert drained == []
    pending.append("waiter")
    g()
    assert drained == ["waiter"] and pending == []


def test_binds_like_a_function(impl):
    gate = Gate(5)

    class Service:
        def work(self, k):
            return (self, k)

    Service.work = impl.guard.StageGuard(Service.work, gate.acquire, gate.refuse, gate.release)
    s = Service()
    assert s.work(3) == (s, 3) and gate.free == 5


def test_bad_arguments(impl):
    with pytest.raises(TypeError, match="acquire must be callable"):
        impl.guard.StageGuard(print, None, print)
    with pytest.raises(TypeError, match="release must be callable or None"):
        impl.guard.StageGuard(print, print, print, 3)
    with pytest.raises(TypeError, match="pending and drain go together"):
        impl.guard.StageGuard(print, print, print, None, [], None)


def test_racing_threads_never_exceed_the_permits(impl, fast_switching):
    gate, inside, peak, lock = Gate(3), [0], [0], threading.Lock()

    def body():
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        with lock:
            inside[0] -= 1

    def refuse():
        raise RuntimeError("full")

    g = impl.guard.StageGuard(body, gate.acquire, refuse, gate.release)

    def run(i):
        ok = 0
        for _ in range(2000):
            try:
                g()
                ok += 1
            except RuntimeError:
                pass
        return ok

    assert sum(race(8, run)) > 0
    assert peak[0] <= 3 and gate.free == 3


def test_compiled_permits_are_used_directly(impl):
    p = impl.permits.Permits(2)
    g = impl.guard.StageGuard(lambda: p.in_use, p.try_acquire, lambda: (_ for _ in ()).throw(RuntimeError("full")),
                              p.release)
    assert g() == 1 and p.in_use == 0
    p.try_acquire(2)
    with pytest.raises(RuntimeError, match="full"):
        g()
    assert p.in_use == 2


def test_stage_base_gives_a_with_block(impl):
    p = impl.permits.Permits(1)

    def refuse():
        raise RuntimeError("full")

    class Limited(impl.guard.StageBase):
        def __init__(self):
            self._stage_setup(p.try_acquire, refuse, p.release)

    lim = Limited()
    with lim as got:
        assert got is lim and p.in_use == 1
        with pytest.raises(RuntimeError, match="full"):
            with lim:
                pass
    assert p.in_use == 0
    with pytest.raises(KeyError):
        with lim:
            raise KeyError("x")
    assert p.in_use == 0
    assert lim._stage_guard(lambda: p.in_use)() == 1


def test_stage_base_requires_setup(impl):
    class Bare(impl.guard.StageBase):
        pass

    with pytest.raises(RuntimeError, match="_stage_setup"):
        Bare()._stage_guard(print)


# -- AttemptGuard: the first attempt of a retried call ------------------------------------------------

import asyncio  # noqa: E402
import contextvars  # noqa: E402
import itertools  # noqa: E402

_STATE = contextvars.ContextVar("test_attempt_state", default=None)


def _attempt(impl, fn, on_failure=None):
    counter = itertools.count()
    seen = []

    def fail_over(state, fn_, args, kwargs, exc, result):
        seen.append((list(state), fn_, args, kwargs, exc, result, _STATE.get() is state))
        return "recovered"

    g = impl.guard.AttemptGuard(fn, "owner", _STATE, counter, on_failure or fail_over, lambda: 42)
    return g, counter, seen


def test_attempt_success_sets_state_and_counts(impl):
    var = impl.guard.AttemptVar(_STATE)
    inside = []
    g, counter, seen = _attempt(impl, lambda x, y=1: inside.append(list(var.get())) or x + y)
    assert g(1, y=2) == 3
    assert inside == [[1, None, 42, "owner", None, None, None]]
    assert _STATE.get() is None and var.get() is None and next(counter) == 1 and seen == []


def test_attempt_state_is_set_eagerly_so_every_copy_made_during_the_attempt_carries_it(impl):
    # issue 16: a lazily set state (materialised on first read) was missing from copies made before any
    # read -- attempt 1 sent no idempotency key, attempt 2 did. The variable itself is set in every case.
    import threading
    inside, tasks = [], []

    async def task_reads():
        return _STATE.get()

    def body():
        raw = _STATE.get()                                      # the variable itself, nobody asked before
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            in_task = asyncio.run(task_reads())                 # the task copies the context at creation
        else:
            tasks.append(loop.create_task(task_reads()))        # (awaited by main after the attempt)
            in_task = raw
        in_copy = contextvars.copy_context().run(_STATE.get)
        ctx, box = contextvars.copy_context(), []
        t = threading.Thread(target=lambda: box.append(ctx.run(_STATE.get)))
        t.start()
        t.join()
        inside.append([x if x is None else list(x) for x in (raw, in_task, in_copy, box[0])])
        return "ok"

    g, counter, seen = _attempt(impl, body)
    state = [1, None, 42, "owner", None, None, None]
    assert g() == "ok" and inside == [[state] * 4] and _STATE.get() is None

    async def main():
        return g(), await tasks[0]                              # inside Context.run: the same

    inside.clear()
    ok, in_task = asyncio.run(main())
    assert ok == "ok" and inside == [[state] * 4] and list(in_task) == state
    inside.clear()
    assert contextvars.copy_context().run(g) == "ok" and inside == [[state] * 4]
    assert _STATE.get() is None and next(counter) == 3


def test_attempt_state_is_fresh_per_call_and_a_kept_state_is_never_reused(impl):
    # the compiled guard reuses a success's state list that nothing else holds: a key written by one call
    # (current_attempt() stores the key it makes at index 1) never leaks into the next, and a list someone
    # kept (a copied context that outlives the call, a reference) is never refilled under them
    kept, ctxs = [], []

    def body(keep):
        st = _STATE.get()
        assert st[1] is None and st[2] == 42                   # a new logical call: no key yet
        st[1] = f"key-{len(kept)}"                             # as _make_key does
        if keep == "list":
            kept.append(st)
        elif keep == "context":
            ctxs.append(contextvars.copy_context())
            kept.append(None)
        else:
            kept.append(None)
        return st[1]

    g, counter, seen = _attempt(impl, body)
    assert [g(k) for k in ("none", "none", "list", "none", "context", "none", "none")] == [
        f"key-{i}" for i in range(7)]
    assert kept[2] == [1, "key-2", 42, "owner", None, None, None]          # untouched by later calls
    assert ctxs[0].run(_STATE.get) == [1, "key-4", 42, "owner", None, None, None]
    assert _STATE.get() is None and next(counter) == 7 and seen == []

    def recurse(n):
        st = _STATE.get()
        assert st[1] is None
        st[1] = n
        inner = g2(n - 1) if n else []
        return inner + [list(st)]

    g2, counter2, _ = _attempt(impl, recurse)
    for _ in range(3):                          # nested calls of one guard: each its own list
        assert g2(3) == [[1, n, 42, "owner", None, None, None] for n in range(4)]


def test_a_guard_whose_first_attempts_succeeded_is_collected_with_its_owner_in_a_cycle(impl):
    # the compiled guard keeps a success's state list for its next call, through a reference the GC does
    # not see: the parked list must hold no owner (nor key), or an owner <-> guard cycle would never be freed
    import gc
    import weakref

    class Owner:
        pass

    def make():
        owner = Owner()
        g = impl.guard.AttemptGuard(lambda: _STATE.get()[3] is owner, owner, _STATE, itertools.count(),
                                    print, lambda: 42)
        owner.guard = g                         # owner -> guard -> owner (the guard's owner field)
        assert g() is True and g() is True      # the second call ran on the parked list: owner refilled
        return weakref.ref(owner)

    ref = make()
    gc.collect()
    assert ref() is None


def test_attempt_var_checks_its_variable(impl):
    with pytest.raises(TypeError, match="var must be a contextvars.ContextVar"):
        impl.guard.AttemptVar("nope")
    var = impl.guard.AttemptVar(_STATE)
    with pytest.raises(RuntimeError, match="already initialised"):
        var.__init__(_STATE)
    assert var.var is _STATE and var.get() is None and not hasattr(var, "materialize")
    token = var.set([5])
    assert var.get() == [5] and _STATE.get() == [5]
    var.reset(token)
    assert var.get() is None
    blank = impl.guard.AttemptVar.__new__(impl.guard.AttemptVar)
    with pytest.raises(RuntimeError, match="not initialised"):
        blank.get()


def test_attempt_failure_hands_over_with_args_and_state_set(impl):
    err = ConnectionError("down")

    def boom(a, b, *, c):
        raise err

    g, counter, seen = _attempt(impl, boom)
    assert g(1, 2, c=3) == "recovered"
    state, fn, args, kwargs, exc, result, var_set = seen[0]
    assert state == [1, None, 42, "owner", (1, 2), {"c": 3}, None]
    assert (fn, args, kwargs, exc, result, var_set) == (boom, (1, 2), {"c": 3}, err, None, True)
    assert exc.__context__ is None and _STATE.get() is None and next(counter) == 0


def test_attempt_base_exceptions_pass_through(impl):
    def interrupted():
        raise KeyboardInterrupt()

    g, counter, seen = _attempt(impl, interrupted)
    with pytest.raises(KeyboardInterrupt):
        g()
    assert seen == [] and _STATE.get() is None


def test_attempt_on_failure_may_raise(impl):
    def boom():
        raise ValueError("first")

    def give_up(state, fn, args, kwargs, exc, result):
        raise exc

    g, counter, seen = _attempt(impl, boom, give_up)
    with pytest.raises(ValueError, match="first"):
        g()
    assert _STATE.get() is None


def test_attempt_binds_and_validates(impl):
    class S:
        pass

    S.m = impl.guard.AttemptGuard(lambda self, k: (self, k), None, _STATE, itertools.count(),
                                  lambda *a: None, lambda: 0)
    s = S()
    assert s.m(5) == (s, 5)
    with pytest.raises(TypeError, match="var must be a contextvars.ContextVar"):
        impl.guard.AttemptGuard(print, None, "var", itertools.count(), print, print)
    with pytest.raises(TypeError, match="counter must be an iterator"):
        impl.guard.AttemptGuard(print, None, _STATE, 3, print, print)


# -- uninitialised objects: a clear RuntimeError, never a crash (compiled and twin alike) -------------

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

_NOT_INIT = "{} is not initialised: {} (a subclass must call super().__init__())"


def _run_isolated(impl, body):
    """Run body in a fresh interpreter (a crash there fails this test instead of killing the run)."""
    code = textwrap.dedent(f"""
        import importlib
        guard = importlib.import_module("buttress.{'_core' if impl.kind == 'cython' else '_twin'}.guard")
        permits = importlib.import_module("buttress.{'_core' if impl.kind == 'cython' else '_twin'}.permits")
    """) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    return proc.stdout


@pytest.mark.parametrize("case", [
    "guard.StageGuard.__new__(guard.StageGuard)()",
    "guard.StageGuard.__new__(guard.StageGuard).__call__()",
    "guard.AttemptGuard.__new__(guard.AttemptGuard)(1, k=2)",
    "guard.AttemptGuard.__new__(guard.AttemptGuard).__call__()",
    "type('S', (guard.StageGuard,), {'__init__': lambda self: None})()()",
    "type('S', (guard.AttemptGuard,), {'__init__': lambda self: None})()()",
    "guard.StageBase().__enter__()",
    "guard.StageBase().__exit__(None, None, None)",
    "guard.StageBase()._stage_guard(print)",
    "type('B', (guard.StageBase,), {'__init__': lambda self: None})().__enter__()",
    "m = type('S', (guard.StageGuard,), {'__init__': lambda self: None})(); "
    "import types; types.MethodType(m, 1)()",
])
def test_uninitialised_guards_raise_runtime_error(impl, case):
    out = _run_isolated(impl, f"""
        try:
            {case}
        except RuntimeError as exc:
            print(repr(exc))
        else:
            print("no error")
    """)
    name = "S" if "'S'" in case else "B" if "'B'" in case else case.split("(")[0].split(".")[1]
    what = "_stage_setup() was not called" if "StageBase" in case else "its __init__ was not called"
    assert out.strip() == repr(RuntimeError(_NOT_INIT.format(name, what)))


def test_guards_initialise_once(impl):
    gate = Gate(1)
    g = impl.guard.StageGuard(lambda: 1, gate.acquire, gate.refuse, gate.release)
    with pytest.raises(RuntimeError, match="^StageGuard is already initialised$"):
        g.__init__(lambda: 2, gate.acquire, gate.refuse, gate.release)
    assert g() == 1
    a = impl.guard.AttemptGuard(lambda: 1, None, _STATE, itertools.count(), print, lambda: 0)
    with pytest.raises(RuntimeError, match="^AttemptGuard is already initialised$"):
        a.__init__(lambda: 2, None, _STATE, itertools.count(), print, lambda: 0)
    assert a() == 1

    class Limited(impl.guard.StageBase):
        pass

    lim = Limited()
    lim._stage_setup(gate.acquire, gate.refuse, gate.release)
    with pytest.raises(RuntimeError, match="^Limited is already initialised: _stage_setup"):
        lim._stage_setup(gate.acquire, gate.refuse, gate.release)


def test_reinit_during_a_call_cannot_free_what_the_call_uses(impl):
    # the C entry borrows owner and fn for the length of the call: re-initialising inside the call used to
    # free them under it
    gate = Gate(1)
    box = []

    def fn():
        with pytest.raises(RuntimeError, match="already initialised"):
            box[0].__init__(lambda: None, gate.acquire, gate.refuse, gate.release)
        return "ok"

    box.append(impl.guard.StageGuard(fn, gate.acquire, gate.refuse, gate.release))
    assert box[0]() == "ok" and gate.free == 1


def test_an_uninitialised_permits_is_refused_as_a_stage(impl):
    p = impl.permits.Permits.__new__(impl.permits.Permits)
    with pytest.raises(RuntimeError, match="Permits is not initialised"):
        impl.guard.StageGuard(print, p.try_acquire, print, p.release)()


# -- one acquisition, one release: `with` records per thread ------------------------------------------


def _limited(impl, permits):
    def refuse():
        raise RuntimeError("full")

    class Limited(impl.guard.StageBase):
        def __init__(self):
            self._stage_setup(permits.try_acquire, refuse, permits.release)

    return Limited()


def test_second_exit_is_a_no_op_and_frees_no_other_holder(impl):
    p = impl.permits.Permits(2)
    lim = _limited(impl, p)
    entered, leave = threading.Event(), threading.Event()

    def other():
        with lim:
            entered.set()
            leave.wait(30)

    t = threading.Thread(target=other)
    t.start()
    assert entered.wait(30)
    with lim:
        assert lim._stage_held() == 1
    assert lim.__exit__(None, None, None) is False      # a second exit: used to free the other's permit
    assert p.in_use == 1 and lim._stage_held() == 0
    with lim:
        with pytest.raises(RuntimeError, match="full"):  # still exactly 2 at once
            with lim:
                pass
    leave.set()
    t.join(30)
    assert p.in_use == 0
    lim.__exit__(None, None, None)                       # nothing held at all: still a no-op
    assert p.in_use == 0


def test_nested_enters_in_one_thread_each_release_once(impl):
    p = impl.permits.Permits(3)
    lim = _limited(impl, p)
    lim.__enter__()
    lim.__enter__()
    assert p.in_use == 2 and lim._stage_held() == 2
    for _ in range(4):
        lim.__exit__(None, None, None)
    assert p.in_use == 0 and lim._stage_held() == 0


def test_more_stages_than_the_per_thread_table_still_release_exactly(impl):
    ps = [impl.permits.Permits(1) for _ in range(12)]      # the table holds 8: 4 are "floating"
    lims = [_limited(impl, p) for p in ps]
    for lim in lims:
        lim.__enter__()
    assert all(p.in_use == 1 for p in ps)
    for lim in lims:
        lim.__exit__(None, None, None)
        lim.__exit__(None, None, None)                     # second exits: no-ops
    assert all(p.in_use == 0 for p in ps)
    for lim in lims:                                       # and the table is clean afterwards
        with lim:
            pass
    assert all(p.in_use == 0 for p in ps)


def test_refused_enter_records_nothing(impl):
    p = impl.permits.Permits(1)
    lim = _limited(impl, p)
    p.try_acquire()
    with pytest.raises(RuntimeError, match="full"):
        lim.__enter__()
    assert lim._stage_held() == 0
    lim.__exit__(None, None, None)                         # not ours: the outside holder keeps it
    assert p.in_use == 1


def test_double_exits_racing_threads_never_exceed_the_limit(impl, fast_switching):
    p = impl.permits.Permits(3)
    lim = _limited(impl, p)
    inside, peak, lock = [0], [0], threading.Lock()

    def run(i):
        ok = 0
        for _ in range(500):
            try:
                with lim:
                    with lock:
                        inside[0] += 1
                        peak[0] = max(peak[0], inside[0])
                    with lock:
                        inside[0] -= 1
                ok += 1
            except RuntimeError:
                pass
            lim.__exit__(None, None, None)                 # a buggy caller exits twice
        return ok

    assert sum(race(8, run)) > 0
    assert peak[0] <= 3 and p.in_use == 0


def test_get_with_neither_instance_nor_owner_is_refused_alike(impl):
    gate = Gate(1)
    for g in (impl.guard.StageGuard(print, gate.acquire, gate.refuse),
              impl.guard.AttemptGuard(print, None, _STATE, itertools.count(), print, lambda: 0)):
        with pytest.raises(TypeError, match=r"^__get__\(None, None\) is invalid$"):
            g.__get__(None)
        assert g.__get__(None, type(g)) is g


def test_attempt_counter_counts_like_itertools_count_and_in_the_guard(impl):
    c = impl.guard.AttemptCounter()
    assert repr(c) == "count(0)" and iter(c) is c
    assert next(c) == 0 and next(c) == 1 and repr(c) == "count(2)"
    g = impl.guard.AttemptGuard(lambda x: x * 2, "owner", _STATE, c, lambda *a: "recovered", lambda: 42)
    assert [g(i) for i in range(5)] == [0, 2, 4, 6, 8]
    assert repr(c) == "count(7)"                        # one per success, in C for the compiled guard


def test_attempt_counter_is_exact_under_racing_threads(impl, fast_switching):
    c = impl.guard.AttemptCounter()
    g = impl.guard.AttemptGuard(lambda: None, "owner", _STATE, c, lambda *a: None, lambda: 42)

    def body(i):
        for _ in range(5000):
            g()
            next(c)
        return 0

    race(8, body)
    assert repr(c) == f"count({8 * 5000 * 2})"


def test_one_guard_in_racing_threads_never_shares_a_state_list(impl, fast_switching):
    # the compiled guard's parked state list is taken and parked by atomic exchanges: two calls racing on
    # one guard never run on the same list, and a key one call wrote never shows in another call
    lists = {}

    def body_of_call(tag):
        st = _STATE.get()
        assert st[1] is None and st[3] == "owner" and st[2] == 42
        st[1] = tag
        for _ in range(3):
            assert _STATE.get()[1] == tag       # a racing call refilling this list would change it
        return st[1]

    c = impl.guard.AttemptCounter()
    g = impl.guard.AttemptGuard(body_of_call, "owner", _STATE, c, lambda *a: "failed over", lambda: 42)

    def body(i):
        out = [g((i, j)) for j in range(2000)]
        lists[i] = out
        return sum(1 for j, tag in enumerate(out) if tag == (i, j))

    assert race(8, body) == [2000] * 8
    assert repr(c) == f"count({8 * 2000})" and _STATE.get() is None
