"""The demo's table: what happened to the same N checkouts in each run, and one line per row saying what
the row means, with this run's numbers."""
from __future__ import annotations

from typing import Any

from .checkout import FAST


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}"
    return f"{v:,}"


def _secs(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1e3:.1f} s" if ms >= 1000 else f"{ms:.0f} ms"


def _by(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


_SIGNALS = ("queue_depth", "loop_lag", "cpu")
_PRIORITIES = ("LOW", "MEDIUM", "HIGH", "CRITICAL")


def _peak(run: dict[str, Any], name: str) -> str:
    """The largest value a signal's sampler read in a run, in the signal's unit."""
    sig = (run.get("signals") or {}).get(name)
    if sig is None:
        return "-"
    v = sig["peak"]
    return f"{v * 1e3:.0f} ms" if name == "loop_lag" else f"{v * 100:.0f} %" if name == "cpu" else f"{v:,.0f}"


def _shed(run: dict[str, Any], signals: bool) -> Any:
    by = (run.get("shedder") or {}).get("shed_by", {})
    return sum(n for why, prios in by.items() if (why != "in_flight") == signals for n in prios.values())


def _thresholds(sig: dict[str, Any], name: str) -> str:
    def one(v: float | None) -> str:
        if v is None:
            return "never"
        return f"{v * 1e3:g} ms" if name == "loop_lag" else f"{v * 100:g} %" if name == "cpu" else f"{v:g}"
    return " / ".join(one(sig[k]) for k in ("low", "medium", "high"))


def _shed_by(run: dict[str, Any]) -> str:
    by = (run.get("shedder") or {}).get("shed_by", {})
    parts = []
    for why in (*_SIGNALS, "in_flight", *sorted(set(by) - {*_SIGNALS, "in_flight"})):
        prios = by.get(why, {})
        counts = ", ".join(f"{p} {prios[p]}" for p in _PRIORITIES if prios.get(p))
        parts.append(f"{why} {counts or 'none'}")
    return "; ".join(parts)


def render(result: dict[str, Any]) -> str:
    runs = result["runs"]
    naive, prot = runs["naive"], runs["protected"]
    n = result["arrivals"]
    f = result["faults"]
    head = [
        f"buttress demo: the same {n:,} checkouts, arriving at random (Poisson, {result['rate_per_s']:g}/s for "
        f"{result['duration_s']:g} s, seed {result['seed']}),",
        "sent twice to a shop that calls three dependencies: once naively, once through buttress; "
        "same faults both times.",
        f"transport: {result['transport']} ({result['transport_detail']}); {result['implementation']} core",
        *([f"           the default rate over HTTP is {result['default_rate_per_s']:g}/s: what these services serve "
           "when healthy (no outage) on a 2-core machine"] if result["transport"] == "http" else []),
        f"shop: serves {result['workers']} checkouts at once, the others wait in line for a worker",
        f"users: each waits up to {result['patience_s']:g} s for an answer, then gives up (the shop is not told "
        "and carries on);",
        "       told to try again in N s (Retry-After), a user does, if that is still within those "
        f"{result['patience_s']:g} s",
        f"faults: payment outage {f['payment_outage'][0]:g}-{f['payment_outage'][1]:g} s (charges get no reply), recommendations outage {f['recommendations_outage'][0]:g}-"
        f"{f['recommendations_outage'][1]:g} s (no reply);",
        "        and per request, seeded: declined charges, lost replies, slow charges, inventory crashes and "
        "stalls, recommendation errors",
        "",
    ]
    rows: list[tuple[str, Any, Any]] = [
        (f"of the {n:,} checkouts users attempted", "naive", "protected"),
        ("  completed", naive["completed"], prot["completed"]),
        ("  failed after waiting", naive["failed_after_wait"], prot["failed_after_wait"]),
        ("  rejected fast, with Retry-After", naive["rejected_fast"], prot["rejected_fast"]),
        ("  unfinished when the run stopped", naive["unfinished"], prot["unfinished"]),
        ("goodput (completed per second)", naive["goodput_per_s"], prot["goodput_per_s"]),
        ("latency of all answers  p50", _secs(naive["latency_ms"]["p50"]), _secs(prot["latency_ms"]["p50"])),
        ("                        p95", _secs(naive["latency_ms"]["p95"]), _secs(prot["latency_ms"]["p95"])),
        ("                        p99", _secs(naive["latency_ms"]["p99"]), _secs(prot["latency_ms"]["p99"])),
        ("double charges", naive["double_charges"], prot["double_charges"]),
        ("charged, but no confirmation", naive["charged_without_confirmation"], prot["charged_without_confirmation"]),
        ("longest line for a worker (sampled)", _peak(naive, "queue_depth"), _peak(prot, "queue_depth")),
        ("worst event-loop lag (sampled)", _peak(naive, "loop_lag"), _peak(prot, "loop_lag")),
        ("busiest CPU of this process (sampled)", _peak(naive, "cpu"), _peak(prot, "cpu")),
        ("tries shed by those signals", "-", _shed(prot, signals=True)),
        ("tries shed by the in-flight count", "-", _shed(prot, signals=False)),
    ]
    cells = [(label, a if isinstance(a, str) else _cell(a), b if isinstance(b, str) else _cell(b))
             for label, a, b in rows]
    w0 = max(len(c[0]) for c in cells)
    w1 = max(len(c[1]) for c in cells)
    w2 = max(len(c[2]) for c in cells)
    table = [f"{a.ljust(w0)}  {b.rjust(w1)}  {c.rjust(w2)}" for a, b, c in cells]

    explain = [
        ("completed", "paid, and the user saw the confirmation page"),
        ("failed after waiting", f"an error, or the user gave up: after {_secs(naive['failed_wait_ms']['p50'])} "
                                 f"(median) naive, {_secs(prot['failed_wait_ms']['p50'])} protected"),
        ("", f"naive: {_by(naive['failed_by'])}"),
        ("", f"protected: {_by(prot['failed_by'])}"),
        ("rejected fast", f"told within {FAST * 1e3:.0f} ms to try again (Retry-After), and left: trying "
                          "again would have passed their patience"),
        ("", f"protected: {prot['fast_refusals']} fast refusals ({_by(prot['fast_refusals_by'])}) to "
             f"{prot['users_told_to_retry']} users; {prot['completed_after_retry_after']} of them completed on a later try"),
        ("unfinished", f"the user was still waiting when the run stopped, {result['drain_s']:g} s after the last "
                       f"arrival ({naive['unfinished_waiting_for_worker']} of naive's still in line for a worker)"),
        ("goodput", f"completed checkouts per second of arrivals (users attempted {n / result['duration_s']:.1f}/s)"),
        ("latency", f"from arrival to the final answer; a user who gave up counts with {result['patience_s']:g} s, "
                    "an unfinished one not at all"),
        ("double charges", "orders charged twice: naive tries a failed charge again blindly; protected "
                           "sends the order id"),
        ("", "as Idempotency-Key, and the gateway charges a key once"),
        ("no confirmation", "the card was charged, but the user saw an error or had given up"),
        *_signal_lines(naive, prot),
    ]
    wl = max(len(k) for k, _ in explain)
    lines = head + table + [""] + [f"{k.ljust(wl)}  {v}" for k, v in explain] + [""]
    for name, run in runs.items():
        p = run["peak_in_shop"]
        lines.append(f"{name}: up to {p['in_progress'] + p['waiting_for_worker']:,} checkouts in the shop "
                     f"({p['in_progress']} in progress, {p['waiting_for_worker']} in line) at {p['at']:.1f} s; "
                     f"{run['payment_requests']:,} charge requests, {run['retries']} retries")
    moves = prot["breaker_transitions"]
    if moves:
        lines.append("protected payment breaker (CLOSED at first): " + ", ".join(f"{m['new']} at {m['at']:g} s"
                                                                               for m in moves))
    return "\n".join(lines)



def _signal_lines(naive: dict[str, Any], prot: dict[str, Any]) -> list[tuple[str, str]]:
    sigs = prot.get("signals") or {}
    if not sigs:
        return []
    interval = (prot.get("shedder") or {}).get("sample_interval_s", 0.1)
    names = {"queue_depth": "line", "loop_lag": "loop lag", "cpu": "CPU"}
    return [
        ("signals", f"overload signals, sampled every {interval:g} s in both runs; the protected shop sheds by them "
                    "at its door (before the line),"),
        ("", "LOW / MEDIUM / HIGH from: " + ", ".join(f"{names.get(n, n)} {_thresholds(sig, n)}"
                                                      for n, sig in sigs.items())),
        ("", "priority: a guest's first try LOW, a signed-in customer's MEDIUM, a user back after Retry-After HIGH"),
        ("", f"protected shed: {_shed_by(prot)}"),
    ]
