"""Partitioned projections on the worker side: workers share the partitions, rebalance when one
joins or stops, and together apply every event exactly once, each in the partition of its order."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import pytest

from orders.domain.consistency import LogPosition
from orders.store.event_store import head, open_connection
from orders.store.views import PROJECTION, PROJECTIONS, RedisClient, ViewKeys, get_many
from sync_worker.main import build_workers
from sync_worker.worker import SyncWorker, WorkerSettings
from tests.helpers import (
    add_item_request,
    all_events,
    assert_views_match_events,
    create_request,
    eventually,
    views_in_partitions,
)
from tests.integration.conftest import System
from tests.integration.test_no_skip import insert_created, write_out_of_order

PARTITIONS = 4
LEASE_TTL = 1.0  # short, so that hand-overs and takeovers happen within the test's patience


class Workers:
    """Worker processes' loops, run in this event loop, each set under its own worker id."""

    def __init__(self, system: System) -> None:
        self._system = system
        self._running: dict[str, tuple[asyncio.Event, asyncio.Future[list[None]], list[SyncWorker]]] = {}

    def start(self, worker_id: str, batch_size: int = 500) -> list[SyncWorker]:
        settings = WorkerSettings(self._system.database_url, batch_size, poll_interval=0.05, lease_ttl=LEASE_TTL)
        loops = build_workers(
            settings, self._system.redis, self._system.keys.prefix, list(PROJECTIONS), worker_id, partitions=PARTITIONS
        )
        stop = asyncio.Event()
        task = asyncio.ensure_future(asyncio.gather(*(loop.run(stop) for loop in loops)))
        self._running[worker_id] = (stop, task, loops)
        return loops

    async def stop(self, worker_id: str) -> None:
        stop, task, _ = self._running.pop(worker_id)
        stop.set()
        await asyncio.wait_for(task, 10)

    async def stop_all(self) -> None:
        for worker_id in list(self._running):
            await self.stop(worker_id)


@pytest.fixture
async def workers(system: System) -> AsyncIterator[Workers]:
    await system.stop_worker()  # the fixture's single-partition worker: these tests run their own
    running = Workers(system)
    try:
        yield running
    finally:
        with contextlib.suppress(Exception):
            await running.stop_all()


def partition_keys(system: System) -> list[ViewKeys]:
    keys = []
    for name in PROJECTIONS:
        keys += ViewKeys(system.keys.prefix, name, partitions=PARTITIONS).all_partitions()
    return keys


async def lease_holders(redis: RedisClient, system: System) -> Counter[bytes | str | None]:
    """How many partitions (of both projections) each worker holds the lease of."""
    holders = await get_many(redis, [keys.lease for keys in partition_keys(system)])
    return Counter(holders)


async def write_orders(system: System, count: int, tag: str) -> None:
    for n in range(count):
        created = (await system.commands.CreateOrder(create_request(f"cust-{n % 3}"))).result
        await system.commands.AddItem(add_item_request(created.order_id, sku=f"{tag}-{n}"))


async def caught_up(system: System) -> LogPosition:
    """Waits until every partition of both projections has a checkpoint at the log's head."""
    conn = await open_connection(system.database_url)
    try:
        last = await head(conn)
    finally:
        await conn.close()
    assert last is not None

    async def all_there() -> None:
        checkpoints = await get_many(system.redis, [keys.checkpoint for keys in partition_keys(system)])
        assert checkpoints == [last.token()] * len(checkpoints)

    await eventually(all_there, timeout=20)
    return last


async def assert_applied_once(system: System) -> None:
    """Every event was applied by exactly one partition of each projection: the partitions' counts of
    applied events add up to the log's length, and the views of every partition equal a replay."""
    events = len(await all_events(system.database_url))
    for name in PROJECTIONS:
        partitions = ViewKeys(system.keys.prefix, name, partitions=PARTITIONS).all_partitions()
        applied = await get_many(system.redis, [keys.applied for keys in partitions])
        assert sum(int(count or 0) for count in applied) == events, name
    await assert_views_match_events(
        system.database_url, system.redis, ViewKeys(system.keys.prefix, partitions=PARTITIONS)
    )


