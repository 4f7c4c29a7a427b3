"""One set of tests for the event log the command bus relies on (write_service.ports.EventLog), run
against the in-memory fake of the unit tests (tests/unit/fakes.py) and against the PostgreSQL
store (orders.store.event_store.EventStore): where the store appends, refuses or raises, the
fake must do the same, so the bus's unit tests stay true of the real thing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from orders.domain.errors import CommandIdReused
from orders.domain.events import ItemAdded, OrderCreated
from orders.store.event_store import AppendRequest, AppendResult, EventStore, VersionTaken, connect
from tests.unit.fakes import InMemoryEventLog
from write_service.ports import EventLog

OID = "order-1"
CREATED = OrderCreated("cust-1", "EUR")
ITEM = ItemAdded("SKU-1", "Widget", 1, 500)
OTHER_ITEM = ItemAdded("SKU-2", "Gadget", 2, 700)


def request(command_id: str | None = None, fingerprint: str = "fp-1", stream_id: str = OID) -> AppendRequest:
    return AppendRequest(stream_id, command_id, fingerprint, {"command": "Test"})


class EventLogContract:
    """The rules of an EventLog; each subclass provides the `log` fixture under test."""

    async def test_a_stream_never_written_has_no_events(self, log: EventLog) -> None:
        assert await log.read_stream("nobody") == []

    async def test_appended_events_are_read_back_in_version_order(self, log: EventLog) -> None:
        """One append may write several events; the result is the version of the last one."""
        first = await log.append(request(), 0, [CREATED])
        second = await log.append(request(), 1, [ITEM, OTHER_ITEM])

        assert (first.stream_id, first.version, first.appended) == (OID, 1, ("OrderCreated",))
        assert (second.version, second.appended) == (3, ("ItemAdded", "ItemAdded"))
        assert await log.read_stream(OID) == [CREATED, ITEM, OTHER_ITEM]

    async def test_positions_increase_from_append_to_append(self, log: EventLog) -> None:
        """Results' positions (consistency tokens) increase, across streams too."""
        first = await log.append(request(), 0, [CREATED])
        other = await log.append(request(stream_id="order-2"), 0, [CREATED])
        second = await log.append(request(), 1, [ITEM, OTHER_ITEM])

        assert first.last < other.last < second.last

    async def test_an_append_on_a_taken_version_raises_version_taken_and_writes_nothing(self, log: EventLog) -> None:
        """UNIQUE (stream, version): the second writer of a version loses, with none of its events."""
        await log.append(request(), 0, [CREATED])
        await log.append(request(), 1, [ITEM])

        with pytest.raises(VersionTaken):
            await log.append(request(), 0, [CREATED])
        with pytest.raises(VersionTaken):
            await log.append(request(), 1, [OTHER_ITEM, ITEM])  # version 3 is free, version 2 is not

        assert await log.read_stream(OID) == [CREATED, ITEM]

    async def test_every_version_of_an_append_is_checked_and_only_for_uniqueness(self, log: EventLog) -> None:
        """The table holds UNIQUE (stream, version) and no rule that versions follow without a gap
        (the bus never leaves one): an append whose first version is free but whose second is
        taken loses as a whole."""
        await log.append(request(), 0, [CREATED])
        await log.append(request(), 2, [OTHER_ITEM])  # versions 1 and 3: 2 is free

        with pytest.raises(VersionTaken):
            await log.append(request(), 1, [ITEM, ITEM])

        assert await log.read_stream(OID) == [CREATED, OTHER_ITEM]

    async def test_a_recorded_command_id_returns_its_earlier_result_and_writes_nothing(self, log: EventLog) -> None:
        """The command id is looked up before the version: a retry on a stale version (or the
        current one) gets the first result, with nothing appended."""
        await log.append(request(), 0, [CREATED])
        first = await log.append(request("add-once"), 1, [ITEM])

        on_stale = await log.append(request("add-once"), 1, [ITEM])
        on_current = await log.append(request("add-once"), 2, [ITEM])

        for again in (on_stale, on_current):
            assert (again.stream_id, again.version, again.last, again.appended) == (OID, 2, first.last, ())
        assert await log.read_stream(OID) == [CREATED, ITEM]

    async def test_the_earlier_result_is_that_of_the_commands_last_event(self, log: EventLog) -> None:
        await log.append(request(), 0, [CREATED])
        first = await log.append(request("add-two"), 1, [ITEM, OTHER_ITEM])

        earlier = await log.earlier_result(request("add-two"))

        assert earlier is not None
        assert (earlier.stream_id, earlier.version, earlier.last, earlier.appended) == (OID, 3, first.last, ())

    async def test_a_command_id_recorded_for_another_request_is_refused(self, log: EventLog) -> None:
        """Same id, other fingerprint: CommandIdReused from both calls, nothing appended."""
        await log.append(request(), 0, [CREATED])
        await log.append(request("reused", fingerprint="fp-add"), 1, [ITEM])

        with pytest.raises(CommandIdReused):
            await log.append(request("reused", fingerprint="fp-other"), 2, [OTHER_ITEM])
        with pytest.raises(CommandIdReused):
            await log.earlier_result(request("reused", fingerprint="fp-other"))

        assert await log.read_stream(OID) == [CREATED, ITEM]

    async def test_no_earlier_result_without_a_recorded_command_id(self, log: EventLog) -> None:
        await log.append(request(), 0, [CREATED])

        assert await log.earlier_result(request(None)) is None
        assert await log.earlier_result(request("never-seen")) is None

    async def test_a_losing_append_records_no_command_id(self, log: EventLog) -> None:
        """A command id whose append conflicted is not recorded: its retry is decided and appended."""
        await log.append(request(), 0, [CREATED])
        with pytest.raises(VersionTaken):
            await log.append(request("lost-the-race"), 0, [CREATED])

        assert await log.earlier_result(request("lost-the-race")) is None
        retried = await log.append(request("lost-the-race"), 1, [ITEM])
        assert (retried.version, retried.appended) == (2, ("ItemAdded",))

    async def test_appends_without_a_command_id_are_never_deduplicated(self, log: EventLog) -> None:
        await log.append(request(None), 0, [CREATED])
        await log.append(request(None), 1, [ITEM])
        await log.append(request(None), 2, [ITEM])

        assert await log.read_stream(OID) == [CREATED, ITEM, ITEM]

    async def test_an_append_of_no_events_fails(self, log: EventLog) -> None:
        """The bus never asks for it; both logs refuse rather than record a command that wrote nothing."""
        with pytest.raises(ValueError):  # noqa: PT011 - the store's error carries no message of ours
            await log.append(request("nothing"), 0, [])

        assert await log.earlier_result(request("nothing")) is None

    async def test_appends_sent_together_each_get_their_own_outcome(self, log: EventLog) -> None:
        """Concurrent appends (the store sends them in one batch): each gets the outcome it would get
        alone, in the order they were sent; a refusal of one writes nothing of it and fails no other.
        A second append on an order already being written was decided before the first: it loses."""
        await log.append(request(), 0, [CREATED])
        applied = await log.append(request("applied", stream_id="order-r"), 0, [CREATED])

        outcomes = await asyncio.gather(
            log.append(request("new-a", stream_id="order-a"), 0, [CREATED]),
            log.append(request("taken"), 0, [CREATED]),
            log.append(request("applied", stream_id="order-r"), 0, [CREATED]),
            log.append(request("applied", fingerprint="fp-other", stream_id="order-s"), 0, [CREATED]),
            log.append(request(None, stream_id="order-b"), 0, [CREATED, ITEM]),
            log.append(request(None, stream_id="order-a"), 0, [CREATED]),
            return_exceptions=True,
        )

        new_a, taken, repeated, reused, two_events, second_on_a = outcomes
        assert isinstance(new_a, AppendResult)
        assert (new_a.version, new_a.appended) == (1, ("OrderCreated",))
        assert isinstance(taken, VersionTaken)
        assert repeated == AppendResult("order-r", 1, applied.last)
        assert isinstance(reused, CommandIdReused)
        assert isinstance(two_events, AppendResult)
        assert (two_events.version, two_events.appended) == (2, ("OrderCreated", "ItemAdded"))
        assert isinstance(second_on_a, VersionTaken)
        streams = ["order-a", OID, "order-r", "order-s", "order-b"]
        assert [len(await log.read_stream(s)) for s in streams] == [1, 1, 1, 0, 2]
        assert await log.earlier_result(request("taken")) is None

    async def test_positions_increase_within_appends_sent_together(self, log: EventLog) -> None:
        """Each result's position is its own last event's: distinct, and after everything before."""
        before = await log.append(request(), 0, [CREATED])

        results = await asyncio.gather(
            *(log.append(request(stream_id=f"together-{i}"), 0, [CREATED]) for i in range(8))
        )

        assert len({r.last for r in results}) == 8
        assert all(before.last < r.last for r in results)


class TestInMemoryEventLog(EventLogContract):
    @pytest.fixture
    def log(self) -> EventLog:
        return InMemoryEventLog()


class TestPostgresEventStore(EventLogContract):
    @pytest.fixture
    async def log(self, database_url: str) -> AsyncIterator[EventLog]:
        pool = await connect(database_url, max_size=2)
        try:
            yield EventStore(pool)
        finally:
            await pool.close()
