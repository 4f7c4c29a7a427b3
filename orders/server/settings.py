"""Settings of the gRPC servers: TLS, mutual TLS and token authentication (docs/security.md), and the
number of processes serving one address (docs/deployment.md#several-processes-on-one-machine)."""

from __future__ import annotations

import argparse

from orders.config import (
    SettingsParser,
    add_setting,
    both_or_neither,
    check_ca,
    in_setting,
    optional_path,
    pop_settings,
    positive_int,
    read_pem,
)
from orders.server import security


def add_security_arguments(parser: SettingsParser) -> None:
    """TLS, mutual TLS and token authentication of a gRPC server (docs/security.md). After parsing,
    the five settings are one, `security`: an orders.server.security.ServerSecurity whose files were read
    and checked, or None (plaintext, no tokens)."""
    add_setting(
        parser,
        "tls-cert-file",
        "PEM certificate chain this server presents; with --tls-key-file turns on TLS (empty: plaintext)",
        default="",
        parse=optional_path,
    )
    add_setting(
        parser, "tls-key-file", "PEM private key of --tls-cert-file (unencrypted)", default="", parse=optional_path
    )
    add_setting(
        parser,
        "tls-client-ca-file",
        "PEM CA certificate(s); turns on mutual TLS: every client needs a certificate signed by one of them",
        default="",
        parse=optional_path,
    )
    add_setting(
        parser,
        "auth-tokens-file",
        "TOML file of callers with their token's SHA-256 and scopes; turns on token authentication",
        default="",
        parse=optional_path,
    )
    add_setting(
        parser,
        "open-services",
        "comma-separated services callable without a token, of: health, reflection (empty: none)",
        default="health,reflection",
        parse=security.open_service_names,
    )
    parser.finishers.append(_server_security)


def _server_security(namespace: argparse.Namespace) -> None:
    cert, key, client_ca, tokens_file, open_services = pop_settings(
        namespace, "tls-cert-file", "tls-key-file", "tls-client-ca-file", "auth-tokens-file", "open-services"
    )
    both_or_neither(cert, key, "TLS")
    tls = None
    if client_ca is not None and cert is None:
        raise ValueError(
            "--tls-client-ca-file (ORDERS_TLS_CLIENT_CA_FILE): mutual TLS needs TLS: "
            "set --tls-cert-file and --tls-key-file too"
        )
    if cert is not None and key is not None:
        in_setting("tls-cert-file", lambda: read_pem(cert, "certificate"))
        in_setting("tls-key-file", lambda: read_pem(key, "private key"))
        if client_ca is not None:
            in_setting("tls-client-ca-file", lambda: read_pem(client_ca, "certificate"))
            in_setting("tls-client-ca-file", lambda: check_ca(client_ca))
        tls = in_setting("tls-key-file", lambda: security.load_server_tls(cert, key, client_ca))
    tokens = None
    if tokens_file is not None:
        tokens = in_setting("auth-tokens-file", lambda: security.load_token_table(tokens_file))
    configured = tls is not None or tokens is not None
    namespace.security = security.ServerSecurity(tls, tokens, open_services) if configured else None


def add_processes_argument(parser: SettingsParser) -> None:
    """`--processes` (ORDERS_PROCESSES): how many processes serve the address (orders.server.multiprocess)."""
    add_setting(
        parser,
        "processes",
        "server processes sharing the address (SO_REUSEPORT, Linux), each with its own event loop, pools and "
        "ops endpoint (the metrics port + its index): for machines with more cores than instances; 1 on Kubernetes",
        default="1",
        parse=positive_int,
    )
