"""Overload by design (orders.server.admission, docs/errors.md#overload): a write service driven
far past what it can serve answers every command either once, or with the documented retryable
refusal (UNAVAILABLE, reason OVERLOADED, RetryInfo), and nothing else; no command is lost or
applied twice, a refused one applies once when retried, and the Python client's retries turn
the refusals into successes once the service has room.

The service's capacity is fixed by the database, not by the machine's speed: a trigger holds a
lock and sleeps for every event appended, so the service commits at most 1/SLEEP events a
second however fast the machine is. Driving it at 3x that rate is at least 3x what it sustains
(more on a slow machine), and no assertion depends on time.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from orders.client import OrdersClient
from orders.tools.embedded import free_port
from orders.tools.processes import HealthServing, ServiceProcess, child_environment, start_service
from orders.v1 import commands_pb2, commands_pb2_grpc
from tests.helpers import create_request, rich_details

pytestmark = pytest.mark.timeout(180)

LIMIT = 8  # --max-concurrent-rpcs of the service under test
SLEEP = 0.01  # seconds the trigger holds every appended event: at most 100 CreateOrders a second
RATE = 3 / SLEEP  # commands a second sent: 3x the most the service can sustain
COMMANDS = 300  # about a second of load
CHANNELS = 4  # separate connections, as many clients would open
PUSHBACK = "grpc-retry-pushback-ms"


@dataclass
class SlowWriteService:
    process: ServiceProcess
    address: str
    metrics_address: str

    def overloaded_total(self) -> float:
        """orders_grpc_server_overloaded_total of CreateOrder, from the service's /metrics."""
        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        prefix = 'orders_grpc_server_overloaded_total{grpc_method="CreateOrder",grpc_service="orders.v1.OrderCommands"}'
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


async def slow_down_appends(database_url: str, sleep: float) -> None:
    """Every event appended waits for one lock and sleeps `sleep` s holding it, whatever the connection."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"""
            CREATE FUNCTION slow_append() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_advisory_xact_lock(4242);
                PERFORM pg_sleep({sleep});
                RETURN NULL;
            END $$;
            CREATE TRIGGER slow_append AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION slow_append();
        """)
    finally:
        await conn.close()


@asynccontextmanager
async def slow_write_service(database_url: str, log: Path, limit: int, sleep: float) -> AsyncIterator[SlowWriteService]:
    await slow_down_appends(database_url, sleep)
    address, metrics_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = child_environment(
        {
            "ORDERS_POSTGRES_URL": database_url,
            "ORDERS_WRITE_ADDRESS": address,
            "ORDERS_METRICS_ADDRESS": metrics_address,
            "ORDERS_MAX_CONCURRENT_RPCS": str(limit),
            "ORDERS_POOL_SIZE": "4",
            "ORDERS_LOG_FORMAT": "text",
        }
    )
    process = await start_service("orders-write-service", env=env, log=log)
    try:
        await process.wait_ready(HealthServing(address))
        yield SlowWriteService(process, address, metrics_address)
    finally:
        await process.stop(5)


async def events_by_command(database_url: str) -> Counter[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT metadata->>'command_id' AS command_id FROM events")
    finally:
        await conn.close()
    return Counter(row["command_id"] for row in rows)


def request(i: int) -> commands_pb2.CreateOrderRequest:
    return create_request(command_id=f"command-{i}", order_id=f"order-{i}")


def outcome(call: asyncio.Future[commands_pb2.CreateOrderResponse]) -> str:
    """How a call ended: "acknowledged", "refused" (the documented overload refusal: UNAVAILABLE,
    reason OVERLOADED, a RetryInfo delay of 0.5-1.5 s and the same as gRPC pushback), or else what."""
    error = call.exception()
    if error is None:
        return "acknowledged"
    if not isinstance(error, grpc.aio.AioRpcError):
        return repr(error)
    trailers = dict(error.trailing_metadata() or ())
    if error.code() == grpc.StatusCode.UNAVAILABLE and "grpc-status-details-bin" in trailers:
        details: dict[str, Any] = rich_details(error)
        reason = details["ErrorInfo"].reason
        delay = details["RetryInfo"].retry_delay.ToTimedelta().total_seconds() if "RetryInfo" in details else 0
        if reason == "OVERLOADED" and 0.5 <= delay <= 1.5 and trailers.get(PUSHBACK) == str(round(delay * 1000)):
            return "refused"
    return f"{error.code().name}: {error.details()}"


async def open_loop(stubs: list[commands_pb2_grpc.OrderCommandsStub]) -> list[str]:
    """Sends COMMANDS CreateOrders at RATE a second, each at its own time whatever the answers
    (open loop), round robin over the channels; the outcome of each, in order."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    calls = []
    for i in range(COMMANDS):
        await asyncio.sleep(max(0.0, start + i / RATE - loop.time()))
        stub = stubs[i % len(stubs)]
        calls.append(asyncio.ensure_future(stub.CreateOrder(request(i), timeout=60)))
    await asyncio.wait(calls)
    return [outcome(call) for call in calls]


