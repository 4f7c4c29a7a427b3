"""ListOrders page tokens through real gRPC: the read service pages with the tokens it signed, on any
replica that shares its key, and refuses hand-made ones (docs/errors.md#page-tokens)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest

from orders.v1 import queries_pb2 as qry
from orders.v1 import queries_pb2_grpc
from read_service.main import start_read_service
from read_service.page_tokens import NOT_OURS, TAG_BYTES
from tests.helpers import create_request, rich_details
from tests.integration.conftest import System

KEY = "a-configured-page-token-key-of-40-chars!"


@asynccontextmanager
async def replica(system: System, page_token_key: str = "") -> AsyncIterator[queries_pb2_grpc.OrderQueriesStub]:
    """Another read service on the system's Redis and prefix, and a client of it."""
    service = await start_read_service(system.redis, system.keys, "127.0.0.1:0", page_token_key=page_token_key)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.server.port}") as channel:
            yield queries_pb2_grpc.OrderQueriesStub(channel)
    finally:
        await service.stop(0)


async def orders_of(system: System, customer_id: str, count: int) -> tuple[list[str], str]:
    """`count` new orders of `customer_id`, newest first as ListOrders gives them, and the last one's token."""
    ids: list[str] = []
    token = ""
    for _ in range(count):
        result = (await system.commands.CreateOrder(create_request(customer_id), timeout=5)).result
        ids.insert(0, result.order_id)
        token = result.consistency_token
    return ids, token


def page_request(token: str = "", consistency_token: str = "") -> qry.ListOrdersRequest:
    return qry.ListOrdersRequest(customer_id="ada", page_size=2, page_token=token, consistency_token=consistency_token)


def page_token_violation(error: grpc.aio.AioRpcError) -> str:
    """The description of the call's page_token violation (the only violation)."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{error.code().name}: {error.details()}"
    [violation] = rich_details(error)["BadRequest"].field_violations  # type: ignore[attr-defined]
    assert violation.field == "page_token"
    return str(violation.description)


async def refusal(queries: queries_pb2_grpc.OrderQueriesStub, token: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await queries.ListOrders(page_request(token), timeout=5)
    return page_token_violation(caught.value)


async def test_real_tokens_page_through_every_order_once(system: System) -> None:
    """Following next_page_token lists each order once, newest first, and the last page has no token."""
    expected, consistency = await orders_of(system, "ada", 5)
    seen: list[str] = []
    page = await system.queries.ListOrders(page_request(consistency_token=consistency), timeout=5)
    seen += [order.order_id for order in page.orders]
    while page.next_page_token:
        page = await system.queries.ListOrders(page_request(page.next_page_token), timeout=5)
        seen += [order.order_id for order in page.orders]

    assert seen == expected


async def test_a_hand_made_token_of_the_right_shape_is_refused(system: System) -> None:
    """A real token's cursor without its signature (the shape tokens had before they were signed, which
    anyone can make for any position) is INVALID_ARGUMENT on page_token, and so is a flipped tag."""
    _, consistency = await orders_of(system, "ada", 3)
    first = await system.queries.ListOrders(page_request(consistency_token=consistency), timeout=5)
    raw = base64.urlsafe_b64decode(first.next_page_token + "=" * (-len(first.next_page_token) % 4))
    unsigned = base64.urlsafe_b64encode(raw[:-TAG_BYTES]).decode().rstrip("=")
    flipped = base64.urlsafe_b64encode(raw[:-1] + bytes([raw[-1] ^ 1])).decode().rstrip("=")

    assert await refusal(system.queries, unsigned) == NOT_OURS
    assert await refusal(system.queries, flipped) == NOT_OURS
    second = await system.queries.ListOrders(page_request(first.next_page_token), timeout=5)
    assert len(second.orders) == 1


async def test_replicas_on_one_redis_accept_each_others_tokens(system: System) -> None:
    """Two more read services on the same Redis and prefix, with no key configured, share the key
    kept there: each page's request may go to another replica."""
    expected, consistency = await orders_of(system, "ada", 5)
    async with replica(system) as second, replica(system) as third:
        page1 = await system.queries.ListOrders(page_request(consistency_token=consistency), timeout=5)
        page2 = await second.ListOrders(page_request(page1.next_page_token), timeout=5)
        page3 = await third.ListOrders(page_request(page2.next_page_token), timeout=5)
        again = await system.queries.ListOrders(page_request(page2.next_page_token), timeout=5)

    seen = [order.order_id for page in (page1, page2, page3) for order in page.orders]
    assert seen == expected
    assert page3.next_page_token == ""
    assert again == page3


async def test_a_replica_after_a_flush_refuses_older_tokens(system: System) -> None:
    """A replica started after the stored key was lost (a flush) makes a new one, and refuses the
    tokens signed under the old key: the client lists again from the first page."""
    _, consistency = await orders_of(system, "ada", 3)
    old = await system.queries.ListOrders(page_request(consistency_token=consistency), timeout=5)
    await system.redis.delete(system.keys.page_token_key)

    async with replica(system) as fresh:
        assert await refusal(fresh, old.next_page_token) == NOT_OURS
        first = await fresh.ListOrders(page_request(), timeout=5)
        second = await fresh.ListOrders(page_request(first.next_page_token), timeout=5)

    assert len(first.orders) == 2
    assert len(second.orders) == 1


async def test_replicas_with_the_configured_key_share_it_and_others_refuse(system: System) -> None:
    """With ORDERS_PAGE_TOKEN_KEY, replicas sign with it: one with the same key takes the tokens, one
    under the key in Redis (or another configured key) refuses them."""
    _, consistency = await orders_of(system, "ada", 3)
    async with replica(system, KEY) as first, replica(system, KEY) as same:
        page1 = await first.ListOrders(page_request(consistency_token=consistency), timeout=5)
        page2 = await same.ListOrders(page_request(page1.next_page_token), timeout=5)

        assert len(page2.orders) == 1
        assert await refusal(system.queries, page1.next_page_token) == NOT_OURS
