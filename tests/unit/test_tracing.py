"""Optional tracing (orders.telemetry.tracing): when it turns on, and that off costs no OpenTelemetry import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orders import config
from orders.telemetry import tracing
from orders.telemetry.tracing import resolve


@pytest.mark.parametrize(
    ("mode", "environ", "expected"),
    [
        ("auto", {}, "off"),
        ("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "otlp"),
        ("auto", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, "otlp"),
        ("auto", {"OTEL_TRACES_EXPORTER": "console"}, "console"),
        ("auto", {"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
        ("auto", {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, "off"),
        ("auto", {"OTEL_TRACES_EXPORTER": "zipkin"}, "off"),  # not one we ship
        ("auto", {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, "off"),
        ("off", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "off"),  # the setting wins
        ("console", {}, "console"),
        ("otlp", {}, "otlp"),
    ],
)
def test_what_turns_tracing_on(mode: str, environ: dict[str, str], expected: str) -> None:
    assert resolve(mode, environ) == expected


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="expected auto, otlp, console or off"):
        config.tracing_mode("jaeger")


def test_off_returns_at_once() -> None:
    assert not tracing.enabled()
    assert tracing.current_traceparent() is None
    assert tracing.current_ids() == {}


def test_off_imports_nothing_of_opentelemetry() -> None:
    """A service started without tracing never imports the SDK, nor the API (a fresh interpreter, as
    a service; the write service, since redis-py imports OpenTelemetry itself when it is installed)."""
    probe = (
        "import os, sys; [os.environ.pop(k) for k in list(os.environ) if k.startswith('OTEL_')];"
        " import write_service.main, orders.server.grpc_server, orders.server.correlation;"
        " import orders.telemetry.tracing as t;"
        " assert t.setup_tracing('auto', 'probe') == 'off';"
        " print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"
