"""The gRPC metrics interceptor's bookkeeping, without a server: which status code a call ends with,
and what recording costs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client import REGISTRY

from orders.server.rpc_metrics import _final_code, _instrumented, _MethodMetrics


@dataclass
class Context:
    """The two things the interceptor asks of a grpc.aio.ServicerContext."""

    status: grpc.StatusCode | None = None
    remaining: float | None = None

    def code(self) -> grpc.StatusCode | None:
        return self.status

    def time_remaining(self) -> float | None:
        return self.remaining


@pytest.mark.parametrize(
    ("context", "error", "expected"),
    [
        (Context(), None, grpc.StatusCode.OK),
        (Context(status=grpc.StatusCode.NOT_FOUND), None, grpc.StatusCode.NOT_FOUND),  # set_code, no raise
        (Context(status=grpc.StatusCode.INVALID_ARGUMENT), Exception("AbortError"), grpc.StatusCode.INVALID_ARGUMENT),
        (Context(), ValueError("a bug"), grpc.StatusCode.UNKNOWN),
        (Context(remaining=3.0), asyncio.CancelledError(), grpc.StatusCode.CANCELLED),
        (Context(), asyncio.CancelledError(), grpc.StatusCode.CANCELLED),
        (Context(remaining=-0.01), asyncio.CancelledError(), grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
    ids=["ok", "set-code", "abort", "exception", "cancelled", "cancelled-no-deadline", "deadline"],
)
def test_the_final_code_is_the_one_the_client_sees(
    context: Context, error: BaseException | None, expected: grpc.StatusCode
) -> None:
    """What abort or set_code set wins; otherwise a cancellation past the deadline is DEADLINE_EXCEEDED,
    one before it CANCELLED, any other exception UNKNOWN, and a normal return OK."""
    assert _final_code(context, error) == expected


async def test_a_stream_handler_is_counted_once_when_it_ends() -> None:
    """An async-generator handler is wrapped as one: its messages pass through, it is in flight while
    it runs, and it is counted once, when it ends."""
    labels = {"grpc_service": "test.Streams", "grpc_method": "Three"}

    def handled() -> float:
        return REGISTRY.get_sample_value("orders_grpc_server_handled_total", {**labels, "grpc_code": "OK"}) or 0.0

    def in_flight() -> float | None:
        return REGISTRY.get_sample_value("orders_grpc_server_in_flight", labels)

    seen_in_flight = []

    async def three(request: int, context: object) -> AsyncIterator[int]:
        for i in range(3):
            seen_in_flight.append(in_flight())
            yield request + i

    wrapped = _instrumented(three, _MethodMetrics("/test.Streams/Three"))
    before = handled()
    messages = [message async for message in wrapped(10, Context())]

    assert messages == [10, 11, 12]
    assert seen_in_flight == [1, 1, 1]
    assert (handled() - before, in_flight()) == (1, 0)


async def test_recording_a_call_costs_a_few_microseconds() -> None:
    """The wrapper and its metrics around a handler that does nothing, 5000 times: a few microseconds
    per call, far below the cost of any real RPC (about 1 ms for a command)."""

    async def nothing(request: object, context: object) -> object:
        return request

    wrapped = _instrumented(nothing, _MethodMetrics("/test.Bench/Nothing"))
    context = Context()
    started = time.perf_counter()
    for i in range(5000):
        await wrapped(i, context)
    wrapped_time = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(5000):
        await nothing(i, context)
    bare_time = time.perf_counter() - started
    per_call = (wrapped_time - bare_time) / 5000

    print(f"metrics interceptor: {per_call * 1e6:.1f} µs per call")
    assert per_call < 50e-6
