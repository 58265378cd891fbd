import json
import os
import subprocess
import sys

import pytest

from buttress.cli import main


def test_bench_runs_with_a_tiny_iteration_count(capsys):
    assert main(["bench", "--min-time", "0.0005", "--repeat", "1", "--no-twins", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| circuit breaker: success | buttress |" in out
    assert "bare call" in out and "raise+catch" in out and "bare await" in out


def test_bench_json_has_every_field_and_floors(capsys):
    assert main(["bench", "--json", "--min-time", "0.0005", "--repeat", "1", "--no-twins", "--no-peers",
                 "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"python", "implementation", "seconds", "skipped", "results"} <= set(data)
    floors = {r["pattern"] for r in data["results"] if r["who"] == "floor"}
    assert floors == {"bare call", "two bare calls in a function", "a lambda calling a bare call", "raise+catch",
                      "bare await", "async raise+catch"}
    for r in data["results"]:
        assert set(r) == {"pattern", "who", "implementation", "floor", "median_ns", "floor_ns", "over_ns", "ratio"}
        assert r["median_ns"] > 0


def test_bench_measures_the_twins_in_a_child_process():
    env = dict(os.environ)      # the child uses the same implementation as this process
    out = subprocess.run([sys.executable, "-m", "buttress", "bench", "--json", "--min-time", "0.0005",
                          "--repeat", "1", "--no-peers", "--quiet"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    impls = {r["implementation"] for r in json.loads(out.stdout)["results"] if r["who"] == "buttress"}
    import buttress
    assert impls == ({"cython", "python"} if buttress.IMPLEMENTATION == "cython" else {"python"})


@pytest.mark.parametrize("argv, words", [
    (["bench", "--repeat", "0"], "must be in [1, 101]"),
    (["bench", "--repeat", "1000000000"], "must be in [1, 101]"),
    (["bench", "--min-time", "-1"], "must be in (0, 10]"),
    (["bench", "--min-time", "1e300"], "must be in (0, 10]"),
    (["bench", "--nope"], "unrecognized arguments: --nope"),
    (["frobnicate"], "invalid choice"),
    (["demo", "--transport", "carrier-pigeon"], "invalid choice"),
    (["demo", "--patience", "0"], "must be in (0, 600]"),
    (["demo", "--drain", "-1"], "must be in [0, 600]"),
    (["demo", "--workers", "0"], "must be in [1, 10000]"),
    (["demo", "--rate", "1e9"], "must be in (0, 1000]"),
    (["demo", "--rate", "abc"], "expected a number"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_cli_input_is_one_line_and_exit_2(argv, words):
    out = subprocess.run([sys.executable, "-m", "buttress", *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert words in err[-1]


def test_no_command_prints_the_usage_and_the_commands():
    out = subprocess.run([sys.executable, "-m", "buttress"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.startswith("usage: python -m buttress")
    assert "demo" in out.stdout and "bench" in out.stdout and "--version" in out.stdout


def test_version(capsys):
    import buttress
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"buttress {buttress.__version__} ({buttress.IMPLEMENTATION} core)"
