"""Typing: py.typed, a .pyi stub beside every compiled module that matches its pure-Python twin (and,
through mypy's stubtest, the compiled module itself), `mypy --strict` over a usage sample of the public
API, and the version's single source of truth.

The mypy checks run on a copy of the installed package (its .py files, py.typed and the _core stubs) in a
temporary directory, so they see what a user's type checker sees whether buttress is installed from a
wheel or in editable mode (whose import hook mypy cannot follow).
"""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import buttress
from buttress import _impl

HERE = Path(__file__).resolve().parent
PKG_DIR = Path(buttress.__file__).resolve().parent
_CORE_SPEC = importlib.util.find_spec("buttress._core")
# the stubs' package, src/buttress/_core (None only if buttress._core is missing altogether)
CORE_DIR = Path(_CORE_SPEC.submodule_search_locations[0]).resolve() if _CORE_SPEC else None
needs_core_dir = pytest.mark.skipif(CORE_DIR is None, reason="buttress._core (the stubs' package) is not importable")

# dunder methods whose signatures are part of a core class's API
DUNDERS = {"__init__", "__call__", "__len__", "__get__", "__enter__", "__exit__"}
# twin constructors the compiled class does not offer to Python (objects made by the core itself)
INTERNAL_INIT = {("breaker", "Permit"), ("breaker", "Guarded")}


def _mypy_available() -> bool:
    return importlib.util.find_spec("mypy") is not None


needs_mypy = pytest.mark.skipif(not _mypy_available(), reason="mypy is not installed (pip install 'buttress[test]')")


# -- the stubs against the twins -------------------------------------------------------------------------
def _stub(name: str) -> ast.Module:
    path = CORE_DIR / f"{name}.pyi"
    assert path.exists(), f"no stub {path} for the compiled module buttress._core.{name}"
    return ast.parse(path.read_text(), filename=str(path))


def _stub_members(cls: ast.ClassDef) -> dict[str, ast.AST]:
    """name -> FunctionDef (a method) or AnnAssign / property FunctionDef (data)."""
    out: dict[str, ast.AST] = {}
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


def _is_property(node: ast.AST) -> bool:
    return isinstance(node, ast.FunctionDef) and any(
        isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list)


def _twin_members(cls: type) -> dict[str, str]:
    """Public names (and DUNDERS) of a twin class -> "method" or "data", from its MRO and the
    attributes its methods assign on self."""
    out: dict[str, str] = {}
    for klass in cls.__mro__[:-1]:
        for name, value in vars(klass).items():
            if (name.startswith("_") and name not in DUNDERS) or name in out:
                continue
            fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            out[name] = "method" if inspect.isfunction(fn) else "data"
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                    and isinstance(node.value, ast.Name) and node.value.id == "self"
                    and not node.attr.startswith("_")):
                out.setdefault(node.attr, "data")
    return out


_MISSING = object()


def _stub_params(fn: ast.FunctionDef) -> list[tuple[str, inspect._ParameterKind, object]]:
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    defaults: list[object] = [_MISSING] * (len(positional) - len(a.defaults)) + list(a.defaults)
    out = [(p.arg, inspect.Parameter.POSITIONAL_ONLY if i < len(a.posonlyargs)
            else inspect.Parameter.POSITIONAL_OR_KEYWORD, d)
           for i, (p, d) in enumerate(zip(positional, defaults))]
    if a.vararg:
        out.append((a.vararg.arg, inspect.Parameter.VAR_POSITIONAL, _MISSING))
    out += [(p.arg, inspect.Parameter.KEYWORD_ONLY, _MISSING if d is None else d)
            for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        out.append((a.kwarg.arg, inspect.Parameter.VAR_KEYWORD, _MISSING))
    return out


def _check_signature(where: str, stub_fn: ast.FunctionDef, twin_fn: object) -> None:
    stub = _stub_params(stub_fn)
    twin = list(inspect.signature(twin_fn).parameters.values())   # type: ignore[arg-type]
    assert [n for n, _, _ in stub] == [p.name for p in twin], f"{where}: parameter names differ"
    for (name, kind, default), p in zip(stub, twin):
        # a positional-only dunder parameter in the stub (as the compiled slot wrapper has it) is fine
        ok_kind = kind == p.kind or (kind == inspect.Parameter.POSITIONAL_ONLY and stub_fn.name in DUNDERS)
        assert ok_kind, f"{where}: {name} is {kind.description} in the stub, {p.kind.description} in the twin"
        assert (default is _MISSING) == (p.default is inspect.Parameter.empty), \
            f"{where}: {name} has a default in only one of stub and twin"
        if default is not _MISSING and not (isinstance(default, ast.Constant) and default.value is Ellipsis):
            assert ast.literal_eval(default) == p.default, f"{where}: default of {name} differs"   # type: ignore[arg-type]
        if name not in ("self", "cls"):
            assert stub_fn.args and _annotation(stub_fn, name) is not None, f"{where}: {name} is not annotated"
    assert stub_fn.returns is not None, f"{where}: no return annotation"


def _annotation(fn: ast.FunctionDef, name: str) -> ast.expr | None:
    a = fn.args
    for p in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg):
        if p is not None and p.arg == name:
            return p.annotation
    return None


