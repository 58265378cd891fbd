#!/usr/bin/env bash
# Run the test suite on every pyenv CPython from 3.10 up that is installed here.
#
# For each version: a fresh venv, `pip install "<copy>[test]"` (a normal, isolated build of a temporary
# copy of the tree, so the in-tree src/buttress/_core/*.so that others use is never rebuilt), then pytest from a
# directory outside the source tree, once against the compiled core (BUTTRESS_REQUIRE_EXTENSIONS=1) and
# once against the pure-Python twins (BUTTRESS_NO_EXTENSIONS=1). A summary line per version and mode.
#
#   scripts/test_all_pythons.sh                     # 3.10 3.11 3.12 3.13, both modes
#   BUTTRESS_PYTHONS="3.10 3.13" scripts/test_all_pythons.sh -m "not slow"   # extra args go to pytest
#   BUTTRESS_MODES=compiled scripts/test_all_pythons.sh
# Logs: $BUTTRESS_PYTHONS_LOGS (default /tmp/buttress-pythons-logs), one per version and mode.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
pyenv_root=${PYENV_ROOT:-$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")}
versions=${BUTTRESS_PYTHONS:-3.10 3.11 3.12 3.13}
modes=${BUTTRESS_MODES:-compiled pure}
logs=${BUTTRESS_PYTHONS_LOGS:-/tmp/buttress-pythons-logs}
work=$(mktemp -d /tmp/buttress-pythons.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$logs"

summary=()
failed=0
for v in $versions; do
    # the newest installed patch release of this minor version
    py=$(ls -d "$pyenv_root"/versions/"$v".*/bin/python 2>/dev/null | sort -V | tail -1)
    if [ -z "$py" ]; then
        summary+=("$v: not installed (skipped)")
        continue
    fi
    full=$("$py" -c 'import platform; print(platform.python_version())')
    echo "== CPython $full ($py)"
    tree="$work/tree-$v" venv="$work/venv-$v" run="$work/run-$v"
    "$root/wheels/snapshot.sh" "$tree"
    "$py" -m venv "$venv"
    if ! { "$venv/bin/python" -m pip install -q --upgrade pip &&
           "$venv/bin/python" -m pip install -q "$tree[test]"; } >"$logs/install-$v.log" 2>&1; then
        tail -30 "$logs/install-$v.log"
        summary+=("$full: INSTALL FAILED (see $logs/install-$v.log)")
        failed=1
        continue
    fi
    mkdir -p "$run"
    cp -r "$tree/tests" "$tree/pyproject.toml" "$tree/README.md" "$run/"
    for mode in $modes; do
        case $mode in
            compiled) env=(BUTTRESS_REQUIRE_EXTENSIONS=1) ;;
            pure) env=(BUTTRESS_NO_EXTENSIONS=1) ;;
            *) echo "unknown mode $mode"; exit 2 ;;
        esac
        log="$logs/test-$v-$mode.log"
        (cd "$run" && env "${env[@]}" "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@") >"$log" 2>&1
        rc=$?
        line=$(grep -E '(passed|failed|error).* in [0-9.]+s' "$log" | tail -1 | tr -d '=' | sed 's/^ *//')
        where=$(cd "$run" && env "${env[@]}" "$venv/bin/python" -c 'import buttress; print(buttress.IMPLEMENTATION, buttress.__file__)' 2>&1 | tail -1)
        echo "   $mode: ${line:-no summary (rc=$rc)}  [$where]"
        if [ $rc -ne 0 ]; then
            failed=1
            grep -E '^(FAILED|ERROR) ' "$log" | head -20
        fi
        summary+=("$full $mode: ${line:-rc=$rc} (rc=$rc)")
    done
done

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
exit $failed
