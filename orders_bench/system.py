"""The system under test, isolated: servers (given or embedded), a database and a Redis key prefix
of the benchmark's own (removed afterwards), and the three services as separate processes, started
the way orders-local starts them. Also per-process CPU accounting from /proc, to tell which process
limits a measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from redis.asyncio import Redis, RedisCluster

from orders.store.migrations import migrate_url
from orders.store.views import redis_client
from orders.tools.embedded import free_port
from orders.tools.processes import (
    HealthServing,
    PortOpen,
    ServiceExited,
    ServiceProcess,
    start_process,
    start_service,
)
from orders_bench.naive import SCHEMA as NAIVE_SCHEMA

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
LAZY_FREE_TRIES = 600  # 0.1 s apart
SAMPLE_EVERY = 0.25  # seconds between samples of the processes' CPU
MAX_PROCESS_DEPTH = 64  # parents followed up from a process to find whose it is
# Each service by its name in the benchmark's logs and figures, and its console script.
SERVICES = {
    "write_service": "orders-write-service",
    "read_service": "orders-read-service",
    "sync_worker": "orders-sync-worker",
}


@dataclass
class Servers:
    postgres_url: str  # a connection that may create and drop databases
    redis_url: str
    embedded: list[str] = field(default_factory=list)
    stops: list[Callable[[], None]] = field(default_factory=list)

    def stop(self) -> None:
        for stop in reversed(self.stops):
            stop()


def start_servers(postgres_url: str | None, redis_url: str | None, root: Path) -> Servers:
    """The given servers, or embedded ones in `root` for those not given; on the main thread, before
    any event loop (the embedded servers install signal handling)."""
    stops: list[Callable[[], None]] = []
    embedded: list[str] = []
    if not postgres_url or not redis_url:
        from orders.tools.embedded import start_postgres, start_redis  # noqa: PLC0415 - needs the `embedded` extra

        if not postgres_url:
            postgres = start_postgres(root / "postgres")  # fsync on, as orders-local runs it
            postgres_url, stops, embedded = postgres.url, [*stops, postgres.stop], [*embedded, "postgres"]
        if not redis_url:
            redis = start_redis(root / "redis", persist=False)
            redis_url, stops, embedded = redis.url, [*stops, redis.stop], [*embedded, "redis"]
    return Servers(postgres_url, redis_url, embedded, stops)


def database_url(server_url: str, name: str) -> str:
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}"


async def create_database(admin_url: str, name: str, migrated: bool = True) -> str:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = database_url(admin_url, name)
    if migrated:
        await migrate_url(url)
    return url


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def delete_keys(redis_url: str, prefix: str) -> int:
    """Deletes every key under `prefix`, in chunks (a rebuild leaves hundreds of thousands), and
    returns once Redis has freed them: memory freed lazily, in Redis' background thread, would take
    CPU from the next measurement."""
    redis = redis_client(redis_url)
    deleted = 0
    try:
        chunk: list[str] = []
        async for key in redis.scan_iter(match=f"{prefix}*", count=5000):
            chunk.append(key)
            if len(chunk) >= 5000:
                deleted += await redis.delete(*chunk)
                chunk = []
        if chunk:
            deleted += await redis.delete(*chunk)
        await _lazy_free_done(redis)
    finally:
        await redis.aclose()
    return deleted


async def _lazy_free_done(redis: Redis | RedisCluster) -> None:
    for _ in range(LAZY_FREE_TRIES):
        if not int((await redis.info("memory")).get("lazyfree_pending_objects", 0)):
            return
        await asyncio.sleep(0.1)


# ------------------------------------------------------------------------------ processes


async def spawn(script: str, env: Mapping[str, str], log: Path, *args: str) -> ServiceProcess:
    """Console script `script` in its own session (a Ctrl-C of the benchmark is ours to pass on), output to `log`."""
    return await start_service(script, *args, env={**os.environ, **env}, log=log, own_session=True)


async def stop_process(process: ServiceProcess) -> None:
    await process.stop(STOP_TIMEOUT)


@dataclass
class Services:
    processes: dict[str, ServiceProcess]
    write_address: str
    read_address: str
    log_dir: Path

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.processes.items()}

    def check_running(self) -> None:
        exited = {name: p.returncode for name, p in self.processes.items() if p.returncode is not None}
        if exited:
            name = next(iter(exited))
            raise RuntimeError(f"{name} exited ({exited[name]}):\n{self.processes[name].log_tail()}")

    async def stop(self) -> None:
        self.pause(False)  # a paused process cannot stop gracefully
        await asyncio.gather(*(stop_process(p) for p in self.processes.values()))

    def pause(self, paused: bool) -> None:
        """SIGSTOP (or SIGCONT) every process of these services and their children, so that a system
        not being measured neither takes CPU from the one that is nor counts in its figures (an idle
        read service still decodes every checkpoint the worker publishes; the naive poller polls)."""
        sig = signal.SIGSTOP if paused else signal.SIGCONT
        for pid in (pid for p in self.processes.values() for pid in _tree(p.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc (Linux)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in task.read_text().split():
                found += _tree(int(child))
    return found


class ProcessesRefused(RuntimeError):
    """A service refused to run several processes (a version without the setting)."""


async def start_services(
    database: str, redis_url: str, prefix: str, log_dir: Path, *, processes: int = 1, worker: bool = True
) -> Services:
    """The services as orders-local runs them, on free ports, with the services' defaults; with
    `processes` > 1 the write and read services run that many processes each on one address
    (`--processes`), and without `worker` no sync worker of their own starts (another set's serves
    the same prefix). ProcessesRefused when a service does not know `--processes`."""
    write, read = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {
        "ORDERS_POSTGRES_URL": database,
        "ORDERS_REDIS_URL": redis_url,
        "ORDERS_REDIS_PREFIX": prefix,
        "ORDERS_WRITE_ADDRESS": write,
        "ORDERS_READ_ADDRESS": read,
        "ORDERS_ADMIN_ADDRESS": "",
    }
    suffix = "" if processes == 1 else f"_x{processes}"
    args = [] if processes == 1 else ["--processes", str(processes)]
    chosen = {name: script for name, script in SERVICES.items() if worker or name != "sync_worker"}
    processes_by_name = {
        f"{name}{suffix}": await spawn(script, env, log_dir / f"{name}{suffix}.log", *args_for(name, args))
        for name, script in chosen.items()
    }
    services = Services(processes_by_name, write, read, log_dir)
    others = processes_by_name.values()
    try:
        write_service = processes_by_name[f"write_service{suffix}"]
        await write_service.wait_ready(HealthServing(write), READY_TIMEOUT, alongside=others)
        # SERVING once every projection's worker has sent a heartbeat: the views are usable.
        ready = HealthServing(read, "orders.projection")
        await processes_by_name[f"read_service{suffix}"].wait_ready(ready, READY_TIMEOUT, alongside=others)
    except ServiceExited as exited:
        await services.stop()
        if args and "--processes" in str(exited):
            raise ProcessesRefused(str(exited).splitlines()[-1]) from None
        raise
    except BaseException:
        await services.stop()
        raise
    return services


def args_for(name: str, processes_args: list[str]) -> list[str]:
    """The command line of one service: only the gRPC services take `--processes`."""
    return processes_args if name in {"write_service", "read_service"} else []


async def start_echo_server(log_dir: Path) -> tuple[ServiceProcess, str, str]:
    """The ceilings' process (orders_bench.ceilings): the bare echo server and our stack's, by address."""
    address, stack_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "orders_bench.ceilings", "echo", address, stack_address]
    process = await start_process("echo_server", command, log=log_dir / "echo.log", own_session=True)
    try:
        await process.wait_ready(HealthServing(stack_address), READY_TIMEOUT)
        await process.wait_ready(PortOpen(address), READY_TIMEOUT)
    except RuntimeError:
        await stop_process(process)
        raise RuntimeError(f"the echo server did not start:\n{process.log_tail()}") from None
    return process, address, stack_address


async def start_naive(database: str, redis_url: str, prefix: str, log_dir: Path) -> Services:
    """The naive reference pipeline (orders_bench.naive) on `database` (its table is made here) and
    under `prefix`: its write, poll and read processes, named naive_*."""
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(NAIVE_SCHEMA)
    finally:
        await conn.close()
    write, read = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    commands = {
        "naive_write": ["write", write, database],
        "naive_poll": ["poll", database, redis_url, prefix],
        "naive_read": ["read", read, redis_url, prefix],
    }
    processes = {
        name: await start_process(
            name, [sys.executable, "-m", "orders_bench.naive", *args], log=log_dir / f"{name}.log", own_session=True
        )
        for name, args in commands.items()
    }
    naive = Services(processes, write, read, log_dir)
    try:
        for name, address in (("naive_write", write), ("naive_read", read)):
            await processes[name].wait_ready(PortOpen(address), READY_TIMEOUT, alongside=processes.values())
    except BaseException:
        await naive.stop()
        raise
    return naive


# ------------------------------------------------------------------------------ CPU accounting


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process so far (Linux /proc; None elsewhere or once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs together."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


@dataclass(frozen=True)
class ProcessCpu:
    """One process as /proc shows it: its parent, its CPU seconds so far, and its kind of server
    ("postgres" or "redis" when it works for the benchmark, None otherwise)."""

    ppid: int
    seconds: float
    kind: str | None


def _server_kind(pid: int, command: str, marker: str) -> str | None:
    """ "postgres" for a PostgreSQL process working for the benchmark (its own backends, and the
    server's background processes, which write the WAL of its commits), "redis" for Redis, None for
    anything else, such as backends of other databases on a shared server."""
    if command == "redis-server":
        return "redis"
    if command != "postgres":
        return None
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    backend = any(client in title for client in ("127.0.0.1(", "::1(", "[local]"))
    return "postgres" if not backend or marker in title else None


def process_table(marker: str) -> dict[int, ProcessCpu]:
    """Every process of the host, by pid (Linux /proc; empty elsewhere)."""
    ticks = os.sysconf("SC_CLK_TCK")
    table: dict[int, ProcessCpu] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
            command, fields = text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()
            pid, ppid, seconds = int(entry.name), int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, ValueError, IndexError):
            continue
        table[pid] = ProcessCpu(ppid, seconds, _server_kind(pid, command, marker))
    return table


Snapshot = dict[int, tuple[str, float]]  # pid -> (whose CPU it is, CPU seconds so far)


def owners(table: Mapping[int, ProcessCpu], pids: Mapping[str, int], trees: Iterable[str]) -> dict[int, str]:
    """Whose each process is: a server's kind, the name of a named process, or for the names in
    `trees` also of its descendants (a service running several processes, its children); a
    process of nobody's (such as a child of the benchmark's own process) is left out."""
    named = {pid: name for name, pid in pids.items()}
    rooted = {pid: name for pid, name in named.items() if name in set(trees)}
    found: dict[int, str] = {}
    for pid, row in table.items():
        owner = row.kind or named.get(pid)
        ancestor, hops = row.ppid, 0
        while owner is None and ancestor in table and hops < MAX_PROCESS_DEPTH:
            owner = rooted.get(ancestor)
            ancestor, hops = table[ancestor].ppid, hops + 1
        if owner is not None:
            found[pid] = owner
    return found


def snapshot(pids: Mapping[str, int], marker: str) -> Snapshot:
    """CPU seconds so far of every process that works for the benchmark, by pid, with its owner:
    the named processes and their descendants (but the benchmark's own process alone), and the
    servers' processes."""
    table = process_table(marker)
    trees = [name for name in pids if name != "bench"]
    return {pid: (owner, table[pid].seconds) for pid, owner in owners(table, pids, trees).items()}


def spent(first: Snapshot, last: Snapshot) -> dict[str, float]:
    """CPU seconds each owner spent between two snapshots; processes born in between count from
    zero, processes gone by `last` are not in it (keep their last sample there)."""
    used: dict[str, float] = {}
    for pid, (owner, seconds) in last.items():
        before = first.get(pid, (owner, 0.0))[1]
        used[owner] = used.get(owner, 0.0) + max(0.0, seconds - before)
    return used


class CpuMeter:
    """CPU use over a span (100 = one core busy) of named processes (with their children, but for
    the benchmark's own process), of the servers' processes that work for the benchmark (their
    database names contain `marker`), of everything else on the host ("other": someone else's
    load, which skews the figures), and of the whole host (100 = all cores).

    Processes are sampled every SAMPLE_EVERY seconds, so that one that ends within the span (a
    pool's backend closed at the end of a job) still counts, up to its last sample. `mark()` takes
    a sample on demand, for the CPU spent within a measured window (`spent`)."""

    def __init__(self, pids: Mapping[str, int], marker: str) -> None:
        self.pids, self.marker = dict(pids), marker
        self.started = asyncio.get_running_loop().time()
        self.first = snapshot(self.pids, marker)
        self.last = dict(self.first)
        self.host = host_ticks()
        self._sampler = asyncio.create_task(self._sample())

    def mark(self) -> Snapshot:
        """A fresh sample, merged into what was seen so far (gone processes keep their last)."""
        self.last.update(snapshot(self.pids, self.marker))
        return dict(self.last)

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            self.mark()

    async def stop(self) -> dict[str, float]:
        self._sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sampler
        self.mark()
        elapsed = max(1e-9, asyncio.get_running_loop().time() - self.started)
        used = {f"cpu_{owner}_pct": 100 * seconds / elapsed for owner, seconds in spent(self.first, self.last).items()}
        host = host_ticks()
        if self.host is not None and host is not None and host[1] > self.host[1]:
            busy = 100 * (host[0] - self.host[0]) / (host[1] - self.host[1])
            used["cpu_other_pct"] = max(0.0, busy * (os.cpu_count() or 1) - sum(used.values()))
            used["cpu_host_pct"] = busy
        return used
