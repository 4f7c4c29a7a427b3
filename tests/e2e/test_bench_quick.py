"""`orders-bench --quick` end to end, with tiny settings, on the test servers (ORDERS_TEST_* or
embedded): every measurement reports positive figures (the 2-process ones unless the services
refuse --processes, which the run says), the naive pipeline's beside ours, CPU per command and
per query against the floor, the tables are printed, the JSON is written with the samples the
plots need, the plots are drawn beside it, and the benchmark leaves no database and no Redis key
behind."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from orders.store.views import redis_client
from orders.tools.processes import child_environment, script_command
from orders_bench.main import BY_NAME, MEASUREMENTS
from tests.conftest import Servers

pytestmark = pytest.mark.slow

DEFAULT = [m.name for m in MEASUREMENTS if m.default]
CEILINGS = {"echo", "stack-create", "stack-get", "pg-insert", "redis-get", "redis-multi"}
LATENCY = CEILINGS | {"create", "lifecycle", "ack", "get", "list", "lag", "create-x2", "get-x2"}
LATENCY |= {"naive-create", "naive-get", "naive-ack", "naive-lag"}
X2 = {"create-x2", "get-x2"}
PLOTS = ["bench-latency.png", "bench-lag.png", "bench-rebuild.png", "bench-throughput.png"]


def run_bench(servers: Servers, json_out: Path) -> subprocess.CompletedProcess[str]:
    command = script_command(
        "orders-bench",
        *("--quick", "--rounds", "1", "--duration", "0.5", "--warmup", "0.2"),
        *("--rebuild-events", "2000", "--read-orders", "100", "--json-out", str(json_out)),
        *("--postgres-url", servers.postgres_url, "--redis-url", servers.redis_url),
    )
    return subprocess.run(command, env=child_environment(), capture_output=True, text=True, timeout=240, check=False)


async def leftovers(servers: Servers) -> tuple[list[str], list[str]]:
    conn = await asyncpg.connect(servers.postgres_url)
    try:
        databases = [r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")]
    finally:
        await conn.close()
    redis = redis_client(servers.redis_url)
    try:
        keys = [key async for key in redis.scan_iter(match="bench:*", count=1000)]
    finally:
        await redis.aclose()
    return [d for d in databases if d.startswith("orders_bench_")], keys


def check_samples(results: dict[str, Any], skipped: set[str]) -> None:
    """What the plots are drawn from: the latency percentiles, the lags against time, the rebuilds' progress."""
    measurements = results["measurements"]
    for name in LATENCY - skipped:
        [samples] = measurements[name]["samples"]
        assert len(samples["latency_ms"]) == len(results["sample_quantiles"]), name
    for name in ("lag", "naive-lag"):
        [samples] = measurements[name]["samples"]
        assert 0 < len(samples["lag_series"]["t_s"]) == len(samples["lag_series"]["lag_ms"]), name
    for name in ("rebuild", "rebuild-split"):
        [samples] = measurements[name]["samples"]
        assert samples["progress"]["applied"]["orders"][-1] == 2000, name


def test_quick_bench_measures_everything_and_cleans_up(servers: Servers, tmp_path: Path) -> None:
    before = asyncio.run(leftovers(servers))
    done = run_bench(servers, tmp_path / "results.json")
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["measurements"]) == DEFAULT
    skipped = results["skipped"]
    assert set(skipped) <= X2  # only a service without --processes skips anything
    for name in skipped:
        assert results["measurements"][name]["rounds"] == []
        assert "--processes" in skipped[name]
    for name, measurement in results["measurements"].items():
        if name in skipped:
            continue
        [figures] = measurement["rounds"]
        assert figures["rate"] > 0, name
        if name in LATENCY:
            assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"], name
            assert figures["unit_cpu_us"] > 0, name
        assert figures.get("errors", 0) == 0, name
    for name in ("rebuild", "rebuild-split"):
        assert results["measurements"][name]["rounds"][0]["peak_rss_mb"] > 0, name
    for name in ("lag", "naive-lag"):
        assert results["measurements"][name]["rounds"][0]["missing"] == 0, name
    check_samples(results, set(skipped))
    assert results["machine"]["cpu_count"] >= 1
    [cpu] = results["cpu"]["rounds"]
    assert cpu["floor_command_us"] > 0
    assert cpu["floor_query_us"] > 0
    for name in {"create", "get", "naive-create", "naive-get"} | (X2 - set(skipped)):
        assert cpu[f"overhead_{name}"] > 0, name
    verdicts = {c["label"]: c for c in results["checks"]}
    for label in ("CreateOrder / echo", "GetOrder / echo", "CPU per command / floor", "CPU per query / floor"):
        assert verdicts[label]["met"] is not None, label
    for label in ("CreateOrder / naive CreateOrder", "GetOrder / naive GetOrder", "rebuild / MULTI ceiling"):
        assert verdicts[label]["met"] is not None, label

    for name in DEFAULT:
        assert BY_NAME[name].label in done.stdout
    assert "verdict" in done.stdout
    assert "CPU per unit" in done.stdout
    assert "floor per command = " in done.stdout
    if skipped:
        assert "skipped: the services refused --processes 2" in done.stdout
    assert f"JSON: {tmp_path / 'results.json'}" in done.stdout
    assert f"plots: {', '.join(PLOTS)} in {tmp_path / 'results'}" in done.stdout
    for plot in PLOTS:
        assert (tmp_path / "results" / plot).read_bytes().startswith(b"\x89PNG"), plot
    assert "round 1/1" in done.stderr  # progress, one line per step
    assert asyncio.run(leftovers(servers)) == before
