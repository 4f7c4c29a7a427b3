"""Codecs and key names: view JSON, consistency tokens, event payloads, Redis keys, page tokens,
the protobuf Order built from a view, and command fingerprints."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orders.domain.commands import (
    AddItem,
    CancelOrder,
    ChangeShippingAddress,
    Command,
    CommandEnvelope,
    ConfirmOrder,
    CreateOrder,
    RemoveItem,
    ShipOrder,
)
from orders.domain.consistency import START, LogPosition
from orders.domain.events import (
    EVENT_TYPES,
    Address,
    Event,
    ItemAdded,
    ItemRemoved,
    OrderCancelled,
    OrderConfirmed,
    OrderCreated,
    OrderShipped,
    ShippingAddressChanged,
    event_type,
    from_payload,
    to_payload,
)
from orders.store.partitions import partition_of
from orders.store.views import OrderView, ViewKeys, ViewLine, is_json_view
from orders.v1 import types_pb2
from read_service.servicer import order_message
from tests.unit.strategies import (
    STATUS_NAMES,
    envelopes,
    events,
    log_positions,
    order_views,
    protobuf_order_views,
)
from write_service.command_bus import fingerprint

ADDRESS = Address("Ada Lovelace", "1 Main Street", "Berlin", "10115", "DE", line2="Apt 4", region="BE")
ADDRESS_FIELDS = {
    "recipient": "Ada Lovelace",
    "line1": "1 Main Street",
    "city": "Berlin",
    "postal_code": "10115",
    "country_code": "DE",
    "line2": "Apt 4",
    "region": "BE",
}
VIEW = OrderView(
    order_id="order-1",
    customer_id="cust-1",
    currency_code="EUR",
    status="SHIPPED",
    created_at_us=1_740_830_400_123_456,
    updated_at_us=1_740_830_460_000_001,
    version=5,
    lines=(ViewLine("SKU-1", "Widget", 3, 1999), ViewLine("SKU-2", "Gadget", 1, 500)),
    shipping_address=ADDRESS,
    carrier="DHL",
    tracking_number="JD0001",
    cancellation_reason="",
)


# --- OrderView JSON ------------------------------------------------------------------------------


@given(order_views())
def test_order_view_json_round_trips(view: OrderView) -> None:
    """from_json(to_json(view)) is the same view, for any field values."""
    assert view == OrderView.from_json(view.to_json())


def test_order_view_json_shape() -> None:
    """The stored JSON is compact and spells lines and address out as objects."""
    text = VIEW.to_json()
    data = json.loads(text)

    assert json.dumps(data, separators=(",", ":")) == text
    expected_line = {"sku": "SKU-1", "name": "Widget", "quantity": 3, "unit_price_minor": 1999}
    assert (expected_line, ADDRESS_FIELDS, VIEW.version) == (
        data["lines"][0],
        data["shipping_address"],
        data["version"],
    )


def test_order_view_json_refuses_numbers_beyond_64_bits() -> None:
    """Beyond the stored JSON's range a view fails loudly; it is never stored rounded."""
    with pytest.raises(TypeError):
        dataclasses.replace(VIEW, version=2**64).to_json()


@pytest.mark.parametrize("address", [None, ADDRESS])
def test_order_view_from_json_accepts_bytes(address: Address | None) -> None:
    """Redis may hand back bytes; they decode to the same view, with or without an address."""
    view = dataclasses.replace(VIEW, shipping_address=address)

    assert view == OrderView.from_json(view.to_json().encode())


# --- OrderView wire form (the stored form) ---------------------------------------------------------


@given(protobuf_order_views())
def test_order_view_wire_round_trips(view: OrderView) -> None:
    """from_wire(to_wire(view)) is the same view, for any view the Order message can hold; and the
    stored bytes are exactly the Order that the read API serves, so GetOrder sends them as they are."""
    raw = view.to_wire()

    assert view == OrderView.from_wire(raw) == OrderView.from_stored(raw)
    assert types_pb2.Order.FromString(raw) == order_message(view)


