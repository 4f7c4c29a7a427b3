"""Live watch: one subscription per process to the orders the sync worker changed, fanned out to
the open WatchOrder and WatchCustomerOrders streams.

The orders projection publishes, inside each batch's atomic write, which orders the batch changed,
with their customers and new versions (`changes:orders`, see orders.store.views). So no notification
comes before its data. Each partition has its own channel; the feed subscribes to every one, in one
subscription. A notification only says "changed": a stream re-reads the view before it
sends it, so a late, repeated or merged notification does no harm.

Flow control: the feed never waits for a stream. It marks the changed order as pending in each
interested stream's `Watch` and wakes the stream. A stream takes one pending order at a time,
re-reads it and writes it, and each write waits for the client (HTTP/2 flow control). Changes that
arrive meanwhile coalesce: an order is pending at most once, with the newest version heard of.
A WatchOrder stream therefore holds at most one pending order, and a WatchCustomerOrders stream at
most `max_pending`. One more ends that stream with RESOURCE_EXHAUSTED (CLIENT_TOO_SLOW), and the
client resubscribes.

Lost notifications: pub/sub delivers nothing while the feed is not subscribed. Each time the
subscription is confirmed (at start and after every reconnect), every watch catches up by
re-reading all that it watches.

Other notifications on the channel: an order whose events were parked (its view stays behind, so
a stream flags it stale), and a generation switch of a partition after a zero-downtime rebuild (a
JSON object, `{"generation": N}`): every stream then sends what it watches again, in the new
generation's form.
The feed also tells the hot views (read_service.hot_views) of every change, and to drop everything
when notifications may have been lost.

Shutdown: `close()` ends every stream with UNAVAILABLE (SERVER_SHUTTING_DOWN, with RetryInfo) and
refuses new ones, so open streams do not hold the server's stop for its whole grace period.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from orders.domain.errors import OrdersError
from orders.server.tasks import BackgroundTask
from orders.store.views import PROJECTION, REDIS_ERRORS, RedisClient, ViewKeys

log = logging.getLogger(__name__)

SUBSCRIPTION_ERRORS: tuple[type[Exception], ...] = (*REDIS_ERRORS, OSError)  # a lost subscription

MAX_PENDING = 1000  # changed orders a customer stream may have unsent before it is ended
MAX_WATCHED_ORDERS = 10_000  # different orders one customer stream tracks (their last versions sent)


class ShuttingDown(OrdersError):
    """The server stops: the stream ends, and the client reconnects (to another instance)."""

    def __init__(self) -> None:
        super().__init__("server shutting down; reconnect")


class ClientTooSlow(OrdersError):
    """More orders changed than a stream may hold unsent: the client reads too slowly."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"client too slow: more than {limit} changed orders not yet sent; resubscribe")


class WatchLimit(OrdersError):
    """A stream reached a limit of its own (how many orders it tracks) or of the server (how many
    streams it holds)."""


