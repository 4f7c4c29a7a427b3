"""Rows stored in an older schema version load, project and query correctly, and stay as stored.

Each test INSERTs rows shaped as schema version 1 straight into the events table (as the code of
that time wrote them), then drives the orders through gRPC: the write side rehydrates them, the
sync worker projects them, and OrderQueries shows the structured address."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orders.domain.upcasting import UNKNOWN, UNKNOWN_COUNTRY
from orders.store.event_store import NOTIFY_CHANNEL
from orders.v1 import commands_pb2 as cmd
from orders.v1 import queries_pb2 as qry
from orders.v1 import types_pb2
from tests.helpers import an_address, assert_views_match_events
from tests.integration.conftest import System

V1 = 1
V2 = 2
ITEM = {"sku": "SKU-1", "name": "Widget", "quantity": 2, "unit_price_minor": 250}
STRUCTURED = {
    "recipient": "Alan Turing",
    "line1": "Bletchley Park",
    "city": "Milton Keynes",
    "postal_code": "MK3 6EB",
    "country_code": "GB",
    "line2": "Hut 8",
    "region": "",
}


@dataclass(frozen=True)
class Row:
    stream_id: str
    version: int
    event_type: str
    schema_version: int
    payload: dict[str, Any]


def created(order_id: str, address: object) -> Row:
    payload = {"customer_id": "legacy", "currency_code": "EUR", "shipping_address": address}
    return Row(order_id, 1, "OrderCreated", V1, payload)


async def insert(system: System, rows: list[Row]) -> None:
    """Stores `rows` as they are, in one transaction, and wakes the sync worker."""
    async with system.pool.acquire() as conn, conn.transaction():
        for row in rows:
            await conn.execute(
                "INSERT INTO events (stream_id, version, event_type, schema_version, payload)"
                " VALUES ($1, $2, $3, $4, $5::jsonb)",
                row.stream_id,
                row.version,
                row.event_type,
                row.schema_version,
                row.payload,
            )
        await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)


async def stored(system: System, *order_ids: str) -> list[Row]:
    """The orders' rows as PostgreSQL holds them now, order by order."""
    records = await system.pool.fetch(
        "SELECT stream_id, version, event_type, schema_version, payload FROM events"
        " WHERE stream_id = ANY($1::text[]) ORDER BY array_position($1::text[], stream_id), version",
        list(order_ids),
    )
    return [Row(**dict(record)) for record in records]


async def stored_as_inserted(system: System, rows: list[Row]) -> list[Row]:
    """The rows now stored at the places (order and version) of `rows`."""
    inserted = {(row.stream_id, row.version) for row in rows}
    order_ids = dict.fromkeys(row.stream_id for row in rows)
    return [row for row in await stored(system, *order_ids) if (row.stream_id, row.version) in inserted]


async def ship(system: System, order_id: str) -> cmd.CommandResult:
    reply = await system.commands.ShipOrder(
        cmd.ShipOrderRequest(order_id=order_id, carrier="DHL", tracking_number="T1")
    )
    result: cmd.CommandResult = reply.result
    return result


async def get_order(system: System, order_id: str, token: str) -> types_pb2.Order:
    reply = await system.queries.GetOrder(qry.GetOrderRequest(order_id=order_id, consistency_token=token))
    assert False is reply.consistency.stale
    order: types_pb2.Order = reply.order
    return order


def fields(address: types_pb2.ShippingAddress) -> dict[str, str]:
    return {name: getattr(address, name) for name in STRUCTURED}


