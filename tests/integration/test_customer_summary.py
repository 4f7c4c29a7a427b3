"""The customer summary projection and GetCustomerSummary, including a projection added to a
running system."""

from __future__ import annotations

import grpc
import pytest

from orders.store.views import PROJECTION, SUMMARY_PROJECTION
from orders.v1 import commands_pb2 as cmd
from orders.v1 import queries_pb2 as qry
from orders.v1 import types_pb2
from tests.helpers import add_item_request, an_address, money
from tests.integration.conftest import System


async def order(
    system: System, customer: str, *, items: list[int], end: str, currency: str = "EUR"
) -> cmd.CommandResult:
    """Creates an order with one line per price in `items` and walks it to `end`."""
    created = await system.commands.CreateOrder(
        cmd.CreateOrderRequest(customer_id=customer, currency_code=currency, shipping_address=an_address())
    )
    order_id = created.result.order_id
    result: cmd.CommandResult = created.result
    for i, price in enumerate(items):
        request = add_item_request(order_id, f"S{i}", price=price)
        request.unit_price.CopyFrom(money(price, currency))
        result = (await system.commands.AddItem(request)).result
    steps = {
        "CONFIRMED": ["ConfirmOrder"],
        "SHIPPED": ["ConfirmOrder", "ShipOrder"],
        "CANCELLED": ["ConfirmOrder", "CancelOrder"],
        "PENDING": [],
    }[end]
    for step in steps:
        request_type = getattr(cmd, f"{step}Request")
        reply = await getattr(system.commands, step)(request_type(order_id=order_id))
        result = reply.result
    return result


async def test_summary_counts_statuses_and_spend_per_currency(system: System) -> None:
    """Orders by status, spend of confirmed and shipped orders per currency, first and last order time."""
    await order(system, "sue", items=[1000, 250], end="SHIPPED")
    await order(system, "sue", items=[500], end="CANCELLED")
    await order(system, "sue", items=[700], end="PENDING")
    last = await order(system, "sue", items=[300], end="CONFIRMED", currency="USD")
    await order(system, "other", items=[1], end="SHIPPED")

    reply = await system.queries.GetCustomerSummary(
        qry.GetCustomerSummaryRequest(customer_id="sue", consistency_token=last.consistency_token)
    )

    summary = reply.summary
    assert reply.consistency.stale is False
    assert summary.order_count == 4
    assert {(c.status, c.count) for c in summary.orders_by_status} == {
        (types_pb2.ORDER_STATUS_SHIPPED, 1),
        (types_pb2.ORDER_STATUS_CANCELLED, 1),
        (types_pb2.ORDER_STATUS_PENDING, 1),
        (types_pb2.ORDER_STATUS_CONFIRMED, 1),
    }
    assert [(m.currency_code, m.minor_units) for m in summary.lifetime_spend] == [("EUR", 1250), ("USD", 300)]
    assert summary.first_order_at.ToMicroseconds() < summary.last_order_at.ToMicroseconds()


async def test_unknown_customer_is_not_found(system: System) -> None:
    """A customer without orders has no summary: NOT_FOUND."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await system.queries.GetCustomerSummary(qry.GetCustomerSummaryRequest(customer_id="nobody"))

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_projection_added_to_a_running_system_catches_up_from_the_start(system: System) -> None:
    """With only the order views running, a summary projection started later replays the log from
    position 0 by itself, while the order views stay live."""
    await system.stop_worker()
    await forget_projection(system, SUMMARY_PROJECTION)  # as if it had never existed
    system.start_worker(projections=(PROJECTION,))
    results = [await order(system, "late", items=[100], end="SHIPPED") for _ in range(5)]
    live = await system.queries.GetOrder(
        qry.GetOrderRequest(order_id=results[-1].order_id, consistency_token=results[-1].consistency_token)
    )
    assert not await system.redis.exists(system.keys.of(SUMMARY_PROJECTION).checkpoint)
    await system.stop_worker()

    system.start_worker(projections=(PROJECTION, SUMMARY_PROJECTION))
    summary = await system.queries.GetCustomerSummary(
        qry.GetCustomerSummaryRequest(customer_id="late", consistency_token=results[-1].consistency_token)
    )
    more = await order(system, "late", items=[50], end="CONFIRMED")
    again = await system.queries.GetOrder(
        qry.GetOrderRequest(order_id=more.order_id, consistency_token=more.consistency_token)
    )

    assert live.order.status == types_pb2.ORDER_STATUS_SHIPPED
    assert summary.summary.order_count == 5
    assert [(m.currency_code, m.minor_units) for m in summary.summary.lifetime_spend] == [("EUR", 500)]
    assert again.consistency.stale is False


async def forget_projection(system: System, name: str) -> None:
    keys = system.keys.of(name)
    await system.redis.delete(keys.checkpoint, keys.lease, keys.heartbeat, keys.applied, keys.rebuild_target)
    async for key in system.redis.scan_iter(match=f"{system.keys.prefix}summary:*"):
        await system.redis.delete(key)
