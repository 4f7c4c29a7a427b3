"""A zero-downtime rebuild (ProjectionAdmin.RebuildProjection): a new generation of a projection's
keys is built beside the live one, under live query and command load, and switched to atomically."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from functools import partial

import grpc
import pytest

from orders.server.grpc_server import RunningServer
from orders.store.event_store import connect
from orders.store.views import PROJECTIONS, ViewKeys
from orders.v1 import admin_pb2 as pb
from orders.v1 import admin_pb2_grpc
from orders.v1 import queries_pb2 as qry
from sync_worker.main import start_admin
from tests.helpers import add_item_request, all_events, assert_views_match_events, create_request, eventually
from tests.integration.conftest import System

CUSTOMERS = [f"zd-{i}" for i in range(8)]


@pytest.fixture
async def admin(system: System) -> AsyncIterator[admin_pb2_grpc.ProjectionAdminStub]:
    pool = await connect(system.database_url, max_size=2)
    server: RunningServer = await start_admin("127.0.0.1:0", pool, system.redis, system.keys.prefix)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield admin_pb2_grpc.ProjectionAdminStub(channel)
    await channel.close()
    await server.stop(0)
    await pool.close()


async def statuses(stub: admin_pb2_grpc.ProjectionAdminStub) -> dict[str, pb.ProjectionStatus]:
    reply = await stub.ListProjections(pb.ListProjectionsRequest())
    return {status.name: status for status in reply.projections}


async def create_orders(system: System, count: int) -> dict[str, str]:
    """`count` orders with an item each, spread over CUSTOMERS; order id -> customer id."""

    async def one(i: int) -> tuple[str, str]:
        customer = CUSTOMERS[i % len(CUSTOMERS)]
        order_id = (await system.commands.CreateOrder(create_request(customer))).result.order_id
        await system.commands.AddItem(add_item_request(order_id))
        return order_id, customer

    created: dict[str, str] = {}
    for start in range(0, count, 50):
        created.update(await asyncio.gather(*(one(i) for i in range(start, min(count, start + 50)))))
    return created


async def no_keys_of_generation(system: System, name: str, generation: int) -> None:
    old = ViewKeys(system.keys.prefix, name, generation)
    found: list[str] = []
    for pattern in old.view_patterns():
        found += [k async for k in system.redis.scan_iter(match=pattern, count=1000)]
    found += [k for k in old.generation_keys if await system.redis.exists(k)]
    assert found == [], found[:5]
    assert not await system.redis.exists(old.retired)


async def test_rebuild_under_live_load_never_shows_a_missing_order(
    system: System, admin: admin_pb2_grpc.ProjectionAdminStub
) -> None:
    """While both projections rebuild into generation 1 under query and command load, no query
    answers NOT_FOUND or UNAVAILABLE, misses a known order or goes back to an older version; then
    the pointers name generation 1, generation 0's keys are gone, and the views equal the fold of
    the events."""
    stub = admin
    known = await create_orders(system, 300)
    all_ids = sorted(known)
    await eventually(lambda: caught_up(stub), timeout=30)

    errors: Counter[str] = Counter()
    reads = Counter[str]()
    seen_version: dict[str, int] = {}
    seen_count: dict[str, int] = {}
    backwards: list[str] = []
    missing: list[str] = []
    done = asyncio.Event()

    def note(order_id: str, version: int) -> None:
        if version < seen_version.get(order_id, 0):
            backwards.append(f"{order_id}: {seen_version[order_id]} -> {version}")
        seen_version[order_id] = max(version, seen_version.get(order_id, 0))

    async def call(kind: str, coro: Awaitable[object]) -> object | None:
        try:
            reply = await coro
            reads[kind] += 1
            return reply
        except grpc.aio.AioRpcError as error:
            errors[f"{kind}: {error.code().name}: {error.details()}"] += 1
            return None

    async def get_orders() -> None:
        rng = random.Random(1)
        while not done.is_set():
            order_id = rng.choice(all_ids)
            reply = await call("GetOrder", system.queries.GetOrder(qry.GetOrderRequest(order_id=order_id), timeout=5))
            if isinstance(reply, qry.GetOrderResponse):
                note(order_id, reply.order.version)

    async def list_orders() -> None:
        while not done.is_set():
            for customer in CUSTOMERS:
                request = qry.ListOrdersRequest(customer_id=customer, page_size=500)
                reply = await call("ListOrders", system.queries.ListOrders(request, timeout=5))
                if isinstance(reply, qry.ListOrdersResponse):
                    listed = {o.order_id for o in reply.orders}
                    missing.extend(i for i, c in known.items() if c == customer and i not in listed)
                    for order in reply.orders:
                        note(order.order_id, order.version)

    async def summaries() -> None:
        while not done.is_set():
            for customer in CUSTOMERS:
                request = qry.GetCustomerSummaryRequest(customer_id=customer)
                reply = await call("GetCustomerSummary", system.queries.GetCustomerSummary(request, timeout=5))
                if isinstance(reply, qry.GetCustomerSummaryResponse):
                    count = reply.summary.order_count
                    if count < seen_count.get(customer, 0):
                        backwards.append(f"summary {customer}: {seen_count[customer]} -> {count}")
                    seen_count[customer] = max(count, seen_count.get(customer, 0))

    async def write() -> None:
        rng = random.Random(2)
        while not done.is_set():
            await system.commands.AddItem(add_item_request(rng.choice(all_ids), sku=f"SKU-{rng.randrange(10**9)}"))
            new = await system.commands.CreateOrder(create_request(rng.choice(CUSTOMERS)))
            assert new.result.order_id

    tasks = [asyncio.create_task(t()) for t in (get_orders, get_orders, list_orders, summaries, write, write)]
    await asyncio.sleep(0.3)
    for name in PROJECTIONS:
        reply = await stub.RebuildProjection(pb.RebuildProjectionRequest(name=name))
        assert reply.projection.HasField("rebuild")
        assert reply.projection.rebuild.generation == 1
        assert not reply.projection.rebuild.in_place

    progress: list[pb.RebuildProgress] = []

    async def switched() -> None:
        found = await statuses(stub)
        progress.extend(s.rebuild for s in found.values() if s.HasField("rebuild"))
        assert {s.generation for s in found.values()} == {1}
        assert {s.state for s in found.values()} == {pb.PROJECTION_STATE_RUNNING}

    await eventually(switched, timeout=60, interval=0.1)
    await asyncio.sleep(0.5)  # reads after the switch too
    done.set()
    await asyncio.gather(*tasks)

    assert not errors, errors
    assert not backwards, backwards[:10]
    assert not missing, missing[:10]
    assert set(reads) == {"GetOrder", "ListOrders", "GetCustomerSummary"}, reads
    assert progress
    assert all(p.events_done <= p.events_total for p in progress)
    for name in PROJECTIONS:
        assert await system.redis.get(ViewKeys(system.keys.prefix, name).generation_pointer) == "1"

    for name in PROJECTIONS:
        await eventually(partial(no_keys_of_generation, system, name, 0), timeout=20)
    await eventually(lambda: caught_up(stub), timeout=30)
    await assert_views_match_events(system.database_url, system.redis, system.keys)
    events = len(await all_events(system.database_url))
    assert {s.applied_events for s in (await statuses(stub)).values()} == {events}
    for customer in CUSTOMERS:
        summary = await system.queries.GetCustomerSummary(qry.GetCustomerSummaryRequest(customer_id=customer))
        orders = await system.queries.ListOrders(qry.ListOrdersRequest(customer_id=customer, page_size=500))
        assert summary.summary.order_count == len(orders.orders)


async def caught_up(stub: admin_pb2_grpc.ProjectionAdminStub) -> None:
    found = await statuses(stub)
    assert {s.lag_events for s in found.values()} == {0}
    assert {s.state for s in found.values()} == {pb.PROJECTION_STATE_RUNNING}


async def test_a_second_rebuild_moves_to_generation_2_and_in_place_keeps_the_generation(
    system: System, admin: admin_pb2_grpc.ProjectionAdminStub
) -> None:
    """Generations keep counting up; an in-place rebuild replays the live generation where it is."""
    stub = admin
    await create_orders(system, 20)
    for generation in (1, 2):
        await stub.RebuildProjection(pb.RebuildProjectionRequest(name="orders"))

        async def at(generation: int = generation) -> None:
            status = (await statuses(stub))["orders"]
            assert (status.generation, status.state) == (generation, pb.PROJECTION_STATE_RUNNING)

        await eventually(at, timeout=20)
        await eventually(partial(no_keys_of_generation, system, "orders", generation - 1), timeout=20)
    await stub.RebuildProjection(pb.RebuildProjectionRequest(name="orders", in_place=True))
    await eventually(lambda: caught_up(stub), timeout=20)

    assert (await statuses(stub))["orders"].generation == 2
    await assert_views_match_events(system.database_url, system.redis, system.keys)


async def test_rebuild_of_an_empty_log_switches(system: System, admin: admin_pb2_grpc.ProjectionAdminStub) -> None:
    """With no events at all, the new generation is complete at once and takes over."""
    await admin.RebuildProjection(pb.RebuildProjectionRequest(name="customer_summary"))

    async def switched() -> None:
        status = (await statuses(admin))["customer_summary"]
        assert (status.generation, status.state, status.checkpoint) == (1, pb.PROJECTION_STATE_RUNNING, "0-0")

    await eventually(switched, timeout=20)
