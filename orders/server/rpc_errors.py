"""Turning our errors into rich gRPC statuses (google.rpc.Status with details).

Each servicer declares one table from error class to status code and stable
reason, and wraps its methods with `translate_errors(table)`. Details follow
google.rpc conventions: BadRequest field violations for invalid input,
ErrorInfo with a reason for everything, RetryInfo where retrying helps.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from orders.domain.errors import InvalidCommand, OrdersError, RuleViolation

log = logging.getLogger(__name__)

ERROR_DOMAIN = "orders.v1"
RETRY_DELAY_SECONDS = 1

ErrorTable = dict[type[OrdersError], tuple[grpc.StatusCode, str]]

P = ParamSpec("P")
R = TypeVar("R")


def _lookup(error: OrdersError, table: ErrorTable) -> tuple[grpc.StatusCode, str]:
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    return grpc.StatusCode.INTERNAL, "INTERNAL"


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _details(error: OrdersError, code: grpc.StatusCode, reason: str) -> list[Message]:
    if isinstance(error, RuleViolation):
        reason = error.reason
    details: list[Message] = [error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)]
    if isinstance(error, InvalidCommand):
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ]
        details.append(error_details_pb2.BadRequest(field_violations=violations))
    if code in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}:
        delay = duration_pb2.Duration(seconds=RETRY_DELAY_SECONDS)
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return details


def to_status(error: OrdersError, table: ErrorTable) -> grpc.Status:
    """The rich gRPC status for `error` under `table`."""
    code, reason = _lookup(error, table)
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name),
        message=str(error),
        details=[_pack(d) for d in _details(error, code, reason)],
    )
    return rpc_status.to_status(status)


def translate_errors(
    table: ErrorTable,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Decorates a servicer method so that our errors end the RPC with their rich status."""

    def decorate(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(method)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            context: Any = args[2]  # (self, request, context)
            try:
                return await method(*args, **kwargs)
            except OrdersError as error:
                code, _ = _lookup(error, table)
                log.log(
                    logging.WARNING if code == grpc.StatusCode.UNAVAILABLE else logging.INFO,
                    "%s -> %s: %s",
                    method.__name__,
                    code.name,
                    error,
                )
                await context.abort_with_status(to_status(error, table))
                raise  # unreachable: abort_with_status raises
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                # A bug or data we cannot read (e.g. an undecodable stored event): INTERNAL with
                # ErrorInfo instead of gRPC's bare UNKNOWN, and the traceback in our log.
                log.exception("%s failed unexpectedly", method.__name__)
                internal = OrdersError(f"internal error ({type(error).__name__}); the server logged the details")
                await context.abort_with_status(to_status(internal, table))
                raise  # unreachable: abort_with_status raises

        return wrapper

    return decorate
