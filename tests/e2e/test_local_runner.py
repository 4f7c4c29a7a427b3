"""`orders-local` end to end: one command starts everything on embedded servers,
Ctrl-C stops it cleanly, and a restart keeps the orders."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest

from orders.store.views import redis_client
from orders.tools.embedded import free_port
from orders.tools.processes import child_environment, script_command
from orders.v1 import commands_pb2, commands_pb2_grpc, queries_pb2, queries_pb2_grpc
from tests.conftest import Servers

pytestmark = pytest.mark.slow


def start_runner(data_dir: Path, write: str, read: str, **settings: str) -> subprocess.Popen[str]:
    env = child_environment(
        {"ORDERS_DATA_DIR": str(data_dir), "ORDERS_WRITE_ADDRESS": write, "ORDERS_READ_ADDRESS": read, **settings}
    )
    env.setdefault("ORDERS_ADMIN_ADDRESS", f"127.0.0.1:{free_port()}")
    runner = subprocess.Popen(script_command("orders-local"), env=env, stdout=subprocess.PIPE, text=True)
    assert runner.stdout is not None
    deadline = time.monotonic() + 90
    for line in runner.stdout:
        if "orders system is ready" in line:
            return runner
        assert time.monotonic() < deadline, "the runner did not get ready in time"
    raise AssertionError(f"the runner exited with {runner.wait()} before it was ready")


def stop_runner(runner: subprocess.Popen[str]) -> int:
    runner.send_signal(signal.SIGINT)
    with runner:  # closes the stdout pipe
        return runner.wait(timeout=60)


@pytest.mark.embedded
def test_one_command_runs_the_system_and_a_restart_keeps_the_orders(server_dir: Path) -> None:
    """Create and read an order through the runner, stop it with Ctrl-C, restart, read it again."""
    write, read = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    admin = f"127.0.0.1:{free_port()}"
    runner = start_runner(server_dir / "data", write, read, ORDERS_ADMIN_ADDRESS=admin)
    try:
        listing = subprocess.run(
            script_command("orders-admin", "--admin-address", admin, "list"),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        with grpc.insecure_channel(write) as wc, grpc.insecure_channel(read) as rc:
            result = (
                commands_pb2_grpc.OrderCommandsStub(wc)
                .CreateOrder(
                    commands_pb2.CreateOrderRequest(order_id="kept", customer_id="alice", currency_code="EUR"),
                    timeout=10,
                )
                .result
            )
            first = queries_pb2_grpc.OrderQueriesStub(rc).GetOrder(
                queries_pb2.GetOrderRequest(order_id="kept", consistency_token=result.consistency_token), timeout=10
            )
    finally:
        first_exit = stop_runner(runner)

    runner = start_runner(server_dir / "data", write, read)
    try:
        with grpc.insecure_channel(read) as rc:
            again = queries_pb2_grpc.OrderQueriesStub(rc).GetOrder(
                queries_pb2.GetOrderRequest(order_id="kept", consistency_token=result.consistency_token), timeout=10
            )
    finally:
        second_exit = stop_runner(runner)

    assert "customer_summary" in listing
    assert first.order.customer_id == "alice"
    assert again.order == first.order
    assert (first_exit, second_exit) == (0, 0)


def test_configured_servers_are_used_instead_of_embedded_ones(
    tmp_path: Path, servers: Servers, database_url: str
) -> None:
    """With ORDERS_POSTGRES_URL and ORDERS_REDIS_URL set, the runner embeds nothing and uses them."""
    write, read = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    runner = start_runner(
        tmp_path / "data",
        write,
        read,
        ORDERS_POSTGRES_URL=database_url,
        ORDERS_REDIS_URL=servers.redis_url,
        ORDERS_REDIS_PREFIX=prefix,
    )
    try:
        with grpc.insecure_channel(write) as wc:
            commands_pb2_grpc.OrderCommandsStub(wc).CreateOrder(
                commands_pb2.CreateOrderRequest(order_id="external", customer_id="bob", currency_code="EUR"),
                timeout=10,
            )
    finally:
        exit_code = stop_runner(runner)

    stored = asyncio.run(_stream_ids(database_url))
    assert stored == ["external"]
    assert not (tmp_path / "data").exists()
    assert exit_code == 0
    asyncio.run(_delete_prefix(servers.redis_url, prefix))


async def _stream_ids(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        return [r["stream_id"] for r in await conn.fetch("SELECT stream_id FROM events")]
    finally:
        await conn.close()


async def _delete_prefix(url: str, prefix: str) -> None:
    client = redis_client(url)
    async for key in client.scan_iter(match=f"{prefix}*"):
        await client.delete(key)
    await client.aclose()


def test_ports_in_use_are_named_in_one_line_before_anything_starts(tmp_path: Path) -> None:
    """With another process listening on its write address, orders-local starts nothing (no data
    directory, no services) and says which setting's port is taken, in one line."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = f"127.0.0.1:{other.getsockname()[1]}"
        env = child_environment({"ORDERS_DATA_DIR": str(tmp_path / "data"), "ORDERS_WRITE_ADDRESS": taken})
        env |= {"ORDERS_READ_ADDRESS": f"127.0.0.1:{free_port()}", "ORDERS_ADMIN_ADDRESS": f"127.0.0.1:{free_port()}"}
        command = script_command("orders-local")
        ran = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)

    assert ran.returncode == 1
    assert ran.stdout == ""  # no "ready" banner
    assert ran.stderr.splitlines() == [
        f"orders-local: error: already in use: --write-address (ORDERS_WRITE_ADDRESS) {taken} (another orders-local?)"
    ]
    assert not (tmp_path / "data").exists()
