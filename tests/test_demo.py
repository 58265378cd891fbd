"""`python -m buttress demo`: end to end with tiny durations, its JSON, its CLI errors, --plot."""
import asyncio
import dataclasses
import json
import math
import os
import random
import subprocess
import sys

import pytest

from buttress import demo
from buttress.cli import main

RUN_FIELDS = {"name", "checkouts", "completed", "failed", "rejected", "unfinished", "latency_ms",
              "completed_latency_ms", "double_charges", "deduplicated_charges", "payment_requests", "retries",
              "fallbacks", "shed", "browse", "browse_served", "breaker_transitions", "series"}
LATENCY_FIELDS = {"p50", "p95", "p99"}
SECOND_FIELDS = {"t", "checkouts", "completed", "success_rate", "p50_ms", "p95_ms"}


def check_run(run, name, duration):
    assert set(run) == RUN_FIELDS
    assert run["name"] == name
    assert set(run["latency_ms"]) == set(run["completed_latency_ms"]) == LATENCY_FIELDS
    assert run["checkouts"] > 0 and run["browse"] > 0
    assert run["completed"] + run["failed"] + run["rejected"] + run["unfinished"] == run["checkouts"]
    assert 0 <= run["browse_served"] <= run["browse"]
    assert len(run["series"]) == math.ceil(duration)
    for t, second in enumerate(run["series"]):
        assert set(second) == SECOND_FIELDS and second["t"] == t
        assert second["success_rate"] is None or 0.0 <= second["success_rate"] <= 1.0
    assert sum(s["checkouts"] for s in run["series"]) <= run["checkouts"]
    for move in run["breaker_transitions"]:
        assert set(move) == {"at", "old", "new"} and 0 <= move["at"] <= duration + 0.5


