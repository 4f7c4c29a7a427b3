"""Prometheus metrics and the ops endpoint: the whole system in this process, driven over real gRPC,
and /metrics, /livez and /readyz scraped over real HTTP.

Every process of the system shares this test process's default registry, and earlier tests have
moved the counters too, so each test compares a scrape after its load with one before it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from orders.server.ops_server import OpsServer, start_ops_server
from orders.server.readiness import Readiness
from orders.v1 import queries_pb2 as qry
from read_service.main import start_read_service
from tests.helpers import add_item_request, create_request, eventually
from tests.integration.conftest import System

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
COMMANDS = "orders.v1.OrderCommands"
QUERIES = "orders.v1.OrderQueries"


@dataclass
class Ops:
    server: OpsServer
    readiness: Readiness
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def get(self, path: str) -> tuple[int, str, str]:
        """Status, body and content type of a GET."""
        async with self.http.get(self.url + path) as response:
            return response.status, await response.text(), response.headers["Content-Type"]

    async def scrape(self) -> Samples:
        status, text, _ = await self.get("/metrics")
        assert status == 200
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


@pytest.fixture
async def ops() -> AsyncIterator[Ops]:
    readiness = Readiness()
    server = await start_ops_server("127.0.0.1:0", readiness)
    async with aiohttp.ClientSession() as http:
        yield Ops(server, readiness, http)
    await server.stop()


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_load_moves_each_metric_by_what_happened(system: System, ops: Ops) -> None:
    """50 accepted commands, 10 queries, one invalid command and one watch: the RPC counters, the command
    and event counters and the projection's applied counter each move by exactly that much, the error is
    counted with its real status code, the histograms count every call, and nothing stays in flight."""
    before = await ops.scrape()
    results = [(await system.commands.CreateOrder(create_request("metrics-customer"))).result for _ in range(50)]
    for result in results[:10]:
        await system.queries.GetOrder(
            qry.GetOrderRequest(order_id=result.order_id, consistency_token=result.consistency_token), timeout=10
        )
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await system.commands.AddItem(add_item_request(results[0].order_id, quantity=0), timeout=10)
    watch = system.queries.WatchOrder(qry.WatchOrderRequest(order_id=results[0].order_id), timeout=1)
    watched = [message async for message in watch]
    last_token = results[-1].consistency_token

    async def caught_up() -> None:
        assert await system.redis.get(system.keys.checkpoint) == last_token

    await eventually(caught_up)

    async def settled() -> Samples:
        samples = await ops.scrape()
        for projection in ("orders", "customer_summary"):
            applied = moved(before, samples, "orders_projection_events_applied_total", projection=projection)
            assert applied == 50
        return samples

    after = await eventually(settled)

    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(watched) == 1
    assert await watch.code() == grpc.StatusCode.OK
    handled = "orders_grpc_server_handled_total"
    assert moved(before, after, handled, grpc_service=COMMANDS, grpc_method="CreateOrder", grpc_code="OK") == 50
    assert (
        moved(before, after, handled, grpc_service=COMMANDS, grpc_method="AddItem", grpc_code="INVALID_ARGUMENT") == 1
    )
    assert moved(before, after, handled, grpc_service=QUERIES, grpc_method="GetOrder", grpc_code="OK") == 10
    assert moved(before, after, handled, grpc_service=QUERIES, grpc_method="WatchOrder", grpc_code="OK") == 1
    seconds = "orders_grpc_server_handling_seconds_count"
    assert moved(before, after, seconds, grpc_service=COMMANDS, grpc_method="CreateOrder") == 50
    assert moved(before, after, seconds, grpc_service=COMMANDS, grpc_method="AddItem") == 1
    assert moved(before, after, seconds, grpc_service=QUERIES, grpc_method="GetOrder") == 10
    assert moved(before, after, "orders_commands_total", command="CreateOrder", outcome="accepted") == 50
    assert moved(before, after, "orders_commands_total", command="AddItem", outcome="invalid") == 1
    assert moved(before, after, "orders_events_appended_total", event_type="OrderCreated") == 50
    assert moved(before, after, "orders_projection_batch_size_sum", projection="orders") == 50
    assert moved(before, after, "orders_projection_batch_size_count", projection="orders") >= 1
    in_flight = {key: v for key, v in after.items() if key[0] == "orders_grpc_server_in_flight" and v != 0}
    assert in_flight == {}
    assert value(after, "orders_projection_lag_events", projection="orders") == 0
    assert value(after, "orders_projection_state", projection="orders", state="active") == 1
    assert value(after, "orders_projection_state", projection="orders", state="failed") == 0


async def test_a_repeated_command_is_counted_as_repeated_and_appends_nothing(system: System, ops: Ops) -> None:
    """A retry with the same command id answers the stored result: one accepted command, one repeated,
    one event appended."""
    before = await ops.scrape()
    request = create_request("metrics-repeat", command_id="metrics-repeat-1")

    first = await system.commands.CreateOrder(request, timeout=10)
    again = await system.commands.CreateOrder(request, timeout=10)
    after = await ops.scrape()

    assert again.result == first.result
    assert moved(before, after, "orders_commands_total", command="CreateOrder", outcome="accepted") == 1
    assert moved(before, after, "orders_commands_total", command="CreateOrder", outcome="repeated") == 1
    assert moved(before, after, "orders_events_appended_total", event_type="OrderCreated") == 1


async def test_a_stream_the_client_cancels_is_counted_cancelled_and_leaves_flight(system: System, ops: Ops) -> None:
    """A watch stream cancelled by its client ends as CANCELLED in the counter, and the in-flight gauge
    goes up while it is open and back down after."""
    order = (await system.commands.CreateOrder(create_request("metrics-watch"))).result
    before = await ops.scrape()
    labels = {"grpc_service": QUERIES, "grpc_method": "WatchOrder"}

    watch = system.queries.WatchOrder(
        qry.WatchOrderRequest(order_id=order.order_id, consistency_token=order.consistency_token)
    )
    await watch.read()
    during = await ops.scrape()
    watch.cancel()

    async def ended() -> Samples:
        samples = await ops.scrape()
        assert moved(before, samples, "orders_grpc_server_handled_total", **labels, grpc_code="CANCELLED") == 1
        return samples

    after = await eventually(ended)

    assert moved(before, during, "orders_grpc_server_in_flight", **labels) == 1
    assert moved(before, after, "orders_grpc_server_in_flight", **labels) == 0


async def test_readyz_follows_readiness_and_livez_stays_up(system: System, ops: Ops) -> None:
    """/readyz answers 503 with the reason on one line while a check reports a problem, 200 once it is
    gone, and 503 "shutting down" for good after that; gRPC health "" and the service follow the same
    readiness while `liveness` stays SERVING; /livez is 200 throughout."""
    service = await start_read_service(system.redis, system.keys, "127.0.0.1:0", readiness=ops.readiness)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.server.port}")
    health = health_pb2_grpc.HealthStub(channel)

    async def grpc_health() -> dict[str, str]:
        statuses = {}
        for name in ("", QUERIES, "liveness"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            statuses[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return statuses

    try:
        ready = (await ops.get("/readyz"))[:2], await grpc_health(), (await ops.get("/livez"))[:2]
        await ops.readiness.set("postgres", "PostgreSQL unreachable: ConnectionRefusedError: [Errno 111]\nrefused")
        not_ready = (await ops.get("/readyz"))[:2], await grpc_health(), (await ops.get("/livez"))[:2]
        await ops.readiness.set("postgres", "")
        ready_again = (await ops.get("/readyz"))[:2], await grpc_health()
        ops.readiness.stopping()
        stopping = (await ops.get("/readyz"))[:2]
        missing = (await ops.get("/nothing"))[0]
    finally:
        await channel.close()
        await service.stop(0)

    serving = {"": "SERVING", QUERIES: "SERVING", "liveness": "SERVING"}
    assert ready == ((200, "ready\n"), serving, (200, "live\n"))
    assert not_ready == (
        (503, "not ready: PostgreSQL unreachable: ConnectionRefusedError: [Errno 111] refused\n"),
        {"": "NOT_SERVING", QUERIES: "NOT_SERVING", "liveness": "SERVING"},
        (200, "live\n"),
    )
    assert ready_again == ((200, "ready\n"), serving)
    assert stopping == (503, "not ready: shutting down\n")
    assert missing == 404


async def test_metrics_speak_openmetrics_when_asked(ops: Ops) -> None:
    """A scraper that asks for OpenMetrics gets it (with its # EOF terminator); others get the classic
    text format."""
    async with ops.http.get(ops.url + "/metrics", headers={"Accept": "application/openmetrics-text"}) as response:
        open_metrics = response.headers["Content-Type"], (await response.text()).endswith("# EOF\n")
    classic = (await ops.get("/metrics"))[2]

    assert open_metrics == ("application/openmetrics-text; version=1.0.0; charset=utf-8", True)
    assert classic == "text/plain; version=0.0.4; charset=utf-8"
