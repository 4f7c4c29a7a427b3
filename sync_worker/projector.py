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
from orders.views import OrderView, ViewKeys, parse_generation
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

    def at(self, generation: int) -> Projector:
        """The same projection writing another generation of its keys."""
        return type(self)(self.redis, self.keys.at(generation))

    async def apply(
        self,
        after: LogPosition | None,
        events: list[RecordedEvent],
        holder: str | None = None,
        park: dict[str, str] | None = None,
        live: bool = True,
    ) -> LogPosition:
        """Applies `events`, which follow checkpoint `after`, atomically; returns the new checkpoint.

        With `holder`, applies only while that worker holds the projection's lease (LeaseLost otherwise).
        Events of orders in `park` (order id -> why), and of orders parked before, go to the dead-letter
        list instead, in order, so that each of those orders stays consistent while the rest go on.
        `live`: this generation is the one readers use (the pointer names it), and the batch is
        announced to them. Otherwise it is the generation a zero-downtime rebuild builds (the pointer
        names the one before it and the rebuild request names it); nothing is announced.
        """
        new_checkpoint = max(LogPosition(e.tx_id, e.position) for e in events)
        keys = self.keys
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                await pipe.watch(
                    keys.checkpoint, keys.lease, keys.rebuild_target, keys.generation_pointer, keys.next_generation
                )
                current, lease, rebuild, pointer, building = await pipe.mget(
                    keys.checkpoint, keys.lease, keys.rebuild_target, keys.generation_pointer, keys.next_generation
                )
                if holder is not None and lease != holder:
                    raise LeaseLost(f"the lease is held by {lease!r}")
                self._check_generation(pointer, building, live)
                if (None if current is None else LogPosition.parse(current)) != after:
                    raise CheckpointMoved(f"checkpoint is {current!r}, batch follows {after}")
                parked = await self._parked_orders(pipe, events, park or {})
                batch = [e for e in events if e.stream_id not in parked]
                writes = await self.stage(pipe, batch, announce=live) if batch else None
                pipe.multi()  # type: ignore[no-untyped-call]
                if writes is not None:
                    writes(pipe)
                self._queue_parking(pipe, [e for e in events if e.stream_id in parked], park or {})
                token = new_checkpoint.token()
                pipe.set(keys.checkpoint, token)
                pipe.incrby(keys.applied, len(batch))  # parked events count when they are released
                if rebuild is not None and new_checkpoint >= LogPosition.parse(rebuild):
                    pipe.delete(keys.rebuild_target)
                if live:
                    pipe.publish(keys.checkpoint_channel, token)
                await pipe.execute()
        except WatchError as error:
            raise CheckpointMoved("checkpoint, lease, rebuild mark or generation changed during the batch") from error
        return new_checkpoint

    def _check_generation(self, pointer: str | bytes | None, building: str | bytes | None, live: bool) -> None:
        generation = self.keys.generation
        if live and parse_generation(pointer) != generation:
            raise CheckpointMoved(f"generation {generation} is no longer live (the pointer is {pointer!r})")
        if not live and (parse_generation(pointer) != generation - 1 or parse_generation(building) != generation):
            raise CheckpointMoved(f"generation {generation} is no longer being built")

    async def switch_to(self, holder: str, checkpoint: LogPosition) -> None:
        """Makes this generation, built up to `checkpoint`, the live one in one step: only if the
        live generation is the one before it and at that same checkpoint, and `holder` holds the lease.
        The old generation is marked retired; the worker deletes its keys afterwards."""
        keys, old = self.keys, self.keys.at(self.keys.generation - 1)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                watched = [keys.lease, keys.generation_pointer, keys.next_generation, keys.checkpoint, old.checkpoint]
                await pipe.watch(*watched)
                lease, pointer, building, new_raw, old_raw = await pipe.mget(watched)
                if lease != holder:
                    raise LeaseLost(f"the lease is held by {lease!r}")
                self._check_generation(pointer, building, live=False)
                if new_raw != checkpoint.token() or old_raw != checkpoint.token():
                    raise CheckpointMoved(f"checkpoints {old_raw!r} and {new_raw!r} differ from {checkpoint}")
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.set(keys.generation_pointer, keys.generation)
                pipe.sadd(keys.retired, old.generation)
                pipe.delete(keys.next_generation, keys.rebuild_started)
                pipe.publish(keys.checkpoint_channel, checkpoint.token())
                await pipe.execute()
        except WatchError as error:
            raise CheckpointMoved("the generations moved during the switch") from error

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
                await pipe.watch(self.keys.lease, self.keys.parked_events(order_id), self.keys.generation_pointer)
                lease, pointer = await pipe.mget(self.keys.lease, self.keys.generation_pointer)
                if lease != holder:
                    raise LeaseLost("the lease moved")
                self._check_generation(pointer, None, live=True)
                writes = await self.stage(pipe, events)
                pipe.multi()  # type: ignore[no-untyped-call]
                writes(pipe)
                pipe.zrem(self.keys.parked, order_id)
                pipe.delete(self.keys.parked_events(order_id))
                pipe.hdel(self.keys.parked_errors, order_id)
                pipe.incrby(self.keys.applied, len(events))
                await pipe.execute()
        except WatchError as error:
            raise CheckpointMoved("the lease, the parked events or the generation changed meanwhile") from error

    @abstractmethod
    async def stage(self, pipe: Pipeline, events: list[RecordedEvent], announce: bool = True) -> Writes:
        """Reads what the batch needs (the pipeline is in WATCH mode, so reads run at once) and
        returns the function that queues the batch's writes (announcing them to readers if `announce`)."""


class OrdersProjector(Projector):
    """The order views, the listing indexes and the change notifications for live watches (orders.views)."""

    async def stage(self, pipe: Pipeline, events: list[RecordedEvent], announce: bool = True) -> Writes:
        before = await load_order_views(pipe, self.keys.order, {e.stream_id for e in events})
        after = fold_new(before, events)
        return lambda queue: self._queue_writes(queue, before, after, announce)

    def _queue_writes(
        self,
        pipe: Pipeline,
        before: dict[str, OrderView | None],
        after: dict[str, OrderView | None],
        announce: bool,
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
        if changed and announce:
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


async def delete_views(redis: Redis, keys: ViewKeys, limit: int | None = None) -> int:
    """Deletes the view keys (not the checkpoint) of `keys`' generation, 1000 at a time; with
    `limit`, stops after about that many. Returns how many it deleted."""
    deleted = 0
    for pattern in keys.view_patterns():
        batch: list[str] = []
        async for key in redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await redis.delete(*batch)
                batch = []
                if limit is not None and deleted >= limit:
                    return deleted
        if batch:
            deleted += await redis.delete(*batch)
        if limit is not None and deleted >= limit:
            return deleted
    return deleted
