"""Hypothesis strategies for the unit tests, and the small builders they rely on.

Two families of data:

- *valid* domain inputs (small pools of ids, skus, prices and currencies, so that
  random command sequences hit every business rule: merges, mismatches, limits);
- *arbitrary* values (any text, any integer) for codecs, which must round-trip
  whatever they are given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, settings
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
from orders.domain.consistency import LogPosition
from orders.domain.errors import OrdersError
from orders.domain.events import (
    Address,
    Event,
    ItemAdded,
    ItemRemoved,
    OrderCancelled,
    OrderConfirmed,
    OrderCreated,
    OrderShipped,
    RecordedEvent,
    ShippingAddressChanged,
)
from orders.domain.rules import MAX_QUANTITY, MAX_UNIT_PRICE_MINOR, OrderState, decide, evolve, validate
from orders.store.views import OrderView, ViewLine

# Property tests run a few hundred domain steps per example: no per-example deadline
# (a slow CI machine must not turn into a flaky failure), and no "too slow" health check.
PROPERTY_SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

ORDER_IDS = ("order-1", "order-2", "order_3")
CUSTOMER_IDS = ("cust-1", "cust-2")
SKUS = ("SKU-1", "SKU-2", "SKU-3")
NAMES = ("Widget", "Gadget")
CURRENCIES = ("EUR", "USD")
PRICES = (0, 199, 1999)
# Large quantities make QUANTITY_LIMIT reachable within a few merges.
QUANTITIES = (1, 2, 3, 4_000, MAX_QUANTITY - 1, MAX_QUANTITY)
STATUS_NAMES = ("PENDING", "CONFIRMED", "SHIPPED", "CANCELLED")
# A recent instant: every microsecond of it converts exactly through float seconds.
BASE_TIME = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(at: datetime) -> int:
    """Exact microseconds since the epoch (no float on the way)."""
    return (at - EPOCH) // timedelta(microseconds=1)


# --- valid domain inputs ----------------------------------------------------------------------


def addresses() -> st.SearchStrategy[Address]:
    """Addresses that pass validation."""
    return st.builds(
        Address,
        recipient=st.sampled_from(["Ada Lovelace", "Grace Hopper"]),
        line1=st.sampled_from(["1 Main Street", "Unter den Linden 5"]),
        city=st.sampled_from(["Berlin", "Paris"]),
        postal_code=st.sampled_from(["10115", "75001"]),
        country_code=st.sampled_from(["DE", "FR"]),
        line2=st.sampled_from(["", "Apt 4"]),
        region=st.sampled_from(["", "Île-de-France"]),
    )


def commands(order_ids: Sequence[str] = ORDER_IDS) -> st.SearchStrategy[Command]:
    """Well-formed commands (they pass `validate`) on a few orders; item changes are drawn most often."""
    order_id = st.sampled_from(order_ids)
    add_item = st.builds(
        AddItem,
        order_id=order_id,
        sku=st.sampled_from(SKUS),
        name=st.sampled_from(NAMES),
        quantity=st.sampled_from(QUANTITIES),
        unit_price_minor=st.sampled_from(PRICES),
        currency_code=st.sampled_from(CURRENCIES),
    )
    remove_item = st.builds(RemoveItem, order_id=order_id, sku=st.sampled_from(SKUS))
    others: list[st.SearchStrategy[Command]] = [
        st.builds(
            CreateOrder,
            order_id=order_id,
            customer_id=st.sampled_from(CUSTOMER_IDS),
            currency_code=st.sampled_from(CURRENCIES),
            shipping_address=st.none() | addresses(),
        ),
        st.builds(ChangeShippingAddress, order_id=order_id, shipping_address=addresses()),
        st.builds(ConfirmOrder, order_id=order_id),
        st.builds(
            ShipOrder,
            order_id=order_id,
            carrier=st.sampled_from(["", "DHL"]),
            tracking_number=st.sampled_from(["", "JD0001"]),
        ),
        st.builds(CancelOrder, order_id=order_id, reason=st.sampled_from(["", "changed my mind"])),
    ]
    # one_of would pick each kind equally often; weight item changes so orders fill up before they close
    kinds: list[st.SearchStrategy[Command]] = [*[add_item] * 8, *[remove_item] * 2, *others]
    return st.sampled_from(kinds).flatmap(lambda kind: kind)


@st.composite
def command_sequences(draw: st.DrawFn, order_ids: Sequence[str] = ORDER_IDS) -> list[Command]:
    """Random commands, usually preceded by the CreateOrder of each order so that most get somewhere."""
    creates = [CreateOrder(order_id, CUSTOMER_IDS[0], CURRENCIES[0]) for order_id in order_ids]
    prefix = draw(st.sampled_from([[], creates, creates]))
    return [*prefix, *draw(st.lists(commands(order_ids), min_size=draw(st.integers(0, 30)), max_size=60))]


@dataclass
class History:
    """What running commands through the domain produced: each order's state, and the log."""

    states: dict[str, OrderState] = field(default_factory=dict)
    log: list[RecordedEvent] = field(default_factory=list)

    def record(self, order_id: str, events: Iterable[Event]) -> None:
        """Folds `events` into the order's state and appends them to the log, one transaction."""
        tx_id = len(self.log) + 1
        for event in events:
            state = evolve(self.states.get(order_id), event, order_id)
            self.states[order_id] = state
            position = len(self.log) + 1
            self.log.append(
                RecordedEvent(
                    position=position,
                    tx_id=tx_id,
                    stream_id=order_id,
                    version=state.version,
                    event=event,
                    recorded_at=BASE_TIME + timedelta(seconds=position, microseconds=position * 7),
                )
            )


