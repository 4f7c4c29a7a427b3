"""The tailing loop: read the next batch after the checkpoint, apply it, repeat.

It wakes on PostgreSQL NOTIFY (sent by every append) and also polls, because a
notification can be lost on reconnect and because rows held back behind an
older transaction become readable when that transaction ends, which notifies
nobody. Connection failures are logged and retried with backoff; the loop
re-reads its checkpoint from Redis every time, so it also notices a flushed
Redis and rebuilds the views from the start of the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import asyncpg
import redis.exceptions

from orders.consistency import START
from orders.event_store import NOTIFY_CHANNEL, Batch, Connection, open_connection, read_batch
from sync_worker.projector import CheckpointMoved, OrdersProjector

log = logging.getLogger(__name__)

RETRYABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, redis.exceptions.RedisError, CheckpointMoved)


@dataclass(frozen=True)
class WorkerSettings:
    postgres_url: str
    batch_size: int = 500
    poll_interval: float = 1.0  # fallback when no notification arrives
    max_backoff: float = 5.0


class SyncWorker:
    def __init__(self, settings: WorkerSettings, projector: OrdersProjector) -> None:
        self._settings = settings
        self._projector = projector
        self._wake = asyncio.Event()
        self.applied_events = 0
        self.last_progress = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        """Tails until `stop` is set, reconnecting after failures."""
        failures = 0
        while not stop.is_set():
            try:
                await self._tail(stop)
            except RETRYABLE as error:
                failures += 1
                delay = min(self._settings.max_backoff, 0.1 * 2**failures)
                log.warning("sync failed (%s: %s); retrying in %.1fs", type(error).__name__, error, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            else:
                failures = 0

    async def _tail(self, stop: asyncio.Event) -> None:
        conn = await open_connection(self._settings.postgres_url)
        try:
            await conn.add_listener(NOTIFY_CHANNEL, lambda *_: self._wake.set())
            log.info("tailing the event log into %s", self._projector.keys.prefix)
            while not stop.is_set():
                self._wake.clear()  # before reading, so a notification during the read is kept
                batch = await self._step(conn)
                if not batch.events:
                    await self._idle(stop, held_back=batch.held_back)
        finally:
            with contextlib.suppress(*RETRYABLE):  # the connection may be the thing that broke
                await conn.close(timeout=5)

    async def _step(self, conn: Connection) -> Batch:
        checkpoint = await self._projector.checkpoint()
        batch = await read_batch(conn, checkpoint or START, self._settings.batch_size)
        if batch.events:
            await self._projector.apply(checkpoint, batch.events)
            self.applied_events += len(batch.events)
            self.last_progress = time.monotonic()
        elif checkpoint is None and not batch.held_back:
            await self._projector.mark_empty_log()
        return batch

    async def _idle(self, stop: asyncio.Event, *, held_back: bool) -> None:
        # Held-back rows wait for a transaction that may not notify: look again soon.
        timeout = 0.02 if held_back else self._settings.poll_interval
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
