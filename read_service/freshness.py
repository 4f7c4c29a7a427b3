"""Read-your-writes: wait until the views have reached a consistency token.

The sync worker publishes its new checkpoint on a Redis channel with every
batch. One subscription per process tracks it, and queries that carry a token
wait on a condition that each publication wakes: a push, not a poll. After
(re)subscribing the watcher reads the checkpoint key once, since publications
sent while it was not subscribed are lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from orders.domain.consistency import LogPosition
from orders.server.tasks import BackgroundTask
from orders.store.views import REDIS_ERRORS, LiveReader, RedisClient, ViewKeys

log = logging.getLogger(__name__)

SUBSCRIPTION_ERRORS: tuple[type[Exception], ...] = (*REDIS_ERRORS, OSError)  # a lost subscription


class CheckpointWatcher:
    """The checkpoint of one partition of one projection (a query waits on the partitions it reads)."""

    def __init__(self, redis: RedisClient, keys: ViewKeys) -> None:
        self._redis = redis
        self.keys = keys  # the partition whose checkpoint this is
        self._live = LiveReader(redis, keys)
        self._changed = asyncio.Condition()
        self._task = BackgroundTask("checkpoint-watcher")
        self._waiting = 0
        self.latest: LogPosition | None = None
        self.high_water: LogPosition | None = None  # the newest checkpoint seen, never lowered
        self.on_views_lost: Callable[[], None] = lambda: None  # called when the checkpoint goes back

    def observe(self, checkpoint: LogPosition) -> None:
        """Records that the views were seen at `checkpoint` (by a read or a publication)."""
        if self.high_water is None or checkpoint > self.high_water:
            self.high_water = checkpoint

    def behind(self, checkpoint: LogPosition, seen_before: LogPosition | None) -> bool:
        """Whether views read at `checkpoint` are older than they were seen at before the read
        started (`seen_before`, the high water then); records `checkpoint` either way."""
        self.observe(checkpoint)
        return seen_before is not None and checkpoint < seen_before

    def start(self) -> None:
        self._task.start(self._follow)

    async def stop(self) -> None:
        await self._task.stop()

    @property
    def waiting(self) -> int:
        """Queries waiting now for this partition to reach their token."""
        return self._waiting

    def reached(self, target: LogPosition) -> bool:
        return self.latest is not None and self.latest >= target

    async def wait_for(self, target: LogPosition, timeout: float) -> bool:
        """True once the views include `target`; False if `timeout` seconds pass first."""
        if self.reached(target):
            return True
        self._waiting += 1
        try:
            async with asyncio.timeout(max(timeout, 0)), self._changed:
                await self._changed.wait_for(lambda: self.reached(target))
        except TimeoutError:
            pass
        finally:
            self._waiting -= 1
        return self.reached(target)

    async def _set(self, raw: str | bytes | None) -> None:
        # Not max(): after a flush the views restart from zero, and so must the watcher.
        previous, self.latest = self.latest, None if raw is None else LogPosition.parse(raw)
        if self.latest is not None:
            self.observe(self.latest)
        if previous is not None and (self.latest is None or self.latest < previous):
            self.on_views_lost()
        async with self._changed:
            self._changed.notify_all()

    async def _checkpoint(self) -> str | None:
        """The live generation's checkpoint (a zero-downtime rebuild switches generations)."""
        [raw] = await self._live.get(lambda keys: [keys.checkpoint])
        return raw

    async def _follow(self) -> None:
        while True:
            try:
                await self._subscribe_and_listen()
            except SUBSCRIPTION_ERRORS as error:
                log.warning("checkpoint subscription lost (%s); resubscribing in 1s", error)
                await asyncio.sleep(1)

    async def _subscribe_and_listen(self) -> None:
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(self.keys.checkpoint_channel)
            await self._set(await self._checkpoint())
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    await self._set(message["data"])
                elif self._waiting:  # re-read in case a publication was lost
                    await self._set(await self._checkpoint())
