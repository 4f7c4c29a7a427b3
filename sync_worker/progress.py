"""How far a projection's loop has come, for operators: the lag gauges, a wait behind an older
transaction (its gauge, the log and the heartbeat), and the log lines of applied batches.

The PostgreSQL head is only looked up while the projection is behind (`measure_lag`), and at most
every HEAD_EVERY seconds: a short batch with nothing held back is caught up, at no cost, and under
steady load many batches are briefly held back behind appends still committing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from orders.domain.consistency import LogPosition
from orders.domain.errors import PoisonEvent
from orders.domain.events import RecordedEvent, event_type
from orders.store.event_store import Batch, Connection, head, oldest_transaction
from orders.telemetry.metrics import ProjectionMetrics

# Every part of the worker logs under this one name: operators filter on it (docs/operations.md).
WORKER_LOGGER = "sync_worker.worker"
log = logging.getLogger(WORKER_LOGGER)

HELD_BACK_REPORT_AFTER = 2.0  # seconds held back before the cause is looked up and logged
HELD_BACK_REPORT_EVERY = 10.0
SUMMARY_EVERY = 10.0  # seconds between INFO summaries of applied events
HEAD_EVERY = 0.5  # seconds: while behind, the lag gauges use a head of the log looked up this recently


@dataclass
class HeldBack:
    """Since when the projection waits for an older transaction, and which one, for the heartbeat."""

    since: float
    reported_at: float = -float("inf")
    blocker: dict[str, Any] | None = None


class Progress:
    """One projection loop's events applied, lag and held-back wait, and the lines that log them."""

    def __init__(self, projection: str, batch_size: int, metrics: ProjectionMetrics) -> None:
        self._projection = projection
        self._batch_size = batch_size
        self._metrics = metrics
        self._held_back: HeldBack | None = None
        self._summary = _Summary()
        self.applied_events = 0  # by live batches of this loop; parked events once released count elsewhere
        self.batches = 0  # live batches applied by this loop (orders_projection_batch_size counts them per process)
        self.lag_events = 0  # after the last read; estimated from positions
        self._head: tuple[float, LogPosition | None] | None = None  # when the log's head was looked up, and it

    def applied(self, events: int) -> None:
        """Counts a live batch."""
        self.applied_events += events
        self.batches += 1
        self._metrics.batch_applied(events)

    def status(self) -> dict[str, Any]:
        """The held-back wait, for the heartbeat."""
        held = self._held_back
        return {
            "held_back_seconds": round(time.monotonic() - held.since, 3) if held else 0,
            "held_back_by": held.blocker if held else None,
        }

    def left_active(self) -> None:
        """The loop stopped stepping (standby, paused, failed): a wait it measured is over; if it is
        held back again once active, that wait counts from then, not from the old one's start."""
        self._held_back = None

    async def track_held_back(self, conn: Connection, batch: Batch) -> None:
        """Makes a wait behind an older transaction visible: in orders_projection_held_back_seconds
        (set on every step, so it grows while the wait lasts), in the heartbeat, and, once long, in the log."""
        if not batch.held_back:
            if self._held_back is not None and self._held_back.reported_at > -float("inf"):
                log.info("no longer held back (after %.1fs)", time.monotonic() - self._held_back.since)
            self._held_back = None
            self._metrics.held_back(0.0)
            return
        now = time.monotonic()
        held = self._held_back = self._held_back or HeldBack(since=now)
        self._metrics.held_back(now - held.since)
        if now - held.since >= HELD_BACK_REPORT_AFTER and now - held.reported_at >= HELD_BACK_REPORT_EVERY:
            held.reported_at = now
            held.blocker = await oldest_transaction(conn)
            log.warning(
                "projection held back for %.1fs by an older open transaction: %s", now - held.since, held.blocker
            )

    async def measure_lag(self, conn: Connection, batch: Batch, checkpoint: LogPosition | None) -> None:
        """Sets the lag gauges from what the read found. Caught up (a short batch, nothing held back) is
        0 at no cost; behind (a full batch, or rows held back) costs one index lookup of the log's head,
        at most every HEAD_EVERY seconds."""
        if len(batch.events) < self._batch_size and not batch.held_back:
            self.lag_events = 0
            self._metrics.lag(0, 0.0)
            return
        last = await self._log_head(conn)
        self.lag_events = max(0, last.position - (checkpoint.position if checkpoint else 0)) if last else 0
        seconds = 0.0
        if batch.events:  # the age of the newest event applied: how far behind the views are
            seconds = time.time() - batch.events[-1].recorded_at.timestamp()
        if self._held_back is not None:
            seconds = max(seconds, time.monotonic() - self._held_back.since)
        self._metrics.lag(self.lag_events, max(0.0, seconds))

    async def _log_head(self, conn: Connection) -> LogPosition | None:
        now = time.monotonic()
        if self._head is None or now - self._head[0] >= HEAD_EVERY:
            self._head = (now, await head(conn))
        return self._head[1]

    def log_batch(
        self, generation: int, events: list[RecordedEvent], parked: Mapping[str, PoisonEvent], live: bool
    ) -> None:
        """One DEBUG line per event of an applied batch, with the correlation id of the command that
        wrote it (a field of the record: JSON logs carry it), one DEBUG line for the batch, and an
        INFO summary at most every SUMMARY_EVERY seconds (a line per batch would flood busy logs)."""
        if log.isEnabledFor(logging.DEBUG):
            self._log_events(events, parked)
        self._summary.add(len(events))
        if self._summary.due():
            name, last = self._projection, events[-1].position
            log.info(
                "projection %s: applied %d events in %.0fs, up to position %d",
                name,
                *self._summary.take(),
                last,
                extra={"projection": name, "last_position": last},
            )
        if log.isEnabledFor(logging.DEBUG):
            self._log_applied(generation, events, live)

    def _log_events(self, events: list[RecordedEvent], parked: Mapping[str, PoisonEvent]) -> None:
        name = self._projection
        for recorded in events:
            poison = parked.get(recorded.stream_id)  # parked from that event on
            what = "parked" if poison is not None and recorded.position >= poison.position else "applied"
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

    def _log_applied(self, generation: int, events: list[RecordedEvent], live: bool) -> None:
        name, first, last = self._projection, events[0], events[-1]
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
