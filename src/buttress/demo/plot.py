"""``--plot FILE``: the two runs second by second on shared axes, the fault windows shaded (needs matplotlib).

`check_path` runs before the demo does (a bad path is an error at once, not after the runs)."""
from __future__ import annotations

import math
import os
from typing import Any

__all__ = ["check_path", "draw"]

COLORS = {"naive": "tab:red", "protected": "tab:blue"}


def check_path(path: str) -> str | None:
    """None when `path` can be drawn to, else the reason it cannot (one line)."""
    if not path.strip():
        return "--plot: the path is empty; give a file name such as demo.png"
    try:
        from matplotlib.backend_bases import FigureCanvasBase  # type: ignore[import-not-found, unused-ignore]  # the plot extra
    except ImportError:
        return "--plot needs matplotlib, which is not installed (pip install matplotlib, or the plot extra)"
    if os.path.isdir(path):
        return f"--plot: {path!r} is a folder; give a file name such as {os.path.join(path, 'demo.png')!r}"
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    kinds = FigureCanvasBase.get_supported_filetypes()
    if ext not in kinds:
        what = f"a .{ext} file" if ext else "a file without an extension"
        return f"--plot: cannot draw {what} ({path!r}); end the name with .png (or .{', .'.join(sorted(kinds))})"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"--plot: folder {folder!r} does not exist"
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):      # the only reliable test of "can I write there" (also as root, on /sys)
            pass
    except OSError as exc:
        return f"--plot: cannot write {path!r}: {exc.strerror or exc}"
    if not existed:
        os.remove(path)
    return None


def draw(result: dict[str, Any], path: str) -> None:
    import matplotlib  # type: ignore[import-not-found, unused-ignore]  # the plot extra
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]  # the plot extra

    runs = result["runs"]
    faults = result["faults"]
    span = len(next(iter(runs.values()))["series"])
    fig, axes = plt.subplots(5, 1, sharex=True, figsize=(10, 13))
    done, failed, rejected, p99, line = axes
    first = next(iter(runs.values()))["series"]
    xs = [s["t"] for s in first] + [span]

    def steps(ax: Any, values: list[Any], **kw: Any) -> None:
        ax.step(xs, values + values[-1:], where="post", **kw)

    steps(done, [s["arrivals"] for s in first], color="0.55", linestyle=":", linewidth=1.5,
          label="users attempting (arrivals)")
    for name, run in runs.items():
        s = run["series"]
        c = COLORS.get(name)
        steps(done, [x["completed"] for x in s], color=c, linewidth=2, label=name)
        steps(failed, [x["failed_after_wait"] for x in s], color=c, linewidth=2, label=name)
        steps(rejected, [x["fast_refusals"] for x in s], color=c, linewidth=2, label=name)
        steps(p99, [math.nan if x["p99_ms"] is None else x["p99_ms"] / 1e3 for x in s], color=c, linewidth=2,
              label=name)
        steps(line, [x["in_shop"] for x in s], color=c, linewidth=2, label=f"{name}: in the shop")
        steps(line, [x["waiting_for_worker"] for x in s], color=c, linewidth=1, linestyle="--",
              label=f"{name}: of which waiting for a worker")
    top = max(max(x["arrivals"], x["completed"], x["failed_after_wait"], x["fast_refusals"])
              for run in runs.values() for x in run["series"])
    for ax in (done, failed, rejected):     # the three counts on one scale, so their heights compare
        ax.set_ylim(0, top * 1.1 + 1)
    p99.set_yscale("log")
    line.axhline(result["workers"], color="0.3", linewidth=0.8)
    line.text(0.2, result["workers"], f" {result['workers']} workers: beyond this, checkouts wait in line",
              va="bottom", fontsize="small", color="0.3")
    titles = [
        "completed checkouts per second (goodput), and users attempting per second",
        "checkouts that failed after the user waited (an error, or the user gave up after 5 s), per second",
        "fast refusals per second: told within 100 ms to try again in N s (Retry-After); users do, within 5 s",
        "p99 latency of the checkouts that arrived in that second: arrival to final answer, s (log scale)",
        "checkouts in the shop at once (the pile-up): in progress + waiting for a worker",
    ]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize="medium", loc="left")
        ax.axvspan(*faults["payment_outage"], color="red", alpha=0.10, linewidth=0)
        ax.axvspan(*faults["recommendations_outage"], color="orange", alpha=0.15, linewidth=0)
        ax.axvline(result["duration_s"], color="0.3", linewidth=0.8, linestyle="--")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper right")
    done.text(sum(faults["payment_outage"]) / 2, 0.02, "payment\noutage", transform=done.get_xaxis_transform(),
              ha="center", va="bottom", fontsize="small", color="darkred")
    done.text(sum(faults["recommendations_outage"]) / 2, 0.02, "recommendations\noutage",
              transform=done.get_xaxis_transform(), ha="center", va="bottom", fontsize="small", color="darkorange")
    done.text(result["duration_s"], 0.02, " last arrival", transform=done.get_xaxis_transform(), ha="left",
              va="bottom", fontsize="small", color="0.3")
    line.set_xlabel("seconds since the start of the run (both runs replay the same arrivals and faults)")
    line.set_xlim(0, span)
    fig.suptitle(f"buttress demo: the same {result['arrivals']:,} checkouts (Poisson {result['rate_per_s']:g}/s for "
                 f"{result['duration_s']:g} s, seed {result['seed']}), naive vs protected, "
                 f"transport {result['transport']}", fontsize="medium")
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    fig.savefig(path, dpi=90)
    plt.close(fig)
