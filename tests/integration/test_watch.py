"""Live watch: WatchOrder and WatchCustomerOrders over real gRPC, fed by the real sync worker on
real PostgreSQL and Redis. The streams come from a read service of the test's own (on the
`system`'s Redis and key prefix), so that the tests can look at its change feed and stop it."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from orders.store.views import OrderView, RedisClient, execute, redis_client
from orders.v1 import commands_pb2 as cmd
from orders.v1 import queries_pb2 as qry
from orders.v1 import queries_pb2_grpc, types_pb2
from read_service.main import ReadService, start_read_service
from read_service.watch import ChangeFeed, Watch
from tests.helpers import add_item_request, an_address, create_request, error_reason, eventually, rich_details
from tests.helpers import violated_fields as violated
from tests.integration.conftest import System

# A client that reads slowly holds little in flight: HTTP/2 lets the server send ~1 KiB ahead.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


@dataclass
class Watched:
    """A read service of the test's own, and a stub to it."""

    service: ReadService
    queries: queries_pb2_grpc.OrderQueriesStub
    port: int
    redis: RedisClient

    @property
    def feed(self) -> ChangeFeed:
        return self.service.feed

    async def stub(self, stack: AsyncExitStack, options: list[tuple[str, Any]]) -> queries_pb2_grpc.OrderQueriesStub:
        """A stub on a channel of its own with these options, closed with `stack`."""
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options))
        return queries_pb2_grpc.OrderQueriesStub(channel)


StartWatched = Callable[..., Awaitable[Watched]]


@pytest.fixture
async def start_watched(system: System) -> AsyncIterator[StartWatched]:
    """Starts read services (with their own Redis client, named so that a test can find and cut its
    connections); all are stopped at the end."""
    started: list[tuple[ReadService, grpc.aio.Channel, RedisClient]] = []

    async def start(**settings: Any) -> Watched:
        redis = redis_client(system.redis_url, client_name=f"watch-{uuid.uuid4().hex[:12]}")
        service = await start_read_service(redis, system.keys, "127.0.0.1:0", **settings)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.server.port}")
        started.append((service, channel, redis))
        await asyncio.wait_for(service.feed.subscribed.wait(), 5)
        return Watched(service, queries_pb2_grpc.OrderQueriesStub(channel), service.server.port, redis)

    yield start
    for service, channel, redis in started:
        await channel.close()
        await service.stop(0)
        await redis.aclose()


@pytest.fixture
async def watched(start_watched: StartWatched) -> Watched:
    return await start_watched()


async def create(system: System, customer: str = "cust-1") -> cmd.CommandResult:
    result: cmd.CommandResult = (await system.commands.CreateOrder(create_request(customer))).result
    return result


async def read(call: Any, timeout: float = 5) -> Any:
    """The next message of a stream; fails if none comes within `timeout` seconds or the stream ended."""
    message = await asyncio.wait_for(call.read(), timeout)
    assert message is not grpc.aio.EOF, "the stream ended"
    return message


async def ended_with(call: Any, timeout: float = 5) -> grpc.aio.AioRpcError:
    """Reads the stream to its end, which must be an error, and returns that error."""

    async def drain() -> None:
        while await call.read() is not grpc.aio.EOF:
            pass

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(drain(), timeout)
    return caught.value


async def registered(feed: ChangeFeed, count: int) -> list[Watch]:
    async def check() -> list[Watch]:
        watches = feed.watches()
        assert len(watches) == count
        assert feed.open_streams == count
        return watches

    return await eventually(check)


# ------------------------------------------------------------------ the notification itself


async def test_projector_announces_each_batchs_changed_orders_with_the_batch(system: System) -> None:
    """Each batch publishes, on changes:orders, the orders it changed with customer and new version,
    and a subscriber that reads the view on hearing of it always finds at least that version."""
    async with system.redis.pubsub() as pubsub:
        await pubsub.subscribe(system.keys.changes_channel)
        created = await create(system, "pat")
        await system.commands.AddItem(add_item_request(created.order_id))
        heard: list[dict[str, Any]] = []
        async with asyncio.timeout(5):
            while len(heard) < 2 or heard[-1]["version"] < 2:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is None:
                    continue
                for change in json.loads(message["data"]):
                    raw = await execute(system.redis, "GET", system.keys.order(change["order_id"]), raw=True)
                    assert raw is not None
                    assert OrderView.from_stored(raw).version >= change["version"]  # the data is there before the news
                    heard.append(change)

    assert heard == [
        {"order_id": created.order_id, "customer_id": "pat", "version": 1},
        {"order_id": created.order_id, "customer_id": "pat", "version": 2},
    ]


# ------------------------------------------------------------------ WatchOrder


