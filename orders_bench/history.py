"""The rebuild test: a large event history loaded straight into the events table, then replayed by
a fresh sync worker process into empty views, timed from its checkpoints in Redis.

Rows are written exactly as orders.store.event_store writes them: payloads from `to_payload` of the
real event classes, their `schema_version`, command metadata, and `position`, `tx_id` and
`recorded_at` from the column defaults. COPY runs in chunks of one transaction each, so the
history spans many transaction ids as a real one does.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg

from orders.domain.consistency import START, LogPosition
from orders.domain.events import Address, Event, ItemAdded, OrderConfirmed, OrderCreated, event_type, to_payload
from orders.store.event_store import head, open_connection, read_batch
from orders.store.views import PROJECTIONS, ViewKeys, redis_client
from orders_bench.samples import Samples, progress_series
from orders_bench.system import cpu_seconds, spawn, stop_process

COLUMNS = ["stream_id", "version", "event_type", "schema_version", "payload", "metadata"]
CHUNK_EVENTS = 25_000  # events per COPY transaction
ORDERS_PER_CUSTOMER = 10
POLL_INTERVAL = 0.01
READ_BACK_TRIES = 600  # 0.1 s apart
ADDRESS = Address("Ada Lovelace", "Main St 1", "Berlin", "10115", "DE")
Row = tuple[str, int, str, int, str, str]


def order_events(n: int) -> list[Event]:
    """One order's life as the write service records it: created, two items, confirmed."""
    return [
        OrderCreated(f"hc{n // ORDERS_PER_CUSTOMER}", "EUR", ADDRESS),
        ItemAdded("SKU-1", "Bench item", 2, 250),
        ItemAdded("SKU-2", "Other item", 1, 990),
        OrderConfirmed(),
    ]


def history_rows(events: int) -> Iterator[Row]:
    """`events` rows: whole orders, the last one cut short if need be (a prefix of a life is valid)."""
    written, n = 0, 0
    while written < events:
        for version, event in enumerate(order_events(n)[: events - written], start=1):
            metadata = {"command": "Bench", "command_id": uuid.uuid4().hex, "correlation_id": ""}
            yield (
                f"h{n}",
                version,
                event_type(event),
                event.schema_version,
                json.dumps(to_payload(event)),
                json.dumps(metadata),
            )
            written += 1
        n += 1


async def load_history(database_url: str, events: int, progress: Callable[[str], None]) -> LogPosition:
    """Loads `events` events; returns the head of the log, the checkpoint a full replay ends at."""
    started = time.perf_counter()
    conn = await asyncpg.connect(database_url)
    try:
        rows = history_rows(events)
        for done in range(0, events, CHUNK_EVENTS):
            chunk = [next(rows) for _ in range(min(CHUNK_EVENTS, events - done))]
            await conn.copy_records_to_table("events", records=chunk, columns=COLUMNS)
            if (done // CHUNK_EVENTS) % 10 == 9:
                progress(f"history: {done + len(chunk):,} of {events:,} events loaded")
        await conn.execute("VACUUM ANALYZE events")  # as autovacuum would have: every replay round alike
    finally:
        await conn.close()
    target = await _check_readable(database_url)
    elapsed = time.perf_counter() - started
    progress(f"history: {events:,} events loaded in {elapsed:.1f}s ({events / elapsed:,.0f} events/s)")
    return target


async def _check_readable(database_url: str) -> LogPosition:
    """Reads the first rows back the way the worker does (decoding fails loudly), and the head.
    Waits while a transaction elsewhere in the cluster holds the rows back, as it would hold the worker."""
    conn = await open_connection(database_url)
    try:
        for _ in range(READ_BACK_TRIES):
            batch = await read_batch(conn, START, 100)
            if batch.events:
                break
            await asyncio.sleep(0.1)
        last = await head(conn)
    finally:
        await conn.close()
    if not batch.events or last is None:
        raise RuntimeError(f"the loaded history cannot be read back (held back: {batch.held_back})")
    return last


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set size (VmHWM), Linux only."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class RebuildProbe:
    """Polls both projections' checkpoints and applied counters until both reach the target, and
    keeps every reading of the counters (time, events applied per projection) for the plots."""

    def __init__(self, redis_url: str, prefix: str, target: LogPosition) -> None:
        self.redis = redis_client(redis_url)
        self.keys = [ViewKeys(prefix, name) for name in PROJECTIONS]
        self.target = target.token()
        self.first: tuple[float, int] | None = None  # (time, events applied) when applying was first seen
        self.done: dict[str, float] = {}
        self.readings: list[tuple[float, dict[str, int]]] = []

    async def poll(self) -> None:
        names = [k.checkpoint for k in self.keys] + [k.applied for k in self.keys]
        values = await self.redis.mget(names)
        now = time.perf_counter()
        counters = [int(v or 0) for v in values[len(self.keys) :]]
        self.readings.append((now, {k.projection: n for k, n in zip(self.keys, counters, strict=True)}))
        applied = sum(counters)
        if self.first is None and applied > 0:
            self.first = (now, applied)
        for keys, checkpoint in zip(self.keys, values, strict=False):
            if checkpoint == self.target and keys.projection not in self.done:
                self.done[keys.projection] = now

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.keys)


