"""`orders-admin drop-partitioning`: deletes every key of one partition count, the last step of
changing ORDERS_PARTITIONS (docs/operations.md, "Changing the partition count").

The partition count is inside every key's hash tag (`orders:{orders:2/4}:order:42`), so a new count
is built beside the old one and the old one's keys stay until they are deleted here. It talks to
Redis directly (ORDERS_REDIS_URL, ORDERS_REDIS_PREFIX: run it where a sync worker's settings are,
e.g. `kubectl exec` into a worker pod) and refuses while any partition of that count has a worker
heartbeat younger than `stale_after`: workers of the count must be gone first. Readers leave no
trace in Redis; switching them to the new count first is the operator's step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from orders.store.heartbeat import read_heartbeat
from orders.store.views import PROJECTIONS, RedisClient, ViewKeys

DELETE_BATCH = 1000


class WorkersStillRunning(Exception):
    """A partition of the count to drop has a live worker."""


@dataclass(frozen=True)
class Dropped:
    partitions: int
    keys: int  # deleted (or, in a dry run, found)


def partition_keys(prefix: str, partitions: int) -> list[ViewKeys]:
    """Every partition of every projection at this count."""
    return [keys for name in PROJECTIONS for keys in ViewKeys(prefix, name, partitions=partitions).all_partitions()]


def glob_escape(text: str) -> str:
    """`text` matched literally in a SCAN pattern (a prefix may hold *, ?, [ or ])."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


async def live_workers(redis: RedisClient, prefix: str, partitions: int, stale_after: float) -> list[str]:
    """The partitions of this count whose worker has beaten within `stale_after` seconds."""
    live = []
    for keys in partition_keys(prefix, partitions):
        beat, age = await read_heartbeat(redis, keys)
        if beat is not None and age <= stale_after:
            live.append(f"{keys.name} (worker {beat.get('worker')}, {age:.1f}s ago)")
    return live


async def drop_partitioning(
    redis: RedisClient, prefix: str, partitions: int, *, stale_after: float = 30.0, dry_run: bool = False
) -> Dropped:
    """Deletes (or with `dry_run` counts) every key of partition count `partitions` under `prefix`:
    one SCAN per projection over the whole keyspace (every node of a cluster), keys grouped by
    partition so that each DEL touches one slot. Raises WorkersStillRunning first if any partition
    of that count still has a live worker."""
    live = await live_workers(redis, prefix, partitions, stale_after)
    if live:
        raise WorkersStillRunning(
            f"partitions of count {partitions} still have live workers: {', '.join(live)}; "
            "remove those workers first (and switch the read services to the new count)"
        )
    by_partition = {keys.pprefix for keys in partition_keys(prefix, partitions)}
    found = 0
    for name in PROJECTIONS:
        pattern = f"{glob_escape(prefix)}{{{name}:*/{partitions}}}:*"
        batches: dict[str, list[str]] = {}
        async for key in redis.scan_iter(match=pattern, count=DELETE_BATCH):
            owner = _pprefix_of(str(key), prefix)
            if owner not in by_partition:
                continue  # the glob's * matched across more than one tag: not a key of this count
            batch = batches.setdefault(owner, [])
            batch.append(str(key))
            if len(batch) >= DELETE_BATCH:
                found += len(batch) if dry_run else int(await redis.delete(*batch))
                batch.clear()
        for batch in batches.values():
            if batch:
                found += len(batch) if dry_run else int(await redis.delete(*batch))
    for name in PROJECTIONS:  # the membership key has no tag: a slot of its own
        workers = ViewKeys(prefix, name, partitions=partitions).workers
        found += int(await (redis.exists(workers) if dry_run else redis.delete(workers)))
    return Dropped(partitions, found)


def _pprefix_of(key: str, prefix: str) -> str:
    """The partition prefix a key starts with: the configured prefix, then its hash tag and a colon."""
    end = key.find("}:", len(prefix))
    return key[: end + 2] if end >= 0 else ""
