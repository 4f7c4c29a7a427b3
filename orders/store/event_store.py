"""The event store: an append-only PostgreSQL table, accessed with asyncpg.

Writing: `EventStore.append` writes one command's events in one statement (its
own transaction): the events, the command's idempotency key and a NOTIFY for
the sync workers, or, when the key was recorded before, nothing but that
earlier result. `UNIQUE (stream_id, version)` makes racing writers conflict
(VersionTaken); the write service then decides again on fresh events
(write_service/command_bus.py). Commands that arrive while earlier appends are
in flight go together (group commit, orders/store/group_commit.py): one
statement and one transaction for the batch, with one NOTIFY, and each command
still gets its own outcome (see _APPEND_BATCH).

Reading in commit order: positions come from an identity column, handed out at
INSERT but visible at COMMIT, so a reader that saw position 11 may later find
10. `read_batch` therefore orders by (tx_id, position) and returns only rows
whose transaction is older than every transaction still running
(`pg_snapshot_xmin`): no row can ever appear before them. A long-running
transaction anywhere in the cluster holds readers back (delay, never loss).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeAlias

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from orders.domain.consistency import LogPosition
from orders.domain.errors import CommandIdReused, DeadlineExceeded, PoisonEvent, Unavailable
from orders.domain.events import Event, RecordedEvent, event_type, from_payload, to_payload
from orders.store.group_commit import DEFAULT_MAX_BATCH, DEFAULT_MAX_IN_FLIGHT, GroupCommit, Outcome
from orders.store.partitions import WHOLE, Partition, partition_sql
from orders.telemetry.metrics import count_events_appended, count_store_error, observe_append_batch

log = logging.getLogger(__name__)
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

NOTIFY_CHANNEL = "orders_events"
_COLUMNS = "position, tx_id, stream_id, version, event_type, schema_version, payload, metadata, recorded_at"

# Driver errors that mean "PostgreSQL is unreachable or restarting". If the connection broke during
# COMMIT the command may have been applied: a retry with the same command id finds out safely.
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InternalClientError,  # a connection left mid-protocol by an interrupted operation
)


_INTERRUPTED: tuple[type[BaseException], ...] = (*_UNAVAILABLE_ERRORS, asyncio.CancelledError)


@dataclass(frozen=True)
class AppendResult:
    """What a command returns: the order's new version and where its last event sits."""

    stream_id: str
    version: int
    last: LogPosition
    appended: tuple[str, ...] = ()  # types of the events this call appended; none for a repeated command


@dataclass(frozen=True)
class AppendRequest:
    """What one command writes besides its events: where, under which idempotency key, with what metadata."""

    stream_id: str
    command_id: str | None  # idempotency key
    fingerprint: str  # identifies the request, to refuse a reused command id
    metadata: dict[str, Any]


@dataclass(frozen=True)
class _Append:
    """One command's append, as it waits for a batch."""

    request: AppendRequest
    version: int  # the stream's version the command was decided on
    events: list[Event]

    @property
    def last_version(self) -> int:
        return self.version + len(self.events)


def _append_keys(append: _Append) -> tuple[tuple[str, str], ...]:
    """What two appends must not share within a batch (or two batches in flight): the order, the command id."""
    stream = ("stream", append.request.stream_id)
    return (stream,) if append.request.command_id is None else (stream, ("command", append.request.command_id))


class VersionTaken(Exception):
    """Another writer appended to the stream (or recorded the command id) first: decide again on fresh events."""


@dataclass(frozen=True)
class Batch:
    events: list[RecordedEvent]
    held_back: bool  # newer rows exist but wait for an older transaction to end
    # How far the batch covers the log for its reader: no row of the reader's partition up to here
    # is missing from `events`, and none can ever appear. The last event's position, or, for a
    # partition, the last row it looked at that no transaction can precede (others' rows too).
    through: LogPosition | None = None
    more: bool = False  # the read was full and nothing held back: more rows may be waiting already


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _init_connection(conn: Connection) -> None:
    # orjson: decoding payloads is a large part of a rebuild's CPU. Event payloads hold no integer
    # beyond 64 bits (orders.domain.rules bounds them), the one kind of value orjson cannot take.
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=_json_text, decoder=orjson.loads, schema="pg_catalog")