async def rebuild_round(
    database_url: str,
    redis_url: str,
    prefix: str,
    *,
    target: LogPosition,
    events: int,
    log: Path,
    timeout: float,
    progress: Callable[[str], None],
    split: bool = False,
) -> tuple[dict[str, float], Samples]:
    """Starts a sync worker on empty views under `prefix` and times its replay of the whole log;
    with `split`, one worker process per projection (ORDERS_PROJECTIONS), as on more cores. Returns
    its figures and its progress (events applied per projection against seconds since its start).

    The rate counts from the first applied batch (not process start-up) to the moment both
    projections reach the head: log events per second, each event applied once per projection."""
    env = {"ORDERS_POSTGRES_URL": database_url, "ORDERS_REDIS_URL": redis_url, "ORDERS_REDIS_PREFIX": prefix}
    envs = [{**env, "ORDERS_PROJECTIONS": name} for name in PROJECTIONS] if split else [env]
    probe = RebuildProbe(redis_url, prefix, target)
    started = time.perf_counter()
    workers = [await spawn("orders-sync-worker", e, log.with_suffix(f".{i}.log")) for i, e in enumerate(envs)]
    pids = ", ".join(str(w.pid) for w in workers)
    progress(f"rebuild: sync worker pid {pids} replays {events:,} events into {prefix}")
    cpu_before = [cpu_seconds(w.pid) for w in workers]
    try:
        while not probe.finished:
            for worker in workers:
                if worker.returncode is not None:
                    raise RuntimeError(f"the sync worker exited ({worker.returncode}):\n{worker.log_tail()}")
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"the rebuild did not finish within {timeout:.0f}s")
            await probe.poll()
            await asyncio.sleep(POLL_INTERVAL)
        cpu_after, peaks = [cpu_seconds(w.pid) for w in workers], [peak_rss_mb(w.pid) for w in workers]
    finally:
        for worker in workers:
            await stop_process(worker)
        await probe.redis.aclose()
    figures = _rebuild_figures(probe, events, started, _spent(cpu_before, cpu_after), max((p or 0.0) for p in peaks))
    return figures, progress_series([(at - started, applied) for at, applied in probe.readings], events)


def _spent(before: list[float | None], after: list[float | None]) -> float | None:
    """CPU seconds the processes spent in all, if every reading is there."""
    if None in before or None in after:
        return None
    return sum(a - b for a, b in zip(after, before, strict=True) if a is not None and b is not None)


def _rebuild_figures(
    probe: RebuildProbe, events: int, started: float, cpu: float | None, peak: float | None
) -> dict[str, float]:
    assert probe.first is not None
    first_at, applied_first = probe.first
    ended = max(probe.done.values())
    applying = max(1e-9, ended - first_at)
    projected = events * len(probe.keys) - applied_first  # event applications timed
    figures = {
        "rate": projected / len(probe.keys) / applying,
        "applied_rate": projected / applying,
        "seconds": ended - started,
        **{f"seconds_{name}": at - started for name, at in probe.done.items()},
    }
    if cpu is not None:
        figures["cpu_sync_worker_pct"] = 100 * cpu / (ended - started)
    if peak:
        figures["peak_rss_mb"] = peak  # of the largest worker process
    return figures
