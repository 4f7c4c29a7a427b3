"""Load generators: closed loop (N calls in flight) and open loop (calls sent on a clock), run in
client processes of their own so that the client never shares a GIL with the services or with the
orchestrator, and every measurement (ceilings included) goes through this same machinery.

A job runs in every client process at once: each process opens its workload (channels, pools,
watch streams), reports ready, and starts when the parent says go, so that all processes measure
the same window.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any, Protocol

ERROR_PAUSE = 0.01  # seconds a closed-loop slot waits after a failed call, so errors do not spin
DRAIN_TIMEOUT = 10.0  # seconds an open loop waits for calls still in flight after its window


@dataclass(frozen=True)
class Job:
    """What one client process runs; `params` must be picklable (strings, numbers, lists)."""

    workload: str  # a name in orders_bench.ops.WORKLOADS
    params: dict[str, Any]
    concurrency: int  # calls in flight (closed loop), or watch streams and such (open loop)
    rate: float | None  # calls per second offered (open loop); None: closed loop
    duration: float  # seconds measured
    warmup: float  # seconds run before the measured window
    tag: str = ""  # unique per process and round: workloads build their ids from it


@dataclass
class JobResult:
    units: int = 0  # work done in the window: commands, queries, SETs
    calls: int = 0
    errors: int = 0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)  # seconds, calls completed in the window
    duration: float = 0.0
    samples: list[float] = field(default_factory=list)  # seconds, other than call latency (lag)
    extra: dict[str, float] = field(default_factory=dict)  # summed over processes
    # (wall-clock time, seconds) of each sample that has a time (lag: the ack's time and the lag)
    series: list[tuple[float, float]] = field(default_factory=list)
    window_start: float = 0.0  # wall-clock time the measured window began at (after the warm-up)

    def merge(self, other: JobResult) -> JobResult:
        extra = {k: self.extra.get(k, 0.0) + other.extra.get(k, 0.0) for k in {*self.extra, *other.extra}}
        return JobResult(
            self.units + other.units,
            self.calls + other.calls,
            self.errors + other.errors,
            self.first_error or other.first_error,
            self.latencies + other.latencies,
            max(self.duration, other.duration),
            self.samples + other.samples,
            extra,
            self.series + other.series,
            self.window_start or other.window_start,
        )


class Workload(Protocol):
    async def call(self, slot: int, measured: bool) -> int:
        """One call; returns the units of work it did. `measured`: it counts (open loop only)."""

    async def finish(self, result: JobResult) -> None:
        """Completes the result after the window (the lag workload puts its samples there)."""

    async def aclose(self) -> None: ...


class Recorder:
    """Counts the calls that complete within [start, end) and their latencies."""

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end
        self.result = JobResult(duration=end - start)

    def done(self, began: float, units: int) -> None:
        finished = time.perf_counter()
        if self.start <= finished < self.end:
            self.result.units += units
            self.result.calls += 1
            self.result.latencies.append(finished - began)

    def failed(self, error: BaseException) -> None:
        self.result.errors += 1
        if not self.result.first_error:
            self.result.first_error = f"{type(error).__name__}: {error}"[:500]


async def closed_loop(workload: Workload, job: Job, start: float) -> JobResult:
    """`job.concurrency` slots, each calling again as soon as its last call returned."""
    recorder = Recorder(start + job.warmup, start + job.warmup + job.duration)

    async def slot(index: int) -> None:
        while (began := time.perf_counter()) < recorder.end:
            try:
                units = await workload.call(index, True)
            except Exception as error:
                recorder.failed(error)
                await asyncio.sleep(ERROR_PAUSE)
            else:
                recorder.done(began, units)

    await asyncio.gather(*(slot(i) for i in range(job.concurrency)))
    return recorder.result


async def open_loop(workload: Workload, job: Job, start: float) -> JobResult:
    """Calls scheduled every 1/rate seconds whether or not earlier ones returned. Latency runs from
    the scheduled time, so a client that falls behind shows as latency, not as a lower rate."""
    assert job.rate is not None
    interval, measured_from = 1.0 / job.rate, start + job.warmup
    recorder = Recorder(measured_from, float("inf"))
    end = measured_from + job.duration
    pending: set[asyncio.Task[None]] = set()

    async def one(scheduled: float, measured: bool) -> None:
        try:
            units = await workload.call(0, measured)
        except Exception as error:
            recorder.failed(error)
        else:
            if measured:
                recorder.done(scheduled, units)

    sent = 0
    while (scheduled := start + sent * interval) < end:
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(scheduled, scheduled >= measured_from))
        pending.add(task)
        task.add_done_callback(pending.discard)
        sent += 1
    if pending:
        await asyncio.wait(pending, timeout=DRAIN_TIMEOUT)
    recorder.result.duration = job.duration
    recorder.result.extra["late_calls"] = float(len(pending))
    return recorder.result


async def run_job(workload: Workload, job: Job, start: float) -> JobResult:
    result = await (closed_loop if job.rate is None else open_loop)(workload, job, start)
    await workload.finish(result)
    return result


# ------------------------------------------------------------------------------ client processes

Opener = Callable[[Job], Awaitable[Workload]]


def _client_main(conn: Connection) -> None:
    """A client process: runs the jobs it is sent, one at a time, until told to stop (None)."""
    from orders.server.grpc_server import run  # noqa: PLC0415
    from orders_bench.workloads import open_workload  # noqa: PLC0415 - only the child needs the workloads

    async def serve() -> None:
        while (job := await asyncio.to_thread(conn.recv)) is not None:
            try:
                result = await _one_job(conn, job, open_workload)
            except Exception:
                conn.send(("error", traceback.format_exc()))
            else:
                conn.send(("result", result))

    run(serve)


async def _one_job(conn: Connection, job: Job, opener: Opener) -> JobResult:
    workload = await opener(job)
    try:
        conn.send(("ready", None))
        wall_start = await asyncio.to_thread(conn.recv)
        # One shared wall-clock start; measured in this process's monotonic clock from here on.
        start = time.perf_counter() + (wall_start - time.time())
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        return await run_job(workload, job, start)
    finally:
        await workload.aclose()


class ClientPool:
    """`size` client processes, started once (spawned: a forked gRPC is unsafe) and reused for every job."""

    def __init__(self, size: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for _ in range(size):
            parent, child = context.Pipe()
            process = context.Process(target=_client_main, args=(child,), daemon=True, name="bench-client")
            process.start()
            self._conns.append(parent)
            self.processes.append(process)

    @property
    def size(self) -> int:
        return len(self._conns)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    async def run(self, job: Job, on_start: Callable[[float], None] | None = None) -> JobResult:
        """Runs `job` split over the processes: concurrency and rate are divided between them.
        `on_start` learns the wall-clock time (time.time()) the job starts at: its measured window
        is the `job.duration` seconds after `job.warmup` more."""
        for index, conn in enumerate(self._conns):
            conn.send(self._share(job, index))
        await asyncio.gather(*(self._expect(conn, "ready") for conn in self._conns))
        start = time.time() + 0.05
        if on_start is not None:
            on_start(start)
        for conn in self._conns:
            conn.send(start)
        results: list[JobResult] = await asyncio.gather(*(self._expect(conn, "result") for conn in self._conns))
        merged = results[0]
        for other in results[1:]:
            merged = merged.merge(other)
        merged.window_start = start + job.warmup
        return merged

    def _share(self, job: Job, index: int) -> Job:
        n = self.size
        concurrency = job.concurrency // n + (index < job.concurrency % n)
        rate = None if job.rate is None else job.rate / n
        return replace(job, concurrency=max(1, concurrency), rate=rate, tag=f"{job.tag}p{index}")

    @staticmethod
    async def _expect(conn: Connection, kind: str) -> Any:
        got, payload = await asyncio.to_thread(conn.recv)
        if got == "error":
            raise RuntimeError(f"a client process failed:\n{payload}")
        if got != kind:
            raise RuntimeError(f"a client process sent {got!r}, expected {kind!r}")
        return payload

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for process in self.processes:
            process.join(timeout=3)
            if process.is_alive():
                process.kill()
