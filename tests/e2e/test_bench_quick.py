"""`orders-bench --quick` end to end, with tiny settings, on the test servers (ORDERS_TEST_* or
embedded): every measurement reports positive figures, the table is printed, the JSON is written,
and the benchmark leaves no database and no Redis key behind."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import asyncpg
import pytest

from orders.store.views import redis_client
from orders.tools.processes import child_environment, script_command
from orders_bench.main import BY_NAME, MEASUREMENTS
from tests.conftest import Servers

pytestmark = pytest.mark.slow

DEFAULT = [m.name for m in MEASUREMENTS if m.default]
CEILINGS = {"echo", "stack-create", "stack-get", "pg-insert", "redis-get", "redis-multi"}
LATENCY = CEILINGS | {"create", "lifecycle", "ack", "get", "list", "lag"}


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


def test_quick_bench_measures_everything_and_cleans_up(servers: Servers, tmp_path: Path) -> None:
    before = asyncio.run(leftovers(servers))
    done = run_bench(servers, tmp_path / "results.json")
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["measurements"]) == DEFAULT
    for name, measurement in results["measurements"].items():
        [figures] = measurement["rounds"]
        assert figures["rate"] > 0, name
        if name in LATENCY:
            assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"], name
        assert figures.get("errors", 0) == 0, name
    for name in ("rebuild", "rebuild-split"):
        assert results["measurements"][name]["rounds"][0]["peak_rss_mb"] > 0, name
    assert results["measurements"]["lag"]["rounds"][0]["missing"] == 0
    assert results["machine"]["cpu_count"] >= 1
    labels = {c["label"] for c in results["checks"]}
    assert labels >= {"CreateOrder / echo", "GetOrder / stack GetOrder", "rebuild / MULTI ceiling"}

    for name in DEFAULT:
        assert BY_NAME[name].label in done.stdout
    assert "verdict" in done.stdout
    assert f"JSON: {tmp_path / 'results.json'}" in done.stdout
    assert "round 1/1" in done.stderr  # progress, one line per step
    assert asyncio.run(leftovers(servers)) == before
