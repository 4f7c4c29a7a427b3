"""The pure part of the soak (`orders-bench --soak`): one window's figures from the calls the
client saw in it, the fitted growth of each process's memory, the verdict and the printed summary.

No I/O: tests/unit/test_bench_soak.py covers it.

How "flat" is decided (docs/performance.md, Soak):

- Memory of each service process: a least-squares line through its RSS over the windows after the
  warm-up (the first WARMUP_SHARE of the windows, at least one), as MB per hour and as a share of
  its mean level per hour. Flat when under FLAT_PCT_PER_HOUR: a process growing 5% an hour
  doubles within a day, a leak to fix; below that, a run of minutes cannot tell growth from the
  allocator's steps. The slope of the last half alone tells a bounded cache that filled early in
  the run ("levelled": flat in the last half) from steady growth.
- PostgreSQL is a server with its own bounded caches (shared buffers): its memory is reported and
  judged the same way, but kept out of the overall verdict, which is about this system's code.
- Redis holds every order's views for good, so its memory grows with the orders: it is judged by
  memory and keys per order created, flat when the last window's exceed the middle window's by no
  more than PER_ORDER_TOLERANCE (growing per order, not shrinking, is what a leak does). At a
  constant rate this cannot tell a leak that grows with time from data; keys per order catch keys
  left behind.
- Latency: the median of the windows' p99 in the last third against the first third (after the
  warm-up); flat when the ratio is under LATENCY_RATIO (p99 of one window on a shared 2-core
  machine moves by a third between windows).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orders_bench.stats import aligned, percentile

WARMUP_SHARE = 0.2  # of the windows, left out of the fits
FLAT_PCT_PER_HOUR = 5.0  # fitted RSS growth, % of its level per hour, under which a process is flat
PER_ORDER_TOLERANCE = 0.10  # Redis bytes and keys per order: last window against the middle one
LATENCY_RATIO = 1.5  # p99 of the last third over the first third, under which latency is flat
SERVICES = ("write_service", "read_service", "sync_worker")
SERVERS = ("postgres", "redis")
MB = 1024 * 1024
SERVER_NOTES = {
    "postgres": " (server, not in the verdict: its buffers fill)",
    "redis": " (server, grows with the orders: judged per order below)",
}

Window = dict[str, Any]  # one window's record in the JSON: figures, and maps by process


# ------------------------------------------------------------------------------ one window


def _ms_figures(prefix: str, seconds: Sequence[float]) -> dict[str, float]:
    if not seconds:
        return {}
    return {f"{prefix}_p50_ms": 1000 * percentile(seconds, 50), f"{prefix}_p99_ms": 1000 * percentile(seconds, 99)}


def call_figures(calls: Mapping[str, Any]) -> dict[str, Any]:
    """A window's figures from what the soak client saw in it (orders_bench.soak_load.Tally):
    ack and query latency p50/p99, lag p50/p99, how many of each, errors by code."""
    acks, queries, lags = calls["acks"], calls["queries"], calls["lags"]
    figures: dict[str, Any] = {
        "commands": len(acks),
        "queries": len(queries),
        "lags": len(lags),
        "lag_missing": calls["lag_missing"],
        "orders_created": calls["created"],
        "errors": dict(calls["errors"]),
    }
    figures |= _ms_figures("ack", acks) | _ms_figures("query", queries) | _ms_figures("lag", lags)
    return figures


# ------------------------------------------------------------------------------ fits


def slope_per_hour(seconds: Sequence[float], values: Sequence[float]) -> float | None:
    """The least-squares slope of `values` against time, per hour; None with fewer than two points
    (or all at one time)."""
    if len(seconds) < 2 or len(set(seconds)) < 2:
        return None
    return statistics.linear_regression(seconds, values).slope * 3600


def warmup_windows(count: int) -> int:
    """How many of `count` windows the fits leave out: WARMUP_SHARE of them, at least one."""
    return max(1, round(count * WARMUP_SHARE))


@dataclass(frozen=True)
class Growth:
    """One process's memory over the run, MB."""

    owner: str
    start_mb: float  # at the end of the first window after the warm-up
    end_mb: float
    slope_mb_per_hour: float | None
    pct_per_hour: float | None  # the slope as a share of the mean level
    last_half_pct_per_hour: float | None

    @property
    def verdict(self) -> str:
        if self.pct_per_hour is None:
            return "too short"
        if self.pct_per_hour < FLAT_PCT_PER_HOUR:  # shrinking is flat too
            return "flat"
        last = self.last_half_pct_per_hour
        return "levelled" if last is not None and last < FLAT_PCT_PER_HOUR else "growing"


