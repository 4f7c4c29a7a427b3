"""Least privilege (issue 7, docs/security.md): `orders-setup-access` makes a PostgreSQL role for the
write service and one for the sync worker, and a Redis ACL user for the sync worker and one for the
read service. Here the three services run in-process with exactly those credentials, end to end, and
each credential is refused everything it was not given.

Roles and ACL users are server-wide, so each test names its own (a random suffix) and drops them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import redis.exceptions
from redis.asyncio import Redis

from orders.domain.consistency import START
from orders.store.event_store import (
    NOTIFY_CHANNEL,
    Batch,
    connect,
    head,
    oldest_transaction,
    open_connection,
    read_batch,
    read_positions,
)
from orders.store.heartbeat import _READ_HEARTBEAT
from orders.store.views import PROJECTIONS, ViewKeys, redis_client
from orders.tools.access import (
    COMMANDS_INSERT_COLUMNS,
    EVENTS_INSERT_COLUMNS,
    REDIS_READER_COMMANDS,
    REDIS_WORKER_COMMANDS,
    AccessSettings,
    ServiceURLs,
    acl_rules,
    setup_access,
    with_credentials,
)
from orders.tools.processes import child_environment, script_command
from orders.v1 import admin_pb2 as adm
from orders.v1 import admin_pb2_grpc, commands_pb2_grpc, queries_pb2_grpc, types_pb2
from orders.v1 import commands_pb2 as cmd
from orders.v1 import queries_pb2 as qry
from read_service.main import ReadSettings, start_read_service
from read_service.main import parse_settings as parse_read_settings
from sync_worker.admin import LAG_QUERY
from sync_worker.main import build_workers, start_admin
from sync_worker.worker import WorkerSettings
from tests.conftest import Servers
from tests.helpers import Ran, add_item_request, an_address, create_request, eventually, run_to_end
from write_service.main import start_write_service

# Passwords that need quoting everywhere: SQL literals, URLs, ACL rules.
WRITER_PASSWORD = 'it\'s "quoted"; DROP ROLE postgres; -- \\ @:/?#'
WORKER_PASSWORD = "pä's «wörd» \\'"  # not ASCII: the server hashes it, quoted by format('%L')
REDIS_WORKER_PASSWORD = 'w\'rk "er" @:/?# %'
REDIS_READER_PASSWORD = "r'eader \\ pass"


def access_settings(servers: Servers, database_url: str, keys: ViewKeys) -> AccessSettings:
    suffix = uuid.uuid4().hex[:10]
    return AccessSettings(
        postgres_url=database_url,
        redis_url=servers.redis_url,
        redis_prefix=keys.prefix,
        writer_role=f"orders_writer_{suffix}",
        writer_password=WRITER_PASSWORD,
        worker_role=f"orders_worker_{suffix}",
        worker_password=WORKER_PASSWORD,
        redis_worker_user=f"orders-worker-{suffix}",
        redis_worker_password=REDIS_WORKER_PASSWORD,
        redis_reader_user=f"orders-reader-{suffix}",
        redis_reader_password=REDIS_READER_PASSWORD,
    )


@dataclass(frozen=True)
class Access:
    settings: AccessSettings
    urls: ServiceURLs
    report: list[str]
    admin_redis: Redis

    async def denials(self) -> list[dict[str, Any]]:
        """ACL LOG entries of this test's Redis users: commands or keys they were refused."""
        users = {self.settings.redis_worker_user, self.settings.redis_reader_user}
        entries: list[dict[str, Any]] = await self.admin_redis.acl_log(count=1000)
        return [entry for entry in entries if entry["username"] in users]


async def drop_access(settings: AccessSettings, admin_redis: Redis) -> None:
    roles = [settings.writer_role, settings.worker_role]
    conn = await asyncpg.connect(settings.postgres_url)
    try:
        existing = [
            r["rolname"] for r in await conn.fetch("SELECT rolname FROM pg_roles WHERE rolname = any($1)", roles)
        ]
        for role in existing:
            await conn.execute(f'REASSIGN OWNED BY "{role}" TO CURRENT_USER')
            await conn.execute(f'DROP OWNED BY "{role}"')
            await conn.execute(f'DROP ROLE "{role}"')
    finally:
        await conn.close()
    await admin_redis.acl_deluser(settings.redis_worker_user, settings.redis_reader_user)


@pytest.fixture
async def access(servers: Servers, database_url: str, redis: Redis, keys: ViewKeys) -> AsyncIterator[Access]:
    """This test's roles and ACL users, made by the setup command's code, dropped afterwards."""
    settings = access_settings(servers, database_url, keys)
    try:
        report = await setup_access(settings)
        yield Access(settings, report.urls, report.lines, redis)
    finally:
        await drop_access(settings, redis)


