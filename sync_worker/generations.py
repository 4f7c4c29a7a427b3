"""A projection's generations of keys and its rebuilds (docs/design.md, "Zero-downtime rebuild").

- From scratch: views with no checkpoint (new, flushed, or reset by an in-place rebuild) are marked
  as being rebuilt up to the current head of the log, and the live step replays the log into them.
- Zero-downtime: while `next-generation:NAME` asks for it, each turn of the active worker's loop
  applies one catch-up batch to the next generation, never past the live one's checkpoint, and
  switches the pointer to it once it has caught up.
- Retirement: a generation the switch retired is deleted a chunk per loop turn, between live batches.

Only the lease holder does any of this: every write is fenced by the lease and the generation pointers.
"""

from __future__ import annotations

import logging
from typing import Protocol

from orders.domain.consistency import START, LogPosition
from orders.domain.events import RecordedEvent
from orders.store.event_store import Connection, head, read_batch
from orders.store.views import parse_generation
from sync_worker.progress import WORKER_LOGGER
from sync_worker.projector import Projector, delete_views

log = logging.getLogger(WORKER_LOGGER)

RETIRE_CHUNK = 1000  # keys of a retired generation deleted per loop turn


class ApplyBatch(Protocol):
    """How the loop applies a batch (the poison policy, logging, tracing), for catch-up batches too."""

    async def __call__(
        self,
        projector: Projector,
        checkpoint: LogPosition | None,
        events: list[RecordedEvent],
        live: bool = True,
        through: LogPosition | None = None,
    ) -> LogPosition: ...


class Generations:
    """One projection's generations, as seen by its loop: each one's Projector, and the steps that
    start, build and retire them."""

    def __init__(self, projector: Projector, worker_id: str, batch_size: int, apply: ApplyBatch) -> None:
        self.projector = projector  # the generation the worker was given; any other is `at` it
        self._worker_id = worker_id
        self._batch_size = batch_size
        self._apply = apply
        self._by_number: dict[int, Projector] = {projector.keys.generation: projector}

    @property
    def _projection(self) -> str:
        return self.projector.name

    def at(self, generation: int) -> Projector:
        """The projection writing generation `generation` of its keys (made once, then kept)."""
        if generation not in self._by_number:
            self._by_number[generation] = self.projector.at(generation)
        return self._by_number[generation]

    async def start_from_scratch(self, conn: Connection, live: Projector) -> None:
        """Marks views with no checkpoint as being rebuilt up to the log's head, so that readers
        answer UNAVAILABLE, not NOT_FOUND, for views that are not back yet."""
        target = await head(conn)
        if target is not None:
            log.warning(
                "the views hold no checkpoint: rebuilding them from the start of the log up to %s", target.token()
            )
            await live.start_rebuild(target)

    async def build_step(self, conn: Connection, live: Projector, building: int, live_checkpoint: LogPosition) -> bool:
        """One batch of a zero-downtime rebuild: generation `building` replays the log from the start,
        never past the live generation's checkpoint, and becomes the live one once it reaches it.
        Returns whether it did anything."""
        if building != live.keys.generation + 1:
            log.warning("projection %s: dropping a stale request to build generation %d", self._projection, building)
            await self.projector.redis.delete(self.projector.keys.next_generation)
            return False
        target = self.at(building)
        checkpoint = await target.checkpoint()
        if checkpoint == live_checkpoint:
            await target.switch_to(self._worker_id, live_checkpoint)
            log.info(
                "projection %s: generation %d caught up at %s and is live; deleting generation %d",
                self._projection,
                building,
                live_checkpoint.token(),
                live.keys.generation,
            )
            return True
        after = checkpoint or START
        batch = await read_batch(conn, after, self._batch_size, self.projector.keys.log_partition)
        events = [e for e in batch.events if LogPosition(e.tx_id, e.position) <= live_checkpoint]
        # Never past the live generation: the switch needs both at the same checkpoint.
        through = None if batch.through is None else min(batch.through, live_checkpoint)
        if events or (through is not None and through > after):
            await self._apply(target, checkpoint, events, live=False, through=through)
            return True
        if checkpoint is None and live_checkpoint == START:
            await target.mark_empty_log()  # an empty log: the new generation is complete at once
            return True
        return False

    async def retire_step(self, raw: str | bytes) -> bool:
        """Deletes a chunk of generation `raw`, retired by a switch; forgets it once nothing is left.
        Returns whether there may be more to delete."""
        redis, keys = self.projector.redis, self.projector.keys
        retired = keys.at(int(raw))
        # Read now, not at the start of the step (which may have switched): never delete the live one.
        if retired.generation != parse_generation(await redis.get(keys.generation_pointer)):
            if await delete_views(redis, retired, limit=RETIRE_CHUNK):
                return True
            await redis.delete(*retired.generation_keys)
        await redis.srem(keys.retired, raw)
        log.info("projection %s: generation %d deleted", self._projection, retired.generation)
        return False
