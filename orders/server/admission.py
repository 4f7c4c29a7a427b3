"""Admission control: what a server process does when more calls arrive than it can serve.

The policy (docs/errors.md#overload, docs/design.md#overload-by-design):

- A server process serves at most `limit` calls at once (ORDERS_MAX_CONCURRENT_RPCS). Calls in
  flight wait inside the process for what they need (a PostgreSQL connection of the pool, Redis),
  so the limit is the bound of that queue.
- One call more is refused at once, before its handler runs, with UNAVAILABLE, ErrorInfo reason
  `OVERLOADED` and RetryInfo. Nothing was done for it, so every call may be retried, a command
  too (and a command's retry resends its command_id anyway). The same delay goes into gRPC's
  server pushback trailer (`grpc-retry-pushback-ms`, gRFC A6), so that a client's gRPC retry
  policy waits that long before its next attempt. The delay is drawn at random per refusal,
  so refused clients do not all come back at once.
- Health checks and reflection are never refused: an overloaded server is alive and ready; it
  sheds load rather than leaving the load balancer's view.

It replaces gRPC's own `maximum_concurrent_rpcs`, which refuses with RESOURCE_EXHAUSTED without
details (which clients do not retry by default), and counts health checks too. The HTTP/2 limit of
streams per connection is set above this limit (orders.server.grpc_server.server_options), so the
transport never refuses a stream (REFUSED_STREAM) before this policy answers.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from orders.server.handlers import WrappingInterceptor, behaviour_of, rebuilt
from orders.server.rpc_errors import ERROR_DOMAIN
from orders.telemetry.metrics import GRPC_OVERLOADED

log = logging.getLogger(__name__)

OVERLOADED = "OVERLOADED"
RETRY_DELAY_RANGE = (0.5, 1.5)  # seconds; a refusal's RetryInfo and pushback delay is drawn from it
PUSHBACK_HEADER = "grpc-retry-pushback-ms"
LOG_EVERY = 10.0  # seconds between log lines while refusing
# Never refused: probes and load balancers must see a busy server as alive and ready.
UNLIMITED_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)


@dataclass(frozen=True)
class _Refusal(grpc.Status):  # type: ignore[misc]  # grpc has no type hints
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def overloaded_status(limit: int, delay: float) -> grpc.Status:
    """UNAVAILABLE with ErrorInfo OVERLOADED, RetryInfo `delay` (whole milliseconds) and the same
    delay as gRPC's server pushback."""
    delay_ms = max(1, round(delay * 1000))
    info = error_details_pb2.ErrorInfo(reason=OVERLOADED, domain=ERROR_DOMAIN, metadata={"limit": str(limit)})
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromMilliseconds(delay_ms)
    message = (
        f"overloaded: this server process already serves its limit of {limit} calls; the call was not "
        f"started (nothing was done): retry after {delay_ms / 1000:.3f} s"
    )
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message, details=[_pack(info), _pack(retry)])
    return _Refusal(
        grpc.StatusCode.UNAVAILABLE,
        message,
        (("grpc-status-details-bin", status.SerializeToString()), (PUSHBACK_HEADER, str(delay_ms))),
    )


class AdmissionInterceptor(WrappingInterceptor):
    """Lets at most `limit` calls run at once in this server and refuses the others as OVERLOADED.

    A call counts from the start of its handler to its end (a stream: its whole life). The count is
    kept in the wrapped handler, not in intercept_service, so that a call gRPC never hands to its
    handler (cancelled while its request arrived) is never counted."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        if limit < 1:
            raise ValueError(f"the limit of calls in flight must be at least 1, got {limit}")
        self.limit = limit
        self.in_flight = 0
        self._refused_unlogged = 0
        self._last_logged = -LOG_EVERY

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, name = method.lstrip("/").partition("/")
        if service in UNLIMITED_SERVICES:
            return handler
        return rebuilt(handler, self._admitting(behaviour_of(handler), GRPC_OVERLOADED.labels(service, name)))

    def _admitting(self, behaviour: Callable[..., Any], refusals: Any) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behaviour):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if self.in_flight >= self.limit:
                    await self._refuse(context, refusals)
                self.in_flight += 1
                try:
                    async with aclosing(behaviour(request, context)) as responses:
                        async for response in responses:
                            yield response
                finally:
                    self.in_flight -= 1

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self.in_flight >= self.limit:
                await self._refuse(context, refusals)
            self.in_flight += 1
            try:
                return await behaviour(request, context)
            finally:
                self.in_flight -= 1

        return unary

    async def _refuse(self, context: grpc.aio.ServicerContext, refusals: Any) -> None:
        refusals.inc()
        self._log_refusal()
        await context.abort_with_status(overloaded_status(self.limit, random.uniform(*RETRY_DELAY_RANGE)))

    def _log_refusal(self) -> None:
        """One WARNING per LOG_EVERY seconds while refusing, with the count: a line per refusal would
        add to the overload it reports."""
        self._refused_unlogged += 1
        now = time.monotonic()
        if now - self._last_logged >= LOG_EVERY:
            log.warning(
                "overloaded: refused %d call(s) past the limit of %d in flight (UNAVAILABLE, OVERLOADED)",
                self._refused_unlogged,
                self.limit,
            )
            self._refused_unlogged = 0
            self._last_logged = now
