"""Order views stored in wire form: the serialized orders.v1.Order that GetOrder returns as it is.

GetOrder reads an order by one MGET (the generation pointer, checkpoint, rebuild mark, view and the
order's parked mark), without a script, whenever the view is in the wire form; views in the old JSON
form, missing views and a moved generation take the read script instead, which checks the parked
list itself. Round trips are counted on the test client's connections, as in test_worker_round_trips.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import pytest
from redis.asyncio import Redis

from orders.store.views import PROJECTIONS, OrderView, ViewKeys, execute
from orders.v1 import queries_pb2 as qry
from read_service.freshness import CheckpointWatcher
from read_service.servicer import OrderQueriesServicer
from read_service.watch import ChangeFeed
from tests.helpers import add_item_request, an_address, create_request, eventually, round_trip_counting_redis
from tests.integration.conftest import System


@dataclass
class Recorded:
    """A Redis client that records each command it sends and counts its round trips."""

    redis: Redis
    sends: list[int]
    commands: list[str] = field(default_factory=list)

    def reset(self) -> None:
        self.sends[0] = 0
        self.commands.clear()


@pytest.fixture
async def recorded(system: System) -> AsyncIterator[Recorded]:
    client, sends = round_trip_counting_redis(system.redis_url)
    result = Recorded(client, sends)
    send = client.execute_command

    async def recording(*args: Any, **options: Any) -> Any:
        result.commands.append(str(args[0]).upper())
        return await send(*args, **options)  # type: ignore[no-untyped-call]

    client.execute_command = recording  # type: ignore[method-assign]
    await execute(client, "PING")  # connects: the handshake's commands are not the read's
    result.reset()
    yield result
    await client.aclose()


class NoDeadline:
    """The part of a grpc.aio.ServicerContext that GetOrder uses, for a call without a deadline."""

    def time_remaining(self) -> float | None:
        return None


def servicer(recorded: Recorded, keys: ViewKeys) -> OrderQueriesServicer:
    feed = ChangeFeed(recorded.redis, keys)  # not started: GetOrder then reads Redis every time
    watchers = {name: CheckpointWatcher(recorded.redis, keys.of(name)) for name in PROJECTIONS}  # not started
    return OrderQueriesServicer(recorded.redis, keys, watchers=watchers, max_wait=1.0, feed=feed)


async def get(service: OrderQueriesServicer, order_id: str) -> qry.GetOrderResponse:
    context = cast(grpc.aio.ServicerContext, NoDeadline())
    response: qry.GetOrderResponse = await service.GetOrder(qry.GetOrderRequest(order_id=order_id), context)
    return response


async def an_order(system: System) -> qry.GetOrderResponse:
    """An order with a line and an address, once its view has every event."""
    created = (await system.commands.CreateOrder(create_request("wire", shipping_address=an_address()))).result
    added = (await system.commands.AddItem(add_item_request(created.order_id))).result
    request = qry.GetOrderRequest(order_id=created.order_id, consistency_token=added.consistency_token)
    response: qry.GetOrderResponse = await system.queries.GetOrder(request)
    return response


async def test_the_worker_stores_the_order_the_read_api_returns(system: System) -> None:
    """The stored view is the serialized Order itself (it starts with field 1's tag, not JSON's '{')."""
    served = await an_order(system)

    raw = await execute(system.redis, "GET", system.keys.order(served.order.order_id), raw=True)

    assert raw[:1] == b"\x0a"
    assert raw == served.order.SerializeToString()


async def test_get_order_without_a_token_is_one_round_trip_and_no_script(system: System, recorded: Recorded) -> None:
    """A wire-form view is read by one MGET: no EVALSHA, one round trip; the answer is the same."""
    served = await an_order(system)
    service = servicer(recorded, system.keys)

    answer = await get(service, served.order.order_id)

    assert (recorded.commands, recorded.sends[0]) == (["MGET"], 1)
    assert (answer.order, answer.consistency.stale) == (served.order, False)


async def test_old_json_views_are_still_served(system: System, recorded: Recorded) -> None:
    """A view in the JSON form of earlier deployments is read by the script and served the same, by
    GetOrder and ListOrders."""
    served = await an_order(system)
    await system.stop_worker()
    key = system.keys.order(served.order.order_id)
    raw = await execute(system.redis, "GET", key, raw=True)
    await system.redis.set(key, OrderView.from_stored(raw).to_json())
    service = servicer(recorded, system.keys)

    answer = await get(service, served.order.order_id)
    listing = await system.queries.ListOrders(qry.ListOrdersRequest(customer_id="wire"))

    assert recorded.commands == ["MGET", "EVALSHA"]
    assert answer.order == served.order
    assert list(listing.orders) == [served.order]


async def test_an_order_parked_without_a_mark_reads_as_stale(system: System, recorded: Recorded) -> None:
    """Workers before the parked marks parked an order with its list only, and left its view in JSON:
    GetOrder then asks the script, which sees the list, so the order still reads as stale."""
    served = await an_order(system)
    await system.stop_worker()
    order_id = served.order.order_id
    raw = await execute(system.redis, "GET", system.keys.order(order_id), raw=True)
    await system.redis.set(system.keys.order(order_id), OrderView.from_stored(raw).to_json())
    await system.redis.rpush(system.keys.parked_events(order_id), 999)
    service = servicer(recorded, system.keys)

    answer = await get(service, order_id)

    assert (answer.order.version, answer.consistency.stale) == (served.order.version, True)


async def test_the_plain_read_follows_a_generation_switch(system: System, recorded: Recorded) -> None:
    """After the pointer moves, the first read sees it in its MGET and asks the script (which reads
    the new generation); the next reads are plain MGETs of the new generation's keys."""
    served = await an_order(system)
    await system.stop_worker()
    order_id = served.order.order_id
    service = servicer(recorded, system.keys)
    await get(service, order_id)  # remembers generation 0
    newer = qry.GetOrderResponse()
    newer.order.CopyFrom(served.order)
    newer.order.version += 1
    next_keys = system.keys.at(1)
    checkpoint = await system.redis.get(system.keys.checkpoint)
    assert checkpoint is not None
    await system.redis.set(next_keys.order(order_id), newer.order.SerializeToString())
    await system.redis.set(next_keys.checkpoint, checkpoint)
    await system.redis.set(system.keys.generation_pointer, 1)
    recorded.reset()

    first = await get(service, order_id)
    second = await get(service, order_id)

    assert (first.order.version, second.order.version) == (newer.order.version, newer.order.version)
    assert recorded.commands == ["MGET", "EVALSHA", "MGET"]


