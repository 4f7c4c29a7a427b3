"""Commands: requests to change an order, named in the imperative.

They are plain frozen dataclasses with no I/O; the write service builds them
from gRPC requests, and `orders.domain.rules` validates and decides them.
"""

from __future__ import annotations

from dataclasses import dataclass

from orders.domain.events import Address


@dataclass(frozen=True)
class CreateOrder:
    order_id: str
    customer_id: str
    currency_code: str
    shipping_address: Address | None = None


@dataclass(frozen=True)
class AddItem:
    order_id: str
    sku: str
    name: str
    quantity: int
    unit_price_minor: int
    currency_code: str


@dataclass(frozen=True)
class RemoveItem:
    order_id: str
    sku: str


@dataclass(frozen=True)
class ChangeShippingAddress:
    order_id: str
    shipping_address: Address


@dataclass(frozen=True)
class ConfirmOrder:
    order_id: str


@dataclass(frozen=True)
class ShipOrder:
    order_id: str
    carrier: str = ""
    tracking_number: str = ""


@dataclass(frozen=True)
class CancelOrder:
    order_id: str
    reason: str = ""


Command = CreateOrder | AddItem | RemoveItem | ChangeShippingAddress | ConfirmOrder | ShipOrder | CancelOrder


@dataclass(frozen=True)
class CommandEnvelope:
    """A command plus what the caller said about how to apply it."""

    command: Command
    command_id: str | None = None  # idempotency key
    expected_version: int | None = None  # optimistic concurrency check
    correlation_id: str | None = None  # carried into the events' metadata
    caller: str | None = None  # the authenticated caller (orders.server.security), carried into the events' metadata
