#!/usr/bin/env bash
# wheels/snapshot.sh DEST: copy the project's sources (tracked files plus new, not-ignored ones) into DEST.
# Builds then run in DEST, so generated C, .so files and build/ never land in (or come from) the work tree.
# BUTTRESS_SNAPSHOT=head copies the last commit instead (git archive HEAD).
set -euo pipefail
dest=${1:?usage: wheels/snapshot.sh DEST}
cd "$(dirname "$0")/.."
mkdir -p "$dest"
if [ "${BUTTRESS_SNAPSHOT:-tree}" = head ]; then
    git archive --format=tar HEAD | tar -x -C "$dest"
else
    # files deleted in the work tree but still tracked are skipped (--ignore-failed-read)
    git ls-files -z -c -o --exclude-standard \
        | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -x -C "$dest"
fi
