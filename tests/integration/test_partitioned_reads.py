"""The read service over partitioned projections (P = 4): GetOrder reads an order's own partition;
ListOrders merges the partitions' pages with stable paging; the customer summary adds up the
partitions' summaries; a consistency token waits for every partition a query reads."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from orders.domain.errors import Unavailable
from orders.domain.status import SPENDING
from orders.store.partitions import partition_of
from orders.store.views import (
    PROJECTIONS,
    Declared,
    Exists,
    LiveReader,
    RedisClient,
    ViewKeys,
    index_member,
)
from orders.v1 import commands_pb2 as cmd
from orders.v1 import queries_pb2 as qry
from orders.v1 import queries_pb2_grpc, types_pb2
from read_service.main import ReadService, start_read_service
from read_service.servicer import MAX_PAGE_TRIES, OrderQueriesServicer
from sync_worker.main import build_workers
from sync_worker.worker import WorkerSettings
from tests.conftest import Servers
from tests.helpers import (
    add_item_request,
    create_request,
    error_reason,
    eventually,
    expected_views,
    round_trip_counting_redis,
)
from tests.integration.conftest import System

PARTITIONS = 4
MAX_WAIT = 3.0  # seconds a query waits for its token


@dataclass
class Partitioned:
    """The system with a P-partition worker and a read service over the same P partitions."""

    system: System
    queries: queries_pb2_grpc.OrderQueriesStub
    keys: ViewKeys  # of the orders projection, with P partitions
    read: ReadService

    def waiting(self, partition: int) -> Callable[[], Awaitable[None]]:
        """A check that a query waits for `partition` of each projection to reach its token."""

        async def check() -> None:
            names = {k.name for k in self.partitions() if k.partition == partition}
            assert all(w.waiting for w in self.read.watchers if w.keys.name in names)

        return check

    def partitions(self) -> list[ViewKeys]:
        """Every partition of both projections."""
        return [k for name in PROJECTIONS for k in self.keys.of(name).all_partitions()]

    async def pause(self, partition: int, paused: bool = True) -> None:
        """Pauses (or resumes) one partition of both projections, as an operator would; a pause
        returns once the partition's worker says it is paused (it applies nothing more)."""
        redis = self.system.redis
        for keys in self.partitions():
            if keys.partition == partition:
                await (redis.set(keys.paused, "1") if paused else redis.delete(keys.paused))
                if paused:
                    await eventually(says_paused(redis, keys))


def says_paused(redis: Redis, keys: ViewKeys) -> Callable[[], Awaitable[None]]:
    """A check that the partition's worker says, in its heartbeat, that it is paused."""

    async def check() -> None:
        beat = await redis.get(keys.heartbeat)
        assert beat is not None
        assert json.loads(beat)["state"] == "paused"

    return check


@pytest.fixture
async def partitioned(system: System) -> AsyncIterator[Partitioned]:
    await system.stop_worker()  # the fixture's single-partition worker
    settings = WorkerSettings(system.database_url, poll_interval=0.2)
    loops = build_workers(settings, system.redis, system.keys.prefix, list(PROJECTIONS), partitions=PARTITIONS)
    stop = asyncio.Event()
    task = asyncio.ensure_future(asyncio.gather(*(loop.run(stop) for loop in loops)))
    keys = ViewKeys(system.keys.prefix, partitions=PARTITIONS)
    read = await start_read_service(system.redis, keys, "127.0.0.1:0", max_wait=MAX_WAIT)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{read.server.port}")
    setup = Partitioned(system, queries_pb2_grpc.OrderQueriesStub(channel), keys, read)

    async def every_partition_initialised() -> None:
        assert all(await asyncio.gather(*(system.redis.exists(k.checkpoint) for k in setup.partitions())))

    try:
        await eventually(every_partition_initialised)
        yield setup
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        await channel.close()
        await read.stop(0)


async def create(system: System, customer: str, confirm: bool = False) -> cmd.CommandResult:
    result: cmd.CommandResult = (await system.commands.CreateOrder(create_request(customer))).result
    if confirm:
        await system.commands.AddItem(add_item_request(result.order_id, price=100 + len(customer)))
        result = (await system.commands.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=result.order_id))).result
    return result


