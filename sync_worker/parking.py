"""Parked orders: the `park` poison policy and operators' retries (docs/design.md, "Poison events").

Under `park`, an order whose event a projection cannot apply is set aside in the projection's
dead-letter list: that event and every later event of it (its events before it are applied, even
in the same batch), so its view stays at its last good state while the checkpoint moves on for the
other orders. `orders-admin retry` queues a request that the active
worker serves in its loop: it applies that order's parked events in order and releases them, or
leaves them parked with the new error. Under `stop` (the default) a poison event goes up to the
loop, which stops there.
"""

from __future__ import annotations

import json
import logging
from enum import StrEnum

from orders.domain.consistency import LogPosition
from orders.domain.errors import PoisonEvent
from orders.domain.events import RecordedEvent
from orders.store.event_store import Connection, read_positions
from sync_worker.progress import WORKER_LOGGER
from sync_worker.projector import Projector

log = logging.getLogger(WORKER_LOGGER)


class PoisonPolicy(StrEnum):
    """What a projection does with an event it cannot apply."""

    STOP = "stop"  # stop there, until fixed
    PARK = "park"  # put that order's events in a dead-letter list; the other orders go on


class ParkedOrders:
    """One projection loop's parked orders: applying a batch under the poison policy, and serving
    operators' requests to retry an order's parked events."""

    def __init__(self, projection: str, worker_id: str, policy: PoisonPolicy) -> None:
        self._projection = projection
        self._worker_id = worker_id
        self._policy = policy

    async def apply(
        self,
        projector: Projector,
        checkpoint: LogPosition | None,
        events: list[RecordedEvent],
        live: bool,
        through: LogPosition | None = None,
    ) -> tuple[LogPosition, dict[str, PoisonEvent]]:
        """Applies a batch; under the park policy, parks each order from its event that fails and tries
        again. Returns the new checkpoint and the orders parked by this batch (order id -> the event
        they are parked from)."""
        park: dict[str, PoisonEvent] = {}
        while True:
            try:
                applied = await projector.apply(
                    checkpoint, events, holder=self._worker_id, park=park, live=live, through=through
                )
            except PoisonEvent as poison:
                known = park.get(poison.stream_id)
                # An earlier event of an order parked here may fail in turn (a view that cannot be
                # stored fails on the order's last applied event): it parks from there. The same
                # event failing again means parking cannot help.
                if self._policy != PoisonPolicy.PARK or (known is not None and known.position == poison.position):
                    raise
                log.warning(
                    "projection %s parked order %r from the %s; its later events wait with it",
                    self._projection,
                    poison.stream_id,
                    poison,
                )
                park[poison.stream_id] = poison
            else:
                return applied, park

    async def serve_requests(self, conn: Connection, live: Projector) -> None:
        """Runs operators' requests (from ProjectionAdmin) to retry an order's parked events."""
        redis, keys = live.redis, live.keys
        while isinstance(raw := await redis.lpop(keys.parked_requests), str | bytes):
            order_id = json.loads(raw)["order_id"]
            positions = [int(p) for p in await redis.lrange(keys.parked_events(order_id), 0, -1)]
            if positions:
                await self._retry(conn, live, order_id, positions)

    async def _retry(self, conn: Connection, live: Projector, order_id: str, positions: list[int]) -> None:
        events = await read_positions(conn, positions)
        try:
            await live.apply_parked(order_id, events, self._worker_id)
        except PoisonEvent as poison:
            await live.redis.hset(live.keys.parked_errors, order_id, str(poison))
            log.warning("projection %s: retrying parked order %r failed again: %s", self._projection, order_id, poison)
        else:
            log.info(
                "projection %s: applied and released %d parked events of order %r",
                self._projection,
                len(events),
                order_id,
            )
