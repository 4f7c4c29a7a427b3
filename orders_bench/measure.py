"""The measurements: what each one runs in a round, and the figures it reports.

Each measurement's round returns figures: "rate" (units per second), p50/p99/max latency in ms
where it has one, errors, and the CPU use of the processes involved (100 = one core busy), which
tells which process limits it; and samples for the plots (orders_bench.samples): percentiles of the
calls' latencies, the lag of each command against time, the rebuild's progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from orders.domain.consistency import LogPosition
from orders.store.event_store import head, open_connection
from orders.store.views import PROJECTIONS, ViewKeys, redis_client
from orders.tools.processes import ServiceProcess
from orders.v1 import commands_pb2_grpc, queries_pb2, queries_pb2_grpc
from orders_bench.cpu import unit_cpu
from orders_bench.history import rebuild_round
from orders_bench.load import ClientPool, Job, JobResult
from orders_bench.naive import order_key
from orders_bench.ops import CALL_TIMEOUT, add_item_request, create_request
from orders_bench.samples import Samples, lag_series, latency_quantiles
from orders_bench.stats import Figures, latency_figures
from orders_bench.system import CpuMeter, Services, delete_keys, spent

READ_PAGE_SIZE = 20
ORDERS_PER_CUSTOMER = 20  # prefilled for the read tests: one full ListOrders page each
PREFILL_CONCURRENCY = 32
REBUILD_TIMEOUT = 3600.0
SETTLE_TRIES = 1200  # 0.05 s apart
CHANNELS_X2 = 8  # per client process against 2-process services: SO_REUSEPORT spreads connections
# Whose CPU counts as each measurement's, per unit of work (the benchmark's own process does not).
Parts = tuple[str, ...]
SYSTEM_PARTS: Parts = ("write_service", "read_service", "sync_worker", "postgres", "redis", "client")
SYSTEM_X2_PARTS: Parts = ("write_service_x2", "read_service_x2", "sync_worker", "postgres", "redis", "client")
NAIVE_PARTS: Parts = ("naive_write", "naive_poll", "naive_read", "postgres", "redis", "client")
ECHO_PARTS: Parts = ("echo_server", "client")
POSTGRES_PARTS: Parts = ("postgres", "client")
REDIS_PARTS: Parts = ("redis", "client")
FOREIGN_TX_QUERY = (
    "SELECT coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0)::float8 FROM pg_stat_activity"
    " WHERE backend_xid IS NOT NULL AND datname NOT LIKE $1"
)


@dataclass(frozen=True)
class Settings:
    rounds: int
    duration: float
    warmup: float
    concurrency: int
    rate: float
    rebuild_events: int
    client_processes: int
    read_orders: int
    lag_streams: int
    pool_size: int  # the write service's PostgreSQL pool (its default), for the raw insert ceiling


@dataclass
class Bench:
    """Everything a measurement needs; parts not needed by the chosen measurements stay empty."""

    settings: Settings
    run_id: str
    database_url: str
    redis_url: str
    prefix: str
    log_dir: Path
    clients: ClientPool
    progress: Callable[[str], None]
    services: Services | None = None
    echo_address: str = ""
    stack_address: str = ""  # our server stack answering from memory (orders_bench.ceilings)
    echo: ServiceProcess | None = None
    read_orders: list[str] = field(default_factory=list)
    read_customers: list[str] = field(default_factory=list)
    history_url: str = ""
    history_head: LogPosition | None = None
    jobs: int = 0
    services_x2: Services | None = None  # write and read services of 2 processes each, on the same data
    naive: Services | None = None  # the naive reference pipeline (orders_bench.naive)
    naive_orders: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # measurement -> why it cannot run here

    @property
    def marker(self) -> str:
        """In the name of every database of this run (the main one and the history)."""
        return f"orders_bench_{self.run_id}"

    def pids(self) -> dict[str, int]:
        pids = {"bench": os.getpid()}
        for started in (self.services, self.services_x2, self.naive):
            pids.update(started.pids if started is not None else {})
        if self.echo is not None:
            pids["echo_server"] = self.echo.pid
        for index, pid in enumerate(self.clients.pids):
            pids["client" if self.clients.size == 1 else f"client{index}"] = pid
        return pids

    def job(self, workload: str, params: dict[str, Any], rate: float | None = None, concurrency: int = 0) -> Job:
        s = self.settings
        return Job(workload, params, concurrency or s.concurrency, rate, s.duration, s.warmup)

    @property
    def addresses(self) -> dict[str, str]:
        assert self.services is not None
        return {"write": self.services.write_address, "read": self.services.read_address}

    @property
    def addresses_x2(self) -> dict[str, Any]:
        assert self.services_x2 is not None
        write, read = self.services_x2.write_address, self.services_x2.read_address
        return {"write": write, "read": read, "channels": CHANNELS_X2}

    @property
    def naive_addresses(self) -> dict[str, str]:
        assert self.naive is not None
        return {"write": self.naive.write_address, "read": self.naive.read_address}

    def check_running(self) -> None:
        for started in (self.services, self.services_x2, self.naive):
            if started is not None:
                started.check_running()


@dataclass(frozen=True)
class Outcome:
    """One round of one measurement: its figures (summarized over the rounds) and its samples."""

    figures: Figures
    samples: Samples = field(default_factory=dict)


Runner = Callable[[Bench, int], Awaitable[Outcome]]


async def _measured(bench: Bench, job: Job, parts: Parts) -> tuple[JobResult, Figures]:
    """Runs `job` in the client processes, with CPU accounting of every process involved: its use
    over the whole job (cpu_*_pct), and the CPU seconds spent within the measured window per unit
    of work done in it (unit_cpu_us_*, for the processes of `parts`, and their sum unit_cpu_us)."""
    await settle(bench)
    bench.jobs += 1
    # Order ids must be new in every job: run id and job number, letters and digits only.
    job = replace(job, tag=f"{bench.run_id}j{bench.jobs}")
    meter = CpuMeter(bench.pids(), bench.marker)
    window = Window(meter, job)
    stop_watching = asyncio.Event()
    watching = asyncio.create_task(foreign_transactions(bench, stop_watching))
    try:
        result = await bench.clients.run(job, on_start=window.start)
    finally:
        stop_watching.set()
        foreign = await watching
        cpu = await meter.stop()
        used = await window.spent()
    bench.check_running()
    figures: Figures = {"errors": float(result.errors), "foreign_tx_max_ms": foreign, **cpu}
    figures |= unit_cpu(used, result.units, parts)
    if result.errors:
        bench.progress(f"{job.workload}: {result.errors} failed calls, the first: {result.first_error}")
    return result, figures


class Window:
    """CPU samples at the start and the end of a job's measured window (wall-clock times the
    client processes share), taken by a task of the orchestrator's while the job runs."""

    def __init__(self, meter: CpuMeter, job: Job) -> None:
        self.meter, self.job = meter, job
        self.task: asyncio.Task[dict[str, float]] | None = None

    def start(self, wall_start: float) -> None:
        self.task = asyncio.create_task(self._sample(wall_start + self.job.warmup))

    async def _sample(self, begins: float) -> dict[str, float]:
        await asyncio.sleep(max(0.0, begins - time.time()))
        first = self.meter.mark()
        await asyncio.sleep(max(0.0, begins + self.job.duration - time.time()))
        return spent(first, self.meter.mark())

    async def spent(self) -> dict[str, float]:
        """CPU seconds by owner within the window; empty if the job never started."""
        if self.task is None:
            return {}
        if not self.task.done():  # the job failed early
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            return {}
        return self.task.result()


