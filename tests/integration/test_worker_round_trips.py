"""The sync worker's cost per step in Redis round trips, and the guarantees its batched reads keep.

A quiet step (nothing to apply, nothing parked, rebuilt or retired) is one round trip; a small batch
adds two: one read-only script (the guard keys, parked orders and views), then one guarded write
script. Round trips are counted on the client's connections, so other users of the Redis server do
not disturb the count. A guard key moved between that read and the write still fails the batch
(the write script compares it and writes nothing), which is then retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from orders.domain.consistency import LogPosition
from orders.domain.errors import PoisonEvent
from orders.domain.events import RecordedEvent
from orders.store.event_store import open_connection, read_batch
from orders.store.views import PROJECTION, SUMMARY_PROJECTION, CustomerSummaryView, RedisClient, ViewKeys
from orders.v1 import commands_pb2 as cmd
from sync_worker import projector as projector_module
from sync_worker import reads as reads_module
from sync_worker.main import build_workers
from sync_worker.projector import BatchWrites, CheckpointMoved, OrdersProjector, Values
from sync_worker.worker import SyncWorker, WorkerSettings
from tests.helpers import (
    add_item_request,
    assert_views_match_events,
    create_request,
    eventually,
    round_trip_counting_redis,
    views_in_redis,
)
from tests.integration.conftest import System


@dataclass
class Counting:
    """A Redis client whose connections count their writes: one per command or pipeline sent."""

    redis: Redis
    sends: list[int]

    @property
    def round_trips(self) -> int:
        return self.sends[0]


@pytest.fixture
async def counting(system: System) -> AsyncIterator[Counting]:
    client, sends = round_trip_counting_redis(system.redis_url)
    yield Counting(client, sends)
    await client.aclose()


@pytest.fixture
async def workers(system: System, counting: Counting) -> dict[str, SyncWorker]:
    """Both projections' loops on the counting client, stepped by hand (the system's worker stopped)."""
    await system.stop_worker()
    built = build_workers(
        WorkerSettings(system.database_url), counting.redis, system.keys.prefix, [PROJECTION, SUMMARY_PROJECTION]
    )
    return {worker.projection: worker for worker in built}


async def round_trips_of_a_step(
    worker: SyncWorker, counting: Counting, database_url: str, reuse: bool = False
) -> tuple[int, bool]:
    """Redis round trips of one step of `worker`'s loop, and whether it did anything. Unless `reuse`,
    the step reads the projection's state, as one more than STATE_REUSE after the last would."""
    conn = await open_connection(database_url)
    try:
        await worker._lease.hold(worker._status())  # renewed by the loop every ttl/5, not per step
        if not reuse:
            worker._states.forget()
        before = counting.round_trips
        busy = (await worker._step(conn)).busy
        return counting.round_trips - before, busy
    finally:
        await conn.close()


async def test_a_quiet_step_is_one_round_trip(
    system: System, workers: dict[str, SyncWorker], counting: Counting
) -> None:
    """Caught up, nothing parked, rebuilt or retired: generation pointers, checkpoint, parked requests
    and retired generations come in one pipeline (it was 4 round trips)."""
    await system.commands.CreateOrder(create_request("quiet"))
    for worker in workers.values():
        while (await round_trips_of_a_step(worker, counting, system.database_url))[1]:
            pass

    for worker in workers.values():
        assert await round_trips_of_a_step(worker, counting, system.database_url) == (1, False)


async def test_a_small_batch_is_three_round_trips(
    system: System, workers: dict[str, SyncWorker], counting: Counting
) -> None:
    """One for the step's reads, one read of the guard keys, parked orders and views, and the guarded
    write (it was 9 for the orders, 10 for the customer summary). The summary foresees which
    customer an order's event touches from the OrderCreated it has seen."""
    for worker in workers.values():  # the empty log's checkpoint
        await round_trips_of_a_step(worker, counting, system.database_url)
    order_id = (await system.commands.CreateOrder(create_request("small"))).result.order_id
    for name, worker in workers.items():
        assert await round_trips_of_a_step(worker, counting, system.database_url) == (3, True), name

    await system.commands.AddItem(add_item_request(order_id, price=700))
    for name, worker in workers.items():
        assert await round_trips_of_a_step(worker, counting, system.database_url) == (3, True), name


