"""OrderQueries over gRPC, answered from the Redis views only."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import redis.exceptions
from google.protobuf.timestamp_pb2 import Timestamp
from redis.asyncio import Redis

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
from orders.store.views import (
    GENERATION_PREFIX_LUA,
    PROJECTION,
    SUMMARY_PROJECTION,
    Arg,
    CustomerSummaryView,
    LiveReader,
    OrderView,
    ViewKeys,
    execute,
    is_json_view,
    lua_member_order_id,
    member_order_id,
    parse_generation,
    run_script,
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

# One round trip, one consistent snapshot of the live generation: the checkpoint, the rebuild mark,
# then (member, view, parked) triples of a page. KEYS[1]: the generation pointer. ARGV: the prefix,
# then the index, checkpoint, rebuild mark and order-key names without it, the page start and size,
# and the parked-mark key name without the order id.
_PAGE_SCRIPT = (
    GENERATION_PREFIX_LUA
    + f"""
local members = redis.call('ZREVRANGEBYLEX', p .. ARGV[2], ARGV[6], '-', 'LIMIT', 0, tonumber(ARGV[7]))
local result = {{redis.call('GET', p .. ARGV[3]), redis.call('GET', p .. ARGV[4])}}
for _, member in ipairs(members) do
  local id = {lua_member_order_id("member")}
  result[#result + 1] = member
  result[#result + 1] = redis.call('GET', p .. ARGV[5] .. id)
  result[#result + 1] = redis.call('EXISTS', p .. ARGV[8] .. id)
end
return result
"""
)


@dataclass(frozen=True)
class Page:
    """A page of an index read in one snapshot: the checkpoint, the rebuild mark, and the entries
    (index member, view or None, whether the order has parked events)."""

    checkpoint: bytes | None
    rebuild_target: bytes | None
    entries: list[tuple[str, bytes | None, bool]]

    @property
    def any_parked(self) -> bool:
        return any(parked for _, _, parked in self.entries)

    def order_ids(self) -> list[str]:
        return [member_order_id(member) for member, _, _ in self.entries]


OrderRead = tuple[bytes | None, bytes | None, bytes | None, bool]  # checkpoint, rebuild mark, view, parked


@asynccontextmanager
async def bounded_redis_call(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Bounds Redis calls by the RPC's remaining time and turns their failures into Unavailable."""
    remaining = context.time_remaining()
    try:
        async with asyncio.timeout(DEFAULT_REDIS_TIMEOUT if remaining is None else max(remaining, 0)):
            yield
    except TimeoutError as error:
        raise DeadlineExceeded("Redis did not answer within the deadline") from error
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as error:
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
    def __init__(
        self,
        redis: Redis,
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
        self._keys = keys
        self._summary_keys = keys.of(SUMMARY_PROJECTION)
        self._watchers = watchers  # projection name -> its checkpoint
        self._max_wait = max_wait
        self._feed = feed  # changed orders, for the Watch streams
        self._live_keys = keys  # the orders' keys in the generation last seen live (GetOrder's plain read)
        self._orders = LiveReader(redis, keys)
        self._summaries = LiveReader(redis, self._summary_keys)
        self._hot = HotViews() if hot is None else hot  # GetOrder's cache, kept current by the feed
        feed.on_changes, feed.on_reset = self._hot.forget, self._hot.clear
        watchers[PROJECTION].on_views_lost = self._hot.clear

    async def _await_token(
        self, token: LogPosition | None, context: grpc.aio.ServicerContext, projection: str = PROJECTION
    ) -> None:
        if token is None:
            return
        remaining = context.time_remaining()
        budget = self._max_wait if remaining is None else min(self._max_wait, remaining - DEADLINE_MARGIN)
        await self._watchers[projection].wait_for(token, budget)

    def _seen(self, projection: str = PROJECTION) -> LogPosition | None:
        """Taken before a read: the newest checkpoint the views were seen at (see `_consistency`)."""
        return self._watchers[projection].high_water

    def _consistency(
        self,
        token: LogPosition | None,
        raw_checkpoint: str | bytes | None,
        raw_target: str | bytes | None,
        seen_before: LogPosition | None,
        projection: str = PROJECTION,
    ) -> pb.ReadConsistency:
        """What an answer read at `raw_checkpoint` says of itself. Stale when it is older than the
        caller's token, or than the views were seen at before the read started (`seen_before`,
        from `_seen`): a read that started later cannot see older views unless Redis lost them, so
        an unflagged answer is never older than an earlier answer (monotonic reads)."""
        if raw_checkpoint is None:
            raise ViewsNotReady("the views are empty and being rebuilt; retry shortly")
        checkpoint = LogPosition.parse(raw_checkpoint)
        behind = self._watchers[projection].behind(checkpoint, seen_before)
        if behind:
            READS_BEHIND.labels(projection).inc()
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
        """One order's view (a serialized Order) once the views reached `token` (or the wait ended),
        or the reason why not: from the hot views when they hold it, else from Redis."""
        hot = self._hot.get(order_id, token) if self._feed.subscribed.is_set() else None
        if hot is not None:
            return hot.raw, pb.ReadConsistency(view_token=hot.checkpoint.token())
        await self._await_token(token, context)
        seen_before, mark = self._seen(), self._hot.mark()
        async with bounded_redis_call(context):
            read = await self._read_order_plain(order_id) or await self._read_order_scripted(order_id)
        raw_checkpoint, raw_target, raw_view, parked = read
        consistency = self._consistency(token, raw_checkpoint, raw_target, seen_before)
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

    async def _read_order_scripted(self, order_id: str) -> OrderRead:
        """The checkpoint, rebuild mark, view and parked flag of an order by the read script, which
        resolves the live generation and asks whether the order's parked-events list exists."""
        rel = self._orders.rel
        raw_checkpoint, raw_target, raw_view, parked = await self._orders.get_raw(
            rel.checkpoint, rel.rebuild_target, rel.order(order_id), "?" + rel.parked_events(order_id)
        )
        return raw_checkpoint, raw_target, raw_view, parked is not None

    async def _read_order_plain(self, order_id: str) -> OrderRead | None:
        """The checkpoint, rebuild mark, view and parked flag of an order by one MGET, without a script:
        the generation pointer in the same MGET proves the keys read were the live generation's. None
        when that cannot answer and the read script must: the generation moved (remembered for the
        next read), or the view is missing or in the old JSON form, for which a parked mark is not
        proof (workers before the marks parked without them; a view in the wire form was written by
        a worker that writes them, and no earlier worker can write after it: they cannot read it)."""
        keys = self._live_keys
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
            self._live_keys = keys.at(parse_generation(pointer))
            self._hot.clear()  # they were read from the old generation
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
        await self._await_token(token, context)
        start, seen_before = f"({cursor.after}" if cursor else "+", self._seen()
        page = await self._page(self._orders.rel.index(request.customer_id, status), start, size + 1, context)
        consistency = self._page_consistency(token, page, seen_before)
        orders, last_member = self._fill_page(page.entries, size)
        next_token = self._page_tokens.encode(PageCursor(*filters, last_member)) if last_member else ""
        return pb.ListOrdersResponse(orders=orders, next_page_token=next_token, consistency=consistency)

    async def _page(self, index: str, start: str, limit: int, context: grpc.aio.ServicerContext) -> Page:
        """The live generation's page of index `index` (a name from `self._orders.rel`) from `start`,
        at most `limit` entries. Its orders leave the hot views: they may be newer than those."""
        rel = self._orders.rel
        keys: list[Arg] = [self._keys.generation_pointer]
        args: list[Arg] = [
            *(self._keys.pprefix, index, rel.checkpoint, rel.rebuild_target, rel.order("")),
            *(start, limit, rel.parked_mark("")),
        ]
        async with bounded_redis_call(context):
            reply = await run_script(self._redis, _PAGE_SCRIPT, keys, args, raw=True)
        triples = zip(reply[2::3], reply[3::3], reply[4::3], strict=True)
        page = Page(reply[0], reply[1], [(member.decode(), view, bool(parked)) for member, view, parked in triples])
        self._hot.forget(page.order_ids())
        return page

    def _page_consistency(
        self, token: LogPosition | None, page: Page, seen_before: LogPosition | None
    ) -> pb.ReadConsistency:
        """A page's consistency; refused while the views are rebuilt from scratch (a page could miss
        orders), and stale when one of its orders has parked events (its view is behind)."""
        consistency = self._consistency(token, page.checkpoint, page.rebuild_target, seen_before)
        self._not_rebuilding(page.rebuild_target, consistency)
        consistency.stale = consistency.stale or page.any_parked
        return consistency

    @staticmethod
    def _fill_page(entries: list[tuple[str, bytes | None, bool]], size: int) -> tuple[list[types_pb2.Order], str]:
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
        token = parse_token(request.consistency_token)
        await self._await_token(token, context, SUMMARY_PROJECTION)
        rel, seen_before = self._summaries.rel, self._seen(SUMMARY_PROJECTION)
        async with bounded_redis_call(context):
            raw_checkpoint, raw_target, raw = await self._summaries.get(
                rel.checkpoint, rel.rebuild_target, rel.summary_customer(request.customer_id)
            )
        consistency = self._consistency(token, raw_checkpoint, raw_target, seen_before, SUMMARY_PROJECTION)
        if raw is None:
            self._not_rebuilding(raw_target, consistency)
            if consistency.stale:
                raise ViewsNotReady("the summary had not reached the consistency token when the wait ended; retry")
            raise CustomerNotFound(request.customer_id)
        summary = summary_message(CustomerSummaryView.from_json(raw))
        return pb.GetCustomerSummaryResponse(summary=summary, consistency=consistency)

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
            token = parse_token(request.consistency_token)
            index = self._orders.rel.index(request.customer_id)
            with self._feed.customer(request.customer_id) as watch:  # before the first read, as in WatchOrder
                await self._await_token(token, context)
                seen_before = self._seen()
                page = await self._page(index, "+", SNAPSHOT_ORDERS + 1, context)
                consistency = self._page_consistency(token, page, seen_before)
                orders, more = self._fill_page(page.entries, SNAPSHOT_ORDERS)
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
        """The views of those of `order_ids` that exist, as they are now, in one snapshot with the
        checkpoint, each with its consistency (stale when the order has parked events). None while
        the views are flushed: their rebuild announces every order again. The orders leave the hot
        views, which may be older than what is read here."""
        rel, seen_before = self._orders.rel, self._seen()
        names = [*(rel.order(i) for i in order_ids), *(rel.parked_mark(i) for i in order_ids)]
        async with bounded_redis_call(context):
            raw_checkpoint, raw_target, *raws = await self._orders.get_raw(rel.checkpoint, rel.rebuild_target, *names)
        self._hot.forget(order_ids)
        if raw_checkpoint is None:
            return []
        consistency = self._consistency(token, raw_checkpoint, raw_target, seen_before)
        views, marks = raws[: len(order_ids)], raws[len(order_ids) :]
        return [
            (stored_order(raw), _flag_parked(consistency, mark is not None))
            for raw, mark in zip(views, marks, strict=True)
            if raw is not None
        ]

    async def _newest_order_ids(self, index: str, context: grpc.aio.ServicerContext) -> list[str]:
        return (await self._page(index, "+", SNAPSHOT_ORDERS, context)).order_ids()

    @staticmethod
    async def _end_stream(method: str, error: OrdersError, context: grpc.aio.ServicerContext) -> None:
        level = logging.WARNING if isinstance(error, Unavailable) else logging.INFO
        log.log(level, "%s ended: %s: %s", method, type(error).__name__, error)
        await context.abort_with_status(to_status(error, ERRORS))