def run(commands: Iterable[Command]) -> History:
    """Validates and decides each command in turn; refused commands are skipped, as the bus does."""
    history = History()
    for command in commands:
        try:
            validate(CommandEnvelope(command))
            events = decide(history.states.get(command.order_id), command)
        except OrdersError:
            continue
        history.record(command.order_id, events)
    return history


def histories() -> st.SearchStrategy[History]:
    """Valid event logs of a few orders, built by the domain itself."""
    return command_sequences().map(run)


# --- arbitrary values for codecs --------------------------------------------------------------


def any_addresses() -> st.SearchStrategy[Address]:
    return st.builds(
        Address,
        recipient=st.text(),
        line1=st.text(),
        city=st.text(),
        postal_code=st.text(),
        country_code=st.text(),
        line2=st.text(),
        region=st.text(),
    )


def events() -> st.SearchStrategy[Event]:
    """One event of every type, with arbitrary field values."""
    return st.one_of(
        st.builds(
            OrderCreated, customer_id=st.text(), currency_code=st.text(), shipping_address=st.none() | any_addresses()
        ),
        st.builds(ItemAdded, sku=st.text(), name=st.text(), quantity=st.integers(), unit_price_minor=st.integers()),
        st.builds(ItemRemoved, sku=st.text()),
        st.builds(ShippingAddressChanged, shipping_address=any_addresses()),
        st.just(OrderConfirmed()),
        st.builds(OrderShipped, carrier=st.text(), tracking_number=st.text()),
        st.builds(OrderCancelled, reason=st.text()),
    )


INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def order_views(
    *,
    text: st.SearchStrategy[str] | None = None,
    quantities: st.SearchStrategy[int] | None = None,
    prices: st.SearchStrategy[int] | None = None,
    times: st.SearchStrategy[int] | None = None,
) -> st.SearchStrategy[OrderView]:
    """Order views; any text and any 64-bit number by default (the stored JSON's range), narrowed by
    the arguments where a format needs it (protobuf)."""
    text = st.text() if text is None else text
    quantities = INT64 if quantities is None else quantities
    prices = INT64 if prices is None else prices
    times = INT64 if times is None else times
    lines = st.lists(
        st.builds(ViewLine, sku=text, name=text, quantity=quantities, unit_price_minor=prices), max_size=5
    ).map(tuple)
    address = st.builds(
        Address,
        recipient=text,
        line1=text,
        city=text,
        postal_code=text,
        country_code=text,
        line2=text,
        region=text,
    )
    return st.builds(
        OrderView,
        order_id=text,
        customer_id=text,
        currency_code=text,
        status=st.sampled_from(STATUS_NAMES),
        created_at_us=times,
        updated_at_us=times,
        version=st.integers(min_value=1, max_value=2**62),
        lines=lines,
        shipping_address=st.none() | address,
        carrier=text,
        tracking_number=text,
        cancellation_reason=text,
    )


def protobuf_order_views() -> st.SearchStrategy[OrderView]:
    """Views whose numbers fit the Order message (int32 quantity, in-range prices, post-epoch times)."""
    return order_views(
        quantities=st.integers(min_value=1, max_value=MAX_QUANTITY),
        prices=st.integers(min_value=0, max_value=MAX_UNIT_PRICE_MINOR),
        times=st.integers(min_value=0, max_value=micros(datetime(2200, 1, 1, tzinfo=UTC))),
    )


TOKEN_PART_MAX = 10**20 - 1  # a token part has at most 20 digits


def log_positions() -> st.SearchStrategy[LogPosition]:
    part = st.integers(min_value=0, max_value=TOKEN_PART_MAX)
    return st.builds(LogPosition, tx_id=part, position=part)


def envelopes() -> st.SearchStrategy[CommandEnvelope]:
    maybe_text = st.none() | st.text(max_size=8)
    return st.builds(
        CommandEnvelope,
        command=commands(),
        command_id=maybe_text,
        expected_version=st.none() | st.integers(min_value=0, max_value=5),
        correlation_id=maybe_text,
    )
