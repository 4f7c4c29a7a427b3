"""OrdersClient: the Python client of OrderCommands and OrderQueries (asyncio).

    async with OrdersClient("127.0.0.1:50051", "127.0.0.1:50052") as client:
        session = client.session()
        created = await session.create_order("alice", "EUR")
        reply = await session.get_order(created.order_id)   # sees the new order

What it gets right so that callers need not:

- Deadlines: every call has one (`timeout`, 10 s by default), covering all its attempts.
- Retries only where they are safe: on UNAVAILABLE, by gRPC's own retry policy (exponential
  backoff with jitter, at most `RetryPolicy.max_attempts` attempts). A command gets its
  `command_id` once, before the first attempt, and every attempt resends it, so the server
  applies a retried command once and answers the retry with the first result.
- Overload: a server at its limit of calls in flight refuses with UNAVAILABLE (reason
  OVERLOADED) before doing anything, with a RetryInfo delay that it also sends as gRPC's server
  pushback, so the next attempt waits that long instead of the policy's backoff. A retry budget
  (`RetryPolicy.max_tokens`, `token_ratio`: gRPC's retry throttling) stops retrying while most
  calls fail, so that retries do not multiply the load of a server that is already overloaded.
- Read-your-writes: a session remembers the newest consistency token of its commands and
  sends it with its queries, which then wait until the views include those writes.
- Errors: a failed call raises an `OrdersRpcError` subclass (`NotFound`, `FailedPrecondition`,
  ...) that carries the status code and the google.rpc details: ErrorInfo's reason, BadRequest's
  field violations, RetryInfo's delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import threading
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from orders.domain.consistency import LogPosition
from orders.v1 import commands_pb2, commands_pb2_grpc, queries_pb2, queries_pb2_grpc, types_pb2

DEFAULT_TIMEOUT = 10.0
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # what the servers send at most

Reply = TypeVar("Reply", bound=Message)


# ---------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class FieldViolation:
    """One malformed field of a request (from google.rpc.BadRequest)."""

    field: str
    description: str


class OrdersRpcError(Exception):
    """A call that ended with a status other than OK, with its google.rpc details.

    `reason` is the ErrorInfo reason, a stable string to switch on (docs/errors.md).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" [{reason}]" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = metadata or {}
        self.field_violations = tuple(field_violations)
        self.retry_delay = retry_delay

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> OrdersRpcError:
        """The exception for a failed call: its code's subclass, with the details decoded."""
        code: grpc.StatusCode = error.code()
        error_class = _ERROR_CLASSES.get(code, OrdersRpcError)
        return error_class(code, error.details() or "", **_rich_details(error))


class InvalidArgument(OrdersRpcError):
    """The request is malformed; `field_violations` says which fields and why."""


class NotFound(OrdersRpcError):
    """The order (or customer) does not exist."""


class AlreadyExists(OrdersRpcError):
    """The order id is taken, or the command id was used for another request."""


class FailedPrecondition(OrdersRpcError):
    """A business rule forbids the command in the order's current state; see `reason`."""


class Aborted(OrdersRpcError):
    """The order changed concurrently (expected_version did not match): reload, then retry."""


class Unavailable(OrdersRpcError):
    """The service or its store could not answer, even after the retries; reason OVERLOADED: the
    server was at its limit of calls in flight and did nothing for this call (`retry_delay` says
    when to try again)."""


class DeadlineExceeded(OrdersRpcError):
    """The call's deadline passed. A command may or may not have been applied: retry it with the
    same `command_id` to find out, and to apply it at most once."""


class ResourceExhausted(OrdersRpcError):
    """A limit was reached (watch streams, a slow watcher's backlog, message size)."""


class Unauthenticated(OrdersRpcError):
    """The call carried no valid credentials."""


class PermissionDenied(OrdersRpcError):
    """The caller may not make this call."""