async def connect(url: str, *, min_size: int = 0, max_size: int = 20) -> asyncpg.Pool:
    """A pool that opens connections lazily, so a process can start while PostgreSQL is down."""
    return await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        # asyncpg's default reset costs a round trip per release (UNLISTEN, RESET ALL, ...) to undo
        # session state that pool users never set; an open transaction is still rolled back.
        reset=_keep_session,
        command_timeout=30,
        # A backend notices within 1 s that its client went away, even while it waits on a lock.
        server_settings={"client_connection_check_interval": "1000"},
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset: pool connections never LISTEN, SET, lock or open cursors."""


async def open_connection(url: str) -> asyncpg.Connection:
    """One connection with our codecs, for a long-lived reader such as the sync worker."""
    conn = await asyncpg.connect(url, timeout=10)
    await _init_connection(conn)
    return conn


@asynccontextmanager
async def command_deadline(timeout: float) -> AsyncIterator[None]:
    """Bounds a command's work with the store by its deadline (DeadlineExceeded); driver failures
    inside become Unavailable."""
    if timeout <= 0:
        raise DeadlineExceeded("the deadline had passed before the command started")
    try:
        async with asyncio.timeout(timeout), unavailable_on_connection_errors("append"):
            yield
    except TimeoutError as error:  # from asyncio.timeout: driver time-outs became Unavailable inside
        raise DeadlineExceeded(f"the command did not finish within its deadline of {timeout:.3g}s") from error


@asynccontextmanager
async def unavailable_on_connection_errors(what: str) -> AsyncIterator[None]:
    try:
        yield
    except _UNAVAILABLE_ERRORS as error:
        count_store_error("postgres", what)
        raise Unavailable(f"PostgreSQL is unavailable ({what}): {type(error).__name__}: {error}") from error


def _record(row: asyncpg.Record) -> RecordedEvent:
    position, tx_id, stream_id, version, type_name, schema_version, payload, metadata, recorded_at = row[:9]
    # Every field set in the new instance's dict, not through the frozen dataclass's __init__ (one
    # object.__setattr__ per field): a rebuild decodes every row of the log, and this was a third of
    # it. The values are the columns (_COLUMNS, in this order), of the fields' types.
    recorded = object.__new__(RecordedEvent)
    recorded.__dict__.update(
        position=position,
        tx_id=tx_id,
        stream_id=stream_id,
        version=version,
        event=from_payload(type_name, schema_version, payload),
        recorded_at=recorded_at,
        metadata=metadata,
    )
    return recorded


class EventStore:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        append_batch_max: int = DEFAULT_MAX_BATCH,
        batches_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self._pool = pool
        self._reaping: set[asyncio.Task[None]] = set()
        self._group: GroupCommit[_Append, AppendResult] = GroupCommit(
            self._send, _append_keys, append_batch_max, batches_in_flight
        )

    async def read_stream(self, stream_id: str) -> list[Event]:
        """The stream's events in version order (its version is their number)."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT event_type, schema_version, payload FROM events WHERE stream_id = $1 ORDER BY version",
                stream_id,
            )
        return [from_payload(r["event_type"], r["schema_version"], r["payload"]) for r in rows]

    async def append(self, request: AppendRequest, version: int, events: list[Event]) -> AppendResult:
        """Appends `events` after `version`, records the command id and notifies the sync workers,
        atomically: alone in one statement, or with the commands that arrived meanwhile in one statement
        (group commit). If the command id was recorded before, appends nothing and returns that earlier
        result. Raises VersionTaken when another writer got there first, and CommandIdReused when the id
        was recorded for another request; either concerns this command only, never its batch."""
        if not events:  # its result's position would come from the last event written
            raise ValueError("an append writes at least one event")
        return await self._group.submit(_Append(request, version, list(events)))

    async def _send(self, appends: list[_Append]) -> list[Outcome[AppendResult]]:
        """One outcome per append, in order, from one statement (one transaction, one NOTIFY)."""
        observe_append_batch(len(appends))
        async with self._connection() as conn:
            if len(appends) == 1:
                return [await self._alone(conn, appends[0])]
            try:
                rows = await conn.fetch(_APPEND_BATCH, *_batch_arguments(appends))
            except asyncpg.PostgresError as error:
                if isinstance(error, _UNAVAILABLE_ERRORS):
                    raise
                # A racing writer (another replica) took a version or a command id after the statement
                # looked, or one command's rows broke the statement: nothing was written. One by one,
                # each command gets its own outcome.
                log.info("an append batch of %d failed (%s): appending one by one", len(appends), error)
                return [await self._alone(conn, append) for append in appends]
        return [_batch_outcome(append, row) for append, row in zip(appends, rows, strict=True)]

    async def _alone(self, conn: Connection, append: _Append) -> Outcome[AppendResult]:
        """The outcome of one append in a statement of its own; errors of this command are its outcome."""
        try:
            return await _append_one(conn, append)
        except (VersionTaken, CommandIdReused) as refusal:
            return refusal
        except asyncpg.PostgresError as error:
            if isinstance(error, _UNAVAILABLE_ERRORS):
                raise
            return error

    async def earlier_result(self, request: AppendRequest) -> AppendResult | None:
        """The result of the request's command id when it was applied before, else None."""
        if request.command_id is None:
            return None
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT fingerprint, stream_id, version, position, tx_id FROM processed_commands WHERE command_id = $1",
                request.command_id,
            )
        return None if row is None else _earlier(request, row)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """A pooled connection that is thrown away, not reused, when an operation on it was interrupted
        (a deadline, a cancelled RPC, a dropped server): asyncpg can leave such a connection mid-protocol."""
        async with self._pool.acquire() as conn:
            try:
                yield conn
            except _INTERRUPTED:
                self._reap(conn.get_server_pid())
                conn.terminate()
                raise

    def _reap(self, pid: int) -> None:
        """Ends the server side of a dropped connection too: closing the socket does not stop a backend
        that waits on a lock, and its transaction would hold locks and the read horizon until then."""

        async def terminate_backend() -> None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._pool.execute("SELECT pg_terminate_backend($1)", pid)

        task = asyncio.create_task(terminate_backend())
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)


