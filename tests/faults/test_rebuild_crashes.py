"""The sync worker SIGKILLed in the middle of a zero-downtime rebuild (sync_worker.generations):
while the new generation is part-built, and while the old one is being retired (deleted). Started
again under its own id, the worker finishes the rebuild and the retirement; the live views then
equal a replay of the log, every event is applied exactly once in the new generation, and no key
of the old generation is left."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, replace

import asyncpg
import grpc

from orders.domain.consistency import LogPosition
from orders.store.views import PROJECTION, PROJECTIONS, SUMMARY_PROJECTION, CustomerSummaryView, ViewKeys
from orders.tools.embedded import free_port
from orders.v1 import admin_pb2 as pb
from orders.v1 import admin_pb2_grpc
from sync_worker.customer_summary import summarize
from tests.faults.conftest import Cluster, Load, Service, assert_consistent, run_load_while
from tests.helpers import add_item_request, create_request, eventually, expected_views, live_keys

CUSTOMERS = [f"rc-{i}" for i in range(8)]
ORDERS = 1500  # 3,000 events; the orders projection's generation 0 then holds over 1,500 keys
WORKER_ID = "rebuilder"  # pinned: the restarted worker takes its lease back at once (test_worker_restart.py)


# ------------------------------------------------------------------------------ what the keys say


@dataclass(frozen=True)
class GenerationState:
    """A projection's generation keys, read in one step."""

    live: int  # the generation pointer
    building: int | None  # next-generation: the one a rebuild builds
    retired: set[str]  # generations left to delete
    live_checkpoint: LogPosition | None
    built_checkpoint: LogPosition | None  # of generation live + 1

    @property
    def part_built(self) -> bool:
        """The rebuild has applied some catch-up batches to the new generation but not switched to it."""
        built, live = self.built_checkpoint, self.live_checkpoint
        return self.building == self.live + 1 and built is not None and live is not None and built < live


async def generation_state(cluster: Cluster, projection: str) -> GenerationState:
    keys = cluster.keys.of(projection)
    redis = cluster.redis()
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.get(keys.generation_pointer)
            pipe.get(keys.next_generation)
            pipe.smembers(keys.retired)
            pointer, building, retired = await pipe.execute()
        live = int(pointer or 0)
        checkpoints = await redis.mget(keys.at(live).checkpoint, keys.at(live + 1).checkpoint)
    finally:
        await redis.aclose()
    live_cp, built_cp = (None if raw is None else LogPosition.parse(raw) for raw in checkpoints)
    return GenerationState(live, None if building is None else int(building), set(retired), live_cp, built_cp)


async def keys_of_generation(cluster: Cluster, keys: ViewKeys) -> list[str]:
    """Every key of `keys`' generation: its views and its checkpoint, rebuild mark and counter."""
    redis = cluster.redis()
    try:
        found = [k for pattern in keys.view_patterns() async for k in redis.scan_iter(match=pattern, count=1000)]
        found += [k for k in keys.generation_keys if await redis.exists(k)]
    finally:
        await redis.aclose()
    return found


async def order_views_of_generation(cluster: Cluster, generation: int) -> int:
    redis = cluster.redis()
    try:
        pattern = cluster.keys.at(generation).order("*")
        return len([k async for k in redis.scan_iter(match=pattern, count=1000)])
    finally:
        await redis.aclose()


# ------------------------------------------------------------------------------ the final checks


async def assert_rebuilt(cluster: Cluster, projections: list[str], load: Load | None = None) -> None:
    """Each projection is live at generation 1 and done with the rebuild; generation 0 has no key left;
    the live views equal a replay of the log; generation 1 applied every event exactly once."""

    async def retired() -> None:
        for projection in projections:
            state = await generation_state(cluster, projection)
            assert (state.live, state.building, state.retired) == (1, None, set()), (projection, state)
            assert await keys_of_generation(cluster, cluster.keys.of(projection).at(0)) == [], projection

    await eventually(retired, timeout=60, interval=0.1)
    await assert_consistent(replace(cluster, keys=cluster.keys.at(1)), load)  # waits for the log's head
    if SUMMARY_PROJECTION in projections:
        await eventually(lambda: summary_caught_up(cluster), timeout=30)
        await assert_summaries_match_events(cluster)
    events = await event_count(cluster)
    redis = cluster.redis()
    try:
        applied = {p: int(await redis.get(cluster.keys.of(p).at(1).applied) or 0) for p in projections}
    finally:
        await redis.aclose()
    assert applied == dict.fromkeys(projections, events), "an event applied twice or not at all"


async def summary_caught_up(cluster: Cluster) -> None:
    state = await generation_state(cluster, SUMMARY_PROJECTION)
    assert state.live_checkpoint == (await generation_state(cluster, PROJECTION)).live_checkpoint


