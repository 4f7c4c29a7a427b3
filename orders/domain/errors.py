"""Errors of the orders backend, independent of gRPC, asyncpg and redis.

Driver errors are converted to these at the storage boundary, and each servicer
maps them to gRPC status codes with one table.

    OrdersError
    ├── InvalidCommand          malformed input; carries field violations
    ├── OrderNotFound           no order with that id
    ├── CustomerNotFound        no orders of that customer
    ├── OrderAlreadyExists      CreateOrder with an id that is taken
    ├── RuleViolation           a business rule forbids the command; carries a reason
    ├── ConcurrencyConflict     expected version differs, or a racing writer won
    ├── CommandIdReused         command id already used for a different request
    ├── InvalidQuery            malformed query input (page token, consistency token)
    ├── ViewsNotReady           views have not caught up enough to answer
    ├── DeadlineExceeded        the caller's deadline passed before the work finished
    ├── PoisonEvent             a projection cannot apply a stored event
    ├── OrderNotParked          an operator retried an order that has no parked events
    └── Unavailable             PostgreSQL or Redis unreachable: retry
"""

from __future__ import annotations

from dataclasses import dataclass


class OrdersError(Exception):
    """Base of every error this backend raises on purpose."""


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field, named by its proto path (e.g. `unit_price.currency_code`)."""

    field: str
    description: str


class InvalidCommand(OrdersError):
    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


class InvalidQuery(InvalidCommand):
    """Same shape as InvalidCommand, raised by the read side."""


class OrderNotFound(OrdersError):
    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        super().__init__(f"order {order_id!r} not found")


class CustomerNotFound(OrdersError):
    def __init__(self, customer_id: str) -> None:
        self.customer_id = customer_id
        super().__init__(f"customer {customer_id!r} has no orders")


class OrderAlreadyExists(OrdersError):
    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        super().__init__(f"order {order_id!r} already exists")


class RuleViolation(OrdersError):
    """A business rule refuses the command; `reason` is a stable UPPER_SNAKE_CASE code."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class ConcurrencyConflict(OrdersError):
    pass


class CommandIdReused(OrdersError):
    def __init__(self, command_id: str) -> None:
        self.command_id = command_id
        super().__init__(f"command_id {command_id!r} was already used for a different request; use a new command_id")


class ViewsNotReady(OrdersError):
    """The views lag behind what the caller asked for; retrying later will succeed."""


class DeadlineExceeded(OrdersError):
    """The caller's deadline passed first; a command may or may not have been applied (retry it
    with the same command id to find out safely)."""


class PoisonEvent(OrdersError):
    """A projection cannot apply (or decode) the event at `position`; it stops there until fixed."""

    def __init__(self, position: int, stream_id: str, cause: BaseException) -> None:
        self.position = position
        self.stream_id = stream_id
        self.cause = cause
        super().__init__(f"event at position {position} of order {stream_id!r}: {type(cause).__name__}: {cause}")


class OrderNotParked(OrdersError):
    """RetryParkedOrder for an order with nothing in the projection's dead-letter list."""


class Unavailable(OrdersError):
    """A backing store is unreachable; the operation changed nothing and may be retried."""