@dataclass
class Restricted:
    """The three services, each with its restricted credentials only, plus ProjectionAdmin on the worker's."""

    access: Access
    keys: ViewKeys
    commands: commands_pb2_grpc.OrderCommandsStub
    queries: queries_pb2_grpc.OrderQueriesStub
    admin: admin_pb2_grpc.ProjectionAdminStub


@pytest.fixture
async def restricted(access: Access, keys: ViewKeys) -> AsyncIterator[Restricted]:
    urls = access.urls
    async with AsyncExitStack() as stack:
        writer_pool = await connect(urls.writer_postgres_url, max_size=5)
        stack.push_async_callback(writer_pool.close)
        write = await start_write_service(writer_pool, "127.0.0.1:0")
        stack.push_async_callback(write.stop, 0)

        reader_redis = redis_client(urls.reader_redis_url)
        stack.push_async_callback(reader_redis.aclose)
        # A read-only Redis user cannot store a page token key: a configured one (docs/configuration.md).
        read = await start_read_service(reader_redis, keys, "127.0.0.1:0", max_wait=5.0, page_token_key="k" * 32)
        stack.push_async_callback(read.stop, 0)

        worker_redis = redis_client(urls.worker_redis_url)
        stack.push_async_callback(worker_redis.aclose)
        worker_pool = await connect(urls.worker_postgres_url, max_size=2)
        stack.push_async_callback(worker_pool.close)
        admin = await start_admin("127.0.0.1:0", worker_pool, worker_redis, keys.prefix)
        stack.push_async_callback(admin.stop, 0)
        workers = build_workers(
            WorkerSettings(urls.worker_postgres_url, poll_interval=0.5), worker_redis, keys.prefix, list(PROJECTIONS)
        )
        stop = asyncio.Event()
        running = asyncio.gather(*(worker.run(stop) for worker in workers))

        async def stop_workers() -> None:
            stop.set()
            await asyncio.wait_for(running, 10)

        stack.push_async_callback(stop_workers)

        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in (write.port, read.server.port, admin.port)
        ]
        for channel in channels:
            stack.push_async_callback(channel.close)

        async def views_initialised() -> None:
            assert await access.admin_redis.exists(keys.checkpoint)

        await eventually(views_initialised)
        yield Restricted(
            access,
            keys,
            commands_pb2_grpc.OrderCommandsStub(channels[0]),
            queries_pb2_grpc.OrderQueriesStub(channels[1]),
            admin_pb2_grpc.ProjectionAdminStub(channels[2]),
        )


async def outcome(action: Callable[[], Awaitable[object]]) -> str:
    """Whether the action was allowed, or else the name of the error it raised ("NoPermissionError"
    also for a command refused inside a script, which Redis reports as a script error)."""
    try:
        await action()
    except (asyncpg.PostgresError, redis.exceptions.RedisError) as error:
        if "The user executing the script can't" in str(error):
            return "NoPermissionError"
        return type(error).__name__
    return "allowed"


async def sql_outcomes(url: str, statements: list[str]) -> dict[str, str]:
    """Each statement's outcome in a transaction of its own, rolled back."""
    conn = await asyncpg.connect(url)
    try:
        results = {}
        for statement in statements:
            transaction = conn.transaction()
            await transaction.start()
            try:
                results[statement] = await outcome(lambda s=statement: conn.execute(s))  # type: ignore[misc]
            finally:
                await transaction.rollback()
        return results
    finally:
        await conn.close()


async def statuses(stub: admin_pb2_grpc.ProjectionAdminStub) -> dict[str, adm.ProjectionStatus]:
    reply = await stub.ListProjections(adm.ListProjectionsRequest())
    return {status.name: status for status in reply.projections}


# --- the services run with these rights ----------------------------------------------------------