async def _append_one(conn: Connection, append: _Append) -> AppendResult:
    request, version, events = append.request, append.version, append.events
    try:
        rows = await conn.fetch(
            _APPEND,
            request.stream_id,
            list(range(version + 1, append.last_version + 1)),
            [event_type(e) for e in events],
            [e.schema_version for e in events],
            request.metadata,
            [to_payload(e) for e in events],
            request.command_id,
            request.fingerprint,
            NOTIFY_CHANNEL,
        )
    except asyncpg.UniqueViolationError as error:
        raise VersionTaken(request.stream_id) from error
    if rows and rows[0]["fingerprint"] is not None:  # the command id's earlier result
        return _earlier(request, rows[0])
    last = max(LogPosition(r["tx_id"], r["position"]) for r in rows)
    return _appended(append, last)


def _appended(append: _Append, last: LogPosition) -> AppendResult:
    appended = tuple(event_type(e) for e in append.events)
    count_events_appended(appended)
    return AppendResult(append.request.stream_id, append.last_version, last, appended)


def _batch_arguments(appends: list[_Append]) -> list[Any]:
    """_APPEND_BATCH's arguments: the commands' columns, then their events' (each tagged with its command's
    1-based number, in command then version order, which is the order of their positions)."""
    numbers, versions, types, schema_versions, payloads = [], [], [], [], []
    for number, append in enumerate(appends, start=1):
        for version, event in enumerate(append.events, start=append.version + 1):
            numbers.append(number)
            versions.append(version)
            types.append(event_type(event))
            schema_versions.append(event.schema_version)
            payloads.append(to_payload(event))
    requests = [a.request for a in appends]
    return [
        [r.stream_id for r in requests],
        [a.version + 1 for a in appends],
        [a.last_version for a in appends],
        [r.command_id for r in requests],
        [r.fingerprint for r in requests],
        [r.metadata for r in requests],
        numbers,
        versions,
        types,
        schema_versions,
        payloads,
        NOTIFY_CHANNEL,
    ]


def _batch_outcome(append: _Append, row: asyncpg.Record) -> Outcome[AppendResult]:
    if row["fingerprint"] is not None:  # the command id's earlier result
        try:
            return _earlier(append.request, row)
        except CommandIdReused as refusal:
            return refusal
    if row["position"] is None:  # one of its versions was taken: nothing of it was written
        return VersionTaken(append.request.stream_id)
    return _appended(append, LogPosition(row["tx_id"], row["position"]))


def _earlier(request: AppendRequest, row: asyncpg.Record) -> AppendResult:
    if row["fingerprint"] != request.fingerprint:
        raise CommandIdReused(str(request.command_id))
    return AppendResult(row["stream_id"], row["version"], LogPosition(row["tx_id"], row["position"]))