async def test_version_1_free_text_addresses_load_project_and_query(system: System) -> None:
    """An order created with a free-text address, and one whose free-text address came from a
    version-1 ShippingAddressChanged, are shipped (the write side needs the address) and queried
    with structured addresses; the version-1 rows are unchanged."""
    rows = [
        created("legacy-created", "Ada Lovelace, Main St 1, 10115 Berlin, DE"),
        Row("legacy-created", 2, "ItemAdded", V1, ITEM),
        created("legacy-changed", None),
        Row("legacy-changed", 2, "ItemAdded", V1, ITEM),
        Row(
            "legacy-changed",
            3,
            "ShippingAddressChanged",
            V1,
            {"shipping_address": "Grace Hopper\nRue de Rivoli 1\nBâtiment B\n75001 Paris\nfr"},
        ),
        Row("legacy-changed", 4, "OrderConfirmed", V1, {}),
    ]
    await insert(system, rows)

    await system.commands.ConfirmOrder(cmd.ConfirmOrderRequest(order_id="legacy-created"))
    shipped_created = await ship(system, "legacy-created")
    shipped_changed = await ship(system, "legacy-changed")

    first = await get_order(system, "legacy-created", shipped_created.consistency_token)
    second = await get_order(system, "legacy-changed", shipped_changed.consistency_token)
    expected_first = {
        "recipient": "Ada Lovelace",
        "line1": "Main St 1",
        "city": "Berlin",
        "postal_code": "10115",
        "country_code": "DE",
        "line2": "",
        "region": "",
    }
    expected_second = {
        "recipient": "Grace Hopper",
        "line1": "Rue de Rivoli 1",
        "city": "Paris",
        "postal_code": "75001",
        "country_code": "FR",
        "line2": "Bâtiment B",
        "region": "",
    }
    assert (types_pb2.ORDER_STATUS_SHIPPED, 4, expected_first) == (
        first.status,
        first.version,
        fields(first.shipping_address),
    )
    assert (types_pb2.ORDER_STATUS_SHIPPED, 5, expected_second) == (
        second.status,
        second.version,
        fields(second.shipping_address),
    )
    expected_items = ([("SKU-1", 2)], 500)
    assert expected_items == ([(i.sku, i.quantity) for i in second.items], second.total.minor_units)
    written = [(row.event_type, row.schema_version) for row in await stored(system, "legacy-created", "legacy-changed")]
    expected_written = [
        ("OrderCreated", 1),
        ("ItemAdded", 1),
        ("OrderConfirmed", 1),
        ("OrderShipped", 1),
        ("OrderCreated", 1),
        ("ItemAdded", 1),
        ("ShippingAddressChanged", 1),
        ("OrderConfirmed", 1),
        ("OrderShipped", 1),
    ]
    assert expected_written == written
    assert rows == await stored_as_inserted(system, rows)
    await assert_views_match_events(system.database_url, system.redis, system.keys)


async def test_version_1_rows_that_already_hold_an_object_and_new_version_2_rows_mix(system: System) -> None:
    """Rows written before version 2 existed carry version 1 with an address object: it is read as it
    is. A ChangeShippingAddress on that order writes version 2, and both versions read together."""
    rows = [created("legacy-object", STRUCTURED), Row("legacy-object", 2, "ItemAdded", V1, ITEM)]
    await insert(system, rows)

    confirmed = (await system.commands.ConfirmOrder(cmd.ConfirmOrderRequest(order_id="legacy-object"))).result
    before = await get_order(system, "legacy-object", confirmed.consistency_token)
    await system.commands.ChangeShippingAddress(
        cmd.ChangeShippingAddressRequest(order_id="legacy-object", shipping_address=an_address("Paris"))
    )
    shipped = await ship(system, "legacy-object")
    after = await get_order(system, "legacy-object", shipped.consistency_token)

    changed = (await stored(system, "legacy-object"))[3]
    expected = (STRUCTURED, "Paris", types_pb2.ORDER_STATUS_SHIPPED, "ShippingAddressChanged", V2, "Paris")
    assert expected == (
        fields(before.shipping_address),
        after.shipping_address.city,
        after.status,
        changed.event_type,
        changed.schema_version,
        changed.payload["shipping_address"]["city"],
    )
    assert rows == await stored_as_inserted(system, rows)
    await assert_views_match_events(system.database_url, system.redis, system.keys)


async def test_a_version_1_line_that_does_not_parse_keeps_its_text_in_line1(system: System) -> None:
    """An unparsable free-text address still ships and queries: its text in line1, placeholders
    (which the read side shows as they are) in the other required fields."""
    rows = [
        created("legacy-vague", "behind the old station, Springfield"),
        Row("legacy-vague", 2, "ItemAdded", V1, ITEM),
        Row("legacy-vague", 3, "OrderConfirmed", V1, {}),
    ]
    await insert(system, rows)

    shipped = await ship(system, "legacy-vague")
    order = await get_order(system, "legacy-vague", shipped.consistency_token)

    expected = {
        "recipient": UNKNOWN,
        "line1": "behind the old station, Springfield",
        "city": UNKNOWN,
        "postal_code": UNKNOWN,
        "country_code": UNKNOWN_COUNTRY,
        "line2": "",
        "region": "",
    }
    assert (types_pb2.ORDER_STATUS_SHIPPED, expected) == (order.status, fields(order.shipping_address))
    assert rows == await stored_as_inserted(system, rows)
