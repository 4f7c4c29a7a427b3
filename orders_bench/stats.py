"""The pure part of the benchmark: percentiles, medians over rounds, ratios against targets, tables.

Nothing here does I/O, so it is unit-tested on its own (tests/unit/test_bench_stats.py).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Figures = dict[str, float]  # one round's figures of one measurement: "rate", "p50_ms", ...


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks (numpy's default)."""
    [found] = percentiles(values, [q])
    return found


def percentiles(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    """The percentiles `qs` (each 0-100) of `values`, as `percentile` gives them, sorting once."""
    if not values:
        raise ValueError("percentile of no values")
    if not all(0 <= q <= 100 for q in qs):
        raise ValueError(f"percentile must be within 0-100, got {list(qs)}")
    ordered = sorted(values)
    found = []
    for q in qs:
        rank = (len(ordered) - 1) * q / 100
        low, high = math.floor(rank), math.ceil(rank)
        found.append(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))
    return found


def latency_figures(seconds: Sequence[float]) -> Figures:
    """p50, p99 and max in milliseconds; empty when there is no sample."""
    if not seconds:
        return {}
    return {
        "p50_ms": percentile(seconds, 50) * 1000,
        "p99_ms": percentile(seconds, 99) * 1000,
        "max_ms": max(seconds) * 1000,
    }


@dataclass(frozen=True)
class Spread:
    """A figure over the rounds: the median is what counts, min and max show the noise."""

    median: float
    min: float
    max: float

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.min, "max": self.max}


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("spread of no values")
    return Spread(statistics.median(values), min(values), max(values))


def summarize_rounds(rounds: Sequence[Mapping[str, float]]) -> dict[str, Spread]:
    """Each figure's spread over the rounds that have it."""
    names = sorted({name for figures in rounds for name in figures})
    return {name: spread([figures[name] for figures in rounds if name in figures]) for name in names}


# ------------------------------------------------------------------------------ targets and ratios


@dataclass(frozen=True)
class Figure:
    """One figure of one measurement's summary, e.g. Figure("create", "rate")."""

    measurement: str
    name: str = "rate"


@dataclass(frozen=True)
class Check:
    """A ratio of two medians (`denominator` set) or one median (not set), with an optional target."""

    label: str
    numerator: Figure
    denominator: Figure | None = None
    op: str = ""  # ">=" or "<=", empty: shown without a target
    threshold: float = 0.0
    unit: str = "x"  # how value and threshold are shown: "x" (ratio) or "ms"


@dataclass(frozen=True)
class Verdict:
    check: Check
    value: float | None  # None: a measurement it needs was not run
    met: bool | None  # None: no target, or no value

    def as_dict(self) -> dict[str, object]:
        check = self.check
        return {
            "label": check.label,
            "numerator": f"{check.numerator.measurement}.{check.numerator.name}",
            "denominator": None
            if check.denominator is None
            else f"{check.denominator.measurement}.{check.denominator.name}",
            "value": self.value,
            "target": f"{check.op} {check.threshold:g}{check.unit}" if check.op else None,
            "met": self.met,
        }


def _median(summaries: Mapping[str, Mapping[str, Spread]], figure: Figure) -> float | None:
    found = summaries.get(figure.measurement, {}).get(figure.name)
    return None if found is None else found.median


def evaluate(check: Check, summaries: Mapping[str, Mapping[str, Spread]]) -> Verdict:
    """The check's value from the medians, and whether it meets its target."""
    value = _median(summaries, check.numerator)
    if value is not None and check.denominator is not None:
        denominator = _median(summaries, check.denominator)
        value = None if not denominator else value / denominator
    if value is None or not check.op:
        return Verdict(check, value, None)
    met = value >= check.threshold if check.op == ">=" else value <= check.threshold
    return Verdict(check, value, met)


# ------------------------------------------------------------------------------ tables


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    label: str
    unit: str
    figures: Mapping[str, Spread]
    notes: str = ""


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value >= 1 else f"{value:.2g}"


def _rate(row: Row) -> str:
    rate = row.figures.get("rate")
    if rate is None:
        return "-"
    return f"{_number(rate.median)} {row.unit} ({_number(rate.min)}–{_number(rate.max)})"


def _ms(row: Row, name: str, worst: bool = False) -> str:
    found = row.figures.get(name)
    return "-" if found is None else f"{found.max if worst else found.median:.2f}"


def aligned(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    rendered = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines
    ]
    rendered.insert(1, "-" * max(len(line) for line in rendered))
    return "\n".join(rendered)


def render_results(rows: Sequence[Row], rounds: int) -> str:
    """Medians over the rounds, min-max of the rate in brackets; p50 and p99 are the medians of the
    rounds' percentiles, max is the worst of any round."""
    header = ["measurement", f"median rate (min–max of {rounds} rounds)", "p50 ms", "p99 ms", "max ms", "notes"]
    lines = [header] + [
        [row.label, _rate(row), _ms(row, "p50_ms"), _ms(row, "p99_ms"), _ms(row, "max_ms", worst=True), row.notes]
        for row in rows
    ]
    return aligned(lines)


def _shown(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}x" if unit == "x" else f"{value:.2f} {unit}"


def render_verdicts(verdicts: Sequence[Verdict]) -> str:
    header = ["ratio or figure", "value", "target", "verdict"]
    lines = [header]
    for verdict in verdicts:
        check = verdict.check
        target = f"{check.op} {_shown(check.threshold, check.unit)}" if check.op else "-"
        mark = {True: "met", False: "NOT MET", None: "-" if not check.op else "n/a (not measured)"}[verdict.met]
        lines.append([check.label, _shown(verdict.value, check.unit), target, mark])
    return aligned(lines)