async def test_a_summary_it_did_not_foresee_is_read_in_a_second_round_trip(
    system: System, workers: dict[str, SyncWorker], counting: Counting
) -> None:
    """A worker that never saw the order's OrderCreated (a restart) reads the customer's summary once
    it has read the order's view: one round trip more, and the same summary."""
    order_id = (await system.commands.CreateOrder(create_request("restarted"))).result.order_id
    await system.commands.AddItem(add_item_request(order_id, price=700))
    summary = workers[SUMMARY_PROJECTION]
    while (await round_trips_of_a_step(summary, counting, system.database_url))[1]:
        pass
    await system.commands.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=order_id))
    settings = WorkerSettings(system.database_url)
    (fresh,) = build_workers(settings, counting.redis, system.keys.prefix, [SUMMARY_PROJECTION], summary.worker_id)

    assert await round_trips_of_a_step(fresh, counting, system.database_url) == (4, True)
    raw = await system.redis.get(system.keys.of(SUMMARY_PROJECTION).summary_customer("restarted"))
    assert raw is not None
    view = CustomerSummaryView.from_json(raw)
    assert (view.order_count, view.by_status, view.spend_minor) == (1, {"CONFIRMED": 1}, {"EUR": 700})


async def test_under_load_a_step_reuses_the_last_ones_state(
    system: System, workers: dict[str, SyncWorker], counting: Counting, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within STATE_REUSE of a quiet step, the next takes its state from it: a batch is then two round
    trips (read, guarded write) and a quiet step none."""
    monkeypatch.setattr(reads_module, "STATE_REUSE", 60.0)
    for worker in workers.values():
        await round_trips_of_a_step(worker, counting, system.database_url)
    await system.commands.CreateOrder(create_request("reused"))

    for name, worker in workers.items():
        assert await round_trips_of_a_step(worker, counting, system.database_url, reuse=True) == (2, True), name
        assert await round_trips_of_a_step(worker, counting, system.database_url, reuse=True) == (0, False), name
    await assert_views_match_events(system.database_url, system.redis, system.keys)


async def test_a_reused_state_that_went_stale_fails_the_batch_and_is_read_again(
    system: System, workers: dict[str, SyncWorker], counting: Counting, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The views are reset behind the worker's back (checkpoint and views deleted) while it reuses
    its state: the batch's guarded write refuses, and the next step reads the state and rebuilds."""
    monkeypatch.setattr(reads_module, "STATE_REUSE", 60.0)
    orders = workers[PROJECTION]
    await system.commands.CreateOrder(create_request(order_id="before-reset"))
    while (await round_trips_of_a_step(orders, counting, system.database_url))[1]:
        pass
    await system.redis.delete(system.keys.checkpoint, system.keys.order("before-reset"))
    await system.commands.CreateOrder(create_request(order_id="after-reset"))

    with pytest.raises(CheckpointMoved):
        await round_trips_of_a_step(orders, counting, system.database_url, reuse=True)
    while (await round_trips_of_a_step(orders, counting, system.database_url, reuse=True))[1]:
        pass

    await assert_views_match_events(system.database_url, system.redis, system.keys)


GUARDS = ["checkpoint", "lease", "rebuild_target", "generation_pointer", "next_generation"]


class Interfering(OrdersProjector):
    """Moves one guard key to another value after the batch's read, before its write, the first
    `times` times it stages a batch; once that batch has failed, puts the value back (so that the
    batch can be applied again)."""

    def __init__(self, redis: RedisClient, keys: ViewKeys, other: RedisClient, guard: str, times: int = 1) -> None:
        super().__init__(redis, keys)
        self.other, self.guard, self.times = other, guard, times
        self.moved: list[tuple[str, str | bytes | None]] = []  # key, value to put back

    def at(self, generation: int) -> OrdersProjector:
        return Interfering(self.redis, self.keys.at(generation), self.other, self.guard, self.times)

    async def stage(self, events: list[RecordedEvent], values: Values, announce: bool = True) -> BatchWrites:
        if self.times > 0:
            self.times -= 1
            key = getattr(self.keys, self.guard)
            raw = await self.other.get(key)
            self.moved.append((key, raw))
            moved = "1-1" if self.guard == "checkpoint" else "moved"  # the checkpoint stays a token
            await self.other.set(key, moved, keepttl=True)
        return await super().stage(events, values, announce)

    async def apply(
        self,
        after: LogPosition | None,
        events: list[RecordedEvent],
        holder: str | None = None,
        park: Mapping[str, PoisonEvent] | None = None,
        live: bool = True,
        *,
        through: LogPosition | None = None,
    ) -> LogPosition:
        try:
            return await super().apply(after, events, holder, park, live, through=through)
        finally:
            for key, raw in self.moved:
                await (self.other.delete(key) if raw is None else self.other.set(key, raw, keepttl=True))
            self.moved.clear()


@pytest.mark.parametrize("guard", GUARDS)
async def test_a_guard_key_moved_between_the_read_and_the_write_fails_the_batch(system: System, guard: str) -> None:
    """Checkpoint, lease, rebuild target, generation pointer or next generation: moved by someone else
    after the one-round-trip read, the guarded write fails and writes nothing; applied again, it succeeds."""
    await system.stop_worker()
    await system.commands.CreateOrder(create_request("guarded"))
    projector = Interfering(system.redis, system.keys, system.redis, guard)
    checkpoint = await projector.checkpoint()
    conn = await open_connection(system.database_url)
    try:
        events = (await read_batch(conn, checkpoint or LogPosition(0, 0), 100)).events
    finally:
        await conn.close()
    assert events

    with pytest.raises(CheckpointMoved):
        await projector.apply(checkpoint, events)
    assert await projector.checkpoint() == checkpoint
    assert await views_in_redis(system.redis, system.keys) == {}

    await projector.apply(checkpoint, events)
    await assert_views_match_events(system.database_url, system.redis, system.keys)


async def test_the_worker_retries_a_batch_whose_checkpoint_moved(system: System) -> None:
    """The loop takes the failed batch for a lost race: it backs off, reads again and applies it once."""
    await system.stop_worker()
    for i in range(3):
        await system.commands.CreateOrder(create_request(f"retried-{i}"))
    projector = Interfering(system.redis, system.keys, system.redis, "checkpoint", times=2)
    worker = SyncWorker(WorkerSettings(system.database_url), projector)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await eventually(lambda: assert_views_match_events(system.database_url, system.redis, system.keys))
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert projector.times == 0


async def test_a_batch_wider_than_the_scripts_chunks(system: System) -> None:
    """2,500 orders in one batch: more keys and order ids than the read script passes to one MGET or
    ZMSCORE, and more index members than one ZADD of the write script takes, so both go in chunks."""
    await system.stop_worker()
    await system.pool.execute(
        "INSERT INTO events (stream_id, version, event_type, schema_version, payload)"
        " SELECT 'wide-' || i, 1, 'OrderCreated', 1,"
        " jsonb_build_object('customer_id', 'c' || (i % 7), 'currency_code', 'EUR', 'shipping_address', null)"
        " FROM generate_series(1, 2500) AS i"
    )
    system.start_worker(batch_size=5000)

    await eventually(lambda: assert_views_match_events(system.database_url, system.redis, system.keys))
    summaries = system.keys.of(SUMMARY_PROJECTION)

    async def summarised() -> None:
        raws = await system.redis.mget([summaries.summary_customer(f"c{i}") for i in range(7)])
        assert sum(CustomerSummaryView.from_json(raw).order_count for raw in raws if raw) == 2500

    await eventually(summarised)


async def test_a_server_without_the_scripts_gets_them_again(system: System, monkeypatch: pytest.MonkeyPatch) -> None:
    """NOSCRIPT (a restarted or flushed Redis): the batch's read and write fall back to EVAL."""
    await system.stop_worker()
    monkeypatch.setattr(projector_module, "_SCRIPTS", dict.fromkeys(projector_module._SCRIPTS, "0" * 40))
    await system.commands.CreateOrder(create_request("noscript"))
    system.start_worker()

    await eventually(lambda: assert_views_match_events(system.database_url, system.redis, system.keys))


async def test_one_batch_moving_orders_between_indexes_leaves_exactly_their_indexes(system: System) -> None:
    """The orders projection writes one ZREM / ZADD per index per batch, and none for an index an order
    stays in: after a batch of creations, items and status changes, each index lists exactly the orders
    whose view belongs in it."""
    await system.stop_worker()
    ids = [(await system.commands.CreateOrder(create_request(f"c{i % 2}"))).result.order_id for i in range(4)]
    system.start_worker(batch_size=1000)
    await eventually(lambda: assert_views_match_events(system.database_url, system.redis, system.keys))
    await system.stop_worker()
    for order_id in ids:
        await system.commands.AddItem(add_item_request(order_id, price=100))
    for order_id in ids[:3]:
        await system.commands.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=order_id))
    await system.commands.CancelOrder(cmd.CancelOrderRequest(order_id=ids[0], reason="changed my mind"))
    system.start_worker(batch_size=1000)
    await eventually(lambda: assert_views_match_events(system.database_url, system.redis, system.keys))

    views = await views_in_redis(system.redis, system.keys)
    expected: dict[str, set[str]] = {}
    for view in views.values():
        for key in system.keys.indexes_of(view):
            expected.setdefault(key, set()).add(view.index_member())
    actual = {
        key: set(await system.redis.zrange(key, 0, -1))
        async for key in system.redis.scan_iter(match=f"{system.keys.gprefix}idx:*")
    }
    assert actual == expected
    assert {key.rsplit(":", 1)[-1] for key in expected if ":status:" in key} == {"CANCELLED", "CONFIRMED", "PENDING"}


