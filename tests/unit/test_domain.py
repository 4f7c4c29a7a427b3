"""The order's business rules: `validate`, `decide`, `evolve` and `replay` in orders.domain.rules."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
from hypothesis import given

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
from orders.domain.errors import (
    FieldViolation,
    InvalidCommand,
    OrderAlreadyExists,
    OrderNotFound,
    OrdersError,
    RuleViolation,
)
from orders.domain.events import (
    Address,
    Event,
    ItemAdded,
    ItemRemoved,
    OrderCancelled,
    OrderConfirmed,
    OrderCreated,
    OrderShipped,
    ShippingAddressChanged,
)
from orders.domain.rules import (
    MAX_COMMAND_ID,
    MAX_LINE_ITEMS,
    MAX_QUANTITY,
    MAX_UNIT_PRICE_MINOR,
    Line,
    OrderState,
    decide,
    evolve,
    replay,
    validate,
)
from orders.domain.status import OrderStatus
from tests.unit.strategies import PROPERTY_SETTINGS, command_sequences

OID = "order-1"
ADDRESS = Address("Ada Lovelace", "1 Main Street", "Berlin", "10115", "DE")
OTHER_ADDRESS = Address("Grace Hopper", "5 Rue de Rivoli", "Paris", "75001", "FR", line2="Apt 4", region="IDF")
CREATE = CreateOrder(OID, "cust-1", "EUR", ADDRESS)
CREATE_NO_ADDRESS = CreateOrder(OID, "cust-1", "EUR")
ADD = AddItem(OID, "SKU-1", "Widget", 2, 1999, "EUR")
CONFIRM = ConfirmOrder(OID)
SHIP = ShipOrder(OID, "DHL", "JD0001")
CANCEL = CancelOrder(OID, "changed my mind")
REMOVE = RemoveItem(OID, "SKU-1")
CHANGE_ADDRESS = ChangeShippingAddress(OID, OTHER_ADDRESS)

# Histories (valid command sequences) that reach each interesting state.
PENDING_EMPTY = (CREATE,)
PENDING = (CREATE, ADD)
CONFIRMED = (CREATE, ADD, CONFIRM)
SHIPPED = (CREATE, ADD, CONFIRM, SHIP)
CANCELLED = (CREATE, ADD, CANCEL)
CANCELLED_AFTER_CONFIRM = (CREATE, ADD, CONFIRM, CANCEL)
CONFIRMED_NO_ADDRESS = (CREATE_NO_ADDRESS, ADD, CONFIRM)
EVERY_STATE = {
    "pending-empty": PENDING_EMPTY,
    "pending": PENDING,
    "confirmed": CONFIRMED,
    "shipped": SHIPPED,
    "cancelled": CANCELLED,
    "cancelled-after-confirm": CANCELLED_AFTER_CONFIRM,
}


def play(commands: tuple[Command, ...] | list[Command]) -> OrderState:
    """The state after applying `commands`, each of which must be accepted."""
    state: OrderState | None = None
    for command in commands:
        validate(CommandEnvelope(command))
        for event in decide(state, command):
            state = evolve(state, event, command.order_id)
    assert state is not None
    return state


def add(sku: str, quantity: int = 1, price: int = 100, currency: str = "EUR", name: str = "Widget") -> AddItem:
    return AddItem(OID, sku, name, quantity, price, currency)


def with_lines(count: int) -> tuple[Command, ...]:
    return (CREATE, *(add(f"SKU-{i}") for i in range(count)))


# --- decide: what each accepted command produces ---------------------------------------------


@pytest.mark.parametrize(
    ("history", "command", "expected_events", "expected_status"),
    [
        pytest.param(PENDING, CONFIRM, [OrderConfirmed()], OrderStatus.CONFIRMED, id="confirm-pending"),
        pytest.param(CONFIRMED, SHIP, [OrderShipped("DHL", "JD0001")], OrderStatus.SHIPPED, id="ship-confirmed"),
        pytest.param(PENDING, CANCEL, [OrderCancelled("changed my mind")], OrderStatus.CANCELLED, id="cancel-pending"),
        pytest.param(
            CONFIRMED, CANCEL, [OrderCancelled("changed my mind")], OrderStatus.CANCELLED, id="cancel-confirmed"
        ),
        pytest.param(
            PENDING, CHANGE_ADDRESS, [ShippingAddressChanged(OTHER_ADDRESS)], OrderStatus.PENDING, id="addr-pending"
        ),
        pytest.param(
            CONFIRMED,
            CHANGE_ADDRESS,
            [ShippingAddressChanged(OTHER_ADDRESS)],
            OrderStatus.CONFIRMED,
            id="addr-confirmed",
        ),
        pytest.param(PENDING, REMOVE, [ItemRemoved("SKU-1")], OrderStatus.PENDING, id="remove-pending"),
        pytest.param(PENDING, ADD, [ItemAdded("SKU-1", "Widget", 2, 1999)], OrderStatus.PENDING, id="add-same-sku"),
        pytest.param(
            PENDING_EMPTY, add("SKU-9", 3, 50), [ItemAdded("SKU-9", "Widget", 3, 50)], OrderStatus.PENDING, id="add-new"
        ),
    ],
)
def test_accepted_commands_produce_their_event_and_status(
    history: tuple[Command, ...], command: Command, expected_events: list[Event], expected_status: OrderStatus
) -> None:
    """Each allowed transition yields exactly its event, and folding it gives the new status."""
    state = play(history)

    events = decide(state, command)

    assert expected_events == events
    assert expected_status == play((*history, command)).status


def test_create_produces_order_created_with_the_command_fields() -> None:
    """CreateOrder on a missing order yields one OrderCreated carrying customer, currency and address."""
    assert [OrderCreated("cust-1", "EUR", ADDRESS)] == decide(None, CREATE)


def test_full_lifecycle_pending_confirmed_shipped() -> None:
    """The happy path goes PENDING -> CONFIRMED -> SHIPPED, one version per event."""
    expected = [OrderStatus.PENDING, OrderStatus.PENDING, OrderStatus.CONFIRMED, OrderStatus.SHIPPED]

    statuses = [play(SHIPPED[:n]).status for n in range(1, len(SHIPPED) + 1)]

    assert expected == statuses
    assert len(SHIPPED) == play(SHIPPED).version


# --- decide: refusals, each with its stable reason --------------------------------------------


@pytest.mark.parametrize(
    ("history", "command", "expected_reason"),
    [
        # status machine
        pytest.param(CONFIRMED, CONFIRM, "ORDER_NOT_PENDING", id="confirm-confirmed"),
        pytest.param(SHIPPED, CONFIRM, "ORDER_NOT_PENDING", id="confirm-shipped"),
        pytest.param(CANCELLED, CONFIRM, "ORDER_NOT_PENDING", id="confirm-cancelled"),
        pytest.param(PENDING, SHIP, "ORDER_NOT_CONFIRMED", id="ship-pending"),
        pytest.param(SHIPPED, SHIP, "ORDER_NOT_CONFIRMED", id="ship-shipped"),
        pytest.param(CANCELLED, SHIP, "ORDER_NOT_CONFIRMED", id="ship-cancelled"),
        pytest.param(CANCELLED_AFTER_CONFIRM, SHIP, "ORDER_NOT_CONFIRMED", id="ship-cancelled-after-confirm"),
        pytest.param(SHIPPED, CANCEL, "ORDER_CLOSED", id="cancel-shipped"),
        pytest.param(CANCELLED, CANCEL, "ORDER_CLOSED", id="cancel-cancelled"),
        pytest.param(SHIPPED, CHANGE_ADDRESS, "ORDER_CLOSED", id="address-shipped"),
        pytest.param(CANCELLED, CHANGE_ADDRESS, "ORDER_CLOSED", id="address-cancelled"),
        # items are editable only while PENDING
        pytest.param(CONFIRMED, add("SKU-2"), "ORDER_NOT_PENDING", id="add-confirmed"),
        pytest.param(SHIPPED, add("SKU-2"), "ORDER_NOT_PENDING", id="add-shipped"),
        pytest.param(CANCELLED, add("SKU-2"), "ORDER_NOT_PENDING", id="add-cancelled"),
        pytest.param(CONFIRMED, REMOVE, "ORDER_NOT_PENDING", id="remove-confirmed"),
        pytest.param(SHIPPED, REMOVE, "ORDER_NOT_PENDING", id="remove-shipped"),
        pytest.param(CANCELLED, REMOVE, "ORDER_NOT_PENDING", id="remove-cancelled"),
        # confirm needs an item, ship needs an address
        pytest.param(PENDING_EMPTY, CONFIRM, "ORDER_EMPTY", id="confirm-empty"),
        pytest.param((*PENDING, REMOVE), CONFIRM, "ORDER_EMPTY", id="confirm-emptied"),
        pytest.param(CONFIRMED_NO_ADDRESS, SHIP, "NO_SHIPPING_ADDRESS", id="ship-without-address"),
        # item rules
        pytest.param(PENDING, add("SKU-2", currency="USD"), "CURRENCY_MISMATCH", id="currency-new-sku"),
        pytest.param(PENDING, replace(ADD, currency_code="USD"), "CURRENCY_MISMATCH", id="currency-same-sku"),
        pytest.param(PENDING, replace(ADD, unit_price_minor=2000), "PRICE_MISMATCH", id="price-differs"),
        pytest.param(PENDING, replace(ADD, unit_price_minor=0), "PRICE_MISMATCH", id="price-zero-differs"),
        pytest.param(
            (CREATE, add("SKU-1", MAX_QUANTITY - 1)), add("SKU-1", 2), "QUANTITY_LIMIT", id="quantity-after-merge"
        ),
        pytest.param(
            (CREATE, add("SKU-1", MAX_QUANTITY)), add("SKU-1", 1), "QUANTITY_LIMIT", id="quantity-already-full"
        ),
        pytest.param(with_lines(MAX_LINE_ITEMS), add("SKU-new"), "TOO_MANY_ITEMS", id="too-many-lines"),
        pytest.param(PENDING, RemoveItem(OID, "SKU-unknown"), "ITEM_NOT_IN_ORDER", id="remove-unknown"),
        pytest.param((*PENDING, REMOVE), REMOVE, "ITEM_NOT_IN_ORDER", id="remove-twice"),
    ],
)
def test_refused_commands_raise_rule_violation_with_stable_reason(
    history: tuple[Command, ...], command: Command, expected_reason: str
) -> None:
    """A command the rules forbid raises RuleViolation whose `reason` is its stable code."""
    state = play(history)
    validate(CommandEnvelope(command))  # well-formed: only the rules refuse it

    with pytest.raises(RuleViolation) as caught:
        decide(state, command)

    assert expected_reason == caught.value.reason


def test_status_refusal_message_names_order_current_and_allowed_status() -> None:
    """The message of a status refusal says what the order is and what it must be."""
    with pytest.raises(RuleViolation) as caught:
        decide(play(SHIPPED), CONFIRM)

    expected = "cannot confirm order 'order-1': it is SHIPPED, must be PENDING"
    assert expected == str(caught.value)


@pytest.mark.parametrize(
    ("history", "command"),
    [
        pytest.param((CREATE, add("SKU-1", MAX_QUANTITY - 1)), add("SKU-1", 1), id="merge-up-to-limit"),
        pytest.param(with_lines(MAX_LINE_ITEMS - 1), add("SKU-new"), id="last-free-line"),
        pytest.param(with_lines(MAX_LINE_ITEMS), add("SKU-0"), id="merge-into-full-order"),
        pytest.param(PENDING, replace(ADD, name="Renamed widget"), id="same-sku-other-name"),
        pytest.param((CREATE, add("SKU-1"), REMOVE), add("SKU-1", price=5), id="readd-at-new-price-after-remove"),
    ],
)
def test_commands_at_the_limits_are_accepted(history: tuple[Command, ...], command: Command) -> None:
    """Limits are inclusive: exactly MAX_QUANTITY units and exactly MAX_LINE_ITEMS lines are allowed."""
    expected_event_count = 1
    state = play(history)

    assert expected_event_count == len(decide(state, command))


def test_quantity_limit_counts_merged_quantities() -> None:
    """After a merge the line holds the sum of both quantities, and the sum is what the limit checks."""
    state = play((CREATE, add("SKU-1", MAX_QUANTITY - 1), add("SKU-1", 1)))

    expected = MAX_QUANTITY
    assert expected == state.lines["SKU-1"].quantity


@pytest.mark.parametrize("history", list(EVERY_STATE.values()), ids=list(EVERY_STATE))
def test_create_on_existing_order_raises_already_exists(history: tuple[Command, ...]) -> None:
    """CreateOrder on an order that exists, in any status, raises OrderAlreadyExists naming it."""
    with pytest.raises(OrderAlreadyExists) as caught:
        decide(play(history), CREATE)

    expected = OID
    assert expected == caught.value.order_id


@pytest.mark.parametrize(
    "command", [ADD, REMOVE, CHANGE_ADDRESS, CONFIRM, SHIP, CANCEL], ids=lambda command: type(command).__name__
)
def test_any_command_on_missing_order_raises_not_found(command: Command) -> None:
    """Every command but CreateOrder on an order that does not exist raises OrderNotFound naming it."""
    with pytest.raises(OrderNotFound) as caught:
        decide(None, command)

    expected = OID
    assert expected == caught.value.order_id


# --- validate: shape of the input -------------------------------------------------------------


def _address(**changes: str) -> Address:
    return replace(ADDRESS, **changes)


VALID_COMMANDS = [
    CREATE,
    CREATE_NO_ADDRESS,
    CreateOrder("a" * 64, "Z_9-z", "JPY", OTHER_ADDRESS),
    ADD,
    add("s" * 64, 1, 0, name="n"),
    AddItem(OID, "SKU", "n" * 200, MAX_QUANTITY, MAX_UNIT_PRICE_MINOR, "EUR"),
    REMOVE,
    CHANGE_ADDRESS,
    ChangeShippingAddress(OID, Address("r" * 200, "l" * 200, "c" * 100, "p" * 20, "GB", "x" * 200, "y" * 100)),
    CONFIRM,
    ShipOrder(OID),
    ShipOrder(OID, "c" * 100, "t" * 100),
    CancelOrder(OID),
    CancelOrder(OID, "r" * 500),
]


@pytest.mark.parametrize("command", VALID_COMMANDS)
def test_valid_commands_pass_validation(command: Command) -> None:
    """Well-formed commands, including every bound hit exactly, validate without error."""
    validate(CommandEnvelope(command))


@pytest.mark.parametrize(
    ("command", "expected_fields"),
    [
        # ids
        pytest.param(replace(CREATE, order_id=""), ["order_id"], id="order-id-empty"),
        pytest.param(replace(CREATE, order_id="a" * 65), ["order_id"], id="order-id-65"),
        pytest.param(replace(CREATE, order_id="has space"), ["order_id"], id="order-id-space"),
        pytest.param(replace(CREATE, order_id="a/b"), ["order_id"], id="order-id-slash"),
        pytest.param(replace(CREATE, order_id="ordér"), ["order_id"], id="order-id-non-ascii"),
        pytest.param(replace(CREATE, order_id="order\n"), ["order_id"], id="order-id-newline"),
        pytest.param(replace(CREATE, customer_id=""), ["customer_id"], id="customer-id-empty"),
        pytest.param(replace(CREATE, customer_id="c:1"), ["customer_id"], id="customer-id-colon"),
        pytest.param(RemoveItem("", "SKU-1"), ["order_id"], id="remove-order-id"),
        pytest.param(ConfirmOrder("x" * 65), ["order_id"], id="confirm-order-id"),
        pytest.param(ShipOrder("bad id"), ["order_id"], id="ship-order-id"),
        pytest.param(CancelOrder("bad id"), ["order_id"], id="cancel-order-id"),
        pytest.param(ChangeShippingAddress("", ADDRESS), ["order_id"], id="address-order-id"),
        pytest.param(replace(ADD, order_id=""), ["order_id"], id="add-order-id"),
        # currency
        pytest.param(replace(CREATE, currency_code="eur"), ["currency_code"], id="currency-lower"),
        pytest.param(replace(CREATE, currency_code="EU"), ["currency_code"], id="currency-short"),
        pytest.param(replace(CREATE, currency_code="EURO"), ["currency_code"], id="currency-long"),
        pytest.param(replace(ADD, currency_code="usd"), ["unit_price.currency_code"], id="price-currency"),
        # address fields on CreateOrder and ChangeShippingAddress
        pytest.param(
            replace(CREATE, shipping_address=_address(country_code="de")),
            ["shipping_address.country_code"],
            id="country-lower",
        ),
        pytest.param(
            replace(CREATE, shipping_address=_address(country_code="DEU")),
            ["shipping_address.country_code"],
            id="country-long",
        ),
        pytest.param(
            ChangeShippingAddress(OID, _address(recipient="")), ["shipping_address.recipient"], id="recipient-empty"
        ),
        pytest.param(
            ChangeShippingAddress(OID, _address(recipient="r" * 201)),
            ["shipping_address.recipient"],
            id="recipient-201",
        ),
        pytest.param(ChangeShippingAddress(OID, _address(line1="")), ["shipping_address.line1"], id="line1-empty"),
        pytest.param(ChangeShippingAddress(OID, _address(line1="l" * 201)), ["shipping_address.line1"], id="line1-201"),
        pytest.param(ChangeShippingAddress(OID, _address(line2="l" * 201)), ["shipping_address.line2"], id="line2-201"),
        pytest.param(ChangeShippingAddress(OID, _address(city="")), ["shipping_address.city"], id="city-empty"),
        pytest.param(ChangeShippingAddress(OID, _address(city="c" * 101)), ["shipping_address.city"], id="city-101"),
        pytest.param(ChangeShippingAddress(OID, _address(region="r" * 101)), ["shipping_address.region"], id="region"),
        pytest.param(
            ChangeShippingAddress(OID, _address(postal_code="")), ["shipping_address.postal_code"], id="postal-empty"
        ),
        pytest.param(
            ChangeShippingAddress(OID, _address(postal_code="1" * 21)), ["shipping_address.postal_code"], id="postal-21"
        ),
        pytest.param(
            ChangeShippingAddress(OID, Address("", "", "", "", "")),
            [
                "shipping_address.recipient",
                "shipping_address.line1",
                "shipping_address.city",
                "shipping_address.postal_code",
                "shipping_address.country_code",
            ],
            id="address-all-empty",
        ),
        # items
        pytest.param(replace(ADD, quantity=0), ["quantity"], id="quantity-0"),
        pytest.param(replace(ADD, quantity=-1), ["quantity"], id="quantity-negative"),
        pytest.param(replace(ADD, quantity=MAX_QUANTITY + 1), ["quantity"], id="quantity-10001"),
        pytest.param(replace(ADD, unit_price_minor=-1), ["unit_price.minor_units"], id="price-negative"),
        pytest.param(
            replace(ADD, unit_price_minor=MAX_UNIT_PRICE_MINOR + 1), ["unit_price.minor_units"], id="price-too-big"
        ),
        pytest.param(replace(ADD, sku=""), ["sku"], id="sku-empty"),
        pytest.param(replace(ADD, sku="s" * 65), ["sku"], id="sku-65"),
        pytest.param(replace(ADD, name=""), ["name"], id="name-empty"),
        pytest.param(replace(ADD, name="n" * 201), ["name"], id="name-201"),
        pytest.param(RemoveItem(OID, ""), ["sku"], id="remove-sku-empty"),
        pytest.param(RemoveItem(OID, "s" * 65), ["sku"], id="remove-sku-65"),
        # free text bounds
        pytest.param(ShipOrder(OID, carrier="c" * 101), ["carrier"], id="carrier-101"),
        pytest.param(ShipOrder(OID, tracking_number="t" * 101), ["tracking_number"], id="tracking-101"),
        pytest.param(CancelOrder(OID, "r" * 501), ["reason"], id="reason-501"),
        # every problem is reported at once, in field order
        pytest.param(
            AddItem("", "", "", 0, -1, "eur"),
            ["order_id", "sku", "name", "unit_price.currency_code", "quantity", "unit_price.minor_units"],
            id="add-everything-wrong",
        ),
        pytest.param(
            CreateOrder("", "", "", _address(country_code="")),
            ["order_id", "customer_id", "currency_code", "shipping_address.country_code"],
            id="create-everything-wrong",
        ),
    ],
)
def test_malformed_commands_raise_invalid_command_naming_each_field(
    command: Command, expected_fields: list[str]
) -> None:
    """validate raises InvalidCommand listing one violation per bad field, by its proto field path."""
    with pytest.raises(InvalidCommand) as caught:
        validate(CommandEnvelope(command))

    assert expected_fields == [violation.field for violation in caught.value.violations]


@pytest.mark.parametrize(
    ("envelope", "expected_fields"),
    [
        pytest.param(CommandEnvelope(CONFIRM, command_id="c" * MAX_COMMAND_ID), [], id="command-id-at-limit"),
        pytest.param(CommandEnvelope(CONFIRM, command_id="c"), [], id="command-id-1"),
        pytest.param(CommandEnvelope(CONFIRM, expected_version=0), [], id="expected-version-0"),
        pytest.param(CommandEnvelope(CONFIRM, command_id=""), ["command_id"], id="command-id-empty"),
        pytest.param(
            CommandEnvelope(CONFIRM, command_id="c" * (MAX_COMMAND_ID + 1)), ["command_id"], id="command-id-too-long"
        ),
        pytest.param(CommandEnvelope(CONFIRM, expected_version=-1), ["expected_version"], id="expected-version-neg"),
        pytest.param(
            CommandEnvelope(ConfirmOrder(""), command_id="", expected_version=-1),
            ["order_id", "command_id", "expected_version"],
            id="command-and-envelope",
        ),
    ],
)
def test_validate_checks_the_envelope_too(envelope: CommandEnvelope, expected_fields: list[str]) -> None:
    """The command id (1-128 characters when given) and expected version (>= 0) are validated with the command."""
    try:
        validate(envelope)
    except InvalidCommand as error:
        actual = [violation.field for violation in error.violations]
    else:
        actual = []

    assert expected_fields == actual


def test_invalid_command_describes_the_violation() -> None:
    """A violation says what is expected and what was given; the message joins all of them."""
    with pytest.raises(InvalidCommand) as caught:
        validate(CommandEnvelope(replace(ADD, quantity=0, unit_price_minor=-5)))

    expected = [
        FieldViolation("quantity", f"must be 1-{MAX_QUANTITY}, got 0"),
        FieldViolation("unit_price.minor_units", f"must be 0-{MAX_UNIT_PRICE_MINOR}, got -5"),
    ]
    assert expected == caught.value.violations
    assert "; ".join(f"{v.field}: {v.description}" for v in expected) == str(caught.value)


# --- evolve and replay --------------------------------------------------------------------------


def test_replay_of_no_events_is_no_order() -> None:
    """An empty stream is an order that does not exist."""
    assert replay(OID, []) is None


def test_replay_of_order_created_starts_a_pending_order_at_version_1() -> None:
    """OrderCreated gives a PENDING order with the creation's fields, no lines, version 1."""
    expected = OrderState(OID, "cust-1", "EUR", OrderStatus.PENDING, {}, ADDRESS, 1)

    assert expected == replay(OID, [OrderCreated("cust-1", "EUR", ADDRESS)])


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param(
            [ItemAdded("A", "Apple", 2, 30), ItemAdded("A", "Apple", 3, 30)],
            {"A": Line("A", "Apple", 5, 30)},
            id="same-sku-merges",
        ),
        pytest.param(
            [ItemAdded("A", "Apple", 2, 30), ItemAdded("B", "Pear", 1, 40)],
            {"A": Line("A", "Apple", 2, 30), "B": Line("B", "Pear", 1, 40)},
            id="distinct-skus",
        ),
        pytest.param(
            [ItemAdded("A", "Apple", 2, 30), ItemAdded("B", "Pear", 1, 40), ItemRemoved("A")],
            {"B": Line("B", "Pear", 1, 40)},
            id="removal",
        ),
        pytest.param(
            [ItemAdded("A", "Apple", 2, 30), ItemRemoved("A"), ItemAdded("A", "Apple", 1, 99)],
            {"A": Line("A", "Apple", 1, 99)},
            id="removal-forgets-quantity",
        ),
        pytest.param([ItemRemoved("X")], {}, id="removing-absent-sku"),
    ],
)
def test_replay_folds_item_events_into_lines(events: list[Event], expected: dict[str, Line]) -> None:
    """ItemAdded merges quantities per sku, ItemRemoved drops the whole line; each event is one version."""
    state = replay(OID, [OrderCreated("cust-1", "EUR"), *events])

    assert state is not None
    assert expected == state.lines
    assert 1 + len(events) == state.version


