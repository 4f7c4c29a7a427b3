"""Structured logs: one JSON object per line for machines, one readable line for people.

`setup_logging(level, fmt)` sends every record to stderr. With `fmt="auto"` (the default,
ORDERS_LOG_FORMAT) the format follows where stderr goes: a terminal gets text, anything else (a
file, a pipe, a container runtime) gets JSON lines. Each line holds

- `ts` (RFC 3339, UTC, milliseconds), `level`, `logger`, `message`;
- the context of the call being served, when there is one: `correlation_id`, `caller` (from
  token authentication), `rpc_method`; and `trace_id`/`span_id` while tracing is on;
- any fields given with `extra=` (the sync worker gives `projection`, `position`, `order_id`,
  `event_type`, `correlation_id`, ...);
- `exception`: the traceback, when there is one.

Why the standard library and no logging library: a Formatter and a Filter of some 60 lines do all
of it. python-json-logger would save the json.dumps call and the list of the LogRecord's own
attributes, but not the context fields, the text form or the timestamp format we want, and
structlog would change how every module logs. Neither pays for a new dependency here.

The correlation id of a call lives in the context variable `correlation_id`, set by
orders.server.correlation.CorrelationInterceptor for the whole call (see docs/operations.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TextIO

from orders.telemetry import tracing

# The correlation id of the call being served (None outside a call).
correlation_id: ContextVar[str | None] = ContextVar("orders.telemetry.logs.correlation_id", default=None)
# The full gRPC method of the call being served, such as "/orders.v1.OrderCommands/CreateOrder".
rpc_method: ContextVar[str | None] = ContextVar("orders.telemetry.logs.rpc_method", default=None)
# The authenticated caller of the RPC being served (its name in the tokens file); None when the
# server has no token authentication, or for a call to an open service.
current_caller: ContextVar[str | None] = ContextVar("orders.telemetry.logs.current_caller", default=None)

CORRELATION_HEADERS = ("x-correlation-id", "x-request-id")  # in order of preference
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# Attributes every LogRecord has; whatever else a record holds came with `extra=` and is logged.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_CONTEXT_FIELDS = ("correlation_id", "caller", "rpc_method", "trace_id", "span_id")


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class LogFormat(StrEnum):
    """json: one object per line; text: one readable line; auto: text on a terminal, json otherwise."""

    AUTO = "auto"
    JSON = "json"
    TEXT = "text"


def valid_correlation_id(value: object) -> str | None:
    """`value` if it may serve as a correlation id (1-128 of A-Z a-z 0-9 . _ : -), else None."""
    return value if isinstance(value, str) and _VALID_ID.fullmatch(value) else None


def new_correlation_id() -> str:
    """A random (version 4) UUID in hex, as uuid.uuid4().hex, in a fifth of its time (no UUID object)."""
    value = int.from_bytes(os.urandom(16)) & ~(0xC000 << 48 | 0xF000 << 64) | (0x8000 << 48 | 0x4000 << 64)
    return f"{value:032x}"


def correlation_id_from(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The call's correlation id: the first valid `x-correlation-id` or `x-request-id` in its
    metadata, else a new one (an invalid one is not passed on: it would end up in logs and rows)."""
    sent = dict(metadata or ())  # gRPC gives keys in lower case
    for header in CORRELATION_HEADERS:
        found = valid_correlation_id(sent.get(header))
        if found is not None:
            return found
    return new_correlation_id()


class ContextFilter(logging.Filter):
    """Adds the served call's context to each record that does not carry those fields already."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = {
            "correlation_id": correlation_id.get(),
            "caller": current_caller.get(),
            "rpc_method": rpc_method.get(),
        }
        context.update(tracing.current_ids())
        for name, value in context.items():
            if value is not None and getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """What a record says, as one flat dict: the fixed fields, then context and extras."""
    ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    out: dict[str, Any] = {
        "ts": ts,
        "level": record.levelname,
        "logger": record.name,
        "message": record.getMessage(),
    }
    for name in _CONTEXT_FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            out[name] = value
    for name, value in vars(record).items():
        if name not in _RECORD_ATTRIBUTES and name not in out and value is not None:
            out[name] = value
    return out


class StructuredFormatter(logging.Formatter):
    """`json_lines`: one JSON object per record. Otherwise one readable line, context as key=value
    after the message (and the traceback on the lines below)."""

    def __init__(self, json_lines: bool) -> None:
        super().__init__()
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        out = fields(record)
        exception = self._exception_text(record)
        if self.json_lines:
            if exception:
                out["exception"] = exception
            return json.dumps(out, ensure_ascii=False, default=str, separators=(",", ":"))
        ts, level, logger, message = out.pop("ts"), out.pop("level"), out.pop("logger"), out.pop("message")
        line = f"{ts} {level:<7} {logger}: {message}"
        if out:
            line += "  " + " ".join(f"{name}={_text_value(value)}" for name, value in out.items())
        return f"{line}\n{exception}" if exception else line

    def _exception_text(self, record: logging.LogRecord) -> str:
        parts = []
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        return "\n".join(parts)


def _text_value(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if not text or any(c.isspace() or c in "\"'=" for c in text) else text


def uses_json(fmt: str, stream: TextIO) -> bool:
    """Whether `fmt` means JSON lines on `stream`: "auto" means JSON unless it is a terminal."""
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return not (isatty is not None and isatty())
    return fmt == "json"


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Our stderr handler, so that setting up again replaces it and leaves other handlers alone."""


def setup_logging(level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Logs records of `level` and above to `stream` (stderr) in format `fmt` (auto, json or text)."""
    stream = stream or sys.stderr
    handler = _Handler(stream)
    handler.setFormatter(StructuredFormatter(json_lines=uses_json(LogFormat(fmt), stream)))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # a warning is a log record too, in the same format
