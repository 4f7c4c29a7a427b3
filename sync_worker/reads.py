"""What a step of a projection's loop reads, and how it saves reads.

- The step's state (StepStates): the generation pointers, the live checkpoint and whether operators'
  requests or retired generations wait, in one round trip (a read-only script over the partition's
  keys, so that it runs on one Redis and on a Redis Cluster alike). Under steady load a step takes
  that state from the step before, for at most STATE_REUSE seconds, as long as nothing special is
  under way: the batch's guarded write still catches any change.
- The log's rows (SharedReads): the loops of one process share the rows they read while in step,
  also while the read is still in flight (loops woken by the same notification read at once).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from orders.domain.consistency import LogPosition
from orders.store.event_store import Batch, Connection, read_batch
from orders.store.partitions import Partition
from orders.store.views import parse_generation, run_script
from sync_worker.generations import Generations
from sync_worker.projector import Projector

# Seconds for which a step may take the projection's state from the last one instead of reading it:
# its own checkpoint, nothing being rebuilt, parked or retired. What it may miss meanwhile is safe:
# a moved checkpoint or generation fails the batch's guarded write (and the next step reads afresh);
# an operator's request or a retired generation waits this long at most. SharedReads keeps a batch
# for others as long.
STATE_REUSE = 0.1

# KEYS: the generation pointer, the next-generation mark, a checkpoint, the operators' requests (a
# list) and the retired generations (a set). Returns the first three's values, whether the list
# exists (a list exists while it holds a request) and one retired generation, or false.
_STEP_STATE = """
local values = redis.call('MGET', KEYS[1], KEYS[2], KEYS[3])
values[4] = redis.call('EXISTS', KEYS[4])
values[5] = redis.call('SRANDMEMBER', KEYS[5])
return values
"""


@dataclass(frozen=True)
class StepState:
    """What a step found besides the live checkpoint; the follow-up work runs only when there is some."""

    building: str | bytes | None  # the generation a zero-downtime rebuild builds
    parked_requests: bool  # operators asked to retry parked orders
    retired: str | bytes | None  # a generation whose keys are left to delete

    @property
    def quiet(self) -> bool:
        return self.building is None and not self.parked_requests and self.retired is None


QUIET = StepState(None, False, None)


class StepStates:
    """Where each step of one projection's loop starts: the live generation, its checkpoint (None:
    the views are empty) and the StepState, read afresh or reused from the last quiet step."""

    def __init__(self, generations: Generations) -> None:
        self._generations = generations
        self._live = generations.projector  # the live generation at the last step
        self._known: tuple[float, LogPosition] | None = None  # a quiet state's read time, and the checkpoint since

    async def read(self) -> tuple[Projector, LogPosition | None, StepState, float]:
        """The step's state, from the last step while that is quiet and fresh (STATE_REUSE), and when
        it was read."""
        known, self._known = self._known, None  # kept again only by a step that ends well
        if known is not None and time.monotonic() - known[0] < STATE_REUSE:
            return self._live, known[1], QUIET, known[0]
        read_at = time.monotonic()
        return (*await self._read(), read_at)

    def keep(self, read_at: float, checkpoint: LogPosition) -> None:
        """A quiet step ended well at `checkpoint`, from a state read at `read_at`: the next may reuse it."""
        self._known = (read_at, checkpoint)

    def forget(self) -> None:
        """The next step reads its state afresh."""
        self._known = None

    async def _read(self) -> tuple[Projector, LogPosition | None, StepState]:
        """The live generation, its checkpoint and what else there is to do, in one round trip: the
        checkpoint is read from the generation live at the last step, and again only if that changed.
        The batch's guarded write checks both, so a switch or a flush between steps is never missed."""
        redis, keys = self._generations.projector.redis, self._generations.projector.keys
        guess = self._live
        state = [
            keys.generation_pointer,
            keys.next_generation,
            guess.keys.checkpoint,
            keys.parked_requests,
            keys.retired,
        ]
        pointer, building, raw, requests, retired = await run_script(redis, _STEP_STATE, list(state), [])
        live = self._live = self._generations.at(parse_generation(pointer))
        if live is not guess:
            raw = await redis.get(live.keys.checkpoint)
        checkpoint = None if raw is None else LogPosition.parse(raw)
        return live, checkpoint, StepState(building, bool(requests), retired)


@dataclass
class _SharedBatch:
    read: tuple[LogPosition, int]  # after, limit
    started: float  # when the read began: every commit notified before is in its rows
    batch: asyncio.Future[Batch | None]  # None: the read failed, each taker reads for itself
    takers: set[str]  # the projections that have had it

    def takes(self, read: tuple[LogPosition, int], reader: str, notified_at: float, now: float) -> bool:
        """Whether `reader`, about to make `read` and last notified at `notified_at`, may take this one."""
        in_time = notified_at < self.started and now - self.started < STATE_REUSE
        return in_time and read == self.read and reader not in self.takers


class SharedReads:
    """The last batch one of this process's projection loops read from the log, for the others: in
    step (live, or rebuilding side by side) they read the same rows after the same checkpoint, and
    decoding them is much of a rebuild's cost. Each other loop may take a batch once, within
    STATE_REUSE of its read, and only if the read began after the last NOTIFY that loop received
    (`notified_at`): the commits it was told of are then in the rows, so a loop that cleared its
    wake-up on a newer append never sleeps on an older batch. The rows stay valid, as a read only
    returns rows that nothing can ever come before. A loop may also take a read still in flight, on
    the same terms: loops woken by one notification (and out of the same batch window) then send one
    query, not one each. An empty read is shared only while in flight."""

    def __init__(self) -> None:
        self._last: dict[Partition, _SharedBatch] = {}  # the last read of each partition's events

    async def read(
        self,
        conn: Connection,
        after: LogPosition,
        limit: int,
        partition: Partition,
        reader: str,
        *,
        notified_at: float = -float("inf"),
    ) -> Batch:
        """Up to `limit` events of `partition` after `after` for projection `reader`, whose loop last
        received a NOTIFY at `notified_at` (monotonic seconds). The loops of one partition of each
        projection share reads; other partitions read other rows."""
        key, started, last = (after, limit), time.monotonic(), self._last.get(partition)
        if last is not None and last.takes(key, reader, notified_at, started):
            last.takers.add(reader)
            taken = await asyncio.shield(last.batch)  # a taker's cancellation leaves the read to its reader
            return taken if taken is not None else await read_batch(conn, after, limit, partition)
        shared = _SharedBatch(key, started, asyncio.get_running_loop().create_future(), {reader})
        self._last[partition] = shared
        batch = None
        try:
            batch = await read_batch(conn, after, limit, partition)
        finally:
            shared.batch.set_result(batch)
            if self._last.get(partition) is shared and (batch is None or not batch.events):
                # An empty read is cheap, and only a newer one may tell that it is over.
                if last is None:
                    del self._last[partition]
                else:
                    self._last[partition] = last
        return batch