def test_an_address_with_only_empty_fields_stays_an_address() -> None:
    """Presence, not content, tells a view with an address from one without."""
    view = dataclasses.replace(VIEW, shipping_address=Address("", "", "", "", ""))

    assert OrderView.from_wire(view.to_wire()) == view


@given(protobuf_order_views())
def test_stored_views_of_either_form_are_told_apart_and_read(view: OrderView) -> None:
    """A running deployment may hold views in the old JSON form: they start with '{', a wire view
    never does (its first byte is a field tag), and from_stored reads both, as text or bytes."""
    raw, text = view.to_wire(), view.to_json()

    assert (is_json_view(raw), is_json_view(text), is_json_view(text.encode())) == (False, True, True)
    assert view == OrderView.from_stored(text) == OrderView.from_stored(text.encode())


def test_a_view_beyond_the_wire_range_fails_loudly() -> None:
    """A quantity beyond int32 cannot be stored in the Order: encoding raises, it is never truncated."""
    view = dataclasses.replace(VIEW, lines=(ViewLine("SKU-1", "Widget", 2**31, 1),))

    with pytest.raises(ValueError, match="out of range"):
        view.to_wire()


# --- LogPosition tokens ------------------------------------------------------------------------


def test_token_is_tx_id_dash_position() -> None:
    """A token spells the tx id, then the position."""
    expected = "12-345"

    assert expected == LogPosition(12, 345).token()


@given(log_positions())
def test_token_round_trips_as_str_and_bytes(position: LogPosition) -> None:
    """parse is the inverse of token, for str and for the bytes Redis returns."""
    assert (position, position) == (LogPosition.parse(position.token()), LogPosition.parse(position.token().encode()))


@given(log_positions(), log_positions())
def test_positions_order_by_tx_id_then_position(a: LogPosition, b: LogPosition) -> None:
    """Positions compare as (tx_id, position): the transaction decides, the position breaks ties."""
    expected = (a.tx_id, a.position) < (b.tx_id, b.position)

    assert expected == (a < b)
    assert a >= START


@pytest.mark.parametrize(
    ("smaller", "larger"),
    [
        (LogPosition(1, 100), LogPosition(2, 5)),  # a later transaction wins over a larger position
        (LogPosition(7, 1), LogPosition(7, 2)),
        (START, LogPosition(0, 1)),
    ],
)
def test_position_order_examples(smaller: LogPosition, larger: LogPosition) -> None:
    """tx_id first: an event of a later transaction is later even with a smaller position."""
    assert smaller < larger
    assert not larger < smaller


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "1",
        "1-",
        "-1",
        "1-2-3",
        "a-b",
        "1-b",
        " 1-2",
        "1-2 ",
        "1-2\n",
        "-1-2",
        "1--2",
        "1_000-2",
        "1.5-2",
        "+1-2",
        "1" * 21 + "-2",
        "1-" + "2" * 21,
        b"\xff-1",
        b"",
        pytest.param(
            "١٢-٣",
            id="arabic-indic-digits",
        ),
    ],
)
def test_parse_rejects_anything_but_a_token(junk: str | bytes) -> None:
    """parse raises ValueError for any text that token() does not produce."""
    with pytest.raises(ValueError):  # noqa: PT011 - parse documents ValueError and nothing finer
        LogPosition.parse(junk)


