"""The tailing loop of one projection: read the next batch after the checkpoint, apply it, repeat.

It wakes on PostgreSQL NOTIFY (sent by every append) and also polls, because a
notification can be lost on reconnect and because rows held back behind an
older transaction become readable when that transaction ends, which notifies
nobody. Under steady load it waits a moment after a notification so that a
batch holds several events (sync_worker.batching); a lone event goes at once.
A batch shorter than the batch size with nothing held back leaves the loop
caught up as of its read: it idles until the next notification (or poll)
instead of reading the log again to find nothing. Connection failures are logged and retried with backoff; the loop
re-reads its checkpoint from Redis every time, so it also notices a flushed
Redis and rebuilds the views from the start of the log.

A projection may be split into partitions (orders.store.views.partition_of): a loop per
partition, each with its own checkpoint, lease, heartbeat and generation. Only the holder of a
partition's lease applies batches (sync_worker.lease), and a loop tries to hold it only while the
partition is its worker's share (sync_worker.membership): the workers share the partitions out,
and take over a stopped or dead worker's within the lease's ttl.

SyncWorker is the loop and its step; each other job is a part it composes:

- sync_worker.reads: the step's state in one round trip (or reused from the
  last quiet step) and the log's rows, shared by the process's loops in step;
- sync_worker.projector: applying a batch, exactly once in effect, in two more
  round trips (one read-only script, one guarded write script);
- sync_worker.parking: the poison policy and operators' retries of parked orders;
- sync_worker.generations: from-scratch starts, zero-downtime rebuilds and
  deleting retired generations;
- sync_worker.progress: lag, the held-back wait and the log lines of batches;
- sync_worker.batching: when a busy loop waits for more events before a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg

from orders.domain.consistency import START, LogPosition
from orders.domain.errors import PoisonEvent
from orders.domain.events import RecordedEvent
from orders.store.event_store import NOTIFY_CHANNEL, Batch, Connection, open_connection
from orders.store.views import REDIS_ERRORS
from orders.telemetry import tracing
from orders.telemetry.metrics import ProjectionMetrics, count_store_error
from sync_worker.batching import DEFAULT_WAIT, BatchWindow
from sync_worker.generations import Generations
from sync_worker.lease import Lease
from sync_worker.membership import Membership
from sync_worker.parking import ParkedOrders, PoisonPolicy
from sync_worker.progress import WORKER_LOGGER, Progress
from sync_worker.projector import CheckpointMoved, LeaseLost, Projector
from sync_worker.reads import SharedReads, StepStates

log = logging.getLogger(WORKER_LOGGER)

RETRYABLE: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a connection left mid-protocol when the server went away
    *REDIS_ERRORS,  # a cluster client's own errors too
    CheckpointMoved,
    LeaseLost,
)


def _store_of(error: BaseException) -> str | None:
    """Which store a retryable failure came from, for orders_store_errors_total; None for a lost race."""
    if isinstance(error, REDIS_ERRORS):
        return "redis"
    if isinstance(error, OSError | asyncpg.PostgresError | asyncpg.InterfaceError | asyncpg.InternalClientError):
        return "postgres"
    return None


def default_worker_id() -> str:
    """A new id for every process. A worker restarted after a crash with it is a stranger to its own
    lease and waits out its predecessor's ttl; pin ORDERS_WORKER_ID (the pod name, a fixed name) so a
    restart takes its lease back at once (sync_worker.lease)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerSettings:
    postgres_url: str
    batch_size: int = 500
    poll_interval: float = 1.0  # fallback when no notification arrives
    max_backoff: float = 5.0
    lease_ttl: float = 5.0  # a standby takes over this long after the active worker stops renewing
    retry_failed_after: float = 10.0  # a projection stopped on a poison event tries that event again this often
    poison_policy: PoisonPolicy = PoisonPolicy.STOP
    batch_wait: float = DEFAULT_WAIT  # seconds a busy loop waits for more events before a step; 0: never


class StepOutcome(NamedTuple):
    """What one step of the loop did."""

    batch: Batch  # the live batch it read
    busy: bool  # it applied events or did some follow-up work
    again: bool  # more may be waiting already (a full batch, rebuild or retire work): step again at once


