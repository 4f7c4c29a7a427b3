"""The servers as operators and tools see them: standard health checks, server reflection,
graceful stops on SIGTERM/SIGINT, fast UNAVAILABLE when a store is down, and start-up
configuration errors. Everything goes through real servers and real gRPC channels; the
process tests run the services' console entry points as child processes."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from redis.asyncio import Redis, RedisCluster

from orders.server.grpc_server import RunningServer
from orders.server.readiness import Readiness
from orders.store.event_store import connect
from orders.store.views import PROJECTIONS, RedisClient, ViewKeys, redis_client
from orders.tools.embedded import free_port
from orders.tools.processes import PIPE, child_environment, script_command, start_service
from orders.v1 import commands_pb2_grpc, queries_pb2, queries_pb2_grpc
from read_service.main import start_read_service
from read_service.projection_health import ProjectionHealth
from tests.conftest import Servers
from tests.helpers import create_request, error_reason, eventually, rich_details, run_to_end
from tests.integration.conftest import System
from write_service.main import start_write_service

WRITE_SERVICE = "orders.v1.OrderCommands"
READ_SERVICE = "orders.v1.OrderQueries"
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
ERROR_INFO = "google.rpc.ErrorInfo"
COMMAND_METHODS = {
    "CreateOrder",
    "AddItem",
    "RemoveItem",
    "ChangeShippingAddress",
    "ConfirmOrder",
    "ShipOrder",
    "CancelOrder",
}
QUERY_METHODS = {"GetOrder", "ListOrders", "GetCustomerSummary", "WatchOrder", "WatchCustomerOrders"}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# ---------------------------------------------------------------- in-process servers


@dataclass
class Served:
    """One in-process server: its port, its gRPC service name and how to stop it."""

    name: str
    port: int
    stop: Callable[[float], Coroutine[Any, Any, None]]


@pytest.fixture
async def served(database_url: str, redis: Redis, keys: ViewKeys) -> AsyncIterator[dict[str, Served]]:
    """The write and read servers on 127.0.0.1:0, as the `system` fixture starts them."""
    pool = await connect(database_url, max_size=2)
    write: RunningServer = await start_write_service(pool, "127.0.0.1:0")
    read = await start_read_service(redis, keys, "127.0.0.1:0")
    try:
        yield {
            "write": Served(WRITE_SERVICE, write.port, write.stop),
            "read": Served(READ_SERVICE, read.server.port, read.stop),
        }
    finally:
        await write.stop(0)  # stopping twice is harmless
        await read.stop(0)
        await pool.close()


async def check(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


@pytest.mark.parametrize("kind", ["write", "read"])
async def test_health_serving_then_not_serving_once_a_stop_begins(served: dict[str, Served], kind: str) -> None:
    """Health answers SERVING for "" and the service's full name; the moment a stop begins, every
    open Watch stream is told NOT_SERVING, while the stop still waits for in-flight RPCs."""
    server = served[kind]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert await check(channel, "") == SERVING
        assert await check(channel, server.name) == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await check(channel, "no.such.Service")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        watches = [health.Watch(health_pb2.HealthCheckRequest(service=name)) for name in ("", server.name)]
        for watch in watches:
            assert (await asyncio.wait_for(watch.read(), 5)).status == SERVING

        # The Watch streams are RPCs in flight: the stop must announce NOT_SERVING and keep waiting for them.
        stopping = asyncio.create_task(server.stop(30))
        for watch in watches:
            assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        assert not stopping.done()

        for watch in watches:
            watch.cancel()
        await asyncio.wait_for(stopping, 10)  # returns once nothing is in flight, long before the grace ends


# ---------------------------------------------------------------- reflection


async def reflect(
    channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    """One request on a ServerReflectionInfo stream, as grpcurl sends it."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    stream = stub.ServerReflectionInfo(iter([request]), timeout=5)
    replies = [reply async for reply in stream]
    assert len(replies) == 1
    reply = replies[0]
    assert not reply.HasField("error_response"), reply.error_response.error_message
    return reply


