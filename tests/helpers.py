"""Helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import NamedTuple, TypeVar

import asyncpg
import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import Connection

from orders.config import is_cluster_url
from orders.domain.events import RecordedEvent
from orders.store.event_store import open_connection, read_log
from orders.store.views import OrderView, RedisClient, ViewKeys, execute, parse_generation
from orders.v1 import commands_pb2, types_pb2
from sync_worker.projection import fold

T = TypeVar("T")

EUR = "EUR"


def money(minor: int, currency: str = EUR) -> types_pb2.Money:
    return types_pb2.Money(currency_code=currency, minor_units=minor)


def an_address(city: str = "Berlin") -> types_pb2.ShippingAddress:
    return types_pb2.ShippingAddress(
        recipient="Ada Lovelace", line1="Main St 1", city=city, postal_code="10115", country_code="DE"
    )


def create_request(customer_id: str = "cust-1", **fields: object) -> commands_pb2.CreateOrderRequest:
    return commands_pb2.CreateOrderRequest(customer_id=customer_id, currency_code=EUR, **fields)  # type: ignore[arg-type]


def add_item_request(
    order_id: str, sku: str = "SKU-1", quantity: int = 1, price: int = 250
) -> commands_pb2.AddItemRequest:
    return commands_pb2.AddItemRequest(
        order_id=order_id, sku=sku, name=f"Product {sku}", quantity=quantity, unit_price=money(price)
    )


async def eventually(check: Callable[[], Awaitable[T]], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Retries `check` until it stops raising AssertionError, or re-raises after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(interval)


async def all_events(database_url: str) -> list[RecordedEvent]:
    conn = await open_connection(database_url)
    try:
        return await read_log(conn)
    finally:
        await conn.close()


async def views_in_redis(redis: RedisClient, keys: ViewKeys) -> dict[str, OrderView]:
    views = {}
    async for key in redis.scan_iter(match=keys.order("*"), count=1000):
        raw = await execute(redis, "GET", key, raw=True)  # order views are binary
        assert raw is not None
        view = OrderView.from_stored(raw)
        views[view.order_id] = view
    return views


async def expected_views(database_url: str) -> dict[str, OrderView]:
    """The views as a fold of every event in PostgreSQL: what Redis must hold once synced."""
    return fold(await all_events(database_url))


async def live_keys(redis: RedisClient, keys: ViewKeys) -> ViewKeys:
    """`keys` at the generation readers use now."""
    return keys.at(parse_generation(await redis.get(keys.generation_pointer)))


async def views_in_partitions(redis: RedisClient, keys: ViewKeys) -> dict[str, OrderView]:
    """The live generation's order views of every partition of `keys`' projection; each order must
    be in the partition that owns it, and in no other."""
    views: dict[str, OrderView] = {}
    for partition in keys.all_partitions():
        found = await views_in_redis(redis, await live_keys(redis, partition))
        assert all(partition.owns(order_id) for order_id in found), f"an order outside its partition {partition.name}"
        views |= found
    return views


async def assert_views_match_events(database_url: str, redis: RedisClient, keys: ViewKeys) -> None:
    """The live generation's order views, of every partition, equal a fold of every event."""
    expected = await expected_views(database_url)
    actual = await views_in_partitions(redis, keys)
    assert expected == actual


def rich_details(error: grpc.aio.AioRpcError) -> dict[str, Message]:
    """The google.rpc details of a failed call, by type name ("BadRequest", "ErrorInfo", "RetryInfo")."""
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert raw is not None, "the status carries no rich details"
    status = status_pb2.Status.FromString(raw)
    assert error.code().value[0] == status.code
    found: dict[str, Message] = {}
    for packed in status.details:
        for cls in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
            if packed.Is(cls.DESCRIPTOR):
                message = cls()
                packed.Unpack(message)
                found[cls.__name__] = message
    return found


def violated_fields(error: grpc.aio.AioRpcError) -> set[str]:
    bad_request = rich_details(error)["BadRequest"]
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    return {v.field for v in bad_request.field_violations}


def error_reason(error: grpc.aio.AioRpcError) -> str:
    info = rich_details(error)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return str(info.reason)


class Ran(NamedTuple):
    """How a command that ran to its end ended."""

    status: int
    out: str
    err: str


async def run_to_end(command: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 60) -> Ran:
    """Runs `command` (e.g. script_command("orders", ...)) to its end without blocking the event loop,
    where the test's servers may run; `env` is its whole environment (None: this one's). Fails the
    test, after killing the command, if it has not ended within `timeout` seconds."""
    process = await asyncio.create_subprocess_exec(
        *command,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"{shlex.join(command)} did not end within {timeout:g} s")
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def require_tools(*tools: str, hint: str) -> None:
    """Skips the calling test when a command-line tool is missing, but fails it under CI (CI=true),
    where every check must run."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        reason = f"{' and '.join(missing)} not on PATH ({hint})"
        if in_ci():
            pytest.fail(f"{reason}; CI is set, so CI must provide it")
        pytest.skip(reason)


def round_trip_counting_redis(url: str) -> tuple[Redis, list[int]]:
    """A Redis client whose connections count their writes (one per command or pipeline sent, so one
    per round trip) in the returned list's only item; other users of the server do not disturb it.
    Closing the client closes its pool. On a Redis Cluster the test is skipped: a cluster client
    counts nothing of the kind (it has a pool per node), and what such a test counts is the same."""
    if is_cluster_url(url):
        pytest.skip("not on a Redis Cluster: counts the round trips of one Redis client's pool")
    sends = [0]

    class CountingConnection(Connection):
        async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
            sends[0] += 1
            await super().send_packed_command(command, check_health)

    pool = ConnectionPool.from_url(url, connection_class=CountingConnection, decode_responses=True)
    return Redis.from_pool(pool), sends


@contextlib.asynccontextmanager
async def held_transaction(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A transaction that took a transaction id and then sits idle, holding the xmin horizon back."""
    conn = await asyncpg.connect(url)
    transaction = conn.transaction()
    await transaction.start()
    await conn.fetchval("SELECT pg_current_xact_id()")
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            await transaction.rollback()
        await conn.close()
