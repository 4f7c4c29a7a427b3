"""What the command bus needs from the event store, named by the bus that needs it.

The bus (write_service/command_bus.py) reads one order's events, appends a command's
events guarded by the order's version and the command's id, and looks up a command id's
earlier result. `EventLog` names exactly those three calls, so the bus depends on this
small port rather than on PostgreSQL: `orders.store.event_store.EventStore` satisfies it
structurally (mypy checks that where write_service/main.py wires it), and the unit tests
run the bus against an in-memory log (tests/unit/fakes.py) that keeps the same rules;
tests/integration/test_event_log_contract.py runs one set of tests against both, so the
fake cannot drift from the store.
"""

from __future__ import annotations

from typing import Protocol

from orders.domain.events import Event
from orders.store.event_store import AppendRequest, AppendResult


class EventLog(Protocol):
    """An append-only log of order streams with a durable record of the command ids it applied."""

    async def read_stream(self, stream_id: str) -> list[Event]:
        """The stream's events in version order (none for an order that does not exist)."""
        ...

    async def append(self, request: AppendRequest, version: int, events: list[Event]) -> AppendResult:
        """Appends `events` after `version` and records the request's command id with the last of them,
        atomically. When the command id was recorded before, appends nothing and returns that earlier
        result (whatever `version` says). Raises `VersionTaken` when one of the new versions (or the
        command id) was taken by another writer first, and `CommandIdReused` when the command id was
        recorded for a request with another fingerprint."""
        ...

    async def earlier_result(self, request: AppendRequest) -> AppendResult | None:
        """The result recorded for the request's command id, or None (no command id, or never applied).
        Raises `CommandIdReused` when the command id was recorded for another request."""
        ...
