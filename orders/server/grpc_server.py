"""Starting and stopping a gRPC server the same way for every service.

Every server gets the standard health service (grpc.health.v1) and server
reflection, explicit limits instead of gRPC's permissive defaults (calls past
the limit in flight are refused as OVERLOADED: orders.server.admission), and a
graceful stop: health turns NOT_SERVING for good, then in-flight RPCs get a
grace period to finish.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from orders.domain.errors import FieldViolation, InvalidCommand
from orders.server.admission import AdmissionInterceptor
from orders.server.correlation import CorrelationInterceptor
from orders.server.rpc_errors import ErrorTable, to_status
from orders.server.rpc_metrics import GrpcMetricsInterceptor
from orders.server.security import ServerSecurity

log = logging.getLogger(__name__)

MALFORMED: ErrorTable = {InvalidCommand: (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")}
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
LIVENESS = "liveness"  # health service that is SERVING while the process runs (readiness: "")
DEFAULT_MAX_CONCURRENT_RPCS = 1000
UNFREED_STREAMS = 1000  # room per connection for streams that ended (or were refused) but gRPC has not freed


def server_options(
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS, *, reuse_port: bool = False
) -> list[tuple[str, int]]:
    """gRPC's options for a server admitting `max_concurrent_rpcs` calls at once (orders.server.admission).

    The HTTP/2 limit of streams per connection is that plus UNFREED_STREAMS: a connection never
    needs more streams than the process admits, but gRPC counts a stream until the process has freed
    it, a while after the call ended or was refused, and refuses new streams past the limit (RST_STREAM
    REFUSED_STREAM: UNAVAILABLE without details, before the process is even busy). One channel with
    500 calls in flight met that at 256; at 3x overload a limit of 8 calls met it at twice that.
    `reuse_port` lets several processes of one service listen on one address (--processes,
    orders.server.multiprocess); otherwise a second server on a port in use is a mistake, and
    binding fails."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_concurrent_streams", max_concurrent_rpcs + UNFREED_STREAMS),  # per connection; default: unlimited
        ("grpc.keepalive_time_ms", 60_000),  # ping every minute to find dead clients,
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),  # on idle connections too
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", int(reuse_port)),
    ]


SERVER_OPTIONS = server_options()


def add_service(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor) -> None:
    """Registers `servicer`'s unary and server-streaming methods for `service`, decoding requests
    ourselves: gRPC's own decoding answers an undecodable request with INTERNAL, but the caller sent
    bad input."""
    handlers = {method.name: _method_handler(getattr(servicer, method.name), method) for method in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _method_handler(implementation: Callable[..., Any], method: MethodDescriptor) -> grpc.RpcMethodHandler:
    request_type = message_factory.GetMessageClass(method.input_type)
    serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
    if method.client_streaming:
        raise ValueError(f"{method.full_name}: client-streaming methods are not supported")
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _decoding_stream(implementation, request_type), request_deserializer=None, response_serializer=serialize
        )
    return grpc.unary_unary_rpc_method_handler(
        _decoding(implementation, request_type), request_deserializer=None, response_serializer=serialize
    )


async def _decode(raw: bytes, request_type: type[Message], context: grpc.aio.ServicerContext) -> Message:
    try:
        return request_type.FromString(raw)
    except DecodeError as error:
        problem = FieldViolation("", f"not a valid {request_type.DESCRIPTOR.full_name} message: {error}")
        await context.abort_with_status(to_status(InvalidCommand([problem]), MALFORMED))
        raise  # unreachable: abort_with_status raises


def _decoding(method: Callable[[Any, Any], Awaitable[Message]], request_type: type[Message]) -> Callable[..., Any]:
    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        return await method(await _decode(raw, request_type, context), context)

    return handler


