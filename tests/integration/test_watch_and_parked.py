"""Parked orders and generation switches as the read service's lists and watches show them: a
ListOrders page or watch message with an order whose events are parked is flagged stale, an open
WatchOrder stream sends its order again flagged stale once the order's next event is parked, and
after a zero-downtime rebuild's switch every open watch sends what it watches again (same versions,
from the new generation). Real worker, PostgreSQL, Redis and gRPC; the poison events come from a
projection that raises on chosen (order, version) pairs, under the `park` policy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from orders.domain.events import RecordedEvent
from orders.store.event_store import connect
from orders.store.views import OrderView, ViewKeys
from orders.v1 import admin_pb2, admin_pb2_grpc
from orders.v1 import commands_pb2 as cmd
from orders.v1 import queries_pb2 as qry
from sync_worker import projection, projector
from sync_worker.main import start_admin
from tests.helpers import add_item_request, create_request, eventually
from tests.integration.conftest import System

STREAM_DEADLINE = 60.0  # seconds: a stream that a broken implementation leaves open still ends
MESSAGE_WAIT = 10.0  # seconds to wait for a message that must come

Poison = set[tuple[str, int]]  # (order id, version) of the events the order projection cannot apply


@pytest.fixture
async def admin(system: System) -> AsyncIterator[admin_pb2_grpc.ProjectionAdminStub]:
    pool = await connect(system.database_url, max_size=2)
    server = await start_admin("127.0.0.1:0", pool, system.redis, system.keys.prefix)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield admin_pb2_grpc.ProjectionAdminStub(channel)
    await channel.close()
    await server.stop(0)
    await pool.close()


@pytest.fixture
async def poison(system: System, monkeypatch: pytest.MonkeyPatch) -> Poison:
    """The events the order projection fails on (empty at first; the test adds and clears them),
    with the worker restarted under the `park` policy, running the order projection only."""
    failing: Poison = set()
    real_project = projection.project

    def buggy(view: OrderView | None, recorded: RecordedEvent) -> OrderView:
        if (recorded.stream_id, recorded.version) in failing:
            raise RuntimeError("bug in the order projection")
        return real_project(view, recorded)

    await system.stop_worker()
    monkeypatch.setattr(projector, "project", buggy)
    system.start_worker(poison_policy="park", projections=("orders",))
    return failing


async def create(system: System, customer: str, order_id: str) -> cmd.CommandResult:
    result: cmd.CommandResult = (await system.commands.CreateOrder(create_request(customer, order_id=order_id))).result
    return result


async def add_item(system: System, order_id: str) -> cmd.CommandResult:
    result: cmd.CommandResult = (await system.commands.AddItem(add_item_request(order_id))).result
    return result


async def parked_orders(admin: admin_pb2_grpc.ProjectionAdminStub) -> list[str]:
    reply = await admin.ListParkedOrders(admin_pb2.ListParkedOrdersRequest(name="orders"))
    return [order.order_id for order in reply.orders]


async def _parked_is(admin: admin_pb2_grpc.ProjectionAdminStub, expected: list[str]) -> None:
    assert await parked_orders(admin) == expected


async def _pointer_is(system: System, generation: str) -> None:
    assert await system.redis.get(ViewKeys(system.keys.prefix, "orders").generation_pointer) == generation


async def release(admin: admin_pb2_grpc.ProjectionAdminStub, poison: Poison, order_id: str) -> None:
    """Fixes the projection and has the worker retry the order's parked events, until released."""
    poison.clear()
    await admin.RetryParkedOrder(admin_pb2.RetryParkedOrderRequest(name="orders", order_id=order_id))

    async def released() -> None:
        assert order_id not in await parked_orders(admin)

    await eventually(released)


async def read(call: Any, timeout: float = MESSAGE_WAIT) -> Any:
    """The next message of a stream; fails if none comes within `timeout` seconds or the stream ended."""
    message = await asyncio.wait_for(call.read(), timeout)
    assert message is not grpc.aio.EOF, "the stream ended"
    return message


