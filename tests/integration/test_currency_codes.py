"""Currency codes through real gRPC: ISO 4217's codes are accepted, any other is INVALID_ARGUMENT
naming the field, and a refused command changes nothing (docs/errors.md#currencies)."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
import pytest

from orders.v1 import commands_pb2 as cmd
from orders.v1 import queries_pb2 as qry
from tests.helpers import error_reason, money, violated_fields
from tests.integration.conftest import System


async def event_count(system: System) -> int:
    return int(await system.pool.fetchval("SELECT count(*) FROM events"))


async def refusal(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


@pytest.mark.parametrize("code", ["ZZZ", "XXX", "XTS"])
async def test_create_order_in_a_code_that_is_no_currency_is_refused(system: System, code: str) -> None:
    """CreateOrder in 'ZZZ' (not assigned), 'XXX' (no currency) or 'XTS' (testing): INVALID_ARGUMENT
    with a violation of currency_code, and no event is stored."""
    request = cmd.CreateOrderRequest(order_id="order-1", customer_id="ada", currency_code=code)

    error = await refusal(system.commands.CreateOrder(request, timeout=5))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "INVALID_ARGUMENT"
    assert violated_fields(error) == {"currency_code"}
    assert await event_count(system) == 0


async def test_add_item_priced_in_an_unknown_code_is_refused_and_changes_nothing(system: System) -> None:
    """AddItem with a unit price in 'ZZZ' names unit_price.currency_code; the order keeps its one event."""
    created = await system.commands.CreateOrder(
        cmd.CreateOrderRequest(order_id="order-1", customer_id="ada", currency_code="EUR"), timeout=5
    )
    request = cmd.AddItemRequest(order_id="order-1", sku="SKU-1", name="Widget", quantity=1, unit_price=money(5, "ZZZ"))

    error = await refusal(system.commands.AddItem(request, timeout=5))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(error) == {"unit_price.currency_code"}
    assert await event_count(system) == 1
    order = await system.queries.GetOrder(
        qry.GetOrderRequest(order_id="order-1", consistency_token=created.result.consistency_token), timeout=5
    )
    assert order.order.version == 1
    assert list(order.order.items) == []


@pytest.mark.parametrize(("code", "price"), [("EUR", 1999), ("JPY", 300), ("KWD", 1250), ("XOF", 500)])
async def test_orders_in_iso_4217_currencies_are_accepted(system: System, code: str, price: int) -> None:
    """An order in EUR, JPY, KWD or XOF is created, takes a line priced in its currency, and reads back in it."""
    await system.commands.CreateOrder(
        cmd.CreateOrderRequest(order_id="order-1", customer_id="ada", currency_code=code), timeout=5
    )
    added = await system.commands.AddItem(
        cmd.AddItemRequest(order_id="order-1", sku="SKU-1", name="Widget", quantity=2, unit_price=money(price, code)),
        timeout=5,
    )

    order = await system.queries.GetOrder(
        qry.GetOrderRequest(order_id="order-1", consistency_token=added.result.consistency_token), timeout=5
    )
    assert order.order.total == money(2 * price, code)
