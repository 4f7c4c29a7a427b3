"""A projection that cannot apply an event stops at that event, says so, and resumes from it
once fixed; the other projections go on meanwhile."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orders.domain.events import RecordedEvent
from orders.store.event_store import connect
from orders.store.heartbeat import read_heartbeat
from orders.store.views import SUMMARY_PROJECTION, CustomerSummaryView, OrderView
from orders.tools.processes import script_command
from orders.v1 import admin_pb2, admin_pb2_grpc
from orders.v1 import queries_pb2 as qry
from read_service.projection_health import NOT_SERVING, PROJECTION_SERVICE, SERVING
from sync_worker import customer_summary, projection, projector
from sync_worker.main import start_admin
from tests.helpers import add_item_request, create_request, eventually, run_to_end
from tests.integration.conftest import System


async def projection_health(system: System, name: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{system.read_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=f"{PROJECTION_SERVICE}.{name}"), timeout=2
        )
    return int(reply.status)


async def test_a_failing_projection_stops_alone_and_resumes_from_the_same_event(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the summary projection on one order's event: that projection stops there and reports
    it (heartbeat, health, log); the order views go on; after the fix it resumes and applies the event once."""
    await system.stop_worker()
    system.start_worker(retry_failed_after=0.5)
    real_summarize = customer_summary.summarize

    def buggy(summary: CustomerSummaryView, before: OrderView | None, after: OrderView) -> CustomerSummaryView:
        if after.order_id == "poison":
            raise RuntimeError("bug in the summary projection")
        return real_summarize(summary, before, after)

    async def all_serving() -> None:
        for name in ("orders", SUMMARY_PROJECTION):
            assert await projection_health(system, name) == SERVING

    await eventually(all_serving, timeout=10)
    monkeypatch.setattr(customer_summary, "summarize", buggy)
    poisoned = (await system.commands.CreateOrder(create_request("pat", order_id="poison"))).result
    later = (await system.commands.CreateOrder(create_request("quinn", order_id="later"))).result
    summary_keys = system.keys.of(SUMMARY_PROJECTION)

    order_view = await system.queries.GetOrder(
        qry.GetOrderRequest(order_id="later", consistency_token=later.consistency_token)
    )

    async def reported() -> dict[str, Any]:
        beat, _ = await read_heartbeat(system.redis, summary_keys)
        assert beat is not None
        assert beat["state"] == "failed"
        assert await projection_health(system, SUMMARY_PROJECTION) == NOT_SERVING
        return beat

    beat = await eventually(reported, timeout=10)
    assert await projection_health(system, "orders") == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as stuck:
        await system.queries.GetCustomerSummary(
            qry.GetCustomerSummaryRequest(customer_id="quinn", consistency_token=later.consistency_token), timeout=0.5
        )

    monkeypatch.setattr(customer_summary, "summarize", real_summarize)  # the fix is deployed
    fixed = await system.queries.GetCustomerSummary(
        qry.GetCustomerSummaryRequest(customer_id="pat", consistency_token=later.consistency_token), timeout=10
    )

    assert order_view.consistency.stale is False
    assert beat["failed_position"] == poisoned.position
    assert "bug in the summary projection" in beat["error"]
    assert stuck.value.code() == grpc.StatusCode.UNAVAILABLE
    assert fixed.summary.order_count == 1
    assert int(await system.redis.get(summary_keys.applied) or 0) == 2  # both events, each once


async def test_an_unreadable_stored_event_stops_the_projection_at_its_position(system: System) -> None:
    """A stored row this code cannot decode is never skipped: the projections stop right before it."""
    before = (await system.commands.CreateOrder(create_request(order_id="fine"))).result
    await system.queries.GetOrder(qry.GetOrderRequest(order_id="fine", consistency_token=before.consistency_token))
    position = await system.pool.fetchval(
        "INSERT INTO events (stream_id, version, event_type, schema_version, payload)"
        " VALUES ('fine', 2, 'ItemAdded', 1, $1::jsonb) RETURNING position",
        json.dumps({"sku": "A"}),  # fields missing
    )
    await system.pool.execute("SELECT pg_notify('orders_events', '')")

    async def stopped() -> None:
        beat, _ = await read_heartbeat(system.redis, system.keys)
        assert beat is not None
        assert (beat["state"], beat["failed_position"]) == ("failed", position)

    await eventually(stopped, timeout=10)
    assert await system.redis.get(system.keys.checkpoint) == before.consistency_token


