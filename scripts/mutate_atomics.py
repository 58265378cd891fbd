"""Rewrite a copy of _core/include/buttress_atomic.h so every atomic is a plain load, compare and store.

Used by `scripts/freethreaded.sh --mutant`: the free-threaded race tests must fail on this mutant (a
test suite that passes with the atomics gone does not test them). Only the GCC/Clang branch is mutated;
`volatile` keeps the compiler from merging the accesses, so the races are the CPU's, not the optimiser's.

    python scripts/mutate_atomics.py PATH/TO/buttress_atomic.h
"""
from __future__ import annotations

import re
import sys

PLAIN = {
    "bt_load": "{ return *(volatile int64_t *)p; }",
    "bt_store": "{ *(volatile int64_t *)p = v; }",
    "bt_cas": "{ if (*(volatile int64_t *)p != expected) return 0; *(volatile int64_t *)p = desired; return 1; }",
    "bt_fetch_add": "{ int64_t old = *(volatile int64_t *)p; *(volatile int64_t *)p = (int64_t)((uint64_t)old + (uint64_t)d); return old; }",
    "bt_exchange": "{ int64_t old = *(volatile int64_t *)p; *(volatile int64_t *)p = v; return old; }",
}


def mutate(text: str) -> str:
    at = text.find("static inline int64_t bt_load(")
    if at < 0:
        raise SystemExit("mutate_atomics: no GCC/Clang bt_load found")
    head, sep, gcc = text[:at], "", text[at:]
    done = set()
    for name, body in PLAIN.items():
        # `static inline <type> name(<args>) { ... }` up to the brace that closes the function
        pat = re.compile(r"(static inline [^\n(]*\b" + name + r"\s*\([^)]*\)\s*)\{.*?\n?\}", re.S)
        gcc, n = pat.subn(lambda m: m.group(1) + body, gcc, count=1)
        if n:
            done.add(name)
    missing = set(PLAIN) - done
    if missing:
        raise SystemExit(f"mutate_atomics: did not find {sorted(missing)}")
    # fences (if any) become no-ops too
    gcc = re.sub(r"__atomic_(thread|signal)_fence\([^)]*\)", "((void)0)", gcc)
    if "__atomic_" in gcc:
        left = sorted(set(re.findall(r"__atomic_\w+", gcc)))
        raise SystemExit(f"mutate_atomics: atomics left after mutation: {left}")
    return head + sep + gcc


if __name__ == "__main__":
    path = sys.argv[1]
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(mutate(text))
    print(f"mutate_atomics: {path}: every atomic is now a plain load/compare/store")
