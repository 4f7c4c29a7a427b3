"""The whole system in the test's event loop: write service, read service and sync
worker on real PostgreSQL and Redis, reached through real gRPC channels."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from orders.store.event_store import connect
from orders.store.views import PROJECTIONS, ViewKeys
from orders.v1 import commands_pb2_grpc, queries_pb2_grpc
from read_service.main import ReadService, start_read_service
from sync_worker.main import build_workers
from sync_worker.parking import PoisonPolicy
from sync_worker.worker import SyncWorker, WorkerSettings
from tests.conftest import Servers
from tests.helpers import eventually
from write_service.main import start_write_service


@dataclass
class System:
    commands: commands_pb2_grpc.OrderCommandsStub
    queries: queries_pb2_grpc.OrderQueriesStub
    database_url: str
    redis_url: str
    pool: asyncpg.Pool
    redis: Redis
    keys: ViewKeys
    write_port: int
    read_port: int
    workers: list[SyncWorker] = field(default_factory=list)
    _worker_task: asyncio.Task[None] | None = None
    _worker_stop: asyncio.Event = field(default_factory=asyncio.Event)

    def start_worker(
        self,
        batch_size: int = 500,
        poll_interval: float = 0.5,
        projections: tuple[str, ...] = PROJECTIONS,
        retry_failed_after: float = 10.0,
        poison_policy: str = "stop",
    ) -> list[SyncWorker]:
        """Runs the sync worker's loops (one per projection) in this event loop."""
        assert self._worker_task is None, "worker already running"
        stop = self._worker_stop = asyncio.Event()
        settings = WorkerSettings(
            self.database_url,
            batch_size,
            poll_interval,
            retry_failed_after=retry_failed_after,
            poison_policy=PoisonPolicy(poison_policy),
        )
        self.workers = build_workers(settings, self.redis, self.keys.prefix, list(projections))

        async def run_all() -> None:
            await asyncio.gather(*(worker.run(stop) for worker in self.workers))

        self._worker_task = asyncio.create_task(run_all())
        return self.workers

    async def stop_worker(self) -> None:
        if self._worker_task is not None:
            self._worker_stop.set()
            await asyncio.wait_for(self._worker_task, 10)
            self._worker_task = None


@pytest.fixture
async def system(servers: Servers, database_url: str, redis: Redis, keys: ViewKeys) -> AsyncIterator[System]:
    pool = await connect(database_url, max_size=10)
    write = await start_write_service(pool, "127.0.0.1:0")
    read: ReadService = await start_read_service(redis, keys, "127.0.0.1:0", max_wait=5.0)
    write_channel = grpc.aio.insecure_channel(f"127.0.0.1:{write.port}")
    read_channel = grpc.aio.insecure_channel(f"127.0.0.1:{read.server.port}")
    sys = System(
        commands=commands_pb2_grpc.OrderCommandsStub(write_channel),
        queries=queries_pb2_grpc.OrderQueriesStub(read_channel),
        database_url=database_url,
        redis_url=servers.redis_url,
        pool=pool,
        redis=redis,
        keys=keys,
        write_port=write.port,
        read_port=read.server.port,
    )
    sys.start_worker()

    async def views_initialised() -> None:
        assert await redis.exists(keys.checkpoint)

    await eventually(views_initialised)
    try:
        yield sys
    finally:
        await sys.stop_worker()
        for channel in (write_channel, read_channel):
            await channel.close()
        await write.stop(0)
        await read.stop(0)
        with contextlib.suppress(Exception):
            await pool.close()