async def test_watch_order_sends_the_view_then_every_change_in_order(system: System, watched: Watched) -> None:
    """WatchOrder sends the current view first, then each change of a whole lifecycle (add items,
    address, confirm, ship) as it is applied: versions strictly increase, none is left out when the
    client keeps up. Prints the latency from the command's answer to the stream's message."""
    created = await create(system, "quinn")
    order_id = created.order_id
    call = watched.queries.WatchOrder(
        qry.WatchOrderRequest(order_id=order_id, consistency_token=created.consistency_token)
    )
    first = await read(call)
    assert (first.order.order_id, first.order.version, first.order.status) == (
        order_id,
        1,
        types_pb2.ORDER_STATUS_PENDING,
    )
    assert first.consistency.stale is False
    await registered(watched.feed, 1)

    steps: list[Callable[[], Awaitable[Any]]] = [
        lambda: system.commands.AddItem(add_item_request(order_id, "APPLE", 3, 120)),
        lambda: system.commands.AddItem(add_item_request(order_id, "PEAR", 1, 90)),
        lambda: system.commands.ChangeShippingAddress(
            cmd.ChangeShippingAddressRequest(order_id=order_id, shipping_address=an_address())
        ),
        lambda: system.commands.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=order_id)),
        lambda: system.commands.ShipOrder(cmd.ShipOrderRequest(order_id=order_id, carrier="DHL", tracking_number="T1")),
    ]
    messages = [first]
    latencies = []
    for step in steps:
        acked = (await step()).result
        answered = time.monotonic()
        message = await read(call)
        latencies.append(time.monotonic() - answered)
        assert message.order.version == acked.version
        assert message.consistency.view_token >= ""  # present
        messages.append(message)
    call.cancel()

    versions = [m.order.version for m in messages]
    assert versions == [1, 2, 3, 4, 5, 6]
    assert [m.order.status for m in messages][-3:] == [
        types_pb2.ORDER_STATUS_PENDING,
        types_pb2.ORDER_STATUS_CONFIRMED,
        types_pb2.ORDER_STATUS_SHIPPED,
    ]
    assert messages[-1].order.tracking_number == "T1"
    assert messages[-1].order.total.minor_units == 3 * 120 + 90
    latency_ms = [round(seconds * 1000, 1) for seconds in latencies]
    print(f"\ncommand answered -> stream message: {latency_ms} ms, median {statistics.median(latency_ms)} ms")
    assert statistics.median(latencies) < 0.5  # pushed: the worker is woken by NOTIFY, the stream by PUBLISH


async def test_watch_order_of_unknown_order_is_not_found(watched: Watched) -> None:
    """WatchOrder of an order that does not exist ends at once with NOT_FOUND, and leaves no registration."""
    error = await ended_with(watched.queries.WatchOrder(qry.WatchOrderRequest(order_id="never-created")))

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(error) == "ORDER_NOT_FOUND"
    await registered(watched.feed, 0)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (qry.WatchOrderRequest(order_id="bad id"), "order_id"),
        (qry.WatchOrderRequest(order_id=""), "order_id"),
        (qry.WatchOrderRequest(order_id="fine", consistency_token="12"), "consistency_token"),
        (qry.WatchCustomerOrdersRequest(customer_id="x" * 65), "customer_id"),
        (qry.WatchCustomerOrdersRequest(customer_id=""), "customer_id"),
        (qry.WatchCustomerOrdersRequest(customer_id="fine", consistency_token="nope"), "consistency_token"),
    ],
)
async def test_malformed_watch_requests_are_invalid(watched: Watched, request_: Any, field: str) -> None:
    """Malformed ids or tokens end the stream at once with INVALID_ARGUMENT naming the field."""
    method = (
        watched.queries.WatchOrder
        if isinstance(request_, qry.WatchOrderRequest)
        else watched.queries.WatchCustomerOrders
    )

    error = await ended_with(method(request_))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated(error) == {field}


