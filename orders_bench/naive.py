"""The naive reference pipeline: the design anyone would write first, measured beside ours in the
same rounds with the same client, so that every figure has a peer.

- write: OrderCommands.CreateOrder as one INSERT per command (autocommit) into a table of its own;
- poll: every POLL_EVERY seconds, the rows after the last one seen, each SET to one Redis key, one
  awaited SET per row (it re-reads the last LOOKBACK ids, so that a row committed after a later
  id was read is not skipped: good enough for a benchmark, not a guarantee);
- read: OrderQueries.GetOrder as one GET of that key, JSON decoded into an Order.

No event log, no versions, no idempotency, no consistency tokens: what it saves is the peer's
floor of cost. It runs as three processes (as ours does), with stock grpc.aio servers and the
standard json module. Run as `python -m orders_bench.naive write|poll|read ...`; CreateOrder and
GetOrder are its only calls.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import grpc

from orders.server.grpc_server import run, stop_on_signals
from orders.store.views import redis_client
from orders.v1 import commands_pb2, commands_pb2_grpc, queries_pb2, queries_pb2_grpc, types_pb2

TABLE = "naive_orders"
SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    " order_id text NOT NULL UNIQUE, customer_id text NOT NULL, currency_code text NOT NULL)"
)
POOL_SIZE = 20  # as the write service's
POLL_EVERY = 0.1
LOOKBACK = 256  # ids re-read by each poll
POLL_LIMIT = 5000


def order_key(prefix: str, order_id: str) -> str:
    return f"{prefix}order:{order_id}"


class NaiveCommands(commands_pb2_grpc.OrderCommandsServicer):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def CreateOrder(
        self, request: commands_pb2.CreateOrderRequest, context: grpc.aio.ServicerContext
    ) -> commands_pb2.CreateOrderResponse:
        insert = f"INSERT INTO {TABLE} (order_id, customer_id, currency_code) VALUES ($1, $2, $3) RETURNING id"
        try:
            row_id = await self.pool.fetchval(insert, request.order_id, request.customer_id, request.currency_code)
        except asyncpg.UniqueViolationError:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "order exists")
        result = commands_pb2.CommandResult(
            order_id=request.order_id, version=1, position=row_id, consistency_token=str(row_id)
        )
        return commands_pb2.CreateOrderResponse(result=result)


class NaiveQueries(queries_pb2_grpc.OrderQueriesServicer):
    def __init__(self, redis_url: str, prefix: str) -> None:
        self.redis, self.prefix = redis_client(redis_url), prefix

    async def GetOrder(
        self, request: queries_pb2.GetOrderRequest, context: grpc.aio.ServicerContext
    ) -> queries_pb2.GetOrderResponse:
        value = await self.redis.get(order_key(self.prefix, request.order_id))
        if value is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such order")
            raise AssertionError("abort raises")  # for the type checker
        view = json.loads(value)
        order = types_pb2.Order(
            order_id=view["order_id"],
            customer_id=view["customer_id"],
            status=types_pb2.ORDER_STATUS_PENDING,
            total=types_pb2.Money(currency_code=view["currency_code"], minor_units=0),
            version=1,
        )
        return queries_pb2.GetOrderResponse(order=order)


async def _serve(address: str, add: Callable[[grpc.aio.Server], None]) -> None:
    server = grpc.aio.server()
    add(server)
    server.add_insecure_port(address)
    await server.start()
    print("ready", flush=True)
    await stop_on_signals().wait()
    await server.stop(1)


async def serve_write(address: str, database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=POOL_SIZE, max_size=POOL_SIZE)
    # The RPCs it does not implement keep the generated UNIMPLEMENTED defaults (abstract in the stubs).
    commands = NaiveCommands(pool)  # type: ignore[abstract]
    await _serve(address, lambda s: commands_pb2_grpc.add_OrderCommandsServicer_to_server(commands, s))
    await pool.close()


async def serve_read(address: str, redis_url: str, prefix: str) -> None:
    servicer = NaiveQueries(redis_url, prefix)  # type: ignore[abstract]
    await _serve(address, lambda s: queries_pb2_grpc.add_OrderQueriesServicer_to_server(servicer, s))


async def poll(database_url: str, redis_url: str, prefix: str) -> None:
    conn, redis = await asyncpg.connect(database_url), redis_client(redis_url)
    stop, high, seen = stop_on_signals(), 0, set[int]()
    select = f"SELECT id, order_id, customer_id, currency_code FROM {TABLE} WHERE id > $1 ORDER BY id LIMIT $2"
    print("ready", flush=True)
    while not stop.is_set():
        for row in await conn.fetch(select, max(0, high - LOOKBACK), POLL_LIMIT):
            if row["id"] not in seen:
                await redis.set(order_key(prefix, row["order_id"]), json.dumps(dict(row)))
                seen.add(row["id"])
                high = max(high, row["id"])
        seen = {i for i in seen if i > high - LOOKBACK}
        await asyncio.sleep(POLL_EVERY)
    await conn.close()
    await redis.aclose()


ROLES: dict[str, Callable[..., Coroutine[Any, Any, None]]] = {"write": serve_write, "poll": poll, "read": serve_read}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ROLES:
        sys.exit(
            "usage: python -m orders_bench.naive write ADDRESS DATABASE_URL | poll DATABASE_URL REDIS_URL PREFIX"
            " | read ADDRESS REDIS_URL PREFIX"
        )
    role = ROLES[args[0]]
    run(lambda: role(*args[1:]))


if __name__ == "__main__":
    main()
