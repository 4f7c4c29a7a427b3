"""`orders-bench --scaling`: how the sync worker's throughput grows with partitions (P) and worker
processes (W), and what one partition costs (the figures of docs/deployment.md's scaling model).

Once per run: a log of `events` events is loaded with COPY into a template database (as the
rebuild measurement loads its history, orders_bench.history), and one reader's cost of reading it
back in the worker's batches is measured (ms per batch, PostgreSQL and reader CPU per event).

Then, round 1 of every configuration (P, W), round 2, ... (drift spreads over all of them); each
round on a fresh database (a copy of the template) and a fresh Redis prefix:

- rebuild: W `orders-sync-worker` processes (ORDERS_PARTITIONS=P, a worker id each, a lease of
  LEASE_TTL seconds) replay the log into empty views; timed from the first applied batch until
  every partition of both projections has its checkpoint at the log head. Log events per second.
- live: the workers, caught up and idle, then see `writers` connections append valid orders
  (COPY of CHUNK_EVENTS rows and a NOTIFY per transaction, as fast as they go, or at `offered_rate`
  events/s in all when set) for `live_seconds`.
  Applied events/s: events at or before each partition's checkpoint at the window's end, averaged
  over the partitions, per second; the lag: how long after an event was seen at the head every
  checkpoint had passed it (sampled every LAG_POLL seconds, so ±LAG_POLL); the backlog at the end;
  then up to `live_seconds` more for the workers to drain it.

Both phases report the CPU of every process (100 = one core) from /proc: the workers together, the
PostgreSQL processes working for the run, Redis, the benchmark's own process (the appending
writers and the polling) and everything else on the host; the workers' CPU per log event; the
batches they applied (their /metrics) and Redis' time per batch (INFO commandstats: on a Redis of
its own, as the embedded one is, nothing else counts in it).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis, RedisCluster

from orders.domain.consistency import START, LogPosition
from orders.domain.events import event_type, to_payload
from orders.store.event_store import NOTIFY_CHANNEL, head, open_connection, read_batch
from orders.store.views import PROJECTIONS, ViewKeys, redis_client
from orders.tools.embedded import free_port
from orders.tools.processes import ServiceProcess
from orders_bench import scaling_stats
from orders_bench.history import COLUMNS, load_history, order_events
from orders_bench.scaling_stats import Config, config_name
from orders_bench.stats import Figures, Spread, percentiles
from orders_bench.system import (
    CpuMeter,
    Servers,
    Snapshot,
    create_database,
    database_url,
    delete_keys,
    drop_database,
    host_ticks,
    spawn,
    spent,
    stop_process,
)
from sync_worker.membership import share_of

DEFAULT_PARTITIONS = (1, 2, 4)
DEFAULT_WORKERS = (1, 2, 4)
FULL = {"rounds": 3, "events": 100_000, "live_seconds": 4.0}
QUICK = {"rounds": 3, "events": 20_000, "live_seconds": 2.0}
DEFAULT_WRITERS = 4
CHUNK_EVENTS = 200  # events per appending transaction: 50 orders, a busy write service's group commit
LEASE_TTL = "2"  # seconds: a worker that stops hands its partitions over within this
READ_BATCH = 500  # the worker's default batch size
POLL = 0.01  # seconds between checkpoint polls during the rebuild
LAG_POLL = 0.02  # seconds between head and checkpoint samples during the live window
IDLE_BEFORE_LIVE = 0.5  # seconds the caught-up workers sit idle before the live window
REBUILD_TIMEOUT = 600.0
ASSEMBLE_TIMEOUT = 60.0
CUSTOMERS = 1000  # customers the live orders spread over
METRICS_TIMEOUT = 5.0

Progress = Callable[[str], None]
MachineInfo = Callable[[Servers, str], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class ScalingSettings:
    partitions: tuple[int, ...]
    workers: tuple[int, ...]
    rounds: int
    events: int  # in the log each rebuild replays
    live_seconds: float
    writers: int
    offered_rate: float = 0.0  # events/s offered in the live window; 0: as fast as the writers go

    @property
    def configs(self) -> list[Config]:
        return [(p, w) for p in self.partitions for w in self.workers]


def positive_list(text: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers, for --partitions and --workers."""
    try:
        values = tuple(int(word) for word in text.split(",") if word.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"expected comma-separated positive integers, got {text!r}")
    return values