@pytest.mark.parametrize(
    ("event", "expected_status"),
    [
        (OrderConfirmed(), OrderStatus.CONFIRMED),
        (OrderShipped("DHL", "1"), OrderStatus.SHIPPED),
        (OrderCancelled("why"), OrderStatus.CANCELLED),
        (ShippingAddressChanged(OTHER_ADDRESS), OrderStatus.PENDING),
    ],
    ids=lambda value: type(value).__name__,
)
def test_evolve_sets_status_and_counts_one_version(event: Event, expected_status: OrderStatus) -> None:
    """OrderStatus events set the status; every event increments the version by one."""
    before = play(PENDING)

    after = evolve(before, event, OID)

    assert (expected_status, before.version + 1) == (after.status, after.version)


def test_evolve_changes_the_shipping_address() -> None:
    """ShippingAddressChanged replaces the address and nothing else but the version."""
    before = play(PENDING)

    after = evolve(before, ShippingAddressChanged(OTHER_ADDRESS), OID)

    assert replace(before, shipping_address=OTHER_ADDRESS, version=before.version + 1) == after


def test_evolve_does_not_mutate_the_state_it_is_given() -> None:
    """States are values: evolving returns a new state and leaves the old one (and its lines) intact."""
    before = play(PENDING)
    snapshot = copy.deepcopy(before)

    evolve(before, ItemAdded("SKU-1", "Widget", 1, 1999), OID)
    evolve(before, ItemRemoved("SKU-1"), OID)

    assert snapshot == before


