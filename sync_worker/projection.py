"""The order view projection: a pure fold of an order's events into its view."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import singledispatch

from orders.events import (
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
from orders.views import OrderView, ViewLine

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
    at_us = (recorded.recorded_at - EPOCH) // timedelta(microseconds=1)  # exact, unlike float seconds
    if view is None:
        return _created(recorded, at_us)
    return replace(_apply(recorded.event, view), version=recorded.version, updated_at_us=at_us)


def _created(recorded: RecordedEvent, at_us: int) -> OrderView:
    event = recorded.event
    if not isinstance(event, OrderCreated):
        raise ProjectionGap(f"order {recorded.stream_id!r} starts with {type(event).__name__}")
    return OrderView(
        order_id=recorded.stream_id,
        customer_id=event.customer_id,
        currency_code=event.currency_code,
        status="PENDING",
        created_at_us=at_us,
        updated_at_us=at_us,
        version=1,
        shipping_address=event.shipping_address,
    )


@singledispatch
def _apply(event: Event, view: OrderView) -> OrderView:
    raise ProjectionGap(f"unexpected {type(event).__name__} in order {view.order_id!r}")


@_apply.register
def _(event: ItemAdded, view: OrderView) -> OrderView:
    lines = list(view.lines)
    for i, line in enumerate(lines):
        if line.sku == event.sku:
            lines[i] = replace(line, name=event.name, quantity=line.quantity + event.quantity)
            break
    else:
        lines.append(ViewLine(event.sku, event.name, event.quantity, event.unit_price_minor))
    return replace(view, lines=tuple(lines))


@_apply.register
def _(event: ItemRemoved, view: OrderView) -> OrderView:
    return replace(view, lines=tuple(line for line in view.lines if line.sku != event.sku))


@_apply.register
def _(event: ShippingAddressChanged, view: OrderView) -> OrderView:
    return replace(view, shipping_address=event.shipping_address)


@_apply.register
def _(event: OrderConfirmed, view: OrderView) -> OrderView:
    return replace(view, status="CONFIRMED")


@_apply.register
def _(event: OrderShipped, view: OrderView) -> OrderView:
    return replace(view, status="SHIPPED", carrier=event.carrier, tracking_number=event.tracking_number)


@_apply.register
def _(event: OrderCancelled, view: OrderView) -> OrderView:
    return replace(view, status="CANCELLED", cancellation_reason=event.reason)


def fold(events: list[RecordedEvent]) -> dict[str, OrderView]:
    """Every order's view from scratch: the reference the incremental projection must equal."""
    views: dict[str, OrderView] = {}
    for recorded in events:
        views[recorded.stream_id] = project(views.get(recorded.stream_id), recorded)
    return views