async def described_methods(channel: grpc.aio.Channel, service: str) -> dict[str, tuple[str, str]]:
    """What `grpcurl describe <service>` shows, from reflection alone: method -> (input, output) type.

    The files come from `file_containing_symbol` (which includes transitive dependencies); a file that
    is still missing is fetched by name, as grpcurl does. Building a pool from them proves they are whole."""
    reply = await reflect(channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=service))
    files = {
        proto.name: proto
        for proto in (
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in reply.file_descriptor_response.file_descriptor_proto
        )
    }
    pool = descriptor_pool.DescriptorPool()

    async def add(name: str) -> None:
        if name not in files:
            by_name = await reflect(channel, reflection_pb2.ServerReflectionRequest(file_by_filename=name))
            raw = by_name.file_descriptor_response.file_descriptor_proto[0]
            files[name] = descriptor_pb2.FileDescriptorProto.FromString(raw)
        proto = files[name]
        for dependency in proto.dependency:
            with suppress(KeyError):
                pool.FindFileByName(dependency)
                continue
            await add(dependency)
        pool.Add(proto)

    owner = next(p for p in files.values() if any(f"{p.package}.{s.name}" == service for s in p.service))
    await add(owner.name)
    descriptor = pool.FindServiceByName(service)
    return {m.name: (m.input_type.full_name, m.output_type.full_name) for m in descriptor.methods}


@pytest.mark.parametrize(
    ("kind", "service", "methods"),
    [("write", WRITE_SERVICE, COMMAND_METHODS), ("read", READ_SERVICE, QUERY_METHODS)],
)
async def test_reflection_lists_and_describes_the_service(
    system: System, kind: str, service: str, methods: set[str]
) -> None:
    """Reflection lists our service, health and reflection, and describes every method with its
    message types, so grpcurl list/describe/call work without the .proto files."""
    port = system.write_port if kind == "write" else system.read_port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        listed = await reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in listed.list_services_response.service}
        described = await described_methods(channel, service)

    assert {service, HEALTH_SERVICE, REFLECTION_SERVICE} <= names
    assert set(described) == methods
    for method, (request, response) in described.items():
        assert (request, response) == (f"orders.v1.{method}Request", f"orders.v1.{method}Response")


@pytest.mark.parametrize(("kind", "other", "other_file"), [("write", "read", "queries"), ("read", "write", "commands")])
async def test_reflection_shows_only_the_services_a_server_serves(
    served: dict[str, Served], kind: str, other: str, other_file: str
) -> None:
    """With both servers in one process (so both services' files are loaded), each server's reflection
    lists exactly its own service, health and reflection, and knows nothing of the other service; it
    does know the error detail types its errors carry, which grpcurl looks up to print them."""
    server, stranger = served[kind], served[other]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        listed = await reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=stranger.name),
            reflection_pb2.ServerReflectionRequest(file_by_filename=f"orders/v1/{other_file}.proto"),
        ]
        replies = [reply async for reply in stub.ServerReflectionInfo(iter(requests), timeout=5)]
        details = await reflect(channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=ERROR_INFO))

    assert {s.name for s in listed.list_services_response.service} == {server.name, HEALTH_SERVICE, REFLECTION_SERVICE}
    assert [reply.error_response.error_code for reply in replies] == [grpc.StatusCode.NOT_FOUND.value[0]] * 2
    assert details.file_descriptor_response.file_descriptor_proto


# ---------------------------------------------------------------- projection health at start


async def beat(redis: Redis, keys: ViewKeys, *, age_s: float, state: str = "active") -> None:
    """Writes every projection's heartbeat as a worker would have, `age_s` seconds ago by Redis's clock."""
    seconds, micros = await redis.time()
    at_ms = seconds * 1000 + micros // 1000 - int(age_s * 1000)
    for name in PROJECTIONS:
        heartbeat = {"worker": "previous-run", "state": state, "error": "poison event", "at_ms": at_ms}
        await redis.set(keys.of(name).heartbeat, json.dumps(heartbeat))


def health_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "read_service.projection_health" and r.levelno == level]


def projection_health(start_grace: float, redis: Redis, keys: ViewKeys) -> ProjectionHealth:
    return ProjectionHealth(redis, keys, health.aio.HealthServicer(), Readiness(), 5.0, start_grace=start_grace)


async def test_read_service_starting_on_a_previous_runs_heartbeat_is_quiet(
    redis: Redis, keys: ViewKeys, caplog: pytest.LogCaptureFixture
) -> None:
    """On an existing data directory Redis still holds the last run's heartbeat, long stale: until the
    new worker beats, the read service says at INFO that it waits for one, and warns of nothing."""
    await beat(redis, keys, age_s=3600)

    with caplog.at_level(logging.INFO, logger="read_service.projection_health"):
        service = await start_read_service(redis, keys, "127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.server.port}") as channel:
                status = await check(channel, "orders.projection")
        finally:
            await service.stop(0)

    assert status == NOT_SERVING
    assert not health_lines(caplog, logging.WARNING)
    waiting = health_lines(caplog, logging.INFO)
    assert len(waiting) == 3
    assert all("waiting for a sync worker" in line and "previous-run" in line for line in waiting)


