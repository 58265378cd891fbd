#!/usr/bin/env bash
# The compiled core without the GIL: build buttress under a free-threaded CPython (3.13t) and run the
# core and breaker / limiter / bulkhead race tests with PYTHON_GIL=0. The GIL hides missing atomics (a
# core with every atomic replaced by a plain load / compare / store passes every thread test under it),
# so this is the run that can catch them. .ci/run calls it.
#
#   scripts/freethreaded.sh [--mutant] [pytest args...]
#
#   --mutant   the mutation check: swap every atomic in _core/include/buttress_atomic.h for a plain load,
#              compare and store (scripts/mutate_atomics.py), build that, and require the race tests to
#              FAIL (exit 0 when they fail, 1 when the mutant survives).
# Environment: BUTTRESS_FT_PYTHON (default: built by ../shared/tools/build-freethreaded-python.sh, ~15 min
# once, reused afterwards), BUTTRESS_FT_ROUNDS (default 1; the mutation check runs the suite this many
# times and counts failing rounds).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
mutant=0
if [ "${1:-}" = "--mutant" ]; then mutant=1; shift; fi
ft=${BUTTRESS_FT_PYTHON:-}
if [ -z "$ft" ]; then
    builder="$root/../shared/tools/build-freethreaded-python.sh"
    [ -x "$builder" ] || [ -f "$builder" ] || { echo "freethreaded: $builder not found" >&2; exit 2; }
    ft=$(bash "$builder" | tail -n 1)
fi
work=$(mktemp -d /tmp/buttress-ft.XXXXXX)
trap 'rm -rf "$work"' EXIT
# a copy of the tracked sources (and uncommitted edits of tracked files): the work tree's build is untouched
git ls-files -z --cached --others --exclude-standard | (cd "$root" && xargs -0 cp --parents -t "$work" 2>/dev/null || true)
mkdir -p "$work/run"
if [ $mutant = 1 ]; then
    "$ft" "$root/scripts/mutate_atomics.py" "$work/_core/include/buttress_atomic.h"
fi
"$ft" -m venv "$work/venv"
pip_q() { "$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; return "${PIPESTATUS[0]}"; }
# binary wheels only: the newest hypothesis ships native wheels without a cp313t build (its sdist needs Rust)
pip_q --only-binary=:all: "cython>=3.1" setuptools wheel pytest "hypothesis>=6.100" numpy
pip_q --no-build-isolation "$work"
cp -r "$work/tests" "$work/pyproject.toml" "$work/run/"
tests=(tests/test_portability.py tests/test_gcra.py tests/test_window.py tests/test_permits.py tests/test_state.py
       tests/test_keyed.py tests/test_guard.py tests/test_circuit_breaker.py tests/test_bulkhead.py
       tests/test_rate_limit.py tests/test_shedding.py tests/test_breaker_exactness.py
       tests/test_limiter_exactness.py tests/test_bulkhead_exactness.py tests/test_crash_safety.py)
files=()
for t in "${tests[@]}"; do [ -e "$work/run/$t" ] && files+=("$t"); done
export PYTHON_GIL=0 BUTTRESS_REQUIRE_EXTENSIONS=1
cd "$work/run"
"$work/venv/bin/python" -c 'import sys, buttress; assert not sys._is_gil_enabled(), "GIL is on"; print("free-threaded", sys.version.split()[0], buttress.IMPLEMENTATION)'
if [ $mutant = 0 ]; then
    exec "$work/venv/bin/python" -m pytest -q -p no:cacheprovider "${files[@]}" "$@"
fi
rounds=${BUTTRESS_FT_ROUNDS:-1}
failed=0
for i in $(seq "$rounds"); do
    if "$work/venv/bin/python" -m pytest -q -p no:cacheprovider -x --deselect tests/test_crash_safety.py \
            "${files[@]}" "$@" > "$work/round-$i.log" 2>&1; then
        echo "mutant round $i: survived (every race test passed)"
    else
        failed=$((failed + 1)); echo "mutant round $i: killed: $(grep -m1 -E '^(FAILED|ERROR)' "$work/round-$i.log" || tail -n 1 "$work/round-$i.log")"
    fi
done
echo "mutation check: the mutant was killed in $failed of $rounds rounds"
[ $failed -gt 0 ]