async def create_in_every_partition(system: System, customer: str) -> list[cmd.CommandResult]:
    """Orders of `customer` until every partition holds at least one (ids are random)."""
    created: list[cmd.CommandResult] = []
    while {partition_of(c.order_id, PARTITIONS) for c in created} != set(range(PARTITIONS)):
        assert len(created) < 200, "the ids never covered every partition"
        created.append(await create(system, customer, confirm=len(created) % 2 == 1))
    return created


async def list_pages(setup: Partitioned, page_size: int, token: str = "", **filters: Any) -> list[str]:
    """The order ids of every page of a listing, following next_page_token."""
    ids: list[str] = []
    page_token = ""
    while True:
        request = qry.ListOrdersRequest(page_size=page_size, page_token=page_token, consistency_token=token, **filters)
        page = await setup.queries.ListOrders(request)
        assert not page.consistency.stale
        assert len(page.orders) <= page_size
        ids += [order.order_id for order in page.orders]
        page_token = page.next_page_token
        if not page_token:
            return ids


async def newest_first(setup: Partitioned, **filters: str) -> list[str]:
    """The expected listing: the views of the log's fold that match `filters`, newest first."""
    views = await expected_views(setup.system.database_url)
    matching = [
        v
        for v in views.values()
        if v.customer_id == filters.get("customer_id", v.customer_id) and v.status == filters.get("status", v.status)
    ]
    return [v.order_id for v in sorted(matching, key=lambda v: v.index_member(), reverse=True)]


async def test_get_order_reads_the_partition_of_each_order(partitioned: Partitioned) -> None:
    """Orders in every partition: GetOrder with each command's token answers each, fresh."""
    created = await create_in_every_partition(partitioned.system, "ann")

    for result in created:
        reply = await partitioned.queries.GetOrder(
            qry.GetOrderRequest(order_id=result.order_id, consistency_token=result.consistency_token)
        )
        assert (reply.order.order_id, reply.order.customer_id) == (result.order_id, "ann")
        assert not reply.consistency.stale


@pytest.mark.parametrize("page_size", [1, 3, 7])
async def test_list_orders_pages_across_partitions(partitioned: Partitioned, page_size: int) -> None:
    """Every listing (all orders, a customer's, a status's, both), paged, is the expected list:
    newest first over every partition, each order once."""
    last = ""
    for customer in ("bob", "cat", "bob", "dan"):
        last = (await create_in_every_partition(partitioned.system, customer))[-1].consistency_token
    confirmed = types_pb2.ORDER_STATUS_CONFIRMED

    filterings: list[tuple[dict[str, str], dict[str, Any]]] = [
        ({}, {}),
        ({"customer_id": "bob"}, {"customer_id": "bob"}),
        ({"status": "CONFIRMED"}, {"status": confirmed}),
        ({"customer_id": "cat", "status": "PENDING"}, {"customer_id": "cat", "status": types_pb2.ORDER_STATUS_PENDING}),
    ]
    for filters, wire in filterings:
        expected = await newest_first(partitioned, **filters)
        listed = await list_pages(partitioned, page_size, last, **wire)
        assert listed == expected, filters
        if filters.get("customer_id") == "bob":  # their orders are in every partition: a merge of all
            assert {partition_of(i, PARTITIONS) for i in listed} == set(range(PARTITIONS))


async def test_paging_is_stable_while_new_orders_arrive(partitioned: Partitioned) -> None:
    """Orders created while a client pages (in any partition) are newer than its cursor: the pages
    give exactly the orders there were when paging started, each once, none missing."""
    system = partitioned.system
    created = await create_in_every_partition(system, "eve")
    expected = await newest_first(partitioned, customer_id="eve")
    listed, page_token, token = [], "", created[-1].consistency_token
    while True:
        request = qry.ListOrdersRequest(customer_id="eve", page_size=3, page_token=page_token, consistency_token=token)
        page = await partitioned.queries.ListOrders(request)
        listed += [order.order_id for order in page.orders]
        page_token = page.next_page_token
        if not page_token:
            break
        token = (await create(system, "eve")).consistency_token  # the next page is read after it is applied

    assert listed == expected
    assert len(await newest_first(partitioned, customer_id="eve")) > len(expected)  # orders did arrive


