"""The customer summary projection: orders per status, lifetime spend per currency, first and
last order time, per customer.

It keeps its own copy of each order's view (under its own keys) so that it can
replace an order's old contribution by its new one; everything else about
batching, checkpoints and exactly-once comes from sync_worker.projector.
"""

from __future__ import annotations

from dataclasses import replace

from redis.asyncio.client import Pipeline

from orders.errors import PoisonEvent
from orders.events import RecordedEvent
from orders.views import CustomerSummaryView, OrderView
from sync_worker.projector import Projector, Writes, fold_new, load_order_views

SPENDING = {"CONFIRMED", "SHIPPED"}  # statuses whose order total counts as spent


def _add(counts: dict[str, int], key: str, amount: int) -> dict[str, int]:
    total = counts.get(key, 0) + amount
    return {**{k: v for k, v in counts.items() if k != key}, **({key: total} if total else {})}


def summarize(summary: CustomerSummaryView, before: OrderView | None, after: OrderView) -> CustomerSummaryView:
    """`summary` with one order's contribution moved from `before` (None: new order) to `after`."""
    by_status, spend = summary.by_status, summary.spend_minor
    if before is None:
        created = after.created_at_us
        summary = replace(
            summary,
            order_count=summary.order_count + 1,
            first_order_us=min(summary.first_order_us or created, created),
            last_order_us=max(summary.last_order_us, created),
        )
    else:
        by_status = _add(by_status, before.status, -1)
        if before.status in SPENDING:
            spend = _add(spend, before.currency_code, -before.total_minor)
    by_status = _add(by_status, after.status, 1)
    if after.status in SPENDING:
        spend = _add(spend, after.currency_code, after.total_minor)
    return replace(summary, by_status=by_status, spend_minor=spend)


class CustomerSummaryProjector(Projector):
    async def stage(self, pipe: Pipeline, events: list[RecordedEvent], announce: bool = True) -> Writes:
        before = await load_order_views(pipe, self.keys.summary_order, {e.stream_id for e in events})
        after = fold_new(before, events)
        changed = {i: view for i, view in after.items() if view is not None and view != before[i]}
        customers = sorted({view.customer_id for view in changed.values()})
        raws = await pipe.mget([self.keys.summary_customer(c) for c in customers])
        summaries = {
            c: CustomerSummaryView(c) if raw is None else CustomerSummaryView.from_json(raw)
            for c, raw in zip(customers, raws, strict=True)
        }
        last_event = {e.stream_id: e for e in events}
        for order_id, view in changed.items():
            try:
                summaries[view.customer_id] = summarize(summaries[view.customer_id], before[order_id], view)
            except Exception as error:
                raise PoisonEvent(last_event[order_id].position, order_id, error) from error

        def writes(queue: Pipeline) -> None:
            for order_id, view in changed.items():
                queue.set(self.keys.summary_order(order_id), view.to_json())
            for customer_id, summary in summaries.items():
                queue.set(self.keys.summary_customer(customer_id), summary.to_json())

        return writes
