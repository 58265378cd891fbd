#!/usr/bin/env bash
# Memory check of the compiled core: valgrind memcheck (PYTHONMALLOC=malloc, so every Python object is a
# malloc block valgrind can see) over the crash probe (uninitialised objects, any now=) and the core
# tests against the compiled implementation. Any invalid read / write / jump is an error (exit 1);
# leaks are not reported (CPython keeps interned objects for the life of the process).
#
#   scripts/valgrind.sh                 # probe + core tests, compiled core of the current environment
#   scripts/valgrind.sh tests/test_x.py # other pytest args instead of the core tests
# Needs `valgrind` (apt-get install valgrind) and the compiled core built (pip install -e .). ~5-10 min.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
log=$(mktemp /tmp/buttress-valgrind.XXXXXX)
vg=(valgrind --tool=memcheck --error-exitcode=99 --leak-check=no --track-origins=no --num-callers=30
    --log-file="$log.%p")
export PYTHONMALLOC=malloc BUTTRESS_REQUIRE_EXTENSIONS=1
# The interpreter itself reports errors while it starts (a pyenv/Debian CPython is not built for valgrind:
# the same ~27 contexts in every process). A baseline run that imports what the probes import records them
# as suppressions, so what is left is ours.
supp="$log.supp"
valgrind --tool=memcheck --leak-check=no --gen-suppressions=all --log-file="$log.baseline" \
    "$PY" -c "import asyncio, json, math, threading, numpy, hypothesis, pytest" >/dev/null 2>&1 || true
awk '/^\{/{keep=1} keep{print} /^\}/{keep=0}' "$log.baseline" > "$supp"
rm -f "$log.baseline"
vg+=(--suppressions="$supp")
status=0
# exit code 99 is valgrind saying it saw errors (judged below: only ours count); anything else is a failed run
ran() { [ "$1" = 99 ] || status=1; }
for what in uninit now; do
    for m in gcra window permits state breaker guard keyed; do
        [ $what = now ] && case $m in permits|guard) continue ;; esac
        echo "== valgrind: crash probe $what $m"
        "${vg[@]}" "$PY" tests/crash_probe.py $what cython $m > /dev/null || ran "$?"
    done
done
if [ $# -eq 0 ]; then
    set -- -k "cython or both" tests/test_gcra.py tests/test_window.py tests/test_permits.py tests/test_state.py \
        tests/test_keyed.py tests/test_differential.py tests/test_differential_domain.py
fi
echo "== valgrind: pytest $*"
HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-} "${vg[@]}" "$PY" -m pytest -q -p no:cacheprovider "$@" || ran "$?"
# An error is ours when a frame of its stack is in the compiled core (Cython names every function
# __pyx_..._8buttress_5_core_...; the headers' inline functions are bt_*). The rest is the interpreter's
# own (a CPython that is not built for valgrind reports uninitialised reads in its eval loop).
ours=$(cat "$log".[0-9]* | awk '
    /^==[0-9]+== (Invalid|Use of uninitialised|Conditional jump|Mismatched|Source and destination|Syscall param)/ {
        block=$0; inblock=1; next }
    inblock && /^==[0-9]+== *$/ { if (block ~ /buttress|__pyx_|bt_[a-z_]+ \(/) print block "\n"; inblock=0; next }
    inblock { block=block "\n" $0 }' || true)
if [ -n "$ours" ]; then
    echo "valgrind: errors in the compiled core (logs: $log.*):"; echo "$ours" | head -n 120
    exit 1
fi
rm -f "$log" "$log".* "$supp"
[ $status = 0 ] && echo "valgrind: clean" || { echo "valgrind: a run failed (see above)"; exit 1; }