class SyncWorker:
    """One projection's loop: holds the lease, steps, stops on a poison event, idles and retries."""

    def __init__(
        self,
        settings: WorkerSettings,
        projector: Projector,
        worker_id: str | None = None,
        reads: SharedReads | None = None,
        membership: Membership | None = None,
    ) -> None:
        self._settings = settings
        self._reads = reads or SharedReads()  # shared with the process's other projection loops
        worker_id = worker_id or default_worker_id()
        self._lease = Lease(projector.redis, projector.keys, worker_id, settings.lease_ttl)
        # Shared with the process's loops of the other partitions of this projection.
        self._membership = membership or Membership(projector.redis, projector.keys, worker_id, settings.lease_ttl)
        self._partition = projector.keys.log_partition
        self._metrics = ProjectionMetrics(projector.name)
        self._progress = Progress(projector.name, settings.batch_size, self._metrics)
        self._parked = ParkedOrders(projector.name, self.worker_id, settings.poison_policy)
        self._generations = Generations(projector, self.worker_id, settings.batch_size, self._apply)
        self._states = StepStates(self._generations)
        self._wake = asyncio.Event()
        self._window = BatchWindow(settings.batch_wait)
        self._notified_at: float | None = None  # when a NOTIFY came that no batch has started on yet
        self.state = "starting"
        self._metrics.state(self.state)
        self.failure: PoisonEvent | None = None
        self._retry_at = 0.0
        self.progress_at = time.monotonic()  # when the loop last applied a batch or found itself caught up

    @property
    def worker_id(self) -> str:
        return self._lease.worker_id

    @property
    def projection(self) -> str:
        return self._generations.projector.name

    @property
    def applied_events(self) -> int:
        return self._progress.applied_events

    @property
    def batches(self) -> int:
        """Live batches applied by this loop."""
        return self._progress.batches

    @property
    def batch_window(self) -> BatchWindow:
        """When the loop steps: its counts of steps that waited for more events and that did not."""
        return self._window

    @property
    def lag_events(self) -> int:
        """After the last read; estimated from positions."""
        return self._progress.lag_events

    async def run(self, stop: asyncio.Event) -> None:
        """Tails until `stop` is set, reconnecting after failures."""
        log.info(
            "projection %s: tailing the event log into %s as %s",
            self.projection,
            self._generations.projector.keys.pprefix,
            self.worker_id,
        )
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
            await self._membership.leave()
            await self._lease.release()

    async def _tail(self, stop: asyncio.Event) -> None:
        """Stands by until this loop may apply, then applies until `stop` or until the partition
        becomes another worker's."""
        stopping = asyncio.ensure_future(self._wake_on(stop))  # one waiter for the loop, not one per idle
        try:
            if await self._until_active(stop):
                await self._apply_while_active(stop)
        finally:
            stopping.cancel()

    async def _until_active(self, stop: asyncio.Event) -> bool:
        """Waits, without a PostgreSQL connection, until this loop may step; False if stopped first.
        A worker holds one connection per partition it applies, not one per partition it runs."""
        while not stop.is_set():
            self._wake.clear()
            if await self._may_step():
                return True
            await self._idle(self._lease.renew_every)
        return False

    async def _apply_while_active(self, stop: asyncio.Event) -> None:
        conn = await open_connection(self._settings.postgres_url)
        try:
            await conn.add_listener(NOTIFY_CHANNEL, self._notified)
            while not stop.is_set():
                self._wake.clear()  # before reading, so a notification during the read is kept
                if not await self._may_step():
                    if self.state == "standby":
                        return  # another worker's now: give the connection back
                    await self._idle(self._lease.renew_every)
                    continue
                try:
                    batch, _, again = await self._step(conn)
                except PoisonEvent as poison:
                    self._stop_on(poison)
                    continue
                self._recovered()
                if batch.events or not batch.held_back:
                    self.progress_at = time.monotonic()
                if not again:
                    # Held-back rows wait for a transaction that may not notify: look again soon.
                    await self._idle(0.02 if batch.held_back else self._idle_timeout)
                    await self._gather(stop)
        finally:
            with contextlib.suppress(*RETRYABLE):  # the connection may be the thing that broke
                await conn.close(timeout=5)

    async def _may_step(self) -> bool:
        """Renews the lease (and the heartbeat); False while the partition is another worker's share
        (the lease is handed over) or another worker holds it, while an operator has paused the
        projection, or while it waits to retry the event it stopped on."""
        await self._membership.refresh()
        if not self._membership.is_mine(self._partition.index):
            if self._lease.held:
                log.info(
                    "projection %s: handing over to worker %s",
                    self.projection,
                    self._membership.owner(self._partition.index),
                )
                await self._lease.release()
            self._set_state("standby")
            return False
        if not await self._lease.hold(self._status()):
            self._set_state("standby")
            return False
        if self._lease.paused:
            self._set_state("paused")
            return False
        # Stopped on an error: keep the heartbeat until it is time to try the event again.
        return self.failure is None or time.monotonic() >= self._retry_at

    @property
    def _idle_timeout(self) -> float:
        return min(self._settings.poll_interval, self._lease.renew_every)

    async def _step(self, conn: Connection) -> StepOutcome:
        """One live batch, then one step of a zero-downtime rebuild or of deleting a retired
        generation. A live batch shorter than the batch size, with nothing held back, leaves the
        projection caught up as of the read: rows committed since notify the loop."""
        started = self._window.stepping()
        if self._notified_at is not None:
            self._metrics.wakeup.observe(time.monotonic() - self._notified_at)
            self._notified_at = None
        live, checkpoint, state, read_at = await self._states.read()
        if state.parked_requests:
            await self._parked.serve_requests(conn, live)
        if checkpoint is None:
            await self._generations.start_from_scratch(conn, live)
        after, size = checkpoint or START, self._settings.batch_size
        notified_at = self._window.last_notified
        batch = await self._reads.read(conn, after, size, self._partition, self.projection, notified_at=notified_at)
        await self._progress.track_held_back(conn, batch)
        if batch.events:
            checkpoint = await self._apply(live, checkpoint, batch.events, through=batch.through)
            self._progress.applied(len(batch.events))
            self._window.stepped(started)
        elif batch.through is not None and batch.through > after:  # only other partitions' events
            checkpoint = await self._apply(live, checkpoint, [], through=batch.through)
        elif checkpoint is None and not batch.held_back:
            await live.mark_empty_log()
        await self._progress.measure_lag(conn, batch, checkpoint)
        follow_up = False
        if state.building is not None and checkpoint is not None:
            follow_up = await self._generations.build_step(conn, live, int(state.building), checkpoint)
        if state.retired is not None:
            follow_up = await self._generations.retire_step(state.retired) or follow_up
        if state.quiet and checkpoint is not None:
            self._states.keep(read_at, checkpoint)
        return StepOutcome(batch, bool(batch.events) or follow_up, batch.more or follow_up)

    async def _apply(
        self,
        projector: Projector,
        checkpoint: LogPosition | None,
        events: list[RecordedEvent],
        live: bool = True,
        through: LogPosition | None = None,
    ) -> LogPosition:
        """Applies a batch (that covers the log `through` there, if given) under the poison policy,
        then logs and traces it."""
        started_ns = time.time_ns()
        applied, parked = await self._parked.apply(projector, checkpoint, events, live, through)
        if events:
            self._progress.log_batch(projector.keys.generation, events, parked, live)
            tracing.record_projection(self.projection, events, started_ns, live)
        return applied

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
        """The heartbeat's fields."""
        failure = self.failure
        return {
            "state": "failed" if failure else "active",
            "error": str(failure) if failure else None,
            "failed_position": failure.position if failure else None,
            "applied_events": self.applied_events,
            **self._progress.status(),
        }

    def _set_state(self, state: str) -> None:
        if state != self.state:
            log.info("projection %s: worker %s is now %s", self.projection, self.worker_id, state)
            self.state = state
            self._metrics.state(state)
            self._notified_at = None
            self.progress_at = time.monotonic()
            if state == "standby":  # the active worker reports the lag
                self._metrics.lag(0, 0.0)
            if state != "active":
                self._progress.left_active()

    def _notified(self, *_: object) -> None:
        """A NOTIFY of an append: wake the loop, and time how long until a batch starts on it."""
        self._wake.set()
        self._window.notified()
        if self._notified_at is None and self.state == "active":
            self._notified_at = time.monotonic()

    async def _wake_on(self, stop: asyncio.Event) -> None:
        """Wakes the loop when `stop` is set, so that an idle loop waits on its wake-up alone."""
        await stop.wait()
        self._wake.set()

    async def _idle(self, timeout: float) -> None:
        """Until a notification (at once if one came already), `stop` (_wake_on) or `timeout`."""
        if self._wake.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _gather(self, stop: asyncio.Event) -> None:
        """The batch window: a busy loop woken by a notification waits what is left of the window
        since that notification, so the next batch also holds the events notified meanwhile; a loop
        that is not busy goes on at once. Bounded by ORDERS_BATCH_WAIT; `stop` ends it."""
        delay = self._window.delay()
        if delay > 0 and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