def versions(orders: Any) -> dict[str, int]:
    return {order.order_id: order.version for order in orders}


async def list_orders(system: System, customer: str, token: str = "") -> qry.ListOrdersResponse:
    request = qry.ListOrdersRequest(customer_id=customer, consistency_token=token)
    reply: qry.ListOrdersResponse = await system.queries.ListOrders(request, timeout=10)
    return reply


# ------------------------------------------------------------------ ListOrders


async def test_a_page_with_a_parked_order_is_stale_until_the_order_is_released(
    system: System, poison: Poison, admin: admin_pb2_grpc.ProjectionAdminStub
) -> None:
    """A customer's page that holds an order with parked events says stale (its view of that order
    is behind, though the checkpoint passed the token); another customer's page at the same token
    does not; once the order's events are retried and released, the page is fresh and current."""
    poison.add(("stuck", 2))
    await create(system, "sam", "stuck")
    await add_item(system, "stuck")  # parked
    await create(system, "sam", "healthy")
    token = (await create(system, "kim", "kims")).consistency_token

    await eventually(lambda: _parked_is(admin, ["stuck"]))
    with_parked = await list_orders(system, "sam", token)
    without = await list_orders(system, "kim", token)
    await release(admin, poison, "stuck")
    released = await list_orders(system, "sam", token)

    assert versions(with_parked.orders) == {"stuck": 1, "healthy": 1}
    assert with_parked.consistency.stale is True
    assert versions(without.orders) == {"kims": 1}
    assert without.consistency.stale is False
    assert versions(released.orders) == {"stuck": 2, "healthy": 1}
    assert released.consistency.stale is False


# ------------------------------------------------------------------ watches of parked orders


async def test_watch_order_resends_its_version_flagged_stale_once_the_next_event_is_parked(
    system: System, poison: Poison, admin: admin_pb2_grpc.ProjectionAdminStub
) -> None:
    """An open WatchOrder stream, when the order's next event is parked: the same version again,
    now stale (its view stays behind); after the release, the new version, fresh."""
    created = await create(system, "sam", "watched")
    call = system.queries.WatchOrder(
        qry.WatchOrderRequest(order_id="watched", consistency_token=created.consistency_token),
        timeout=STREAM_DEADLINE,
    )
    try:
        first = await read(call)
        poison.add(("watched", 2))
        await add_item(system, "watched")
        flagged = await read(call)
        await release(admin, poison, "watched")
        healed = await read(call)
    finally:
        call.cancel()

    assert (first.order.version, first.consistency.stale) == (1, False)
    assert (flagged.order.version, flagged.consistency.stale) == (1, True)
    assert (healed.order.version, healed.consistency.stale) == (2, False)


async def test_watch_customer_orders_flags_a_parked_order_stale(
    system: System, poison: Poison, admin: admin_pb2_grpc.ProjectionAdminStub
) -> None:
    """The first message of a customer with a parked order is stale; a later message of another,
    healthy order of that customer is not; the parked order's release comes as its new version, fresh."""
    poison.add(("stuck", 2))
    await create(system, "sam", "stuck")
    await add_item(system, "stuck")  # parked
    created = await create(system, "sam", "healthy")
    await eventually(lambda: _parked_is(admin, ["stuck"]))
    call = system.queries.WatchCustomerOrders(
        qry.WatchCustomerOrdersRequest(customer_id="sam", consistency_token=created.consistency_token),
        timeout=STREAM_DEADLINE,
    )
    try:
        snapshot = await read(call)
        await add_item(system, "healthy")
        healthy_change = await read(call)
        await release(admin, poison, "stuck")
        released = await read(call)
    finally:
        call.cancel()

    assert snapshot.initial is True
    assert versions(snapshot.orders) == {"stuck": 1, "healthy": 1}
    assert snapshot.consistency.stale is True
    assert (versions(healthy_change.orders), healthy_change.consistency.stale) == ({"healthy": 2}, False)
    assert (versions(released.orders), released.consistency.stale) == ({"stuck": 2}, False)


