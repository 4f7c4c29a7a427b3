"""The command bus: validates a command, decides it on its order's state, appends the result.

Every command targets one order. The common path is one PostgreSQL round trip:
the order's state comes from a cache of states this process has seen, the pure
rules decide (orders.domain.rules), and one statement appends the events guarded by
the order's version and the command's id (write_service.ports.EventLog, which
orders.store.event_store.EventStore implements on PostgreSQL). The cache is a
hint, never the truth: an append on a stale version conflicts on the version's
unique key, and a refusal decided on cached state is decided again on events
read from the store, so a cache that is behind (another replica wrote) costs a
round trip, never a wrong answer. docs/design.md explains the trade.

Commands on one order take turns in this process (OrderTurns): each is decided on the state the
previous one left, so they never conflict with each other. The store sends an order's appends
one at a time anyway (group commit keeps one command per order in a batch), so the turns cost
nothing, and they spare the doomed appends and re-reads that racing decisions would cost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from orders.domain.commands import CommandEnvelope, CreateOrder
from orders.domain.errors import ConcurrencyConflict, OrdersError
from orders.domain.events import Event
from orders.domain.rules import OrderState, decide, evolve, replay, validate
from orders.store.event_store import AppendRequest, AppendResult, VersionTaken, command_deadline
from orders.telemetry.tracing import current_traceparent
from write_service.ports import EventLog

ATTEMPTS = 5  # decisions per command: the first may use cached state, every later one reads the store
DEFAULT_CACHE_SIZE = 10_000  # order states kept, least recently used dropped first


def fingerprint(envelope: CommandEnvelope) -> str:
    """Identifies a request's content, so a reused command id with other content is caught."""
    command = envelope.command
    body = {"type": type(command).__name__, "expected_version": envelope.expected_version}
    body.update(dataclasses.asdict(command))
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Known:
    """An order's state at a version (None and 0: no such order), and whether it was just read."""

    state: OrderState | None
    version: int
    fresh: bool


class StateCache:
    """The newest order states this process decided on, least recently used dropped first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._states: OrderedDict[str, OrderState] = OrderedDict()

    def get(self, order_id: str) -> OrderState | None:
        state = self._states.get(order_id)
        if state is not None:
            self._states.move_to_end(order_id)
        return state

    def put(self, state: OrderState) -> None:
        held = self._states.get(state.order_id)
        if held is not None and held.version > state.version:  # a racing command of this process got further
            return
        self._states[state.order_id] = state
        self._states.move_to_end(state.order_id)
        if len(self._states) > self._size:
            self._states.popitem(last=False)

    def drop(self, order_id: str) -> None:
        self._states.pop(order_id, None)


class OrderTurns:
    """One turn at a time per order: a lock for each order that has commands in this process."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiting: dict[str, int] = {}  # commands holding or waiting for each order's lock

    @asynccontextmanager
    async def turn(self, order_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(order_id, asyncio.Lock())
        self._waiting[order_id] = self._waiting.get(order_id, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._waiting[order_id] -= 1
            if self._waiting[order_id] == 0:  # nobody else needs it: forget the order
                del self._waiting[order_id], self._locks[order_id]


class CommandBus:
    """Applies commands to an event log (any `EventLog`: PostgreSQL in service, in memory in unit tests)."""

    def __init__(self, store: EventLog, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self._store = store
        self._cache = StateCache(cache_size)
        self._turns = OrderTurns()

    async def dispatch(self, envelope: CommandEnvelope, timeout: float) -> AppendResult:
        """Applies the command once; raises an OrdersError when it is refused."""
        validate(envelope)
        request = AppendRequest(
            stream_id=envelope.command.order_id,
            command_id=envelope.command_id,
            fingerprint=fingerprint(envelope),
            metadata=_metadata(envelope),
        )
        async with command_deadline(timeout), self._turns.turn(request.stream_id):
            for attempt in range(ATTEMPTS):
                result = await self._attempt(envelope, request, use_cache=attempt == 0)
                if result is not None:
                    return result
        raise ConcurrencyConflict(f"order {request.stream_id!r} kept changing under concurrent writers; retry")

    async def _attempt(self, envelope: CommandEnvelope, request: AppendRequest, use_cache: bool) -> AppendResult | None:
        """The command's result, or None when it must be decided again on fresh events."""
        known = await self._known(envelope, use_cache)
        try:
            events = _decide(envelope, known)
        except OrdersError:
            if not known.fresh:
                return None  # refused on cached state, which may be behind: ask the store
            # A refusal of a command that was applied before (a retry) is that earlier success.
            earlier = await self._store.earlier_result(request)
            if earlier is None:
                raise
            return earlier
        try:
            result = await self._store.append(request, known.version, events)
        except VersionTaken:
            self._cache.drop(request.stream_id)
            return None
        if result.appended:
            state = known.state
            for event in events:
                state = evolve(state, event, request.stream_id)
            if state is not None:
                self._cache.put(state)
        return result

    async def _known(self, envelope: CommandEnvelope, use_cache: bool) -> Known:
        order_id = envelope.command.order_id
        if use_cache:
            cached = self._cache.get(order_id)
            if cached is not None:
                return Known(cached, cached.version, fresh=False)
            if isinstance(envelope.command, CreateOrder):
                return Known(None, 0, fresh=False)  # most creates are of new orders; version 1 guards the rest
        state = replay(order_id, await self._store.read_stream(order_id))
        if state is not None:
            self._cache.put(state)
        return Known(state, 0 if state is None else state.version, fresh=True)


def _decide(envelope: CommandEnvelope, known: Known) -> list[Event]:
    expected = envelope.expected_version
    if expected is not None and expected != known.version:
        order_id = envelope.command.order_id
        raise ConcurrencyConflict(f"order {order_id!r} is at version {known.version}, expected {expected}")
    return decide(known.state, envelope.command)


def _metadata(envelope: CommandEnvelope) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "command": type(envelope.command).__name__,
        "command_id": envelope.command_id,
        "correlation_id": envelope.correlation_id,
    }
    if envelope.caller is not None:
        metadata["caller"] = envelope.caller
    traceparent = current_traceparent()  # None unless tracing is on (orders.telemetry.tracing)
    if traceparent is not None:
        metadata["traceparent"] = traceparent
    return metadata
