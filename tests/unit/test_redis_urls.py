"""Redis URLs: one Redis (redis://, rediss://, unix://) or a Redis Cluster (redis+cluster://,
rediss+cluster://), and the client each gives (orders.store.views.redis_client)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis, RedisCluster

from orders.config import cluster_startup_urls, redis_url
from orders.store.views import redis_client


@pytest.mark.parametrize(
    ("url", "first", "others"),
    [
        ("redis+cluster://10.0.0.1:7000", "redis://10.0.0.1:7000", []),
        (
            "redis+cluster://user:secret@a:7000,b:7001,c:7002/0",
            "redis://user:secret@a:7000",
            [("b", 7001), ("c", 7002)],
        ),
        ("rediss+cluster://a:6380?ssl_cert_reqs=none", "rediss://a:6380?ssl_cert_reqs=none", []),
        ("redis+cluster://[::1]:7000,[::1]:7001", "redis://[::1]:7000", [("::1", 7001)]),
    ],
)
def test_a_cluster_url_names_its_first_node_with_the_options_and_the_others(
    url: str, first: str, others: list[tuple[str, int]]
) -> None:
    assert cluster_startup_urls(url) == (first, others)
    assert redis_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",
        "redis+cluster://a",
        "redis+cluster://a:7000,b",
        "redis+cluster://a:port",
        "redis+cluster://a:70000",
        "redis+cluster://a:7000/1",
        "http://a:7000",
    ],
)
def test_a_bad_redis_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"expected|database|not a cluster"):
        redis_url(url)


async def test_the_scheme_picks_the_client() -> None:
    single = redis_client("redis://127.0.0.1:1/0")
    cluster = redis_client("redis+cluster://127.0.0.1:1,127.0.0.1:2")
    try:
        assert isinstance(single, Redis)
        assert isinstance(cluster, RedisCluster)
        assert [(node.host, node.port) for node in cluster.startup_nodes] == [("127.0.0.1", 2), ("127.0.0.1", 1)]
    finally:
        await single.aclose()
        await cluster.aclose()
