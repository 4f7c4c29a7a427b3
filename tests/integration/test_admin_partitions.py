"""ProjectionAdmin and `orders-admin` with partitioned projections: a name covers a projection (every
partition) or one partition ("orders/2"); status lists each partition; pause, resume, rebuild,
parked and retry work per partition; `orders-admin drop-partitioning` deletes one count's keys."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import grpc
import pytest

from orders.server.grpc_server import RunningServer
from orders.store.event_store import connect
from orders.store.partitions import partition_of
from orders.store.views import PROJECTION, PROJECTIONS, ViewKeys
from orders.tools.processes import child_environment, script_command
from orders.v1 import admin_pb2 as pb
from orders.v1 import admin_pb2_grpc
from sync_worker.main import build_workers, start_admin
from sync_worker.worker import SyncWorker, WorkerSettings
from tests.helpers import Ran, add_item_request, create_request, error_reason, eventually, run_to_end
from tests.integration.conftest import System

PARTITIONS = 3
LEASE_TTL = 1.0


class PartitionedWorker:
    """One worker process's loops at PARTITIONS partitions, run in this event loop."""

    def __init__(self, system: System, worker_id: str) -> None:
        settings = WorkerSettings(system.database_url, poll_interval=0.2, lease_ttl=LEASE_TTL)
        prefix = system.keys.prefix
        self.loops: list[SyncWorker] = build_workers(
            settings, system.redis, prefix, list(PROJECTIONS), worker_id, partitions=PARTITIONS
        )
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(asyncio.gather(*(loop.run(self._stop) for loop in self.loops)))

    async def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            await asyncio.wait_for(self._task, 10)


