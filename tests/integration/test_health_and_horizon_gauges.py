"""The gauges behind the alerts OrdersNotServing and OrdersProjectionHeldBack move with what they
describe: `orders_health_serving` with a read service's gRPC health as its Redis goes away and comes
back, and `orders_projection_held_back_seconds` with a transaction left open in PostgreSQL.

Real Redis (behind a TCP proxy the test can unplug), real PostgreSQL, the worker's loops in this
process; the gauges are read from prometheus_client's default registry, which /metrics serves."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from orders.store.views import PROJECTIONS, ViewKeys, redis_client
from read_service.main import start_read_service
from tests.conftest import Servers
from tests.helpers import create_request, eventually, held_transaction
from tests.integration.conftest import System

QUERIES = "orders.v1.OrderQueries"
PROJECTION_SERVICES = ("orders.projection", *(f"orders.projection.{name}" for name in PROJECTIONS))


class UnpluggableProxy:
    """A TCP proxy to Redis that the test can unplug (every connection cut, new ones refused, as when
    Redis or the network to it goes away) and plug back in on the same port."""

    def __init__(self, upstream_url: str) -> None:
        upstream = urlsplit(upstream_url)
        self._upstream = (upstream.hostname or "127.0.0.1", upstream.port or 6379)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def plug(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def unplug(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            redis_reader, redis_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, redis_writer}
        await asyncio.gather(
            self._pipe(client_reader, redis_writer), self._pipe(redis_reader, client_writer), return_exceptions=True
        )
        for writer in (client_writer, redis_writer):
            writer.transport.abort()
            self._writers.discard(writer)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.transport.abort()  # one side ended: so does the other


@pytest.fixture
async def proxy(servers: Servers) -> AsyncIterator[UnpluggableProxy]:
    proxied = UnpluggableProxy(servers.redis_url)
    await proxied.plug()
    yield proxied
    await proxied.unplug()


def health_gauge(service: str) -> float | None:
    return REGISTRY.get_sample_value("orders_health_serving", {"service": service})


def held_back_gauge(projection: str) -> float | None:
    return REGISTRY.get_sample_value("orders_projection_held_back_seconds", {"projection": projection})


async def fresh_heartbeats(redis: Redis, keys: ViewKeys) -> None:
    """Every projection's heartbeat, as a live worker writes it: the projection services are SERVING."""
    seconds, micros = await redis.time()
    for name in PROJECTIONS:
        heartbeat = {"worker": "gauge-test", "state": "active", "error": None, "at_ms": seconds * 1000 + micros // 1000}
        await redis.set(keys.of(name).heartbeat, json.dumps(heartbeat))


@pytest.mark.single_redis("cuts the read service off its one Redis server through a proxy")
async def test_the_health_gauge_follows_a_read_service_whose_redis_goes_away_and_comes_back(
    redis: Redis, keys: ViewKeys, proxy: UnpluggableProxy
) -> None:
    """While Redis is gone, the read service answers NOT_SERVING for OrderQueries and the projection
    services, and orders_health_serving says 0 for each; once Redis is back, SERVING and 1 again."""
    await fresh_heartbeats(redis, keys)
    client = redis_client(proxy.url)
    service = await start_read_service(client, keys, "127.0.0.1:0", heartbeat_timeout=60.0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.server.port}")
    health = health_pb2_grpc.HealthStub(channel)

    async def gauges_and_health(expected: float) -> dict[str, tuple[float | None, str]]:
        seen = {}
        for name in (QUERIES, *PROJECTION_SERVICES):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            seen[name] = (health_gauge(name), health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        assert all(gauge == expected for gauge, _ in seen.values()), seen
        return seen

    try:
        serving = await eventually(lambda: gauges_and_health(1.0))
        await proxy.unplug()
        gone = await eventually(lambda: gauges_and_health(0.0))
        await proxy.plug()
        back = await eventually(lambda: gauges_and_health(1.0))
    finally:
        await channel.close()
        await service.stop(0)
        await client.aclose()

    assert set(serving.values()) == {(1.0, "SERVING")}
    assert set(gone.values()) == {(0.0, "NOT_SERVING")}
    assert set(back.values()) == {(1.0, "SERVING")}


async def test_the_held_back_gauge_grows_while_an_open_transaction_holds_the_projection_and_then_drops_to_0(
    system: System, servers: Servers
) -> None:
    """An order written after a transaction that stays open waits behind it: the projection's
    orders_projection_held_back_seconds rises and keeps rising while the transaction is open; once it
    ends the order is applied and the gauge is back at 0."""

    async def caught_up() -> None:
        assert held_back_gauge("orders") == 0

    await eventually(caught_up)
    async with held_transaction(servers.postgres_url):
        await system.commands.CreateOrder(create_request(order_id="held-back"), timeout=10)

        async def held_back(more_than: float) -> float:
            seconds = held_back_gauge("orders")
            assert seconds is not None
            assert seconds > more_than
            return seconds

        first = await eventually(lambda: held_back(0.0))
        later = await eventually(lambda: held_back(first))
        not_applied = await system.redis.exists(system.keys.order("held-back"))

    async def applied() -> None:
        assert await system.redis.exists(system.keys.order("held-back"))
        assert held_back_gauge("orders") == 0

    await eventually(applied, timeout=20)

    assert 0 < first < later
    assert not_applied == 0
