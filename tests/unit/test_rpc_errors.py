"""orders.server.rpc_errors.to_status: each error under each servicer's table becomes the right rich gRPC status."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from orders.domain.errors import (
    CommandIdReused,
    ConcurrencyConflict,
    CustomerNotFound,
    DeadlineExceeded,
    FieldViolation,
    InvalidCommand,
    InvalidQuery,
    OrderAlreadyExists,
    OrderNotFound,
    OrdersError,
    RuleViolation,
    Unavailable,
    ViewsNotReady,
)
from orders.server.rpc_errors import ERROR_DOMAIN, RETRY_DELAY_SECONDS, ErrorTable, to_status
from read_service.servicer import ERRORS as READ_ERRORS
from read_service.watch import ClientTooSlow, ShuttingDown, WatchLimit
from write_service.servicer import ERRORS as WRITE_ERRORS

DETAILS_KEY = "grpc-status-details-bin"
VIOLATIONS = [
    FieldViolation("order_id", "must be 1-64 characters"),
    FieldViolation("unit_price.currency_code", "must be an ISO 4217 code"),
]


class SomethingUnforeseen(OrdersError):
    """An OrdersError subclass that no table lists."""


@dataclass(frozen=True)
class Expected:
    code: grpc.StatusCode
    reason: str
    violations: list[tuple[str, str]] = field(default_factory=list)  # BadRequest, when given

    @property
    def retryable(self) -> bool:
        return self.code in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}


CASES = [
    # the write service's table
    pytest.param(
        InvalidCommand(VIOLATIONS),
        WRITE_ERRORS,
        Expected(
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            [("order_id", "must be 1-64 characters"), ("unit_price.currency_code", "must be an ISO 4217 code")],
        ),
        id="write-InvalidCommand",
    ),
    pytest.param(
        OrderNotFound("o-1"),
        WRITE_ERRORS,
        Expected(grpc.StatusCode.NOT_FOUND, "ORDER_NOT_FOUND"),
        id="write-OrderNotFound",
    ),
    pytest.param(
        OrderAlreadyExists("o-1"),
        WRITE_ERRORS,
        Expected(grpc.StatusCode.ALREADY_EXISTS, "ORDER_ALREADY_EXISTS"),
        id="write-OrderAlreadyExists",
    ),
    pytest.param(
        CommandIdReused("c-1"),
        WRITE_ERRORS,
        Expected(grpc.StatusCode.ALREADY_EXISTS, "COMMAND_ID_REUSED"),
        id="write-CommandIdReused",
    ),
    pytest.param(
        RuleViolation("ORDER_EMPTY", "cannot confirm order 'o-1': it has no items"),
        WRITE_ERRORS,
        Expected(grpc.StatusCode.FAILED_PRECONDITION, "ORDER_EMPTY"),
        id="write-RuleViolation-ORDER_EMPTY",
    ),
    pytest.param(
        RuleViolation("CURRENCY_MISMATCH", "unit price is in USD"),
        WRITE_ERRORS,
        Expected(grpc.StatusCode.FAILED_PRECONDITION, "CURRENCY_MISMATCH"),
        id="write-RuleViolation-CURRENCY_MISMATCH",
    ),
    pytest.param(
        ConcurrencyConflict("expected version 3, order is at 4"),
        WRITE_ERRORS,
        Expected(grpc.StatusCode.ABORTED, "VERSION_CONFLICT"),
        id="write-ConcurrencyConflict",
    ),
    pytest.param(
        Unavailable("PostgreSQL is unreachable"),
        WRITE_ERRORS,
        Expected(grpc.StatusCode.UNAVAILABLE, "EVENT_STORE_UNAVAILABLE"),
        id="write-Unavailable",
    ),
    pytest.param(
        DeadlineExceeded("the command did not finish within its deadline"),
        WRITE_ERRORS,
        Expected(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
        id="write-DeadlineExceeded",
    ),
    pytest.param(
        SomethingUnforeseen("surprise"),
        WRITE_ERRORS,
        Expected(grpc.StatusCode.INTERNAL, "INTERNAL"),
        id="write-unknown",
    ),
    # the read service's table
    pytest.param(
        InvalidQuery([FieldViolation("page_token", "not a token returned by ListOrders")]),
        READ_ERRORS,
        Expected(
            grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", [("page_token", "not a token returned by ListOrders")]
        ),
        id="read-InvalidQuery",
    ),
    pytest.param(
        OrderNotFound("o-1"),
        READ_ERRORS,
        Expected(grpc.StatusCode.NOT_FOUND, "ORDER_NOT_FOUND"),
        id="read-OrderNotFound",
    ),
    pytest.param(
        ViewsNotReady("the views are empty or being rebuilt; retry shortly"),
        READ_ERRORS,
        Expected(grpc.StatusCode.UNAVAILABLE, "VIEWS_NOT_READY"),
        id="read-ViewsNotReady",
    ),
    pytest.param(
        Unavailable("Redis is unavailable"),
        READ_ERRORS,
        Expected(grpc.StatusCode.UNAVAILABLE, "VIEWS_UNAVAILABLE"),
        id="read-Unavailable",
    ),
    pytest.param(
        CustomerNotFound("c-1"),
        READ_ERRORS,
        Expected(grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND"),
        id="read-CustomerNotFound",
    ),
    pytest.param(
        DeadlineExceeded("Redis did not answer within the deadline"),
        READ_ERRORS,
        Expected(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
        id="read-DeadlineExceeded",
    ),
    pytest.param(
        ShuttingDown(),
        READ_ERRORS,
        Expected(grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN"),
        id="read-ShuttingDown",
    ),
    pytest.param(
        ClientTooSlow(1000),
        READ_ERRORS,
        Expected(grpc.StatusCode.RESOURCE_EXHAUSTED, "CLIENT_TOO_SLOW"),
        id="read-ClientTooSlow",
    ),
    pytest.param(
        WatchLimit("this server holds its maximum of 500 watch streams; retry later"),
        READ_ERRORS,
        Expected(grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCH_LIMIT"),
        id="read-WatchLimit",
    ),
    pytest.param(
        SomethingUnforeseen("surprise"), READ_ERRORS, Expected(grpc.StatusCode.INTERNAL, "INTERNAL"), id="read-unknown"
    ),
]


def rich_status(status: grpc.Status) -> status_pb2.Status:
    """The google.rpc.Status carried in the trailing metadata."""
    [raw] = [value for key, value in status.trailing_metadata if key == DETAILS_KEY]
    rich: status_pb2.Status = status_pb2.Status.FromString(raw)
    return rich


def unpack(details: list[any_pb2.Any]) -> dict[str, object]:
    """The details by kind, unpacked; each kind appears at most once."""
    kinds = {
        "ErrorInfo": error_details_pb2.ErrorInfo,
        "BadRequest": error_details_pb2.BadRequest,
        "RetryInfo": error_details_pb2.RetryInfo,
    }
    unpacked: dict[str, object] = {}
    for packed in details:
        for kind, message_class in kinds.items():
            if packed.Is(message_class.DESCRIPTOR):
                message = message_class()
                assert packed.Unpack(message)
                assert kind not in unpacked, f"{kind} twice"
                unpacked[kind] = message
    assert len(details) == len(unpacked), "only ErrorInfo, BadRequest and RetryInfo are expected"
    return unpacked


@pytest.mark.parametrize(("error", "table", "expected"), CASES)
def test_status_code_and_message(error: OrdersError, table: ErrorTable, expected: Expected) -> None:
    """The status has the table's code and the error's message, in the gRPC status and in the rich status."""
    status = to_status(error, table)
    rich = rich_status(status)

    assert (expected.code, str(error)) == (status.code, status.details)
    assert (expected.code.value[0], str(error)) == (rich.code, rich.message)


@pytest.mark.parametrize(("error", "table", "expected"), CASES)
def test_error_info_reason_and_domain(error: OrdersError, table: ErrorTable, expected: Expected) -> None:
    """Every status carries ErrorInfo in the orders.v1 domain; a rule violation's reason is the rule's own."""
    details = unpack(list(rich_status(to_status(error, table)).details))

    assert error_details_pb2.ErrorInfo(reason=expected.reason, domain=ERROR_DOMAIN) == details["ErrorInfo"]


@pytest.mark.parametrize(("error", "table", "expected"), CASES)
def test_bad_request_lists_the_field_violations(error: OrdersError, table: ErrorTable, expected: Expected) -> None:
    """Invalid input carries BadRequest with one field violation per bad field, in order; nothing else does."""
    details = unpack(list(rich_status(to_status(error, table)).details))
    bad_request = details.get("BadRequest")

    if expected.violations:
        assert isinstance(bad_request, error_details_pb2.BadRequest)
        actual = [(v.field, v.description) for v in bad_request.field_violations]
        assert expected.violations == actual
    else:
        assert bad_request is None


@pytest.mark.parametrize(("error", "table", "expected"), CASES)
def test_retry_info_only_where_retrying_helps(error: OrdersError, table: ErrorTable, expected: Expected) -> None:
    """RetryInfo (with the configured delay) is present exactly for UNAVAILABLE and ABORTED."""
    details = unpack(list(rich_status(to_status(error, table)).details))
    retry = details.get("RetryInfo")

    if expected.retryable:
        assert isinstance(retry, error_details_pb2.RetryInfo)
        expected_delay = (RETRY_DELAY_SECONDS, 0)
        assert expected_delay == (retry.retry_delay.seconds, retry.retry_delay.nanos)
    else:
        assert retry is None


@pytest.mark.parametrize(
    ("table", "tested"),
    [
        pytest.param(WRITE_ERRORS, [case.values for case in CASES if case.values[1] is WRITE_ERRORS], id="write"),
        pytest.param(READ_ERRORS, [case.values for case in CASES if case.values[1] is READ_ERRORS], id="read"),
    ],
)
def test_every_table_entry_is_covered(table: ErrorTable, tested: list[tuple[object, ...]]) -> None:
    """The cases above exercise every error class each servicer declares (guards against a table growing untested)."""
    assert set(table) <= {type(values[0]) for values in tested}


def test_subclasses_use_their_parent_entry() -> None:
    """InvalidQuery is an InvalidCommand: under the write table it maps like its parent."""
    status = to_status(InvalidQuery([FieldViolation("x", "y")]), WRITE_ERRORS)

    assert status.code == grpc.StatusCode.INVALID_ARGUMENT


def test_error_missing_from_the_read_table_is_internal() -> None:
    """An OrdersError the read service does not declare (e.g. a write-side error) is INTERNAL there."""
    status = to_status(ConcurrencyConflict("x"), READ_ERRORS)
    details = unpack(list(rich_status(status).details))

    assert status.code == grpc.StatusCode.INTERNAL
    assert error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN) == details["ErrorInfo"]
    assert "RetryInfo" not in details
