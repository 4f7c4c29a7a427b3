"""The command bus (write_service/command_bus.py) against an in-memory event log (tests/unit/fakes.py).

What tests/integration/test_write_replicas.py shows through two gRPC servers, here without any:
a version conflict is decided again on fresh events (and given up after a bounded number of
attempts), a repeated command returns its first result, a reused command id is refused, and the
cache of order states is a hint that can cost a read, never a wrong answer. Two buses on one log
are two write-service replicas, each with a cache of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from orders.domain.commands import AddItem, Command, CommandEnvelope, ConfirmOrder, CreateOrder, ShipOrder
from orders.domain.errors import CommandIdReused, ConcurrencyConflict, OrderAlreadyExists, RuleViolation
from orders.domain.events import Address, Event, ItemAdded
from orders.store.event_store import AppendRequest, AppendResult
from tests.unit.fakes import InMemoryEventLog
from write_service.command_bus import ATTEMPTS, CommandBus

OID = "order-1"
ADDRESS = Address("Ada Lovelace", "1 Main Street", "Berlin", "10115", "DE")
CREATE = CreateOrder(OID, "cust-1", "EUR", ADDRESS)
CONFIRM = ConfirmOrder(OID)
TIMEOUT = 10.0


def add(sku: str = "SKU-1", quantity: int = 1) -> AddItem:
    return AddItem(OID, sku, "Widget", quantity, 500, "EUR")


async def run(bus: CommandBus, command: Command, command_id: str | None = None) -> AppendResult:
    return await bus.dispatch(CommandEnvelope(command, command_id=command_id), TIMEOUT)


def stored(log: InMemoryEventLog) -> list[tuple[int, str]]:
    """The order's stream as (version, event type)."""
    return [(r.version, type(r.event).__name__) for r in log.stream(OID)]


class Interleaved:
    """An event log on which a rival writer acts just before each of the next `times` appends:
    the write of another replica that lands between this bus's decision and its append."""

    def __init__(self, log: InMemoryEventLog, rival: Callable[[], Awaitable[object]], times: int) -> None:
        self.log = log
        self.rival = rival
        self.times = times
        self.appends = 0

    async def read_stream(self, stream_id: str) -> list[Event]:
        return await self.log.read_stream(stream_id)

    async def append(self, request: AppendRequest, version: int, events: list[Event]) -> AppendResult:
        self.appends += 1
        if self.times > 0:
            self.times -= 1
            await self.rival()
        return await self.log.append(request, version, events)

    async def earlier_result(self, request: AppendRequest) -> AppendResult | None:
        return await self.log.earlier_result(request)


@pytest.fixture
def log() -> InMemoryEventLog:
    return InMemoryEventLog()


# --- the common path -------------------------------------------------------------------------


async def test_commands_on_an_order_this_bus_knows_are_decided_on_its_cache(log: InMemoryEventLog) -> None:
    """A create, then commands on the order the bus has seen: appended, without reading the stream."""
    bus = CommandBus(log)

    await run(bus, CREATE)
    await run(bus, add())
    confirmed = await run(bus, CONFIRM)

    assert (confirmed.version, confirmed.appended) == (3, ("OrderConfirmed",))
    assert stored(log) == [(1, "OrderCreated"), (2, "ItemAdded"), (3, "OrderConfirmed")]
    assert log.reads == []


# --- version conflicts -----------------------------------------------------------------------


async def test_an_append_that_conflicts_is_decided_again_on_fresh_events(log: InMemoryEventLog) -> None:
    """Another writer appends between this bus's decision and its append: the append conflicts on
    the version, the bus reads the stream and appends on top of the other writer's event."""
    rival = CommandBus(log)
    await run(rival, CREATE)
    bus = CommandBus(Interleaved(log, lambda: run(rival, add("RIVAL")), times=1))

    added = await run(bus, add("MINE"))

    assert added.version == 3
    assert stored(log) == [(1, "OrderCreated"), (2, "ItemAdded"), (3, "ItemAdded")]
    assert [r.event.sku for r in log.stream(OID)[1:] if isinstance(r.event, ItemAdded)] == ["RIVAL", "MINE"]


async def test_a_conflict_is_decided_again_so_the_newer_state_can_refuse(log: InMemoryEventLog) -> None:
    """The other writer confirms the order between this bus's decision to add an item and its
    append: decided again on the confirmed order, the item is refused and nothing is appended."""
    rival = CommandBus(log)
    await run(rival, CREATE)
    await run(rival, add())
    bus = CommandBus(Interleaved(log, lambda: run(rival, CONFIRM), times=1))

    with pytest.raises(RuleViolation) as refused:
        await run(bus, add("LATE"))

    assert refused.value.reason == "ORDER_NOT_PENDING"
    assert stored(log) == [(1, "OrderCreated"), (2, "ItemAdded"), (3, "OrderConfirmed")]