async def test_an_order_goes_through_its_whole_life_with_least_privilege(restricted: Restricted) -> None:
    """Commands append as the writer role, the worker projects them as its role and Redis user, and the
    read service answers with its read-only Redis user, waiting for the consistency token."""
    created = (await restricted.commands.CreateOrder(create_request("lp-alice", command_id="lp-1"))).result
    order_id = created.order_id
    retried = (await restricted.commands.CreateOrder(create_request("lp-alice", command_id="lp-1"))).result
    await restricted.commands.AddItem(add_item_request(order_id, "APPLE", quantity=2, price=150))
    await restricted.commands.ChangeShippingAddress(
        cmd.ChangeShippingAddressRequest(order_id=order_id, shipping_address=an_address("Paris"))
    )
    await restricted.commands.ConfirmOrder(cmd.ConfirmOrderRequest(order_id=order_id))
    shipped = (
        await restricted.commands.ShipOrder(cmd.ShipOrderRequest(order_id=order_id, carrier="DHL", tracking_number="T"))
    ).result

    got = await restricted.queries.GetOrder(
        qry.GetOrderRequest(order_id=order_id, consistency_token=shipped.consistency_token)
    )
    listed = await restricted.queries.ListOrders(
        qry.ListOrdersRequest(customer_id="lp-alice", consistency_token=shipped.consistency_token)
    )
    summary = await restricted.queries.GetCustomerSummary(
        qry.GetCustomerSummaryRequest(customer_id="lp-alice", consistency_token=shipped.consistency_token)
    )

    assert retried == created
    assert (got.consistency.stale, got.order.status, got.order.version) == (False, types_pb2.ORDER_STATUS_SHIPPED, 5)
    assert (got.order.total.minor_units, got.order.shipping_address.city) == (300, "Paris")
    assert [o.order_id for o in listed.orders] == [order_id]
    assert (summary.consistency.stale, summary.summary.order_count) == (False, 1)
    assert await restricted.access.denials() == []


async def test_a_watch_streams_changes_with_least_privilege(restricted: Restricted) -> None:
    """WatchOrder works on the read-only Redis user: it subscribes to the change channel under the prefix."""
    created = (await restricted.commands.CreateOrder(create_request("lp-watch"))).result
    order_id = created.order_id
    call = restricted.queries.WatchOrder(
        qry.WatchOrderRequest(order_id=order_id, consistency_token=created.consistency_token), timeout=20
    )
    first = await asyncio.wait_for(call.read(), 10)
    await restricted.commands.AddItem(add_item_request(order_id, "PEAR"))
    second = await asyncio.wait_for(call.read(), 10)
    call.cancel()

    assert (first.order.version, second.order.version) == (1, 2)
    assert [item.sku for item in second.order.items] == ["PEAR"]
    assert await restricted.access.denials() == []


async def test_projection_admin_works_with_the_workers_rights(restricted: Restricted) -> None:
    """ProjectionAdmin on the worker's role and Redis user lists, pauses, resumes and rebuilds (both
    ways: a new generation, whose old keys the worker SCANs and deletes, and in place)."""
    stub = restricted.admin
    await stub.PauseProjection(adm.PauseProjectionRequest(name="orders"))

    async def paused() -> None:
        assert (await statuses(stub))["orders"].state == adm.PROJECTION_STATE_PAUSED

    await eventually(paused)
    await asyncio.sleep(1.5)  # a worker mid-renewal applies at most what it had already read
    created = (await restricted.commands.CreateOrder(create_request("lp-admin"))).result
    lag_while_paused = (await statuses(stub))["orders"].lag_events
    await stub.ResumeProjection(adm.ResumeProjectionRequest(name="orders"))

    async def running(generation: int) -> adm.ProjectionStatus:
        status = (await statuses(stub))["orders"]
        assert (status.state, status.checkpoint, status.lag_events, status.generation) == (
            adm.PROJECTION_STATE_RUNNING,
            created.consistency_token,
            0,
            generation,
        )
        return status

    await eventually(lambda: running(0))
    await stub.RebuildProjection(adm.RebuildProjectionRequest(name="orders"))
    await eventually(lambda: running(1), timeout=20)

    async def old_generation_deleted() -> None:
        assert not await restricted.access.admin_redis.exists(restricted.keys.order(created.order_id))

    await eventually(old_generation_deleted, timeout=20)
    await stub.RebuildProjection(adm.RebuildProjectionRequest(name="orders", in_place=True))
    rebuilt = await eventually(lambda: running(1), timeout=20)
    found = await restricted.queries.GetOrder(qry.GetOrderRequest(order_id=created.order_id))
    parked = await stub.ListParkedOrders(adm.ListParkedOrdersRequest(name="orders"))
    with pytest.raises(grpc.aio.AioRpcError) as retried:
        await stub.RetryParkedOrder(adm.RetryParkedOrderRequest(name="orders", order_id=created.order_id))

    assert lag_while_paused == 1
    assert rebuilt.applied_events == 1
    assert found.order.customer_id == "lp-admin"
    assert list(parked.orders) == []
    assert retried.value.code() == grpc.StatusCode.NOT_FOUND  # looked up, not UNAVAILABLE for want of a right
    assert await restricted.access.denials() == []


def test_the_read_service_has_no_postgresql_at_all() -> None:
    """The read service takes no PostgreSQL setting, refuses one, and never even imports a driver."""
    probe = (
        "import sys, read_service.main, read_service.servicer, read_service.watch, read_service.freshness;"
        " print(sorted(m for m in ('asyncpg', 'orders.store.event_store') if m in sys.modules))"
    )
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout

    with pytest.raises(SystemExit) as refused:
        parse_read_settings(["--redis-url", "redis://127.0.0.1:6379/0", "--postgres-url", "postgresql://x@y/z"])

    assert imported.strip() == "[]"
    assert refused.value.code == 2
    assert [f.name for f in fields(ReadSettings) if "postgres" in f.name] == []


