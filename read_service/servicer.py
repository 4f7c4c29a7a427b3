"""OrderQueries over gRPC, answered from the Redis views only."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar, cast

import grpc
import redis.exceptions
from google.protobuf.timestamp_pb2 import Timestamp

from orders.domain.consistency import LogPosition
from orders.domain.errors import (
    CustomerNotFound,
    DeadlineExceeded,
    FieldViolation,
    InvalidQuery,
    OrderNotFound,
    OrdersError,
    Unavailable,
    ViewsNotReady,
)
from orders.domain.rules import ID_PATTERN, ID_RULE
from orders.domain.status import OrderStatus
from orders.server.rpc_errors import ErrorTable, to_status, translate_errors
from orders.store.partitions import partition_of
from orders.store.views import (
    GENERATION_PREFIX_LUA,
    PROJECTION,
    SUMMARY_PROJECTION,
    Arg,
    CustomerSummaryView,
    Exists,
    GenerationKeepsMoving,
    LiveReader,
    OrderView,
    RedisClient,
    ViewKeys,
    add_count,
    execute,
    is_json_view,
    member_order_id,
    parse_generation,
)
from orders.telemetry.metrics import READS_BEHIND, count_store_error
from orders.v1 import queries_pb2 as pb
from orders.v1 import queries_pb2_grpc, types_pb2
from read_service.freshness import CheckpointWatcher
from read_service.hot_views import HotView, HotViews
from read_service.page_tokens import PageCursor, PageTokens
from read_service.watch import MAX_WATCHED_ORDERS, ChangeFeed, ClientTooSlow, ShuttingDown, WatchLimit

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["OrderQueries"]
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
DEADLINE_MARGIN = 0.05  # seconds kept back from the deadline to read and answer after waiting
DEFAULT_REDIS_TIMEOUT = 5.0  # seconds, when the client sets no deadline
MAX_PAGE_BYTES = 3 * 1024 * 1024  # a page stays well under the 4 MiB message limit
STATUS_RANK = {status.value: rank for rank, status in enumerate(OrderStatus)}  # summaries list statuses in this order
SNAPSHOT_ORDERS = 100  # orders in a WatchCustomerOrders stream's first message, at most
READ_CHUNK = 100  # views per Redis call when a customer stream catches up
STREAM_END_MARGIN = 0.1  # seconds before the client's deadline at which a watch stream ends with OK

ERRORS: ErrorTable = {
    InvalidQuery: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    OrderNotFound: (grpc.StatusCode.NOT_FOUND, "ORDER_NOT_FOUND"),
    CustomerNotFound: (grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND"),
    ViewsNotReady: (grpc.StatusCode.UNAVAILABLE, "VIEWS_NOT_READY"),
    DeadlineExceeded: (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    Unavailable: (grpc.StatusCode.UNAVAILABLE, "VIEWS_UNAVAILABLE"),
    ShuttingDown: (grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN"),
    ClientTooSlow: (grpc.StatusCode.RESOURCE_EXHAUSTED, "CLIENT_TOO_SLOW"),
    WatchLimit: (grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCH_LIMIT"),
}

MAX_PAGE_TRIES = 4  # reads of one partition's page before it is given up as changing too fast

# One partition's page of an index, every key declared (Redis Cluster routes a script by its keys):
# the index's range from a start and, in the same atomic step, the checkpoint, the rebuild mark and
# the views and parked marks of the members the caller declared. The caller cannot name the views
# before it knows the members, so a page takes two steps (`_page`): the first declares none and
# learns the members, the next declares theirs. When the range that step reads is the same members,
# it read them and their views in one snapshot, at its checkpoint; otherwise the page changed in
# between, and the next step declares the new members.
# KEYS: the generation pointer, the index, the checkpoint, the rebuild mark, then (view, parked mark)
# of each declared member. ARGV: the generation (GENERATION_PREFIX_LUA), the start, the limit.
# Reply: the checkpoint, the rebuild mark, the number n of members, the n members, then (view, mark)
# of each declared member.
_PAGE_SCRIPT = (
    GENERATION_PREFIX_LUA
    + """
