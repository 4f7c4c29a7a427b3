"""Bad input and the explicit limits, through real gRPC channels on real PostgreSQL and Redis.

Every refusal gets the right status code and a message (and, for INVALID_ARGUMENT, a
google.rpc.BadRequest field path) that says what was wrong; nothing is written; and the server
still answers a valid request afterwards. The limits themselves are listed in docs/errors.md
("Limits"): message size, concurrent RPCs, deadlines, field bounds and the Unicode rule.
"""

from __future__ import annotations

import asyncio
import base64
import time
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from orders.server.grpc_server import MAX_MESSAGE_BYTES
from orders.v1 import commands_pb2 as cmd
from orders.v1 import commands_pb2_grpc, types_pb2
from orders.v1 import queries_pb2 as qry
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
from write_service.main import start_write_service

COMMANDS = cmd.DESCRIPTOR.services_by_name["OrderCommands"]
QUERIES = qry.DESCRIPTOR.services_by_name["OrderQueries"]
INVALID = grpc.StatusCode.INVALID_ARGUMENT

# ------------------------------------------------------------------------------------ helpers


async def event_count(system: System) -> int:
    return int(await system.pool.fetchval("SELECT count(*) FROM events"))


async def refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def descriptions(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """BadRequest violations by field; a field with several violations gets them joined."""
    bad_request = rich_details(error)["BadRequest"]
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    found: dict[str, str] = {}
    for violation in bad_request.field_violations:
        found[violation.field] = "; ".join(filter(None, [found.get(violation.field), violation.description]))
    return found


async def still_serves(system: System, customer_id: str = "after-bad-input") -> None:
    """A valid command succeeds and the read side shows it: the servers kept serving."""
    created = (await system.commands.CreateOrder(create_request(customer_id), timeout=5)).result
    reply = await system.queries.GetOrder(
        qry.GetOrderRequest(order_id=created.order_id, consistency_token=created.consistency_token), timeout=5
    )
    assert reply.order.customer_id == customer_id
    assert reply.consistency.stale is False


@dataclass(frozen=True)
class Invalid:
    """An expected INVALID_ARGUMENT: exactly these fields, each description containing `says`."""

    fields: frozenset[str]
    says: str


def invalid(*fields: str, says: str = "") -> Invalid:
    return Invalid(frozenset(fields), says)


# A case: a stub method, the request to send it, and the refusal expected.
Case = tuple[Callable[..., Awaitable[Any]], Message, Invalid]


async def assert_all_invalid(cases: dict[str, Case]) -> None:
    """Sends every case's request; any not refused as INVALID_ARGUMENT with exactly its fields, each
    described with the expected words, is shown with what it got instead."""
    wrong: dict[str, object] = {}
    for name, (method, request, expected) in cases.items():
        try:
            await method(request, timeout=5)
        except grpc.aio.AioRpcError as error:
            if error.code() != INVALID or error_reason(error) != "INVALID_ARGUMENT":
                wrong[name] = f"{error.code().name}: {error.details()}"
                continue
            found = descriptions(error)
            if set(found) != expected.fields or not all(expected.says in d for d in found.values()):
                wrong[name] = found
        else:
            wrong[name] = "accepted"
    assert wrong == {}


@asynccontextmanager
async def channel_to(port: int) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel


def raw_method(channel: grpc.aio.Channel, service: ServiceDescriptor, method: MethodDescriptor) -> Any:
    """A callable that sends bytes as they are, without any protobuf encoding on our side."""
    return channel.unary_unary(f"/{service.full_name}/{method.name}", request_serializer=None)


def invalid_utf8_in_a_string_field(method: MethodDescriptor) -> bytes:
    """The first string field of the method's request, holding the bytes C3 28 (not UTF-8)."""
    number = next(f.number for f in method.input_type.fields if f.type == FieldDescriptor.TYPE_STRING)
    return bytes([number << 3 | 2, 2, 0xC3, 0x28])


async def lock_waiters(system: System) -> list[str]:
    """Queries of the test database's sessions that wait for a lock (with the worker stopped: the
    write server's)."""
    rows = await system.pool.fetch(
        "SELECT query FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return [str(row["query"]) for row in rows]


async def until_lock_waiters(system: System, count: int, timeout: float = 5.0) -> float:
    """Seconds until exactly `count` sessions wait for a lock; fails after `timeout`."""
    started = time.monotonic()
    while len(waiting := await lock_waiters(system)) != count:
        assert time.monotonic() - started < timeout, f"still waiting for a lock after {timeout} s: {waiting}"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@asynccontextmanager
async def events_locked(system: System) -> AsyncIterator[None]:
    """Holds ACCESS EXCLUSIVE on the events table in a transaction of its own, so any command waits
    inside PostgreSQL. The sync worker is stopped first: only the write server's sessions wait."""
    await system.stop_worker()
    async with system.pool.acquire() as conn, conn.transaction():
        await conn.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        yield
    system.start_worker()


# ------------------------------------------------------------- undecodable and oversized


@pytest.mark.parametrize(
    ("service", "port"), [(COMMANDS, "write_port"), (QUERIES, "read_port")], ids=["commands", "queries"]
)
async def test_undecodable_requests_are_invalid_argument(system: System, service: ServiceDescriptor, port: str) -> None:
    """Bytes that are not a protobuf message, or a string field that is not UTF-8, get
    INVALID_ARGUMENT with reason MALFORMED_REQUEST on every method of both services; the description
    names the expected message type and what is wrong with the bytes."""
    payloads = {
        "corrupt wire format": b"\xff\xff\xff",
        "truncated field": b"\x12\x05ab",
        "invalid UTF-8": b"",  # per method, below
    }
    seen: dict[tuple[str, str], tuple[str, str, str]] = {}
    async with channel_to(getattr(system, port)) as channel:
        for method in service.methods:
            call = raw_method(channel, service, method)
            for kind, payload in payloads.items():
                error = await refused(call(payload or invalid_utf8_in_a_string_field(method), timeout=5))
                [(field, description)] = descriptions(error).items()
                seen[method.name, kind] = (error.code().name, error_reason(error), field)
                assert f"not a valid {method.input_type.full_name} message" in description
                if kind == "invalid UTF-8":
                    assert "utf-8" in description.lower()
        if service is COMMANDS:  # the issue's own example: customer_id (field 3) holding C3 28
            error = await refused(
                raw_method(channel, service, COMMANDS.methods_by_name["CreateOrder"])(b"\x1a\x02\xc3\x28")
            )
            assert (error.code(), error_reason(error)) == (INVALID, "MALFORMED_REQUEST")

    assert set(seen.values()) == {("INVALID_ARGUMENT", "MALFORMED_REQUEST", "")}
    assert len(seen) == len(service.methods) * len(payloads)
    assert await event_count(system) == 0
    await still_serves(system)


async def test_messages_over_4_mib_are_resource_exhausted(system: System) -> None:
    """A request over the 4 MiB receive limit gets RESOURCE_EXHAUSTED on both services, saying it is
    larger than the maximum; nothing is written."""
    huge = "x" * (MAX_MESSAGE_BYTES + 1)

    command = await refused(system.commands.CreateOrder(create_request(customer_id=huge), timeout=10))
    query = await refused(system.queries.GetOrder(qry.GetOrderRequest(order_id=huge), timeout=10))

    for error in (command, query):
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (error.details() or "")
        assert str(MAX_MESSAGE_BYTES) in (error.details() or "")
    assert await event_count(system) == 0
    await still_serves(system)


async def test_big_request_under_the_limit_is_refused_with_a_short_answer(system: System) -> None:
    """Megabytes of text in bounded fields just under the limit are decoded, then refused as
    INVALID_ARGUMENT naming each field; the answer quotes at most a few characters of each value,
    so it stays small (gRPC limits the size of status metadata)."""
    size = 1_000_000  # characters; ç takes two bytes: 4 MB in all, just under 4 MiB
    request = cmd.CreateOrderRequest(
        order_id="o" * size, customer_id="ç" * (size // 2), currency_code="E" * size, command_id="c" * size
    )
    assert len(request.SerializeToString()) < MAX_MESSAGE_BYTES

    error = await refused(system.commands.CreateOrder(request, timeout=10))

    assert error.code() == INVALID
    assert violated_fields(error) == {"order_id", "customer_id", "currency_code", "command_id"}
    assert "must be 1-128 characters, got 1000000" in descriptions(error)["command_id"]
    assert "got 'EEEEEEEEEEEEEEEEEEEE'... (1000000 characters)" in descriptions(error)["currency_code"]
    assert len(error.details() or "") < 1000
    assert await event_count(system) == 0
    await still_serves(system)


# -------------------------------------------------------------------------- field limits


async def test_101st_line_is_too_many_items(system: System) -> None:
    """An order holds at most 100 lines: the 101st SKU gets FAILED_PRECONDITION TOO_MANY_ITEMS,
    while more units of a SKU already in the order are still accepted."""
    order_id = (await system.commands.CreateOrder(create_request())).result.order_id
    for i in range(100):
        await system.commands.AddItem(add_item_request(order_id, sku=f"SKU-{i}"))
    before = await event_count(system)

    error = await refused(system.commands.AddItem(add_item_request(order_id, sku="SKU-100")))

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error) == "TOO_MANY_ITEMS"
    assert "at most 100 line items" in (error.details() or "")
    assert await event_count(system) == before
    more = await system.commands.AddItem(add_item_request(order_id, sku="SKU-7"))
    assert more.result.version == before + 1
    await still_serves(system)


async def test_each_bounded_string_one_over_its_limit_is_invalid(system: System) -> None:
    """Every bounded string field, one character over its limit, is refused by its proto path with
    the bounds and the length it got; the same fields at their limits are accepted."""
    order_id = (await system.commands.CreateOrder(create_request(order_id="target"))).result.order_id
    before = await event_count(system)
    c = system.commands

    def address(**fields: str) -> types_pb2.ShippingAddress:
        full = an_address()
        for name, value in fields.items():
            setattr(full, name, value)
        return full

    cases: dict[str, Case] = {
        "order_id 65": (c.CreateOrder, create_request(order_id="o" * 65), invalid("order_id")),
        "customer_id 65": (c.CreateOrder, create_request("c" * 65), invalid("customer_id")),
        "command_id 129": (
            c.CreateOrder,
            create_request(command_id="k" * 129),
            invalid("command_id", says="must be 1-128 characters, got 129"),
        ),
        "sku 65": (
            c.AddItem,
            cmd.AddItemRequest(order_id=order_id, sku="s" * 65, name="n", quantity=1, unit_price=money(1)),
            invalid("sku", says="must be 1-64 characters, got 65"),
        ),
        "name 201": (
            c.AddItem,
            cmd.AddItemRequest(order_id=order_id, sku="A", name="n" * 201, quantity=1, unit_price=money(1)),
            invalid("name", says="must be 1-200 characters, got 201"),
        ),
        "remove sku 65": (
            c.RemoveItem,
            cmd.RemoveItemRequest(order_id=order_id, sku="s" * 65),
            invalid("sku", says="got 65"),
        ),
        "carrier 101": (
            c.ShipOrder,
            cmd.ShipOrderRequest(order_id=order_id, carrier="c" * 101),
            invalid("carrier", says="must be 0-100 characters, got 101"),
        ),
        "tracking_number 101": (
            c.ShipOrder,
            cmd.ShipOrderRequest(order_id=order_id, tracking_number="t" * 101),
            invalid("tracking_number", says="must be 0-100 characters, got 101"),
        ),
        "reason 501": (
            c.CancelOrder,
            cmd.CancelOrderRequest(order_id=order_id, reason="r" * 501),
            invalid("reason", says="must be 0-500 characters, got 501"),
        ),
    }
    limits = {"recipient": 200, "line1": 200, "line2": 200, "city": 100, "region": 100, "postal_code": 20}
    for field, limit in limits.items():
        over = address(**{field: "a" * (limit + 1)})
        expected = invalid(f"shipping_address.{field}", says=f"characters, got {limit + 1}")
        cases[f"create {field} {limit + 1}"] = (c.CreateOrder, create_request(shipping_address=over), expected)
        cases[f"change {field} {limit + 1}"] = (
            c.ChangeShippingAddress,
            cmd.ChangeShippingAddressRequest(order_id=order_id, shipping_address=over),
            expected,
        )

    await assert_all_invalid(cases)

    assert await event_count(system) == before
    at_limits = address(**{field: "a" * limit for field, limit in limits.items()})
    await c.CreateOrder(create_request("c" * 64, order_id="o" * 64, command_id="k" * 128, shipping_address=at_limits))
    await c.AddItem(
        cmd.AddItemRequest(order_id=order_id, sku="s" * 64, name="n" * 200, quantity=1, unit_price=money(1))
    )
    await c.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=order_id))
    await c.ChangeShippingAddress(cmd.ChangeShippingAddressRequest(order_id=order_id, shipping_address=at_limits))
    await c.ShipOrder(cmd.ShipOrderRequest(order_id=order_id, carrier="c" * 100, tracking_number="t" * 100))
    cancellable = (await c.CreateOrder(create_request())).result.order_id
    await c.CancelOrder(cmd.CancelOrderRequest(order_id=cancellable, reason="r" * 500))
    assert await event_count(system) == before + 7
    await still_serves(system)