# --- and nothing else ----------------------------------------------------------------------------


async def test_the_writer_can_append_but_never_change_or_delete_an_event(access: Access) -> None:
    """Events are append-only for the write service: UPDATE, DELETE and TRUNCATE of the log and of the
    idempotency keys are refused, as is forging the commit-order column or the position. It may end
    its own stuck connections (the store reaps interrupted ones), not other roles' sessions."""
    conn = await asyncpg.connect(access.urls.writer_postgres_url)
    other = await asyncpg.connect(access.urls.writer_postgres_url)
    admin = await asyncpg.connect(access.settings.postgres_url)
    try:
        await conn.execute(
            "INSERT INTO events (stream_id, version, event_type, schema_version, payload)"
            " VALUES ('lp-order', 1, 'OrderCreated', 2, '{}')"
        )
        await conn.execute(
            "INSERT INTO processed_commands (command_id, fingerprint, stream_id, version, position, tx_id)"
            " SELECT 'c', 'f', stream_id, version, position, tx_id FROM events"
        )
        reaped = await conn.fetchval("SELECT pg_terminate_backend($1)", other.get_server_pid())
        foreign = await outcome(lambda: conn.fetchval("SELECT pg_terminate_backend($1)", admin.get_server_pid()))
    finally:
        for connection in (conn, other, admin):
            connection.terminate()
    forbidden = [
        "UPDATE events SET payload = '{\"forged\": true}'",
        "DELETE FROM events",
        "TRUNCATE events",
        "UPDATE processed_commands SET fingerprint = 'x'",
        "DELETE FROM processed_commands",
        "TRUNCATE processed_commands",
        "INSERT INTO events (tx_id, stream_id, version, event_type, schema_version, payload)"
        " VALUES ('1', 'lp-order', 2, 'OrderCreated', 2, '{}')",
        "INSERT INTO events (position, stream_id, version, event_type, schema_version, payload)"
        " OVERRIDING SYSTEM VALUE VALUES (1000, 'lp-order', 2, 'OrderCreated', 2, '{}')",
        "SELECT * FROM schema_migrations",
    ]

    outcomes = await sql_outcomes(access.urls.writer_postgres_url, forbidden)

    assert outcomes == dict.fromkeys(forbidden, "InsufficientPrivilegeError")
    assert (reaped, foreign) == (True, "InsufficientPrivilegeError")


async def test_the_writer_cannot_change_the_schema(access: Access) -> None:
    """No DDL for the write service: no tables (not even temporary ones), indexes, schemas or ALTERs."""
    statements = [
        "CREATE TABLE sneaky (id int)",
        "CREATE TEMPORARY TABLE sneaky (id int)",
        "CREATE SCHEMA sneaky",
        "CREATE INDEX sneaky ON events (stream_id)",
        "ALTER TABLE events ADD COLUMN sneaky int",
        "ALTER TABLE events DISABLE TRIGGER ALL",
        "DROP TABLE events",
    ]

    outcomes = await sql_outcomes(access.urls.writer_postgres_url, statements)

    assert outcomes == dict.fromkeys(statements, "InsufficientPrivilegeError")


async def test_the_worker_role_can_only_read_events(access: Access) -> None:
    """The sync worker's role runs every query of the worker and ProjectionAdmin (tail, head, parked
    events, the blocking transaction, lag) and LISTENs, and has no other right: no write anywhere,
    not even the idempotency keys, and no DDL."""
    conn = await open_connection(access.urls.worker_postgres_url)
    try:
        await conn.add_listener(NOTIFY_CHANNEL, lambda *_: None)
        reads = (
            await head(conn),
            await read_batch(conn, START, 10),
            await read_positions(conn, [1]),
            await oldest_transaction(conn),
            tuple(await conn.fetchrow(LAG_QUERY, *START) or ()),
        )
    finally:
        await conn.close()
    statements = [
        "SELECT count(*) FROM events",
        "INSERT INTO events (stream_id, version, event_type, schema_version, payload)"
        " VALUES ('lp-order', 1, 'OrderCreated', 2, '{}')",
        "UPDATE events SET payload = '{}'",
        "DELETE FROM events",
        "TRUNCATE events",
        "SELECT count(*) FROM processed_commands",
        "INSERT INTO processed_commands (command_id, fingerprint, stream_id, version, position, tx_id)"
        " VALUES ('c', 'f', 's', 1, 1, '1')",
        "CREATE TABLE sneaky (id int)",
    ]

    outcomes = await sql_outcomes(access.urls.worker_postgres_url, statements)

    assert reads == (None, Batch([], held_back=False), [], None, (0, 0.0))
    assert outcomes == dict.fromkeys(statements, "InsufficientPrivilegeError") | {
        "SELECT count(*) FROM events": "allowed"
    }