async def test_at_three_times_the_sustainable_rate_each_command_is_applied_once_or_refused_retryably(
    database_url: str, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        service = await stack.enter_async_context(
            slow_write_service(database_url, tmp_path / "write.log", LIMIT, SLEEP)
        )
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)]  # own connections, no retries
        channels = [
            await stack.enter_async_context(grpc.aio.insecure_channel(service.address, options=options))
            for _ in range(CHANNELS)
        ]
        stubs = [commands_pb2_grpc.OrderCommandsStub(channel) for channel in channels]

        outcomes = await open_loop(stubs)
        counts = Counter(outcomes)
        acknowledged = {f"command-{i}" for i, result in enumerate(outcomes) if result == "acknowledged"}
        refused = [i for i, result in enumerate(outcomes) if result == "refused"]

        assert set(counts) <= {"acknowledged", "refused"}, counts  # nothing else: no REFUSED_STREAM, no deadline
        assert counts["acknowledged"] > 0, counts
        assert counts["refused"] > 0, counts
        assert await events_by_command(database_url) == Counter(acknowledged)  # each acknowledged once, no refused
        assert service.overloaded_total() == len(refused)  # the documented metric counts every refusal

        # A refused command was not applied, so its retry with the same command id applies it once;
        # a repeated acknowledged one is answered with its first result and appends nothing.
        for i in refused:
            await stubs[0].CreateOrder(request(i), timeout=60)
        first = sorted(acknowledged)[0]
        repeated = await stubs[0].CreateOrder(request(int(first.removeprefix("command-"))), timeout=60)

    assert repeated.result.version == 1
    assert await events_by_command(database_url) == Counter(f"command-{i}" for i in range(COMMANDS))


async def test_the_client_retries_overload_refusals_into_successes(database_url: str, tmp_path: Path) -> None:
    """Three times as many concurrent commands as the service admits: the first attempts of most are
    refused as OVERLOADED, and the client's retries (at the server's pushback delay, the same
    command id) get every one applied, exactly once."""
    limit, count = 2, 6
    async with slow_write_service(database_url, tmp_path / "write.log", limit, sleep=0.05) as service:
        async with OrdersClient(service.address, "127.0.0.1:1", timeout=60) as client:
            results = await asyncio.gather(
                *(
                    client.create_order("cust-1", "EUR", order_id=f"order-{i}", command_id=f"command-{i}")
                    for i in range(count)
                )
            )
        refusals = service.overloaded_total()

    assert sorted(result.order_id for result in results) == [f"order-{i}" for i in range(count)]
    assert refusals > 0  # attempts past the limit were refused, and then retried
    assert await events_by_command(database_url) == Counter(f"command-{i}" for i in range(count))
