"""`orders-bench --scaling` end to end with tiny settings on the test servers (ORDERS_TEST_* or
embedded): two partition counts with two worker processes each, one round; every configuration
reports a rebuild and a live window with positive rates and the CPU of its workers, the tables and
the ratios are printed, the JSON and its plot are written, and nothing is left behind. No timing
is checked: the figures depend on the machine."""

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

CONFIGS = ["p1w2", "p2w2"]


def run_scaling(servers: Servers, json_out: Path) -> subprocess.CompletedProcess[str]:
    command = script_command(
        "orders-bench",
        *("--scaling", "--quick", "--partitions", "1,2", "--workers", "2", "--rounds", "1"),
        *("--rebuild-events", "2000", "--duration", "0.5", "--writers", "2", "--json-out", str(json_out)),
        *("--postgres-url", servers.postgres_url, "--redis-url", servers.redis_url),
    )
    return subprocess.run(command, env=child_environment(), capture_output=True, text=True, timeout=240, check=False)


def test_scaling_bench_measures_every_configuration_and_cleans_up(servers: Servers, tmp_path: Path) -> None:
    before = asyncio.run(leftovers(servers))
    done = run_scaling(servers, tmp_path / "scaling.json")
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((tmp_path / "scaling.json").read_text())
    assert results["kind"] == "scaling"
    assert list(results["configs"]) == CONFIGS
    for name, entry in results["configs"].items():
        [figures] = entry["rounds"]
        assert figures["rebuild_rate"] > 0, name
        assert figures["rebuild_batches"] > 0, name
        assert figures["rebuild_cpu_workers_pct"] > 0, name
        assert figures["live_appended_rate"] > 0, name
        assert figures["live_rate"] > 0, name
        assert figures["live_worker_us_per_event"] > 0, name
        assert 0 <= figures["live_lag_p50_ms"] <= figures["live_lag_p99_ms"], name
        assert entry["summary"]["rebuild_rate"]["median"] == figures["rebuild_rate"], name
    assert results["log_read"]["events_per_s"] > 0
    assert results["log_read"]["batch_size"] == 500

    assert "rebuild events/s" in done.stdout
    assert "live applied events/s" in done.stdout
    assert "vs P1 W1" in done.stdout
    assert f"JSON: {tmp_path / 'scaling.json'}" in done.stdout
    assert (tmp_path / "scaling" / "scaling-throughput.png").read_bytes().startswith(b"\x89PNG")
    assert "round 1/1 p2w2" in done.stderr
    assert asyncio.run(leftovers(servers)) == before
