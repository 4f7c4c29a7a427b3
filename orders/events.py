"""Domain events: facts about an order, named in the past tense.

Each event type has a name (stored in the event table's `event_type` column)
and a schema version. `to_payload`/`from_payload` convert to and from the JSON
payload stored in PostgreSQL; they are the only place that knows that shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar


@dataclass(frozen=True)
class Address:
    recipient: str
    line1: str
    city: str
    postal_code: str
    country_code: str
    line2: str = ""
    region: str = ""


@dataclass(frozen=True)
class OrderCreated:
    customer_id: str
    currency_code: str
    shipping_address: Address | None = None
    schema_version: ClassVar[int] = 1


@dataclass(frozen=True)
class ItemAdded:
    sku: str
    name: str
    quantity: int
    unit_price_minor: int
    schema_version: ClassVar[int] = 1


@dataclass(frozen=True)
class ItemRemoved:
    sku: str
    schema_version: ClassVar[int] = 1


@dataclass(frozen=True)
class ShippingAddressChanged:
    shipping_address: Address
    schema_version: ClassVar[int] = 1


@dataclass(frozen=True)
class OrderConfirmed:
    schema_version: ClassVar[int] = 1


@dataclass(frozen=True)
class OrderShipped:
    carrier: str = ""
    tracking_number: str = ""
    schema_version: ClassVar[int] = 1


@dataclass(frozen=True)
class OrderCancelled:
    reason: str = ""
    schema_version: ClassVar[int] = 1


Event = OrderCreated | ItemAdded | ItemRemoved | ShippingAddressChanged | OrderConfirmed | OrderShipped | OrderCancelled

EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        OrderCreated,
        ItemAdded,
        ItemRemoved,
        ShippingAddressChanged,
        OrderConfirmed,
        OrderShipped,
        OrderCancelled,
    )
}


@dataclass(frozen=True)
class RecordedEvent:
    """An event as stored: where it sits in the global log and in its order's stream."""

    position: int  # global, unique; NOT commit order (see orders.event_store)
    tx_id: int  # writing transaction; (tx_id, position) is the commit-safe order
    stream_id: str  # the order id
    version: int  # 1-based position within the order's stream
    event: Event
    recorded_at: datetime
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


def event_type(event: Event) -> str:
    return type(event).__name__


def to_payload(event: Event) -> dict[str, Any]:
    return dataclasses.asdict(event)


def from_payload(type_name: str, schema_version: int, payload: dict[str, Any]) -> Event:
    cls = EVENT_TYPES.get(type_name)
    if cls is None:
        raise ValueError(f"unknown event type {type_name!r}")
    if schema_version != cls.schema_version:
        raise ValueError(f"{type_name} schema version {schema_version} is not supported")
    fields = dict(payload)
    if fields.get("shipping_address") is not None:
        fields["shipping_address"] = Address(**fields["shipping_address"])
    return cls(**fields)