async def test_summary_adds_up_the_partitions(partitioned: Partitioned) -> None:
    """A customer with orders in every partition: the summary equals one made from the log's fold of
    every order of the customer."""
    created = await create_in_every_partition(partitioned.system, "fay")
    await create(partitioned.system, "other", confirm=True)

    reply = await partitioned.queries.GetCustomerSummary(
        qry.GetCustomerSummaryRequest(customer_id="fay", consistency_token=created[-1].consistency_token)
    )

    views = [v for v in (await expected_views(partitioned.system.database_url)).values() if v.customer_id == "fay"]
    spend: Counter[str] = Counter()
    for v in views:
        if v.status in SPENDING:
            spend[v.currency_code] += v.total_minor
    summary = reply.summary
    assert not reply.consistency.stale
    assert summary.order_count == len(views) == len(created)
    assert {(types_pb2.OrderStatus.Name(c.status), c.count) for c in summary.orders_by_status} == {
        (f"ORDER_STATUS_{status}", count) for status, count in Counter(v.status for v in views).items()
    }
    assert {(m.currency_code, m.minor_units) for m in summary.lifetime_spend} == set(spend.items())
    assert summary.first_order_at.ToMicroseconds() == min(v.created_at_us for v in views)
    assert summary.last_order_at.ToMicroseconds() == max(v.created_at_us for v in views)


async def test_a_token_waits_for_every_partition_a_query_reads(partitioned: Partitioned) -> None:
    """With the partition of a new order paused (the others running past its token), queries with its
    token do not pretend: GetOrder is not ready, a listing and the summary are flagged stale. Queries
    that wait for the token while that partition resumes see the order, fresh."""
    system, queries = partitioned.system, partitioned.queries
    before = await create_in_every_partition(system, "gus")  # the customer has a summary in every partition
    await queries.GetCustomerSummary(
        qry.GetCustomerSummaryRequest(customer_id="gus", consistency_token=before[-1].consistency_token)
    )
    for partition in range(PARTITIONS):
        await partitioned.pause(partition)
    order = await create(system, "gus")
    while partition_of(order.order_id, PARTITIONS) == 0:  # not partition 0: the first is not enough to read
        order = await create(system, "gus")
    held = partition_of(order.order_id, PARTITIONS)
    for partition in set(range(PARTITIONS)) - {held}:
        await partitioned.pause(partition, paused=False)
    token = order.consistency_token
    get = qry.GetOrderRequest(order_id=order.order_id, consistency_token=token)
    listing = qry.ListOrdersRequest(customer_id="gus", page_size=100, consistency_token=token)
    summary = qry.GetCustomerSummaryRequest(customer_id="gus", consistency_token=token)

    first: tuple[Any, ...] = await asyncio.gather(
        queries.GetOrder(get), queries.ListOrders(listing), queries.GetCustomerSummary(summary), return_exceptions=True
    )
    refused, page, stale_summary = first
    assert isinstance(refused, grpc.aio.AioRpcError)
    assert error_reason(refused) == "VIEWS_NOT_READY"
    assert isinstance(page, qry.ListOrdersResponse)
    assert page.consistency.stale
    assert order.order_id not in [o.order_id for o in page.orders]
    assert isinstance(stale_summary, qry.GetCustomerSummaryResponse)
    assert stale_summary.consistency.stale

    answers = asyncio.gather(queries.GetOrder(get), queries.ListOrders(listing), queries.GetCustomerSummary(summary))
    await eventually(partitioned.waiting(held))  # the queries wait for the held partition
    await partitioned.pause(held, paused=False)
    got, fresh_page, reply = await answers

    assert got.order.order_id == order.order_id
    assert not got.consistency.stale
    assert not fresh_page.consistency.stale
    assert order.order_id in [o.order_id for o in fresh_page.orders]
    assert not reply.consistency.stale
    assert reply.summary.order_count == len(await newest_first(partitioned, customer_id="gus"))


async def test_watch_customer_orders_follows_every_partition(partitioned: Partitioned) -> None:
    """A customer's watch stream hears of new orders in every partition (one subscription to every
    partition's change channel), and GetOrder's hot views of each partition follow their changes."""
    call = partitioned.queries.WatchCustomerOrders(qry.WatchCustomerOrdersRequest(customer_id="hal"))
    first = await call.read()
    assert isinstance(first, qry.WatchCustomerOrdersResponse)
    assert first.initial
    created = await create_in_every_partition(partitioned.system, "hal")
    heard: dict[str, int] = {}
    async with asyncio.timeout(10):
        while any(heard.get(c.order_id, 0) < c.version for c in created):
            message = await call.read()
            assert isinstance(message, qry.WatchCustomerOrdersResponse)
            heard |= {order.order_id: order.version for order in message.orders}
    call.cancel()

    for result in created:  # read once (cached), changed, read again without a token: the change shows
        await partitioned.queries.GetOrder(qry.GetOrderRequest(order_id=result.order_id))
        cancel = cmd.CancelOrderRequest(order_id=result.order_id, reason="changed my mind")
        cancelled = await partitioned.system.commands.CancelOrder(cancel)

        async def shows_change(order_id: str = result.order_id, version: int = cancelled.result.version) -> None:
            reply = await partitioned.queries.GetOrder(qry.GetOrderRequest(order_id=order_id))
            assert reply.order.version == version

        await eventually(shows_change)


