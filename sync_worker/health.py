"""The sync worker's own health: can it project events now, and if not, why not.

Every second it probes PostgreSQL (`SELECT 1`) and Redis (`PING`), each with a short timeout, and
looks at each projection's loop. The worker is NOT_SERVING (gRPC health `""` and
`orders.sync_worker` on its admin server, `/readyz` on its ops endpoint) while

- PostgreSQL or Redis is unreachable,
- a projection is stopped on an error (a poison event under the `stop` policy), or
- a projection is stuck: it has neither applied a batch nor found itself caught up for
  `stuck_after` seconds (e.g. held back by a forgotten open transaction, or failing the same
  batch again and again).

A standby worker (another one holds the lease) and a paused projection are healthy: they are
doing what they should.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import asyncpg

from orders.server.readiness import CHECK_EVERY, Readiness, StoreProbe, postgres_probe
from orders.server.tasks import BackgroundTask
from orders.store.views import RedisClient
from sync_worker.worker import SyncWorker

WORKER_SERVICE = "orders.sync_worker"
DEFAULT_STUCK_AFTER = 60.0


def projection_problem(worker: SyncWorker, stuck_after: float) -> str:
    """Why this projection's loop is not doing its work, or "" when it is."""
    if worker.failure is not None:
        return f"projection {worker.projection} stopped on the {worker.failure}"
    if worker.state in {"standby", "paused"}:
        return ""
    idle = time.monotonic() - worker.progress_at
    if idle > stuck_after:
        behind = f", about {worker.lag_events} events behind" if worker.lag_events else ""
        return f"projection {worker.projection} is stuck: no progress for {idle:.0f}s{behind}"
    return ""


class WorkerHealth:
    def __init__(
        self,
        readiness: Readiness,
        workers: Sequence[SyncWorker],
        redis: RedisClient,
        pool: asyncpg.Pool,
        stuck_after: float = DEFAULT_STUCK_AFTER,
    ) -> None:
        self._readiness = readiness
        self._workers = workers
        self._stuck_after = stuck_after
        self._probes = [
            StoreProbe(readiness, "postgres", "PostgreSQL", postgres_probe(pool)),
            StoreProbe(readiness, "redis", "Redis", redis.ping),
        ]
        self._task = BackgroundTask("worker-health")

    async def check(self) -> None:
        await asyncio.gather(*(probe.check() for probe in self._probes))
        for worker in self._workers:
            await self._readiness.set(f"projection {worker.projection}", projection_problem(worker, self._stuck_after))

    def start(self) -> None:
        self._task.start(self._run)

    async def stop(self) -> None:
        await self._task.stop()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.check(), CHECK_EVERY * 5)  # each probe has its own, shorter timeout
            await asyncio.sleep(CHECK_EVERY)
