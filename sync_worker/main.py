"""`orders-sync-worker`: projects the event store into the Redis views."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from orders import config
from orders.grpc_server import run, stop_on_signals
from orders.views import ViewKeys, redis_client
from sync_worker.projector import OrdersProjector
from sync_worker.worker import SyncWorker, WorkerSettings

log = logging.getLogger("sync_worker")


@dataclass(frozen=True)
class SyncSettings:
    postgres_url: str
    redis_url: str
    redis_prefix: str
    batch_size: int
    poll_interval: float
    lease_ttl: float
    worker_id: str
    log_level: str


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
        "lease-ttl",
        "seconds after which a standby worker takes over from a silent active one",
        default="5",
        parse=config.positive_float,
    )
    config.add_setting(
        parser, "worker-id", "this worker's name in the lease and heartbeat (default: host:pid:random)", default=""
    )
    config.add_log_argument(parser)
    return SyncSettings(**vars(parser.parse_args(argv)))


async def serve(settings: SyncSettings) -> None:
    stop = stop_on_signals()
    redis = redis_client(settings.redis_url)
    worker = SyncWorker(
        WorkerSettings(
            settings.postgres_url, settings.batch_size, settings.poll_interval, lease_ttl=settings.lease_ttl
        ),
        OrdersProjector(redis, ViewKeys(settings.redis_prefix)),
        worker_id=settings.worker_id or None,
    )
    await worker.run(stop)
    await redis.aclose()
    log.info("stopped after applying %d events", worker.applied_events)


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    config.setup_logging(settings.log_level)
    run(lambda: serve(settings))


if __name__ == "__main__":
    main()