# --- event payloads ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "expected_payload"),
    [
        pytest.param(
            OrderCreated("cust-1", "EUR", ADDRESS),
            {"customer_id": "cust-1", "currency_code": "EUR", "shipping_address": ADDRESS_FIELDS},
            id="OrderCreated",
        ),
        pytest.param(
            OrderCreated("cust-1", "EUR"),
            {"customer_id": "cust-1", "currency_code": "EUR", "shipping_address": None},
            id="OrderCreated-no-address",
        ),
        pytest.param(
            ItemAdded("SKU-1", "Widget", 2, 1999),
            {"sku": "SKU-1", "name": "Widget", "quantity": 2, "unit_price_minor": 1999},
            id="ItemAdded",
        ),
        pytest.param(ItemRemoved("SKU-1"), {"sku": "SKU-1"}, id="ItemRemoved"),
        pytest.param(
            ShippingAddressChanged(ADDRESS), {"shipping_address": ADDRESS_FIELDS}, id="ShippingAddressChanged"
        ),
        pytest.param(OrderConfirmed(), {}, id="OrderConfirmed"),
        pytest.param(OrderShipped("DHL", "JD0001"), {"carrier": "DHL", "tracking_number": "JD0001"}, id="OrderShipped"),
        pytest.param(OrderCancelled("too late"), {"reason": "too late"}, id="OrderCancelled"),
    ],
)
def test_each_event_type_has_a_plain_payload_that_round_trips(event: Event, expected_payload: dict[str, Any]) -> None:
    """to_payload gives the event's fields as plain JSON values; from_payload rebuilds the same event."""
    payload = to_payload(event)

    assert expected_payload == payload
    assert event == from_payload(event_type(event), event.schema_version, json.loads(json.dumps(payload)))


def test_every_event_type_is_registered_under_its_class_name() -> None:
    """The event_type column names the class, for every event type."""
    expected = {
        "OrderCreated",
        "ItemAdded",
        "ItemRemoved",
        "ShippingAddressChanged",
        "OrderConfirmed",
        "OrderShipped",
        "OrderCancelled",
    }

    assert expected == set(EVENT_TYPES)
    assert all(name == cls.__name__ for name, cls in EVENT_TYPES.items())


@given(events())
def test_payloads_round_trip_through_json(event: Event) -> None:
    """Any event survives to_payload, JSON (as stored in PostgreSQL) and from_payload unchanged."""
    stored = json.loads(json.dumps(to_payload(event)))

    assert event == from_payload(event_type(event), event.schema_version, stored)


def test_from_payload_leaves_its_input_alone() -> None:
    """Decoding does not replace the address dict inside the caller's payload."""
    payload = to_payload(OrderCreated("cust-1", "EUR", ADDRESS))

    from_payload("OrderCreated", 1, payload)

    expected = ADDRESS_FIELDS
    assert expected == payload["shipping_address"]


def test_unknown_event_type_is_rejected() -> None:
    """A type name that no event class has raises ValueError naming it."""
    with pytest.raises(ValueError, match="unknown event type 'OrderTeleported'"):
        from_payload("OrderTeleported", 1, {})


@pytest.mark.parametrize("event_class", list(EVENT_TYPES.values()), ids=list(EVENT_TYPES))
@pytest.mark.parametrize("above_current", [False, True], ids=["zero", "newer"])
def test_unsupported_schema_version_is_rejected(event_class: type[Event], above_current: bool) -> None:
    """A schema version below 1 or above the class's current one raises ValueError naming it
    (versions from 1 to the current one are upcast: tests/unit/test_upcasting.py)."""
    name = event_class.__name__
    version = event_class.schema_version + 1 if above_current else 0

    with pytest.raises(ValueError, match=f"{name} schema version {version} is not supported"):
        from_payload(name, version, {})


# --- Redis key names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("customer_id", "status", "expected"),
    [
        ("", "", "p:{orders:0/1}:idx:all"),
        ("cust-1", "", "p:{orders:0/1}:idx:customer:cust-1"),
        ("", "PENDING", "p:{orders:0/1}:idx:status:PENDING"),
        ("cust-1", "SHIPPED", "p:{orders:0/1}:idx:customer:cust-1:SHIPPED"),
    ],
)
def test_index_name_for_each_filter_combination(customer_id: str, status: str, expected: str) -> None:
    """Each (customer, status) filter, empty meaning any, has its own index under the prefix."""
    assert expected == ViewKeys("p:").index(customer_id, status)


