"""Workloads against the services under test: commands, queries and the lag probe.

They call the raw generated stubs on one channel per client process, as the ceilings' echo client
does, so that ratios compare servers and not client code (several channels, each its own
connection, against services that run several processes). (`create-client` runs CreateOrder
through OrdersClient instead, to show what the client library itself costs.)
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from typing import Any

import grpc

from orders.client import OrdersClient
from orders.store.views import redis_client
from orders.v1 import commands_pb2, commands_pb2_grpc, queries_pb2, queries_pb2_grpc, types_pb2
from orders_bench.load import Job, JobResult
from orders_bench.naive import order_key

CALL_TIMEOUT = 10.0
CUSTOMERS = 100  # per client process, for the write workloads
LAG_DRAIN = 5.0  # seconds the lag probe waits for the last changes to show
READY_TIMEOUT = 30.0
NAIVE_PROBE_EVERY = 0.002  # seconds between the naive lag probe's looks
EUR = "EUR"
ADDRESS = types_pb2.ShippingAddress(
    recipient="Ada Lovelace", line1="Main St 1", city="Berlin", postal_code="10115", country_code="DE"
)


def create_request(tag: str, n: int, with_address: bool = False) -> commands_pb2.CreateOrderRequest:
    """The n-th new order of client `tag`, with a fresh command id as OrdersClient would send."""
    return commands_pb2.CreateOrderRequest(
        command_id=uuid.uuid4().hex,
        order_id=f"{tag}o{n}",
        customer_id=f"{tag}c{n % CUSTOMERS}",
        currency_code=EUR,
        shipping_address=ADDRESS if with_address else None,
    )


def add_item_request(order_id: str, n: int = 1) -> commands_pb2.AddItemRequest:
    price = types_pb2.Money(currency_code=EUR, minor_units=250)
    return commands_pb2.AddItemRequest(
        command_id=uuid.uuid4().hex, order_id=order_id, sku=f"SKU-{n}", name="Bench item", quantity=2, unit_price=price
    )


class _Channel:
    """The job's channels (params "channels", default one), each on a connection of its own, so
    that the kernel can spread them over the processes of a service that listens with several
    (SO_REUSEPORT spreads connections, not calls); nothing to add to the result by default."""

    def __init__(self, job: Job, address: str) -> None:
        count = int(job.params.get("channels", 1))
        # A channel shares its connection with every channel of the same target and options, unless
        # it keeps its subchannels to itself.
        options = [("grpc.use_local_subchannel_pool", 1)] if count > 1 else []
        self.channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(count)]
        self.turn = 0  # calls so far: each goes to the next channel in turn

    async def finish(self, result: JobResult) -> None:
        pass

    async def aclose(self) -> None:
        for channel in self.channels:
            await channel.close()


class CreateOrders(_Channel):
    def __init__(self, job: Job) -> None:
        super().__init__(job, job.params["write"])
        self.stubs = [commands_pb2_grpc.OrderCommandsStub(channel) for channel in self.channels]
        self.tag, self.sent = job.tag, 0

    async def call(self, slot: int, measured: bool) -> int:
        self.sent += 1
        stub = self.stubs[self.sent % len(self.stubs)]
        await stub.CreateOrder(create_request(self.tag, self.sent), timeout=CALL_TIMEOUT)
        return 1


class Lifecycle(_Channel):
    """Each slot walks one order through create (with address), add item, confirm and ship, one
    command per call, then starts the next order."""

    def __init__(self, job: Job) -> None:
        super().__init__(job, job.params["write"])
        self.stub = commands_pb2_grpc.OrderCommandsStub(self.channels[0])
        self.tag, self.orders = job.tag, 0
        self.stage: dict[int, tuple[str, int]] = {}  # slot -> (order id, next step)

    async def call(self, slot: int, measured: bool) -> int:
        order_id, step = self.stage.get(slot, ("", 0))
        self.stage.pop(slot, None)  # a failed step starts a new order
        if step == 0:
            self.orders += 1
            request = create_request(self.tag, self.orders, with_address=True)
            order_id = request.order_id
            await self.stub.CreateOrder(request, timeout=CALL_TIMEOUT)
        elif step == 1:
            await self.stub.AddItem(add_item_request(order_id), timeout=CALL_TIMEOUT)
        elif step == 2:
            confirm = commands_pb2.ConfirmOrderRequest(command_id=uuid.uuid4().hex, order_id=order_id)
            await self.stub.ConfirmOrder(confirm, timeout=CALL_TIMEOUT)
        else:
            ship = commands_pb2.ShipOrderRequest(
                command_id=uuid.uuid4().hex, order_id=order_id, carrier="DHL", tracking_number=f"T{self.orders}"
            )
            await self.stub.ShipOrder(ship, timeout=CALL_TIMEOUT)
        self.stage[slot] = (order_id, (step + 1) % 4)
        return 1


class GetOrders(_Channel):
    def __init__(self, job: Job) -> None:
        super().__init__(job, job.params["read"])
        self.stubs = [queries_pb2_grpc.OrderQueriesStub(channel) for channel in self.channels]
        self.order_ids: list[str] = job.params["order_ids"]

    async def call(self, slot: int, measured: bool) -> int:
        request = queries_pb2.GetOrderRequest(order_id=random.choice(self.order_ids))
        self.turn += 1
        await self.stubs[self.turn % len(self.stubs)].GetOrder(request, timeout=CALL_TIMEOUT)
        return 1


class ListOrders(_Channel):
    def __init__(self, job: Job) -> None:
        super().__init__(job, job.params["read"])
        self.stub = queries_pb2_grpc.OrderQueriesStub(self.channels[0])
        self.customers: list[str] = job.params["customers"]
        self.page_size: int = job.params["page_size"]

    async def call(self, slot: int, measured: bool) -> int:
        request = queries_pb2.ListOrdersRequest(customer_id=random.choice(self.customers), page_size=self.page_size)
        await self.stub.ListOrders(request, timeout=CALL_TIMEOUT)
        return 1


class CreateOrdersViaClient:
    """CreateOrder through OrdersClient (retry policy, error translation), for comparison."""

    def __init__(self, job: Job) -> None:
        self.client = OrdersClient(job.params["write"], job.params["read"])
        self.tag, self.sent = job.tag, 0

    async def call(self, slot: int, measured: bool) -> int:
        self.sent += 1
        request = create_request(self.tag, self.sent)
        await self.client.create_order(request.customer_id, EUR, order_id=request.order_id)
        return 1

    async def finish(self, result: JobResult) -> None:
        pass

    async def aclose(self) -> None:
        await self.client.close()


async def _lags(acked: dict[str, float], seen: dict[str, float], arrived: asyncio.Event, result: JobResult) -> None:
    """Puts into `result` the seconds from each order's ack to its being seen (as samples, and with
    the ack's wall-clock time as series), once every acked order was seen or LAG_DRAIN passed
    (`arrived` is set whenever an order is seen); orders never seen have no lag: they count as
    missing."""
    deadline = time.perf_counter() + LAG_DRAIN
    while any(o not in seen for o in acked) and (left := deadline - time.perf_counter()) > 0:
        arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), left)
    to_wall = time.time() - time.perf_counter()  # the stamps are perf_counter's; the series is in wall time
    lags = [(at, seen[o] - at) for o, at in acked.items() if o in seen]
    result.samples = [lag for _, lag in lags]
    result.series = [(at + to_wall, lag) for at, lag in lags]
    result.extra["missing"] = float(len(acked) - len(lags))


class Lag:
    """Creates orders on a clock and times, per order, from the command's acknowledgement to the
    message that carries it on a WatchCustomerOrders stream of its customer (one stream per
    customer, opened before the load starts): the change seen through OrderQueries by a client."""

    def __init__(self, job: Job) -> None:
        self.write = grpc.aio.insecure_channel(job.params["write"])
        self.read = grpc.aio.insecure_channel(job.params["read"])
        self.commands = commands_pb2_grpc.OrderCommandsStub(self.write)
        self.tag, self.sent = job.tag, 0
        self.customers = [f"{job.tag}w{i}" for i in range(job.params["streams"])]
        self.acked: dict[str, float] = {}  # measured orders only
        self.seen: dict[str, float] = {}
        self.streams: list[Any] = []
        self.arrived = asyncio.Event()  # set by every stream message, for the drain at the end
        self.readers: list[asyncio.Task[None]] = []
        self.lifetime = job.warmup + job.duration + LAG_DRAIN + 60

    async def start(self) -> None:
        queries = queries_pb2_grpc.OrderQueriesStub(self.read)
        ready = [asyncio.Event() for _ in self.customers]
        for customer, event in zip(self.customers, ready, strict=True):
            stream = queries.WatchCustomerOrders(
                queries_pb2.WatchCustomerOrdersRequest(customer_id=customer), timeout=self.lifetime
            )
            self.streams.append(stream)
            self.readers.append(asyncio.create_task(self._read(stream, event)))
        async with asyncio.timeout(READY_TIMEOUT):
            await asyncio.gather(*(event.wait() for event in ready))

    async def _read(self, stream: Any, ready: asyncio.Event) -> None:
        async for message in stream:
            now = time.perf_counter()
            if message.initial:
                ready.set()
            for order in message.orders:
                self.seen.setdefault(order.order_id, now)
            self.arrived.set()

    async def call(self, slot: int, measured: bool) -> int:
        self.sent += 1
        request = create_request(self.tag, self.sent)
        request.customer_id = self.customers[self.sent % len(self.customers)]
        await self.commands.CreateOrder(request, timeout=CALL_TIMEOUT)
        if measured:
            self.acked[request.order_id] = time.perf_counter()
        return 1

    async def finish(self, result: JobResult) -> None:
        await _lags(self.acked, self.seen, self.arrived, result)
        result.extra["seen_before_ack"] = float(sum(lag < 0 for lag in result.samples))
        # A stream message may beat the ack to the client: no lag to speak of.
        result.samples = [max(0.0, lag) for lag in result.samples]
        result.series = [(at, max(0.0, lag)) for at, lag in result.series]
        result.extra["ended_streams"] = float(sum(reader.done() for reader in self.readers))

    async def aclose(self) -> None:
        for stream in self.streams:
            stream.cancel()
        for reader in self.readers:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
        await self.write.close()
        await self.read.close()


class NaiveLag:
    """The lag probe for the naive pipeline, which has no change stream: creates orders on a clock
    and times, per order, from the command's acknowledgement until its key exists in Redis (what
    the naive GetOrder reads), probed every NAIVE_PROBE_EVERY seconds with one MGET of the keys
    still awaited."""

    def __init__(self, job: Job) -> None:
        self.channel = grpc.aio.insecure_channel(job.params["write"])
        self.commands = commands_pb2_grpc.OrderCommandsStub(self.channel)
        self.redis = redis_client(job.params["redis_url"])
        self.prefix: str = job.params["prefix"]
        self.tag, self.sent = job.tag, 0
        self.acked: dict[str, float] = {}  # measured orders only
        self.seen: dict[str, float] = {}
        self.arrived = asyncio.Event()  # set whenever the probe found keys, for the drain at the end
        self.probe = asyncio.create_task(self._probe())

    async def _probe(self) -> None:
        while True:
            awaited = [o for o in self.acked if o not in self.seen]
            if awaited:
                values = await self.redis.mget([order_key(self.prefix, o) for o in awaited])
                now = time.perf_counter()
                found = {o: now for o, value in zip(awaited, values, strict=True) if value is not None}
                self.seen.update(found)
                if found:
                    self.arrived.set()
            await asyncio.sleep(NAIVE_PROBE_EVERY)

    async def call(self, slot: int, measured: bool) -> int:
        self.sent += 1
        request = create_request(self.tag, self.sent)
        await self.commands.CreateOrder(request, timeout=CALL_TIMEOUT)
        if measured:
            self.acked[request.order_id] = time.perf_counter()
        return 1

    async def finish(self, result: JobResult) -> None:
        await _lags(self.acked, self.seen, self.arrived, result)

    async def aclose(self) -> None:
        self.probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.probe
        await self.redis.aclose()
        await self.channel.close()
