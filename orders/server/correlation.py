"""Correlation ids (and, when tracing is on, spans) for every RPC a server serves.

`CorrelationInterceptor` runs first among a server's interceptors. For each call it

- takes the id from the `x-correlation-id` (or `x-request-id`) metadata when it is valid (1-128
  characters of A-Z a-z 0-9 . _ : -), or else makes one (a uuid4 in hex);
- puts it, and the method, in `orders.telemetry.logs.correlation_id` and `orders.telemetry.logs.rpc_method` for the
  whole call, unary or streaming, so that every log line of the call carries them, those of the
  interceptors after it (a refused token) included; the write path stores it with the events;
- sends it back as `x-correlation-id` in the trailing metadata of every call, whatever its
  status: an abort's own trailing metadata (the rich error details) gets it added. A streaming
  call also sends it at once as initial metadata, so the client knows it from the start. A unary
  call does not: headers sent before the handler runs would cost each call a write of its own,
  and would no longer mean that the handler has finished;
- opens a SERVER span around the call when tracing is on (orders.telemetry.tracing).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any

import grpc

from orders.server.handlers import behaviour_of, rebuilt
from orders.telemetry import tracing
from orders.telemetry.logs import correlation_id, correlation_id_from, current_caller, rpc_method

CORRELATION_HEADER = "x-correlation-id"

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]  # a handler's behavior: unary or streaming


class CorrelationInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no type hints
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        metadata = handler_call_details.invocation_metadata
        call_id = correlation_id_from(metadata)
        method: str = handler_call_details.method
        # gRPC runs a call's interceptors and its handler in one task of their own: the interceptors
        # after this one see these values (and so do their log lines).
        correlation_id.set(call_id)
        rpc_method.set(method)
        handler = await continuation(handler_call_details)
        if handler is None:  # not served here: UNIMPLEMENTED
            return None
        return _wrapped(handler, call_id, method, metadata)


def _wrapped(handler: grpc.RpcMethodHandler, call_id: str, method: str, metadata: Any) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that runs it with the call's context around it."""
    inner = behaviour_of(handler)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        tokens = correlation_id.set(call_id), rpc_method.set(method)
        echoing = _Echoing(context, call_id)
        try:
            if not tracing.enabled():
                return await inner(request, echoing)
            with tracing.server_span(method, metadata, _span_attributes(call_id), context):
                return await inner(request, echoing)
        finally:
            correlation_id.reset(tokens[0])
            rpc_method.reset(tokens[1])

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> None:
        tokens = correlation_id.set(call_id), rpc_method.set(method)
        echoing = _Echoing(context, call_id)
        try:
            await context.send_initial_metadata(echoing.echo)
            if not tracing.enabled():
                await _stream(inner, request, echoing)
                return
            with tracing.server_span(method, metadata, _span_attributes(call_id), context):
                await _stream(inner, request, echoing)
        finally:
            correlation_id.reset(tokens[0])
            rpc_method.reset(tokens[1])

    return rebuilt(handler, streaming if handler.response_streaming else unary)


class _Echoing:
    """The call's ServicerContext, with the correlation id in whatever trailing metadata the call ends
    with: set at the start (a normal end, an unexpected exception) and added to an abort's own."""

    def __init__(self, context: grpc.aio.ServicerContext, call_id: str) -> None:
        self._context = context
        self.echo = ((CORRELATION_HEADER, call_id),)
        context.set_trailing_metadata(self.echo)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._context.set_trailing_metadata((*trailing_metadata, *self.echo))

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, str | bytes]] = ()
    ) -> None:
        if trailing_metadata:
            await self._context.abort(code, details, (*trailing_metadata, *self.echo))
        else:  # gRPC then ends with the trailing metadata set before, which has the id
            await self._context.abort(code, details)

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)


async def _stream(inner: Behavior, request: Any, context: grpc.aio.ServicerContext) -> None:
    """Runs a response-streaming behavior of either kind gRPC accepts: a coroutine that writes with
    `context.write` itself, or an async generator of the responses (closed as soon as the call ends)."""
    result = inner(request, context)
    if inspect.isasyncgen(result):
        async with aclosing(result) as responses:
            async for response in responses:
                await context.write(response)
    else:
        await result


def _span_attributes(call_id: str) -> dict[str, str]:
    attributes = {"orders.correlation_id": call_id}
    caller = current_caller.get()
    if caller is not None:
        attributes["enduser.id"] = caller
    return attributes
