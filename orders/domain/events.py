"""Domain events: facts about an order, named in the past tense.

Each event type has a name (stored in the event table's `event_type` column)
and a schema version (`schema_version`, stored in the column of that name): the
version of its payload's shape. `to_payload` writes the current version;
`from_payload` reads any version from 1 to the current one, bringing older
payloads up to date with the upcasters of `orders.domain.upcasting`. Stored rows are
never rewritten. These two functions are the only place that knows the payload
shapes; docs/schema-versions.md says how to add a version.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from orders.domain.upcasting import missing_upcasters, upcast


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
    # 1: shipping_address was one free-text line (or null); 2: a structured Address
    schema_version: ClassVar[int] = 2


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
    # 1: shipping_address was one free-text line; 2: a structured Address
    schema_version: ClassVar[int] = 2


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

# A version bump without its upcaster fails here, when a process starts, not when it meets an old row.
_MISSING = missing_upcasters({name: cls.schema_version for name, cls in EVENT_TYPES.items()})
if _MISSING:
    raise RuntimeError(f"event schema versions without an upcaster from them (see orders.domain.upcasting): {_MISSING}")


@dataclass(frozen=True)
class RecordedEvent:
    """An event as stored: where it sits in the global log and in its order's stream."""

    position: int  # global, unique; NOT commit order (see orders.store.event_store)
    tx_id: int  # writing transaction; (tx_id, position) is the commit-safe order
    stream_id: str  # the order id
    version: int  # 1-based position within the order's stream
    event: Event
    recorded_at: datetime
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


def event_type(event: Event) -> str:
    return type(event).__name__


def to_payload(event: Event) -> dict[str, Any]:
    """The event's payload in its type's current schema version, `type(event).schema_version`."""
    return dataclasses.asdict(event)


def from_payload(type_name: str, schema_version: int, payload: dict[str, Any]) -> Event:
    """The event stored as `payload` of version `schema_version`, upcast to the current version.

    Raises ValueError for an unknown type, or a version below 1 or above the current one (a row
    written by newer code: deploy readers before writers). Does not modify `payload`.
    """
    cls = EVENT_TYPES.get(type_name)
    if cls is None:
        raise ValueError(f"unknown event type {type_name!r}")
    if not isinstance(payload, dict):  # a row's JSON may be anything
        raise TypeError(f"{type_name} payload is a {type(payload).__name__}, not an object")
    if schema_version != cls.schema_version:  # most rows are current: no upcasting, no copy
        if not 1 <= schema_version <= cls.schema_version:
            newer = " (written by newer code?)" if schema_version > cls.schema_version else ""
            raise ValueError(
                f"{type_name} schema version {schema_version} is not supported: "
                f"this code reads versions 1 to {cls.schema_version}{newer}"
            )
        payload = upcast(type_name, payload, schema_version, cls.schema_version)
    if (address := payload.get("shipping_address")) is not None:
        payload = {**payload, "shipping_address": Address(**address)}
    return cls(**payload)