async def test_malformed_ids_are_invalid_on_every_command(system: System) -> None:
    """Ids are 1-64 ASCII characters of [A-Za-z0-9_-]: anything else (non-ASCII letters and digits,
    punctuation, whitespace, control characters, emoji) is refused on every command, quoting the value."""
    c = system.commands
    bad_ids = ["ordér", "１２３", "a/b", "a.b", "a b", "tab\tbed", "nul\x00", "new\nline", "🛒", "o" * 65]
    says = "must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-', got "
    cases: dict[str, Case] = {}
    for bad in bad_ids:
        cases[f"create order_id {bad!r}"] = (
            c.CreateOrder,
            create_request(order_id=bad),
            invalid("order_id", says=says),
        )
        cases[f"create customer_id {bad!r}"] = (c.CreateOrder, create_request(bad), invalid("customer_id", says=says))
    bad = "bad id"
    cases |= {
        "add": (c.AddItem, add_item_request(bad), invalid("order_id", says=says)),
        "remove": (c.RemoveItem, cmd.RemoveItemRequest(order_id=bad, sku="A"), invalid("order_id", says=says)),
        "address": (
            c.ChangeShippingAddress,
            cmd.ChangeShippingAddressRequest(order_id=bad, shipping_address=an_address()),
            invalid("order_id", says=says),
        ),
        "confirm": (c.ConfirmOrder, cmd.ConfirmOrderRequest(order_id=bad), invalid("order_id", says=says)),
        "ship": (c.ShipOrder, cmd.ShipOrderRequest(order_id=bad), invalid("order_id", says=says)),
        "cancel": (c.CancelOrder, cmd.CancelOrderRequest(order_id=bad), invalid("order_id", says=says)),
    }

    await assert_all_invalid(cases)

    assert await event_count(system) == 0
    await still_serves(system)