def test_indexes_of_a_view_are_the_four_that_list_it() -> None:
    """A view is listed in: all, its customer's, its status's, and its customer's in its status."""
    expected = [
        "orders:{orders:0/1}:idx:all",
        "orders:{orders:0/1}:idx:customer:cust-1",
        "orders:{orders:0/1}:idx:status:SHIPPED",
        "orders:{orders:0/1}:idx:customer:cust-1:SHIPPED",
    ]

    assert expected == ViewKeys().indexes_of(VIEW)


def test_order_and_checkpoint_keys() -> None:
    """The order key and the checkpoint key and channel live under the prefix and the partition's tag."""
    keys = ViewKeys("t:1:")

    assert (
        keys.order("o-1"),
        keys.checkpoint,
        keys.checkpoint_channel,
    ) == ("t:1:{orders:0/1}:order:o-1", "t:1:{orders:0/1}:checkpoint:orders", "t:1:{orders:0/1}:checkpoint:orders")


def test_index_member_is_padded_time_then_order_id() -> None:
    """A member is the creation time in 16 zero-padded digits, a colon, and the order id."""
    view = dataclasses.replace(VIEW, created_at_us=42, order_id="o-1")

    expected = "0000000000000042:o-1"

    assert expected == view.index_member()


@given(
    st.lists(
        st.tuples(st.integers(0, 10**16 - 1), st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)),
        min_size=2,
        max_size=10,
    )
)
def test_index_members_sort_like_creation_time_then_id(keys: list[tuple[int, str]]) -> None:
    """Lexicographic order of members (how Redis sorts them) is (created_at, order_id) order."""
    views = [dataclasses.replace(VIEW, created_at_us=created, order_id=order_id) for created, order_id in keys]

    by_member = sorted(views, key=lambda view: view.index_member().encode())
    by_fields = sorted(views, key=lambda view: (view.created_at_us, view.order_id.encode()))

    assert [view.index_member() for view in by_fields] == [view.index_member() for view in by_member]


# --- the protobuf Order -------------------------------------------------------------------------


def money(minor: int, currency: str = "EUR") -> types_pb2.Money:
    return types_pb2.Money(currency_code=currency, minor_units=minor)


def test_order_message_carries_every_view_field() -> None:
    """order_message maps a view onto the Order message, money in minor units of the order's currency."""
    expected = types_pb2.Order(
        order_id="order-1",
        customer_id="cust-1",
        status=types_pb2.ORDER_STATUS_SHIPPED,
        items=[
            types_pb2.LineItem(sku="SKU-1", name="Widget", quantity=3, unit_price=money(1999), line_total=money(5997)),
            types_pb2.LineItem(sku="SKU-2", name="Gadget", quantity=1, unit_price=money(500), line_total=money(500)),
        ],
        total=money(6497),
        shipping_address=types_pb2.ShippingAddress(**ADDRESS_FIELDS),
        version=5,
        carrier="DHL",
        tracking_number="JD0001",
    )
    expected.created_at.FromMicroseconds(1_740_830_400_123_456)
    expected.updated_at.FromMicroseconds(1_740_830_460_000_001)

    assert expected == order_message(VIEW)


def test_order_message_timestamps_split_seconds_and_nanos() -> None:
    """Microsecond times become Timestamp seconds and nanos exactly."""
    expected = (1_740_830_400, 123_456_000)

    order = order_message(VIEW)

    assert expected == (order.created_at.seconds, order.created_at.nanos)


def test_order_message_without_address_leaves_it_unset() -> None:
    """A view without an address gives an Order whose shipping_address is not set (not an empty one)."""
    order = order_message(dataclasses.replace(VIEW, shipping_address=None))

    assert not order.HasField("shipping_address")


