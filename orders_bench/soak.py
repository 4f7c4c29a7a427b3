"""`orders-bench --soak SECONDS`: a long steady run that shows whether memory and latency stay flat.

It starts the three services as the benchmark does (a database and a Redis prefix of its own,
removed afterwards), runs the mixed open-loop load of orders_bench.soak_load in a client process,
and at each window's end records: each process's memory (RSS from /proc/PID/status; for
PostgreSQL, whose processes share their buffers, also the proportional share, Pss from
/proc/PID/smaps_rollup, summed over the server's processes that work for the run), Redis' INFO
memory, DBSIZE and keys under the run's prefix, the database's size, the CPU of each process in the
window, and the window's ack, query and lag percentiles and errors (orders_bench.soak_stats).
At the end: a JSON of every window, plots, and the summary with its verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from orders.store.views import redis_client
from orders_bench.soak_load import Plan, client_main
from orders_bench.soak_stats import Window, call_figures, progress_line, render_summary, summarize
from orders_bench.system import (
    Servers,
    Services,
    create_database,
    delete_keys,
    drop_database,
    owners,
    process_table,
    spent,
    start_services,
)

DEFAULT_RATE = 300.0  # commands/s, and as many queries: well under the 2-core machine's ceiling
DEFAULT_WINDOW = 10.0  # seconds
CLIENT_READY_TIMEOUT = 60.0
KB = 1024
MB = 1024 * 1024

Progress = Callable[[str], None]
MachineInfo = Callable[[Servers, str], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class SoakSettings:
    seconds: float
    window: float
    rate: float  # commands/s
    query_rate: float  # queries/s
    streams: int

    @property
    def windows(self) -> int:
        return max(1, round(self.seconds / self.window))


def settings_from(args: argparse.Namespace) -> SoakSettings:
    rate = args.rate or DEFAULT_RATE
    return SoakSettings(args.soak, args.soak_window, rate, rate, args.lag_streams)


# ------------------------------------------------------------------------------ memory from /proc


def _status_kb(pid: int, field: str) -> float:
    """A "kB" field of /proc/PID/status or smaps_rollup (0 once the process is gone, or if unreadable)."""
    path = f"/proc/{pid}/{'smaps_rollup' if field == 'Pss' else 'status'}"
    with contextlib.suppress(OSError, ValueError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return float(line.split()[1])
    return 0.0


def memory_by_owner(found: Mapping[int, str], field: str) -> dict[str, float]:
    """MB of `field` (VmRSS or Pss) summed per owner."""
    total: dict[str, float] = {}
    for pid, owner in found.items():
        total[owner] = total.get(owner, 0.0) + _status_kb(pid, field) * KB / MB
    return total


# ------------------------------------------------------------------------------ sampling


class Sampler:
    """Reads the processes, Redis and PostgreSQL at each window's end."""

    def __init__(self, pids: Mapping[str, int], marker: str, redis_url: str, prefix: str, database_url: str) -> None:
        self.pids, self.marker = dict(pids), marker
        self.redis_url, self.prefix, self.database_url = redis_url, prefix, database_url
        self.cpu: dict[int, tuple[str, float]] = {}
        self.at = time.monotonic()
        self.orders = 0

    def processes(self) -> tuple[dict[int, str], dict[int, tuple[str, float]]]:
        table = process_table(self.marker)
        found = owners(table, self.pids, [name for name in self.pids if name != "bench"])
        return found, {pid: (owner, table[pid].seconds) for pid, owner in found.items()}

    def start(self) -> None:
        _, self.cpu = self.processes()
        self.at = time.monotonic()

    async def window(self, index: int, t_s: float, calls: Mapping[str, Any]) -> Window:
        found, cpu = self.processes()
        now = time.monotonic()
        used = spent(self.cpu, cpu)
        elapsed = max(1e-9, now - self.at)
        self.cpu, self.at = cpu, now
        self.orders += calls["created"]
        postgres = {pid: owner for pid, owner in found.items() if owner == "postgres"}
        return {
            "index": index,
            "t_s": round(t_s, 3),
            **call_figures(calls),
            "orders_total": self.orders,
            "rss_mb": memory_by_owner(found, "VmRSS"),
            "pss_mb": {k: v for k, v in memory_by_owner(postgres, "Pss").items() if v > 0},
            "cpu_pct": {owner: 100 * seconds / elapsed for owner, seconds in used.items()},
            "redis": await self.redis(),
            "postgres_db_mb": await self.database_mb(),
        }

    async def redis(self) -> dict[str, Any]:
        redis = redis_client(self.redis_url)
        try:
            memory = await redis.info("memory")
            keys = 0
            async for _ in redis.scan_iter(match=f"{self.prefix}*", count=5000):
                keys += 1
            dbsize = await redis.dbsize()
        finally:
            await redis.aclose()
        wanted = ("used_memory", "used_memory_rss", "used_memory_dataset", "used_memory_scripts")
        return {**{k: int(memory.get(k, 0)) for k in wanted}, "dbsize": int(dbsize), "prefix_keys": keys}

    async def database_mb(self) -> float:
        conn = await asyncpg.connect(self.database_url)
        try:
            size = await conn.fetchval("SELECT pg_database_size(current_database())")
        finally:
            await conn.close()
        return float(size) / MB


