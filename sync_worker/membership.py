"""Which worker should apply each partition: the workers register, and share the partitions out.

Every worker process runs a loop for every partition of its projections, but only the holder of a
partition's lease applies (sync_worker.lease). Left alone, the first worker to start would take
every lease and keep it. So the workers also register, per projection and partition count, in a
sorted set of worker ids scored by when their registration expires (Redis clock), and every loop
asks its process's Membership whether its partition is this worker's share:

    partition k (of every projection) goes to worker k mod N of the N registered, sorted by id

Every projection's partition k goes to the same worker: their loops then share each read of the
partition's rows from the log (sync_worker.reads.SharedReads), which halves what PostgreSQL scans
and the worker decodes. (Spreading the projections' partitions over different workers instead
made every partition read the log once per projection.) A loop holds its lease only while its
partition is this worker's share, and releases it as soon as it is not. So:

- a worker that joins registers, the shares move, the workers that lost one release it at their
  next step and the new worker takes it at its next look (a fifth of the lease ttl);
- a worker that stops deregisters and releases its leases: the others take over at once;
- a worker that dies stops renewing both: its registration and its leases expire after the lease
  ttl, and the survivors take its partitions then (takeover within the ttl and one renewal).

Shares decide who tries; the lease still decides who writes. Two workers that briefly disagree on
the members (one saw a join the other has not) may both want a partition: the lease lets one in,
and every batch's guarded write fences the other. A worker alone gets every partition, as before.
"""

from __future__ import annotations

import time

from orders.store.views import RedisClient, ViewKeys

# KEYS[1]: the members set. ARGV: worker id, ttl ms. Registers (or renews) the worker, drops the
# registrations that expired, and returns the live members' ids, sorted.
_REGISTER = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(members)
return members
"""


def share_of(partition: int, members: list[str]) -> str:
    """The worker whose share `partition` is, of the registered `members` sorted by id."""
    return members[partition % len(members)]


class Membership:
    """This worker's registration among the workers of one projection (at one partition count),
    and its share of the partitions. Shared by the process's loops of that projection."""

    def __init__(self, redis: RedisClient, keys: ViewKeys, worker_id: str, ttl: float) -> None:
        self._redis = redis
        self._key = keys.workers
        self.worker_id = worker_id
        self.ttl = ttl
        self._register = redis.register_script(_REGISTER)
        self._refreshed_at = -float("inf")
        self.members: list[str] = [worker_id]

    async def refresh(self) -> None:
        """Renews the registration and reads the members, at most every fifth of the ttl."""
        if time.monotonic() - self._refreshed_at < self.ttl / 5:
            return
        members = await self._register(keys=[self._key], args=[self.worker_id, int(self.ttl * 1000)])
        self.members = [m.decode() if isinstance(m, bytes) else m for m in members] or [self.worker_id]
        self._refreshed_at = time.monotonic()

    def owner(self, partition: int) -> str:
        """The worker whose share `partition` is, as far as this worker knows the members."""
        return share_of(partition, self.members)

    def is_mine(self, partition: int) -> bool:
        return self.owner(partition) == self.worker_id

    async def leave(self) -> None:
        """Deregisters (on a clean stop), so the others take this worker's partitions at once."""
        self._refreshed_at = -float("inf")
        await self._redis.zrem(self._key, self.worker_id)