@pytest.mark.single_redis(
    "checks each refusal on one server (with a cross-slot MGET and server-wide commands);"
    " tests/cluster/test_cluster_access.py checks the users on every node of a cluster"
)
async def test_the_read_services_redis_user_can_only_read_under_the_prefix(access: Access, keys: ViewKeys) -> None:
    """The read service's Redis user reads view keys and nothing else: writes fail with NOPERM, also
    inside a script (scripts run with the caller's rights), and so does anything outside the prefix."""
    view, outside = keys.order("lp-1"), f"other-{uuid.uuid4().hex}:order:1"
    await access.admin_redis.set(view, "the view")
    await access.admin_redis.set(outside, "someone else's")
    reader = redis_client(access.urls.reader_redis_url)
    try:
        allowed = await reader.get(view)
        outcomes = {
            "SET view": await outcome(lambda: reader.set(view, "forged")),
            "DEL view": await outcome(lambda: reader.delete(view)),
            "SET in EVAL": await outcome(lambda: reader.eval("return redis.call('SET', KEYS[1], 'x')", 1, view)),
            "DEL in EVAL": await outcome(lambda: reader.eval("return redis.call('DEL', KEYS[1])", 1, view)),
            "GET outside": await outcome(lambda: reader.get(outside)),
            "GET outside in EVAL": await outcome(lambda: reader.eval("return redis.call('GET', KEYS[1])", 1, outside)),
            "PUBLISH": await outcome(lambda: reader.publish(keys.checkpoint_channel, "0-0")),
            "SCAN": await outcome(reader.scan),
            "FLUSHDB": await outcome(reader.flushdb),
            "CONFIG GET": await outcome(lambda: reader.config_get("*")),
        }
        async with reader.pubsub() as pubsub:
            await pubsub.subscribe(keys.changes_channel)
            subscribed = await pubsub.get_message(timeout=5)

            async def subscribe_outside() -> None:
                await pubsub.subscribe(f"other-{uuid.uuid4().hex}")
                await pubsub.get_message(timeout=5)

            outcomes["SUBSCRIBE outside"] = await outcome(subscribe_outside)
    finally:
        await reader.aclose()

    assert allowed == "the view"
    assert subscribed is not None
    assert subscribed["type"] == "subscribe"
    assert outcomes == {
        "SET view": "NoPermissionError",
        "DEL view": "NoPermissionError",
        "SET in EVAL": "NoPermissionError",
        "DEL in EVAL": "NoPermissionError",
        "GET outside": "NoPermissionError",
        "GET outside in EVAL": "NoPermissionError",
        "PUBLISH": "NoPermissionError",
        "SCAN": "NoPermissionError",
        "FLUSHDB": "NoPermissionError",
        "CONFIG GET": "NoPermissionError",
        "SUBSCRIBE outside": "NoPermissionError",
    }
    assert await access.admin_redis.mget(view, outside) == ["the view", "someone else's"]
    await access.admin_redis.delete(outside)


@pytest.mark.single_redis(
    "checks each refusal on one server (with a cross-slot MGET and server-wide commands);"
    " tests/cluster/test_cluster_access.py checks the users on every node of a cluster"
)
async def test_the_workers_redis_user_is_confined_to_the_prefix(access: Access, keys: ViewKeys) -> None:
    """The sync worker's Redis user writes and publishes under the prefix only, and has no server-wide
    command: no FLUSHDB, KEYS, CONFIG or ACL."""
    outside = f"other-{uuid.uuid4().hex}:order:1"
    await access.admin_redis.set(outside, "someone else's")
    worker = redis_client(access.urls.worker_redis_url)
    try:
        outcomes = {
            "SET inside": await outcome(lambda: worker.set(keys.order("lp-1"), "view")),
            "PUBLISH inside": await outcome(lambda: worker.publish(keys.checkpoint_channel, "0-0")),
            "GET outside": await outcome(lambda: worker.get(outside)),
            "SET outside": await outcome(lambda: worker.set(outside, "forged")),
            "DEL outside": await outcome(lambda: worker.delete(outside)),
            "DEL outside in EVAL": await outcome(lambda: worker.eval("return redis.call('DEL', KEYS[1])", 1, outside)),
            "PUBLISH outside": await outcome(lambda: worker.publish(f"other-{uuid.uuid4().hex}", "x")),
            "FLUSHDB": await outcome(worker.flushdb),
            "FLUSHALL": await outcome(worker.flushall),
            "KEYS": await outcome(lambda: worker.keys("*")),
            "CONFIG SET": await outcome(lambda: worker.config_set("maxmemory", "1")),
            "ACL SETUSER": await outcome(lambda: worker.acl_setuser("x", enabled=True)),
            "SCRIPT FLUSH": await outcome(worker.script_flush),
        }
    finally:
        await worker.aclose()

    assert outcomes == {
        "SET inside": "allowed",
        "PUBLISH inside": "allowed",
        "GET outside": "NoPermissionError",
        "SET outside": "NoPermissionError",
        "DEL outside": "NoPermissionError",
        "DEL outside in EVAL": "NoPermissionError",
        "PUBLISH outside": "NoPermissionError",
        "FLUSHDB": "NoPermissionError",
        "FLUSHALL": "NoPermissionError",
        "KEYS": "NoPermissionError",
        "CONFIG SET": "NoPermissionError",
        "ACL SETUSER": "NoPermissionError",
        "SCRIPT FLUSH": "NoPermissionError",
    }
    assert await access.admin_redis.get(outside) == "someone else's"
    await access.admin_redis.delete(outside)


