"""`python -m buttress demo`: short runs in both transports (the invariants of the numbers), --plot checked
before any run, a bug in a checkout stops the demo at once, the arrivals and faults are the seed's alone."""
import asyncio
import json
import subprocess
import sys

import pytest

from buttress.cli import main
from buttress.demo import checkout, deps
from buttress.demo import DEFAULT_RATE
from buttress.demo.checkout import arrivals, header_retry_after

SHORT = ["--duration", "3", "--patience", "4", "--seed", "1"]      # each transport at its default rate
COUNTS = ("completed", "failed_after_wait", "rejected_fast", "unfinished")


@pytest.fixture(scope="module", params=["inprocess", "http"])
def short_demo(request):
    if request.param == "http":
        pytest.importorskip("httpx")
        pytest.importorskip("uvicorn")
    proc = subprocess.run([sys.executable, "-m", "buttress", "demo", *SHORT, "--transport", request.param,
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return request.param, json.loads(proc.stdout), proc.stderr


def test_both_runs_replay_the_same_arrivals(short_demo):
    transport, data, _ = short_demo
    assert data["transport"] == transport
    assert data["rate_per_s"] == data["default_rate_per_s"] == DEFAULT_RATE[transport] == {"inprocess": 50.0,
                                                                                            "http": 30.0}[transport]
    schedule = arrivals(1, data["rate_per_s"], 3.0)
    assert data["arrivals"] == len(schedule) > 60
    assert data["arrivals_sha256"] == checkout.digest(schedule)
    for run in data["runs"].values():
        assert run["arrivals"] == data["arrivals"]
        assert run["arrivals_sha256"] == data["arrivals_sha256"]     # what the run dispatched, in order


def test_every_arrival_is_counted_once(short_demo):
    _, data, _ = short_demo
    for name, run in data["runs"].items():
        assert sum(run[k] for k in COUNTS) == run["arrivals"], name
        assert all(run[k] >= 0 for k in COUNTS)
        series = run["series"]      # every answer falls in exactly one second of the run
        assert [s["t"] for s in series] == list(range(len(series))) and len(series) == 7     # 3 s + 4 s
        for k in ("completed", "failed_after_wait", "rejected_fast"):
            assert sum(s[k] for s in series) == run[k], (name, k)
        assert sum(s["arrivals"] for s in series) == run["arrivals"]
        assert set(run["latency_ms"]) == {"p50", "p95", "p99"}


def test_protected_never_double_charges_and_has_the_lower_p99(short_demo):
    _, data, _ = short_demo
    naive, protected = data["runs"]["naive"], data["runs"]["protected"]
    assert protected["double_charges"] == 0
    assert naive["rejected_fast"] == naive["fast_refusals"] == 0        # nothing in the naive shop refuses
    assert naive["unfinished"] == protected["unfinished"] == 0     # the run waits the users' patience out
    assert protected["latency_ms"]["p99"] < naive["latency_ms"]["p99"]
    assert any(m["new"] == "OPEN" for m in protected["breaker_transitions"])     # the payment outage was seen
    # a lost reply (the gateway charged, the connection dropped; over HTTP after the headers) is retried
    # with the same key, never a failed checkout; naive, trying again without a key, charges twice
    assert "connection lost" not in protected["failed_by"] and protected["deduplicated_charges"] > 0
    assert naive["double_charges"] > 0


def test_the_signals_are_sampled_in_both_runs_and_shed_only_at_the_protected_door(short_demo):
    """Both transports: the same three signals (thresholds per priority, LOW lowest) sampled in each run;
    the protected door's refusals by reason add up to its shed counts; the naive shop has no door."""
    _, data, _ = short_demo
    naive, protected = data["runs"]["naive"], data["runs"]["protected"]
    for run in (naive, protected):
        assert set(run["signals"]) == {"loop_lag", "cpu", "queue_depth"}
        line = run["signals"]["queue_depth"]
        assert (line["low"], line["medium"], line["high"]) == (16.0, 32.0, 64.0)     # 64 workers: 1/4, 1/2, 1
        for sig in run["signals"].values():
            assert sig["peak"] >= 0 and sig["low"] <= sig["medium"]
    assert naive["shedder"] is None
    door = protected["shedder"]
    assert door["max_in_flight"] == 4 * data["workers"] and door["sample_interval_s"] == 0.1
    shed = sum(n for by in door["shed_by"].values() for n in by.values())
    assert shed == sum(door["shed"].values()) and door["shed"]["CRITICAL"] == 0
    assert protected["fast_refusals_by"].get("shedder", 0) <= shed
    assert sum(door["admitted"].values()) >= data["arrivals"] - shed


def test_the_http_table_says_which_rate_the_healthy_services_serve(short_demo):
    transport, data, _ = short_demo
    from buttress.demo.table import render
    text = render(data)
    assert f"transport: {transport} (" in text
    said = "the default rate over HTTP is 30/s: what these services serve when healthy"
    assert (said in text) == (transport == "http")


def test_progress_is_one_line_per_run_off_a_terminal(short_demo):
    _, _, err = short_demo
    lines = err.splitlines()
    assert len(lines) == 2 and "\r" not in err
    assert lines[0].split()[0] == "naive" and lines[1].split()[0] == "protected"


def test_the_table_has_a_row_and_an_explanation_for_each_number(capsys):
    assert main(["demo", "--duration", "1", "--drain", "0.5", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    header = next(line for line in lines if line.split()[-2:] == ["naive", "protected"])
    assert header.startswith("of the ") and "checkouts users attempted" in header
    for label in ("completed", "failed after waiting", "rejected fast, with Retry-After",
                  "unfinished when the run stopped", "goodput (completed per second)", "latency of all answers  p50",
                  "p95", "p99", "double charges", "longest line for a worker (sampled)",
                  "worst event-loop lag (sampled)", "busiest CPU of this process (sampled)",
                  "tries shed by those signals", "tries shed by the in-flight count"):
        assert any(line.strip().startswith(label) and len(line.split()) >= len(label.split()) + 2 for line in lines), label
    for word in ("completed", "failed after waiting", "rejected fast", "unfinished", "goodput", "latency",
                 "double charges", "signals"):       # the explaining lines under the table
        assert any(line.startswith(word + " ") for line in lines), word
    assert "transport: inprocess" in out


@pytest.mark.parametrize("path", ["x.txt", "/sys/x.png", "DIR", "", "MISSING/x.png", "noextension"])
def test_a_bad_plot_path_fails_before_any_run(capsys, monkeypatch, tmp_path, path):
    monkeypatch.chdir(tmp_path)
    path = {"DIR": str(tmp_path), "MISSING/x.png": str(tmp_path / "missing" / "x.png")}.get(path, path)

    async def no_run(*args, **kwargs):
        raise AssertionError("a run started before --plot was checked")
    monkeypatch.setattr(checkout, "run", no_run)
    assert main(["demo", "--plot", path]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "error: --plot" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []      # nothing written, nothing left behind


def test_plot_without_matplotlib_is_a_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # `import matplotlib` raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.backend_bases", None)
    assert main(["demo", "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib" in err and "pip install matplotlib" in err


def test_plot_writes_a_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "demo.png"
    assert main(["demo", "--duration", "1", "--drain", "0.2", "--quiet", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("where", ["naive", "protected"])
def test_a_bug_in_a_checkout_stops_the_demo_at_once(monkeypatch, where):
    calls = []

    async def buggy(self, order, item):
        calls.append(order)
        if len(calls) == 3:
            raise ZeroDivisionError("a bug, not a simulated fault")
        return True
    monkeypatch.setattr(deps.Inventory, "stock", buggy)
    if where == "protected":        # the naive run gets through quickly; the bug is met behind the pipelines
        async def instant(self, a):
            return None
        monkeypatch.setattr(checkout.Naive, "checkout", instant)
    with pytest.raises(ZeroDivisionError) as exc:
        main(["demo", "--duration", "30" if where == "naive" else "1", "--drain", "0", "--quiet"])
    assert len(calls) < 50        # stopped at the third checkout, not after 30 s of arrivals (1,500 of them)
    notes = getattr(exc.value, "__notes__", None)
    if notes is not None:       # Python 3.11+: where it happened
        assert f"in the {where} run" in notes[-1] and "the demo stopped" in notes[-1]


def test_arrivals_and_faults_come_from_the_seed_alone():
    assert arrivals(7, 50.0, 10.0) == arrivals(7, 50.0, 10.0) != arrivals(8, 50.0, 10.0)
    a = arrivals(1, 50.0, 10.0)
    assert all(x.at <= y.at for x, y in zip(a, a[1:])) and 0 < a[0].at and a[-1].at < 10.0
    f = deps.Faults.draw(1, 10.0)
    assert f == deps.Faults.draw(1, 10.0) != deps.Faults.draw(2, 10.0)
    assert 2.5 <= f.payment_outage[0] <= 3.5 and f.payment_outage[1] - f.payment_outage[0] == pytest.approx(2.0)
    assert deps.Faults.from_dict(json.loads(json.dumps(f.as_dict()))) == f


def test_a_request_meets_the_same_fault_in_both_runs():
    """The n-th request for an order draws the same fault whatever came before it (timing, other orders)."""
    f = deps.Faults.draw(3, 10.0)
    one, two = deps.PaymentGateway(f, lambda: 0.0), deps.PaymentGateway(f, lambda: 0.0)
    two.draw("00009")
    assert one.draw("00001").random() == two.draw("00001").random()
    assert one.draw("00001").random() != one.draw("00002").random()


class Faulty(deps.PaymentGateway):
    def __init__(self, draws, elapsed=lambda: 0.0, outage=(100.0, 200.0)):
        super().__init__(deps.Faults(1, outage, (100.0, 200.0)), elapsed)
        self.draws = list(draws)

    def draw(self, order):
        super().draw(order)
        value = self.draws.pop(0)

        class R:
            def random(self):
                return value

            def uniform(self, a, b):
                return a
        return R()


@pytest.mark.parametrize("key, charged, deduplicated, doubles", [("order-1", 1, 1, 0), (None, 2, 0, 1)])
def test_gateway_lost_reply_then_retry(key, charged, deduplicated, doubles):
    async def scenario():
        gateway = Faulty([0.03, 0.5])       # 0.03: charged, then the reply is lost; 0.5: a clean call
        with pytest.raises(deps.ConnectionLost, match="after the charge"):
            await gateway.charge("1", idempotency_key=key)
        second = await gateway.charge("1", idempotency_key=key)
        await gateway.close()
        return gateway, second

    gateway, second = asyncio.run(scenario())
    assert gateway.charges["1"] == charged
    assert gateway.deduplicated == deduplicated and gateway.double_charges == doubles
    assert second == ("ch_1_1" if key else "ch_1_2")


def test_gateway_outage_gets_no_reply_and_takes_no_worker():
    async def scenario():
        gateway = Faulty([0.5] * 20, outage=(0.0, 100.0))
        hung = [asyncio.ensure_future(gateway.charge(str(i))) for i in range(deps.PAYMENT_CAPACITY + 2)]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in hung)
        gateway.faults = deps.Faults(1, (100.0, 200.0), (100.0, 200.0))     # the outage is over
        assert await asyncio.wait_for(gateway.charge("x"), 1.0) == "ch_x_1"     # a worker was free
        await gateway.close()
        for t in hung:
            t.cancel()
        await asyncio.gather(*hung, return_exceptions=True)
        return gateway

    assert asyncio.run(scenario()).charges == {"x": 1}


def test_abandoned_request_runs_on_server_side():
    """A client that gives up does not stop the server: the charge still lands (a double-charge source)."""
    async def scenario():
        gateway = Faulty([0.5])
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(gateway.charge("1"), 0.001)
        await asyncio.sleep(0.1)        # the 30 ms charge finishes without its client
        return gateway

    assert asyncio.run(scenario()).charges == {"1": 1}


def test_retry_after_is_whole_seconds_at_least_one():
    assert [header_retry_after(x) for x in (None, 0.0, 0.01, 1.0, 1.2)] == [1, 1, 1, 1, 2]


def _policies():
    return checkout.Policies(1, (deps.DependencyError,), checkout.Tally(), lambda: 0.0)


def test_over_http_the_protected_calls_go_through_buttress_httpx():
    """One guard per dependency, two compositions: over HTTP the transport gets the guard's total
    Timeout, Retry and breaker as the host's pipeline, the client's timeout is the per-attempt timeout,
    and the bulkhead is around the client call (buttress.httpx refuses a Bulkhead stage)."""
    httpx = pytest.importorskip("httpx")
    from buttress.demo.http import Http, HttpSession
    from buttress.httpx import AsyncResilientTransport, retryable
    http = Http()
    http.ports = {"payment": 1, "inventory": 2, "recommendations": 3}
    session = HttpSession(http)
    assert session.retry_on is retryable
    policies = _policies()
    guarded = session.client(policies)
    assert guarded.around == {"payment": policies.payment.bulkhead, "inventory": policies.inventory.bulkhead}
    hosts = {}
    for service, port in http.ports.items():
        guard = policies.guards()[service]
        client = guarded.inner.clients[service]
        assert isinstance(client._transport, AsyncResilientTransport)
        host = hosts[service] = client._transport.pipeline_for(f"http://127.0.0.1:{port}")
        assert host.timeout == guard.remote.strategies[0].seconds       # the total timeout
        assert client.timeout == httpx.Timeout(guard.attempt)           # each attempt's
    assert (hosts["payment"].timeout, policies.payment.attempt) == (1.2, 0.4)
    assert hosts["payment"].retry is policies.payment.remote.strategies[1]
    assert hosts["payment"].breaker is policies.breaker
    assert hosts["inventory"].retry is policies.inventory.remote.strategies[1] and hosts["inventory"].breaker is None
    assert hosts["recommendations"].retry is None and guarded.inner.clients["recommendations"].timeout.read is None

    async def close():
        for client in session.clients:
            await client.aclose()
    asyncio.run(close())


def test_in_process_the_same_guard_is_one_pipeline_bulkhead_outside():
    import buttress
    policies = _policies()
    outer = policies.payment.in_process()
    bulkhead, inner = outer.strategies
    assert bulkhead is policies.payment.bulkhead
    assert [type(s).__name__ for s in inner.strategies] == ["Timeout", "Retry", "CircuitBreaker", "Timeout"]
    assert inner.strategies[1:3] == policies.payment.remote.strategies[1:]
    assert inner.strategies[-1].seconds == policies.payment.attempt
    recs = policies.recommendations.in_process()
    assert [type(s) for s in recs.strategies] == [buttress.Timeout]


@pytest.mark.parametrize("argv, flag, span", [
    (["--rate", "1e9", "--duration", "0.001"], "--rate", "(0, 1000]"), (["--rate", "nan"], "--rate", "(0, 1000]"),
    (["--rate", "0"], "--rate", "(0, 1000]"), (["--duration", "inf"], "--duration", "(0, 3600]"),
    (["--duration", "1e6"], "--duration", "(0, 3600]"), (["--patience", "1e300"], "--patience", "(0, 600]"),
    (["--drain", "-1"], "--drain", "[0, 600]"), (["--drain", "1e12"], "--drain", "[0, 600]"),
    (["--workers", "0"], "--workers", "[1, 10000]"), (["--workers", "10000000"], "--workers", "[1, 10000]"),
    (["--workers", "2.5"], "--workers", "[1, 10000]"),
])
def test_every_numeric_flag_is_bounded_to_what_the_demo_can_run(capsys, monkeypatch, argv, flag, span):
    """--rate 1e9 built millions of arrivals (1.6 GB) and hung: a one-line error naming the flag and the
    range, exit code 2, before any run."""
    async def no_run(*args, **kwargs):
        raise AssertionError("a run started")
    monkeypatch.setattr(checkout, "run", no_run)
    with pytest.raises(SystemExit) as info:
        main(["demo", "--quiet", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}: " in err and span in err


def test_the_arrivals_of_one_run_are_bounded(capsys, monkeypatch):
    async def no_run(*args, **kwargs):
        raise AssertionError("a run started")
    monkeypatch.setattr(checkout, "run", no_run)
    assert main(["demo", "--quiet", "--rate", "1000", "--duration", "3600"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rate x --duration: at most 100000 arrivals" in err
