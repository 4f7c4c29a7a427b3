"""The command bus: validates a command, then runs it against its order's events.

Every command targets one order, so every handler has the same shape: load
the order's events, fold them into its state, let the pure rules decide, and
append the result in the same transaction (orders.event_store). The rules for
each command type are in orders.domain.decide.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from orders.commands import CommandEnvelope
from orders.domain import decide, replay, validate
from orders.event_store import AppendRequest, AppendResult, EventStore
from orders.events import Event
from orders.tracing import current_traceparent


def fingerprint(envelope: CommandEnvelope) -> str:
    """Identifies a request's content, so a reused command id with other content is caught."""
    command = envelope.command
    body = {"type": type(command).__name__, "expected_version": envelope.expected_version}
    body.update(dataclasses.asdict(command))
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class CommandBus:
    def __init__(self, store: EventStore) -> None:
        self._store = store

    async def dispatch(self, envelope: CommandEnvelope, timeout: float) -> AppendResult:
        """Applies the command once; raises an OrdersError when it is refused."""
        validate(envelope)
        command = envelope.command
        order_id = command.order_id

        def decide_on(history: list[Event]) -> list[Event]:
            return decide(replay(order_id, history), command)

        metadata = {
            "command": type(command).__name__,
            "command_id": envelope.command_id,
            "correlation_id": envelope.correlation_id,
        }
        if envelope.caller is not None:
            metadata["caller"] = envelope.caller
        traceparent = current_traceparent()  # None unless tracing is on (orders.tracing)
        if traceparent is not None:
            metadata["traceparent"] = traceparent
        request = AppendRequest(
            stream_id=order_id,
            decide=decide_on,
            command_id=envelope.command_id,
            fingerprint=fingerprint(envelope),
            expected_version=envelope.expected_version,
            metadata=metadata,
        )
        return await self._store.execute(request, timeout)
