"""An order's status: the one list of its names, used by the rules, the projections and the read
service. The names are the `OrderStatus` values of the API (types.proto) without the prefix."""

from __future__ import annotations

from enum import StrEnum


class OrderStatus(StrEnum):
    PENDING = "PENDING"
    CONFIRMED = "CONFIRMED"
    SHIPPED = "SHIPPED"
    CANCELLED = "CANCELLED"


SPENDING = frozenset({OrderStatus.CONFIRMED, OrderStatus.SHIPPED})  # statuses whose total counts as spent