async def test_a_command_that_keeps_conflicting_is_given_up_after_the_bounded_attempts(
    log: InMemoryEventLog,
) -> None:
    """Another writer wins the version before every one of this bus's appends: after ATTEMPTS
    decisions the command fails with ConcurrencyConflict (retryable), having appended nothing."""
    rival = CommandBus(log)
    await run(rival, CREATE)
    contested = Interleaved(log, lambda: run(rival, add("RIVAL")), times=ATTEMPTS + 10)
    bus = CommandBus(contested)

    with pytest.raises(ConcurrencyConflict):
        await run(bus, add("MINE"))

    assert contested.appends == ATTEMPTS
    assert len(stored(log)) == 1 + ATTEMPTS  # the create and the rival's items, none of this bus's
    assert all(not isinstance(r.event, ItemAdded) or r.event.sku == "RIVAL" for r in log.recorded)


class Slow:
    """An event log whose appends take a round trip (they yield to the event loop), as the store's do."""

    def __init__(self, log: InMemoryEventLog) -> None:
        self.log = log
        self.appends = 0

    async def read_stream(self, stream_id: str) -> list[Event]:
        return await self.log.read_stream(stream_id)

    async def append(self, request: AppendRequest, version: int, events: list[Event]) -> AppendResult:
        self.appends += 1
        await asyncio.sleep(0)
        return await self.log.append(request, version, events)

    async def earlier_result(self, request: AppendRequest) -> AppendResult | None:
        return await self.log.earlier_result(request)


async def test_concurrent_commands_on_one_order_take_turns_and_never_conflict(log: InMemoryEventLog) -> None:
    """Six items added to one order at once: each is decided on the state the previous one left, so
    each is appended at its first attempt, with no read of the stream (racing decisions would all
    take version 2, and five would be decided again, some more than once)."""
    slow = Slow(log)
    bus = CommandBus(slow)
    await run(bus, CREATE)

    added = await asyncio.gather(*(run(bus, add(f"SKU-{i}")) for i in range(6)))

    assert sorted(a.version for a in added) == [2, 3, 4, 5, 6, 7]
    assert slow.appends == 7
    assert log.reads == []


async def test_commands_on_other_orders_do_not_wait_for_each_other(log: InMemoryEventLog) -> None:
    """The turns are per order: while one order's append is in flight, another order's command is
    decided and sent."""
    slow = Slow(log)
    bus = CommandBus(slow)
    first = asyncio.create_task(run(bus, CREATE))
    await asyncio.sleep(0)  # the first create is in its append

    second = asyncio.create_task(run(bus, CreateOrder("order-2", "cust-1", "EUR")))
    await asyncio.sleep(0)

    assert slow.appends == 2
    await asyncio.gather(first, second)


# --- idempotency: the command-id record --------------------------------------------------------


async def test_a_repeated_command_returns_its_first_result_and_appends_nothing(log: InMemoryEventLog) -> None:
    """The same command id with the same request, sent twice: the first result again, one event."""
    bus = CommandBus(log)
    await run(bus, CREATE)

    first = await run(bus, add(), command_id="add-once")
    again = await run(bus, add(), command_id="add-once")

    assert (again.stream_id, again.version, again.last) == (first.stream_id, first.version, first.last)
    assert (first.appended, again.appended) == (("ItemAdded",), ())
    assert stored(log) == [(1, "OrderCreated"), (2, "ItemAdded")]


async def test_a_repeated_create_on_a_replica_that_never_saw_it_returns_its_first_result(
    log: InMemoryEventLog,
) -> None:
    """A create retried on another replica (whose cache assumes a new order) is recognised by its
    command id, not refused as an existing order."""
    first = await run(CommandBus(log), CREATE, command_id="create-once")

    again = await run(CommandBus(log), CREATE, command_id="create-once")

    assert (again.version, again.last, again.appended) == (first.version, first.last, ())
    assert stored(log) == [(1, "OrderCreated")]


async def test_a_retry_refused_by_the_newer_state_returns_its_earlier_result(log: InMemoryEventLog) -> None:
    """A command retried after the order moved on (an item cannot be added to a confirmed order):
    refused on fresh events, the bus checks the command-id record first and returns the first result."""
    bus = CommandBus(log)
    await run(bus, CREATE)
    first = await run(bus, add(), command_id="add-then-retry-later")
    await run(bus, CONFIRM)

    again = await run(bus, add(), command_id="add-then-retry-later")

    assert (again.version, again.last, again.appended) == (first.version, first.last, ())
    assert len(stored(log)) == 3