async def test_a_worker_still_missing_once_start_up_is_over_is_a_warning(
    redis: Redis, keys: ViewKeys, caplog: pytest.LogCaptureFixture
) -> None:
    """The start-up grace only delays the warning: after it, a missing worker is a WARNING, once."""
    grace = 0.05
    projection = projection_health(grace, redis, keys)
    with caplog.at_level(logging.INFO, logger="read_service.projection_health"):
        await projection.check()
        quiet = health_lines(caplog, logging.WARNING)
        await asyncio.sleep(grace * 2)  # past the start-up grace
        await projection.check()
        await projection.check()

    assert not quiet
    warnings = health_lines(caplog, logging.WARNING)
    assert len(warnings) == 3
    assert all("still NOT_SERVING (" in line and "last never" in line for line in warnings)


async def test_without_start_up_grace_a_missing_worker_is_a_warning_at_once(
    redis: Redis, keys: ViewKeys, caplog: pytest.LogCaptureFixture
) -> None:
    await beat(redis, keys, age_s=3600)
    with caplog.at_level(logging.INFO, logger="read_service.projection_health"):
        await projection_health(0, redis, keys).check()

    warnings = health_lines(caplog, logging.WARNING)
    assert len(warnings) == 3
    assert all("no sync worker heartbeat" in line for line in warnings)
    assert not health_lines(caplog, logging.INFO)


async def test_a_projection_stopped_on_an_error_is_a_warning_even_while_starting(
    redis: Redis, keys: ViewKeys, caplog: pytest.LogCaptureFixture
) -> None:
    """The start-up grace is for a worker that has not beaten yet, not for real trouble."""
    await beat(redis, keys, age_s=0, state="failed")
    with caplog.at_level(logging.INFO, logger="read_service.projection_health"):
        await projection_health(60, redis, keys).check()

    warnings = health_lines(caplog, logging.WARNING)
    assert len(warnings) == 3
    assert all("stopped on an error: poison event" in line for line in warnings)
    assert not health_lines(caplog, logging.INFO)


# ---------------------------------------------------------------- unreachable stores


def dead_address() -> str:
    """127.0.0.1 and a port where nothing listens."""
    return f"127.0.0.1:{free_port()}"


