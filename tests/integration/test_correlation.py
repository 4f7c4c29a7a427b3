"""Correlation ids and traces from a command to the sync worker that projects its events
(orders.server.correlation, orders.telemetry.logs, orders.telemetry.tracing): through a real gRPC
channel to the in-process system, into the events' metadata in PostgreSQL, and out of the worker's
log records and spans; and once through a real `orders-sync-worker` process whose stderr is JSON lines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orders.server.security import ServerSecurity, load_token_table, token_sha256
from orders.store.event_store import connect
from orders.store.views import ViewKeys
from orders.telemetry import tracing
from orders.telemetry.logs import ContextFilter, correlation_id
from orders.tools.processes import PIPE, start_service
from orders.v1 import commands_pb2, commands_pb2_grpc, queries_pb2
from sync_worker import progress
from tests.conftest import Servers
from tests.helpers import create_request, eventually
from tests.integration.conftest import System
from write_service.main import start_write_service

WORKER_LOGGER = "sync_worker.worker"
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


async def stored_metadata(system: System, order_id: str) -> list[dict[str, Any]]:
    rows = await system.pool.fetch("SELECT metadata FROM events WHERE stream_id = $1 ORDER BY version", order_id)
    return [row["metadata"] for row in rows]


def worker_records(caplog: pytest.LogCaptureFixture, order_id: str) -> list[logging.LogRecord]:
    """The worker's per-event DEBUG records of `order_id`."""
    return [
        r
        for r in caplog.records
        if r.name == WORKER_LOGGER and r.levelno == logging.DEBUG and getattr(r, "order_id", None) == order_id
    ]


async def test_a_correlation_id_goes_from_the_command_into_the_events_and_the_worker_log(
    system: System, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=WORKER_LOGGER)
    call = system.commands.CreateOrder(create_request(), metadata=(("x-correlation-id", "test-corr-123"),), timeout=10)
    order_id = (await call).result.order_id

    assert dict(await call.trailing_metadata())["x-correlation-id"] == "test-corr-123"  # echoed
    (metadata,) = await stored_metadata(system, order_id)
    assert metadata["correlation_id"] == "test-corr-123"
    assert metadata["command"] == "CreateOrder"  # what was stored before stays
    assert "command_id" in metadata
    assert "traceparent" not in metadata  # tracing is off

    async def projected_by_both() -> list[logging.LogRecord]:
        records = worker_records(caplog, order_id)
        assert {r.projection for r in records} == {"orders", "customer_summary"}  # type: ignore[attr-defined]
        return records

    for record in await eventually(projected_by_both):
        assert record.correlation_id == "test-corr-123"  # type: ignore[attr-defined]
        assert record.event_type == "OrderCreated"  # type: ignore[attr-defined]
        assert record.position > 0  # type: ignore[attr-defined]
    batches = [r for r in caplog.records if r.name == WORKER_LOGGER and hasattr(r, "first_position")]
    assert any(r.getMessage().startswith("projection orders: applied") for r in batches)
    assert all(r.first_position <= r.last_position and r.lag_seconds >= 0 for r in batches)  # type: ignore[attr-defined]


async def test_a_command_without_an_id_gets_a_new_one_that_is_stored_too(
    system: System, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=WORKER_LOGGER)
    command_id = "cmd-without-correlation"
    call = system.commands.CreateOrder(create_request(command_id=command_id), timeout=10)
    order_id = (await call).result.order_id

    generated = dict(await call.trailing_metadata())["x-correlation-id"]
    assert GENERATED_ID.fullmatch(generated)
    (metadata,) = await stored_metadata(system, order_id)
    assert metadata["correlation_id"] == generated
    assert metadata["command_id"] == command_id

    async def logged() -> None:
        assert {r.correlation_id for r in worker_records(caplog, order_id)} == {generated}  # type: ignore[attr-defined]

    await eventually(logged)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((("x-request-id", "req.42:a_b-c"),), "req.42:a_b-c"),
        ((("x-correlation-id", "bad id!"), ("x-request-id", "fallback-1")), "fallback-1"),
        ((("x-correlation-id", "x" * 129),), None),
        ((("x-correlation-id", "semi;colon"),), None),
    ],
)
async def test_the_id_is_taken_from_x_request_id_and_an_invalid_one_is_replaced(
    system: System, metadata: tuple[tuple[str, str], ...], expected: str | None
) -> None:
    call = system.commands.CreateOrder(create_request(), metadata=metadata, timeout=10)
    order_id = (await call).result.order_id
    echoed = dict(await call.trailing_metadata())["x-correlation-id"]
    if expected is None:
        assert GENERATED_ID.fullmatch(echoed)
    else:
        assert echoed == expected
    assert [m["correlation_id"] for m in await stored_metadata(system, order_id)] == [echoed]


