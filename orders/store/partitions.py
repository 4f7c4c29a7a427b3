"""Which partition of a projection an order belongs to, in Python and in PostgreSQL's SQL.

The sync worker asks PostgreSQL for one partition's events only (orders.store.event_store), and
Redis keys and readers place an order by the same rule (orders.store.views): the two definitions
below must agree for every order id, which tests/integration/test_partition_hash.py checks against
a real server. The hash is the first 32 bits of the MD5 of the id's UTF-8 bytes: both sides have
MD5 built in (PostgreSQL's md5() hashes the text in the database's UTF-8 encoding), it is stable
across versions and languages, and it spreads any ids evenly. It is not used for security.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Partition:
    """Partition `index` of `count`."""

    index: int
    count: int


WHOLE = Partition(0, 1)  # an unpartitioned projection: every order


def partition_of(order_id: str, partitions: int) -> int:
    """The partition, of `partitions`, that holds an order's views and applies its events."""
    if partitions == 1:
        return 0
    digest = hashlib.md5(order_id.encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[:4], "big") % partitions


def partition_sql(column: str, count: str, index: str) -> str:
    """A SQL condition true when the order id in `column` is in partition `index` of `count` (SQL
    expressions, e.g. parameters "$4" and "$5"): the twin of `partition_of`."""
    return f"(('x' || left(md5({column}), 8))::bit(32)::bigint % {count} = {index})"
