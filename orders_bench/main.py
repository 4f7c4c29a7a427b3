"""`orders-bench`: measures the whole system (three service processes on PostgreSQL and Redis) and,
in the same run with the same client machinery, the ceilings it is compared with; prints medians
over rounds, min-max, ratios with their targets, and writes everything to JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from orders import config
from orders.server.grpc_server import run
from orders.store.views import PROJECTIONS, redis_client
from orders_bench import measure, scaling, soak
from orders_bench.ceilings import prepare_redis_keys, prepare_scratch_table
from orders_bench.cpu import CPU, PER_PROCESS, cpu_rounds, describe_floor, median_floor, render_cpu
from orders_bench.history import load_history
from orders_bench.load import ClientPool
from orders_bench.measure import Bench, Runner, Settings
from orders_bench.samples import LATENCY_QUANTILES, Samples
from orders_bench.stats import Check, Figure, Figures, Row, Spread, Verdict, evaluate, render_results, render_verdicts
from orders_bench.stats import summarize_rounds as summarize
from orders_bench.system import (
    ProcessesRefused,
    Servers,
    create_database,
    delete_keys,
    drop_database,
    start_echo_server,
    start_naive,
    start_servers,
    start_services,
    stop_process,
)

DESCRIPTION = """\
Benchmark the orders system. Starts its own PostgreSQL database and Redis key prefix (removed
afterwards) on the given servers, or on embedded ones when no URL is set, runs the write service,
read service and sync worker as separate processes, and measures in rounds: CreateOrder and a
mixed lifecycle (create, add item, confirm, ship) at a fixed number of calls in flight; CreateOrder
ack latency at a fixed offered rate (open loop); GetOrder and ListOrders; the lag from a command's
ack to its order showing on a WatchCustomerOrders stream; and a sync worker's rebuild of a large
history; CreateOrder and GetOrder again against write and read services of 2 processes each.
Ceilings, measured the same way in the same run: a bare gRPC echo server, our own server stack
answering CreateOrder and GetOrder from memory, raw asyncpg inserts, raw Redis GETs and MULTI/EXEC
batches of SETs. A peer, in the same rounds with the same client: a naive pipeline (one INSERT per
command, a poller that SETs one key per event, one GET per query). Every measurement reports the
CPU of all its processes per unit of work; commands and queries are compared with the floor made
of the ceilings' CPU per unit. Progress goes to stderr; the table of medians (min–max over rounds),
the CPU table and the targets go to stdout; everything goes to JSON, and plots of it (PNG, if
matplotlib is installed: pip install 'orders-cqrs[bench]') to a folder of the JSON's name beside it:
latency percentiles per path, lag against time, rebuild progress, throughput against the ceilings."""

EPILOG = """\
measurements (--only takes these, or the groups ceilings, write, read):
  echo, stack-create, stack-get               ceilings: bare gRPC; our server stack, no storage
  pg-insert, redis-get, redis-multi           ceilings: the stores
  create, lifecycle, ack, create-x2           write (ack: latency at --rate, open loop; x2: 2 processes)
  get, list, get-x2                           read
  lag, rebuild, rebuild-split                 rebuild-split: one sync worker process per projection
  naive-create, naive-get, naive-ack,         the naive reference pipeline (group: naive)
  naive-lag
  create-client                               not run by default: CreateOrder through OrdersClient

examples:
  orders-bench --quick
  orders-bench --plot bench-results/20261204T155834Z.json --plots-dir docs/images   # re-plot a saved run
  orders-bench --postgres-url postgresql://postgres@127.0.0.1:5432/postgres --redis-url redis://127.0.0.1:6379/0
  orders-bench --only write,echo --rounds 3 --concurrency 128 --client-processes 2
  orders-bench --soak 900 --postgres-url postgresql://postgres@127.0.0.1:5432/postgres --redis-url redis://127.0.0.1:6379/0
  orders-bench --scaling                     # P 1,2,4 x W 1,2,4, 3 rounds, on embedded servers (~10 minutes)
  orders-bench --scaling --quick --partitions 1,2 --workers 1,2
  orders-bench --scaling --live-rate 15000     # live apply at a fixed offered rate: does the lag stay bounded?