def test_demo_prints_the_table(capsys):
    assert main(["demo", "--duration", "1.5", "--clients", "10", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == ""        # --quiet: no progress line
    assert "fault schedule: payment outage" in out
    header = next(line for line in out.splitlines() if line.split() == ["naive", "protected"])
    assert header
    for label in ("checkouts started", "completed", "failed (after waiting)", "rejected fast",
                  "checkout latency p50 (ms)", "checkout latency p95 (ms)", "checkout latency p99 (ms)",
                  "double charges", "retries", "fallbacks served", "requests shed", "browse requests served",
                  "breaker transitions"):
        row = next(line for line in out.splitlines() if line.strip().startswith(label))
        assert len(row.split()) >= len(label.split()) + 2, row      # a value for each run


def test_demo_json_via_subprocess():
    proc = subprocess.run([sys.executable, "-m", "buttress", "demo", "--duration", "1", "--clients", "5", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == {"config", "schedule", "runs"}
    assert data["config"] == {"duration": 1.0, "clients": 5, "seed": 1, "implementation": data["config"]["implementation"]}
    assert data["config"]["implementation"] in ("cython", "python")
    assert data["schedule"] == json.loads(json.dumps(dataclasses.asdict(demo.Schedule.draw(1, 1.0))))
    assert set(data["runs"]) == {"naive", "protected"}
    for name, run in data["runs"].items():
        check_run(run, name, 1.0)
    naive, protected = data["runs"]["naive"], data["runs"]["protected"]
    # nothing in the naive run can reject, shed or dedupe; the protected run can never double-charge
    assert naive["rejected"] == naive["shed"] == naive["deduplicated_charges"] == 0
    assert naive["breaker_transitions"] == []
    assert protected["double_charges"] == 0
    # stderr is not a terminal here: one final progress line per run, nothing else
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and "\r" not in proc.stderr
    assert lines[0].split()[0] == "naive" and lines[1].split()[0] == "protected"
    assert "checkouts:" in lines[0]


@pytest.mark.slow
def test_protected_beats_naive(capsys):
    assert main(["demo", "--duration", "5", "--clients", "40", "--seed", "1", "--json", "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    naive, protected = data["runs"]["naive"], data["runs"]["protected"]
    assert protected["failed"] < naive["failed"] or protected["latency_ms"]["p99"] < naive["latency_ms"]["p99"]
    assert protected["double_charges"] == 0
    # the payment outage was seen and handled: the breaker opened and refused calls at once
    assert any(t["new"] == "OPEN" for t in protected["breaker_transitions"])
    assert protected["rejected"] > 0


def test_same_seed_same_schedule():
    assert demo.Schedule.draw(7, 12.0) == demo.Schedule.draw(7, 12.0)
    assert demo.Schedule.draw(7, 12.0) != demo.Schedule.draw(8, 12.0)
    s = demo.Schedule.draw(1, 10.0)
    assert 2.5 <= s.payment_outage[0] <= 3.5 and s.payment_outage[1] - s.payment_outage[0] == pytest.approx(2.0, abs=0.02)
    assert 6.0 <= s.recommendations_outage[0] <= 7.0
    # the per-call fault draws of a dependency come from its own seeded generator
    a = demo.PaymentGateway(3, lambda: 0.0, (0.0, 0.0)).rng
    b = demo.PaymentGateway(3, lambda: 0.0, (0.0, 0.0)).rng
    assert [a.random() for _ in range(5)] == [b.random() for _ in range(5)]


class Draws(random.Random):
    """random() returns the given fault draws in turn; uniform() the shortest latency."""

    def __new__(cls, draws):   # Python 3.10's Random.__new__ would seed itself with `draws` (a list)
        return super().__new__(cls)

    def __init__(self, draws):
        super().__init__(0)
        self.draws = list(draws)

    def random(self):
        return self.draws.pop(0)

    def uniform(self, a, b):
        return a


@pytest.mark.parametrize("key, charged, deduplicated, doubles", [("order-1", 1, 1, 0), (None, 2, 0, 1)])
def test_gateway_lost_reply_then_retry(key, charged, deduplicated, doubles):
    async def scenario():
        gateway = demo.PaymentGateway(1, lambda: 0.0, (100.0, 200.0))
        gateway.rng = Draws([0.03, 0.5])       # 0.03: charged, then the reply is lost; 0.5: a clean call
        with pytest.raises(ConnectionError, match="after the charge"):
            await gateway.charge("1", idempotency_key=key)
        second = await gateway.charge("1", idempotency_key=key)
        await gateway.close()
        return gateway, second

    gateway, second = asyncio.run(scenario())
    assert gateway.charges["1"] == charged
    assert gateway.deduplicated == deduplicated and gateway.double_charges == doubles
    assert second == "ch_1_1" if key else second == "ch_1_2"
    assert gateway.requests == 2


def test_gateway_declines_without_charging():
    async def scenario():
        gateway = demo.PaymentGateway(1, lambda: 0.0, (100.0, 200.0))
        gateway.rng = Draws([0.01])
        with pytest.raises(ConnectionError, match="not charged"):
            await gateway.charge("1", idempotency_key="k")
        return gateway

    assert asyncio.run(scenario()).charges == {}


def test_abandoned_request_runs_on_server_side():
    """A client that gives up does not stop the server: the charge still lands (a double-charge source)."""
    async def scenario():
        gateway = demo.PaymentGateway(1, lambda: 0.0, (100.0, 200.0))
        gateway.rng = Draws([0.5])
        with pytest.raises(asyncio.TimeoutError):   # not the builtin TimeoutError before 3.11
            await asyncio.wait_for(gateway.charge("1"), 0.001)
        await asyncio.sleep(0.1)        # the 30 ms charge finishes without its client
        return gateway

    assert asyncio.run(scenario()).charges == {"1": 1}


@pytest.mark.parametrize("argv, words", [
    (["--duration", "-1"], "--duration"),
    (["--duration", "0"], "--duration"),
    (["--duration", "abc"], "--duration"),
    (["--clients", "0"], "--clients"),
    (["--clients", "2.5"], "--clients"),
    (["--seed", "x"], "--seed"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_is_a_one_line_error(capsys, argv, words):
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "error:" in err and words in err


def test_plot_writes_a_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "demo.png"
    assert main(["demo", "--duration", "1", "--clients", "4", "--quiet", "--plot", str(path)]) == 0
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 10_000


def test_plot_without_matplotlib_is_a_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # `import matplotlib` raises ImportError
    assert main(["demo", "--plot", str(tmp_path / "x.png")]) == 2     # at once: no 24-second run first
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "error:" in err and "matplotlib" in err and "pip install matplotlib" in err
    assert not (tmp_path / "x.png").exists()


def test_plot_into_a_missing_folder_is_a_clear_error(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    assert main(["demo", "--plot", str(tmp_path / "nowhere" / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
