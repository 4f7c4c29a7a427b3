"""orders-bench's plots and the compact samples they are drawn from: a run's results of the real
shape (built by the benchmark's own functions from synthetic calls, lags and rebuild readings)
become four PNG files; a JSON from before the samples were kept still gets its throughput plot;
without matplotlib the benchmark says so in one line. No timing is asserted."""

from __future__ import annotations

import json
import random
import struct
import sys
from pathlib import Path

import pytest

import orders_bench
from orders_bench import main
from orders_bench.load import JobResult
from orders_bench.main import MEASUREMENTS, Report, summarize_report, to_json
from orders_bench.measure import Outcome, Settings, closed_outcome, lag_outcome
from orders_bench.samples import (
    LATENCY_QUANTILES,
    PROGRESS_POINTS,
    SERIES_POINTS,
    lag_series,
    latency_quantiles,
    progress_series,
)
from orders_bench.stats import evaluate

plots = pytest.importorskip("orders_bench.plots", reason="matplotlib (orders-cqrs[bench]) is not installed")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 150_000
PLOTS = ["bench-latency.png", "bench-lag.png", "bench-rebuild.png", "bench-throughput.png"]
ROOT = Path(__file__).resolve().parents[2]
OLD_RUN = ROOT / "benchmark-runs" / "20261204T155834Z.json"  # written before the samples were kept
OPEN_LOOP = {"ack", "naive-ack"}
LAGS = {"lag", "naive-lag"}
REBUILDS = {"rebuild", "rebuild-split"}
RATE = 500.0


def settings(rounds: int, duration: float) -> Settings:
    return Settings(rounds, duration, 0.5, 64, RATE, 2000, 1, 100, 16, 20)


def calls(rng: random.Random, count: int, typical: float) -> list[float]:
    """Call latencies in seconds: mostly near `typical`, with a tail."""
    return [rng.lognormvariate(0, 0.5) * typical for _ in range(count)]


def open_loop_result(rng: random.Random, duration: float) -> JobResult:
    """What an open-loop lag job returns: acks on a clock, each with its lag and ack time."""
    window_start = 1_700_000_000.0
    acks = [window_start + n / RATE for n in range(int(RATE * duration))]
    lags = calls(rng, len(acks), 0.004)
    return JobResult(
        units=len(acks),
        calls=len(acks),
        latencies=calls(rng, len(acks), 0.002),
        duration=duration,
        samples=lags,
        extra={"missing": 0.0},
        series=list(zip(acks, lags, strict=True)),
        window_start=window_start,
    )


def rebuild_outcome(events: int) -> Outcome:
    """A rebuild round's figures and its progress, from readings every 10 ms as RebuildProbe takes them."""
    readings = [
        (t / 100, {"orders": min(events, 300 * t), "customer_summary": min(events, 290 * t)}) for t in range(400)
    ]
    return Outcome({"rate": 25_000.0, "peak_rss_mb": 70.0}, {"progress": progress_series(readings, events)})


def one_round(name: str, rng: random.Random, duration: float) -> Outcome:
    if name in REBUILDS:
        return rebuild_outcome(2000)
    if name in LAGS:
        return lag_outcome(open_loop_result(rng, duration), {"errors": 0.0})
    result = JobResult(units=1000, calls=1000, latencies=calls(rng, 1000, 0.01), duration=duration)
    if name in OPEN_LOOP:
        result = open_loop_result(rng, duration)
    return closed_outcome(result, {"errors": 0.0, "unit_cpu_us": 500.0})


def results_of_a_run(rounds: int = 3, duration: float = 1.5) -> dict[str, object]:
    """The JSON of a run of every measurement, as main.output writes it, read back."""
    rng = random.Random(7)
    names = [m.name for m in MEASUREMENTS]
    outcomes = {name: [one_round(name, rng, duration) for _ in range(rounds)] for name in names}
    report = Report(
        settings=settings(rounds, duration),
        measurements=names,
        rounds={name: [o.figures for o in done] for name, done in outcomes.items()},
        machine={"cpu_count": 2, "git_commit": "0123456789abcdef"},
        started_at="2026-12-04T17:00:00+00:00",
        elapsed=180.0,
        skipped={},
        samples={name: [o.samples for o in done] for name, done in outcomes.items()},
    )
    summaries = summarize_report(report)
    verdicts = [evaluate(check, summaries) for check in main.checks(RATE)]
    loaded: dict[str, object] = json.loads(json.dumps(to_json(report, summaries, verdicts)))
    return loaded


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header, after checking that it is one, whole."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    assert data[12:16] == b"IHDR", path
    assert data.endswith(b"IEND\xaeB`\x82"), path  # the last chunk: the file is complete
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_every_plot_is_written_as_a_small_png(tmp_path: Path) -> None:
    written, lacking = plots.write_plots(results_of_a_run(), tmp_path / "run")
    assert [p.name for p in written] == PLOTS
    assert lacking == []
    for path in written:
        width, height = png_size(path)
        assert width >= 800, path
        assert height >= 400, path
        assert path.stat().st_size < MAX_PNG_BYTES, path


