"""Write-service replicas on one event store: each keeps a cache of order states, and a cache
that another replica has left behind costs a round trip, never a wrong answer.

Each test runs a second write service (its own pool, its own cache) beside the system's, both
reached through real gRPC channels, and makes one replica's cache stale through the other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from asyncpg.connection import LoggedQuery

from orders.store.event_store import connect
from orders.v1 import commands_pb2 as cmd
from orders.v1 import commands_pb2_grpc
from tests.helpers import add_item_request, an_address, create_request, error_reason
from tests.integration.conftest import System
from write_service.main import start_write_service

Commands = commands_pb2_grpc.OrderCommandsStub


@pytest.fixture
async def other(system: System) -> AsyncIterator[Commands]:
    """A second write service on the same database, with a cache of its own."""
    pool = await connect(system.database_url, max_size=4)
    server = await start_write_service(pool, "127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Commands(channel)
    finally:
        await channel.close()
        await server.stop(0)
        await pool.close()


async def versions(system: System, order_id: str) -> list[tuple[int, str]]:
    rows = await system.pool.fetch(
        "SELECT version, event_type FROM events WHERE stream_id = $1 ORDER BY version", order_id
    )
    return [(r["version"], r["event_type"]) for r in rows]


async def test_a_refusal_decided_on_a_stale_cache_is_decided_again(system: System, other: Commands) -> None:
    """Replica A caches an empty order; B adds an item; A is asked to confirm. A's cache says
    ORDER_EMPTY, the store says otherwise: the order is confirmed."""
    a = system.commands
    order_id = (await a.CreateOrder(create_request())).result.order_id
    await other.AddItem(add_item_request(order_id))

    confirmed = await a.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=order_id))

    assert confirmed.result.version == 3
    assert await versions(system, order_id) == [(1, "OrderCreated"), (2, "ItemAdded"), (3, "OrderConfirmed")]


async def test_an_append_on_a_stale_version_conflicts_and_is_decided_again(system: System, other: Commands) -> None:
    """A's cache holds version 2; B appends version 3; A's next item lands at version 4, on top."""
    a = system.commands
    order_id = (await a.CreateOrder(create_request())).result.order_id
    await a.AddItem(add_item_request(order_id, "S1"))
    await other.AddItem(add_item_request(order_id, "S2"))

    added = await a.AddItem(add_item_request(order_id, "S1", quantity=2))

    assert added.result.version == 4
    assert [v for v, _ in await versions(system, order_id)] == [1, 2, 3, 4]


async def test_a_stale_cache_still_refuses_what_the_store_refuses(system: System, other: Commands) -> None:
    """B ships the order A cached as PENDING: A refuses a new item with the store's reason."""
    a = system.commands
    order_id = (await a.CreateOrder(create_request(shipping_address=an_address()))).result.order_id
    await a.AddItem(add_item_request(order_id))
    await other.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=order_id))

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await a.AddItem(add_item_request(order_id, "LATE"))

    assert (refused.value.code(), error_reason(refused.value)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ORDER_NOT_PENDING",
    )
    assert len(await versions(system, order_id)) == 3


async def test_expected_version_is_checked_against_the_store_not_the_cache(system: System, other: Commands) -> None:
    """A caches version 1; B makes it 2; a command on A expecting version 2 applies."""
    a = system.commands
    order_id = (await a.CreateOrder(create_request())).result.order_id
    await other.AddItem(add_item_request(order_id))

    request = add_item_request(order_id, "S2")
    request.expected_version = 2
    added = await a.AddItem(request)

    assert added.result.version == 3


async def test_a_retry_refused_by_the_newer_state_returns_its_earlier_result(system: System) -> None:
    """A command retried after later commands moved the order on (the item can no longer be
    added: the order is confirmed) gets its first result, not a refusal, and appends nothing."""
    a = system.commands
    order_id = (await a.CreateOrder(create_request())).result.order_id
    request = add_item_request(order_id)
    request.command_id = "add-then-retry-later"
    first = await a.AddItem(request)
    await a.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=order_id))

    again = await a.AddItem(request)

    assert again.result == first.result
    assert len(await versions(system, order_id)) == 3


async def test_creating_an_existing_order_on_a_replica_that_never_saw_it(system: System, other: Commands) -> None:
    """B's cache has never seen the order, so B assumes a new one: version 1's unique key says
    otherwise, and B answers ALREADY_EXISTS without appending."""
    order_id = (await system.commands.CreateOrder(create_request(order_id="known-elsewhere"))).result.order_id

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await other.CreateOrder(create_request(order_id=order_id))

    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await versions(system, order_id) == [(1, "OrderCreated")]


async def statements_of(
    system: System, action: Callable[[Commands], Awaitable[object]], state_cache_size: int = 10_000
) -> list[str]:
    """The SQL statements a write service with a one-connection pool sends while `action` runs."""
    pool = await connect(system.database_url, min_size=1, max_size=1)
    server = await start_write_service(pool, "127.0.0.1:0", state_cache_size=state_cache_size)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    sent: list[str] = []

    def log(query: LoggedQuery) -> None:
        sent.append(query.query)

    try:
        commands = Commands(channel)
        await commands.CreateOrder(create_request(order_id="warm-up"))  # type introspection happens once
        async with pool.acquire() as conn:
            conn.add_query_logger(log)
        await action(commands)
    finally:
        await channel.close()
        await server.stop(0)
        await pool.close()
    return sent


async def lifecycle(commands: Commands) -> None:
    order_id = (await commands.CreateOrder(create_request(shipping_address=an_address()))).result.order_id
    await commands.AddItem(add_item_request(order_id))
    await commands.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=order_id))


async def test_the_common_path_is_one_statement_per_command(system: System) -> None:
    """A create, then commands on the order this replica knows: one statement each (the append)."""
    sent = await statements_of(system, lifecycle)

    assert len(sent) == 3, sent
    assert all("INSERT INTO events" in statement for statement in sent)


async def test_without_a_cache_every_command_on_an_order_reads_it_first(system: System) -> None:
    """ORDERS_STATE_CACHE_SIZE=0: the create still assumes a new order; the others read, then append."""
    sent = await statements_of(system, lifecycle, state_cache_size=0)

    kinds = ["INSERT" if "INSERT INTO events" in statement else "SELECT" for statement in sent]
    assert kinds == ["INSERT", "SELECT", "INSERT", "SELECT", "INSERT"]


async def test_an_order_this_replica_never_saw_is_read_once(system: System) -> None:
    order_id = (await system.commands.CreateOrder(create_request())).result.order_id

    sent = await statements_of(system, lambda commands: commands.AddItem(add_item_request(order_id)))

    assert len(sent) == 2, sent
    assert "FROM events WHERE stream_id" in sent[0]
    assert "INSERT INTO events" in sent[1]
