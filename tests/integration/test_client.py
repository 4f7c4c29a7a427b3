"""OrdersClient against the real services: retries that apply a command once, sessions that
read their own writes, and errors that carry their rich details.

Lost responses come from a proxy that cuts the connection just before the server's answer
(tests/cutting_proxy.py): the server has applied the command, the client sees UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from orders.client import (
    NO_RETRIES,
    Aborted,
    BlockingOrdersClient,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OrdersClient,
    RetryPolicy,
    Unavailable,
    money,
)
from orders.v1 import queries_pb2, types_pb2
from tests.cutting_proxy import CuttingProxy
from tests.helpers import all_events, an_address
from tests.integration.conftest import System


@pytest.fixture
async def proxies(system: System) -> AsyncIterator[tuple[CuttingProxy, CuttingProxy]]:
    write, read = CuttingProxy(system.write_port), CuttingProxy(system.read_port)
    await write.start()
    await read.start()
    yield write, read
    await write.close()
    await read.close()


async def proxied_client(proxies: tuple[CuttingProxy, CuttingProxy], **options: object) -> OrdersClient:
    write, read = proxies
    return OrdersClient(f"127.0.0.1:{write.port}", f"127.0.0.1:{read.port}", **options)  # type: ignore[arg-type]


@pytest.fixture
async def client(system: System) -> AsyncIterator[OrdersClient]:
    async with OrdersClient(f"127.0.0.1:{system.write_port}", f"127.0.0.1:{system.read_port}") as client:
        yield client


async def events_of(system: System, order_id: str) -> list[str]:
    return [type(e.event).__name__ for e in await all_events(system.database_url) if e.stream_id == order_id]


async def test_a_command_whose_response_was_lost_is_retried_and_applied_once(
    system: System, proxies: tuple[CuttingProxy, CuttingProxy]
) -> None:
    """The server applies CreateOrder and AddItem, their responses are lost, the client retries
    with the same command id, gets the first result, and each command was appended once."""
    write_proxy, _ = proxies
    async with await proxied_client(proxies) as client:
        write_proxy.cut_responses(1)
        created = await client.create_order("cust-retry", "EUR")
        write_proxy.cut_responses(1)
        added = await client.add_item(created.order_id, "SKU-1", "Apple", 2, money(150, "EUR"))

    assert (write_proxy.cuts, write_proxy.calls) == (2, 4)
    assert (created.version, added.version) == (1, 2)
    assert await events_of(system, created.order_id) == ["OrderCreated", "ItemAdded"]
    request = queries_pb2.GetOrderRequest(order_id=created.order_id, consistency_token=added.consistency_token)
    reply = await system.queries.GetOrder(request)
    assert [(item.sku, item.quantity) for item in reply.order.items] == [("SKU-1", 2)]


async def test_without_retries_the_lost_response_is_an_error_although_the_command_was_applied(
    system: System, proxies: tuple[CuttingProxy, CuttingProxy]
) -> None:
    """The control for the test above: the cut really loses an applied command's response."""
    write_proxy, _ = proxies
    async with await proxied_client(proxies, retry=NO_RETRIES) as client:
        write_proxy.cut_responses(1)
        with pytest.raises(Unavailable):
            await client.create_order("cust-retry", "EUR", order_id="order-lost-response")

    assert write_proxy.calls == 1
    assert await events_of(system, "order-lost-response") == ["OrderCreated"]


async def test_a_query_whose_response_was_lost_is_retried(
    system: System, proxies: tuple[CuttingProxy, CuttingProxy]
) -> None:
    """Queries are read-only, so UNAVAILABLE on them is retried too."""
    _, read_proxy = proxies
    async with await proxied_client(proxies) as client:
        created = await client.create_order("cust-retry", "EUR")
        read_proxy.cut_responses(1)
        reply = await client.get_order(created.order_id, consistency_token=created.consistency_token)

    assert reply.order.order_id == created.order_id
    assert (read_proxy.cuts, read_proxy.calls) == (1, 2)


@pytest.mark.parametrize(("max_attempts", "expected_calls"), [(5, 5), (3, 3)])
async def test_retries_stop_after_the_policys_attempts(
    proxies: tuple[CuttingProxy, CuttingProxy], max_attempts: int, expected_calls: int
) -> None:
    """A service that keeps failing is tried max_attempts times, then UNAVAILABLE is raised."""
    write_proxy, _ = proxies
    policy = RetryPolicy(max_attempts=max_attempts, initial_backoff=0.01, max_backoff=0.05)
    async with await proxied_client(proxies, retry=policy) as client:
        write_proxy.cut_responses(100)
        with pytest.raises(Unavailable):
            await client.create_order("cust-retry", "EUR")

    assert write_proxy.calls == expected_calls


