"""Summarise a pytest-benchmark JSON file: median ns per call and ns over the floor of the same run.

python -m pytest benchmarks/test_breaker_bench.py --benchmark-json=out.json && python benchmarks/report.py out.json

The floor of a case: async cases -> the bare await (or the async raise+catch for failures), failures
and rejections -> raise+catch, pairs -> two bare calls, everything else -> the bare call.
"""
from __future__ import annotations

import json
import sys


def per_call_ns(bench: dict) -> float:
    extra = bench.get("extra_info") or {}
    if "ns_per_await" in extra:
        return float(extra["ns_per_await"])
    if "ns_per_op" in extra:
        return float(extra["ns_per_op"])
    return bench["stats"]["median"] * 1e9


def floor_for(name: str, floors: dict[str, float]) -> float | None:
    n = name.lower()
    is_async = "async" in n or "await" in n
    failing = any(w in n for w in ("fail", "reject", "raise", "error"))
    if is_async:
        key = "async_raise_catch" if failing and "async_raise_catch" in floors else "bare_await"
    elif "pair" in n:
        key = "bare_pair"
    elif failing:
        key = "raise_catch"
    else:
        key = "bare_call"
    return floors.get(key)


def rows(path: str) -> list[tuple[str, float, float | None]]:
    data = json.load(open(path))
    cases = [(b["name"], per_call_ns(b)) for b in data["benchmarks"]]
    floors = {n.split("test_floor_", 1)[1].split("[")[0]: v for n, v in cases if "test_floor_" in n}
    out = []
    for name, ns in cases:
        base = None if "test_floor_" in name else floor_for(name, floors)
        out.append((name, ns, None if base is None else ns - base))
    return out


def main(paths: list[str]) -> None:
    print(f"| {'case':<60} | {'median ns':>10} | {'over floor':>10} |")
    print(f"|{'-' * 62}|{'-' * 12}:|{'-' * 12}:|")
    for path in paths:
        for name, ns, over in rows(path):
            print(f"| {name:<60} | {ns:>10.1f} | {'' if over is None else f'{over:+.1f}':>10} |")


if __name__ == "__main__":
    main(sys.argv[1:])