# Unless the command id was recorded before: the events, the command id with the last of them
# (when there is one), then the NOTIFY (delivered at commit); or else that earlier result, with
# nothing written. Data-modifying CTEs always run, whether or not the SELECT reads them. Racing
# writers of one version or one command id meet on a unique key (VersionTaken).
_APPEND = """
WITH earlier AS (
    SELECT fingerprint, stream_id, version, position, tx_id FROM processed_commands WHERE command_id = $7
), appended AS (
    INSERT INTO events (stream_id, version, event_type, schema_version, payload, metadata)
    SELECT $1, v, t, s, p, $5 FROM unnest($2::int[], $3::text[], $4::smallint[], $6::jsonb[]) AS u(v, t, s, p)
    WHERE NOT EXISTS (SELECT FROM earlier)
    ORDER BY v
    RETURNING version, position, tx_id
), recorded AS (
    INSERT INTO processed_commands (command_id, fingerprint, stream_id, version, position, tx_id)
    SELECT $7, $8, $1, version, position, tx_id FROM appended
    WHERE $7::text IS NOT NULL
    ORDER BY version DESC
    LIMIT 1
)
SELECT NULL::text AS fingerprint, NULL::text AS stream_id, version, position, tx_id,
       (SELECT pg_notify($9, '')) AS notified
FROM appended
UNION ALL
SELECT fingerprint, stream_id, version, position, tx_id, NULL FROM earlier
"""

# A batch of commands, each with its own outcome, in one statement (one transaction): a command whose
# id was recorded before gets that earlier result and writes nothing; a command with a taken version
# writes nothing (VersionTaken); the others append their events (positions in command order, then
# version order) and record their command ids. One NOTIFY, when anything was appended. The commands
# target distinct streams and carry distinct command ids (GroupCommit's keys): a later command on the
# same order was decided on the state before the earlier one and waits for the next batch. The checks
# read the statement's snapshot, so a writer that commits meanwhile can still make the INSERT hit a
# unique key; the whole statement then fails and writes nothing, and EventStore._send appends the
# batch one command at a time.
_APPEND_BATCH = """
WITH command AS (
    SELECT * FROM unnest($1::text[], $2::int[], $3::int[], $4::text[], $5::text[], $6::jsonb[])
        WITH ORDINALITY AS c(stream_id, first_version, last_version, command_id, fingerprint, metadata, i)
), earlier AS (
    SELECT c.i, p.fingerprint, p.stream_id, p.version, p.position, p.tx_id
    FROM command c JOIN processed_commands p ON p.command_id = c.command_id
), accepted AS (
    SELECT c.* FROM command c
    WHERE NOT EXISTS (SELECT FROM earlier e WHERE e.i = c.i)
      AND NOT EXISTS (
          SELECT FROM events e
          WHERE e.stream_id = c.stream_id AND e.version BETWEEN c.first_version AND c.last_version
      )
), appended AS (
    INSERT INTO events (stream_id, version, event_type, schema_version, payload, metadata)
    SELECT a.stream_id, u.version, u.event_type, u.schema_version, u.payload, a.metadata
    FROM unnest($7::bigint[], $8::int[], $9::text[], $10::smallint[], $11::jsonb[])
        WITH ORDINALITY AS u(i, version, event_type, schema_version, payload, n)
    JOIN accepted a ON a.i = u.i
    ORDER BY u.n
    RETURNING stream_id, version, position, tx_id
), last_event AS (
    SELECT a.i, a.command_id, a.fingerprint, p.stream_id, p.version, p.position, p.tx_id
    FROM accepted a JOIN appended p ON p.stream_id = a.stream_id AND p.version = a.last_version
), recorded AS (
    INSERT INTO processed_commands (command_id, fingerprint, stream_id, version, position, tx_id)
    SELECT command_id, fingerprint, stream_id, version, position, tx_id FROM last_event
    WHERE command_id IS NOT NULL
)
SELECT e.fingerprint, e.stream_id, coalesce(l.version, e.version) AS version,
       coalesce(l.position, e.position) AS position, coalesce(l.tx_id, e.tx_id) AS tx_id,
       (SELECT pg_notify($12, '') FROM appended LIMIT 1) AS notified
FROM command c LEFT JOIN earlier e ON e.i = c.i LEFT JOIN last_event l ON l.i = c.i
ORDER BY c.i
"""


async def read_batch(conn: Connection, after: LogPosition, limit: int, partition: Partition = WHOLE) -> Batch:
    """Up to `limit` events after `after` in (tx_id, position) order, none of which can
    ever be preceded by a row that is not visible yet; of one `partition`'s orders only."""
    if partition.count > 1:
        return await _read_partition(conn, after, limit, partition)
    rows = await conn.fetch(
        f"SELECT {_COLUMNS}, pg_snapshot_xmin(pg_current_snapshot()) AS horizon FROM events"
        " WHERE (tx_id, position) > ($1::xid8, $2::bigint) ORDER BY tx_id, position LIMIT $3",
        after.tx_id,
        after.position,
        limit,
    )
    safe = [r for r in rows if r["tx_id"] < r["horizon"]]
    events = [_decoded(r) for r in safe]
    return Batch(events, held_back=len(safe) < len(rows), through=_last(events), more=len(events) >= limit)


