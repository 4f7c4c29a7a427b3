"""Security settings (orders.config.add_security_arguments and add_client_security_arguments): the
certificate and tokens files are read and checked when the process starts, and any problem stops it
with status 2 and one error line that names the setting, the file and, for tokens, the caller."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme

from orders.cli import admin as admin_cli
from orders.cli.main import build_parser
from orders.client import OrdersClient, TlsConfig, bearer_metadata
from orders.server.security import (
    DEFAULT_OPEN_SERVICES,
    ServerSecurity,
    load_token_table,
    token_sha256,
)
from read_service.main import parse_settings as parse_read
from sync_worker.main import parse_settings as parse_sync
from write_service.main import parse_settings as parse_write

USAGE_ERROR = 2
PARSERS: dict[str, tuple[Callable[[Sequence[str] | None], Any], list[str]]] = {
    "write": (parse_write, ["--postgres-url", "postgresql://db/orders"]),
    "read": (parse_read, ["--redis-url", "redis://cache:6379/0"]),
    "sync": (parse_sync, ["--postgres-url", "postgresql://db/orders", "--redis-url", "redis://cache:6379/0"]),
}
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(autouse=True)
def no_orders_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without any ORDERS_* variable from the developer's or CI's environment."""
    for name in list(os.environ):
        if name.startswith("ORDERS_"):
            monkeypatch.delenv(name)


class Files:
    """PEM files from trustme, and a tokens file, in a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        ca, other = trustme.CA(), trustme.CA()
        self.ca = self.write("ca.pem", ca.cert_pem.bytes())
        server = ca.issue_cert("localhost")
        self.cert = self.write("server.pem", b"".join(blob.bytes() for blob in server.cert_chain_pems))
        self.key = self.write("server.key", server.private_key_pem.bytes())
        self.other_key = self.write("other.key", other.issue_cert("localhost").private_key_pem.bytes())
        self.tokens = self.write(
            "tokens.toml",
            f'[callers.shop]\ntoken_sha256 = "{token_sha256(TOKEN)}"\nscopes = ["commands", "queries"]\n'.encode(),
        )

    def write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("security"))


def parse(service: str, *argv: str) -> Any:
    parse_settings, required = PARSERS[service]
    return parse_settings([*required, *argv])


def refused(capsys: pytest.CaptureFixture[str], service: str, *argv: str) -> str:
    """The one error line of a start refused with status 2."""
    with pytest.raises(SystemExit) as caught:
        parse(service, *argv)
    lines = capsys.readouterr().err.splitlines()
    assert caught.value.code == USAGE_ERROR
    assert len(lines) == 1, lines
    return lines[0]


# ---------------------------------------------------------------------------- server TLS


@pytest.mark.parametrize("service", PARSERS)
def test_without_security_settings_a_server_has_none(service: str) -> None:
    """No TLS files and no tokens file: plaintext without authentication, as before."""
    assert parse(service).security is None


@pytest.mark.parametrize("service", PARSERS)
def test_tls_and_tokens_settings_make_one_checked_security_setting(service: str, files: Files) -> None:
    """The five settings become one ServerSecurity, with the files' contents read."""
    security = parse(
        service,
        *("--tls-cert-file", str(files.cert), "--tls-key-file", str(files.key)),
        *("--tls-client-ca-file", str(files.ca), "--auth-tokens-file", str(files.tokens)),
        *("--open-services", "health"),
    ).security

    assert isinstance(security, ServerSecurity)
    assert security.tls is not None
    assert security.tls.mutual
    assert security.tls.private_key == files.key.read_bytes()
    assert security.tokens is not None
    assert security.tokens.authenticate(TOKEN) is not None
    assert security.open_services == frozenset({"health"})