async def test_two_workers_share_the_partitions_and_apply_each_event_once(system: System, workers: Workers) -> None:
    """Two workers each hold half of the eight partitions (four of each projection), every
    partition's checkpoint reaches the head, and each order's view is in its own partition only."""
    workers.start("worker-a")
    workers.start("worker-b")
    await write_orders(system, 24, "x")

    await caught_up(system)
    await eventually(lambda: _expect(lease_holders(system.redis, system), {"worker-a": 4, "worker-b": 4}), timeout=10)
    await assert_applied_once(system)


async def test_partitions_rebalance_when_a_worker_joins_and_when_it_stops(system: System, workers: Workers) -> None:
    """Alone, a worker holds every partition; a second one that joins gets its half within a few
    renewals while events keep coming; when it stops, the first takes them all back. Nothing is
    applied twice or skipped on the way."""
    workers.start("worker-a")
    await write_orders(system, 8, "a")
    await eventually(lambda: _expect(lease_holders(system.redis, system), {"worker-a": 8}), timeout=10)

    workers.start("worker-b")
    await write_orders(system, 8, "b")
    await eventually(lambda: _expect(lease_holders(system.redis, system), {"worker-a": 4, "worker-b": 4}), timeout=10)

    await workers.stop("worker-b")
    await write_orders(system, 8, "c")
    await eventually(lambda: _expect(lease_holders(system.redis, system), {"worker-a": 8}), timeout=10)
    await caught_up(system)
    await assert_applied_once(system)


async def test_a_partition_of_one_order_moves_nothing_but_its_checkpoint_elsewhere(
    system: System, workers: Workers
) -> None:
    """A batch of one order's events changes that order's partition only: the other partitions'
    checkpoints pass it, with no view and nothing applied."""
    workers.start("worker-a")
    created = (await system.commands.CreateOrder(create_request("cust-solo"))).result
    last = await caught_up(system)

    owner = ViewKeys(system.keys.prefix, PROJECTION, partitions=PARTITIONS).for_order(created.order_id)
    for keys in owner.all_partitions():
        assert await system.redis.get(keys.checkpoint) == last.token()
        assert (await system.redis.exists(keys.order(created.order_id))) == (keys == owner)
        assert int(await system.redis.get(keys.applied) or 0) == (1 if keys == owner else 0)


async def _expect(holders: object, expected: dict[str, int]) -> None:
    assert await holders == Counter(expected)  # type: ignore[misc]


async def test_no_event_is_skipped_by_partitions_under_slow_commits_and_rollbacks(
    system: System, workers: Workers
) -> None:
    """Each partition reads only its own orders' rows from PostgreSQL, and a short batch moves its
    checkpoint to the log's last row no transaction can precede any more. Under writers that commit
    out of position order and roll back, every partition still ends at the head with exactly the
    committed orders it owns (the control: a naive reader skips some)."""
    workers.start("worker-a", batch_size=7)
    workers.start("worker-b", batch_size=7)
    committed, skipped_by_naive = await write_out_of_order(system.database_url, 20261204, writers=6, rounds=30)
    await caught_up(system)
    assert skipped_by_naive, "control: the load should make the naive reader skip events"
    views = await views_in_partitions(system.redis, ViewKeys(system.keys.prefix, partitions=PARTITIONS))
    assert set(views) == set(committed)
    await assert_applied_once(system)


async def test_a_held_open_transaction_holds_back_every_partition(system: System, workers: Workers) -> None:
    """A transaction that took an earlier position and has not committed holds back the checkpoints
    of every partition, its own and the others (which would otherwise pass its row while reading
    only theirs); once it commits, its order's partition applies it and all reach the head."""
    workers.start("worker-a")
    await eventually(lambda: _expect(lease_holders(system.redis, system), {"worker-a": 8}), timeout=10)
    slow = await asyncpg.connect(system.database_url)
    try:
        transaction = slow.transaction()
        await transaction.start()
        slow_position = await insert_created(slow, "slow-order")
        fast = (await system.commands.CreateOrder(create_request("fast"))).result
        assert fast.position > slow_position
        await asyncio.sleep(0.5)  # the worker is woken by the fast commit and steps meanwhile
        checkpoints = await get_many(system.redis, [keys.checkpoint for keys in partition_keys(system)])
        await transaction.commit()
    finally:
        await slow.close()

    assert all(LogPosition.parse(c).position < slow_position for c in checkpoints if c is not None)
    await caught_up(system)
    owner = ViewKeys(system.keys.prefix, PROJECTION, partitions=PARTITIONS).for_order("slow-order")
    assert await system.redis.exists(owner.order("slow-order"))
    await assert_applied_once(system)
