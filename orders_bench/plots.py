"""Plots of a run's results (the JSON `orders-bench` writes), as PNG files of a few tens of KB:

- bench-latency.png: per-call latency percentiles of each path, closed loop and open loop (the
  median over rounds of each percentile, as the table's p50 and p99 are);
- bench-lag.png: each command's lag from ack to visible against time, every round;
- bench-rebuild.png: events applied against time during each rebuild, with the MULTI ceiling's pace;
- bench-throughput.png: each measurement's rate (median, min-max whiskers) against the ceilings,
  with the issue's targets marked.

A plot whose data the run lacks (a measurement not run, or a JSON from before the samples were
kept) is left out. Drawn with matplotlib's Agg canvas, no display needed; matplotlib is an optional
extra (orders-cqrs[bench]), so orders_bench.main imports this module only when asked to plot.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image  # a dependency of matplotlib

Results = Mapping[str, Any]  # the JSON of a run, as orders_bench.main.to_json makes it

DPI = 100
SIZE = (10.0, 5.6)  # inches: 1000 x 560 pixels
WIDE = (12.0, 5.6)
OURS, NAIVE, CEILING = "tab:blue", "tab:orange", "tab:gray"
TARGET = "tab:red"
CLOSED_PATHS = [
    "echo",
    "stack-create",
    "stack-get",
    "create",
    "lifecycle",
    "create-x2",
    "get",
    "list",
    "get-x2",
    "naive-create",
    "naive-get",
]
# (measurement, sample, what it is): the open-loop ones at the run's rate.
OPEN_PATHS = [
    ("ack", "latency_ms", "CreateOrder ack"),
    ("lag", "lag_ms", "lag: ack -> WatchCustomerOrders"),
    ("naive-ack", "latency_ms", "naive: CreateOrder ack"),
    ("naive-lag", "lag_ms", "naive: lag ack -> key in Redis"),
]
OPEN_LOOP_TARGET_MS = 10.0  # the ack p99 and lag p99 targets
LAG_PATHS = ["lag", "naive-lag"]
REBUILD_PATHS = ["rebuild", "rebuild-split"]
GRPC_RATES = [
    "echo",
    "stack-create",
    "stack-get",
    "create",
    "lifecycle",
    "create-x2",
    "naive-create",
    "get",
    "list",
    "get-x2",
    "naive-get",
]
STORE_RATES = ["pg-insert", "redis-get", "redis-multi", "rebuild", "rebuild-split"]
CEILINGS = {"echo", "stack-create", "stack-get", "pg-insert", "redis-get", "redis-multi"}
PERCENTILE_TICKS = {0: "p0", 50: "p50", 90: "p90", 99: "p99", 99.9: "p99.9"}


def write_plots(results: Results, directory: Path) -> tuple[list[Path], list[str]]:
    """Writes every plot the results have data for into `directory`; returns the files written and
    the names of the plots left out for lack of data."""
    drawers: dict[str, Callable[[Results], Figure | None]] = {
        "latency": latency_plot,
        "lag": lag_plot,
        "rebuild": rebuild_plot,
        "throughput": throughput_plot,
    }
    return draw_all(results, directory, "bench", drawers, _caption)


def draw_all(
    results: Results,
    directory: Path,
    prefix: str,
    drawers: Mapping[str, Callable[[Results], Figure | None]],
    caption: Callable[[Figure, Results], None],
) -> tuple[list[Path], list[str]]:
    """Draws each of `drawers` that has data into `directory` as `<prefix>-<name>.png`, captioned;
    returns the files written and the names left out for lack of data."""
    directory.mkdir(parents=True, exist_ok=True)
    written, lacking = [], []
    for name, draw in drawers.items():
        figure = draw(results)
        if figure is None:
            lacking.append(name)
            continue
        caption(figure, results)
        path = directory / f"{prefix}-{name}.png"
        save_png(figure, path)
        written.append(path)
    return written, lacking


def save_png(figure: Figure, path: Path) -> None:
    """Draws on Agg (no display needed) and saves with a palette of 256 colours: a third of the
    bytes of full colour, the same to the eye for lines, dots and text on white."""
    FigureCanvasAgg(figure)
    drawn = io.BytesIO()
    figure.savefig(drawn, format="png")
    drawn.seek(0)
    with Image.open(drawn) as image:
        image.convert("RGB").quantize(colors=256).save(path, format="PNG", optimize=True)


def _new_figure(panels: int, size: tuple[float, float] = SIZE) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    return figure, list(axes)


def _caption(figure: Figure, results: Results) -> None:
    """Which run the plot comes from, under it."""
    settings, machine = results.get("settings", {}), results.get("machine", {})
    parts = [f"orders-bench {results.get('started_at', '')}"]
    if settings:
        parts.append(f"{settings['rounds']} rounds of {settings['duration']:g} s")
    if machine:
        parts.append(f"{machine.get('cpu_count')} CPUs")
        parts.append(f"commit {str(machine.get('git_commit', ''))[:10]}")
    # As the figure's x label, the layout keeps room for it under the panels' own labels.
    figure.supxlabel(", ".join(parts), fontsize=7, color="dimgray", x=0.01, ha="left")


def _measurement(results: Results, name: str) -> Mapping[str, Any]:
    found: Mapping[str, Any] = results.get("measurements", {}).get(name, {})
    return found


def _label(results: Results, name: str) -> str:
    label = str(_measurement(results, name).get("label", name))
    return label.replace(" (ceiling)", "")


def _rate_text(results: Results) -> str:
    rate = results.get("settings", {}).get("rate")
    return f"{rate:g}/s" if rate else "a fixed rate"


def _colour(name: str) -> str:
    if name in CEILINGS:
        return CEILING
    return NAIVE if name.startswith("naive") else OURS


def _rounds_of(results: Results, name: str, sample: str) -> list[Any]:
    """The rounds' samples of one kind (empty ones left out)."""
    rounds = _measurement(results, name).get("samples", [])
    return [r[sample] for r in rounds if r.get(sample)]


