"""Applies batches of events to Redis views, exactly once in effect.

Each batch is one Lua script holding the view writes, the new checkpoint and
the notification for waiting readers, so a crash leaves either all of it or
none. The script first compares the guard keys (checkpoint, lease, rebuild
mark, generation pointers) with the values the batch was read with, and writes
nothing if any moved: another worker took the lease, the views were flushed or
reset, a rebuild switched generations. Comparing values, not watching keys, is
enough because the views are a function of the checkpoint: whoever brought the
guards back to the same values left the same views. Each projection also skips
events its views already have (by version), so a replayed batch changes nothing.

`Projector` holds that protocol; a projection subclasses it and says, in
`reads`, which keys it needs and, in `stage`, what to write given their values:
the batch's writes, returned as a value (BatchWrites) that the protocol
completes with the checkpoint and sends, with the guard values it read, as one
GuardedWrite.

Round trips per batch: one read-only script that reads the guard keys, the
batch's parked orders and the keys the projection needs, atomically; then the
guarded write script. (Releasing parked orders and switching generations, both
rare, still use WATCH and MULTI/EXEC.)
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

import msgpack

from orders.domain.consistency import LogPosition
from orders.domain.errors import PoisonEvent
from orders.domain.events import RecordedEvent
from orders.store.views import OrderView, RedisClient, ViewKeys, parse_generation, run_script
from sync_worker.projection import project

Arg = str | bytes | int | float
Raw = str | bytes | None  # a string key's value as read
Values = Mapping[str, Raw]  # key -> value, of the keys a projection `reads`

# KEYS[1]: the parked-orders set; KEYS[2..]: string keys. ARGV: order ids. Returns {the values of
# KEYS[2..], the scores of ARGV in KEYS[1]}, read in one atomic step. Reads only, so it runs on a
# WATCHing connection without touching the watched keys. In chunks: unpack() has a stack limit.
_READ = """
local values, scores = {}, {}
for i = 2, #KEYS, 1000 do
  for _, v in ipairs(redis.call('MGET', unpack(KEYS, i, math.min(i + 999, #KEYS)))) do values[#values + 1] = v end
end
for i = 1, #ARGV, 1000 do
  local part = redis.call('ZMSCORE', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  for _, v in ipairs(part) do scores[#scores + 1] = v end
end
return {values, scores}
"""
# KEYS: the guard keys, then every other key the writes touch (declared, as Redis Cluster requires:
# all of one partition, so one slot). ARGV: each guard's expected value ("=" and the value, or "!"
# for absent, of a string; "[" and its items joined by commas, of a list), then the batch's writes as
# one MessagePack array of commands (each an array of strings) in which each key is its index in
# KEYS: one argument for redis-py to send instead of thousands, each of which it would encode on its
# own, and no key sent twice. A command's key is its first argument; every argument of DEL is one;
# PUBLISH names a channel, not a key. Writes nothing and returns 0 if a guard differs; a script runs
# alone, so nothing can move between the check and the writes.
_WRITE = """
local WRITES = {SET=true, INCRBY=true, DEL=true, PUBLISH=true, ZADD=true, ZREM=true, RPUSH=true, HSET=true,
  HDEL=true, SADD=true}
for i = 1, #ARGV - 1 do
  local expected, seen = ARGV[i], nil
  if string.sub(expected, 1, 1) == '[' then
    seen = '[' .. table.concat(redis.call('LRANGE', KEYS[i], 0, -1), ',')
  else
    local value = redis.call('GET', KEYS[i])
    seen = value and '=' .. value or '!'
  end
  if seen ~= expected then return 0 end
end
for _, command in ipairs(cmsgpack.unpack(ARGV[#ARGV])) do
  local name = string.upper(command[1])
  if not WRITES[name] then return redis.error_reply('not a batch write: ' .. command[1]) end
  if name == 'DEL' then
    for j = 2, #command do command[j] = KEYS[command[j]] end
  elseif name ~= 'PUBLISH' then
    command[2] = KEYS[command[2]]
  end
  redis.call(unpack(command))
end
return 1
"""
_SCRIPTS = {script: hashlib.sha1(script.encode()).hexdigest() for script in (_READ, _WRITE)}
MAX_MEMBERS = 1000  # per ZADD / ZREM: Lua's unpack() has a stack limit


Text = str | bytes  # a write's argument: numbers go as their decimal text (see BatchWrites)
Command = tuple[Text, ...]  # a Redis command and its arguments


class BatchWrites:
    """A batch's writes as Redis commands, for the guarded write script (or a MULTI): built here
    rather than through redis-py's command methods, which cost a rebuild more than the commands.
    Numbers are written as decimal text: the script gets the commands as MessagePack, and Lua would
    turn a number of 10^14 or more into "1e+14" on its way to Redis."""

    def __init__(self) -> None:
        self.commands: list[Command] = []

    def set(self, key: str, value: Text) -> None:
        self.commands.append(("SET", key, value))

    def incrby(self, key: str, amount: int) -> None:
        self.commands.append(("INCRBY", key, str(amount)))

    def delete(self, *keys: str) -> None:
        self.commands.append(("DEL", *keys))

    def publish(self, channel: str, message: str) -> None:
        self.commands.append(("PUBLISH", channel, message))

    def hset(self, key: str, field: str, value: Text) -> None:
        self.commands.append(("HSET", key, field, value))

    def rpush(self, key: str, value: int) -> None:
        self.commands.append(("RPUSH", key, str(value)))

    def hdel(self, key: str, field: str) -> None:
        self.commands.append(("HDEL", key, field))

    def sadd(self, key: str, member: Text) -> None:
        self.commands.append(("SADD", key, member))

    def zadd(self, key: str, scores: Mapping[str, int], nx: bool = False) -> None:
        entries = [arg for member, score in scores.items() for arg in (str(score), member)]
        for start in range(0, len(entries), 2 * MAX_MEMBERS):
            self.commands.append(("ZADD", key, *(("NX",) if nx else ()), *entries[start : start + 2 * MAX_MEMBERS]))

    def zrem(self, key: str, *members: str) -> None:
        for start in range(0, len(members), MAX_MEMBERS):
            self.commands.append(("ZREM", key, *members[start : start + MAX_MEMBERS]))


@dataclass(frozen=True)
class GuardedWrite:
    """A batch's whole write as the write script takes it: the guard keys with the values the batch
    was read with (None: absent), the lists that must still hold exactly the given items, and the
    commands to run only if every guard still has its value."""

    guards: tuple[tuple[str, Raw], ...]
    commands: tuple[Command, ...]
    list_guards: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def script_keys_and_args(self) -> tuple[list[Arg], list[Arg]]:
        """The write script's KEYS (the guards, then each other key the commands touch, once) and
        ARGV: each guard's expected value, then the commands as one MessagePack array with their keys
        replaced by their index in KEYS (1-based, as Lua counts). Strings and bytes both go as
        MessagePack's raw type (use_bin_type off): the cmsgpack of Redis's Lua reads no bin type, and
        to Lua both are byte strings anyway."""
        keys: list[Arg] = [key for key, _ in (*self.guards, *self.list_guards)]
        index: dict[Arg, int] = {}  # a guard may be written too: the checkpoint is
        for position, key in enumerate(keys, start=1):
            index.setdefault(key, position)

        def key_index(key: Text) -> int:
            if (found := index.get(key)) is None:
                keys.append(key)
                found = index[key] = len(keys)
            return found

        commands = [_with_key_indexes(command, key_index) for command in self.commands]
        args: list[Arg] = ["!" if value is None else f"={_text(value)}" for _, value in self.guards]
        args += ["[" + ",".join(items) for _, items in self.list_guards]
        args.append(cast(bytes, msgpack.packb(commands, use_bin_type=False)))
        return keys, args


def _with_key_indexes(command: Command, key_index: Callable[[Text], int]) -> list[Text | int]:
    """`command` with its keys replaced by key_index(key), as the write script reads it: every
    argument of DEL, the first of the others but PUBLISH (whose first names a channel)."""
    name = command[0]
    if name == "DEL":
        return [name, *(key_index(key) for key in command[1:])]
    if name == "PUBLISH":
        return list(command)
    return [name, key_index(command[1]), *command[2:]]


class CheckpointMoved(Exception):
    """The checkpoint in Redis is not the one this batch was read after; re-read and retry."""


class LeaseLost(Exception):
    """Another worker holds the projection's lease; this one must not write."""


class Projector(ABC):
    def __init__(self, redis: RedisClient, keys: ViewKeys) -> None:
        self.redis = redis
        self.keys = keys

    @property
    def name(self) -> str:
        """The partition's name in logs, metrics and health ("orders", or "orders/2" of several)."""
        return self.keys.name

    async def checkpoint(self) -> LogPosition | None:
        """The position of the last applied event; None when the views are empty (new or flushed)."""
        raw = await self.redis.get(self.keys.checkpoint)
        return None if raw is None else LogPosition.parse(raw)

    async def mark_empty_log(self) -> None:
        """Records that the views are complete for an empty event log (readers wait for a checkpoint)."""
        await self.redis.set(self.keys.checkpoint, LogPosition(0, 0).token(), nx=True)

    async def start_rebuild(self, target: LogPosition) -> None:
        """Marks the views as being rebuilt up to `target`, so that readers do not take a view
        that is not there yet for one that does not exist."""
        await self.redis.set(self.keys.rebuild_target, target.token(), nx=True)

    def at(self, generation: int) -> Projector:
        """The same projection writing another generation of its keys."""
        return type(self)(self.redis, self.keys.at(generation))

    async def apply(
        self,
        after: LogPosition | None,
        events: list[RecordedEvent],
        holder: str | None = None,
        park: Mapping[str, PoisonEvent] | None = None,
        live: bool = True,
        *,
        through: LogPosition | None = None,
    ) -> LogPosition:
        """Applies `events`, which follow checkpoint `after` in log order, atomically; returns the new
        checkpoint: `through` if given (a partition's batch covers the log up to there, see
        event_store.Batch; `events` may then be empty), else the last event's position. Of a
        partition, `events` are its own orders' (read_batch reads only those).

        With `holder`, applies only while that worker holds the projection's lease (LeaseLost otherwise).
        Of an order in `park` (order id -> the event it cannot apply), that event and the order's later
        ones go to the dead-letter list instead, in order; its events before it are applied. Of an order
        parked before, every event goes there. So each of those orders stays consistent, at its last
        good state, while the rest go on.
        `live`: this generation is the one readers use (the pointer names it), and the batch is
        announced to them. Otherwise it is the generation a zero-downtime rebuild builds (the pointer
        names the one before it and the rebuild request names it); nothing is announced.
        """
        new_checkpoint = through or LogPosition(events[-1].tx_id, events[-1].position)
        keys, park = self.keys, park or {}
        guards = [keys.checkpoint, keys.lease, keys.rebuild_target, keys.generation_pointer, keys.next_generation]
        ids = sorted({e.stream_id for e in events} - set(park))
        seen, values, scores = await self._read(guards, self.reads(events), ids)
        current, lease, rebuild, pointer, building = seen
        if holder is not None and lease != holder:
            raise LeaseLost(f"the lease is held by {lease!r}")
        self._check_generation(pointer, building, live)
        if (None if current is None else LogPosition.parse(current)) != after:
            raise CheckpointMoved(f"checkpoint is {current!r}, batch follows {after}")
        parked_before = {i for i, score in zip(ids, scores, strict=True) if score is not None}
        batch, held = held_back(events, parked_before, park)
        staged = await self.stage(batch, values, announce=live) if batch else BatchWrites()
        rebuilt = rebuild is not None and new_checkpoint >= LogPosition.parse(rebuild)
        own = self._own_writes(held, park, len(batch), new_checkpoint, rebuilt)
        if live:  # wakes the readers waiting for a token, and tells the watches of newly parked events
            own.publish(keys.checkpoint_channel, new_checkpoint.token())
            if held:
                own.publish(keys.changes_channel, parked_notice(held))
        write = GuardedWrite(tuple(zip(guards, seen, strict=True)), (*staged.commands, *own.commands))
        if not await self._write_if_unmoved(write):
            raise CheckpointMoved("checkpoint, lease, rebuild mark or generation changed during the batch")
        return new_checkpoint

    def _own_writes(
        self,
        parked: list[RecordedEvent],
        park: Mapping[str, PoisonEvent],
        applied: int,
        checkpoint: LogPosition,
        rebuilt: bool,
    ) -> BatchWrites:
        """The protocol's writes, after the projection's: the parked events, the new checkpoint, the
        count of applied events (parked ones count when they are released) and, once the views have
        reached the rebuild's target (`rebuilt`), the end of the rebuild mark."""
        writes = BatchWrites()
        self._queue_parking(writes, parked, park)
        writes.set(self.keys.checkpoint, checkpoint.token())
        writes.incrby(self.keys.applied, applied)
        if rebuilt:
            writes.delete(self.keys.rebuild_target)
        return writes

    async def _write_if_unmoved(self, write: GuardedWrite) -> bool:
        """Runs `write`'s commands, in one step, if every guard key still has its value."""
        keys, args = write.script_keys_and_args()
        return bool(await self._script(_WRITE, keys, args))

    async def _script(self, script: str, keys: list[Arg], args: list[Arg], raw: bool = False) -> object:
        """Runs `script`; with `raw`, its reply's strings stay bytes (order views are binary)."""
        return await run_script(self.redis, script, list(keys), args, raw=raw, sha=_SCRIPTS[script])

    async def _read(
        self, guards: list[str], needs: list[str], ids: list[str]
    ) -> tuple[list[Raw], dict[str, Raw], list[Raw]]:
        """In one atomic round trip: the values of `guards` and of `needs` (key -> value) and the scores
        of order `ids` in the parked set (None: not parked). The values of `needs` come as bytes."""
        reply = await self._script(_READ, [self.keys.parked, *guards, *needs], list(ids), raw=True)
        values, scores = cast(tuple[list[bytes | None], list[Raw]], reply)
        seen: list[Raw] = [None if value is None else value.decode() for value in values[: len(guards)]]
        return seen, dict(zip(needs, values[len(guards) :], strict=True)), scores

    def _check_generation(self, pointer: str | bytes | None, building: str | bytes | None, live: bool) -> None:
        generation = self.keys.generation
        if live and parse_generation(pointer) != generation:
            raise CheckpointMoved(f"generation {generation} is no longer live (the pointer is {pointer!r})")
        if not live and (parse_generation(pointer) != generation - 1 or parse_generation(building) != generation):
            raise CheckpointMoved(f"generation {generation} is no longer being built")

    async def switch_to(self, holder: str, checkpoint: LogPosition) -> None:
        """Makes this generation, built up to `checkpoint`, the live one in one step: only if the
        live generation is the one before it and at that same checkpoint, and `holder` holds the lease.
        The old generation is marked retired; the worker deletes its keys afterwards. One read, then a
        guarded write that makes the switch only if none of what was read moved meanwhile."""
        keys, old = self.keys, self.keys.at(self.keys.generation - 1)
        guards = [keys.lease, keys.generation_pointer, keys.next_generation, keys.checkpoint, old.checkpoint]
        seen, _, _ = await self._read(guards, [], [])
        lease, pointer, building, new_raw, old_raw = seen
        if lease != holder:
            raise LeaseLost(f"the lease is held by {lease!r}")
        self._check_generation(pointer, building, live=False)
        if new_raw != checkpoint.token() or old_raw != checkpoint.token():
            raise CheckpointMoved(f"checkpoints {old_raw!r} and {new_raw!r} differ from {checkpoint}")
        writes = BatchWrites()
        writes.set(keys.generation_pointer, str(keys.generation))
        writes.sadd(keys.retired, str(old.generation))
        writes.delete(keys.next_generation, keys.rebuild_started)
        writes.publish(keys.checkpoint_channel, checkpoint.token())
        # Readers drop what they hold of the old generation, and watches resend in the new form.
        writes.publish(keys.changes_channel, json.dumps({"generation": keys.generation}))
        if not await self._write_if_unmoved(
            GuardedWrite(tuple(zip(guards, seen, strict=True)), tuple(writes.commands))
        ):
            raise CheckpointMoved("the generations moved during the switch")

    def _queue_parking(self, writes: BatchWrites, events: list[RecordedEvent], park: Mapping[str, PoisonEvent]) -> None:
        for recorded in events:
            writes.zadd(self.keys.parked, {recorded.stream_id: recorded.position}, nx=True)
            writes.rpush(self.keys.parked_events(recorded.stream_id), recorded.position)
        for order_id in sorted({recorded.stream_id for recorded in events}):
            writes.set(self.keys.parked_mark(order_id), "1")
        for order_id, poison in park.items():
            writes.hset(self.keys.parked_errors, order_id, str(poison))

    async def apply_parked(self, order_id: str, events: list[RecordedEvent], holder: str) -> None:
        """Applies an order's parked events (all of them, in order), and releases them from the
        dead-letter list, in one guarded write: only if `holder` holds the lease, this generation is
        live and the order's parked list is still exactly `events`. Raises PoisonEvent (and changes
        nothing) if one of them still fails."""
        keys = self.keys
        guards = [keys.lease, keys.generation_pointer]
        (lease, pointer), values, _ = await self._read(guards, self.reads(events), [])
        if lease != holder:
            raise LeaseLost("the lease moved")
        self._check_generation(pointer, None, live=True)
        writes = await self.stage(events, values)
        writes.zrem(keys.parked, order_id)
        writes.delete(keys.parked_events(order_id), keys.parked_mark(order_id))
        writes.hdel(keys.parked_errors, order_id)
        writes.incrby(keys.applied, len(events))
        parked = ((keys.parked_events(order_id), tuple(str(e.position) for e in events)),)
        write = GuardedWrite(((keys.lease, lease), (keys.generation_pointer, pointer)), tuple(writes.commands), parked)
        if not await self._write_if_unmoved(write):
            raise CheckpointMoved("the lease, the parked events or the generation changed meanwhile")

    @abstractmethod
    def reads(self, events: list[RecordedEvent]) -> list[str]:
        """The (string) keys that staging `events` needs, read in the same round trip as the guard keys."""

    @abstractmethod
    async def stage(self, events: list[RecordedEvent], values: Values, announce: bool = True) -> BatchWrites:
        """The batch's writes (announcing them to readers if `announce`), from `values`: the keys
        `reads` named, possibly for more events than `events`. A key found missing there may still be
        read (the lease keeps other writers away). The protocol sends them, followed by its own (parking,
        checkpoint, counters), in the batch's GuardedWrite."""


class OrdersProjector(Projector):
    """The order views, the listing indexes and the change notifications for live watches (orders.store.views)."""

    def reads(self, events: list[RecordedEvent]) -> list[str]:
        return [self.keys.order(i) for i in order_ids(events)]

    async def stage(self, events: list[RecordedEvent], values: Values, announce: bool = True) -> BatchWrites:
        before = order_views(values, self.keys.order, order_ids(events))
        last_event = {e.stream_id: e for e in events}
        return self._writes(before, fold_new(before, events), last_event, announce)

    @staticmethod
    def _encode(view: OrderView, last: RecordedEvent) -> bytes:
        """The view's stored form; a view the wire form cannot hold poisons the event that made it."""
        try:
            return view.to_wire()
        except ValueError as error:
            raise PoisonEvent(last.position, last.stream_id, error) from error

    def _writes(
        self,
        before: dict[str, OrderView | None],
        after: dict[str, OrderView | None],
        last_event: dict[str, RecordedEvent],
        announce: bool,
    ) -> BatchWrites:
        writes = BatchWrites()
        changed: list[dict[str, str | int]] = []
        # One ZREM / ZADD per index for the whole batch. A view and its index entries are only ever
        # written together, and an order's index member (creation time, id) never changes, so only
        # the indexes an order leaves or enters change.
        leaving: dict[str, list[str]] = defaultdict(list)
        entering: dict[str, dict[str, int]] = defaultdict(dict)
        for order_id, view in after.items():
            old = before[order_id]
            if view is None or view == old:
                continue
            writes.set(self.keys.order(order_id), self._encode(view, last_event[order_id]))
            old_indexes, new_indexes = set(self.keys.indexes_of(old) if old else ()), self.keys.indexes_of(view)
            for key in old_indexes.difference(new_indexes):
                leaving[key].append(view.index_member())
            for key in new_indexes:
                if key not in old_indexes:
                    entering[key][view.index_member()] = 0
            changed.append({"order_id": order_id, "customer_id": view.customer_id, "version": view.version})
        for key, members in leaving.items():
            writes.zrem(key, *members)
        for key, scores in entering.items():
            writes.zadd(key, scores)
        if changed and announce:
            # In the atomic write with the views: no reader hears of a change before it can read it, and
            # a batch that fails announces nothing. Live watches re-read the views they are told of.
            writes.publish(self.keys.changes_channel, json.dumps(changed, separators=(",", ":")))
        return writes


def held_back(
    events: list[RecordedEvent], parked_before: set[str], park: Mapping[str, PoisonEvent]
) -> tuple[list[RecordedEvent], list[RecordedEvent]]:
    """Splits a batch, keeping log order, into the events to apply and those to park: every event of
    an order in `parked_before` (its earlier events wait in the dead-letter list), and, of an order in
    `park`, its poison event and every later one (its earlier events make its last good state)."""
    holding = set(parked_before)
    applied: list[RecordedEvent] = []
    held: list[RecordedEvent] = []
    for recorded in events:
        poison = park.get(recorded.stream_id)
        if poison is not None and recorded.position == poison.position:
            holding.add(recorded.stream_id)
        (held if recorded.stream_id in holding else applied).append(recorded)
    return applied, held


def parked_notice(events: list[RecordedEvent]) -> str:
    """The change notification for orders whose events were just parked: their views did not change,
    but they are now behind (the customer is not known here; customer watches flag it when they read)."""
    newest: dict[str, int] = {}
    for recorded in events:
        newest[recorded.stream_id] = max(newest.get(recorded.stream_id, 0), recorded.version)
    changes = [{"order_id": i, "customer_id": "", "version": v, "parked": True} for i, v in sorted(newest.items())]
    return json.dumps(changes, separators=(",", ":"))


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode()


def order_ids(events: list[RecordedEvent]) -> list[str]:
    return sorted({e.stream_id for e in events})


def order_views(values: Values, key_of: Callable[[str], str], ids: list[str]) -> dict[str, OrderView | None]:
    """The views of `ids` from the values read (under `key_of(id)`); None for an order not there yet."""
    raws = {i: values[key_of(i)] for i in ids}
    return {i: None if raw is None else OrderView.from_stored(raw) for i, raw in raws.items()}


def fold_new(before: dict[str, OrderView | None], events: list[RecordedEvent]) -> dict[str, OrderView | None]:
    """The views after `events`, skipping every event a view already has."""
    views = dict(before)
    for recorded in events:
        view = views[recorded.stream_id]
        if view is not None and recorded.version <= view.version:
            continue  # already applied: a replay after a crash must change nothing
        try:
            views[recorded.stream_id] = project(view, recorded)
        except Exception as error:
            raise PoisonEvent(recorded.position, recorded.stream_id, error) from error
    return views


async def delete_views(redis: RedisClient, keys: ViewKeys, limit: int | None = None) -> int:
    """Deletes the view keys (not the checkpoint) of `keys`' generation, 1000 at a time; with
    `limit`, stops after about that many. Returns how many it deleted."""
    deleted = 0
    for pattern in keys.view_patterns():
        batch: list[str] = []
        async for key in redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await redis.delete(*batch)
                batch = []
                if limit is not None and deleted >= limit:
                    return deleted
        if batch:
            deleted += await redis.delete(*batch)
        if limit is not None and deleted >= limit:
            return deleted
    return deleted
