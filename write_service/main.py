"""`orders-write-service`: serves OrderCommands on its own."""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from orders import config
from orders.server import settings as server_settings
from orders.server.grpc_server import RunningServer, run, start_server, stop_on_signals
from orders.server.multiprocess import ONLY_PROCESS, ProcessSlot, serve_in_processes
from orders.server.ops_server import start_ops_server
from orders.server.readiness import Readiness, StoreProbe, postgres_probe
from orders.server.security import ServerSecurity
from orders.store.event_store import EventStore, connect
from orders.store.group_commit import DEFAULT_MAX_BATCH
from orders.telemetry import tracing
from orders.telemetry.logs import LogFormat, LogLevel
from orders.telemetry.tracing import TracingMode
from write_service.command_bus import DEFAULT_CACHE_SIZE, CommandBus
from write_service.servicer import SERVICE, OrderCommandsServicer

log = logging.getLogger("write_service")


@dataclass(frozen=True)
class WriteSettings:
    postgres_url: str
    write_address: str
    shutdown_grace: float
    max_concurrent_rpcs: int
    pool_size: int
    state_cache_size: int
    log_level: LogLevel
    metrics_address: str = ""
    security: ServerSecurity | None = None
    log_format: LogFormat = LogFormat.AUTO
    tracing: TracingMode = TracingMode.AUTO
    processes: int = 1
    append_batch_max: int = DEFAULT_MAX_BATCH


def parse_settings(argv: Sequence[str] | None = None) -> WriteSettings:
    parser = config.SettingsParser(
        prog="orders-write-service",
        description="Serve the OrderCommands gRPC API: validate commands and append their events to PostgreSQL.",
    )
    config.add_postgres_argument(parser)
    config.add_server_arguments(parser, "write-address", config.DEFAULT_WRITE_ADDRESS)
    config.add_metrics_argument(parser)
    config.add_setting(parser, "pool-size", "PostgreSQL connections at most", default="20", parse=config.positive_int)
    config.add_setting(
        parser,
        "state-cache-size",
        "order states kept to decide commands without reading their events (0: read every time)",
        default=str(DEFAULT_CACHE_SIZE),
        parse=config.non_negative_int,
    )
    config.add_setting(
        parser,
        "append-batch-max",
        "commands appended together in one PostgreSQL statement and transaction at most (group commit; 1: one by one)",
        default=str(DEFAULT_MAX_BATCH),
        parse=config.positive_int,
    )
    config.add_log_argument(parser)
    config.add_tracing_argument(parser)
    server_settings.add_security_arguments(parser)
    server_settings.add_processes_argument(parser)
    return config.settings_from(WriteSettings, parser.parse_args(argv))


async def start_write_service(
    pool: asyncpg.Pool,
    address: str,
    max_concurrent_rpcs: int = 1000,
    security: ServerSecurity | None = None,
    on_unavailable: Callable[[str], None] | None = None,
    *,
    state_cache_size: int = DEFAULT_CACHE_SIZE,
    reuse_port: bool = False,
    append_batch_max: int = DEFAULT_MAX_BATCH,
) -> RunningServer:
    store = EventStore(pool, append_batch_max=append_batch_max)
    servicer = OrderCommandsServicer(CommandBus(store, state_cache_size), on_unavailable)
    return await start_server(address, {SERVICE: servicer}, max_concurrent_rpcs, security, reuse_port=reuse_port)


async def serve(settings: WriteSettings, slot: ProcessSlot = ONLY_PROCESS) -> None:
    stop = stop_on_signals(exit_on_repeat=not slot.shared)  # one of several: the parent decides (SIGKILL)
    pool = await connect(settings.postgres_url, max_size=settings.pool_size)
    # Ready while PostgreSQL answers: probed every second, and at once when a command finds it unreachable.
    readiness = Readiness()
    postgres = StoreProbe(readiness, "postgres", "PostgreSQL", postgres_probe(pool))
    ops = await start_ops_server(settings.metrics_address, readiness) if settings.metrics_address else None
    await postgres.check()
    running = await start_write_service(
        pool,
        settings.write_address,
        settings.max_concurrent_rpcs,
        settings.security,
        postgres.report,
        state_cache_size=settings.state_cache_size,
        reuse_port=slot.shared,
        append_batch_max=settings.append_batch_max,
    )
    await readiness.attach(running.health, ["", SERVICE.full_name])
    postgres.start()
    log.info("OrderCommands listening on %s (port %d)%s", settings.write_address, running.port, slot.describe())
    await stop.wait()
    readiness.stopping()
    await running.stop(settings.shutdown_grace)
    await postgres.stop()
    await pool.close()
    if ops is not None:
        await ops.stop()
    log.info("stopped")


def serve_process(settings: WriteSettings, slot: ProcessSlot) -> None:
    """One of --processes: serves on the address and ops endpoint its parent chose (in a fresh interpreter)."""
    settings = dataclasses.replace(settings, write_address=slot.address, metrics_address=slot.metrics_address)
    config.setup_logging(settings.log_level, settings.log_format)
    tracing.setup_tracing(settings.tracing, "orders-write-service")
    run(lambda: serve(settings, slot))


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    config.setup_logging(settings.log_level, settings.log_format)
    if settings.processes > 1:  # before anything starts gRPC (orders.server.multiprocess)
        sys.exit(
            serve_in_processes(
                settings,
                serve_process,
                name="orders-write-service",
                count=settings.processes,
                address=settings.write_address,
                metrics_address=settings.metrics_address,
                grace=settings.shutdown_grace,
            )
        )
    tracing.setup_tracing(settings.tracing, "orders-write-service")
    run(lambda: serve(settings))


if __name__ == "__main__":
    main()