def test_evolve_refuses_a_second_order_created() -> None:
    """A stream with two OrderCreated is corrupt."""
    with pytest.raises(ValueError, match="created twice"):
        evolve(play(PENDING_EMPTY), OrderCreated("cust-1", "EUR"), OID)


def test_evolve_refuses_events_before_order_created() -> None:
    """A stream that does not start with OrderCreated is corrupt."""
    with pytest.raises(ValueError, match="before OrderCreated"):
        evolve(None, OrderConfirmed(), OID)


# --- properties over random command sequences -----------------------------------------------


@PROPERTY_SETTINGS
@given(command_sequences(order_ids=(OID,)))
def test_every_command_is_refused_cleanly_or_grows_the_version_by_its_events(commands: list[Command]) -> None:
    """Each command raises an OrdersError and leaves the state as it was, or returns events that,
    folded with evolve, advance the version by exactly their number; decide never mutates its input."""
    state: OrderState | None = None
    for command in commands:
        snapshot = copy.deepcopy(state)
        try:
            validate(CommandEnvelope(command))
            events = decide(state, command)
        except OrdersError:
            assert snapshot == state
            continue
        assert snapshot == state
        assert events, "an accepted command records at least one event"
        after = state
        for event in events:
            after = evolve(after, event, OID)
        assert after is not None
        assert (0 if state is None else state.version) + len(events) == after.version
        state = after
