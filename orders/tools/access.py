"""`orders-setup-access`: least-privilege PostgreSQL roles and Redis ACL users for the three services.

It connects with admin credentials and creates (or, when they exist, resets) one login per process
kind, then prints the connection URLs each service should use (passwords masked). Running it again
converges: every right is revoked first and granted again in one transaction (PostgreSQL), and
`ACL SETUSER ... reset` rewrites each Redis user whole. Run it after `orders-migrate`, and again
after a migration that adds a table.

PostgreSQL (the event store's database; tables in the schema that holds `events`):

- write service, role `orders_writer` (LOGIN, nothing else):
  - CONNECT on the database, USAGE on the schema: to reach the tables at all.
  - SELECT on `events`: a command loads its order's events, and `INSERT ... RETURNING position,
    tx_id` reads back the new rows' positions.
  - INSERT on `events`, only the columns `stream_id, version, event_type, schema_version, payload,
    metadata`: appending is the write service's one job. `position` (identity), `tx_id`
    (`pg_current_xact_id()`) and `recorded_at` always come from their defaults, so a writer cannot
    forge the commit-order column the sync worker relies on (docs/design.md).
  - SELECT and INSERT on `processed_commands` (all columns but `processed_at`): the idempotency key
    is looked up, then recorded in the command's transaction.
  - No UPDATE, DELETE or TRUNCATE anywhere: the log is append-only. No sequence right either:
    `events.position` is an identity column, whose sequence INSERT advances without one.
  - Needs nothing else: `pg_notify` and `pg_current_xact_id` are PUBLIC functions, and
    `pg_terminate_backend` on its own connections (reaping an interrupted one) is allowed to the
    role that owns them.
- sync worker, role `orders_worker` (LOGIN, nothing else):
  - CONNECT, USAGE, and SELECT on `events` only: the tailing reads, the head of the log, parked
    events, and ProjectionAdmin's lag and rebuild totals. LISTEN needs no right. It reads
    `pg_stat_activity` (open to everyone) to name a transaction that holds it back; without
    `pg_read_all_stats` it sees other roles' sessions without their query text.
- read service: no role. It never connects to PostgreSQL (it takes no PostgreSQL setting).
- PUBLIC loses CONNECT and TEMPORARY on the database and CREATE on the schema (PostgreSQL 15 no
  longer grants the latter): otherwise every role, ours included, could connect and create tables
  there. The database is the event store's own; its owner and superusers keep their rights.
- Each run also revokes any other right of the two roles in this database and any role membership
  (but those in LOGIN_METHOD_ROLES, which only choose IAM authentication), and takes back
  attributes such as SUPERUSER or CREATEDB; it refuses roles that own objects (an owner has every
  right on what it owns). Passwords are sent as SCRAM-SHA-256 verifiers computed here (as psql's
  \\password does), so the plain password never appears in SQL, server logs or pg_stat_activity; a
  password outside printable ASCII is sent quoted by the server's `format('%L')` instead, since the
  server would normalise it (SASLprep) before hashing.

Redis: one ACL user per service, confined to the key prefix (`~prefix*`) and its channels
(`&prefix*`), with exactly the commands the code sends, listed below (categories grant too much: in
Redis 6.2 `@read` holds all of MEMORY and SCAN/RANDOMKEY/DBSIZE, which see keys outside any prefix;
in 7.0 `@write` holds FUNCTION FLUSH/DELETE/LOAD, which act on the whole server). Scripts run with
the caller's rights: every `redis.call` inside EVAL/EVALSHA is checked against the user, so granting
EVAL and SCRIPT LOAD adds no command. `resetchannels` is spelled out because Redis 6.2's `reset`
grants all channels (acl-pubsub-default). Passwords are sent as SHA-256 hashes (`#...`).

On a Redis Cluster (a redis+cluster:// admin URL) the users are set on every node, replicas too:
ACL users are not replicated, and a replica that a failover promotes must know them. They also get
what redis-py's cluster client sends to learn the cluster (REDIS_CLUSTER_COMMANDS: CLUSTER SLOTS for
the slot map, COMMAND for where each command's keys are); ACL SAVE runs on every node with an aclfile.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import secrets
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import asyncpg
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ResponseError

from orders import config
from orders.store.views import RedisClient, redis_client

DEFAULT_WRITER_ROLE = "orders_writer"
DEFAULT_WORKER_ROLE = "orders_worker"
DEFAULT_REDIS_WORKER_USER = "orders-worker"
DEFAULT_REDIS_READER_USER = "orders-reader"


class Store(StrEnum):
    POSTGRES = "postgres"
    REDIS = "redis"


STORES = tuple(Store)

# Memberships that choose how a role logs in (IAM database authentication) and grant no data rights:
# kept, where every other membership is revoked.
LOGIN_METHOD_ROLES = ["rds_iam", "cloudsqliamuser", "azure_ad_user"]
EVENTS_INSERT_COLUMNS = ("stream_id", "version", "event_type", "schema_version", "payload", "metadata")
COMMANDS_INSERT_COLUMNS = ("command_id", "fingerprint", "stream_id", "version", "position", "tx_id")

# Table -> (privilege, columns or () for the whole table), per role kind.
TableGrants = dict[str, list[tuple[str, tuple[str, ...]]]]
WRITER_GRANTS: TableGrants = {
    "events": [("SELECT", ()), ("INSERT", EVENTS_INSERT_COLUMNS)],
    "processed_commands": [("SELECT", ()), ("INSERT", COMMANDS_INSERT_COLUMNS)],
}
WORKER_GRANTS: TableGrants = {"events": [("SELECT", ())]}

# Commands each Redis user may run, and which code sends them.
_SCRIPTS = ("evalsha", "script|load", "eval")  # redis-py's Script: EVALSHA, SCRIPT LOAD after NOSCRIPT
_CONNECTION = ("ping", "select")  # health checks on idle connections; SELECT when the URL names a db
# Sent by redis-py on connecting, which goes on without them when refused; granted so that each new
# connection does not leave a refusal in the ACL LOG. They only label or configure that connection.
REDIS_HANDSHAKE_COMMANDS = ("client|setinfo", "client|maint_notifications")
REDIS_WORKER_COMMANDS = (
    # views, checkpoints, counters, lease and heartbeat (also inside the lease scripts)
    *("get", "mget", "set", "exists", "del", "incrby"),
    # index sorted sets and the dead-letter keys
    *("zadd", "zrem", "zrange", "zscore", "zmscore", "rpush", "lpop", "lrange", "hset", "hget", "hdel"),
    *("sadd", "srem", "srandmember"),  # retired generations
    "zremrangebyscore",  # expired worker registrations (sync_worker/membership.py)
    "zcard",  # ProjectionAdmin's count of parked orders
    "scan",  # deleting a generation's views (MATCH under the prefix)
    "publish",  # checkpoints and changes, inside the batch's write script
    "time",  # the Redis clock for heartbeats and rebuild progress
    *_SCRIPTS,
    *_CONNECTION,
)
REDIS_READER_COMMANDS = (
    # inside the read scripts (orders/store/views.py, read_service/servicer.py, orders/store/heartbeat.py)
    *("get", "exists", "zrevrangebylex", "time"),
    "mget",  # GetOrder's plain read of a view with its checkpoint (read_service/servicer.py)
    "subscribe",  # checkpoint and change feeds
    *_SCRIPTS,
    *_CONNECTION,
)
# What redis-py's cluster client sends to learn the cluster: the slot map and the commands' key positions.
REDIS_CLUSTER_COMMANDS = ("cluster|slots", "command")


@dataclass(frozen=True)
class AccessSettings:
    postgres_url: str
    redis_url: str
    redis_prefix: str
    writer_role: str
    writer_password: str
    worker_role: str
    worker_password: str
    redis_worker_user: str
    redis_worker_password: str
    redis_reader_user: str
    redis_reader_password: str
    stores: tuple[Store, ...] = STORES


@dataclass(frozen=True)
class ServiceURLs:
    """Where each service connects, with its own credentials (empty when that store was skipped)."""

    writer_postgres_url: str
    worker_postgres_url: str
    worker_redis_url: str
    reader_redis_url: str


@dataclass(frozen=True)
class AccessReport:
    lines: list[str]
    urls: ServiceURLs


class AccessError(Exception):
    """The setup cannot proceed safely (unmigrated schema, a role that owns objects, bad names)."""


# --- PostgreSQL ---------------------------------------------------------------------------------


def scram_verifier(password: str, iterations: int = 4096) -> str | None:
    """The SCRAM-SHA-256 verifier PostgreSQL would store for `password` (RFC 5802/7677), or None when
    the password is not printable ASCII: the server SASLprep-normalises such passwords first."""
    if not password or any(not " " <= char <= "~" for char in password):
        return None
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


async def _sql(conn: asyncpg.Connection, template: str, *values: str) -> None:
    """Runs DDL built by the server's format(): %I quotes identifiers, %L literals (DDL takes no parameters)."""
    statement = await conn.fetchval("SELECT format($1::text, VARIADIC $2::text[])", template, list(values))
    await conn.execute(statement)


