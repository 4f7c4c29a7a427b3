"""`orders-read-service`: serves OrderQueries on its own, from Redis only."""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from orders import config
from orders.server import settings as server_settings
from orders.server.grpc_server import RunningServer, run, start_server, stop_on_signals
from orders.server.multiprocess import ONLY_PROCESS, ProcessSlot, serve_in_processes
from orders.server.ops_server import start_ops_server
from orders.server.readiness import Readiness
from orders.server.security import ServerSecurity
from orders.store.views import PROJECTIONS, RedisClient, ViewKeys, redis_client
from orders.telemetry import tracing
from orders.telemetry.logs import LogFormat, LogLevel
from orders.telemetry.tracing import TracingMode
from read_service import page_tokens
from read_service.freshness import CheckpointWatcher
from read_service.hot_views import DEFAULT_CAPACITY, HotViews
from read_service.projection_health import ProjectionHealth
from read_service.servicer import SERVICE, OrderQueriesServicer
from read_service.watch import MAX_PENDING, ChangeFeed

log = logging.getLogger("read_service")


@dataclass(frozen=True)
class ReadSettings:
    redis_url: str
    redis_prefix: str
    read_address: str
    shutdown_grace: float
    max_concurrent_rpcs: int
    max_consistency_wait: float
    heartbeat_timeout: float
    log_level: LogLevel
    metrics_address: str = ""
    security: ServerSecurity | None = None
    log_format: LogFormat = LogFormat.AUTO
    tracing: TracingMode = TracingMode.AUTO
    processes: int = 1
    read_cache_size: int = DEFAULT_CAPACITY
    page_token_key: str = field(default="", repr=False)  # a secret: never in a log line
    partitions: int = 1  # each projection split by order id (orders.store.views.partition_of)


def parse_settings(argv: Sequence[str] | None = None) -> ReadSettings:
    parser = config.SettingsParser(
        prog="orders-read-service",
        description="Serve the OrderQueries gRPC API from the Redis views (no PostgreSQL access).",
    )
    config.add_redis_arguments(parser)
    config.add_server_arguments(parser, "read-address", config.DEFAULT_READ_ADDRESS)
    config.add_metrics_argument(parser)
    config.add_setting(
        parser,
        "max-consistency-wait",
        "seconds a query waits at most for the views to reach its consistency token",
        default="5",
        parse=config.positive_float,
    )
    config.add_setting(
        parser,
        "heartbeat-timeout",
        "seconds without a sync worker heartbeat before health reports orders.projection NOT_SERVING",
        default="5",
        parse=config.positive_float,
    )
    config.add_setting(
        parser,
        "read-cache-size",
        "orders whose views GetOrder keeps in memory, kept current by the change feed; 0: none",
        default=str(DEFAULT_CAPACITY),
        parse=config.non_negative_int,
    )
    config.add_setting(
        parser,
        "page-token-key",
        f"secret that signs ListOrders page tokens, the same for every replica, at least "
        f"{page_tokens.MIN_KEY_CHARACTERS} characters; empty: a random key kept in Redis",
        default="",
        parse=page_tokens.configured_key,
        secret=True,
    )
    config.add_log_argument(parser)
    config.add_tracing_argument(parser)
    server_settings.add_security_arguments(parser)
    server_settings.add_processes_argument(parser)
    return config.settings_from(ReadSettings, parser.parse_args(argv))


@dataclass
class ReadService:
    server: RunningServer
    watchers: list[CheckpointWatcher]
    health: ProjectionHealth
    feed: ChangeFeed
    readiness: Readiness  # "" and OrderQueries in gRPC health, and /readyz: is Redis reachable
    page_token_key: page_tokens.SharedKeyFollower | None = None  # None: the key is configured

    async def stop(self, grace: float) -> None:
        self.readiness.stopping()
        await self.health.stop()
        await self.server.health.enter_graceful_shutdown()
        # Watch streams never finish by themselves: end them now (UNAVAILABLE, reconnect) rather
        # than let them hold the stop for the whole grace period and then be cut off.
        self.feed.close()
        await self.server.stop(grace)
        for watcher in self.watchers:
            await watcher.stop()
        await self.feed.stop()
        if self.page_token_key is not None:
            await self.page_token_key.stop()


