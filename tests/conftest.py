"""Every core test runs against both implementations through the `impl` fixture."""
from __future__ import annotations

import faulthandler
import os
import sys
from types import ModuleType

import pytest

from buttress import _impl

NO_EXT = _impl._flag("BUTTRESS_NO_EXTENSIONS")
REQUIRE_EXT = _impl._flag("BUTTRESS_REQUIRE_EXTENSIONS") and not NO_EXT


class Impl:
    """Gives the core modules of one implementation: impl.gcra.GCRA, impl.window.CountWindow, ..."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __getattr__(self, name: str) -> ModuleType:
        if name not in _impl.CORE_MODULES:
            raise AttributeError(name)
        return _impl.compiled(name) if self.kind == "cython" else _impl.twin(name)

    def __repr__(self) -> str:
        return f"Impl({self.kind})"


def _compiled_available() -> bool:
    try:
        for name in _impl.CORE_MODULES:
            _impl.compiled(name)
        return True
    except ImportError:
        return False


@pytest.fixture(params=["cython", "python"])
def impl(request: pytest.FixtureRequest) -> Impl:
    if request.param == "cython":
        if NO_EXT:
            pytest.skip("BUTTRESS_NO_EXTENSIONS is set")
        if not _compiled_available():
            if REQUIRE_EXT:
                pytest.fail("BUTTRESS_REQUIRE_EXTENSIONS is set but the compiled core does not import")
            pytest.skip("compiled core not built")
    return Impl(request.param)


@pytest.fixture(scope="session")
def both() -> tuple[Impl, Impl]:
    """(compiled, twin) for differential tests."""
    if NO_EXT or not _compiled_available():
        pytest.skip("needs the compiled core")
    return Impl("cython"), Impl("python")


@pytest.fixture
def fast_switching():
    """Make the GIL switch threads as often as possible, to expose races."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


# A hang (a spin with the GIL held, a lost wake-up) must end the run with every thread's stack, not stall
# CI until its time limit: any single test that runs longer than this dumps tracebacks and exits.
HANG_TIMEOUT = float(os.environ.get("BUTTRESS_TEST_HANG_TIMEOUT", "300"))


@pytest.fixture(autouse=True)
def _hang_guard():
    faulthandler.dump_traceback_later(HANG_TIMEOUT, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_report_header(config: pytest.Config) -> str:
    import buttress
    return (f"buttress {buttress.__version__}: IMPLEMENTATION={buttress.IMPLEMENTATION} "
            f"(NO_EXTENSIONS={os.environ.get('BUTTRESS_NO_EXTENSIONS', '')!r}, "
            f"REQUIRE_EXTENSIONS={os.environ.get('BUTTRESS_REQUIRE_EXTENSIONS', '')!r})")