async def test_out_of_range_numbers_are_invalid(system: System) -> None:
    """Amounts are 0-10^12 minor units and quantities 1-10000: negative, overflowing and int32/int64
    extreme values are refused naming the field, the range and the value; the bounds themselves are
    accepted, and an absurd but non-negative expected_version is a version conflict, not an error."""
    order_id = (await system.commands.CreateOrder(create_request())).result.order_id
    before = await event_count(system)
    c = system.commands

    def add(quantity: int = 1, minor: int = 1, **extra: Any) -> cmd.AddItemRequest:
        return cmd.AddItemRequest(
            order_id=order_id, sku="A", name="a", quantity=quantity, unit_price=money(minor), **extra
        )

    int32_min, int32_max, int64_min, int64_max = -(2**31), 2**31 - 1, -(2**63), 2**63 - 1
    cases: dict[str, Case] = {}
    for minor in (-1, 10**12 + 1, int64_max, int64_min):
        says = f"must be 0-{10**12}, got {minor}"
        cases[f"minor_units {minor}"] = (c.AddItem, add(minor=minor), invalid("unit_price.minor_units", says=says))
    for quantity in (0, -1, 10_001, int32_max, int32_min):
        says = f"must be 1-10000, got {quantity}"
        cases[f"quantity {quantity}"] = (c.AddItem, add(quantity=quantity), invalid("quantity", says=says))
    cases["expected_version int64 min"] = (
        c.AddItem,
        add(expected_version=int64_min),
        invalid("expected_version", says="must be >= 0"),
    )
    cases["everything at once"] = (
        c.AddItem,
        add(quantity=int32_min, minor=int64_min),
        invalid("quantity", "unit_price.minor_units"),
    )

    await assert_all_invalid(cases)

    assert await event_count(system) == before
    conflict = await refused(c.AddItem(add(expected_version=int64_max)))
    assert (conflict.code(), error_reason(conflict)) == (grpc.StatusCode.ABORTED, "VERSION_CONFLICT")
    await c.AddItem(add(quantity=10_000, minor=10**12))
    await c.AddItem(cmd.AddItemRequest(order_id=order_id, sku="FREE", name="f", quantity=1, unit_price=money(0)))
    created = (await c.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=order_id))).result
    read = await system.queries.GetOrder(
        qry.GetOrderRequest(order_id=order_id, consistency_token=created.consistency_token), timeout=5
    )
    assert read.order.total.minor_units == 10**16
    await still_serves(system)


