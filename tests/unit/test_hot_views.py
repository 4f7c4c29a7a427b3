"""The read service's hot views (read_service.hot_views): what they serve, and what they refuse to
keep (a read that overlapped a change, anything after a reset)."""

from __future__ import annotations

from orders.domain.consistency import LogPosition
from read_service.hot_views import HotView, HotViews

AT_5, AT_9 = LogPosition(1, 5), LogPosition(1, 9)


def cached(views: HotViews, order_id: str, raw: bytes, at: LogPosition = AT_5) -> None:
    views.offer(order_id, HotView(raw, at), views.mark())


def test_serves_what_it_read_and_a_token_only_up_to_its_snapshot() -> None:
    views = HotViews()
    cached(views, "o1", b"v1")

    assert views.get("o1", None) == HotView(b"v1", AT_5)
    assert views.get("o1", AT_5) == HotView(b"v1", AT_5)
    assert views.get("o1", AT_9) is None  # the snapshot does not include the token: read Redis
    assert views.get("o2", None) is None


def test_a_read_that_overlapped_a_change_is_not_kept_and_drops_the_older_entry() -> None:
    views = HotViews()
    cached(views, "o1", b"v1")
    mark = views.mark()
    views.forget(["o2"])  # any change heard of while the read ran

    views.offer("o1", HotView(b"v2", AT_9), mark)

    assert views.get("o1", None) is None  # neither the overlapping read nor the older entry


def test_a_change_drops_the_order_and_a_reset_drops_everything() -> None:
    views = HotViews()
    for order_id in ("o1", "o2", "o3"):
        cached(views, order_id, order_id.encode())

    views.forget(["o1"])
    assert [views.get(o, None) is not None for o in ("o1", "o2", "o3")] == [False, True, True]
    views.clear()
    assert len(views) == 0


def test_a_view_that_must_not_be_kept_drops_the_entry() -> None:
    """A stale answer (parked, rebuilding, behind) read from Redis may be newer than the entry."""
    views = HotViews()
    cached(views, "o1", b"v1")

    views.offer("o1", None, views.mark())

    assert views.get("o1", None) is None


def test_holds_at_most_its_capacity_dropping_the_least_recently_used() -> None:
    views = HotViews(capacity=2)
    cached(views, "o1", b"1")
    cached(views, "o2", b"2")
    views.get("o1", None)  # o2 is now the least recently used
    cached(views, "o3", b"3")

    assert (views.get("o1", None) is not None, views.get("o2", None), len(views)) == (True, None, 2)


def test_capacity_zero_keeps_nothing() -> None:
    views = HotViews(capacity=0)
    cached(views, "o1", b"1")

    assert views.get("o1", None) is None