async def test_the_deadline_covers_every_attempt(proxies: tuple[CuttingProxy, CuttingProxy]) -> None:
    """With long backoffs, the call still ends at its deadline instead of after all attempts."""
    write_proxy, _ = proxies
    policy = RetryPolicy(max_attempts=5, initial_backoff=5, max_backoff=5)
    async with await proxied_client(proxies, retry=policy) as client:
        write_proxy.cut_responses(100)
        started = time.monotonic()
        with pytest.raises((Unavailable, DeadlineExceeded)):
            await client.create_order("cust-retry", "EUR", timeout=0.5)
        elapsed = time.monotonic() - started

    assert elapsed < 2.0


@pytest.mark.parametrize("case", ["invalid", "not_found", "precondition", "conflict"])
async def test_errors_that_a_retry_cannot_fix_are_not_retried(
    system: System, proxies: tuple[CuttingProxy, CuttingProxy], case: str
) -> None:
    """INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION and ABORTED reach the caller after one call."""
    write_proxy, _ = proxies
    async with await proxied_client(proxies) as client:
        created = await client.create_order("cust-errors", "EUR")
        refused = {
            "invalid": client.add_item(created.order_id, "SKU-1", "Apple", 0, money(1, "EUR")),
            "not_found": client.confirm_order("no-such-order"),
            "precondition": client.confirm_order(created.order_id),
            "conflict": client.cancel_order(created.order_id, expected_version=7),
        }
        calls_before = write_proxy.calls
        with pytest.raises((InvalidArgument, NotFound, FailedPrecondition, Aborted)):
            await refused.pop(case)
        for unused in refused.values():
            unused.close()

    assert write_proxy.calls - calls_before == 1


async def test_errors_carry_code_reason_field_violations_and_retry_delay(client: OrdersClient) -> None:
    """Each refused call raises the code's exception class with the google.rpc details decoded."""
    created = await client.create_order("cust-errors", "EUR")

    with pytest.raises(InvalidArgument) as invalid:
        await client.add_item(created.order_id, "SKU-1", "Apple", 0, money(-1, "EUR"))
    with pytest.raises(FailedPrecondition) as precondition:
        await client.confirm_order(created.order_id)
    with pytest.raises(Aborted) as conflict:
        await client.cancel_order(created.order_id, expected_version=3)
    with pytest.raises(NotFound) as not_found:
        await client.get_order("no-such-order")

    assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in invalid.value.field_violations} == {"quantity", "unit_price.minor_units"}
    assert (invalid.value.reason, invalid.value.domain) == ("INVALID_ARGUMENT", "orders.v1")
    assert precondition.value.reason == "ORDER_EMPTY"
    assert (conflict.value.reason, conflict.value.retry_delay) == ("VERSION_CONFLICT", 1.0)
    assert not_found.value.reason == "ORDER_NOT_FOUND"
    assert "ORDER_EMPTY" in str(precondition.value)


async def test_a_session_reads_its_own_writes_while_the_views_lag(system: System, client: OrdersClient) -> None:
    """With the sync worker stopped, a plain query misses a new order; the session's query waits
    for its command's token and answers once the worker has projected it."""
    await system.stop_worker()
    session = client.session()
    created = await session.create_order("cust-session", "EUR")
    with pytest.raises(NotFound):
        await client.get_order(created.order_id)

    async def start_worker_later() -> None:
        await asyncio.sleep(0.3)
        system.start_worker()

    starter = asyncio.create_task(start_worker_later())
    reply = await session.get_order(created.order_id)
    await starter

    assert session.consistency_token == created.consistency_token
    assert (reply.order.version, reply.consistency.stale) == (1, False)


async def test_a_session_query_says_stale_when_the_views_did_not_catch_up_in_time(
    system: System, client: OrdersClient
) -> None:
    """A session query whose wait ends first answers with the older view and consistency.stale."""
    session = client.session()
    created = await session.create_order("cust-session", "EUR")
    await session.get_order(created.order_id)
    await system.stop_worker()
    await session.add_item(created.order_id, "SKU-1", "Apple", 1, money(100, "EUR"))

    reply = await session.get_order(created.order_id, timeout=1.0)

    assert (reply.order.version, reply.consistency.stale) == (1, True)


async def test_a_session_keeps_the_newest_token_of_concurrent_commands(system: System, client: OrdersClient) -> None:
    """Commands finishing in any order leave the session at the newest token, so a later query
    sees all of them."""
    session = client.session()
    created = await asyncio.gather(*(session.create_order("cust-many", "EUR") for _ in range(10)))

    listing = await session.list_orders(customer_id="cust-many")

    assert listing.consistency.stale is False
    assert {order.order_id for order in listing.orders} == {result.order_id for result in created}


