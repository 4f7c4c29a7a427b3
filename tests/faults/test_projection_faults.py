"""Faults on the projection side: transactions that hold the projection back, frozen and killed
workers, and several workers at once."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter

import asyncpg
import grpc
import pytest
from google.rpc.error_details_pb2 import RetryInfo

from orders.store.heartbeat import read_heartbeat
from orders.v1 import commands_pb2 as cmd
from orders.v1 import queries_pb2 as qry
from orders.v1 import queries_pb2_grpc
from read_service.projection_health import NOT_SERVING, PROJECTION_SERVICE, SERVING
from tests.faults.conftest import Cluster, Load, assert_consistent, run_load_while
from tests.helpers import create_request, eventually, held_transaction, rich_details
from tests.integration.test_no_skip import writer


async def test_open_transaction_delays_the_projection_visibly_but_never_stalls_it(cluster: Cluster) -> None:
    """An idle-in-transaction session holds the views back; the cause shows in the heartbeat and the
    log; when the server ends that session the views catch up, skipping nothing."""
    await cluster.start_write_service()
    await cluster.start_read_service()
    worker = await cluster.start_worker()
    redis = cluster.redis()
    async with held_transaction(cluster.servers.postgres_url) as blocker:
        blocker_pid = await blocker.fetchval("SELECT pg_backend_pid()")
        await blocker.execute("SET idle_in_transaction_session_timeout = '6s'")  # the server will end it
        started = time.monotonic()
        result = (await cluster.commands.CreateOrder(create_request(order_id="behind"))).result
        with pytest.raises(grpc.aio.AioRpcError) as early:
            await cluster.queries.GetOrder(
                qry.GetOrderRequest(order_id="behind", consistency_token=result.consistency_token), timeout=0.5
            )

        async def cause_visible() -> None:
            beat, _ = await read_heartbeat(redis, cluster.keys)
            assert beat is not None
            assert beat["held_back_by"] is not None
            assert beat["held_back_by"]["pid"] == blocker_pid
            assert beat["held_back_seconds"] >= 2

        await eventually(cause_visible, timeout=6)
        assert not await redis.exists(cluster.keys.order("behind")), "the view should still wait"
        reply = await cluster.queries.GetOrder(
            qry.GetOrderRequest(order_id="behind", consistency_token=result.consistency_token), timeout=15
        )
    waited = time.monotonic() - started

    assert early.value.code() == grpc.StatusCode.UNAVAILABLE  # not visible yet, and not NOT_FOUND
    assert reply.consistency.stale is False
    print(f"held-open transaction: caught up {waited:.1f}s after the command")
    assert 5 < waited < 15, f"caught up {waited:.1f}s after the command"
    assert f"'pid': {blocker_pid}" in worker.log
    assert "projection held back" in worker.log
    await redis.aclose()
    await assert_consistent(cluster)


async def test_rolled_back_and_slow_transactions_under_load_skip_nothing(cluster: Cluster) -> None:
    """Commands through gRPC mixed with raw transactions that commit late or roll back: the views
    end up with exactly the committed events."""
    await cluster.start_write_service()
    await cluster.start_worker(ORDERS_BATCH_SIZE="7")
    load = Load(cluster.commands, seed=8)
    committed: list[str] = []

    async def side_writers() -> None:
        rng = random.Random(8)
        await asyncio.gather(
            *(writer(cluster.servers.postgres_url, random.Random(rng.random()), 30, committed) for _ in range(4))
        )

    await run_load_while(load, side_writers)

    assert len(committed) > 50
    await assert_consistent(cluster, load)


async def test_frozen_worker_is_reported_by_health_and_an_idle_one_is_not(cluster: Cluster) -> None:
    """SIGSTOP the worker while commands keep coming: health turns NOT_SERVING within seconds even
    though no lag is measured; an idle system never raises that alarm; SIGCONT heals it."""
    await cluster.start_write_service()
    await cluster.start_read_service()
    worker = await cluster.start_worker()

    async def serving() -> None:
        assert await cluster.health(PROJECTION_SERVICE) == SERVING

    await eventually(serving)
    idle_samples = []
    for _ in range(16):  # 8 s of an idle system: more than twice the heartbeat timeout
        idle_samples.append(await cluster.health(PROJECTION_SERVICE))
        await asyncio.sleep(0.5)

    worker.signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    load = Load(cluster.commands, seed=9, clients=2)

    async def wait_for_alarm() -> None:
        async def alarmed() -> None:
            assert await cluster.health(PROJECTION_SERVICE) == NOT_SERVING

        await eventually(alarmed, timeout=15)

    await run_load_while(load, wait_for_alarm)
    detected_after = time.monotonic() - frozen_at
    worker.signal(signal.SIGCONT)
    await eventually(serving, timeout=10)

    print(f"frozen worker: NOT_SERVING after {detected_after:.1f}s; idle samples {idle_samples}")
    assert set(idle_samples) == {SERVING}
    assert detected_after < 6
    await assert_consistent(cluster, load)


async def test_standby_takes_over_when_the_active_worker_is_killed(cluster: Cluster) -> None:
    """Two workers: one applies, one stands by. SIGKILL the active one under load: the standby takes
    over within a few seconds, and no event is applied twice across the handover."""
    await cluster.start_write_service()
    workers = {name: await cluster.start_worker(ORDERS_WORKER_ID=name) for name in ("w1", "w2")}
    redis = cluster.redis()
    load = Load(cluster.commands, seed=10)
    handover: dict[str, object] = {}

    async def kill_active() -> None:
        await asyncio.sleep(1.5)
        beat, _ = await read_heartbeat(redis, cluster.keys)
        assert beat is not None
        active = str(beat["worker"])
        standby = "w2" if active == "w1" else "w1"
        workers[active].signal(signal.SIGKILL)
        killed_at = time.monotonic()

        async def taken_over() -> None:
            beat, age = await read_heartbeat(redis, cluster.keys)
            assert beat is not None
            assert (beat["worker"], age < 1) == (standby, True)

        await eventually(taken_over, timeout=10)
        handover.update(active=active, standby=standby, seconds=time.monotonic() - killed_at)
        await asyncio.sleep(1.5)

    await run_load_while(load, kill_active)
    await assert_consistent(cluster, load)
    applied = int(await redis.get(cluster.keys.applied) or 0)
    events = await _event_count(cluster)
    await redis.aclose()

    print(f"handover: {handover} applied={applied} events={events}")
    assert float(str(handover["seconds"])) < 5  # lease ttl is 2 s in the fault suite
    assert applied == events, "an event was applied twice (or not at all)"
    assert "is now standby" in workers[str(handover["standby"])].log
    assert "is now active" in workers[str(handover["standby"])].log


async def test_frozen_active_worker_is_fenced_after_the_standby_took_over(cluster: Cluster) -> None:
    """SIGSTOP the active worker: the standby takes over; when the frozen one wakes up it cannot apply
    anything, because its lease is gone, so nothing is applied twice."""
    await cluster.start_write_service()
    workers = {name: await cluster.start_worker(ORDERS_WORKER_ID=name) for name in ("w1", "w2")}
    redis = cluster.redis()
    load = Load(cluster.commands, seed=11)

    async def freeze_active() -> None:
        await asyncio.sleep(1.0)
        beat, _ = await read_heartbeat(redis, cluster.keys)
        assert beat is not None
        active = str(beat["worker"])
        workers[active].signal(signal.SIGSTOP)

        async def taken_over() -> None:
            beat, _ = await read_heartbeat(redis, cluster.keys)
            assert beat is not None
            assert beat["worker"] != active

        await eventually(taken_over, timeout=10)
        await asyncio.sleep(1.0)
        workers[active].signal(signal.SIGCONT)
        await asyncio.sleep(2.0)

    await run_load_while(load, freeze_active)
    await assert_consistent(cluster, load)
    applied = int(await redis.get(cluster.keys.applied) or 0)
    events = await _event_count(cluster)
    await redis.aclose()

    assert applied == events, "an event was applied twice (or not at all)"


async def test_mixed_load_for_minutes_skips_and_doubles_nothing(cluster: Cluster) -> None:
    """Many clients on many orders, with slow and rolled-back transactions beside them, for
    ORDERS_SOAK_SECONDS (default 120): every view equals the fold, every event applied exactly once,
    and every acknowledged write reads back with its consistency token (retried as the API allows)."""
    seconds = float(os.environ.get("ORDERS_SOAK_SECONDS", "120"))
    await cluster.start_write_service()
    await cluster.start_read_service()
    for name in ("w1", "w2"):
        await cluster.start_worker(ORDERS_WORKER_ID=name, ORDERS_BATCH_SIZE="50")
    load = Load(cluster.commands, seed=12, clients=8)
    committed: list[str] = []
    reads: Counter[str] = Counter()

    async def soak() -> None:
        deadline = time.monotonic() + seconds
        rng = random.Random(12)
        queries = cluster.queries
        while time.monotonic() < deadline:
            await writer(cluster.servers.postgres_url, random.Random(rng.random()), 10, committed)
            for result in list(load.acked.values())[-20:]:
                await _read_own_write(queries, result, reads)

    await run_load_while(load, soak)
    await assert_consistent(cluster, load)
    redis = cluster.redis()
    applied = int(await redis.get(cluster.keys.applied) or 0)
    await redis.aclose()
    summary = {"acked": len(load.acked), "side_commits": len(committed), "errors": dict(load.errors), "reads": reads}
    print(json.dumps(summary))

    assert applied == await _event_count(cluster)
    assert reads["fresh"] > 0
    assert len(load.acked) > 100


# What docs/errors.md lets a client retry on a query: UNAVAILABLE (after RetryInfo's delay, which
# VIEWS_NOT_READY, "the wait ended", carries) and DEADLINE_EXCEEDED. Anything else fails the test.
_RETRYABLE_QUERY_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_BACKOFF_WITHOUT_RETRY_INFO = 0.5
# Far beyond a consistency wait (5 s) plus a worker handover (lease 2 s): only views that never
# reach the token (a stuck or skipping projection) exhaust it.
_READ_RETRY_BUDGET = 30.0


async def _read_own_write(
    queries: queries_pb2_grpc.OrderQueriesStub, result: cmd.CommandResult, reads: Counter[str]
) -> None:
    """GetOrder with the command's consistency token, as a careful client reads its own write.

    It retries what the API calls retryable, and also a reply marked stale (views that had not
    reached the token when the wait ended), within a budget; the fresh reply must show the write.
    `reads` counts the outcomes: "fresh", "stale", and the retried status codes.
    """
    request = qry.GetOrderRequest(order_id=result.order_id, consistency_token=result.consistency_token)
    give_up_at = time.monotonic() + _READ_RETRY_BUDGET
    while True:
        try:
            reply = await queries.GetOrder(request, timeout=5)
        except grpc.aio.AioRpcError as error:
            if error.code() not in _RETRYABLE_QUERY_CODES:
                raise AssertionError(f"read failed: {error.code()} {error.details()}") from error
            outcome, last = error.code().name, f"{error.code()} {error.details()}"
            delay = _retry_delay(error) or _BACKOFF_WITHOUT_RETRY_INFO
        else:
            if not reply.consistency.stale:
                assert reply.order.version >= result.version, f"{result.order_id} misses the acknowledged write"
                reads["fresh"] += 1
                return
            outcome, last, delay = "stale", "a stale reply", _BACKOFF_WITHOUT_RETRY_INFO
        reads[outcome] += 1
        if time.monotonic() + delay > give_up_at:
            raise AssertionError(f"{result.order_id} still unread after {_READ_RETRY_BUDGET:.0f} s: {last}")
        await asyncio.sleep(delay)


def _retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The delay of the error's RetryInfo, if it carries one (transport-level errors carry no details)."""
    if not dict(error.trailing_metadata() or ()).get("grpc-status-details-bin"):
        return None
    retry = rich_details(error).get("RetryInfo")
    return retry.retry_delay.ToTimedelta().total_seconds() if isinstance(retry, RetryInfo) else None


async def _event_count(cluster: Cluster) -> int:
    conn = await asyncpg.connect(cluster.servers.postgres_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()
