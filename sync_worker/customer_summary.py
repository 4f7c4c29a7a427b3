"""The customer summary projection: orders per status, lifetime spend per currency, first and
last order time, per customer.

It keeps its own copy of each order's view (under its own keys) so that it can
replace an order's old contribution by its new one; everything else about
batching, checkpoints and exactly-once comes from sync_worker.projector.

Which customers' summaries a batch needs depends on its orders' views, which
are read in the same round trip. So the projector remembers each order's
customer (it never changes) as a hint, and reads a summary it did not foresee
in a second round trip.
"""

from __future__ import annotations

from orders.domain.errors import PoisonEvent
from orders.domain.events import OrderCreated, RecordedEvent
from orders.domain.status import SPENDING
from orders.store.views import CustomerSummaryView, OrderView, RedisClient, ViewKeys, add_count
from sync_worker.projector import BatchWrites, Projector, Values, fold_new, order_ids, order_views

CUSTOMER_HINTS = 50_000  # orders whose customer the projector remembers (about 10 MB)


def summarize(summary: CustomerSummaryView, before: OrderView | None, after: OrderView) -> CustomerSummaryView:
    """`summary` with one order's contribution moved from `before` (None: new order) to `after`."""
    by_status, spend = dict(summary.by_status), dict(summary.spend_minor)  # copies: views stay unchanged
    count, first, last = summary.order_count, summary.first_order_us, summary.last_order_us
    if before is None:
        created = after.created_at_us
        count, first, last = count + 1, min(first or created, created), max(last, created)
    else:
        add_count(by_status, before.status, -1)
        if before.status in SPENDING:
            add_count(spend, before.currency_code, -before.total_minor)
    add_count(by_status, after.status, 1)
    if after.status in SPENDING:
        add_count(spend, after.currency_code, after.total_minor)
    # One new summary, built once: dataclasses.replace (twice per order) was much of this projection's cost.
    return CustomerSummaryView(summary.customer_id, count, by_status, spend, first, last)


class CustomerSummaryProjector(Projector):
    def __init__(self, redis: RedisClient, keys: ViewKeys) -> None:
        super().__init__(redis, keys)
        self._customer_of: dict[str, str] = {}  # order id -> customer id, oldest first

    def reads(self, events: list[RecordedEvent]) -> list[str]:
        ids = order_ids(events)
        created = {e.event.customer_id for e in events if isinstance(e.event, OrderCreated)}
        customers = created | {self._customer_of[i] for i in ids if i in self._customer_of}
        return [self.keys.summary_order(i) for i in ids] + [self.keys.summary_customer(c) for c in sorted(customers)]

    async def stage(self, events: list[RecordedEvent], values: Values, announce: bool = True) -> BatchWrites:
        before = order_views(values, self.keys.summary_order, order_ids(events))
        after = fold_new(before, events)
        changed = {i: view for i, view in after.items() if view is not None and view != before[i]}
        self._remember({i: view.customer_id for i, view in after.items() if view is not None})
        keys = {c: self.keys.summary_customer(c) for c in sorted({view.customer_id for view in changed.values()})}
        unforeseen = [key for key in keys.values() if key not in values]
        if unforeseen:
            values = {**values, **dict(zip(unforeseen, await self.redis.mget(unforeseen), strict=True))}
        summaries = {c: _summary(c, values[key]) for c, key in keys.items()}
        last_event = {e.stream_id: e for e in events}
        for order_id, view in changed.items():
            try:
                summaries[view.customer_id] = summarize(summaries[view.customer_id], before[order_id], view)
            except Exception as error:
                raise PoisonEvent(last_event[order_id].position, order_id, error) from error
        return self._writes(changed, summaries)

    def _writes(self, orders: dict[str, OrderView], summaries: dict[str, CustomerSummaryView]) -> BatchWrites:
        """The changed orders' copies and their customers' new summaries."""
        writes = BatchWrites()
        for order_id, view in orders.items():
            writes.set(self.keys.summary_order(order_id), view.to_json())
        for customer_id, summary in summaries.items():
            writes.set(self.keys.summary_customer(customer_id), summary.to_json())
        return writes

    def _remember(self, customers: dict[str, str]) -> None:
        """Bounded: a forgotten hint only costs a second round trip."""
        self._customer_of.update(customers)
        while len(self._customer_of) > CUSTOMER_HINTS:
            del self._customer_of[next(iter(self._customer_of))]


def _summary(customer_id: str, raw: str | bytes | None) -> CustomerSummaryView:
    return CustomerSummaryView(customer_id) if raw is None else CustomerSummaryView.from_json(raw)