# ------------------------------------------------------------------------------ latency


def median_quantiles(rounds: Sequence[Sequence[float]]) -> list[float]:
    """Each percentile's median over the rounds (how the table's p50 and p99 are made)."""
    return [statistics.median(column) for column in zip(*rounds, strict=True)]


def _tail_position(q: float) -> float:
    """Where percentile q sits on a tail axis: p0 at 0, p90 at 1, p99 at 2, p99.9 at 3."""
    return -math.log10(1 - q / 100)


def latency_plot(results: Results) -> Figure | None:
    quantiles = results.get("sample_quantiles")
    closed = [(n, _label(results, n), _rounds_of(results, n, "latency_ms")) for n in CLOSED_PATHS]
    opened = [(n, what, _rounds_of(results, n, sample)) for n, sample, what in OPEN_PATHS]
    closed, opened = [p for p in closed if p[2]], [p for p in opened if p[2]]
    if not quantiles or not (closed or opened):
        return None
    figure, axes = _new_figure(2)
    concurrency = results.get("settings", {}).get("concurrency", "")
    _latency_panel(axes[0], quantiles, closed, f"closed loop, {concurrency} calls in flight")
    _latency_panel(axes[1], quantiles, opened, f"open loop at {_rate_text(results)}")
    axes[1].axhline(OPEN_LOOP_TARGET_MS, color=TARGET, linestyle=":", linewidth=1, label="target p99 <= 10 ms")
    axes[1].legend(fontsize=7, loc="upper left")
    figure.suptitle("Per-call latency by percentile (median of the rounds)", fontsize=11)
    return figure


def _latency_panel(axes: Axes, quantiles: Sequence[float], paths: list[tuple[str, str, Any]], title: str) -> None:
    axes.set_title(title, fontsize=9)
    shown = [i for i, q in enumerate(quantiles) if q < 100]  # the maximum has no place on a tail axis
    x = [_tail_position(quantiles[i]) for i in shown]
    for index, (name, label, rounds) in enumerate(paths):
        y = median_quantiles(rounds)
        style = ":" if name in CEILINGS else "--" if name.startswith("naive") else "-"
        colour = f"C{index % 10}"
        axes.plot(x, [y[i] for i in shown], style, color=colour, linewidth=1.4, label=label)
    axes.set_yscale("log")
    axes.set_ylabel("latency, ms")
    axes.set_xticks([_tail_position(q) for q in PERCENTILE_TICKS], list(PERCENTILE_TICKS.values()))
    axes.set_xlabel("percentile")
    axes.grid(True, which="both", linewidth=0.3)
    if paths:
        axes.legend(fontsize=7, loc="upper left")


