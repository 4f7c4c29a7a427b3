"""The pure part of `orders-bench --scaling`: per-round figures summarized per configuration, the
ratios against one partition and one worker, and the tables (no I/O; orders_bench.scaling runs it).

A configuration is (P partitions, W worker processes). Each round of a configuration reports flat
figures, `rebuild_*` for the replay of the loaded log and `live_*` for the live window (see
orders_bench.scaling for what each one is); a summary is each figure's median and min-max over
the rounds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from orders_bench.stats import Figures, Spread, aligned, summarize_rounds

Config = tuple[int, int]  # (partitions, workers)
BASE: Config = (1, 1)
# The owners of CPU shown in the tables, in this order: everything the run's processes did.
CPU_OWNERS = ("workers", "postgres", "redis", "bench", "other")


def config_name(config: Config) -> str:
    """A configuration's name in the JSON and the logs: p2w4."""
    partitions, workers = config
    return f"p{partitions}w{workers}"


def parse_config(name: str) -> Config:
    """Inverse of `config_name`."""
    partitions, _, workers = name.removeprefix("p").partition("w")
    return int(partitions), int(workers)


def summarize(rounds: Mapping[Config, Sequence[Figures]]) -> dict[Config, dict[str, Spread]]:
    return {config: summarize_rounds(figures) for config, figures in rounds.items()}


def ratio(summaries: Mapping[Config, Mapping[str, Spread]], config: Config, figure: str) -> float | None:
    """The configuration's median of `figure` over that of one partition and one worker."""
    base = summaries.get(BASE, {}).get(figure)
    found = summaries.get(config, {}).get(figure)
    if base is None or found is None or not base.median:
        return None
    return found.median / base.median


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value >= 1 else f"{value:.2g}"


def _spread(figures: Mapping[str, Spread], name: str) -> str:
    found = figures.get(name)
    if found is None:
        return "-"
    return f"{_number(found.median)} ({_number(found.min)}–{_number(found.max)})"


def _median(figures: Mapping[str, Spread], name: str, digits: int = 0) -> str:
    found = figures.get(name)
    return "-" if found is None else f"{found.median:,.{digits}f}"


def _ratio(summaries: Mapping[Config, Mapping[str, Spread]], config: Config, figure: str) -> str:
    found = ratio(summaries, config, figure)
    return "-" if found is None else f"{found:.2f}x"


def _cpu(figures: Mapping[str, Spread], phase: str) -> str:
    return " ".join(f"{_median(figures, f'{phase}_cpu_{owner}_pct')}" for owner in CPU_OWNERS)


def render_rebuild(summaries: Mapping[Config, Mapping[str, Spread]], rounds: int) -> str:
    header = ["P", "W", f"rebuild events/s (min–max of {rounds})", "vs P1 W1", "worker µs/event"]
    header += ["Redis µs/batch", "Redis in B/event", "events/batch", "CPU % " + "/".join(CPU_OWNERS)]
    lines = [header]
    for config, figures in summaries.items():
        lines.append(
            [
                str(config[0]),
                str(config[1]),
                _spread(figures, "rebuild_rate"),
                _ratio(summaries, config, "rebuild_rate"),
                _median(figures, "rebuild_worker_us_per_event", 1),
                _median(figures, "rebuild_redis_us_per_batch"),
                _median(figures, "rebuild_redis_in_bytes_per_event"),
                _median(figures, "rebuild_events_per_batch"),
                _cpu(figures, "rebuild"),
            ]
        )
    return aligned(lines)


def render_live(summaries: Mapping[Config, Mapping[str, Spread]], rounds: int) -> str:
    header = ["P", "W", f"live applied events/s (min–max of {rounds})", "vs P1 W1", "appended/s"]
    header += ["lag p50/p99 ms", "backlog at end", "worker µs/event", "CPU % " + "/".join(CPU_OWNERS)]
    lines = [header]
    for config, figures in summaries.items():
        lag = f"{_median(figures, 'live_lag_p50_ms')}/{_median(figures, 'live_lag_p99_ms')}"
        lines.append(
            [
                str(config[0]),
                str(config[1]),
                _spread(figures, "live_rate"),
                _ratio(summaries, config, "live_rate"),
                _median(figures, "live_appended_rate"),
                lag,
                _median(figures, "live_backlog_events"),
                _median(figures, "live_worker_us_per_event", 1),
                _cpu(figures, "live"),
            ]
        )
    return aligned(lines)


def render_log_read(log_read: Mapping[str, float]) -> str:
    """One line: what one reader of the log costs, the model's first limit."""
    if not log_read:
        return "log read: not measured"
    return (
        f"log read (one reader, batches of {log_read['batch_size']:.0f}): {log_read['ms_per_batch']:.2f} ms per batch,"
        f" {log_read['events_per_s']:,.0f} events/s, PostgreSQL {log_read['postgres_us_per_event']:.1f} µs"
        f" and reader {log_read['reader_us_per_event']:.1f} µs of CPU per event"
        + (f", {log_read['bytes_per_event']:.0f} bytes per row" if "bytes_per_event" in log_read else "")
    )


def as_json(summaries: Mapping[Config, Mapping[str, Spread]]) -> dict[str, Any]:
    """Each configuration's summary and its ratios against one partition and one worker."""
    return {
        config_name(config): {
            "summary": {name: spread.as_dict() for name, spread in figures.items()},
            "rebuild_ratio": ratio(summaries, config, "rebuild_rate"),
            "live_ratio": ratio(summaries, config, "live_rate"),
        }
        for config, figures in summaries.items()
    }
