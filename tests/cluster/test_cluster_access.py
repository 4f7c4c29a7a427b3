"""orders-setup-access on a Redis Cluster: the services' ACL users are set on every node (replicas
too, as a failover promotes one), and with them the cluster client finds the cluster and runs the
worker's guarded batch write and the reader's reads (tests/integration/test_least_privilege.py
checks each refusal on one Redis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import RedisCluster

from orders.store.views import ViewKeys, redis_client, run_script
from orders.tools.access import AccessSettings, Store, service_urls, setup_redis
from orders.tools.cluster import LocalCluster, available_binaries, running_cluster
from sync_worker.projector import _WRITE, BatchWrites, GuardedWrite

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not available_binaries(), reason="no redis-server")]

WORKER_PASSWORD, READER_PASSWORD = "w'rk @:/ er", "re ad#er"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with running_cluster() as started:
        yield started


@pytest.fixture
async def settings(cluster: LocalCluster) -> AsyncIterator[AccessSettings]:
    suffix = uuid.uuid4().hex[:8]
    wanted = AccessSettings(
        postgres_url="",
        redis_url=cluster.cluster_url,
        redis_prefix=f"acl:{suffix}:",
        writer_role="",
        writer_password="",
        worker_role="",
        worker_password="",
        redis_worker_user=f"worker-{suffix}",
        redis_worker_password=WORKER_PASSWORD,
        redis_reader_user=f"reader-{suffix}",
        redis_reader_password=READER_PASSWORD,
        stores=(Store.REDIS,),
    )
    admin = redis_client(cluster.cluster_url)
    try:
        yield wanted
    finally:
        for node in cluster.live_nodes():
            node.command("ACL DELUSER", wanted.redis_worker_user, wanted.redis_reader_user)
        await admin.aclose()


async def test_the_users_are_on_every_node_and_serve_the_cluster_client(
    cluster: LocalCluster, settings: AccessSettings
) -> None:
    admin = redis_client(cluster.cluster_url)
    try:
        report = await setup_redis(admin, settings)
    finally:
        await admin.aclose()
    users = (settings.redis_worker_user, settings.redis_reader_user)
    on_nodes = {
        (node.port, user): node.command("ACL GETUSER", user) is not None for node in cluster.nodes for user in users
    }

    urls = service_urls(settings)
    keys = ViewKeys(settings.redis_prefix)
    worker, reader = redis_client(urls.worker_redis_url), redis_client(urls.reader_redis_url)
    try:
        assert isinstance(worker, RedisCluster)
        writes = BatchWrites()
        writes.set(keys.order("o-1"), "view")
        writes.zadd(keys.index(), {"m": 0})
        writes.publish(keys.checkpoint_channel, "1-1")
        write = GuardedWrite(((keys.checkpoint, None),), tuple(writes.commands))
        script_keys, script_args = write.script_keys_and_args()
        written = await run_script(worker, _WRITE, script_keys, script_args)
        read = await reader.get(keys.order("o-1"))
    finally:
        await worker.aclose()
        await reader.aclose()

    assert report[0] == "Redis Cluster (6 nodes, users set on each):"
    assert "+cluster|slots +command" in report[1]
    assert on_nodes == dict.fromkeys(on_nodes, True)
    assert (written, read) == (1, "view")
    refused = [entry for node in cluster.nodes for entry in node.command("ACL LOG") if entry["username"] in users]
    assert refused == []


async def test_a_replica_promoted_by_a_failover_knows_the_users(
    cluster: LocalCluster, settings: AccessSettings
) -> None:
    admin = redis_client(cluster.cluster_url)
    try:
        await setup_redis(admin, settings)
    finally:
        await admin.aclose()
    key = ViewKeys(settings.redis_prefix).checkpoint
    failover = await asyncio.to_thread(cluster.fail_over_master, kill=False, key=key)  # graceful: keeps the data

    reader = redis_client(service_urls(settings).reader_redis_url)
    try:
        assert await reader.get(key) is None  # served by the new master, as the reader
    finally:
        await reader.aclose()
    assert failover.new_master.command("ACL GETUSER", settings.redis_reader_user) is not None
