"""Schema migrations for the event store, applied in order, each exactly once.

Migrations are the numbered `migrations/NNN_name.sql` files in this package.
Applying them is idempotent and safe from several processes at once: an
advisory lock serialises concurrent runs, and applied ones are recorded.
Run them with `orders-migrate` (the local runner runs them at start).
"""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from orders import config
from orders.config import add_log_argument, add_postgres_argument, setup_logging

log = logging.getLogger(__name__)
_LOCK_KEY = 0x6F72646572730001  # "orders" + 1: arbitrary, fixed advisory lock id
CONNECT_TIMEOUT = 10.0  # seconds orders-migrate waits for PostgreSQL to answer


def migration_files() -> list[tuple[int, str, str]]:
    """(number, name, sql) of every bundled migration, in order."""
    found = []
    for entry in resources.files("orders.store").joinpath("migrations").iterdir():
        if entry.name.endswith(".sql"):
            number = int(entry.name.split("_", 1)[0])
            found.append((number, entry.name, entry.read_text()))
    return sorted(found)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Applies pending migrations; returns the names of those it applied."""
    applied_now: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " number integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["number"] for row in await conn.fetch("SELECT number FROM schema_migrations")}
        for number, name, sql in migration_files():
            if number not in done:
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (number, name) VALUES ($1, $2)", number, name)
                applied_now.append(name)
    return applied_now


async def migrate_url(postgres_url: str) -> list[str]:
    conn = await asyncpg.connect(postgres_url)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


def main() -> None:
    parser = config.SettingsParser(prog="orders-migrate", description=__doc__)
    add_postgres_argument(parser)
    add_log_argument(parser)
    args = parser.parse_args()
    setup_logging(args.log_level, args.log_format)
    applied = asyncio.run(_migrate_or_exit(args.postgres_url))
    log.info("migrations applied: %s", ", ".join(applied) if applied else "none, schema is up to date")


async def _migrate_or_exit(url: str) -> list[str]:
    """migrate_url, but a PostgreSQL that cannot be reached or refuses the login ends the process
    with one line naming the setting, as every other process says it, instead of a traceback."""
    try:
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        reason = " ".join((str(error) or type(error).__name__).split())
        raise SystemExit(
            f"orders-migrate: error: --postgres-url ({config.env_name('postgres-url')}): "
            f"cannot connect to {_shown(url)}: {reason}"
        ) from None
    try:
        return await migrate(conn)
    finally:
        await conn.close()


def _shown(url: str) -> str:
    """`url` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