local members = redis.call('ZREVRANGEBYLEX', KEYS[2], ARGV[2], '-', 'LIMIT', 0, tonumber(ARGV[3]))
local result = {redis.call('GET', KEYS[3]), redis.call('GET', KEYS[4]), #members}
for _, member in ipairs(members) do result[#result + 1] = member end
for i = 5, #KEYS do result[#result + 1] = redis.call('GET', KEYS[i]) end
return result
"""
)

Entry = tuple[str, bytes | None, bool]  # index member, view (None: missing), whether the order has parked events


@dataclass(frozen=True)
class Page:
    """A page of one partition's index read in one snapshot: the checkpoint, the rebuild mark, and
    the entries."""

    checkpoint: bytes | None
    rebuild_target: bytes | None
    entries: list[Entry]

    @property
    def any_parked(self) -> bool:
        return any(parked for _, _, parked in self.entries)

    def order_ids(self) -> list[str]:
        return [member_order_id(member) for member, _, _ in self.entries]


def merged_entries(pages: Iterable[Page], limit: int) -> list[Entry]:
    """The first `limit` entries of the partitions' pages, newest first. Members sort globally
    (creation time, then order id), so this is the page one index of every order would give, and
    its last member is a cursor for every partition."""
    entries = [entry for page in pages for entry in page.entries]
    entries.sort(key=lambda entry: entry[0], reverse=True)
    return entries[:limit]


def merged_consistency(parts: Sequence[pb.ReadConsistency]) -> pb.ReadConsistency:
    """The consistency of an answer made of several partitions' reads: stale if any part is, its view
    token the oldest part's checkpoint (what it includes for sure), the furthest rebuild mark."""
    if len(parts) == 1:
        return parts[0]
    oldest = min(parts, key=lambda part: LogPosition.parse(part.view_token))
    merged = pb.ReadConsistency(stale=any(part.stale for part in parts), view_token=oldest.view_token)
    targets = [LogPosition.parse(part.rebuild_target) for part in parts if part.rebuild_target]
    if targets:
        merged.rebuild_target = max(targets).token()
    return merged


def added_up(parts: Sequence[CustomerSummaryView]) -> CustomerSummaryView:
    """A customer's summary from the summaries of its orders in each partition."""
    if len(parts) == 1:
        return parts[0]
    by_status: dict[str, int] = {}
    spend: dict[str, int] = {}
    for part in parts:
        for status, count in part.by_status.items():
            add_count(by_status, status, count)
        for currency, amount in part.spend_minor.items():
            add_count(spend, currency, amount)
    firsts = [part.first_order_us for part in parts if part.first_order_us]
    return CustomerSummaryView(
        parts[0].customer_id,
        sum(part.order_count for part in parts),
        by_status,
        spend,
        min(firsts, default=0),
        max(part.last_order_us for part in parts),
    )


T = TypeVar("T")


async def concurrently(reads: Sequence[Awaitable[T]]) -> list[T]:
    """The results of `reads`, run together; the first failure raises, once every read has ended
    (none is left running unobserved)."""
    if len(reads) == 1:
        return [await reads[0]]
    results = await asyncio.gather(*reads, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[T], results)


OrderRead = tuple[bytes | None, bytes | None, bytes | None, bool]  # checkpoint, rebuild mark, view, parked
IndexName = Callable[[ViewKeys], str]  # an index's key in the generation it is given

# What makes a read UNAVAILABLE (retry): Redis not reachable or too slow, a cluster slot without a
# serving master (during a failover) or in migration, a generation that kept moving.
UNAVAILABLE_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.RedisClusterException,
    GenerationKeepsMoving,
    OSError,
)


@asynccontextmanager
async def bounded_redis_call(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Bounds Redis calls by the RPC's remaining time and turns their failures into Unavailable."""
    remaining = context.time_remaining()
    try:
        async with asyncio.timeout(DEFAULT_REDIS_TIMEOUT if remaining is None else max(remaining, 0)):
            yield
    except TimeoutError as error:
        raise DeadlineExceeded("Redis did not answer within the deadline") from error
    except UNAVAILABLE_ERRORS as error:
        count_store_error("redis", "query")
        raise Unavailable(f"Redis is unavailable: {error}") from error


def _timestamp(micros: int) -> Timestamp:
    return Timestamp(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1000)


def order_message(view: OrderView) -> types_pb2.Order:
    return view.to_message()


def stored_order(raw: bytes) -> types_pb2.Order:
    """The Order of a stored view: parsed in C from the wire form, built only from the old JSON form."""
    if is_json_view(raw):
        return OrderView.from_json(raw).to_message()
    return types_pb2.Order.FromString(raw)


def wire_view(raw: bytes) -> bytes:
    """A stored order view in wire form (a serialized Order), converted if it is in the old JSON form."""
    return OrderView.from_json(raw).to_wire() if is_json_view(raw) else raw


def parse_token(text: str) -> LogPosition | None:
    if not text:
        return None
    try:
        return LogPosition.parse(text)
    except ValueError:
        raise InvalidQuery([FieldViolation("consistency_token", "not a token returned by a command")]) from None


def _flag_parked(consistency: pb.ReadConsistency, parked: bool) -> pb.ReadConsistency:
    """`consistency`, flagged stale for an order with parked events (its view is behind)."""
    if not parked or consistency.stale:
        return consistency
    return pb.ReadConsistency(stale=True, view_token=consistency.view_token, rebuild_target=consistency.rebuild_target)


def summary_message(view: CustomerSummaryView) -> pb.CustomerSummary:
    return pb.CustomerSummary(
        customer_id=view.customer_id,
        order_count=view.order_count,
        orders_by_status=[
            pb.StatusCount(status=types_pb2.OrderStatus.Value(f"ORDER_STATUS_{status}"), count=count)
            for status, count in sorted(view.by_status.items(), key=lambda item: STATUS_RANK[item[0]])
        ],
        lifetime_spend=[
            types_pb2.Money(currency_code=currency, minor_units=amount)
            for currency, amount in sorted(view.spend_minor.items())
        ],
        first_order_at=_timestamp(view.first_order_us),
        last_order_at=_timestamp(view.last_order_us),
    )


class OrderQueriesServicer(queries_pb2_grpc.OrderQueriesServicer):
    """The queries over the partitions of the projections (`keys.partitions` of each; see
    docs/design.md, "Partitions"): an order's own partition for GetOrder and WatchOrder, one round
    trip; every partition, read concurrently and merged, for ListOrders, the customer summary and
    WatchCustomerOrders."""

    def __init__(
        self,
        redis: RedisClient,
        keys: ViewKeys,
        watchers: dict[str, CheckpointWatcher],
        max_wait: float,
        feed: ChangeFeed,
        *,
        hot: HotViews | None = None,
        page_tokens: PageTokens | None = None,  # the signer shared by the replicas (read_service.page_tokens)
    ) -> None:
        self._redis = redis
        self._page_tokens = PageTokens.of_this_process() if page_tokens is None else page_tokens
        self._watchers = watchers  # each partition's checkpoint, by the partition's name (ViewKeys.name)
        self._max_wait = max_wait
        self._feed = feed  # changed orders, for the Watch streams
        # One reader per partition, each with the generation it last saw live (GetOrder's plain read).
        self._orders = [LiveReader(redis, k) for k in keys.of(PROJECTION).all_partitions()]
        self._summaries = [LiveReader(redis, k) for k in keys.of(SUMMARY_PROJECTION).all_partitions()]
        self._hot = HotViews() if hot is None else hot  # GetOrder's cache, kept current by the feed
        feed.on_changes, feed.on_reset = self._hot.forget, self._hot.clear
        for reader in self._orders:
            reader.on_move = self._generation_moved
            watchers[reader.keys.name].on_views_lost = self._hot.clear

    def _generation_moved(self, generation: int) -> None:
        self._hot.clear()  # the hot views were read from the old generation

    def _reader_of(self, order_id: str) -> LiveReader:
        """The reader of the orders partition that holds `order_id`."""
        return self._orders[partition_of(order_id, len(self._orders))]

    def _watcher(self, reader: LiveReader) -> CheckpointWatcher:
        return self._watchers[reader.keys.name]

    async def _await_token(
        self, token: LogPosition | None, context: grpc.aio.ServicerContext, readers: Sequence[LiveReader]
    ) -> None:
        """Waits until each partition of `readers` has reached `token` (or the wait ends): a token is
        one position of the log, which every partition's checkpoint passes."""
        if token is None:
            return
        remaining = context.time_remaining()
        budget = self._max_wait if remaining is None else min(self._max_wait, remaining - DEADLINE_MARGIN)
        await concurrently([self._watcher(reader).wait_for(token, budget) for reader in readers])

    def _seen(self, readers: Sequence[LiveReader]) -> list[LogPosition | None]:
        """Taken before a read: the newest checkpoint each partition was seen at (see `_consistency`)."""
        return [self._watcher(reader).high_water for reader in readers]

    def _consistency(
        self,
        token: LogPosition | None,
        raw_checkpoint: str | bytes | None,
        raw_target: str | bytes | None,
        seen_before: LogPosition | None,
        reader: LiveReader,
    ) -> pb.ReadConsistency:
        """What a read of one partition at `raw_checkpoint` says of itself. Stale when it is older
        than the caller's token, or than the partition was seen at before the read started
        (`seen_before`, from `_seen`): a read that started later cannot see older views unless Redis
        lost them, so an unflagged answer is never older than an earlier answer (monotonic reads)."""
        if raw_checkpoint is None:
            raise ViewsNotReady("the views are empty and being rebuilt; retry shortly")
        checkpoint = LogPosition.parse(raw_checkpoint)
        behind = self._watcher(reader).behind(checkpoint, seen_before)
        if behind:
            READS_BEHIND.labels(reader.keys.name).inc()
        consistency = pb.ReadConsistency(
            stale=behind or raw_target is not None or (token is not None and checkpoint < token),
            view_token=checkpoint.token(),
        )
        if raw_target is not None:  # replaying from scratch after a loss: say up to where
            consistency.rebuild_target = LogPosition.parse(raw_target).token()
        return consistency

    @staticmethod
    def _not_rebuilding(raw_target: str | bytes | None, consistency: pb.ReadConsistency) -> None:
        """Refuses answers that an unfinished rebuild could make wrong (a missing order, a short list)."""
        if raw_target is not None:
            raise ViewsNotReady(
                f"the views are being rebuilt (at {consistency.view_token} of "
                f"{LogPosition.parse(raw_target).token()}); retry shortly"
            )

    @translate_errors(ERRORS)
    async def GetOrder(self, request: pb.GetOrderRequest, context: grpc.aio.ServicerContext) -> pb.GetOrderResponse:
        if not ID_PATTERN.fullmatch(request.order_id):
            raise InvalidQuery([FieldViolation("order_id", ID_RULE)])
        raw, consistency = await self._read_order(request.order_id, parse_token(request.consistency_token), context)
        response = pb.GetOrderResponse(consistency=consistency)
        response.order.MergeFromString(raw)  # the stored view is the message: parsed in C, nothing built
        return response

    async def _read_order(
        self, order_id: str, token: LogPosition | None, context: grpc.aio.ServicerContext
    ) -> tuple[bytes, pb.ReadConsistency]:
        """One order's view (a serialized Order) once its partition reached `token` (or the wait
        ended), or the reason why not: from the hot views when they hold it, else from Redis."""
        hot = self._hot.get(order_id, token) if self._feed.subscribed.is_set() else None
        if hot is not None:
            return hot.raw, pb.ReadConsistency(view_token=hot.checkpoint.token())
        reader = self._reader_of(order_id)
        await self._await_token(token, context, [reader])
        [seen_before], mark = self._seen([reader]), self._hot.mark()
        async with bounded_redis_call(context):
            read = await self._read_order_plain(reader, order_id) or await self._read_order_scripted(reader, order_id)
        raw_checkpoint, raw_target, raw_view, parked = read
        consistency = self._consistency(token, raw_checkpoint, raw_target, seen_before, reader)
        if parked:  # some of its events wait in the dead-letter list: the view is behind the checkpoint
            consistency.stale = True
        raw = None if raw_view is None else wire_view(raw_view)
        fresh = HotView(raw, LogPosition.parse(consistency.view_token)) if raw and not consistency.stale else None
        self._hot.offer(order_id, fresh, mark)
        if raw is None:
            self._not_rebuilding(raw_target, consistency)
            if consistency.stale:
                raise ViewsNotReady(
                    f"order {order_id!r} is not in the views yet: they had not reached the "
                    "consistency token when the wait ended; retry"
                )
            raise OrderNotFound(order_id)
        return raw, consistency

    @staticmethod
    async def _read_order_scripted(reader: LiveReader, order_id: str) -> OrderRead:
        """The checkpoint, rebuild mark, view and parked flag of an order by the read script, which
        checks the live generation and asks whether the order's parked-events list exists."""
        raw_checkpoint, raw_target, raw_view, parked = await reader.get_raw(
            lambda keys: [
                keys.checkpoint,
                keys.rebuild_target,
                keys.order(order_id),
                Exists(keys.parked_events(order_id)),
            ]
        )
        return raw_checkpoint, raw_target, raw_view, parked is not None

    async def _read_order_plain(self, reader: LiveReader, order_id: str) -> OrderRead | None:
        """The checkpoint, rebuild mark, view and parked flag of an order by one MGET, without a script:
        the generation pointer in the same MGET proves the keys read were the live generation's. None
        when that cannot answer and the read script must: the generation moved (remembered for the
        next read), or the view is missing or in the old JSON form, for which a parked mark is not
        proof (workers before the marks parked without them; a view in the wire form was written by
        a worker that writes them, and no earlier worker can write after it: they cannot read it)."""
        keys = reader.live
        pointer, raw_checkpoint, raw_target, raw_view, mark = await execute(
            self._redis,
            "MGET",
            keys.generation_pointer,
            keys.checkpoint,
            keys.rebuild_target,
            keys.order(order_id),
            keys.parked_mark(order_id),
            raw=True,
        )
        if parse_generation(pointer) != keys.generation:
            reader.saw(parse_generation(pointer))
            return None
        if raw_view is None or is_json_view(raw_view):
            return None
        return raw_checkpoint, raw_target, raw_view, mark is not None

    @translate_errors(ERRORS)
    async def ListOrders(
        self, request: pb.ListOrdersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListOrdersResponse:
        size, status = self._validate_list(request)
        token = parse_token(request.consistency_token)
        filters = (request.customer_id, status)
        cursor = self._page_tokens.decode(request.page_token, *filters) if request.page_token else None
        await self._await_token(token, context, self._orders)
        start, seen_before = f"({cursor.after}" if cursor else "+", self._seen(self._orders)
        pages = await self._pages(lambda keys: keys.index(*filters), start, size + 1, context)
        consistency = self._pages_consistency(token, pages, seen_before)
        orders, last_member = self._fill_page(merged_entries(pages, size + 1), size)
        next_token = self._page_tokens.encode(PageCursor(*filters, last_member)) if last_member else ""
        return pb.ListOrdersResponse(orders=orders, next_page_token=next_token, consistency=consistency)

    async def _pages(self, index: IndexName, start: str, limit: int, context: grpc.aio.ServicerContext) -> list[Page]:
        """Each partition's page of the index `index` names from `start`, at most `limit` entries,
        read concurrently. Their orders leave the hot views: they may be newer than those."""
        async with bounded_redis_call(context):
            pages = await concurrently([self._page(reader, index, start, limit) for reader in self._orders])
        for page in pages:
            self._hot.forget(page.order_ids())
        return pages

    @staticmethod
    async def _page(reader: LiveReader, index: IndexName, start: str, limit: int) -> Page:
        """One partition's page in one snapshot (see _PAGE_SCRIPT): two round trips when the page
        holds still between them, one more each time it changed. When it changes at every try (an
        index written faster than it is read), UNAVAILABLE: a page mixed from two snapshots could
        list an order under a status it has left, and 'stale' does not say that."""
        members: list[str] = []  # declared: the members whose views the next step reads

        def declared(keys: ViewKeys) -> tuple[list[str], list[Arg]]:
            ids = [member_order_id(member) for member in members]
            views = [key for i in ids for key in (keys.order(i), keys.parked_mark(i))]
            return [index(keys), keys.checkpoint, keys.rebuild_target, *views], [start, limit]

        for _ in range(MAX_PAGE_TRIES):
            reply = await reader.run(_PAGE_SCRIPT, declared, raw=True)
            count = reply[2]
            read = [member.decode() for member in reply[3 : 3 + count]]
            if read == members:
                pairs = zip(reply[3 + count :: 2], reply[4 + count :: 2], strict=True)
                entries = [
                    (member, view, mark is not None) for member, (view, mark) in zip(members, pairs, strict=True)
                ]
                return Page(reply[0], reply[1], entries)
            members = read
        raise Unavailable(f"the page of {reader.keys.name} changed at each of {MAX_PAGE_TRIES} reads; retry")

    def _pages_consistency(
        self, token: LogPosition | None, pages: list[Page], seen_before: list[LogPosition | None]
    ) -> pb.ReadConsistency:
        """The consistency of a merged page; refused while a partition is rebuilt from scratch (a
        page could miss orders), and stale when one of its orders has parked events (its view is
        behind) or a partition's part is stale."""
        parts = []
        for reader, page, seen in zip(self._orders, pages, seen_before, strict=True):
            consistency = self._consistency(token, page.checkpoint, page.rebuild_target, seen, reader)
            self._not_rebuilding(page.rebuild_target, consistency)
            consistency.stale = consistency.stale or page.any_parked
            parts.append(consistency)
        return merged_consistency(parts)

    @staticmethod
    def _fill_page(entries: list[Entry], size: int) -> tuple[list[types_pb2.Order], str]:
        """Up to `size` orders that fit in one response, and the member to continue after ("" at the end).
        The byte budget matters: 500 orders of 100 lines each would exceed the 4 MiB message limit."""
        pairs = [(member, raw) for member, raw, _ in entries]
        orders: list[types_pb2.Order] = []
        used = 0
        for index, (_, raw) in enumerate(pairs[:size]):
            order = stored_order(raw) if raw is not None else None
            used += order.ByteSize() if order else 0
            if orders and used > MAX_PAGE_BYTES:
                return orders, pairs[index - 1][0]
            if order is not None:
                orders.append(order)
        return orders, pairs[size - 1][0] if len(pairs) > size else ""

    @translate_errors(ERRORS)
    async def GetCustomerSummary(
        self, request: pb.GetCustomerSummaryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCustomerSummaryResponse:
        if not ID_PATTERN.fullmatch(request.customer_id):
            raise InvalidQuery([FieldViolation("customer_id", ID_RULE)])
        token, customer = parse_token(request.consistency_token), request.customer_id
        await self._await_token(token, context, self._summaries)
        seen_before = self._seen(self._summaries)
        async with bounded_redis_call(context):
            reads = await concurrently(
                [
                    reader.get(lambda keys: [keys.checkpoint, keys.rebuild_target, keys.summary_customer(customer)])
                    for reader in self._summaries
                ]
            )
        parts, summaries = [], []
        for reader, (raw_checkpoint, raw_target, raw), seen in zip(self._summaries, reads, seen_before, strict=True):
            parts.append(self._consistency(token, raw_checkpoint, raw_target, seen, reader))
            if raw is not None:
                summaries.append(CustomerSummaryView.from_json(raw))
            else:  # a partition without the customer's orders: none, or (rebuilding) not there yet
                self._not_rebuilding(raw_target, parts[-1])
        consistency = merged_consistency(parts)
        if not summaries:
            if consistency.stale:
                raise ViewsNotReady("the summary had not reached the consistency token when the wait ended; retry")
            raise CustomerNotFound(customer)
        return pb.GetCustomerSummaryResponse(summary=summary_message(added_up(summaries)), consistency=consistency)

    @staticmethod
    def _validate_list(request: pb.ListOrdersRequest) -> tuple[int, str]:
        problems = []
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            problems.append(FieldViolation("page_size", f"must be 0 (default {DEFAULT_PAGE_SIZE}) to {MAX_PAGE_SIZE}"))
        if request.customer_id and not ID_PATTERN.fullmatch(request.customer_id):
            problems.append(FieldViolation("customer_id", ID_RULE))
        if request.status not in types_pb2.OrderStatus.values():
            problems.append(FieldViolation("status", f"unknown status {request.status}"))
        if problems:
            raise InvalidQuery(problems)
        status = "" if request.status == 0 else types_pb2.OrderStatus.Name(request.status).removeprefix("ORDER_STATUS_")
        return size, status

    # ------------------------------------------------------------------ live watch (read_service.watch)

    async def WatchOrder(
        self, request: pb.WatchOrderRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchOrderResponse]:
        try:
            if not ID_PATTERN.fullmatch(request.order_id):
                raise InvalidQuery([FieldViolation("order_id", ID_RULE)])
            token = parse_token(request.consistency_token)
            # Registered before the first read: a change after that read is never missed, and one
            # before it is skipped below by its version.
            with self._feed.order(request.order_id) as watch:
                raw, consistency = await self._read_order(request.order_id, token, context)
                view = types_pb2.Order.FromString(raw)
                yield pb.WatchOrderResponse(order=view, consistency=consistency)
                sent, sent_stale = view.version, consistency.stale
                end = self._stream_end(context)
                while True:
                    try:
                        async with asyncio.timeout_at(end):
                            change = await watch.next()
                    except TimeoutError:
                        return  # just before the client's deadline: end cleanly, with OK
                    if watch.take_switch():
                        sent = 0  # a new generation: send the view again, in its form
                    elif change is not None and change[1] <= sent:
                        continue  # already sent that version or a later one
                    for current, now in await self._current([request.order_id], token, context):
                        # A newer version; or the same one, now behind (its next events were parked).
                        if current.version > sent or (current.version == sent and now.stale and not sent_stale):
                            yield pb.WatchOrderResponse(order=current, consistency=now)
                            sent, sent_stale = current.version, now.stale
        except OrdersError as error:
            await self._end_stream("WatchOrder", error, context)

    async def WatchCustomerOrders(
        self, request: pb.WatchCustomerOrdersRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchCustomerOrdersResponse]:
        try:
            if not ID_PATTERN.fullmatch(request.customer_id):
                raise InvalidQuery([FieldViolation("customer_id", ID_RULE)])
            token, customer = parse_token(request.consistency_token), request.customer_id

            def index(keys: ViewKeys) -> str:
                return keys.index(customer)

            with self._feed.customer(request.customer_id) as watch:  # before the first read, as in WatchOrder
                await self._await_token(token, context, self._orders)
                seen_before = self._seen(self._orders)
                pages = await self._pages(index, "+", SNAPSHOT_ORDERS + 1, context)
                consistency = self._pages_consistency(token, pages, seen_before)
                orders, more = self._fill_page(merged_entries(pages, SNAPSHOT_ORDERS + 1), SNAPSHOT_ORDERS)
                sent = {order.order_id: order.version for order in orders}  # the version each order was sent at
                yield pb.WatchCustomerOrdersResponse(
                    orders=orders, initial=True, truncated=bool(more), consistency=consistency
                )
                end = self._stream_end(context)
                while True:
                    try:
                        async with asyncio.timeout_at(end):
                            change = await watch.next()
                    except TimeoutError:
                        return  # just before the client's deadline: end cleanly, with OK
                    if change is None:  # notifications may have been lost: re-read the newest and the sent
                        if watch.take_switch():  # a new generation: send everything again, in its form
                            sent = dict.fromkeys(sent, 0)
                        candidates = sorted(set(await self._newest_order_ids(index, context)) | set(sent))
                    elif change[1] <= sent.get(change[0], 0):
                        continue  # already sent that version or a later one
                    else:
                        candidates = [change[0]]
                    for start in range(0, len(candidates), READ_CHUNK):
                        for view, now in await self._current(candidates[start : start + READ_CHUNK], token, context):
                            if view.version <= sent.get(view.order_id, 0):
                                continue
                            if view.order_id not in sent and len(sent) >= MAX_WATCHED_ORDERS:
                                raise WatchLimit(
                                    f"this stream has sent {MAX_WATCHED_ORDERS} different orders, the most one "
                                    "stream tracks; resubscribe"
                                )
                            sent[view.order_id] = view.version
                            yield pb.WatchCustomerOrdersResponse(orders=[view], consistency=now)
        except OrdersError as error:
            await self._end_stream("WatchCustomerOrders", error, context)

    @staticmethod
    def _stream_end(context: grpc.aio.ServicerContext) -> float | None:
        """When (event loop time) a stream stops waiting for changes: STREAM_END_MARGIN before the
        client's deadline, so that it ends with OK instead of DEADLINE_EXCEEDED; never without one."""
        remaining = context.time_remaining()
        return None if remaining is None else asyncio.get_running_loop().time() + remaining - STREAM_END_MARGIN

    async def _current(
        self, order_ids: list[str], token: LogPosition | None, context: grpc.aio.ServicerContext
    ) -> list[tuple[types_pb2.Order, pb.ReadConsistency]]:
        """The views of those of `order_ids` that exist, as they are now, each with its consistency
        (stale when the order has parked events), in `order_ids`' order. Each partition's orders are
        read in one snapshot with its checkpoint, the partitions concurrently; none of a partition
        whose views are flushed (their rebuild announces every order again). The orders leave the
        hot views, which may be older than what is read here."""
        by_reader: dict[int, list[str]] = {}
        for order_id in order_ids:
            by_reader.setdefault(partition_of(order_id, len(self._orders)), []).append(order_id)
        readers = [self._orders[partition] for partition in by_reader]
        seen_before = self._seen(readers)
        async with bounded_redis_call(context):
            reads = await concurrently(
                [
                    self._current_in(reader, ids, token, seen)
                    for reader, ids, seen in zip(readers, by_reader.values(), seen_before, strict=True)
                ]
            )
        self._hot.forget(order_ids)
        found = {view.order_id: (view, consistency) for read in reads for view, consistency in read}
        return [found[order_id] for order_id in order_ids if order_id in found]

    async def _current_in(
        self, reader: LiveReader, order_ids: list[str], token: LogPosition | None, seen_before: LogPosition | None
    ) -> list[tuple[types_pb2.Order, pb.ReadConsistency]]:
        """`_current` of one partition's orders."""

        def names(keys: ViewKeys) -> list[str]:
            return [
                *(keys.checkpoint, keys.rebuild_target),
                *(keys.order(i) for i in order_ids),
                *(keys.parked_mark(i) for i in order_ids),
            ]

        raw_checkpoint, raw_target, *raws = await reader.get_raw(names)
        if raw_checkpoint is None:
            return []
        consistency = self._consistency(token, raw_checkpoint, raw_target, seen_before, reader)
        views, marks = raws[: len(order_ids)], raws[len(order_ids) :]
        return [
            (stored_order(raw), _flag_parked(consistency, mark is not None))
            for raw, mark in zip(views, marks, strict=True)
            if raw is not None
        ]

    async def _newest_order_ids(self, index: IndexName, context: grpc.aio.ServicerContext) -> list[str]:
        pages = await self._pages(index, "+", SNAPSHOT_ORDERS, context)
        return [member_order_id(member) for member, _, _ in merged_entries(pages, SNAPSHOT_ORDERS)]

    @staticmethod
    async def _end_stream(method: str, error: OrdersError, context: grpc.aio.ServicerContext) -> None:
        level = logging.WARNING if isinstance(error, Unavailable) else logging.INFO
        log.log(level, "%s ended: %s: %s", method, type(error).__name__, error)
        await context.abort_with_status(to_status(error, ERRORS))
