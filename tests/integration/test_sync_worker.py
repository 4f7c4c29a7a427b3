"""How the sync worker wakes and recovers: NOTIFY, the polling fallback, and migrations."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from orders.store.migrations import migrate, migrate_url
from orders.v1 import queries_pb2 as qry
from tests.helpers import create_request, eventually
from tests.integration.conftest import System
from tests.integration.test_no_skip import insert_created


async def test_worker_wakes_on_notify_without_waiting_for_its_poll(system: System) -> None:
    """With a 30 s poll interval, a committed command still reaches the views within moments."""
    await system.stop_worker()
    system.start_worker(poll_interval=30)
    await eventually(lambda: _checkpoint_set(system))

    started = time.monotonic()
    result = (await system.commands.CreateOrder(create_request())).result
    reply = await system.queries.GetOrder(
        qry.GetOrderRequest(order_id=result.order_id, consistency_token=result.consistency_token)
    )

    assert reply.consistency.stale is False
    assert time.monotonic() - started < 1.0


async def test_polling_finds_events_that_nobody_announced(system: System) -> None:
    """An event committed without NOTIFY (a lost notification) is found by the next poll."""
    await system.stop_worker()
    system.start_worker(poll_interval=0.2)
    conn = await asyncpg.connect(system.database_url)
    try:
        await insert_created(conn, "silent-order")  # autocommit, no pg_notify
    finally:
        await conn.close()

    async def visible() -> None:
        assert await system.redis.exists(system.keys.order("silent-order"))

    await eventually(visible, timeout=3)


async def test_worker_started_before_migrations_waits_for_the_schema(system: System, database_url: str) -> None:
    """A worker on a database without the event table retries until the table exists, then projects."""
    await system.stop_worker()
    admin = await asyncpg.connect(system.database_url)
    try:
        await admin.execute("DROP TABLE events, processed_commands, schema_migrations")
        system.start_worker(poll_interval=0.1)
        await asyncio.sleep(0.5)
        applied = await migrate(admin)
        await insert_created(admin, "after-migration")
    finally:
        await admin.close()

    async def visible() -> None:
        assert await system.redis.exists(system.keys.order("after-migration"))

    await eventually(visible, timeout=10)
    assert applied == ["001_event_store.sql"]


async def test_migrations_are_idempotent(database_url: str) -> None:
    """Running the migrations again applies nothing and keeps the data."""
    assert await migrate_url(database_url) == []
    assert await migrate_url(database_url) == []


async def _checkpoint_set(system: System) -> None:
    assert await system.redis.exists(system.keys.checkpoint)
