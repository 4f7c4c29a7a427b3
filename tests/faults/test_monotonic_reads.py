"""Reads never go back in time without saying so (docs/fault-tolerance.md, "Reads never go back in
time"): Redis loses every view under load, the views replay the log from scratch, and clients that
keep reading known orders and customers without a token never get an older answer than one they had
before unless it carries `stale = true`."""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import grpc
import pytest

from orders.v1 import queries_pb2 as qry
from tests.faults.conftest import Cluster, Load, assert_consistent, lose_redis, run_load_while, views_rebuilt
from tests.helpers import add_item_request, create_request

KNOWN_ORDERS = 12
KNOWN_CUSTOMERS = 3
ITEMS_PER_ORDER = 4  # so each known order is at version 5 before the loss


@dataclass(frozen=True)
class Answer:
    """One answer a sampler got: what it was about, how new it was, and when it was asked and came."""

    subject: str
    newness: int  # an order's version, or a customer's order count
    stale: bool
    sent: float
    received: float


def unflagged_decreases(answers: list[Answer]) -> list[tuple[Answer, int]]:
    """Answers not flagged stale that are older than an answer received before they were asked."""
    found = []
    by_subject: dict[str, list[Answer]] = defaultdict(list)
    for answer in answers:
        by_subject[answer.subject].append(answer)
    for seen in by_subject.values():
        seen.sort(key=lambda a: a.received)
        received = [a.received for a in seen]
        newest_so_far: list[int] = []  # the newest answer among the first i received
        for answer in seen:
            newest_so_far.append(max(newest_so_far[-1] if newest_so_far else 0, answer.newness))
        for answer in seen:
            before = bisect.bisect_left(received, answer.sent)  # answers received before this was asked
            if before and not answer.stale and answer.newness < newest_so_far[before - 1]:
                found.append((answer, newest_so_far[before - 1]))
    return found


async def known_orders(cluster: Cluster) -> list[str]:
    """Orders at version 1 + ITEMS_PER_ORDER, of KNOWN_CUSTOMERS customers, in the views."""
    order_ids, last = [], None
    for i in range(KNOWN_ORDERS):
        created = (await cluster.commands.CreateOrder(create_request(f"known-c{i % KNOWN_CUSTOMERS}"))).result
        for item in range(ITEMS_PER_ORDER):
            last = (await cluster.commands.AddItem(add_item_request(created.order_id, f"S{item}"))).result
        order_ids.append(created.order_id)
    assert last is not None
    for order_id in order_ids:  # each with the last token: every partition holding one has reached it
        reached = qry.GetOrderRequest(order_id=order_id, consistency_token=last.consistency_token)
        assert not (await cluster.queries.GetOrder(reached, timeout=10)).consistency.stale
    return order_ids


async def sample(cluster: Cluster, order_ids: list[str], answers: list[Answer], errors: Counter[str]) -> None:
    """Reads every known order and customer in turn, without a token, until cancelled."""
    queries = cluster.queries
    while True:
        for subject in [*order_ids, *(f"known-c{c}" for c in range(KNOWN_CUSTOMERS))]:
            sent = time.monotonic()
            try:
                if subject.startswith("known-c"):
                    summary = await queries.GetCustomerSummary(
                        qry.GetCustomerSummaryRequest(customer_id=subject), timeout=1
                    )
                    newness, consistency = summary.summary.order_count, summary.consistency
                else:
                    order = await queries.GetOrder(qry.GetOrderRequest(order_id=subject), timeout=1)
                    newness, consistency = order.order.version, order.consistency
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
                await asyncio.sleep(0.01)
                continue
            answers.append(Answer(subject, newness, consistency.stale, sent, time.monotonic()))


@pytest.mark.parametrize("how", ["flushall", "restart-empty"])
async def test_no_read_goes_back_in_time_unflagged_when_redis_loses_the_views(cluster: Cluster, how: str) -> None:
    await cluster.start_write_service()
    await cluster.start_read_service()
    await cluster.start_worker(ORDERS_BATCH_SIZE="5")  # small batches: the replay takes a while
    order_ids = await known_orders(cluster)
    load = Load(cluster.commands, seed=7)
    answers: list[Answer] = []
    errors: Counter[str] = Counter()

    async def fault() -> None:
        samplers = [asyncio.create_task(sample(cluster, order_ids, answers, errors)) for _ in range(3)]
        try:
            await asyncio.sleep(1.0)
            await lose_redis(cluster, how)
            await views_rebuilt(cluster, timeout=60)
            await asyncio.sleep(0.5)
        finally:
            for sampler in samplers:
                sampler.cancel()
            await asyncio.gather(*samplers, return_exceptions=True)

    await run_load_while(load, fault)

    stale = sum(answer.stale for answer in answers)
    print(f"redis {how}: {len(answers)} answers, {stale} flagged stale, errors {dict(errors)}")
    assert answers
    assert errors.keys() <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert unflagged_decreases(answers) == []
    assert stale or errors, "the loss went unnoticed by every sampler: the test saw nothing"
    await assert_consistent(cluster, load)


def test_the_decrease_check_finds_what_it_must() -> None:
    """The check above, on made-up answers: a later, unflagged, older answer is found; a flagged one,
    or one asked before the newer answer came back (concurrent reads), is not."""
    newer = Answer("o", 5, False, sent=0.0, received=1.0)
    answers = [
        newer,
        Answer("o", 2, True, sent=2.0, received=3.0),  # flagged
        Answer("o", 3, False, sent=0.5, received=4.0),  # asked before the newer answer came back
        Answer("o", 4, False, sent=5.0, received=6.0),  # goes back unflagged
        Answer("p", 1, False, sent=5.0, received=6.0),  # another subject
    ]

    assert unflagged_decreases(answers) == [(answers[3], 5)]