# ------------------------------------------------------------------------------ lag over time


def lag_plot(results: Results) -> Figure | None:
    paths = [(name, _rounds_of(results, name, "lag_series")) for name in LAG_PATHS]
    paths = [(name, series) for name, series in paths if series]
    if not paths:
        return None
    figure, axes = _new_figure(len(paths))
    for panel, (name, series) in zip(axes, paths, strict=True):
        for round_no, one in enumerate(series, start=1):
            panel.scatter(one["t_s"], one["lag_ms"], s=3, color=f"C{round_no - 1}", label=f"round {round_no}")
        worst_of = max(one.get("worst_of", 1) for one in series)
        panel.set_title(_label(results, name), fontsize=9)
        panel.set_xlabel("seconds into the measured window (ack time)")
        panel.set_ylabel("lag, ms" + (f" (worst of each {worst_of} commands)" if worst_of > 1 else ""))
        panel.set_ylim(bottom=0)
        panel.grid(True, linewidth=0.3)
        if name == "lag":
            panel.axhline(OPEN_LOOP_TARGET_MS, color=TARGET, linestyle=":", linewidth=1, label="target p99")
        panel.legend(fontsize=7, loc="upper right", markerscale=3)
    figure.suptitle(f"Lag from ack to visible, per command, at {_rate_text(results)}", fontsize=11)
    return figure


# ------------------------------------------------------------------------------ rebuild progress


def rebuild_plot(results: Results) -> Figure | None:
    paths = [(name, _rounds_of(results, name, "progress")) for name in REBUILD_PATHS]
    paths = [(name, progress) for name, progress in paths if progress]
    if not paths:
        return None
    figure, axes = _new_figure(len(paths))
    ceiling = _median_rate(results, "redis-multi")
    for panel, (name, progress) in zip(axes, paths, strict=True):
        _rebuild_panel(panel, progress, ceiling)
        panel.set_title(_label(results, name), fontsize=9)
    events = paths[0][1][0]["events"]
    figure.suptitle(f"Rebuild of {events:,} events: events applied per projection", fontsize=11)
    return figure


def _rebuild_panel(axes: Axes, progress: list[Any], ceiling: float | None) -> None:
    projections = sorted({p for one in progress for p in one["applied"]})
    for round_no, one in enumerate(progress, start=1):
        for index, projection in enumerate(projections):
            label = projection if round_no == 1 else None
            axes.plot(one["t_s"], one["applied"][projection], color=f"C{index}", linewidth=1, label=label)
    if ceiling:
        _pace(axes, progress[0], ceiling, "MULTI ceiling's pace", "-.")
        _pace(axes, progress[0], 0.6 * ceiling, "target: 0.6x its pace", ":")
    axes.set_xlabel("seconds since the worker started")
    axes.set_ylabel("events applied")
    axes.set_ylim(0, progress[0]["events"] * 1.05)
    axes.grid(True, linewidth=0.3)
    axes.legend(fontsize=7, loc="lower right")


def _pace(axes: Axes, progress: Mapping[str, Any], rate: float, label: str, style: str) -> None:
    """A straight line at `rate` events/s from where the first round began applying to the log's end."""
    totals = [sum(values) for values in zip(*progress["applied"].values(), strict=True)]
    began = next((t for t, n in zip(progress["t_s"], totals, strict=True) if n > 0), 0.0)
    events = progress["events"]
    axes.plot([began, began + events / rate], [0, events], style, color=TARGET, linewidth=1, label=label)


# ------------------------------------------------------------------------------ throughput


def _median_rate(results: Results, name: str) -> float | None:
    rate = _measurement(results, name).get("summary", {}).get("rate")
    return None if rate is None else float(rate["median"])