async def log_reads_of_a_step(worker: SyncWorker, database_url: str) -> tuple[int, bool]:
    """How many times one step of `worker`'s loop read the event log, and whether it did anything."""
    conn = await open_connection(database_url)
    reads: list[str] = []
    conn.add_query_logger(lambda query: reads.append(query.query) if "pg_snapshot_xmin" in query.query else None)
    try:
        await worker._lease.hold(worker._status())
        worker._states.forget()
        busy = (await worker._step(conn)).busy
        await asyncio.sleep(0)  # asyncpg calls query loggers soon after, not at once
        return len(reads), busy
    finally:
        await conn.close()


async def test_projections_in_step_read_the_log_once(system: System, workers: dict[str, SyncWorker]) -> None:
    """The second projection at the same checkpoint takes the rows the first one read (and decoded)."""
    for worker in workers.values():
        await log_reads_of_a_step(worker, system.database_url)
    await system.commands.CreateOrder(create_request("in-step"))

    assert await log_reads_of_a_step(workers[PROJECTION], system.database_url) == (1, True)
    assert await log_reads_of_a_step(workers[SUMMARY_PROJECTION], system.database_url) == (0, True)
    await assert_views_match_events(system.database_url, system.redis, system.keys)


async def test_a_notification_after_the_shared_read_makes_the_next_projection_read_again(
    system: System, workers: dict[str, SyncWorker]
) -> None:
    """An append notified after the first projection's read: the second does not take that older
    batch (it may have cleared its wake-up on the newer append), it reads and applies both orders."""
    for worker in workers.values():
        await log_reads_of_a_step(worker, system.database_url)
    await system.commands.CreateOrder(create_request("first"))
    await log_reads_of_a_step(workers[PROJECTION], system.database_url)
    await system.commands.CreateOrder(create_request("second"))
    workers[SUMMARY_PROJECTION]._notified()  # what its listener does when the NOTIFY arrives

    assert await log_reads_of_a_step(workers[SUMMARY_PROJECTION], system.database_url) == (1, True)
    summaries = system.keys.of(SUMMARY_PROJECTION)
    assert await system.redis.exists(summaries.summary_customer("first"), summaries.summary_customer("second")) == 2


