"""The one switch between compiled core and twins."""
import os
import subprocess
import sys

import pytest

import buttress
from buttress import _impl


def _implementation(env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUTTRESS_")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", "import buttress; print(buttress.IMPLEMENTATION)"],
                         env=env, capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout.strip(), out.stderr


def test_implementation_is_reported():
    assert buttress.IMPLEMENTATION in ("cython", "python")
    if _impl._flag("BUTTRESS_NO_EXTENSIONS"):
        assert buttress.IMPLEMENTATION == "python"
    elif _impl._flag("BUTTRESS_REQUIRE_EXTENSIONS"):
        assert buttress.IMPLEMENTATION == "cython"


def test_no_extensions_wins_over_require():
    assert _implementation({"BUTTRESS_NO_EXTENSIONS": "1", "BUTTRESS_REQUIRE_EXTENSIONS": "1"})[:2] == (0, "python")


def test_require_fails_loudly_when_the_core_is_missing(tmp_path):
    # shadow buttress._core with an empty package so the compiled import fails
    fake = tmp_path / "sitecustomize.py"
    fake.write_text(
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.startswith('buttress._core.'):\n"
        "            raise ImportError('blocked for the test: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n")
    env = {"PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code, out, err = _implementation({**env, "BUTTRESS_REQUIRE_EXTENSIONS": "1"})
    assert code != 0 and "BUTTRESS_REQUIRE_EXTENSIONS is set but the compiled core did not import" in err
    code, out, err = _implementation(env)
    assert (code, out) == (0, "python")


def test_core_returns_the_chosen_module():
    mod = _impl.core("gcra")
    expected = "buttress._core.gcra" if buttress.IMPLEMENTATION == "cython" else "buttress._twin.gcra"
    assert mod.__name__ == expected


def test_lazy_exports_are_listed():
    assert "CircuitBreaker" in dir(buttress)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        buttress.nope