async def closed(bench: Bench, workload: str, params: dict[str, Any], parts: Parts) -> Outcome:
    return closed_outcome(*await _measured(bench, bench.job(workload, params), parts))


def closed_outcome(result: JobResult, figures: Figures) -> Outcome:
    figures = {"rate": result.units / result.duration, **latency_figures(result.latencies), **figures}
    return Outcome(figures, _latency_samples(result))


def _latency_samples(result: JobResult) -> Samples:
    return {"latency_ms": latency_quantiles(result.latencies)}


async def _open(bench: Bench, workload: str, params: dict[str, Any], parts: Parts) -> tuple[JobResult, Figures]:
    job = bench.job(workload, params, rate=bench.settings.rate, concurrency=1)
    result, figures = await _measured(bench, job, parts)
    figures["rate"] = result.calls / result.duration  # achieved; the offered rate is in the settings
    figures["late_calls"] = result.extra.get("late_calls", 0.0)
    return result, figures


# ------------------------------------------------------------------------------ the measurements


async def echo(bench: Bench, round_no: int) -> Outcome:
    return await closed(bench, "echo", {"echo": bench.echo_address}, ECHO_PARTS)


async def stack_create(bench: Bench, round_no: int) -> Outcome:
    return await closed(bench, "create", {"write": bench.stack_address}, ECHO_PARTS)