async def test_sessions_are_independent_and_share_the_connections(client: OrdersClient) -> None:
    """A session's token is its own; closing a session leaves the client usable."""
    first, second = client.session(), client.session()
    await first.create_order("cust-session", "EUR")

    await second.close()
    await first.close()
    created = await client.create_order("cust-session", "EUR")

    assert (bool(first.consistency_token), second.consistency_token, client.consistency_token) == (True, "", "")
    assert created.version == 1


async def test_every_rpc_has_a_typed_method(system: System, client: OrdersClient) -> None:
    """One order through every command and every query of the client."""
    session = client.session()
    created = await session.create_order("cust-every", "EUR", shipping_address=an_address())
    order_id = created.order_id
    await session.add_item(order_id, "A", "Apple", 3, money(120, "EUR"))
    await session.add_item(order_id, "P", "Pear", 1, money(90, "EUR"))
    await session.remove_item(order_id, "P")
    await session.change_shipping_address(order_id, an_address("Hamburg"))
    await session.confirm_order(order_id, expected_version=5)
    shipped = await session.ship_order(order_id, carrier="DHL", tracking_number="123")
    other = await session.create_order("cust-every", "EUR")
    await session.cancel_order(other.order_id, reason="twice")

    order = (await session.get_order(order_id)).order
    listed = [o.order_id async for o in session.iter_orders(customer_id="cust-every", page_size=1)]
    shipped_only = await session.list_orders(customer_id="cust-every", status=types_pb2.ORDER_STATUS_SHIPPED)
    summary = (await session.get_customer_summary("cust-every")).summary
    first_watched = await anext(aiter(session.watch_order(order_id, timeout=5)))
    customer_stream = session.watch_customer_orders("cust-every", timeout=5)
    first_customer = await anext(aiter(customer_stream))

    assert (order.status, order.version, order.total.minor_units) == (types_pb2.ORDER_STATUS_SHIPPED, 7, 360)
    assert order.shipping_address.city == "Hamburg"
    assert shipped.version == 7
    assert listed == [other.order_id, order_id]
    assert [o.order_id for o in shipped_only.orders] == [order_id]
    assert summary.order_count == 2
    assert first_watched.order.version == 7
    assert (first_customer.initial, len(first_customer.orders)) == (True, 2)


async def test_a_watch_streams_changes_and_ends_when_the_caller_stops_reading(client: OrdersClient) -> None:
    """The watch yields the order, then each new version; leaving the loop cancels the stream."""
    session = client.session()
    created = await session.create_order("cust-watch", "EUR")
    seen: list[int] = []
    async for message in session.watch_order(created.order_id, timeout=10):
        seen.append(message.order.version)
        if message.order.version == 1:
            await session.add_item(created.order_id, "SKU-1", "Apple", 1, money(100, "EUR"))
        else:
            break

    assert seen == [1, 2]


async def test_an_unreachable_service_raises_unavailable_within_the_deadline() -> None:
    """Nothing listens: the call fails with Unavailable, not a hang or a raw grpc error."""
    async with OrdersClient("127.0.0.1:1", "127.0.0.1:1", timeout=1.0) as client:
        started = time.monotonic()
        with pytest.raises((Unavailable, DeadlineExceeded)):
            await client.get_order("order-1")

    assert time.monotonic() - started < 3.0


async def test_the_blocking_client_does_the_same_from_plain_threads(system: System) -> None:
    """BlockingOrdersClient: commands, a session's read-your-writes, rich errors and a watch,
    called from threads without an event loop."""

    def scenario(customer_id: str) -> tuple[int, bool, str, list[int], int]:
        with BlockingOrdersClient(f"127.0.0.1:{system.write_port}", f"127.0.0.1:{system.read_port}") as client:
            session = client.session()
            created = session.create_order(customer_id, "EUR")
            session.add_item(created.order_id, "SKU-1", "Apple", 2, money(150, "EUR"))
            reply = session.get_order(created.order_id)
            try:
                session.confirm_order("no-such-order")
                reason = ""
            except NotFound as error:
                reason = error.reason
            versions = []
            for message in session.watch_order(created.order_id, timeout=5):
                versions.append(message.order.version)
                break
            listed = list(session.iter_orders(customer_id=customer_id, page_size=1))
        return reply.order.version, reply.consistency.stale, reason, versions, len(listed)

    results = await asyncio.gather(*(asyncio.to_thread(scenario, f"cust-blocking-{i}") for i in range(3)))

    assert results == [(2, False, "ORDER_NOT_FOUND", [2], 1)] * 3