def test_order_message_with_address_sets_it() -> None:
    """A view with an address gives an Order with that address set."""
    assert order_message(VIEW).HasField("shipping_address")


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("PENDING", types_pb2.ORDER_STATUS_PENDING),
        ("CONFIRMED", types_pb2.ORDER_STATUS_CONFIRMED),
        ("SHIPPED", types_pb2.ORDER_STATUS_SHIPPED),
        ("CANCELLED", types_pb2.ORDER_STATUS_CANCELLED),
    ],
)
def test_order_message_status_enum(status: str, expected: types_pb2.OrderStatus.ValueType) -> None:
    """Each view status maps to its ORDER_STATUS_ enum value."""
    assert expected == order_message(dataclasses.replace(VIEW, status=status)).status


def test_order_message_of_an_empty_order_totals_zero() -> None:
    """An order without lines has no items and a zero total, still in its currency."""
    order = order_message(dataclasses.replace(VIEW, lines=(), currency_code="JPY"))

    assert ([], money(0, "JPY")) == (list(order.items), order.total)


@given(protobuf_order_views())
def test_order_message_is_consistent(view: OrderView) -> None:
    """For any view, the Order's total is the sum of its line totals, each line total is
    quantity x unit price, all money is in the order's currency, and times survive exactly."""
    order = order_message(view)

    assert [line.quantity * line.unit_price_minor for line in view.lines] == [
        item.line_total.minor_units for item in order.items
    ]
    assert sum(item.line_total.minor_units for item in order.items) == order.total.minor_units
    currencies = {order.total.currency_code}
    currencies |= {item.unit_price.currency_code for item in order.items}
    currencies |= {item.line_total.currency_code for item in order.items}
    assert {view.currency_code} == currencies
    assert (view.created_at_us, view.updated_at_us) == (
        order.created_at.ToMicroseconds(),
        order.updated_at.ToMicroseconds(),
    )
    assert view.status in STATUS_NAMES
    assert f"ORDER_STATUS_{view.status}" == types_pb2.OrderStatus.Name(order.status)


# --- command fingerprints -----------------------------------------------------------------------


SAMPLE_COMMANDS: list[Command] = [
    CreateOrder("order-1", "cust-1", "EUR", ADDRESS),
    AddItem("order-1", "SKU-1", "Widget", 2, 1999, "EUR"),
    RemoveItem("order-1", "SKU-1"),
    ChangeShippingAddress("order-1", ADDRESS),
    ConfirmOrder("order-1"),
    ShipOrder("order-1", "DHL", "JD0001"),
    CancelOrder("order-1", "why"),
]


def _changed(value: object) -> object:
    """Some other value of the same field."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, Address):
        return dataclasses.replace(value, city=value.city + "x")
    if value is None:
        return ADDRESS
    raise AssertionError(f"no change defined for {value!r}")


def _with_changed_field(command: Command, name: str) -> Command:
    changes: dict[str, Any] = {name: _changed(getattr(command, name))}
    return dataclasses.replace(command, **changes)


FIELD_CHANGES = [
    pytest.param(command, _with_changed_field(command, f.name), id=f"{type(command).__name__}.{f.name}")
    for command in SAMPLE_COMMANDS
    for f in dataclasses.fields(command)
]


@pytest.mark.parametrize("command", SAMPLE_COMMANDS, ids=lambda command: type(command).__name__)
def test_fingerprint_is_equal_for_equal_requests(command: Command) -> None:
    """The same command and expected version fingerprint alike, whatever the command and correlation ids."""
    first = CommandEnvelope(command, command_id="c-1", expected_version=3, correlation_id="corr-1")
    retry = CommandEnvelope(dataclasses.replace(command), command_id="c-1", expected_version=3, correlation_id="corr-2")

    assert fingerprint(first) == fingerprint(retry)


@pytest.mark.parametrize(("command", "other"), FIELD_CHANGES)
def test_fingerprint_differs_when_any_command_field_differs(command: Command, other: Command) -> None:
    """Changing any one field of the command changes the fingerprint."""
    assert fingerprint(CommandEnvelope(command)) != fingerprint(CommandEnvelope(other))


@pytest.mark.parametrize(("first", "second"), [(None, 0), (0, 1), (None, 7)])
def test_fingerprint_differs_when_expected_version_differs(first: int | None, second: int | None) -> None:
    """The expected version is part of the request's content."""
    command = SAMPLE_COMMANDS[1]

    assert fingerprint(CommandEnvelope(command, expected_version=first)) != fingerprint(
        CommandEnvelope(command, expected_version=second)
    )


