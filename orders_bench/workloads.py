"""Every workload by name, for the client processes (orders_bench.load)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from orders_bench import ceilings, ops
from orders_bench.load import Job, Workload


async def _lag(job: Job) -> Workload:
    lag = ops.Lag(job)
    await lag.start()
    return lag


def _plain(cls: Callable[[Job], Workload]) -> Callable[[Job], Awaitable[Workload]]:
    async def opened(job: Job) -> Workload:
        return cls(job)

    return opened


WORKLOADS: dict[str, Callable[[Job], Awaitable[Workload]]] = {
    "create": _plain(ops.CreateOrders),
    "create-client": _plain(ops.CreateOrdersViaClient),
    "lifecycle": _plain(ops.Lifecycle),
    "get": _plain(ops.GetOrders),
    "list": _plain(ops.ListOrders),
    "lag": _lag,
    "naive-lag": _plain(ops.NaiveLag),
    "echo": _plain(ceilings.Echo),
    "pg-insert": ceilings.PgInsert.open,
    "redis-get": _plain(ceilings.RedisGet),
    "redis-multi": _plain(ceilings.RedisMulti),
}


async def open_workload(job: Job) -> Workload:
    return await WORKLOADS[job.workload](job)