def test_security_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, files: Files) -> None:
    """ORDERS_TLS_CERT_FILE, ORDERS_TLS_KEY_FILE, ORDERS_AUTH_TOKENS_FILE and ORDERS_OPEN_SERVICES."""
    monkeypatch.setenv("ORDERS_TLS_CERT_FILE", str(files.cert))
    monkeypatch.setenv("ORDERS_TLS_KEY_FILE", str(files.key))
    monkeypatch.setenv("ORDERS_AUTH_TOKENS_FILE", str(files.tokens))
    monkeypatch.setenv("ORDERS_OPEN_SERVICES", "")

    security = parse("write").security

    assert security.tls is not None
    assert not security.tls.mutual
    assert security.tokens is not None
    assert security.open_services == frozenset()


def test_health_and_reflection_are_open_by_default(files: Files) -> None:
    security = parse("read", "--auth-tokens-file", str(files.tokens)).security
    assert security.tls is None
    assert security.open_services == DEFAULT_OPEN_SERVICES == frozenset({"health", "reflection"})


@pytest.mark.parametrize("service", PARSERS)
@pytest.mark.parametrize(("given", "missing"), [("cert", "key"), ("key", "cert")])
def test_cert_and_key_go_together(
    capsys: pytest.CaptureFixture[str], files: Files, service: str, given: str, missing: str
) -> None:
    """One of --tls-cert-file and --tls-key-file without the other is refused, naming both."""
    line = refused(capsys, service, f"--tls-{given}-file", str(getattr(files, given)))

    expected = (
        f"--tls-{given}-file (ORDERS_TLS_{given.upper()}_FILE) is set but --tls-{missing}-file "
        f"(ORDERS_TLS_{missing.upper()}_FILE) is not: set both for TLS, or neither"
    )
    assert expected in line


def test_client_ca_needs_tls(capsys: pytest.CaptureFixture[str], files: Files) -> None:
    line = refused(capsys, "write", "--tls-client-ca-file", str(files.ca))
    assert "--tls-client-ca-file (ORDERS_TLS_CLIENT_CA_FILE): mutual TLS needs TLS" in line


def tls_args(files: Files, cert: Path | None = None, key: Path | None = None, ca: Path | None = None) -> list[str]:
    argv = ["--tls-cert-file", str(cert or files.cert), "--tls-key-file", str(key or files.key)]
    return [*argv, "--tls-client-ca-file", str(ca)] if ca else argv


TLS_FILE_PROBLEMS = [
    ("cert", "missing", "cannot read {path}: No such file or directory"),
    ("cert", "directory", "cannot read {path}: Is a directory"),
    ("cert", "not-pem", "{path} is not a PEM certificate"),
    ("cert", "key-instead", "{path} is not a PEM certificate"),
    ("key", "missing", "cannot read {path}: No such file or directory"),
    ("key", "not-pem", "{path} is not a PEM private key"),
    ("key", "other-key", "{path} is not the private key of the certificate in"),
    ("client-ca", "missing", "cannot read {path}: No such file or directory"),
    ("client-ca", "not-pem", "{path} is not a PEM certificate"),
    ("client-ca", "broken-pem", "{path} holds no readable certificate"),
]


