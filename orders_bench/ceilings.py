"""Ceilings: the same client machinery against the bare building blocks, measured in the same run.

- echo: a bare grpc.aio unary server in a process of its own, with our SERVER_OPTIONS and uvloop,
  that returns the request bytes; the client builds and sends the same CreateOrderRequest as the
  CreateOrder workload. What gRPC on this machine can do at that concurrency.
- stack: in the same process, our own server (orders.server.grpc_server: interceptors, protobuf decoding
  and encoding, health, reflection) serving CreateOrder and GetOrder with a response made in
  advance: no storage at all. Between echo and the real services, it shows how much of the gap
  is the server stack and how much the work behind it.
- pg-insert: single-row INSERT transactions (autocommit) into a scratch table of the benchmark's
  database, from an asyncpg pool as large as the write service's.
- redis-get: GET of a key holding an order view as stored (the serialized Order), as bytes.
- redis-multi: MULTI/EXEC transactions of 100 SETs of order views as stored, pipelined; a unit is
  one SET, so the rate compares with events applied per second.

Run as `python -m orders_bench.ceilings echo HOST:PORT STACK_HOST:PORT` it serves both.
"""

from __future__ import annotations

import json
import random
import sys

import asyncpg
import grpc
from redis.asyncio import Redis, RedisCluster

from orders.domain.events import Address, OrderCreated, to_payload
from orders.domain.status import OrderStatus
from orders.server.grpc_server import SERVER_OPTIONS, run, start_server, stop_on_signals
from orders.store.views import OrderView, ViewLine, execute, redis_client
from orders.v1 import commands_pb2, commands_pb2_grpc, queries_pb2, queries_pb2_grpc
from orders_bench.load import Job, JobResult
from orders_bench.ops import create_request
from read_service.servicer import SERVICE as QUERIES
from read_service.servicer import order_message
from write_service.servicer import SERVICE as COMMANDS

ECHO_METHOD = "/bench.Echo/Echo"
SCRATCH_TABLE = "bench_insert_ceiling"
GET_KEYS = 1000
MULTI_SETS = 100
MULTI_KEYS = 100_000  # SET keys cycle through this many, so memory stays bounded


def sample_view() -> OrderView:
    """An order view as the orders projection stores it: two lines and an address."""
    lines = (ViewLine("SKU-1", "Bench item", 2, 250), ViewLine("SKU-2", "Bench item", 1, 990))
    address = Address("Ada Lovelace", "Main St 1", "Berlin", "10115", "DE")
    return OrderView("bench-order", "bench-customer", "EUR", OrderStatus.CONFIRMED, 1, 2, 4, lines, address)


def sample_view_stored() -> bytes:
    return sample_view().to_wire()


def sample_payload_json() -> str:
    address = Address("Ada Lovelace", "Main St 1", "Berlin", "10115", "DE")
    return json.dumps(to_payload(OrderCreated("bench-customer", "EUR", address)))


# ------------------------------------------------------------------------------ echo and stack servers


class MemoryCommands(commands_pb2_grpc.OrderCommandsServicer):
    """CreateOrder answered at once: what our server stack costs without the command's work."""

    async def CreateOrder(
        self, request: commands_pb2.CreateOrderRequest, context: grpc.aio.ServicerContext
    ) -> commands_pb2.CreateOrderResponse:
        result = commands_pb2.CommandResult(order_id=request.order_id, version=1, position=1, consistency_token="1-1")
        return commands_pb2.CreateOrderResponse(result=result)


class MemoryQueries(queries_pb2_grpc.OrderQueriesServicer):
    """GetOrder answered with an order made in advance: our server stack without Redis."""

    def __init__(self) -> None:
        consistency = queries_pb2.ReadConsistency(view_token="1-1")
        self.response = queries_pb2.GetOrderResponse(order=order_message(sample_view()), consistency=consistency)

    async def GetOrder(
        self, request: queries_pb2.GetOrderRequest, context: grpc.aio.ServicerContext
    ) -> queries_pb2.GetOrderResponse:
        return self.response


