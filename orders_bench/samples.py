"""The samples kept for the plots (orders_bench/plots.py), made compact so that the JSON stays small:
per-call latencies as a fixed set of percentiles, the lag of each command against time (thinned to
a bounded number of points, keeping the worst), and the rebuild's progress (thinned evenly).

Pure, no I/O: tests/unit/test_bench_plots.py builds its results through these functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from orders_bench.stats import percentiles

Samples = dict[str, Any]  # one round's samples of one measurement, JSON-ready (lists, numbers, strings)

# Percentiles kept of each round's latencies: every 2nd up to 90, then every one, and the far tail.
LATENCY_QUANTILES: tuple[float, ...] = (*range(0, 90, 2), *range(90, 100), 99.5, 99.9, 100)
SERIES_POINTS = 1000  # at most this many (time, lag) points per round
PROGRESS_POINTS = 200  # at most this many points of a rebuild's progress


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)  # µs resolution: the clocks do not resolve better across processes


def latency_quantiles(seconds: Sequence[float]) -> list[float]:
    """The LATENCY_QUANTILES of `seconds`, in ms; empty when there is no sample."""
    if not seconds:
        return []
    return [_ms(value) for value in percentiles(seconds, LATENCY_QUANTILES)]


def lag_series(points: Sequence[tuple[float, float]], window_start: float) -> Samples:
    """Each command's lag against the time of its ack, from (ack wall time, lag seconds) pairs,
    time in seconds from the measured window's start. Beyond SERIES_POINTS, the commands are cut
    into SERIES_POINTS runs of consecutive acks and each run keeps its worst lag ("worst_of" says
    how many commands one point stands for), so that spikes survive the thinning."""
    ordered = sorted(points)
    per_point = max(1, -(-len(ordered) // SERIES_POINTS))
    runs = [ordered[i : i + per_point] for i in range(0, len(ordered), per_point)]
    kept = [max(run, key=lambda point: point[1]) for run in runs]
    return {
        "t_s": [round(at - window_start, 4) for at, _ in kept],
        "lag_ms": [_ms(lag) for _, lag in kept],
        "worst_of": per_point,
    }


def progress_series(points: Sequence[tuple[float, Mapping[str, int]]], events: int) -> Samples:
    """A rebuild's progress from (seconds since the worker started, events applied per projection)
    readings, thinned evenly to PROGRESS_POINTS (the last reading always kept); `events` is the
    log's length, where every projection ends."""
    step = max(1, -(-len(points) // PROGRESS_POINTS))
    kept = list(points[::step])
    if points and kept[-1] is not points[-1]:
        kept.append(points[-1])
    projections = sorted({name for _, applied in kept for name in applied})
    return {
        "t_s": [round(at, 3) for at, _ in kept],
        "applied": {name: [applied.get(name, 0) for _, applied in kept] for name in projections},
        "events": events,
    }
