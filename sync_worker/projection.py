"""The order view projection: a pure fold of an order's events into its view."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from orders.domain.events import (
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
from orders.domain.status import OrderStatus
from orders.store.views import OrderView, ViewLine

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class ProjectionGap(Exception):
    """An event does not follow the view's version: applying it would corrupt the view."""


def project(view: OrderView | None, recorded: RecordedEvent) -> OrderView:
    """The view after `recorded`, which must be the view's next event."""
    expected = 1 if view is None else view.version + 1
    if recorded.version != expected:
        raise ProjectionGap(
            f"order {recorded.stream_id!r}: got event version {recorded.version} at position "
            f"{recorded.position}, expected version {expected}"
        )
    at_us = (recorded.recorded_at - EPOCH) // _MICROSECOND  # exact, unlike float seconds
    if view is None:
        return _created(recorded, at_us)
    changes = _CHANGES.get(type(recorded.event))
    if changes is None:
        raise ProjectionGap(f"unexpected {type(recorded.event).__name__} in order {view.order_id!r}")
    return _evolved(view, {**changes(recorded.event, view), "version": recorded.version, "updated_at_us": at_us})


def _evolved(view: OrderView, changes: Changes) -> OrderView:
    """A new view: `view` with `changes`. One per event, so the fold's largest cost: built by copying
    the fields' dict, four times faster than OrderView's __init__ (a frozen dataclass's sets each of
    its twelve fields through object.__setattr__) or dataclasses.replace. Equal to what __init__
    would build: OrderView has no __post_init__, no slots, and `changes` only names its fields."""
    new = object.__new__(OrderView)
    fields = new.__dict__
    fields.update(view.__dict__)
    fields.update(changes)
    return new


def _created(recorded: RecordedEvent, at_us: int) -> OrderView:
    event = recorded.event
    if not isinstance(event, OrderCreated):
        raise ProjectionGap(f"order {recorded.stream_id!r} starts with {type(event).__name__}")
    return OrderView(
        order_id=recorded.stream_id,
        customer_id=event.customer_id,
        currency_code=event.currency_code,
        status=OrderStatus.PENDING,
        created_at_us=at_us,
        updated_at_us=at_us,
        version=1,
        shipping_address=event.shipping_address,
    )


Changes = dict[str, Any]  # the fields of the view an event changes


def _item_added(event: ItemAdded, view: OrderView) -> Changes:
    lines = list(view.lines)
    for i, line in enumerate(lines):
        if line.sku == event.sku:
            lines[i] = ViewLine(line.sku, event.name, line.quantity + event.quantity, line.unit_price_minor)
            break
    else:
        lines.append(ViewLine(event.sku, event.name, event.quantity, event.unit_price_minor))
    return {"lines": tuple(lines)}


def _item_removed(event: ItemRemoved, view: OrderView) -> Changes:
    return {"lines": tuple(line for line in view.lines if line.sku != event.sku)}


def _address_changed(event: ShippingAddressChanged, view: OrderView) -> Changes:
    return {"shipping_address": event.shipping_address}


def _confirmed(event: OrderConfirmed, view: OrderView) -> Changes:
    return {"status": OrderStatus.CONFIRMED}


def _shipped(event: OrderShipped, view: OrderView) -> Changes:
    return {"status": OrderStatus.SHIPPED, "carrier": event.carrier, "tracking_number": event.tracking_number}


def _cancelled(event: OrderCancelled, view: OrderView) -> Changes:
    return {"status": OrderStatus.CANCELLED, "cancellation_reason": event.reason}


# What each event after the first changes (OrderCreated only starts a view).
_CHANGES: dict[type[Event], Callable[[Any, OrderView], Changes]] = {
    ItemAdded: _item_added,
    ItemRemoved: _item_removed,
    ShippingAddressChanged: _address_changed,
    OrderConfirmed: _confirmed,
    OrderShipped: _shipped,
    OrderCancelled: _cancelled,
}


def fold(events: list[RecordedEvent]) -> dict[str, OrderView]:
    """Every order's view from scratch: the reference the incremental projection must equal."""
    views: dict[str, OrderView] = {}
    for recorded in events:
        views[recorded.stream_id] = project(views.get(recorded.stream_id), recorded)
    return views