"""


@dataclass(frozen=True)
class Measurement:
    name: str
    label: str
    unit: str
    run: Runner
    # What must be prepared first: services, services-x2, echo, scratch, keys, reads, reads-x2,
    # naive, naive-reads, history.
    needs: str = ""
    default: bool = True


MEASUREMENTS = [
    Measurement("echo", "gRPC echo (ceiling)", "calls/s", measure.echo, "echo"),
    Measurement("stack-create", "our stack, CreateOrder from memory", "cmd/s", measure.stack_create, "echo"),
    Measurement("stack-get", "our stack, GetOrder from memory", "q/s", measure.stack_get, "echo"),
    Measurement("pg-insert", "asyncpg INSERT (ceiling)", "tx/s", measure.pg_insert, "scratch"),
    Measurement("redis-get", "Redis GET (ceiling)", "GETs/s", measure.redis_get, "keys"),
    Measurement("redis-multi", "Redis MULTI 100 SETs (ceiling)", "SETs/s", measure.redis_multi),
    Measurement("create", "CreateOrder", "cmd/s", measure.create, "services"),
    Measurement("create-client", "CreateOrder via OrdersClient", "cmd/s", measure.create_client, "services", False),
    Measurement("lifecycle", "lifecycle (create/add/confirm/ship)", "cmd/s", measure.lifecycle, "services"),
    Measurement("ack", "CreateOrder ack, open loop", "cmd/s", measure.ack, "services"),
    Measurement("get", "GetOrder", "q/s", measure.get, "reads"),
    Measurement("list", "ListOrders (page of 20)", "q/s", measure.list_orders, "reads"),
    Measurement("create-x2", "CreateOrder, 2 processes per service", "cmd/s", measure.create_x2, "services-x2"),
    Measurement("get-x2", "GetOrder, 2 processes per service", "q/s", measure.get_x2, "reads-x2"),
    Measurement("lag", "lag ack -> WatchCustomerOrders", "cmd/s", measure.lag, "services"),
    Measurement("naive-create", "naive pipeline: CreateOrder", "cmd/s", measure.naive_create, "naive"),
    Measurement("naive-get", "naive pipeline: GetOrder", "q/s", measure.naive_get, "naive-reads"),
    Measurement("naive-ack", "naive pipeline: CreateOrder ack", "cmd/s", measure.naive_ack, "naive"),
    Measurement("naive-lag", "naive pipeline: lag ack -> key in Redis", "cmd/s", measure.naive_lag, "naive"),
    Measurement("rebuild", "rebuild (sync worker replay)", "events/s", measure.rebuild, "history"),
    Measurement("rebuild-split", "rebuild, a worker per projection", "events/s", measure.rebuild_split, "history"),
]
BY_NAME = {m.name: m for m in MEASUREMENTS}
GROUPS = {
    "ceilings": ["echo", "stack-create", "stack-get", "pg-insert", "redis-get", "redis-multi"],
    "write": ["create", "lifecycle", "ack", "create-x2"],
    "read": ["get", "list", "get-x2"],
    "naive": ["naive-create", "naive-get", "naive-ack", "naive-lag"],
}
OPEN_LOOP = {"ack", "lag", "naive-ack", "naive-lag"}  # measured at --rate
X2_REFUSED = "skipped: the services refused --processes 2"
QUICK = {"rounds": 3, "duration": 1.5, "warmup": 0.5, "rebuild_events": 50_000, "read_orders": 1000}
FULL = {"rounds": 5, "duration": 5.0, "warmup": 1.0, "rebuild_events": 1_000_000, "read_orders": 5000}
T = TypeVar("T")
WRITE_POOL_SIZE = 20  # ORDERS_POOL_SIZE's default
DEFAULT_RATE = 500.0
SOAK_HELP = (
    "measure nothing else: run a steady mixed load (lifecycle commands at --rate, as many GetOrder/ListOrders"
    " queries, --lag-streams watch streams) for SECONDS, recording per --soak-window each process's memory and"
    " CPU, Redis memory and keys, ack/query/lag p50 and p99 and errors; writes bench-results/soak-<time>.json,"
    " its plots, and a summary with the fitted memory growth and a verdict (docs/performance.md, Soak)"
)
SCALING_HELP = (
    "measure nothing else: the sync worker's throughput with each --partitions count and each --workers count of"
    " worker processes, --rounds rounds each (default 3), on a fresh database and Redis prefix each: the rebuild of"
    " a log of --rebuild-events events (default 100,000; --quick 20,000) and live apply while --writers connections"
    " append as fast as they go for --duration seconds (default 4; --quick 2): events/s against P=1 W=1, lag, the"
    " CPU of every process; writes bench-results/scaling-<time>.json (docs/performance.md, Scaling)"
)


def checks(rate: float) -> list[Check]:
    """The issue's targets (with a threshold) and the ratios that explain them (without)."""
    at = f"at {rate:g}/s"
    return [
        Check("CreateOrder / echo", Figure("create"), Figure("echo"), ">=", 0.5),
        Check("CreateOrder, 2 processes / echo", Figure("create-x2"), Figure("echo"), ">=", 0.5),
        Check("GetOrder / echo", Figure("get"), Figure("echo"), ">=", 0.7),
        Check("GetOrder, 2 processes / echo", Figure("get-x2"), Figure("echo"), ">=", 0.7),
        Check("CPU per command / floor", Figure(CPU, "overhead_create"), None, "<=", 1.5),
        Check("CPU per query / floor", Figure(CPU, "overhead_get"), None, "<=", 1.5),
        Check(f"CreateOrder ack p99 {at}", Figure("ack", "p99_ms"), None, "<=", 10, "ms"),
        Check(f"lag p99 {at}", Figure("lag", "p99_ms"), None, "<=", 10, "ms"),
        Check("CreateOrder / naive CreateOrder", Figure("create"), Figure("naive-create"), ">=", 2),
        Check("GetOrder / naive GetOrder", Figure("get"), Figure("naive-get"), ">=", 2),
        Check("rebuild / MULTI ceiling", Figure("rebuild"), Figure("redis-multi"), ">=", 0.6),
        Check(f"lag p50 {at}", Figure("lag", "p50_ms"), None, "", 0, "ms"),
        Check(f"naive lag p99 {at}", Figure("naive-lag", "p99_ms"), None, "", 0, "ms"),
        Check(f"naive CreateOrder ack p99 {at}", Figure("naive-ack", "p99_ms"), None, "", 0, "ms"),
        Check("CPU per command, 2 processes / floor", Figure(CPU, "overhead_create-x2")),
        Check("CPU per query, 2 processes / floor", Figure(CPU, "overhead_get-x2")),
        Check("naive CPU per command / floor", Figure(CPU, "overhead_naive-create")),
        Check("naive CPU per query / floor", Figure(CPU, "overhead_naive-get")),
        Check("CreateOrder, 2 processes / 1 process", Figure("create-x2"), Figure("create")),
        Check("GetOrder, 2 processes / 1 process", Figure("get-x2"), Figure("get")),
        Check("stack CreateOrder / echo", Figure("stack-create"), Figure("echo")),
        Check("CreateOrder / stack CreateOrder", Figure("create"), Figure("stack-create")),
        Check("stack GetOrder / echo", Figure("stack-get"), Figure("echo")),
        Check("GetOrder / stack GetOrder", Figure("get"), Figure("stack-get")),
        Check("lifecycle / echo", Figure("lifecycle"), Figure("echo")),
        Check("ListOrders / echo", Figure("list"), Figure("echo")),
        Check("rebuild, a worker per projection / MULTI", Figure("rebuild-split"), Figure("redis-multi")),
        Check("CreateOrder / raw insert", Figure("create"), Figure("pg-insert")),
    ]