@asynccontextmanager
async def following(recorded: Recorded, keys: ViewKeys) -> AsyncIterator[OrderQueriesServicer]:
    """A servicer whose change feed and checkpoint watchers run, as in the read service: GetOrder then
    keeps hot views."""
    feed = ChangeFeed(recorded.redis, keys)
    watchers = {name: CheckpointWatcher(recorded.redis, keys.of(name)) for name in PROJECTIONS}
    service = OrderQueriesServicer(recorded.redis, keys, watchers=watchers, max_wait=5.0, feed=feed)
    parts: list[ChangeFeed | CheckpointWatcher] = [feed, *watchers.values()]
    for part in parts:
        part.start()
    try:
        await asyncio.wait_for(feed.subscribed.wait(), 10)
        yield service
    finally:
        for part in parts:
            await part.stop()


async def test_a_hot_view_is_answered_from_memory_until_the_order_changes(system: System, recorded: Recorded) -> None:
    served = await an_order(system)
    order_id = served.order.order_id
    async with following(recorded, system.keys) as service:
        first = await get(service, order_id)
        recorded.reset()
        again = await get(service, order_id)
        assert (recorded.commands, again) == ([], first)  # no Redis call, the same answer

        added = (await system.commands.AddItem(add_item_request(order_id, "HOT"))).result

        async def newer() -> None:  # the change feed dropped the entry: the next read sees the change
            assert (await get(service, order_id)).order.version == added.version

        await eventually(newer)


async def test_a_token_newer_than_the_hot_view_is_read_from_redis(system: System, recorded: Recorded) -> None:
    served = await an_order(system)
    order_id = served.order.order_id
    async with following(recorded, system.keys) as service:
        await get(service, order_id)  # now hot
        await system.stop_worker()  # the change below cannot reach the views, nor drop the entry
        added = (await system.commands.AddItem(add_item_request(order_id, "LATE"))).result
        request = qry.GetOrderRequest(order_id=order_id, consistency_token=added.consistency_token)
        recorded.reset()

        answer = await service.GetOrder(request, cast(grpc.aio.ServicerContext, ShortDeadline()))

    assert "MGET" in recorded.commands  # the hot view's snapshot is older than the token
    assert (answer.order.version, answer.consistency.stale) == (served.order.version, True)


class ShortDeadline(NoDeadline):
    def time_remaining(self) -> float | None:
        return 0.3