def _decoding_stream(
    method: Callable[[Any, Any], AsyncGenerator[Message, None]], request_type: type[Message]
) -> Callable[..., Any]:
    """A server-streaming handler around `method`, an async generator of the responses. Each write
    waits for HTTP/2 flow control, so the generator runs no further ahead than the client reads.
    The generator is closed as soon as the call ends (cancelled, deadline passed, server stopped), so
    that its `finally` blocks run at once rather than whenever it is garbage collected."""

    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> None:
        request = await _decode(raw, request_type, context)
        async with aclosing(method(request, context)) as responses:
            async for response in responses:
                await context.write(response)

    return handler


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    address: str,
    services: dict[ServiceDescriptor, object],
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
    security: ServerSecurity | None = None,
    *,
    reuse_port: bool = False,
) -> RunningServer:
    """Starts a server with our services plus health and reflection; port 0 picks a free port.
    At most `max_concurrent_rpcs` calls run at once; more are refused as OVERLOADED (orders.server.admission).
    `security` adds TLS and token authentication (orders.server.security); None serves plaintext to anyone.
    `reuse_port`: the address is shared with the other processes of the service (--processes)."""
    security = security or ServerSecurity()
    security.check_services(service.full_name for service in services)
    server = grpc.aio.server(
        options=server_options(max_concurrent_rpcs, reuse_port=reuse_port),
        # The correlation id first, so that every later interceptor's log lines (a refused token) carry it;
        # the metrics next, so that they count the calls refused as OVERLOADED (UNAVAILABLE) too.
        interceptors=[
            CorrelationInterceptor(),
            GrpcMetricsInterceptor(),
            AdmissionInterceptor(max_concurrent_rpcs),
            *security.interceptors(),
        ],
    )
    for service, servicer in services.items():
        add_service(server, servicer, service)
    service_names = [service.full_name for service in services]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, [*services, HEALTH_SERVICE, REFLECTION_SERVICE])
    port = security.add_port(server, address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    security.log_summary(address)
    await server.start()
    for name in ["", *service_names, LIVENESS]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, health_servicer, port)


HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION_SERVICE = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
# The error details every server sends (ErrorInfo, BadRequest, RetryInfo: orders.server.rpc_errors):
# grpcurl looks their types up through reflection to print them.
ERROR_DETAILS_FILE = error_details_pb2.DESCRIPTOR


def enable_reflection(server: grpc.aio.Server, services: Iterable[ServiceDescriptor]) -> None:
    """Reflection of exactly `services`: their names and the files that define them (and the error
    details). Not the process's default descriptor pool, which holds every file any module imported:
    where several servers share a process (the tests), the read server would describe OrderCommands too."""
    services = list(services)
    pool = reflection_pool([*(service.file for service in services), ERROR_DETAILS_FILE])
    reflection.enable_server_reflection([service.full_name for service in services], server, pool)


def reflection_pool(files: Iterable[FileDescriptor]) -> descriptor_pool.DescriptorPool:
    """A descriptor pool holding `files` and what they import, and nothing else."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:  # a file can only be added after its imports
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.AddSerializedFile(proto.SerializeToString())
        added.add(file.name)

    for file in files:
        add(file)
    return pool


def stop_on_signals(*, exit_on_repeat: bool = True) -> asyncio.Event:
    """An event set on SIGTERM or SIGINT (asyncio.run alone only handles Ctrl-C). A second signal
    exits at once, unless not `exit_on_repeat`: a process of several (--processes) may get a signal
    both from its parent and from outside (Ctrl-C reaches the whole process group, systemd signals
    every process), so only its parent decides to stop it at once (SIGKILL)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, sig, stop, exit_on_repeat)
    return stop


def _on_signal(sig: signal.Signals, stop: asyncio.Event, exit_on_repeat: bool) -> None:
    if stop.is_set():
        if not exit_on_repeat:
            log.info("%s again: still shutting down gracefully", sig.name)
            return
        log.warning("%s again: exiting now", sig.name)
        raise SystemExit(1)
    log.info("%s received: shutting down gracefully", sig.name)
    stop.set()


# Allocations between young-generation collections; CPython's default is 700, which a server that
# makes thousands of short-lived objects per call (messages, futures, dicts) reaches many times a call.
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Garbage collection for a long-running server. Start-up leaves a large, permanent object graph
    (modules, protobuf descriptors, gRPC, prometheus): gc.freeze() moves it out of the collector's
    generations, so that full collections no longer walk it; and young collections run every
    GC_YOUNG_THRESHOLD allocations. Reference counting still frees most objects at once; only cycles
    wait for a collection. A profile of the services under load showed 12-23% of their busy CPU in
    gc_collect_main before this (docs/performance.md)."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Runs an async main with uvloop when available (about 1.2x faster gRPC), after `tune_gc`."""
    tune_gc()
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
