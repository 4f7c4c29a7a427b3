"""Health that means something: is Redis reachable, and is a sync worker alive?

A worker's liveness is judged from its heartbeat (sync_worker.lease), not from
lag: lag reads 0 when the worker is dead and nothing is written. The health
service reports:
    ""  and  orders.v1.OrderQueries   NOT_SERVING while Redis is unreachable
    orders.projection                 NOT_SERVING while no worker has renewed its heartbeat
                                      within the heartbeat timeout
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.exceptions
from grpc_health.v1 import health, health_pb2
from redis.asyncio import Redis

from orders.views import ViewKeys
from sync_worker.lease import read_heartbeat

log = logging.getLogger(__name__)

PROJECTION_SERVICE = "orders.projection"
CHECK_EVERY = 1.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ProjectionHealth:
    def __init__(
        self, redis: Redis, keys: ViewKeys, servicer: health.aio.HealthServicer, query_service: str, timeout: float
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._servicer = servicer
        self._query_service = query_service
        self._timeout = timeout
        self._status: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="projection-health")

    async def stop(self) -> None:
        task = self._task
        while task is not None and not task.done():  # see CheckpointWatcher.stop
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)

    async def check(self) -> None:
        """Reads the heartbeat once and updates the health statuses."""
        try:
            beat, age = await read_heartbeat(self._redis, self._keys)
        except (redis.exceptions.RedisError, OSError) as error:
            await self._set("", NOT_SERVING, f"Redis unreachable: {error}")
            await self._set(self._query_service, NOT_SERVING, "Redis unreachable")
            await self._set(PROJECTION_SERVICE, NOT_SERVING, "Redis unreachable")
            return
        await self._set("", SERVING, "Redis reachable")
        await self._set(self._query_service, SERVING, "Redis reachable")
        if age <= self._timeout:
            await self._set(PROJECTION_SERVICE, SERVING, f"worker {beat and beat.get('worker')} is alive")
        else:
            last = "never" if beat is None else f"{age:.1f}s ago from {beat.get('worker')}"
            await self._set(PROJECTION_SERVICE, NOT_SERVING, f"no sync worker heartbeat: last {last}")

    async def _set(self, service: str, status: int, why: str) -> None:
        if self._status.get(service) == status:
            return
        if service in self._status or status != SERVING:
            log.log(
                logging.INFO if status == SERVING else logging.WARNING,
                "health of %r: %s (%s)",
                service or "server",
                health_pb2.HealthCheckResponse.ServingStatus.Name(status),
                why,
            )
        self._status[service] = status
        await self._servicer.set(service, status)

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.check(), CHECK_EVERY * 5)
            await asyncio.sleep(CHECK_EVERY)
