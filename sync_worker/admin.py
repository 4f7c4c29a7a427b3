"""ProjectionAdmin: each projection's checkpoint, lag and state; pause, resume, rebuild (into a new
generation of keys while the live one serves, or in place).

Everything it does goes through PostgreSQL (the log, to measure lag) and Redis
(the checkpoints, heartbeats and control flags the workers read), so any sync
worker process can serve it, and the workers themselves act on its requests
within a lease renewal (about a second).

Partitions (ORDERS_PARTITIONS = P): a request names a projection ("orders": every partition of it)
or one partition ("orders/2"); statuses name partitions as metrics and logs do (ViewKeys.name).
Each partition has its own keys, so an operation on a projection is the same operation on each
of its partitions. A parked order's retry goes to the partition that holds the order.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import grpc
import redis.exceptions

from orders.domain.consistency import START, LogPosition
from orders.domain.errors import FieldViolation, InvalidQuery, OrderNotParked, Unavailable
from orders.server.rpc_errors import ErrorTable, translate_errors
from orders.store.heartbeat import read_heartbeat
from orders.store.views import PROJECTIONS, RedisClient, ViewKeys, parse_generation
from orders.telemetry.metrics import count_store_error
from orders.v1 import admin_pb2 as pb
from orders.v1 import admin_pb2_grpc
from sync_worker.projector import delete_views

SERVICE = pb.DESCRIPTOR.services_by_name["ProjectionAdmin"]
ERRORS: ErrorTable = {
    InvalidQuery: (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_PROJECTION"),
    Unavailable: (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"),
    OrderNotParked: (grpc.StatusCode.NOT_FOUND, "ORDER_NOT_PARKED"),
}
LAG_QUERY = (
    "SELECT count(*) AS events, coalesce(extract(epoch FROM now() - min(recorded_at)), 0)::float8 AS seconds"
    " FROM events WHERE (tx_id, position) > ($1::xid8, $2::bigint)"
)
PAUSE_WAIT = 10.0  # seconds a rebuild waits for the worker to acknowledge the pause


class ProjectionAdminServicer(admin_pb2_grpc.ProjectionAdminServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: RedisClient,
        prefix: str,
        heartbeat_timeout: float = 5.0,
        *,
        partitions: int = 1,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._prefix = prefix
        self._heartbeat_timeout = heartbeat_timeout
        self._partitions = partitions

    def _targets(self, name: str) -> list[ViewKeys]:
        """The partitions a request's name covers (generation 0)."""
        return named_partitions(self._prefix, name, self._partitions)

    async def _live(self, keys: ViewKeys) -> ViewKeys:
        """The keys of the generation readers use: a zero-downtime rebuild parks its orders anew in
        the generation it builds, and the worker retries them in the live one."""
        return keys.at(parse_generation(await self._redis.get(keys.generation_pointer)))

    async def _statuses(self, targets: list[ViewKeys]) -> list[pb.ProjectionStatus]:
        return [await self.status(keys) for keys in targets]

    @translate_errors(ERRORS)
    async def ListProjections(
        self, request: pb.ListProjectionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListProjectionsResponse:
        every = [keys for name in PROJECTIONS for keys in self._targets(name)]
        return pb.ListProjectionsResponse(projections=await self._statuses(every))

    @translate_errors(ERRORS)
    async def PauseProjection(
        self, request: pb.PauseProjectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.PauseProjectionResponse:
        targets = self._targets(request.name)
        async with _stores():
            for keys in targets:
                await self._redis.set(keys.paused, "1")
        statuses = await self._statuses(targets)
        return pb.PauseProjectionResponse(projection=statuses[0], partitions=statuses)

    @translate_errors(ERRORS)
    async def ResumeProjection(
        self, request: pb.ResumeProjectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResumeProjectionResponse:
        targets = self._targets(request.name)
        async with _stores():
            for keys in targets:
                await self._redis.delete(keys.paused)
        statuses = await self._statuses(targets)
        return pb.ResumeProjectionResponse(projection=statuses[0], partitions=statuses)

    @translate_errors(ERRORS)
    async def RebuildProjection(
        self, request: pb.RebuildProjectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.RebuildProjectionResponse:
        targets = self._targets(request.name)
        async with _stores():
            if request.in_place:
                # Together: each partition's pause waits for its own worker (up to PAUSE_WAIT).
                await asyncio.gather(*(self._rebuild_in_place(keys) for keys in targets))
            else:
                for keys in targets:
                    await self._rebuild_new_generation(keys)
        statuses = await self._statuses(targets)
        return pb.RebuildProjectionResponse(projection=statuses[0], partitions=statuses)

    async def _rebuild_in_place(self, keys: ViewKeys) -> None:
        """Pauses, deletes the live generation's views (and any generation being built), resumes."""
        paused_before = await self._redis.set(keys.paused, "1", get=True) is not None
        try:
            await self._wait_until_paused(keys)
        except Unavailable:
            if not paused_before:
                await self._redis.delete(keys.paused)  # the rebuild did not start: leave it running
            raise
        live = keys.at(parse_generation(await self._redis.get(keys.generation_pointer)))
        building = await self._redis.get(keys.next_generation)
        await self._redis.delete(keys.next_generation)
        if building is not None:
            await self._delete_views(keys.at(int(building)))
        await self._delete_views(live)
        started_ms = await self._now_ms()
        await self._redis.set(keys.rebuild_started, started_ms)
        await self._redis.delete(keys.paused)  # the worker finds no checkpoint and replays the log

    async def _rebuild_new_generation(self, keys: ViewKeys) -> None:
        """Asks the active worker to build the next generation beside the live one and switch to it.
        Does nothing while such a rebuild runs already."""
        if await self._redis.exists(keys.next_generation):
            return
        generation = parse_generation(await self._redis.get(keys.generation_pointer)) + 1
        await self._delete_views(keys.at(generation))  # left over from a rebuild cancelled in place
        started_ms = await self._now_ms()
        await self._redis.set(keys.rebuild_started, started_ms)
        await self._redis.set(keys.next_generation, generation, nx=True)

    @translate_errors(ERRORS)
    async def ListParkedOrders(
        self, request: pb.ListParkedOrdersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListParkedOrdersResponse:
        scored: list[tuple[float, pb.ParkedOrder]] = []
        for target in self._targets(request.name):
            async with _stores():
                scored += await self._parked(await self._live(target))
        scored.sort(key=lambda entry: entry[0])  # by first parked position, across the partitions
        return pb.ListParkedOrdersResponse(orders=[order for _, order in scored])

    async def _parked(self, keys: ViewKeys) -> list[tuple[float, pb.ParkedOrder]]:
        """One partition's parked orders with their scores (first parked position)."""
        entries = [
            (str(pair[0]), float(pair[1])) for pair in await self._redis.zrange(keys.parked, 0, -1, withscores=True)
        ]
        return [
            (
                score,
                pb.ParkedOrder(
                    order_id=order_id,
                    positions=[int(p) for p in await self._redis.lrange(keys.parked_events(order_id), 0, -1)],
                    error=str(await self._redis.hget(keys.parked_errors, order_id) or ""),
                    partition=keys.name,
                ),
            )
            for order_id, score in entries
        ]

    @translate_errors(ERRORS)
    async def RetryParkedOrder(
        self, request: pb.RetryParkedOrderRequest, context: grpc.aio.ServicerContext
    ) -> pb.RetryParkedOrderResponse:
        targets = self._targets(request.name)
        home = targets[0].for_order(request.order_id)  # the one partition that can have parked it
        async with _stores():
            keys = await self._live(home)
            if home not in targets or await self._redis.zscore(keys.parked, request.order_id) is None:
                raise OrderNotParked(f"order {request.order_id!r} has no parked events in {request.name!r}")
            # One list for every generation: the worker serves it against the generation live then.
            await self._redis.rpush(keys.parked_requests, json.dumps({"order_id": request.order_id}))
        return pb.RetryParkedOrderResponse()

    async def _now_ms(self) -> int:
        """The Redis server's clock in ms (rates of fast rebuilds need better than seconds)."""
        seconds, micros = await self._redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def _wait_until_paused(self, keys: ViewKeys) -> None:
        """Waits until no worker applies batches: it acknowledged the pause, or none is alive."""
        deadline = time.monotonic() + PAUSE_WAIT
        while time.monotonic() < deadline:
            beat, age = await read_heartbeat(self._redis, keys)
            if beat is None or age > self._heartbeat_timeout or beat.get("state") == "paused":
                return
            await asyncio.sleep(0.1)
        raise Unavailable(f"the worker of projection {keys.name!r} did not pause within {PAUSE_WAIT:.0f}s")

    async def _delete_views(self, keys: ViewKeys) -> None:
        await self._redis.delete(*keys.generation_keys)
        await delete_views(self._redis, keys)

    async def status(self, base: ViewKeys) -> pb.ProjectionStatus:
        """The status of one partition (a projection of one partition: the projection)."""
        async with _stores():
            pointer, building = await self._redis.mget(base.generation_pointer, base.next_generation)
            keys = base.at(parse_generation(pointer))
            checkpoint_raw, paused, target_raw, applied, started_ms = await self._redis.mget(
                keys.checkpoint, keys.paused, keys.rebuild_target, keys.applied, keys.rebuild_started
            )
            built = None if building is None else keys.at(int(building))
            built_done = 0 if built is None else await self._done(built, int(await self._redis.get(built.applied) or 0))
            parked = await self._redis.zcard(keys.parked)
            beat, age = await read_heartbeat(self._redis, keys)
            now_ms = await self._now_ms()
            checkpoint = LogPosition.parse(checkpoint_raw) if checkpoint_raw else None
            lag = await self._pool.fetchrow(LAG_QUERY, *(checkpoint or START))
            assert lag is not None  # an aggregate always returns a row
        status = pb.ProjectionStatus(
            name=keys.name,
            checkpoint=checkpoint.token() if checkpoint else "",
            lag_events=lag["events"],
            lag_seconds=lag["seconds"],
            applied_events=int(applied or 0),
            worker_id=str(beat.get("worker", "")) if beat else "",
            heartbeat_age_seconds=age if beat else 0,
            last_error=str(beat.get("error") or "") if beat else "",
            generation=keys.generation,
            parked_orders=parked,
        )
        status.state = self._state(beat, age, bool(paused), target_raw is not None or built is not None)
        if target_raw is not None:
            done = await self._done(keys, status.applied_events)
            progress = await self._progress(LogPosition.parse(target_raw), done, started_ms, now_ms)
            progress.in_place = True
            progress.generation = keys.generation
            status.rebuild.CopyFrom(progress)
        elif built is not None:
            # The new generation replays the log up to the live checkpoint, which moves on meanwhile.
            progress = await self._progress(checkpoint or START, built_done, started_ms, now_ms)
            progress.generation = built.generation
            status.rebuild.CopyFrom(progress)
        return status

    def _state(
        self, beat: dict[str, object] | None, age: float, paused: bool, rebuilding: bool
    ) -> pb.ProjectionState.ValueType:
        if paused:
            return pb.PROJECTION_STATE_PAUSED
        if beat is None or age > self._heartbeat_timeout:
            return pb.PROJECTION_STATE_NO_WORKER
        if beat.get("state") == "failed":
            return pb.PROJECTION_STATE_STOPPED_ON_ERROR
        return pb.PROJECTION_STATE_REBUILDING if rebuilding else pb.PROJECTION_STATE_RUNNING

    async def _done(self, keys: ViewKeys, applied: int) -> int:
        """How far a rebuild of `keys`' generation has got, in events of the log: those it applied,
        or for a partition, which applies only its own, those its checkpoint has passed."""
        if keys.partitions == 1:
            return applied
        raw = await self._redis.get(keys.checkpoint)
        if raw is None:
            return 0
        passed: int = await self._pool.fetchval(
            "SELECT count(*) FROM events WHERE (tx_id, position) <= ($1::xid8, $2::bigint)", *LogPosition.parse(raw)
        )
        return passed

    async def _progress(
        self, target: LogPosition, applied: int, started_ms: str | bytes | None, now_ms: int
    ) -> pb.RebuildProgress:
        total = await self._pool.fetchval(
            "SELECT count(*) FROM events WHERE (tx_id, position) <= ($1::xid8, $2::bigint)", *target
        )
        done = min(applied, total)
        elapsed = (now_ms - int(started_ms)) / 1000 if started_ms else 0
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (total - done) / rate if rate > 0 else 0.0
        return pb.RebuildProgress(events_done=done, events_total=total, events_per_second=rate, seconds_left=left)


def named_partitions(prefix: str, name: str, partitions: int) -> list[ViewKeys]:
    """The partitions `name` covers: a projection ("orders": all of its partitions) or one partition
    ("orders/2", of 0 to partitions - 1). InvalidQuery for anything else."""
    projection, slash, number = name.partition("/")
    if projection not in PROJECTIONS:
        raise InvalidQuery([FieldViolation("name", f"unknown projection {name!r}; known: {', '.join(PROJECTIONS)}")])
    keys = ViewKeys(prefix, projection, partitions=partitions)
    if not slash:
        return keys.all_partitions()
    if not (number.isdigit() and int(number) < partitions):
        known = f"{projection}/0 to {projection}/{partitions - 1}"
        raise InvalidQuery([FieldViolation("name", f"unknown partition {name!r}; known: {projection}, {known}")])
    return [keys.all_partitions()[int(number)]]


@asynccontextmanager
async def _stores() -> AsyncIterator[None]:
    """Turns PostgreSQL and Redis failures into Unavailable."""
    try:
        yield
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, redis.exceptions.RedisError) as error:
        count_store_error("redis" if isinstance(error, redis.exceptions.RedisError) else "postgres", "admin")
        raise Unavailable(f"store unavailable: {error}") from error