def _relative(slope: float | None, level: float) -> float | None:
    return None if slope is None or level <= 0 else 100 * slope / level


def memory_growth(owner: str, seconds: Sequence[float], mb: Sequence[float]) -> Growth:
    """The fit of one process's memory (`mb` at the ends of the windows, `seconds` into the run)."""
    skip = warmup_windows(len(mb))
    t, v = list(seconds[skip:]), list(mb[skip:])
    if not v:
        t, v = list(seconds), list(mb)
    level = statistics.fmean(v) if v else 0.0
    half = len(v) // 2
    slope = slope_per_hour(t, v)
    last_half = slope_per_hour(t[half:], v[half:])
    start, end = (v[0], v[-1]) if v else (0.0, 0.0)
    return Growth(owner, start, end, slope, _relative(slope, level), _relative(last_half, level))


@dataclass(frozen=True)
class PerOrder:
    """Redis memory and keys per order created since the first window: at the middle window and
    the last one."""

    bytes_middle: float | None
    bytes_end: float | None
    keys_middle: float | None
    keys_end: float | None

    @staticmethod
    def _stable(middle: float | None, end: float | None) -> bool:
        """Not grown by more than the tolerance (less per order as the run goes on is no leak: the
        first windows' share of fixed costs thins out)."""
        return middle is not None and end is not None and end <= middle + PER_ORDER_TOLERANCE * abs(middle)

    @property
    def verdict(self) -> str:
        if None in (self.bytes_middle, self.bytes_end, self.keys_middle, self.keys_end):
            return "too short"
        stable = self._stable(self.bytes_middle, self.bytes_end) and self._stable(self.keys_middle, self.keys_end)
        return "grows with the data" if stable else "grows faster than the data"


def _per_order(windows: Sequence[Window], index: int, key: str) -> float | None:
    orders = windows[index]["orders_total"] - windows[0]["orders_total"]
    grown = windows[index]["redis"][key] - windows[0]["redis"][key]
    return grown / orders if orders > 0 else None


def redis_per_order(windows: Sequence[Window]) -> PerOrder:
    if len(windows) < 3:
        return PerOrder(None, None, None, None)
    middle, last = len(windows) // 2, len(windows) - 1
    return PerOrder(
        _per_order(windows, middle, "used_memory"),
        _per_order(windows, last, "used_memory"),
        _per_order(windows, middle, "prefix_keys"),
        _per_order(windows, last, "prefix_keys"),
    )


@dataclass(frozen=True)
class Drift:
    """A latency's p99 (median of the windows') in the first and last third after the warm-up."""

    name: str
    first_ms: float | None
    last_ms: float | None

    @property
    def ratio(self) -> float | None:
        if self.first_ms is None or self.last_ms is None or self.first_ms <= 0:
            return None
        return self.last_ms / self.first_ms

    @property
    def verdict(self) -> str:
        ratio = self.ratio
        if ratio is None:
            return "too short"
        return "flat" if ratio < LATENCY_RATIO else "rising"


def latency_drift(name: str, windows: Sequence[Window]) -> Drift:
    kept = windows[warmup_windows(len(windows)) :]
    values = [w[f"{name}_p99_ms"] for w in kept if f"{name}_p99_ms" in w]
    third = len(values) // 3
    if third < 1:
        return Drift(name, None, None)
    return Drift(name, statistics.median(values[:third]), statistics.median(values[-third:]))


# ------------------------------------------------------------------------------ the run


