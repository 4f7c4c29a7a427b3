"""A process's own health: can it do its work now, and if not, why not.

`Readiness` gathers the problems its checks report (one reason per check, "" when fine). It is
SERVING while there are none, and it drives both the gRPC health service (`""` and the process's
own service names, on every server it is attached to, with the `orders_health_serving` gauge of
each) and the ops endpoint's `/readyz` (orders.server.ops_server). `StoreProbe` is one such check:
it asks a store a trivial question (PostgreSQL `SELECT 1`, Redis `PING`) every second with a short
timeout, and at once when told that an operation found the store unreachable.

Liveness is separate and says only that the process runs: the gRPC health service `liveness`
(orders.server.grpc_server) and `/livez`. A restart does not fix an unreachable store or a poison event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from grpc_health.v1 import health, health_pb2

from orders.server.tasks import BackgroundTask
from orders.telemetry.metrics import health_status

if TYPE_CHECKING:
    import asyncpg  # the read service has no PostgreSQL at all, and does not import its driver

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CHECK_EVERY = 1.0  # seconds between probes of a store
CHECK_TIMEOUT = 1.0  # seconds a store has to answer a probe


class Readiness:
    """SERVING while no check reports a problem; NOT_SERVING for good once the process stops."""

    def __init__(self) -> None:
        self._problems: dict[str, str] = {}
        self._targets: list[tuple[health.aio.HealthServicer, tuple[str, ...]]] = []
        self._stopping = False

    @property
    def problem(self) -> str:
        """Why the process is not ready, on one line; "" when it is."""
        if self._stopping:
            return "shutting down"
        return "; ".join(self._problems.values()).replace("\n", " ")

    @property
    def serving(self) -> bool:
        return not self.problem

    async def attach(self, servicer: health.aio.HealthServicer, services: Sequence[str]) -> None:
        """Makes `services` of a server's health service follow this readiness (now and on changes)."""
        self._targets.append((servicer, tuple(services)))
        await self._publish(servicer, services)

    async def set(self, check: str, problem: str) -> None:
        """Records what `check` found: a one-line reason, or "" when all is well."""
        was, before = self.serving, self._problems.get(check, "")
        if problem:
            self._problems[check] = problem
        else:
            self._problems.pop(check, None)
        if bool(before) != bool(problem):
            if problem:
                log.warning("not ready: %s", problem)
            else:
                log.info("%s: recovered (%s)", check, "ready" if self.serving else f"still not ready: {self.problem}")
        if was != self.serving:
            for servicer, services in self._targets:
                await self._publish(servicer, services)

    def stopping(self) -> None:
        """The process is shutting down: not ready from now on (the servers' health goes NOT_SERVING
        through their own graceful stop; the gauges now)."""
        self._stopping = True
        for _, services in self._targets:
            for service in services:
                health_status(service, serving=False)

    async def _publish(self, servicer: health.aio.HealthServicer, services: Sequence[str]) -> None:
        serving = self.serving
        for service in services:
            await servicer.set(service, SERVING if serving else NOT_SERVING)
            health_status(service, serving)


class StoreProbe:
    """Checks a store every `every` seconds (and at once after `report`) with `probe`, a trivial call
    that must finish within `timeout`; its outcome is the readiness check `name`."""

    def __init__(
        self,
        readiness: Readiness,
        name: str,
        what: str,
        probe: Callable[[], Awaitable[object]],
        *,
        every: float = CHECK_EVERY,
        timeout: float = CHECK_TIMEOUT,
    ) -> None:
        self._readiness = readiness
        self._name = name
        self._what = what
        self._probe = probe
        self._every = every
        self._timeout = timeout
        self._reported = ""
        self._wake = asyncio.Event()
        self._task = BackgroundTask(f"probe-{name}")

    def start(self) -> None:
        self._task.start(self._run)

    async def stop(self) -> None:
        await self._task.stop()

    def report(self, problem: str) -> None:
        """An operation found the store unreachable: not ready at once, then probe to see when it is back."""
        self._reported = problem
        self._wake.set()

    async def check(self) -> None:
        """Probes once and records the outcome."""
        reported, self._reported = self._reported, ""
        if reported:
            await self._readiness.set(self._name, f"{self._what} unreachable: {reported}")
        try:
            async with asyncio.timeout(self._timeout):
                await self._probe()
        except TimeoutError:
            problem = f"{self._what} did not answer within {self._timeout:g}s"
        except Exception as error:  # any failure of a trivial call means the store cannot be used
            problem = f"{self._what} unreachable: {type(error).__name__}: {error}"
        else:
            problem = ""
        await self._readiness.set(self._name, problem)

    async def _run(self) -> None:
        while True:
            await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._every)
            self._wake.clear()


SATURATED_SKIPS = 5  # probes in a row skipped while every pooled connection is busy


def postgres_probe(pool: asyncpg.Pool) -> Callable[[], Awaitable[object]]:
    """`SELECT 1` on a pooled connection. While every connection of the pool is busy, PostgreSQL is
    answering the commands that hold them, and waiting for one would report load as an outage: the
    probe is skipped then, but only a few times in a row, since hung connections look busy too."""
    skipped = 0

    async def probe() -> object:
        nonlocal skipped
        if pool.get_idle_size() == 0 and pool.get_size() >= pool.get_max_size() and skipped < SATURATED_SKIPS:
            skipped += 1
            return None
        skipped = 0
        return await pool.fetchval("SELECT 1")

    return probe
