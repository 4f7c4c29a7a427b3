"""Which events of a batch the `park` policy holds back (sync_worker.projector.held_back)."""

from __future__ import annotations

from datetime import UTC, datetime

from orders.domain.errors import PoisonEvent
from orders.domain.events import OrderConfirmed, RecordedEvent
from sync_worker.projector import held_back

T0 = datetime(2025, 3, 1, tzinfo=UTC)


def recorded(position: int, stream: str, version: int) -> RecordedEvent:
    return RecordedEvent(
        position=position, tx_id=position, stream_id=stream, version=version, event=OrderConfirmed(), recorded_at=T0
    )


def positions(events: list[RecordedEvent]) -> list[int]:
    return [e.position for e in events]


BATCH = [recorded(1, "a", 1), recorded(2, "b", 1), recorded(3, "a", 2), recorded(4, "b", 2), recorded(5, "a", 3)]


def test_an_order_parked_in_this_batch_keeps_its_events_before_the_poison_one() -> None:
    poison = PoisonEvent(3, "a", RuntimeError("bug"))
    applied, held = held_back(BATCH, set(), {"a": poison})
    assert (positions(applied), positions(held)) == ([1, 2, 4], [3, 5])


def test_an_order_parked_before_the_batch_holds_back_all_its_events() -> None:
    applied, held = held_back(BATCH, {"b"}, {})
    assert (positions(applied), positions(held)) == ([1, 3, 5], [2, 4])


def test_held_events_keep_log_order_across_orders() -> None:
    poison = PoisonEvent(1, "a", RuntimeError("bug"))
    applied, held = held_back(BATCH, {"b"}, {"a": poison})
    assert (positions(applied), positions(held)) == ([], [1, 2, 3, 4, 5])