def settings_from(args: Any) -> ScalingSettings:
    """From orders-bench's arguments: --rounds, --rebuild-events and --duration (the live window)
    where given, else the --quick or full defaults."""
    defaults = QUICK if args.quick else FULL
    return ScalingSettings(
        partitions=args.partitions,
        workers=args.workers,
        rounds=args.rounds or int(defaults["rounds"]),
        events=args.rebuild_events or int(defaults["events"]),
        live_seconds=args.duration or float(defaults["live_seconds"]),
        writers=args.writers,
        offered_rate=args.live_rate or 0.0,
    )


# ------------------------------------------------------------------------------ the workers


@dataclass
class Workers:
    """W sync worker processes sharing P partitions, each with its /metrics endpoint."""

    processes: list[ServiceProcess]
    metrics: list[str]

    @property
    def pids(self) -> dict[str, int]:
        return {f"sync_worker_{i}": p.pid for i, p in enumerate(self.processes)}

    def check_running(self) -> None:
        for process in self.processes:
            if process.returncode is not None:
                raise RuntimeError(f"a sync worker exited ({process.returncode}):\n{process.log_tail()}")

    async def batches(self) -> float:
        """Batches applied so far by all the workers (orders_projection_batch_size's count)."""
        total = 0.0
        timeout = aiohttp.ClientTimeout(total=METRICS_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for address in self.metrics:
                async with session.get(f"http://{address}/metrics") as reply:
                    text = await reply.text()
                for family in text_string_to_metric_families(text):
                    if family.name == "orders_projection_batch_size":
                        total += sum(s.value for s in family.samples if s.name.endswith("_count"))
        return total

    async def stop(self) -> None:
        await asyncio.gather(*(stop_process(p) for p in self.processes))


async def start_workers(r: Round, redis_url: str) -> Workers:
    partitions, count = r.config
    processes, metrics = [], []
    for index in range(count):
        address = f"127.0.0.1:{free_port()}"
        env = {
            "ORDERS_POSTGRES_URL": r.database,
            "ORDERS_REDIS_URL": redis_url,
            "ORDERS_REDIS_PREFIX": r.prefix,
            "ORDERS_PARTITIONS": str(partitions),
            "ORDERS_WORKER_ID": f"bench-{r.run_id}-{index}",
            "ORDERS_LEASE_TTL": LEASE_TTL,
            "ORDERS_METRICS_ADDRESS": address,
        }
        log = r.log_dir / f"scaling-{config_name(r.config)}-worker{index}.log"
        processes.append(await spawn("orders-sync-worker", env, log))
        metrics.append(address)
    return Workers(processes, metrics)


# ------------------------------------------------------------------------------ what Redis holds


class Views:
    """The checkpoints and applied counters of every partition of both projections."""

    def __init__(self, redis: Redis | RedisCluster, prefix: str, partitions: int) -> None:
        self.redis = redis
        self.keys = [ViewKeys(prefix, name, 0, k, partitions) for name in PROJECTIONS for k in range(partitions)]

    async def checkpoints(self) -> list[LogPosition]:
        """Each partition's checkpoint (START where there is none yet)."""
        values = await self.redis.mget([k.checkpoint for k in self.keys])
        return [START if v is None else LogPosition.parse(v) for v in values]

    async def applied(self) -> int:
        return sum(int(v or 0) for v in await self.redis.mget([k.applied for k in self.keys]))

    async def pause(self) -> None:
        """Pauses every partition, as `orders-admin pause` does: the workers start, share the
        partitions and hold their leases, but apply nothing until `resume`."""
        await self.redis.mset({k.paused: "1" for k in self.keys})

    async def resume(self) -> None:
        await self.redis.delete(*(k.paused for k in self.keys))

    async def assembled(self, workers: int) -> bool:
        """Whether all `workers` have registered and every partition is held, paused, by the worker
        whose share it is (sync_worker.membership.share_of)."""
        members: dict[str, list[str]] = {}
        for keys in self.keys:
            if keys.projection not in members:
                members[keys.projection] = sorted(str(m) for m in await self.redis.zrange(keys.workers, 0, -1))
        if any(len(found) != workers for found in members.values()):
            return False
        beats = await self.redis.mget([k.heartbeat for k in self.keys])
        for keys, beat in zip(self.keys, beats, strict=True):
            owner = share_of(keys.partition, members[keys.projection])
            found = json.loads(beat) if beat else {}
            if found.get("worker") != owner or found.get("state") != "paused":
                return False
        return True


async def redis_work(redis: Redis | RedisCluster) -> tuple[float, float]:
    """Microseconds Redis has spent in commands so far, but for INFO (the benchmark's own), and
    the bytes it has received from its clients."""
    stats = await redis.info("commandstats")
    usec = sum(float(s["usec"]) for name, s in stats.items() if name != "cmdstat_info")
    return usec, float((await redis.info("stats"))["total_net_input_bytes"])


async def redis_figures(
    redis: Redis | RedisCluster, before: tuple[float, float], batches: float, events: float, phase: str
) -> Figures:
    """Redis' command time per batch and the bytes it received per log event since `before`."""
    usec, received = await redis_work(redis)
    return {
        f"{phase}_redis_us_per_batch": (usec - before[0]) / max(1.0, batches),
        f"{phase}_redis_in_bytes_per_event": (received - before[1]) / max(1.0, events),
    }


# ------------------------------------------------------------------------------ CPU by phase


class Phase:
    """CPU seconds by owner from its start to `end()`, and the rest of the host as "other"."""

    def __init__(self, meter: CpuMeter) -> None:
        self.meter, self.first, self.host = meter, meter.mark(), host_ticks()
        self.started = time.perf_counter()

    def end(self, name: str, events: float) -> Figures:
        """`{name}_cpu_{owner}_pct` for the workers together, postgres, redis, bench and other, and
        `{name}_{owner}_us_per_event` for all but other."""
        last: Snapshot = self.meter.mark()
        elapsed = max(1e-9, time.perf_counter() - self.started)
        used: dict[str, float] = {}
        for owner, seconds in spent(self.first, last).items():
            mine = "workers" if owner.startswith("sync_worker") else owner
            used[mine] = used.get(mine, 0.0) + seconds
        figures = {f"{name}_cpu_{owner}_pct": 100 * seconds / elapsed for owner, seconds in used.items()}
        if events > 0:
            figures |= {f"{name}_{owner}_us_per_event": 1e6 * s / events for owner, s in used.items()}
            figures[f"{name}_worker_us_per_event"] = figures.pop(f"{name}_workers_us_per_event", 0.0)
        host = host_ticks()
        if self.host is not None and host is not None and host[1] > self.host[1]:
            busy = 100 * (host[0] - self.host[0]) / (host[1] - self.host[1]) * (os.cpu_count() or 1)
            figures[f"{name}_cpu_other_pct"] = max(0.0, busy - sum(100 * s / elapsed for s in used.values()))
        return figures


# ------------------------------------------------------------------------------ appending live orders


class Appender:
    """Valid orders (created, two items, confirmed: the history's) appended by raw COPY, with the
    event store's NOTIFY, from `writers` connections as fast as they go (or at `rate` events/s in
    all) until stopped."""

    def __init__(self, database: str, writers: int, tag: str, rate: float = 0.0) -> None:
        self.database, self.writers, self.tag = database, writers, tag
        self.interval = writers * CHUNK_EVENTS / rate if rate > 0 else 0.0  # seconds between one writer's chunks
        self.appended = 0
        self.stop = asyncio.Event()
        self.payloads = [[json.dumps(to_payload(e)) for e in order_events(c * 10)] for c in range(CUSTOMERS)]
        self.types = [(event_type(e), e.schema_version) for e in order_events(0)]
        self.metadata = json.dumps({"command": "Bench", "command_id": "", "correlation_id": ""})

    def rows(self, writer: int) -> Iterator[list[tuple[str, int, str, int, str, str]]]:
        orders, n = CHUNK_EVENTS // len(self.types), 0
        while True:
            chunk = []
            for _ in range(orders):
                stream, payloads = f"{self.tag}w{writer}n{n}", self.payloads[n % CUSTOMERS]
                for version, ((kind, schema), payload) in enumerate(zip(self.types, payloads, strict=True), 1):
                    chunk.append((stream, version, kind, schema, payload, self.metadata))
                n += 1
            yield chunk

    async def run(self) -> None:
        connections = [await asyncpg.connect(self.database) for _ in range(self.writers)]
        try:
            await asyncio.gather(*(self._write(conn, i) for i, conn in enumerate(connections)))
        finally:
            await asyncio.gather(*(conn.close() for conn in connections))

    async def _write(self, conn: asyncpg.Connection, writer: int) -> None:
        chunks, due = self.rows(writer), time.perf_counter() + self.interval * writer / self.writers
        while not self.stop.is_set():
            if self.interval:  # paced: a chunk every interval, late chunks sent at once to catch up
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                due += self.interval
            chunk = next(chunks)
            async with conn.transaction():
                await conn.copy_records_to_table("events", records=chunk, columns=COLUMNS)
                await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
            self.appended += len(chunk)


class LagProbe:
    """Samples the log's head and every checkpoint; an event seen at the head at t has a lag of
    (the first sample where every checkpoint has passed it) - t."""

    def __init__(self, conn: asyncpg.Connection, views: Views) -> None:
        self.conn, self.views = conn, views
        self.pending: deque[tuple[float, LogPosition]] = deque()
        self.lags: list[float] = []
        self.slowest = START

    async def sample(self) -> None:
        last = await head(self.conn)
        now = time.perf_counter()
        if last is not None and (not self.pending or self.pending[-1][1] < last):
            self.pending.append((now, last))
        self.slowest = min(await self.views.checkpoints())
        now = time.perf_counter()
        while self.pending and self.pending[0][1] <= self.slowest:
            self.lags.append(now - self.pending.popleft()[0])

    async def run(self, until: float) -> None:
        while time.perf_counter() < until:
            await self.sample()
            await asyncio.sleep(LAG_POLL)

    def figures(self, now: float) -> Figures:
        """Lag percentiles in ms, events still pending counting with their lag so far."""
        lags = self.lags + [now - seen for seen, _ in self.pending]
        if not lags:
            return {}
        p50, p99 = percentiles(lags, [50, 99])
        oldest = now - self.pending[0][0] if self.pending else 0.0
        return {"live_lag_p50_ms": 1000 * p50, "live_lag_p99_ms": 1000 * p99, "live_lag_end_ms": 1000 * oldest}


async def count_through(conn: asyncpg.Connection, position: LogPosition) -> int:
    """Events at or before `position` in read order."""
    query = "SELECT count(*) FROM events WHERE (tx_id, position) <= ($1::xid8, $2::bigint)"
    return int(await conn.fetchval(query, position.tx_id, position.position))


# ------------------------------------------------------------------------------ one round of one configuration


@dataclass
class Round:
    """What one round of one configuration runs on."""

    settings: ScalingSettings
    config: Config
    database: str
    prefix: str
    log_dir: Path
    run_id: str
    marker: str
    redis: Redis | RedisCluster
    target: LogPosition
    progress: Progress
    figures: Figures = field(default_factory=dict)


async def measure_round(r: Round, redis_url: str) -> Figures:
    views = Views(r.redis, r.prefix, r.config[0])
    await views.pause()
    workers = await start_workers(r, redis_url)
    try:
        await assemble(r, workers, views)
        meter = CpuMeter({"bench": os.getpid(), **workers.pids}, r.marker)
        try:
            await rebuild_phase(r, workers, views, meter)
            await asyncio.sleep(IDLE_BEFORE_LIVE)
            await live_phase(r, workers, views, meter)
        finally:
            await meter.stop()
    finally:
        await workers.stop()
    return r.figures


async def assemble(r: Round, workers: Workers, views: Views) -> None:
    """Waits until the workers, started with every partition paused, have shared the partitions out:
    the rebuild then starts in all of them at once, not first in whichever process started first."""
    started = time.perf_counter()
    while not await views.assembled(len(workers.processes)):
        workers.check_running()
        if time.perf_counter() - started > ASSEMBLE_TIMEOUT:
            raise RuntimeError(f"{config_name(r.config)}: the workers did not share the partitions out in time")
        await asyncio.sleep(POLL)
    r.figures["assemble_s"] = time.perf_counter() - started


async def rebuild_phase(r: Round, workers: Workers, views: Views, meter: CpuMeter) -> None:
    """Resumes the paused partitions and times the replay, from the first applied batch (the loops
    notice the resume within a fifth of the lease ttl) to every checkpoint at the head."""
    redis_before = await redis_work(r.redis)
    await views.resume()
    started = time.perf_counter()
    phase: Phase | None = None
    first: tuple[float, int] = (0.0, 0)
    while min(await views.checkpoints()) < r.target:
        workers.check_running()
        if time.perf_counter() - started > REBUILD_TIMEOUT:
            raise RuntimeError(f"{config_name(r.config)}: the rebuild did not finish within {REBUILD_TIMEOUT:.0f}s")
        if phase is None and (applied := await views.applied()) > 0:
            phase, first = Phase(meter), (time.perf_counter(), applied)
        await asyncio.sleep(POLL)
    ended, events = time.perf_counter(), r.settings.events
    timed = events - first[1] / len(PROJECTIONS)  # log events applied after the first batch was seen
    batches = await workers.batches()
    r.figures |= {
        "rebuild_rate": timed / max(1e-9, ended - (first[0] or started)),
        "rebuild_s": ended - started,
        "rebuild_batches": batches,
        "rebuild_events_per_batch": events * len(PROJECTIONS) / max(1.0, batches),
    }
    r.figures |= await redis_figures(r.redis, redis_before, batches, events, "rebuild")
    if phase is not None:
        r.figures |= phase.end("rebuild", timed)


async def live_phase(r: Round, workers: Workers, views: Views, meter: CpuMeter) -> None:
    conn = await open_connection(r.database)
    tag = f"{r.run_id}{config_name(r.config)}"
    appender = Appender(r.database, r.settings.writers, tag, r.settings.offered_rate)
    probe = LagProbe(conn, views)
    try:
        base = await count_through(conn, r.target)
        batches_before, redis_before = await workers.batches(), await redis_work(r.redis)
        phase, started = Phase(meter), time.perf_counter()
        writing = asyncio.create_task(appender.run())
        await probe.run(started + r.settings.live_seconds)
        appender.stop.set()
        await writing
        checkpoints, ended = await views.checkpoints(), time.perf_counter()
        applied = [await count_through(conn, c) - base for c in checkpoints]
        elapsed, mean_applied = ended - started, sum(applied) / len(applied)
        batches = await workers.batches() - batches_before
        workers.check_running()
        r.figures |= phase.end("live", mean_applied) | probe.figures(ended)
        r.figures |= {
            "live_rate": mean_applied / elapsed,
            "live_min_rate": min(applied) / elapsed,
            "live_appended_rate": appender.appended / elapsed,
            "live_backlog_events": appender.appended - min(applied),
            "live_batches": batches,
            "live_events_per_batch": mean_applied * len(PROJECTIONS) / max(1.0, batches),
        }
        r.figures |= await redis_figures(r.redis, redis_before, batches, mean_applied, "live")
        await drain(r, probe, conn)
    finally:
        appender.stop.set()
        await conn.close()


async def drain(r: Round, probe: LagProbe, conn: asyncpg.Connection) -> None:
    """Seconds the workers take to reach the head after the writers stopped (if within the window's length)."""
    last, started = await head(conn), time.perf_counter()
    while last is not None and time.perf_counter() - started < r.settings.live_seconds:
        await probe.sample()
        if probe.slowest >= last:
            r.figures["live_drain_s"] = time.perf_counter() - started
            return
        await asyncio.sleep(LAG_POLL)


# ------------------------------------------------------------------------------ the run


async def measure_log_read(url: str, marker: str, batch_size: int = READ_BATCH) -> dict[str, float]:
    """One reader reading the whole log in the worker's batches, twice (the second counts: warm
    caches, as a tailing worker's are): ms per batch, events/s, CPU per event of PostgreSQL and
    of the reader (this process, which decodes the rows as the worker does)."""
    conn = await open_connection(url)
    try:
        for _ in range(2):  # the second pass counts
            meter = CpuMeter({"bench": os.getpid()}, marker)
            started, after, times, events = time.perf_counter(), START, [], 0
            while True:
                begun = time.perf_counter()
                batch = await read_batch(conn, after, batch_size)
                times.append(time.perf_counter() - begun)
                if not batch.events:
                    break
                last = batch.events[-1]
                events, after = events + len(batch.events), LogPosition(last.tx_id, last.position)
            elapsed, cpu = time.perf_counter() - started, await meter.stop()
    finally:
        await conn.close()
    [median] = percentiles(times, [50])
    return {
        "bytes_per_event": float(await _row_bytes(url)),
        "batch_size": float(batch_size),
        "ms_per_batch": 1000 * median,
        "events_per_s": events / elapsed,
        "postgres_us_per_event": 1e6 * cpu.get("cpu_postgres_pct", 0.0) / 100 * elapsed / max(1, events),
        "reader_us_per_event": 1e6 * cpu.get("cpu_bench_pct", 0.0) / 100 * elapsed / max(1, events),
    }


async def _row_bytes(url: str) -> float:
    """The events' mean stored row size: what every reader of the log pulls per event."""
    conn = await asyncpg.connect(url)
    try:
        return float(await conn.fetchval("SELECT avg(pg_column_size(e.*))::float8 FROM events e"))
    finally:
        await conn.close()


async def copy_database(admin_url: str, name: str, template: str) -> str:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await conn.close()
    return database_url(admin_url, name)


async def run_config_round(
    settings: ScalingSettings, config: Config, round_no: int, servers: Servers, shared: dict[str, Any]
) -> Figures:
    """One round of one configuration on its own copy of the log and its own prefix, removed afterwards."""
    run_id, name = shared["run_id"], config_name(config)
    database = f"orders_bench_{run_id}_{name}r{round_no}"
    prefix = f"bench:{run_id}:{name}r{round_no}:"
    url = await copy_database(servers.postgres_url, database, shared["template"])
    redis = redis_client(servers.redis_url)
    try:
        r = Round(settings, config, url, prefix, shared["log_dir"], run_id, f"orders_bench_{run_id}", redis,
                  shared["target"], shared["progress"])  # fmt: skip
        return await measure_round(r, servers.redis_url)
    finally:
        await redis.aclose()
        await drop_database(servers.postgres_url, database)
        await delete_keys(servers.redis_url, prefix)


def brief(config: Config, figures: Figures) -> str:
    cpu = " ".join(f"{owner} {figures.get(f'live_cpu_{owner}_pct', 0):.0f}%" for owner in scaling_stats.CPU_OWNERS)
    return (
        f"{config_name(config)}: rebuild {figures.get('rebuild_rate', 0):,.0f} events/s;"
        f" live {figures.get('live_rate', 0):,.0f} of {figures.get('live_appended_rate', 0):,.0f} appended/s,"
        f" lag p99 {figures.get('live_lag_p99_ms', 0):,.0f} ms; live cpu {cpu}"
    )


async def scaling_run(
    settings: ScalingSettings, servers: Servers, log_dir: Path, progress: Progress, machine_info: MachineInfo
) -> dict[str, Any]:
    started_at, started = datetime.now(UTC).isoformat(timespec="seconds"), time.monotonic()
    run_id = uuid.uuid4().hex[:6]
    template = f"orders_bench_{run_id}_log"
    template_url = await create_database(servers.postgres_url, template)
    rounds: dict[Config, list[Figures]] = {config: [] for config in settings.configs}
    try:
        target = await load_history(template_url, settings.events, progress)
        log_read = await measure_log_read(template_url, f"orders_bench_{run_id}")
        progress(scaling_stats.render_log_read(log_read))
        shared = {"run_id": run_id, "template": template, "log_dir": log_dir, "target": target, "progress": progress}
        for round_no in range(1, settings.rounds + 1):
            for config in settings.configs:
                figures = await run_config_round(settings, config, round_no, servers, shared)
                rounds[config].append(figures)
                progress(f"round {round_no}/{settings.rounds} {brief(config, figures)}")
        machine = await machine_info(servers, template_url)
    finally:
        await drop_database(servers.postgres_url, template)
    elapsed = time.monotonic() - started
    return results_json(
        settings, rounds=rounds, log_read=log_read, machine=machine, started_at=started_at, elapsed=elapsed
    )


def results_json(
    settings: ScalingSettings,
    *,
    rounds: dict[Config, list[Figures]],
    log_read: dict[str, float],
    machine: dict[str, Any],
    started_at: str,
    elapsed: float,
) -> dict[str, Any]:
    summaries = scaling_stats.summarize(rounds)
    configs = scaling_stats.as_json(summaries)
    for config, figures in rounds.items():
        configs[config_name(config)]["rounds"] = figures
    return {
        "kind": "scaling",
        "started_at": started_at,
        "elapsed_seconds": elapsed,
        "command": sys.argv,
        "settings": asdict(settings),
        "machine": machine,
        "log_read": log_read,
        "configs": configs,
    }


def summaries_of(results: dict[str, Any]) -> dict[Config, dict[str, Spread]]:
    """The summaries of a scaling run's JSON, by configuration, as Spreads."""
    return {
        scaling_stats.parse_config(name): {k: Spread(**v) for k, v in entry["summary"].items()}
        for name, entry in results["configs"].items()
    }


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    summaries = summaries_of(results)
    header = (
        f"orders-bench --scaling: P in {s['partitions']}, W in {s['workers']}, {s['rounds']} rounds, "
        f"{s['events']:,} events per rebuild, live windows of {s['live_seconds']:g}s with {s['writers']} writers"
        f" ({_offered(s.get('offered_rate', 0.0))}), "
        f"{results['machine'].get('cpu_count')} CPUs, {results['elapsed_seconds']:.0f}s in all"
    )
    return "\n\n".join(
        [
            header,
            scaling_stats.render_log_read(results["log_read"]),
            scaling_stats.render_rebuild(summaries, s["rounds"]),
            scaling_stats.render_live(summaries, s["rounds"]),
        ]
    )


def _offered(rate: float) -> str:
    return f"{rate:,.0f} events/s offered" if rate else "as fast as they go"


def write_json(results: dict[str, Any], json_out: Path | None) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = json_out or Path("bench-results") / f"scaling-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
