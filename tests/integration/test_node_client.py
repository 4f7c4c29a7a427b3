"""A client in another language works from nothing but our .proto files.

clients/node/create_and_read.js (Node.js, @grpc/grpc-js and @grpc/proto-loader
loading protos/ at runtime) creates an order, adds an item, reads its own write
through the read service's consistency token and checks that an invalid
currency fails with INVALID_ARGUMENT and a rich status. This test installs its
locked dependencies when needed, runs it against the real servers and
cross-checks its order from Python.

Without node or npm on PATH the test is skipped, except under CI (CI=true),
where it fails: CI must prove it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from orders.v1 import queries_pb2 as qry
from orders.v1 import types_pb2
from tests.helpers import require_tools
from tests.integration.conftest import System

NODE_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "node"
NPM_CI_TIMEOUT = 420.0  # a cold npm cache downloads the packages
NODE_RUN_TIMEOUT = 60.0  # every RPC in the program has a 10 s deadline


async def run(command: list[str], cwd: Path, timeout: float) -> tuple[int, str, str]:
    """Runs `command` without blocking the event loop (the servers run in it); returns code, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        *command, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"{' '.join(command)} (in {cwd}) did not finish within {timeout:.0f} s")
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.fixture
async def node_client() -> Path:
    """clients/node with its locked dependencies installed; skips (fails under CI) without node and npm."""
    require_tools("node", "npm", hint="Node.js runs the client check in clients/node")
    lock = NODE_CLIENT / "package-lock.json"
    installed = NODE_CLIENT / "node_modules" / ".package-lock.json"  # npm's record of what node_modules holds
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        code, stdout, stderr = await run(["npm", "ci", "--no-audit", "--no-fund"], NODE_CLIENT, NPM_CI_TIMEOUT)
        assert code == 0, f"npm ci failed in {NODE_CLIENT}:\n{stdout}\n{stderr}"
    return NODE_CLIENT


@pytest.mark.timeout(NPM_CI_TIMEOUT + NODE_RUN_TIMEOUT + 60)
async def test_node_client_creates_reads_its_write_and_gets_rich_errors(node_client: Path, system: System) -> None:
    """The Node.js client creates an order, adds 2 x 150, reads version 2 (not stale) and gets INVALID_ARGUMENT
    with status details for currency "euro"; Python then sees the same order, and only that one."""
    command = ["node", "create_and_read.js", f"127.0.0.1:{system.write_port}", f"127.0.0.1:{system.read_port}"]
    code, stdout, stderr = await run(command, node_client, NODE_RUN_TIMEOUT)

    assert code == 0, f"{' '.join(command)} exited {code}:\n{stdout}\n{stderr}"
    lines = stdout.splitlines()
    assert len(lines) == 1, f"expected one JSON line, got:\n{stdout}"
    observed: dict[str, Any] = json.loads(lines[0])
    order_id = observed["order_id"]
    assert isinstance(order_id, str)
    assert order_id != ""
    assert observed["version"] == 2
    assert observed["status"] == "ORDER_STATUS_PENDING"
    assert observed["total"] == {"currency_code": "EUR", "minor_units": 300}
    assert observed["stale"] is False
    assert observed["error_code"] == "INVALID_ARGUMENT"
    assert observed["status_details_trailer"] is True
    assert observed["status_details"]["code"] == 3  # google.rpc.Code.INVALID_ARGUMENT
    assert observed["status_details"]["field_violations"] == ["currency_code"]

    reply = await system.queries.GetOrder(qry.GetOrderRequest(order_id=order_id))
    order = reply.order
    assert (order.order_id, order.customer_id, order.version) == (order_id, "node-client", 2)
    assert order.status == types_pb2.ORDER_STATUS_PENDING
    assert (order.total.currency_code, order.total.minor_units) == ("EUR", 300)
    assert [(item.sku, item.quantity, item.unit_price.minor_units) for item in order.items] == [("NODE-SKU-1", 2, 150)]
    listed = await system.queries.ListOrders(qry.ListOrdersRequest(customer_id="node-client"))
    assert [o.order_id for o in listed.orders] == [order_id]  # the rejected CreateOrder stored nothing