async def assert_summaries_match_events(cluster: Cluster) -> None:
    """The live customer summaries equal the summaries of a replay: each order's final view counted once."""
    expected: dict[str, CustomerSummaryView] = {}
    for view in (await expected_views(cluster.servers.postgres_url)).values():
        customer = view.customer_id
        expected[customer] = summarize(expected.get(customer, CustomerSummaryView(customer)), None, view)
    redis = cluster.redis()
    try:
        live = await live_keys(redis, cluster.keys.of(SUMMARY_PROJECTION))
        actual = {}
        async for key in redis.scan_iter(match=live.summary_customer("*"), count=1000):
            raw = await redis.get(key)
            assert raw is not None
            summary = CustomerSummaryView.from_json(raw)
            actual[summary.customer_id] = summary
    finally:
        await redis.aclose()
    assert expected == actual


async def event_count(cluster: Cluster) -> int:
    conn = await asyncpg.connect(cluster.servers.postgres_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()


# ------------------------------------------------------------------------------ setting up


async def create_orders(cluster: Cluster, count: int) -> None:
    """`count` orders with an item each, spread over CUSTOMERS."""
    commands = cluster.commands

    async def one(i: int) -> None:
        created = await commands.CreateOrder(create_request(CUSTOMERS[i % len(CUSTOMERS)]), timeout=30)
        await commands.AddItem(add_item_request(created.result.order_id), timeout=30)

    for start in range(0, count, 50):
        await asyncio.gather(*(one(i) for i in range(start, min(count, start + 50))))


async def start_worker(cluster: Cluster, admin_port: int, projections: list[str], batch_size: int) -> Service:
    return await cluster.start_worker(
        ORDERS_WORKER_ID=WORKER_ID,
        ORDERS_LEASE_TTL="30",  # pinned id: the restart does not wait for it
        ORDERS_ADMIN_ADDRESS=f"127.0.0.1:{admin_port}",
        ORDERS_PROJECTIONS=",".join(projections),
        ORDERS_BATCH_SIZE=str(batch_size),
    )


async def caught_up_at_generation_0(cluster: Cluster, projections: list[str]) -> None:
    conn = await asyncpg.connect(cluster.servers.postgres_url)
    try:
        row = await conn.fetchrow("SELECT tx_id, position FROM events ORDER BY tx_id DESC, position DESC LIMIT 1")
    finally:
        await conn.close()
    assert row is not None
    head = LogPosition(row["tx_id"], row["position"])

    async def caught_up() -> None:
        for projection in projections:
            assert (await generation_state(cluster, projection)).live_checkpoint == head

    await eventually(caught_up, timeout=60, interval=0.1)


async def kill(worker: Service) -> None:
    worker.signal(signal.SIGKILL)
    await worker.process.wait()


# ------------------------------------------------------------------------------ killed while building


async def test_worker_killed_while_the_new_generation_is_part_built(cluster: Cluster) -> None:
    """Both projections rebuild into generation 1 under command load, 20 events per catch-up batch.
    The moment both new generations hold some catch-up batches (their checkpoints, polled) the worker
    is SIGKILLed, and the keys after the kill show a part-built generation 1. Restarted, it goes on
    from generation 1's checkpoint, switches, and deletes generation 0."""
    await cluster.start_write_service()
    admin_port, projections = free_port(), list(PROJECTIONS)
    worker = await start_worker(cluster, admin_port, projections, batch_size=20)
    await create_orders(cluster, ORDERS // 3)  # 1,000 events: 50 catch-up batches
    await caught_up_at_generation_0(cluster, projections)
    admin = admin_pb2_grpc.ProjectionAdminStub(cluster.channel(admin_port))
    load = Load(cluster.commands, seed=31, clients=2, pause=0.02)
    at_kill: dict[str, GenerationState] = {}

    async def kill_mid_build() -> None:
        for name in projections:
            await admin.RebuildProjection(pb.RebuildProjectionRequest(name=name), timeout=10)

        async def part_built() -> None:
            for name in projections:
                assert (await generation_state(cluster, name)).part_built, name

        await eventually(part_built, timeout=30, interval=0.005)
        await kill(worker)
        at_kill.update({name: await generation_state(cluster, name) for name in projections})
        await start_worker(cluster, admin_port, projections, batch_size=20)
        await eventually(lambda: switched(admin), timeout=60, interval=0.1)

    await run_load_while(load, kill_mid_build)

    print(f"killed mid-build: {at_kill}; acked={len(load.acked)}")
    for name, state in at_kill.items():
        assert state.part_built, (name, state)  # the kill came before the switch, after catch-up batches
    assert len(load.acked) > 0
    await assert_rebuilt(cluster, projections, load)


async def switched(admin: admin_pb2_grpc.ProjectionAdminStub) -> None:
    try:
        reply = await admin.ListProjections(pb.ListProjectionsRequest(), timeout=5)
    except grpc.aio.AioRpcError as error:
        raise AssertionError(f"ProjectionAdmin not answering yet: {error.code()}") from error
    assert {(s.generation, s.state) for s in reply.projections} == {(1, pb.PROJECTION_STATE_RUNNING)}


# ------------------------------------------------------------------------------ killed while retiring


class LogGate:
    """Stops the worker at its reads of the event log, and lets them through one at a time.

    The gate is an ACCESS EXCLUSIVE lock on `events`, held in an open transaction: a read waits on
    it. Every turn of the worker's loop reads the log before anything else (then a rebuild's catch-up
    batch reads it again), so between two reads let through the loop does at most one turn's work,
    and while it waits at the gate its keys in Redis stand still. Only the worker may read the log
    meanwhile (no command load, no ProjectionAdmin call: those would wait at the gate too), and only
    one projection loop (two loops of one process may share one read)."""

    def __init__(self, holder: asyncpg.Connection, watcher: asyncpg.Connection) -> None:
        self._holder = holder  # holds the lock
        self._watcher = watcher  # outside any transaction, sees who waits
        self._transaction: asyncpg.transaction.Transaction | None = None

    @classmethod
    async def connect(cls, url: str) -> LogGate:
        return cls(await asyncpg.connect(url), await asyncpg.connect(url))

    async def close(self) -> None:
        await self.open()
        await self._holder.close()
        await self._watcher.close()

    async def shut(self) -> None:
        """Returns once the gate is shut and the worker waits at it."""
        self._transaction = self._holder.transaction()
        await self._transaction.start()
        await self._holder.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        await eventually(self._worker_waits, timeout=30, interval=0.005)

    async def open(self) -> None:
        if self._transaction is not None:
            await self._transaction.commit()
            self._transaction = None

    async def let_one_read_through(self) -> None:
        """The waiting read goes (it holds its lock until it ends, so shutting waits for that), and
        the worker runs until its next read."""
        await self.open()
        await self.shut()

    async def _worker_waits(self) -> None:
        waiting = await self._watcher.fetchval(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'events'::regclass AND pid <> $1",
            self._holder.get_server_pid(),
        )
        assert waiting == 1, f"{waiting} reads wait at the gate"


async def request_rebuild(cluster: Cluster, projection: str) -> None:
    """What ProjectionAdmin.RebuildProjection writes for a rebuild into generation 1, written here
    directly: the RPC's reply reports progress read from the event log, which waits at the gate."""
    keys = cluster.keys.of(projection)
    redis = cluster.redis()
    try:
        seconds, micros = await redis.time()
        await redis.set(keys.rebuild_started, seconds * 1000 + micros // 1000)
        await redis.set(keys.next_generation, 1, nx=True)
    finally:
        await redis.aclose()


async def test_worker_killed_while_retiring_the_old_generation(cluster: Cluster) -> None:
    """Retiring a generation is not one atomic step: after the switch (one MULTI: pointer to the new
    generation, the old one added to `retired`) the loop deletes the old generation's view keys, a
    chunk of 1,000 per turn, then its checkpoint and counter, then drops it from `retired`. That takes
    a few turns, a few milliseconds: too quick to catch by polling, so the test single-steps the
    worker through the rebuild with a LogGate and SIGKILLs it once the switch is done and generation
    0 is partly deleted (some of its 1,500 order views gone, some left). Restarted, the worker
    deletes the rest. Only the orders projection runs (the gate steps one loop)."""
    await cluster.start_write_service()
    admin_port, projections = free_port(), [PROJECTION]
    worker = await start_worker(cluster, admin_port, projections, batch_size=500)
    await create_orders(cluster, ORDERS)
    await caught_up_at_generation_0(cluster, projections)
    views_before = await order_views_of_generation(cluster, 0)
    gate = await LogGate.connect(cluster.servers.postgres_url)
    try:
        await gate.shut()
        await request_rebuild(cluster, PROJECTION)
        states = []
        for _ in range(200):
            await gate.let_one_read_through()
            state = await generation_state(cluster, PROJECTION)
            left = await order_views_of_generation(cluster, 0)
            states.append((state.live, sorted(state.retired), left))
            if state.live == 1 and (not state.retired or 0 < left < views_before):
                break
        await kill(worker)
    finally:
        await gate.close()
    at_kill = await generation_state(cluster, PROJECTION)
    left_at_kill = await order_views_of_generation(cluster, 0)

    print(f"killed mid-retirement after {len(states)} reads: {left_at_kill} of {views_before} old views left; {states}")
    assert (at_kill.live, at_kill.retired) == (1, {"0"}), f"retirement not caught midway; steps: {states}"
    assert 0 < left_at_kill < views_before
    await start_worker(cluster, admin_port, projections, batch_size=500)
    await create_orders(cluster, 10)  # and the restarted worker applies live events too
    await assert_rebuilt(cluster, projections)