async def test_a_loop_never_takes_its_own_or_a_taken_batch(system: System, workers: dict[str, SyncWorker]) -> None:
    """Appends that notify nobody (the poll fallback) are still found: the loop that read a batch, and
    a loop that already took it, read the log afresh at their next step."""
    for worker in workers.values():
        await log_reads_of_a_step(worker, system.database_url)
    await system.commands.CreateOrder(create_request("polled-1"))
    await log_reads_of_a_step(workers[PROJECTION], system.database_url)
    await log_reads_of_a_step(workers[SUMMARY_PROJECTION], system.database_url)  # takes it
    await system.commands.CreateOrder(create_request("polled-2"))  # no listener: nobody is notified

    # The taker reads afresh (and finds the new order); the reader of the first batch takes this one.
    assert await log_reads_of_a_step(workers[SUMMARY_PROJECTION], system.database_url) == (1, True)
    assert await log_reads_of_a_step(workers[PROJECTION], system.database_url) == (0, True)
    # Its own batch, though, it never takes: with nothing new, it reads again and finds nothing.
    assert await log_reads_of_a_step(workers[PROJECTION], system.database_url) == (1, False)
    await assert_views_match_events(system.database_url, system.redis, system.keys)


async def test_projections_woken_together_send_one_log_read(system: System, workers: dict[str, SyncWorker]) -> None:
    """Both loops step at once (woken by one notification, out of one batch window): the second takes
    the first one's read while it is still in flight, instead of sending the same query."""
    for worker in workers.values():
        await log_reads_of_a_step(worker, system.database_url)
    await system.commands.CreateOrder(create_request("together"))
    conns = [await open_connection(system.database_url) for _ in workers]
    reads: list[str] = []
    for conn in conns:
        conn.add_query_logger(lambda query: reads.append(query.query) if "pg_snapshot_xmin" in query.query else None)
    try:
        for worker in workers.values():
            await worker._lease.hold(worker._status())
        steps = await asyncio.gather(*(w._step(c) for w, c in zip(workers.values(), conns, strict=True)))
        await asyncio.sleep(0)  # asyncpg calls query loggers soon after, not at once
    finally:
        for conn in conns:
            await conn.close()

    assert [(len(step.batch.events), step.busy) for step in steps] == [(1, True), (1, True)]
    assert len(reads) == 1
    await assert_views_match_events(system.database_url, system.redis, system.keys)


async def test_a_short_batch_leaves_the_loop_caught_up_and_a_full_one_steps_again(
    system: System, counting: Counting
) -> None:
    """A batch shorter than the batch size, nothing held back: the loop idles until the next
    notification instead of reading the log once more to find nothing. A full batch: it steps again."""
    await system.stop_worker()
    (orders,) = build_workers(
        WorkerSettings(system.database_url, batch_size=2), counting.redis, system.keys.prefix, [PROJECTION]
    )
    await round_trips_of_a_step(orders, counting, system.database_url)  # the empty log's checkpoint
    for i in range(3):
        await system.commands.CreateOrder(create_request(f"batch-{i}"))
    conn = await open_connection(system.database_url)
    try:
        await orders._lease.hold(orders._status())
        full, short = await orders._step(conn), await orders._step(conn)
    finally:
        await conn.close()

    assert (len(full.batch.events), full.again) == (2, True)
    assert (len(short.batch.events), short.again) == (1, False)