# --- the setup command --------------------------------------------------------------------------

PRIVILEGES = """
SELECT 'database' AS kind, d.datname AS object, a.privilege_type, coalesce(r.rolname, 'PUBLIC') AS grantee
  FROM pg_database d, aclexplode(d.datacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
  WHERE d.datname = current_database()
UNION ALL
SELECT 'schema', n.nspname, a.privilege_type, coalesce(r.rolname, 'PUBLIC')
  FROM pg_namespace n, aclexplode(n.nspacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
  WHERE n.nspname = 'public'
UNION ALL
SELECT 'table', c.relname, a.privilege_type, coalesce(r.rolname, 'PUBLIC')
  FROM pg_class c, aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
  WHERE c.relnamespace = 'public'::regnamespace
UNION ALL
SELECT 'column', c.relname || '.' || t.attname, a.privilege_type, coalesce(r.rolname, 'PUBLIC')
  FROM pg_attribute t JOIN pg_class c ON c.oid = t.attrelid, aclexplode(t.attacl) a
  LEFT JOIN pg_roles r ON r.oid = a.grantee
  WHERE c.relnamespace = 'public'::regnamespace
"""
ROLES = """
SELECT rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin, rolreplication, rolbypassrls,
  array(SELECT m.roleid::regrole::text FROM pg_auth_members m WHERE m.member = r.oid ORDER BY 1) AS member_of
FROM pg_roles r WHERE rolname = any($1) ORDER BY rolname
"""


@dataclass(frozen=True)
class Snapshot:
    privileges: set[tuple[str, str, str, str]]  # kind, object, privilege, grantee (ours and PUBLIC)
    roles: list[tuple[Any, ...]]
    users: dict[str, dict[str, Any]]  # ACL GETUSER without the password hashes
    verifiers: dict[str, str]


async def snapshot(access: Access, settings: AccessSettings) -> Snapshot:
    roles = [settings.writer_role, settings.worker_role]
    conn = await asyncpg.connect(settings.postgres_url)
    try:
        privileges = {
            (r["kind"], r["object"], r["privilege_type"], r["grantee"])
            for r in await conn.fetch(PRIVILEGES)
            if r["grantee"] in [*roles, "PUBLIC"]
        }
        attributes = [tuple(r.values()) for r in await conn.fetch(ROLES, roles)]
        verifiers = {
            r["rolname"]: r["rolpassword"]
            for r in await conn.fetch("SELECT rolname, rolpassword FROM pg_authid WHERE rolname = any($1)", roles)
        }
    finally:
        await conn.close()
    users = {}
    for user in (settings.redis_worker_user, settings.redis_reader_user):
        found = await access.admin_redis.acl_getuser(user)
        assert found is not None
        users[user] = {key: value for key, value in found.items() if key != "passwords"}
    return Snapshot(privileges, attributes, users, verifiers)


def verifies(verifier: str, password: str) -> bool:
    """Whether a stored SCRAM-SHA-256 verifier was made from `password` (already SASLprep-normal)."""
    _, iterations_and_salt, keys = verifier.split("$")
    iterations, salt = iterations_and_salt.split(":")
    stored_key = keys.split(":")[0]
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return base64.b64encode(hashlib.sha256(client_key).digest()).decode() == stored_key