async def test_empty_requests_name_every_missing_field(system: System) -> None:
    """An empty request for each command is refused listing every required field by its path
    (CreateOrder alone may omit its order id: one is generated)."""
    c = system.commands
    address_fields = [f"shipping_address.{f}" for f in ("recipient", "line1", "city", "postal_code", "country_code")]
    cases: dict[str, Case] = {
        "CreateOrder": (c.CreateOrder, cmd.CreateOrderRequest(), invalid("customer_id", "currency_code")),
        "AddItem": (
            c.AddItem,
            cmd.AddItemRequest(),
            invalid("order_id", "sku", "name", "quantity", "unit_price.currency_code"),
        ),
        "RemoveItem": (c.RemoveItem, cmd.RemoveItemRequest(), invalid("order_id", "sku")),
        "ChangeShippingAddress": (
            c.ChangeShippingAddress,
            cmd.ChangeShippingAddressRequest(),
            invalid("order_id", *address_fields),
        ),
        "ConfirmOrder": (c.ConfirmOrder, cmd.ConfirmOrderRequest(), invalid("order_id")),
        "ShipOrder": (c.ShipOrder, cmd.ShipOrderRequest(), invalid("order_id")),
        "CancelOrder": (c.CancelOrder, cmd.CancelOrderRequest(), invalid("order_id")),
    }
    assert set(cases) == {m.name for m in COMMANDS.methods}

    await assert_all_invalid(cases)

    assert await event_count(system) == 0
    await still_serves(system)


