"""The gRPC metrics interceptor: every RPC a server handles counted by status, timed, and tracked
while in flight (the metrics themselves are in orders.telemetry.metrics)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc

from orders.server.handlers import WrappingInterceptor, behaviour_of, rebuilt
from orders.telemetry.metrics import GRPC_HANDLED, GRPC_HANDLING, GRPC_IN_FLIGHT

_OK = grpc.StatusCode.OK


class _MethodMetrics:
    """The label children of one gRPC method."""

    __slots__ = ("_handled", "_names", "in_flight", "seconds")

    def __init__(self, full_method: str) -> None:
        service, _, method = full_method.lstrip("/").partition("/")
        self._names = (service, method)
        self._handled: dict[grpc.StatusCode, Any] = {}
        self.seconds = GRPC_HANDLING.labels(service, method)
        self.in_flight = GRPC_IN_FLIGHT.labels(service, method)

    def start(self) -> float:
        self.in_flight.inc()
        return time.perf_counter()

    def done(self, started: float, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        elapsed = time.perf_counter() - started
        code = _final_code(context, error)
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = GRPC_HANDLED.labels(*self._names, code.name)
        child.inc()
        self.seconds.observe(elapsed)
        self.in_flight.dec()


def _final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status the call ends with: what abort or set_code set, else what gRPC makes of `error`."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if error is None:
        return _OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):  # the client went away, or the deadline passed
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _instrumented(behaviour: Callable[..., Any], metrics: _MethodMetrics) -> Callable[..., Any]:
    """`behaviour` (a coroutine function or an async generator function, of any kind of RPC) recording
    its status, time and in-flight count."""
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = metrics.start()
            error: BaseException | None = None
            try:
                async with aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        yield response
            except BaseException as caught:
                error = caught
                raise
            finally:
                metrics.done(started, context, error)

        return stream

    call: Callable[..., Awaitable[Any]] = behaviour

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = metrics.start()
        error: BaseException | None = None
        try:
            return await call(request, context)
        except BaseException as caught:
            error = caught
            raise
        finally:
            metrics.done(started, context, error)

    return unary


def _instrumented_handler(handler: grpc.RpcMethodHandler, metrics: _MethodMetrics) -> grpc.RpcMethodHandler:
    return rebuilt(handler, _instrumented(behaviour_of(handler), metrics))


class GrpcMetricsInterceptor(WrappingInterceptor):
    """Counts every RPC a server handles by its final status code, times it and tracks RPCs in flight.

    It wraps the handler, so it sees the real outcome: an abort with a rich status (our error
    tables), a status set without raising, an exception (UNKNOWN), a cancellation or a passed
    deadline. Put first among the interceptors, it also counts calls that later ones refuse (tokens).
    Calls to methods the server does not have never reach a handler and are not counted; calls
    refused as OVERLOADED (orders.server.admission, after this interceptor) are, as UNAVAILABLE."""

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return _instrumented_handler(handler, _MethodMetrics(method))
