"""The tailing loop: read the next batch after the checkpoint, apply it, repeat.

It wakes on PostgreSQL NOTIFY (sent by every append) and also polls, because a
notification can be lost on reconnect and because rows held back behind an
older transaction become readable when that transaction ends, which notifies
nobody. Connection failures are logged and retried with backoff; the loop
re-reads its checkpoint from Redis every time, so it also notices a flushed
Redis and rebuilds the views from the start of the log.

Only the holder of the projection's lease applies batches (sync_worker.lease);
other workers stand by and take over within the lease's ttl.

A step reads what it needs from Redis in one pipelined round trip (generation
pointers, checkpoint, whether operators' requests or retired generations wait)
and does the follow-up work only when there is some; applying a batch adds
two (sync_worker.projector). Under steady load a step takes that state from
the step before, for at most STATE_REUSE seconds, as long as nothing special
is under way: the batch's guarded write still catches any change. The loops of
one process share the rows they read from the log while in step (SharedReads).
The PostgreSQL head is only looked up while the projection is behind
(`_measure_lag`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import redis.exceptions

from orders.domain.consistency import START, LogPosition
from orders.domain.errors import PoisonEvent
from orders.domain.events import RecordedEvent, event_type
from orders.store.event_store import (
    NOTIFY_CHANNEL,
    Batch,
    Connection,
    head,
    oldest_transaction,
    open_connection,
    read_batch,
    read_positions,
)
from orders.store.views import parse_generation
from orders.telemetry import tracing
from orders.telemetry.metrics import ProjectionMetrics, count_store_error
from sync_worker.lease import Lease
from sync_worker.projector import CheckpointMoved, LeaseLost, Projector, delete_views

log = logging.getLogger(__name__)

RETRYABLE = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a connection left mid-protocol when the server went away
    redis.exceptions.RedisError,
    CheckpointMoved,
    LeaseLost,
)
HELD_BACK_REPORT_AFTER = 2.0  # seconds held back before the cause is looked up and logged
HELD_BACK_REPORT_EVERY = 10.0
RETIRE_CHUNK = 1000  # keys of a retired generation deleted per loop turn


def _store_of(error: BaseException) -> str | None:
    """Which store a retryable failure came from, for orders_store_errors_total; None for a lost race."""
    if isinstance(error, redis.exceptions.RedisError):
        return "redis"
    if isinstance(error, OSError | asyncpg.PostgresError | asyncpg.InterfaceError | asyncpg.InternalClientError):
        return "postgres"
    return None


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerSettings:
    postgres_url: str
    batch_size: int = 500
    poll_interval: float = 1.0  # fallback when no notification arrives
    max_backoff: float = 5.0
    lease_ttl: float = 5.0  # a standby takes over this long after the active worker stops renewing
    retry_failed_after: float = 10.0  # a projection stopped on a poison event tries that event again this often
    poison_policy: str = "stop"  # "stop": the projection stops at a poison event; "park": that order's events
    # are set aside in a dead-letter list while the other orders go on


@dataclass(frozen=True)
class _StepState:
    """What a step found besides the live checkpoint; the follow-up work runs only when there is some."""

    building: str | bytes | None  # the generation a zero-downtime rebuild builds
    parked_requests: bool  # operators asked to retry parked orders
    retired: str | bytes | None  # a generation whose keys are left to delete

    @property
    def quiet(self) -> bool:
        return self.building is None and not self.parked_requests and self.retired is None


_QUIET = _StepState(None, False, None)
# Seconds for which a step may take the projection's state from the last one instead of reading it:
# its own checkpoint, nothing being rebuilt, parked or retired. What it may miss meanwhile is safe:
# a moved checkpoint or generation fails the batch's guarded write (and the next step reads afresh);
# an operator's request or a retired generation waits this long at most.
STATE_REUSE = 0.1


@dataclass
class _SharedBatch:
    read: tuple[LogPosition, int, int]  # after, limit, notifications seen when the read began
    started: float
    batch: Batch
    takers: set[str]  # the projections that have had it


class SharedReads:
    """The last batch one of this process's projection loops read from the log, for the others: in
    step (live, or rebuilding side by side) they read the same rows after the same checkpoint, and
    decoding them is much of a rebuild's cost. Each other loop may take a batch once, within
    STATE_REUSE of its read, and only while no NOTIFY has come since the read began: a loop that
    cleared its wake-up on a newer append never sleeps on an older batch. The rows stay valid, as a
    read only returns rows that nothing can ever come before."""

    def __init__(self) -> None:
        self.notifications = 0
        self._last: _SharedBatch | None = None

    async def read(self, conn: Connection, after: LogPosition, limit: int, reader: str) -> Batch:
        key, started, last = (after, limit, self.notifications), time.monotonic(), self._last
        if last is not None and last.read == key and started - last.started < STATE_REUSE and reader not in last.takers:
            last.takers.add(reader)
            return last.batch
        batch = await read_batch(conn, after, limit)
        if batch.events:  # an empty read is cheap, and only a newer one may tell that it is over
            self._last = _SharedBatch(key, started, batch, {reader})
        return batch


@dataclass
class HeldBack:
    """Since when the projection waits for an older transaction, and which one, for the heartbeat."""

    since: float
    reported_at: float = -float("inf")
    blocker: dict[str, Any] | None = None


class SyncWorker:
    def __init__(
        self,
        settings: WorkerSettings,
        projector: Projector,
        worker_id: str | None = None,
        reads: SharedReads | None = None,
    ) -> None:
        self._settings = settings
        self._projector = projector
        self._reads = reads or SharedReads()  # shared with the process's other projection loops
        self._lease = Lease(projector.redis, projector.keys, worker_id or default_worker_id(), settings.lease_ttl)
        self._wake = asyncio.Event()
        self._held_back: HeldBack | None = None
        self.state = "starting"
        self.applied_events = 0
        self.failure: PoisonEvent | None = None
        self._retry_at = 0.0
        self._generations: dict[int, Projector] = {projector.keys.generation: projector}
        self._live = projector  # the live generation at the last step
        self._known: tuple[float, LogPosition] | None = None  # a quiet state's read time, and the checkpoint since
        self._metrics = ProjectionMetrics(projector.name)
        self._metrics.state(self.state)
        self._notified_at: float | None = None  # when a NOTIFY came that no batch has started on yet
        self.progress_at = time.monotonic()  # when the loop last applied a batch or found itself caught up
        self.lag_events = 0  # after the last read; estimated from positions
        self._summary = _Summary()

    @property
    def worker_id(self) -> str:
        return self._lease.worker_id

    @property
    def projection(self) -> str:
        return self._projector.name

    async def run(self, stop: asyncio.Event) -> None:
        """Tails until `stop` is set, reconnecting after failures."""
        failures = 0
        while not stop.is_set():
            try:
                await self._tail(stop)
            except RETRYABLE as error:
                store = _store_of(error)
                if store is not None:
                    count_store_error(store, "tail")
                failures += 1
                delay = min(self._settings.max_backoff, 0.1 * 2**failures)
                log.warning("sync failed (%s: %s); retrying in %.1fs", type(error).__name__, error, delay)
                self._lease.forget()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            else:
                failures = 0
        with contextlib.suppress(*RETRYABLE):
            await self._lease.release()

    async def _tail(self, stop: asyncio.Event) -> None:
        conn = await open_connection(self._settings.postgres_url)
        try:
            await conn.add_listener(NOTIFY_CHANNEL, self._notified)
            log.info(
                "projection %s: tailing the event log into %s as %s",
                self._projector.name,
                self._projector.keys.prefix,
                self.worker_id,
            )
            while not stop.is_set():
                self._wake.clear()  # before reading, so a notification during the read is kept
                if not await self._lease.hold(self._status()):
                    self._set_state("standby")
                    await self._idle(stop, self._lease.renew_every)
                    continue
                if self._lease.paused:
                    self._set_state("paused")
                    await self._idle(stop, self._lease.renew_every)
                    continue
                if self.failure is not None and time.monotonic() < self._retry_at:
                    await self._idle(stop, self._lease.renew_every)  # stopped on an error: keep the heartbeat
                    continue
                try:
                    batch, busy = await self._step(conn)
                except PoisonEvent as poison:
                    self._stop_on(poison)
                    continue
                self._recovered()
                if batch.events or not batch.held_back:
                    self.progress_at = time.monotonic()
                if not busy:
                    # Held-back rows wait for a transaction that may not notify: look again soon.
                    await self._idle(stop, 0.02 if batch.held_back else self._idle_timeout)
        finally:
            with contextlib.suppress(*RETRYABLE):  # the connection may be the thing that broke
                await conn.close(timeout=5)

    @property
    def _idle_timeout(self) -> float:
        return min(self._settings.poll_interval, self._lease.renew_every)

    def _at(self, generation: int) -> Projector:
        if generation not in self._generations:
            self._generations[generation] = self._projector.at(generation)
        return self._generations[generation]

    async def _step(self, conn: Connection) -> tuple[Batch, bool]:
        """One live batch, then one step of a zero-downtime rebuild or of deleting a retired
        generation; returns the live batch and whether anything was done."""
        if self._notified_at is not None:
            self._metrics.wakeup.observe(time.monotonic() - self._notified_at)
            self._notified_at = None
        live, checkpoint, state, read_at = await self._state()
        if state.parked_requests:
            await self._serve_parked_requests(conn, live)
        if checkpoint is None:
            await self._start_from_scratch(conn, live)
        batch = await self._reads.read(conn, checkpoint or START, self._settings.batch_size, self.projection)
        await self._track_held_back(conn, batch)
        if batch.events:
            checkpoint = await self._apply(live, checkpoint, batch.events)
            self.applied_events += len(batch.events)
            self._metrics.batch_applied(len(batch.events))
        elif checkpoint is None and not batch.held_back:
            await live.mark_empty_log()
        await self._measure_lag(conn, batch, checkpoint)
        busy = bool(batch.events)
        if state.building is not None and checkpoint is not None:
            busy = await self._build_step(conn, live, int(state.building), checkpoint) or busy
        if state.retired is not None:
            busy = await self._retire_step(state.retired) or busy
        if state.quiet and checkpoint is not None:
            self._known = (read_at, checkpoint)
        return batch, busy

    async def _state(self) -> tuple[Projector, LogPosition | None, _StepState, float]:
        """The step's state, from the last step while that is quiet and fresh (STATE_REUSE), and when
        it was read."""
        known, self._known = self._known, None  # kept again only by a step that ends well
        if known is not None and time.monotonic() - known[0] < STATE_REUSE:
            return self._live, known[1], _QUIET, known[0]
        read_at = time.monotonic()
        return (*await self._read_state(), read_at)

    async def _read_state(self) -> tuple[Projector, LogPosition | None, _StepState]:
        """The live generation, its checkpoint and what else there is to do, in one round trip: the
        checkpoint is read from the generation live at the last step, and again only if that changed.
        The batch's guarded write checks both, so a switch or a flush between steps is never missed."""
        redis, keys = self._projector.redis, self._projector.keys
        guess = self._live
        async with redis.pipeline(transaction=False) as pipe:
            pipe.mget(keys.generation_pointer, keys.next_generation, guess.keys.checkpoint)
            pipe.exists(keys.parked_requests)  # a list exists while it holds a request
            pipe.srandmember(keys.retired)
            (pointer, building, raw), requests, retired = await pipe.execute()
        live = self._live = self._at(parse_generation(pointer))
        if live is not guess:
            raw = await redis.get(live.keys.checkpoint)
        checkpoint = None if raw is None else LogPosition.parse(raw)
        return live, checkpoint, _StepState(building, bool(requests), retired)

    async def _build_step(self, conn: Connection, live: Projector, building: int, live_checkpoint: LogPosition) -> bool:
        """One batch of a zero-downtime rebuild: generation `building` replays the log from the start,
        never past the live generation's checkpoint, and becomes the live one once it reaches it."""
        keys = self._projector.keys
        if building != live.keys.generation + 1:
            log.warning("projection %s: dropping a stale request to build generation %d", self.projection, building)
            await self._projector.redis.delete(keys.next_generation)
            return False
        target = self._at(building)
        checkpoint = await target.checkpoint()
        if checkpoint == live_checkpoint:
            await target.switch_to(self.worker_id, live_checkpoint)
            log.info(
                "projection %s: generation %d caught up at %s and is live; deleting generation %d",
                self.projection,
                building,
                live_checkpoint.token(),
                live.keys.generation,
            )
            return True
        batch = await read_batch(conn, checkpoint or START, self._settings.batch_size)
        events = [e for e in batch.events if LogPosition(e.tx_id, e.position) <= live_checkpoint]
        if events:
            await self._apply(target, checkpoint, events, live=False)
            return True
        if checkpoint is None and live_checkpoint == START:
            await target.mark_empty_log()  # an empty log: the new generation is complete at once
            return True
        return False

    async def _retire_step(self, raw: str | bytes) -> bool:
        """Deletes a chunk of generation `raw`, retired by a switch; forgets it once nothing is left."""
        redis, keys = self._projector.redis, self._projector.keys
        retired = keys.at(int(raw))
        # Read now, not at the start of the step (which may have switched): never delete the live one.
        if retired.generation != parse_generation(await redis.get(keys.generation_pointer)):
            if await delete_views(redis, retired, limit=RETIRE_CHUNK):
                return True
            await redis.delete(*retired.generation_keys)
        await redis.srem(keys.retired, raw)
        log.info("projection %s: generation %d deleted", self.projection, retired.generation)
        return False

    async def _apply(
        self, projector: Projector, checkpoint: LogPosition | None, events: list[RecordedEvent], live: bool = True
    ) -> LogPosition:
        """Applies a batch; under the park policy, parks each order whose event fails and tries again."""
        park: dict[str, str] = {}
        started_ns = time.time_ns()
        while True:
            try:
                applied = await projector.apply(checkpoint, events, holder=self.worker_id, park=park, live=live)
            except PoisonEvent as poison:
                if self._settings.poison_policy != "park" or poison.stream_id in park:
                    raise
                log.warning(
                    "projection %s parked order %r from the %s; its later events wait with it",
                    self.projection,
                    poison.stream_id,
                    poison,
                )
                park[poison.stream_id] = str(poison)
            else:
                self._log_batch(projector, events, park, live)
                tracing.record_projection(self.projection, events, started_ns, live)
                return applied

    def _log_batch(self, projector: Projector, events: list[RecordedEvent], park: dict[str, str], live: bool) -> None:
        """One DEBUG line per event of an applied batch, with the correlation id of the command that
        wrote it (a field of the record: JSON logs carry it), one DEBUG line for the batch, and an
        INFO summary at most every SUMMARY_EVERY seconds (a line per batch would flood busy logs)."""
        name, generation = self.projection, projector.keys.generation
        if log.isEnabledFor(logging.DEBUG):
            for recorded in events:
                what = "parked" if recorded.stream_id in park else "applied"
                kind = event_type(recorded.event)
                fields = {
                    "projection": name,
                    "position": recorded.position,
                    "order_id": recorded.stream_id,
                    "event_type": kind,
                    "correlation_id": recorded.metadata.get("correlation_id"),
                }
                log.debug(
                    "projection %s: %s %s of order %r at position %d",
                    name,
                    what,
                    kind,
                    recorded.stream_id,
                    recorded.position,
                    extra=fields,
                )
        self._summary.add(len(events))
        if self._summary.due():
            log.info(
                "projection %s: applied %d events in %.0fs, up to position %d",
                name,
                *self._summary.take(),
                events[-1].position,
                extra={"projection": name, "last_position": events[-1].position},
            )
        if log.isEnabledFor(logging.DEBUG):
            first, last = events[0], events[-1]
            lag = (datetime.now(UTC) - last.recorded_at).total_seconds()  # age of the newest event applied
            fields = {
                "projection": name,
                "count": len(events),
                "first_position": first.position,
                "last_position": last.position,
                "lag_seconds": round(lag, 3),
                "generation": generation,
                "live": live,
            }
            log.debug(
                "projection %s: applied %d events, positions %d to %d, lag %.3fs%s",
                name,
                len(events),
                first.position,
                last.position,
                lag,
                "" if live else f" (building generation {generation})",
                extra=fields,
            )

    async def _serve_parked_requests(self, conn: Connection, live: Projector) -> None:
        """Runs operators' requests (from ProjectionAdmin) to retry an order's parked events."""
        redis, keys = live.redis, live.keys
        while isinstance(raw := await redis.lpop(keys.parked_requests), str | bytes):
            order_id = json.loads(raw)["order_id"]
            positions = [int(p) for p in await redis.lrange(keys.parked_events(order_id), 0, -1)]
            if not positions:
                continue
            events = await read_positions(conn, positions)
            try:
                await live.apply_parked(order_id, events, self.worker_id)
            except PoisonEvent as poison:
                await redis.hset(keys.parked_errors, order_id, str(poison))
                log.warning(
                    "projection %s: retrying parked order %r failed again: %s", self.projection, order_id, poison
                )
            else:
                log.info(
                    "projection %s: applied and released %d parked events of order %r",
                    self.projection,
                    len(events),
                    order_id,
                )

    async def _start_from_scratch(self, conn: Connection, live: Projector) -> None:
        target = await head(conn)
        if target is not None:
            log.warning(
                "the views hold no checkpoint: rebuilding them from the start of the log up to %s", target.token()
            )
            await live.start_rebuild(target)

    async def _track_held_back(self, conn: Connection, batch: Batch) -> None:
        """Makes a long wait behind an older transaction visible: in the log and in the heartbeat."""
        if not batch.held_back:
            if self._held_back is not None and self._held_back.reported_at > -float("inf"):
                log.info("no longer held back (after %.1fs)", time.monotonic() - self._held_back.since)
            self._held_back = None
            return
        now = time.monotonic()
        held = self._held_back = self._held_back or HeldBack(since=now)
        if now - held.since >= HELD_BACK_REPORT_AFTER and now - held.reported_at >= HELD_BACK_REPORT_EVERY:
            held.reported_at = now
            held.blocker = await oldest_transaction(conn)
            log.warning(
                "projection held back for %.1fs by an older open transaction: %s", now - held.since, held.blocker
            )

    def _stop_on(self, poison: PoisonEvent) -> None:
        """Stops this projection at the poison event (other projections go on); retried later, so a
        fix (an upcaster, a code change, a data repair) lets it resume from that same event."""
        if self.failure is None or str(poison) != str(self.failure):
            log.error(
                "projection %s stopped on the %s; it resumes from this event once that is fixed (retrying every %.1fs)",
                self.projection,
                poison,
                self._settings.retry_failed_after,
            )
        self.failure = poison
        self._retry_at = time.monotonic() + self._settings.retry_failed_after
        self._set_state("failed")
        self._lease.forget()  # publish the failed state in the heartbeat now

    def _recovered(self) -> None:
        if self.failure is not None:
            log.warning("projection %s resumed past the event at position %d", self.projection, self.failure.position)
            self.failure = None
            self._lease.forget()
        self._set_state("active")

    def _status(self) -> dict[str, Any]:
        held = self._held_back
        failure = self.failure
        return {
            "state": "failed" if failure else "active",
            "error": str(failure) if failure else None,
            "failed_position": failure.position if failure else None,
            "applied_events": self.applied_events,
            "held_back_seconds": round(time.monotonic() - held.since, 3) if held else 0,
            "held_back_by": held.blocker if held else None,
        }

    def _set_state(self, state: str) -> None:
        if state != self.state:
            log.info("projection %s: worker %s is now %s", self._projector.name, self.worker_id, state)
            self.state = state
            self._metrics.state(state)
            self._notified_at = None
            self.progress_at = time.monotonic()
            if state == "standby":  # the active worker reports the lag
                self._metrics.lag(0, 0.0)

    def _notified(self, *_: object) -> None:
        """A NOTIFY of an append: wake the loop, and time how long until a batch starts on it."""
        self._wake.set()
        self._reads.notifications += 1
        if self._notified_at is None and self.state == "active":
            self._notified_at = time.monotonic()

    async def _measure_lag(self, conn: Connection, batch: Batch, checkpoint: LogPosition | None) -> None:
        """Sets the lag gauges from what the read found. Caught up (a short batch, nothing held back) is
        0 at no cost; behind (a full batch, or rows held back) costs one index lookup of the log's head."""
        if len(batch.events) < self._settings.batch_size and not batch.held_back:
            self.lag_events = 0
            self._metrics.lag(0, 0.0)
            return
        last = await head(conn)
        self.lag_events = max(0, last.position - (checkpoint.position if checkpoint else 0)) if last else 0
        seconds = 0.0
        if batch.events:  # the age of the newest event applied: how far behind the views are
            seconds = time.time() - batch.events[-1].recorded_at.timestamp()
        if self._held_back is not None:
            seconds = max(seconds, time.monotonic() - self._held_back.since)
        self._metrics.lag(self.lag_events, max(0.0, seconds))

    async def _idle(self, stop: asyncio.Event, timeout: float) -> None:
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()


SUMMARY_EVERY = 10.0  # seconds between INFO summaries of applied events


class _Summary:
    """Events applied since the last INFO summary line."""

    def __init__(self) -> None:
        self.events = 0
        self.since = time.monotonic()

    def add(self, count: int) -> None:
        self.events += count

    def due(self) -> bool:
        return time.monotonic() - self.since >= SUMMARY_EVERY

    def take(self) -> tuple[int, float]:
        now = time.monotonic()
        events, seconds = self.events, now - self.since
        self.events, self.since = 0, now
        return events, seconds
