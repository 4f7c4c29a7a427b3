"""Health that means something: is Redis reachable, and is a sync worker alive?

A worker's liveness is judged from its heartbeat (sync_worker.lease), not from
lag: lag reads 0 when the worker is dead and nothing is written. The health
service reports:
    ""  and  orders.v1.OrderQueries   NOT_SERVING while Redis is unreachable or does not answer within
                                      CHECK_TIMEOUT (through the process's orders.server.readiness.Readiness,
                                      which /readyz of the ops endpoint reports as well)
    orders.projection.NAME            NOT_SERVING while no worker of projection NAME has renewed
                                      its heartbeat within the heartbeat timeout, or while that
                                      projection is stopped on an error
    orders.projection                 SERVING only while every projection is
"""

from __future__ import annotations

import asyncio
import logging

import redis.exceptions
from grpc_health.v1 import health, health_pb2
from redis.asyncio import Redis

from orders.server.readiness import Readiness
from orders.server.tasks import BackgroundTask
from orders.store.heartbeat import read_heartbeat
from orders.store.views import PROJECTIONS, ViewKeys

log = logging.getLogger(__name__)

PROJECTION_SERVICE = "orders.projection"
CHECK_EVERY = 1.0
CHECK_TIMEOUT = 2.0  # seconds Redis has to answer a check
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def projection_services() -> list[str]:
    return [f"{PROJECTION_SERVICE}.{name}" for name in PROJECTIONS]


class ProjectionHealth:
    def __init__(
        self, redis: Redis, keys: ViewKeys, servicer: health.aio.HealthServicer, readiness: Readiness, timeout: float
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._servicer = servicer
        self._readiness = readiness
        self._timeout = timeout
        self._status: dict[str, int] = {}
        self._task = BackgroundTask("projection-health")

    def start(self) -> None:
        self._task.start(self._watch)

    async def stop(self) -> None:
        await self._task.stop()

    async def check(self) -> None:
        """Reads the heartbeat once and updates the health statuses."""
        try:
            beats = {name: await read_heartbeat(self._redis, self._keys.of(name)) for name in PROJECTIONS}
        except (redis.exceptions.RedisError, OSError) as error:
            await self._unreachable(f"Redis unreachable: {type(error).__name__}: {error}")
            return
        await self._readiness.set("redis", "")
        problems = {name: self._problem(beat, age) for name, (beat, age) in beats.items()}
        for name, problem in problems.items():
            await self._set(f"{PROJECTION_SERVICE}.{name}", NOT_SERVING if problem else SERVING, problem or "alive")
        failing = {name: problem for name, problem in problems.items() if problem}
        await self._set(PROJECTION_SERVICE, NOT_SERVING if failing else SERVING, str(failing or "all alive"))

    def _problem(self, beat: dict[str, object] | None, age: float) -> str:
        """Why a projection is not healthy, or "" when it is."""
        if age > self._timeout:
            last = "never" if beat is None else f"{age:.1f}s ago from {beat.get('worker')}"
            return f"no sync worker heartbeat: last {last}"
        if beat is not None and beat.get("state") == "failed":
            return f"stopped on an error: {beat.get('error')}"
        return ""

    async def _unreachable(self, why: str) -> None:
        await self._readiness.set("redis", why)
        for service in [PROJECTION_SERVICE, *projection_services()]:
            await self._set(service, NOT_SERVING, why)

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
            try:
                await asyncio.wait_for(self.check(), CHECK_TIMEOUT)
            except TimeoutError:
                await self._unreachable(f"Redis did not answer within {CHECK_TIMEOUT:g}s")
            await asyncio.sleep(CHECK_EVERY)