async def stack_get(bench: Bench, round_no: int) -> Outcome:
    return await closed(bench, "get", {"read": bench.stack_address, "order_ids": ["any"]}, ECHO_PARTS)


async def pg_insert(bench: Bench, round_no: int) -> Outcome:
    params = {"database_url": bench.database_url, "pool_size": _pool_share(bench)}
    return await closed(bench, "pg-insert", params, POSTGRES_PARTS)


def _pool_share(bench: Bench) -> int:
    """The write service's pool size, split over the client processes (it is one pool there)."""
    return max(1, -(-bench.settings.pool_size // bench.clients.size))


async def redis_get(bench: Bench, round_no: int) -> Outcome:
    return await closed(bench, "redis-get", {"redis_url": bench.redis_url, "prefix": bench.prefix}, REDIS_PARTS)


async def redis_multi(bench: Bench, round_no: int) -> Outcome:
    """Two transactions in flight, from one process: the sync worker's shape (a sequential loop per
    projection), which is the ceiling the rebuild is compared with."""
    params = {"redis_url": bench.redis_url, "prefix": bench.prefix}
    job = Job("redis-multi", params, 2, None, bench.settings.duration, bench.settings.warmup)
    return closed_outcome(*await _measured(bench, job, REDIS_PARTS))


async def create(bench: Bench, round_no: int) -> Outcome:
    return await closed(bench, "create", bench.addresses, SYSTEM_PARTS)


async def create_client(bench: Bench, round_no: int) -> Outcome:
    return await closed(bench, "create-client", bench.addresses, SYSTEM_PARTS)


async def lifecycle(bench: Bench, round_no: int) -> Outcome:
    return await closed(bench, "lifecycle", bench.addresses, SYSTEM_PARTS)


async def ack(bench: Bench, round_no: int) -> Outcome:
    result, figures = await _open(bench, "create", bench.addresses, SYSTEM_PARTS)
    return Outcome({**latency_figures(result.latencies), **figures}, _latency_samples(result))


async def get(bench: Bench, round_no: int) -> Outcome:
    return await closed(bench, "get", {**bench.addresses, "order_ids": bench.read_orders}, SYSTEM_PARTS)


async def list_orders(bench: Bench, round_no: int) -> Outcome:
    params = {**bench.addresses, "customers": bench.read_customers, "page_size": READ_PAGE_SIZE}
    return await closed(bench, "list", params, SYSTEM_PARTS)


async def lag(bench: Bench, round_no: int) -> Outcome:
    streams = max(1, bench.settings.lag_streams // bench.clients.size)
    result, figures = await _open(bench, "lag", {**bench.addresses, "streams": streams}, SYSTEM_PARTS)
    return lag_outcome(result, figures)


async def create_x2(bench: Bench, round_no: int) -> Outcome:
    return await closed(bench, "create", bench.addresses_x2, SYSTEM_X2_PARTS)


async def get_x2(bench: Bench, round_no: int) -> Outcome:
    return await closed(bench, "get", {**bench.addresses_x2, "order_ids": bench.read_orders}, SYSTEM_X2_PARTS)


async def naive_create(bench: Bench, round_no: int) -> Outcome:
    return await closed(bench, "create", bench.naive_addresses, NAIVE_PARTS)


async def naive_ack(bench: Bench, round_no: int) -> Outcome:
    result, figures = await _open(bench, "create", bench.naive_addresses, NAIVE_PARTS)
    return Outcome({**latency_figures(result.latencies), **figures}, _latency_samples(result))


async def naive_get(bench: Bench, round_no: int) -> Outcome:
    return await closed(bench, "get", {**bench.naive_addresses, "order_ids": bench.naive_orders}, NAIVE_PARTS)


async def naive_lag(bench: Bench, round_no: int) -> Outcome:
    params = {**bench.naive_addresses, "redis_url": bench.redis_url, "prefix": naive_prefix(bench)}
    result, figures = await _open(bench, "naive-lag", params, NAIVE_PARTS)
    return lag_outcome(result, figures)


def lag_outcome(result: JobResult, figures: Figures) -> Outcome:
    """A lag run's figures: the lags (its samples), the acks' latencies as ack_*, its extras; and
    the percentiles of both, and the lags against time."""
    ack_figures = {f"ack_{k}": v for k, v in latency_figures(result.latencies).items()}
    extra = {k: v for k, v in result.extra.items() if k != "late_calls"}
    samples = {
        **_latency_samples(result),
        "lag_ms": latency_quantiles(result.samples),
        "lag_series": lag_series(result.series, result.window_start),
    }
    return Outcome({**latency_figures(result.samples), **ack_figures, **extra, **figures}, samples)


def naive_prefix(bench: Bench) -> str:
    return f"{bench.prefix}naive:"


async def rebuild(bench: Bench, round_no: int) -> Outcome:
    return await _rebuild(bench, round_no, split=False)


async def rebuild_split(bench: Bench, round_no: int) -> Outcome:
    return await _rebuild(bench, round_no, split=True)


async def _rebuild(bench: Bench, round_no: int, split: bool) -> Outcome:
    assert bench.history_head is not None
    name = "rebuild-split" if split else "rebuild"
    prefix = f"{bench.prefix}{name}{round_no}:"
    log = bench.log_dir / f"{name}-worker-{round_no}.log"
    meter = CpuMeter({"bench": os.getpid()}, bench.marker)
    try:
        figures, progress = await rebuild_round(
            bench.history_url,
            bench.redis_url,
            prefix,
            target=bench.history_head,
            events=bench.settings.rebuild_events,
            log=log,
            timeout=REBUILD_TIMEOUT,
            progress=bench.progress,
            split=split,
        )
    finally:
        cpu = await meter.stop()
        await delete_keys(bench.redis_url, prefix)
    # The worker started inside the span, so the meter counted it as someone else's load.
    cpu["cpu_other_pct"] = max(0.0, cpu.get("cpu_other_pct", 0.0) - figures.get("cpu_sync_worker_pct", 0.0))
    return Outcome({**cpu, **figures}, {"progress": progress})


async def foreign_transactions(bench: Bench, stop: asyncio.Event) -> float:
    """The age in ms of the oldest transaction of another database seen until `stop`: on a shared
    server such a transaction holds the sync worker's reads back (docs/design.md), which shows as lag
    that is not this system's."""
    conn = await asyncpg.connect(bench.database_url)
    oldest = 0.0
    try:
        while not stop.is_set():
            age = await conn.fetchval(FOREIGN_TX_QUERY, f"{bench.marker}%")
            oldest = max(oldest, 1000 * float(age))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
    finally:
        await conn.close()
    return oldest


async def settle(bench: Bench) -> None:
    """Waits until the live sync worker has applied every event so far, so that no measurement
    pays for the backlog of the one before it."""
    if bench.services is None:
        return
    conn = await open_connection(bench.database_url)
    redis = redis_client(bench.redis_url)
    try:
        last = await head(conn)
        keys = [ViewKeys(bench.prefix, name).checkpoint for name in PROJECTIONS]
        for _ in range(SETTLE_TRIES):
            checkpoints = await redis.mget(keys)
            if last is None or all(c is not None and LogPosition.parse(c) >= last for c in checkpoints):
                return
            await asyncio.sleep(0.05)
        bench.progress("warning: the sync worker had not caught up after 60s; measuring anyway")
    finally:
        await conn.close()
        await redis.aclose()


# ------------------------------------------------------------------------------ read prefill


async def prefill_reads(bench: Bench) -> None:
    """Orders for the read tests, ORDERS_PER_CUSTOMER per customer, each with one item; returns
    once the views hold them all."""
    count = bench.settings.read_orders
    tag = f"{bench.run_id}rd"
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(bench.addresses["write"]) as channel:
        stub = commands_pb2_grpc.OrderCommandsStub(channel)
        tokens = await _prefill_orders(stub, tag, count)
    bench.read_orders = [f"{tag}o{n}" for n in range(count)]
    bench.read_customers = sorted({f"{tag}c{n // ORDERS_PER_CUSTOMER}" for n in range(count)})
    await _wait_visible(bench.addresses["read"], bench.read_orders[-1], max(tokens, key=LogPosition.parse))
    bench.progress(f"read prefill: {count:,} orders in {time.perf_counter() - started:.1f}s")


async def _prefill_orders(stub: commands_pb2_grpc.OrderCommandsStub, tag: str, count: int) -> list[str]:
    tokens: list[str] = []
    limit = asyncio.Semaphore(PREFILL_CONCURRENCY)

    async def one(n: int) -> None:
        request = create_request(tag, n)
        request.customer_id = f"{tag}c{n // ORDERS_PER_CUSTOMER}"
        async with limit:
            await stub.CreateOrder(request, timeout=CALL_TIMEOUT)
            reply = await stub.AddItem(add_item_request(request.order_id), timeout=CALL_TIMEOUT)
        tokens.append(reply.result.consistency_token)

    await asyncio.gather(*(one(n) for n in range(count)))
    return tokens


async def _wait_visible(read_address: str, order_id: str, token: str) -> None:
    async with grpc.aio.insecure_channel(read_address) as channel:
        stub = queries_pb2_grpc.OrderQueriesStub(channel)
        for _ in range(60):
            reply = await stub.GetOrder(queries_pb2.GetOrderRequest(order_id=order_id, consistency_token=token))
            if not reply.consistency.stale:
                return
        raise RuntimeError("the prefilled orders did not reach the views within a minute")


async def prefill_naive(bench: Bench) -> None:
    """As many orders as the read tests', through the naive pipeline; returns once its poller has
    SET them all."""
    assert bench.naive is not None
    count, tag = bench.settings.read_orders, f"{bench.run_id}nv"
    limit = asyncio.Semaphore(PREFILL_CONCURRENCY)
    async with grpc.aio.insecure_channel(bench.naive.write_address) as channel:
        stub = commands_pb2_grpc.OrderCommandsStub(channel)

        async def one(n: int) -> None:
            async with limit:
                await stub.CreateOrder(create_request(tag, n), timeout=CALL_TIMEOUT)

        await asyncio.gather(*(one(n) for n in range(count)))
    bench.naive_orders = [f"{tag}o{n}" for n in range(count)]
    redis = redis_client(bench.redis_url)
    try:
        keys = [order_key(naive_prefix(bench), order_id) for order_id in bench.naive_orders]
        for _ in range(SETTLE_TRIES):
            if None not in await redis.mget(keys):
                return
            await asyncio.sleep(0.05)
    finally:
        await redis.aclose()
    raise RuntimeError("the naive pipeline's poller did not SET the prefilled orders within a minute")