# -------------------------------------------------------------------------------- Unicode

CONTROL_CHARACTERS = {
    "NUL": "\x00",
    "TAB": "\t",
    "LF": "\n",
    "CR": "\r",
    "ESC": "\x1b",
    "DEL": "\x7f",
    "NEL (C1)": "\x85",
    "APC (C1)": "\x9f",
}


async def test_control_characters_are_refused_in_every_free_text_field(system: System) -> None:
    """C0 and C1 control characters (Unicode category Cc: tab, line breaks, NUL, ESC, DEL, ...) are
    refused in every free-text field with a violation that names the character and where it is."""
    assert all(unicodedata.category(ch) == "Cc" for ch in CONTROL_CHARACTERS.values())
    order_id = (await system.commands.CreateOrder(create_request(order_id="target"))).result.order_id
    before = await event_count(system)
    c = system.commands

    cases: dict[str, Case] = {}

    def text_cases(field: str, method: Callable[..., Awaitable[Any]], request: Callable[[str], Message]) -> None:
        for name, char in CONTROL_CHARACTERS.items():
            says = (
                "must not contain control characters (Unicode category Cc, e.g. tab, line feed, NUL), "
                f"found U+{ord(char):04X} at character 2"
            )
            message = request(f"ok{char}ok")
            cases[f"{type(message).__name__} {field} {name}"] = (method, message, invalid(field, says=says))

    def address_with(field: str) -> Callable[[str], Message]:
        def request(text: str) -> Message:
            address = an_address()
            setattr(address, field, text)
            return cmd.ChangeShippingAddressRequest(order_id=order_id, shipping_address=address)

        return request

    def item_named(text: str) -> Message:
        return cmd.AddItemRequest(order_id=order_id, sku="A", name=text, quantity=1, unit_price=money(1))

    text_cases("command_id", c.ConfirmOrder, lambda t: cmd.ConfirmOrderRequest(order_id=order_id, command_id=t))
    text_cases(
        "sku",
        c.AddItem,
        lambda t: cmd.AddItemRequest(order_id=order_id, sku=t, name="n", quantity=1, unit_price=money(1)),
    )
    text_cases("name", c.AddItem, item_named)
    text_cases("sku", c.RemoveItem, lambda t: cmd.RemoveItemRequest(order_id=order_id, sku=t))
    for field in ("recipient", "line1", "line2", "city", "region", "postal_code"):
        text_cases(f"shipping_address.{field}", c.ChangeShippingAddress, address_with(field))
    text_cases("carrier", c.ShipOrder, lambda t: cmd.ShipOrderRequest(order_id=order_id, carrier=t))
    text_cases("tracking_number", c.ShipOrder, lambda t: cmd.ShipOrderRequest(order_id=order_id, tracking_number=t))
    text_cases("reason", c.CancelOrder, lambda t: cmd.CancelOrderRequest(order_id=order_id, reason=t))
    cases["CreateOrder shipping_address.city LF"] = (
        c.CreateOrder,
        create_request(shipping_address=an_address(city="Ber\nlin")),
        invalid("shipping_address.city", says="found U+000A at character 3"),
    )

    await assert_all_invalid(cases)

    assert await event_count(system) == before
    await still_serves(system)


# Legitimate Unicode of many kinds, each of which must come back exactly as sent (never normalised).
ACCENTS = "Crème brûlée, Ærøskøbing, Łódź, Ñandú"
DECOMPOSED = "Cre\u0300me bru\u0302le\u0301e"  # e + COMBINING GRAVE ACCENT: NFD, not NFC
CJK = "寿司セット 和牛 한국어 漢字"
ARABIC = "\u200fطلب رقم ١٢٣ – مرحبا"  # with RIGHT-TO-LEFT MARK and Arabic-Indic digits
HEBREW = "שלום עולם \u05b0\u05b4"  # with Hebrew points (combining marks)
EMOJI = "👩\u200d👩\u200d👧\u200d👦 🇩🇪 👍🏽 ❤️ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0001f9d1\u200d\U0001f680"  # ZWJ, flags, modifiers, non-BMP
ZERO_WIDTH = "می\u200cخواهم \ufeffBOM \u2066isolate\u2069"  # ZWNJ, BOM, bidi isolates (format, not control)
FAMILY = "👩\u200d👩\u200d👧\u200d👦"  # one grapheme, 7 code points


