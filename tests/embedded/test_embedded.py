"""Embedded PostgreSQL and Redis servers: start, use, stop, restart, and die with their parent."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest
import redis

from orders.tools.embedded import free_port, start_postgres, start_redis

pytestmark = pytest.mark.embedded

REPO_ROOT = Path(__file__).resolve().parents[2]

# Starts both servers, reports their ports, then idles until killed.
_CHILD_STARTING_SERVERS = """
import sys, time
from pathlib import Path
from urllib.parse import urlsplit
from orders.tools.embedded import start_postgres, start_redis

data = Path(sys.argv[1])
servers = [start_postgres(data / "pg"), start_redis(data / "redis")]
print(*(urlsplit(server.url).port for server in servers), flush=True)
time.sleep(120)
"""


async def _fetchval(url: str, *statements: str) -> object:
    """Run statements in order on a fresh connection and return the first value of the last."""
    conn = await asyncpg.connect(url)
    try:
        for statement in statements[:-1]:
            await conn.execute(statement)
        return await conn.fetchval(statements[-1])
    finally:
        await conn.close()


def _refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


def test_postgres_keeps_rows_across_restart(server_dir: Path) -> None:
    """A row committed before stop() is still there after a restart on the same data dir."""
    first = start_postgres(server_dir / "pg")
    try:
        assert first.url.startswith("postgresql://postgres@127.0.0.1:")
        create = "CREATE TABLE orders (id int PRIMARY KEY, item text)"
        assert asyncio.run(_fetchval(first.url, create, "INSERT INTO orders VALUES (1, 'tea') RETURNING id")) == 1
    finally:
        first.stop()
    first.stop()  # idempotent

    second = start_postgres(server_dir / "pg")
    try:
        assert asyncio.run(_fetchval(second.url, "SELECT item FROM orders WHERE id = 1")) == "tea"
    finally:
        second.stop()


def test_postgres_runs_with_dev_settings_and_logs_to_data_dir(server_dir: Path) -> None:
    """The server listens on the requested port with the dev settings and logs to postgres.log."""
    port = free_port()
    server = start_postgres(server_dir / "pg", port=port)
    try:
        assert server.url == f"postgresql://postgres@127.0.0.1:{port}/postgres"
        for setting, expected in {
            "max_connections": "200",
            "idle_in_transaction_session_timeout": "1min",
            "fsync": "on",
            "listen_addresses": "127.0.0.1",
        }.items():
            assert asyncio.run(_fetchval(server.url, f"SHOW {setting}")) == expected
    finally:
        server.stop()
    assert "database system is shut down" in (server_dir / "pg" / "postgres.log").read_text()


async def _frozen_backend(url: str) -> int:
    """Open a session, freeze its backend process (SIGSTOP) and drop the connection; return its PID.

    A frozen backend stands for any child that outlives a killed postmaster for a while (busy, or
    slow to be scheduled on a loaded machine): it keeps the server's shared memory attached.
    """
    conn = await asyncpg.connect(url)
    backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
    os.kill(backend, signal.SIGSTOP)
    conn.terminate()
    return backend


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ending orphaned children needs /proc")
def test_postgres_restarts_after_the_server_was_killed(server_dir: Path) -> None:
    """After a SIGKILL of the server (stale postmaster.pid, unreaped process, a child still holding
    the shared memory) a new start ends the orphaned child and recovers the data."""
    first = start_postgres(server_dir / "pg")
    orphan = None
    try:
        asyncio.run(_fetchval(first.url, "CREATE TABLE t (x int)", "INSERT INTO t VALUES (7)", "SELECT 1"))
        orphan = asyncio.run(_frozen_backend(first.url))
        pid = int((server_dir / "pg" / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        second = start_postgres(server_dir / "pg")
        try:
            assert asyncio.run(_fetchval(second.url, "SELECT x FROM t")) == 7
        finally:
            second.stop()
        assert not _is_frozen_postgres(orphan)
    finally:
        first.stop()
        if orphan is not None and _is_frozen_postgres(orphan):  # left over only when the start failed
            os.kill(orphan, signal.SIGKILL)


def _is_frozen_postgres(pid: int) -> bool:
    """Whether pid is a stopped postgres process (so not one that reused the PID of an ended one)."""
    try:
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    name, _, state = proc_stat.partition(" (")[2].rpartition(") ")
    return name == "postgres" and state.startswith("T")


def test_redis_set_get(server_dir: Path) -> None:
    """A non-persistent Redis answers SET/GET, stops idempotently and leaves no snapshot behind."""
    server = start_redis(server_dir / "redis", persist=False)
    try:
        assert server.url.startswith("redis://127.0.0.1:")
        with redis.Redis.from_url(server.url) as client:
            assert client.set("order:1", "tea")
            assert client.get("order:1") == b"tea"
    finally:
        server.stop()
    server.stop()  # idempotent
    assert not (server_dir / "redis" / "dump.rdb").exists()
    assert (server_dir / "redis" / "redis.log").exists()


def test_persistent_redis_keeps_keys_across_restart(server_dir: Path) -> None:
    """With persist=True a key written before stop() is loaded again by the next start."""
    first = start_redis(server_dir / "redis")
    try:
        with redis.Redis.from_url(first.url) as client:
            client.set("order:1", "tea")
    finally:
        first.stop()
    second = start_redis(server_dir / "redis")
    try:
        with redis.Redis.from_url(second.url) as client:
            assert client.get("order:1") == b"tea"
    finally:
        second.stop()


def test_start_fails_clearly_when_the_port_is_taken(server_dir: Path) -> None:
    """An explicitly requested port that is busy gives a RuntimeError quoting the server log."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(RuntimeError, match="Address already in use"):
            start_redis(server_dir / "redis", port=busy.getsockname()[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_servers_shut_down_when_their_parent_is_killed(server_dir: Path) -> None:
    """SIGKILL of the process that started the servers makes both shut down cleanly on their own."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", _CHILD_STARTING_SERVERS, str(server_dir)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as child:
        assert child.stdout is not None
        ports = [int(port) for port in child.stdout.readline().split()]
        child.kill()
    assert len(ports) == 2, "child failed to start the servers"
    # A clean (fast) shutdown removes postmaster.pid as its last step; a crash would leave it behind.
    pid_file = server_dir / "pg" / "postmaster.pid"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (pid_file.exists() or not all(map(_refuses_connections, ports))):
        time.sleep(0.05)
    assert not pid_file.exists()
    assert all(map(_refuses_connections, ports))
