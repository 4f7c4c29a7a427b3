"""OrderCommands over gRPC: requests become command envelopes, errors become statuses."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import grpc

from orders.domain.commands import (
    AddItem,
    CancelOrder,
    ChangeShippingAddress,
    Command,
    CommandEnvelope,
    ConfirmOrder,
    CreateOrder,
    RemoveItem,
    ShipOrder,
)
from orders.domain.errors import (
    CommandIdReused,
    ConcurrencyConflict,
    DeadlineExceeded,
    InvalidCommand,
    OrderAlreadyExists,
    OrderNotFound,
    RuleViolation,
    Unavailable,
)
from orders.domain.events import Address
from orders.server.rpc_errors import ErrorTable, translate_errors
from orders.store.event_store import AppendResult
from orders.telemetry.logs import correlation_id, correlation_id_from, current_caller
from orders.telemetry.metrics import count_command
from orders.v1 import commands_pb2 as pb
from orders.v1 import commands_pb2_grpc, types_pb2
from write_service.command_bus import CommandBus

SERVICE = pb.DESCRIPTOR.services_by_name["OrderCommands"]
DEFAULT_TIMEOUT = 10.0  # seconds, when the client sets no deadline
# Order ids generated for a CreateOrder with a command id derive from it, so a retry gets the same id.
ORDER_ID_NAMESPACE = uuid.UUID("0c1f7b52-6c55-4a8e-9a43-1f3f5b0e2d11")

ERRORS: ErrorTable = {
    InvalidCommand: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    OrderNotFound: (grpc.StatusCode.NOT_FOUND, "ORDER_NOT_FOUND"),
    OrderAlreadyExists: (grpc.StatusCode.ALREADY_EXISTS, "ORDER_ALREADY_EXISTS"),
    CommandIdReused: (grpc.StatusCode.ALREADY_EXISTS, "COMMAND_ID_REUSED"),
    RuleViolation: (grpc.StatusCode.FAILED_PRECONDITION, "RULE_VIOLATION"),  # reason from the rule
    ConcurrencyConflict: (grpc.StatusCode.ABORTED, "VERSION_CONFLICT"),
    DeadlineExceeded: (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    Unavailable: (grpc.StatusCode.UNAVAILABLE, "EVENT_STORE_UNAVAILABLE"),
}
# The outcome label of orders_commands_total (orders.telemetry.metrics) for each refusal; any other error is "error".
OUTCOMES: dict[type[Exception], str] = {
    InvalidCommand: "invalid",
    OrderNotFound: "refused",
    OrderAlreadyExists: "refused",
    CommandIdReused: "refused",
    RuleViolation: "refused",
    ConcurrencyConflict: "conflict",
    DeadlineExceeded: "deadline_exceeded",
    Unavailable: "unavailable",
}


CommandRequest = (
    pb.CreateOrderRequest
    | pb.AddItemRequest
    | pb.RemoveItemRequest
    | pb.ChangeShippingAddressRequest
    | pb.ConfirmOrderRequest
    | pb.ShipOrderRequest
    | pb.CancelOrderRequest
)


def address(message: types_pb2.ShippingAddress) -> Address:
    return Address(
        recipient=message.recipient,
        line1=message.line1,
        line2=message.line2,
        city=message.city,
        region=message.region,
        postal_code=message.postal_code,
        country_code=message.country_code,
    )


def new_order_id(command_id: str) -> str:
    return str(uuid.uuid5(ORDER_ID_NAMESPACE, command_id) if command_id else uuid.uuid4())


class OrderCommandsServicer(commands_pb2_grpc.OrderCommandsServicer):
    def __init__(self, bus: CommandBus, on_unavailable: Callable[[str], None] | None = None) -> None:
        self._bus = bus
        # Told when a command found PostgreSQL unreachable, so health turns NOT_SERVING at once.
        self._on_unavailable = on_unavailable

    async def _run(
        self, request: CommandRequest, command: Command, context: grpc.aio.ServicerContext
    ) -> pb.CommandResult:
        envelope = CommandEnvelope(
            command,
            command_id=request.command_id or None,
            expected_version=request.expected_version if request.HasField("expected_version") else None,
            # Set for the call by orders.server.correlation.CorrelationInterceptor (start_server installs it).
            correlation_id=correlation_id.get() or correlation_id_from(context.invocation_metadata()),
            caller=current_caller.get(),
        )
        remaining = context.time_remaining()
        name = type(command).__name__
        try:
            result = await self._bus.dispatch(envelope, DEFAULT_TIMEOUT if remaining is None else remaining)
        except Exception as error:
            count_command(name, next((OUTCOMES[c] for c in type(error).__mro__ if c in OUTCOMES), "error"))
            if isinstance(error, Unavailable) and self._on_unavailable is not None:
                self._on_unavailable(str(error))
            raise
        # An earlier result of the same command id appends nothing: the command was repeated.
        count_command(name, "accepted" if result.appended else "repeated")
        return _result(result)

    @translate_errors(ERRORS)
    async def CreateOrder(
        self, request: pb.CreateOrderRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateOrderResponse:
        command = CreateOrder(
            order_id=request.order_id or new_order_id(request.command_id),
            customer_id=request.customer_id,
            currency_code=request.currency_code,
            shipping_address=address(request.shipping_address) if request.HasField("shipping_address") else None,
        )
        return pb.CreateOrderResponse(result=await self._run(request, command, context))

    @translate_errors(ERRORS)
    async def AddItem(self, request: pb.AddItemRequest, context: grpc.aio.ServicerContext) -> pb.AddItemResponse:
        command = AddItem(
            order_id=request.order_id,
            sku=request.sku,
            name=request.name,
            quantity=request.quantity,
            unit_price_minor=request.unit_price.minor_units,
            currency_code=request.unit_price.currency_code,
        )
        return pb.AddItemResponse(result=await self._run(request, command, context))

    @translate_errors(ERRORS)
    async def RemoveItem(
        self, request: pb.RemoveItemRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveItemResponse:
        command = RemoveItem(order_id=request.order_id, sku=request.sku)
        return pb.RemoveItemResponse(result=await self._run(request, command, context))

    @translate_errors(ERRORS)
    async def ChangeShippingAddress(
        self, request: pb.ChangeShippingAddressRequest, context: grpc.aio.ServicerContext
    ) -> pb.ChangeShippingAddressResponse:
        command = ChangeShippingAddress(order_id=request.order_id, shipping_address=address(request.shipping_address))
        return pb.ChangeShippingAddressResponse(result=await self._run(request, command, context))

    @translate_errors(ERRORS)
    async def ConfirmOrder(
        self, request: pb.ConfirmOrderRequest, context: grpc.aio.ServicerContext
    ) -> pb.ConfirmOrderResponse:
        command = ConfirmOrder(order_id=request.order_id)
        return pb.ConfirmOrderResponse(result=await self._run(request, command, context))

    @translate_errors(ERRORS)
    async def ShipOrder(self, request: pb.ShipOrderRequest, context: grpc.aio.ServicerContext) -> pb.ShipOrderResponse:
        command = ShipOrder(order_id=request.order_id, carrier=request.carrier, tracking_number=request.tracking_number)
        return pb.ShipOrderResponse(result=await self._run(request, command, context))

    @translate_errors(ERRORS)
    async def CancelOrder(
        self, request: pb.CancelOrderRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelOrderResponse:
        command = CancelOrder(order_id=request.order_id, reason=request.reason)
        return pb.CancelOrderResponse(result=await self._run(request, command, context))


def _result(result: AppendResult) -> pb.CommandResult:
    return pb.CommandResult(
        order_id=result.stream_id,
        version=result.version,
        position=result.last.position,
        consistency_token=result.last.token(),
    )