async def test_legitimate_unicode_round_trips_exactly(system: System) -> None:
    """Accents (composed and combining), CJK, right-to-left scripts, emoji (ZWJ sequences, flags,
    outside the BMP) and format characters are accepted in every free-text field and read back
    exactly, byte for byte, through the read side with the consistency token."""
    c = system.commands
    assert unicodedata.normalize("NFC", DECOMPOSED) != DECOMPOSED
    address = types_pb2.ShippingAddress(
        recipient=ARABIC,
        line1=ACCENTS,
        line2=DECOMPOSED,
        city=CJK,
        region=HEBREW,
        postal_code="〒100-0001",
        country_code="JP",
    )
    shipped = (
        await c.CreateOrder(
            cmd.CreateOrderRequest(customer_id="unicode", currency_code="JPY", shipping_address=address)
        )
    ).result
    names = {"SKU-ÄÖÜ": EMOJI, "寿司": CJK, "זה": HEBREW, "🎁": ZERO_WIDTH, "é": DECOMPOSED}
    for sku, name in names.items():
        await c.AddItem(
            cmd.AddItemRequest(order_id=shipped.order_id, sku=sku, name=name, quantity=2, unit_price=money(100, "JPY"))
        )
    await c.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=shipped.order_id))
    shipped = (
        await c.ShipOrder(
            cmd.ShipOrderRequest(order_id=shipped.order_id, carrier="ヤマト運輸 🚚", tracking_number="№ 12-34 ٥٦")
        )
    ).result
    cancelled = (await c.CreateOrder(create_request("unicode"))).result
    cancelled = (
        await c.CancelOrder(
            cmd.CancelOrderRequest(order_id=cancelled.order_id, reason=f"{EMOJI} {ARABIC} {DECOMPOSED}")
        )
    ).result

    first = await system.queries.GetOrder(
        qry.GetOrderRequest(order_id=shipped.order_id, consistency_token=shipped.consistency_token), timeout=5
    )
    second = await system.queries.GetOrder(
        qry.GetOrderRequest(order_id=cancelled.order_id, consistency_token=cancelled.consistency_token), timeout=5
    )
    listed = await system.queries.ListOrders(qry.ListOrdersRequest(customer_id="unicode"), timeout=5)

    assert first.order.shipping_address == address
    assert {item.sku: item.name for item in first.order.items} == names
    assert (first.order.carrier, first.order.tracking_number) == ("ヤマト運輸 🚚", "№ 12-34 ٥٦")
    assert second.order.cancellation_reason == f"{EMOJI} {ARABIC} {DECOMPOSED}"
    assert first.order.shipping_address.line2.encode() == DECOMPOSED.encode()  # not normalised to NFC
    assert [o.order_id for o in listed.orders] == [cancelled.order_id, shipped.order_id]
    assert listed.orders[1] == first.order


async def test_lengths_count_unicode_code_points(system: System) -> None:
    """Length limits count code points, not bytes or graphemes: 200 four-byte emoji (800 bytes) fit
    a 200-character name; a family emoji is 7 code points, so 28 of them plus 4 letters fill it
    exactly and one more code point is refused."""
    order_id = (await system.commands.CreateOrder(create_request())).result.order_id

    def add(sku: str, name: str) -> Awaitable[cmd.AddItemResponse]:
        request = cmd.AddItemRequest(order_id=order_id, sku=sku, name=name, quantity=1, unit_price=money(1))
        return system.commands.AddItem(request)  # type: ignore[no-any-return]

    await add("𝔘" * 64, "😀" * 200)
    done = (await add("B", FAMILY * 28 + "abcd")).result
    before = await event_count(system)
    error = await refused(add("C", FAMILY * 28 + "abcde"))

    assert error.code() == INVALID
    assert descriptions(error) == {"name": "must be 1-200 characters, got 201"}
    assert await event_count(system) == before
    read = await system.queries.GetOrder(
        qry.GetOrderRequest(order_id=order_id, consistency_token=done.consistency_token), timeout=5
    )
    assert [(i.sku, i.name) for i in read.order.items] == [("𝔘" * 64, "😀" * 200), ("B", FAMILY * 28 + "abcd")]


