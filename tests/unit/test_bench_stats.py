"""The benchmark's pure parts: percentiles, medians over rounds, ratios against targets, tables."""

from __future__ import annotations

import pytest

from orders_bench.main import GROUPS, _names, checks
from orders_bench.stats import (
    Check,
    Figure,
    Row,
    Spread,
    evaluate,
    latency_figures,
    percentile,
    render_results,
    render_verdicts,
    spread,
    summarize_rounds,
)


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0


def test_percentile_does_not_need_sorted_input_and_takes_one_value() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([7.0], 99) == 7.0


@pytest.mark.parametrize(("values", "q"), [([], 50), ([1.0], -1), ([1.0], 101)])
def test_percentile_refuses_what_has_no_answer(values: list[float], q: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        percentile(values, q)


def test_latency_figures_are_in_milliseconds() -> None:
    figures = latency_figures([0.001] * 98 + [0.010, 0.020])
    assert figures["p50_ms"] == pytest.approx(1.0)
    assert figures["max_ms"] == pytest.approx(20.0)
    assert 1.0 < figures["p99_ms"] < 20.0
    assert latency_figures([]) == {}


def test_spread_is_the_median_with_min_and_max() -> None:
    assert spread([5.0, 1.0, 3.0]) == Spread(3.0, 1.0, 5.0)
    assert spread([1.0, 2.0, 3.0, 10.0]).median == 2.5
    with pytest.raises(ValueError, match="no values"):
        spread([])


def test_rounds_are_summarized_per_figure_over_the_rounds_that_have_it() -> None:
    rounds = [{"rate": 100.0, "p99_ms": 9.0}, {"rate": 300.0}, {"rate": 200.0, "p99_ms": 11.0}]
    summary = summarize_rounds(rounds)
    assert summary["rate"] == Spread(200.0, 100.0, 300.0)
    assert summary["p99_ms"] == Spread(10.0, 9.0, 11.0)


def _summaries(**rates: float) -> dict[str, dict[str, Spread]]:
    return {name: {"rate": Spread(rate, rate, rate)} for name, rate in rates.items()}


def test_a_ratio_of_medians_meets_or_misses_its_target() -> None:
    check = Check("CreateOrder / echo", Figure("create"), Figure("echo"), ">=", 0.6)
    met = evaluate(check, _summaries(create=700.0, echo=1000.0))
    missed = evaluate(check, _summaries(create=500.0, echo=1000.0))
    assert met.value == pytest.approx(0.7)
    assert met.met is True
    assert missed.value == pytest.approx(0.5)
    assert missed.met is False


def test_an_upper_bound_on_a_latency_figure() -> None:
    check = Check("lag p99", Figure("lag", "p99_ms"), None, "<=", 20, "ms")
    summaries = {"lag": {"p99_ms": Spread(20.0, 15.0, 30.0)}}
    assert evaluate(check, summaries).met is True  # the median counts, not the worst round
    summaries = {"lag": {"p99_ms": Spread(21.0, 15.0, 30.0)}}
    assert evaluate(check, summaries).met is False


def test_a_check_without_its_measurements_or_target_has_no_verdict() -> None:
    check = Check("GetOrder / echo", Figure("get"), Figure("echo"), ">=", 0.8)
    assert evaluate(check, _summaries(get=100.0)).value is None
    assert evaluate(check, _summaries(get=100.0)).met is None
    assert evaluate(check, _summaries(get=100.0, echo=0.0)).value is None
    informative = evaluate(
        Check("lifecycle / echo", Figure("lifecycle"), Figure("echo")), _summaries(lifecycle=1, echo=4)
    )
    assert (informative.value, informative.met) == (0.25, None)


def test_the_targets_of_the_issue_are_checked() -> None:
    found = {c.label: (c.op, c.threshold) for c in checks(500)}
    assert found["CreateOrder / echo"] == (">=", 0.5)
    assert found["CreateOrder, 2 processes / echo"] == (">=", 0.5)
    assert found["GetOrder / echo"] == (">=", 0.7)
    assert found["GetOrder, 2 processes / echo"] == (">=", 0.7)
    assert found["CPU per command / floor"] == ("<=", 1.5)
    assert found["CPU per query / floor"] == ("<=", 1.5)
    assert found["CreateOrder ack p99 at 500/s"] == ("<=", 10)
    assert found["lag p99 at 500/s"] == ("<=", 10)
    assert found["CreateOrder / naive CreateOrder"] == (">=", 2)
    assert found["GetOrder / naive GetOrder"] == (">=", 2)
    assert found["rebuild / MULTI ceiling"] == (">=", 0.6)
    assert found["lag p50 at 500/s"][0] == ""
    assert found["lifecycle / echo"][0] == ""
    assert found["CreateOrder / raw insert"][0] == ""


def test_the_cpu_targets_read_the_derived_overhead_factors() -> None:
    by_label = {c.label: c for c in checks(500)}
    summaries = {"cpu": {"overhead_create": Spread(1.4, 1.3, 1.6), "overhead_get": Spread(1.6, 1.5, 1.7)}}
    assert evaluate(by_label["CPU per command / floor"], summaries).met is True
    assert evaluate(by_label["CPU per query / floor"], summaries).met is False


def test_only_takes_names_and_groups_in_run_order() -> None:
    assert _names("lag,echo") == ["echo", "lag"]
    assert _names("write") == GROUPS["write"]
    assert _names("naive-lag,naive") == ["naive-create", "naive-get", "naive-ack", "naive-lag"]
    with pytest.raises(ValueError, match="unknown measurement"):
        _names("create,nope")


def test_the_results_table_shows_medians_and_min_max() -> None:
    rows = [
        Row("CreateOrder", "cmd/s", {"rate": Spread(1234.0, 1000.0, 1500.0), "p50_ms": Spread(2.5, 2, 3)}, "cpu x"),
        Row("rebuild", "events/s", {"rate": Spread(15000.0, 14000.0, 16000.0), "max_ms": Spread(5.0, 1.0, 9.0)}),
    ]
    table = render_results(rows, rounds=5)
    lines = table.splitlines()
    assert "min–max of 5 rounds" in lines[0]
    assert set(lines[1]) == {"-"}
    assert "1,234 cmd/s (1,000–1,500)" in lines[2]
    assert "2.50" in lines[2]
    assert lines[2].endswith("cpu x")
    assert "15,000 events/s (14,000–16,000)" in lines[3]
    assert "9.00" in lines[3]  # max is the worst round's, not a median
    assert "5.00" not in lines[3]
    assert lines[2].index("1,234") == lines[3].index("15,000")  # columns line up


def test_the_verdict_table_marks_met_missed_and_unmeasured() -> None:
    summaries = _summaries(create=700.0, echo=1000.0, get=100.0)
    verdicts = [evaluate(c, summaries) for c in checks(500)]
    table = render_verdicts(verdicts)
    assert "CreateOrder / echo" in table
    assert "0.70x" in table
    assert ">= 0.50x" in table
    lines = {line.split("  ")[0]: line for line in table.splitlines()}
    assert lines["CreateOrder / echo"].endswith("met")
    assert lines["GetOrder / echo"].endswith("NOT MET")
    assert lines["lag p99 at 500/s"].endswith("n/a (not measured)")
    assert lines["lifecycle / echo"].endswith("-")
