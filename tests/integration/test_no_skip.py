"""No event is ever skipped, even when transactions commit out of position order.

Positions are handed out at INSERT but become visible at COMMIT. Each test
runs a naive reader (`WHERE position > checkpoint`) beside the real worker as
a control: the control must skip events, which proves the scenario provokes
the race, while the worker's views must still hold every event.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid

import asyncpg

from orders.store.event_store import head
from orders.v1 import queries_pb2 as qry
from tests.helpers import assert_views_match_events, create_request, eventually, expected_views, views_in_redis
from tests.integration.conftest import System


class NaiveReader:
    """The broken design: remember the highest position seen, read past it."""

    def __init__(self) -> None:
        self.checkpoint = 0
        self.seen: set[int] = set()

    async def poll(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch("SELECT position FROM events WHERE position > $1 ORDER BY position", self.checkpoint)
        for row in rows:
            self.seen.add(row["position"])
            self.checkpoint = row["position"]


async def insert_created(conn: asyncpg.Connection, order_id: str) -> int:
    payload = json.dumps({"customer_id": "slow", "currency_code": "EUR", "shipping_address": None})
    position: int = await conn.fetchval(
        "INSERT INTO events (stream_id, version, event_type, schema_version, payload)"
        " VALUES ($1, 1, 'OrderCreated', 1, $2::jsonb) RETURNING position",
        order_id,
        payload,
    )
    return position


async def test_slow_commit_of_an_earlier_position_is_not_skipped(system: System) -> None:
    """A transaction that took position N and commits after N+1 still reaches the views."""
    slow = await asyncpg.connect(system.database_url)
    control_conn = await asyncpg.connect(system.database_url)
    naive = NaiveReader()
    try:
        transaction = slow.transaction()
        await transaction.start()
        slow_position = await insert_created(slow, "slow-order")
        fast = (await system.commands.CreateOrder(create_request("fast"))).result
        assert fast.position > slow_position
        await naive.poll(control_conn)
        await asyncio.sleep(0.5)  # the worker polls and is woken meanwhile

        held_back = await system.redis.exists(system.keys.order(fast.order_id))
        await transaction.commit()
        reply = await system.queries.GetOrder(
            qry.GetOrderRequest(order_id="slow-order", consistency_token=fast.consistency_token)
        )
        await naive.poll(control_conn)
    finally:
        await slow.close()
        await control_conn.close()

    assert slow_position not in naive.seen, "control: the naive reader should have skipped the slow event"
    assert held_back == 0, "the later commit must wait for the earlier transaction"
    assert reply.order.order_id == "slow-order"
    assert reply.consistency.stale is False
    await assert_views_match_events(system.database_url, system.redis, system.keys)


async def writer(url: str, rng: random.Random, rounds: int, committed: list[str]) -> None:
    """Creates orders in transactions that sleep before committing and sometimes roll back."""
    conn = await asyncpg.connect(url)
    try:
        for _ in range(rounds):
            order_id = f"o-{uuid.uuid4().hex[:10]}"
            transaction = conn.transaction()
            await transaction.start()
            await insert_created(conn, order_id)
            await asyncio.sleep(rng.uniform(0, 0.03))
            if rng.random() < 0.15:
                await transaction.rollback()
            else:
                await transaction.commit()
                await conn.execute("SELECT pg_notify('orders_events', '')")
                committed.append(order_id)
    finally:
        await conn.close()


async def write_out_of_order(url: str, seed: int, writers: int, rounds: int) -> tuple[list[str], set[int]]:
    """Runs `writers` concurrent `writer`s while a naive reader polls beside them; returns the
    committed order ids and the positions the naive reader skipped (the control)."""
    rng = random.Random(seed)
    committed: list[str] = []
    naive = NaiveReader()
    control = await asyncpg.connect(url)
    tasks = [asyncio.ensure_future(writer(url, random.Random(rng.random()), rounds, committed)) for _ in range(writers)]
    try:
        while not all(task.done() for task in tasks):
            await naive.poll(control)
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
        await naive.poll(control)
        positions = {row["position"] for row in await control.fetch("SELECT position FROM events")}
    finally:
        await control.close()
    return committed, positions - naive.seen


async def test_many_concurrent_writers_with_slow_commits_and_rollbacks(system: System) -> None:
    """Under concurrent writers that commit out of order and roll back, views hold exactly the committed events."""
    await system.stop_worker()
    system.start_worker(batch_size=7, poll_interval=0.05)
    committed, skipped_by_naive = await write_out_of_order(system.database_url, 20261126, writers=8, rounds=40)
    async with system.pool.acquire() as conn:
        last = await head(conn)
    assert last is not None

    async def caught_up() -> None:
        assert await system.redis.get(system.keys.checkpoint) == last.token()

    await eventually(caught_up, timeout=30)
    views = await views_in_redis(system.redis, system.keys)
    assert skipped_by_naive, "control: the load should make the naive reader skip events"
    assert set(views) == set(committed)
    assert {v.version for v in views.values()} == {1}
    assert views == await expected_views(system.database_url)