# ---------------------------------------------------------------- deadlines and cancellation

# Deadlines already passed or far too short for a command (which takes a few PostgreSQL round trips).
TINY_DEADLINES = (-1.0, 0.0, 1e-6, 1e-4, 5e-4)


async def test_expired_deadline_writes_nothing(system: System) -> None:
    """A command whose deadline has passed, or is far too short, fails and leaves nothing behind,
    even when it reached the server; retried with the same command id and a sane deadline it
    applies once."""
    request = create_request(order_id="late", command_id="late-1")

    codes = set()
    for timeout in TINY_DEADLINES * 3:
        codes.add((await refused(system.commands.CreateOrder(request, timeout=timeout))).code())

    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
    await asyncio.sleep(0.3)
    assert await event_count(system) == 0
    retried = (await system.commands.CreateOrder(request, timeout=5)).result
    assert (retried.order_id, retried.version) == ("late", 1)
    assert await event_count(system) == 1
    await still_serves(system)


async def test_expired_deadline_is_deadline_exceeded_not_unavailable(system: System) -> None:
    """An expired deadline is always reported as DEADLINE_EXCEEDED, never as an unavailable
    PostgreSQL (which would send operators and retry logic after the wrong problem)."""
    codes = {}
    for attempt, timeout in enumerate(TINY_DEADLINES * 5):
        error = await refused(system.commands.CreateOrder(create_request(), timeout=timeout))
        codes[attempt, timeout] = f"{error.code().name}: {error.details()}"

    assert {code for code in codes.values() if not code.startswith("DEADLINE_EXCEEDED")} == set()
    await asyncio.sleep(0.3)
    assert await event_count(system) == 0


async def test_deadline_bounds_the_postgresql_call(system: System) -> None:
    """A command stuck behind a table lock fails with DEADLINE_EXCEEDED at its deadline, and its
    PostgreSQL query is cancelled then (the server's session stops waiting while the lock is still
    held); once the lock is released nothing of it appears."""
    async with events_locked(system):
        started = time.monotonic()
        error = await refused(system.commands.CreateOrder(create_request(order_id="slow"), timeout=0.5))
        failed_after = time.monotonic() - started
        stopped_after = await until_lock_waiters(system, 0, timeout=3)

    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.45 <= failed_after < 1.5
    assert stopped_after < 1.0, "the server's query kept waiting on the lock after the deadline"
    await asyncio.sleep(0.2)
    assert await event_count(system) == 0
    await still_serves(system)


async def test_cancelled_call_stops_its_postgresql_query(system: System) -> None:
    """A call the client cancels while it waits on a lock stops its server-side work at once (the
    query is cancelled, long before the server's own 10 s default deadline); nothing is written."""
    async with events_locked(system):
        call = system.commands.CreateOrder(create_request(order_id="cancelled"))  # no deadline: server uses 10 s
        await until_lock_waiters(system, 1)
        call.cancel()
        stopped_after = await until_lock_waiters(system, 0, timeout=3)

    assert call.cancelled()
    assert stopped_after < 1.0, "the server's query kept waiting on the lock after the call was cancelled"
    await asyncio.sleep(0.2)
    assert await event_count(system) == 0
    await still_serves(system)


async def test_rpcs_past_the_concurrency_limit_are_refused_as_overloaded(system: System) -> None:
    """A server allowing 2 concurrent RPCs answers a third UNAVAILABLE (OVERLOADED, with RetryInfo) at
    once while two are in flight; the two finish normally once unblocked, and the server serves again."""
    async with AsyncExitStack() as stack:
        limited = await start_write_service(system.pool, "127.0.0.1:0", max_concurrent_rpcs=2)
        stack.push_async_callback(limited.stop, 0)
        channel = await stack.enter_async_context(channel_to(limited.port))
        stub = commands_pb2_grpc.OrderCommandsStub(channel)

        async with events_locked(system):
            in_flight = [stub.CreateOrder(create_request(order_id=f"in-flight-{i}"), timeout=10) for i in range(2)]
            await until_lock_waiters(system, 2)
            started = time.monotonic()
            error = await refused(stub.CreateOrder(create_request(order_id="third"), timeout=5))
            refused_after = time.monotonic() - started
            assert not any(call.done() for call in in_flight)

        replies = [await call for call in in_flight]
        after = await stub.CreateOrder(create_request(order_id="after"), timeout=5)

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "limit" in (error.details() or "").lower()
    assert rich_details(error)["ErrorInfo"].reason == "OVERLOADED"  # type: ignore[attr-defined]
    assert "RetryInfo" in rich_details(error)
    assert refused_after < 1.0
    assert sorted(r.result.order_id for r in replies) == ["in-flight-0", "in-flight-1"]
    assert after.result.version == 1
    rows = await system.pool.fetch("SELECT stream_id FROM events ORDER BY stream_id")
    assert [r["stream_id"] for r in rows] == ["after", "in-flight-0", "in-flight-1"]
    await still_serves(system)