# ------------------------------------------------------------------------------ the run


class Client:
    """The soak's client process (spawned: a forked gRPC is unsafe)."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=client_main, args=(child,), daemon=True, name="soak-client")
        self.process.start()

    async def receive(self, timeout: float | None = None) -> tuple[str, Any]:
        ready = await asyncio.to_thread(self.conn.poll, timeout)
        if not ready:
            raise RuntimeError("the soak client process sent nothing in time")
        kind, payload = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"the soak client process failed:\n{payload}")
        return str(kind), payload

    def close(self) -> None:
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()


async def soak_run(
    settings: SoakSettings, servers: Servers, log_dir: Path, progress: Progress, machine_info: MachineInfo
) -> dict[str, Any]:
    """The whole soak; returns its results (the JSON)."""
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    began = time.monotonic()
    run_id = uuid.uuid4().hex[:6]
    database, prefix = f"orders_bench_{run_id}", f"bench:{run_id}:"
    database_url = await create_database(servers.postgres_url, database)
    services: Services | None = None
    client: Client | None = None
    try:
        services = await start_services(database_url, servers.redis_url, prefix, log_dir)
        progress(f"soak {run_id}: services up ({_pids(services.pids)}), logs in {log_dir}")
        client = Client()
        plan = Plan(*services_addresses(services), f"{run_id}s", settings.rate, settings.query_rate,
                    settings.streams, settings.window, settings.windows)  # fmt: skip
        pids = {**services.pids, "client": client.process.pid or 0, "bench": os.getpid()}
        sampler = Sampler(pids, database, servers.redis_url, prefix, database_url)
        windows = await _windows(client, plan, services, sampler, progress)
        machine = await machine_info(servers, database_url)
    finally:
        if client is not None:
            client.close()
        if services is not None:
            await services.stop()
        await drop_database(servers.postgres_url, database)
        deleted = await delete_keys(servers.redis_url, prefix)
        progress(f"cleaned up: database dropped, {deleted:,} Redis keys deleted")
    return {
        "kind": "soak",
        "started_at": started_at,
        "elapsed_seconds": time.monotonic() - began,
        "command": sys.argv,
        "settings": asdict(settings),
        "machine": machine,
        "windows": windows,
        "summary": summarize(windows).as_dict(),
    }


def services_addresses(services: Services) -> tuple[str, str]:
    return services.write_address, services.read_address


def _pids(pids: Mapping[str, int]) -> str:
    return ", ".join(f"{name} pid {pid}" for name, pid in pids.items())


async def _windows(
    client: Client, plan: Plan, services: Services, sampler: Sampler, progress: Progress
) -> list[Window]:
    """Starts the client's load and records each window as the client reports it."""
    client.conn.send(plan)
    await client.receive(CLIENT_READY_TIMEOUT)
    start = time.time() + 0.1
    client.conn.send(start)
    sampler.start()
    progress(f"soak: {plan.windows} windows of {plan.window:g}s at {plan.rate:g} commands/s and {plan.query_rate:g}"
             f" queries/s, {plan.streams} watch streams")  # fmt: skip
    windows: list[Window] = []
    while (message := await client.receive(plan.window * 3 + 30))[0] == "window":
        window = await sampler.window(len(windows), time.time() - start, message[1])
        windows.append(window)
        progress(progress_line(window))
        services.check_running()
    return windows


# ------------------------------------------------------------------------------ output


def write_json(results: Mapping[str, Any], json_out: Path | None) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = json_out or Path("bench-results") / f"soak-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def render(results: Mapping[str, Any]) -> str:
    s = results["settings"]
    windows = results["windows"]
    header = (
        f"orders-bench --soak: {len(windows)} windows of {s['window']:g}s, {s['rate']:g} commands/s and"
        f" {s['query_rate']:g} queries/s, {s['streams']} watch streams, {results['elapsed_seconds']:.0f}s in all;"
        f" {windows[-1]['orders_total'] if windows else 0:,} orders"
    )
    return f"{header}\n\n{render_summary(summarize(windows))}"