def throughput_plot(results: Results) -> Figure | None:
    grpc = [n for n in GRPC_RATES if _median_rate(results, n)]
    stores = [n for n in STORE_RATES if _median_rate(results, n)]
    if not (grpc or stores):
        return None
    panels = [(names, title) for names, title in ((grpc, "gRPC calls"), (stores, "stores and rebuild")) if names]
    figure, axes = _new_figure(len(panels), WIDE)  # room for the measurements' names
    targets = _rate_targets(results)
    for panel, (names, title) in zip(axes, panels, strict=True):
        _rate_panel(panel, results, names, targets)
        panel.set_title(title, fontsize=9)
    # One legend for both panels, beside them, where it hides no bar.
    shown = {_colour(n) for n in grpc + stores}
    kinds = {CEILING: "ceiling", OURS: "this system", NAIVE: "naive pipeline"}
    handles: list[Artist] = [Patch(color=colour, label=kind) for colour, kind in kinds.items() if colour in shown]
    for panel in axes:
        for handle, label in zip(*panel.get_legend_handles_labels(), strict=True):
            if label not in {h.get_label() for h in handles}:
                handles.append(handle)
    figure.legend(handles=handles, loc="outside right upper", fontsize=7)
    figure.suptitle("Throughput per measurement (median, min-max of the rounds) against the ceilings", fontsize=11)
    return figure


def _rate_targets(results: Results) -> dict[str, list[tuple[float, str]]]:
    """Per measurement, the rates its targets ask for, from the run's checks of the form
    'X.rate / Y.rate >= T': T times Y's median."""
    targets: dict[str, list[tuple[float, str]]] = {}
    for check in results.get("checks", []):
        numerator, denominator, target = check.get("numerator", ""), check.get("denominator"), check.get("target")
        if not (target and denominator and numerator.endswith(".rate") and denominator.endswith(".rate")):
            continue
        base = _median_rate(results, denominator.removesuffix(".rate"))
        if base is None:
            continue
        threshold = float(target.removeprefix(">=").removeprefix("<=").strip().removesuffix("x"))
        label = f"{threshold:g}x {denominator.removesuffix('.rate')}"
        targets.setdefault(numerator.removesuffix(".rate"), []).append((threshold * base, label))
    return targets


def _rate_panel(axes: Axes, results: Results, names: list[str], targets: Mapping[str, Any]) -> None:
    spreads = [_measurement(results, n)["summary"]["rate"] for n in names]
    medians = [s["median"] for s in spreads]
    whiskers = [
        [m - s["min"] for m, s in zip(medians, spreads, strict=True)],
        [s["max"] - m for m, s in zip(medians, spreads, strict=True)],
    ]
    rows = list(range(len(names)))
    axes.barh(rows, medians, xerr=whiskers, color=[_colour(n) for n in names], capsize=3, error_kw={"linewidth": 0.8})
    units = [_measurement(results, n).get("unit", "") for n in names]
    axes.set_yticks(rows, [f"{_label(results, n)} [{u}]" for n, u in zip(names, units, strict=True)], fontsize=7)
    axes.invert_yaxis()
    for row, median, spread in zip(rows, medians, spreads, strict=True):
        axes.text(spread["max"], row, f"  {median:,.0f}", va="center", ha="left", fontsize=7)
    marked = False
    for row, name in zip(rows, names, strict=True):
        for index, (rate, label) in enumerate(targets.get(name, [])):
            axes.plot(
                [rate, rate], [row - 0.4, row + 0.4], color=TARGET, linewidth=2, label=None if marked else "target"
            )
            axes.text(rate, row - 0.2 + 0.4 * (index % 2), f" {label}", color=TARGET, fontsize=6, va="center")
            marked = True
    echo = _median_rate(results, "echo")
    if echo and "echo" in names:
        axes.axvline(echo, color=CEILING, linestyle="--", linewidth=1, label="echo ceiling")
    axes.set_xlabel("per second")
    axes.grid(True, axis="x", linewidth=0.3)
    farthest = [s["max"] for s in spreads] + [rate for n in names for rate, _ in targets.get(n, [])]
    axes.set_xlim(0, max(farthest) * 1.25)
