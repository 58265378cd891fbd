"""The compiled core and its twins export the same names and signatures."""
import inspect

import pytest

from buttress import _impl

EXAMPLES = {
    "GCRA": dict(rate=10.0, capacity=5),
    "CountWindow": dict(size=10),
    "TimeWindow": dict(nbuckets=3, width_ns=1000),
    "Permits": dict(max_permits=2),
    "BreakerState": dict(now=0),
    "BreakerCore": dict(name="parity"),
    "KeyedGCRA": dict(rate=10.0, capacity=5, max_keys=100),
}


def _params(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def _public(obj):
    return {n for n in dir(obj) if not n.startswith("_")}


@pytest.mark.parametrize("name", _impl.CORE_MODULES)
def test_same_module_exports(both, name):
    compiled, twin = (getattr(i, name) for i in both)
    assert sorted(compiled.__all__) == sorted(twin.__all__)
    for export in compiled.__all__:
        c, t = getattr(compiled, export), getattr(twin, export)
        assert type(c) is type(t) or (isinstance(c, type) and isinstance(t, type)), export


@pytest.mark.parametrize("name", _impl.CORE_MODULES)
def test_same_class_api(both, name):
    compiled, twin = (getattr(i, name) for i in both)
    for export in compiled.__all__:
        c_cls, t_cls = getattr(compiled, export), getattr(twin, export)
        if not isinstance(c_cls, type):
            assert c_cls == t_cls, export
            continue
        if export not in EXAMPLES:
            # not constructible on its own (made by a factory method): compare the classes
            assert _public(c_cls) == _public(t_cls), export
            for attr in _public(c_cls):
                c_attr, t_attr = getattr(c_cls, attr), getattr(t_cls, attr)
                if callable(c_attr) and callable(t_attr):
                    assert _params(c_attr) == _params(t_attr), (export, attr)
            continue
        kwargs = EXAMPLES[export]
        c_obj, t_obj = c_cls(**kwargs), t_cls(**kwargs)   # same keyword names accepted
        assert _public(c_obj) == _public(t_obj), export
        for attr in _public(c_obj):
            c_attr, t_attr = getattr(c_obj, attr), getattr(t_obj, attr)
            assert callable(c_attr) == callable(t_attr), (export, attr)
            if callable(c_attr):
                assert _params(c_attr) == _params(t_attr), (export, attr)
            else:
                assert c_attr == t_attr, (export, attr)
        assert repr(c_obj) == repr(t_obj)
