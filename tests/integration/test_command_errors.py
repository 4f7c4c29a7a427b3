"""Every refusal of the write API: the right status code, rich details, and no change at all."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest

from orders.v1 import commands_pb2 as cmd
from tests.helpers import (
    add_item_request,
    an_address,
    create_request,
    error_reason,
    money,
    rich_details,
    violated_fields,
)
from tests.integration.conftest import System


async def event_count(system: System) -> int:
    return int(await system.pool.fetchval("SELECT count(*) FROM events"))


async def refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def new_order(system: System, items: int = 0) -> str:
    order_id: str = (await system.commands.CreateOrder(create_request())).result.order_id
    for i in range(items):
        await system.commands.AddItem(add_item_request(order_id, sku=f"SKU-{i}"))
    return order_id


async def test_invalid_input_lists_every_bad_field_and_appends_nothing(system: System) -> None:
    """INVALID_ARGUMENT carries a google.rpc.BadRequest naming each malformed field."""
    order_id = await new_order(system)
    before = await event_count(system)

    error = await refused(system.commands.AddItem(cmd.AddItemRequest(order_id=order_id, sku="", name="x", quantity=0)))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"sku", "quantity", "unit_price.currency_code"} == violated_fields(error)
    assert before == await event_count(system)


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (create_request(customer_id=""), {"customer_id"}),
        (create_request(customer_id="has space"), {"customer_id"}),
        (create_request(order_id="x" * 65), {"order_id"}),
        (cmd.CreateOrderRequest(customer_id="c", currency_code="euro"), {"currency_code"}),
        (create_request(shipping_address=an_address(city="")), {"shipping_address.city"}),
        (create_request(command_id="c" * 129), {"command_id"}),
        (create_request(expected_version=-1), {"expected_version"}),
    ],
)
async def test_create_order_validation(system: System, request_: cmd.CreateOrderRequest, fields: set[str]) -> None:
    """Each malformed CreateOrder field is reported by its proto path, and nothing is stored."""
    error = await refused(system.commands.CreateOrder(request_))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == violated_fields(error)
    assert await event_count(system) == 0


async def test_unknown_order_is_not_found(system: System) -> None:
    """A command on an order that does not exist fails with NOT_FOUND."""
    error = await refused(system.commands.ConfirmOrder(cmd.ConfirmOrderRequest(order_id="no-such-order")))

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(error) == "ORDER_NOT_FOUND"


async def test_taken_order_id_already_exists(system: System) -> None:
    """CreateOrder with an order id in use fails with ALREADY_EXISTS."""
    await system.commands.CreateOrder(create_request(order_id="dup"))

    error = await refused(system.commands.CreateOrder(create_request(order_id="dup")))

    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await event_count(system) == 1


@pytest.mark.parametrize(
    ("setup", "command", "reason"),
    [
        ("empty", "confirm", "ORDER_EMPTY"),
        ("pending", "ship", "ORDER_NOT_CONFIRMED"),
        ("confirmed", "add", "ORDER_NOT_PENDING"),
        ("confirmed", "remove", "ORDER_NOT_PENDING"),
        ("confirmed", "ship", "NO_SHIPPING_ADDRESS"),
        ("cancelled", "cancel", "ORDER_CLOSED"),
        ("cancelled", "address", "ORDER_CLOSED"),
        ("pending", "remove_unknown", "ITEM_NOT_IN_ORDER"),
        ("pending", "add_usd", "CURRENCY_MISMATCH"),
        ("pending", "add_other_price", "PRICE_MISMATCH"),
    ],
)
async def test_broken_rules_fail_precondition(system: System, setup: str, command: str, reason: str) -> None:
    """A command that breaks a business rule gets FAILED_PRECONDITION with the rule's reason."""
    order_id = await new_order(system, items=0 if setup == "empty" else 1)
    if setup in {"confirmed", "cancelled"}:
        await system.commands.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=order_id))
    if setup == "cancelled":
        await system.commands.CancelOrder(cmd.CancelOrderRequest(order_id=order_id))
    calls = {
        "confirm": lambda: system.commands.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=order_id)),
        "ship": lambda: system.commands.ShipOrder(cmd.ShipOrderRequest(order_id=order_id)),
        "add": lambda: system.commands.AddItem(add_item_request(order_id, "NEW")),
        "remove": lambda: system.commands.RemoveItem(cmd.RemoveItemRequest(order_id=order_id, sku="SKU-0")),
        "remove_unknown": lambda: system.commands.RemoveItem(cmd.RemoveItemRequest(order_id=order_id, sku="NOPE")),
        "cancel": lambda: system.commands.CancelOrder(cmd.CancelOrderRequest(order_id=order_id)),
        "address": lambda: system.commands.ChangeShippingAddress(
            cmd.ChangeShippingAddressRequest(order_id=order_id, shipping_address=an_address())
        ),
        "add_usd": lambda: system.commands.AddItem(
            cmd.AddItemRequest(order_id=order_id, sku="U", name="u", quantity=1, unit_price=money(1, "USD"))
        ),
        "add_other_price": lambda: system.commands.AddItem(add_item_request(order_id, "SKU-0", price=999)),
    }
    before = await event_count(system)

    error = await refused(calls[command]())

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason == error_reason(error)
    assert before == await event_count(system)


