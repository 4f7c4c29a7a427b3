"""Settings of the command lines as clients of our servers: TLS and the bearer token."""

from __future__ import annotations

import argparse
from pathlib import Path

from orders.client import TlsConfig
from orders.config import (
    SettingsParser,
    add_setting,
    both_or_neither,
    check_ca,
    check_key_pair,
    in_setting,
    optional_path,
    pop_settings,
    read_pem,
)


def add_client_security_arguments(parser: SettingsParser) -> None:
    """TLS and the bearer token of a client of our servers (the same variables as the servers'
    where they mean the same). After parsing, the TLS settings are one, `tls`: an
    orders.client.TlsConfig whose files were checked, or None (plaintext); `auth_token` stays."""
    add_setting(
        parser,
        "tls-ca-file",
        "PEM CA certificate(s) that signed the servers' certificates; turns on TLS "
        "('system': the system's trusted roots; empty: plaintext)",
        default="",
    )
    add_setting(
        parser,
        "tls-cert-file",
        "PEM certificate of this client, for mutual TLS (with --tls-key-file)",
        default="",
        parse=optional_path,
    )
    add_setting(parser, "tls-key-file", "PEM private key of --tls-cert-file", default="", parse=optional_path)
    add_setting(
        parser,
        "tls-server-name",
        "name to check the servers' certificates against, when not the host of the address",
        default="",
    )
    add_setting(parser, "auth-token", "bearer token sent with every call (docs/security.md)", default="", secret=True)
    parser.finishers.append(_client_tls)


def _client_tls(namespace: argparse.Namespace) -> None:
    ca_setting, cert, key, server_name = pop_settings(
        namespace, "tls-ca-file", "tls-cert-file", "tls-key-file", "tls-server-name"
    )
    both_or_neither(cert, key, "mutual TLS")
    ca = None if ca_setting in ("", "system", None) else Path(ca_setting)
    if ca is not None:
        in_setting("tls-ca-file", lambda: read_pem(ca, "certificate"))
        in_setting("tls-ca-file", lambda: check_ca(ca))
    if cert is not None and key is not None:
        in_setting("tls-cert-file", lambda: read_pem(cert, "certificate"))
        in_setting("tls-key-file", lambda: read_pem(key, "private key"))
        in_setting("tls-key-file", lambda: check_key_pair(cert, key))
    enabled = bool(ca_setting) or cert is not None or bool(server_name)
    namespace.tls = TlsConfig(ca, cert, key, server_name or None) if enabled else None
