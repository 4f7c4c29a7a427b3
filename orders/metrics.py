"""Every Prometheus metric of the backend, in one place (docs/operations.md says what each means).

Names follow the Prometheus conventions: the `orders_` prefix, `_total` for counters, base units
(`_seconds`). All live in prometheus-client's default registry, which the ops endpoint
(orders.ops_server) serves together with the process, platform and GC collectors.

Hot paths stay cheap: label children are looked up once and kept (per gRPC method, per command
and outcome, per projection), so recording is a few increments with no label parsing, and nothing
is done per event beyond a counter increment per batch.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from typing import Any

import grpc
import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

from orders.handlers import behaviour_of, rebuilt

# `*_created` series double the series count and say nothing we need.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAKEUP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
PROJECTION_STATES = ("starting", "standby", "active", "paused", "failed")

# ---------------------------------------------------------------------------- gRPC servers

GRPC_HANDLED = Counter(
    "orders_grpc_server_handled_total",
    "RPCs completed by the server, by final status code (aborts with rich status included)",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_HANDLING = Histogram(
    "orders_grpc_server_handling_seconds",
    "Time from the start of the handler to its end (for streams: the stream's whole life)",
    ["grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)
GRPC_IN_FLIGHT = Gauge(
    "orders_grpc_server_in_flight",
    "RPCs being handled now (streams included)",
    ["grpc_service", "grpc_method"],
)

# ---------------------------------------------------------------------------- write side

COMMANDS = Counter(
    "orders_commands_total",
    "Commands handled by the write service, by command and outcome (accepted, repeated, invalid, refused, "
    "conflict, unavailable, deadline_exceeded, error)",
    ["command", "outcome"],
)
EVENTS_APPENDED = Counter(
    "orders_events_appended_total",
    "Events committed to the event store, by event type",
    ["event_type"],
)

# ---------------------------------------------------------------------------- sync worker

PROJECTION_APPLIED = Counter(
    "orders_projection_events_applied_total",
    "Events applied to a projection's live views",
    ["projection"],
)
PROJECTION_BATCH_SIZE = Histogram(
    "orders_projection_batch_size",
    "Events per batch applied to a projection's live views",
    ["projection"],
    buckets=BATCH_BUCKETS,
)
PROJECTION_LAG_EVENTS = Gauge(
    "orders_projection_lag_events",
    "Events in the log after the projection's checkpoint, estimated from positions (0 when caught up)",
    ["projection"],
)
PROJECTION_LAG_SECONDS = Gauge(
    "orders_projection_lag_seconds",
    "Age of the newest applied event while the projection is behind, or how long it has been held back "
    "by an older open transaction (0 when caught up)",
    ["projection"],
)
PROJECTION_WAKEUP = Histogram(
    "orders_projection_wakeup_seconds",
    "Time from a PostgreSQL NOTIFY reaching the worker to the start of the batch that reads it",
    ["projection"],
    buckets=WAKEUP_BUCKETS,
)
PROJECTION_STATE = Gauge(
    "orders_projection_state",
    "1 for the state this worker's loop of the projection is in, 0 for the others",
    ["projection", "state"],
)

# ---------------------------------------------------------------------------- stores

STORE_ERRORS = Counter(
    "orders_store_errors_total",
    "PostgreSQL and Redis failures (unreachable, connection lost, timed out), by store and operation",
    ["store", "operation"],
)


# ---------------------------------------------------------------------------- recording helpers


@functools.cache
def _command_child(command: str, outcome: str) -> Any:
    return COMMANDS.labels(command, outcome)


def count_command(command: str, outcome: str) -> None:
    _command_child(command, outcome).inc()


@functools.cache
def _appended_child(event_type: str) -> Any:
    return EVENTS_APPENDED.labels(event_type)


def count_events_appended(event_types: Iterable[str]) -> None:
    for event_type in event_types:
        _appended_child(event_type).inc()


@functools.cache
def _store_error_child(store: str, operation: str) -> Any:
    return STORE_ERRORS.labels(store, operation)


def count_store_error(store: str, operation: str) -> None:
    """One failure of `store` ("postgres" or "redis") during `operation`."""
    _store_error_child(store, operation).inc()


class ProjectionMetrics:
    """The sync worker's metrics of one projection, with their label children resolved once."""

    def __init__(self, projection: str) -> None:
        self.applied = PROJECTION_APPLIED.labels(projection)
        self.batch_size = PROJECTION_BATCH_SIZE.labels(projection)
        self.lag_events = PROJECTION_LAG_EVENTS.labels(projection)
        self.lag_seconds = PROJECTION_LAG_SECONDS.labels(projection)
        self.wakeup = PROJECTION_WAKEUP.labels(projection)
        self._states = {state: PROJECTION_STATE.labels(projection, state) for state in PROJECTION_STATES}

    def batch_applied(self, events: int) -> None:
        self.applied.inc(events)
        self.batch_size.observe(events)

    def lag(self, events: int, seconds: float) -> None:
        self.lag_events.set(events)
        self.lag_seconds.set(seconds)

    def state(self, state: str) -> None:
        for name, child in self._states.items():
            child.set(1 if name == state else 0)


# ---------------------------------------------------------------------------- gRPC interceptor

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


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no type hints
    """Counts every RPC a server handles by its final status code, times it and tracks RPCs in flight.

    It wraps the handler, so it sees the real outcome: an abort with a rich status (our error
    tables), a status set without raising, an exception (UNKNOWN), a cancellation or a passed
    deadline. Put first among the interceptors, it also counts calls that later ones refuse (tokens).
    Calls to methods the server does not have, and calls refused because the server is at its
    maximum_concurrent_rpcs, never reach a handler and are not counted."""

    def __init__(self) -> None:
        self._methods: dict[str, _MethodMetrics] = {}
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:  # registered handlers are the same object every call
            return cached[1]
        metrics = self._methods.get(method)
        if metrics is None:
            metrics = self._methods[method] = _MethodMetrics(method)
        wrapped = _instrumented_handler(handler, metrics)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