async def test_slow_client_gets_coalesced_changes_and_the_server_holds_one_pending_order(
    system: System, watched: Watched
) -> None:
    """A client that stops reading while its order changes 200 times does not make the server hold
    200 changes: writes wait for the client (HTTP/2 flow control), and meanwhile the changes coalesce
    into one pending order. When the client reads again it gets strictly increasing versions, far
    fewer than 200 messages, and the last one is the order's latest version."""
    created = await create(system, "rae")
    order_id = created.order_id
    async with AsyncExitStack() as stack:
        slow = await watched.stub(stack, SMALL_WINDOW)
        call = slow.WatchOrder(qry.WatchOrderRequest(order_id=order_id, consistency_token=created.consistency_token))
        first = await read(call)
        [watch] = await registered(watched.feed, 1)

        pending_seen = []
        last: cmd.CommandResult = created
        for i in range(200):  # not reading meanwhile
            last = (await system.commands.AddItem(add_item_request(order_id, f"SKU-{i % 10}"))).result
            pending_seen.append(len(watch.pending))
        assert last.version == 201
        await system.queries.GetOrder(qry.GetOrderRequest(order_id=order_id, consistency_token=last.consistency_token))

        versions = [first.order.version]
        while versions[-1] < last.version:
            versions.append((await read(call)).order.version)
        call.cancel()

    print(f"\n200 changes -> {len(versions) - 1} messages; the most pending at once: {watch.peak_pending}")
    assert versions == sorted(set(versions)), "a version repeated or went backwards"
    assert versions[-1] == 201
    assert len(versions) - 1 < 100, "no coalescing: the server did not wait for the client"
    assert watch.peak_pending == 1
    assert max(pending_seen) <= 1


async def test_cancelled_stream_and_stream_at_its_deadline_leave_no_registration(
    system: System, watched: Watched
) -> None:
    """Cancelling a stream removes its registration from the change feed. A stream with a deadline
    ends by itself with OK just before the deadline (not DEADLINE_EXCEEDED), and is removed too."""
    created = await create(system, "sam")
    token = created.consistency_token
    cancelled = watched.queries.WatchOrder(qry.WatchOrderRequest(order_id=created.order_id, consistency_token=token))
    expiring = watched.queries.WatchCustomerOrders(
        qry.WatchCustomerOrdersRequest(customer_id="sam", consistency_token=token), timeout=1
    )
    started = time.monotonic()
    await read(cancelled)
    await read(expiring)
    await registered(watched.feed, 2)

    cancelled.cancel()
    await registered(watched.feed, 1)
    assert await asyncio.wait_for(expiring.read(), 5) is grpc.aio.EOF
    ended_after = time.monotonic() - started
    await registered(watched.feed, 0)

    assert await expiring.code() == grpc.StatusCode.OK  # so it ended before its deadline
    assert ended_after > 0.8


async def test_server_shutdown_ends_open_streams_with_unavailable_promptly(
    system: System, start_watched: StartWatched
) -> None:
    """Stopping the read service ends every open stream at once with UNAVAILABLE, reason
    SERVER_SHUTTING_DOWN and RetryInfo ("reconnect"), and the stop does not wait for the streams
    through its 30 s grace period."""
    watched = await start_watched()
    created = await create(system, "tess")
    token = created.consistency_token
    by_order = watched.queries.WatchOrder(qry.WatchOrderRequest(order_id=created.order_id, consistency_token=token))
    by_customer = watched.queries.WatchCustomerOrders(
        qry.WatchCustomerOrdersRequest(customer_id="tess", consistency_token=token)
    )
    await read(by_order)
    await read(by_customer)

    started = time.monotonic()
    stopping = asyncio.create_task(watched.service.stop(30))
    errors = [await ended_with(by_order), await ended_with(by_customer)]
    ended_after = time.monotonic() - started
    await asyncio.wait_for(stopping, 5)
    stopped_after = time.monotonic() - started

    print(f"\nstreams ended {ended_after * 1000:.0f} ms, server stopped {stopped_after * 1000:.0f} ms after stop()")
    for error in errors:
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert error.details() == "server shutting down; reconnect"
        assert error_reason(error) == "SERVER_SHUTTING_DOWN"
        assert "RetryInfo" in rich_details(error)
    assert ended_after < 1
    assert stopped_after < 2
    assert watched.feed.watches() == []


# ------------------------------------------------------------------ WatchCustomerOrders


async def test_watch_customer_orders_sees_that_customers_orders_only(system: System, watched: Watched) -> None:
    """WatchCustomerOrders first sends the customer's orders, newest first, then each change of
    any of them and each new order of that customer, and nothing of other customers."""
    older = await create(system, "uma")
    newer = await create(system, "uma")
    await create(system, "victor")
    call = watched.queries.WatchCustomerOrders(
        qry.WatchCustomerOrdersRequest(customer_id="uma", consistency_token=newer.consistency_token)
    )
    first = await read(call)
    assert first.initial is True
    assert first.truncated is False
    assert [o.order_id for o in first.orders] == [newer.order_id, older.order_id]

    await create(system, "victor")
    added = (await system.commands.AddItem(add_item_request(older.order_id))).result
    await create(system, "victor")
    brand_new = await create(system, "uma")
    seen: dict[str, int] = {}
    while len(seen) < 2:
        message = await read(call)
        assert message.initial is False
        [order] = message.orders
        assert order.customer_id == "uma"
        seen[order.order_id] = order.version
    call.cancel()

    assert seen == {older.order_id: added.version, brand_new.order_id: 1}


