"""A gRPC method handler rebuilt around other behaviour, keeping its kind and its codecs: how the
server interceptors (correlation ids, metrics, token checks) wrap or replace a call. gRPC needs
the handler's kind (unary or streaming, each way) to answer on the right kind of call.
`WrappingInterceptor` is the interceptor that wraps each method's handler once and reuses it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

_BUILDERS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def behaviour_of(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The function that serves the call, whatever the handler's kind."""
    behaviour: Callable[..., Any] = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    return behaviour


def rebuilt(
    handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any], *, decode: bool = True
) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind and codecs that runs `behaviour`; without `decode`, the
    request is not decoded (for a call refused before it is read)."""
    build = _BUILDERS[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return build(
        behaviour,
        request_deserializer=handler.request_deserializer if decode else None,
        response_serializer=handler.response_serializer,
    )


class WrappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no type hints
    """A server interceptor that serves each method through `wrap(method, handler)`, made once per
    method: a server's registered handlers are the same objects on every call, so the wrapped one
    is kept and reused (made again only if the handler object changes)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # not served here: UNIMPLEMENTED
            return None
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, self.wrap(method, handler))
        return cached[1]