def _grant_text(grants: TableGrants) -> list[str]:
    return [
        ", ".join(f"{privilege} ({', '.join(columns)})" if columns else privilege for privilege, columns in privileges)
        + f" ON {table}"
        for table, privileges in grants.items()
    ]


async def _event_store_schema(conn: asyncpg.Connection) -> str:
    schema: str | None = await conn.fetchval(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.oid = to_regclass('events')"
    )
    if schema is None:
        raise AccessError("this database has no events table: run orders-migrate against it first")
    return schema


async def _converge_role(conn: asyncpg.Connection, role: str, password: str) -> str:
    """Creates `role` as a plain login role, or resets an existing one to that; returns what it did."""
    verifier = scram_verifier(password)
    secret = password if verifier is None else verifier
    attributes = await conn.fetchrow(
        "SELECT oid, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolinherit,"
        " rolcanlogin FROM pg_roles WHERE rolname = $1",
        role,
    )
    if attributes is None:
        await _sql(conn, "CREATE ROLE %I LOGIN PASSWORD %L", role, secret)
        return "created"
    owned = await conn.fetch(
        "SELECT DISTINCT classid::regclass::text AS kind FROM pg_shdepend"
        " WHERE refobjid = $1 AND deptype = 'o'"
        " AND dbid IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))",
        attributes["oid"],
    )
    if owned:
        kinds = ", ".join(row["kind"] for row in owned)
        raise AccessError(f"role {role!r} owns objects ({kinds}) and so has every right on them; reassign them first")
    # Only attributes that differ are named: changing SUPERUSER, REPLICATION or BYPASSRLS at all
    # needs a superuser, which a managed service's admin is not.
    wanted = {
        "SUPERUSER": ("rolsuper", False),
        "CREATEDB": ("rolcreatedb", False),
        "CREATEROLE": ("rolcreaterole", False),
        "REPLICATION": ("rolreplication", False),
        "BYPASSRLS": ("rolbypassrls", False),
        "INHERIT": ("rolinherit", True),
        "LOGIN": ("rolcanlogin", True),
    }
    fixes = [name if want else f"NO{name}" for name, (column, want) in wanted.items() if attributes[column] != want]
    await _sql(conn, f"ALTER ROLE %I WITH {' '.join(fixes)} PASSWORD %L", role, secret)
    memberships = (
        "SELECT DISTINCT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid"
        " WHERE m.member = $1 AND r.rolname <> all($2::text[])"
    )
    for row in await conn.fetch(memberships, attributes["oid"], LOGIN_METHOD_ROLES):
        await _sql(conn, "REVOKE %I FROM %I", row["rolname"], role)
    left = [row["rolname"] for row in await conn.fetch(memberships, attributes["oid"], LOGIN_METHOD_ROLES)]
    if left:
        raise AccessError(
            f"role {role!r} is still a member of {', '.join(left)} (granted by another role); revoke that"
        )
    return "updated" + (f" ({', '.join(fixes)})" if fixes else "")


