"""The client's pure parts: retry policy, session tokens, TLS settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orders.client import NO_RETRIES, RetryPolicy, TlsConfig, _Session


def test_the_retry_policy_retries_only_unavailable_on_both_services() -> None:
    """The service config names both services and UNAVAILABLE as the only retryable code."""
    config = json.loads(RetryPolicy(max_attempts=4).service_config())["methodConfig"][0]

    assert [name["service"] for name in config["name"]] == ["orders.v1.OrderCommands", "orders.v1.OrderQueries"]
    assert config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert config["retryPolicy"]["maxAttempts"] == 4


def test_no_retries_has_no_retry_policy() -> None:
    """One attempt is expressed by leaving the policy out (gRPC refuses maxAttempts 1)."""
    config = json.loads(NO_RETRIES.service_config())

    assert "retryPolicy" not in config["methodConfig"][0]
    assert "retryThrottling" not in config


def test_retries_have_a_budget() -> None:
    """gRPC's retry throttling bounds the retries: under sustained overload calls stop being retried
    rather than multiplying the load (the server's pushback sets the delay of those that are)."""
    config = json.loads(RetryPolicy(max_tokens=20, token_ratio=0.5).service_config())

    assert config["retryThrottling"] == {"maxTokens": 20, "tokenRatio": 0.5}


@pytest.mark.parametrize(
    "fields",
    [
        {"max_attempts": 0},
        {"max_attempts": 6},
        {"initial_backoff": 0},
        {"max_backoff": 0.01},
        {"max_tokens": 0},
        {"max_tokens": 1001},
        {"token_ratio": 0},
    ],
)
def test_a_retry_policy_grpc_would_refuse_or_cap_is_refused(fields: dict[str, float]) -> None:
    """Out-of-range settings fail when the policy is made, not silently inside gRPC."""
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**fields)  # type: ignore[arg-type]


def test_a_session_keeps_the_newest_token_in_log_order() -> None:
    """Tokens compare as (transaction, position) pairs, not as strings or by position alone."""
    session = _Session()
    for token in ["9-100", "10-5", "9-200", "10-4"]:
        session.observe(token)

    assert session.token == "10-5"


def test_mutual_tls_needs_both_certificate_and_key(tmp_path: Path) -> None:
    """A client certificate without its key (or the reverse) is a configuration error."""
    cert = tmp_path / "client.pem"
    cert.write_text("not used")

    with pytest.raises(ValueError, match="both cert_file and key_file"):
        TlsConfig(cert_file=cert).credentials()
