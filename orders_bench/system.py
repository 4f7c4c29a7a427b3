"""The system under test, isolated: servers (given or embedded), a database and a Redis key prefix
of the benchmark's own (removed afterwards), and the three services as separate processes, started
the way orders-local starts them. Also per-process CPU accounting from /proc, to tell which process
limits a measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from redis.asyncio import Redis

from orders.store.migrations import migrate_url
from orders.store.views import redis_client
from orders.tools.embedded import free_port
from orders.tools.processes import HealthServing, PortOpen, ServiceProcess, start_process, start_service

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
LAZY_FREE_TRIES = 600  # 0.1 s apart
SAMPLE_EVERY = 0.25  # seconds between samples of the servers' CPU
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


async def _lazy_free_done(redis: Redis) -> None:
    for _ in range(LAZY_FREE_TRIES):
        if not int((await redis.info("memory")).get("lazyfree_pending_objects", 0)):
            return
        await asyncio.sleep(0.1)


# ------------------------------------------------------------------------------ processes


async def spawn(script: str, env: Mapping[str, str], log: Path) -> ServiceProcess:
    """Console script `script` in its own session (a Ctrl-C of the benchmark is ours to pass on), output to `log`."""
    return await start_service(script, env={**os.environ, **env}, log=log, own_session=True)


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
        await asyncio.gather(*(stop_process(p) for p in self.processes.values()))


async def start_services(database: str, redis_url: str, prefix: str, log_dir: Path) -> Services:
    """The three services as orders-local runs them, on free ports, with the services' defaults."""
    write, read = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {
        "ORDERS_POSTGRES_URL": database,
        "ORDERS_REDIS_URL": redis_url,
        "ORDERS_REDIS_PREFIX": prefix,
        "ORDERS_WRITE_ADDRESS": write,
        "ORDERS_READ_ADDRESS": read,
        "ORDERS_ADMIN_ADDRESS": "",
    }
    processes = {name: await spawn(script, env, log_dir / f"{name}.log") for name, script in SERVICES.items()}
    services = Services(processes, write, read, log_dir)
    others = processes.values()
    try:
        await processes["write_service"].wait_ready(HealthServing(write), READY_TIMEOUT, alongside=others)
        # SERVING once every projection's worker has sent a heartbeat: the views are usable.
        ready = HealthServing(read, "orders.projection")
        await processes["read_service"].wait_ready(ready, READY_TIMEOUT, alongside=others)
    except BaseException:
        await services.stop()
        raise
    return services


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


def _server_kind(entry: Path, marker: str) -> str | None:
    """ "postgres" for a PostgreSQL process working for the benchmark (its own backends, and the
    server's background processes, which write the WAL of its commits), "redis" for Redis, None for
    anything else, such as backends of other databases on a shared server."""
    try:
        command = (entry / "comm").read_text().strip()
        title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    if command == "redis-server":
        return "redis"
    if command != "postgres":
        return None
    backend = any(client in title for client in ("127.0.0.1(", "::1(", "[local]"))
    return "postgres" if not backend or marker in title else None


def server_cpu(marker: str) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of the server processes that work for the benchmark, by pid."""
    found: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        kind = _server_kind(entry, marker) if entry.name.isdigit() else None
        seconds = cpu_seconds(int(entry.name)) if kind else None
        if kind and seconds is not None:
            found[int(entry.name)] = (kind, seconds)
    return found


class CpuMeter:
    """CPU use over a span (100 = one core busy) of named processes, of the servers' processes that
    work for the benchmark (their database names contain `marker`), of everything else on the host
    ("other": someone else's load, which skews the figures), and of the whole host (100 = all cores).

    Server processes are sampled every SAMPLE_EVERY seconds, so that a backend that ends within the
    span (a pool closed at the end of a job) still counts, up to its last sample."""

    def __init__(self, pids: Mapping[str, int], marker: str) -> None:
        self.pids, self.marker = dict(pids), marker
        self.started = asyncio.get_running_loop().time()
        self.cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.first = server_cpu(marker)
        self.last = dict(self.first)
        self.host = host_ticks()
        self._sampler = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            self.last.update(server_cpu(self.marker))

    async def stop(self) -> dict[str, float]:
        self._sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sampler
        self.last.update(server_cpu(self.marker))
        elapsed = max(1e-9, asyncio.get_running_loop().time() - self.started)
        used: dict[str, float] = {}
        for name, pid in self.pids.items():
            before, after = self.cpu[name], cpu_seconds(pid)
            if before is not None and after is not None:
                used[f"cpu_{name}_pct"] = 100 * (after - before) / elapsed
        for pid, (kind, seconds) in self.last.items():
            before = self.first.get(pid, (kind, 0.0))[1]  # processes born during the span count from zero
            key = f"cpu_{kind}_pct"
            used[key] = used.get(key, 0.0) + 100 * (seconds - before) / elapsed
        host = host_ticks()
        if self.host is not None and host is not None and host[1] > self.host[1]:
            busy = 100 * (host[0] - self.host[0]) / (host[1] - self.host[1])
            used["cpu_other_pct"] = max(0.0, busy * (os.cpu_count() or 1) - sum(used.values()))
            used["cpu_host_pct"] = busy
        return used
