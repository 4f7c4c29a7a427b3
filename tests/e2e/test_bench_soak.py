"""`orders-bench --soak` end to end, short (12 s of 3 s windows at a low rate), on the test servers
(ORDERS_TEST_* or embedded): every window records each service's memory and CPU, Redis' memory and
keys, ack, query and lag percentiles; the JSON, the summary with its verdict line and the three
plots are written; progress goes to stderr once per window; `--plot` draws a saved soak again; and
nothing is left behind. No figure is judged: a run this short says nothing about flatness."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from orders.tools.processes import child_environment, script_command
from tests.conftest import Servers
from tests.e2e.test_bench_quick import leftovers

pytestmark = pytest.mark.slow

PLOTS = ["soak-memory.png", "soak-latency.png", "soak-lag.png"]
SERVICES = ("write_service", "read_service", "sync_worker")


def run_soak(servers: Servers, json_out: Path) -> subprocess.CompletedProcess[str]:
    command = script_command(
        "orders-bench",
        *("--soak", "12", "--soak-window", "3", "--rate", "40", "--lag-streams", "2", "--json-out", str(json_out)),
        *("--postgres-url", servers.postgres_url, "--redis-url", servers.redis_url),
    )
    return subprocess.run(command, env=child_environment(), capture_output=True, text=True, timeout=180, check=False)


def test_a_short_soak_records_every_window_and_cleans_up(servers: Servers, tmp_path: Path) -> None:
    before = asyncio.run(leftovers(servers))
    json_out = tmp_path / "soak.json"
    done = run_soak(servers, json_out)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads(json_out.read_text())
    assert results["kind"] == "soak"
    windows = results["windows"]
    assert [w["index"] for w in windows] == [0, 1, 2, 3]
    for w in windows:
        for owner in SERVICES:
            assert w["rss_mb"][owner] > 0, owner
            assert owner in w["cpu_pct"], owner
        assert w["pss_mb"].get("postgres", 1) > 0  # the proportional share, where /proc shows it
        assert w["redis"]["used_memory"] > 0
        assert w["postgres_db_mb"] > 0
        assert w["commands"] > 0
        assert 0 < w["ack_p50_ms"] <= w["ack_p99_ms"]
    assert windows[-1]["orders_total"] > 0
    assert windows[-1]["redis"]["prefix_keys"] > 0
    assert any(w["queries"] > 0 and w["query_p99_ms"] > 0 for w in windows)
    assert any(w["lags"] > 0 and w["lag_p99_ms"] >= 0 for w in windows)
    summary = results["summary"]
    assert {g["owner"] for g in summary["memory"]} >= set(SERVICES)
    assert isinstance(summary["flat"], bool)

    assert "memory (MB)" in done.stdout
    assert "Redis per order created" in done.stdout
    assert "verdict: " in done.stdout
    assert f"JSON: {json_out}" in done.stdout
    assert f"plots: {', '.join(PLOTS)} in {tmp_path / 'soak'}" in done.stdout
    for plot in PLOTS:
        assert (tmp_path / "soak" / plot).read_bytes().startswith(b"\x89PNG"), plot
    assert [line for line in done.stderr.splitlines() if "] window " in line][-1].count("window 4:") == 1
    assert asyncio.run(leftovers(servers)) == before

    replot = script_command("orders-bench", "--plot", str(json_out), "--plots-dir", str(tmp_path / "again"))
    again = subprocess.run(replot, env=child_environment(), capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(PLOTS)
