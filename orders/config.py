"""Settings shared by the console scripts: each is a command-line flag whose
default comes from an environment variable of the same name (`--redis-url` and
`ORDERS_REDIS_URL`). Values are checked when the process starts, and a bad or
missing one stops it with one line naming the setting and what it expects.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import ssl
import types
import typing
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

from orders.telemetry import logs
from orders.telemetry.logs import LogFormat, LogLevel
from orders.telemetry.tracing import TracingMode

DEFAULT_WRITE_ADDRESS = "127.0.0.1:50051"
DEFAULT_READ_ADDRESS = "127.0.0.1:50052"

Choice = TypeVar("Choice", bound=StrEnum)
Settings = TypeVar("Settings")
Number = TypeVar("Number", int, float)


def env_name(flag: str) -> str:
    return "ORDERS_" + flag.upper().replace("-", "_")


class SettingsParser(argparse.ArgumentParser):
    """An argument parser whose missing required settings are named by flag and variable."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.required_settings: dict[str, str] = {}  # dest -> "--flag (or ORDERS_FLAG): help"
        # Checks of several settings together, run after parsing; a ValueError is the error line.
        self.finishers: list[Callable[[argparse.Namespace], None]] = []

    def parse_args(self, args: Sequence[str] | None = None, namespace: None = None) -> argparse.Namespace:  # type: ignore[override]
        parsed = super().parse_args(args)
        missing = [description for dest, description in self.required_settings.items() if getattr(parsed, dest) is None]
        if missing:
            self.error("missing setting " + "; missing setting ".join(missing))
        for finish in self.finishers:
            try:
                finish(parsed)
            except ValueError as error:
                self.error(str(error))
        return parsed

    def error(self, message: str) -> NoReturn:
        """One line that names the problem, instead of argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_setting(
    parser: SettingsParser,
    flag: str,
    help: str,
    *,
    default: Any = None,
    parse: Callable[[str], Any] = str,
    secret: bool = False,
) -> None:
    """Adds `--flag`, defaulting to $ORDERS_FLAG, then to `default`; required if neither exists.
    The value of a `secret` setting is never shown (--help says only whether it is set)."""
    env = env_name(flag)
    value = os.environ.get(env, default)
    if value is None:
        parser.required_settings[flag.replace("-", "_")] = f"--{flag} (or {env}): {help}"
    shown = "required" if value is None else f"default: {value}"
    if secret and value is not None:
        shown = "set" if value else "not set"
    parser.add_argument(f"--{flag}", default=value, type=_named(env, parse), help=f"{help} [env {env}; {shown}]")


def _named(env: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wraps a parser so argparse's error names the environment variable as well as the flag."""

    def wrapped(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"({env}) {error}") from None

    wrapped.__name__ = parse.__name__
    return wrapped


def postgres_url(text: str) -> str:
    if urlsplit(text).scheme not in {"postgres", "postgresql"}:
        raise ValueError(f"expected a postgresql://user@host:port/database URL, got {text!r}")
    return text


