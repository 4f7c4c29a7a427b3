"""The read service's projection health with partitioned projections: a projection serves only
while every partition has a live, healthy owner, and each partition's owner age is a gauge."""

from __future__ import annotations

import json

import pytest
from grpc_health.v1 import health
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from orders.server.readiness import Readiness
from orders.store.views import PROJECTIONS, ViewKeys
from read_service.projection_health import ProjectionHealth

PARTITIONS = 2


async def beat(redis: Redis, keys: ViewKeys, age_s: float = 0.0, state: str = "active") -> None:
    """A heartbeat as the partition's worker writes it (sync_worker.lease), `age_s` old by Redis's clock."""
    seconds, micros = await redis.time()
    at_ms = seconds * 1000 + micros // 1000 - int(age_s * 1000)
    heartbeat = {"worker": f"w-{keys.partition}", "state": state, "error": "poison event", "at_ms": at_ms}
    await redis.set(keys.heartbeat, json.dumps(heartbeat))


def every_partition(keys: ViewKeys) -> list[ViewKeys]:
    return [k for name in PROJECTIONS for k in ViewKeys(keys.prefix, name, partitions=PARTITIONS).all_partitions()]


def serving(service: str) -> float | None:
    return REGISTRY.get_sample_value("orders_health_serving", {"service": service})


def owner_age(name: str) -> float | None:
    return REGISTRY.get_sample_value("orders_projection_owner_age_seconds", {"projection": name})


def projection_health(redis: Redis, keys: ViewKeys) -> ProjectionHealth:
    servicer = health.aio.HealthServicer()
    return ProjectionHealth(redis, keys, servicer, Readiness(), 5.0, start_grace=0, partitions=PARTITIONS)


async def test_every_partition_with_a_live_owner_serves(redis: Redis, keys: ViewKeys) -> None:
    for partition in every_partition(keys):
        await beat(redis, partition, age_s=1.0)

    await projection_health(redis, keys).check()

    assert [serving(s) for s in ("orders.projection", "orders.projection.orders")] == [1, 1]
    ages = [owner_age(f"{name}/{k}") for name in PROJECTIONS for k in range(PARTITIONS)]
    assert all(age is not None and 1.0 <= age < 4.0 for age in ages), ages


async def test_one_partition_without_an_owner_takes_its_projection_out(
    redis: Redis, keys: ViewKeys, caplog: pytest.LogCaptureFixture
) -> None:
    """orders/1's worker stopped an hour ago: orders (and so the whole) is NOT_SERVING and says which
    partition; customer_summary still serves; the gauge shows the hour."""
    for partition in every_partition(keys):
        await beat(redis, partition, age_s=3600 if partition.name == "orders/1" else 0)

    await projection_health(redis, keys).check()

    assert serving("orders.projection.orders") == 0
    assert serving("orders.projection.customer_summary") == 1
    assert serving("orders.projection") == 0
    assert 3600 <= (owner_age("orders/1") or 0) < 3610
    assert "orders/1: no sync worker heartbeat" in caplog.text


async def test_a_partition_never_owned_is_an_infinite_age(redis: Redis, keys: ViewKeys) -> None:
    for partition in every_partition(keys):
        if partition.name != "customer_summary/0":
            await beat(redis, partition)

    await projection_health(redis, keys).check()

    assert owner_age("customer_summary/0") == float("inf")
    assert serving("orders.projection.customer_summary") == 0


async def test_a_partition_stopped_on_an_error_takes_its_projection_out(
    redis: Redis, keys: ViewKeys, caplog: pytest.LogCaptureFixture
) -> None:
    for partition in every_partition(keys):
        await beat(redis, partition, state="failed" if partition.name == "customer_summary/1" else "active")

    await projection_health(redis, keys).check()

    assert serving("orders.projection.customer_summary") == 0
    assert serving("orders.projection.orders") == 1
    assert "customer_summary/1: stopped on an error: poison event" in caplog.text