# ------------------------------------------------------------------ generation switch


async def test_open_watches_send_what_they_watch_again_after_a_generation_switch(
    system: System, admin: admin_pb2_grpc.ProjectionAdminStub
) -> None:
    """WatchOrder and WatchCustomerOrders streams open across a zero-downtime rebuild of the order
    views: once the pointer names generation 1, each sends its orders again at the same versions."""
    one = await create(system, "gen", "gen-one")
    await add_item(system, "gen-one")
    token = (await create(system, "gen", "gen-two")).consistency_token
    order_call = system.queries.WatchOrder(
        qry.WatchOrderRequest(order_id=one.order_id, consistency_token=token), timeout=STREAM_DEADLINE
    )
    customer_call = system.queries.WatchCustomerOrders(
        qry.WatchCustomerOrdersRequest(customer_id="gen", consistency_token=token), timeout=STREAM_DEADLINE
    )
    try:
        order_first = await read(order_call)
        snapshot = await read(customer_call)
        await admin.RebuildProjection(admin_pb2.RebuildProjectionRequest(name="orders"))
        await eventually(lambda: _pointer_is(system, "1"), timeout=30)
        order_again = await read(order_call)
        customer_again: dict[str, int] = {}
        while len(customer_again) < 2:  # one message per order, or fewer carrying several
            customer_again.update(versions((await read(customer_call)).orders))
    finally:
        order_call.cancel()
        customer_call.cancel()

    assert order_first.order.version == 2
    assert versions(snapshot.orders) == {"gen-one": 2, "gen-two": 1}
    assert (order_again.order.version, order_again.consistency.stale) == (2, False)
    assert order_again.order == order_first.order
    assert customer_again == {"gen-one": 2, "gen-two": 1}


async def test_a_parked_order_stays_flagged_stale_in_the_watches_resend_after_a_switch(
    system: System, poison: Poison, admin: admin_pb2_grpc.ProjectionAdminStub
) -> None:
    """The new generation parks the same poison event again, so the watches' resend of a parked
    order after the switch is stale, that of a healthy order is not."""
    # One event per batch: the rebuild then parks the poison event alone, as the live generation did.
    # (Parking holds every event of the order in the failing batch, even those before the poison one.)
    await system.stop_worker()
    system.start_worker(batch_size=1, poison_policy="park", projections=("orders",))
    poison.add(("stuck", 2))
    await create(system, "sam", "stuck")
    await add_item(system, "stuck")  # parked
    token = (await create(system, "sam", "healthy")).consistency_token
    await eventually(lambda: _parked_is(admin, ["stuck"]))
    order_call = system.queries.WatchOrder(
        qry.WatchOrderRequest(order_id="stuck", consistency_token=token), timeout=STREAM_DEADLINE
    )
    customer_call = system.queries.WatchCustomerOrders(
        qry.WatchCustomerOrdersRequest(customer_id="sam", consistency_token=token), timeout=STREAM_DEADLINE
    )
    try:
        order_first = await read(order_call)
        await read(customer_call)
        await admin.RebuildProjection(admin_pb2.RebuildProjectionRequest(name="orders"))
        await eventually(lambda: _pointer_is(system, "1"), timeout=30)
        order_again = await read(order_call)
        customer_again: dict[str, tuple[int, bool]] = {}
        while len(customer_again) < 2:
            message = await read(customer_call)
            customer_again.update((o.order_id, (o.version, message.consistency.stale)) for o in message.orders)
    finally:
        order_call.cancel()
        customer_call.cancel()

    assert (order_first.order.version, order_first.consistency.stale) == (1, True)
    assert (order_again.order.version, order_again.consistency.stale) == (1, True)
    assert customer_again == {"stuck": (1, True), "healthy": (1, False)}