# ------------------------------------------------------------------------------ read side


def page_token(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


BAD_CONSISTENCY_TOKENS = [
    "abc",
    "-1-2",
    "1-",
    "-",
    "1-2-3",
    " 1-2",
    "1-2\n",
    "1_2",
    "١-٢",
    "1" * 21 + "-1",
    "0x1-2",
    "1-2\x00",
]
BAD_PAGE_TOKENS = {
    "base64 of not JSON": page_token(b"hello"),
    "JSON object": page_token(b'{"a": 1}'),
    "JSON list of 2": page_token(b'["", ""]'),
    "JSON list of 4": page_token(b'["", "", "", ""]'),
    "JSON string": page_token(b'"abcd"'),
    "JSON number": page_token(b"42"),
    "not UTF-8": page_token(b'["\xc3\x28", "", ""]'),
    "huge integer": page_token(b'["", "", ' + b"9" * 5000 + b"]"),
    "only padding": "====",
    "not base64 at all": "%%%",
    "megabyte of garbage": "A" * (1024 * 1024 + 1),
}


async def test_malformed_query_input_is_invalid(system: System) -> None:
    """GetOrder and ListOrders refuse malformed order and customer ids, consistency tokens, page
    tokens, enum values and int32 page sizes with INVALID_ARGUMENT naming the field (cases not
    already covered by test_queries.py)."""
    q = system.queries
    cases: dict[str, Case] = {}
    for bad in ["", "bad id", "o" * 65, "ordér", "nul\x00", "🛒", "../etc"]:
        cases[f"GetOrder order_id {bad!r}"] = (q.GetOrder, qry.GetOrderRequest(order_id=bad), invalid("order_id"))
    for bad in ["o" * 65, "ordér", "nul\x00", "a:b", "*"]:
        request = qry.ListOrdersRequest(customer_id=bad)
        cases[f"ListOrders customer_id {bad!r}"] = (q.ListOrders, request, invalid("customer_id"))
    for bad in BAD_CONSISTENCY_TOKENS:
        expected = invalid("consistency_token", says="not a token returned by a command")
        get = qry.GetOrderRequest(order_id="any", consistency_token=bad)
        cases[f"GetOrder consistency_token {bad!r}"] = (q.GetOrder, get, expected)
        cases[f"ListOrders consistency_token {bad!r}"] = (
            q.ListOrders,
            qry.ListOrdersRequest(consistency_token=bad),
            expected,
        )
    for name, token in BAD_PAGE_TOKENS.items():
        cases[f"page_token {name}"] = (
            q.ListOrders,
            qry.ListOrdersRequest(page_token=token),
            invalid("page_token", says="not a token returned by ListOrders"),
        )
    cases["forged page_token of the right shape"] = (  # unsigned (test_page_tokens.py)
        q.ListOrders,
        qry.ListOrdersRequest(page_token=page_token(b'["someone", "", "x"]')),
        invalid("page_token", says="not a token returned by ListOrders"),
    )
    for status in (-1, 5, 2**31 - 1, -(2**31)):
        request = qry.ListOrdersRequest(status=status)  # type: ignore[arg-type]
        cases[f"status {status}"] = (q.ListOrders, request, invalid("status", says=f"unknown status {status}"))
    for size in (2**31 - 1, -(2**31)):
        cases[f"page_size {size}"] = (q.ListOrders, qry.ListOrdersRequest(page_size=size), invalid("page_size"))
    cases["every ListOrders filter wrong at once"] = (
        q.ListOrders,
        qry.ListOrdersRequest(customer_id="bad id", status=99, page_size=501),  # type: ignore[arg-type]
        invalid("customer_id", "status", "page_size"),
    )

    await assert_all_invalid(cases)

    assert await event_count(system) == 0
    await still_serves(system)


async def test_deeply_nested_page_token_is_invalid(system: System) -> None:
    """A page token of deeply nested JSON is malformed input like any other: INVALID_ARGUMENT."""
    token = page_token(b"[" * 100_000 + b"]" * 100_000)

    error = await refused(system.queries.ListOrders(qry.ListOrdersRequest(page_token=token), timeout=5))

    assert error.code() == INVALID, f"{error.code().name}: {error.details()}"
    assert violated_fields(error) == {"page_token"}
    await still_serves(system)
