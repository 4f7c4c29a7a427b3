"""OrderQueries: reads, filters, paging, read-your-writes and its bounds."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from orders.v1 import commands_pb2 as cmd
from orders.v1 import queries_pb2 as qry
from orders.v1 import types_pb2
from tests.helpers import (
    add_item_request,
    assert_views_match_events,
    create_request,
    error_reason,
    eventually,
    violated_fields,
)
from tests.integration.conftest import System


async def create(system: System, customer: str, confirm: bool = False) -> cmd.CommandResult:
    result: cmd.CommandResult = (await system.commands.CreateOrder(create_request(customer))).result
    if confirm:
        await system.commands.AddItem(add_item_request(result.order_id))
        result = (await system.commands.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=result.order_id))).result
    return result


async def list_all(system: System, page_size: int, **filters: Any) -> list[types_pb2.Order]:
    """Every page of a listing, following next_page_token."""
    orders: list[types_pb2.Order] = []
    token = ""
    while True:
        page = await system.queries.ListOrders(qry.ListOrdersRequest(page_size=page_size, page_token=token, **filters))
        orders.extend(page.orders)
        token = page.next_page_token
        if not token:
            return orders


async def test_unknown_order_is_not_found(system: System) -> None:
    """GetOrder of an order that never existed fails with NOT_FOUND."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await system.queries.GetOrder(qry.GetOrderRequest(order_id="never-created"))

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (qry.ListOrdersRequest(page_size=501), "page_size"),
        (qry.ListOrdersRequest(page_size=-1), "page_size"),
        (qry.ListOrdersRequest(customer_id="bad id"), "customer_id"),
        (qry.ListOrdersRequest(status=99), "status"),  # type: ignore[arg-type]
        (qry.ListOrdersRequest(page_token="garbage!"), "page_token"),
        (qry.ListOrdersRequest(consistency_token="12"), "consistency_token"),
    ],
)
async def test_malformed_queries_are_invalid(system: System, request_: qry.ListOrdersRequest, field: str) -> None:
    """Malformed query input gets INVALID_ARGUMENT naming the field."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await system.queries.ListOrders(request_)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == {field}


async def test_listing_pages_newest_first_with_filters(system: System) -> None:
    """ListOrders pages through exactly the matching orders, newest first, without repeats."""
    alice = [await create(system, "alice", confirm=i % 2 == 0) for i in range(7)]
    bob = [await create(system, "bob") for _ in range(3)]
    last = await create(system, "carol")
    await system.queries.GetOrder(qry.GetOrderRequest(order_id=last.order_id, consistency_token=last.consistency_token))

    everything = await list_all(system, page_size=4)
    alices = await list_all(system, page_size=3, customer_id="alice")
    confirmed = await list_all(system, page_size=2, status=types_pb2.ORDER_STATUS_CONFIRMED)
    alice_pending = await list_all(system, page_size=50, customer_id="alice", status=types_pb2.ORDER_STATUS_PENDING)

    newest_first = [r.order_id for r in reversed([*alice, *bob, last])]
    assert [o.order_id for o in everything] == newest_first
    assert [o.order_id for o in alices] == [r.order_id for r in reversed(alice)]
    assert [o.order_id for o in confirmed] == [r.order_id for i, r in reversed(list(enumerate(alice))) if i % 2 == 0]
    assert [o.order_id for o in alice_pending] == [r.order_id for i, r in reversed(list(enumerate(alice))) if i % 2]


async def test_status_change_moves_order_between_indexes(system: System) -> None:
    """A confirmed order leaves the PENDING listing and appears in the CONFIRMED one."""
    result = await create(system, "dave", confirm=True)
    token = result.consistency_token

    pending = await system.queries.ListOrders(
        qry.ListOrdersRequest(status=types_pb2.ORDER_STATUS_PENDING, consistency_token=token)
    )
    confirmed = await system.queries.ListOrders(
        qry.ListOrdersRequest(status=types_pb2.ORDER_STATUS_CONFIRMED, consistency_token=token)
    )

    assert [o.order_id for o in pending.orders] == []
    assert [o.order_id for o in confirmed.orders] == [result.order_id]


async def test_page_token_is_bound_to_its_filters(system: System) -> None:
    """A page token used with other filters is refused instead of returning a wrong page."""
    for _ in range(3):
        await create(system, "erin")
    last = await create(system, "erin")
    first_page = await system.queries.ListOrders(
        qry.ListOrdersRequest(customer_id="erin", page_size=2, consistency_token=last.consistency_token)
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await system.queries.ListOrders(
            qry.ListOrdersRequest(customer_id="frank", page_token=first_page.next_page_token)
        )

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_query_waits_for_its_token_and_is_woken_by_the_worker(system: System) -> None:
    """A query with a token waits while the views lag, and answers as soon as the worker catches up."""
    created = await create(system, "gina")
    await system.queries.GetOrder(
        qry.GetOrderRequest(order_id=created.order_id, consistency_token=created.consistency_token)
    )
    await system.stop_worker()
    added = (await system.commands.AddItem(add_item_request(created.order_id))).result

    query = asyncio.ensure_future(
        system.queries.GetOrder(
            qry.GetOrderRequest(order_id=created.order_id, consistency_token=added.consistency_token)
        )
    )
    await asyncio.sleep(0.3)
    assert not query.done()
    started = time.monotonic()
    system.start_worker(poll_interval=10)
    reply = await query
    woke_after = time.monotonic() - started

    assert reply.order.version == 2
    assert reply.consistency.stale is False
    assert woke_after < 0.5, f"woken {woke_after:.3f}s after the worker started: not pushed"


async def test_query_that_gives_up_waiting_says_it_is_stale(system: System) -> None:
    """When the views do not reach the token before the deadline, the answer is marked stale."""
    created = await create(system, "hank")
    await system.queries.GetOrder(
        qry.GetOrderRequest(order_id=created.order_id, consistency_token=created.consistency_token)
    )
    await system.stop_worker()
    added = (await system.commands.AddItem(add_item_request(created.order_id))).result

    started = time.monotonic()
    reply = await system.queries.GetOrder(
        qry.GetOrderRequest(order_id=created.order_id, consistency_token=added.consistency_token), timeout=0.5
    )

    assert time.monotonic() - started < 0.5
    assert reply.consistency.stale is True
    assert reply.order.version == 1
    assert reply.consistency.view_token == created.consistency_token


async def test_unseen_order_with_token_is_unavailable_not_missing(system: System) -> None:
    """An order the views have not reached yet is UNAVAILABLE (retryable), never NOT_FOUND."""
    await system.stop_worker()
    created = await create(system, "ivy")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await system.queries.GetOrder(
            qry.GetOrderRequest(order_id=created.order_id, consistency_token=created.consistency_token), timeout=0.3
        )

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(caught.value) == "VIEWS_NOT_READY"


async def test_waits_are_bounded_by_the_configured_maximum(system: System) -> None:
    """Without a client deadline a query waits at most the server's maximum (5 s in tests)."""
    created = await create(system, "jack")
    await system.queries.GetOrder(
        qry.GetOrderRequest(order_id=created.order_id, consistency_token=created.consistency_token)
    )
    await system.stop_worker()
    added = (await system.commands.AddItem(add_item_request(created.order_id))).result

    started = time.monotonic()
    reply = await system.queries.GetOrder(
        qry.GetOrderRequest(order_id=created.order_id, consistency_token=added.consistency_token)
    )

    assert 4.5 < time.monotonic() - started < 6.5
    assert reply.consistency.stale is True


async def test_flushed_views_are_rebuilt_by_themselves(system: System) -> None:
    """After Redis loses every view and the checkpoint, the worker replays the log from the start."""
    results = [await create(system, "kim", confirm=True) for _ in range(5)]
    await system.queries.GetOrder(
        qry.GetOrderRequest(order_id=results[-1].order_id, consistency_token=results[-1].consistency_token)
    )
    async for key in system.redis.scan_iter(match=f"{system.keys.prefix}*"):
        await system.redis.delete(key)

    async def rebuilt() -> None:
        assert await system.redis.get(system.keys.checkpoint) == results[-1].consistency_token
        await assert_views_match_events(system.database_url, system.redis, system.keys)

    await eventually(rebuilt)
    listing = await system.queries.ListOrders(qry.ListOrdersRequest(customer_id="kim"))
    assert len(listing.orders) == 5


async def test_empty_views_answer_unavailable(system: System) -> None:
    """While the views hold no checkpoint at all (being rebuilt), queries answer UNAVAILABLE."""
    await system.stop_worker()
    await system.redis.delete(system.keys.checkpoint)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await system.queries.GetOrder(qry.GetOrderRequest(order_id="anything"))

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