@pytest.mark.parametrize(
    "case", TLS_FILE_PROBLEMS, ids=[f"{setting}-{problem}" for setting, problem, _ in TLS_FILE_PROBLEMS]
)
def test_unusable_tls_file_is_refused_at_start(
    capsys: pytest.CaptureFixture[str], files: Files, tmp_path: Path, case: tuple[str, str, str]
) -> None:
    """A file that is missing, unreadable, not PEM or not the key of the certificate stops the
    start, with the setting and the file named."""
    setting, problem, expected = case
    path = {
        "missing": tmp_path / "nowhere.pem",
        "directory": tmp_path,
        "not-pem": files.write("not.pem", b"hello\n"),
        "key-instead": files.key,
        "other-key": files.other_key,
        "broken-pem": files.write("broken.pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
    }[problem]
    argv = tls_args(files, **{setting.replace("client-", ""): path})

    line = refused(capsys, "write", *argv)

    flag = f"tls-{setting}-file"
    assert f"--{flag} (ORDERS_{flag.upper().replace('-', '_')}): " in line
    assert expected.format(path=path) in line


# ---------------------------------------------------------------------------- tokens file


CALLER = '[callers.ci]\ntoken_sha256 = "{hash}"\nscopes = ["commands"]\n'.format(hash="ab" * 32)
BAD_TOKENS = [
    ("not = [toml", "is not valid TOML"),
    ("", "defines no callers"),
    ("[other]\nx = 1\n", "unknown top-level key(s) other"),
    ("callers = 3\n", "defines no callers"),
    ("[callers]\nci = 'x'\n", "caller 'ci': expected a table [callers.ci]"),
    ("[callers.ci]\nscopes = ['queries']\n", "caller 'ci': missing token_sha256"),
    ('[callers.ci]\ntoken_sha256 = "{h}"\n'.format(h="ab" * 32), "caller 'ci': missing scopes"),
    ('[callers.ci]\ntoken_sha256 = "abc"\nscopes = []\n', "caller 'ci': token_sha256 must be 64 hex digits"),
    ('[callers.ci]\ntoken_sha256 = "{h}"\nscopes = []\n'.format(h="zz" * 32), "must be 64 hex digits"),
    (CALLER.replace('"commands"', '"commands", "write"'), "caller 'ci': unknown scope 'write'"),
    (CALLER.replace('["commands"]', '"commands"'), "caller 'ci': scopes must be a list of strings"),
    (CALLER + "role = 'x'\n", "caller 'ci': unknown key(s) role"),
    (CALLER + "token = 'x'\n", "caller 'ci': give token_sha256 or token, not both"),
    ("[callers.ci]\ntoken = ''\nscopes = []\n", "caller 'ci': token must be a non-empty string"),
    (CALLER + CALLER.replace("callers.ci", "callers.cd"), "callers 'ci' and 'cd' have the same token"),
    (
        CALLER
        + '[callers.dev]\ntoken = "x"\nscopes = []\n'.replace('"x"', f'"{TOKEN}"')
        + f'[callers.dev2]\ntoken_sha256 = "{token_sha256(TOKEN)}"\nscopes = []\n',
        "callers 'dev' and 'dev2' have the same token",
    ),
]


@pytest.mark.parametrize(("content", "expected"), BAD_TOKENS, ids=[expected for _, expected in BAD_TOKENS])
def test_bad_tokens_file_is_refused_naming_file_and_caller(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(content)

    line = refused(capsys, "read", "--auth-tokens-file", str(path))

    assert f"--auth-tokens-file (ORDERS_AUTH_TOKENS_FILE): {path}" in line
    assert expected in line


def test_missing_tokens_file_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = refused(capsys, "sync", "--auth-tokens-file", str(tmp_path / "none.toml"))
    assert f"--auth-tokens-file (ORDERS_AUTH_TOKENS_FILE): cannot read {tmp_path / 'none.toml'}" in line


@pytest.mark.parametrize("value", ["metrics", "health,admin"])
def test_only_health_and_reflection_can_be_opened(capsys: pytest.CaptureFixture[str], value: str) -> None:
    line = refused(capsys, "write", "--open-services", value)
    assert "--open-services" in line
    assert "(ORDERS_OPEN_SERVICES)" in line
    assert repr(value) in line


def test_token_table_finds_callers_by_their_token_only(tmp_path: Path) -> None:
    """Hashes in either case; a plain development `token` is noted as such."""
    path = tmp_path / "tokens.toml"
    path.write_text(
        f'[callers.a]\ntoken_sha256 = "{token_sha256("alpha").upper()}"\nscopes = ["admin"]\n'
        '[callers.b]\ntoken = "beta"\nscopes = ["queries", "commands"]\n'
    )

    table = load_token_table(path)

    found = {token: table.authenticate(token) for token in ("alpha", "beta", "gamma", "")}
    assert {token: caller and (caller.name, caller.scopes) for token, caller in found.items()} == {
        "alpha": ("a", frozenset({"admin"})),
        "beta": ("b", frozenset({"queries", "commands"})),
        "gamma": None,
        "": None,
    }
    assert table.plaintext_callers == ("b",)


def test_no_secret_is_shown_in_the_settings_repr(files: Files) -> None:
    """Logging the settings shows file names, never key material or token hashes."""
    settings = parse("write", *tls_args(files), "--auth-tokens-file", str(files.tokens))

    shown = repr(settings)
    assert str(files.key) in shown
    assert "PRIVATE KEY" not in shown
    assert token_sha256(TOKEN)[:16] not in shown
    assert "shop" not in shown


def test_a_service_without_a_scope_cannot_be_served_with_tokens(files: Files) -> None:
    security = parse("write", "--auth-tokens-file", str(files.tokens)).security
    security.check_services(["orders.v1.OrderCommands", "orders.v1.OrderQueries", "orders.v1.ProjectionAdmin"])
    with pytest.raises(ValueError, match=r"no token scope for acme\.Other"):
        security.check_services(["orders.v1.OrderCommands", "acme.Other"])


# ---------------------------------------------------------------------------- clients


def test_client_without_tls_settings_is_plaintext() -> None:
    args = build_parser().parse_args(["get", "o1"])
    assert (args.tls, args.auth_token) == (None, "")


def test_client_tls_and_token_settings(monkeypatch: pytest.MonkeyPatch, files: Files) -> None:
    """The orders CLI takes the same variable names as the servers; flags may follow the subcommand."""
    monkeypatch.setenv("ORDERS_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("ORDERS_TLS_CA_FILE", str(files.ca))
    argv = ["get", "o1", "--tls-cert-file", str(files.cert), "--tls-key-file", str(files.key)]

    args = build_parser().parse_args([*argv, "--tls-server-name", "orders.internal"])

    assert args.tls == TlsConfig(files.ca, files.cert, files.key, "orders.internal")
    assert args.auth_token == TOKEN


def test_system_roots_or_only_a_server_name_turn_on_tls() -> None:
    system = build_parser().parse_args(["--tls-ca-file", "system", "get", "o1"])
    named = build_parser().parse_args(["--tls-server-name", "orders.example.com", "get", "o1"])
    assert (system.tls, named.tls) == (TlsConfig(), TlsConfig(server_name="orders.example.com"))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--tls-cert-file", "c.pem"], "is set but --tls-key-file (ORDERS_TLS_KEY_FILE) is not: set both for mutual"),
        (["--tls-ca-file", "/no/ca.pem"], "--tls-ca-file (ORDERS_TLS_CA_FILE): cannot read /no/ca.pem"),
    ],
)
def test_client_tls_problems_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args([*argv, "get", "o1"])
    [line] = capsys.readouterr().err.splitlines()
    assert caught.value.code == USAGE_ERROR
    assert expected in line


def test_client_key_must_match_its_certificate(capsys: pytest.CaptureFixture[str], files: Files) -> None:
    with pytest.raises(SystemExit):
        admin_cli.parse_args(["--tls-cert-file", str(files.cert), "--tls-key-file", str(files.other_key), "list"])
    assert "--tls-key-file (ORDERS_TLS_KEY_FILE): " in capsys.readouterr().err


def test_help_does_not_show_the_token(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ORDERS_AUTH_TOKEN", TOKEN)
    with pytest.raises(SystemExit):
        admin_cli.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert TOKEN not in out
    assert "[env ORDERS_AUTH_TOKEN; set]" in out


def test_orders_admin_takes_the_client_settings(monkeypatch: pytest.MonkeyPatch, files: Files) -> None:
    monkeypatch.setenv("ORDERS_TLS_CA_FILE", str(files.ca))
    args = admin_cli.parse_args(["--auth-token", TOKEN, "list"])
    assert (args.tls, args.auth_token) == (TlsConfig(ca_file=files.ca), TOKEN)


def test_client_sends_the_token_as_bearer_metadata() -> None:
    assert bearer_metadata(TOKEN) == (("authorization", f"Bearer {TOKEN}"),)
    assert bearer_metadata(None) == bearer_metadata("") == ()
    with pytest.raises(ValueError, match="not both"):
        OrdersClient("h:1", "h:2", token=TOKEN, metadata=[("Authorization", "Bearer x")])