async def _revoke_everything(conn: asyncpg.Connection, role: str) -> None:
    """Revokes every right `role` holds in this database, so that the grants that follow are all it has."""
    await _sql(conn, "REVOKE ALL ON DATABASE %I FROM %I", await conn.fetchval("SELECT current_database()"), role)
    schemas = await conn.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'"
    )
    for row in schemas:
        schema = row["nspname"]
        await _sql(conn, "REVOKE ALL ON SCHEMA %I FROM %I", schema, role)
        for kind in ("TABLES", "SEQUENCES", "ROUTINES"):
            await _sql(conn, f"REVOKE ALL ON ALL {kind} IN SCHEMA %I FROM %I", schema, role)


async def _grant(conn: asyncpg.Connection, role: str, schema: str, grants: TableGrants) -> None:
    await _sql(conn, "GRANT CONNECT ON DATABASE %I TO %I", await conn.fetchval("SELECT current_database()"), role)
    await _sql(conn, "GRANT USAGE ON SCHEMA %I TO %I", schema, role)
    for table, privileges in grants.items():
        for privilege, columns in privileges:
            column_list = f"({', '.join(columns)})" if columns else ""
            await _sql(conn, f"GRANT {privilege} {column_list} ON %I.%I TO %I", schema, table, role)


async def setup_postgres(conn: asyncpg.Connection, settings: AccessSettings) -> list[str]:
    """Creates or converges the writer and worker roles in one transaction; returns report lines."""
    if settings.writer_role == settings.worker_role:
        raise AccessError("the writer and the worker need roles of their own")
    lines = []
    async with conn.transaction():
        schema = await _event_store_schema(conn)
        database = await conn.fetchval("SELECT current_database()")
        await _sql(conn, "REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC", database)
        await _sql(conn, "REVOKE CREATE ON SCHEMA %I FROM PUBLIC", schema)
        lines.append(f"PostgreSQL database {database}, schema {schema}:")
        lines.append("  PUBLIC: CONNECT and TEMPORARY on the database and CREATE on the schema revoked")
        for role, password, grants, who in (
            (settings.writer_role, settings.writer_password, WRITER_GRANTS, "write service"),
            (settings.worker_role, settings.worker_password, WORKER_GRANTS, "sync worker"),
        ):
            done = await _converge_role(conn, role, password)
            await _revoke_everything(conn, role)
            await _grant(conn, role, schema, grants)
            lines.append(f"  role {role} ({who}): {done}; LOGIN, CONNECT, USAGE ON SCHEMA {schema}")
            lines += [f"    {text}" for text in _grant_text(grants)]
    return lines