async def test_customer_without_orders_gets_an_empty_first_message_then_new_orders(
    system: System, watched: Watched
) -> None:
    """A customer with no orders yet is no error: an empty first message, then the first order."""
    call = watched.queries.WatchCustomerOrders(qry.WatchCustomerOrdersRequest(customer_id="wendy"))
    first = await read(call)
    assert (list(first.orders), first.initial) == ([], True)

    created = await create(system, "wendy")
    message = await read(call)
    call.cancel()

    assert [(o.order_id, o.version) for o in message.orders] == [(created.order_id, 1)]


async def test_first_message_holds_the_newest_100_orders(system: System, watched: Watched) -> None:
    """The first message holds the customer's newest 100 orders and says that there are more."""
    results = [await create(system, "xena") for _ in range(103)]

    call = watched.queries.WatchCustomerOrders(
        qry.WatchCustomerOrdersRequest(customer_id="xena", consistency_token=results[-1].consistency_token)
    )
    first = await read(call)
    call.cancel()

    assert [o.order_id for o in first.orders] == [r.order_id for r in reversed(results)][:100]
    assert first.truncated is True


async def test_customer_stream_of_a_client_too_slow_ends_with_resource_exhausted(
    system: System, start_watched: StartWatched
) -> None:
    """When more of a customer's orders change than the stream may hold unsent (here 5) while the
    client does not read, the stream drops what it held and ends with RESOURCE_EXHAUSTED
    (CLIENT_TOO_SLOW, "resubscribe") once the client reads what was already in flight."""
    watched = await start_watched(max_watch_pending=5)
    async with AsyncExitStack() as stack:
        slow = await watched.stub(stack, SMALL_WINDOW)
        call = slow.WatchCustomerOrders(qry.WatchCustomerOrdersRequest(customer_id="yara"))
        await read(call)
        [watch] = await registered(watched.feed, 1)

        last = None
        for _ in range(40):  # not reading meanwhile; each new order is a message of ~100 bytes
            last = await create(system, "yara")
        assert last is not None
        await system.queries.GetOrder(
            qry.GetOrderRequest(order_id=last.order_id, consistency_token=last.consistency_token)
        )
        assert watch.ended is not None
        assert watch.pending == {}
        error = await ended_with(call)

    print(f"\n40 new orders, at most 5 pending: ended after the client read; peak {watch.peak_pending}")
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(error) == "CLIENT_TOO_SLOW"
    assert "resubscribe" in (error.details() or "")
    assert watch.peak_pending == 5
    await registered(watched.feed, 0)


# ------------------------------------------------------------------ lost notifications


@pytest.mark.single_redis("cuts the feed's subscription by CLIENT LIST and CLIENT KILL on its one server")
async def test_changes_made_while_the_feed_was_disconnected_are_caught_up(system: System, watched: Watched) -> None:
    """Notifications published while the feed's subscription is down are lost to it. Once it has
    resubscribed, every open stream re-reads what it watches and sends what changed meanwhile."""
    created = await create(system, "zoe")
    token = created.consistency_token
    by_order = watched.queries.WatchOrder(qry.WatchOrderRequest(order_id=created.order_id, consistency_token=token))
    by_customer = watched.queries.WatchCustomerOrders(
        qry.WatchCustomerOrdersRequest(customer_id="zoe", consistency_token=token)
    )
    await read(by_order)
    await read(by_customer)

    # Cut the read service's subscriptions (only its own: its Redis client has a name of its own),
    # and keep them cut long enough for a command to be applied meanwhile.
    watched.feed.resubscribe_delay = 3.0
    name = (await watched.redis.client_getname()) or ""
    subscribers = [c for c in await system.redis.client_list(_type="pubsub") if c.get("name") == name]
    assert subscribers
    for client in subscribers:
        await system.redis.client_kill_filter(_id=client["id"])

    async def unsubscribed() -> None:
        assert not watched.feed.subscribed.is_set()

    await eventually(unsubscribed, timeout=5, interval=0.01)
    changed = (await system.commands.AddItem(add_item_request(created.order_id))).result
    await system.queries.GetOrder(
        qry.GetOrderRequest(order_id=created.order_id, consistency_token=changed.consistency_token)
    )
    assert not watched.feed.subscribed.is_set(), "resubscribed too early for this test to prove anything"

    order_message = await read(by_order)
    customer_message = await read(by_customer)
    by_order.cancel()
    by_customer.cancel()

    assert order_message.order.version == changed.version
    assert [o.version for o in customer_message.orders] == [changed.version]