@dataclass(frozen=True)
class Summary:
    growth: list[Growth]
    per_order: PerOrder
    drifts: list[Drift]

    @property
    def flat(self) -> bool:
        """The overall verdict: the services' memory, Redis per order, every latency."""
        services = [g for g in self.growth if g.owner in SERVICES]
        return (
            bool(services)
            and all(g.verdict in {"flat", "levelled"} for g in services)
            and self.per_order.verdict == "grows with the data"
            and all(d.verdict == "flat" for d in self.drifts)
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "memory": [g.__dict__ | {"verdict": g.verdict} for g in self.growth],
            "redis_per_order": self.per_order.__dict__ | {"verdict": self.per_order.verdict},
            "latency_p99": [d.__dict__ | {"ratio": d.ratio, "verdict": d.verdict} for d in self.drifts],
            "flat": self.flat,
            "thresholds": {
                "warmup_share": WARMUP_SHARE,
                "flat_pct_per_hour": FLAT_PCT_PER_HOUR,
                "per_order_tolerance": PER_ORDER_TOLERANCE,
                "latency_ratio": LATENCY_RATIO,
            },
        }


def memory_series(windows: Sequence[Window], owner: str) -> list[float]:
    """One owner's memory at the end of each window, MB: PostgreSQL's proportional share (its
    processes share their buffers), the others' RSS."""
    key = "pss_mb" if owner == "postgres" and all("postgres" in w["pss_mb"] for w in windows) else "rss_mb"
    return [w[key].get(owner, 0.0) for w in windows]


def summarize(windows: Sequence[Window]) -> Summary:
    seconds = [w["t_s"] for w in windows]
    owners = [o for o in (*SERVICES, *SERVERS) if windows and all(o in w["rss_mb"] for w in windows)]
    growth = [memory_growth(o, seconds, memory_series(windows, o)) for o in owners]
    drifts = [latency_drift(name, windows) for name in ("ack", "query", "lag")]
    return Summary(growth, redis_per_order(windows), drifts)


def _num(value: float | None, pattern: str = "{:+.1f}") -> str:
    return "-" if value is None else pattern.format(value)


def render_summary(summary: Summary) -> str:
    lines = [["memory (MB)", "start", "end", "MB/h", "%/h", "last half %/h", "verdict"]]
    for g in summary.growth:
        note = SERVER_NOTES.get(g.owner, "")
        lines.append(
            [
                g.owner,
                f"{g.start_mb:.1f}",
                f"{g.end_mb:.1f}",
                _num(g.slope_mb_per_hour),
                _num(g.pct_per_hour),
                _num(g.last_half_pct_per_hour),
                g.verdict + note,
            ]
        )
    p = summary.per_order
    redis = (
        f"Redis per order created: {_num(p.bytes_middle, '{:,.0f}')} bytes and {_num(p.keys_middle, '{:.2f}')} keys"
        f" at the middle window, {_num(p.bytes_end, '{:,.0f}')} bytes and {_num(p.keys_end, '{:.2f}')} keys at"
        f" the end: {p.verdict}"
    )
    latency = [["latency p99 (ms)", "first third", "last third", "ratio", "verdict"]]
    for d in summary.drifts:
        latency.append(
            [d.name, _num(d.first_ms, "{:.2f}"), _num(d.last_ms, "{:.2f}"), _num(d.ratio, "{:.2f}x"), d.verdict]
        )
    verdict = "verdict: flat" if summary.flat else "verdict: NOT flat (see the lines above)"
    rule = (
        f"(flat: services' RSS fit after the warm-up under {FLAT_PCT_PER_HOUR:g}%/h of their level, or levelled in"
        f" the last half; Redis per order up by under {100 * PER_ORDER_TOLERANCE:.0f}%; p99 last/first third under"
        f" {LATENCY_RATIO:g}x)"
    )
    return "\n".join([aligned(lines), redis, "", aligned(latency), "", f"{verdict} {rule}"])


def progress_line(window: Window) -> str:
    """One line per window on stderr, so a long run shows it is alive."""
    rss = window["rss_mb"]
    memory = " ".join(f"{_SHORT.get(o, o)} {rss[o]:.0f}" for o in (*SERVICES, *SERVERS) if o in rss)
    errors = sum(window["errors"].values())
    return (
        f"window {window['index'] + 1}: {window['commands']} cmds, {window['queries']} queries,"
        f" ack p99 {window.get('ack_p99_ms', 0):.1f} ms, query p99 {window.get('query_p99_ms', 0):.1f} ms,"
        f" lag p99 {window.get('lag_p99_ms', 0):.1f} ms, {errors} errors; RSS MB {memory};"
        f" {window['orders_total']:,} orders, {window['redis']['prefix_keys']:,} keys"
    )


_SHORT = {"write_service": "write", "read_service": "read", "sync_worker": "worker", "postgres": "pg"}