async def serve_echo(address: str, stack_address: str) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    handler = grpc.unary_unary_rpc_method_handler(echo)  # no (de)serializers: bytes in, bytes out
    server = grpc.aio.server(options=SERVER_OPTIONS, maximum_concurrent_rpcs=1000)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),))
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    # The RPCs not measured keep the generated UNIMPLEMENTED defaults (abstract in the typing stubs).
    servicers = {COMMANDS: MemoryCommands(), QUERIES: MemoryQueries()}  # type: ignore[abstract]
    stack = await start_server(stack_address, servicers)
    print("ready", flush=True)
    await stop_on_signals().wait()
    await stack.stop(1)
    await server.stop(1)


class Echo:
    def __init__(self, job: Job) -> None:
        self.channel = grpc.aio.insecure_channel(job.params["echo"])
        self.call_echo = self.channel.unary_unary(
            ECHO_METHOD,
            request_serializer=commands_pb2.CreateOrderRequest.SerializeToString,
            response_deserializer=commands_pb2.CreateOrderRequest.FromString,
        )
        self.tag, self.sent = job.tag, 0

    async def call(self, slot: int, measured: bool) -> int:
        self.sent += 1
        await self.call_echo(create_request(self.tag, self.sent), timeout=10)
        return 1

    async def finish(self, result: JobResult) -> None:
        pass

    async def aclose(self) -> None:
        await self.channel.close()


# ------------------------------------------------------------------------------ PostgreSQL


async def prepare_scratch_table(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SCRATCH_TABLE}"
            " (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, payload jsonb NOT NULL)"
        )
    finally:
        await conn.close()


class PgInsert:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.payload = sample_payload_json()

    @classmethod
    async def open(cls, job: Job) -> PgInsert:
        pool = await asyncpg.create_pool(job.params["database_url"], min_size=1, max_size=job.params["pool_size"])
        return cls(pool)

    async def call(self, slot: int, measured: bool) -> int:
        await self.pool.execute(f"INSERT INTO {SCRATCH_TABLE} (payload) VALUES ($1::jsonb)", self.payload)
        return 1

    async def finish(self, result: JobResult) -> None:
        pass

    async def aclose(self) -> None:
        await self.pool.close()


# ------------------------------------------------------------------------------ Redis


def ceiling_prefix(prefix: str) -> str:
    return f"{prefix}ceiling:"


async def prepare_redis_keys(redis_url: str, prefix: str) -> None:
    redis = redis_client(redis_url)
    try:
        value = sample_view_stored()
        await redis.mset({f"{ceiling_prefix(prefix)}get:{i}": value for i in range(GET_KEYS)})
    finally:
        await redis.aclose()


class _Redis:
    def __init__(self, job: Job) -> None:
        self.redis: Redis | RedisCluster = redis_client(job.params["redis_url"])
        self.prefix = ceiling_prefix(job.params["prefix"])
        self.value = sample_view_stored()

    async def finish(self, result: JobResult) -> None:
        pass

    async def aclose(self) -> None:
        await self.redis.aclose()


class RedisGet(_Redis):
    async def call(self, slot: int, measured: bool) -> int:
        await execute(self.redis, "GET", f"{self.prefix}get:{random.randrange(GET_KEYS)}", raw=True)
        return 1


class RedisMulti(_Redis):
    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self.next = random.randrange(MULTI_KEYS)

    async def call(self, slot: int, measured: bool) -> int:
        async with self.redis.pipeline(transaction=True) as pipe:
            for _ in range(MULTI_SETS):
                self.next = (self.next + 1) % MULTI_KEYS
                pipe.set(f"{self.prefix}multi:{self.next}", self.value)
            await pipe.execute()
        return MULTI_SETS


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "echo":
        sys.exit("usage: python -m orders_bench.ceilings echo HOST:PORT STACK_HOST:PORT")
    run(lambda: serve_echo(args[1], args[2]))


if __name__ == "__main__":
    main()
