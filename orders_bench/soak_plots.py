"""Plots of a soak's results (`orders-bench --soak`), drawn as orders_bench/plots.py draws the
benchmark's (Agg canvas, 256-colour PNG), each against minutes into the run, one point per window:

- soak-memory.png: each service's RSS (left); PostgreSQL's proportional share and Redis' used
  memory, with Redis' bytes per order created on a second axis (right);
- soak-latency.png: ack and query latency, p50 and p99 of each window;
- soak-lag.png: lag from ack to the order's change on a watch stream, p50 and p99 of each window,
  and the watched commands never seen within the give-up time.

The warm-up left out of the fits is shaded. matplotlib is optional: orders_bench.main imports this
module only to plot.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from orders_bench.plots import DPI, SIZE, draw_all
from orders_bench.soak_stats import SERVICES, memory_series, warmup_windows

Results = Mapping[str, Any]  # the JSON of a soak, as orders_bench.soak.soak_run makes it
MB = 1024 * 1024


def write_plots(results: Results, directory: Path) -> tuple[list[Path], list[str]]:
    """Writes the soak's plots into `directory`; returns the files written and the plots left out
    for lack of data (a soak without windows)."""
    drawers: dict[str, Callable[[Results], Figure | None]] = {
        "memory": memory_plot,
        "latency": latency_plot,
        "lag": lag_plot,
    }
    return draw_all(results, directory, "soak", drawers, _caption)


def _caption(figure: Figure, results: Results) -> None:
    s, machine = results.get("settings", {}), results.get("machine", {})
    parts = [f"orders-bench --soak {results.get('started_at', '')}"]
    if s:
        parts.append(f"{s['rate']:g} commands/s, {s['query_rate']:g} queries/s, {s['streams']} watch streams")
        parts.append(f"windows of {s['window']:g} s")
    if machine:
        parts.append(f"{machine.get('cpu_count')} CPUs, commit {str(machine.get('git_commit', ''))[:10]}")
    figure.supxlabel(", ".join(parts), fontsize=7, color="dimgray", x=0.01, ha="left")


def _minutes(windows: Sequence[Mapping[str, Any]]) -> list[float]:
    return [w["t_s"] / 60 for w in windows]


def _panels(count: int) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    return figure, list(figure.subplots(1, count, squeeze=False)[0])


def _frame(axes: Axes, windows: Sequence[Mapping[str, Any]], ylabel: str) -> None:
    """Labels, grid, and the warm-up shaded."""
    warmup = windows[warmup_windows(len(windows)) - 1]["t_s"] / 60
    axes.axvspan(0, warmup, color="lightgray", alpha=0.4, label="warm-up (not fitted)")
    axes.set_xlabel("minutes into the run")
    axes.set_ylabel(ylabel)
    axes.set_ylim(bottom=0)
    axes.grid(True, linewidth=0.3)


def memory_plot(results: Results) -> Figure | None:
    windows = results.get("windows", [])
    if not windows:
        return None
    t = _minutes(windows)
    figure, (services, servers) = _panels(2)
    for owner in SERVICES:
        services.plot(t, memory_series(windows, owner), marker=".", linewidth=1.2, label=owner)
    _frame(services, windows, "RSS, MB")
    services.set_title("the services' processes", fontsize=9)
    services.legend(fontsize=7, loc="lower right")
    pg = memory_series(windows, "postgres")
    servers.plot(t, pg, marker=".", linewidth=1.2, color="C3", label="PostgreSQL (Pss, its processes)")
    used = [w["redis"]["used_memory"] / MB for w in windows]
    servers.plot(t, used, marker=".", linewidth=1.2, color="C4", label="Redis used_memory")
    _frame(servers, windows, "MB")
    servers.set_title("the servers", fontsize=9)
    per_order = servers.twinx()
    base = windows[0]
    points = [(m, _bytes_per_order(base, w)) for m, w in zip(t, windows, strict=True)]
    shown = [(m, b) for m, b in points if b is not None]
    per_order.plot([m for m, _ in shown], [b for _, b in shown], ":", color="C5", label="Redis bytes per order")
    per_order.set_ylabel("Redis bytes per order created", fontsize=8)
    per_order.set_ylim(bottom=0)
    handles = servers.get_legend_handles_labels()[0] + per_order.get_legend_handles_labels()[0]
    servers.legend(handles=handles, fontsize=7, loc="lower right")
    figure.suptitle("Memory per process over the soak (one point per window)", fontsize=11)
    return figure


def _bytes_per_order(base: Mapping[str, Any], window: Mapping[str, Any]) -> float | None:
    orders = window["orders_total"] - base["orders_total"]
    grown = window["redis"]["used_memory"] - base["redis"]["used_memory"]
    return grown / orders if orders > 0 else None


def _percentiles(axes: Axes, windows: Sequence[Mapping[str, Any]], name: str, label: str, colour: str) -> None:
    t = _minutes(windows)
    for quantile, style in (("p99", "-"), ("p50", "--")):
        key = f"{name}_{quantile}_ms"
        points = [(m, w[key]) for m, w in zip(t, windows, strict=True) if key in w]
        axes.plot([m for m, _ in points], [v for _, v in points], style, marker=".", color=colour,
                  linewidth=1.2, label=f"{label} {quantile}")  # fmt: skip


def latency_plot(results: Results) -> Figure | None:
    windows = results.get("windows", [])
    if not windows:
        return None
    figure, (axes,) = _panels(1)
    _percentiles(axes, windows, "ack", "command ack", "C0")
    _percentiles(axes, windows, "query", "query", "C1")
    _frame(axes, windows, "latency, ms")
    axes.legend(fontsize=7, loc="upper left")
    figure.suptitle("Latency per window: command acks and queries (open loop, from the scheduled time)", fontsize=11)
    return figure


def lag_plot(results: Results) -> Figure | None:
    windows = results.get("windows", [])
    if not windows or not any("lag_p99_ms" in w for w in windows):
        return None
    figure, (axes,) = _panels(1)
    _percentiles(axes, windows, "lag", "lag", "C2")
    _frame(axes, windows, "lag, ms")
    missing = [(m, w["lag_missing"]) for m, w in zip(_minutes(windows), windows, strict=True) if w["lag_missing"]]
    if missing:
        counts = axes.twinx()
        counts.bar([m for m, _ in missing], [n for _, n in missing], width=0.05, color="tab:red", label="missing")
        counts.set_ylabel("watched commands not seen in time", fontsize=8)
    axes.legend(fontsize=7, loc="upper left")
    figure.suptitle("Lag from ack to the change on a WatchCustomerOrders stream, per window", fontsize=11)
    return figure