_ERROR_CLASSES: dict[grpc.StatusCode, type[OrdersRpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def _rich_details(error: grpc.RpcError) -> dict[str, Any]:
    """ErrorInfo, BadRequest and RetryInfo from the grpc-status-details-bin trailer, as keywords."""
    trailers = dict(error.trailing_metadata() or ())
    raw = trailers.get("grpc-status-details-bin")
    if not isinstance(raw, bytes):
        return {}
    found: dict[str, Any] = {}
    for packed in status_pb2.Status.FromString(raw).details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            found.update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
        elif packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            packed.Unpack(bad_request)
            found["field_violations"] = [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
        elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            packed.Unpack(retry)
            found["retry_delay"] = retry.retry_delay.ToTimedelta().total_seconds()
    return found


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how far apart, a call that ended UNAVAILABLE is tried again.

    Attempts back off exponentially with full jitter (gRPC's retry policy, which caps
    `max_attempts` at 5), or wait the delay the server asked for (its pushback: an OVERLOADED
    refusal's RetryInfo). All attempts share the call's deadline.

    The retry budget is gRPC's retry throttling, per server address: it starts at `max_tokens`;
    every failed attempt takes 1, every success gives back `token_ratio`; no call is retried
    while the budget is at half or below. So under sustained overload (more failures than one
    per 1/`token_ratio` successes) calls fail fast instead of coming back up to 5 times.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0
    max_tokens: int = 100
    token_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 5:
            raise ValueError(f"RetryPolicy.max_attempts must be 1-5 (gRPC's limit), got {self.max_attempts}")
        if not 0 < self.initial_backoff <= self.max_backoff or self.backoff_multiplier < 1:
            raise ValueError("RetryPolicy needs 0 < initial_backoff <= max_backoff and backoff_multiplier >= 1")
        if not 0 < self.max_tokens <= 1000 or self.token_ratio <= 0:
            raise ValueError("RetryPolicy needs 0 < max_tokens <= 1000 and token_ratio > 0 (gRPC's limits)")

    def service_config(self) -> str:
        """The gRPC service config that applies this policy to both services' methods."""
        services = [{"service": name} for name in ("orders.v1.OrderCommands", "orders.v1.OrderQueries")]
        method_config: dict[str, Any] = {"name": services}
        if self.max_attempts > 1:
            method_config["retryPolicy"] = {
                "maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff}s",
                "maxBackoff": f"{self.max_backoff}s",
                "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": ["UNAVAILABLE"],
            }
        config: dict[str, Any] = {"methodConfig": [method_config]}
        if self.max_attempts > 1:
            config["retryThrottling"] = {"maxTokens": self.max_tokens, "tokenRatio": self.token_ratio}
        return json.dumps(config)


NO_RETRIES = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class TlsConfig:
    """Certificate files for TLS, and for mutual TLS when `cert_file` and `key_file` are set.

    `ca_file` holds the certificates that may sign the server's; None means the system's roots.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None  # expected name in the server's certificate, if not its address

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TlsConfig: set both cert_file and key_file for mutual TLS, or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.key_file),
            certificate_chain=_read(self.cert_file),
        )


def _read(path: Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def _open_channel(
    address: str, tls: TlsConfig | None, retry: RetryPolicy, options: Sequence[tuple[str, Any]]
) -> grpc.aio.Channel:
    all_options: list[tuple[str, Any]] = [
        ("grpc.service_config", retry.service_config()),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Find a dead connection within half a minute instead of at the next TCP timeout;
        # the servers accept a ping every 10 s or more.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        *options,
    ]
    if tls is None:
        return grpc.aio.insecure_channel(address, options=all_options)
    if tls.server_name:
        all_options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(address, tls.credentials(), options=all_options)


# ---------------------------------------------------------------------------- client


@dataclass
class _Channels:
    write: grpc.aio.Channel
    read: grpc.aio.Channel
    commands: commands_pb2_grpc.OrderCommandsStub = field(init=False)
    queries: queries_pb2_grpc.OrderQueriesStub = field(init=False)

    def __post_init__(self) -> None:
        self.commands = commands_pb2_grpc.OrderCommandsStub(self.write)
        self.queries = queries_pb2_grpc.OrderQueriesStub(self.read)

    async def close(self) -> None:
        await self.write.close()
        await self.read.close()


class _Session:
    """The newest consistency token of a session's commands, in the log's read order."""

    def __init__(self) -> None:
        self.position: LogPosition | None = None

    def observe(self, token: str) -> None:
        position = LogPosition.parse(token)
        if self.position is None or position > self.position:
            self.position = position

    @property
    def token(self) -> str:
        return "" if self.position is None else self.position.token()


class OrdersClient:
    """Typed calls to OrderCommands (at `write_address`) and OrderQueries (at `read_address`).

    Use it as an async context manager, or call `close()`. `timeout` is the default deadline
    of every unary call, in seconds; each method takes its own `timeout` too. Watch streams
    have no deadline unless given one. `tls` connects with TLS (mutual TLS with a client
    certificate), and `token` is sent as `authorization: Bearer <token>` with every call.
    """

    def __init__(
        self,
        write_address: str,
        read_address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy = RetryPolicy(),  # frozen, so one default instance is safe
        tls: TlsConfig | None = None,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if token and any(key.lower() == "authorization" for key, _ in metadata):
            raise ValueError("OrdersClient: pass the token as token= or as authorization metadata, not both")
        self._channels = _Channels(
            _open_channel(write_address, tls, retry, channel_options),
            _open_channel(read_address, tls, retry, channel_options),
        )
        self._timeout = timeout
        self._metadata = (*metadata, *bearer_metadata(token))
        self._session: _Session | None = None
        self._owns_channels = True

    def session(self) -> OrdersClient:
        """A client on the same connections whose queries read the writes of its own commands.

        Every command through the session raises the session's consistency token to the
        command's, and every query through it waits until the views include that token
        (at most the call's deadline; a query that gave up says so in `consistency.stale`).
        """
        session = copy.copy(self)
        session._session = _Session()
        session._owns_channels = False  # closing a session leaves its client's connections open
        return session

    @property
    def consistency_token(self) -> str:
        """The session's newest command token; empty outside a session or before its first command."""
        return "" if self._session is None else self._session.token

    async def close(self) -> None:
        if self._owns_channels:
            await self._channels.close()

    async def __aenter__(self) -> OrdersClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def wait_until_ready(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Waits until both channels are connected (for scripts that start with the servers)."""
        with _translated():
            for channel in (self._channels.write, self._channels.read):
                await _wait_for_channel(channel, timeout)

    # ------------------------------------------------------------------------ commands

    async def create_order(
        self,
        customer_id: str,
        currency_code: str,
        *,
        order_id: str = "",
        shipping_address: types_pb2.ShippingAddress | None = None,
        expected_version: int | None = None,
        command_id: str | None = None,
        timeout: float | None = None,
    ) -> commands_pb2.CommandResult:
        """Creates an order (status PENDING); its id is generated unless `order_id` is given."""
        request = commands_pb2.CreateOrderRequest(
            command_id=command_id or new_command_id(),
            order_id=order_id,
            customer_id=customer_id,
            currency_code=currency_code,
            shipping_address=shipping_address,
            expected_version=expected_version,
        )
        reply = await self._unary(self._channels.commands.CreateOrder, request, timeout)
        return self._acknowledged(reply.result)

    async def add_item(
        self,
        order_id: str,
        sku: str,
        name: str,
        quantity: int,
        unit_price: types_pb2.Money,
        *,
        expected_version: int | None = None,
        command_id: str | None = None,
        timeout: float | None = None,
    ) -> commands_pb2.CommandResult:
        """Adds `quantity` units of `sku` at `unit_price` to a PENDING order."""
        request = commands_pb2.AddItemRequest(
            command_id=command_id or new_command_id(),
            order_id=order_id,
            sku=sku,
            name=name,
            quantity=quantity,
            unit_price=unit_price,
            expected_version=expected_version,
        )
        reply = await self._unary(self._channels.commands.AddItem, request, timeout)
        return self._acknowledged(reply.result)

    async def remove_item(
        self,
        order_id: str,
        sku: str,
        *,
        expected_version: int | None = None,
        command_id: str | None = None,
        timeout: float | None = None,
    ) -> commands_pb2.CommandResult:
        """Removes the line of `sku` from a PENDING order."""
        request = commands_pb2.RemoveItemRequest(
            command_id=command_id or new_command_id(), order_id=order_id, sku=sku, expected_version=expected_version
        )
        reply = await self._unary(self._channels.commands.RemoveItem, request, timeout)
        return self._acknowledged(reply.result)

    async def change_shipping_address(
        self,
        order_id: str,
        shipping_address: types_pb2.ShippingAddress,
        *,
        expected_version: int | None = None,
        command_id: str | None = None,
        timeout: float | None = None,
    ) -> commands_pb2.CommandResult:
        """Sets or replaces the shipping address of a PENDING or CONFIRMED order."""
        request = commands_pb2.ChangeShippingAddressRequest(
            command_id=command_id or new_command_id(),
            order_id=order_id,
            shipping_address=shipping_address,
            expected_version=expected_version,
        )
        reply = await self._unary(self._channels.commands.ChangeShippingAddress, request, timeout)
        return self._acknowledged(reply.result)

    async def confirm_order(
        self,
        order_id: str,
        *,
        expected_version: int | None = None,
        command_id: str | None = None,
        timeout: float | None = None,
    ) -> commands_pb2.CommandResult:
        """Confirms a PENDING order that has items."""
        request = commands_pb2.ConfirmOrderRequest(
            command_id=command_id or new_command_id(), order_id=order_id, expected_version=expected_version
        )
        reply = await self._unary(self._channels.commands.ConfirmOrder, request, timeout)
        return self._acknowledged(reply.result)

    async def ship_order(
        self,
        order_id: str,
        *,
        carrier: str = "",
        tracking_number: str = "",
        expected_version: int | None = None,
        command_id: str | None = None,
        timeout: float | None = None,
    ) -> commands_pb2.CommandResult:
        """Ships a CONFIRMED order that has a shipping address."""
        request = commands_pb2.ShipOrderRequest(
            command_id=command_id or new_command_id(),
            order_id=order_id,
            carrier=carrier,
            tracking_number=tracking_number,
            expected_version=expected_version,
        )
        reply = await self._unary(self._channels.commands.ShipOrder, request, timeout)
        return self._acknowledged(reply.result)

    async def cancel_order(
        self,
        order_id: str,
        *,
        reason: str = "",
        expected_version: int | None = None,
        command_id: str | None = None,
        timeout: float | None = None,
    ) -> commands_pb2.CommandResult:
        """Cancels a PENDING or CONFIRMED order."""
        request = commands_pb2.CancelOrderRequest(
            command_id=command_id or new_command_id(),
            order_id=order_id,
            reason=reason,
            expected_version=expected_version,
        )
        reply = await self._unary(self._channels.commands.CancelOrder, request, timeout)
        return self._acknowledged(reply.result)

    # ------------------------------------------------------------------------ queries

    async def get_order(
        self, order_id: str, *, consistency_token: str | None = None, timeout: float | None = None
    ) -> queries_pb2.GetOrderResponse:
        """One order, with the answer's freshness in `consistency`."""
        request = queries_pb2.GetOrderRequest(order_id=order_id, consistency_token=self._token(consistency_token))
        return await self._unary(self._channels.queries.GetOrder, request, timeout)

    async def list_orders(
        self,
        *,
        customer_id: str = "",
        status: types_pb2.OrderStatus.ValueType = types_pb2.ORDER_STATUS_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
        consistency_token: str | None = None,
        timeout: float | None = None,
    ) -> queries_pb2.ListOrdersResponse:
        """One page of orders, newest first; pass `next_page_token` back for the next page."""
        request = queries_pb2.ListOrdersRequest(
            customer_id=customer_id,
            status=status,
            page_size=page_size,
            page_token=page_token,
            consistency_token=self._token(consistency_token),
        )
        return await self._unary(self._channels.queries.ListOrders, request, timeout)

    async def iter_orders(
        self,
        *,
        customer_id: str = "",
        status: types_pb2.OrderStatus.ValueType = types_pb2.ORDER_STATUS_UNSPECIFIED,
        page_size: int = 0,
        consistency_token: str | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerator[types_pb2.Order, None]:
        """Every matching order, newest first, fetched page by page (each page with `timeout`)."""
        page_token = ""
        while True:
            page = await self.list_orders(
                customer_id=customer_id,
                status=status,
                page_size=page_size,
                page_token=page_token,
                consistency_token=consistency_token,
                timeout=timeout,
            )
            for order in page.orders:
                yield order
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    async def get_customer_summary(
        self, customer_id: str, *, consistency_token: str | None = None, timeout: float | None = None
    ) -> queries_pb2.GetCustomerSummaryResponse:
        """A customer's order statistics."""
        request = queries_pb2.GetCustomerSummaryRequest(
            customer_id=customer_id, consistency_token=self._token(consistency_token)
        )
        return await self._unary(self._channels.queries.GetCustomerSummary, request, timeout)

    def watch_order(
        self, order_id: str, *, consistency_token: str | None = None, timeout: float | None = None
    ) -> AsyncGenerator[queries_pb2.WatchOrderResponse, None]:
        """The order now, then again after each change, until the stream ends or is closed."""
        request = queries_pb2.WatchOrderRequest(order_id=order_id, consistency_token=self._token(consistency_token))
        return self._stream(self._channels.queries.WatchOrder, request, timeout)

    def watch_customer_orders(
        self, customer_id: str, *, consistency_token: str | None = None, timeout: float | None = None
    ) -> AsyncGenerator[queries_pb2.WatchCustomerOrdersResponse, None]:
        """A customer's orders now, then each of them again after each change."""
        request = queries_pb2.WatchCustomerOrdersRequest(
            customer_id=customer_id, consistency_token=self._token(consistency_token)
        )
        return self._stream(self._channels.queries.WatchCustomerOrders, request, timeout)

    # ------------------------------------------------------------------------ plumbing

    async def _unary(self, method: Callable[..., Awaitable[Reply]], request: Message, timeout: float | None) -> Reply:
        with _translated():
            return await method(request, timeout=timeout or self._timeout, metadata=self._metadata)

    async def _stream(
        self, method: Callable[..., Any], request: Message, timeout: float | None
    ) -> AsyncGenerator[Any, None]:
        call = method(request, timeout=timeout, metadata=self._metadata)  # on first iteration, in the loop's thread
        try:
            with _translated():
                async for message in call:
                    yield message
        finally:
            call.cancel()  # the caller stopped reading: end the stream on the server too

    def _acknowledged(self, result: commands_pb2.CommandResult) -> commands_pb2.CommandResult:
        if self._session is not None:
            self._session.observe(result.consistency_token)
        return result

    def _token(self, explicit: str | None) -> str:
        return explicit if explicit is not None else self.consistency_token


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that authenticates a call with `token` (none without a token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def new_command_id() -> str:
    """A fresh idempotency key, made once per command call and reused by its retries."""
    return str(uuid.uuid4())


def money(minor_units: int, currency_code: str) -> types_pb2.Money:
    """An amount in the currency's minor unit: money(1999, "EUR") is 19.99 EUR."""
    return types_pb2.Money(currency_code=currency_code, minor_units=minor_units)


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Turns a gRPC error raised inside the block into the matching OrdersRpcError."""
    try:
        yield
    except grpc.RpcError as error:
        raise OrdersRpcError.from_rpc_error(error) from error


async def _wait_for_channel(channel: grpc.aio.Channel, timeout: float) -> None:
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
    except TimeoutError:
        raise Unavailable(grpc.StatusCode.UNAVAILABLE, f"not connected after {timeout} s") from None


# ---------------------------------------------------------------------------- blocking client

P = ParamSpec("P")
R = TypeVar("R")


def _blocking(
    method: Callable[Concatenate[OrdersClient, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[BlockingOrdersClient, P], R]:
    """An OrdersClient coroutine method as a blocking method of BlockingOrdersClient."""

    @functools.wraps(method)
    def call(self: BlockingOrdersClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._run(method(self._client, *args, **kwargs))

    return call


def _blocking_stream(
    method: Callable[Concatenate[OrdersClient, P], AsyncGenerator[R, None]],
) -> Callable[Concatenate[BlockingOrdersClient, P], Iterator[R]]:
    """An OrdersClient streaming method as a blocking iterator; leaving the loop ends the stream."""

    @functools.wraps(method)
    def call(self: BlockingOrdersClient, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[R]:
        stream = method(self._client, *args, **kwargs)
        try:
            while True:
                try:
                    yield self._run(anext(stream))
                except StopAsyncIteration:
                    return
        finally:
            self._run(stream.aclose())

    return call


class BlockingOrdersClient:
    """OrdersClient for code without an event loop: the same methods, blocking.

    The calls run on a private event loop in a daemon thread; use one instance from any number
    of threads. Close it (or use it as a context manager) to free the connections and the thread.
    """

    def __init__(self, write_address: str, read_address: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="orders-client", daemon=True)
        self._thread.start()
        self._client = self._run(self._open(write_address, read_address, options))

    @staticmethod
    async def _open(write_address: str, read_address: str, options: dict[str, Any]) -> OrdersClient:
        return OrdersClient(write_address, read_address, **options)  # channels belong to the loop they start on

    def _run(self, coroutine: Awaitable[R]) -> R:
        return asyncio.run_coroutine_threadsafe(_awaited(coroutine), self._loop).result()

    def session(self) -> BlockingOrdersClient:
        """A blocking session: see OrdersClient.session."""
        session = copy.copy(self)
        session._client = self._client.session()
        return session

    @property
    def consistency_token(self) -> str:
        return self._client.consistency_token

    def close(self) -> None:
        if self._client._owns_channels and self._loop.is_running():
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def __enter__(self) -> BlockingOrdersClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    create_order = _blocking(OrdersClient.create_order)
    add_item = _blocking(OrdersClient.add_item)
    remove_item = _blocking(OrdersClient.remove_item)
    change_shipping_address = _blocking(OrdersClient.change_shipping_address)
    confirm_order = _blocking(OrdersClient.confirm_order)
    ship_order = _blocking(OrdersClient.ship_order)
    cancel_order = _blocking(OrdersClient.cancel_order)
    get_order = _blocking(OrdersClient.get_order)
    list_orders = _blocking(OrdersClient.list_orders)
    get_customer_summary = _blocking(OrdersClient.get_customer_summary)
    iter_orders = _blocking_stream(OrdersClient.iter_orders)
    watch_order = _blocking_stream(OrdersClient.watch_order)
    watch_customer_orders = _blocking_stream(OrdersClient.watch_customer_orders)


async def _awaited(awaitable: Awaitable[R]) -> R:
    return await awaitable
