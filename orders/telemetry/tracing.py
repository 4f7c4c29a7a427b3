"""Optional OpenTelemetry tracing: a trace from a command, through its events, to the projections.

Off unless configured: `--tracing` (ORDERS_TRACING) `otlp` or `console`, or, with the default
`auto`, the standard OpenTelemetry variables (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: otlp; OTEL_TRACES_EXPORTER=otlp|console|none;
OTEL_SDK_DISABLED=true: off). The OTLP exporter reads its other OTEL_EXPORTER_OTLP_* variables
itself, and OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES name the process as usual.

While off, nothing of OpenTelemetry is imported (it is the optional extra `orders-cqrs[tracing]`)
and every function here returns after one check of a module global.

Spans, when on:

- the server interceptor (orders.server.correlation) opens one SERVER span per RPC, named
  `package.Service/Method`, continuing the caller's W3C `traceparent` from the call metadata;
- the write path stores the `traceparent` of that span in the metadata of every event it appends;
- the sync worker opens one CONSUMER span per event it applied (`project <projection>`), whose parent is
  the event's stored `traceparent`, so the command's trace shows when each projection applied its
  events. The span covers the whole batch the event was applied in: one atomic write applies them all.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from orders.domain.events import RecordedEvent, event_type

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

# gRPC codes that make a server span an error (OpenTelemetry's semantic conventions for RPC servers).
_SERVER_ERROR_CODES = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
_NO_IDS: Mapping[str, str] = {}

_tracer: Tracer | None = None  # None: tracing is off
_propagator: TraceContextTextMapPropagator | None = None


class TracingMode(StrEnum):
    """auto: on when the standard OpenTelemetry variables say so (see `resolve`)."""

    AUTO = "auto"
    OTLP = "otlp"
    CONSOLE = "console"
    OFF = "off"


def resolve(mode: str, environ: Mapping[str, str] = os.environ) -> str:
    """otlp, console or off: what `mode` means given the standard OpenTelemetry variables."""
    if mode != "auto":
        return mode
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "off"
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").split(",")[0].strip().lower()
    if exporter:
        return exporter if exporter in {"otlp", "console"} else "off"  # "none", or one we do not ship
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "otlp"
    return "off"


def setup_tracing(mode: str, service_name: str) -> str:
    """Turns tracing on as `mode` says (see `resolve`); returns what it turned on, or "off"."""
    resolved = resolve(mode)
    if resolved == "off":
        return resolved
    try:
        # Imported only when tracing is on: the SDK is an optional extra.
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter  # noqa: PLC0415
    except ImportError as error:
        raise SystemExit(
            f"tracing ({resolved}) needs OpenTelemetry: pip install 'orders-cqrs[tracing]' ({error})"
        ) from None
    exporter: SpanExporter
    if resolved == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

        exporter = OTLPSpanExporter()  # endpoint, headers, TLS: from the OTEL_EXPORTER_OTLP_* variables
    else:
        exporter = ConsoleSpanExporter()  # to stdout, away from the logs on stderr
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(attributes))  # flushes its spans at exit
    provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    where = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    destination = f"over OTLP to {where or 'the default endpoint'}" if resolved == "otlp" else "to stdout"
    log.info("tracing on: spans go %s", destination)
    return resolved


def install(provider: TracerProvider) -> None:
    """Traces with `provider` from now on (tests give one with an in-memory exporter)."""
    global _tracer, _propagator  # noqa: PLW0603 - the one switch that everything here checks
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator  # noqa: PLC0415

    _propagator = TraceContextTextMapPropagator()
    _tracer = provider.get_tracer("orders")


def uninstall() -> None:
    """Turns tracing off again."""
    global _tracer  # noqa: PLW0603
    _tracer = None


def enabled() -> bool:
    return _tracer is not None


def current_ids() -> Mapping[str, str]:
    """trace_id and span_id of the current span, for log records; empty while tracing is off."""
    if _tracer is None:
        return _NO_IDS
    from opentelemetry import trace  # noqa: PLC0415 - imported already by install

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return _NO_IDS
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, to store with the events it writes; None when off."""
    if _tracer is None or _propagator is None:
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


@contextmanager
def server_span(
    method: str, metadata: Iterable[tuple[str, Any]] | None, attributes: Mapping[str, str], context: Any
) -> Iterator[None]:
    """A SERVER span around one RPC (`method`: "/package.Service/Method"), child of the caller's
    `traceparent` if the metadata has one; `context` is the call's grpc.aio.ServicerContext, whose
    status code ends up on the span. Call only while `enabled()`."""
    assert _tracer is not None
    assert _propagator is not None
    from opentelemetry.trace import SpanKind, Status, StatusCode  # noqa: PLC0415

    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    service, _, name = method.lstrip("/").rpartition("/")
    with _tracer.start_as_current_span(
        method.lstrip("/"),
        context=_propagator.extract(carrier),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name, **attributes},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        failure: BaseException | None = None
        try:
            yield
        except BaseException as error:
            failure = error
            raise
        finally:
            code = _status_name(context, failure)
            span.set_attribute("rpc.grpc.status_code", code)
            if code in _SERVER_ERROR_CODES:
                if failure is not None and code in {"UNKNOWN", "INTERNAL"}:
                    span.record_exception(failure)
                span.set_status(Status(StatusCode.ERROR, code))


def _status_name(context: Any, failure: BaseException | None) -> str:
    import asyncio  # noqa: PLC0415

    import grpc  # noqa: PLC0415

    code = None
    try:
        code = context.code()
    except Exception:  # a context without a code (a test double): judge by the exception
        code = None
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(failure, asyncio.CancelledError):
        return "CANCELLED"
    if failure is not None and not isinstance(failure, grpc.aio.AbortError):
        return "UNKNOWN"
    return "OK"


def record_projection(projection: str, events: Sequence[RecordedEvent], started_ns: int, live: bool) -> None:
    """One CONSUMER span per event of a batch that `projection` applied from `started_ns` until now,
    child of the span that wrote the event (its stored traceparent); events stored without one
    (written while tracing was off) get none."""
    if _tracer is None or _propagator is None:
        return
    from opentelemetry.trace import SpanKind  # noqa: PLC0415

    ended_ns = time.time_ns()
    for recorded in events:
        traceparent = recorded.metadata.get("traceparent")
        if not isinstance(traceparent, str):
            continue
        attributes: dict[str, str | int | bool] = {
            "orders.projection": projection,
            "orders.position": recorded.position,
            "orders.order_id": recorded.stream_id,
            "orders.event_type": event_type(recorded.event),
            "orders.batch_size": len(events),
            "orders.live": live,
        }
        if isinstance(correlation := recorded.metadata.get("correlation_id"), str):
            attributes["orders.correlation_id"] = correlation
        span = _tracer.start_span(
            f"project {projection}",
            context=_propagator.extract({"traceparent": traceparent}),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            start_time=started_ns,
        )
        span.end(end_time=ended_ns)