def test_a_full_run_keeps_its_json_and_plots_small(tmp_path: Path) -> None:
    """5 rounds of 5 s (the full run): the lag series are thinned, the files stay small."""
    results = results_of_a_run(rounds=5, duration=5.0)
    assert len(json.dumps(results, indent=2)) < 2_000_000
    lag = results["measurements"]["lag"]["samples"][0]["lag_series"]  # type: ignore[index]
    assert len(lag["t_s"]) <= SERIES_POINTS
    written, _ = plots.write_plots(results, tmp_path)
    for path in written:
        assert path.stat().st_size < MAX_PNG_BYTES, path


def test_a_json_from_before_the_samples_gets_its_throughput_plot(tmp_path: Path) -> None:
    written, lacking = plots.write_plots(json.loads(OLD_RUN.read_text()), tmp_path)
    assert [p.name for p in written] == ["bench-throughput.png"]
    assert lacking == ["latency", "lag", "rebuild"]
    png_size(written[0])


def test_plot_replots_a_saved_json_into_the_folder_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "20261204T170000Z.json"
    saved.write_text(json.dumps(results_of_a_run()))
    main.main(["--plot", str(saved), "--plots-dir", str(tmp_path / "images")])
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(PLOTS)
    assert f"in {tmp_path / 'images'}" in capsys.readouterr().out
    main.main(["--plot", str(saved)])  # default: beside the JSON, a folder of its name
    assert sorted(p.name for p in (tmp_path / "20261204T170000Z").iterdir()) == sorted(PLOTS)


def test_without_matplotlib_the_run_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delitem(sys.modules, "orders_bench.plots")
    monkeypatch.delattr(orders_bench, "plots")
    for name in [n for n in sys.modules if n.partition(".")[0] == "matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it (or any part of it) now fails
    line = main.draw(results_of_a_run(), tmp_path / "plots")
    assert line == "plots: none, matplotlib is not installed (pip install 'orders-cqrs[bench]')"
    assert not (tmp_path / "plots").exists()
    with pytest.raises(SystemExit, match="matplotlib is not installed"):
        main.main(["--plot", str(OLD_RUN), "--plots-dir", str(tmp_path / "plots")])


def test_help_names_the_plot_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main.parse_args(["--help"])
    shown = capsys.readouterr().out
    for option in ("--no-plots", "--plot JSON", "--plots-dir"):
        assert option in shown


# ------------------------------------------------------------------------------ the compact samples


def test_latency_quantiles_are_the_fixed_percentiles_in_ms() -> None:
    found = latency_quantiles([n / 1000 for n in range(1, 1001)])  # 1..1000 ms
    assert len(found) == len(LATENCY_QUANTILES)
    assert found == sorted(found)
    assert found[0] == 1.0
    assert found[-1] == 1000.0
    assert found[LATENCY_QUANTILES.index(50)] == pytest.approx(500.5)
    assert latency_quantiles([]) == []


def test_a_long_lag_series_is_thinned_keeping_the_worst_of_each_run() -> None:
    points = [(100.0 + n / 1000, 0.001) for n in range(3 * SERIES_POINTS)]
    points[1234] = (points[1234][0], 0.250)  # one spike among thousands
    series = lag_series(points, window_start=100.0)
    assert len(series["t_s"]) == SERIES_POINTS
    assert series["worst_of"] == 3
    assert max(series["lag_ms"]) == 250.0
    assert series["t_s"][0] == 0.0
    short = lag_series(points[:10], window_start=100.0)
    assert (len(short["t_s"]), short["worst_of"]) == (10, 1)


def test_rebuild_progress_is_thinned_evenly_and_keeps_its_end() -> None:
    readings = [(n / 100, {"orders": n, "customer_summary": n}) for n in range(1001)]
    progress = progress_series(readings, events=1000)
    assert len(progress["t_s"]) <= PROGRESS_POINTS + 1
    assert progress["t_s"][-1] == 10.0
    assert progress["applied"]["orders"][-1] == 1000
    assert progress["events"] == 1000
