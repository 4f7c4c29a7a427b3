"""The customer summary's fold (sync_worker.customer_summary.summarize) and its stored JSON form."""

from __future__ import annotations

import dataclasses
import json

from orders.domain.status import OrderStatus
from orders.store.views import CustomerSummaryView, OrderView, ViewLine
from sync_worker.customer_summary import summarize

PENDING = OrderView("o1", "c1", "EUR", OrderStatus.PENDING, 100, 100, 1, (ViewLine("A", "Apple", 2, 300),))
CONFIRMED = dataclasses.replace(PENDING, status=OrderStatus.CONFIRMED, version=2, updated_at_us=200)


def test_summary_json_is_sorted_compact_and_holds_every_field() -> None:
    """The stored form: every field of the summary, keys sorted, no spaces (what earlier code wrote)."""
    summary = CustomerSummaryView("c1", 2, {"PENDING": 1, "CONFIRMED": 1}, {"EUR": 600}, 100, 300)
    expected = (
        '{"by_status":{"CONFIRMED":1,"PENDING":1},"customer_id":"c1","first_order_us":100,'
        '"last_order_us":300,"order_count":2,"spend_minor":{"EUR":600}}'
    )

    text = summary.to_json()

    assert expected == text
    assert json.dumps(dataclasses.asdict(summary), separators=(",", ":"), sort_keys=True) == text
    assert summary == CustomerSummaryView.from_json(text)


def test_summary_json_keeps_sums_beyond_64_bits() -> None:
    """Lifetime spend has no bound: a sum beyond 64 bits round-trips exactly."""
    summary = CustomerSummaryView("c1", spend_minor={"EUR": 2**70})

    assert summary == CustomerSummaryView.from_json(summary.to_json())


def test_summarize_moves_an_orders_contribution_and_leaves_its_input_alone() -> None:
    """A new order counts once and by status; a confirmed one moves from PENDING to CONFIRMED and
    adds its total to the spend; a count that reaches 0 disappears; the summary passed in is unchanged."""
    empty = CustomerSummaryView("c1")
    created = summarize(empty, None, PENDING)
    confirmed = summarize(created, PENDING, CONFIRMED)

    assert CustomerSummaryView("c1", 1, {"PENDING": 1}, {}, 100, 100) == created
    assert CustomerSummaryView("c1", 1, {"CONFIRMED": 1}, {"EUR": 600}, 100, 100) == confirmed
    assert CustomerSummaryView("c1") == empty