async def test_the_grants_are_exactly_these(access: Access) -> None:
    """Each role has exactly the rights docs/security.md lists, PUBLIC none on the database, and the
    passwords (one with quotes, one beyond ASCII) are stored as verifiers of exactly those strings."""
    settings = access.settings
    writer, worker = settings.writer_role, settings.worker_role
    database = settings.postgres_url.rpartition("/")[2]

    found = await snapshot(access, settings)

    assert found.privileges == {
        ("database", database, "CONNECT", writer),
        ("database", database, "CONNECT", worker),
        ("schema", "public", "USAGE", writer),
        ("schema", "public", "USAGE", worker),
        ("schema", "public", "USAGE", "PUBLIC"),
        ("table", "events", "SELECT", writer),
        ("table", "events", "SELECT", worker),
        ("table", "processed_commands", "SELECT", writer),
        *(
            ("column", f"events.{column}", "INSERT", writer)
            for column in ("stream_id", "version", "event_type", "schema_version", "payload", "metadata")
        ),
        *(
            ("column", f"processed_commands.{column}", "INSERT", writer)
            for column in ("command_id", "fingerprint", "stream_id", "version", "position", "tx_id")
        ),
    }
    assert found.roles == [
        (role, False, True, False, False, True, False, False, []) for role in sorted([writer, worker])
    ]
    assert (verifies(found.verifiers[writer], WRITER_PASSWORD), verifies(found.verifiers[worker], WORKER_PASSWORD)) == (
        True,
        True,
    )
    assert found.users[settings.redis_reader_user]["keys"] in (
        [f"~{access.settings.redis_prefix}*"],
        [f"{access.settings.redis_prefix}*"],
    )
    assert found.users[settings.redis_reader_user]["channels"] in (
        [f"&{access.settings.redis_prefix}*"],
        [f"{access.settings.redis_prefix}*"],
    )


@pytest.mark.single_redis("tampers with the users on one server and compares them there")
async def test_setting_up_again_converges_and_changes_passwords(access: Access) -> None:
    """A second run undoes every right added by hand since (tables, columns, sequences, schema,
    database, role attributes and memberships, ACL rules) and sets the new passwords."""
    settings = access.settings
    writer, worker = settings.writer_role, settings.worker_role
    before = await snapshot(access, settings)
    conn = await asyncpg.connect(settings.postgres_url)
    try:
        database = await conn.fetchval("SELECT current_database()")
        for statement in (
            f'GRANT UPDATE, DELETE, TRUNCATE ON events TO "{writer}"',
            f'GRANT INSERT (tx_id, recorded_at) ON events TO "{writer}"',
            f'GRANT INSERT, UPDATE ON events, processed_commands TO "{worker}"',
            "CREATE SEQUENCE lp_extra",
            f'GRANT USAGE ON SEQUENCE lp_extra TO "{writer}"',
            f'GRANT CREATE ON SCHEMA public TO "{writer}", PUBLIC',
            f'GRANT TEMPORARY, CONNECT ON DATABASE "{database}" TO PUBLIC',
            f'GRANT CREATE ON DATABASE "{database}" TO "{worker}"',
            f'ALTER ROLE "{writer}" CREATEDB CREATEROLE',
            f'ALTER ROLE "{worker}" NOLOGIN NOINHERIT',
            f'GRANT pg_signal_backend TO "{writer}"',
            f'GRANT pg_read_all_data, "{writer}" TO "{worker}"',
        ):
            await conn.execute(statement)
    finally:
        await conn.close()
    for user, rules in (
        (settings.redis_reader_user, ["+set", "~elsewhere:*", "allchannels"]),
        (settings.redis_worker_user, ["+@all", "allkeys"]),
    ):
        await access.admin_redis.execute_command("ACL", "SETUSER", user, *rules)  # type: ignore[no-untyped-call]
    tampered = await snapshot(access, settings)
    again = replace(settings, writer_password="second 'writer'", redis_reader_password="second 'reader'")

    report = await setup_access(again)
    after = await snapshot(access, again)
    old_password = redis_client(access.urls.reader_redis_url)
    new_password = redis_client(report.urls.reader_redis_url)
    try:
        refused = await outcome(old_password.ping)
        accepted = await new_password.ping()
    finally:
        await old_password.aclose()
        await new_password.aclose()

    assert tampered != before
    assert (after.privileges, after.roles, after.users) == (before.privileges, before.roles, before.users)
    assert (
        verifies(after.verifiers[writer], "second 'writer'"),
        verifies(after.verifiers[writer], WRITER_PASSWORD),
    ) == (
        True,
        False,
    )
    assert [line for line in report.lines if " created" in line] == []
    assert (refused, accepted) == ("AuthenticationError", True)


async def setup_command(argv: list[str], env: dict[str, str]) -> Ran:
    """Runs `orders-setup-access ARGV...` in a child process."""
    return await run_to_end(script_command("orders-setup-access", *argv), env)


