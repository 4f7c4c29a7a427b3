"""Structured logs (orders.telemetry.logs): the JSON and text forms, the choice between them, the call's
context in every record, and which correlation ids are taken from a call."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import uuid
from collections.abc import Iterator

import pytest

from orders import config
from orders.telemetry import logs
from orders.telemetry.logs import (
    ContextFilter,
    StructuredFormatter,
    correlation_id,
    correlation_id_from,
    current_caller,
    rpc_method,
    setup_logging,
    uses_json,
    valid_correlation_id,
)

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def record(message: str = "applied %d events", *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("sync_worker.worker", logging.INFO, __file__, 1, message, args or (3,), None)
    made.__dict__.update(extra)
    return made


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


# ---------------------------------------------------------------------------- JSON


def test_a_json_line_has_the_fixed_fields_and_the_extras() -> None:
    line = StructuredFormatter(json_lines=True).format(
        record(projection="orders", position=42, order_id="o-1", correlation_id="c-1")
    )
    fields = json.loads(line)

    assert "\n" not in line
    assert list(fields)[:4] == ["ts", "level", "logger", "message"]
    assert RFC3339_UTC.fullmatch(fields["ts"])
    assert fields["level"] == "INFO"
    assert fields["logger"] == "sync_worker.worker"
    assert fields["message"] == "applied 3 events"
    assert (fields["projection"], fields["position"], fields["order_id"]) == ("orders", 42, "o-1")
    assert fields["correlation_id"] == "c-1"
    assert "exception" not in fields
    assert not {"args", "msg", "levelno", "pathname", "exc_info", "created"} & set(fields)  # no record internals


def test_the_timestamp_is_utc() -> None:
    made = record()
    made.created = 0.25
    assert json.loads(StructuredFormatter(json_lines=True).format(made))["ts"] == "1970-01-01T00:00:00.250Z"


def test_an_exception_is_one_field_of_the_one_line() -> None:
    try:
        raise ValueError('bad "thing"\nsecond line')
    except ValueError:
        made = logging.LogRecord("w", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())

    line = StructuredFormatter(json_lines=True).format(made)
    fields = json.loads(line)

    assert "\n" not in line
    assert fields["message"] == "failed"
    assert fields["exception"].startswith("Traceback (most recent call last):")
    assert fields["exception"].endswith('ValueError: bad "thing"\nsecond line')


def test_values_json_cannot_hold_are_written_as_text() -> None:
    fields = json.loads(StructuredFormatter(json_lines=True).format(record(blocker={"pid": 7}, since=object)))
    assert fields["blocker"] == {"pid": 7}
    assert fields["since"] == str(object)


# ---------------------------------------------------------------------------- text


def test_a_text_line_is_readable_with_the_fields_after_the_message() -> None:
    line = StructuredFormatter(json_lines=False).format(
        record(correlation_id="c-1", projection="orders", reason="two words")
    )
    ts, level, rest = line.split(" ", 2)

    assert RFC3339_UTC.fullmatch(ts)
    assert level == "INFO"
    assert (
        rest.lstrip() == 'sync_worker.worker: applied 3 events  correlation_id=c-1 projection=orders reason="two words"'
    )


def test_a_text_record_with_an_exception_has_the_traceback_below() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        made = logging.LogRecord("w", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    first, *rest = StructuredFormatter(json_lines=False).format(made).splitlines()
    assert first.endswith("ERROR   w: failed")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "RuntimeError: boom"


# ---------------------------------------------------------------------------- the choice


@pytest.mark.parametrize(
    ("fmt", "terminal", "json_lines"),
    [
        ("auto", False, True),
        ("auto", True, False),
        ("json", True, True),
        ("json", False, True),
        ("text", False, False),
        ("text", True, False),
    ],
)
def test_auto_means_text_on_a_terminal_and_json_elsewhere(fmt: str, terminal: bool, json_lines: bool) -> None:
    assert uses_json(fmt, Terminal() if terminal else io.StringIO()) is json_lines


@pytest.mark.usefixtures("restore_root_logger")
def test_setup_logging_writes_json_lines_with_the_calls_context_and_replaces_itself() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("DEBUG", "auto", first)
    setup_logging("DEBUG", "auto", second)  # again: the first handler goes, other handlers stay
    tokens = correlation_id.set("corr-9"), rpc_method.set("/orders.v1.OrderCommands/CreateOrder")
    caller = current_caller.set("shop")
    try:
        logging.getLogger("write_service").debug("inside a call")
    finally:
        correlation_id.reset(tokens[0])
        rpc_method.reset(tokens[1])
        current_caller.reset(caller)
    logging.getLogger("write_service").info("outside")

    assert first.getvalue() == ""
    inside, outside = (json.loads(line) for line in second.getvalue().splitlines())
    assert (inside["correlation_id"], inside["caller"], inside["rpc_method"]) == (
        "corr-9",
        "shop",
        "/orders.v1.OrderCommands/CreateOrder",
    )
    assert not {"correlation_id", "caller", "rpc_method"} & set(outside)


@pytest.mark.usefixtures("restore_root_logger")
def test_setup_logging_on_a_terminal_writes_text() -> None:
    terminal = Terminal()
    setup_logging("INFO", "auto", terminal)
    logging.getLogger("read_service").info("stopped")
    logging.getLogger("read_service").debug("not at INFO")
    assert terminal.getvalue().endswith("INFO    read_service: stopped\n")
    assert terminal.getvalue().count("\n") == 1


def test_a_records_own_correlation_id_wins_over_the_calls() -> None:
    token = correlation_id.set("the-call")
    try:
        own, plain = record(correlation_id="the-event"), record()
        assert ContextFilter().filter(own)
        assert ContextFilter().filter(plain)
    finally:
        correlation_id.reset(token)
    assert own.correlation_id == "the-event"  # type: ignore[attr-defined]
    assert plain.correlation_id == "the-call"  # type: ignore[attr-defined]


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="expected auto, json or text"):
        config.log_format("yaml")


# ---------------------------------------------------------------------------- correlation ids


@pytest.mark.parametrize(
    "value", ["a", "test-corr-123", "A.b_c:d-9", "x" * 128, "4bf92f3577b34da6a3ce929d0e0e4736", "2025-01-01T00:00:00"]
)
def test_valid_correlation_ids(value: str) -> None:
    assert valid_correlation_id(value) == value


@pytest.mark.parametrize("value", ["", "x" * 129, "two words", "semi;colon", "naïve", "new\nline", "a/b", None, b"abc"])
def test_invalid_correlation_ids(value: object) -> None:
    assert valid_correlation_id(value) is None


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((("x-correlation-id", "c-1"), ("x-request-id", "r-1")), "c-1"),  # the correlation id first
        ((("x-request-id", "r-1"), ("x-correlation-id", "c-1")), "c-1"),
        ((("x-request-id", "r-1"),), "r-1"),
        ((("x-correlation-id", "not valid"), ("x-request-id", "r-1")), "r-1"),  # the first valid one
        ((("authorization", "Bearer secret"), ("x-correlation-id", "c-1")), "c-1"),
    ],
)
def test_the_id_comes_from_the_call_metadata(metadata: tuple[tuple[str, str], ...], expected: str) -> None:
    assert correlation_id_from(metadata) == expected


@pytest.mark.parametrize("metadata", [None, (), (("x-correlation-id", "not valid"),), (("x-request-id", ""),)])
def test_a_call_without_a_valid_id_gets_a_new_one(metadata: tuple[tuple[str, str], ...] | None) -> None:
    made = correlation_id_from(metadata)
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert correlation_id_from(metadata) != made


def test_a_new_id_is_a_random_uuid_in_hex() -> None:
    made = {logs.new_correlation_id() for _ in range(1000)}
    assert len(made) == 1000
    for value in made:
        assert uuid.UUID(hex=value).version == 4
        assert uuid.UUID(hex=value).variant == uuid.RFC_4122
        assert uuid.UUID(hex=value).hex == value