# --- Redis --------------------------------------------------------------------------------------


def glob_escape(text: str) -> str:
    """`text` matched literally in a Redis glob pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def acl_rules(prefix: str, commands: Sequence[str], password: str | None) -> list[str]:
    """The ACL SETUSER rules of a user confined to `prefix`'s keys and channels, with only `commands`.
    `password` is sent as its SHA-256 (`#...`); None shows `#<password hash>` in its place."""
    pattern = glob_escape(prefix) + "*"
    secret = "#<password hash>" if password is None else "#" + hashlib.sha256(password.encode()).hexdigest()
    return [
        *("reset", "resetkeys", "resetchannels", "on", secret),
        *(f"~{pattern}", f"&{pattern}", "-@all"),
        *(f"+{command}" for command in commands),
    ]


def _check_user(name: str) -> str:
    if not name or any(char.isspace() for char in name) or name == "default":
        raise AccessError(f"bad Redis user name {name!r}: no spaces, and not 'default'")
    return name


async def setup_redis(redis: RedisClient, settings: AccessSettings) -> list[str]:
    """Creates or resets the worker's and the reader's ACL users; returns report lines."""
    if not settings.redis_prefix:
        raise AccessError("an empty Redis prefix would grant every key")
    users = [
        (settings.redis_worker_user, settings.redis_worker_password, REDIS_WORKER_COMMANDS, "sync worker"),
        (settings.redis_reader_user, settings.redis_reader_password, REDIS_READER_COMMANDS, "read service"),
    ]
    if _check_user(settings.redis_worker_user) == _check_user(settings.redis_reader_user):
        raise AccessError("the sync worker and the read service need Redis users of their own")
    nodes = await _nodes(redis, settings.redis_url)
    try:
        return await _set_users(nodes, users, settings.redis_prefix, isinstance(redis, RedisCluster))
    finally:
        if isinstance(redis, RedisCluster):
            for node in nodes:
                await node.aclose()


async def _set_users(
    nodes: list[Redis], users: list[tuple[str, str, tuple[str, ...], str]], prefix: str, cluster: bool
) -> list[str]:
    lines = ["Redis:" if not cluster else f"Redis Cluster ({len(nodes)} nodes, users set on each):"]
    for user, password, commands, who in users:
        if not password:
            raise AccessError(f"Redis user {user!r} needs a password")
        wanted = (*commands, *REDIS_CLUSTER_COMMANDS) if cluster else commands
        existed = [await _acl(node, "GETUSER", user) is not None for node in nodes]
        # Every node runs the same version, so each grants the same commands: show the first's.
        granted = [await _set_user(node, user, prefix, wanted, password) for node in nodes]
        shown = " ".join(acl_rules(prefix, granted[0], None))
        lines.append(f"  user {user} ({who}): {'updated' if any(existed) else 'created'}: {shown}")
    lines += ["  " + line for line in sorted({await _persist_acl(node) for node in nodes})]
    return lines


async def _nodes(redis: RedisClient, url: str) -> list[Redis]:
    """Every server the users must be on: the one Redis, or a client of each node of a cluster that
    CLUSTER NODES lists as reachable, replicas too (ACL users are not replicated; the cluster client
    itself only knows the masters)."""
    if not isinstance(redis, RedisCluster):
        return [redis]
    listed: dict[str, dict[str, Any]] = await redis.execute_command("CLUSTER NODES")
    unusable = {"fail", "noaddr", "handshake"}
    addresses = [address for address, node in listed.items() if not unusable & set(node["flags"].split(","))]
    first, _ = config.cluster_startup_urls(url)
    parts = urlsplit(first)
    credentials = parts.netloc.rpartition("@")[0]
    nodes = []
    for address in sorted(addresses):
        node = redis_client(urlunsplit(parts._replace(netloc=f"{credentials}@{address}" if credentials else address)))
        assert isinstance(node, Redis)
        nodes.append(node)
    return nodes


async def _set_user(node: Redis, user: str, prefix: str, commands: Sequence[str], password: str) -> tuple[str, ...]:
    """ACL SETUSER with `commands` and those of REDIS_HANDSHAKE_COMMANDS the server accepts in a rule
    (Redis 7 refuses unknown subcommands; 6.2 takes any); returns the commands granted."""
    handshake = list(REDIS_HANDSHAKE_COMMANDS)
    while True:
        granted = (*commands, *handshake)
        try:
            await _acl(node, "SETUSER", user, *acl_rules(prefix, granted, password))
        except ResponseError as error:
            unknown = [command for command in handshake if f"'+{command}'" in str(error)]
            if not unknown:
                raise
            handshake.remove(unknown[0])
        else:
            return granted


async def _acl(node: Redis, *args: str) -> Any:
    """An ACL subcommand as written (redis-py's acl_setuser reorders rules)."""
    return await node.execute_command("ACL", *args)  # type: ignore[no-untyped-call]


async def _persist_acl(node: Redis) -> str:
    try:
        aclfile = (await node.config_get("aclfile")).get("aclfile")
    except ResponseError:
        return "could not read the server's aclfile setting: make sure these users survive a restart"
    if not aclfile:
        return "not saved: the server has no aclfile, so these users last until it restarts (rerun this then)"
    await _acl(node, "SAVE")
    return f"saved to {aclfile} (ACL SAVE)"


# --- URLs ---------------------------------------------------------------------------------------


def with_credentials(url: str, user: str, password: str, *, mask: bool = False) -> str:
    """`url` (an admin URL) with `user` and `password` instead of its own credentials."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    secret = "****" if mask else quote(password, safe="")
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in {"user", "password"}]
    if parts.scheme == "unix":  # redis-py reads a socket URL's credentials from its query
        query += [("username", user), ("password", "****" if mask else password)]
        return urlunsplit(parts._replace(netloc=host, query=urlencode(query, safe="*")))
    netloc = f"{quote(user, safe='')}:{secret}@{host}"
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))


def service_urls(settings: AccessSettings, *, mask: bool = False) -> ServiceURLs:
    pg, rd = "postgres" in settings.stores, "redis" in settings.stores

    def url(selected: bool, base: str, user: str, password: str) -> str:
        return with_credentials(base, user, password, mask=mask) if selected else ""

    return ServiceURLs(
        writer_postgres_url=url(pg, settings.postgres_url, settings.writer_role, settings.writer_password),
        worker_postgres_url=url(pg, settings.postgres_url, settings.worker_role, settings.worker_password),
        worker_redis_url=url(rd, settings.redis_url, settings.redis_worker_user, settings.redis_worker_password),
        reader_redis_url=url(rd, settings.redis_url, settings.redis_reader_user, settings.redis_reader_password),
    )


def _service_lines(settings: AccessSettings) -> list[str]:
    masked = service_urls(settings, mask=True)
    prefix = f"ORDERS_REDIS_PREFIX={settings.redis_prefix}"

    def env(name: str, value: str) -> str:
        return f"{name}={value}" if value else f"{name}=<not set up here>"

    return [
        "Service settings (passwords masked):",
        f"  orders-write-service: {env('ORDERS_POSTGRES_URL', masked.writer_postgres_url)}",
        f"  orders-sync-worker:   {env('ORDERS_POSTGRES_URL', masked.worker_postgres_url)}"
        f" {env('ORDERS_REDIS_URL', masked.worker_redis_url)} {prefix}",
        f"  orders-read-service:  {env('ORDERS_REDIS_URL', masked.reader_redis_url)} {prefix}"
        " (no PostgreSQL: it never connects there)",
    ]


# --- entry points -------------------------------------------------------------------------------


async def setup_access(settings: AccessSettings) -> AccessReport:
    """Creates or converges every role and user `settings` names; idempotent."""
    lines: list[str] = []
    if "postgres" in settings.stores:
        for role, password in (
            (settings.writer_role, settings.writer_password),
            (settings.worker_role, settings.worker_password),
        ):
            if not role or not password:
                raise AccessError(f"PostgreSQL role {role!r} needs a name and a password")
        conn = await asyncpg.connect(settings.postgres_url, timeout=10)
        try:
            lines += await setup_postgres(conn, settings)
        finally:
            await conn.close()
    if "redis" in settings.stores:
        redis = redis_client(settings.redis_url)
        try:
            lines += await setup_redis(redis, settings)
        finally:
            await redis.aclose()
    return AccessReport([*lines, *_service_lines(settings)], service_urls(settings))


def _add_secret(parser: config.SettingsParser, flag: str, help: str) -> None:
    """Like config.add_setting, but --help shows whether it is set, never the value. Required when
    its store is set up (checked after parsing)."""
    env = config.env_name(flag)
    value = os.environ.get(env, "")
    shown = "set" if value else "not set"
    parser.add_argument(
        f"--{flag}", default=value, help=f"{help}; prefer the variable, command lines are visible [env {env}; {shown}]"
    )


def store_list(text: str) -> tuple[Store, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names or set(names) - set(STORES):
        raise ValueError(f"expected a comma-separated list of {', '.join(STORES)}, got {text!r}")
    return tuple(map(Store, names))


def parse_settings(argv: Sequence[str] | None = None) -> AccessSettings:
    parser = config.SettingsParser(
        prog="orders-setup-access",
        description="Create or reset least-privilege PostgreSQL roles and Redis ACL users for the services, "
        "with admin credentials, and print the URLs each service should use.",
    )
    config.add_setting(
        parser,
        "postgres-url",
        "admin URL of the event store's database (a superuser, or its owner with CREATEROLE);"
        " needed unless --stores leaves postgres out",
        default="",
        parse=_optional(config.postgres_url),
    )
    config.add_setting(
        parser,
        "redis-url",
        "admin URL of Redis (may run ACL SETUSER); needed unless --stores leaves redis out",
        default="",
        parse=_optional(config.redis_url),
    )
    config.add_setting(parser, "redis-prefix", "prefix of every Redis key and channel", default="orders:")
    config.add_setting(
        parser, "stores", "which stores to set up: postgres, redis or both", default="postgres,redis", parse=store_list
    )
    config.add_setting(parser, "writer-role", "PostgreSQL role of the write service", default=DEFAULT_WRITER_ROLE)
    _add_secret(parser, "writer-password", "password of the write service's PostgreSQL role")
    config.add_setting(parser, "worker-role", "PostgreSQL role of the sync worker", default=DEFAULT_WORKER_ROLE)
    _add_secret(parser, "worker-password", "password of the sync worker's PostgreSQL role")
    config.add_setting(
        parser, "redis-worker-user", "Redis ACL user of the sync worker", default=DEFAULT_REDIS_WORKER_USER
    )
    _add_secret(parser, "redis-worker-password", "password of the sync worker's Redis user")
    config.add_setting(
        parser, "redis-reader-user", "Redis ACL user of the read service", default=DEFAULT_REDIS_READER_USER
    )
    _add_secret(parser, "redis-reader-password", "password of the read service's Redis user")
    settings = config.settings_from(AccessSettings, parser.parse_args(argv))
    needed = {
        "postgres": ("postgres-url", "writer-password", "worker-password"),
        "redis": ("redis-url", "redis-worker-password", "redis-reader-password"),
    }
    missing = [
        f"--{flag} (or {config.env_name(flag)}), needed to set up {store}"
        for store in settings.stores
        for flag in needed[store]
        if not getattr(settings, flag.replace("-", "_"))
    ]
    if missing:
        parser.error("missing setting " + "; missing setting ".join(missing))
    return settings


def _optional(parse: Callable[[str], str]) -> Callable[[str], str]:
    def optional(text: str) -> str:
        return parse(text) if text else ""

    optional.__name__ = parse.__name__
    return optional


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    try:
        report = asyncio.run(setup_access(settings))
    except AccessError as error:
        sys.exit(f"orders-setup-access: error: {error}")
    print("\n".join(report.lines))
