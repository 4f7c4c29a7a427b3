"""Group commit on real PostgreSQL: appends that arrive together go in one statement and one
transaction, and each command keeps its own guards and its own outcome.

A batch is made deterministically: the store gets one connection and one batch in flight; while the
test holds that connection, a gate append takes the batch slot and waits for it, and every append
submitted meanwhile queues behind the gate; released, they go together in the next batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import asyncpg
import pytest
from asyncpg.transaction import Transaction

from orders.domain.errors import CommandIdReused
from orders.domain.events import Event, ItemAdded, OrderCreated
from orders.store.event_store import NOTIFY_CHANNEL, AppendRequest, AppendResult, EventStore, VersionTaken, connect

CREATED = OrderCreated("cust-1", "EUR")
ITEM = ItemAdded("SKU-1", "Widget", 1, 500)
BATCH_MARK = "FROM command c"  # a phrase of the batch statement only


@dataclass(frozen=True)
class Append:
    request: AppendRequest
    version: int
    events: list[Event]


def append(stream_id: str, version: int = 0, command_id: str | None = None, fingerprint: str = "fp") -> Append:
    return Append(AppendRequest(stream_id, command_id, fingerprint, {"command": "Test"}), version, [CREATED])


@dataclass
class Batching:
    """A store with one connection and one batch in flight, the statements it sends, and an admin connection."""

    store: EventStore
    pool: asyncpg.Pool
    admin: asyncpg.Connection
    database_url: str
    sent: list[str] = field(default_factory=list)
    gates: int = 0

    def start(self, appends: Sequence[Append]) -> list[asyncio.Task[AppendResult]]:
        return [asyncio.create_task(self.store.append(a.request, a.version, a.events)) for a in appends]

    async def queued_behind_a_gate(self, appends: Sequence[Append]) -> list[asyncio.Task[AppendResult]]:
        """Starts `appends` so that they queue behind a gate append: they go in one batch once the
        caller releases the store's connection (see `held`)."""
        self.gates += 1
        [gate] = self.start([append(f"gate-{self.gates}")])
        tasks = self.start(appends)
        await asyncio.sleep(0)  # every task submits its append; the gate's batch waits for the connection
        tasks.append(gate)
        return tasks

    async def in_one_batch(self, appends: Sequence[Append]) -> list[AppendResult | BaseException]:
        async with self.pool.acquire():
            tasks = await self.queued_behind_a_gate(appends)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        return outcomes[:-1]  # without the gate's

    async def events(self, stream_id: str) -> list[tuple[int, str, int]]:
        rows = await self.admin.fetch(
            "SELECT version, event_type, tx_id::text::bigint AS tx FROM events WHERE stream_id = $1 ORDER BY version",
            stream_id,
        )
        return [(r["version"], r["event_type"], r["tx"]) for r in rows]

    async def until_batches_wait_on_a_lock(self, count: int, timeout: float = 5.0) -> None:
        """Until exactly `count` batch statements of this database wait on a lock (another writer's row)."""
        started = time.monotonic()
        while True:
            waiting = await self.admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND position($1 in query) > 0",
                BATCH_MARK,
            )
            if waiting == count:
                return
            if time.monotonic() - started > timeout:
                sessions = await self.admin.fetch(
                    "SELECT state, wait_event_type, wait_event, left(query, 60) AS query FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                raise AssertionError(f"{waiting} batches wait on a lock, not {count}: {[dict(r) for r in sessions]}")
            await asyncio.sleep(0.01)


@pytest.fixture
async def batching(database_url: str) -> AsyncIterator[Batching]:
    pool = await connect(database_url, min_size=1, max_size=1)
    admin = await asyncpg.connect(database_url)
    batching = Batching(EventStore(pool, batches_in_flight=1), pool, admin, database_url)
    await batching.in_one_batch([append("warm-up-1"), append("warm-up-2")])  # type introspection happens once
    async with pool.acquire() as conn:
        conn.add_query_logger(lambda query: batching.sent.append(query.query))
    try:
        yield batching
    finally:
        await admin.close()
        await pool.close()


def transactions(*streams: list[tuple[int, str, int]]) -> set[int]:
    return {tx for events in streams for _, _, tx in events}


async def test_commands_arriving_together_share_one_statement_and_one_transaction(batching: Batching) -> None:
    """Ten creates queued behind the gate: two statements (the gate's, the batch's), one transaction for
    the ten, and each result names its own order's event (positions in arrival order)."""
    outcomes = await batching.in_one_batch([append(f"order-{i}") for i in range(10)])

    results = [o for o in outcomes if isinstance(o, AppendResult)]
    assert [(r.stream_id, r.version, r.appended) for r in results] == [
        (f"order-{i}", 1, ("OrderCreated",)) for i in range(10)
    ]
    assert [r.last for r in results] == sorted(r.last for r in results)
    assert len({r.last.tx_id for r in results}) == 1
    streams = [await batching.events(f"order-{i}") for i in range(10)]
    assert all(len(events) == 1 for events in streams)
    assert transactions(*streams) == {results[0].last.tx_id}
    assert len(batching.sent) == 2, batching.sent
    assert BATCH_MARK in batching.sent[1]


async def test_a_conflict_inside_a_batch_fails_only_that_command(batching: Batching) -> None:
    """order-x exists: its second create (version 1 taken) raises VersionTaken; its neighbours are
    appended, once each, in the same transaction."""
    await batching.store.append(append("order-x").request, 0, [CREATED])

    a, x, b = await batching.in_one_batch([append("order-a"), append("order-x"), append("order-b")])

    assert isinstance(x, VersionTaken)
    assert isinstance(a, AppendResult)
    assert isinstance(b, AppendResult)
    assert (a.version, b.version, a.last.tx_id) == (1, 1, b.last.tx_id)
    assert len(await batching.events("order-x")) == 1
    assert [len(await batching.events(s)) for s in ("order-a", "order-b")] == [1, 1]


async def test_an_idempotent_retry_inside_a_batch_gets_its_earlier_result(batching: Batching) -> None:
    """A retry of an applied command (on its stale version) returns the first result and writes nothing;
    the new command beside it is appended."""
    first = await batching.store.append(append("order-r", command_id="create-r").request, 0, [CREATED])

    retry, new = await batching.in_one_batch([append("order-r", command_id="create-r"), append("order-n")])

    assert isinstance(retry, AppendResult)
    assert (retry.stream_id, retry.version, retry.last, retry.appended) == ("order-r", 1, first.last, ())
    assert isinstance(new, AppendResult)
    assert new.appended == ("OrderCreated",)
    assert len(await batching.events("order-r")) == 1


async def test_a_reused_command_id_inside_a_batch_is_refused_alone(batching: Batching) -> None:
    await batching.store.append(append("order-u", command_id="used").request, 0, [CREATED])

    reused, new = await batching.in_one_batch(
        [append("order-v", command_id="used", fingerprint="other"), append("order-w")]
    )

    assert isinstance(reused, CommandIdReused)
    assert isinstance(new, AppendResult)
    assert new.appended == ("OrderCreated",)
    assert await batching.events("order-v") == []


async def test_a_batch_mixing_accepted_and_refused_commands(batching: Batching) -> None:
    """Accepted, taken, retried, reused and anonymous commands in one batch, plus a second command on an
    order already in the batch and a second copy of a command id: those two wait for the next batch,
    where they meet the first one's outcome (a taken version, the earlier result)."""
    await batching.store.append(append("taken").request, 0, [CREATED])
    applied = await batching.store.append(append("retried", command_id="applied").request, 0, [CREATED])

    outcomes = await batching.in_one_batch(
        [
            append("fresh", command_id="c-fresh"),
            append("taken", command_id="c-taken"),
            append("retried", command_id="applied"),
            append("other", command_id="applied", fingerprint="other"),
            append("anonymous"),
            append("fresh", command_id="c-fresh-again"),  # decided on version 0 too: must conflict
            append("twin", command_id="c-twin"),
            append("twin-2", command_id="c-twin", fingerprint="fp-2"),  # a racing reuse of c-twin's id
        ]
    )

    fresh, taken, retried, reused, anonymous, fresh_again, twin, twin_copy = outcomes
    assert isinstance(fresh, AppendResult)
    assert fresh.appended == ("OrderCreated",)
    assert isinstance(taken, VersionTaken)
    assert isinstance(retried, AppendResult)
    assert (retried.last, retried.appended) == (applied.last, ())
    assert isinstance(reused, CommandIdReused)
    assert isinstance(anonymous, AppendResult)
    assert anonymous.appended == ("OrderCreated",)
    assert isinstance(fresh_again, VersionTaken)
    assert isinstance(twin, AppendResult)
    assert twin.appended == ("OrderCreated",)
    assert isinstance(twin_copy, CommandIdReused)
    assert fresh.last.tx_id == anonymous.last.tx_id == twin.last.tx_id
    for stream, count in [("fresh", 1), ("taken", 1), ("retried", 1), ("other", 0), ("anonymous", 1)]:
        assert len(await batching.events(stream)) == count, stream
    assert (len(await batching.events("twin")), len(await batching.events("twin-2"))) == (1, 0)
    await batching.admin.execute("SELECT 1")  # the store's connection came back healthy
    assert [s for s in batching.sent if BATCH_MARK in s], batching.sent


async def test_a_batch_that_meets_a_concurrent_writers_unique_key_is_appended_one_by_one(batching: Batching) -> None:
    """Another writer (a replica) inserts order-y's version 1 and commits after the batch has checked the
    table: the batch statement fails on the unique key and writes nothing; appended one by one, order-y
    gets VersionTaken and its neighbours their events, once each."""
    other_writer = await uncommitted_create(batching, "order-y")
    async with batching.pool.acquire():
        tasks = await batching.queued_behind_a_gate([append("order-p"), append("order-y"), append("order-q")])
    await batching.until_batches_wait_on_a_lock(1)  # the batch waits on order-y's uncommitted row
    await other_writer.commit()
    p, y, q, _gate = await asyncio.gather(*tasks, return_exceptions=True)

    assert isinstance(y, VersionTaken)
    assert isinstance(p, AppendResult)
    assert isinstance(q, AppendResult)
    assert [len(await batching.events(s)) for s in ("order-p", "order-y", "order-q")] == [1, 1, 1]
    after_gate = batching.sent[1:]
    assert BATCH_MARK in after_gate[0]
    assert len(after_gate) == 4, after_gate
    assert not any(BATCH_MARK in s for s in after_gate[1:])


async def test_one_notify_per_batch(database_url: str, batching: Batching) -> None:
    """Ten commands in one batch wake the sync workers once (plus once for the gate's own transaction);
    a batch that appends nothing does not notify at all. Notifications arrive in commit order, so a
    final one sent after the batches proves that all of theirs have arrived."""
    listener = await asyncpg.connect(database_url)
    received: list[str] = []
    done = asyncio.Event()

    def on_notify(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        received.append(str(payload))
        if payload == "end":
            done.set()

    try:
        await listener.add_listener(NOTIFY_CHANNEL, on_notify)
        await batching.in_one_batch([append(f"order-{i}") for i in range(10)])
        refused = await batching.in_one_batch([append(f"order-{i}") for i in range(3)])
        await batching.admin.execute("SELECT pg_notify($1, 'end')", NOTIFY_CHANNEL)
        await asyncio.wait_for(done.wait(), 10)
    finally:
        await listener.close()

    assert all(isinstance(o, VersionTaken) for o in refused)
    assert received == ["", "", "", "end"]  # the gate, the batch of ten, the second gate: nothing for the refused


async def test_a_caller_gone_before_its_batch_is_sent_is_never_sent(batching: Batching) -> None:
    async with batching.pool.acquire():
        kept, dropped, gate = await batching.queued_behind_a_gate([append("order-kept"), append("order-dropped")])
        dropped.cancel()
    outcomes = await asyncio.gather(kept, dropped, gate, return_exceptions=True)

    assert isinstance(outcomes[0], AppendResult)
    assert isinstance(outcomes[1], asyncio.CancelledError)
    assert await batching.events("order-dropped") == []
    assert len(await batching.events("order-kept")) == 1


async def test_a_caller_gone_while_its_batch_is_in_flight_does_not_stop_its_neighbours(batching: Batching) -> None:
    """The batch waits on another writer's uncommitted row; one caller gives up (its deadline): the batch
    goes on for the other, and carries the cancelled command too (DEADLINE_EXCEEDED may mean applied:
    a retry with the same command id finds out)."""
    other_writer = await uncommitted_create(batching, "order-k")
    async with batching.pool.acquire():
        kept, gone, _gate = await batching.queued_behind_a_gate([append("order-k"), append("order-g")])
    await batching.until_batches_wait_on_a_lock(1)  # the batch, behind the other writer's order-k
    gone.cancel()
    await other_writer.rollback()
    outcomes = await asyncio.gather(kept, gone, return_exceptions=True)

    assert isinstance(outcomes[0], AppendResult)
    assert isinstance(outcomes[1], asyncio.CancelledError)
    assert len(await batching.events("order-k")) == 1
    assert len(await batching.events("order-g")) == 1


async def test_a_batch_whose_callers_all_gave_up_is_cancelled_and_writes_nothing(batching: Batching) -> None:
    """As with a lone command: once no caller waits, the batch's statement is cancelled (its backend
    ended) while it waits on a lock, and nothing of it is written."""
    other_writer = await uncommitted_create(batching, "order-1")
    async with batching.pool.acquire():
        first, second, gate = await batching.queued_behind_a_gate([append("order-1"), append("order-2")])
    await batching.until_batches_wait_on_a_lock(1)
    first.cancel()
    second.cancel()
    await batching.until_batches_wait_on_a_lock(0)
    await other_writer.rollback()
    await asyncio.gather(first, second, gate, return_exceptions=True)

    assert await batching.events("order-1") == []
    assert await batching.events("order-2") == []
    again = await batching.store.append(append("order-2").request, 0, [CREATED])  # the store serves on
    assert again.appended == ("OrderCreated",)


@dataclass
class OtherWriter:
    """Another writer (a replica) whose transaction has inserted a stream's version 1 and not ended yet."""

    conn: asyncpg.Connection
    transaction: Transaction

    async def commit(self) -> None:
        await self.transaction.commit()
        await self.conn.close()

    async def rollback(self) -> None:
        await self.transaction.rollback()
        await self.conn.close()


async def uncommitted_create(batching: Batching, stream_id: str) -> OtherWriter:
    # A connection of its own: the admin connection watches pg_stat_activity, which a transaction
    # would freeze at its first read (stats_fetch_consistency).
    conn = await asyncpg.connect(batching.database_url)
    transaction = conn.transaction()
    await transaction.start()
    await conn.execute(
        "INSERT INTO events (stream_id, version, event_type, schema_version, payload) VALUES ($1, 1, $2, 1, $3)",
        stream_id,
        "OrderCreated",
        '{"customer_id": "cust-2", "currency": "EUR"}',
    )
    return OtherWriter(conn, transaction)
