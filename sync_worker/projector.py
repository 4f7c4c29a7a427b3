"""Applies batches of events to Redis views, exactly once in effect.

Each batch is one MULTI/EXEC transaction holding the view writes, the new
checkpoint and the notification for waiting readers, so a crash leaves either
all of it or none. WATCH on the checkpoint and the lease makes the transaction
fail if anyone else moved the checkpoint (another worker, a flush) or took the
lease since they were read. Each projection also skips events its views
already have (by version), so a replayed batch changes nothing.

`Projector` holds that protocol; a projection subclasses it and says, in
`stage`, what to read before the transaction and what to write inside it.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from orders.consistency import LogPosition
from orders.errors import PoisonEvent
from orders.events import RecordedEvent
from orders.views import OrderView, ViewKeys
from sync_worker.projection import project

Writes = Callable[[Pipeline], None]  # queues a batch's writes inside MULTI


class CheckpointMoved(Exception):
    """The checkpoint in Redis is not the one this batch was read after; re-read and retry."""


class LeaseLost(Exception):
    """Another worker holds the projection's lease; this one must not write."""


class Projector(ABC):
    def __init__(self, redis: Redis, keys: ViewKeys) -> None:
        self.redis = redis
        self.keys = keys

    @property
    def name(self) -> str:
        return self.keys.projection

    async def checkpoint(self) -> LogPosition | None:
        """The position of the last applied event; None when the views are empty (new or flushed)."""
        raw = await self.redis.get(self.keys.checkpoint)
        return None if raw is None else LogPosition.parse(raw)

    async def mark_empty_log(self) -> None:
        """Records that the views are complete for an empty event log (readers wait for a checkpoint)."""
        await self.redis.set(self.keys.checkpoint, LogPosition(0, 0).token(), nx=True)

    async def start_rebuild(self, target: LogPosition) -> None:
        """Marks the views as being rebuilt up to `target`, so that readers do not take a view
        that is not there yet for one that does not exist."""
        await self.redis.set(self.keys.rebuild_target, target.token(), nx=True)

    async def apply(
        self,
        after: LogPosition | None,
        events: list[RecordedEvent],
        holder: str | None = None,
        park: dict[str, str] | None = None,
    ) -> LogPosition:
        """Applies `events`, which follow checkpoint `after`, atomically; returns the new checkpoint.

        With `holder`, applies only while that worker holds the projection's lease (LeaseLost otherwise).
        Events of orders in `park` (order id -> why), and of orders parked before, go to the dead-letter
        list instead, in order, so that each of those orders stays consistent while the rest go on.
        """
        new_checkpoint = max(LogPosition(e.tx_id, e.position) for e in events)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                await pipe.watch(self.keys.checkpoint, self.keys.lease, self.keys.rebuild_target)
                current, lease, rebuild = await pipe.mget(
                    self.keys.checkpoint, self.keys.lease, self.keys.rebuild_target
                )
                if holder is not None and lease != holder:
                    raise LeaseLost(f"the lease is held by {lease!r}")
                if (None if current is None else LogPosition.parse(current)) != after:
                    raise CheckpointMoved(f"checkpoint is {current!r}, batch follows {after}")
                parked = await self._parked_orders(pipe, events, park or {})
                live = [e for e in events if e.stream_id not in parked]
                writes = await self.stage(pipe, live) if live else None
                pipe.multi()  # type: ignore[no-untyped-call]
                if writes is not None:
                    writes(pipe)
                self._queue_parking(pipe, [e for e in events if e.stream_id in parked], park or {})
                token = new_checkpoint.token()
                pipe.set(self.keys.checkpoint, token)
                pipe.incrby(self.keys.applied, len(live))  # parked events count when they are released
                if rebuild is not None and new_checkpoint >= LogPosition.parse(rebuild):
                    pipe.delete(self.keys.rebuild_target)
                pipe.publish(self.keys.checkpoint_channel, token)
                await pipe.execute()
        except WatchError as error:
            raise CheckpointMoved("checkpoint, lease or rebuild mark changed during the batch") from error
        return new_checkpoint

    async def _parked_orders(self, pipe: Pipeline, events: list[RecordedEvent], park: dict[str, str]) -> set[str]:
        ids = sorted({e.stream_id for e in events})
        scores = await pipe.zmscore(self.keys.parked, ids)
        return {i for i, score in zip(ids, scores, strict=True) if score is not None} | set(park)

    def _queue_parking(self, pipe: Pipeline, events: list[RecordedEvent], park: dict[str, str]) -> None:
        for recorded in events:
            pipe.zadd(self.keys.parked, {recorded.stream_id: recorded.position}, nx=True)
            pipe.rpush(self.keys.parked_events(recorded.stream_id), recorded.position)
        for order_id, why in park.items():
            pipe.hset(self.keys.parked_errors, order_id, why)

    async def apply_parked(self, order_id: str, events: list[RecordedEvent], holder: str) -> None:
        """Applies an order's parked events, in order, and releases them from the dead-letter list.
        Raises PoisonEvent (and changes nothing) if one of them still fails."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                await pipe.watch(self.keys.lease, self.keys.parked_events(order_id))
                if await pipe.get(self.keys.lease) != holder:
                    raise LeaseLost("the lease moved")
                writes = await self.stage(pipe, events)
                pipe.multi()  # type: ignore[no-untyped-call]
                writes(pipe)
                pipe.zrem(self.keys.parked, order_id)
                pipe.delete(self.keys.parked_events(order_id))
                pipe.hdel(self.keys.parked_errors, order_id)
                pipe.incrby(self.keys.applied, len(events))
                await pipe.execute()
        except WatchError as error:
            raise CheckpointMoved("the lease or the parked events changed meanwhile") from error

    @abstractmethod
    async def stage(self, pipe: Pipeline, events: list[RecordedEvent]) -> Writes:
        """Reads what the batch needs (the pipeline is in WATCH mode, so reads run at once) and
        returns the function that queues the batch's writes."""


