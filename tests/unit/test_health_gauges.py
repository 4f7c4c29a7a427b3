"""The gauges of gRPC health and of the horizon, as the code that owns each status sets them
(the integration test tests/integration/test_health_and_horizon_gauges.py moves them with real stores)."""

from __future__ import annotations

import time
from typing import cast

from grpc_health.v1 import health, health_pb2
from prometheus_client import REGISTRY

from orders.server.readiness import Readiness
from orders.store.event_store import Batch, Connection
from orders.telemetry.metrics import ProjectionMetrics
from sync_worker.progress import HeldBack, Progress

SERVICE = "tests.unit.HealthGauge"  # a name of this test's own: the registry is the process's


def serving_gauge(service: str) -> float | None:
    return REGISTRY.get_sample_value("orders_health_serving", {"service": service})


async def test_the_health_gauge_follows_readiness_and_stays_0_once_stopping() -> None:
    """1 while no check reports a problem, 0 while one does, and 0 for good once the process stops,
    in step with what the gRPC health service answers."""
    readiness, servicer = Readiness(), health.aio.HealthServicer()
    await readiness.attach(servicer, [SERVICE])
    seen = [serving_gauge(SERVICE)]
    await readiness.set("postgres", "PostgreSQL unreachable")
    seen.append(serving_gauge(SERVICE))
    answered = await servicer.Check(health_pb2.HealthCheckRequest(service=SERVICE), None)
    await readiness.set("postgres", "")
    seen.append(serving_gauge(SERVICE))
    readiness.stopping()
    seen.append(serving_gauge(SERVICE))

    assert seen == [1, 0, 1, 0]
    assert answered.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_loop_that_is_no_longer_active_reports_no_wait_behind_the_horizon() -> None:
    """Only the active loop steps and updates the held-back time: a standby, paused or failed one
    would otherwise keep showing a wait that is over."""
    metrics = ProjectionMetrics("unit-held-back")

    def held_back() -> float | None:
        return REGISTRY.get_sample_value("orders_projection_held_back_seconds", {"projection": "unit-held-back"})

    metrics.state("active")
    metrics.held_back(12.5)
    while_active = held_back()
    metrics.state("standby")

    assert (while_active, held_back()) == (12.5, 0)


async def test_a_wait_behind_the_horizon_counts_from_when_the_loop_is_active_again() -> None:
    """A loop held back, then standby, then active and held back again: the new wait starts at 0."""
    metrics = ProjectionMetrics("unit-held-again")
    progress = Progress("unit-held-again", 10, metrics)
    held = Batch(events=[], held_back=True)
    await progress.track_held_back(cast(Connection, None), held)
    progress._held_back = HeldBack(since=time.monotonic() - 60)  # a minute into the first wait

    progress.left_active()
    await progress.track_held_back(cast(Connection, None), held)

    assert progress.status()["held_back_seconds"] < 1