async def start_read_service(
    redis: RedisClient,
    keys: ViewKeys,
    address: str,
    *,
    max_wait: float = 5.0,
    max_concurrent_rpcs: int = 1000,
    heartbeat_timeout: float = 5.0,
    max_watch_pending: int = MAX_PENDING,
    security: ServerSecurity | None = None,
    readiness: Readiness | None = None,
    reuse_port: bool = False,
    page_token_key: str = "",
    read_cache_size: int = DEFAULT_CAPACITY,
) -> ReadService:
    """Serves OrderQueries on `address` over the `keys.partitions` partitions of each projection under
    `keys.prefix`. Page tokens are signed with `page_token_key`, or when it is empty with the key in
    Redis that every replica under the same prefix shares."""
    watchers = {  # each partition's checkpoint, by its name
        partition.name: CheckpointWatcher(redis, partition)
        for name in PROJECTIONS
        for partition in keys.of(name).all_partitions()
    }
    for watcher in watchers.values():
        watcher.start()
    # Watch streams count as RPCs in flight: at most half the slots, so that queries always find room.
    feed = ChangeFeed(redis, keys, max_pending=max_watch_pending, max_streams=max(1, max_concurrent_rpcs // 2))
    feed.start()
    tokens, key_follower = await page_tokens.page_tokens(redis, keys.page_token_key, page_token_key)
    hot = HotViews(read_cache_size)
    servicer = OrderQueriesServicer(redis, keys, watchers, max_wait, feed, hot=hot, page_tokens=tokens)
    server = await start_server(address, {SERVICE: servicer}, max_concurrent_rpcs, security, reuse_port=reuse_port)
    readiness = readiness or Readiness()
    await readiness.attach(server.health, ["", SERVICE.full_name])
    health = ProjectionHealth(redis, keys, server.health, readiness, heartbeat_timeout)
    await health.check()
    health.start()
    return ReadService(server, list(watchers.values()), health, feed, readiness, key_follower)


async def serve(settings: ReadSettings, slot: ProcessSlot = ONLY_PROCESS) -> None:
    stop = stop_on_signals(exit_on_repeat=not slot.shared)  # one of several: the parent decides (SIGKILL)
    redis = redis_client(settings.redis_url)
    keys = ViewKeys(settings.redis_prefix, partitions=settings.partitions)
    readiness = Readiness()
    ops = await start_ops_server(settings.metrics_address, readiness) if settings.metrics_address else None
    service = await start_read_service(
        redis,
        keys,
        settings.read_address,
        max_wait=settings.max_consistency_wait,
        max_concurrent_rpcs=settings.max_concurrent_rpcs,
        heartbeat_timeout=settings.heartbeat_timeout,
        security=settings.security,
        readiness=readiness,
        reuse_port=slot.shared,
        page_token_key=settings.page_token_key,
        read_cache_size=settings.read_cache_size,
    )
    log.info("OrderQueries listening on %s (port %d)%s", settings.read_address, service.server.port, slot.describe())
    await stop.wait()
    await service.stop(settings.shutdown_grace)
    await redis.aclose()
    if ops is not None:
        await ops.stop()
    log.info("stopped")


def serve_process(settings: ReadSettings, slot: ProcessSlot) -> None:
    """One of --processes: serves on the address and ops endpoint its parent chose (in a fresh interpreter)."""
    settings = dataclasses.replace(settings, read_address=slot.address, metrics_address=slot.metrics_address)
    config.setup_logging(settings.log_level, settings.log_format)
    tracing.setup_tracing(settings.tracing, "orders-read-service")
    run(lambda: serve(settings, slot))


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    config.setup_logging(settings.log_level, settings.log_format)
    if settings.processes > 1:  # before anything starts gRPC (orders.server.multiprocess)
        sys.exit(
            serve_in_processes(
                settings,
                serve_process,
                name="orders-read-service",
                count=settings.processes,
                address=settings.read_address,
                metrics_address=settings.metrics_address,
                grace=settings.shutdown_grace,
            )
        )
    tracing.setup_tracing(settings.tracing, "orders-read-service")
    run(lambda: serve(settings))


if __name__ == "__main__":
    main()