# --- declared keys: a guessed generation, checked by the script (one round trip in the steady state)


async def test_live_reader_guesses_the_generation_and_follows_a_switch(servers: Servers, keys: ViewKeys) -> None:
    partition = ViewKeys(keys.prefix, partition=1, partitions=PARTITIONS)
    counting, sends = round_trip_counting_redis(servers.redis_url)
    await counting.mset({partition.checkpoint: "1-1", partition.at(2).checkpoint: "2-2"})
    await counting.set(partition.generation_pointer, "2")
    reader, moves = LiveReader(counting, partition), list[int]()
    reader.on_move = moves.append
    try:
        sends[0] = 0
        assert await reader.get(lambda k: [k.checkpoint]) == ["2-2"]
        assert (sends[0], reader.generation, moves) == (2, 2, [2])  # the guess (0) was wrong: once more

        sends[0] = 0
        assert await reader.get(lambda k: [k.checkpoint, Exists(k.checkpoint), k.rebuild_target]) == ["2-2", "1", None]
        assert sends[0] == 1  # the steady state

        await counting.delete(partition.generation_pointer)  # absent: generation 0
        assert await reader.get(lambda k: [k.checkpoint]) == ["1-1"]
        assert moves == [2, 0]
    finally:
        await counting.aclose()


class WritingReader(LiveReader):
    """A reader after whose first `writes` reads a new order enters the index, as a worker's batch
    would between the steps of a page."""

    def __init__(self, redis: Redis, keys: ViewKeys, writes: int) -> None:
        super().__init__(redis, keys)
        self.writes, self.reads = writes, 0

    async def run(self, script: str, declared: Declared, *, raw: bool = False) -> Any:
        reply = await super().run(script, declared, raw=raw)
        self.reads += 1
        if self.reads <= self.writes:
            await an_order(self._redis, self.keys, f"new-{self.reads}", 2_000_000_000_000_000 + self.reads)
        return reply


async def an_order(redis: RedisClient, keys: ViewKeys, order_id: str, created_us: int = 1) -> None:
    """An order in `keys`' index of all orders, with a stand-in view."""
    await redis.zadd(keys.index(), {index_member(created_us, order_id): 0})
    await redis.set(keys.order(order_id), b"view")


@pytest.mark.parametrize("writes", [0, 1, MAX_PAGE_TRIES - 2])
async def test_a_page_is_read_again_until_it_holds_still(redis: Redis, keys: ViewKeys, writes: int) -> None:
    """The first step learns the members, the next reads their views and the range again; a page that
    changed in between is read again, and the answer is one snapshot: the newest members, each with
    its view."""
    partition = ViewKeys(keys.prefix, partitions=PARTITIONS)
    await redis.set(partition.checkpoint, "7-7")
    await an_order(redis, partition, "old")
    reader = WritingReader(redis, partition, writes)

    page = await OrderQueriesServicer._page(reader, lambda k: k.index(), "+", 10)

    assert reader.reads == writes + 2
    assert page.order_ids() == [f"new-{n}" for n in range(writes, 0, -1)] + ["old"]
    assert all(view == b"view" for _, view, _ in page.entries)
    assert page.checkpoint == b"7-7"


async def test_a_page_that_changes_at_every_read_is_unavailable(redis: Redis, keys: ViewKeys) -> None:
    partition = ViewKeys(keys.prefix, partitions=PARTITIONS)
    await an_order(redis, partition, "old")
    reader = WritingReader(redis, partition, writes=MAX_PAGE_TRIES)

    with pytest.raises(Unavailable):
        await OrderQueriesServicer._page(reader, lambda k: k.index(), "+", 10)
    assert reader.reads == MAX_PAGE_TRIES
