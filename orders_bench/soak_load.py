"""The soak's load (`orders-bench --soak`), in a client process of its own so that it shares no GIL
with the orchestrator, which reads /proc and Redis at every window's end.

Open loop, for the whole run: commands at `rate` (each order walks create, add item, confirm,
ship, one command per tick, so the four come in equal shares), queries at `query_rate` (GetOrder of
an order acknowledged at least READ_AFTER ago, and ListOrders of a customer, in turn), and one
WatchCustomerOrders stream on each of `streams` customers, which get one order in
CUSTOMERS_PER_STREAM: for every command on their orders, the lag from its ack to the stream
message that carries the order at that version.

Every call and lag counts in the window in which it completes; at each window's end the client
sends that window's Tally to the orchestrator and starts a new one, so it keeps nothing that grows
with the run (the soak would otherwise measure its own client).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc

from orders.v1 import commands_pb2, commands_pb2_grpc, queries_pb2, queries_pb2_grpc
from orders_bench.ops import CALL_TIMEOUT, READY_TIMEOUT, add_item_request, create_request

READ_AFTER = 1.0  # seconds after its ack an order is read by GetOrder: its view is there by then
READABLE_KEPT = 10_000  # orders GetOrder picks from (a random one replaced when full)
LAG_GIVE_UP = 10.0  # seconds after its ack a watched command counts as missing from the stream
SEEN_KEPT_FOR = 60.0  # seconds a stream's latest version of an order is kept for an ack to come
CUSTOMERS_PER_STREAM = 10
LIST_PAGE = 20
STREAM_RETRY = 1.0  # seconds before a stream that ended is opened again
DRAIN = 5.0  # seconds the last calls have to finish after the run
STEPS = 4  # create, add item, confirm, ship


@dataclass(frozen=True)
class Plan:
    write: str
    read: str
    tag: str  # unique per run: order and customer ids are built from it
    rate: float  # commands per second
    query_rate: float
    streams: int
    window: float  # seconds
    windows: int


@dataclass
class Tally:
    """What one window saw: latencies in seconds of the calls that completed in it (from their
    scheduled time), lags completed in it, errors by gRPC code."""

    acks: list[float] = field(default_factory=list)
    queries: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    lag_missing: int = 0
    created: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)

    def failed(self, error: BaseException, what: str = "") -> None:
        code = error.code().name if isinstance(error, grpc.aio.AioRpcError) else type(error).__name__
        self.errors[f"{what}{code}"] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "acks": self.acks,
            "queries": self.queries,
            "lags": self.lags,
            "lag_missing": self.lag_missing,
            "created": self.created,
            "errors": dict(self.errors),
        }


@dataclass(frozen=True)
class Step:
    """The next command of an order in progress."""

    order_id: str
    number: int  # the order's number, which names its customer
    step: int  # 0 create, 1 add item, 2 confirm, 3 ship


class Soak:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.write = grpc.aio.insecure_channel(plan.write)
        self.read = grpc.aio.insecure_channel(plan.read)
        self.commands = commands_pb2_grpc.OrderCommandsStub(self.write)
        self.queries = queries_pb2_grpc.OrderQueriesStub(self.read)
        self.customers = plan.streams * CUSTOMERS_PER_STREAM
        self.tally = Tally()
        self.orders = 0
        self.ready: collections.deque[Step] = collections.deque()  # orders whose last command was acked
        self.fresh: collections.deque[tuple[float, str]] = collections.deque()  # (ack time, order) to read later
        self.readable: list[str] = []
        self.pending: dict[str, list[tuple[int, float]]] = {}  # watched order -> (version, ack time) unseen
        self.seen: dict[str, tuple[int, float]] = {}  # watched order -> latest (version, time) on its stream
        self.stopping = False
        self.watchers: list[asyncio.Task[None]] = []
        self.calls: set[asyncio.Task[None]] = set()

    def customer(self, number: int) -> str:
        return f"{self.plan.tag}c{number % self.customers}"

    def watched(self, number: int) -> bool:
        return number % self.customers < self.plan.streams

    # -------------------------------------------------------------------------- streams

    async def start(self) -> None:
        """Opens the watch streams; returns once each has sent its first message."""
        ready = [asyncio.Event() for _ in range(self.plan.streams)]
        for number, event in enumerate(ready):
            self.watchers.append(asyncio.create_task(self._watch(self.customer(number), event)))
        async with asyncio.timeout(READY_TIMEOUT):
            await asyncio.gather(*(event.wait() for event in ready))

    async def _watch(self, customer: str, ready: asyncio.Event) -> None:
        request = queries_pb2.WatchCustomerOrdersRequest(customer_id=customer)
        while not self.stopping:
            try:
                async for message in self.queries.WatchCustomerOrders(request):
                    ready.set()
                    if not message.initial:
                        for order in message.orders:
                            self._changed(order.order_id, order.version, time.perf_counter())
            except grpc.aio.AioRpcError as error:
                if self.stopping:
                    return
                self.tally.failed(error, "watch ")
            else:
                self.tally.errors["watch ended"] += 1
            await asyncio.sleep(STREAM_RETRY)

    def _changed(self, order_id: str, version: int, now: float) -> None:
        if version > self.seen.get(order_id, (0, 0.0))[0]:
            self.seen[order_id] = (version, now)
        waiting = self.pending.pop(order_id, [])
        self.tally.lags += [now - acked for v, acked in waiting if v <= version]
        later = [(v, acked) for v, acked in waiting if v > version]
        if later:
            self.pending[order_id] = later

    def _acked_watched(self, order_id: str, version: int, now: float) -> None:
        if self.seen.get(order_id, (0, 0.0))[0] >= version:
            self.tally.lags.append(0.0)  # the stream beat the ack to the client
        else:
            self.pending.setdefault(order_id, []).append((version, now))

    def _expire(self, now: float) -> None:
        """Watched commands not seen within LAG_GIVE_UP count as missing; old versions go."""
        for order_id, waiting in list(self.pending.items()):
            kept = [(v, acked) for v, acked in waiting if now - acked < LAG_GIVE_UP]
            self.tally.lag_missing += len(waiting) - len(kept)
            if kept:
                self.pending[order_id] = kept
            else:
                del self.pending[order_id]
        self.seen = {o: seen for o, seen in self.seen.items() if now - seen[1] < SEEN_KEPT_FOR}

    # -------------------------------------------------------------------------- commands

    async def _send(self, step: Step) -> Any:
        if step.step == 0:
            request = create_request(self.plan.tag, step.number, with_address=True)
            request.customer_id = self.customer(step.number)
            return await self.commands.CreateOrder(request, timeout=CALL_TIMEOUT)
        if step.step == 1:
            return await self.commands.AddItem(add_item_request(step.order_id), timeout=CALL_TIMEOUT)
        if step.step == 2:
            confirm = commands_pb2.ConfirmOrderRequest(command_id=uuid.uuid4().hex, order_id=step.order_id)
            return await self.commands.ConfirmOrder(confirm, timeout=CALL_TIMEOUT)
        ship = commands_pb2.ShipOrderRequest(
            command_id=uuid.uuid4().hex, order_id=step.order_id, carrier="DHL", tracking_number=f"T{step.number}"
        )
        return await self.commands.ShipOrder(ship, timeout=CALL_TIMEOUT)

    def _next_step(self) -> Step:
        if self.ready:
            return self.ready.popleft()
        self.orders += 1
        return Step(f"{self.plan.tag}o{self.orders}", self.orders, 0)

    async def command(self, scheduled: float) -> None:
        step = self._next_step()
        try:
            reply = await self._send(step)
        except Exception as error:  # counted by code; the order is dropped
            self.tally.failed(error)
            return
        now = time.perf_counter()
        self.tally.acks.append(now - scheduled)
        if step.step == 0:
            self.tally.created += 1
            self.fresh.append((now, step.order_id))
        if step.step + 1 < STEPS:
            self.ready.append(Step(step.order_id, step.number, step.step + 1))
        if self.watched(step.number):
            self._acked_watched(step.order_id, reply.result.version, now)

    # -------------------------------------------------------------------------- queries

    def _settled(self, now: float) -> None:
        """Orders acknowledged READ_AFTER ago join those GetOrder picks from."""
        while self.fresh and now - self.fresh[0][0] >= READ_AFTER:
            _, order_id = self.fresh.popleft()
            if len(self.readable) < READABLE_KEPT:
                self.readable.append(order_id)
            else:
                self.readable[random.randrange(READABLE_KEPT)] = order_id

    async def query(self, scheduled: float, turn: int) -> None:
        self._settled(time.perf_counter())
        if not self.readable:
            return  # nothing to read yet: the first second of the run
        try:
            if turn % 2:
                customer = self.customer(random.randrange(min(self.orders, self.customers)) + 1)
                request = queries_pb2.ListOrdersRequest(customer_id=customer, page_size=LIST_PAGE)
                await self.queries.ListOrders(request, timeout=CALL_TIMEOUT)
            else:
                get = queries_pb2.GetOrderRequest(order_id=random.choice(self.readable))
                await self.queries.GetOrder(get, timeout=CALL_TIMEOUT)
        except Exception as error:
            self.tally.failed(error)
            return
        self.tally.queries.append(time.perf_counter() - scheduled)

    # -------------------------------------------------------------------------- the run

    async def _ticks(
        self, rate: float, start: float, end: float, fire: Callable[[float, int], Coroutine[Any, Any, None]]
    ) -> None:
        """Calls scheduled every 1/rate seconds whether or not earlier ones returned."""
        interval, sent = 1.0 / rate, 0
        while (scheduled := start + sent * interval) < end:
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(fire(scheduled, sent))
            self.calls.add(task)
            task.add_done_callback(self.calls.discard)
            sent += 1

    async def _windows(self, start: float, send: Callable[[Tally], Awaitable[None]]) -> None:
        for number in range(1, self.plan.windows + 1):
            await asyncio.sleep(max(0.0, start + number * self.plan.window - time.perf_counter()))
            self._expire(time.perf_counter())
            tally, self.tally = self.tally, Tally()
            await send(tally)

    async def run(self, start: float, send: Callable[[Tally], Awaitable[None]]) -> None:
        """The whole run from `start` (perf_counter time), a Tally sent at each window's end."""
        end = start + self.plan.windows * self.plan.window
        await asyncio.gather(
            self._ticks(self.plan.rate, start, end, lambda at, _: self.command(at)),
            self._ticks(self.plan.query_rate, start, end, self.query),
            self._windows(start, send),
        )
        if self.calls:
            await asyncio.wait(set(self.calls), timeout=DRAIN)

    async def aclose(self) -> None:
        self.stopping = True
        for watcher in self.watchers:
            watcher.cancel()
        for watcher in self.watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self.write.close()
        await self.read.close()


def client_main(conn: Connection) -> None:
    """The client process: receives a Plan, opens the streams, says "ready", receives the wall-clock
    start, sends ("window", tally) per window, then ("done", None); ("error", text) if it fails."""
    from orders.server.grpc_server import run  # noqa: PLC0415 - as orders_bench.load's clients do

    async def serve() -> None:
        try:
            await _serve(conn)
        except Exception:
            conn.send(("error", traceback.format_exc()))

    run(serve)


async def _serve(conn: Connection) -> None:
    plan: Plan = await asyncio.to_thread(conn.recv)
    soak = Soak(plan)
    try:
        await soak.start()
        conn.send(("ready", None))
        wall_start: float = await asyncio.to_thread(conn.recv)
        start = time.perf_counter() + (wall_start - time.time())

        async def send(tally: Tally) -> None:
            await asyncio.to_thread(conn.send, ("window", tally.as_dict()))

        await soak.run(start, send)
    finally:
        await soak.aclose()
    conn.send(("done", None))
