"""The plot of a scaling run (`orders-bench --scaling`), drawn as orders_bench/plots.py draws the
benchmark's: scaling-throughput.png, events/s against worker processes, one line per partition
count (median, min-max whiskers), rebuild on the left and live apply on the right, with the ideal
line of P=1 W=1 times W for reference (2P loops share the W processes: W=2 splits even P=1).
matplotlib is optional: orders_bench.main imports this module only to plot.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from orders_bench.plots import DPI, SIZE, draw_all
from orders_bench.scaling_stats import BASE, parse_config

Results = Mapping[str, Any]  # the JSON of a scaling run, as orders_bench.scaling.results_json makes it
PHASES = {"rebuild_rate": "rebuild (log events/s)", "live_rate": "live apply (log events/s applied)"}


def write_plots(results: Results, directory: Path) -> tuple[list[Path], list[str]]:
    return draw_all(results, directory, "scaling", {"throughput": throughput_plot}, _caption)


def _caption(figure: Figure, results: Results) -> None:
    s, machine = results.get("settings", {}), results.get("machine", {})
    text = f"orders-bench --scaling {results.get('started_at', '')}"
    if s:
        text += f", {s['events']:,} events per rebuild, live windows of {s['live_seconds']:g} s, {s['rounds']} rounds"
    if machine:
        text += f", {machine.get('cpu_count')} CPUs, commit {str(machine.get('git_commit', ''))[:10]}"
    figure.supxlabel(text, fontsize=7, color="dimgray", x=0.01, ha="left")


def throughput_plot(results: Results) -> Figure | None:
    configs = {parse_config(name): entry["summary"] for name, entry in results.get("configs", {}).items()}
    if not configs:
        return None
    figure = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    for axes, (figure_name, title) in zip(figure.subplots(1, 2), PHASES.items(), strict=True):
        _phase(axes, configs, figure_name)
        axes.set_title(title, fontsize=10)
    return figure


def _phase(axes: Axes, configs: Mapping[tuple[int, int], Mapping[str, Any]], name: str) -> None:
    for partitions in sorted({p for p, _ in configs}):
        points = sorted((w, s[name]) for (p, w), s in configs.items() if p == partitions and name in s)
        if not points:
            continue
        workers = [w for w, _ in points]
        medians = [s["median"] for _, s in points]
        errors = [[s["median"] - s["min"] for _, s in points], [s["max"] - s["median"] for _, s in points]]
        axes.errorbar(workers, medians, yerr=errors, marker="o", capsize=3, label=f"P={partitions}")
    base = configs.get(BASE, {}).get(name)
    if base is not None:
        workers = sorted({w for _, w in configs})
        axes.plot(workers, [base["median"] * w for w in workers], ls=":", color="gray", label="P=1 W=1 x W")
    axes.set_xlabel("worker processes (W)")
    axes.set_xticks(sorted({w for _, w in configs}))
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
