"""The `park` poison policy at batch and generation boundaries: an order's events before its poison
event in the same batch are applied (its view stays at its last good state, not absent), and after
a zero-downtime rebuild's switch the admin API lists and retries the new live generation's parked
orders. Real worker, PostgreSQL, Redis and gRPC; the poison events come from the order projection
of tests/integration/test_watch_and_parked.py, which raises on chosen (order, version) pairs."""

# ruff: noqa: F811 - the tests take the `admin` and `poison` fixtures imported below as parameters

from __future__ import annotations

from orders.store.views import ViewKeys
from orders.v1 import admin_pb2, admin_pb2_grpc
from orders.v1 import queries_pb2 as qry
from tests.helpers import eventually
from tests.integration.conftest import System
from tests.integration.test_watch_and_parked import (  # noqa: F401 - fixtures: `admin`, `poison`
    Poison,
    _parked_is,
    _pointer_is,
    add_item,
    admin,
    create,
    list_orders,
    parked_orders,
    poison,
    release,
)


async def get_order(system: System, order_id: str, token: str) -> qry.GetOrderResponse:
    request = qry.GetOrderRequest(order_id=order_id, consistency_token=token)
    reply: qry.GetOrderResponse = await system.queries.GetOrder(request, timeout=5)
    return reply


async def parked_positions(admin: admin_pb2_grpc.ProjectionAdminStub) -> dict[str, list[int]]:
    reply = await admin.ListParkedOrders(admin_pb2.ListParkedOrdersRequest(name="orders"))
    return {order.order_id: list(order.positions) for order in reply.orders}


async def test_parking_keeps_the_events_before_the_poison_one_when_they_share_its_batch(
    system: System, poison: Poison, admin: admin_pb2_grpc.ProjectionAdminStub
) -> None:
    """An order's create and its poisoned second event read in one batch (a backlog the worker
    catches up on): only the second event is parked, so the order reads as version 1, stale, and is
    listed; `applied` counts the one applied event, and both once the retry releases the second."""
    await system.stop_worker()
    poison.add(("stuck", 2))
    await create(system, "sam", "stuck")
    added = await add_item(system, "stuck")
    system.start_worker(poison_policy="park", projections=("orders",))
    await eventually(lambda: _parked_is(admin, ["stuck"]))

    parked = await parked_positions(admin)
    applied_while_parked = await system.redis.get(system.keys.applied)
    stale = await get_order(system, "stuck", added.consistency_token)
    listed = await list_orders(system, "sam", added.consistency_token)
    await release(admin, poison, "stuck")
    released = await get_order(system, "stuck", added.consistency_token)

    assert parked == {"stuck": [added.position]}
    assert applied_while_parked == "1"
    assert (stale.order.version, stale.consistency.stale) == (1, True)
    assert [(order.order_id, order.version) for order in listed.orders] == [("stuck", 1)]
    assert (released.order.version, released.consistency.stale) == (2, False)
    assert await system.redis.get(system.keys.applied) == "2"


async def test_parked_orders_can_be_listed_and_retried_after_a_generation_switch(
    system: System, poison: Poison, admin: admin_pb2_grpc.ProjectionAdminStub
) -> None:
    """A zero-downtime rebuild parks the order again in generation 1; once generation 0 is retired,
    ListParkedOrders shows it from generation 1 and RetryParkedOrder releases it there."""
    poison.add(("stuck", 2))
    await create(system, "sam", "stuck")
    added = await add_item(system, "stuck")
    await eventually(lambda: _parked_is(admin, ["stuck"]))
    await admin.RebuildProjection(admin_pb2.RebuildProjectionRequest(name="orders"))
    await eventually(lambda: _pointer_is(system, "1"), timeout=30)

    async def retired() -> None:
        assert not await system.redis.exists(ViewKeys(system.keys.prefix, "orders").retired)

    await eventually(retired, timeout=20)
    listed = await parked_positions(admin)
    await release(admin, poison, "stuck")
    released = await get_order(system, "stuck", added.consistency_token)

    assert listed == {"stuck": [added.position]}
    assert await parked_orders(admin) == []
    assert (released.order.version, released.consistency.stale) == (2, False)