class OrdersProjector(Projector):
    """The order views, the listing indexes and the change notifications for live watches (orders.views)."""

    async def stage(self, pipe: Pipeline, events: list[RecordedEvent]) -> Writes:
        before = await load_order_views(pipe, self.keys.order, {e.stream_id for e in events})
        after = fold_new(before, events)
        return lambda queue: self._queue_writes(queue, before, after)

    def _queue_writes(
        self, pipe: Pipeline, before: dict[str, OrderView | None], after: dict[str, OrderView | None]
    ) -> None:
        changed: list[dict[str, str | int]] = []
        for order_id, view in after.items():
            old = before[order_id]
            if view is None or view == old:
                continue
            pipe.set(self.keys.order(order_id), view.to_json())
            new_indexes = self.keys.indexes_of(view)
            stale = [k for k in self.keys.indexes_of(old) if k not in new_indexes] if old else []
            for key in stale:
                pipe.zrem(key, view.index_member())
            for key in new_indexes:
                pipe.zadd(key, {view.index_member(): 0})
            changed.append({"order_id": order_id, "customer_id": view.customer_id, "version": view.version})
        if changed:
            # Inside the MULTI with the views: no reader hears of a change before it can read it, and
            # a batch that fails announces nothing. Live watches re-read the views they are told of.
            pipe.publish(self.keys.changes_channel, json.dumps(changed, separators=(",", ":")))


async def load_order_views(
    pipe: Pipeline, key_of: Callable[[str], str], order_ids: set[str]
) -> dict[str, OrderView | None]:
    ids = sorted(order_ids)
    raws = await pipe.mget([key_of(i) for i in ids])
    return {i: None if raw is None else OrderView.from_json(raw) for i, raw in zip(ids, raws, strict=True)}


def fold_new(before: dict[str, OrderView | None], events: list[RecordedEvent]) -> dict[str, OrderView | None]:
    """The views after `events`, skipping every event a view already has."""
    views = dict(before)
    for recorded in events:
        view = views[recorded.stream_id]
        if view is not None and recorded.version <= view.version:
            continue  # already applied: a replay after a crash must change nothing
        try:
            views[recorded.stream_id] = project(view, recorded)
        except Exception as error:
            raise PoisonEvent(recorded.position, recorded.stream_id, error) from error
    return views