class Watch:
    """One stream's registration: the orders that changed and were not yet sent, at most `max_pending`."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.pending: dict[str, int] = {}  # order id -> newest version heard of; oldest change first
        self.peak_pending = 0  # the most orders ever pending at once
        self.catching_up = False  # notifications may have been lost: re-read everything watched
        self.switched = False  # the views moved to a new generation: send everything watched again
        self.ended: OrdersError | None = None
        self._wake = asyncio.Event()

    def changed(self, order_id: str, version: int) -> None:
        """Marks `order_id` as changed to `version`; merges with an earlier unsent change of it."""
        if self.ended is not None:
            return
        if order_id in self.pending:
            self.pending[order_id] = max(self.pending[order_id], version)
        elif len(self.pending) >= self.max_pending:
            self.end(ClientTooSlow(self.max_pending))
            return
        else:
            self.pending[order_id] = version
            self.peak_pending = max(self.peak_pending, len(self.pending))
        self._wake.set()

    def catch_up(self) -> None:
        self.catching_up = True
        self._wake.set()

    def switch(self) -> None:
        self.switched = True
        self.catch_up()

    def take_switch(self) -> bool:
        """Whether the views switched generation since the last call."""
        switched, self.switched = self.switched, False
        return switched

    def end(self, error: OrdersError) -> None:
        """Ends the stream with `error` the next time it looks, and frees what it held."""
        if self.ended is None:
            self.ended = error
        self.pending.clear()
        self._wake.set()

    async def next(self) -> tuple[str, int] | None:
        """The next changed order (oldest change first) and the newest version heard of it. None
        means: notifications may have been lost, re-read everything watched. Raises the error that
        ended the watch."""
        while True:
            if self.ended is not None:
                raise self.ended
            if self.catching_up:
                self.catching_up = False
                return None
            if self.pending:
                order_id = next(iter(self.pending))
                return order_id, self.pending.pop(order_id)
            self._wake.clear()
            await self._wake.wait()


class ChangeFeed:
    """The process's one subscription to the changes channel, and the watches it feeds."""

    def __init__(
        self, redis: RedisClient, keys: ViewKeys, max_pending: int = MAX_PENDING, max_streams: int = 500
    ) -> None:
        self._redis = redis
        self._channels = [k.changes_channel for k in keys.of(PROJECTION).all_partitions()]  # one per partition
        self.max_pending = max_pending
        self.max_streams = max_streams
        self._by_order: dict[str, set[Watch]] = {}
        self._by_customer: dict[str, set[Watch]] = {}
        self._closed = False
        self.open_streams = 0
        self._task = BackgroundTask("change-feed")
        self.subscribed = asyncio.Event()  # set while the subscription is confirmed
        self.resubscribe_delay = 1.0  # seconds between a lost subscription and the next attempt
        self.on_changes: Callable[[Iterable[str]], None] = lambda order_ids: None  # orders that changed
        self.on_reset: Callable[[], None] = lambda: None  # changes may have been missed, or views replaced

    def start(self) -> None:
        self._task.start(self._follow)

    async def stop(self) -> None:
        self.close()
        await self._task.stop()

    def close(self) -> None:
        """Ends every open stream with UNAVAILABLE (server shutting down) and refuses new ones."""
        self._closed = True
        for watch in self.watches():
            watch.end(ShuttingDown())

    def watches(self) -> list[Watch]:
        """Every registered watch (a stream that is open)."""
        return [w for index in (self._by_order, self._by_customer) for ws in index.values() for w in ws]

    @contextmanager
    def order(self, order_id: str) -> Iterator[Watch]:
        """Registers a watch of one order for as long as the block runs."""
        with self._register(self._by_order, order_id) as watch:
            yield watch

    @contextmanager
    def customer(self, customer_id: str) -> Iterator[Watch]:
        """Registers a watch of every order of one customer for as long as the block runs."""
        with self._register(self._by_customer, customer_id) as watch:
            yield watch

    @contextmanager
    def _register(self, index: dict[str, set[Watch]], key: str) -> Iterator[Watch]:
        if self._closed:
            raise ShuttingDown
        if self.open_streams >= self.max_streams:
            raise WatchLimit(f"this server holds its maximum of {self.max_streams} watch streams; retry later")
        watch = Watch(self.max_pending)
        index.setdefault(key, set()).add(watch)
        self.open_streams += 1
        try:
            yield watch
        finally:
            self.open_streams -= 1
            watches = index.get(key)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del index[key]

    def _catch_up_all(self) -> None:
        for watch in self.watches():
            watch.catch_up()

    def _switched(self, generation: int) -> None:
        log.info("the views switched to generation %d: every watch sends its orders again", generation)
        self.on_reset()
        for watch in self.watches():
            watch.switch()

    def _dispatch(self, data: str | bytes) -> None:
        try:
            changes: list[dict[str, Any]] | dict[str, Any] = json.loads(data)
            if isinstance(changes, dict):
                self._switched(int(changes["generation"]))
                return
            parsed = [(str(c["order_id"]), str(c["customer_id"]), int(c["version"])) for c in changes]
        except (ValueError, TypeError, KeyError) as error:
            log.warning("unreadable change notification (%s): every watch re-reads", error)
            self.on_reset()
            self._catch_up_all()
            return
        self.on_changes([order_id for order_id, _, _ in parsed])
        for order_id, customer_id, version in parsed:
            for watch in self._by_order.get(order_id, ()):
                watch.changed(order_id, version)
            for watch in self._by_customer.get(customer_id, ()):
                watch.changed(order_id, version)

    async def _follow(self) -> None:
        while True:
            try:
                await self._subscribe_and_listen()
            except SUBSCRIPTION_ERRORS as error:
                log.warning("change feed subscription lost (%s); resubscribing in %ss", error, self.resubscribe_delay)
            finally:
                self.subscribed.clear()
                self.on_reset()
            await asyncio.sleep(self.resubscribe_delay)

    async def _subscribe_and_listen(self) -> None:
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(*self._channels)
            confirmed: set[str | bytes] = set()
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    confirmed.add(message["channel"])
                    if len(confirmed) < len(self._channels):
                        continue
                    # Only from here on is nothing lost; whatever changed before, each watch re-reads.
                    self.on_reset()
                    self.subscribed.set()
                    self._catch_up_all()
                elif message["type"] == "message":
                    self._dispatch(message["data"])
