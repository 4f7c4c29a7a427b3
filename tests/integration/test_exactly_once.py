"""Each event's effect lands in the views exactly once.

The checkpoint moves in the same MULTI/EXEC as the view writes, and applying
an event the view already has changes nothing, so neither a crash nor a
replayed batch can lose or double an effect.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from pathlib import Path

from orders.domain.consistency import LogPosition
from orders.store.event_store import head, open_connection, read_batch
from orders.store.views import OrderView, run_script
from orders.tools.processes import start_service
from sync_worker.projection import fold
from sync_worker.projector import OrdersProjector
from tests.helpers import (
    add_item_request,
    all_events,
    assert_views_match_events,
    create_request,
    eventually,
    views_in_redis,
)
from tests.integration.conftest import System

SNAPSHOT = """
local result = {redis.call('GET', KEYS[1])}
for _, key in ipairs(redis.call('KEYS', ARGV[1])) do
  result[#result + 1] = redis.call('GET', key)
end
return result
"""


async def make_orders(system: System, orders: int, items: int) -> None:
    for i in range(orders):
        order_id = (await system.commands.CreateOrder(create_request(f"c{i % 3}"))).result.order_id
        for j in range(items):
            await system.commands.AddItem(add_item_request(order_id, sku=f"S{j % 2}"))


async def test_replaying_applied_events_changes_nothing(system: System) -> None:
    """Re-applying every event after a checkpoint rollback leaves the views exactly as they were."""
    await make_orders(system, orders=4, items=3)
    await system.stop_worker()
    projector = OrdersProjector(system.redis, system.keys)
    conn = await open_connection(system.database_url)
    try:
        batch = await read_batch(conn, LogPosition(0, 0), 10_000)
        await projector.apply(await projector.checkpoint(), batch.events)
        before = await views_in_redis(system.redis, system.keys)
        await system.redis.set(system.keys.checkpoint, "0-0")  # as if the checkpoint had been lost

        await projector.apply(LogPosition(0, 0), batch.events)
    finally:
        await conn.close()

    assert await views_in_redis(system.redis, system.keys) == before
    assert {v.lines[0].quantity for v in before.values()} == {2}
    await assert_views_match_events(system.database_url, system.redis, system.keys)


async def test_checkpoint_and_views_are_never_seen_apart(system: System) -> None:
    """Every atomic snapshot of Redis shows views that are exactly the fold of the events up to its checkpoint."""
    await system.stop_worker()
    await make_orders(system, orders=6, items=4)
    events = await all_events(system.database_url)
    system.start_worker(batch_size=3)
    samples: list[tuple[str | None, list[bytes]]] = []
    last = max(LogPosition(e.tx_id, e.position) for e in events).token()
    while not samples or samples[-1][0] != last:
        reply = await run_script(system.redis, SNAPSHOT, [system.keys.checkpoint], [system.keys.order("*")], raw=True)
        samples.append((None if reply[0] is None else reply[0].decode(), reply[1:]))

    assert len({s[0] for s in samples}) > 3, "the sampler should see several intermediate checkpoints"
    for token, raw_views in samples:
        applied = (
            []
            if token in (None, "0-0")
            else [e for e in events if LogPosition(e.tx_id, e.position) <= LogPosition.parse(token)]
        )
        views = {v.order_id: v for v in map(OrderView.from_stored, raw_views)}
        assert views == fold(applied), f"views do not match checkpoint {token}"


async def test_worker_killed_mid_batch_leaves_views_equal_to_the_fold(system: System, tmp_path: Path) -> None:
    """SIGKILL at random moments, many times, during a stream of commands: the views still equal the fold."""
    await system.stop_worker()
    env = {
        **os.environ,
        "ORDERS_POSTGRES_URL": system.database_url,
        "ORDERS_REDIS_URL": system.redis_url,
        "ORDERS_REDIS_PREFIX": system.keys.prefix,
        "ORDERS_BATCH_SIZE": "2",
        "ORDERS_POLL_INTERVAL": "0.05",
        "ORDERS_LEASE_TTL": "0.3",  # a restarted worker takes over from the killed one quickly
        "ORDERS_LOG_LEVEL": "INFO",
    }
    rng = random.Random(7)
    load = asyncio.create_task(make_orders(system, orders=60, items=3))
    kills = 0
    while not load.done() or kills < 10:
        worker = await start_service("orders-sync-worker", env=env)
        await asyncio.sleep(rng.uniform(0.2, 0.6))
        worker.signal(signal.SIGKILL)
        await worker.process.wait()
        kills += 1
    await load
    conn = await open_connection(system.database_url)
    last = await head(conn)
    await conn.close()
    assert last is not None

    log_file = tmp_path / "worker.log"
    worker = await start_service("orders-sync-worker", env=env, log=log_file)
    try:

        async def caught_up() -> None:
            assert await system.redis.get(system.keys.checkpoint) == last.token()

        async def running() -> None:
            assert "tailing the event log" in log_file.read_text()

        await eventually(caught_up, timeout=30)
        await eventually(running)
    finally:
        assert await worker.stop(grace=10) == 0

    assert kills >= 10
    await assert_views_match_events(system.database_url, system.redis, system.keys)