def redis_url(text: str) -> str:
    """One Redis (redis://, rediss://, unix://) or a Redis Cluster (redis+cluster://host:port,host:port,
    rediss+cluster:// with TLS), whose node list is checked here."""
    if is_cluster_url(text):
        cluster_startup_urls(text)  # raises ValueError naming what is wrong
        return text
    if urlsplit(text).scheme not in {"redis", "rediss", "unix"}:
        raise ValueError(f"expected a redis://host:port/db or redis+cluster://host:port[,...] URL, got {text!r}")
    return text


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}  # and the scheme of one node's URL


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def cluster_startup_urls(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A cluster URL's first node as a plain URL (with the credentials and options) and the other
    nodes' (host, port). Raises ValueError for a URL that is not one, with no node, a port that is
    not a number, or a database other than 0 (a cluster has only database 0)."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError(f"not a cluster URL: {url!r}")
    location, _, query = rest.partition("?")
    netloc, _, path = location.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    if path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0, not {path!r}")
    nodes = [_host_port(node) for node in hosts.split(",")]
    credentials = f"{userinfo}@" if userinfo else ""
    host, port = nodes[0]
    first = f"{CLUSTER_SCHEMES[scheme.lower()]}://{credentials}{_bracketed(host)}:{port}"
    return first + (f"?{query}" if query else ""), nodes[1:]


def _host_port(node: str) -> tuple[str, int]:
    host, sep, port = node.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT for each cluster node, got {node!r}")
    return host.strip("[]"), int(port)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host  # an IPv6 address in a URL


def address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:50051, got {text!r}")
    return text


def _number(text: str, kind: type[Number], expected: str, acceptable: Callable[[Number], bool]) -> Number:
    """`text` as an int or float that is `acceptable`; else a ValueError saying what was `expected`
    (rather than Python's "invalid literal for int() with base 10")."""
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"expected {expected}, got {text!r}") from None
    if not acceptable(value):
        raise ValueError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return _number(text, float, "a number > 0", lambda value: value > 0 and math.isfinite(value))


def positive_int(text: str) -> int:
    return _number(text, int, "an integer > 0", lambda value: value > 0)


def non_negative_int(text: str) -> int:
    return _number(text, int, "an integer >= 0", lambda value: value >= 0)


