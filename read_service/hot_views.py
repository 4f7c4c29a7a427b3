"""Hot order views kept in the read service's memory, so that GetOrder answers them without Redis.

An entry is an order's view (the serialized Order, as stored) and the checkpoint of the snapshot
it was read in: an answer from the cache is that snapshot, with that checkpoint as its view token.
So the cache never says more than it read, and it serves a token only up to that checkpoint.

It stays current through the change feed (read_service.watch) that the sync worker publishes
inside each batch's atomic write: a change of an order drops its entry, and a lost subscription
drops them all (nothing is served from the cache while the feed is not subscribed).

One race matters: a read from Redis that overlaps a change may return the view from before the
change after the change's notification was handled. Such a read must not be cached: every
invalidation bumps `changes`, and a read is cached only if `changes` did not move while it ran.

Monotonic reads: any read of an order from Redis (GetOrder that missed, ListOrders, the watches)
replaces or drops the order's entry, so the cache never answers older than an answer the service
gave since (the views a newer answer came from are never older than the entry; see
docs/fault-tolerance.md, "Reads never go back in time").
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from orders.domain.consistency import LogPosition
from orders.telemetry.metrics import READ_CACHE

DEFAULT_CAPACITY = 50_000  # entries; a view is a few hundred bytes, so tens of MB at most

_HIT, _MISS = READ_CACHE.labels("hit"), READ_CACHE.labels("miss")


@dataclass(frozen=True, slots=True)
class HotView:
    raw: bytes  # the serialized Order
    checkpoint: LogPosition  # the checkpoint of the snapshot it was read in


class HotViews:
    """A bounded, least-recently-used map of order id to HotView, invalidated by the change feed."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self.changes = 0  # invalidations so far: a read that overlapped one is not cached
        self._views: OrderedDict[str, HotView] = OrderedDict()

    def __len__(self) -> int:
        return len(self._views)

    def get(self, order_id: str, token: LogPosition | None) -> HotView | None:
        """The cached view of `order_id`, if it answers `token` (its snapshot includes the token)."""
        view = self._views.get(order_id)
        if view is None or (token is not None and view.checkpoint < token):
            _MISS.inc()
            return None
        self._views.move_to_end(order_id)
        _HIT.inc()
        return view

    def mark(self) -> int:
        """Taken before a read from Redis, and handed back to `offer` with its result."""
        return self.changes

    def offer(self, order_id: str, view: HotView | None, mark: int) -> None:
        """Caches `view` (None: a view that must not be cached) as read since `mark`, if no change
        was heard of in between; otherwise drops the entry, which may be older than what was read."""
        if view is None or mark != self.changes or self.capacity == 0:
            self._views.pop(order_id, None)
            return
        self._views[order_id] = view
        self._views.move_to_end(order_id)
        if len(self._views) > self.capacity:
            self._views.popitem(last=False)

    def forget(self, order_ids: Iterable[str]) -> None:
        """Drops the entries of `order_ids`: they changed, or were just read from Redis elsewhere."""
        self.changes += 1
        for order_id in order_ids:
            self._views.pop(order_id, None)

    def clear(self) -> None:
        """Drops every entry: changes may have been missed, or the views were replaced."""
        self.changes += 1
        self._views.clear()
