"""Health that means something: is Redis reachable, and is a sync worker alive?

A worker's liveness is judged from its heartbeat (sync_worker.lease), not from
lag: lag reads 0 when the worker is dead and nothing is written. The health
service reports:
    ""  and  orders.v1.OrderQueries   NOT_SERVING while Redis is unreachable or does not answer within
                                      CHECK_TIMEOUT (through the process's orders.server.readiness.Readiness,
                                      which /readyz of the ops endpoint reports as well)
    orders.projection.NAME            NOT_SERVING while some partition of projection NAME has no
                                      worker that renewed its heartbeat within the heartbeat
                                      timeout, or while one is stopped on an error
    orders.projection                 SERVING only while every projection is
Each status is also the `orders_health_serving{service=...}` gauge (orders.telemetry.metrics).
With ORDERS_PARTITIONS = P each partition of a projection has its own heartbeat, and the projection
serves only if every one of them has a live, healthy owner: a query may need any partition. The
age of each partition's heartbeat is the gauge `orders_projection_owner_age_seconds{projection}`
(label "orders", or "orders/2" with several partitions), which the "partition without an owner"
alert reads.

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

from orders.server.readiness import Readiness
from orders.server.tasks import BackgroundTask
from orders.store.heartbeat import read_heartbeat
from orders.store.views import PROJECTIONS, RedisClient, ViewKeys
from orders.telemetry.metrics import health_status, projection_owner_age

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
        redis: RedisClient,
        keys: ViewKeys,
        servicer: health.aio.HealthServicer,
        readiness: Readiness,
        timeout: float,
        *,
        start_grace: float | None = None,
        partitions: int | None = None,
    ) -> None:
        """`timeout`: seconds without a heartbeat before a projection is NOT_SERVING. `start_grace`:
        seconds from now during which that is expected and logged at INFO; by default the timeout (a
        new worker may wait that long for the lease of a previous one that died) plus WORKER_START_TIME.
        `partitions`: each projection's partition count (ORDERS_PARTITIONS), by default `keys`'."""
        self._redis = redis
        self._keys = keys
        count = keys.partitions if partitions is None else partitions
        self._partitions = {
            name: ViewKeys(keys.prefix, name, partitions=count).all_partitions() for name in PROJECTIONS
        }
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
        """Reads every partition's heartbeat once and updates the health statuses and owner ages."""
        try:
            beats = {name: await self._read_beats(partitions) for name, partitions in self._partitions.items()}
        except (redis.exceptions.RedisError, OSError) as error:
            await self._unreachable(f"Redis unreachable: {type(error).__name__}: {error}")
            return
        await self._readiness.set("redis", "")
        problems = {name: self._problems(found) for name, found in beats.items()}
        starting = time.monotonic() < self._start_ends
        # Quiet while starting if every partition's trouble is only a missing heartbeat.
        quiet = {name for name, found in beats.items() if starting and self._only_missing(found)}
        for name, problem in problems.items():
            status, why = (NOT_SERVING, problem) if problem else (SERVING, "alive")
            await self._set(f"{PROJECTION_SERVICE}.{name}", status, why, quiet=name in quiet)
        failing = {name: problem for name, problem in problems.items() if problem}
        status = NOT_SERVING if failing else SERVING
        await self._set(PROJECTION_SERVICE, status, str(failing or "all alive"), quiet=set(failing) <= quiet)

    async def _read_beats(self, partitions: list[ViewKeys]) -> dict[str, tuple[dict[str, object] | None, float]]:
        """Each partition's heartbeat and age (together: one round trip's time for P partitions),
        recorded as its owner's age."""
        found = await asyncio.gather(*(read_heartbeat(self._redis, keys) for keys in partitions))
        for keys, (_, age) in zip(partitions, found, strict=True):
            projection_owner_age(keys.name, age)
        return {keys.name: beat for keys, beat in zip(partitions, found, strict=True)}

    def _problems(self, found: dict[str, tuple[dict[str, object] | None, float]]) -> str:
        """Why a projection is not healthy ("" when it is): with one partition, that partition's
        problem; with several, each failing partition's, by name."""
        failing = {name: problem for name, (beat, age) in found.items() if (problem := self._problem(beat, age))}
        if len(found) == 1:
            return next(iter(failing.values()), "")
        return "; ".join(f"{name}: {problem}" for name, problem in failing.items())

    def _only_missing(self, found: dict[str, tuple[dict[str, object] | None, float]]) -> bool:
        """Whether some partition lacks a live heartbeat and none is stopped on an error."""
        stale = any(age > self._timeout for _, age in found.values())
        failed = any(age <= self._timeout and beat and beat.get("state") == "failed" for beat, age in found.values())
        return stale and not failed

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
