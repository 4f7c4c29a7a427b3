"""The fault suite's world: its own PostgreSQL and Redis (never the machine's shared ones),
the three services as real processes, a retrying client load, and the final consistency check.

Every fault test ends with `assert_consistent`: every command acknowledged to a client is in
the event table with the acknowledged result, each command id has exactly one set of events,
and the Redis views equal a fold of every event in PostgreSQL.

Against a Redis Cluster (ORDERS_TEST_REDIS_CLUSTER=1, tests/conftest.py) each test's own Redis is a
local cluster of its own (orders.tools.cluster); a fault that stops, restarts or empties one Redis
server is skipped there, saying so. A test may also ask for a cluster whatever the session runs on
(the `cluster_world` fixture).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orders.store.event_store import head, open_connection
from orders.store.migrations import migrate_url
from orders.store.views import RedisClient, ViewKeys, get_many, redis_client
from orders.tools.cluster import LocalCluster, start_cluster
from orders.tools.embedded import EmbeddedServer, free_port, start_postgres, start_redis
from orders.tools.processes import ServiceProcess, child_environment, start_service
from orders.v1 import commands_pb2 as cmd
from orders.v1 import commands_pb2_grpc, queries_pb2_grpc
from tests.conftest import redis_cluster_wanted
from tests.helpers import (
    add_item_request,
    an_address,
    assert_views_match_events,
    create_request,
    eventually,
    live_keys,
)

pytestmark = [pytest.mark.embedded, pytest.mark.slow]

RETRYABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}


@dataclass
class OwnServers:
    """PostgreSQL and Redis of this test alone, which it may stop, restart and wipe."""

    root: Path
    pg_port: int = field(default_factory=free_port)
    redis_port: int = field(default_factory=free_port)
    on_cluster: bool = field(default_factory=redis_cluster_wanted)  # a Redis Cluster instead of one Redis
    _pg: EmbeddedServer | None = None
    _redis: EmbeddedServer | None = None
    redis_cluster: LocalCluster | None = None

    @property
    def postgres_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/orders"

    @property
    def redis_url(self) -> str:
        if self.redis_cluster is not None:
            return self.redis_cluster.cluster_url
        return f"redis://127.0.0.1:{self.redis_port}/0"

    async def start_postgres(self) -> None:
        self._pg = await asyncio.to_thread(start_postgres, self.root / "postgres", self.pg_port, fsync=False)

    async def stop_postgres(self) -> None:
        assert self._pg is not None
        await asyncio.to_thread(self._pg.stop)
        self._pg = None

    async def start_redis(self, *, empty: bool = True) -> None:
        if self.on_cluster:
            if self.redis_cluster is not None:
                pytest.skip(SINGLE_SERVER_FAULT)
            self.redis_cluster = await asyncio.to_thread(start_cluster, self.root / "redis-cluster")
            return
        if empty:
            shutil.rmtree(self.root / "redis", ignore_errors=True)
        self._redis = await asyncio.to_thread(start_redis, self.root / "redis", self.redis_port, False)

    async def stop_redis(self) -> None:
        if self.on_cluster:
            pytest.skip(SINGLE_SERVER_FAULT)
        assert self._redis is not None
        await asyncio.to_thread(self._redis.stop)
        self._redis = None

    async def stop_all(self) -> None:
        for server in (self._pg, self._redis, self.redis_cluster):
            if server is not None:
                await asyncio.to_thread(server.stop)


# Why a fault test stops short on a Redis Cluster: it stops or restarts one Redis server, and a cluster
# loses a node differently (tests/faults/test_cluster_failover.py kills a master instead).
SINGLE_SERVER_FAULT = "not on a Redis Cluster: the fault stops or restarts one Redis server"


class Service(ServiceProcess):
    """One service process (orders.tools.processes) and its log file."""

    @property
    def log(self) -> str:
        assert self.log_file is not None
        return self.log_file.read_text(errors="replace")

    async def wait_for_log(self, text: str, timeout: float = 30) -> None:
        async def logged() -> None:
            assert text in self.log, f"{self.name} has not logged {text!r}"

        await eventually(logged, timeout=timeout, interval=0.05)


@dataclass
class Cluster:
    servers: OwnServers
    tmp: Path
    write_port: int = field(default_factory=free_port)
    read_port: int = field(default_factory=free_port)
    keys: ViewKeys = field(default_factory=ViewKeys)
    services: list[Service] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return child_environment(
            {
                "ORDERS_POSTGRES_URL": self.servers.postgres_url,
                "ORDERS_REDIS_URL": self.servers.redis_url,
                "ORDERS_REDIS_PREFIX": self.keys.prefix,
                "ORDERS_PARTITIONS": str(self.keys.partitions),
                "ORDERS_WRITE_ADDRESS": f"127.0.0.1:{self.write_port}",
                "ORDERS_READ_ADDRESS": f"127.0.0.1:{self.read_port}",
                "ORDERS_SHUTDOWN_GRACE": "2",
                "ORDERS_POLL_INTERVAL": "0.2",
                "ORDERS_LEASE_TTL": "2",
                "ORDERS_HEARTBEAT_TIMEOUT": "3",
                "ORDERS_LOG_LEVEL": "INFO",
            }
            | extra
        )

    async def spawn(self, script: str, **env: str) -> Service:
        """Starts console script `script` (orders-write-service, ...), its output in a log file of its own."""
        log_file = self.tmp / f"{script}-{len(self.services)}.log"
        started = await start_service(script, env=self.env(**env), log=log_file)
        service = Service(started.name, started.process, started.log_file)
        self.services.append(service)
        return service

    async def start_write_service(self) -> Service:
        service = await self.spawn("orders-write-service")
        await service.wait_for_log("listening on")
        return service

    async def start_read_service(self, **env: str) -> Service:
        service = await self.spawn("orders-read-service", **env)
        await service.wait_for_log("listening on")
        return service

    async def start_worker(self, **env: str) -> Service:
        service = await self.spawn("orders-sync-worker", **env)
        await service.wait_for_log("tailing the event log")
        return service

    def channel(self, port: int) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(channel)
        return channel

    @property
    def commands(self) -> commands_pb2_grpc.OrderCommandsStub:
        return commands_pb2_grpc.OrderCommandsStub(self.channel(self.write_port))

    @property
    def queries(self) -> queries_pb2_grpc.OrderQueriesStub:
        return queries_pb2_grpc.OrderQueriesStub(self.channel(self.read_port))

    async def health(self, service: str) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel(self.read_port))
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return int(reply.status)

    def redis(self) -> RedisClient:
        return redis_client(self.servers.redis_url)

    async def close(self) -> None:
        for service in self.services:
            await service.stop(grace=10)
        for channel in self.channels:
            await channel.close()


@pytest.fixture
async def cluster(tmp_path: Path, server_dir: Path) -> AsyncIterator[Cluster]:
    """Own servers (started), a migrated database, and no services yet."""
    async with own_world(tmp_path, OwnServers(server_dir)) as world:
        yield world


@pytest.fixture
async def cluster_world(tmp_path: Path, server_dir: Path) -> AsyncIterator[Cluster]:
    """As `cluster`, on a local Redis Cluster of its own whatever the session runs on."""
    async with own_world(tmp_path, OwnServers(server_dir, on_cluster=True)) as world:
        yield world


@pytest.fixture
async def partitioned_cluster_world(tmp_path: Path, server_dir: Path) -> AsyncIterator[Cluster]:
    """As `cluster_world`, its projections split into 3 partitions (ORDERS_PARTITIONS for every
    service): the partitions' hash tags spread over the cluster's three masters."""
    async with own_world(tmp_path, OwnServers(server_dir, on_cluster=True), partitions=3) as world:
        yield world


@contextlib.asynccontextmanager
async def own_world(tmp_path: Path, servers: OwnServers, partitions: int = 1) -> AsyncIterator[Cluster]:
    try:
        await servers.start_postgres()
        await servers.start_redis()
        admin = await asyncpg.connect(servers.postgres_url.replace("/orders", "/postgres"))
        await admin.execute("CREATE DATABASE orders")
        await admin.close()
        await migrate_url(servers.postgres_url)
        world = Cluster(servers, tmp_path, keys=ViewKeys(f"fault:{uuid.uuid4().hex[:8]}:", partitions=partitions))
        try:
            yield world
        finally:
            await world.close()
    finally:
        await servers.stop_all()


@dataclass
class Load:
    """Clients that each walk their own orders through their lifecycle, retrying a command with the
    same command id after an unknown outcome, as a careful real client does."""

    stub: commands_pb2_grpc.OrderCommandsStub
    seed: int = 1
    clients: int = 4
    pause: float = 0.0
    acked: dict[str, cmd.CommandResult] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._client(i, stop) for i in range(self.clients)))

    async def _client(self, index: int, stop: asyncio.Event) -> None:
        rng = random.Random(self.seed * 1000 + index)
        while not stop.is_set():
            order_id = f"o{index}-{uuid.uuid4().hex[:8]}"
            for request in self._lifecycle(order_id, rng):
                if not await self._send(request, stop):
                    return

    @staticmethod
    def _lifecycle(order_id: str, rng: random.Random) -> list[Any]:
        steps: list[Any] = [create_request(f"c{rng.randrange(5)}", order_id=order_id, shipping_address=an_address())]
        steps += [add_item_request(order_id, f"S{i}", quantity=rng.randint(1, 3)) for i in range(rng.randint(1, 3))]
        steps.append(cmd.ConfirmOrderRequest(order_id=order_id))
        steps.append(
            cmd.ShipOrderRequest(order_id=order_id) if rng.random() < 0.7 else cmd.CancelOrderRequest(order_id=order_id)
        )
        for step in steps:
            step.command_id = uuid.uuid4().hex
        return steps

    async def _send(self, request: Any, stop: asyncio.Event) -> bool:
        """Sends until acknowledged; False if stopped before that."""
        method: Callable[..., Awaitable[Any]] = getattr(self.stub, type(request).__name__.removesuffix("Request"))
        while True:
            try:
                reply = await method(request, timeout=2)
            except grpc.aio.AioRpcError as error:
                self.errors[error.code().name] += 1
                if error.code() not in RETRYABLE_CODES:
                    raise AssertionError(f"{type(request).__name__}: {error.code()} {error.details()}") from error
                if stop.is_set():
                    return False
                await asyncio.sleep(0.05)
                continue
            self.acked[request.command_id] = reply.result
            if self.pause:
                await asyncio.sleep(self.pause)
            return True


async def run_load_while(load: Load, fault: Callable[[], Awaitable[None]]) -> None:
    """Runs `load` during `fault`, then a little longer so the system works after it."""
    stop = asyncio.Event()
    task = asyncio.create_task(load.run(stop))
    try:
        await fault()
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def lose_redis(cluster: Cluster, how: str, down_for: float = 0.0) -> None:
    """Redis loses every key: FLUSHALL ("flushall"), or a stop and an empty start `down_for` seconds
    later ("restart-empty")."""
    if how == "flushall":
        redis = cluster.redis()
        await redis.flushall()
        await redis.aclose()
        return
    await cluster.servers.stop_redis()
    await asyncio.sleep(down_for)
    await cluster.servers.start_redis(empty=True)


async def views_rebuilt(cluster: Cluster, timeout: float) -> None:
    """Waits until the views hold a checkpoint and no rebuild mark: the replay after a loss is done."""
    redis = cluster.redis()
    try:

        async def done() -> None:
            assert await redis.exists(cluster.keys.checkpoint)
            assert not await redis.exists(cluster.keys.rebuild_target)

        await eventually(done, timeout=timeout)
    finally:
        await redis.aclose()


async def assert_consistent(cluster: Cluster, load: Load | None = None, timeout: float = 60) -> None:
    """No acknowledged command lost, none applied twice, and the views equal the fold of the log."""
    conn = await open_connection(cluster.servers.postgres_url)
    try:
        last = await head(conn)
        processed = {r["command_id"]: r for r in await conn.fetch("SELECT * FROM processed_commands")}
        per_command = await conn.fetch(
            "SELECT metadata->>'command_id' AS command_id, count(*) AS n FROM events GROUP BY 1"
        )
    finally:
        await conn.close()
    for command_id, result in (load.acked if load else {}).items():
        row = processed[command_id]
        assert (row["stream_id"], row["version"], row["position"]) == (result.order_id, result.version, result.position)
    assert {r["n"] for r in per_command if r["command_id"] is not None} <= {1}, "a command appended twice"
    redis = cluster.redis()
    try:

        async def caught_up() -> None:
            """Every partition of the orders projection, in the generation it serves, is at the log's head."""
            assert last is not None
            live = [await live_keys(redis, keys) for keys in cluster.keys.all_partitions()]
            assert await get_many(redis, [keys.checkpoint for keys in live]) == [last.token()] * len(live)

        await eventually(caught_up, timeout=timeout)
        await assert_views_match_events(cluster.servers.postgres_url, redis, cluster.keys)
    finally:
        await redis.aclose()
