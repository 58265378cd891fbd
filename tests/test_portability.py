"""Portability facts the wheels rely on."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import pytest

from buttress import _impl


@pytest.mark.skipif(not sysconfig.get_config_var("Py_GIL_DISABLED"), reason="not a free-threaded CPython")
def test_compiled_core_keeps_the_gil_off_on_free_threaded_python():
    """Every compiled module declares freethreading_compatible: importing them must not turn the GIL
    back on (CPython re-enables it, with a warning, for a module that does not declare support)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    code = ("import sys; from buttress import _impl\n"
            "for n in _impl.CORE_MODULES: _impl.compiled(n)\n"
            "print(sys._is_gil_enabled())")
    r = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0 and "ImportError" in r.stderr and not _impl._flag("BUTTRESS_REQUIRE_EXTENSIONS"):
        pytest.skip("compiled core not built")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
