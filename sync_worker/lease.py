"""Which sync worker applies the projection: the holder of a lease in Redis.

Several workers may run for availability; only the lease holder applies
batches, the others stand by. The holder renews the lease (and writes its
heartbeat) at least every `ttl / 5` seconds from its main loop, so a worker
that dies or freezes loses the lease after `ttl` and a standby takes over.
The lease also fences writes: a batch's guarded write script compares the
lease holder with this worker and writes nothing otherwise, so a frozen worker
that wakes up after losing its lease cannot apply anything. Readers of the
heartbeat (the read service's projection health) use orders.store.heartbeat.

The lease names a worker id, not a process: a worker that restarts under the same id
(ORDERS_WORKER_ID: the pod name, orders-local's fixed name) finds its own id in the lease and
takes it back at once, while a worker of another id waits until it expires. Two live processes
under one id would both pass the lease check; the checkpoint guard of every batch still keeps them
from applying anything twice, but ids should be unique among the workers running at once.

Times come from the Redis server's clock (TIME), so readers of the heartbeat
on other hosts need no synchronised clocks.
"""

from __future__ import annotations

import json
import time
from typing import Any

from orders.store.views import RedisClient, ViewKeys

# KEYS: lease, heartbeat, paused flag. ARGV: worker id, ttl ms, heartbeat JSON without its time.
# Returns 0 when another worker holds the lease, 1 when held, 2 when held but paused by an operator.
_HOLD = """
redis.replicate_commands()
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local now = redis.call('TIME')
local beat = cjson.decode(ARGV[3])
beat['at_ms'] = now[1] * 1000 + math.floor(now[2] / 1000)
local paused = redis.call('EXISTS', KEYS[3]) == 1
if paused then beat['state'] = 'paused' end
redis.call('SET', KEYS[2], cjson.encode(beat))
if paused then return 2 end
return 1
"""

# KEYS: lease. ARGV: worker id.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    def __init__(self, redis: RedisClient, keys: ViewKeys, worker_id: str, ttl: float) -> None:
        self._keys = keys
        self.worker_id = worker_id
        self.ttl = ttl
        self._hold = redis.register_script(_HOLD)
        self._release = redis.register_script(_RELEASE)
        self._renewed_at = -float("inf")
        self.paused = False

    @property
    def held(self) -> bool:
        """Whether this worker took or renewed the lease last time it tried (and has not released it)."""
        return self._renewed_at > -float("inf")

    @property
    def renew_every(self) -> float:
        return self.ttl / 5

    async def hold(self, status: dict[str, Any]) -> bool:
        """Takes or renews the lease and writes the heartbeat; False while another worker holds it.
        Also refreshes `paused`: whether an operator has paused the projection."""
        if time.monotonic() - self._renewed_at < self.renew_every:
            return True
        beat = json.dumps({"worker": self.worker_id, **status})
        outcome = int(
            await self._hold(
                keys=[self._keys.lease, self._keys.heartbeat, self._keys.paused],
                args=[self.worker_id, int(self.ttl * 1000), beat],
            )
        )
        self.paused = outcome == 2
        self._renewed_at = time.monotonic() if outcome else -float("inf")
        return outcome > 0

    async def release(self) -> None:
        """Lets a standby take over at once (on a clean stop) instead of after the ttl."""
        self._renewed_at = -float("inf")
        await self._release(keys=[self._keys.lease], args=[self.worker_id])

    def forget(self) -> None:
        """Called when a write found the lease gone: take it again before the next batch."""
        self._renewed_at = -float("inf")
