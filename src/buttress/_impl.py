"""The ONE place that picks the compiled core or its pure-Python twins.

- ``BUTTRESS_NO_EXTENSIONS=1`` forces the twins (it wins over REQUIRE).
- ``BUTTRESS_REQUIRE_EXTENSIONS=1`` makes a failed compiled import an error (CI sets it).
- Otherwise the compiled core is used when it imports, the twins when it does not.

Facade modules never import ``buttress._core`` themselves; they call ``core("gcra")`` and get
either ``buttress._core.gcra`` or ``buttress._twin.gcra``, which export the same names.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["IMPLEMENTATION", "core", "twin", "compiled", "CORE_MODULES"]

# every compiled module and its twin; a parity test checks that each pair exports the same API
CORE_MODULES = ("gcra", "window", "permits", "state", "breaker", "guard", "keyed", "shared", "wlimit")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def twin(name: str) -> ModuleType:
    """The pure-Python twin of core module `name`."""
    return importlib.import_module(f"buttress._twin.{name}")


def compiled(name: str) -> ModuleType:
    """The compiled core module `name` (ImportError if it is not built)."""
    return importlib.import_module(f"buttress._core.{name}")


def _choose() -> tuple[str, str | None]:
    if _flag("BUTTRESS_NO_EXTENSIONS"):
        return "python", "BUTTRESS_NO_EXTENSIONS is set"
    try:
        for name in CORE_MODULES:
            compiled(name)
    except ImportError as exc:
        if _flag("BUTTRESS_REQUIRE_EXTENSIONS"):
            raise ImportError(
                f"BUTTRESS_REQUIRE_EXTENSIONS is set but the compiled core did not import: {exc}. "
                "Build it with `pip install -e .` (needs a C compiler and Cython 3)") from exc
        return "python", f"compiled core not importable: {exc}"
    return "cython", None


IMPLEMENTATION, WHY_PYTHON = _choose()


def core(name: str) -> ModuleType:
    """Core module `name` in the implementation chosen for this process."""
    return compiled(name) if IMPLEMENTATION == "cython" else twin(name)
