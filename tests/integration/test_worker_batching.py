"""The sync worker's batch window (sync_worker.batching): a burst of appends goes in a few larger
batches, and a lone event does not wait. Proved by counts (batches, waits entered), never by times."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from orders.store.event_store import NOTIFY_CHANNEL
from orders.store.views import PROJECTIONS
from sync_worker.main import build_workers
from sync_worker.worker import SyncWorker, WorkerSettings
from tests.helpers import assert_views_match_events, eventually
from tests.integration.conftest import System

BURST = 100


@asynccontextmanager
async def running(system: System, batch_wait: float) -> AsyncIterator[dict[str, SyncWorker]]:
    """Both projections' loops with `batch_wait`, instead of the system's worker, until the block ends.
    A 60 s poll: what they apply, they were notified of."""
    await system.stop_worker()
    settings = WorkerSettings(system.database_url, poll_interval=60.0, batch_wait=batch_wait)
    workers = build_workers(settings, system.redis, system.keys.prefix, list(PROJECTIONS))
    stop = asyncio.Event()
    task = asyncio.create_task(asyncio.wait([asyncio.ensure_future(w.run(stop)) for w in workers]))
    try:
        for worker in workers:  # the empty log's checkpoint: from here on, each step is on a notification
            await eventually(lambda worker=worker: _checkpoint_written(system, worker))  # type: ignore[misc]
        yield {worker.projection: worker for worker in workers}
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def _checkpoint_written(system: System, worker: SyncWorker) -> None:
    assert await system.redis.exists(system.keys.of(worker.projection).checkpoint)


async def append_notified(conn: asyncpg.Connection, order_id: str) -> None:
    """One OrderCreated in a transaction of its own that notifies the workers, as an append does."""
    payload = json.dumps({"customer_id": "burst", "currency_code": "EUR", "shipping_address": None})
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO events (stream_id, version, event_type, schema_version, payload)"
            " VALUES ($1, 1, 'OrderCreated', 1, $2::jsonb)",
            order_id,
            payload,
        )
        await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)


async def test_a_burst_of_appends_is_applied_in_a_few_larger_batches(system: System) -> None:
    """100 appends, each notified, in quick succession: the first goes at once, the rest come while a
    loop is busy, so it waits out the window (1 s, far longer than the burst) and applies them
    together. Without the window each loop steps once per few appends (tens of batches); the views
    hold every event exactly once either way."""
    async with running(system, batch_wait=1.0) as workers:
        conn = await asyncpg.connect(system.database_url)
        try:
            await conn.execute("SET synchronous_commit TO off")  # appends well within one step's time
            for i in range(BURST):
                await append_notified(conn, f"burst-{i}")
        finally:
            await conn.close()
        await eventually(lambda: assert_views_match_events(system.database_url, system.redis, system.keys), 30)

    for name, worker in workers.items():
        assert worker.applied_events == BURST, name
        assert worker.batch_window.waits >= 1, name
        assert worker.batches <= 4, name  # 2 unless an older transaction held rows back


async def test_a_lone_event_is_applied_without_entering_the_window(system: System) -> None:
    """With an hour's window configured, one event after a quiet spell still reaches the views: the
    quiet path steps at once (the count of waits stays 0), it is not a short wait that ended."""
    async with running(system, batch_wait=3600.0) as workers:
        conn = await asyncpg.connect(system.database_url)
        try:
            await append_notified(conn, "lone")
        finally:
            await conn.close()

        async def visible() -> None:
            assert await system.redis.exists(system.keys.order("lone"))
            for worker in workers.values():
                assert worker.applied_events == 1

        await eventually(visible)

    for name, worker in workers.items():
        assert (worker.batch_window.waits, worker.batches) == (0, 1), name
        assert worker.batch_window.immediate >= 1, name  # it stepped on the notification, not a poll