async def test_the_command_line_prints_masked_urls(access: Access) -> None:
    """`orders-setup-access` takes passwords from the environment, never shows them (not in --help
    either), and prints the URL each service should use."""
    settings = access.settings
    secrets = {
        "ORDERS_WRITER_PASSWORD": settings.writer_password,
        "ORDERS_WORKER_PASSWORD": settings.worker_password,
        "ORDERS_REDIS_WORKER_PASSWORD": settings.redis_worker_password,
        "ORDERS_REDIS_READER_PASSWORD": settings.redis_reader_password,
    }
    env = child_environment(secrets)
    argv = [
        *("--postgres-url", settings.postgres_url, "--redis-url", settings.redis_url),
        *("--redis-prefix", settings.redis_prefix, "--writer-role", settings.writer_role),
        *("--worker-role", settings.worker_role, "--redis-worker-user", settings.redis_worker_user),
        *("--redis-reader-user", settings.redis_reader_user),
    ]

    done = await setup_command(argv, env)
    helped = await setup_command(["--help"], env)
    missing = await setup_command([], {k: v for k, v in env.items() if k not in secrets})

    assert (done.status, done.err) == (0, "")
    assert helped.status == 0
    assert [secret for secret in secrets.values() if secret in done.out + helped.out] == []
    writer_url = with_credentials(settings.postgres_url, settings.writer_role, "", mask=True)
    reader_url = with_credentials(settings.redis_url, settings.redis_reader_user, "", mask=True)
    assert f"orders-write-service: ORDERS_POSTGRES_URL={writer_url}\n" in done.out
    assert (
        f"orders-read-service:  ORDERS_REDIS_URL={reader_url} ORDERS_REDIS_PREFIX={settings.redis_prefix}" in done.out
    )
    assert "ORDERS_WRITER_PASSWORD; set]" in " ".join(helped.out.split())
    assert missing.status == 2
    assert "missing setting --writer-password (or ORDERS_WRITER_PASSWORD), needed to set up postgres" in missing.err
    assert "missing setting --redis-reader-password (or ORDERS_REDIS_READER_PASSWORD)" in missing.err


# --- the lists stay in step with the code and the docs --------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def script_commands(*sources: str) -> set[str]:
    """The commands the Lua scripts in `sources` (file paths or script texts) run: named in a
    redis.call, or allowed by the batch's write script (`NAME=true` in its table of writes)."""
    texts = [(ROOT / source).read_text() if source.endswith(".py") else source for source in sources]
    named = r"redis\.call\('(\w+)'|\b([A-Z]+)=true\b"
    return {command.lower() for text in texts for match in re.findall(named, text) for command in match if command}


def test_every_command_in_a_script_is_granted() -> None:
    """Each user may run every command its Lua scripts call (the end-to-end tests above cover the
    commands sent directly): the read service's scripts and the heartbeat read it shares with the
    worker, and the worker's lease scripts and batch read."""
    reader = script_commands(
        *(str(path.relative_to(ROOT)) for path in sorted((ROOT / "read_service").glob("*.py"))),
        "orders/store/views.py",
        _READ_HEARTBEAT,
    )
    worker = script_commands(*(str(path.relative_to(ROOT)) for path in sorted((ROOT / "sync_worker").glob("*.py"))))

    assert reader - set(REDIS_READER_COMMANDS) == set()
    assert worker - set(REDIS_WORKER_COMMANDS) == set()
    assert (reader, worker) == (
        {"get", "exists", "zrevrangebylex", "time"},
        # mget, zmscore: the projector's batch read; incrby to sadd: what its batch write may run, and
        # lrange its guard on a parked list; exists, srandmember: a step's state; zrange,
        # zremrangebyscore: the workers' registrations
        {"get", "mget", "zmscore", "set", "exists", "del", "time"}
        | {"incrby", "publish", "zadd", "zrem", "rpush", "hset", "hdel", "sadd", "lrange"}
        | {"srandmember", "zrange", "zremrangebyscore"},
    )


def test_the_security_doc_lists_the_exact_rules() -> None:
    """docs/security.md shows the ACL rules and the column grants the command uses, word for word."""
    doc = (ROOT / "docs" / "security.md").read_text()
    rules = {
        user: " ".join(acl_rules("orders:", commands, None))
        for user, commands in (("orders-worker", REDIS_WORKER_COMMANDS), ("orders-reader", REDIS_READER_COMMANDS))
    }
    grants = [
        f"GRANT INSERT ({', '.join(EVENTS_INSERT_COLUMNS)}) ON events TO orders_writer;",
        f"GRANT INSERT ({', '.join(COMMANDS_INSERT_COLUMNS)}) ON processed_commands TO orders_writer;",
    ]

    assert [user for user, rule in rules.items() if f"ACL SETUSER {user} {rule}\n" not in doc] == []
    assert [grant for grant in grants if grant not in doc] == []