def test_fingerprints_of_different_commands_are_all_different() -> None:
    """Each command type (with its fields) is a request of its own."""
    fingerprints = {fingerprint(CommandEnvelope(command)) for command in SAMPLE_COMMANDS}

    assert len(SAMPLE_COMMANDS) == len(fingerprints)


@given(envelopes(), envelopes())
def test_fingerprints_match_exactly_when_command_and_expected_version_match(
    a: CommandEnvelope, b: CommandEnvelope
) -> None:
    """fingerprint(a) == fingerprint(b) if and only if the commands and expected versions are equal."""
    same_request = (a.command, a.expected_version) == (b.command, b.expected_version)

    assert same_request == (fingerprint(a) == fingerprint(b))


def test_generation_keys_carry_their_generation_and_projection_keys_do_not() -> None:
    """Generation 0 keeps the plain names; generation n puts `g{n}:` after the prefix of the keys
    that belong to a generation, and not of the projection's own keys."""
    zero, one = ViewKeys("p:"), ViewKeys("p:").at(1)

    assert (zero.order("o1"), zero.checkpoint, zero.index("c1")) == (
        "p:{orders:0/1}:order:o1",
        "p:{orders:0/1}:checkpoint:orders",
        "p:{orders:0/1}:idx:customer:c1",
    )
    assert (one.order("o1"), one.checkpoint, one.applied) == (
        "p:{orders:0/1}:g1:order:o1",
        "p:{orders:0/1}:g1:checkpoint:orders",
        "p:{orders:0/1}:g1:applied:orders",
    )
    summary = ViewKeys("p:", "customer_summary", 2)
    assert summary.summary_customer("c1") == "p:{customer_summary:0/1}:g2:summary:customer:c1"
    shared = ["lease", "heartbeat", "paused", "checkpoint_channel", "changes_channel", "generation_pointer"]
    assert [getattr(one, name) for name in shared] == [getattr(zero, name) for name in shared]
    assert not any(p.startswith("p:{orders:0/1}:g1:") for p in zero.view_patterns())


def test_every_key_of_a_partition_shares_one_hash_tag() -> None:
    """Redis Cluster hashes only the text in the first braces: every key and channel of one partition
    of one projection carries the same tag, so each batch script and read touches one slot, and the
    partition count is in the tag, so two counts never share a key."""
    keys = ViewKeys("p:", "orders", 1, 2, 4)
    names = [keys.order("o1"), keys.index("c1", "PENDING"), keys.checkpoint, keys.lease, keys.heartbeat]
    names += [keys.generation_pointer, keys.parked_mark("o1"), keys.changes_channel, *keys.view_patterns()]

    assert {name[name.index("{") : name.index("}") + 1] for name in names} == {"{orders:2/4}"}
    assert ViewKeys("p:", "orders", 0, 2, 8).tag != keys.tag
    assert keys.name == "orders/2"
    assert ViewKeys("p:").name == "orders"


def test_orders_spread_over_partitions_by_a_stable_hash() -> None:
    """partition_of is the id's MD5 (its first 32 bits): the same in every process, spread over every
    partition, and each order is owned by exactly one partition."""
    ids = [f"order-{n}" for n in range(400)]
    keys = ViewKeys("p:", partitions=4)

    assert partition_of("order-1", 4) == int(hashlib.md5(b"order-1").hexdigest()[:8], 16) % 4
    assert {partition_of(i, 4) for i in ids} == {0, 1, 2, 3}
    for order_id in ids:
        owners = [k.partition for k in keys.all_partitions() if k.owns(order_id)]
        assert owners == [keys.for_order(order_id).partition]
    with pytest.raises(ValueError, match="partition 4 of 4"):
        ViewKeys("p:", partition=4, partitions=4)