@pytest.fixture
async def admin(system: System) -> AsyncIterator[tuple[admin_pb2_grpc.ProjectionAdminStub, int]]:
    """ProjectionAdmin at PARTITIONS partitions (beside the system's own one-partition worker, whose
    keys it never touches: the count is in every key's tag)."""
    pool = await connect(system.database_url, max_size=2)
    server: RunningServer = await start_admin(
        "127.0.0.1:0", pool, system.redis, system.keys.prefix, partitions=PARTITIONS
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield admin_pb2_grpc.ProjectionAdminStub(channel), server.port
    await channel.close()
    await server.stop(0)
    await pool.close()


@pytest.fixture
async def worker(system: System) -> AsyncIterator[PartitionedWorker]:
    running = PartitionedWorker(system, "w-part")
    try:
        yield running
    finally:
        with contextlib.suppress(Exception):
            await running.stop()


async def statuses(stub: admin_pb2_grpc.ProjectionAdminStub) -> dict[str, pb.ProjectionStatus]:
    reply = await stub.ListProjections(pb.ListProjectionsRequest())
    return {status.name: status for status in reply.projections}


async def make_orders(system: System, count: int) -> str:
    """Creates `count` orders with an item each; returns the last consistency token."""
    token = ""
    for _ in range(count):
        created = (await system.commands.CreateOrder(create_request("part-adm"))).result
        token = (await system.commands.AddItem(add_item_request(created.order_id))).result.consistency_token
    return token


def names(projection: str) -> list[str]:
    return [f"{projection}/{k}" for k in range(PARTITIONS)]


async def test_status_lists_every_partition_with_its_owner_checkpoint_and_applied_events(
    system: System, admin: tuple[admin_pb2_grpc.ProjectionAdminStub, int], worker: PartitionedWorker
) -> None:
    """Each partition runs under the worker, at the last event (every partition's checkpoint passes
    the whole log), and the partitions' applied events add up to every event once."""
    stub, _ = admin
    last = await make_orders(system, 6)

    async def caught_up() -> dict[str, pb.ProjectionStatus]:
        found = await statuses(stub)
        assert {s.state for s in found.values()} == {pb.PROJECTION_STATE_RUNNING}
        assert {s.checkpoint for s in found.values()} == {last}
        return found

    found = await eventually(caught_up, timeout=20)

    assert list(found) == names("orders") + names("customer_summary")
    assert {s.worker_id for s in found.values()} == {"w-part"}
    assert {(s.lag_events, s.parked_orders, s.generation) for s in found.values()} == {(0, 0, 0)}
    assert sum(found[name].applied_events for name in names("orders")) == 12


async def test_pause_and_resume_one_partition_or_every_partition(
    admin: tuple[admin_pb2_grpc.ProjectionAdminStub, int], system: System
) -> None:
    """ "orders/1" pauses that partition only; "orders" every partition, each in the reply."""
    stub, _ = admin
    one = await stub.PauseProjection(pb.PauseProjectionRequest(name="orders/1"))
    paused_one = {name for name, s in (await statuses(stub)).items() if s.state == pb.PROJECTION_STATE_PAUSED}
    every = await stub.PauseProjection(pb.PauseProjectionRequest(name="orders"))
    paused_all = {name for name, s in (await statuses(stub)).items() if s.state == pb.PROJECTION_STATE_PAUSED}
    resumed = await stub.ResumeProjection(pb.ResumeProjectionRequest(name="orders/1"))
    still = {name for name, s in (await statuses(stub)).items() if s.state == pb.PROJECTION_STATE_PAUSED}

    assert (one.projection.name, [s.name for s in one.partitions]) == ("orders/1", ["orders/1"])
    assert paused_one == {"orders/1"}
    assert [s.name for s in every.partitions] == names("orders")
    assert paused_all == set(names("orders"))
    assert resumed.projection.state != pb.PROJECTION_STATE_PAUSED
    assert still == {"orders/0", "orders/2"}
    assert await system.redis.exists(ViewKeys(system.keys.prefix, PROJECTION).paused) == 0  # P=1 untouched


@pytest.mark.parametrize("name", ["orders/3", "orders/x", "orders/", "nope/1", "orders/-1"])
async def test_a_partition_that_does_not_exist_is_invalid(
    admin: tuple[admin_pb2_grpc.ProjectionAdminStub, int], name: str
) -> None:
    stub, _ = admin
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.PauseProjection(pb.PauseProjectionRequest(name=name))

    assert (caught.value.code(), error_reason(caught.value)) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_PROJECTION")


async def park(system: System, order_id: str, first_position: int) -> ViewKeys:
    """Parks `order_id` in its partition as the worker does (sync_worker.parking): its score, its
    events' positions and its error."""
    keys = ViewKeys(system.keys.prefix, PROJECTION, partitions=PARTITIONS).for_order(order_id)
    await system.redis.zadd(keys.parked, {order_id: first_position})
    await system.redis.rpush(keys.parked_events(order_id), first_position, first_position + 1)
    await system.redis.hset(keys.parked_errors, order_id, f"poison in {order_id}")
    return keys


def orders_in_distinct_partitions() -> list[str]:
    """One order id per partition, partition 0 first."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < PARTITIONS:
        found.setdefault(partition_of(f"parked-{n}", PARTITIONS), f"parked-{n}")
        n += 1
    return [found[k] for k in range(PARTITIONS)]


async def test_parked_orders_are_listed_across_partitions_and_retried_in_their_own(
    system: System, admin: tuple[admin_pb2_grpc.ProjectionAdminStub, int]
) -> None:
    """The projection's list merges its partitions by first parked position and names each order's
    partition; a retry goes to the partition that holds the order, and naming another partition is
    NOT_FOUND."""
    stub, _ = admin
    first, second, third = orders_in_distinct_partitions()
    await park(system, first, 30)
    await park(system, second, 10)
    third_keys = await park(system, third, 20)

    listed = await stub.ListParkedOrders(pb.ListParkedOrdersRequest(name="orders"))
    one = await stub.ListParkedOrders(pb.ListParkedOrdersRequest(name="orders/2"))
    status = (await statuses(stub))["orders/2"]
    await stub.RetryParkedOrder(pb.RetryParkedOrderRequest(name="orders", order_id=third))
    await stub.RetryParkedOrder(pb.RetryParkedOrderRequest(name="orders/2", order_id=third))
    with pytest.raises(grpc.aio.AioRpcError) as elsewhere:
        await stub.RetryParkedOrder(pb.RetryParkedOrderRequest(name="orders/0", order_id=third))
    queued = await system.redis.lrange(third_keys.parked_requests, 0, -1)

    assert [(o.order_id, o.partition) for o in listed.orders] == [
        (second, "orders/1"),
        (third, "orders/2"),
        (first, "orders/0"),
    ]
    assert [(o.order_id, list(o.positions), o.error) for o in one.orders] == [(third, [20, 21], f"poison in {third}")]
    assert status.parked_orders == 1
    assert [json.loads(request)["order_id"] for request in queued] == [third, third]
    assert (elsewhere.value.code(), error_reason(elsewhere.value)) == (grpc.StatusCode.NOT_FOUND, "ORDER_NOT_PARKED")


async def test_rebuilding_a_projection_rebuilds_each_partition_into_a_new_generation(
    system: System, admin: tuple[admin_pb2_grpc.ProjectionAdminStub, int], worker: PartitionedWorker
) -> None:
    stub, _ = admin
    last = await make_orders(system, 4)

    reply = await stub.RebuildProjection(pb.RebuildProjectionRequest(name="orders"))

    async def rebuilt() -> dict[str, pb.ProjectionStatus]:
        found = await statuses(stub)
        assert {(found[n].state, found[n].generation, found[n].checkpoint) for n in names("orders")} == {
            (pb.PROJECTION_STATE_RUNNING, 1, last)
        }
        return found

    found = await eventually(rebuilt, timeout=30)

    assert [s.name for s in reply.partitions] == names("orders")
    assert sum(found[n].applied_events for n in names("orders")) == 8
    assert {found[n].generation for n in names("customer_summary")} == {0}


async def admin_cli(port: int, *argv: str, env: dict[str, str] | None = None) -> Ran:
    command = script_command("orders-admin", "--admin-address", f"127.0.0.1:{port}", *argv)
    return await run_to_end(command, env=child_environment(env))


async def test_command_line_names_partitions(
    system: System, admin: tuple[admin_pb2_grpc.ProjectionAdminStub, int], worker: PartitionedWorker
) -> None:
    """`orders-admin list` shows a row per partition with its parked orders and generation; a
    command takes a partition's name; --help says how to name one."""
    _, port = admin
    await make_orders(system, 2)

    async def listed_running() -> Ran:
        listed = await admin_cli(port, "list")
        assert listed.out.count("running") == 2 * PARTITIONS, listed.out
        return listed

    listed = await eventually(listed_running, timeout=20)
    paused = await admin_cli(port, "pause", "customer_summary/2")
    resumed = await admin_cli(port, "resume", "customer_summary")
    helped = await admin_cli(port, "--help")

    header, *rows = listed.out.splitlines()
    assert header.split()[:3] == ["PROJECTION", "STATE", "CHECKPOINT"]
    assert "PARKED" in header
    assert "GENERATION" in header
    assert [row.split()[0] for row in rows] == names("orders") + names("customer_summary")
    assert (paused.status, paused.out.splitlines()[1].split()[:2]) == (0, ["customer_summary/2", "paused"])
    assert [row.split()[0] for row in resumed.out.splitlines()[1:]] == names("customer_summary")
    assert "orders/2" in helped.out


def count_keys(prefix: str, partitions: int) -> str:
    return f"{prefix}{{*/{partitions}}}:*"


async def test_drop_partitioning_deletes_one_count_and_only_once_its_workers_are_gone(
    system: System, worker: PartitionedWorker
) -> None:
    """Refused while a worker of the count beats; then deletes every key of that count (a dry run
    first counts them) and leaves the count in use (the system's one partition) as it was."""
    await make_orders(system, 3)
    prefix = system.keys.prefix
    env = {"ORDERS_REDIS_URL": system.redis_url, "ORDERS_REDIS_PREFIX": prefix}

    async def applied() -> None:
        assert await system.redis.get(ViewKeys(prefix, PROJECTION, partitions=PARTITIONS).checkpoint)

    await eventually(applied, timeout=20)
    drop = ("drop-partitioning", "--partitions", str(PARTITIONS), "--stale-after", "0.5")
    refused = await admin_cli(0, *drop, env=env)
    await worker.stop()
    await asyncio.sleep(1.0)  # the heartbeats grow older than --stale-after
    one_before = sorted([key async for key in system.redis.scan_iter(match=count_keys(prefix, 1))])
    doomed = [key async for key in system.redis.scan_iter(match=count_keys(prefix, PARTITIONS))]
    registered = await system.redis.exists(*[ViewKeys(prefix, n, partitions=PARTITIONS).workers for n in PROJECTIONS])
    in_use = await admin_cli(0, "drop-partitioning", "--partitions", "3", env=env | {"ORDERS_PARTITIONS": "3"})
    dry = await admin_cli(0, *drop, "--dry-run", env=env)
    dropped = await admin_cli(0, *drop, env=env)
    left = [key async for key in system.redis.scan_iter(match=count_keys(prefix, PARTITIONS))]
    one_after = sorted([key async for key in system.redis.scan_iter(match=count_keys(prefix, 1))])
    members = [ViewKeys(prefix, name, partitions=PARTITIONS).workers for name in PROJECTIONS]

    assert (refused.status, "live workers" in refused.err) == (1, True), refused.err
    assert (in_use.status, "in use" in in_use.err) == (1, True), in_use.err
    assert len(doomed) > 2 * PARTITIONS * 3  # views, indexes, checkpoints, leases, heartbeats...
    assert dry.out.strip() == f"partition count 3: {len(doomed) + registered} keys found (dry run, nothing deleted)"
    assert dropped.status == 0, dropped.err
    assert left == []
    assert await system.redis.exists(*members) == 0
    assert one_after == one_before != []
