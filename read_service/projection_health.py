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
Each status is also the `orders_health_serving{service=...}` gauge (orders.telemetry.metrics).

Start-up is quiet: a sync worker started together with this service (orders-local) needs a moment
for its first heartbeat, and until then Redis may still hold the previous run's, long stale. So for
the first `start_grace` seconds a missing or stale heartbeat is logged at INFO, as waiting for a
worker; if it is still missing when that time is up, a WARNING says so. Trouble that is real at
once (Redis unreachable, a projection stopped on an error) is a WARNING from the start.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.exceptions
from grpc_health.v1 import health, health_pb2
from redis.asyncio import Redis

from orders.server.readiness import Readiness
from orders.server.tasks import BackgroundTask
from orders.store.heartbeat import read_heartbeat
from orders.store.views import PROJECTIONS, ViewKeys
from orders.telemetry.metrics import health_status

log = logging.getLogger(__name__)

PROJECTION_SERVICE = "orders.projection"
CHECK_EVERY = 1.0
CHECK_TIMEOUT = 2.0  # seconds Redis has to answer a check
WORKER_START_TIME = 10.0  # seconds a worker started with this service may take to write its first heartbeat
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def projection_services() -> list[str]:
    return [f"{PROJECTION_SERVICE}.{name}" for name in PROJECTIONS]


class ProjectionHealth:
    def __init__(
        self,
        redis: Redis,
        keys: ViewKeys,
        servicer: health.aio.HealthServicer,
        readiness: Readiness,
        timeout: float,
        *,
        start_grace: float | None = None,
    ) -> None:
        """`timeout`: seconds without a heartbeat before a projection is NOT_SERVING. `start_grace`:
        seconds from now during which that is expected and logged at INFO; by default the timeout (a
        new worker may wait that long for the lease of a previous one that died) plus WORKER_START_TIME."""
        self._redis = redis
        self._keys = keys
        self._servicer = servicer
        self._readiness = readiness
        self._timeout = timeout
        self._start_ends = time.monotonic() + (timeout + WORKER_START_TIME if start_grace is None else start_grace)
        self._status: dict[str, int] = {}
        self._waiting: set[str] = set()  # services NOT_SERVING for want of a heartbeat, logged at INFO only
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
        starting = time.monotonic() < self._start_ends
        quiet = {name for name, (_, age) in beats.items() if starting and age > self._timeout}
        for name, problem in problems.items():
            status, why = (NOT_SERVING, problem) if problem else (SERVING, "alive")
            await self._set(f"{PROJECTION_SERVICE}.{name}", status, why, quiet=name in quiet)
        failing = {name: problem for name, problem in problems.items() if problem}
        status = NOT_SERVING if failing else SERVING
        await self._set(PROJECTION_SERVICE, status, str(failing or "all alive"), quiet=set(failing) <= quiet)

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

    async def _set(self, service: str, status: int, why: str, *, quiet: bool = False) -> None:
        """Sets a service's health and logs a change: a WARNING when it turns NOT_SERVING, or INFO if
        `quiet` (no worker yet during start-up); a WARNING too when such a wait turns into trouble."""
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        if self._status.get(service) == status:
            if status != SERVING and service in self._waiting and not quiet:
                self._waiting.discard(service)
                log.warning("health of %r: still %s (%s)", service, name, why)
            return
        self._waiting.discard(service)
        if status != SERVING and quiet:
            self._waiting.add(service)
            log.info("health of %r: %s while starting, waiting for a sync worker (%s)", service, name, why)
        elif service in self._status or status != SERVING:
            log.log(logging.INFO if status == SERVING else logging.WARNING, "health of %r: %s (%s)", service, name, why)
        self._status[service] = status
        await self._servicer.set(service, status)
        health_status(service, status == SERVING)

    async def _watch(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.check(), CHECK_TIMEOUT)
            except TimeoutError:
                await self._unreachable(f"Redis did not answer within {CHECK_TIMEOUT:g}s")
            await asyncio.sleep(CHECK_EVERY)