# ------------------------------------------------------------------------------ command line


def _names(text: str) -> list[str]:
    names: list[str] = []
    for word in (w.strip() for w in text.split(",") if w.strip()):
        if word not in BY_NAME and word not in GROUPS:
            raise ValueError(f"unknown measurement {word!r}; see the list in --help")
        names += GROUPS.get(word, [word])
    if not names:
        raise ValueError("expected at least one measurement")
    return [m.name for m in MEASUREMENTS if m.name in names]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = config.SettingsParser(
        prog="orders-bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="short run: 3 rounds of 1.5 s, 50,000 rebuild events (~3 minutes)")
    add("--rounds", type=config.positive_int, help="rounds per measurement; the table shows their median (default 5)")
    add("--duration", type=config.positive_float, help="seconds measured per round (default 5)")
    add("--warmup", type=config.positive_float, help="seconds run before each round's measured window (default 1)")
    add("--concurrency", type=config.positive_int, default=64, help="calls in flight, closed loop (default 64)")
    add("--rate", type=config.positive_float, help="commands/s offered by ack and lag (default 500; --soak: 300)")
    add("--rebuild-events", type=config.positive_int, help="events in the rebuild history (default 1,000,000)")
    add("--read-orders", type=config.positive_int, help="orders prefilled for the read tests (default 5000)")
    add("--lag-streams", type=config.positive_int, default=16, help="WatchCustomerOrders streams of lag and --soak")
    add("--client-processes", type=config.positive_int, default=1, help="load generator processes (default 1)")
    add("--only", type=_names, help="comma-separated measurements or groups to run (default: all but create-client)")
    add("--json-out", type=Path, help="where to write the JSON results (default bench-results/<UTC time>.json)")
    add("--no-plots", action="store_true", help="write no plots, only the JSON")
    add("--plots-dir", type=Path, help="where to write the plots (default: beside the JSON, a folder of its name)")
    add("--plot", type=Path, metavar="JSON", help="measure nothing: draw the plots of a saved run's JSON")
    add("--soak", type=config.positive_float, metavar="SECONDS", help=SOAK_HELP)
    add("--soak-window", type=config.positive_float, default=soak.DEFAULT_WINDOW, metavar="SECONDS",
        help="--soak: seconds per recorded window (default 10)")  # fmt: skip
    add("--scaling", action="store_true", help=SCALING_HELP)
    add("--partitions", type=scaling.positive_list, default=scaling.DEFAULT_PARTITIONS, metavar="LIST",
        help="--scaling: partition counts, comma-separated (default 1,2,4)")  # fmt: skip
    add("--workers", type=scaling.positive_list, default=scaling.DEFAULT_WORKERS, metavar="LIST",
        help="--scaling: worker process counts, comma-separated (default 1,2,4)")  # fmt: skip
    add("--writers", type=config.positive_int, default=scaling.DEFAULT_WRITERS,
        help="--scaling: connections appending during the live window (default 4)")  # fmt: skip
    add("--live-rate", type=config.positive_float, metavar="EVENTS",
        help="--scaling: events/s the writers offer in the live window (default: as fast as they go)")  # fmt: skip
    config.add_setting(
        parser, "postgres-url", "PostgreSQL server to use (empty: embedded)", default="", parse=_optional_postgres
    )
    config.add_setting(parser, "redis-url", "Redis server to use (empty: embedded)", default="", parse=_optional_redis)
    return parser.parse_args(argv)


def _optional_postgres(text: str) -> str:
    return config.postgres_url(text) if text else ""


def _optional_redis(text: str) -> str:
    return config.redis_url(text) if text else ""


def settings_from(args: argparse.Namespace) -> Settings:
    defaults = QUICK if args.quick else FULL
    chosen = {name: getattr(args, name) for name in defaults}
    filled = {name: defaults[name] if value is None else value for name, value in chosen.items()}
    return Settings(
        rounds=int(filled["rounds"]),
        duration=float(filled["duration"]),
        warmup=float(filled["warmup"]),
        concurrency=args.concurrency,
        rate=args.rate or DEFAULT_RATE,
        rebuild_events=int(filled["rebuild_events"]),
        client_processes=args.client_processes,
        read_orders=int(filled["read_orders"]),
        lag_streams=args.lag_streams,
        pool_size=WRITE_POOL_SIZE,
    )


# ------------------------------------------------------------------------------ running


class Progress:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {text}", file=sys.stderr, flush=True)


@dataclass
class Report:
    settings: Settings
    measurements: list[str]
    rounds: dict[str, list[Figures]]
    machine: dict[str, Any]
    started_at: str
    elapsed: float
    skipped: dict[str, str]
    samples: dict[str, list[Samples]]  # per measurement, one per round: for the plots


async def prepare(bench: Bench, chosen: list[Measurement], servers: Servers) -> None:
    """Starts and fills what the chosen measurements need, once for all rounds."""
    needs = {m.needs for m in chosen}
    if needs & {"services", "reads", "services-x2", "reads-x2"}:
        bench.services = await start_services(bench.database_url, bench.redis_url, bench.prefix, bench.log_dir)
        bench.progress(f"services up: {_pids(bench.services.pids)}")
    if needs & {"services-x2", "reads-x2"}:
        await _start_x2(bench, [m.name for m in chosen if m.needs in {"services-x2", "reads-x2"}])
    if needs & {"naive", "naive-reads"}:
        naive_url = await create_database(servers.postgres_url, _naive_name(bench), migrated=False)
        bench.naive = await start_naive(naive_url, bench.redis_url, measure.naive_prefix(bench), bench.log_dir)
        bench.progress(f"naive pipeline up: {_pids(bench.naive.pids)}")
    if "echo" in needs:
        bench.echo, bench.echo_address, bench.stack_address = await start_echo_server(bench.log_dir)
        bench.progress(f"echo server up: pid {bench.echo.pid}")
    if "scratch" in needs:
        await prepare_scratch_table(bench.database_url)
    if "keys" in needs:
        await prepare_redis_keys(bench.redis_url, bench.prefix)
    if needs & {"reads", "reads-x2"}:
        await measure.prefill_reads(bench)
    if "naive-reads" in needs:
        await measure.prefill_naive(bench)
    if "history" in needs:
        name = _history_name(bench)
        bench.history_url = await create_database(servers.postgres_url, name)
        bench.history_head = await load_history(bench.history_url, bench.settings.rebuild_events, bench.progress)
    bench.progress(f"client processes: {', '.join(str(pid) for pid in bench.clients.pids)}")


def _pids(pids: Mapping[str, int]) -> str:
    return ", ".join(f"{name} pid {pid}" for name, pid in pids.items())


async def _start_x2(bench: Bench, names: list[str]) -> None:
    """The write and read services of 2 processes each, on the same database and prefix (served by
    the first set's sync worker); a service that does not know `--processes` skips `names`."""
    try:
        bench.services_x2 = await start_services(
            bench.database_url, bench.redis_url, bench.prefix, bench.log_dir, processes=2, worker=False
        )
    except ProcessesRefused as refused:
        bench.skipped |= dict.fromkeys(names, X2_REFUSED)
        bench.progress(f"{X2_REFUSED} ({refused}); {', '.join(names)} not measured")
    else:
        bench.progress(f"2-process services up: {_pids(bench.services_x2.pids)}")


def _naive_name(bench: Bench) -> str:
    return f"orders_bench_{bench.run_id}_naive"


def _history_name(bench: Bench) -> str:
    return f"orders_bench_{bench.run_id}_history"


async def run_rounds(
    bench: Bench, chosen: list[Measurement]
) -> tuple[dict[str, list[Figures]], dict[str, list[Samples]]]:
    """Round 1 of every measurement, then round 2, ...: slow drift of the machine or of the
    database's size spreads over all of them instead of favouring the ones run first. Returns
    each measurement's figures and samples, one per round."""
    rounds: dict[str, list[Figures]] = {m.name: [] for m in chosen}
    samples: dict[str, list[Samples]] = {m.name: [] for m in chosen}
    total = bench.settings.rounds
    for round_no in range(1, total + 1):
        for m in (m for m in chosen if m.name not in bench.skipped):
            _run_alone(bench, m)
            outcome = await m.run(bench, round_no)
            rounds[m.name].append(outcome.figures)
            samples[m.name].append(outcome.samples)
            bench.progress(f"{m.name:<13} round {round_no}/{total}: {_brief(m, outcome.figures)}")
    return rounds, samples


def _run_alone(bench: Bench, m: Measurement) -> None:
    """Pauses the peers that `m` does not measure (the 2-process services, the naive pipeline) and
    resumes the one it does: they share the machine's 2 cores with the system being measured."""
    if bench.services_x2 is not None:
        bench.services_x2.pause(m.needs not in {"services-x2", "reads-x2"})
    if bench.naive is not None:
        bench.naive.pause(m.needs not in {"naive", "naive-reads"})


def _brief(m: Measurement, figures: Figures) -> str:
    parts = [f"{figures.get('rate', 0):,.0f} {m.unit}"]
    parts += [f"{k[:-3]} {figures[k]:.2f} ms" for k in ("p50_ms", "p99_ms", "max_ms") if k in figures]
    parts += [f"{_short(k)} {v:.0f}%" for k, v in _cpu(figures).items() if v >= 5]
    return "  ".join(parts)


def _cpu(figures: Mapping[str, T]) -> dict[str, T]:
    """The CPU figures, services first and the host last."""
    order = ["write_service", "read_service", "sync_worker", "naive", "echo_server", "postgres", "redis", "client"]
    order += ["bench"]
    order += ["other", "host"]

    def rank(key: str) -> tuple[int, str]:
        name = key.removeprefix("cpu_").removesuffix("_pct")
        return next((i for i, o in enumerate(order) if name.startswith(o)), len(order)), name

    return {k: figures[k] for k in sorted((k for k in figures if k.startswith("cpu_")), key=rank)}


def _short(cpu_key: str) -> str:
    name = cpu_key.removeprefix("cpu_").removesuffix("_pct")
    return {
        "write_service": "write",
        "read_service": "read",
        "sync_worker": "worker",
        "echo_server": "echo",
        "postgres": "pg",
        "write_service_x2": "write x2",
        "read_service_x2": "read x2",
    }.get(name, name)


async def bench_run(settings: Settings, chosen: list[Measurement], servers: Servers, log_dir: Path) -> Report:
    progress = Progress()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    run_id = uuid.uuid4().hex[:6]
    database = f"orders_bench_{run_id}"
    database_url = await create_database(servers.postgres_url, database)
    clients = ClientPool(settings.client_processes)
    bench = Bench(settings, run_id, database_url, servers.redis_url, f"bench:{run_id}:", log_dir, clients, progress)
    progress(f"run {run_id}: database {database}, Redis prefix {bench.prefix}, logs in {log_dir}")
    try:
        await prepare(bench, chosen, servers)
        rounds, samples = await run_rounds(bench, chosen)
        machine = await machine_info(servers, database_url)
    finally:
        await cleanup(bench, servers, database)
    elapsed = time.monotonic() - progress.started
    return Report(settings, [m.name for m in chosen], rounds, machine, started_at, elapsed, bench.skipped, samples)


async def cleanup(bench: Bench, servers: Servers, database: str) -> None:
    bench.clients.close()
    for started in (bench.services_x2, bench.services, bench.naive):
        if started is not None:
            await started.stop()
    if bench.echo is not None:
        await stop_process(bench.echo)
    await drop_database(servers.postgres_url, database)
    await drop_database(servers.postgres_url, _naive_name(bench))
    if bench.history_url:
        await drop_database(servers.postgres_url, _history_name(bench))
    deleted = await delete_keys(bench.redis_url, bench.prefix)
    bench.progress(f"cleaned up: databases dropped, {deleted:,} Redis keys deleted")


# ------------------------------------------------------------------------------ machine and output


def _versions() -> dict[str, str]:
    found = {}
    for package in ("orders-cqrs", "grpcio", "protobuf", "asyncpg", "redis", "hiredis", "uvloop"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    return found


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _git_commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        return done.stdout.strip()
    return ""


async def machine_info(servers: Servers, database_url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(database_url)
    try:
        postgres = {
            name: await conn.fetchval(f"SHOW {name}") for name in ("server_version", "fsync", "synchronous_commit")
        }
    finally:
        await conn.close()
    redis = redis_client(servers.redis_url)
    try:
        redis_version = (await redis.info("server")).get("redis_version", "")
    finally:
        await redis.aclose()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
        "postgres": postgres,
        "redis_version": redis_version,
        "embedded_servers": servers.embedded,
        "git_commit": _git_commit(),
        "load_average_at_end": os.getloadavg(),  # another busy process on the host shows here
    }


def _notes(name: str, figures: dict[str, Spread]) -> str:
    def med(key: str) -> float:
        return figures[key].median if key in figures else 0.0

    notes = []
    if name.startswith("rebuild"):
        notes.append(f"peak RSS {med('peak_rss_mb'):.0f} MB, {med('seconds'):.1f}s in all")
        notes.append(f"{med('applied_rate'):,.0f} applies/s over 2 projections")
    if name in {"lag", "naive-lag"}:
        notes.append(f"ack p50/p99 {med('ack_p50_ms'):.1f}/{med('ack_p99_ms'):.1f} ms")
        if "missing" in figures and figures["missing"].max:
            notes.append(f"missing up to {figures['missing'].max:.0f}")
    if name == "lag" and med("foreign_tx_max_ms") > 10:  # they hold the sync worker back
        notes.append(f"other databases' transactions up to {med('foreign_tx_max_ms'):.0f} ms old")
    cpu = [f"{_short(k)} {v.median:.0f}%" for k, v in _cpu(figures).items() if v.median >= 5]
    if cpu:
        notes.append("cpu " + " ".join(cpu))
    if "errors" in figures and figures["errors"].max:
        notes.append(f"errors up to {figures['errors'].max:.0f}/round")
    return "; ".join(notes)


def rows(report: Report, summaries: dict[str, dict[str, Spread]]) -> list[Row]:
    result = []
    for name in report.measurements:
        m = BY_NAME[name]
        label = _label(m, report.settings)
        notes = report.skipped.get(name) or _notes(name, summaries[name])
        result.append(Row(label, m.unit, summaries[name], notes))
    return result


def _label(m: Measurement, settings: Settings) -> str:
    return f"{m.label} at {settings.rate:g}/s" if m.name in OPEN_LOOP else m.label


def summarize_report(report: Report) -> dict[str, dict[str, Spread]]:
    """Each measurement's figures over the rounds, and the derived CPU figures (orders_bench.cpu)."""
    summaries = {name: summarize(report.rounds[name]) for name in report.measurements}
    summaries[CPU] = summarize(cpu_rounds(report.rounds, len(PROJECTIONS)))
    return summaries


def to_json(report: Report, summaries: dict[str, dict[str, Spread]], verdicts: list[Verdict]) -> dict[str, Any]:
    return {
        "started_at": report.started_at,
        "elapsed_seconds": report.elapsed,
        "command": sys.argv,
        "settings": asdict(report.settings),
        "machine": report.machine,
        "measurements": {
            name: {
                "label": BY_NAME[name].label,
                "unit": BY_NAME[name].unit,
                "rounds": report.rounds[name],
                "summary": {k: v.as_dict() for k, v in summaries[name].items()},
                "samples": report.samples[name],
            }
            for name in report.measurements
        },
        "sample_quantiles": list(LATENCY_QUANTILES),  # the percentiles of every latency_ms and lag_ms
        "skipped": report.skipped,
        CPU: {
            "rounds": cpu_rounds(report.rounds, len(PROJECTIONS)),
            "summary": {k: v.as_dict() for k, v in summaries[CPU].items()},
        },
        "checks": [v.as_dict() for v in verdicts],
    }


def cpu_table(report: Report, summaries: dict[str, dict[str, Spread]]) -> str:
    """CPU per unit of every measurement, against its floor, and what the floors are made of."""
    table_rows = [(name, _label(BY_NAME[name], report.settings), summaries[name]) for name in report.measurements]
    owners = {k.removeprefix(PER_PROCESS) for _, _, figures in table_rows for k in figures if k.startswith(PER_PROCESS)}
    table = render_cpu(table_rows, summaries[CPU], {owner: _short(f"cpu_{owner}_pct") for owner in owners})
    floor = median_floor(summaries, len(PROJECTIONS))
    return table if floor is None else f"{table}\n{describe_floor(floor)}"


def output(report: Report, json_out: Path | None, plots_dir: Path | None, plots: bool = True) -> str:
    """Writes the JSON (and the plots, unless not `plots`); returns the text to print."""
    summaries = summarize_report(report)
    verdicts = [evaluate(check, summaries) for check in checks(report.settings.rate)]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = json_out or Path("bench-results") / f"{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    results = to_json(report, summaries, verdicts)
    path.write_text(json.dumps(results, indent=2) + "\n")
    s = report.settings
    header = (
        f"orders-bench: {s.rounds} rounds of {s.duration:g}s (+{s.warmup:g}s warm-up), {s.concurrency} in flight, "
        f"{s.client_processes} client process(es), {report.machine['cpu_count']} CPUs, {report.elapsed:.0f}s in all"
    )
    table = render_results(rows(report, summaries), s.rounds)
    cpu = cpu_table(report, summaries)
    text = f"{header}\n\n{table}\n\n{cpu}\n\n{render_verdicts(verdicts)}\n\nJSON: {path}"
    return f"{text}\n{draw(results, plots_dir or plots_beside(path))}" if plots else text


def plots_beside(json_path: Path) -> Path:
    """The plots' default folder: beside the JSON, of the same name (bench-results/<time>/)."""
    return json_path.with_suffix("")


class PlotsUnavailable(Exception):
    """matplotlib, an optional extra, is not installed."""


NO_MATPLOTLIB = "matplotlib is not installed (pip install 'orders-cqrs[bench]')"


def draw_plots(results: Mapping[str, Any], directory: Path) -> str:
    """Draws the plots of a run's results into `directory`; one line that says what was drawn."""
    try:
        from orders_bench import plots, scaling_plots, soak_plots  # noqa: PLC0415 - matplotlib is optional
    except ModuleNotFoundError as missing:
        if (missing.name or "").partition(".")[0] != "matplotlib":
            raise
        raise PlotsUnavailable(NO_MATPLOTLIB) from missing
    by_kind = {"soak": soak_plots.write_plots, "scaling": scaling_plots.write_plots}
    write_plots = by_kind.get(str(results.get("kind")), plots.write_plots)
    written, lacking = write_plots(results, directory)
    line = f"plots: {', '.join(p.name for p in written) or 'none'} in {directory}"
    return f"{line} (no data for: {', '.join(lacking)})" if lacking else line


def draw(results: Mapping[str, Any], directory: Path) -> str:
    """As draw_plots, but a missing matplotlib is one line of the output, not an error: the run's
    JSON is written already."""
    try:
        return draw_plots(results, directory)
    except PlotsUnavailable as unavailable:
        return f"plots: none, {unavailable}"


def replot(json_path: Path, plots_dir: Path | None) -> str:
    """`--plot`: the plots of a saved run."""
    results = json.loads(json_path.read_text())
    return draw_plots(results, plots_dir or plots_beside(json_path))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.plot is not None:
        try:
            print(replot(args.plot, args.plots_dir), flush=True)
        except (OSError, ValueError, PlotsUnavailable) as error:
            sys.exit(f"orders-bench: cannot plot {args.plot}: {error}")
        return
    if args.soak is not None:
        soak_main(args)
        return
    if args.scaling:
        scaling_main(args)
        return
    settings = settings_from(args)
    chosen = [BY_NAME[name] for name in (args.only or [m.name for m in MEASUREMENTS if m.default])]
    reports: list[Report] = []
    with tempfile.TemporaryDirectory(prefix="orders-bench-") as scratch:
        servers = start_servers(args.postgres_url or None, args.redis_url or None, Path(scratch) / "servers")
        try:

            async def go() -> None:
                reports.append(await bench_run(settings, chosen, servers, Path(scratch)))

            run(go)
        finally:
            servers.stop()
    print(output(reports[0], args.json_out, args.plots_dir, plots=not args.no_plots), flush=True)


def soak_main(args: argparse.Namespace) -> None:
    """`--soak`: the services on the given (or embedded) servers under a steady load (orders_bench.soak)."""
    settings = soak.settings_from(args)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="orders-bench-soak-") as scratch:
        servers = start_servers(args.postgres_url or None, args.redis_url or None, Path(scratch) / "servers")
        try:

            async def go() -> None:
                results.append(await soak.soak_run(settings, servers, Path(scratch), Progress(), machine_info))

            run(go)
        finally:
            servers.stop()
    path = soak.write_json(results[0], args.json_out)
    text = f"{soak.render(results[0])}\n\nJSON: {path}"
    if not args.no_plots:
        text = f"{text}\n{draw(results[0], args.plots_dir or plots_beside(path))}"
    print(text, flush=True)


def scaling_main(args: argparse.Namespace) -> None:
    """`--scaling`: the sync worker's throughput by partitions and workers (orders_bench.scaling)."""
    settings = scaling.settings_from(args)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="orders-bench-scaling-") as scratch:
        servers = start_servers(args.postgres_url or None, args.redis_url or None, Path(scratch) / "servers")
        try:

            async def go() -> None:
                results.append(await scaling.scaling_run(settings, servers, Path(scratch), Progress(), machine_info))

            run(go)
        finally:
            servers.stop()
    path = scaling.write_json(results[0], args.json_out)
    text = f"{scaling.render(results[0])}\n\nJSON: {path}"
    if not args.no_plots:
        text = f"{text}\n{draw(results[0], args.plots_dir or plots_beside(path))}"
    print(text, flush=True)


if __name__ == "__main__":
    main()
