"""A Redis Cluster master fails over under command load (issue 15): the services run as processes on
a local cluster of three masters and three replicas; the master serving the orders projection's
partition is kill -9ed after its replica has stopped receiving its writes, so the promoted replica
lacks the last acknowledged batches (asynchronous replication loses them in a real crash too). The
projection must notice that its checkpoint went back and apply those events again from the log.

Afterwards: no acknowledged command lost or doubled, the views equal a replay of the log, each
projection applied every event exactly once (`applied` == events), and readers reading known and
changing orders without a token got UNAVAILABLE, DEADLINE_EXCEEDED or a stale flag while it
happened, never an older unflagged answer, nor NOT_FOUND for an order they had been shown."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter

import grpc
import redis

from orders.store.views import PROJECTIONS, get_many
from orders.tools.cluster import ClusterNode, LocalCluster
from orders.v1 import queries_pb2 as qry
from tests.faults.conftest import Cluster, Load, assert_consistent, run_load_while
from tests.faults.test_monotonic_reads import Answer, known_orders, sample, unflagged_decreases
from tests.helpers import all_events

CUT_FOR = 0.5  # seconds the master takes writes that its replica never gets


async def test_a_master_killed_under_load_loses_nothing_and_no_read_goes_back(cluster_world: Cluster) -> None:
    await fail_over_under_load(cluster_world, workers=1)


async def test_partitions_over_the_masters_survive_one_failing_over(partitioned_cluster_world: Cluster) -> None:
    """Three partitions of each projection, spread by their hash tags over the three masters and
    shared by two workers: the master of one partition of the orders projection fails over; that
    partition goes back and applies its lost batches again while the others go on."""
    await fail_over_under_load(partitioned_cluster_world, workers=2)


async def fail_over_under_load(world: Cluster, workers: int) -> None:
    local = world.servers.redis_cluster
    assert local is not None
    await world.start_write_service()
    await world.start_read_service()
    for n in range(workers):
        await world.start_worker(ORDERS_BATCH_SIZE="20", ORDERS_WORKER_ID=f"worker-{n}")
    order_ids = await known_orders(world)
    load = Load(world.commands, seed=15, clients=4)
    answers: list[Answer] = []
    errors: Counter[str] = Counter()
    checkpoints: dict[str, str | None] = {}

    async def fault() -> None:
        readers = [asyncio.create_task(sample(world, order_ids, answers, errors)) for _ in range(2)]
        readers += [asyncio.create_task(sample_changing(world, load, answers, errors)) for _ in range(2)]
        try:
            await asyncio.sleep(1.5)
            checkpoints.update(await asyncio.to_thread(kill_the_master_after_cutting_its_replica, local, world))
            await asyncio.sleep(3.0)  # the worker re-applies what was lost; the load goes on
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    await run_load_while(load, fault)

    stale = sum(answer.stale for answer in answers)
    print(f"failover: checkpoints {checkpoints}; {len(answers)} answers, {stale} stale, errors {dict(errors)}")
    assert checkpoints["replica"] != checkpoints["master"], "the replica had every write: nothing was lost"
    assert answers
    assert errors.keys() <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert unflagged_decreases(answers) == []
    await assert_consistent(world, load)
    await assert_applied_once(world)


def kill_the_master_after_cutting_its_replica(local: LocalCluster, world: Cluster) -> dict[str, str | None]:
    """Stops the replication of the master serving the orders projection's keys (its replica can no
    longer authenticate to it), lets it take writes for CUT_FOR seconds, then kills it -9 and waits
    for the replica's promotion. Returns the checkpoint each had at the kill."""
    key = world.keys.checkpoint
    master = local.master_of(key)
    [replica] = local.replicas_of(master)
    replica.command("CONFIG SET", "masteruser", "no-such-user")  # its reconnections now fail to AUTH
    replica.command("CONFIG SET", "masterauth", "no-such-password")
    master.command("CLIENT KILL TYPE", "replica")
    time.sleep(CUT_FOR)
    seen = {"master": master.command("GET", key), "replica": read_on_replica(replica, key)}
    failover = local.fail_over_master(kill=True, key=key)
    assert failover.new_master is replica
    return seen


def read_on_replica(replica: ClusterNode, key: str) -> str | None:
    with contextlib.closing(redis.Redis(port=replica.port, decode_responses=True, socket_timeout=5)) as client:
        client.execute_command("READONLY")  # type: ignore[no-untyped-call]
        value = client.get(key)
    return None if value is None else str(value)


async def sample_changing(world: Cluster, load: Load, answers: list[Answer], errors: Counter[str]) -> None:
    """Reads orders the load is changing, without a token, until cancelled: a NOT_FOUND is recorded
    as version 0, so one after an answer that showed the order counts as going back."""
    rng = random.Random(15)
    while True:
        acknowledged = [result.order_id for result in list(load.acked.values())[-200:]]
        if not acknowledged:
            await asyncio.sleep(0.05)
            continue
        order_id, sent = rng.choice(acknowledged), time.monotonic()
        try:
            reply = await world.queries.GetOrder(qry.GetOrderRequest(order_id=order_id), timeout=1)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                answers.append(Answer(order_id, 0, False, sent, time.monotonic()))
            else:
                errors[error.code().name] += 1
                await asyncio.sleep(0.01)
            continue
        answers.append(Answer(order_id, reply.order.version, reply.consistency.stale, sent, time.monotonic()))


async def assert_applied_once(world: Cluster) -> None:
    """Each projection's count of applied events equals the log's length: the events the failover
    lost were applied again, and none twice."""
    events = len(await all_events(world.servers.postgres_url))
    client = world.redis()
    try:
        applied = {}
        for name in PROJECTIONS:
            counts = await get_many(client, [keys.applied for keys in world.keys.of(name).all_partitions()])
            applied[name] = sum(int(count or 0) for count in counts)
    finally:
        await client.aclose()
    assert applied == dict.fromkeys(PROJECTIONS, events)
