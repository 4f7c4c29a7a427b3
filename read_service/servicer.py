"""OrderQueries over gRPC, answered from the Redis views only."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

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
from orders.telemetry.metrics import count_store_error
from orders.v1 import queries_pb2 as pb
from orders.v1 import queries_pb2_grpc, types_pb2
from read_service.freshness import CheckpointWatcher
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
# then (member, view) pairs of a page. KEYS[1]: the generation pointer. ARGV: the prefix, then the
# index, checkpoint, rebuild mark and order-key names without it, the page start and size.
_PAGE_SCRIPT = (
    GENERATION_PREFIX_LUA
    + f"""
local members = redis.call('ZREVRANGEBYLEX', p .. ARGV[2], ARGV[6], '-', 'LIMIT', 0, tonumber(ARGV[7]))
local result = {{redis.call('GET', p .. ARGV[3]), redis.call('GET', p .. ARGV[4])}}
for _, member in ipairs(members) do
  result[#result + 1] = member
  result[#result + 1] = redis.call('GET', p .. ARGV[5] .. {lua_member_order_id("member")})
end
return result
"""
)


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


def parse_token(text: str) -> LogPosition | None:
    if not text:
        return None
    try:
        return LogPosition.parse(text)
    except ValueError:
        raise InvalidQuery([FieldViolation("consistency_token", "not a token returned by a command")]) from None


@dataclass(frozen=True)
class PageCursor:
    """What a page token carries: the filters it belongs to and the last member returned."""

    customer_id: str
    status: str
    after: str

    def encode(self) -> str:
        raw = json.dumps([self.customer_id, self.status, self.after], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str, customer_id: str, status: str) -> PageCursor:
        try:
            customer, stat, after = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            cursor = cls(str(customer), str(stat), str(after))
        except (ValueError, TypeError, RecursionError):  # not base64, not JSON, or not a 3-item list
            raise InvalidQuery([FieldViolation("page_token", "not a token returned by ListOrders")]) from None
        if (cursor.customer_id, cursor.status) != (customer_id, status):
            raise InvalidQuery([FieldViolation("page_token", "belongs to a request with other filters")])
        return cursor


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
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._summary_keys = keys.of(SUMMARY_PROJECTION)
        self._watchers = watchers  # projection name -> its checkpoint
        self._max_wait = max_wait
        self._feed = feed  # changed orders, for the Watch streams
        self._live_keys = keys  # the orders' keys in the generation last seen live (GetOrder's plain read)
        self._orders = LiveReader(redis, keys)
        self._summaries = LiveReader(redis, self._summary_keys)

    async def _await_token(
        self, token: LogPosition | None, context: grpc.aio.ServicerContext, projection: str = PROJECTION
    ) -> None:
        if token is None:
            return
        remaining = context.time_remaining()
        budget = self._max_wait if remaining is None else min(self._max_wait, remaining - DEADLINE_MARGIN)
        await self._watchers[projection].wait_for(token, budget)

    @staticmethod
    def _consistency(token: LogPosition | None, raw_checkpoint: str | bytes | None) -> pb.ReadConsistency:
        if raw_checkpoint is None:
            raise ViewsNotReady("the views are empty and being rebuilt; retry shortly")
        checkpoint = LogPosition.parse(raw_checkpoint)
        return pb.ReadConsistency(stale=token is not None and checkpoint < token, view_token=checkpoint.token())

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
        or the reason why not."""
        await self._await_token(token, context)
        async with bounded_redis_call(context):
            read = await self._read_order_plain(order_id) or await self._read_order_scripted(order_id)
        raw_checkpoint, raw_target, raw_view, parked = read
        consistency = self._consistency(token, raw_checkpoint)
        if parked:  # some of its events wait in the dead-letter list: the view is behind the checkpoint
            consistency.stale = True
        if raw_view is None:
            self._not_rebuilding(raw_target, consistency)
            if consistency.stale:
                raise ViewsNotReady(
                    f"order {order_id!r} is not in the views yet: they had not reached the "
                    "consistency token when the wait ended; retry"
                )
            raise OrderNotFound(order_id)
        return (OrderView.from_json(raw_view).to_wire() if is_json_view(raw_view) else raw_view), consistency

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
        cursor = PageCursor.decode(request.page_token, request.customer_id, status) if request.page_token else None
        await self._await_token(token, context)
        start = f"({cursor.after}" if cursor else "+"
        async with bounded_redis_call(context):
            reply = await self._page(self._orders.rel.index(request.customer_id, status), start, size + 1)
        consistency = self._consistency(token, reply[0])
        self._not_rebuilding(reply[1], consistency)
        orders, last_member = self._fill_page(list(zip(reply[2::2], reply[3::2], strict=True)), size)
        next_token = PageCursor(request.customer_id, status, last_member).encode() if last_member else ""
        return pb.ListOrdersResponse(orders=orders, next_page_token=next_token, consistency=consistency)

    async def _page(self, index: str, start: str, limit: int) -> list[Any]:
        """The live generation's checkpoint, rebuild mark and (member, view) pairs of index `index`
        (a name from `self._orders.rel`) from `start`, at most `limit`; as bytes, but members as text."""
        rel = self._orders.rel
        keys: list[Arg] = [self._keys.generation_pointer]
        args: list[Arg] = [self._keys.prefix, index, rel.checkpoint, rel.rebuild_target, rel.order(""), start, limit]
        reply = list(await run_script(self._redis, _PAGE_SCRIPT, keys, args, raw=True))
        reply[2::2] = [member.decode() for member in reply[2::2]]
        return reply

    @staticmethod
    def _fill_page(pairs: list[tuple[str, bytes | None]], size: int) -> tuple[list[types_pb2.Order], str]:
        """Up to `size` orders that fit in one response, and the member to continue after ("" at the end).
        The byte budget matters: 500 orders of 100 lines each would exceed the 4 MiB message limit."""
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
        rel = self._summaries.rel
        async with bounded_redis_call(context):
            raw_checkpoint, raw_target, raw = await self._summaries.get(
                rel.checkpoint, rel.rebuild_target, rel.summary_customer(request.customer_id)
            )
        consistency = self._consistency(token, raw_checkpoint)
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
                sent = view.version
                end = self._stream_end(context)
                while True:
                    try:
                        async with asyncio.timeout_at(end):
                            change = await watch.next()
                    except TimeoutError:
                        return  # just before the client's deadline: end cleanly, with OK
                    if change is not None and change[1] <= sent:
                        continue  # already sent that version or a later one
                    [current], consistency_now = await self._current([request.order_id], token, context)
                    if current is not None and consistency_now is not None and current.version > sent:
                        yield pb.WatchOrderResponse(order=current, consistency=consistency_now)
                        sent = current.version
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
                async with bounded_redis_call(context):
                    reply = await self._page(index, "+", SNAPSHOT_ORDERS + 1)
                consistency = self._consistency(token, reply[0])
                self._not_rebuilding(reply[1], consistency)
                orders, more = self._fill_page(list(zip(reply[2::2], reply[3::2], strict=True)), SNAPSHOT_ORDERS)
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
                        candidates = sorted(set(await self._newest_order_ids(index, context)) | set(sent))
                    elif change[1] <= sent.get(change[0], 0):
                        continue  # already sent that version or a later one
                    else:
                        candidates = [change[0]]
                    for start in range(0, len(candidates), READ_CHUNK):
                        views, consistency_now = await self._current(
                            candidates[start : start + READ_CHUNK], token, context
                        )
                        for view in views:
                            if view is None or consistency_now is None or view.version <= sent.get(view.order_id, 0):
                                continue
                            if view.order_id not in sent and len(sent) >= MAX_WATCHED_ORDERS:
                                raise WatchLimit(
                                    f"this stream has sent {MAX_WATCHED_ORDERS} different orders, the most one "
                                    "stream tracks; resubscribe"
                                )
                            sent[view.order_id] = view.version
                            yield pb.WatchCustomerOrdersResponse(orders=[view], consistency=consistency_now)
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
    ) -> tuple[list[types_pb2.Order | None], pb.ReadConsistency | None]:
        """The orders' views as they are now, in one snapshot with the checkpoint; no views (and no
        consistency) while the views are flushed: their rebuild announces every order again."""
        async with bounded_redis_call(context):
            rel = self._orders.rel
            raw_checkpoint, *raws = await self._orders.get_raw(rel.checkpoint, *(rel.order(i) for i in order_ids))
        if raw_checkpoint is None:
            return [None] * len(order_ids), None
        views = [None if raw is None else stored_order(raw) for raw in raws]
        return views, self._consistency(token, raw_checkpoint)

    async def _newest_order_ids(self, index: str, context: grpc.aio.ServicerContext) -> list[str]:
        async with bounded_redis_call(context):
            reply = await self._page(index, "+", SNAPSHOT_ORDERS)
        return [member_order_id(str(member)) for member in reply[2::2]]

    @staticmethod
    async def _end_stream(method: str, error: OrdersError, context: grpc.aio.ServicerContext) -> None:
        level = logging.WARNING if isinstance(error, Unavailable) else logging.INFO
        log.log(level, "%s ended: %s: %s", method, type(error).__name__, error)
        await context.abort_with_status(to_status(error, ERRORS))
