"""kill -9 of a worker that holds partitions: under command load, two worker processes share four
partitions of each projection; one is SIGKILLed; the survivor takes the dead worker's partitions
once its registration and leases expire (the lease ttl), and afterwards every acknowledged command
is in the log once, every event was applied once, in its order's partition, and the views of
every partition equal a replay of the log."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter

from orders.store.views import PROJECTION, PROJECTIONS, RedisClient, ViewKeys, get_many
from tests.faults.conftest import Cluster, Load, run_load_while
from tests.faults.test_worker_restart import log_head
from tests.helpers import all_events, assert_views_match_events, eventually

PARTITIONS = 4
LEASE_TTL = 2.0


def every_partition(cluster: Cluster) -> list[ViewKeys]:
    return [
        k for name in PROJECTIONS for k in ViewKeys(cluster.keys.prefix, name, partitions=PARTITIONS).all_partitions()
    ]


async def holders(redis: RedisClient, cluster: Cluster) -> Counter[bytes | str | None]:
    leases = await get_many(redis, [keys.lease for keys in every_partition(cluster)])
    return Counter(leases)


async def test_a_killed_workers_partitions_are_taken_over_within_the_lease_ttl(cluster: Cluster) -> None:
    await cluster.start_write_service()
    settings = {"ORDERS_PARTITIONS": str(PARTITIONS), "ORDERS_LEASE_TTL": str(LEASE_TTL)}
    await cluster.start_worker(ORDERS_WORKER_ID="worker-a", **settings)
    doomed = await cluster.start_worker(ORDERS_WORKER_ID="worker-b", **settings)
    redis = cluster.redis()
    load = Load(cluster.commands, clients=3)
    taken_over_after: list[float] = []

    async def kill_one_worker() -> None:
        async def shared() -> None:
            assert await holders(redis, cluster) == Counter({"worker-a": 4, "worker-b": 4})

        await eventually(shared, timeout=20)
        doomed.signal(signal.SIGKILL)
        await doomed.process.wait()
        killed_at = time.monotonic()

        async def all_taken() -> None:
            assert await holders(redis, cluster) == Counter({"worker-a": 8})

        await eventually(all_taken, timeout=10 * LEASE_TTL)
        taken_over_after.append(time.monotonic() - killed_at)
        await asyncio.sleep(1)  # the survivor applies the backlog under load

    try:
        await run_load_while(load, kill_one_worker)
        print(f"taken over {taken_over_after[0]:.2f}s after the kill (lease ttl {LEASE_TTL}s)")
        assert load.acked, "the load got no command through"
        token = await log_head(cluster)

        async def caught_up() -> None:
            checkpoints = await get_many(redis, [keys.checkpoint for keys in every_partition(cluster)])
            assert checkpoints == [token] * len(checkpoints)

        await eventually(caught_up, timeout=30)
        events = await all_events(cluster.servers.postgres_url)
        assert {e.metadata.get("command_id") for e in events} >= set(load.acked), "an acknowledged command is lost"
        for name in PROJECTIONS:
            partitions = ViewKeys(cluster.keys.prefix, name, partitions=PARTITIONS).all_partitions()
            applied = await get_many(redis, [keys.applied for keys in partitions])
            assert sum(int(n or 0) for n in applied) == len(events), f"{name}: events applied twice or skipped"
        partitioned = ViewKeys(cluster.keys.prefix, PROJECTION, partitions=PARTITIONS)
        await assert_views_match_events(cluster.servers.postgres_url, redis, partitioned)
    finally:
        await redis.aclose()
