"""The whole path through real gRPC channels: command -> event -> view -> query."""

from __future__ import annotations

from orders.v1 import commands_pb2 as cmd
from orders.v1 import queries_pb2 as qry
from orders.v1 import types_pb2
from tests.helpers import add_item_request, an_address, assert_views_match_events, create_request
from tests.integration.conftest import System


async def test_an_order_goes_through_its_whole_life(system: System) -> None:
    """Every command's effect is visible through OrderQueries when its token is passed."""
    created = (await system.commands.CreateOrder(create_request("alice"))).result
    order_id = created.order_id
    await system.commands.AddItem(add_item_request(order_id, "APPLE", quantity=2, price=150))
    await system.commands.AddItem(add_item_request(order_id, "PEAR", quantity=1, price=99))
    await system.commands.AddItem(add_item_request(order_id, "APPLE", quantity=3, price=150))
    await system.commands.RemoveItem(cmd.RemoveItemRequest(order_id=order_id, sku="PEAR"))
    await system.commands.ChangeShippingAddress(
        cmd.ChangeShippingAddressRequest(order_id=order_id, shipping_address=an_address("Paris"))
    )
    await system.commands.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=order_id))
    shipped = (
        await system.commands.ShipOrder(cmd.ShipOrderRequest(order_id=order_id, carrier="DHL", tracking_number="T1"))
    ).result

    reply = await system.queries.GetOrder(
        qry.GetOrderRequest(order_id=order_id, consistency_token=shipped.consistency_token)
    )

    order = reply.order
    assert False is reply.consistency.stale
    assert (order_id, "alice", types_pb2.ORDER_STATUS_SHIPPED) == (order.order_id, order.customer_id, order.status)
    assert [(i.sku, i.quantity, i.unit_price.minor_units, i.line_total.minor_units) for i in order.items] == [
        ("APPLE", 5, 150, 750)
    ]
    assert (order.total.currency_code, order.total.minor_units) == ("EUR", 750)
    assert order.shipping_address.city == "Paris"
    assert (order.carrier, order.tracking_number) == ("DHL", "T1")
    assert 8 == order.version == shipped.version
    assert order.created_at.ToMicroseconds() <= order.updated_at.ToMicroseconds()
    await assert_views_match_events(system.database_url, system.redis, system.keys)


async def test_cancelled_order_keeps_its_reason(system: System) -> None:
    """CancelOrder moves a confirmed order to CANCELLED and the view shows why."""
    order_id = (await system.commands.CreateOrder(create_request())).result.order_id
    await system.commands.AddItem(add_item_request(order_id))
    await system.commands.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=order_id))
    token = (
        await system.commands.CancelOrder(cmd.CancelOrderRequest(order_id=order_id, reason="changed my mind"))
    ).result.consistency_token

    order = (await system.queries.GetOrder(qry.GetOrderRequest(order_id=order_id, consistency_token=token))).order

    assert (order.status, order.cancellation_reason) == (types_pb2.ORDER_STATUS_CANCELLED, "changed my mind")


async def test_client_chosen_order_id_is_kept(system: System) -> None:
    """CreateOrder uses the order id the client gives, and generates one otherwise."""
    chosen = (await system.commands.CreateOrder(create_request(order_id="my-order-1"))).result
    generated = (await system.commands.CreateOrder(create_request())).result

    assert chosen.order_id == "my-order-1"
    assert generated.order_id
    assert generated.order_id != chosen.order_id
    assert (chosen.version, generated.version) == (1, 1)


async def test_command_results_name_the_event_they_appended(system: System) -> None:
    """Each result's position is its last event's global position, and tokens grow in read order."""
    first = (await system.commands.CreateOrder(create_request())).result
    second = (await system.commands.AddItem(add_item_request(first.order_id))).result

    rows = await system.pool.fetch("SELECT position, version FROM events WHERE stream_id = $1", first.order_id)

    assert {(first.position, 1), (second.position, 2)} == {(r["position"], r["version"]) for r in rows}
    assert first.consistency_token != second.consistency_token


async def test_events_carry_command_metadata(system: System) -> None:
    """An event records the command, its command id and the caller's correlation id."""
    result = (
        await system.commands.CreateOrder(
            create_request(command_id="cmd-meta-1"), metadata=(("x-correlation-id", "corr-42"),)
        )
    ).result

    row = await system.pool.fetchrow("SELECT event_type, schema_version, metadata, recorded_at FROM events")

    assert row is not None
    assert (row["event_type"], row["schema_version"]) == ("OrderCreated", 2)
    assert row["metadata"] == {"command": "CreateOrder", "command_id": "cmd-meta-1", "correlation_id": "corr-42"}
    assert result.order_id
