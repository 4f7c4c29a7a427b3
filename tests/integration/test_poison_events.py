"""A projection that cannot apply an event stops at that event, says so, and resumes from it
once fixed; the other projections go on meanwhile."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orders.v1 import queries_pb2 as qry
from orders.views import SUMMARY_PROJECTION, CustomerSummaryView, OrderView
from read_service.projection_health import NOT_SERVING, PROJECTION_SERVICE, SERVING
from sync_worker import customer_summary
from sync_worker.lease import read_heartbeat
from tests.helpers import create_request, eventually
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
