"""`orders-sync-worker`: projects the event store into the Redis views."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from orders import config
from orders.server import settings as server_settings
from orders.server.grpc_server import RunningServer, run, start_server, stop_on_signals
from orders.server.ops_server import start_ops_server
from orders.server.readiness import Readiness
from orders.server.security import ServerSecurity
from orders.store.event_store import connect
from orders.store.views import PROJECTION, SUMMARY_PROJECTION, RedisClient, ViewKeys, redis_client
from orders.telemetry import tracing
from orders.telemetry.logs import LogFormat, LogLevel
from orders.telemetry.tracing import TracingMode
from sync_worker.admin import SERVICE as ADMIN_SERVICE
from sync_worker.admin import ProjectionAdminServicer
from sync_worker.batching import DEFAULT_WAIT
from sync_worker.customer_summary import CustomerSummaryProjector
from sync_worker.health import DEFAULT_STUCK_AFTER, WORKER_SERVICE, WorkerHealth
from sync_worker.membership import Membership
from sync_worker.parking import PoisonPolicy
from sync_worker.projector import OrdersProjector, Projector
from sync_worker.reads import SharedReads
from sync_worker.worker import SyncWorker, WorkerSettings, default_worker_id

log = logging.getLogger("sync_worker")

PROJECTORS: dict[str, type[Projector]] = {PROJECTION: OrdersProjector, SUMMARY_PROJECTION: CustomerSummaryProjector}


@dataclass(frozen=True)
class SyncSettings:
    postgres_url: str
    redis_url: str
    redis_prefix: str
    batch_size: int
    poll_interval: float
    lease_ttl: float
    worker_id: str
    projections: list[str]
    poison_policy: PoisonPolicy
    admin_address: str
    log_level: LogLevel
    metrics_address: str = ""
    projection_stuck_after: float = DEFAULT_STUCK_AFTER
    security: ServerSecurity | None = None  # of the ProjectionAdmin server
    log_format: LogFormat = LogFormat.AUTO
    tracing: TracingMode = TracingMode.AUTO
    batch_wait: float = DEFAULT_WAIT
    partitions: int = 1  # each projection split by order id (orders.store.views.partition_of)


def parse_settings(argv: Sequence[str] | None = None) -> SyncSettings:
    parser = config.SettingsParser(
        prog="orders-sync-worker",
        description="Tail the PostgreSQL event store and project its events into the Redis views.",
    )
    config.add_postgres_argument(parser)
    config.add_redis_arguments(parser)
    config.add_setting(
        parser, "batch-size", "events applied per Redis transaction", default="500", parse=config.positive_int
    )
    config.add_setting(
        parser,
        "poll-interval",
        "seconds between polls when no notification arrives",
        default="1",
        parse=config.positive_float,
    )
    config.add_setting(
        parser,
        "batch-wait",
        "seconds a busy projection loop waits after a notification so that its batch holds the events "
        "notified meanwhile (a lone event never waits); 0: never wait",
        default=f"{DEFAULT_WAIT:g}",
        parse=seconds_or_zero,
    )
    config.add_setting(
        parser,
        "lease-ttl",
        "seconds after which a standby worker takes over from a silent active one",
        default="5",
        parse=config.positive_float,
    )
    config.add_setting(
        parser,
        "worker-id",
        "this worker's name in the lease and heartbeat, stable across restarts (e.g. the pod name) so that a "
        "restarted worker takes its own lease back at once; unique among the workers running at once "
        "(default: host:pid:random, new on every start)",
        default="",
    )
    config.add_setting(
        parser,
        "projections",
        f"comma-separated projections to run, of: {', '.join(PROJECTORS)}",
        default=",".join(PROJECTORS),
        parse=projection_list,
    )
    config.add_setting(
        parser,
        "poison-policy",
        "what a projection does with an event it cannot apply: stop (there, until fixed) or park "
        "(that order's events go to a dead-letter list; the other orders go on)",
        default="stop",
        parse=config.one_of(PoisonPolicy),
    )
    config.add_setting(
        parser,
        "admin-address",
        "HOST:PORT to serve the ProjectionAdmin gRPC API on; empty: do not serve it",
        default="",
        parse=lambda text: config.address(text) if text else "",
    )
    config.add_metrics_argument(parser)
    config.add_setting(
        parser,
        "projection-stuck-after",
        "seconds a projection may go without applying a batch or being caught up before the worker reports "
        "NOT_SERVING (stuck)",
        default=f"{DEFAULT_STUCK_AFTER:g}",
        parse=config.positive_float,
    )
    config.add_log_argument(parser)
    config.add_tracing_argument(parser)
    server_settings.add_security_arguments(parser)  # for the ProjectionAdmin server
    return config.settings_from(SyncSettings, parser.parse_args(argv))


def seconds_or_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise ValueError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def projection_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or set(names) - set(PROJECTORS):
        raise ValueError(f"expected a comma-separated list of {', '.join(PROJECTORS)}, got {text!r}")
    return names


def build_workers(
    settings: WorkerSettings,
    redis: RedisClient,
    prefix: str,
    names: list[str],
    worker_id: str | None = None,
    *,
    partitions: int = 1,
) -> list[SyncWorker]:
    """One tailing loop per partition of each projection: each has its own checkpoint, lease and
    heartbeat; they share the rows they read from the log while they are in step, and each
    projection's loops share the worker's registration (sync_worker.membership)."""
    worker_id, reads, loops = worker_id or default_worker_id(), SharedReads(), []
    for name in names:
        partition_keys = ViewKeys(prefix, name, partitions=partitions).all_partitions()
        membership = Membership(redis, partition_keys[0], worker_id, settings.lease_ttl)
        for keys in partition_keys:
            loops.append(SyncWorker(settings, PROJECTORS[name](redis, keys), worker_id, reads, membership))
    return loops


async def start_admin(
    address: str,
    pool: asyncpg.Pool,
    redis: RedisClient,
    prefix: str,
    security: ServerSecurity | None = None,
    *,
    partitions: int = 1,
) -> RunningServer:
    servicer = ProjectionAdminServicer(pool, redis, prefix, partitions=partitions)
    server = await start_server(address, {ADMIN_SERVICE: servicer}, max_concurrent_rpcs=20, security=security)
    log.info("ProjectionAdmin listening on %s (port %d)", address, server.port)
    return server


async def serve(settings: SyncSettings) -> None:
    stop = stop_on_signals()
    redis = redis_client(settings.redis_url)
    worker_settings = WorkerSettings(
        settings.postgres_url,
        settings.batch_size,
        settings.poll_interval,
        lease_ttl=settings.lease_ttl,
        poison_policy=settings.poison_policy,
        batch_wait=settings.batch_wait,
    )
    workers = build_workers(
        worker_settings,
        redis,
        settings.redis_prefix,
        settings.projections,
        settings.worker_id,
        partitions=settings.partitions,
    )
    pool = await connect(settings.postgres_url, max_size=2)
    readiness = Readiness()
    ops = await start_ops_server(settings.metrics_address, readiness) if settings.metrics_address else None
    health = WorkerHealth(readiness, workers, redis, pool, settings.projection_stuck_after)
    await health.check()
    admin = (
        await start_admin(
            settings.admin_address,
            pool,
            redis,
            settings.redis_prefix,
            settings.security,
            partitions=settings.partitions,
        )
        if settings.admin_address
        else None
    )
    if admin is not None:
        await readiness.attach(admin.health, ["", WORKER_SERVICE])
    health.start()
    await asyncio.gather(*(worker.run(stop) for worker in workers))
    readiness.stopping()
    await health.stop()
    if admin is not None:
        await admin.stop(2)
    await pool.close()
    await redis.aclose()
    if ops is not None:
        await ops.stop()
    log.info("stopped after applying %s", ", ".join(f"{w.applied_events} events to {w.projection}" for w in workers))


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    config.setup_logging(settings.log_level, settings.log_format)
    tracing.setup_tracing(settings.tracing, "orders-sync-worker")
    run(lambda: serve(settings))


if __name__ == "__main__":
    main()