async def test_write_service_without_postgresql_is_unavailable_at_once() -> None:
    """With PostgreSQL unreachable, a command fails fast with UNAVAILABLE, reason
    EVENT_STORE_UNAVAILABLE and RetryInfo, instead of hanging until its deadline."""
    pool = await connect(f"postgresql://postgres@{dead_address()}/x")
    server = await start_write_service(pool, "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await commands_pb2_grpc.OrderCommandsStub(channel).CreateOrder(create_request(), timeout=5)
            elapsed = time.monotonic() - started
    finally:
        await server.stop(0)
        await pool.close()

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(caught.value) == "EVENT_STORE_UNAVAILABLE"
    assert "RetryInfo" in rich_details(caught.value)
    assert elapsed < 2


async def test_read_service_without_redis_is_unavailable_at_once(keys: ViewKeys) -> None:
    """With Redis unreachable, a query fails fast with UNAVAILABLE, reason VIEWS_UNAVAILABLE
    and RetryInfo, instead of hanging until its deadline."""
    client = redis_client(f"redis://{dead_address()}/0")
    service = await start_read_service(client, keys, "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.server.port}") as channel:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await queries_pb2_grpc.OrderQueriesStub(channel).GetOrder(
                    queries_pb2.GetOrderRequest(order_id="any-order"), timeout=5
                )
            elapsed = time.monotonic() - started
    finally:
        await service.stop(0)
        await client.aclose()

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(caught.value) == "VIEWS_UNAVAILABLE"
    assert "RetryInfo" in rich_details(caught.value)
    assert elapsed < 2


# ---------------------------------------------------------------- processes


def process_env(**settings: str) -> dict[str, str]:
    """This environment without any ORDERS_* setting of the developer's, plus `settings`."""
    return child_environment({"ORDERS_LOG_LEVEL": "INFO", **settings})


@dataclass
class Child:
    """A service running as a child process, its stderr collected line by line."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            async with self._changed:
                self.lines.append(raw.decode(errors="replace"))
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()  # end of the log: the process is exiting

    async def wait_for_log(self, text: str, timeout: float = 15) -> None:
        """Returns as soon as a line containing `text` is logged (woken by each line, no polling)."""
        reader = self.reader
        assert reader is not None

        def logged_or_ended() -> bool:
            return text in self.log or reader.done()

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(logged_or_ended)
        except TimeoutError:
            raise AssertionError(f"{text!r} not logged within {timeout} s; the log:\n{self.log}") from None
        assert text in self.log, f"the log ended (exit code {self.process.returncode}) without {text!r}:\n{self.log}"

    async def stop(self, sig: signal.Signals, timeout: float = 10) -> int:
        """Sends `sig` and returns the exit code, once the process has exited and its log is read."""
        self.process.send_signal(sig)
        return await self.exit_code(timeout)

    async def exit_code(self, timeout: float = 10) -> int:
        """The exit code once the process has exited (failing with its log if it does not) and its log is read."""
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"still running {timeout} s later; its log:\n{self.log}") from None
        if self.reader is not None:
            await asyncio.wait_for(self.reader, 5)
        return code


Spawn = Callable[..., Awaitable[Child]]


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """Starts services by console script, their stderr piped to the test; any still running at the end is killed."""
    children: list[Child] = []

    async def start(script: str, env: dict[str, str]) -> Child:
        child = Child((await start_service(script, env=env, log=PIPE)).process)
        child.reader = asyncio.create_task(child._read())
        children.append(child)
        return child

    yield start
    for child in children:
        if child.process.returncode is None:
            child.process.kill()
            await child.process.wait()
        if child.reader is not None:
            child.reader.cancel()
            with suppress(asyncio.CancelledError):
                await child.reader


async def wait_serving(child: Child, port: int, service: str) -> None:
    await child.wait_for_log(f"listening on 127.0.0.1:{port}")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10, wait_for_ready=True
        )
    assert reply.status == SERVING


async def watcher_settled(redis: RedisClient, keys: ViewKeys) -> None:
    """Waits until the read service's checkpoint watcher has subscribed and read the checkpoint,
    after which it only waits for publications (see test_read_service_signalled_while_starting_still_exits)."""

    async def subscribed() -> None:
        assert await subscribers(redis, keys.checkpoint_channel) >= 1

    await eventually(subscribed)
    await asyncio.sleep(0.3)  # the GET of the checkpoint that follows the SUBSCRIBE


async def subscribers(redis: RedisClient, channel: str) -> int:
    """Subscribers of `channel`: on a cluster, of every master (a client subscribes on one node)."""
    if not isinstance(redis, RedisCluster):
        [(_, count)] = await redis.pubsub_numsub(channel)
        return int(count)
    await redis.initialize()  # until its first command, a cluster client knows no nodes (get_nodes() is empty)
    counts = [await redis.execute_command("PUBSUB NUMSUB", channel, target_nodes=node) for node in redis.get_nodes()]
    return sum(int(reply[0][1]) for reply in counts)


async def blocked_on_lock(database_url: str) -> None:
    """Waits until some session of the database waits for a lock."""
    conn = await asyncpg.connect(database_url)
    try:

        async def waiting() -> None:
            count = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            assert count >= 1

        await eventually(waiting)
    finally:
        await conn.close()


async def test_write_service_process_finishes_the_command_in_flight_on_sigterm(spawn: Spawn, database_url: str) -> None:
    """SIGTERM turns health NOT_SERVING, lets the command in flight finish and be answered, then
    the process exits 0 without sitting out the rest of its grace period."""
    port = free_port()
    env = process_env(
        ORDERS_POSTGRES_URL=database_url, ORDERS_WRITE_ADDRESS=f"127.0.0.1:{port}", ORDERS_SHUTDOWN_GRACE="5"
    )
    child = await spawn("orders-write-service", env)
    await wait_serving(child, port, WRITE_SERVICE)

    async with AsyncExitStack() as stack:
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=WRITE_SERVICE))
        assert (await asyncio.wait_for(watch.read(), 5)).status == SERVING

        # Hold the command inside PostgreSQL: it waits for a lock this test owns.
        locker = await asyncpg.connect(database_url)
        stack.push_async_callback(locker.close)
        lock = locker.transaction()
        await lock.start()
        await locker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        command = asyncio.ensure_future(
            commands_pb2_grpc.OrderCommandsStub(channel).CreateOrder(create_request(order_id="in-flight"), timeout=20)
        )
        await blocked_on_lock(database_url)

        child.process.send_signal(signal.SIGTERM)
        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        await child.wait_for_log("SIGTERM received: shutting down gracefully")
        watch.cancel()
        # Far longer than the stop takes without a grace period (a few ms), well inside the 5 s grace.
        await asyncio.sleep(1)
        assert not command.done()
        assert child.process.returncode is None

        await lock.rollback()
        released = time.monotonic()
        reply = await asyncio.wait_for(command, 10)
        code = await asyncio.wait_for(child.process.wait(), 10)
        exited_after = time.monotonic() - released

    assert reply.result.order_id == "in-flight"
    assert reply.result.version == 1
    assert code == 0, child.log
    assert exited_after < 2.5, "sat out the grace period (~4 s left) although nothing was in flight"
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM events WHERE stream_id = 'in-flight'") == 1
    finally:
        await conn.close()
    assert child.reader is not None
    await asyncio.wait_for(child.reader, 5)
    assert '"logger":"write_service","message":"stopped"' in child.log  # stderr is a pipe: JSON lines


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_read_service_process_stops_gracefully_on_signal(
    spawn: Spawn, servers: Servers, redis: Redis, keys: ViewKeys, sig: signal.Signals
) -> None:
    """Once up and running, the read service exits 0 within seconds on SIGTERM or SIGINT (Ctrl-C),
    saying it shuts down gracefully. (A signal during start-up can hang it: see the next test.)"""
    port = free_port()
    env = process_env(
        ORDERS_REDIS_URL=servers.redis_url,
        ORDERS_REDIS_PREFIX=keys.prefix,
        ORDERS_READ_ADDRESS=f"127.0.0.1:{port}",
        ORDERS_SHUTDOWN_GRACE="5",
    )
    child = await spawn("orders-read-service", env)
    await wait_serving(child, port, READ_SERVICE)
    await watcher_settled(redis, keys)

    started = time.monotonic()
    code = await child.stop(sig)

    assert code == 0, child.log
    assert time.monotonic() - started < 4
    assert f"{sig.name} received: shutting down gracefully" in child.log
    assert '"logger":"read_service","message":"stopped"' in child.log  # stderr is a pipe: JSON lines
    assert "Traceback" not in child.log


async def test_read_service_signalled_while_starting_still_exits(
    spawn: Spawn, servers: Servers, keys: ViewKeys
) -> None:
    """SIGTERM the moment the read service listens, while its checkpoint watcher is still connecting
    to Redis and subscribing, still ends the process with exit code 0 within seconds. Up to 4 rounds
    of 8 services at once make that timing all but certain to occur."""
    for _ in range(4):
        ports = [free_port() for _ in range(8)]
        children = [
            await spawn(
                "orders-read-service",
                process_env(
                    ORDERS_REDIS_URL=servers.redis_url,
                    ORDERS_REDIS_PREFIX=keys.prefix,
                    ORDERS_READ_ADDRESS=f"127.0.0.1:{port}",
                ),
            )
            for port in ports
        ]

        async def stop_when_listening(child: Child, port: int) -> int:
            await child.wait_for_log(f"listening on 127.0.0.1:{port}")
            return await child.stop(signal.SIGTERM, timeout=5)

        outcomes = await asyncio.gather(
            *(stop_when_listening(c, p) for c, p in zip(children, ports, strict=True)), return_exceptions=True
        )

        hung = [str(o) for o in outcomes if isinstance(o, BaseException)]
        assert not hung, f"{len(hung)} of {len(children)} did not exit; the first:\n{hung[0]}"
        assert outcomes == [0] * len(children)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_sync_worker_process_stops_gracefully_on_signal(
    spawn: Spawn, servers: Servers, database_url: str, keys: ViewKeys, sig: signal.Signals
) -> None:
    """The sync worker exits 0 within seconds on SIGTERM or SIGINT, after saying it shuts down gracefully."""
    env = process_env(
        ORDERS_POSTGRES_URL=database_url,
        ORDERS_REDIS_URL=servers.redis_url,
        ORDERS_REDIS_PREFIX=keys.prefix,
    )
    child = await spawn("orders-sync-worker", env)
    await child.wait_for_log("tailing the event log")

    started = time.monotonic()
    code = await child.stop(sig)

    assert code == 0, child.log
    assert time.monotonic() - started < 4
    assert f"{sig.name} received: shutting down gracefully" in child.log
    assert "stopped after applying 0 events" in child.log
    assert "Traceback" not in child.log


# ---------------------------------------------------------------- configuration


RUN_TIMEOUT = 30.0  # seconds before a program that ends by itself counts as hung


MISSING_CASES = {
    "orders-write-service": ({}, "postgres-url"),
    "orders-read-service": ({}, "redis-url"),
    "orders-sync-worker": ({"ORDERS_REDIS_URL": "redis://127.0.0.1:1/0"}, "postgres-url"),
    "orders-migrate": ({}, "postgres-url"),
}


@pytest.mark.parametrize(("program", "case"), MISSING_CASES.items(), ids=MISSING_CASES.keys())
async def test_missing_required_setting_exits_2_naming_flag_and_variable(
    program: str, case: tuple[dict[str, str], str]
) -> None:
    """A required setting given neither as flag nor as environment variable stops the program at
    start with exit code 2 and one message naming both, e.g. --postgres-url and ORDERS_POSTGRES_URL."""
    settings, flag = case

    code, _, err = await run_to_end(script_command(program), process_env(**settings), RUN_TIMEOUT)

    assert code == 2
    assert f"--{flag}" in err
    assert "ORDERS_" + flag.upper().replace("-", "_") in err
    assert "Traceback" not in err


async def test_write_service_with_a_malformed_address_exits_2_naming_the_variable() -> None:
    """ORDERS_WRITE_ADDRESS=nonsense stops the write service at start with exit code 2 and a
    message naming both the flag and the environment variable."""
    env = process_env(ORDERS_POSTGRES_URL=f"postgresql://postgres@{dead_address()}/x", ORDERS_WRITE_ADDRESS="nonsense")

    code, _, err = await run_to_end(script_command("orders-write-service"), env, RUN_TIMEOUT)

    assert code == 2
    assert "ORDERS_WRITE_ADDRESS" in err
    assert "--write-address" in err
    assert "Traceback" not in err


async def test_migrate_against_an_unreachable_postgresql_says_so_in_one_line() -> None:
    """orders-migrate that cannot reach PostgreSQL exits 1 with one line naming the setting and the
    reason (not a traceback), and never shows the URL's password."""
    url = f"postgresql://postgres:secret@{dead_address()}/orders"

    code, _, err = await run_to_end(script_command("orders-migrate"), process_env(ORDERS_POSTGRES_URL=url), RUN_TIMEOUT)

    assert code == 1
    [line] = err.splitlines()
    assert line.startswith("orders-migrate: error: --postgres-url (ORDERS_POSTGRES_URL): cannot connect to ")
    assert "secret" not in line


COMMON = ["ORDERS_LOG_LEVEL"]
SERVER = ["ORDERS_SHUTDOWN_GRACE", "ORDERS_MAX_CONCURRENT_RPCS"]
REDIS = ["ORDERS_REDIS_URL", "ORDERS_REDIS_PREFIX"]
HELP_CASES = {
    "orders-write-service": ["ORDERS_POSTGRES_URL", "ORDERS_WRITE_ADDRESS", "ORDERS_POOL_SIZE", *SERVER, *COMMON],
    "orders-read-service": [*REDIS, "ORDERS_READ_ADDRESS", "ORDERS_MAX_CONSISTENCY_WAIT", *SERVER, *COMMON],
    "orders-sync-worker": ["ORDERS_POSTGRES_URL", *REDIS, "ORDERS_BATCH_SIZE", "ORDERS_POLL_INTERVAL", *COMMON],
    "orders-migrate": ["ORDERS_POSTGRES_URL", *COMMON],
}


@pytest.mark.parametrize(("program", "variables"), HELP_CASES.items(), ids=HELP_CASES.keys())
async def test_help_exits_0_and_names_every_environment_variable(program: str, variables: list[str]) -> None:
    """--help works without any configuration and documents each environment variable the program reads."""
    code, out, err = await run_to_end(script_command(program, "--help"), process_env(), RUN_TIMEOUT)

    assert code == 0, err
    assert "usage:" in out
    missing = [name for name in variables if name not in out]
    assert not missing, f"--help does not mention {missing}:\n{out}"