@needs_core_dir
def test_every_core_module_has_a_stub_and_the_package_is_typed():
    assert (PKG_DIR / "py.typed").exists()
    missing = [n for n in _impl.CORE_MODULES if not (CORE_DIR / f"{n}.pyi").exists()]
    assert not missing, f"compiled modules without a .pyi stub in {CORE_DIR}: {missing}"


@needs_core_dir
@pytest.mark.parametrize("name", _impl.CORE_MODULES)
def test_stub_matches_the_twin(name):
    twin = _impl.twin(name)
    tree = _stub(name)
    stub_all = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets))
    assert sorted(stub_all) == sorted(twin.__all__)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    constants = {n.target.id: n for n in tree.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    for export in twin.__all__:
        value = getattr(twin, export)
        if not isinstance(value, type):
            assert export in constants, f"{name}.{export} is not declared in the stub"
            assert ast.unparse(constants[export].annotation) == type(value).__name__, f"{name}.{export}"
            continue
        assert export in classes, f"class {name}.{export} is not in the stub"
        stub = _stub_members(classes[export])
        twin_members = _twin_members(value)
        public_stub = {n for n in stub if not n.startswith("_") or n in DUNDERS}
        expected = set(twin_members)
        if (name, export) in INTERNAL_INIT:
            expected.discard("__init__")
        assert public_stub == expected, (f"{name}.{export}: only in stub {sorted(public_stub - expected)}, "
                                         f"only in twin {sorted(expected - public_stub)}")
        for member in sorted(public_stub):
            node, kind = stub[member], twin_members[member]
            where = f"{name}.{export}.{member}"
            if kind == "data":
                assert isinstance(node, ast.AnnAssign) or _is_property(node), f"{where} is data in the twin"
                if _is_property(node):
                    assert node.returns is not None, f"{where}: no type"    # type: ignore[union-attr]
            else:
                assert isinstance(node, ast.FunctionDef) and not _is_property(node), f"{where} is a method in the twin"
                _check_signature(where, node, getattr(value, member))


def test_lazy_exports_are_visible_to_type_checkers():
    """Every name buttress.__getattr__ serves lazily is imported under TYPE_CHECKING as `X as X`."""
    tree = ast.parse((PKG_DIR / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    reexported = {a.asname for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names
                  if a.asname == a.name}
    missing = (set(buttress._LAZY) | set(buttress._SUBMODULES)) - reexported
    assert not missing, f"add to the TYPE_CHECKING block of buttress/__init__.py: {sorted(missing)}"


# -- mypy ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def typed_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package as a type checker sees it: buttress/*.py, py.typed, buttress/_core/*.pyi."""
    root = tmp_path_factory.mktemp("typed") / "tree"
    shutil.copytree(PKG_DIR, root / "buttress", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "_core"))
    core = root / "buttress" / "_core"
    core.mkdir()
    for path in [*CORE_DIR.glob("*.pyi"), CORE_DIR / "__init__.py"]:
        shutil.copy(path, core)
    return root


def _mypy(args: list[str], cwd: Path, mypypath: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYPYPATH": str(mypypath)}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@needs_mypy
@needs_core_dir
def test_public_api_sample_passes_mypy_strict(typed_tree: Path, tmp_path: Path):
    sample = HERE / "typing_sample.py"
    r = _mypy(["mypy", "--config-file=", "--strict", "--follow-imports=silent", "--no-incremental",
               f"--cache-dir={tmp_path / 'cache'}", str(sample)], tmp_path, typed_tree)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success" in r.stdout


@needs_mypy
@needs_core_dir
def test_package_passes_mypy_strict(typed_tree: Path, tmp_path: Path):
    """The whole package (facade, twins and the _core stubs) is clean under `mypy --strict`."""
    r = _mypy(["mypy", "--config-file=", "--strict", "--no-incremental", f"--cache-dir={tmp_path / 'cache'}",
               "-p", "buttress"], tmp_path, typed_tree)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success" in r.stdout


@needs_mypy
def test_installed_package_is_found_by_a_users_mypy(tmp_path: Path):
    """A user's program outside the tree, checked by `mypy --strict` with no MYPYPATH: mypy must find the
    installed package (wheel, or the editable install's static path: src/buttress with the _core stubs
    beside the extension modules -- an import-hook editable finder would hide it: "module not found")."""
    prog = tmp_path / "user_program.py"
    prog.write_text(textwrap.dedent("""
        import buttress
        from buttress import CircuitBreaker, TokenBucket

        cb = CircuitBreaker(failure_threshold=5, success_threshold=2, open_duration=30.0)
        bucket = TokenBucket(rate=10.0, capacity=10)

        @cb
        def charge(order_id: str, cents: int) -> bool:
            return cents > 0

        ok: bool = charge("o-1", 100)
        state: buttress.State = cb.state
        granted: bool = bucket.try_acquire()
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    r = subprocess.run([sys.executable, "-m", "mypy", "--config-file=", "--strict", "--no-incremental",
                        f"--cache-dir={tmp_path / 'cache'}", str(prog)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success" in r.stdout


def test_public_api_sample_runs():
    """The sample is real code: it runs (on FakeClock, at once) under the active implementation."""
    r = subprocess.run([sys.executable, str(HERE / "typing_sample.py")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


STUBTEST_ALLOWLIST = """
# pickling helpers Cython adds to classes without __init__
buttress\\._core\\..*\\.__(reduce|setstate)_cython__
# introspection hook of the compiled guard (the twin has none)
buttress\\._core\\.breaker\\.Guarded\\.__wrapped_core__
"""


@needs_mypy
@needs_core_dir
def test_stubs_match_the_compiled_modules(typed_tree: Path, tmp_path: Path):
    """mypy's stubtest imports each compiled module and checks the stub against what it really has."""
    try:
        for name in _impl.CORE_MODULES:
            _impl.compiled(name)
    except ImportError as exc:
        pytest.skip(f"compiled core not importable: {exc}")
    allow = tmp_path / "allowlist.txt"
    allow.write_text(STUBTEST_ALLOWLIST)
    config = tmp_path / "mypy.ini"   # the facade's own mypy errors are not the stubs' business
    config.write_text("[mypy]\n[mypy-buttress.*]\nignore_errors = True\n[mypy-buttress._core.*]\nignore_errors = False\n")
    help_text = _mypy(["mypy.stubtest", "--help"], tmp_path, typed_tree).stdout
    flags = ["--ignore-disjoint-bases"] if "--ignore-disjoint-bases" in help_text else []
    r = _mypy(["mypy.stubtest", *flags, "--mypy-config-file", str(config), "--allowlist", str(allow),
               *(f"buttress._core.{n}" for n in _impl.CORE_MODULES)], tmp_path, typed_tree)
    assert r.returncode == 0, r.stdout + r.stderr


# -- version ---------------------------------------------------------------------------------------------
def test_version_is_the_distribution_version():
    try:
        dist = importlib.metadata.version("buttress")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("buttress is imported from a source tree, not installed")
    assert buttress.__version__ == dist
    from buttress._version import __version__
    assert buttress.__version__ is __version__