async def test_errors_and_streams_get_the_id_back_too(system: System) -> None:
    """In the trailing metadata next to an error's rich details; a stream sends it as initial metadata
    too, before its first message, and in its trailers when it ends."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await system.commands.ConfirmOrder(
            commands_pb2.ConfirmOrderRequest(order_id="no-such-order"),
            metadata=(("x-correlation-id", "err-1"),),
            timeout=10,
        )
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    trailers = dict(refused.value.trailing_metadata())
    assert trailers["x-correlation-id"] == "err-1"
    assert "grpc-status-details-bin" in trailers  # the rich error details are still there

    created = await system.commands.CreateOrder(create_request(), timeout=10)
    watch = system.queries.WatchOrder(
        queries_pb2.WatchOrderRequest(
            order_id=created.result.order_id, consistency_token=created.result.consistency_token
        ),
        metadata=(("x-correlation-id", "watch-1"),),
        timeout=1.5,
    )
    assert dict(await watch.initial_metadata())["x-correlation-id"] == "watch-1"
    first = await watch.read()
    assert first.order.order_id == created.result.order_id
    assert await watch.read() is grpc.aio.EOF  # nothing changed: the stream ends OK just before its deadline
    assert await watch.code() == grpc.StatusCode.OK
    assert dict(await watch.trailing_metadata())["x-correlation-id"] == "watch-1"


async def test_the_caller_is_stored_and_refusals_are_logged_with_the_id(
    system: System, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[callers.shop]\ntoken_sha256 = "{token_sha256("shop-token-0123456789")}"\nscopes = ["commands"]\n'
    )
    pool = await connect(system.database_url, max_size=2)
    server = await start_write_service(pool, "127.0.0.1:0", security=ServerSecurity(tokens=load_token_table(tokens)))
    stamp = ContextFilter()  # what the process's log handler adds to every record
    caplog.handler.addFilter(stamp)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = commands_pb2_grpc.OrderCommandsStub(channel)
            with (
                caplog.at_level(logging.INFO, logger="orders.server.security"),
                pytest.raises(grpc.aio.AioRpcError) as refused,
            ):
                await stub.CreateOrder(create_request(), metadata=(("x-correlation-id", "no-token-1"),), timeout=10)
            authorized = (("authorization", "Bearer shop-token-0123456789"), ("x-correlation-id", "shop-1"))
            created = await stub.CreateOrder(create_request(), metadata=authorized, timeout=10)
    finally:
        caplog.handler.removeFilter(stamp)
        await server.stop(0)
        await pool.close()

    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert dict(refused.value.trailing_metadata())["x-correlation-id"] == "no-token-1"
    (refusal,) = [
        r for r in caplog.records if r.name == "orders.server.security" and r.getMessage().startswith("refused")
    ]
    assert refusal.correlation_id == "no-token-1"  # type: ignore[attr-defined]
    assert refusal.rpc_method == "/orders.v1.OrderCommands/CreateOrder"  # type: ignore[attr-defined]
    (metadata,) = await stored_metadata(system, created.result.order_id)
    assert (metadata["caller"], metadata["correlation_id"]) == ("shop", "shop-1")
    assert correlation_id.get() is None  # the call's context stayed in the call


# ---------------------------------------------------------------------------- tracing


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory, for this test only."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.uninstall()
        provider.shutdown()


def span_named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name == name]


async def test_one_trace_goes_from_the_command_through_its_events_to_each_projection(
    system: System, spans: InMemorySpanExporter
) -> None:
    client_trace, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    metadata = (("traceparent", f"00-{client_trace}-{client_span}-01"), ("x-correlation-id", "traced-1"))
    created = await system.commands.CreateOrder(create_request(), metadata=metadata, timeout=10)
    order_id = created.result.order_id

    (rpc,) = span_named(spans, "orders.v1.OrderCommands/CreateOrder")
    assert rpc.context is not None
    assert format(rpc.context.trace_id, "032x") == client_trace  # continues the caller's trace
    assert rpc.parent is not None
    assert format(rpc.parent.span_id, "016x") == client_span
    assert rpc.attributes is not None
    assert rpc.attributes["orders.correlation_id"] == "traced-1"
    assert rpc.attributes["rpc.grpc.status_code"] == "OK"
    (stored,) = await stored_metadata(system, order_id)
    assert stored["traceparent"] == f"00-{client_trace}-{rpc.context.span_id:016x}-01"

    async def projected() -> dict[str, ReadableSpan]:
        found = {
            str(s.attributes["orders.projection"]): s
            for s in span_named(spans, "project orders") + span_named(spans, "project customer_summary")
            if s.attributes is not None and s.attributes["orders.order_id"] == order_id
        }
        assert set(found) == {"orders", "customer_summary"}
        return found

    for projection in (await eventually(projected)).values():
        assert projection.context is not None
        assert projection.parent is not None
        assert rpc.context is not None
        assert projection.context.trace_id == rpc.context.trace_id  # one trace
        assert projection.parent.span_id == rpc.context.span_id  # the event's span is the RPC's child
        assert projection.attributes is not None
        assert projection.attributes["orders.correlation_id"] == "traced-1"
        assert projection.attributes["orders.event_type"] == "OrderCreated"


async def test_a_failed_call_marks_its_span(system: System, spans: InMemorySpanExporter) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await system.commands.ConfirmOrder(commands_pb2.ConfirmOrderRequest(order_id="no-such-order"), timeout=10)
    (rpc,) = span_named(spans, "orders.v1.OrderCommands/ConfirmOrder")
    assert rpc.attributes is not None
    assert rpc.attributes["rpc.grpc.status_code"] == "NOT_FOUND"  # a client error: not a server error


# ---------------------------------------------------------------------------- the real process


@contextlib.asynccontextmanager
async def write_service(database_url: str) -> AsyncIterator[commands_pb2_grpc.OrderCommandsStub]:
    pool = await connect(database_url, max_size=2)
    server = await start_write_service(pool, "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield commands_pb2_grpc.OrderCommandsStub(channel)
    finally:
        await server.stop(0)
        await pool.close()


async def test_the_sync_worker_process_logs_the_id_as_json(database_url: str, servers: Servers, keys: ViewKeys) -> None:
    async with write_service(database_url) as commands:
        created = await commands.CreateOrder(
            create_request(), metadata=(("x-correlation-id", "test-corr-process"),), timeout=10
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORDERS_", "OTEL_"))}
    env.update(
        ORDERS_POSTGRES_URL=database_url,
        ORDERS_REDIS_URL=servers.redis_url,
        ORDERS_REDIS_PREFIX=keys.prefix,
        ORDERS_LOG_FORMAT="json",
        ORDERS_LOG_LEVEL="DEBUG",
    )
    worker = await start_service("orders-sync-worker", env=env, log=PIPE)
    stderr = worker.process.stderr  # where it logs
    assert stderr is not None
    lines: list[str] = []
    found: dict[str, Any] | None = None
    try:
        async with asyncio.timeout(30):
            while found is None:
                raw = await stderr.readline()
                if not raw:
                    exited = await worker.process.wait()
                    pytest.fail(f"the worker exited ({exited}) without logging the id:\n" + "\n".join(lines))
                lines.append(raw.decode().rstrip("\n"))
                record = json.loads(lines[-1])  # every line is one JSON object
                if record.get("correlation_id") == "test-corr-process":
                    found = record
    finally:
        rest = asyncio.create_task(stderr.read())  # read while it stops, so that a full pipe cannot block it
        status = await worker.stop()
    lines += (await rest).decode().splitlines()
    assert status == 0, "\n".join(lines)
    assert found is not None
    assert found["level"] == "DEBUG"
    assert found["logger"] == WORKER_LOGGER
    assert found["order_id"] == created.result.order_id
    assert found["event_type"] == "OrderCreated"
    assert found["projection"] in {"orders", "customer_summary"}
    assert found["ts"].endswith("Z")
    assert all(isinstance(json.loads(line), dict) for line in lines if line)
    assert any("stopped after applying" in json.loads(line)["message"] for line in lines if line)


async def test_the_worker_sums_up_applied_events_at_info_level(
    system: System, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INFO gets a periodic summary of applied events instead of a line per batch."""
    monkeypatch.setattr(progress, "SUMMARY_EVERY", 0.0)
    caplog.set_level(logging.INFO, logger=WORKER_LOGGER)
    result = (await system.commands.CreateOrder(create_request(), timeout=10)).result

    async def summed_up() -> None:
        summaries = [r.getMessage() for r in caplog.records if r.name == WORKER_LOGGER and r.levelno == logging.INFO]
        assert any(f"up to position {result.position}" in message for message in summaries)

    await eventually(summed_up)