async def test_parking_sets_one_order_aside_and_a_retry_releases_it_in_order(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the park policy, the failing order's events (that one and later ones) wait in a dead-letter
    list while other orders go on; after the fix, a retry applies them in order and releases them."""
    await system.stop_worker()
    system.start_worker(poison_policy="park")
    real_summarize = customer_summary.summarize

    def buggy(summary: CustomerSummaryView, before: OrderView | None, after: OrderView) -> CustomerSummaryView:
        if after.order_id == "poison":
            raise RuntimeError("bug in the summary projection")
        return real_summarize(summary, before, after)

    monkeypatch.setattr(customer_summary, "summarize", buggy)
    await system.commands.CreateOrder(create_request("pat", order_id="poison"))
    later_same = (await system.commands.AddItem(add_item_request("poison"))).result
    other = (await system.commands.CreateOrder(create_request("quinn", order_id="other"))).result
    pool = await connect(system.database_url, max_size=2)
    server = await start_admin("127.0.0.1:0", pool, system.redis, system.keys.prefix)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    admin = admin_pb2_grpc.ProjectionAdminStub(channel)
    try:
        going_on = await system.queries.GetCustomerSummary(
            qry.GetCustomerSummaryRequest(customer_id="quinn", consistency_token=other.consistency_token)
        )

        async def parked() -> admin_pb2.ParkedOrder:
            reply = await admin.ListParkedOrders(admin_pb2.ListParkedOrdersRequest(name=SUMMARY_PROJECTION))
            assert [o.order_id for o in reply.orders] == ["poison"]
            assert len(reply.orders[0].positions) == 2
            order: admin_pb2.ParkedOrder = reply.orders[0]
            return order

        parked_order = await eventually(parked)
        monkeypatch.setattr(customer_summary, "summarize", real_summarize)  # the fix
        cli = ("--admin-address", f"127.0.0.1:{server.port}")
        listed = await admin_cli(*cli, "parked", SUMMARY_PROJECTION)
        retried = await admin_cli(*cli, "retry", SUMMARY_PROJECTION, "poison")

        async def released() -> None:
            reply = await admin.ListParkedOrders(admin_pb2.ListParkedOrdersRequest(name=SUMMARY_PROJECTION))
            assert list(reply.orders) == []

        await eventually(released)
        healed = await system.queries.GetCustomerSummary(qry.GetCustomerSummaryRequest(customer_id="pat"))
    finally:
        await channel.close()
        await server.stop(0)
        await pool.close()

    assert going_on.consistency.stale is False
    assert going_on.summary.order_count == 1
    assert listed.startswith("poison  positions ")
    assert "queued" in retried
    assert parked_order.positions[-1] == later_same.position
    assert "bug in the summary projection" in parked_order.error
    assert healed.summary.order_count == 1
    assert [(m.currency_code, m.minor_units) for m in healed.summary.lifetime_spend] == []  # pending: no spend
    assert int(await system.redis.get(system.keys.of(SUMMARY_PROJECTION).applied) or 0) == 3


async def admin_cli(*argv: str) -> str:
    """What `orders-admin ARGV...` prints; it must succeed."""
    ran = await run_to_end(script_command("orders-admin", *argv))
    assert ran.status == 0, ran.err
    return ran.out


async def test_a_parked_order_reads_as_stale_until_released(system: System, monkeypatch: pytest.MonkeyPatch) -> None:
    """While an order's events are parked in the order views, GetOrder serves its last good view and
    says it is stale, even though the checkpoint passed the caller's token; other orders read fresh."""
    await system.stop_worker()
    system.start_worker(poison_policy="park", projections=("orders",))
    real_project = projection.project

    def buggy(view: OrderView | None, recorded: RecordedEvent) -> OrderView:
        if recorded.stream_id == "stuck" and recorded.version == 2:
            raise RuntimeError("bug in the order projection")
        return real_project(view, recorded)

    monkeypatch.setattr(projector, "project", buggy)
    await system.commands.CreateOrder(create_request("sam", order_id="stuck"))
    added = (await system.commands.AddItem(add_item_request("stuck"))).result
    other = (await system.commands.CreateOrder(create_request("sam", order_id="fine-too"))).result

    stuck = await system.queries.GetOrder(
        qry.GetOrderRequest(order_id="stuck", consistency_token=added.consistency_token)
    )
    fine = await system.queries.GetOrder(
        qry.GetOrderRequest(order_id="fine-too", consistency_token=other.consistency_token)
    )

    assert (stuck.order.version, stuck.consistency.stale) == (1, True)
    assert fine.consistency.stale is False
