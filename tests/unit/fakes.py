"""In-memory stand-ins for the write service's ports, keeping the rules PostgreSQL enforces.

`InMemoryEventLog` implements write_service.ports.EventLog the way
orders.store.event_store.EventStore does on PostgreSQL, so the command bus can be unit
tested without servers. tests/integration/test_event_log_contract.py runs the same tests
against both, so where the store raises an error, this raises the same one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from orders.domain.consistency import LogPosition
from orders.domain.errors import CommandIdReused
from orders.domain.events import Event, RecordedEvent, event_type, from_payload, to_payload
from orders.store.event_store import AppendRequest, AppendResult, VersionTaken


@dataclass(frozen=True)
class _Processed:
    """A row of processed_commands: the command id's fingerprint and where its last event sits."""

    fingerprint: str
    result: AppendResult  # with no `appended`: a repeated command appends nothing

    def result_for(self, request: AppendRequest) -> AppendResult:
        if self.fingerprint != request.fingerprint:
            raise CommandIdReused(str(request.command_id))
        return self.result


class InMemoryEventLog:
    """The event store's rules, in memory:

    - UNIQUE (stream_id, version): an append on a taken version raises VersionTaken and writes nothing;
      only uniqueness is checked, as in the table (no rule that versions follow without a gap);
    - a command id recorded before is looked up before any version is checked: the same request gets
      its earlier result and nothing is written, another request (fingerprint) gets CommandIdReused;
    - one append is one transaction: its events get increasing positions and one transaction id, both
      greater than any before, so results' positions (consistency tokens) increase;
    - payloads go through their stored form (to_payload, JSON, from_payload), as they do in jsonb;
    - concurrent appends apply one after another in the order they were called, which is what the
      store's group commit promises (a batch holds one append per order and per command id, and a
      later one on the same order waits for the next batch).

    Tests can see what was written (`recorded`) and which streams the bus read (`reads`)."""

    def __init__(self) -> None:
        self.recorded: list[RecordedEvent] = []
        self.reads: list[str] = []
        self._processed: dict[str, _Processed] = {}
        self._position = 0
        self._tx_id = 0

    def stream(self, stream_id: str) -> list[RecordedEvent]:
        """The stream's events as stored, in version order."""
        return sorted((r for r in self.recorded if r.stream_id == stream_id), key=lambda r: r.version)

    async def read_stream(self, stream_id: str) -> list[Event]:
        self.reads.append(stream_id)
        return [r.event for r in self.stream(stream_id)]

    async def append(self, request: AppendRequest, version: int, events: list[Event]) -> AppendResult:
        earlier = self._earlier(request)
        if earlier is not None:
            return earlier.result_for(request)
        versions = range(version + 1, version + 1 + len(events))
        taken = {r.version for r in self.stream(request.stream_id)}
        if taken.intersection(versions):
            raise VersionTaken(request.stream_id)
        if not events:  # the store fails too: its result's position comes from the last event written
            raise ValueError("an append writes at least one event")
        self._tx_id += 1
        for stream_version, event in zip(versions, events, strict=True):
            self._position += 1
            self.recorded.append(self._stored(request, stream_version, event))
        last = LogPosition(self._tx_id, self._position)
        if request.command_id is not None:
            result = AppendResult(request.stream_id, versions[-1], last)
            self._processed[request.command_id] = _Processed(request.fingerprint, result)
        return AppendResult(request.stream_id, versions[-1], last, tuple(event_type(e) for e in events))

    async def earlier_result(self, request: AppendRequest) -> AppendResult | None:
        earlier = self._earlier(request)
        return None if earlier is None else earlier.result_for(request)

    def _earlier(self, request: AppendRequest) -> _Processed | None:
        return None if request.command_id is None else self._processed.get(request.command_id)

    def _stored(self, request: AppendRequest, version: int, event: Event) -> RecordedEvent:
        payload = json.loads(json.dumps(to_payload(event)))
        return RecordedEvent(
            position=self._position,
            tx_id=self._tx_id,
            stream_id=request.stream_id,
            version=version,
            event=from_payload(event_type(event), event.schema_version, payload),
            recorded_at=datetime.now(UTC),
            metadata=json.loads(json.dumps(request.metadata)),
        )