async def test_expected_version_conflict_is_aborted(system: System) -> None:
    """A command whose expected_version is not the order's version fails with ABORTED and RetryInfo."""
    order_id = await new_order(system)

    error = await refused(
        system.commands.AddItem(
            cmd.AddItemRequest(
                order_id=order_id,
                sku="A",
                name="a",
                quantity=1,
                unit_price=money(0),
                expected_version=5,
            )
        )
    )
    ok = await system.commands.AddItem(
        cmd.AddItemRequest(order_id=order_id, sku="A", name="a", quantity=1, unit_price=money(0), expected_version=1)
    )

    assert error.code() == grpc.StatusCode.ABORTED
    assert error_reason(error) == "VERSION_CONFLICT"
    assert "RetryInfo" in rich_details(error)
    assert ok.result.version == 2


async def test_racing_writers_with_expected_version_one_wins(system: System) -> None:
    """Writers racing on the same version: exactly one succeeds, the others get ABORTED."""
    order_id = await new_order(system)

    def add(i: int) -> Awaitable[Any]:
        return system.commands.AddItem(  # type: ignore[no-any-return]
            cmd.AddItemRequest(
                order_id=order_id,
                sku=f"S{i}",
                name="s",
                quantity=1,
                unit_price=money(0),
                expected_version=1,
            )
        )

    outcomes = await asyncio.gather(*(add(i) for i in range(8)), return_exceptions=True)

    winners = [o for o in outcomes if isinstance(o, cmd.AddItemResponse)]
    losers = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(winners) == 1
    assert {grpc.StatusCode.ABORTED} == {e.code() for e in losers}
    assert await event_count(system) == 2


async def test_racing_writers_without_expected_version_all_apply(system: System) -> None:
    """Without an expected version, conflicting writers are retried by the server and all apply."""
    order_id = await new_order(system)

    await asyncio.gather(*(system.commands.AddItem(add_item_request(order_id, f"S{i}")) for i in range(6)))

    versions = await system.pool.fetch("SELECT version FROM events WHERE stream_id = $1 ORDER BY 1", order_id)
    assert list(range(1, 8)) == [r["version"] for r in versions]


async def test_retried_command_returns_first_result_and_appends_nothing(system: System) -> None:
    """The same command id sent again gets the first result; the event is stored once."""
    order_id = await new_order(system)
    request = add_item_request(order_id, "ONCE")
    request.command_id = "retry-1"

    first = await system.commands.AddItem(request)
    again = await system.commands.AddItem(request)

    assert first.result == again.result
    assert await event_count(system) == 2


async def test_retried_create_gets_the_same_generated_order(system: System) -> None:
    """A retried CreateOrder without an order id returns the order the first attempt created."""
    request = create_request(command_id="create-once")

    first, again = [(await system.commands.CreateOrder(request)).result for _ in range(2)]

    assert first == again
    assert await event_count(system) == 1


async def test_concurrent_duplicates_append_once(system: System) -> None:
    """The same command id sent concurrently appends once and every caller gets the same result."""
    order_id = await new_order(system)
    request = add_item_request(order_id, "DUP")
    request.command_id = "concurrent-1"

    replies = await asyncio.gather(*(system.commands.AddItem(request) for _ in range(5)))

    assert len({r.result.SerializeToString() for r in replies}) == 1
    assert await event_count(system) == 2


async def test_reused_command_id_with_other_payload_is_refused(system: System) -> None:
    """A command id reused for a different request is an error, never a silent duplicate."""
    order_id = await new_order(system)
    first = add_item_request(order_id, "A")
    first.command_id = "reuse-1"
    await system.commands.AddItem(first)
    other = add_item_request(order_id, "B")
    other.command_id = "reuse-1"

    error = await refused(system.commands.AddItem(other))

    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(error) == "COMMAND_ID_REUSED"
    assert await event_count(system) == 2


async def test_an_order_with_an_unreadable_stored_event_answers_internal_with_details(system: System) -> None:
    """A command on an order whose stored event this version cannot decode gets INTERNAL with
    ErrorInfo (not gRPC's bare UNKNOWN), appends nothing, and the server goes on serving."""
    order_id = await new_order(system)
    await system.pool.execute(
        "INSERT INTO events (stream_id, version, event_type, schema_version, payload)"
        " VALUES ($1, 2, 'ItemAdded', 1, '{\"sku\": \"A\"}'::jsonb)",
        order_id,
    )
    before = await event_count(system)

    error = await refused(system.commands.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=order_id)))
    other = await new_order(system)

    assert (error.code(), error_reason(error)) == (grpc.StatusCode.INTERNAL, "INTERNAL")
    assert "the server logged the details" in (error.details() or "")
    assert await event_count(system) == before + 1  # only the other order's creation
    assert other
