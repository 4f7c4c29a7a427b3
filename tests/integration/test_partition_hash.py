"""The partition of an order, as PostgreSQL computes it when a worker reads one partition's events,
is the one Python computes for its keys and readers (orders.store.partitions)."""

from __future__ import annotations

import uuid

import asyncpg

from orders.store.partitions import partition_of, partition_sql


async def test_postgresql_and_python_place_every_order_in_the_same_partition(database_url: str) -> None:
    ids = [f"order-{n}" for n in range(500)] + [uuid.uuid4().hex for _ in range(500)] + ["é-ü-ß", "注文-1", "a"]
    conn = await asyncpg.connect(database_url)
    try:
        for count in (2, 3, 4, 16, 256):
            placed: dict[str, int] = {}
            for index in range(count):
                condition = partition_sql("id", "$2", "$3")
                rows = await conn.fetch(f"SELECT id FROM unnest($1::text[]) AS id WHERE {condition}", ids, count, index)
                placed |= {row["id"]: index for row in rows}
            assert placed == {order_id: partition_of(order_id, count) for order_id in ids}, count
    finally:
        await conn.close()
