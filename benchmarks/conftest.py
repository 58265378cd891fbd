"""Shared bits for the benchmark suites. Every suite has its floor cases in the same file."""
import pytest

from buttress import _impl


def _kinds():
    kinds = ["python"]
    if not _impl._flag("BUTTRESS_NO_EXTENSIONS"):
        try:
            for name in _impl.CORE_MODULES:
                _impl.compiled(name)
            kinds.insert(0, "cython")
        except ImportError:
            pass
    return kinds


@pytest.fixture(params=_kinds())
def core_kind(request):
    """'cython' or 'python': benchmark both implementations of the core side by side."""
    return request.param


def core_module(kind, name):
    return _impl.compiled(name) if kind == "cython" else _impl.twin(name)


def bare():
    """The floor: a bare Python call."""
    return None


def bare_pair(a=bare, b=bare):
    """The floor for two-call cases (acquire + release)."""
    a()
    b()
