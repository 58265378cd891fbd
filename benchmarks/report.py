"""Summarise a pytest-benchmark JSON file: median ns per case and ns over the floor of the same run.

python -m pytest benchmarks/test_core_bench.py --benchmark-json=/tmp/core.json && python benchmarks/report.py /tmp/core.json
"""
import json
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    rows = [(b["name"], b["stats"]["median"] * 1e9) for b in data["benchmarks"]]
    floors = {n: v for n, v in rows if "floor" in n}
    floor_call = next((v for n, v in floors.items() if "bare_call" in n), None)
    print(f"{'case':<58} {'median ns':>10} {'over floor':>11}")
    for name, ns in rows:
        base = floors.get(name)
        if base is None:
            base = next((v for n, v in floors.items() if n.replace("test_floor_", "") in name), floor_call)
        over = "" if base is None or "floor" in name else f"{ns - base:+.1f}"
        print(f"{name:<58} {ns:>10.1f} {over:>11}")


if __name__ == "__main__":
    main(sys.argv[1])
