"""The order's business rules, as pure functions with no I/O.

- `validate(command)` checks the input's shape before anything is loaded.
- `decide(state, command)` returns the events a command produces, or raises.
- `evolve(state, event)` folds one event into the state; `replay` folds many.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import singledispatch

import pycountry

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
from orders.domain.status import OrderStatus

MAX_LINE_ITEMS = 100
MAX_COMMAND_ID = 128
MAX_QUANTITY = 10_000
MAX_UNIT_PRICE_MINOR = 1_000_000_000_000
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
ID_RULE = "must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'"  # the rule of every id, as violations say it
# ISO 4217 codes that are no money to price an order in (docs/errors.md#currencies): no currency (XXX),
# testing (XTS), precious metals by the troy ounce (XAU, XAG, XPD, XPT), and units of account of
# institutions (bond-market units XBA-XBD, the IMF's XDR, XSU, the ADB's XUA, the Arab Monetary Fund's
# XAD). Money counts minor units, and ISO 4217 gives most of these none.
NOT_MONEY = frozenset(
    {"XXX", "XTS", "XAU", "XAG", "XPD", "XPT", "XBA", "XBB", "XBC", "XBD", "XDR", "XSU", "XUA", "XAD"}
)
# The codes an order may use: ISO 4217's current list as pycountry ships it (from Debian's iso-codes),
# read once here so that a check is one set lookup.
CURRENCY_CODES = frozenset(currency.alpha_3 for currency in pycountry.currencies) - NOT_MONEY
COUNTRY_PATTERN = re.compile(r"[A-Z]{2}")
# Unicode general category Cc, exactly: C0 controls, DEL and C1 controls (stable by Unicode policy).
CONTROL_PATTERN = re.compile(r"[\x00-\x1f\x7f-\x9f]")
SHOWN_CHARACTERS = 20  # a violation quotes at most this much of a bad value, so the status stays small


@dataclass(frozen=True)
class Line:
    sku: str
    name: str
    quantity: int
    unit_price_minor: int


@dataclass(frozen=True)
class OrderState:
    """What the rules need to know about an existing order."""

    order_id: str
    customer_id: str
    currency_code: str
    status: OrderStatus = OrderStatus.PENDING
    lines: dict[str, Line] = field(default_factory=dict)
    shipping_address: Address | None = None
    version: int = 0


# --- validation: shape of the input, independent of any state -------------------------------


def _shown(value: str) -> str:
    """`value` quoted for a message, cut short: a violation must not echo megabytes back."""
    if len(value) <= SHOWN_CHARACTERS:
        return repr(value)
    return f"{value[:SHOWN_CHARACTERS]!r}... ({len(value)} characters)"


def _check_length(field_name: str, value: str, low: int, high: int) -> list[FieldViolation]:
    if low <= len(value) <= high:
        return []
    return [FieldViolation(field_name, f"must be {low}-{high} characters, got {len(value)}")]


def _check_text(field_name: str, value: str, low: int, high: int) -> list[FieldViolation]:
    """Free text: `low`-`high` characters (Unicode code points), any Unicode except control characters.

    Letters of every script, combining marks, emoji (ZWJ sequences, outside the BMP) and format
    characters such as ZWJ or right-to-left marks are kept exactly as sent. Control characters
    (category Cc: U+0000-U+001F, U+007F-U+009F, including tab and line breaks) are refused: they
    corrupt logs, labels and terminals, and PostgreSQL cannot store U+0000 at all.
    """
    problems = _check_length(field_name, value, low, high)
    control = CONTROL_PATTERN.search(value)
    if control is not None:
        problems.append(
            FieldViolation(
                field_name,
                "must not contain control characters (Unicode category Cc, e.g. tab, line feed, NUL), "
                f"found U+{ord(control.group()):04X} at character {control.start()}",
            )
        )
    return problems


def _check_id(field_name: str, value: str) -> list[FieldViolation]:
    if ID_PATTERN.fullmatch(value):
        return []
    return [FieldViolation(field_name, f"{ID_RULE}, got {_shown(value)}")]


def _check_currency(field_name: str, value: str) -> list[FieldViolation]:
    if value in CURRENCY_CODES:
        return []
    if value in NOT_MONEY:
        return [
            FieldViolation(
                field_name,
                f"must be a currency: {value!r} is an ISO 4217 code for no currency, testing, "
                "a precious metal or a unit of account",
            )
        ]
    return [
        FieldViolation(field_name, f"must be an ISO 4217 currency code in upper case, e.g. 'EUR', got {_shown(value)}")
    ]


def check_address(prefix: str, address: Address) -> list[FieldViolation]:
    problems = [
        *_check_text(f"{prefix}.recipient", address.recipient, 1, 200),
        *_check_text(f"{prefix}.line1", address.line1, 1, 200),
        *_check_text(f"{prefix}.line2", address.line2, 0, 200),
        *_check_text(f"{prefix}.city", address.city, 1, 100),
        *_check_text(f"{prefix}.region", address.region, 0, 100),
        *_check_text(f"{prefix}.postal_code", address.postal_code, 1, 20),
    ]
    if not COUNTRY_PATTERN.fullmatch(address.country_code):
        problems.append(
            FieldViolation(
                f"{prefix}.country_code",
                f"must be an ISO 3166-1 alpha-2 code, e.g. 'DE', got {_shown(address.country_code)}",
            )
        )
    return problems


@singledispatch
def _violations(command: Command) -> list[FieldViolation]:
    raise TypeError(f"no validation for {type(command).__name__}")


@_violations.register
def _(command: CreateOrder) -> list[FieldViolation]:
    problems = [
        *_check_id("order_id", command.order_id),
        *_check_id("customer_id", command.customer_id),
        *_check_currency("currency_code", command.currency_code),
    ]
    if command.shipping_address is not None:
        problems += check_address("shipping_address", command.shipping_address)
    return problems


@_violations.register
def _(command: AddItem) -> list[FieldViolation]:
    problems = [
        *_check_id("order_id", command.order_id),
        *_check_text("sku", command.sku, 1, 64),
        *_check_text("name", command.name, 1, 200),
        *_check_currency("unit_price.currency_code", command.currency_code),
    ]
    if not 1 <= command.quantity <= MAX_QUANTITY:
        problems.append(FieldViolation("quantity", f"must be 1-{MAX_QUANTITY}, got {command.quantity}"))
    if not 0 <= command.unit_price_minor <= MAX_UNIT_PRICE_MINOR:
        problems.append(
            FieldViolation(
                "unit_price.minor_units", f"must be 0-{MAX_UNIT_PRICE_MINOR}, got {command.unit_price_minor}"
            )
        )
    return problems


@_violations.register
def _(command: RemoveItem) -> list[FieldViolation]:
    return [*_check_id("order_id", command.order_id), *_check_text("sku", command.sku, 1, 64)]


@_violations.register
def _(command: ChangeShippingAddress) -> list[FieldViolation]:
    return [
        *_check_id("order_id", command.order_id),
        *check_address("shipping_address", command.shipping_address),
    ]


@_violations.register
def _(command: ConfirmOrder) -> list[FieldViolation]:
    return _check_id("order_id", command.order_id)


@_violations.register
def _(command: ShipOrder) -> list[FieldViolation]:
    return [
        *_check_id("order_id", command.order_id),
        *_check_text("carrier", command.carrier, 0, 100),
        *_check_text("tracking_number", command.tracking_number, 0, 100),
    ]


@_violations.register
def _(command: CancelOrder) -> list[FieldViolation]:
    return [*_check_id("order_id", command.order_id), *_check_text("reason", command.reason, 0, 500)]


def validate(envelope: CommandEnvelope) -> None:
    """Raises InvalidCommand listing every malformed field of the command and its envelope."""
    problems = _violations(envelope.command)
    if envelope.command_id is not None:
        problems += _check_text("command_id", envelope.command_id, 1, MAX_COMMAND_ID)
    if envelope.expected_version is not None and envelope.expected_version < 0:
        problems.append(FieldViolation("expected_version", "must be >= 0"))
    if problems:
        raise InvalidCommand(problems)


# --- decisions: the rules that depend on the order's current state --------------------------


def _require_status(state: OrderState, allowed: set[OrderStatus], reason: str, action: str) -> None:
    if state.status not in allowed:
        names = " or ".join(sorted(s.value for s in allowed))
        raise RuleViolation(
            reason, f"cannot {action} order {state.order_id!r}: it is {state.status.value}, must be {names}"
        )


def decide(state: OrderState | None, command: Command) -> list[Event]:
    """The events that `command` produces on `state` (None: the order does not exist)."""
    if isinstance(command, CreateOrder):
        if state is not None:
            raise OrderAlreadyExists(command.order_id)
        return [OrderCreated(command.customer_id, command.currency_code, command.shipping_address)]
    if state is None:
        raise OrderNotFound(command.order_id)
    match command:
        case AddItem():
            return _add_item(state, command)
        case RemoveItem():
            return _remove_item(state, command)
        case ChangeShippingAddress():
            _require_status(
                state, {OrderStatus.PENDING, OrderStatus.CONFIRMED}, "ORDER_CLOSED", "change the address of"
            )
            return [ShippingAddressChanged(command.shipping_address)]
        case ConfirmOrder():
            return _confirm(state)
        case ShipOrder():
            return _ship(state, command)
        case CancelOrder():
            _require_status(state, {OrderStatus.PENDING, OrderStatus.CONFIRMED}, "ORDER_CLOSED", "cancel")
            return [OrderCancelled(command.reason)]
    raise TypeError(f"no rule for {type(command).__name__}")


def _add_item(state: OrderState, command: AddItem) -> list[Event]:
    _require_status(state, {OrderStatus.PENDING}, "ORDER_NOT_PENDING", "change items of")
    if command.currency_code != state.currency_code:
        raise RuleViolation(
            "CURRENCY_MISMATCH",
            f"unit price is in {command.currency_code}, order {state.order_id!r} is in {state.currency_code}",
        )
    line = state.lines.get(command.sku)
    if line is None and len(state.lines) >= MAX_LINE_ITEMS:
        raise RuleViolation("TOO_MANY_ITEMS", f"an order holds at most {MAX_LINE_ITEMS} line items")
    if line is not None and line.unit_price_minor != command.unit_price_minor:
        raise RuleViolation(
            "PRICE_MISMATCH",
            f"sku {command.sku!r} is already in the order at {line.unit_price_minor} minor units; "
            "remove it first to change its price",
        )
    if line is not None and line.quantity + command.quantity > MAX_QUANTITY:
        raise RuleViolation("QUANTITY_LIMIT", f"a line holds at most {MAX_QUANTITY} units")
    return [ItemAdded(command.sku, command.name, command.quantity, command.unit_price_minor)]


def _remove_item(state: OrderState, command: RemoveItem) -> list[Event]:
    _require_status(state, {OrderStatus.PENDING}, "ORDER_NOT_PENDING", "change items of")
    if command.sku not in state.lines:
        raise RuleViolation("ITEM_NOT_IN_ORDER", f"sku {command.sku!r} is not in order {state.order_id!r}")
    return [ItemRemoved(command.sku)]


def _confirm(state: OrderState) -> list[Event]:
    _require_status(state, {OrderStatus.PENDING}, "ORDER_NOT_PENDING", "confirm")
    if not state.lines:
        raise RuleViolation("ORDER_EMPTY", f"cannot confirm order {state.order_id!r}: it has no items")
    return [OrderConfirmed()]


def _ship(state: OrderState, command: ShipOrder) -> list[Event]:
    _require_status(state, {OrderStatus.CONFIRMED}, "ORDER_NOT_CONFIRMED", "ship")
    if state.shipping_address is None:
        raise RuleViolation("NO_SHIPPING_ADDRESS", f"cannot ship order {state.order_id!r}: it has no address")
    return [OrderShipped(command.carrier, command.tracking_number)]


# --- evolution: how each event changes the state --------------------------------------------


@singledispatch
def _apply(event: Event, state: OrderState) -> OrderState:
    raise TypeError(f"no evolution for {type(event).__name__}")


@_apply.register
def _(event: ItemAdded, state: OrderState) -> OrderState:
    old = state.lines.get(event.sku)
    quantity = event.quantity + (old.quantity if old else 0)
    line = Line(event.sku, event.name, quantity, event.unit_price_minor)
    return replace(state, lines={**state.lines, event.sku: line})


@_apply.register
def _(event: ItemRemoved, state: OrderState) -> OrderState:
    return replace(state, lines={k: v for k, v in state.lines.items() if k != event.sku})


@_apply.register
def _(event: ShippingAddressChanged, state: OrderState) -> OrderState:
    return replace(state, shipping_address=event.shipping_address)


@_apply.register
def _(event: OrderConfirmed, state: OrderState) -> OrderState:
    return replace(state, status=OrderStatus.CONFIRMED)


@_apply.register
def _(event: OrderShipped, state: OrderState) -> OrderState:
    return replace(state, status=OrderStatus.SHIPPED)


@_apply.register
def _(event: OrderCancelled, state: OrderState) -> OrderState:
    return replace(state, status=OrderStatus.CANCELLED)


def evolve(state: OrderState | None, event: Event, order_id: str) -> OrderState:
    """The state after `event`; the version counts the events folded so far."""
    if isinstance(event, OrderCreated):
        if state is not None:
            raise ValueError(f"order {order_id!r} created twice")
        return OrderState(
            order_id,
            event.customer_id,
            event.currency_code,
            shipping_address=event.shipping_address,
            version=1,
        )
    if state is None:
        raise ValueError(f"{type(event).__name__} before OrderCreated in order {order_id!r}")
    return replace(_apply(event, state), version=state.version + 1)


def replay(order_id: str, events: list[Event]) -> OrderState | None:
    state: OrderState | None = None
    for event in events:
        state = evolve(state, event, order_id)
    return state
