"""A projection's heartbeat in Redis: the active sync worker writes it with its lease
(sync_worker.lease); the read service's projection health and the admin API read it here.

The age comes from the Redis server's clock (TIME), so readers on other hosts need no
synchronised clocks.
"""

from __future__ import annotations

import json
from typing import Any

from orders.store.views import RedisClient, ViewKeys

# KEYS: heartbeat. Returns the heartbeat and the server's time in ms.
_READ_HEARTBEAT = """
local now = redis.call('TIME')
return {redis.call('GET', KEYS[1]), tostring(now[1] * 1000 + math.floor(now[2] / 1000))}
"""


async def read_heartbeat(redis: RedisClient, keys: ViewKeys) -> tuple[dict[str, Any] | None, float]:
    """The active worker's last heartbeat and its age in seconds by the Redis clock (inf if none)."""
    raw, now_ms = await redis.register_script(_READ_HEARTBEAT)(keys=[keys.heartbeat])
    if raw is None:
        return None, float("inf")
    beat: dict[str, Any] = json.loads(raw)
    return beat, (int(now_ms) - int(beat["at_ms"])) / 1000