async def test_a_reused_command_id_with_another_request_is_refused(log: InMemoryEventLog) -> None:
    """A command id already recorded for another request: CommandIdReused, nothing appended."""
    bus = CommandBus(log)
    await run(bus, CREATE)
    await run(bus, add("SKU-1"), command_id="reused")

    with pytest.raises(CommandIdReused):
        await run(bus, add("SKU-2"), command_id="reused")

    assert stored(log) == [(1, "OrderCreated"), (2, "ItemAdded")]


async def test_a_reused_command_id_is_refused_even_when_the_rules_refuse_the_request(
    log: InMemoryEventLog,
) -> None:
    """A command id reused for a request the rules refuse (shipping an unconfirmed order): the
    caller learns that the id is reused, as the command-id record is checked before the refusal."""
    bus = CommandBus(log)
    await run(bus, CREATE)
    await run(bus, add(), command_id="reused")

    with pytest.raises(CommandIdReused):
        await run(bus, ShipOrder(OID), command_id="reused")

    assert len(stored(log)) == 2


async def test_a_refusal_without_an_earlier_result_is_the_refusal(log: InMemoryEventLog) -> None:
    """Refused on fresh events with a command id the log has not recorded: the refusal stands."""
    bus = CommandBus(log)
    await run(bus, CREATE)

    with pytest.raises(RuleViolation) as refused:
        await run(bus, CONFIRM, command_id="confirm-empty")

    assert refused.value.reason == "ORDER_EMPTY"
    assert len(stored(log)) == 1


# --- a stale cache: another replica wrote ------------------------------------------------------


async def test_an_append_on_a_stale_cached_version_conflicts_and_is_decided_again(log: InMemoryEventLog) -> None:
    """A caches version 2; B appends version 3; A's next item conflicts on version 3, A reads the
    stream once and lands the item at version 4, on top."""
    a, b = CommandBus(log), CommandBus(log)
    await run(a, CREATE)
    await run(a, add("S1"))
    await run(b, add("S2"))
    log.reads.clear()

    added = await run(a, add("S1", quantity=2))

    assert added.version == 4
    assert [v for v, _ in stored(log)] == [1, 2, 3, 4]
    assert log.reads == [OID]


async def test_a_refusal_decided_on_a_stale_cache_is_decided_again_and_applies(log: InMemoryEventLog) -> None:
    """A caches an empty order; B adds an item; A is asked to confirm. A's cache says ORDER_EMPTY,
    the log says otherwise: A decides again on fresh events and the order is confirmed."""
    a, b = CommandBus(log), CommandBus(log)
    await run(a, CREATE)
    await run(b, add())

    confirmed = await run(a, CONFIRM)

    assert confirmed.version == 3
    assert stored(log) == [(1, "OrderCreated"), (2, "ItemAdded"), (3, "OrderConfirmed")]


async def test_a_stale_cache_still_refuses_what_the_fresh_events_refuse(log: InMemoryEventLog) -> None:
    """B confirms the order A cached as pending: A refuses a new item with the reason the fresh
    events give, after reading them."""
    a, b = CommandBus(log), CommandBus(log)
    await run(a, CREATE)
    await run(a, add())
    await run(b, CONFIRM)
    log.reads.clear()

    with pytest.raises(RuleViolation) as refused:
        await run(a, add("LATE"))

    assert refused.value.reason == "ORDER_NOT_PENDING"
    assert log.reads == [OID]
    assert len(stored(log)) == 3


async def test_expected_version_is_checked_against_the_log_not_the_cache(log: InMemoryEventLog) -> None:
    """A caches version 1; B makes it 2; a command on A expecting version 2 applies."""
    a, b = CommandBus(log), CommandBus(log)
    await run(a, CREATE)
    await run(b, add())

    added = await a.dispatch(CommandEnvelope(add("S2"), expected_version=2), TIMEOUT)

    assert added.version == 3


async def test_creating_an_existing_order_on_a_replica_that_never_saw_it(log: InMemoryEventLog) -> None:
    """B assumes a new order; version 1 is taken, so B decides again on fresh events: the order
    already exists, and nothing is appended."""
    await run(CommandBus(log), CREATE)

    with pytest.raises(OrderAlreadyExists):
        await run(CommandBus(log), CREATE)

    assert stored(log) == [(1, "OrderCreated")]
