"""Group commit: appends that arrive together share one round trip and one transaction.

`GroupCommit` knows nothing about SQL. Callers `await submit(item)` and get their own result or
their own exception; a `send` function turns a list of items into one outcome per item. The
batching is "natural": a batch starts at once when fewer than `max_in_flight` batches are being
sent, so a lone item is never delayed; items that arrive while every slot is busy queue, and the
next free slot takes up to `max_batch` of them together. There is no timer: the batch size follows
the load, one under light load and larger as the round trips fill up.

Items that share a key (the same order, the same command id) never go in one batch, nor in two
batches in flight at once: the later one waits for the next batch. The later command was decided
on the state before the earlier one, so it could not be decided right in the same transaction; in
the next batch it meets the earlier one's outcome in the table (a taken version, a recorded command
id) exactly as if the two had been sent one after the other.

Cancelling a caller (its deadline passed, its RPC was cancelled): an item still queued is dropped
and never sent; an item in flight is cancelled with its batch only when every caller in that batch
has gone. Otherwise the batch goes on for the others, and the cancelled command may be applied,
which is what DEADLINE_EXCEEDED already allows (a retry with the same command id finds out).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeAlias, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

# The outcome of one item: its result, or the exception its caller raises (a refusal of that item alone).
Outcome: TypeAlias = Result | Exception
Send = Callable[[list[Item]], Awaitable[list[Outcome[Result]]]]

DEFAULT_MAX_BATCH = 100  # commands per batch at most (ORDERS_APPEND_BATCH_MAX)
DEFAULT_MAX_IN_FLIGHT = 2  # batches being sent at once: one may wait on a lock while the next goes


@dataclass
class _Waiter(Generic[Item, Result]):
    item: Item
    keys: frozenset[Hashable]
    future: asyncio.Future[Result]


@dataclass
class _Batch(Generic[Item, Result]):
    waiters: list[_Waiter[Item, Result]]
    keys: set[Hashable] = field(default_factory=set)
    task: asyncio.Task[None] | None = None

    def abandoned(self) -> bool:
        return all(w.future.cancelled() for w in self.waiters)


class GroupCommit(Generic[Item, Result]):
    """Sends submitted items in batches, at most `max_in_flight` batches at a time."""

    def __init__(
        self,
        send: Send[Item, Result],
        keys: Callable[[Item], Iterable[Hashable]],
        max_batch: int = DEFAULT_MAX_BATCH,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("a batch holds at least one item, and at least one batch is sent at a time")
        self._send = send
        self._keys = keys
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queue: deque[_Waiter[Item, Result]] = deque()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._busy: set[Hashable] = set()  # keys of the items in flight

    async def submit(self, item: Item) -> Result:
        """The item's own result, once the batch that carried it is committed (or its own exception)."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiter(item, frozenset(self._keys(item)), future))
        self._start_batches()
        return await future  # a cancelled caller cancels `future`: see _take and _watch

    def _start_batches(self) -> None:
        while len(self._in_flight) < self._max_in_flight:
            batch = self._take()
            if batch is None:
                return
            task = asyncio.create_task(self._run(batch))
            batch.task = task
            self._in_flight.add(task)
            self._busy |= batch.keys
            # A done callback, not a `finally`: a task cancelled before its first step never runs its body.
            task.add_done_callback(functools.partial(self._finished, batch))
            self._watch(batch)

    def _take(self) -> _Batch[Item, Result] | None:
        """The next batch from the queue, in arrival order, leaving behind items whose keys are taken."""
        batch: _Batch[Item, Result] = _Batch([])
        held: list[_Waiter[Item, Result]] = []
        while self._queue and len(batch.waiters) < self._max_batch:
            waiter = self._queue.popleft()
            if waiter.future.done():  # its caller went away before it was sent: never send it
                continue
            if waiter.keys & self._busy or waiter.keys & batch.keys:
                held.append(waiter)
                continue
            batch.waiters.append(waiter)
            batch.keys |= waiter.keys
        self._queue.extendleft(reversed(held))
        return batch if batch.waiters else None

    def _watch(self, batch: _Batch[Item, Result]) -> None:
        """Cancels the batch's work once no caller waits for it any more (as a lone command always was)."""

        def on_done(future: asyncio.Future[Result]) -> None:
            if future.cancelled() and batch.task is not None and batch.abandoned():
                batch.task.cancel()

        for waiter in batch.waiters:
            waiter.future.add_done_callback(on_done)

    async def _run(self, batch: _Batch[Item, Result]) -> None:
        try:
            outcomes = await self._send([w.item for w in batch.waiters])
        except asyncio.CancelledError:
            raise  # every caller had gone (or the loop is closing): _finished cancels what is left
        except Exception as error:  # the batch as a whole failed (PostgreSQL unreachable): each caller raises it
            for waiter in batch.waiters:
                _resolve(waiter.future, error)
            return
        for waiter, outcome in zip(batch.waiters, outcomes, strict=True):
            _resolve(waiter.future, outcome)

    def _finished(self, batch: _Batch[Item, Result], task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._busy -= batch.keys
        for waiter in batch.waiters:
            waiter.future.cancel()  # no-op for those resolved; ends the wait of any left (a cancelled batch)
        if not task.cancelled() and task.exception() is not None:  # _run lets only non-Exception errors out
            log.error("an append batch failed", exc_info=task.exception())
        self._start_batches()


def _resolve(future: asyncio.Future[Result], outcome: Outcome[Result]) -> None:
    if future.done():  # its caller went away while the batch was in flight
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