def one_of(kind: type[Choice], *, fold: Callable[[str], str] = str) -> Callable[[str], Choice]:
    """The parser of a setting whose values are the members of `kind` (after `fold`, e.g. str.upper);
    a ValueError lists them: "expected auto, json or text, got 'x'"."""
    values = [member.value for member in kind]
    expected = ", ".join(values[:-1]) + " or " + values[-1]

    def parse(text: str) -> Choice:
        try:
            return kind(fold(text))
        except ValueError:
            raise ValueError(f"expected {expected}, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


log_level = one_of(LogLevel, fold=str.upper)
log_format = one_of(LogFormat)
tracing_mode = one_of(TracingMode)


def add_postgres_argument(parser: SettingsParser) -> None:
    add_setting(parser, "postgres-url", "PostgreSQL holding the event store", parse=postgres_url)


def add_redis_arguments(parser: SettingsParser) -> None:
    add_setting(parser, "redis-url", "Redis holding the read views", parse=redis_url)
    add_setting(parser, "redis-prefix", "prefix of every Redis key and channel", default="orders:")
    add_setting(
        parser,
        "partitions",
        f"partitions each projection is split into by order id (1-{MAX_PARTITIONS}); the same for every worker "
        "and read service of one deployment (changing it: docs/operations.md, 'Changing the partition count')",
        default="1",
        parse=partition_count,
    )


MAX_PARTITIONS = 256


def partition_count(text: str) -> int:
    return _number(text, int, f"an integer from 1 to {MAX_PARTITIONS}", lambda value: 1 <= value <= MAX_PARTITIONS)


def add_server_arguments(parser: SettingsParser, flag: str, default_address: str) -> None:
    add_setting(parser, flag, "HOST:PORT the gRPC server listens on", default=default_address, parse=address)
    add_setting(
        parser,
        "shutdown-grace",
        "seconds in-flight RPCs get to finish on shutdown",
        default="10",
        parse=positive_float,
    )
    add_setting(
        parser,
        "max-concurrent-rpcs",
        "RPCs served at once; more are refused with RESOURCE_EXHAUSTED",
        default="1000",
        parse=positive_int,
    )


def add_log_argument(parser: SettingsParser) -> None:
    add_setting(parser, "log-level", "DEBUG, INFO, WARNING or ERROR", default="INFO", parse=log_level)
    add_setting(
        parser,
        "log-format",
        "json (one object per line), text, or auto: text on a terminal, json otherwise",
        default="auto",
        parse=log_format,
    )


def add_tracing_argument(parser: SettingsParser) -> None:
    add_setting(
        parser,
        "tracing",
        "OpenTelemetry tracing: otlp, console, off, or auto: on when OTEL_EXPORTER_OTLP_ENDPOINT or "
        "OTEL_TRACES_EXPORTER is set (needs the tracing extra)",
        default="auto",
        parse=tracing_mode,
    )


def optional_address(text: str) -> str:
    """HOST:PORT, or "" for "off"."""
    return address(text) if text else ""


def add_metrics_argument(parser: SettingsParser) -> None:
    add_setting(
        parser,
        "metrics-address",
        "HOST:PORT of the ops HTTP endpoint: /metrics (Prometheus), /livez, /readyz; empty: do not serve it",
        default="",
        parse=optional_address,
    )


def optional_path(text: str) -> Path | None:
    return Path(text) if text else None


def in_setting(flag: str, check: Callable[[], Any]) -> Any:
    """`check()`, with its ValueError's message prefixed by the setting's flag and variable."""
    try:
        return check()
    except ValueError as error:
        raise ValueError(f"--{flag} ({env_name(flag)}): {error}") from None


def settings_from(kind: type[Settings], namespace: argparse.Namespace) -> Settings:
    """The dataclass `kind` made of the parsed settings, each checked against its field: a setting
    without a field, or a value not of its field's type, is a TypeError that names them (a mistake
    in the parser's code, not the user's), instead of a wrong value deep inside the process."""
    values = vars(namespace)
    fields = {field.name for field in dataclasses.fields(kind) if field.init}  # type: ignore[arg-type]
    unknown = sorted(values.keys() - fields)
    if unknown:
        raise TypeError(f"{kind.__name__} has no field for the settings {', '.join(unknown)}")
    hints = typing.get_type_hints(kind)
    wrong = [f"{name}={value!r}" for name, value in values.items() if not _is_of(value, hints[name])]
    if wrong:
        raise TypeError(f"{kind.__name__}: settings of the wrong type: {', '.join(wrong)}")
    return kind(**values)


def _is_of(value: Any, hint: Any) -> bool:
    """isinstance for the types of settings fields: classes, X | None, list[X] and the like (not their items)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_is_of(value, member) for member in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float)
    kind = origin or hint
    return not isinstance(kind, type) or isinstance(value, kind)


def pop_settings(namespace: argparse.Namespace, *flags: str) -> list[Any]:
    return [vars(namespace).pop(flag.replace("-", "_"), None) for flag in flags]


def both_or_neither(cert: Path | None, key: Path | None, purpose: str) -> None:
    if (cert is None) != (key is None):
        given, missing = ("tls-cert-file", "tls-key-file") if key is None else ("tls-key-file", "tls-cert-file")
        raise ValueError(
            f"--{given} ({env_name(given)}) is set but --{missing} ({env_name(missing)}) is not: "
            f"set both for {purpose}, or neither"
        )


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of a PEM file holding `what` ("certificate" or "private key"), or a ValueError
    that names the file and the problem."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    marker = b"PRIVATE KEY-----" if what == "private key" else b"-----BEGIN CERTIFICATE-----"
    if marker not in data:
        raise ValueError(f"{path} is not a PEM {what} (no '{marker.decode().strip('-')}' block)")
    return data


def _no_passphrase() -> bytes:
    raise ValueError("the private key is encrypted: give an unencrypted key (gRPC cannot ask for a passphrase)")


def check_key_pair(cert_file: Path, key_file: Path) -> None:
    """Raises ValueError unless `key_file` is the private key of the certificate in `cert_file`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except ssl.SSLError as error:
        raise ValueError(
            f"{key_file} is not the private key of the certificate in {cert_file}, or one of them is "
            f"damaged ({error.reason or error})"
        ) from None


def check_ca(ca_file: Path) -> None:
    """Raises ValueError unless `ca_file` holds at least one readable CA certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as error:
        raise ValueError(f"{ca_file} holds no readable certificate ({error.reason or error})") from None


def setup_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Structured logs on stderr (orders.telemetry.logs): JSON lines, or text on a terminal."""
    logs.setup_logging(level, fmt)
