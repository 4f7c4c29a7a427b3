"""A sync worker SIGKILLed and started again: under its own (pinned) id it takes its lease back at
once; under another id it stands by until the dead worker's lease has expired (sync_worker.lease).

Times are compared on the Redis server's clock, the one the lease expires by: the dead lease's
expiry is read as TIME + PTTL the moment after the kill."""

from __future__ import annotations

import signal

from orders.store.event_store import head, open_connection
from orders.store.heartbeat import read_heartbeat
from orders.store.views import RedisClient, ViewKeys
from tests.faults.conftest import Cluster, Service, assert_consistent
from tests.helpers import create_request, eventually

# KEYS[1]: a lease. Its holder, its ttl (ms) and the server's time, in one step (a script, which a
# cluster client sends to the lease's node, unlike a pipeline with TIME).
_LEASE_NOW = """
local now = redis.call('TIME')
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1]), now[1], now[2]}
"""


async def lease_now(redis: RedisClient, keys: ViewKeys) -> tuple[str | None, int, int]:
    """The lease's holder, when it expires and the time now (ms, Redis clock), read in one step."""
    holder, ttl_ms, seconds, micros = await redis.eval(_LEASE_NOW, 1, keys.lease)
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    return holder, now_ms + int(ttl_ms), now_ms


async def log_head(cluster: Cluster) -> str:
    conn = await open_connection(cluster.servers.postgres_url)
    try:
        last = await head(conn)
    finally:
        await conn.close()
    assert last is not None
    return last.token()


async def write_and_wait(cluster: Cluster, redis: RedisClient, order_id: str) -> None:
    """Creates an order and waits until the views have it."""
    await cluster.commands.CreateOrder(create_request(order_id=order_id))
    token = await log_head(cluster)

    async def applied() -> None:
        assert await redis.get(cluster.keys.checkpoint) == token

    await eventually(applied, timeout=20)


async def kill(worker: Service) -> None:
    worker.signal(signal.SIGKILL)
    await worker.process.wait()


async def test_worker_restarted_under_its_own_id_takes_its_lease_back_at_once(cluster: Cluster) -> None:
    """With a 60 s lease: a worker SIGKILLed and started again under the same ORDERS_WORKER_ID applies
    the events written while it was down long before its dead predecessor's lease would have expired."""
    await cluster.start_write_service()
    pinned = {"ORDERS_WORKER_ID": "worker-a", "ORDERS_LEASE_TTL": "60"}
    first = await cluster.start_worker(**pinned)
    redis = cluster.redis()
    await write_and_wait(cluster, redis, "before-the-crash")
    await kill(first)
    holder, dead_lease_expires_ms, _ = await lease_now(redis, cluster.keys)
    await cluster.commands.CreateOrder(create_request(order_id="while-down"))
    token = await log_head(cluster)

    second = await cluster.start_worker(**pinned)

    async def caught_up() -> None:
        assert await redis.get(cluster.keys.checkpoint) == token

    await eventually(caught_up, timeout=40)  # less than the lease's 60 s
    _, _, caught_up_ms = await lease_now(redis, cluster.keys)
    beat, _ = await read_heartbeat(redis, cluster.keys)
    await redis.aclose()

    print(f"same id: caught up with {(dead_lease_expires_ms - caught_up_ms) / 1000:.1f}s of the dead 60 s lease left")
    assert holder == "worker-a"
    assert second.pid != first.pid
    assert caught_up_ms < dead_lease_expires_ms, "waited for its own dead lease to expire"
    assert beat is not None
    assert beat["worker"] == "worker-a"
    assert "worker worker-a is now standby" not in second.log
    await assert_consistent(cluster)


async def test_worker_restarted_under_another_id_waits_for_the_dead_lease_to_expire(cluster: Cluster) -> None:
    """With a 10 s lease: a worker of another id started after the active one was SIGKILLed stands by
    and applies nothing while the dead lease lives, then takes over once it has expired."""
    await cluster.start_write_service()
    ttl = {"ORDERS_LEASE_TTL": "10"}
    first = await cluster.start_worker(ORDERS_WORKER_ID="worker-a", **ttl)
    redis = cluster.redis()
    await write_and_wait(cluster, redis, "before-the-crash")
    applied_before = await redis.get(cluster.keys.checkpoint)
    await kill(first)
    _, dead_lease_expires_ms, _ = await lease_now(redis, cluster.keys)
    await cluster.commands.CreateOrder(create_request(order_id="while-down"))
    token = await log_head(cluster)

    second = await cluster.start_worker(ORDERS_WORKER_ID="worker-b", **ttl)
    await second.wait_for_log("worker worker-b is now standby")
    async with redis.pipeline(transaction=True) as pipe:  # one moment: whose lease, and what is applied
        pipe.get(cluster.keys.lease)
        pipe.get(cluster.keys.checkpoint)
        holder_while_standby, checkpoint_while_standby = await pipe.execute()

    async def taken_over() -> None:
        assert await redis.get(cluster.keys.checkpoint) == token

    await eventually(taken_over, timeout=30)
    _, _, caught_up_ms = await lease_now(redis, cluster.keys)
    beat, _ = await read_heartbeat(redis, cluster.keys)
    await redis.aclose()

    print(f"other id: caught up {(caught_up_ms - dead_lease_expires_ms) / 1000:.1f}s after the dead lease expired")
    assert holder_while_standby == "worker-a", "the dead lease expired before the check: raise the ttl"
    assert checkpoint_while_standby == applied_before  # nothing applied while the dead lease lived
    assert beat is not None
    assert beat["worker"] == "worker-b"
    assert caught_up_ms >= dead_lease_expires_ms - 1  # 1 ms: PTTL rounds down
    assert "worker worker-b is now active" in second.log
    await assert_consistent(cluster)
