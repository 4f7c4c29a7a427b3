"""Health that flips: the services as real processes on this suite's own PostgreSQL and Redis, which
the tests stop and start again. Each process's readiness (gRPC health `""` and its own service, and
/readyz of its ops endpoint) follows the stores it needs and the state of its work, while its
liveness (gRPC health `liveness`, /livez) stays up throughout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orders.tools.embedded import free_port
from tests.faults.conftest import Cluster, Service
from tests.helpers import create_request, eventually, held_transaction

FLIP_WITHIN = 5.0  # seconds from a store going away to NOT_SERVING


@dataclass
class Watched:
    """One service process, seen from outside as Kubernetes and Prometheus see it."""

    name: str
    process: Service
    channel: grpc.aio.Channel
    ops_port: int
    services: tuple[str, ...]  # its readiness services in gRPC health: "" and its own
    http: aiohttp.ClientSession
    live: list[tuple[int, str]] = field(default_factory=list)  # every /livez and `liveness` answer seen

    async def grpc_status(self, service: str) -> str:
        reply = await health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    async def get(self, path: str) -> tuple[int, str]:
        async with self.http.get(f"http://127.0.0.1:{self.ops_port}{path}") as response:
            return response.status, await response.text()

    async def readiness(self) -> tuple[dict[str, str], int, str]:
        """The gRPC health of its readiness services, and /readyz's status and body."""
        statuses = {service: await self.grpc_status(service) for service in self.services}
        status, body = await self.get("/readyz")
        return statuses, status, body

    async def assert_ready(self) -> None:
        statuses, status, body = await self.readiness()
        assert (statuses, status, body) == (dict.fromkeys(self.services, "SERVING"), 200, "ready\n"), self.name

    async def assert_not_ready(self, because: str) -> None:
        statuses, status, body = await self.readiness()
        assert (statuses, status) == (dict.fromkeys(self.services, "NOT_SERVING"), 503), self.name
        first_line, rest = body.split("\n", 1)
        assert (first_line.startswith("not ready: "), because in first_line, rest) == (True, True, ""), body

    async def watch_liveness(self, stop: asyncio.Event) -> None:
        """Records /livez and the `liveness` service every 100 ms until `stop`."""
        while not stop.is_set():
            self.live.append(await self.get("/livez"))
            self.live.append((0, await self.grpc_status("liveness")))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
        yield session


async def start_watched(cluster: Cluster, http: aiohttp.ClientSession, which: str, **env: str) -> Watched:
    ops_port = free_port()
    metrics = {"ORDERS_METRICS_ADDRESS": f"127.0.0.1:{ops_port}"}
    if which == "write":
        process = await cluster.spawn("orders-write-service", **metrics)
        port, own = cluster.write_port, "orders.v1.OrderCommands"
        await process.wait_for_log("listening on")
    elif which == "read":
        process = await cluster.spawn("orders-read-service", **metrics)
        port, own = cluster.read_port, "orders.v1.OrderQueries"
        await process.wait_for_log("listening on")
    else:
        port = free_port()
        process = await cluster.start_worker(ORDERS_ADMIN_ADDRESS=f"127.0.0.1:{port}", **metrics, **env)
        own = "orders.sync_worker"
        await process.wait_for_log("ProjectionAdmin listening on")
    return Watched(which, process, cluster.channel(port), ops_port, ("", own), http)


@contextlib.asynccontextmanager
async def liveness_watched(*processes: Watched) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(p.watch_liveness(stop)) for p in processes]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def flip_time(check: Callable[[], Awaitable[None]], timeout: float = FLIP_WITHIN) -> float:
    """Seconds until `check` passes (it must within `timeout`)."""
    started = time.monotonic()
    await eventually(check, timeout=timeout, interval=0.1)
    return time.monotonic() - started


def liveness_answers(*processes: Watched) -> set[tuple[int, str]]:
    return {answer for p in processes for answer in p.live}


@dataclass(frozen=True)
class Outage:
    store: str  # as the readiness reasons name it
    needed_by: tuple[str, str]  # the processes that turn NOT_SERVING
    not_needed_by: str  # the one that stays SERVING


OUTAGES = [Outage("PostgreSQL", ("write", "worker"), "read"), Outage("Redis", ("read", "worker"), "write")]


