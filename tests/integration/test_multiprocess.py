"""Several processes of one service on one address (--processes, orders.server.multiprocess): both
processes serve calls on the one port, SIGTERM stops every process gracefully (the command in
flight is answered), and a process that dies makes the parent stop the others and exit 1."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from orders.store.views import ViewKeys
from orders.tools.embedded import free_port
from orders.tools.processes import HealthServing, ServiceProcess, child_environment, start_service
from orders.v1 import commands_pb2_grpc, queries_pb2, queries_pb2_grpc
from tests.conftest import Servers
from tests.helpers import create_request, eventually

pytestmark = pytest.mark.timeout(120)

MAX_CHANNELS = 64  # the chance that this many connections all land on one of two processes is 2**-63


def consecutive_free_ports(count: int) -> int:
    """A port p such that p .. p + count - 1 are free right now."""
    while True:
        base = free_port()
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base


@dataclass
class Service:
    process: ServiceProcess
    log: Path
    address: str
    metrics_port: int

    def child_pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"started process \d+ of \d+ \(pid (\d+)\)", self.log.read_text())]

    def handled(self, index: int, method: str) -> float:
        """How many calls of `method` process `index` handled, whatever their status (its /metrics)."""
        url = f"http://127.0.0.1:{self.metrics_port + index}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            lines = reply.read().decode().splitlines()
        return sum(
            float(line.split()[-1])
            for line in lines
            if line.startswith("orders_grpc_server_handled_total{") and f'grpc_method="{method}"' in line
        )


Start = Callable[[str, dict[str, str]], Awaitable[Service]]


@pytest.fixture
async def start_two(tmp_path: Path) -> AsyncIterator[Start]:
    """Starts a service by console script with --processes 2; kills what is left at the end."""
    started: list[Service] = []

    async def start(script: str, settings: dict[str, str]) -> Service:
        address, metrics_port = f"127.0.0.1:{free_port()}", consecutive_free_ports(2)
        env = child_environment(
            {
                **settings,
                "ORDERS_PROCESSES": "2",
                "ORDERS_WRITE_ADDRESS": address,
                "ORDERS_READ_ADDRESS": address,
                "ORDERS_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
                "ORDERS_LOG_FORMAT": "text",
            }
        )
        log = tmp_path / f"{script}.log"
        process = await start_service(script, env=env, log=log)
        service = Service(process, log, address, metrics_port)
        started.append(service)
        await process.wait_ready(HealthServing(address))
        await eventually(lambda: _both_listening(service), timeout=30)
        return service

    yield start
    for service in started:
        await service.process.stop(15)
        for pid in service.child_pids():
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


async def _both_listening(service: Service) -> None:
    """Both processes serve (their ops endpoints started before their gRPC servers)."""
    assert len(re.findall(r"Order\w+ listening on .* \(process \d of 2", service.log.read_text())) == 2


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def until_logged(service: Service, text: str, times: int = 1) -> None:
    async def logged() -> None:
        assert service.log.read_text().count(text) >= times

    await eventually(logged, timeout=30)


def own_connection(address: str) -> grpc.aio.Channel:
    """A channel with a TCP connection of its own: gRPC otherwise shares one between equal channels."""
    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


async def create_order(channel: grpc.aio.Channel, i: int) -> None:
    await commands_pb2_grpc.OrderCommandsStub(channel).CreateOrder(create_request(order_id=f"order-{i}"), timeout=10)


async def list_orders(channel: grpc.aio.Channel, _i: int) -> None:
    try:
        await queries_pb2_grpc.OrderQueriesStub(channel).ListOrders(queries_pb2.ListOrdersRequest(), timeout=10)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:  # VIEWS_NOT_READY: no worker here, answered all the same
            raise


@pytest.mark.parametrize("script", ["orders-write-service", "orders-read-service"])
async def test_two_processes_on_one_port_both_serve(
    start_two: Start, script: str, database_url: str, servers: Servers, keys: ViewKeys
) -> None:
    """Calls over new connections land in both processes (each counts its own in its /metrics)."""
    settings = {"ORDERS_POSTGRES_URL": database_url, "ORDERS_REDIS_URL": servers.redis_url}
    settings["ORDERS_REDIS_PREFIX"] = keys.prefix
    service = await start_two(script, settings)
    call: Callable[[grpc.aio.Channel, int], Awaitable[Any]]
    call, method = (create_order, "CreateOrder") if script == "orders-write-service" else (list_orders, "ListOrders")

    for i in range(MAX_CHANNELS):
        async with own_connection(service.address) as channel:
            await call(channel, i)
        if service.handled(0, method) > 0 and service.handled(1, method) > 0:
            break

    assert service.handled(0, method) > 0
    assert service.handled(1, method) > 0
    assert service.handled(0, method) + service.handled(1, method) == i + 1


async def test_sigterm_stops_every_process_gracefully(start_two: Start, database_url: str) -> None:
    """The command in flight when SIGTERM comes is answered; then every process exits, and the parent 0."""
    service = await start_two("orders-write-service", {"ORDERS_POSTGRES_URL": database_url})
    pids = service.child_pids()
    locker = await asyncpg.connect(database_url)
    try:
        async with own_connection(service.address) as channel:
            transaction = locker.transaction()
            await transaction.start()
            await locker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            in_flight = asyncio.ensure_future(create_order(channel, 1))
            await eventually(lambda: _waiting_for_lock(locker))

            service.process.signal(signal.SIGTERM)
            await until_logged(service, "SIGTERM received: shutting down gracefully", times=2)
            await transaction.rollback()  # lets the command go on
            await in_flight
        code = await asyncio.wait_for(service.process.process.wait(), 30)
    finally:
        await locker.close()

    assert code == 0
    assert len(pids) == 2
    assert not any(_running(pid) for pid in pids)
    assert service.log.read_text().count("write_service: stopped") == 2


async def _waiting_for_lock(conn: asyncpg.Connection) -> None:
    waiting = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    assert waiting >= 1


async def test_a_process_that_dies_stops_the_others_and_the_parent_exits_1(
    start_two: Start, servers: Servers, keys: ViewKeys
) -> None:
    """No restart inside: the parent stops the other process gracefully and fails, for its supervisor to see."""
    settings = {"ORDERS_REDIS_URL": servers.redis_url, "ORDERS_REDIS_PREFIX": keys.prefix}
    service = await start_two("orders-read-service", settings)
    crashed, other = service.child_pids()

    os.kill(crashed, signal.SIGKILL)
    code = await asyncio.wait_for(service.process.process.wait(), 30)

    assert code == 1
    assert not _running(other)
    log = service.log.read_text()
    assert f"(pid {crashed}) exited with status -9: stopping the others" in log
    assert "read_service: stopped" in log  # the other one stopped gracefully
