"""docs/examples/shared_limit_app.py (issue 14): 4 uvicorn workers share one TokenBucket through shm://,
a bounded load loop, and the host-wide bound capacity + floor(rate * D) holds exactly.

Runs the example as a user would (a subprocess: uvicorn's supervisor and 4 spawned workers), once per
implementation (the twin through BUTTRESS_NO_EXTENSIONS=1, inherited by the workers)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from buttress.stores.shm import segment_path

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "shared_limit_app.py"
RATE, CAPACITY, DURATION, WORKERS, CLIENTS = 20.0, 5, 1.5, 4, 6


def _needs(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} not installed, and CI is set: the example must run in CI")
        pytest.skip(f"{', '.join(missing)} not installed")


def test_four_uvicorn_workers_share_one_bucket(impl, tmp_path):
    _needs("uvicorn", "httpx")
    store = f"test-example-{os.getpid()}-{impl.kind}"
    seg = segment_path(store)
    out = tmp_path / "summary.json"
    env = dict(os.environ)
    if impl.kind == "python":
        env["BUTTRESS_NO_EXTENSIONS"] = "1"
    try:
        proc = subprocess.run(
            [sys.executable, str(EXAMPLE), "--store", store, "--rate", str(RATE), "--capacity", str(CAPACITY),
             "--duration", str(DURATION), "--workers", str(WORKERS), "--clients", str(CLIENTS),
             "--json", str(out)],
            env=env, capture_output=True, text=True, timeout=180)
    finally:
        leftovers = [p for p in (seg, seg + ".lock") if os.path.exists(p)]
        for p in leftovers:          # never leak a segment, even when the assertions below fail
            os.unlink(p)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads(out.read_text())
    assert s["store"] == store and s["shared"]
    # the exact host-wide bound, over the client's [t0, t1], which contains every admission
    bound = CAPACITY + math.floor(RATE * s["duration"])
    assert s["admitted"] <= bound, proc.stdout
    # the bucket starts full and only /api takes tokens: the first CAPACITY requests are all admitted
    assert s["admitted"] >= min(CAPACITY, s["requests"]), proc.stdout
    # every request got 200 or 429, and the load was over the limit (else nothing was shown)
    assert s["other"] == 0 and not s["errors"], proc.stdout
    assert s["requests"] == s["admitted"] + s["refused"]
    assert s["requests"] > bound and s["refused"] > 0, proc.stdout
    # the bound is host-wide: more than one worker process decided on the one bucket
    assert len(s["pids"]) > 1, proc.stdout
    # lifecycle: the supervisor unlinked the segment after its workers exited (not the demo's fallback)
    assert s["server_status"] == 0, proc.stderr
    assert not s["left_behind"], proc.stdout
    assert leftovers == [], leftovers
    assert "held" in proc.stdout and "unlinked by the supervisor" in proc.stdout