@pytest.mark.parametrize("outage", OUTAGES, ids=lambda outage: outage.store)
async def test_a_store_outage_flips_the_services_that_need_it(
    cluster: Cluster, http: aiohttp.ClientSession, outage: Outage
) -> None:
    """The store stops: the processes that need it turn NOT_SERVING (gRPC health and /readyz 503
    naming the store) within a few seconds, the one that never needs it stays SERVING; the store
    starts again (Redis empty): all SERVING and 200 again, and commands are accepted. /livez and
    `liveness` stay up throughout."""
    watched = {name: await start_watched(cluster, http, name) for name in ("write", "read", "worker")}
    everyone = tuple(watched.values())
    stop, start = {
        "PostgreSQL": (cluster.servers.stop_postgres, cluster.servers.start_postgres),
        "Redis": (cluster.servers.stop_redis, cluster.servers.start_redis),
    }[outage.store]

    async def all_ready() -> None:
        for process in everyone:
            await process.assert_ready()

    async def needing_it_down() -> None:
        for name in outage.needed_by:
            await watched[name].assert_not_ready(because=outage.store)

    async with liveness_watched(*everyone):
        await eventually(all_ready, timeout=15)
        await cluster.commands.CreateOrder(create_request("health"), timeout=5)
        await stop()
        flipped_in = await flip_time(needing_it_down)
        await watched[outage.not_needed_by].assert_ready()
        await start()
        back_in = await flip_time(all_ready, timeout=20)
        await cluster.commands.CreateOrder(create_request("health"), timeout=5)

    print(f"{outage.store} outage: NOT_SERVING after {flipped_in:.2f}s, SERVING {back_in:.2f}s after the restart")
    assert liveness_answers(*everyone) == {(200, "live\n"), (0, "SERVING")}


async def test_a_worker_stopped_on_a_poison_event_is_not_ready_and_says_why(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    """An event the projection cannot read stops it (policy stop): the worker reports NOT_SERVING with
    the event's position as the reason; once the row is repaired it resumes and is SERVING again."""
    await cluster.start_write_service()
    worker = await start_watched(cluster, http, "worker")
    created = (await cluster.commands.CreateOrder(create_request("poisoned"), timeout=5)).result
    await eventually(worker.assert_ready, timeout=15)
    conn = await asyncpg.connect(cluster.servers.postgres_url)
    try:
        async with liveness_watched(worker):
            position = await conn.fetchval(
                "INSERT INTO events (stream_id, version, event_type, schema_version, payload)"
                " VALUES ($1, 2, 'ItemAdded', 1, $2::jsonb) RETURNING position",
                created.order_id,
                json.dumps({"sku": "A"}),  # fields missing
            )
            await conn.execute("SELECT pg_notify('orders_events', '')")
            await flip_time(lambda: worker.assert_not_ready(because=f"stopped on the event at position {position}"))
            await conn.execute("DELETE FROM events WHERE position = $1", position)  # the repair
            await flip_time(worker.assert_ready, timeout=20)  # retried every 10 s
    finally:
        await conn.close()

    assert liveness_answers(worker) == {(200, "live\n"), (0, "SERVING")}


async def test_a_worker_held_back_past_the_stuck_threshold_is_not_ready(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    """A forgotten open transaction holds the projection back: once it has made no progress for
    ORDERS_PROJECTION_STUCK_AFTER seconds the worker says it is stuck; when the transaction ends it
    catches up and is SERVING again. A standby worker beside it stays SERVING all along."""
    await cluster.start_write_service()
    worker = await start_watched(cluster, http, "worker", ORDERS_PROJECTION_STUCK_AFTER="2")

    async def active() -> None:
        assert worker.process.log.count("is now active") == 2  # both projections' leases

    await eventually(active, timeout=15)
    standby = await start_watched(cluster, http, "worker", ORDERS_PROJECTION_STUCK_AFTER="2")
    await eventually(worker.assert_ready, timeout=15)
    await eventually(standby.assert_ready, timeout=15)

    async with held_transaction(cluster.servers.postgres_url):
        await cluster.commands.CreateOrder(create_request("held-back"), timeout=5)
        stuck_in = await flip_time(lambda: worker.assert_not_ready(because="is stuck: no progress for"), timeout=10)
        await standby.assert_ready()
    await flip_time(worker.assert_ready)

    print(f"held back: NOT_SERVING (stuck) {stuck_in:.2f}s after the held-back append")
    assert stuck_in >= 1.0