# One partition's rows from a window of the whole log's next rows, in log order: the others' rows
# stay in PostgreSQL (no worker decodes an event it does not apply). With them, from the same
# snapshot, the window's last row that no transaction can precede any more (the horizon rule):
# the partition's checkpoint passes the other partitions' rows up to there, as it would have by
# reading them. A window, not a LIMIT on the partition's own rows: the planner cannot tell how
# many rows the hash condition keeps, and chose to sort the whole table for such a LIMIT.
_READ_PARTITION = f"""
WITH horizon AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin),
scanned AS MATERIALIZED (
    SELECT {_COLUMNS}, {partition_sql("stream_id", "$4", "$5")} AS own FROM events
    WHERE (tx_id, position) > ($1::xid8, $2::bigint) ORDER BY tx_id, position LIMIT $3
),
totals AS (
    SELECT count(*) AS scanned, count(*) FILTER (WHERE scanned.tx_id >= horizon.xmin) AS held
    FROM scanned, horizon
),
last_safe AS (
    SELECT scanned.tx_id, scanned.position FROM scanned, horizon WHERE scanned.tx_id < horizon.xmin
    ORDER BY scanned.tx_id DESC, scanned.position DESC LIMIT 1
),
own_rows AS (SELECT scanned.* FROM scanned, horizon WHERE scanned.own AND scanned.tx_id < horizon.xmin)
SELECT own_rows.*, totals.scanned, totals.held, last_safe.tx_id AS safe_tx_id, last_safe.position AS safe_position
FROM totals LEFT JOIN last_safe ON true LEFT JOIN own_rows ON true
ORDER BY own_rows.tx_id, own_rows.position
"""
WINDOW_PARTITIONS = 16  # a partition's read scans up to this many batches' worth of the log's rows


async def _read_partition(conn: Connection, after: LogPosition, limit: int, partition: Partition) -> Batch:
    window = limit * min(partition.count, WINDOW_PARTITIONS)  # about `limit` own rows, when the log has them
    rows = await conn.fetch(_READ_PARTITION, after.tx_id, after.position, window, partition.count, partition.index)
    totals = rows[0]
    events = [_decoded(r) for r in rows if r["position"] is not None]
    through = None if totals["safe_position"] is None else LogPosition(totals["safe_tx_id"], totals["safe_position"])
    held_back = totals["held"] > 0
    return Batch(events, held_back, through, more=not held_back and totals["scanned"] >= window)


def _last(events: list[RecordedEvent]) -> LogPosition | None:
    return LogPosition(events[-1].tx_id, events[-1].position) if events else None


def _decoded(row: asyncpg.Record) -> RecordedEvent:
    try:
        return _record(row)
    except (ValueError, TypeError, KeyError) as error:  # a row this code cannot read: stop, never skip it
        raise PoisonEvent(row["position"], row["stream_id"], error) from error


async def read_positions(conn: Connection, positions: list[int]) -> list[RecordedEvent]:
    """The events at `positions`, in read order (for retrying parked events)."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM events WHERE position = any($1::bigint[]) ORDER BY tx_id, position", positions
    )
    return [_decoded(r) for r in rows]


async def oldest_transaction(conn: Connection) -> dict[str, Any] | None:
    """The oldest transaction holding an id: the one that holds tailing readers back."""
    row = await conn.fetchrow(
        "SELECT pid, datname AS database, usename AS user, state,"
        " extract(epoch FROM now() - xact_start)::float8 AS age_seconds, left(query, 200) AS query"
        " FROM pg_stat_activity WHERE backend_xid IS NOT NULL ORDER BY xact_start LIMIT 1"
    )
    return None if row is None else dict(row)


async def head(conn: Connection) -> LogPosition | None:
    """The last event in read order, or None for an empty log."""
    row = await conn.fetchrow("SELECT tx_id, position FROM events ORDER BY tx_id DESC, position DESC LIMIT 1")
    return None if row is None else LogPosition(row["tx_id"], row["position"])


async def read_log(conn: Connection) -> list[RecordedEvent]:
    """Every event in read order, for checks and tools (the worker reads in batches)."""
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM events ORDER BY tx_id, position")
    return [_record(r) for r in rows]
